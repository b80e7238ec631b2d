//! Binds the listeners, builds the outbound stack and drains on shutdown.

pub mod backoff;
pub mod body;
pub mod circuit;
pub mod client;
pub mod compare;
pub mod detect;
pub mod errors;
pub mod fanout;
pub mod forward;
pub mod headers;
pub mod metrics;
pub mod mirror;
pub mod outbound;
pub mod retry;
pub mod secondary;
pub mod target;
pub mod tunnel;

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_util::task::TaskTracker;

use self::{
    client::Client,
    compare::CompareTarget,
    fanout::Fanout,
    metrics::Metrics,
    mirror::{Dispatcher, MirrorTarget},
    outbound::Outbound,
    target::{destination_of, RouteTarget, Router},
};
use crate::{
    admin,
    config::Config,
    readiness::Readiness,
    routes::{Mode, RouteTable},
    spool::SpoolError,
};

/// Read buffer of connections to secondaries, whose responses are read only
/// to be discarded: large enough for a typical response head in one read.
const COPY_READ_BUFFER_BYTES: usize = 4096;

/// A running proxy: its bound addresses and the handle that stops it.
pub struct Proxy {
    outbound_addr: SocketAddr,
    admin_addr: SocketAddr,
    metrics: Metrics,
    drain: watch::Sender<bool>,
    connections: TaskTracker,
    copies: TaskTracker,
    fanout: Fanout,
    accept: JoinHandle<()>,
    admin: JoinHandle<()>,
    drain_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("failed to bind {name} listener on {addr}: {source}")]
    Bind {
        name: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid outbound.default_target {0:?}")]
    DefaultTarget(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("failed to open the dead-letter spool: {0}")]
    Spool(#[from] SpoolError),
}

/// Binds the listeners and starts serving. Returns once both listeners are
/// bound, so the addresses are ready for clients.
pub async fn start(config: Config) -> Result<Proxy, StartError> {
    let outbound_listener = bind("outbound", config.outbound.listen).await?;
    let admin_listener = bind("admin", config.admin.listen).await?;
    let outbound_addr = outbound_listener
        .local_addr()
        .expect("a bound listener has an address");
    let admin_addr = admin_listener
        .local_addr()
        .expect("a bound listener has an address");

    let metrics = Metrics::new();
    let tls = client::tls_config(&config.tls.secondary_roots()?);
    let client = Client::new(config.outbound.connect_timeout, &tls);
    let connections = TaskTracker::new();
    let copies = TaskTracker::new();
    let (drain, drain_rx) = watch::channel(false);

    // Copies have a pool of their own, so a slow secondary never takes
    // connections or buffers from the primary path. Fanout copies use it
    // too.
    let copy_client = Client::with_read_buffer(
        config.outbound.connect_timeout,
        &tls,
        COPY_READ_BUFFER_BYTES,
    );
    let readiness = Readiness::new();

    let routes = RouteTable::new(&config.routes);
    let (fanout, mut fanout_routes) = Fanout::start(&routes, &copy_client, &metrics, &readiness)?;
    let targets: HashMap<String, RouteTarget> = routes
        .iter()
        .map(|route| {
            let target = match route.mode() {
                Mode::Mirror => {
                    RouteTarget::Mirror(Arc::new(MirrorTarget::new(Arc::clone(route), &metrics)))
                }
                Mode::Compare => {
                    let copy = Arc::new(MirrorTarget::new(Arc::clone(route), &metrics));
                    RouteTarget::Compare(Arc::new(CompareTarget::new(route, copy, &metrics)))
                }
                Mode::Fanout => RouteTarget::Fanout(
                    fanout_routes
                        .remove(&route.name)
                        .expect("every fanout route has fanout state"),
                ),
            };
            (route.name.clone(), target)
        })
        .collect();
    let default_target = match &config.outbound.default_target {
        Some(target) => {
            let authority = target
                .parse()
                .map_err(|_| StartError::DefaultTarget(target.clone()))?;
            Some(
                destination_of(&authority, None)
                    .map_err(|_| StartError::DefaultTarget(target.clone()))?,
            )
        }
        None => None,
    };
    let router = Arc::new(Router {
        routes,
        targets,
        default_target,
        max_request_body_bytes: config.outbound.max_request_body_bytes,
        listen: outbound_addr,
        metrics: metrics.clone(),
    });
    let dispatcher = Arc::new(Dispatcher::new(
        copy_client,
        metrics.clone(),
        copies.clone(),
    ));
    let outbound = Arc::new(Outbound::new(
        config.outbound.clone(),
        router,
        client,
        dispatcher,
    ));

    tracing::info!(listener = "outbound", addr = %outbound_addr, "listening");
    tracing::info!(listener = "admin", addr = %admin_addr, "listening");

    let accept = tokio::spawn(accept_loop(
        outbound_listener,
        outbound,
        connections.clone(),
        drain_rx.clone(),
    ));
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        admin::State::new(metrics.clone(), config.clone()).with_readiness(readiness),
        drain_rx,
    ));

    Ok(Proxy {
        outbound_addr,
        admin_addr,
        metrics,
        drain,
        connections,
        copies,
        fanout,
        accept,
        admin,
        drain_timeout: config.drain_timeout,
    })
}

async fn bind(name: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { name, addr, source })
}

async fn accept_loop(
    listener: TcpListener,
    outbound: Arc<Outbound>,
    connections: TaskTracker,
    mut drain: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let outbound = Arc::clone(&outbound);
                connections.spawn(outbound.serve_connection(stream, peer, drain.clone()));
            }
            Err(error) => {
                // Running out of file descriptors must not spin the loop.
                tracing::warn!(%error, "failed to accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Proxy {
    pub fn outbound_addr(&self) -> SocketAddr {
        self.outbound_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops accepting, lets in-flight requests and copies finish until the
    /// drain timeout, then stops. Fanout copies still queued or in flight
    /// then are written to the dead-letter spool. Returns true when
    /// everything finished in time.
    pub async fn shutdown(self) -> bool {
        tracing::info!(timeout = ?self.drain_timeout, "draining");
        let _ = self.drain.send(true);
        self.connections.close();
        self.copies.close();
        let drained = tokio::time::timeout(self.drain_timeout, async {
            let _ = self.accept.await;
            self.connections.wait().await;
            self.copies.wait().await;
            self.fanout.settled().await;
        })
        .await
        .is_ok();
        self.fanout.shutdown().await;
        self.admin.abort();
        if drained {
            tracing::info!("drained");
        } else {
            tracing::warn!("drain timeout passed with requests or copies still in flight");
        }
        drained
    }
}
