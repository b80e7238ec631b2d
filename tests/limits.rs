//! Size limits: the route's `max_body_bytes` on copies, the proxy's own
//! request limits (413, 431), aborted uploads, and the memory a large
//! upload costs while it is teed.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use support::{process::BinaryProxy, raw, *};
use tokio::io::AsyncWriteExt;

#[derive(Clone, Copy, Debug)]
enum Framing {
    ContentLength,
    Chunked,
}

fn body_of(size: usize) -> Bytes {
    Bytes::from((0..size).map(|i| (i % 241) as u8).collect::<Vec<u8>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_size_edges_at_limit() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()).mirror("max_body_bytes", 1000))
            .start()
            .await;
        let mut connection = H1Conn::connect(proxy.addr()).await;
        let cases = [999, 1000, 1001]
            .into_iter()
            .flat_map(|size| [(size, Framing::ContentLength), (size, Framing::Chunked)]);

        for (size, framing) in cases.clone() {
            let body = body_of(size);
            let request =
                Request::post(format!("/edge/{size}/{framing:?}")).header("host", "orders");
            let request = match framing {
                Framing::ContentLength => request.body(full(body)),
                Framing::Chunked => {
                    let chunks = body.chunks(300).map(Bytes::copy_from_slice).collect();
                    request.body(streamed(chunks, None))
                }
            };
            let response = connection.send(request.unwrap()).await;
            assert_eq!(
                response.status, 200,
                "expected the primary's 200 for {size} bytes {framing:?}"
            );
        }

        let metrics = proxy.wait_settled("r", 6).await;
        assert_eq!(
            metrics.delivered("r"),
            4,
            "expected the 4 bodies at or under 1000 bytes copied"
        );
        assert_eq!(
            metrics.shed("r", "body_too_large"),
            2,
            "expected both 1001-byte bodies shed"
        );
        let copies = secondary.requests();
        let primary_seen = primary.requests();
        for (size, framing) in cases {
            let path = format!("/edge/{size}/{framing:?}");
            let seen = primary_seen
                .iter()
                .find(|r| r.path_and_query() == path)
                .unwrap_or_else(|| panic!("expected {path} at the primary"));
            assert_eq!(
                seen.body_len, size as u64,
                "expected the primary to get all of {path}"
            );
            let copy = copies.iter().find(|r| r.path_and_query() == path);
            if size > 1000 {
                assert!(
                    copy.is_none(),
                    "expected no copy of {path}, over max_body_bytes"
                );
                continue;
            }
            let copy = copy.unwrap_or_else(|| panic!("expected a copy of {path}"));
            assert_eq!(
                copy.body,
                body_of(size),
                "expected the copy of {path} whole"
            );
            assert_eq!(
                copy.header("content-length"),
                Some(size.to_string().as_str()),
                "expected the copy of {path} framed by its length"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_requests_copied_bodiless() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()).mirror("max_body_bytes", 1000))
            .start()
            .await;
        let mut connection = H1Conn::connect(proxy.addr()).await;

        for method in ["GET", "HEAD"] {
            let request = Request::builder()
                .method(method)
                .uri(format!("/bodiless/{method}"))
                .header("host", "orders")
                .body(empty())
                .unwrap();
            let response = connection.send(request).await;
            assert_eq!(
                response.status, 200,
                "expected the primary's 200 for {method}"
            );
        }
        let request = Request::post("/bodiless/zero")
            .header("host", "orders")
            .header("content-length", "0")
            .body(empty())
            .unwrap();
        connection.send(request).await;

        let metrics = proxy.wait_settled("r", 3).await;
        assert_eq!(
            metrics.delivered("r"),
            3,
            "expected all three requests copied"
        );
        let copies = secondary.requests();
        for method in ["GET", "HEAD"] {
            let copy = copies
                .iter()
                .find(|r| r.method == method)
                .unwrap_or_else(|| panic!("expected a {method} copy"));
            assert_eq!(copy.body_len, 0, "expected no body on the {method} copy");
            assert_eq!(
                copy.header("content-length"),
                None,
                "expected no Content-Length on the {method} copy"
            );
            assert_eq!(
                copy.header("transfer-encoding"),
                None,
                "expected no chunked framing on the {method} copy"
            );
        }
        let zero = copies
            .iter()
            .find(|r| r.method == "POST")
            .expect("expected the POST copy");
        assert_eq!(
            zero.header("content-length"),
            Some("0"),
            "expected Content-Length: 0 kept"
        );
        assert_eq!(zero.body_len, 0, "expected an empty body");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_over_limit_413() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .outbound("max_request_body_bytes", 10_000)
            .route(route("r", &secondary.url()))
            .start()
            .await;

        let request = b"POST /big HTTP/1.1\r\nHost: orders\r\nContent-Length: 20000\r\n\r\n";
        let response = raw::exchange(proxy.addr(), request).await;

        assert_eq!(raw::status_of(&response), 413, "expected 413: {response}");
        assert_eq!(
            raw::header_of(&response, "tandem-proxy-error"),
            Some("body_too_large"),
            "expected the error header to name the limit"
        );
        let metrics = proxy.metrics().await;
        assert_eq!(
            metrics.due("r"),
            0,
            "expected no copy due for a rejected request"
        );
        assert_eq!(primary.count(), 0, "expected the primary never called");
        assert_eq!(secondary.count(), 0, "expected the secondary never called");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_over_limit_413() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .outbound("max_request_body_bytes", 10_000)
            .route(route("r", &secondary.url()))
            .start()
            .await;

        let mut request =
            b"POST /big HTTP/1.1\r\nHost: orders\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for _ in 0..5 {
            request.extend_from_slice(format!("{:x}\r\n", 4000).as_bytes());
            request.extend_from_slice(&[b'c'; 4000]);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
        let response = raw::exchange(proxy.addr(), &request).await;

        assert_eq!(
            raw::status_of(&response),
            413,
            "expected 413 once the body crosses the limit: {response}"
        );
        let metrics = proxy
            .wait_for_metrics("the copy settled", |m| m.settled("r"))
            .await;
        assert_eq!(metrics.delivered("r"), 0, "expected no copy delivered");
        assert_eq!(
            metrics.shed("r", "body_incomplete"),
            metrics.due("r"),
            "expected any copy started before the limit shed as body_incomplete"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(secondary.count(), 0, "expected the secondary never called");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_header_block_431() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .outbound("max_request_header_bytes", 8192)
            .route(route("r", &secondary.url()))
            .start()
            .await;

        let request = format!(
            "GET /big-head HTTP/1.1\r\nHost: orders\r\nX-Big: {}\r\n\r\n",
            "h".repeat(20_000)
        );
        let response = raw::exchange(proxy.addr(), request.as_bytes()).await;

        assert_eq!(raw::status_of(&response), 431, "expected 431: {response}");
        let metrics = proxy.metrics().await;
        assert_eq!(
            metrics.due("r"),
            0,
            "expected no copy due for a rejected request"
        );
        assert_eq!(primary.count(), 0, "expected the primary never called");
        assert_eq!(secondary.count(), 0, "expected the secondary never called");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aborted_upload_counts_incomplete() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()))
            .start()
            .await;

        let mut stream = raw::connect(proxy.addr()).await;
        stream
            .write_all(b"POST /aborted HTTP/1.1\r\nHost: orders\r\nContent-Length: 1000\r\n\r\n")
            .await
            .unwrap();
        stream.write_all(&[b'a'; 100]).await.unwrap();
        // The copy is due once the proxy has routed the request and started
        // forwarding it; only then does the client go away.
        proxy
            .wait_for_metrics("the copy due", |m| m.due("r") == 1)
            .await;
        drop(stream);

        let metrics = proxy.wait_settled("r", 1).await;
        assert_eq!(
            metrics.shed("r", "body_incomplete"),
            1,
            "expected the copy shed as body_incomplete"
        );
        assert_eq!(metrics.delivered("r"), 0, "expected no copy delivered");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(secondary.count(), 0, "expected the secondary never called");
        if let Some(seen) = primary.requests().first() {
            assert!(
                !seen.complete,
                "expected the primary to see an incomplete body"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_keeps_memory_flat() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let yaml = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()))
            .yaml();
        let proxy = BinaryProxy::start(&yaml).await;
        let upload = PatternUpload::new(100 * 1024 * 1024);
        let expected = upload.sha256();

        // Warm up: the first mirrored call allocates the pools and buffers.
        let warmup = Request::post("/warmup")
            .header("host", "orders")
            .body(full(vec![b'w'; 64 * 1024]))
            .unwrap();
        send(proxy.outbound, warmup).await;
        wait_for_metrics(proxy.admin, "the warm-up copy delivered", |m| m.delivered("r") == 1).await;
        let before = proxy.status_kib("VmHWM");

        let mut connection = H1Conn::connect(proxy.outbound).await;
        let with_length = Request::post("/upload/length")
            .header("host", "orders")
            .header("content-length", upload.len.to_string())
            .body(upload.body())
            .unwrap();
        let response = connection.send(with_length).await;
        assert_eq!(response.status, 200, "expected the 100 MiB upload with Content-Length to succeed");
        let chunked = Request::post("/upload/chunked")
            .header("host", "orders")
            .body(upload.body())
            .unwrap();
        let response = connection.send(chunked).await;
        assert_eq!(response.status, 200, "expected the chunked 100 MiB upload to succeed");

        let metrics = wait_for_metrics(proxy.admin, "both large copies shed", |m| {
            m.due("r") == 3 && m.settled("r")
        })
        .await;
        let after = proxy.status_kib("VmHWM");
        let growth_mib = after.saturating_sub(before) / 1024;
        assert!(
            growth_mib < 40,
            "expected peak RSS to grow by less than 40 MiB for 2 x 100 MiB uploads, grew {growth_mib} MiB \
             ({before} KiB to {after} KiB)"
        );
        assert_eq!(metrics.shed("r", "body_too_large"), 2, "expected both uploads shed as body_too_large");
        assert_eq!(secondary.count(), 1, "expected only the warm-up copy at the secondary");
        let seen = primary.wait_for_requests(3).await;
        for upload_seen in &seen[1..] {
            assert_eq!(upload_seen.body_len, upload.len, "expected all 100 MiB at the primary");
            assert_eq!(upload_seen.body_sha256, expected, "expected the upload unchanged at the primary");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_head_closed() {
    bounded(async {
        let primary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .outbound("header_read_timeout", "300ms")
            .start()
            .await;

        let mut stream = raw::connect(proxy.addr()).await;
        stream
            .write_all(b"GET /stalled HTTP/1.1\r\nHost: orders\r\n")
            .await
            .unwrap();
        // Well below the 60 s default, so this fails if the setting is ignored.
        let closed =
            tokio::time::timeout(Duration::from_secs(5), raw::read_to_close(&mut stream)).await;

        assert!(
            closed.is_ok(),
            "expected the proxy to close a stalled request head after header_read_timeout"
        );
        assert_eq!(primary.count(), 0, "expected the primary never called");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connection_closed() {
    bounded(async {
        let primary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .outbound("idle_timeout", "400ms")
            .start()
            .await;

        let mut stream = raw::connect(proxy.addr()).await;
        stream
            .write_all(b"GET /once HTTP/1.1\r\nHost: orders\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = raw::read_head(&mut stream).await;
        assert_eq!(
            raw::status_of(&head),
            200,
            "expected the primary's 200: {head}"
        );
        // Well below the 120 s default, so this fails if the setting is ignored.
        let closed =
            tokio::time::timeout(Duration::from_secs(5), raw::read_to_close(&mut stream)).await;

        assert!(
            closed.is_ok(),
            "expected the proxy to close the idle keep-alive connection"
        );
        let metrics = proxy
            .wait_for_metrics("no open client connection", |m| {
                m.sum("tandem_connections_open", &[("direction", "outbound")]) == 0.0
            })
            .await;
        assert_eq!(metrics.primary("default"), 1, "expected one primary call");
    })
    .await;
}
