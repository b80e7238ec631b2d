//! The mirror tee on healthy secondaries: the primary response is the same
//! with and without a copy, the copy repeats the request, bodies are teed
//! whole while they stream, and a slow secondary never delays the client.

mod support;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, Request, Version};
use support::*;

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "upgrade",
];

/// The parts of a response that must not change when the proxy (and a
/// copy) sits between client and primary: status, end-to-end headers
/// except Date (each name with its values in order), body and trailers.
#[derive(Debug, PartialEq)]
struct Comparable {
    status: u16,
    headers: BTreeMap<String, Vec<Vec<u8>>>,
    body: Bytes,
    trailers: Option<HeaderMap>,
}

fn comparable(response: &Collected) -> Comparable {
    let mut headers: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for (name, value) in &response.headers {
        if name != "date" && !HOP_BY_HOP.contains(&name.as_str()) {
            headers
                .entry(name.to_string())
                .or_default()
                .push(value.as_bytes().to_vec());
        }
    }
    Comparable {
        status: response.status.as_u16(),
        headers,
        body: response.body.clone(),
        trailers: response.trailers.clone(),
    }
}

fn fixed_reply_body() -> Bytes {
    Bytes::from((0..3000u32).map(|i| (i % 253) as u8).collect::<Vec<u8>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_response_same_when_mirrored() {
    bounded(async {
        let primary = TestServer::builder()
            .status(201)
            .header("content-type", "application/octet-stream")
            .header("x-custom", "kept")
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2")
            // hyper sends HTTP/1.1 trailers only when `Trailer` declares them.
            .header("trailer", "x-checksum")
            .body(fixed_reply_body())
            .trailer("x-checksum", "abc123")
            .start()
            .await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()).path_prefix("/mirrored"))
            .start()
            .await;
        let request = |path: &str| {
            Request::post(path)
                .header("host", primary.addr().to_string())
                .header("te", "trailers")
                .body(full("request body"))
                .unwrap()
        };

        let direct = send(primary.addr(), request("/direct")).await;
        let plain = send(proxy.addr(), request("/plain")).await;
        let mirrored = send(proxy.addr(), request("/mirrored")).await;

        assert_eq!(
            direct.trailers.as_ref().and_then(|t| t.get("x-checksum")),
            Some(&"abc123".parse().unwrap()),
            "expected the primary to send trailers on HTTP/1.1 chunked framing"
        );
        assert_eq!(
            comparable(&plain),
            comparable(&direct),
            "expected the proxy to pass the response unchanged"
        );
        assert_eq!(
            comparable(&mirrored),
            comparable(&direct),
            "expected the mirrored response unchanged"
        );

        let copy = secondary.wait_for_one().await;
        assert_eq!(
            copy.path_and_query(),
            "/mirrored",
            "expected only the matched request copied"
        );
        let metrics = proxy.wait_settled("r", 1).await;
        assert_eq!(metrics.delivered("r"), 1, "expected the copy delivered");
    })
    .await;
}

/// Builds a gRPC message frame: a zero compression flag, the big-endian
/// length, then the message bytes.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    Bytes::from(frame)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_response_same_when_mirrored() {
    bounded(async {
        let primary = TestServer::builder()
            .header("content-type", "application/grpc")
            .header("x-custom", "kept")
            .body(grpc_frame(b"reply message"))
            .trailer("grpc-status", "0")
            .trailer("grpc-message", "done")
            .start()
            .await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .route(route("grpc", &secondary.url()).path_prefix("/mirrored.Service/"))
            .start()
            .await;
        let call_body = grpc_frame(b"request message");
        let call = |path: &str| {
            Request::post(format!("http://{}{path}", primary.addr()))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(full(call_body.clone()))
                .unwrap()
        };

        let direct = H2Conn::connect(primary.addr())
            .await
            .send(call("/direct.Service/Call"))
            .await;
        let through = H2Conn::connect(proxy.addr()).await;
        let plain = through.send(call("/plain.Service/Call")).await;
        let mirrored = through.send(call("/mirrored.Service/Call")).await;

        assert_eq!(
            direct.version,
            Version::HTTP_2,
            "expected HTTP/2 from the primary"
        );
        assert_eq!(
            direct.trailers.as_ref().and_then(|t| t.get("grpc-status")),
            Some(&"0".parse().unwrap()),
            "expected grpc-status in the primary's trailers"
        );
        assert_eq!(
            comparable(&plain),
            comparable(&direct),
            "expected the proxy to pass the call unchanged"
        );
        assert_eq!(
            comparable(&mirrored),
            comparable(&direct),
            "expected the mirrored call unchanged"
        );

        let copy = secondary.wait_for_one().await;
        assert_eq!(
            copy.version,
            Version::HTTP_2,
            "expected the copy over HTTP/2"
        );
        assert_eq!(
            copy.path_and_query(),
            "/mirrored.Service/Call",
            "expected the call path"
        );
        assert_eq!(
            copy.body, call_body,
            "expected the copy to carry the same message"
        );
        assert_eq!(
            copy.header("content-type"),
            Some("application/grpc"),
            "expected the gRPC content type"
        );
        assert_eq!(
            copy.header("te"),
            Some("trailers"),
            "expected TE: trailers kept for gRPC"
        );
        assert_eq!(
            copy.header("tandem-dispatch"),
            Some("mirror"),
            "expected the copy tagged"
        );

        let primary_seen = primary.wait_for_requests(3).await;
        for seen in &primary_seen {
            assert_eq!(
                seen.body, call_body,
                "expected the primary to get the message whole"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_repeats_method_path_headers() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()))
            .start()
            .await;

        let request = Request::put("/orders/42?x=1&y=two")
            .header("host", "orders.example:8080")
            .header("content-type", "application/json")
            .header("x-custom", "a")
            .header("x-multi", "1")
            .header("x-multi", "2")
            .header("connection", "x-hop")
            .header("x-hop", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .body(full(r#"{"id":42}"#))
            .unwrap();
        let response = send(proxy.addr(), request).await;
        assert_eq!(response.status, 200, "expected the primary's 200");

        let copy = secondary.wait_for_one().await;
        assert_eq!(copy.method, "PUT", "expected the same method");
        assert_eq!(
            copy.path_and_query(),
            "/orders/42?x=1&y=two",
            "expected the same path and query"
        );
        assert_eq!(&copy.body[..], br#"{"id":42}"#, "expected the same body");
        assert_eq!(
            copy.header("content-length"),
            Some("9"),
            "expected the body length"
        );
        assert_eq!(
            copy.header("content-type"),
            Some("application/json"),
            "expected end-to-end headers"
        );
        assert_eq!(
            copy.header("x-custom"),
            Some("a"),
            "expected end-to-end headers"
        );
        let multi: Vec<_> = copy.headers.get_all("x-multi").iter().collect();
        assert_eq!(
            multi,
            ["1", "2"],
            "expected every value of a repeated header, in order"
        );
        for name in ["x-hop", "keep-alive", "proxy-connection"] {
            assert_eq!(
                copy.header(name),
                None,
                "expected hop-by-hop {name} not copied"
            );
        }
        assert_eq!(
            copy.header("tandem-dispatch"),
            Some("mirror"),
            "expected the copy tagged"
        );
        assert_eq!(
            copy.header("host"),
            Some(secondary.addr().to_string().as_str()),
            "expected the secondary's authority as Host by default"
        );

        let seen = primary.wait_for_one().await;
        assert_eq!(
            seen.header("tandem-dispatch"),
            None,
            "expected the primary untagged"
        );
        assert_eq!(
            seen.header("host"),
            Some("orders.example:8080"),
            "expected the primary's Host unchanged"
        );
        proxy.wait_settled("r", 1).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preserve_host_keeps_original_host() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()).mirror("preserve_host", true))
            .start()
            .await;

        let request = Request::get("/h1")
            .header("host", "orders.example:8080")
            .body(empty())
            .unwrap();
        send(proxy.addr(), request).await;
        let copy = secondary.wait_for_one().await;
        assert_eq!(
            copy.header("host"),
            Some("orders.example:8080"),
            "expected the original Host on the copy"
        );

        // On HTTP/2 the authority travels as :authority.
        let request = Request::get(format!("http://{}/h2", primary.addr()))
            .body(empty())
            .unwrap();
        H2Conn::connect(proxy.addr()).await.send(request).await;
        let copies = secondary.wait_for_requests(2).await;
        assert_eq!(
            copies[1].version,
            Version::HTTP_2,
            "expected the second copy over HTTP/2"
        );
        assert_eq!(
            copies[1].authority(),
            Some(primary.addr().to_string()),
            "expected the original :authority on the HTTP/2 copy"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_copy_gets_secondary_authority() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .route(route("r", &secondary.url()))
            .start()
            .await;

        let request = Request::get(format!("http://{}/h2", primary.addr()))
            .body(empty())
            .unwrap();
        H2Conn::connect(proxy.addr()).await.send(request).await;

        let copy = secondary.wait_for_one().await;
        assert_eq!(
            copy.version,
            Version::HTTP_2,
            "expected the copy over HTTP/2"
        );
        assert_eq!(
            copy.authority(),
            Some(secondary.addr().to_string()),
            "expected the secondary's :authority on the copy"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv6_secondary_gets_bracketed_host() {
    bounded(async {
        let bind: SocketAddr = "[::1]:0".parse().unwrap();
        let secondary = match TestServer::builder().bind(bind).try_start().await {
            Ok(server) => server,
            Err(error) => {
                eprintln!("skipped: cannot bind [::1] on this machine: {error}");
                return;
            }
        };
        let primary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()))
            .start()
            .await;
        assert!(
            secondary.url().starts_with("http://[::1]:"),
            "expected a bracketed URL"
        );

        let request = Request::get("/v6")
            .header("host", "orders")
            .body(empty())
            .unwrap();
        send(proxy.addr(), request).await;

        let copy = secondary.wait_for_one().await;
        assert_eq!(
            copy.header("host"),
            Some(format!("[::1]:{}", secondary.addr().port()).as_str()),
            "expected Host [::1]:PORT"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portless_secondary_url_uses_80() {
    bounded(async {
        // Port 80 on a random address of 127.0.0.0/8 avoids clashing with
        // anything else on the machine; binding it needs root.
        let octets: [u8; 3] = rand::random();
        let ip = std::net::Ipv4Addr::new(127, octets[0], octets[1], octets[2].clamp(1, 254));
        let bind = SocketAddr::from((ip, 80));
        let secondary = match TestServer::builder().bind(bind).try_start().await {
            Ok(server) => server,
            Err(error) => {
                eprintln!("skipped: cannot bind {bind}: {error}");
                return;
            }
        };
        let primary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &format!("http://{ip}")))
            .start()
            .await;

        let request = Request::get("/portless")
            .header("host", "orders")
            .body(empty())
            .unwrap();
        send(proxy.addr(), request).await;

        let copy = secondary.wait_for_one().await;
        assert_eq!(
            copy.path_and_query(),
            "/portless",
            "expected the copy on port 80"
        );
        assert_eq!(
            copy.header("host"),
            Some(ip.to_string().as_str()),
            "expected Host without the default port"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_body_copied_whole() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()).mirror("max_body_bytes", 16 * 1024 * 1024))
            .start()
            .await;
        let upload = PatternUpload::new(10 * 1024 * 1024);
        let expected = upload.sha256();

        let request = Request::post("/upload")
            .header("host", "orders")
            .header("content-length", upload.len.to_string())
            .body(upload.body())
            .unwrap();
        let response = send(proxy.addr(), request).await;
        assert_eq!(response.status, 200, "expected the primary's 200");

        let seen = primary.wait_for_one().await;
        assert_eq!(
            seen.body_len, upload.len,
            "expected all 10 MiB at the primary"
        );
        assert_eq!(
            seen.body_sha256, expected,
            "expected the primary's body unchanged"
        );
        let copy = secondary.wait_for_one().await;
        assert_eq!(copy.body_len, upload.len, "expected all 10 MiB on the copy");
        assert_eq!(
            copy.body_sha256, expected,
            "expected the copy's body unchanged"
        );
        let metrics = proxy.wait_settled("r", 1).await;
        assert_eq!(metrics.delivered("r"), 1, "expected the copy delivered");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_copied_with_length() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()))
            .start()
            .await;
        let chunks: Vec<Bytes> = ["first,", "", "second,", "third"]
            .iter()
            .map(|c| Bytes::from_static(c.as_bytes()))
            .collect();

        let request = Request::post("/chunked")
            .header("host", "orders")
            .body(streamed(chunks, None))
            .unwrap();
        send(proxy.addr(), request).await;

        let seen = primary.wait_for_one().await;
        assert_eq!(
            seen.header("transfer-encoding"),
            Some("chunked"),
            "expected the primary to get chunked framing"
        );
        assert_eq!(
            &seen.body[..],
            b"first,second,third",
            "expected the primary's body whole"
        );
        let copy = secondary.wait_for_one().await;
        assert_eq!(
            &copy.body[..],
            b"first,second,third",
            "expected the copy's body whole"
        );
        assert_eq!(
            copy.header("content-length"),
            Some("18"),
            "expected the copy framed by its length"
        );
        assert_eq!(
            copy.header("transfer-encoding"),
            None,
            "expected no chunked framing on the copy"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_request_trailers_reach_copy() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .route(route("r", &secondary.url()))
            .start()
            .await;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-request-checksum", "77".parse().unwrap());

        let request = Request::post(format!("http://{}/stream", primary.addr()))
            .header("te", "trailers")
            .body(streamed(
                vec![Bytes::from_static(b"part")],
                Some(trailers.clone()),
            ))
            .unwrap();
        H2Conn::connect(proxy.addr()).await.send(request).await;

        let seen = primary.wait_for_one().await;
        assert_eq!(
            seen.trailers,
            Some(trailers.clone()),
            "expected the primary to get the trailers"
        );
        let copy = secondary.wait_for_one().await;
        assert_eq!(&copy.body[..], b"part", "expected the copy's body");
        assert_eq!(
            copy.trailers,
            Some(trailers),
            "expected the copy to carry the trailers"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_request_trailers_reach_copy() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()))
            .start()
            .await;
        let mut trailers = HeaderMap::new();
        trailers.insert("x-request-checksum", "77".parse().unwrap());

        // HTTP/1.1 senders (hyper included) send only the trailers that the
        // `Trailer` header declares.
        let request = Request::post("/stream")
            .header("host", "orders")
            .header("trailer", "x-request-checksum")
            .body(streamed(
                vec![Bytes::from_static(b"part")],
                Some(trailers.clone()),
            ))
            .unwrap();
        send(proxy.addr(), request).await;

        let seen = primary.wait_for_one().await;
        assert_eq!(
            seen.trailers,
            Some(trailers.clone()),
            "expected the primary to get the trailers"
        );
        let copy = secondary.wait_for_one().await;
        assert_eq!(&copy.body[..], b"part", "expected the copy's body");
        assert_eq!(
            copy.trailers,
            Some(trailers),
            "expected the copy to carry the trailers"
        );
        assert_eq!(
            copy.header("transfer-encoding"),
            Some("chunked"),
            "expected chunked framing, the only HTTP/1.1 framing with trailers"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_url_path_prefixes_copy() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &format!("{}/shadow/", secondary.url())))
            .start()
            .await;

        let request = Request::get("/orders/7?full=1")
            .header("host", "orders")
            .body(empty())
            .unwrap();
        send(proxy.addr(), request).await;

        let copy = secondary.wait_for_one().await;
        assert_eq!(
            copy.path_and_query(),
            "/shadow/orders/7?full=1",
            "expected the URL's path prepended"
        );
        let seen = primary.wait_for_one().await;
        assert_eq!(
            seen.path_and_query(),
            "/orders/7?full=1",
            "expected the primary's path unchanged"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_secondary_never_delays_keepalive() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::builder()
            .delay(Duration::from_secs(4))
            .start()
            .await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()).mirror("timeout", "10s"))
            .start()
            .await;
        let mut connection = H1Conn::connect(proxy.addr()).await;

        for i in 0..3 {
            let request = Request::post(format!("/keepalive/{i}"))
                .header("host", "orders")
                .body(full("payload"))
                .unwrap();
            let response = connection.send(request).await;
            assert_eq!(
                response.status, 200,
                "expected request {i} answered on the same connection"
            );
        }

        // All three responses arrived before the secondary responded to any
        // copy, so none of them waited for it.
        let metrics = proxy.metrics().await;
        assert_eq!(
            metrics.delivered("r"),
            0,
            "expected no copy answered yet by the 4 s secondary"
        );
        assert_eq!(
            metrics.in_flight("r"),
            3,
            "expected all three copies still in flight"
        );
        let metrics = proxy.wait_settled("r", 3).await;
        assert_eq!(
            metrics.delivered("r"),
            3,
            "expected every copy delivered in the end"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_secondary_never_delays_h2_streams() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::builder()
            .delay(Duration::from_secs(4))
            .start()
            .await;
        let proxy = proxy_spec()
            .route(route("r", &secondary.url()).mirror("timeout", "10s"))
            .start()
            .await;
        let connection = H2Conn::connect(proxy.addr()).await;

        let first = Request::post(format!("http://{}/first", primary.addr()))
            .body(full("payload"))
            .unwrap();
        let response = connection.send(first).await;
        assert_eq!(response.status, 200, "expected the first stream answered");

        let streams: Vec<_> = (0..4)
            .map(|i| {
                let request = Request::post(format!("http://{}/stream/{i}", primary.addr()))
                    .body(full("payload"))
                    .unwrap();
                tokio::spawn(send_h2(connection.sender(), request))
            })
            .collect();
        for stream in streams {
            let response = stream.await.expect("stream task does not panic");
            assert_eq!(
                response.status, 200,
                "expected every concurrent stream answered"
            );
        }

        let metrics = proxy.metrics().await;
        assert_eq!(
            metrics.delivered("r"),
            0,
            "expected no copy answered yet by the 4 s secondary"
        );
        assert_eq!(
            metrics.in_flight("r"),
            5,
            "expected all five copies still in flight"
        );
        let metrics = proxy.wait_settled("r", 5).await;
        assert_eq!(
            metrics.delivered("r"),
            5,
            "expected every copy delivered in the end"
        );
    })
    .await;
}
