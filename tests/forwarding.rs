//! Forwarding of primary requests: how the destination is chosen, the
//! proxy's own error responses, hop-by-hop headers, `Expect: 100-continue`
//! and HTTP/2 with prior knowledge.

mod support;

use http::{Request, Version};
use support::{raw, *};
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_target_forwards_origin_form() {
    bounded(async {
        let primary = TestServer::echo().await;
        let proxy = proxy_spec().default_target(primary.addr()).start().await;

        let request = Request::get("/hello?x=1")
            .header("host", "orders.example:8080")
            .body(empty())
            .unwrap();
        let response = send(proxy.addr(), request).await;

        assert_eq!(response.status, 200, "expected the primary's 200");
        let seen = primary.wait_for_one().await;
        assert_eq!(
            seen.path_and_query(),
            "/hello?x=1",
            "expected path and query unchanged"
        );
        assert_eq!(
            seen.header("host"),
            Some("orders.example:8080"),
            "expected the Host the client sent"
        );
        assert!(proxy.shutdown().await, "expected the proxy to drain");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_goes_to_authority() {
    bounded(async {
        let primary = TestServer::echo().await;
        // No default target: only the request line can name the primary.
        let proxy = proxy_spec().start().await;

        let request = format!(
            "GET http://{0}/abs?q=1 HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
            primary.addr()
        );
        let response = raw::exchange(proxy.addr(), request.as_bytes()).await;

        assert_eq!(
            raw::status_of(&response),
            200,
            "expected the primary's 200: {response}"
        );
        let seen = primary.wait_for_one().await;
        assert_eq!(
            seen.path_and_query(),
            "/abs?q=1",
            "expected origin form upstream"
        );
        assert_eq!(
            seen.header("host"),
            Some(primary.addr().to_string().as_str()),
            "expected the Host of the absolute URI"
        );
        assert_eq!(
            proxy.metrics().await.primary("default"),
            1,
            "expected one primary response"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_destination_gives_400() {
    bounded(async {
        let proxy = proxy_spec().start().await;

        let request = Request::get("/nowhere")
            .header("host", "orders.example")
            .body(empty())
            .unwrap();
        let response = send(proxy.addr(), request).await;

        assert_eq!(
            response.status, 400,
            "expected 400 for a request without destination"
        );
        assert_eq!(
            response.header("tandem-proxy-error"),
            Some("no_destination"),
            "expected the error header to name the cause"
        );
        let body = String::from_utf8_lossy(&response.body);
        assert!(
            body.contains("default_target"),
            "expected the message to name outbound.default_target, got {body:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_gives_502() {
    bounded(async {
        let refused = refused_addr();
        let proxy = proxy_spec().start().await;

        let request = format!(
            "GET http://{0}/ HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
            refused
        );
        let response = raw::exchange(proxy.addr(), request.as_bytes()).await;

        assert_eq!(raw::status_of(&response), 502, "expected 502: {response}");
        assert_eq!(
            raw::header_of(&response, "tandem-proxy-error"),
            Some("connect_failed"),
            "expected the error header to name the connect failure"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_not_forwarded() {
    bounded(async {
        let primary = TestServer::builder()
            .header("connection", "x-reply-hop")
            .header("x-reply-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("x-reply-kept", "1")
            .start()
            .await;
        let proxy = proxy_spec().default_target(primary.addr()).start().await;

        let request = Request::get("/")
            .header("host", primary.addr().to_string())
            .header("connection", "x-request-hop, keep-alive")
            .header("x-request-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header("x-request-kept", "1")
            .body(empty())
            .unwrap();
        let response = send(proxy.addr(), request).await;

        let seen = primary.wait_for_one().await;
        assert_eq!(
            seen.header("x-request-kept"),
            Some("1"),
            "expected end-to-end headers kept"
        );
        for name in ["x-request-hop", "keep-alive", "proxy-connection"] {
            assert_eq!(
                seen.header(name),
                None,
                "expected {name} removed before the primary"
            );
        }
        let connection = seen.header("connection").unwrap_or("");
        assert!(
            !connection.contains("x-request-hop"),
            "expected the client's Connection tokens dropped, got {connection:?}"
        );

        assert_eq!(
            response.header("x-reply-kept"),
            Some("1"),
            "expected end-to-end reply headers"
        );
        for name in ["x-reply-hop", "keep-alive"] {
            assert_eq!(
                response.header(name),
                None,
                "expected {name} removed from the reply"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_upload_works() {
    bounded(async {
        let primary = TestServer::echo().await;
        let proxy = proxy_spec().default_target(primary.addr()).start().await;
        let body = vec![b'e'; 5000];

        let mut stream = raw::connect(proxy.addr()).await;
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
            primary.addr(),
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let (interim, rest) = raw::read_head(&mut stream).await;
        assert_eq!(raw::status_of(&interim), 100, "expected 100 Continue first: {interim}");
        assert!(rest.is_empty(), "expected nothing after 100 Continue before the body is sent");

        stream.write_all(&body).await.unwrap();
        let response = raw::read_to_close(&mut stream).await;
        assert_eq!(raw::status_of(&response), 200, "expected the primary's 200: {response}");

        let seen = primary.wait_for_one().await;
        assert_eq!(seen.body_len, 5000, "expected the whole body at the primary");
        assert_eq!(seen.body_sha256, sha256_hex(&body), "expected the body unchanged");
        assert_eq!(seen.header("expect"), None, "expected Expect answered by the proxy, not forwarded");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_forwards() {
    bounded(async {
        let primary = TestServer::echo().await;
        let other = TestServer::echo().await;
        let proxy = proxy_spec().default_target(other.addr()).start().await;
        let client = H2Conn::connect(proxy.addr()).await;

        let request = Request::post(format!("http://{}/h2?x=1", primary.addr()))
            .body(full("over h2"))
            .unwrap();
        let response = client.send(request).await;

        assert_eq!(response.status, 200, "expected the primary's 200");
        assert_eq!(
            response.version,
            Version::HTTP_2,
            "expected an HTTP/2 response"
        );
        let seen = primary.wait_for_one().await;
        assert_eq!(
            seen.version,
            Version::HTTP_2,
            "expected HTTP/2 upstream too"
        );
        assert_eq!(
            seen.path_and_query(),
            "/h2?x=1",
            "expected path and query unchanged"
        );
        assert_eq!(&seen.body[..], b"over h2", "expected the body unchanged");
        assert_eq!(
            other.count(),
            0,
            "expected the :authority, not the default target, to decide"
        );

        // An :authority naming the proxy itself falls back to the default
        // target instead of looping.
        let request = Request::get(format!("http://{}/self", proxy.addr()))
            .body(empty())
            .unwrap();
        let response = client.send(request).await;
        assert_eq!(response.status, 200, "expected the default target's 200");
        let seen = other.wait_for_one().await;
        assert_eq!(
            seen.path_and_query(),
            "/self",
            "expected the request at the default target"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_replaces_stale_host() {
    bounded(async {
        let primary = TestServer::echo().await;
        let proxy = proxy_spec().start().await;

        // RFC 9112 section 3.2.2: a proxy ignores the Host of an
        // absolute-form request and sends the target's authority instead,
        // without any userinfo.
        for target in [
            format!("http://{}/abs", primary.addr()),
            format!("http://user:secret@{}/abs", primary.addr()),
        ] {
            let request = format!(
                "GET {target} HTTP/1.1\r\nHost: stale.example\r\nConnection: close\r\n\r\n"
            );
            let response = raw::exchange(proxy.addr(), request.as_bytes()).await;
            assert_eq!(
                raw::status_of(&response),
                200,
                "expected the primary's 200 for {target}: {response}"
            );
        }

        for seen in primary.wait_for_requests(2).await {
            assert_eq!(
                seen.header("host"),
                Some(primary.addr().to_string().as_str()),
                "expected Host replaced by the request target's host and port"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_settles_copy() {
    bounded(async {
        let refused = refused_addr();
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec().route(route("r", &secondary.url())).start().await;

        for (path, body) in [("/get", ""), ("/post", "payload")] {
            let method = if body.is_empty() { "GET" } else { "POST" };
            let request = format!(
                "{method} http://{refused}{path} HTTP/1.1\r\nHost: {refused}\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
            let response = raw::exchange(proxy.addr(), request.as_bytes()).await;
            assert_eq!(raw::status_of(&response), 502, "expected 502 for {method}: {response}");
        }

        // Whether a copy goes out when the primary is down depends on whether
        // its body was complete, but each due copy must end up counted.
        let metrics = proxy.wait_settled("r", 2).await;
        assert_eq!(
            metrics.delivered("r") as usize,
            secondary.count(),
            "expected every delivered copy at the secondary"
        );
    })
    .await;
}
