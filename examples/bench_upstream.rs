//! HTTP/1.1 upstream for the load benchmarks in `benches/load/`.
//!
//! It serves as both the primary API and the secondary that receives
//! copies. Every request gets `200 OK` with a short body, optionally after
//! `--delay` milliseconds. `GET /__count` returns the number of requests
//! received so far as plain text and is not counted itself. The same
//! response carries a `dispatch-header-count` header with the number of
//! those requests that had a `tandem-dispatch` header.
//!
//! With `--mode blackhole` the server accepts TCP connections and then
//! neither reads nor writes, so a client waits until its own timeout. In
//! that mode nothing is counted and `/__count` is not served.
//!
//! ```text
//! cargo build --release --example bench_upstream
//! target/release/examples/bench_upstream --listen 127.0.0.1:9090 --delay 1000
//! ```

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::Full;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

const COUNT_PATH: &str = "/__count";
const DISPATCH_HEADER: &str = "tandem-dispatch";
const RESPONSE_BODY: &[u8] = b"ok\n";

#[derive(Parser, Debug)]
#[command(about = "HTTP/1.1 upstream for tandem's load benchmarks")]
struct Args {
    /// Address to listen on, for example 127.0.0.1:9090.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Time to wait before responding to each request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay: u64,

    /// `normal` responds to requests. `blackhole` accepts connections and
    /// never reads from or writes to them.
    #[arg(long, value_enum, default_value_t = Mode::Normal)]
    mode: Mode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Normal,
    Blackhole,
}

/// Request counters shared by all connections.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    with_dispatch_header: AtomicU64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await.map_err(|error| {
        std::io::Error::new(
            error.kind(),
            format!("failed to listen on {}: {error}", args.listen),
        )
    })?;
    eprintln!(
        "bench_upstream listening on {} (mode {:?}, delay {} ms)",
        listener.local_addr()?,
        args.mode,
        args.delay
    );

    match args.mode {
        Mode::Normal => serve(listener, Duration::from_millis(args.delay)).await,
        Mode::Blackhole => blackhole(listener).await,
    }
}

async fn serve(listener: TcpListener, delay: Duration) -> std::io::Result<()> {
    let counters = Arc::new(Counters::default());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Running out of file descriptors is transient under load, so
                // the server keeps accepting instead of exiting.
                eprintln!("accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(stream, delay, counters.clone()));
    }
}

async fn serve_connection(stream: TcpStream, delay: Duration, counters: Arc<Counters>) {
    let service = service_fn(move |request| {
        let counters = counters.clone();
        async move { Ok::<_, Infallible>(respond(request, delay, &counters).await) }
    });
    // Clients resetting their connections at the end of a run is normal, so
    // connection errors are not reported.
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

async fn respond(
    request: Request<Incoming>,
    delay: Duration,
    counters: &Counters,
) -> Response<Full<Bytes>> {
    if request.uri().path() == COUNT_PATH {
        let requests = counters.requests.load(Ordering::Relaxed);
        let tagged = counters.with_dispatch_header.load(Ordering::Relaxed);
        return Response::builder()
            .header("content-type", "text/plain")
            .header("dispatch-header-count", tagged)
            .body(Full::new(Bytes::from(format!("{requests}\n"))))
            .expect("static response parts are valid");
    }

    // Count on arrival, so a copy that reaches a slow secondary is counted
    // even when the proxy gives up on it before the response.
    counters.requests.fetch_add(1, Ordering::Relaxed);
    if request.headers().contains_key(DISPATCH_HEADER) {
        counters
            .with_dispatch_header
            .fetch_add(1, Ordering::Relaxed);
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    Response::new(Full::new(Bytes::from_static(RESPONSE_BODY)))
}

/// Accepts connections and keeps them open without reading, until the
/// process exits.
async fn blackhole(listener: TcpListener) -> std::io::Result<()> {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(async move {
                    let _connection = stream;
                    std::future::pending::<()>().await;
                });
            }
            Err(error) => {
                eprintln!("accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
