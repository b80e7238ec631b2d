//! Which requests are copied: the route's `percent`, sampling by trace id,
//! and the `tandem-dispatch` request header.

mod support;

use std::{collections::HashMap, net::SocketAddr};

use http::Request;
use support::*;

/// Returns a W3C `traceparent` value for `trace_id` (32 hex digits).
fn traceparent(trace_id: &str) -> String {
    format!("00-{trace_id}-00f067aa0ba902b7-01")
}

fn random_trace_id() -> String {
    format!("{:032x}", rand::random::<u128>() | 1)
}

/// Sends `count` GET requests over one keep-alive connection, each with the
/// headers that `headers_for(i)` returns.
async fn send_many(
    proxy: SocketAddr,
    count: usize,
    headers_for: impl Fn(usize) -> Vec<(&'static str, String)>,
) {
    let mut connection = H1Conn::connect(proxy).await;
    for i in 0..count {
        let mut request = Request::get(format!("/item/{i}")).header("host", "orders");
        for (name, value) in headers_for(i) {
            request = request.header(name, value);
        }
        let response = connection.send(request.body(empty()).unwrap()).await;
        assert_eq!(response.status, 200, "expected primary call {i} to succeed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_zero_copies_nothing() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()).mirror("percent", 0))
            .start()
            .await;

        send_many(proxy.addr(), 20, |_| Vec::new()).await;

        let metrics = proxy.metrics().await;
        assert_eq!(
            metrics.primary("r"),
            20,
            "expected all 20 primary calls on the route"
        );
        assert_eq!(metrics.due("r"), 0, "expected no copy due at 0 percent");
        assert_eq!(
            secondary.count(),
            0,
            "expected the secondary to get nothing"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_percent_copies_all() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()))
            .start()
            .await;

        send_many(proxy.addr(), 20, |_| Vec::new()).await;

        let metrics = proxy.wait_settled("r", 20).await;
        assert_eq!(metrics.delivered("r"), 20, "expected every request copied");
        assert_eq!(
            secondary.wait_for_requests(20).await.len(),
            20,
            "expected 20 copies received"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_ten_copies_about_tenth() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()).mirror("percent", 10))
            .start()
            .await;

        // Four connections of 250 requests each, every request with its own
        // random trace id.
        let senders: Vec<_> = (0..4)
            .map(|_| {
                tokio::spawn(send_many(proxy.addr(), 250, |_| {
                    vec![("traceparent", traceparent(&random_trace_id()))]
                }))
            })
            .collect();
        for sender in senders {
            sender.await.expect("sender task does not panic");
        }

        let metrics = proxy.metrics().await;
        assert_eq!(metrics.primary("r"), 1000, "expected 1000 primary calls");
        let due = metrics.due("r");
        assert!(
            (50..=150).contains(&due),
            "expected between 5% and 15% of 1000 requests copied, got {due}"
        );
        let metrics = proxy.wait_settled("r", due).await;
        assert_eq!(
            metrics.delivered("r"),
            due,
            "expected every sampled copy delivered"
        );
        assert_eq!(
            secondary.count() as u64,
            due,
            "expected the secondary to get each sampled copy"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_trace_id_decides_alike() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()).mirror("percent", 50))
            .start()
            .await;
        // Fixed ids keep the outcome reproducible; with 10 ids at 50% both
        // outcomes are all but certain for any reasonable hash.
        let ids: Vec<String> = (1..=10u128)
            .map(|i| {
                format!(
                    "{:032x}",
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835)
                )
            })
            .collect();

        let per_id = 20;
        let all_ids = ids.clone();
        send_many(proxy.addr(), ids.len() * per_id, move |i| {
            vec![("traceparent", traceparent(&all_ids[i % all_ids.len()]))]
        })
        .await;

        let metrics = proxy
            .wait_for_metrics("every due copy settled", |m| m.settled("r"))
            .await;
        let copies = secondary.requests();
        assert_eq!(
            copies.len() as u64,
            metrics.due("r"),
            "expected every due copy received"
        );
        let mut counts: HashMap<String, usize> = HashMap::new();
        for copy in &copies {
            let header = copy
                .header("traceparent")
                .expect("expected traceparent on the copy");
            *counts.entry(header.to_string()).or_default() += 1;
        }
        for id in &ids {
            let copied = counts.get(&traceparent(id)).copied().unwrap_or(0);
            assert!(
                copied == 0 || copied == per_id,
                "expected trace {id} copied always or never, got {copied} of {per_id}"
            );
        }
        let sampled_ids = counts.len();
        assert!(
            sampled_ids > 0,
            "expected some of 10 trace ids sampled at 50%"
        );
        assert!(
            sampled_ids < ids.len(),
            "expected some of 10 trace ids not sampled at 50%"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_tag_suppresses_copy() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()))
            .start()
            .await;

        send_many(proxy.addr(), 5, |_| {
            vec![("tandem-dispatch", "off".to_string())]
        })
        .await;
        send_many(proxy.addr(), 1, |_| Vec::new()).await;

        let metrics = proxy.wait_settled("r", 1).await;
        assert_eq!(
            metrics.primary("r"),
            1,
            "expected the untagged call on the route"
        );
        assert_eq!(
            metrics.primary("default"),
            5,
            "expected calls tagged off to match no route"
        );
        assert_eq!(
            metrics.delivered("r"),
            1,
            "expected only the untagged request copied"
        );
        let copies = secondary.wait_for_requests(1).await;
        assert_eq!(copies.len(), 1, "expected no copy of a request tagged off");
        for seen in primary.wait_for_requests(6).await {
            assert_eq!(
                seen.header("tandem-dispatch"),
                None,
                "expected the primary never to see the tag"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagged_route_needs_mirror_tag() {
    bounded(async {
        let primary = TestServer::echo().await;
        let secondary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .route(route("r", &secondary.url()).tagged())
            .start()
            .await;

        send_many(proxy.addr(), 3, |_| Vec::new()).await;
        send_many(proxy.addr(), 2, |_| {
            vec![("tandem-dispatch", "mirror".to_string())]
        })
        .await;
        send_many(proxy.addr(), 2, |_| {
            vec![("tandem-dispatch", "off".to_string())]
        })
        .await;

        let metrics = proxy.wait_settled("r", 2).await;
        assert_eq!(
            metrics.delivered("r"),
            2,
            "expected only the two tagged requests copied"
        );
        assert_eq!(
            metrics.primary("default"),
            5,
            "expected untagged requests to match no route"
        );
        let copies = secondary.wait_for_requests(2).await;
        for copy in &copies {
            assert_eq!(
                copy.header("tandem-dispatch"),
                Some("mirror"),
                "expected the copy tagged mirror"
            );
        }
        for seen in primary.wait_for_requests(7).await {
            assert_eq!(
                seen.header("tandem-dispatch"),
                None,
                "expected the primary never to see the tag"
            );
        }
    })
    .await;
}
