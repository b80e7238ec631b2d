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
const SLOW_SECONDARY_DELAY: Duration = Duration::from_millis(1500);

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
    copies_received: u64,
}

/// Counts the copies a demo service received.
#[derive(Default)]
struct Secondary {
    copies: AtomicU64,
    slow: AtomicBool,
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let primary_addr = serve_primary().await?;
    let secondary = Arc::new(Secondary::default());
    let secondary_addr = serve_secondary(Arc::clone(&secondary)).await?;

    let config = demo_config(secondary_addr)?;
    let proxy = crate::proxy::start(config).await?;
    let outbound = proxy.outbound_addr();
    let admin = proxy.admin_addr();

    println!("tandem demo");
    println!("  primary service    http://{primary_addr}");
    println!("  secondary service  http://{secondary_addr}  (receives the copies)");
    println!("  proxy outbound     http://{outbound}  (clients use it as http_proxy)");
    println!("  route              orders-shadow: POST /orders/* mirrored at 100%, 1s timeout");
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
        "slow secondary (1.5s)",
        primary_addr,
        outbound,
        phase_time,
        &secondary,
    )
    .await?;
    // Copies still in flight to the slow secondary settle within the route
    // timeout; waiting for it makes the shed counts final.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    print_summary(&[healthy, slow]);
    print_dispatch_metrics(&proxy.metrics().encode());
    println!();
    println!("  metrics            http://{admin}/metrics");

    if options.keep_running {
        println!("  the proxy keeps running; press Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    }
    proxy.shutdown().await;
    Ok(())
}

fn demo_config(secondary: SocketAddr) -> anyhow::Result<Config> {
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
"#
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
    let copies_before = secondary.copies.load(Ordering::Relaxed);
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
        copies_received: 0,
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
    report.copies_received = secondary.copies.load(Ordering::Relaxed) - copies_before;
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
        // Absolute-form request target, as an application with
        // http_proxy pointing at the proxy sends it.
        let request = Request::post(format!("http://{primary}/orders/{client}-{order}"))
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
            let is_copy = request
                .headers()
                .contains_key(crate::config::DISPATCH_HEADER);
            let _ = request.into_body().collect().await;
            if state.slow.load(Ordering::Relaxed) {
                tokio::time::sleep(SLOW_SECONDARY_DELAY).await;
            }
            if is_copy {
                state.copies.fetch_add(1, Ordering::Relaxed);
            }
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
        "  {:<24} {:>9} {:>13} {:>9} {:>9} {:>11}",
        "phase", "requests", "primary 2xx", "p50", "p99", "copies in"
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
            "  {:<24} {:>9} {:>13} {:>9} {:>9} {:>11}",
            phase.name,
            phase.sent,
            if other == 0 {
                ok.to_string()
            } else {
                format!("{ok} ({other} not)")
            },
            format_latency(percentile(&phase.latencies, 0.50)),
            format_latency(percentile(&phase.latencies, 0.99)),
            phase.copies_received,
        );
    }
}

/// Prints the proxy's own dispatch counters: copies due, copies that got a
/// response, and copies shed by reason.
fn print_dispatch_metrics(text: &str) {
    println!();
    println!("  proxy dispatch counters (from /metrics)");
    let mut due = 0.0;
    let mut answered = 0.0;
    let mut shed = BTreeMap::<String, f64>::new();
    for line in text.lines().filter(|line| !line.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let value: f64 = value.parse().unwrap_or(0.0);
        if series.starts_with("tandem_dispatch_due_total") {
            due += value;
        } else if series.starts_with("tandem_requests_total") && series.contains("role=\"mirror\"")
        {
            answered += value;
        } else if let Some(rest) = series.strip_prefix("tandem_dispatch_shed_total") {
            let reason = rest
                .split("reason=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("unknown");
            *shed.entry(reason.to_string()).or_default() += value;
        }
    }
    println!("    copies due        {due}");
    println!("    copies answered   {answered}");
    if shed.is_empty() {
        println!("    copies shed       0");
    }
    for (reason, count) in &shed {
        println!("    copies shed       {count} ({reason})");
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
