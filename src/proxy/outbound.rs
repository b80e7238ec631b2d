//! The outbound side: a connection the application opened (redirected by
//! iptables or addressed to the proxy), served as HTTP or passed through
//! as opaque TCP.

use std::{
    convert::Infallible,
    net::SocketAddr,
    pin::pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use http::{Method, Request, Response};
use hyper::{body::Incoming, server::conn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, sync::watch};
use tower::ServiceExt;

use super::{
    client::{BoxBody, Client, Proto},
    detect::{detect, PrefixedIo, Protocol},
    errors::{ProxyError, Side},
    forward::{resolve, Forward},
    headers::is_upgrade,
    metrics::NO_ROUTE,
    mirror::{Dispatcher, Mirror, MirrorLayer},
    target::{ConnContext, RouteLayer, RouteService, Router},
    tunnel,
};
use crate::config::OutboundConfig;

/// The HTTP request stack, outermost step first.
type Stack = RouteService<Mirror<Forward>>;

pub struct Outbound {
    config: OutboundConfig,
    router: Arc<Router>,
    client: Client,
    stack: Stack,
}

impl Outbound {
    pub fn new(
        config: OutboundConfig,
        router: Arc<Router>,
        client: Client,
        dispatcher: Arc<Dispatcher>,
    ) -> Self {
        let stack = tower::ServiceBuilder::new()
            // Resolves the destination and route, strips hop-by-hop and
            // dispatch headers, enforces the body limit and records the
            // primary request's metrics.
            .layer(RouteLayer::new(Arc::clone(&router)))
            // Tees the body of a matched request to its secondary. It runs
            // after routing, so requests the proxy rejects are never copied.
            .layer(MirrorLayer::new(dispatcher))
            .service(Forward::new(client.clone(), router.listen));
        Self {
            config,
            router,
            client,
            stack,
        }
    }

    /// Serves one accepted connection until it closes, or until `drain`
    /// fires and its in-flight requests finish.
    pub async fn serve_connection(
        self: Arc<Self>,
        mut stream: TcpStream,
        peer: SocketAddr,
        drain: watch::Receiver<bool>,
    ) {
        let orig_dst = original_dst(&stream);
        let (protocol, prefix) = match detect(&mut stream, self.config.detect_timeout).await {
            Ok(detected) => detected,
            Err(error) => {
                tracing::debug!(%error, %peer, "connection failed before its protocol was known");
                return;
            }
        };
        let _open = self.router.metrics.connection_opened(protocol.as_str());
        let io = PrefixedIo::new(prefix, stream);

        let proto = match protocol {
            Protocol::Http1 => Proto::Http1,
            Protocol::Http2 => Proto::Http2,
            Protocol::Opaque => return self.serve_opaque(io, orig_dst, peer).await,
        };
        let ctx = ConnContext {
            orig_dst,
            peer,
            proto,
        };
        let activity = Arc::new(Activity::default());
        let service = {
            let this = Arc::clone(&self);
            let activity = Arc::clone(&activity);
            hyper::service::service_fn(move |request| {
                let this = Arc::clone(&this);
                let activity = Arc::clone(&activity);
                async move {
                    activity.start();
                    let response = this.handle(ctx, request).await;
                    activity.finish();
                    Ok::<_, Infallible>(response)
                }
            })
        };

        let io = TokioIo::new(io);
        match proto {
            Proto::Http1 => {
                let connection = conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(self.config.header_read_timeout)
                    .max_header_size(self.config.max_request_header_bytes)
                    .serve_connection(io, service)
                    .with_upgrades();
                self.drive(connection, &activity, drain, peer).await;
            }
            Proto::Http2 => {
                let connection = conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_header_list_size(self.config.max_request_header_bytes as u32)
                    .serve_connection(io, service);
                self.drive(connection, &activity, drain, peer).await;
            }
        }
    }

    /// Runs a connection to its end, shutting it down gracefully when the
    /// proxy drains or the connection stays idle past the idle timeout.
    async fn drive<C>(
        &self,
        connection: C,
        activity: &Activity,
        mut drain: watch::Receiver<bool>,
        peer: SocketAddr,
    ) where
        C: GracefulConnection,
    {
        let idle_timeout = self.config.idle_timeout;
        let mut connection = pin!(connection);
        // Idle connections are found within a quarter of the timeout.
        let period = (idle_timeout / 4).max(std::time::Duration::from_millis(1));
        let mut check = tokio::time::interval(period);
        let mut closing = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, %peer, "client connection closed with an error");
                    }
                    return;
                }
                _ = drain.changed(), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                _ = check.tick(), if !closing => {
                    if activity.idle_for() >= Some(idle_timeout) {
                        tracing::debug!(%peer, "closing idle client connection");
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        }
    }

    async fn serve_opaque(
        &self,
        io: PrefixedIo<TcpStream>,
        orig_dst: Option<SocketAddr>,
        peer: SocketAddr,
    ) {
        let dst = match (orig_dst, &self.router.default_target) {
            (Some(dst), _) => dst,
            (None, Some(target)) => match resolve(target).await {
                Ok(addr) => addr,
                Err(error) => {
                    tracing::info!(%error, %peer, "opaque connection has no reachable destination");
                    return;
                }
            },
            (None, None) => {
                tracing::info!(%peer, "closing non-HTTP connection without an original destination");
                return;
            }
        };
        if dst == self.router.listen {
            tracing::info!(%peer, %dst, "closing opaque connection that would loop to the proxy");
            return;
        }
        tunnel::forward_opaque(io, dst, self.config.connect_timeout).await;
    }

    async fn handle(&self, ctx: ConnContext, mut request: Request<Incoming>) -> Response<BoxBody> {
        request.extensions_mut().insert(ctx);
        let connect_timeout = self.client.connect_timeout();
        let tunnelled = request.method() == Method::CONNECT
            || (ctx.proto == Proto::Http1 && is_upgrade(request.headers()));

        let result = if request.method() == Method::CONNECT {
            tunnel::connect(&self.router, connect_timeout, request).await
        } else if tunnelled {
            tunnel::upgrade(&self.router, &ctx, connect_timeout, request).await
        } else {
            self.stack.clone().oneshot(request).await
        };

        let response = match result {
            Ok(response) => response,
            Err(error) => self.rescue(&ctx, error),
        };
        if tunnelled {
            self.router
                .metrics
                .record_response(NO_ROUTE, "primary", response.status());
        }
        response
    }

    /// Turns a failed primary request into the proxy's own error response.
    fn rescue(&self, ctx: &ConnContext, error: ProxyError) -> Response<BoxBody> {
        let status = error.status();
        match error.side() {
            Side::Client => {
                tracing::debug!(%error, peer = %ctx.peer, %status, "rejected request")
            }
            Side::Upstream | Side::Proxy => {
                tracing::info!(%error, peer = %ctx.peer, %status, "request failed")
            }
        }
        self.router.metrics.record_proxy_error(error.error_type());
        error.to_response()
    }
}

/// Requests in flight on one client connection, and since when it is idle.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Option<Instant>>,
}

impl Activity {
    fn start(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    fn finish(&self) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            *self
                .idle_since
                .lock()
                .expect("activity lock is never poisoned") = Some(Instant::now());
        }
    }

    /// Returns how long the connection has had no request in flight, or
    /// `None` while one is. A connection that never had a request counts as
    /// idle from the first check.
    fn idle_for(&self) -> Option<std::time::Duration> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let mut since = self
            .idle_since
            .lock()
            .expect("activity lock is never poisoned");
        Some(since.get_or_insert_with(Instant::now).elapsed())
    }
}

/// Reads the destination a connection had before an iptables REDIRECT sent
/// it here (`SO_ORIGINAL_DST`). Returns `None` for a connection that was not
/// redirected: without conntrack the call fails, and with it the kernel
/// reports the socket's own local address.
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let local = stream.local_addr().ok()?;
    // A dual-stack listener (`[::]`) accepts IPv4 connections with an
    // IPv4-mapped local address, and conntrack tracks those as IPv4.
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    let socket = socket2::SockRef::from(stream);
    let dst = if local.is_ipv4() {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    };
    let dst = dst.ok()?.as_socket()?;
    (dst != local).then_some(dst)
}

/// A hyper server connection that can finish its in-flight requests and
/// then close.
trait GracefulConnection: std::future::Future<Output = Result<(), hyper::Error>> {
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S> GracefulConnection for conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = BoxBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        conn::http1::UpgradeableConnection::graceful_shutdown(self)
    }
}

impl<I, S, E> GracefulConnection for conn::http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = BoxBody>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, BoxBody>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        conn::http2::Connection::graceful_shutdown(self)
    }
}
