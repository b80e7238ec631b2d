use std::collections::HashMap;

use super::*;

fn error_of(yaml: &str) -> String {
    Config::from_yaml(yaml)
        .expect_err("config must be rejected")
        .to_string()
}

#[test]
fn empty_file_is_embedded_default() {
    let config = Config::from_yaml("").expect("empty config is valid");
    assert_eq!(config, Config::default());
    assert_eq!(config.outbound.listen.to_string(), DEFAULT_OUTBOUND_LISTEN);
    assert_eq!(config.admin.listen.to_string(), DEFAULT_ADMIN_LISTEN);
    assert!(config.routes.is_empty());
}

#[test]
fn full_route_parses_with_defaults() {
    let config = Config::from_yaml(
        r#"
routes:
  - name: orders-shadow
    match:
      host: "orders*"
      port: 8080
      path_prefix: /api/
      methods: [POST, PUT]
      headers: {x-env: canary}
    mirror:
      to: http://127.0.0.1:9090
"#,
    )
    .expect("valid route");
    let mirror = config.routes[0].mirror.as_ref().expect("mirror section");
    assert_eq!(mirror.percent, 100.0, "a missing percent means 100");
    assert_eq!(mirror.timeout, DEFAULT_MIRROR_TIMEOUT);
    assert_eq!(mirror.max_in_flight, DEFAULT_MIRROR_MAX_IN_FLIGHT);
    assert_eq!(mirror.max_body_bytes, DEFAULT_MIRROR_MAX_BODY_BYTES);
    assert!(!config.routes[0].match_.tagged);
}

#[test]
fn unknown_key_is_rejected() {
    let error = error_of("outbound: {listen: 127.0.0.1:4140, lsten: x}");
    assert!(error.contains("unknown field `lsten`"), "{error}");
}

#[test]
fn invalid_values_name_field() {
    let cases = [
        (
            "routes: [{name: a, mirror: {to: 'ftp://x', percent: 1}}]",
            "routes[0].mirror.to",
        ),
        (
            "routes: [{name: a, mirror: {to: 'http://x:1', percent: 101}}]",
            "routes[0].mirror.percent",
        ),
        (
            "routes: [{name: a, mirror: {to: 'http://x:1', max_in_flight: 0}}]",
            "routes[0].mirror.max_in_flight",
        ),
        (
            "routes: [{name: 'a b', mirror: {to: 'http://x:1'}}]",
            "routes[0].name",
        ),
        (
            "routes: [{name: a, match: {methods: [get]}, mirror: {to: 'http://x:1'}}]",
            "routes[0].match.methods[0]",
        ),
        (
            "routes: [{name: a, match: {path_prefix: api}, mirror: {to: 'http://x:1'}}]",
            "routes[0].match.path_prefix",
        ),
        (
            "routes: [{name: a, match: {host: 'a[b'}, mirror: {to: 'http://x:1'}}]",
            "routes[0].match.host",
        ),
        ("routes: [{name: a}]", "routes[0]"),
        (
            "routes: [{name: a, mirror: {to: 'http://x:1'}}, {name: a, mirror: {to: 'http://x:1'}}]",
            "routes[1].name",
        ),
        ("outbound: {default_target: 'nohost'}", "outbound.default_target"),
        ("outbound: {max_request_header_bytes: 10}", "outbound.max_request_header_bytes"),
        ("outbound: {idle_timeout: 0s}", "outbound.idle_timeout"),
        ("log: {level: 'info,,=x['}", "log.level"),
        ("log: {level: warning}", "log.level"),
        (
            "routes: [{name: a, fanout: {to: ['http://x:1'], max_body_bytes: 100, max_queued_body_bytes: 10}}]",
            "routes[0].fanout.max_queued_body_bytes",
        ),
        ("log: {level: 'tandem=loud'}", "log.level"),
        (
            "routes: [{name: a, mirror: {to: 'http://127.0.0.1:99999'}}]",
            "routes[0].mirror.to",
        ),
        (
            "routes: [{name: a, mirror: {to: 'http://user:secret@127.0.0.1:9090'}}]",
            "routes[0].mirror.to",
        ),
    ];
    for (yaml, field) in cases {
        let error = error_of(yaml);
        assert!(
            error.contains(field),
            "error for {yaml:?} must name {field}: {error}"
        );
        assert!(
            error.contains("expected"),
            "error for {yaml:?} must say what is expected: {error}"
        );
    }
}

#[test]
fn bad_duration_says_expected_form() {
    let error = error_of("drain_timeout: soon");
    assert!(error.contains("\"soon\""), "{error}");
    assert!(error.contains("500ms"), "{error}");
}

#[test]
fn env_overrides_apply() {
    let env: HashMap<&str, &str> = [
        (ENV_OUTBOUND_LISTEN, "127.0.0.1:5140"),
        (ENV_ADMIN_LISTEN, "127.0.0.1:5191"),
        (ENV_OUTBOUND_DEFAULT_TARGET, "backend:80"),
        (ENV_DRAIN_TIMEOUT, "3s"),
        (ENV_LOG, "debug"),
        (ENV_LOG_FORMAT, "json"),
    ]
    .into_iter()
    .collect();
    let mut config = Config::default();
    config
        .apply_env(|name| env.get(name).map(|v| v.to_string()))
        .expect("valid overrides");
    assert_eq!(config.outbound.listen.to_string(), "127.0.0.1:5140");
    assert_eq!(config.admin.listen.to_string(), "127.0.0.1:5191");
    assert_eq!(
        config.outbound.default_target.as_deref(),
        Some("backend:80")
    );
    assert_eq!(config.drain_timeout, Duration::from_secs(3));
    assert_eq!(config.log.level, "debug");
    assert_eq!(config.log.format, LogFormat::Json);
}

#[test]
fn bad_env_override_names_variable() {
    let mut config = Config::default();
    let error = config
        .apply_env(|name| (name == ENV_OUTBOUND_LISTEN).then(|| "nowhere".to_string()))
        .expect_err("an invalid address is rejected");
    let message = error.to_string();
    assert!(message.contains(ENV_OUTBOUND_LISTEN), "{message}");
    assert!(message.contains("nowhere"), "{message}");
}

#[test]
fn effective_config_round_trips() {
    let config = Config::from_yaml(
        "routes: [{name: a, mirror: {to: 'http://127.0.0.1:9090', timeout: 1500ms}}]",
    )
    .expect("valid config");
    let yaml = serde_yaml_ng::to_string(&config).expect("serializes");
    let again = Config::from_yaml(&yaml).expect("printed config parses again");
    assert_eq!(again, config);
}

#[test]
fn fanout_route_parses_with_defaults() {
    let config = Config::from_yaml(
        r#"
routes:
  - name: audit
    match: {path_prefix: /orders, methods: [POST]}
    fanout:
      to: [http://127.0.0.1:9191, http://127.0.0.1:9192]
      retry: {max_attempts: 3, base_delay: 10ms, max_delay: 1s}
      retry_on: [connect-failure, 5xx, 429]
      spool_dir: /tmp/tandem-spool
"#,
    )
    .expect("valid fanout route");
    let fanout = config.routes[0].fanout.as_ref().expect("fanout section");
    assert_eq!(fanout.to.len(), 2);
    assert_eq!(fanout.timeout, DEFAULT_FANOUT_TIMEOUT);
    assert_eq!(fanout.retry.max_attempts, 3);
    assert_eq!(fanout.retry.base_delay, Duration::from_millis(10));
    assert_eq!(
        fanout.retry_on,
        vec![
            RetryClass::ConnectFailure,
            RetryClass::ServerError,
            RetryClass::TooManyRequests
        ],
        "429 written as a YAML number is accepted"
    );
    assert_eq!(
        fanout.circuit_breaker.consecutive_failures,
        DEFAULT_CIRCUIT_CONSECUTIVE_FAILURES
    );
    assert_eq!(fanout.queue_capacity, DEFAULT_FANOUT_QUEUE_CAPACITY);
    assert_eq!(fanout.max_body_bytes, DEFAULT_FANOUT_MAX_BODY_BYTES);
    assert_eq!(fanout.spool_fsync_interval, DEFAULT_SPOOL_FSYNC_INTERVAL);
    assert_eq!(
        config.spool_dirs(),
        vec![std::path::PathBuf::from("/tmp/tandem-spool")]
    );

    let yaml = serde_yaml_ng::to_string(&config).expect("serializes");
    assert_eq!(Config::from_yaml(&yaml).expect("parses again"), config);
}

#[test]
fn compare_route_parses_with_defaults() {
    let config = Config::from_yaml(
        r#"
routes:
  - name: shadow
    compare:
      to: http://127.0.0.1:9090
      headers: [content-type]
      ignore_json_paths: ["$.timestamp", "$.items[*].id"]
"#,
    )
    .expect("valid compare route");
    let compare = config.routes[0].compare.as_ref().expect("compare section");
    assert_eq!(compare.percent, 100.0);
    assert_eq!(
        compare.sample_diffs_per_minute,
        DEFAULT_COMPARE_SAMPLE_DIFFS_PER_MINUTE
    );
    assert_eq!(compare.max_body_bytes, DEFAULT_MIRROR_MAX_BODY_BYTES);
}

#[test]
fn invalid_fanout_and_compare_values_name_field() {
    let cases = [
        ("routes: [{name: a, fanout: {to: []}}]", "routes[0].fanout.to"),
        (
            "routes: [{name: a, fanout: {to: ['http://x:1', 'ftp://y']}}]",
            "routes[0].fanout.to[1]",
        ),
        (
            "routes: [{name: a, fanout: {to: ['http://x:1', 'http://x:1']}}]",
            "routes[0].fanout.to[1]",
        ),
        (
            "routes: [{name: a, fanout: {to: ['http://x:1'], retry: {max_attempts: 0}}}]",
            "routes[0].fanout.retry.max_attempts",
        ),
        (
            "routes: [{name: a, fanout: {to: ['http://x:1'], retry: {base_delay: 2s, max_delay: 1s}}}]",
            "routes[0].fanout.retry.max_delay",
        ),
        (
            "routes: [{name: a, fanout: {to: ['http://x:1'], circuit_breaker: {consecutive_failures: 0}}}]",
            "routes[0].fanout.circuit_breaker.consecutive_failures",
        ),
        (
            "routes: [{name: a, fanout: {to: ['http://x:1'], queue_capacity: 0}}]",
            "routes[0].fanout.queue_capacity",
        ),
        (
            "routes: [{name: a, fanout: {to: ['http://x:1'], spool_dir: ''}}]",
            "routes[0].fanout.spool_dir",
        ),
        (
            "routes: [{name: a, fanout: {to: ['http://x:1'], spool_fsync_interval: 0s}}]",
            "routes[0].fanout.spool_fsync_interval",
        ),
        (
            "routes: [{name: a, compare: {to: 'http://x:1', ignore_json_paths: ['id']}}]",
            "routes[0].compare.ignore_json_paths[0]",
        ),
        (
            "routes: [{name: a, compare: {to: 'http://x:1', headers: ['bad header']}}]",
            "routes[0].compare.headers[0]",
        ),
        (
            "routes: [{name: a, compare: {to: 'http://x:1', percent: 120}}]",
            "routes[0].compare.percent",
        ),
    ];
    for (yaml, field) in cases {
        let error = error_of(yaml);
        assert!(
            error.contains(field),
            "error for {yaml:?} must name {field}: {error}"
        );
        assert!(
            error.contains("expected"),
            "error for {yaml:?} must say what is expected: {error}"
        );
    }
}

#[test]
fn unknown_retry_class_is_rejected() {
    let error = error_of("routes: [{name: a, fanout: {to: ['http://x:1'], retry_on: [4xx]}}]");
    assert!(error.contains("\"4xx\""), "{error}");
    assert!(error.contains("connect-failure"), "{error}");
}

#[test]
fn route_with_two_modes_is_rejected() {
    let error = error_of(
        "routes: [{name: both, mirror: {to: 'http://x:1'}, fanout: {to: ['http://x:2']}}]",
    );
    assert!(error.contains("routes[0]"), "{error}");
    assert!(error.contains("\"both\""), "{error}");
    assert!(error.contains("exactly one"), "{error}");
}

#[test]
fn log_filters_accept_levels_and_targets() {
    for level in ["info", "WARN", "debug,hyper=warn", "tandem=trace", "off"] {
        let yaml = format!("log: {{level: '{level}'}}");
        assert!(
            Config::from_yaml(&yaml).is_ok(),
            "{level} is a valid filter"
        );
    }
}

#[test]
fn bad_listen_address_shows_value() {
    let error = error_of("outbound: {listen: 'localhost:4140'}");
    assert!(error.contains("outbound.listen"), "{error}");
    assert!(error.contains("\"localhost:4140\""), "{error}");
    assert!(error.contains("127.0.0.1:4140"), "{error}");
}

#[test]
fn url_credentials_not_echoed() {
    let error = error_of("routes: [{name: a, mirror: {to: 'http://user:secret@127.0.0.1:9090'}}]");
    assert!(
        !error.contains("secret"),
        "the password must not be shown: {error}"
    );
    assert!(error.contains("***@127.0.0.1:9090"), "{error}");
}

#[test]
fn bad_log_env_names_variable() {
    let mut config = Config::default();
    let error = config
        .apply_env(|name| (name == ENV_LOG).then(|| "warning".to_string()))
        .expect_err("a filter without a level is rejected")
        .to_string();
    assert!(error.contains(ENV_LOG), "{error}");
}

#[test]
fn fanout_duplicate_ignores_trailing_slash() {
    let error = error_of(
        "routes: [{name: a, fanout: {to: ['http://127.0.0.1:9191', 'http://127.0.0.1:9191/']}}]",
    );
    assert!(error.contains("routes[0].fanout.to[1]"), "{error}");
}
