//! Compare mode against real primary and secondary servers on 127.0.0.1.

mod fanout_support;

use std::{
    future::Future,
    io::Write,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use fanout_support::*;
use tandem::{config::Config, proxy::Proxy};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test finished within its time bound")
}

/// Log lines of this test binary, captured through a global subscriber.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&buffer);
        tracing_subscriber::fmt()
            .with_env_filter("tandem=info")
            .with_ansi(false)
            .with_writer(move || LogWriter(Arc::clone(&sink)))
            .init();
        buffer
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn log_lines_with(route: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(&logs().lock().unwrap()).into_owned();
    text.lines()
        .filter(|line| {
            line.contains("compare mismatch") && line.contains(&format!("route={route}"))
        })
        .map(str::to_string)
        .collect()
}

async fn start_proxy(primary: &TestServer, route: &str, compare: &str) -> Proxy {
    logs();
    let yaml = format!(
        "outbound: {{listen: '127.0.0.1:0', default_target: '{}'}}
admin: {{listen: '127.0.0.1:0'}}
routes:
  - name: {route}
    compare: {compare}",
        primary.addr
    );
    tandem::proxy::start(Config::from_yaml(&yaml).expect("test config is valid"))
        .await
        .expect("proxy starts")
}

fn results(proxy: &Proxy, route: &str, result: &str) -> f64 {
    metric(
        &proxy.metrics().encode(),
        "tandem_compare_total",
        &[("route", route), ("result", result)],
    )
}

/// Returns a JSON order. The tests plant differences in `total`.
fn order(id: u32, timestamp: &str, total: u32) -> String {
    format!(
        r#"{{"id": {id}, "timestamp": "{timestamp}", "total": {total}, "items": [{{"sku": "a", "qty": 1}}]}}"#
    )
}

#[tokio::test]
async fn planted_difference_is_found() {
    bounded(async {
        let primary = TestServer::start(handler(|request, _| {
            let mut reply = Reply::json(200, &order(1, "2024-05-01T00:00:00Z", 10));
            if request.path.contains("planted") {
                if let Reply::Respond { headers, .. } = &mut reply {
                    headers.push(("set-cookie".into(), "session=primary-secret".into()));
                }
            }
            reply
        }))
        .await;
        let secondary = TestServer::start(handler(|request, _| {
            let total = if request.path.contains("planted") { 11 } else { 10 };
            let mut reply = Reply::json(200, &order(2, "2024-05-01T00:00:09Z", total));
            if request.path.contains("planted") {
                if let Reply::Respond { headers, .. } = &mut reply {
                    headers.push(("set-cookie".into(), "session=secondary-secret".into()));
                }
            }
            reply
        }))
        .await;
        let proxy = start_proxy(
            &primary,
            "planted",
            &format!(
                "{{to: '{}', headers: [content-type, set-cookie], ignore_json_paths: ['$.timestamp', '$.id']}}",
                secondary.url()
            ),
        )
        .await;

        let answer = send(proxy.outbound_addr(), "GET", "/orders/same", &[], "").await;
        assert_eq!(answer.body, order(1, "2024-05-01T00:00:00Z", 10));
        wait_until("match", || results(&proxy, "planted", "match") == 1.0).await;
        assert_eq!(
            secondary.received()[0].header("tandem-dispatch"),
            "compare"
        );

        send(proxy.outbound_addr(), "GET", "/orders/planted", &[], "").await;
        wait_until("mismatch", || results(&proxy, "planted", "mismatch") == 1.0).await;
        assert_eq!(results(&proxy, "planted", "match"), 1.0, "ignored paths did not count");
        assert_eq!(results(&proxy, "planted", "error"), 0.0);

        let lines = log_lines_with("planted");
        assert_eq!(lines.len(), 1, "one mismatch logged: {lines:?}");
        let line = &lines[0];
        assert!(line.contains("$.total"), "{line}");
        assert!(!line.contains("$.id"), "an ignored path is listed: {line}");
        assert!(!line.contains("$.timestamp"), "an ignored path is listed: {line}");
        assert!(line.contains("set-cookie"), "{line}");
        assert!(line.contains("<redacted>"), "{line}");
        assert!(!line.contains("secret"), "a cookie value was logged: {line}");
        assert!(line.contains("path=/orders/planted"), "{line}");
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn mismatch_logs_are_rate_limited() {
    bounded(async {
        let primary = TestServer::start(handler(|_, _| Reply::status(200))).await;
        let secondary = TestServer::start(handler(|_, _| Reply::status(500))).await;
        let proxy = start_proxy(
            &primary,
            "sampled",
            &format!("{{to: '{}', sample_diffs_per_minute: 2}}", secondary.url()),
        )
        .await;
        for i in 0..5 {
            send(proxy.outbound_addr(), "GET", &format!("/n/{i}"), &[], "").await;
        }
        wait_until("mismatches", || {
            results(&proxy, "sampled", "mismatch") == 5.0
        })
        .await;
        let lines = log_lines_with("sampled");
        assert_eq!(lines.len(), 2, "two of five logged: {lines:?}");
        assert!(lines[0].contains("status 200 vs 500"), "{}", lines[0]);
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn oversized_or_failed_secondary_is_error() {
    bounded(async {
        let primary = TestServer::start(handler(|request, _| {
            if request.path == "/big-primary" {
                Reply::json(200, &format!("\"{}\"", "p".repeat(4096)))
            } else {
                Reply::json(200, "{}")
            }
        }))
        .await;
        let secondary = TestServer::start(handler(|request, _| {
            if request.path == "/big-secondary" {
                Reply::json(200, &format!("\"{}\"", "s".repeat(4096)))
            } else {
                Reply::json(200, "{}")
            }
        }))
        .await;
        let proxy = start_proxy(
            &primary,
            "limits",
            &format!("{{to: '{}', max_body_bytes: 1024}}", secondary.url()),
        )
        .await;

        let answer = send(proxy.outbound_addr(), "GET", "/big-primary", &[], "").await;
        assert_eq!(
            answer.body.len(),
            4098,
            "the client gets the whole primary body"
        );
        wait_until("first error", || results(&proxy, "limits", "error") == 1.0).await;
        send(proxy.outbound_addr(), "GET", "/big-secondary", &[], "").await;
        wait_until("second error", || results(&proxy, "limits", "error") == 2.0).await;
        send(proxy.outbound_addr(), "GET", "/small", &[], "").await;
        wait_until("match", || results(&proxy, "limits", "match") == 1.0).await;
        proxy.shutdown().await;

        let down = unused_addr().await;
        let proxy = start_proxy(&primary, "down", &format!("{{to: 'http://{down}'}}")).await;
        let answer = send(proxy.outbound_addr(), "GET", "/small", &[], "").await;
        assert_eq!(
            answer.status, 200,
            "a down secondary does not fail the primary"
        );
        wait_until("error", || results(&proxy, "down", "error") == 1.0).await;
        assert_eq!(results(&proxy, "down", "mismatch"), 0.0);
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn primary_does_not_wait_for_compare() {
    bounded(async {
        let primary = TestServer::start(handler(|_, _| Reply::json(200, r#"{"a": 1}"#))).await;
        let secondary = TestServer::start(handler(|_, _| Reply::Hang)).await;
        let proxy = start_proxy(
            &primary,
            "slow",
            &format!("{{to: '{}', timeout: 30s}}", secondary.url()),
        )
        .await;

        for i in 0..5 {
            let answer = send(proxy.outbound_addr(), "GET", &format!("/r/{i}"), &[], "").await;
            assert_eq!(answer.status, 200);
            assert_eq!(answer.body, r#"{"a": 1}"#);
        }
        // All five primary responses were read in full while the secondary
        // still held every copy.
        secondary.wait_for(5).await;
        assert_eq!(
            results(&proxy, "slow", "match"),
            0.0,
            "no comparison finished yet"
        );
        secondary.release();
        // The released secondary returns 200 with an empty body, which
        // differs from the primary's JSON body.
        wait_until("compared", || results(&proxy, "slow", "mismatch") == 5.0).await;
        proxy.shutdown().await;
    })
    .await;
}
