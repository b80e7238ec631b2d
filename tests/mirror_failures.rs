//! Failing secondaries: slow, refusing, black-holed, resetting and erroring.
//! The primary call always succeeds without a latency penalty, and every
//! copy ends either as a response from the secondary or as a shed with its
//! reason, so that due == delivered + shed.

mod support;

use std::time::{Duration, Instant};

use http::Request;
use support::*;

const REQUESTS: u64 = 50;

/// The two proxies of a latency comparison: one copies to a healthy
/// secondary, the other to the secondary under test.
struct Comparison {
    healthy: TestProxy,
    failing: TestProxy,
}

/// Sends [`REQUESTS`] sequential requests through each proxy, alternating
/// between them so that machine load affects both runs alike. Then checks
/// that the median latency with the failing secondary stays below 10x the
/// healthy median plus 50 ms.
async fn compare_with_healthy(failing_to: &str, mirror_timeout: &str) -> Comparison {
    let primary = TestServer::echo().await;
    let healthy_secondary = TestServer::echo().await;
    let healthy = proxy_spec()
        .default_target(primary.addr())
        .route(route("r", &healthy_secondary.url()).mirror("timeout", mirror_timeout))
        .start()
        .await;
    let failing = proxy_spec()
        .default_target(primary.addr())
        .route(route("r", failing_to).mirror("timeout", mirror_timeout))
        .start()
        .await;

    let mut healthy_conn = H1Conn::connect(healthy.addr()).await;
    let mut failing_conn = H1Conn::connect(failing.addr()).await;
    let mut healthy_times = Vec::new();
    let mut failing_times = Vec::new();
    for i in 0..REQUESTS {
        for (conn, times) in [
            (&mut healthy_conn, &mut healthy_times),
            (&mut failing_conn, &mut failing_times),
        ] {
            let request = Request::post(format!("/call/{i}"))
                .header("host", "orders")
                .body(full("payload"))
                .unwrap();
            let started = Instant::now();
            let response = conn.send(request).await;
            times.push(started.elapsed());
            assert_eq!(
                response.status, 200,
                "expected every primary call to succeed"
            );
        }
    }

    let healthy_metrics = healthy.wait_settled("r", REQUESTS).await;
    assert_eq!(
        healthy_metrics.delivered_class("r", "2xx"),
        REQUESTS,
        "expected every copy to the healthy secondary delivered"
    );
    assert_eq!(
        healthy_secondary.count() as u64,
        REQUESTS,
        "expected the healthy secondary to get every copy"
    );

    let healthy_p50 = median(&healthy_times);
    let failing_p50 = median(&failing_times);
    let bound = healthy_p50 * 10 + Duration::from_millis(50);
    assert!(
        failing_p50 < bound,
        "expected the p50 with a failing secondary ({failing_p50:?}) below 10x the healthy p50 \
         ({healthy_p50:?}) plus 50 ms"
    );
    Comparison { healthy, failing }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_secondary_costs_primary_nothing() {
    bounded(async {
        let secondary = TestServer::builder()
            .delay(Duration::from_secs(2))
            .start()
            .await;
        let run = compare_with_healthy(&secondary.url(), "5s").await;

        let metrics = run.failing.wait_settled("r", REQUESTS).await;
        assert_eq!(
            metrics.delivered_class("r", "2xx"),
            REQUESTS,
            "expected slow copies delivered"
        );
        assert_eq!(
            metrics.shed_total("r"),
            0,
            "expected no copy shed within the 5 s timeout"
        );
        assert!(
            run.healthy.shutdown().await,
            "expected the healthy proxy to drain"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_secondary_counts_connect_failed() {
    bounded(async {
        let run = compare_with_healthy(&format!("http://{}", refused_addr()), "2s").await;

        // After a refused connection the proxy backs off and sheds copies as
        // unavailable without trying, so both reasons share the copies.
        let metrics = run.failing.wait_settled("r", REQUESTS).await;
        let connect_failed = metrics.shed("r", "connect_failed");
        assert!(
            connect_failed >= 1,
            "expected at least the first copy shed as connect_failed"
        );
        assert_eq!(
            connect_failed + metrics.shed("r", "unavailable"),
            REQUESTS,
            "expected every copy shed as connect_failed or unavailable"
        );
        assert_eq!(metrics.delivered("r"), 0, "expected no copy delivered");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_secondary_recovers_after_backoff() {
    bounded(async {
        let primary = TestServer::echo().await;
        let refused = refused_addr();
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &format!("http://{refused}")))
            .start()
            .await;
        let mut connection = H1Conn::connect(proxy.addr()).await;
        let call = |i: u32| {
            Request::post(format!("/call/{i}"))
                .header("host", "orders")
                .body(full("payload"))
                .unwrap()
        };

        for i in 0..5 {
            connection.send(call(i)).await;
        }
        let metrics = proxy
            .wait_for_metrics("the first 5 copies settled", |m| {
                m.due("r") == 5 && m.settled("r")
            })
            .await;
        assert_eq!(
            metrics.delivered("r"),
            0,
            "expected no copy delivered while refused"
        );

        // The same port now accepts: copies must resume once the backoff
        // passes, which takes at most a few seconds after so few failures.
        let secondary = TestServer::builder().bind(refused).start().await;
        let mut i = 5;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while secondary.count() == 0 && tokio::time::Instant::now() < deadline {
            connection.send(call(i)).await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            secondary.count() > 0,
            "expected copies to reach the secondary again within 10 s of it accepting"
        );
        let metrics = proxy
            .wait_for_metrics("every copy settled", |m| m.settled("r"))
            .await;
        assert_eq!(
            metrics.delivered("r") as usize,
            secondary.count(),
            "expected each copy that reached the secondary counted as delivered"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_secondary_counts_timeout() {
    bounded(async {
        let secondary = BlackHole::start().await;
        let run = compare_with_healthy(&secondary.url(), "1s").await;

        let metrics = run.failing.wait_settled("r", REQUESTS).await;
        assert_eq!(
            metrics.shed("r", "timeout"),
            REQUESTS,
            "expected every copy shed as timeout"
        );
        assert_eq!(metrics.delivered("r"), 0, "expected no copy delivered");
        assert!(
            secondary.accepted() > 0,
            "expected the copies to reach the black hole"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resetting_secondary_counts_upstream_error() {
    bounded(async {
        let secondary = Resetter::start().await;
        let run = compare_with_healthy(&secondary.url(), "2s").await;

        let metrics = run.failing.wait_settled("r", REQUESTS).await;
        assert_eq!(
            metrics.shed("r", "upstream_error"),
            REQUESTS,
            "expected every copy shed as upstream_error"
        );
        assert_eq!(metrics.delivered("r"), 0, "expected no copy delivered");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erroring_secondary_counts_5xx_delivered() {
    bounded(async {
        let secondary = TestServer::builder()
            .status(500)
            .body("broken")
            .start()
            .await;
        let run = compare_with_healthy(&secondary.url(), "2s").await;

        let metrics = run.failing.wait_settled("r", REQUESTS).await;
        assert_eq!(
            metrics.delivered_class("r", "5xx"),
            REQUESTS,
            "expected every copy counted as a 5xx response, not a shed"
        );
        assert_eq!(metrics.shed_total("r"), 0, "expected no copy shed");
        assert_eq!(
            metrics.primary("r"),
            REQUESTS,
            "expected the primary role unaffected by copies"
        );
        assert_eq!(
            metrics.sum(
                "tandem_requests_total",
                &[("role", "primary"), ("status_class", "2xx")]
            ) as u64,
            REQUESTS,
            "expected every primary call counted as 2xx"
        );
        assert!(run.failing.shutdown().await, "expected the proxy to drain");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_sheds_overloaded() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = BlackHole::start().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(
                route("r", &secondary.url())
                    .mirror("max_in_flight", 2)
                    .mirror("timeout", "2s"),
            )
            .start()
            .await;
        let mut connection = H1Conn::connect(proxy.addr()).await;

        for i in 0..20 {
            let request = Request::post(format!("/call/{i}"))
                .header("host", "orders")
                .body(full("payload"))
                .unwrap();
            let response = connection.send(request).await;
            assert_eq!(response.status, 200, "expected primary call {i} to succeed");
        }

        let metrics = proxy.metrics().await;
        assert_eq!(metrics.due("r"), 20, "expected 20 copies due");
        assert_eq!(
            metrics.in_flight("r"),
            2,
            "expected exactly max_in_flight copies in flight"
        );
        assert_eq!(
            metrics.shed("r", "overloaded"),
            18,
            "expected the other 18 shed as overloaded"
        );
        assert_eq!(
            metrics.shed("r", "timeout"),
            0,
            "expected no timeout before 2 s"
        );

        let metrics = proxy.wait_settled("r", 20).await;
        assert_eq!(
            metrics.shed("r", "timeout"),
            2,
            "expected the 2 held copies to time out"
        );
        assert_eq!(
            metrics.shed("r", "overloaded"),
            18,
            "expected no more overloaded sheds"
        );
        assert_eq!(
            secondary.accepted(),
            2,
            "expected only 2 connections to the secondary"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_gives_up_on_black_hole() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = BlackHole::start().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .set("drain_timeout", "500ms")
            .route(route("r", &secondary.url()).mirror("timeout", "30s"))
            .start()
            .await;

        let request = Request::post("/held")
            .header("host", "orders")
            .body(full("payload"))
            .unwrap();
        let response = send(proxy.addr(), request).await;
        assert_eq!(response.status, 200, "expected the primary call to succeed");
        proxy
            .wait_for_metrics("the copy in flight", |m| m.in_flight("r") == 1)
            .await;

        // The copy would wait 30 s; shutdown must stop after the drain timeout.
        let drained = tokio::time::timeout(Duration::from_secs(10), proxy.shutdown()).await;
        assert_eq!(
            drained.ok(),
            Some(false),
            "expected shutdown to return undrained after the drain timeout"
        );
    })
    .await;
}

/// Starts a TLS listener with a self-signed certificate for 127.0.0.1 that
/// no root store trusts, and counts completed handshakes.
async fn untrusted_tls_listener() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    TaskGuard,
) {
    use std::sync::{atomic::AtomicUsize, Arc};

    let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
        .expect("expected a self-signed certificate");
    let key = rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der())
        .expect("expected a PKCS#8 key");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .expect("expected the certificate and key to match");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&handshakes);
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(stream).await {
                    counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
                }
            });
        }
    });
    (addr, handshakes, TaskGuard(task))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_tls_secondary_counts_connect_failed() {
    bounded(async {
        let (secondary, handshakes, _task) = untrusted_tls_listener().await;
        let primary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &format!("https://{secondary}")))
            .start()
            .await;

        for i in 0..3 {
            let request = Request::post(format!("/tls/{i}"))
                .header("host", "orders")
                .body(full("payload"))
                .unwrap();
            let response = send(proxy.addr(), request).await;
            assert_eq!(response.status, 200, "expected primary call {i} to succeed");
        }

        // A failed handshake counts as a failed connection, which also
        // starts the backoff that sheds the next copies as unavailable.
        let metrics = proxy.wait_settled("r", 3).await;
        assert!(
            metrics.shed("r", "connect_failed") >= 1,
            "expected the first copy to an untrusted certificate shed as connect_failed"
        );
        assert_eq!(
            metrics.shed("r", "connect_failed") + metrics.shed("r", "unavailable"),
            3,
            "expected every copy shed as connect_failed or unavailable"
        );
        assert_eq!(
            handshakes.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "expected no TLS handshake to complete with an untrusted certificate"
        );
    })
    .await;
}
