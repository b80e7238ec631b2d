//! Fanout against real secondaries on 127.0.0.1: retries, back-off,
//! Retry-After, the circuit breaker, full queues, large bodies and the
//! primary path staying independent of the secondaries.

mod fanout_support;

use std::{future::Future, path::Path, time::Duration};

use fanout_support::*;
use tandem::{config::Config, proxy::Proxy};

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test finished within its time bound")
}

/// Starts a proxy whose default target is `primary`, with one fanout route
/// `audit` for paths under /orders. `extra` contains more fanout settings,
/// one per line, indented by six spaces.
async fn start_proxy(primary: &TestServer, to: &[String], spool: &Path, extra: &str) -> Proxy {
    let to = to
        .iter()
        .map(|url| format!("'{url}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let yaml = format!(
        "outbound: {{listen: '127.0.0.1:0', default_target: '{primary}'}}
admin: {{listen: '127.0.0.1:0'}}
drain_timeout: 1s
routes:
  - name: audit
    match: {{path_prefix: /orders}}
    fanout:
      to: [{to}]
      spool_dir: '{spool}'
      spool_fsync_interval: 50ms
{extra}",
        primary = primary.addr,
        spool = spool.display(),
    );
    let config = Config::from_yaml(&yaml).expect("test config is valid");
    tandem::proxy::start(config).await.expect("proxy starts")
}

async fn primary() -> TestServer {
    TestServer::start(handler(|_, _| Reply::json(200, r#"{"ok": true}"#))).await
}

fn metrics(proxy: &Proxy) -> String {
    proxy.metrics().encode()
}

/// Checks that every due fanout copy has exactly one recorded outcome.
fn assert_accounted(proxy: &Proxy) {
    let text = metrics(proxy);
    let due = metric(&text, "tandem_dispatch_due_total", &[("mode", "fanout")]);
    let delivered = metric(&text, "tandem_requests_total", &[("role", "fanout")]);
    let dead = metric(&text, "tandem_fanout_dead_lettered_total", &[]);
    let shed = metric(&text, "tandem_dispatch_shed_total", &[("mode", "fanout")]);
    assert_eq!(
        due,
        delivered + dead + shed,
        "due = delivered {delivered} + dead-lettered {dead} + shed {shed}"
    );
}

#[tokio::test]
async fn retries_deliver_body_unchanged() {
    bounded(async {
        let primary = primary().await;
        let secondary =
            TestServer::start(handler(|_, i| Reply::status(if i < 2 { 503 } else { 201 }))).await;
        let spool = TempDir::new("fanout-retry");
        let proxy = start_proxy(
            &primary,
            &[secondary.url()],
            spool.path(),
            "      retry: {max_attempts: 5, base_delay: 10ms, max_delay: 50ms}",
        )
        .await;

        let body = random_body(100_000, 1);
        let answer = send(
            proxy.outbound_addr(),
            "POST",
            "/orders/1?x=1",
            &[],
            body.clone(),
        )
        .await;
        assert_eq!(answer.status, 200);

        let received = secondary.wait_for(3).await;
        wait_until("delivery recorded", || {
            metric(
                &metrics(&proxy),
                "tandem_requests_total",
                &[("role", "fanout")],
            ) == 1.0
        })
        .await;
        assert_eq!(received.len(), 3, "two failed attempts and one success");
        let key = received[0].header("idempotency-key");
        assert_eq!(key.len(), 36, "a generated UUID: {key:?}");
        for (i, request) in received.iter().enumerate() {
            assert_eq!(request.method, "POST");
            assert_eq!(request.path, "/orders/1?x=1");
            assert_eq!(request.sha256(), sha256(&body), "attempt {i} body");
            assert_eq!(request.header("idempotency-key"), key, "attempt {i} key");
            assert_eq!(request.header("tandem-attempt"), (i + 1).to_string());
            assert_eq!(request.header("tandem-dispatch"), "fanout");
        }

        let text = metrics(&proxy);
        let secondary_label = secondary.url();
        let attempts = |outcome| {
            metric(
                &text,
                "tandem_fanout_attempts_total",
                &[
                    ("route", "audit"),
                    ("secondary", &secondary_label),
                    ("outcome", outcome),
                ],
            )
        };
        assert_eq!(attempts("5xx"), 2.0);
        assert_eq!(attempts("success"), 1.0);
        assert_eq!(metric(&text, "tandem_fanout_retries_total", &[]), 2.0);
        assert_eq!(metric(&text, "tandem_fanout_dead_lettered_total", &[]), 0.0);
        assert_accounted(&proxy);
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn client_idempotency_key_is_kept() {
    bounded(async {
        let primary = primary().await;
        let first = TestServer::start(handler(|_, i| {
            Reply::status(if i == 0 { 500 } else { 200 })
        }))
        .await;
        let second = TestServer::start(handler(|_, _| Reply::status(200))).await;
        let spool = TempDir::new("fanout-key");
        let proxy = start_proxy(
            &primary,
            &[first.url(), second.url()],
            spool.path(),
            "      retry: {max_attempts: 3, base_delay: 5ms, max_delay: 20ms}",
        )
        .await;

        let key = [("idempotency-key", "order-42")];
        send(proxy.outbound_addr(), "PUT", "/orders/42", &key, "v1").await;
        let at_first = first.wait_for(2).await;
        let at_second = second.wait_for(1).await;
        for request in at_first.iter().chain(&at_second) {
            assert_eq!(request.header("idempotency-key"), "order-42");
            assert_eq!(request.body, "v1");
        }
        assert_eq!(
            primary.received()[0].header("idempotency-key"),
            "order-42",
            "the primary request is unchanged"
        );
        assert_eq!(
            primary.received()[0].header("tandem-attempt"),
            "",
            "the primary request carries no attempt header"
        );
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn retry_after_is_honoured_and_capped() {
    bounded(async {
        let primary = primary().await;
        let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(2));
        let secondary = TestServer::start(handler(move |request, _| {
            match (
                request.path.as_str(),
                request.header("tandem-attempt").as_str(),
            ) {
                ("/orders/seconds", "1") => Reply::with_header(429, "retry-after", "1"),
                ("/orders/date", "1") => Reply::with_header(503, "retry-after", &date),
                ("/orders/capped", "1") => Reply::with_header(429, "retry-after", "60"),
                _ => Reply::status(200),
            }
        }))
        .await;
        let spool = TempDir::new("fanout-retry-after");
        // Without Retry-After the wait would be at most 5 ms.
        let proxy = start_proxy(
            &primary,
            &[secondary.url()],
            spool.path(),
            "      retry: {max_attempts: 3, base_delay: 5ms, max_delay: 1500ms}",
        )
        .await;

        for path in ["/orders/seconds", "/orders/date", "/orders/capped"] {
            send(proxy.outbound_addr(), "POST", path, &[], "x").await;
        }
        let received = secondary.wait_for(6).await;
        let gap = |path: &str| {
            let attempts: Vec<_> = received.iter().filter(|r| r.path == path).collect();
            assert_eq!(attempts.len(), 2, "{path}: one retry");
            attempts[1].at - attempts[0].at
        };
        let seconds = gap("/orders/seconds");
        assert!(
            seconds >= Duration::from_millis(900),
            "Retry-After: 1 waited {seconds:?}"
        );
        let date = gap("/orders/date");
        assert!(
            date >= Duration::from_millis(900),
            "Retry-After date waited {date:?}"
        );
        let capped = gap("/orders/capped");
        assert!(
            capped >= Duration::from_millis(1400),
            "capped wait was {capped:?}"
        );
        assert!(
            capped < Duration::from_secs(10),
            "Retry-After: 60 must be capped by max_delay (1.5 s), waited {capped:?}"
        );
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn backoff_stays_within_jitter_bounds() {
    bounded(async {
        let primary = primary().await;
        let secondary = TestServer::start(handler(|_, _| Reply::status(502))).await;
        let spool = TempDir::new("fanout-backoff");
        let proxy = start_proxy(
            &primary,
            &[secondary.url()],
            spool.path(),
            "      retry: {max_attempts: 5, base_delay: 100ms, max_delay: 300ms}
      circuit_breaker: {consecutive_failures: 100, open_for: 1s}",
        )
        .await;

        send(proxy.outbound_addr(), "POST", "/orders/backoff", &[], "x").await;
        let received = secondary.wait_for(5).await;
        wait_until("dead letter", || {
            metric(&metrics(&proxy), "tandem_fanout_dead_lettered_total", &[]) == 1.0
        })
        .await;
        // Ceilings of the full-jitter waits: 100, 200, 300 (capped), 300 ms.
        // The slack covers scheduling and the round trip, not the jitter.
        let ceilings = [100, 200, 300, 300];
        let slack = Duration::from_millis(400);
        for (i, ceiling) in ceilings.iter().enumerate() {
            let gap = received[i + 1].at - received[i].at;
            assert!(
                gap <= Duration::from_millis(*ceiling) + slack,
                "wait before attempt {} was {gap:?}, above {ceiling} ms plus slack",
                i + 2
            );
        }
        assert_eq!(received.len(), 5, "max_attempts bounds the attempts");
        let text = metrics(&proxy);
        assert_eq!(
            metric(
                &text,
                "tandem_fanout_dead_lettered_total",
                &[("reason", "attempts_exhausted")]
            ),
            1.0
        );
        proxy.shutdown().await;
        let records = spool_records(spool.path());
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].meta.attempts, 5);
        assert_eq!(records[0].meta.reason, "attempts_exhausted");
        assert_eq!(records[0].meta.first_error, "5xx: status 502 Bad Gateway");
        assert_eq!(records[0].meta.last_error, "5xx: status 502 Bad Gateway");
    })
    .await;
}

#[tokio::test]
async fn circuit_opens_and_half_opens() {
    bounded(async {
        use std::sync::atomic::{AtomicU16, Ordering};
        let primary = primary().await;
        // Mode 0 returns 503, 1 hangs until released, 2 returns 200.
        let mode = std::sync::Arc::new(AtomicU16::new(0));
        let current = std::sync::Arc::clone(&mode);
        let secondary =
            TestServer::start(handler(move |_, _| match current.load(Ordering::SeqCst) {
                0 => Reply::status(503),
                1 => Reply::Hang,
                _ => Reply::status(200),
            }))
            .await;
        let spool = TempDir::new("fanout-circuit");
        let proxy = start_proxy(
            &primary,
            &[secondary.url()],
            spool.path(),
            "      timeout: 500ms
      retry: {max_attempts: 1, base_delay: 10ms, max_delay: 10ms}
      circuit_breaker: {consecutive_failures: 3, open_for: 1s}",
        )
        .await;
        let label = secondary.url();
        let state = || {
            metric(
                &metrics(&proxy),
                "tandem_circuit_state",
                &[("route", "audit"), ("secondary", &label)],
            )
        };
        let dead = |reason| {
            metric(
                &metrics(&proxy),
                "tandem_fanout_dead_lettered_total",
                &[("reason", reason)],
            )
        };
        assert_eq!(state(), 0.0, "closed at start");

        for i in 0..3 {
            send(
                proxy.outbound_addr(),
                "POST",
                &format!("/orders/fail-{i}"),
                &[],
                "x",
            )
            .await;
            secondary.wait_for(i + 1).await;
            wait_until("attempt settled", || {
                dead("non_retryable") + dead("attempts_exhausted") == (i + 1) as f64
            })
            .await;
        }
        assert_eq!(state(), 2.0, "three failures in a row open the circuit");

        send(
            proxy.outbound_addr(),
            "POST",
            "/orders/while-open",
            &[],
            "x",
        )
        .await;
        wait_until("circuit_open dead letter", || dead("circuit_open") == 1.0).await;
        assert_eq!(secondary.received().len(), 3, "no attempt while open");

        // After open_for one probe goes out; it hangs, so the circuit stays
        // half-open and the next copy is not sent.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        mode.store(1, Ordering::SeqCst);
        send(proxy.outbound_addr(), "POST", "/orders/probe", &[], "x").await;
        secondary.wait_for(4).await;
        assert_eq!(state(), 1.0, "half-open while the probe is in flight");
        send(
            proxy.outbound_addr(),
            "POST",
            "/orders/during-probe",
            &[],
            "x",
        )
        .await;
        wait_until("second circuit_open dead letter", || {
            dead("circuit_open") == 2.0
        })
        .await;
        assert_eq!(secondary.received().len(), 4, "exactly one probe");

        // The probe times out, which opens the circuit again.
        wait_until("probe timed out", || state() == 2.0).await;

        tokio::time::sleep(Duration::from_millis(1100)).await;
        mode.store(2, Ordering::SeqCst);
        send(proxy.outbound_addr(), "POST", "/orders/recovered", &[], "x").await;
        secondary.wait_for(5).await;
        wait_until("circuit closed", || state() == 0.0).await;

        let text = metrics(&proxy);
        let attempts = |outcome| {
            metric(
                &text,
                "tandem_fanout_attempts_total",
                &[("outcome", outcome)],
            )
        };
        assert_eq!(attempts("5xx"), 3.0);
        assert_eq!(attempts("timeout"), 1.0);
        assert_eq!(attempts("success"), 1.0);
        assert_accounted(&proxy);
        secondary.release();
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn down_secondary_gets_copy_when_back() {
    bounded(async {
        let primary = primary().await;
        let addr = unused_addr().await;
        let spool = TempDir::new("fanout-down");
        let proxy = start_proxy(
            &primary,
            &[format!("http://{addr}")],
            spool.path(),
            "      retry: {max_attempts: 20, base_delay: 50ms, max_delay: 200ms}
      circuit_breaker: {consecutive_failures: 100, open_for: 1s}",
        )
        .await;

        let body = random_body(10_000, 7);
        send(
            proxy.outbound_addr(),
            "POST",
            "/orders/later",
            &[],
            body.clone(),
        )
        .await;
        wait_until("connect failures", || {
            metric(
                &metrics(&proxy),
                "tandem_fanout_attempts_total",
                &[("outcome", "connect-failure")],
            ) >= 2.0
        })
        .await;

        let secondary = TestServer::start_on(addr, handler(|_, _| Reply::status(200))).await;
        let received = secondary.wait_for(1).await;
        assert_eq!(received[0].sha256(), sha256(&body));
        let attempt: u32 = received[0].header("tandem-attempt").parse().unwrap();
        assert!(attempt >= 3, "delivered on a retry, attempt {attempt}");
        wait_until("delivered", || {
            metric(
                &metrics(&proxy),
                "tandem_requests_total",
                &[("role", "fanout")],
            ) == 1.0
        })
        .await;
        assert_accounted(&proxy);
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn reset_mid_body_is_retried() {
    bounded(async {
        let primary = primary().await;
        let backend = TestServer::start(handler(|_, _| Reply::status(200))).await;
        let front = ResetFront::start(backend.addr, 2, 2_000).await;
        let spool = TempDir::new("fanout-reset");
        let proxy = start_proxy(
            &primary,
            &[front.url()],
            spool.path(),
            "      retry: {max_attempts: 5, base_delay: 10ms, max_delay: 50ms}",
        )
        .await;

        let body = random_body(256 * 1024, 3);
        send(
            proxy.outbound_addr(),
            "POST",
            "/orders/reset",
            &[],
            body.clone(),
        )
        .await;
        let received = backend.wait_for(1).await;
        assert_eq!(
            front.resets_done.load(std::sync::atomic::Ordering::SeqCst),
            2
        );
        assert_eq!(received[0].sha256(), sha256(&body));
        assert_eq!(received[0].header("tandem-attempt"), "3");
        wait_until("delivered", || {
            metric(
                &metrics(&proxy),
                "tandem_requests_total",
                &[("role", "fanout")],
            ) == 1.0
        })
        .await;
        let text = metrics(&proxy);
        assert_eq!(
            metric(
                &text,
                "tandem_fanout_attempts_total",
                &[("outcome", "reset")]
            ),
            2.0,
            "{text}"
        );
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn full_queue_spools_copies() {
    bounded(async {
        let primary = primary().await;
        let secondary = TestServer::start(handler(|_, _| Reply::Hang)).await;
        let spool = TempDir::new("fanout-full");
        let proxy = start_proxy(
            &primary,
            &[secondary.url()],
            spool.path(),
            "      timeout: 30s
      queue_capacity: 1
      max_in_flight: 1",
        )
        .await;

        // The first copy hangs at the secondary and the second waits in
        // the queue, so the next two find it full.
        send(proxy.outbound_addr(), "POST", "/orders/0", &[], "body-0").await;
        secondary.wait_for(1).await;
        for i in 1..4 {
            let answer = send(
                proxy.outbound_addr(),
                "POST",
                &format!("/orders/{i}"),
                &[],
                format!("body-{i}"),
            )
            .await;
            assert_eq!(
                answer.status, 200,
                "the primary answers whatever the queue holds"
            );
        }
        wait_until("queue_full dead letters", || {
            metric(
                &metrics(&proxy),
                "tandem_fanout_dead_lettered_total",
                &[("reason", "queue_full")],
            ) == 2.0
        })
        .await;
        let text = metrics(&proxy);
        assert_eq!(
            metric(&text, "tandem_fanout_queue_depth", &[("route", "audit")]),
            1.0
        );

        // The drain deadline passes with one copy in flight and one queued:
        // both are spooled with reason shutdown.
        proxy_shutdown_and_check(proxy).await;
        let mut records = spool_records(spool.path());
        records.sort_by_key(|r| r.meta.url.clone());
        let reasons: Vec<(&str, &str)> = records
            .iter()
            .map(|r| {
                (
                    r.meta.url.rsplit('/').next().unwrap(),
                    r.meta.reason.as_str(),
                )
            })
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("0", "shutdown"),
                ("1", "shutdown"),
                ("2", "queue_full"),
                ("3", "queue_full")
            ]
        );
        assert_eq!(
            records[0].meta.attempts, 1,
            "the in-flight copy had one attempt"
        );
        assert_eq!(records[1].meta.attempts, 0, "the queued copy had none");
        secondary.release();
    })
    .await;
}

#[tokio::test]
async fn queued_body_budget_spools_copies() {
    bounded(async {
        let primary = primary().await;
        let secondary = TestServer::start(handler(|_, _| Reply::Hang)).await;
        let spool = TempDir::new("fanout-budget");
        let proxy = start_proxy(
            &primary,
            &[secondary.url()],
            spool.path(),
            "      timeout: 30s
      queue_capacity: 100
      max_in_flight: 1
      max_body_bytes: 1048576
      max_queued_body_bytes: 2097152",
        )
        .await;

        // Each body is 600 KiB. The copy in flight and the two queued ones
        // take 1.8 MiB of the 2 MiB budget, so the fourth and fifth copies
        // go to the spool although the queue has room.
        let body = vec![b'x'; 600 * 1024];
        send(
            proxy.outbound_addr(),
            "POST",
            "/orders/0",
            &[],
            body.clone(),
        )
        .await;
        secondary.wait_for(1).await;
        for i in 1..5 {
            let answer = send(
                proxy.outbound_addr(),
                "POST",
                &format!("/orders/{i}"),
                &[],
                body.clone(),
            )
            .await;
            assert_eq!(
                answer.status, 200,
                "the primary answers whatever the budget holds"
            );
        }
        wait_until("queue_full dead letters from the memory budget", || {
            metric(
                &metrics(&proxy),
                "tandem_fanout_dead_lettered_total",
                &[("reason", "queue_full")],
            ) == 2.0
        })
        .await;
        let text = metrics(&proxy);
        assert_eq!(
            metric(&text, "tandem_fanout_queue_depth", &[("route", "audit")]),
            2.0,
            "two copies wait in the queue within the budget"
        );

        proxy_shutdown_and_check(proxy).await;
        let records = spool_records(spool.path());
        assert_eq!(
            records.len(),
            5,
            "every copy ends in the spool: {records:?}"
        );
        assert!(
            records.iter().all(|r| r.body_len == 600 * 1024),
            "every record keeps the whole body"
        );
        secondary.release();
    })
    .await;
}

async fn proxy_shutdown_and_check(proxy: Proxy) {
    let metrics = proxy.metrics().clone();
    let drained = proxy.shutdown().await;
    assert!(!drained, "a copy was still in flight at the deadline");
    let text = metrics.encode();
    let due = metric(&text, "tandem_dispatch_due_total", &[("mode", "fanout")]);
    let dead = metric(&text, "tandem_fanout_dead_lettered_total", &[]);
    assert_eq!(due, dead, "every copy was spooled");
    assert_eq!(metric(&text, "tandem_fanout_queue_depth", &[]), 0.0);
}

#[tokio::test]
async fn large_body_is_spooled_to_disk() {
    bounded(async {
        let primary = primary().await;
        let secondary = TestServer::start(handler(|request, _| {
            if request.header("tandem-attempt") == "1" {
                Reply::Hang
            } else {
                Reply::status(200)
            }
        }))
        .await;
        let spool = TempDir::new("fanout-large");
        let proxy = start_proxy(
            &primary,
            &[secondary.url()],
            spool.path(),
            "      timeout: 1s
      max_body_bytes: 16384
      retry: {max_attempts: 3, base_delay: 10ms, max_delay: 20ms}",
        )
        .await;

        let body = random_body(2 * 1024 * 1024, 11);
        send(
            proxy.outbound_addr(),
            "POST",
            "/orders/large",
            &[],
            body.clone(),
        )
        .await;
        secondary.wait_for(1).await;
        let bodies = spool.path().join("bodies");
        let files: Vec<_> = std::fs::read_dir(&bodies).unwrap().flatten().collect();
        assert_eq!(
            files.len(),
            1,
            "the body waits in a file while the copy is pending"
        );
        assert_eq!(
            files[0].metadata().unwrap().len(),
            body.len() as u64,
            "the file holds the whole body"
        );

        let received = secondary.wait_for(2).await;
        assert_eq!(received[0].sha256(), sha256(&body), "first attempt body");
        assert_eq!(
            received[1].sha256(),
            sha256(&body),
            "retry body from the file"
        );
        wait_until("body file removed", || {
            std::fs::read_dir(&bodies).unwrap().count() == 0
        })
        .await;
        assert_accounted(&proxy);
        secondary.release();
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn large_body_dead_letter_keeps_body() {
    bounded(async {
        let primary = primary().await;
        let secondary = TestServer::start(handler(|_, _| Reply::status(400))).await;
        let spool = TempDir::new("fanout-large-dead");
        let proxy = start_proxy(
            &primary,
            &[secondary.url()],
            spool.path(),
            "      max_body_bytes: 1024",
        )
        .await;

        let body = random_body(300_000, 5);
        send(
            proxy.outbound_addr(),
            "POST",
            "/orders/rejected",
            &[],
            body.clone(),
        )
        .await;
        secondary.wait_for(1).await;
        wait_until("dead letter", || {
            metric(
                &metrics(&proxy),
                "tandem_fanout_dead_lettered_total",
                &[("reason", "non_retryable")],
            ) == 1.0
        })
        .await;
        assert_eq!(secondary.received().len(), 1, "a 400 is final");
        proxy.shutdown().await;

        let records = spool_records(spool.path());
        assert_eq!(records.len(), 1);
        let reader =
            tandem::spool::SpoolReader::open(&tandem::spool::spool_path(spool.path())).unwrap();
        let mut stored = Vec::new();
        std::io::Read::read_to_end(&mut reader.body(&records[0]).unwrap(), &mut stored).unwrap();
        assert_eq!(sha256(&stored), sha256(&body));
        assert_eq!(records[0].meta.last_error, "4xx: status 400 Bad Request");
        assert_eq!(
            std::fs::read_dir(spool.path().join("bodies"))
                .unwrap()
                .count(),
            0,
            "the body file is gone once spooled"
        );
    })
    .await;
}

#[tokio::test]
async fn aborted_body_is_shed_incomplete() {
    bounded(async {
        use tokio::io::AsyncWriteExt;
        let primary = primary().await;
        let secondary = TestServer::start(handler(|_, _| Reply::status(200))).await;
        let spool = TempDir::new("fanout-abort");
        let proxy = start_proxy(&primary, &[secondary.url()], spool.path(), "").await;

        // A request that promises 1000 bytes and sends 10 before closing.
        let mut stream = tokio::net::TcpStream::connect(proxy.outbound_addr())
            .await
            .unwrap();
        stream
            .write_all(
                b"POST /orders/cut HTTP/1.1\r\nhost: p\r\ncontent-length: 1000\r\n\r\n0123456789",
            )
            .await
            .unwrap();
        // Give the proxy time to start forwarding before the client leaves.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(stream);

        wait_until("shed body_incomplete", || {
            metric(
                &metrics(&proxy),
                "tandem_dispatch_shed_total",
                &[("mode", "fanout"), ("reason", "body_incomplete")],
            ) == 1.0
        })
        .await;
        assert!(
            secondary.received().is_empty(),
            "an incomplete request is not copied"
        );
        assert_accounted(&proxy);
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn primary_does_not_wait_for_fanout() {
    bounded(async {
        let primary = primary().await;
        let secondary = TestServer::start(handler(|_, _| Reply::Hang)).await;
        let spool = TempDir::new("fanout-independent");
        let proxy = start_proxy(
            &primary,
            &[secondary.url()],
            spool.path(),
            "      timeout: 30s",
        )
        .await;

        for i in 0..5 {
            let answer = send(
                proxy.outbound_addr(),
                "POST",
                &format!("/orders/{i}"),
                &[],
                "x",
            )
            .await;
            assert_eq!(answer.status, 200);
            assert_eq!(answer.body, r#"{"ok": true}"#);
        }
        // Every primary response above completed while the copies were
        // still held at the secondary, which has not responded to any.
        let received = secondary.wait_for(5).await;
        assert_eq!(received.len(), 5);
        assert_eq!(
            metric(
                &metrics(&proxy),
                "tandem_requests_total",
                &[("role", "fanout")]
            ),
            0.0,
            "no copy got a response yet"
        );
        secondary.release();
        wait_until("delivered", || {
            metric(
                &metrics(&proxy),
                "tandem_requests_total",
                &[("role", "fanout")],
            ) == 5.0
        })
        .await;
        proxy.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn tagged_route_needs_fanout_header() {
    bounded(async {
        let primary = primary().await;
        let secondary = TestServer::start(handler(|_, _| Reply::status(200))).await;
        let spool = TempDir::new("fanout-tagged");
        let yaml = format!(
            "outbound: {{listen: '127.0.0.1:0', default_target: '{}'}}
admin: {{listen: '127.0.0.1:0'}}
routes:
  - name: tagged
    match: {{tagged: true}}
    fanout: {{to: ['{}'], spool_dir: '{}'}}",
            primary.addr,
            secondary.url(),
            spool.path().display()
        );
        let proxy = tandem::proxy::start(Config::from_yaml(&yaml).unwrap())
            .await
            .unwrap();
        send(
            proxy.outbound_addr(),
            "POST",
            "/a",
            &[("tandem-dispatch", "mirror")],
            "x",
        )
        .await;
        send(proxy.outbound_addr(), "POST", "/b", &[], "x").await;
        send(
            proxy.outbound_addr(),
            "POST",
            "/c",
            &[("tandem-dispatch", "fanout")],
            "x",
        )
        .await;
        let received = secondary.wait_for(1).await;
        assert_eq!(received[0].path, "/c");
        assert_eq!(
            primary.received()[2].header("tandem-dispatch"),
            "",
            "the dispatch header is removed from the primary request"
        );
        proxy.shutdown().await;
        assert_eq!(secondary.received().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn spool_write_failure_fails_readiness() {
    bounded(async {
        let primary = primary().await;
        let secondary = TestServer::start(handler(|_, _| Reply::status(400))).await;
        let spool = TempDir::new("fanout-ready");
        let proxy = start_proxy(&primary, &[secondary.url()], spool.path(), "").await;
        let (status, _) = admin_get(proxy.admin_addr(), "/ready").await;
        assert_eq!(status, 200);

        // A file where the spool directory was makes every write fail, even
        // for root.
        std::fs::remove_dir_all(spool.path()).unwrap();
        std::fs::write(spool.path(), b"in the way").unwrap();
        send(proxy.outbound_addr(), "POST", "/orders/x", &[], "x").await;
        wait_until("spool write error", || {
            metric(&metrics(&proxy), "tandem_spool_write_errors_total", &[]) >= 1.0
        })
        .await;
        let (status, body) = admin_get(proxy.admin_addr(), "/ready").await;
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("failed to write a dead letter"), "{body}");
        assert!(body.contains(&spool.path().display().to_string()), "{body}");

        std::fs::remove_file(spool.path()).unwrap();
        std::fs::create_dir_all(spool.path()).unwrap();
        let mut ready = false;
        for _ in 0..200 {
            if admin_get(proxy.admin_addr(), "/ready").await.0 == 200 {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ready, "the retried write succeeds and /ready recovers");
        proxy.shutdown().await;
        assert_eq!(spool_records(spool.path()).len(), 1, "the letter was kept");
    })
    .await;
}

#[tokio::test]
async fn unwritable_spool_dir_stops_start() {
    bounded(async {
        let primary = primary().await;
        let dir = TempDir::new("fanout-unwritable");
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"not a directory").unwrap();
        let spool = file.join("spool");
        let yaml = format!(
            "outbound: {{listen: '127.0.0.1:0', default_target: '{}'}}
admin: {{listen: '127.0.0.1:0'}}
routes:
  - name: audit
    fanout: {{to: ['http://127.0.0.1:9'], spool_dir: '{}'}}",
            primary.addr,
            spool.display()
        );
        let error = match tandem::proxy::start(Config::from_yaml(&yaml).unwrap()).await {
            Ok(_) => panic!("the proxy must not start"),
            Err(error) => error.to_string(),
        };
        assert!(error.contains("spool_dir"), "{error}");
        assert!(error.contains(&spool.display().to_string()), "{error}");
    })
    .await;
}
