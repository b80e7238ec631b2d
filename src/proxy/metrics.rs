//! Prometheus metric families of the proxy.
//!
//! Each proxy owns its registry instead of using the process-global default,
//! so several proxies can run in one process (the demo and the tests do).

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// Latency buckets in seconds: from 0.5 ms, where a loopback hop through the
/// proxy lands, to 10 s, past the default mirror timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Reason a copy did not reach the secondary. Together with the copies that
/// got a response (and, for fanout, those written to the dead-letter spool)
/// these account for every copy that was due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// The route's `max_in_flight` copies were already in flight.
    Overloaded,
    /// The request body exceeded the route's `max_body_bytes`.
    BodyTooLarge,
    /// The primary request body ended early (client abort, read error or the
    /// upstream stopped reading), so no complete copy exists.
    BodyIncomplete,
    /// The secondary did not respond within the route's timeout.
    Timeout,
    /// No connection to the secondary could be made.
    ConnectFailed,
    /// A recent connection attempt to the secondary failed, so the copy was
    /// shed without another attempt until the backoff passes.
    Unavailable,
    /// The connection to the secondary failed after it was made.
    UpstreamError,
    /// The proxy stopped before the copy was sent.
    Shutdown,
    /// A fanout body too large for memory could not be written to its file
    /// in the spool directory.
    SpoolFailed,
}

impl ShedReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::Overloaded => "overloaded",
            ShedReason::BodyTooLarge => "body_too_large",
            ShedReason::BodyIncomplete => "body_incomplete",
            ShedReason::Timeout => "timeout",
            ShedReason::ConnectFailed => "connect_failed",
            ShedReason::Unavailable => "unavailable",
            ShedReason::UpstreamError => "upstream_error",
            ShedReason::Shutdown => "shutdown",
            ShedReason::SpoolFailed => "spool_failed",
        }
    }
}

/// Traffic direction label.
pub const OUTBOUND: &str = "outbound";
/// Route label of requests that matched no route.
pub const NO_ROUTE: &str = "default";

#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    dispatch_due: IntCounterVec,
    dispatch_shed: IntCounterVec,
    dispatch_in_flight: IntGaugeVec,
    connections_open: IntGaugeVec,
    connections_total: IntCounterVec,
    proxy_errors: IntCounterVec,
    fanout: FanoutMetrics,
}

/// Families of the fanout and compare modes and of the dead-letter spool.
#[derive(Clone, Debug)]
pub struct FanoutMetrics {
    pub attempts: IntCounterVec,
    pub retries: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub queue_depth: IntGaugeVec,
    pub circuit_state: IntGaugeVec,
    pub spool_bytes: IntGauge,
    pub spool_write_errors: IntCounter,
    pub compare: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();

        let requests = IntCounterVec::new(
            Opts::new(
                "tandem_requests_total",
                "Requests that got a response, by role: primary or the copy's mode.",
            ),
            &["direction", "route", "role", "status_class"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "tandem_request_duration_seconds",
                "Time from sending a request upstream to its response head.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["direction", "route", "role"],
        )
        .expect("valid metric");
        let dispatch_due = IntCounterVec::new(
            Opts::new(
                "tandem_dispatch_due_total",
                "Copies due after matching and sampling; each one ends as a response, a shed \
                 or, for fanout, a dead letter.",
            ),
            &["route", "mode"],
        )
        .expect("valid metric");
        let dispatch_shed = IntCounterVec::new(
            Opts::new(
                "tandem_dispatch_shed_total",
                "Copies that did not reach the secondary, by reason.",
            ),
            &["route", "mode", "reason"],
        )
        .expect("valid metric");
        let dispatch_in_flight = IntGaugeVec::new(
            Opts::new(
                "tandem_dispatch_in_flight",
                "Copies buffering or in flight to the secondary.",
            ),
            &["route", "mode"],
        )
        .expect("valid metric");
        let connections_open = IntGaugeVec::new(
            Opts::new("tandem_connections_open", "Open client connections."),
            &["direction"],
        )
        .expect("valid metric");
        let connections_total = IntCounterVec::new(
            Opts::new(
                "tandem_connections_total",
                "Accepted client connections, by detected protocol.",
            ),
            &["direction", "protocol"],
        )
        .expect("valid metric");
        let proxy_errors = IntCounterVec::new(
            Opts::new(
                "tandem_proxy_errors_total",
                "Primary requests answered by the proxy itself, by error type.",
            ),
            &["direction", "error_type"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "tandem_build_info",
                "Build information; the value is always 1.",
            ),
            &["version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let fanout = FanoutMetrics::new();
        fanout.register(&registry);

        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(dispatch_due.clone()),
            Box::new(dispatch_shed.clone()),
            Box::new(dispatch_in_flight.clone()),
            Box::new(connections_open.clone()),
            Box::new(connections_total.clone()),
            Box::new(proxy_errors.clone()),
            Box::new(build_info),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }

        Self {
            registry,
            requests,
            request_duration,
            dispatch_due,
            dispatch_shed,
            dispatch_in_flight,
            connections_open,
            connections_total,
            proxy_errors,
            fanout,
        }
    }

    pub fn fanout(&self) -> &FanoutMetrics {
        &self.fanout
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Renders every family in the Prometheus text format.
    pub fn encode(&self) -> String {
        let encoder = prometheus::TextEncoder::new();
        encoder
            .encode_to_string(&self.registry.gather())
            .expect("text encoding of valid metrics cannot fail")
    }

    pub fn record_response(&self, route: &str, role: &str, status: http::StatusCode) {
        self.requests
            .with_label_values(&[OUTBOUND, route, role, status_class(status)])
            .inc();
    }

    pub fn latency(&self, route: &str, role: &str) -> Histogram {
        self.request_duration
            .with_label_values(&[OUTBOUND, route, role])
    }

    pub fn record_due(&self, route: &str, mode: &str) {
        self.dispatch_due.with_label_values(&[route, mode]).inc();
    }

    pub fn record_shed(&self, route: &str, mode: &str, reason: ShedReason) {
        self.dispatch_shed
            .with_label_values(&[route, mode, reason.as_str()])
            .inc();
    }

    pub fn in_flight(&self, route: &str, mode: &str) -> IntGauge {
        self.dispatch_in_flight.with_label_values(&[route, mode])
    }

    pub fn connection_opened(&self, protocol: &str) -> ConnectionGuard {
        self.connections_total
            .with_label_values(&[OUTBOUND, protocol])
            .inc();
        let gauge = self.connections_open.with_label_values(&[OUTBOUND]);
        gauge.inc();
        ConnectionGuard { gauge }
    }

    pub fn record_proxy_error(&self, error_type: &str) {
        self.proxy_errors
            .with_label_values(&[OUTBOUND, error_type])
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Decrements the open-connections gauge when the connection ends.
pub struct ConnectionGuard {
    gauge: IntGauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

pub fn status_class(status: http::StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl FanoutMetrics {
    fn new() -> Self {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        Self {
            attempts: counter(
                "tandem_fanout_attempts_total",
                "Fanout delivery attempts, by outcome: success, 4xx, 429, 5xx, \
                 connect-failure, reset or timeout.",
                &["route", "secondary", "outcome"],
            ),
            retries: counter(
                "tandem_fanout_retries_total",
                "Fanout attempts that were retries of an earlier failed attempt.",
                &["route", "secondary"],
            ),
            dead_lettered: counter(
                "tandem_fanout_dead_lettered_total",
                "Fanout copies handed to the dead-letter spool, by reason.",
                &["route", "reason"],
            ),
            queue_depth: gauge(
                "tandem_fanout_queue_depth",
                "Fanout copies waiting in a secondary's queue.",
                &["route", "secondary"],
            ),
            circuit_state: gauge(
                "tandem_circuit_state",
                "Circuit breaker state per secondary: 0 closed, 1 half-open, 2 open.",
                &["route", "secondary"],
            ),
            spool_bytes: IntGauge::new(
                "tandem_spool_bytes",
                "Size of the dead-letter spool files in bytes.",
            )
            .expect("valid metric"),
            spool_write_errors: IntCounter::new(
                "tandem_spool_write_errors_total",
                "Failed writes to the dead-letter spool or to a large-body file.",
            )
            .expect("valid metric"),
            compare: counter(
                "tandem_compare_total",
                "Compared responses, by result: match, mismatch or error.",
                &["route", "result"],
            ),
        }
    }

    fn register(&self, registry: &Registry) {
        for collector in [
            Box::new(self.attempts.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(self.retries.clone()),
            Box::new(self.dead_lettered.clone()),
            Box::new(self.queue_depth.clone()),
            Box::new(self.circuit_state.clone()),
            Box::new(self.spool_bytes.clone()),
            Box::new(self.spool_write_errors.clone()),
            Box::new(self.compare.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
    }
}
