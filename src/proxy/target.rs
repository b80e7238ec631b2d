//! The routing step: where a request goes, which route it matched, and the
//! request-level limits and header clean-up that apply before forwarding.

use std::{
    collections::HashMap,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use http::{header, uri::Authority, HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::{
    body::LimitBody,
    client::{BoxBody, Proto},
    compare::CompareTarget,
    errors::ProxyError,
    fanout::FanoutRoute,
    headers::strip_hop_by_hop,
    metrics::{Metrics, NO_ROUTE},
    mirror::MirrorTarget,
};
use crate::{
    config::DISPATCH_HEADER,
    routes::{DispatchTag, RequestFacts, Route, RouteTable},
};

/// Facts about the client connection a request arrived on.
#[derive(Debug, Clone, Copy)]
pub struct ConnContext {
    /// The address the application dialled before iptables redirected the
    /// connection; `None` when the connection was not redirected.
    pub orig_dst: Option<SocketAddr>,
    pub peer: SocketAddr,
    /// Protocol of the client connection, also used upstream.
    pub proto: Proto,
}

/// Destination of the primary request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

/// Request extension set by the routing step for the forwarding step.
#[derive(Debug, Clone)]
pub struct Target {
    pub destination: Destination,
    /// The authority the application addressed, kept for the upstream
    /// request's Host or `:authority`.
    pub authority: Option<Authority>,
    pub proto: Proto,
}

/// Request extension: the route whose dispatch applies to this request.
#[derive(Clone)]
pub struct MatchedRoute {
    pub route: Arc<Route>,
    pub target: RouteTarget,
}

/// Copy targets of a route, by dispatch mode.
#[derive(Clone)]
pub enum RouteTarget {
    Mirror(Arc<MirrorTarget>),
    Compare(Arc<CompareTarget>),
    Fanout(Arc<FanoutRoute>),
}

/// Settings and state the routing step shares across connections.
pub struct Router {
    pub routes: RouteTable,
    /// The copy targets of every route, by route name.
    pub targets: HashMap<String, RouteTarget>,
    pub default_target: Option<Destination>,
    pub max_request_body_bytes: u64,
    pub listen: SocketAddr,
    pub metrics: Metrics,
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Tower layer that turns a client request into a routed one.
#[derive(Clone)]
pub struct RouteLayer {
    router: Arc<Router>,
}

#[derive(Clone)]
pub struct RouteService<S> {
    inner: S,
    router: Arc<Router>,
}

impl RouteLayer {
    pub fn new(router: Arc<Router>) -> Self {
        Self { router }
    }
}

impl<S> tower::Layer<S> for RouteLayer {
    type Service = RouteService<S>;

    fn layer(&self, inner: S) -> RouteService<S> {
        RouteService {
            inner,
            router: Arc::clone(&self.router),
        }
    }
}

impl<S> tower::Service<Request<Incoming>> for RouteService<S>
where
    S: tower::Service<
        Request<BoxBody>,
        Response = Response<BoxBody>,
        Error = ProxyError,
        Future = BoxFuture<Result<Response<BoxBody>, ProxyError>>,
    >,
{
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<BoxBody>, ProxyError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let router = Arc::clone(&self.router);
        let started = Instant::now();
        let routed = router.route(request);
        let (route, result) = match routed {
            Ok(request) => {
                let route = request
                    .extensions()
                    .get::<MatchedRoute>()
                    .map(|matched| Arc::clone(&matched.route));
                (route, Ok(self.inner.call(request)))
            }
            Err(error) => (None, Err(error)),
        };

        Box::pin(async move {
            let result = match result {
                Ok(future) => future.await,
                Err(error) => Err(error),
            };
            let status = match &result {
                Ok(response) => response.status(),
                Err(error) => error.status(),
            };
            let route_name = route.as_ref().map_or(NO_ROUTE, |route| route.name.as_str());
            router
                .metrics
                .record_response(route_name, "primary", status);
            router
                .metrics
                .latency(route_name, "primary")
                .observe(started.elapsed().as_secs_f64());
            result
        })
    }
}

// === impl Router ===

impl Router {
    /// Resolves the destination, enforces request limits, removes
    /// hop-by-hop and dispatch headers and matches routes.
    fn route(&self, request: Request<Incoming>) -> Result<Request<BoxBody>, ProxyError> {
        let ctx = *request
            .extensions()
            .get::<ConnContext>()
            .expect("the server inserts a connection context into every request");
        let (mut parts, body) = request.into_parts();

        let tag = parts
            .headers
            .remove(DISPATCH_HEADER)
            .and_then(|value| DispatchTag::parse(&value));
        strip_hop_by_hop(&mut parts.headers);
        // hyper sends `100 Continue` itself when the body is first read, so
        // the upstream must not be asked for a second one.
        parts.headers.remove(header::EXPECT);

        // RFC 9112 section 3.2.2: a proxy ignores the Host of an
        // absolute-form request and sends the target's authority instead,
        // the same one that routing matches on.
        if ctx.proto == Proto::Http1 {
            if let Some(authority) = parts.uri.authority() {
                parts.headers.insert(header::HOST, host_header(authority));
            }
        }
        let authority = request_authority(&parts.uri, &parts.headers);
        let destination = self.destination(&ctx, &parts.uri, authority.as_ref())?;

        if let Some(len) = content_length(&parts.headers) {
            if len > self.max_request_body_bytes {
                return Err(ProxyError::BodyTooLarge {
                    limit: self.max_request_body_bytes,
                });
            }
        }

        let matched = if self.routes.is_empty() {
            None
        } else {
            let host = authority
                .as_ref()
                .map(|a| a.host().to_ascii_lowercase())
                .unwrap_or_default();
            let port = authority
                .as_ref()
                .and_then(Authority::port_u16)
                .or_else(|| ctx.orig_dst.map(|dst| dst.port()))
                .or(Some(80));
            let facts = RequestFacts {
                host: host.trim_start_matches('[').trim_end_matches(']'),
                port,
                path: parts.uri.path(),
                method: &parts.method,
                headers: &parts.headers,
                tag,
            };
            self.routes.find(&facts).map(|route| MatchedRoute {
                route: Arc::clone(route),
                target: self.targets[&route.name].clone(),
            })
        };
        if let Some(matched) = matched {
            parts.extensions.insert(matched);
        }
        parts.extensions.insert(Target {
            destination,
            authority,
            proto: ctx.proto,
        });

        let body = LimitBody::new(body, self.max_request_body_bytes).boxed_unsync();
        Ok(Request::from_parts(parts, body))
    }

    /// Picks the destination: the original destination of a redirected
    /// connection, then the authority of an absolute-form (HTTP/1.1) or
    /// HTTP/2 request unless it names this proxy, then the default target.
    pub(crate) fn destination(
        &self,
        ctx: &ConnContext,
        uri: &http::Uri,
        authority: Option<&Authority>,
    ) -> Result<Destination, ProxyError> {
        if let Some(dst) = ctx.orig_dst {
            return dst_or_loop(dst, self.listen);
        }
        let explicit = uri.scheme().is_some() && uri.authority().is_some();
        if explicit {
            let authority = authority.expect("an absolute URI has an authority");
            let destination = destination_of(authority, uri.scheme_str())?;
            if !self.names_listener(&destination) {
                return Ok(destination);
            }
        }
        match &self.default_target {
            Some(destination) => Ok(destination.clone()),
            None => Err(ProxyError::NoDestination),
        }
    }

    fn names_listener(&self, destination: &Destination) -> bool {
        match destination {
            Destination::Addr(addr) => *addr == self.listen,
            Destination::Name { host, port } => {
                *port == self.listen.port() && host.eq_ignore_ascii_case("localhost")
            }
        }
    }
}

fn dst_or_loop(dst: SocketAddr, listen: SocketAddr) -> Result<Destination, ProxyError> {
    if dst == listen {
        return Err(ProxyError::Loop(dst));
    }
    Ok(Destination::Addr(dst))
}

/// Parses `host:port` or a bare host into a destination.
pub fn destination_of(
    authority: &Authority,
    scheme: Option<&str>,
) -> Result<Destination, ProxyError> {
    let default_port = if scheme == Some("https") { 443 } else { 80 };
    let port = authority.port_u16().unwrap_or(default_port);
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(ProxyError::InvalidAuthority(authority.to_string()));
    }
    Ok(match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Destination::Addr(SocketAddr::new(ip, port)),
        Err(_) => Destination::Name {
            host: host.to_string(),
            port,
        },
    })
}

/// Returns `host[:port]` of an authority, without any userinfo.
pub(crate) fn host_header(authority: &Authority) -> HeaderValue {
    let host = match authority.port() {
        Some(port) => format!("{}:{port}", authority.host()),
        None => authority.host().to_string(),
    };
    HeaderValue::from_str(&host)
        .expect("the host and port of an authority are a valid header value")
}

fn request_authority(uri: &http::Uri, headers: &HeaderMap) -> Option<Authority> {
    if let Some(authority) = uri.authority() {
        return Some(authority.clone());
    }
    headers
        .get(header::HOST)
        .and_then(|host| Authority::try_from(host.as_bytes()).ok())
}

/// Returns the declared `Content-Length`, or `None` when it is missing or
/// not a number.
pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
