//! The admin listener: metrics, probes and the effective config.

mod support;

use http::Request;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_loopback() {
    bounded(async {
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .route(route("orders-mirror", &secondary.url()).mirror("percent", 25))
            .start()
            .await;

        let metrics = get(proxy.admin(), "/metrics").await;
        assert_eq!(metrics.status, 200, "expected /metrics to answer 200");
        assert!(
            metrics
                .header("content-type")
                .unwrap_or("")
                .starts_with("text/plain"),
            "expected the Prometheus text content type, got {:?}",
            metrics.header("content-type")
        );
        let snapshot = MetricsSnapshot::parse(&String::from_utf8_lossy(&metrics.body));
        assert_eq!(
            snapshot.sum("tandem_build_info", &[]),
            1.0,
            "expected tandem_build_info 1"
        );
        assert_eq!(
            snapshot.in_flight("orders-mirror"),
            0,
            "expected the route's in-flight gauge exported at 0"
        );

        let ready = get(proxy.admin(), "/ready").await;
        assert_eq!(ready.status, 200, "expected /ready to answer 200");
        let live = get(proxy.admin(), "/live").await;
        assert_eq!(live.status, 200, "expected /live to answer 200");

        let config = get(proxy.admin(), "/config").await;
        assert_eq!(
            config.status, 200,
            "expected /config to answer 200 on loopback"
        );
        let text = String::from_utf8_lossy(&config.body);
        let parsed: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&text).expect("expected /config to be YAML");
        let route = &parsed["routes"][0];
        assert_eq!(
            route["name"].as_str(),
            Some("orders-mirror"),
            "expected the route name: {text}"
        );
        assert_eq!(
            route["mirror"]["to"].as_str(),
            Some(secondary.url().as_str()),
            "expected the route's secondary: {text}"
        );
        assert_eq!(
            route["mirror"]["percent"].as_f64(),
            Some(25.0),
            "expected the route's percent: {text}"
        );
        assert_eq!(
            route["mirror"]["max_in_flight"].as_u64(),
            Some(512),
            "expected defaults filled in: {text}"
        );

        let unknown = get(proxy.admin(), "/nope").await;
        assert_eq!(unknown.status, 404, "expected 404 for an unknown path");

        let post = send(
            proxy.admin(),
            Request::post("/metrics")
                .header("host", proxy.admin().to_string())
                .body(empty())
                .unwrap(),
        )
        .await;
        assert_eq!(post.status, 405, "expected 405 for POST");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_latency_metrics_count() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()))
            .start()
            .await;
        let open =
            |m: &MetricsSnapshot| m.sum("tandem_connections_open", &[("direction", "outbound")]);

        let mut first = H1Conn::connect(proxy.addr()).await;
        let mut second = H1Conn::connect(proxy.addr()).await;
        for connection in [&mut first, &mut second] {
            let request = Request::get("/counted")
                .header("host", "orders")
                .body(empty())
                .unwrap();
            connection.send(request).await;
        }

        let metrics = proxy.wait_settled("r", 2).await;
        assert_eq!(open(&metrics), 2.0, "expected two open client connections");
        assert_eq!(
            metrics.sum("tandem_connections_total", &[("protocol", "http1")]),
            2.0,
            "expected two HTTP/1 connections accepted"
        );
        assert_eq!(
            metrics.sum(
                "tandem_request_duration_seconds_count",
                &[("route", "r"), ("role", "primary")]
            ),
            2.0,
            "expected a primary latency sample per request"
        );
        assert_eq!(
            metrics.sum(
                "tandem_request_duration_seconds_count",
                &[("route", "r"), ("role", "mirror")]
            ),
            2.0,
            "expected a mirror latency sample per delivered copy"
        );

        drop(first);
        drop(second);
        proxy
            .wait_for_metrics("both client connections closed", |m| open(m) == 0.0)
            .await;
    })
    .await;
}
