//! The `tandem` binary: `check` on good and bad config files, and `proxy`
//! draining on SIGTERM.

mod support;

use std::{
    process::{Command, Output},
    time::Duration,
};

use http::Request;
use support::{
    process::{run_with_limit, BinaryProxy, TempDir, BINARY},
    *,
};

/// Runs `tandem check --config FILE` on `yaml`, without any `TANDEM_*`
/// variable from the test's environment.
fn check(yaml: &str) -> Output {
    let dir = TempDir::new("tandem-check");
    let path = dir.write("tandem.yaml", yaml);
    let mut command = Command::new(BINARY);
    command.arg("check").arg("--config").arg(&path);
    for (name, _) in std::env::vars() {
        if name.starts_with("TANDEM_") {
            command.env_remove(name);
        }
    }
    run_with_limit(&mut command, Duration::from_secs(10))
}

#[test]
fn check_prints_effective_config() {
    let output = check(
        "outbound:\n  default_target: \"127.0.0.1:8080\"\nroutes:\n  - name: orders\n    match: {path_prefix: /api/}\n    mirror: {to: \"http://127.0.0.1:9090\", percent: 5}\n",
    );

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "expected exit 0 for a valid file, got {:?}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let config: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&stdout).expect("expected check to print YAML");

    let route = &config["routes"][0];
    assert_eq!(
        route["name"].as_str(),
        Some("orders"),
        "expected the route: {stdout}"
    );
    assert_eq!(
        route["mirror"]["percent"].as_f64(),
        Some(5.0),
        "expected the given percent: {stdout}"
    );
    assert_eq!(
        route["mirror"]["timeout"].as_str(),
        Some("2s"),
        "expected the default timeout: {stdout}"
    );
    assert_eq!(
        route["mirror"]["max_body_bytes"].as_u64(),
        Some(1024 * 1024),
        "expected the default max_body_bytes: {stdout}"
    );

    assert_eq!(
        config["outbound"]["default_target"].as_str(),
        Some("127.0.0.1:8080"),
        "expected the given default target: {stdout}"
    );
    assert_eq!(
        config["outbound"]["listen"].as_str(),
        Some("127.0.0.1:4140"),
        "expected the default outbound address: {stdout}"
    );
    assert_eq!(
        config["drain_timeout"].as_str(),
        Some("10s"),
        "expected the default drain timeout: {stdout}"
    );
}

#[test]
fn check_rejects_bad_files() {
    let route = |mirror: &str| format!("routes:\n  - name: r\n    mirror: {{{mirror}}}\n");
    let cases = [
        (
            "unknown key",
            route("to: \"http://127.0.0.1:9090\", percnt: 5"),
            "routes[0].mirror",
            "percnt",
        ),
        (
            "percent over 100",
            route("to: \"http://127.0.0.1:9090\", percent: 150"),
            "routes[0].mirror.percent",
            "150",
        ),
        (
            "duration without unit",
            route("to: \"http://127.0.0.1:9090\", timeout: 2 parsecs"),
            "routes[0].mirror.timeout",
            "2 parsecs",
        ),
        (
            "non-HTTP URL",
            route("to: \"ftp://127.0.0.1:9090\""),
            "routes[0].mirror.to",
            "ftp://127.0.0.1:9090",
        ),
        (
            "unknown top-level key",
            "routse: []\n".to_string(),
            "routse",
            "expected one of",
        ),
        (
            "duration in outbound",
            "outbound:\n  idle_timeout: soon\n".to_string(),
            "outbound.idle_timeout",
            "soon",
        ),
    ];
    for (case, yaml, field, value) in cases {
        let output = check(&yaml);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(1),
            "expected exit 1 for {case}, stderr: {stderr}"
        );
        assert!(
            stderr.contains(field),
            "expected the message for {case} to name {field}: {stderr}"
        );
        assert!(
            stderr.contains(value),
            "expected the message for {case} to show {value}: {stderr}"
        );
        assert!(
            output.stdout.is_empty(),
            "expected no config printed for {case}"
        );
    }
}

#[test]
fn check_reports_missing_file() {
    let output = run_with_limit(
        Command::new(BINARY).args(["check", "--config", "/nonexistent/tandem.yaml"]),
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "expected exit 1 for a missing file: {stderr}"
    );
    assert!(
        stderr.contains("/nonexistent/tandem.yaml"),
        "expected the message to name the path: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_request() {
    bounded(async {
        let primary = TestServer::builder()
            .delay(Duration::from_secs(2))
            .body("slow reply")
            .start()
            .await;
        let secondary = TestServer::echo().await;
        let drain_timeout = Duration::from_secs(6);
        let yaml = proxy_spec()
            .default_target(primary.addr())
            .set("drain_timeout", "6s")
            .route(route("r", &secondary.url()))
            .yaml();
        let mut proxy = BinaryProxy::start(&yaml).await;

        let outbound = proxy.outbound;
        let in_flight = tokio::spawn(async move {
            let request = Request::post("/slow")
                .header("host", "orders")
                .body(full("payload"))
                .unwrap();
            send(outbound, request).await
        });
        primary.wait_for_one().await;
        proxy.terminate();

        let refused = async {
            loop {
                match tokio::net::TcpStream::connect(outbound).await {
                    Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => return,
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        };
        assert!(
            tokio::time::timeout(Duration::from_secs(5), refused).await.is_ok(),
            "expected new connections refused soon after SIGTERM"
        );

        let response = in_flight.await.expect("request task does not panic");
        assert_eq!(response.status, 200, "expected the in-flight request to complete");
        assert_eq!(&response.body[..], b"slow reply", "expected the whole slow reply");

        let status = proxy.wait_exit(drain_timeout).await;
        let status = status.unwrap_or_else(|| {
            panic!(
                "expected the proxy to exit within the {drain_timeout:?} drain timeout; stderr:\n{}",
                proxy.stderr()
            )
        });
        assert!(status.success(), "expected exit 0 after draining, got {status:?}:\n{}", proxy.stderr());
        assert!(proxy.stderr().contains("\"drained\""), "expected the drained log line:\n{}", proxy.stderr());
        assert_eq!(secondary.count(), 1, "expected the copy sent before the proxy exited");
    })
    .await;
}
