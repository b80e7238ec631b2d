//! `tandem demo`: a primary and a secondary service in-process with the
//! proxy between them, driven first with a healthy secondary and then with
//! a slow one, to show that copies never slow the primary path.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::net::{TcpListener, TcpStream};

use crate::config::{Config, DEFAULT_ADMIN_LISTEN};

/// Concurrent client connections, each sending requests back to back.
const CLIENTS: usize = 8;
/// Delay of the slow secondary before it responds to each copy.
const SLOW_SECONDARY_DELAY: Duration = Duration::from_millis(300);

pub struct Options {
    /// Total traffic time, split evenly between the two phases.
    pub duration: Duration,
    pub keep_running: bool,
}

/// Client-side measurements of one demo phase.
struct PhaseReport {
    name: &'static str,
    sent: u64,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    latencies: Vec<Duration>,
    mirror_received: u64,
    fanout_received: u64,
}

/// Counts the copies the demo secondary received, by dispatch mode.
#[derive(Default)]
struct Secondary {
    mirror_copies: AtomicU64,
    fanout_copies: AtomicU64,
    slow: AtomicBool,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let primary_addr = serve_primary().await?;
    let secondary = Arc::new(Secondary::default());
    let secondary_addr = serve_secondary(Arc::clone(&secondary)).await?;

    let spool_dir = std::env::temp_dir().join(format!("tandem-demo-{}", std::process::id()));
    std::fs::create_dir_all(&spool_dir).with_context(|| {
        format!(
            "failed to create the demo spool directory {}",
            spool_dir.display()
        )
    })?;
    let config = demo_config(secondary_addr, &spool_dir)?;
    let proxy = crate::proxy::start(config).await?;
    let outbound = proxy.outbound_addr();
    let admin = proxy.admin_addr();
    let metrics = proxy.metrics().clone();

    println!("tandem demo");
    println!("  primary service    http://{primary_addr}");
    println!("  secondary service  http://{secondary_addr}  (receives the copies)");
    println!("  proxy outbound     http://{outbound}  (clients use it as http_proxy)");
    println!("  route              orders-shadow: POST /orders/* mirrored at 100%, 1s timeout");
    println!("  route              payments-audit: POST /payments/* fanned out, at least once");
    println!();

    let phase_time = options.duration / 2;
    let healthy = drive(
        "healthy secondary",
        primary_addr,
        outbound,
        phase_time,
        &secondary,
    )
    .await?;
    secondary.slow.store(true, Ordering::Relaxed);
    let slow = drive(
        "slow secondary (300ms)",
        primary_addr,
        outbound,
        phase_time,
        &secondary,
    )
    .await?;
    // Mirror copies still in flight settle within the route timeout, and
    // the drain gives queued fan-out copies their last chance before they
    // are written to the spool, so the counts printed below are final.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    if options.keep_running {
        print_report(&[healthy, slow], &metrics.encode());
        print_spool_commands(&spool_dir);
        println!("  metrics            http://{admin}/metrics");
        println!("  the proxy keeps running; press Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
        proxy.shutdown().await;
    } else {
        proxy.shutdown().await;
        print_report(&[healthy, slow], &metrics.encode());
        println!("  metrics            were served at http://{admin}/metrics; --keep-running keeps them up");
    }
    // The dead letters name the demo's secondary, whose port is gone once
    // the demo exits, so replaying them later would send them to whatever
    // listens there then.
    if let Err(error) = std::fs::remove_dir_all(&spool_dir) {
        tracing::warn!(%error, dir = %spool_dir.display(), "failed to remove the demo spool");
    }
    Ok(())
}

fn print_report(phases: &[PhaseReport], metrics: &str) {
    print_summary(phases);
    let samples = parse_metrics(metrics);
    print_mirror_counters(&samples);
    print_fanout_counters(&samples);
    println!();
    println!("  The proxy's counters include copies that arrived after the traffic stopped,");
    println!("  so they can exceed the copies counted per phase above.");
    println!();
}

/// Prints how to inspect and replay the demo's dead letters while its
/// secondary still runs.
fn print_spool_commands(spool_dir: &std::path::Path) {
    let dir = spool_dir.display();
    println!("  list the dead letters:   tandem dlq list --spool-dir {dir}");
    println!("  send them again:         tandem dlq replay --spool-dir {dir}");
    println!("  (the spool is removed when the demo exits)");
    println!();
}

fn demo_config(secondary: SocketAddr, spool_dir: &std::path::Path) -> anyhow::Result<Config> {
    // The usual admin port when it is free, so the printed address matches
    // a real sidecar's; any free port otherwise.
    let admin = match std::net::TcpListener::bind(DEFAULT_ADMIN_LISTEN) {
        Ok(_) => DEFAULT_ADMIN_LISTEN,
        Err(_) => "127.0.0.1:0",
    };
    let yaml = format!(
        r#"
admin: {{listen: "{admin}"}}
outbound: {{listen: "127.0.0.1:0"}}
log: {{level: warn}}
drain_timeout: 2s
routes:
  - name: orders-shadow
    match: {{path_prefix: /orders/, methods: [POST]}}
    mirror:
      to: http://{secondary}
      percent: 100
      timeout: 1s
      max_in_flight: 64
  - name: payments-audit
    match: {{path_prefix: /payments/, methods: [POST]}}
    fanout:
      to: [http://{secondary}]
      timeout: 1s
      retry: {{max_attempts: 4, base_delay: 50ms, max_delay: 500ms}}
      max_in_flight: 64
      queue_capacity: 2000
      spool_dir: "{spool}"
"#,
        spool = spool_dir.display()
    );
    Config::from_yaml(&yaml).context("the demo config is invalid")
}

/// Sends orders through the proxy from [`CLIENTS`] keep-alive connections
/// for `duration`, with a progress bar.
async fn drive(
    name: &'static str,
    primary: SocketAddr,
    proxy: SocketAddr,
    duration: Duration,
    secondary: &Secondary,
) -> anyhow::Result<PhaseReport> {
    let mirror_before = secondary.mirror_copies.load(Ordering::Relaxed);
    let fanout_before = secondary.fanout_copies.load(Ordering::Relaxed);
    let bar = ProgressBar::new(duration.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template("  {prefix:24} [{bar:30}] {msg}")
            .expect("the progress template is valid")
            .progress_chars("=> "),
    );
    bar.set_prefix(name);

    let sent = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let sent = Arc::clone(&sent);
        clients.push(tokio::spawn(async move {
            run_client(client, primary, proxy, deadline, &sent).await
        }));
    }

    let started = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        bar.set_position(started.elapsed().as_millis() as u64);
        bar.set_message(format!("{} requests", sent.load(Ordering::Relaxed)));
    }

    let mut report = PhaseReport {
        name,
        sent: 0,
        statuses: BTreeMap::new(),
        errors: 0,
        latencies: Vec::new(),
        mirror_received: 0,
        fanout_received: 0,
    };
    for client in clients {
        let outcome = client.await.context("a demo client panicked")?;
        report.errors += outcome.errors;
        report.latencies.extend(outcome.latencies);
        for (status, count) in outcome.statuses {
            *report.statuses.entry(status).or_default() += count;
        }
    }
    report.sent = sent.load(Ordering::Relaxed);
    bar.finish_with_message(format!("{} requests", report.sent));
    report.mirror_received = secondary.mirror_copies.load(Ordering::Relaxed) - mirror_before;
    report.fanout_received = secondary.fanout_copies.load(Ordering::Relaxed) - fanout_before;
    Ok(report)
}

#[derive(Default)]
struct ClientOutcome {
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    latencies: Vec<Duration>,
}

async fn run_client(
    client: usize,
    primary: SocketAddr,
    proxy: SocketAddr,
    deadline: Instant,
    sent: &AtomicU64,
) -> ClientOutcome {
    let mut outcome = ClientOutcome::default();
    let mut sender = None;
    let mut order = 0u64;
    while Instant::now() < deadline {
        if sender.is_none() {
            sender = connect(proxy).await.ok();
        }
        let Some(connection) = sender.as_mut() else {
            outcome.errors += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        order += 1;
        // Every other request is a payment, which the fan-out route copies.
        let kind = if order % 2 == 0 { "payments" } else { "orders" };
        // Absolute-form request target, as an application with
        // http_proxy pointing at the proxy sends it.
        let request = Request::post(format!("http://{primary}/{kind}/{client}-{order}"))
            .header("host", primary.to_string())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(
                r#"{{"client":{client},"order":{order},"items":["tea","scone"]}}"#
            ))))
            .expect("the demo request is valid");
        let started = Instant::now();
        sent.fetch_add(1, Ordering::Relaxed);
        match send(connection, request).await {
            Ok(status) => {
                outcome.latencies.push(started.elapsed());
                *outcome.statuses.entry(status.as_u16()).or_default() += 1;
            }
            Err(_) => {
                outcome.errors += 1;
                sender = None;
            }
        }
    }
    outcome
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(proxy: SocketAddr) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(proxy).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

async fn send(sender: &mut Sender, request: Request<Full<Bytes>>) -> anyhow::Result<StatusCode> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    response.into_body().collect().await?;
    Ok(status)
}

// === demo services ===

async fn serve_primary() -> anyhow::Result<SocketAddr> {
    serve(|request: Request<Incoming>| async move {
        let path = request.uri().path().to_string();
        let _ = request.into_body().collect().await;
        Response::new(Full::new(Bytes::from(format!(
            r#"{{"accepted":"{path}","by":"primary"}}"#
        ))))
    })
    .await
}

async fn serve_secondary(state: Arc<Secondary>) -> anyhow::Result<SocketAddr> {
    serve(move |request: Request<Incoming>| {
        let state = Arc::clone(&state);
        async move {
            let mode = request
                .headers()
                .get(crate::config::DISPATCH_HEADER)
                .map(|value| value.as_bytes().to_vec());
            let _ = request.into_body().collect().await;
            if state.slow.load(Ordering::Relaxed) {
                tokio::time::sleep(SLOW_SECONDARY_DELAY).await;
            }
            match mode.as_deref() {
                Some(b"mirror") => state.mirror_copies.fetch_add(1, Ordering::Relaxed),
                Some(b"fanout") => state.fanout_copies.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
            Response::new(Full::new(Bytes::from_static(br#"{"by":"secondary"}"#)))
        }
    })
    .await
}

/// Serves HTTP/1.1 on an ephemeral loopback port with `handler`.
async fn serve<F, Fut>(handler: F) -> anyhow::Result<SocketAddr>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler(request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

// === output ===

fn print_summary(phases: &[PhaseReport]) {
    println!();
    println!(
        "  {:<24} {:>9} {:>13} {:>9} {:>9} {:>10} {:>10}",
        "phase", "requests", "primary 2xx", "p50", "p99", "mirror in", "fanout in"
    );
    for phase in phases {
        let ok: u64 = phase
            .statuses
            .iter()
            .filter(|(status, _)| (200..300).contains(*status))
            .map(|(_, count)| count)
            .sum();
        let other = phase.sent - ok;
        println!(
            "  {:<24} {:>9} {:>13} {:>9} {:>9} {:>10} {:>10}",
            phase.name,
            phase.sent,
            if other == 0 {
                ok.to_string()
            } else {
                format!("{ok} ({other} not)")
            },
            format_latency(percentile(&phase.latencies, 0.50)),
            format_latency(percentile(&phase.latencies, 0.99)),
            phase.mirror_received,
            phase.fanout_received,
        );
    }
}

/// One sample of the Prometheus text format: name, labels and value.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the demo proxy's `/metrics` text. Its label values contain no
/// commas or quotes: they are route names, modes, reasons and the demo
/// secondary's URL.
fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split(',')
            .filter_map(|pair| pair.split_once('='))
            .map(|(key, value)| (key.to_string(), value.trim_matches('"').to_string()))
            .collect();
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value: value.parse().unwrap_or(0.0),
        });
    }
    samples
}

/// Sums the samples of `name` whose labels include every pair in `filter`.
fn sum(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|sample| sample.name == name)
        .filter(|sample| {
            filter
                .iter()
                .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
        })
        .map(|sample| sample.value)
        .fold(0.0, |total, value| total + value)
}

/// Sums the samples of `name` per value of the label `by`.
fn sum_by(
    samples: &[Sample],
    name: &str,
    filter: &[(&str, &str)],
    by: &str,
) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for sample in samples.iter().filter(|sample| sample.name == name) {
        let matches = filter
            .iter()
            .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value));
        if matches {
            let key = sample.labels.get(by).cloned().unwrap_or_default();
            *sums.entry(key).or_default() += sample.value;
        }
    }
    sums
}

fn print_counts(label: &str, counts: &BTreeMap<String, f64>) {
    if counts.values().all(|count| *count == 0.0) {
        println!("    {label:<18} 0");
    }
    for (reason, count) in counts.iter().filter(|(_, count)| **count > 0.0) {
        println!("    {label:<18} {count} ({reason})");
    }
}

/// Prints the mirror counters: copies due, copies that got a response, and
/// copies shed by reason.
fn print_mirror_counters(samples: &[Sample]) {
    let mode = [("mode", "mirror")];
    println!();
    println!("  mirror (orders-shadow), from the proxy's /metrics");
    println!(
        "    {:<18} {}",
        "copies due",
        sum(samples, "tandem_dispatch_due_total", &mode)
    );
    let delivered = sum(samples, "tandem_requests_total", &[("role", "mirror")]);
    println!("    {:<18} {delivered}", "copies delivered");
    print_counts(
        "copies shed",
        &sum_by(samples, "tandem_dispatch_shed_total", &mode, "reason"),
    );
}

/// Prints the fan-out counters.
fn print_fanout_counters(samples: &[Sample]) {
    let mode = [("mode", "fanout")];
    let route = [("route", "payments-audit")];
    let due = sum(samples, "tandem_dispatch_due_total", &mode);
    let delivered = sum(samples, "tandem_requests_total", &[("role", "fanout")]);
    let retries = sum(samples, "tandem_fanout_retries_total", &route);
    let dead = sum_by(
        samples,
        "tandem_fanout_dead_lettered_total",
        &route,
        "reason",
    );
    let shed = sum_by(samples, "tandem_dispatch_shed_total", &mode, "reason");
    println!();
    println!("  fanout (payments-audit), from the proxy's /metrics");
    println!("    {:<18} {due}", "copies due");
    println!("    {:<18} {delivered}", "copies delivered");
    println!("    {:<18} {retries}", "retries");
    print_counts("dead-lettered", &dead);
    print_counts("copies shed", &shed);
    let accounted = delivered + dead.values().sum::<f64>() + shed.values().sum::<f64>();
    if accounted == due {
        println!("    every copy is accounted for: delivered + dead-lettered + shed = due");
    } else {
        println!("    {} copies are not settled yet", due - accounted);
    }
}

fn percentile(latencies: &[Duration], quantile: f64) -> Option<Duration> {
    if latencies.is_empty() {
        return None;
    }
    let mut sorted = latencies.to_vec();
    sorted.sort_unstable();
    let index = ((sorted.len() as f64 - 1.0) * quantile).round() as usize;
    Some(sorted[index])
}

fn format_latency(latency: Option<Duration>) -> String {
    match latency {
        Some(latency) => format!("{:.2}ms", latency.as_secs_f64() * 1000.0),
        None => "-".to_string(),
    }
}
