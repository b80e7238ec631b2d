//! The dead-letter spool end to end with the real `tandem` binary: SIGTERM
//! with a backlog, restart, `tandem dlq list` and `tandem dlq replay`.

mod fanout_support;

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::SocketAddr,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use fanout_support::*;
use tandem::config::Config;

const TEST_TIMEOUT: Duration = Duration::from_secs(90);

/// Finds the address of `listener` in the proxy's plain-text "listening"
/// log line.
fn listener_addr_in_log(log: &str, listener: &str) -> Option<SocketAddr> {
    let marker = format!("listener=\"{listener}\"");
    let line = log
        .lines()
        .find(|line| line.contains("listening") && line.contains(&marker))?;
    let addr = line.split("addr=").nth(1)?.split_whitespace().next()?;
    addr.parse().ok()
}

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .expect("the test finished within its time bound")
}

/// A `tandem proxy` process, killed if the test ends without stopping it.
struct ProxyProcess {
    child: Child,
    log: PathBuf,
    admin: SocketAddr,
    outbound: SocketAddr,
}

impl ProxyProcess {
    /// Starts the proxy with its listeners on ephemeral ports, read back
    /// from its log. A port picked by the test could be taken by another
    /// test before the proxy binds it, or between a stop and a restart.
    async fn start(config: &Path, log: PathBuf) -> ProxyProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["proxy", "--config"])
            .arg(config)
            .env("TANDEM_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the tandem binary starts");
        let mut process = ProxyProcess {
            child,
            log,
            admin: "0.0.0.0:0".parse().unwrap(),
            outbound: "0.0.0.0:0".parse().unwrap(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = process.child.try_wait().unwrap() {
                panic!("tandem exited with {status}: {}", process.log_text());
            }
            let log = process.log_text();
            let admin = listener_addr_in_log(&log, "admin");
            let outbound = listener_addr_in_log(&log, "outbound");
            if let (Some(admin), Some(outbound)) = (admin, outbound) {
                process.admin = admin;
                process.outbound = outbound;
                if admin_get(admin, "/ready").await.0 == 200 {
                    return process;
                }
            }
            assert!(Instant::now() < deadline, "tandem never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM and waits for the process to exit successfully.
    async fn terminate(mut self) -> String {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(20);
        let exit = loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                break exit;
            }
            assert!(
                Instant::now() < deadline,
                "tandem did not exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let log = self.log_text();
        assert!(exit.success(), "tandem exited with {exit}: {log}");
        log
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a `tandem` subcommand to completion without blocking the test
/// runtime, which also runs the test servers.
async fn tandem(args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .output()
        .await
        .expect("the tandem binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Rows of `tandem dlq list`, each a map from column name to value.
fn list_rows(stdout: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = stdout.lines();
    let header: Vec<&str> = lines.next().expect("a header line").split('\t').collect();
    lines
        .map(|line| {
            header
                .iter()
                .zip(line.split('\t'))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

async fn list(dir: &Path, extra: &[&str]) -> Vec<BTreeMap<String, String>> {
    let mut args = vec!["dlq", "list", "--spool-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let output = tandem(&args).await;
    assert!(
        output.status.success(),
        "dlq list failed: {}",
        text(&output.stderr)
    );
    list_rows(&text(&output.stdout))
}

#[tokio::test]
async fn sigterm_backlog_survives_restart_and_replays() {
    bounded(async {
        let primary = TestServer::start(handler(|_, _| Reply::status(200))).await;
        // Both ports stay reserved until both are picked, so they differ.
        let secondary_reserved = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let never_up_reserved = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let secondary_addr = secondary_reserved.local_addr().unwrap();
        let never_up = never_up_reserved.local_addr().unwrap();
        drop((secondary_reserved, never_up_reserved));

        let dir = TempDir::new("dlq-restart");
        let spool = dir.path().join("spool");
        let yaml = format!(
            "outbound: {{listen: '127.0.0.1:0', default_target: '{primary}'}}
admin: {{listen: '127.0.0.1:0'}}
drain_timeout: 1s
routes:
  - name: audit
    match: {{path_prefix: /orders}}
    fanout:
      to: ['http://{secondary_addr}']
      retry: {{max_attempts: 1000, base_delay: 20ms, max_delay: 100ms}}
      circuit_breaker: {{consecutive_failures: 100000, open_for: 1s}}
      spool_dir: '{spool}'
  - name: lossy
    match: {{path_prefix: /lossy}}
    fanout:
      to: ['http://{never_up}']
      retry: {{max_attempts: 1}}
      spool_dir: '{spool}'
",
            primary = primary.addr,
            spool = spool.display(),
        );
        Config::from_yaml(&yaml).expect("test config is valid");
        let config = write_file(dir.path(), "tandem.yaml", &yaml).await;

        // A backlog of copies retrying against a secondary that is down.
        let first = ProxyProcess::start(&config, dir.path().join("first.log")).await;
        let admin = first.admin;
        let outbound = first.outbound;
        let mut sent = BTreeSet::new();
        for i in 0..20u64 {
            let body = random_body(1_000 + 97 * i as usize, i);
            let path = format!("/orders/{i}");
            let key = format!("client-key-{i}");
            let headers: Vec<(&str, &str)> = if i % 7 == 0 {
                vec![("idempotency-key", key.as_str())]
            } else {
                vec![]
            };
            let answer = send(outbound, "POST", &path, &headers, body.clone()).await;
            assert_eq!(answer.status, 200);
            sent.insert((path, sha256(&body)));
        }
        let (_, text_metrics) = admin_get(admin, "/metrics").await;
        assert!(
            metric(
                &text_metrics,
                "tandem_fanout_attempts_total",
                &[("outcome", "connect-failure")]
            ) > 0.0,
            "copies are retrying: {text_metrics}"
        );
        let log = first.terminate().await;
        assert!(
            log.contains("spooling fanout copies left at shutdown"),
            "{log}"
        );

        let rows = list(&spool, &[]).await;
        assert_eq!(rows.len(), 20, "every accepted copy is in the spool");
        assert!(
            rows.iter().all(|row| row["REASON"] == "shutdown"),
            "{rows:?}"
        );
        let keys: BTreeSet<String> = rows.iter().map(|r| r["IDEMPOTENCY-KEY"].clone()).collect();
        assert_eq!(keys.len(), 20, "one key per copy");
        assert!(keys.contains("client-key-0"), "{keys:?}");
        assert!(keys.contains("client-key-14"), "{keys:?}");

        // A restart keeps the spool as it was.
        let second = ProxyProcess::start(&config, dir.path().join("second.log")).await;
        let outbound = second.outbound;
        assert_eq!(list(&spool, &[]).await.len(), 20);

        // Replay while the second proxy runs and writes the same spool.
        let secondary =
            TestServer::start_on(secondary_addr, handler(|_, _| Reply::status(204))).await;
        let output = tandem(&[
            "dlq",
            "replay",
            "--config",
            config.to_str().unwrap(),
            "--route",
            "audit",
        ])
        .await;
        assert!(
            output.status.success(),
            "replay failed: {}",
            text(&output.stderr)
        );
        assert_eq!(text(&output.stdout).matches("delivered ").count(), 20);

        let received = secondary.wait_for(20).await;
        assert_eq!(received.len(), 20, "each copy exactly once");
        let delivered: BTreeSet<(String, String)> = received
            .iter()
            .map(|r| (r.path.clone(), r.sha256()))
            .collect();
        assert_eq!(delivered, sent, "every copy arrived unchanged");
        let attempts_by_key: BTreeMap<String, String> = rows
            .iter()
            .map(|r| (r["IDEMPOTENCY-KEY"].clone(), r["ATTEMPTS"].clone()))
            .collect();
        for request in &received {
            let key = request.header("idempotency-key");
            let recorded: u32 = attempts_by_key[&key].parse().unwrap();
            assert_eq!(request.header("tandem-attempt"), (recorded + 1).to_string());
            assert_eq!(request.header("tandem-dispatch"), "fanout");
        }
        assert!(
            list(&spool, &[]).await.is_empty(),
            "delivered records are removed"
        );

        // The running proxy keeps appending to the rewritten file.
        send(outbound, "POST", "/lossy/after-replay", &[], "late").await;
        let mut rows = Vec::new();
        for _ in 0..200 {
            rows = list(&spool, &[]).await;
            if !rows.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(rows.len(), 1, "the proxy wrote to the new spool file");
        assert_eq!(rows[0]["ROUTE"], "lossy");
        assert_eq!(rows[0]["REASON"], "attempts_exhausted");
        assert_eq!(rows[0]["SIZE"], "4");

        // Filters and a dry run.
        assert_eq!(list(&spool, &["--route", "audit"]).await.len(), 0);
        assert_eq!(list(&spool, &["--route", "lossy"]).await.len(), 1);
        assert_eq!(list(&spool, &["--since", "1h"]).await.len(), 1);
        assert_eq!(
            list(&spool, &["--since", "2999-01-01T00:00:00Z"])
                .await
                .len(),
            0
        );
        let output = tandem(&[
            "dlq",
            "replay",
            "--dry-run",
            "--spool-dir",
            spool.to_str().unwrap(),
        ])
        .await;
        assert!(output.status.success(), "{}", text(&output.stderr));
        assert!(
            text(&output.stdout).contains(&format!(
                "would send POST http://{never_up}/lossy/after-replay"
            )),
            "{}",
            text(&output.stdout)
        );
        assert_eq!(
            list(&spool, &[]).await.len(),
            1,
            "a dry run removes nothing"
        );

        // A failed replay keeps the record and reports it in the exit status.
        let output = tandem(&[
            "dlq",
            "replay",
            "--timeout",
            "2s",
            "--spool-dir",
            spool.to_str().unwrap(),
        ])
        .await;
        assert!(!output.status.success());
        assert!(
            text(&output.stderr).contains("1 of the selected records were not delivered"),
            "{}",
            text(&output.stderr)
        );
        assert_eq!(list(&spool, &[]).await.len(), 1);

        second.terminate().await;
        assert_eq!(secondary.received().len(), 20, "nothing was sent twice");
    })
    .await;
}

#[tokio::test]
async fn corrupt_record_is_reported_and_others_replay() {
    bounded(async {
        let primary = TestServer::start(handler(|_, _| Reply::status(200))).await;
        // Rejects first attempts, so the proxy spools them; accepts replays.
        let secondary = TestServer::start(handler(|request, _| {
            if request.header("tandem-attempt") == "1" {
                Reply::status(409)
            } else {
                Reply::status(200)
            }
        }))
        .await;
        let dir = TempDir::new("dlq-corrupt");
        let yaml = format!(
            "outbound: {{listen: '127.0.0.1:0', default_target: '{}'}}
admin: {{listen: '127.0.0.1:0'}}
routes:
  - name: audit
    fanout: {{to: ['{}'], spool_dir: '{}'}}",
            primary.addr,
            secondary.url(),
            dir.path().display()
        );
        let proxy = tandem::proxy::start(Config::from_yaml(&yaml).unwrap())
            .await
            .unwrap();
        let bodies: Vec<_> = (0..3).map(|i| random_body(5_000, 100 + i)).collect();
        for (i, body) in bodies.iter().enumerate() {
            send(
                proxy.outbound_addr(),
                "POST",
                &format!("/r/{i}"),
                &[],
                body.clone(),
            )
            .await;
            secondary.wait_for(i + 1).await;
        }
        wait_until("three dead letters", || {
            metric(
                &proxy.metrics().encode(),
                "tandem_fanout_dead_lettered_total",
                &[],
            ) == 3.0
        })
        .await;
        proxy.shutdown().await;

        let records = spool_records(dir.path());
        assert_eq!(records.len(), 3);
        let damaged = &records[1];
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(tandem::spool::spool_path(dir.path()))
            .unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, damaged.body_offset + 100)
            .unwrap();
        file.write_all_at(&[byte[0] ^ 0xff], damaged.body_offset + 100)
            .unwrap();

        let output = tandem(&["dlq", "replay", "--spool-dir", dir.path().to_str().unwrap()]).await;
        let stderr = text(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("corrupt record at byte offset {}", damaged.offset)),
            "{stderr}"
        );
        assert!(stderr.contains("checksum mismatch"), "{stderr}");
        let received = secondary.wait_for(5).await;
        let replayed: BTreeSet<String> = received[3..].iter().map(|r| r.sha256()).collect();
        let expected: BTreeSet<String> =
            [&bodies[0], &bodies[2]].iter().map(|b| sha256(b)).collect();
        assert_eq!(
            replayed, expected,
            "the two intact records were replayed unchanged"
        );

        let output = tandem(&["dlq", "list", "--spool-dir", dir.path().to_str().unwrap()]).await;
        assert!(output.status.success());
        assert!(list_rows(&text(&output.stdout)).is_empty());
        assert!(
            text(&output.stderr).contains("corrupt record at byte offset"),
            "the damaged bytes stay and are reported again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(secondary.received().len(), 5, "nothing else was sent");
    })
    .await;
}

#[tokio::test]
async fn bad_spool_inputs_give_clear_errors() {
    bounded(async {
        let dir = TempDir::new("dlq-errors");

        let newer = dir.path().join("newer");
        std::fs::create_dir_all(&newer).unwrap();
        let mut header = *b"TNDMDLQ\0\x09\0\0\0\0\0\0\0";
        header[8] = 9;
        std::fs::write(tandem::spool::spool_path(&newer), header).unwrap();
        let output = tandem(&["dlq", "list", "--spool-dir", newer.to_str().unwrap()]).await;
        assert!(!output.status.success());
        let stderr = text(&output.stderr);
        assert!(stderr.contains("version 9"), "{stderr}");

        let output = tandem(&["dlq", "list"]).await;
        assert!(!output.status.success());
        assert!(text(&output.stderr).contains("--spool-dir DIR or --config FILE"));

        let blocker = dir.path().join("a-file");
        std::fs::write(&blocker, b"x").unwrap();
        let spool = blocker.join("spool");
        let yaml = format!(
            "outbound: {{listen: '127.0.0.1:0'}}
admin: {{listen: '127.0.0.1:0'}}
routes:
  - name: audit
    fanout: {{to: ['http://127.0.0.1:9'], spool_dir: '{}'}}",
            spool.display()
        );
        let config = write_file(dir.path(), "bad.yaml", &yaml).await;
        let output = tandem(&["proxy", "--config", config.to_str().unwrap()]).await;
        assert!(!output.status.success());
        let stderr = text(&output.stderr);
        assert!(stderr.contains("spool_dir"), "{stderr}");
        assert!(stderr.contains(&spool.display().to_string()), "{stderr}");
    })
    .await;
}
