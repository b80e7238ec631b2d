//! The mirror tee: copies a matched request to its route's secondary
//! without ever altering or delaying the primary request.
//!
//! [`MirrorLayer`] sits after routing and before the upstream client. A
//! request that matched a mirror route and was sampled takes an in-flight
//! slot, or its copy is shed. The layer clones the head and wraps the body in
//! a [`TeeBody`], which keeps a capped copy of each frame as the primary
//! upstream reads it. When the body ends complete, the copy is sent from a
//! task of its own, so neither the client connection nor the primary
//! response waits for the secondary.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode, Uri, Version};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use prometheus::IntGauge;
use rustls::pki_types::ServerName;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use super::{
    backoff::ConnectBackoff,
    body::BufferedBody,
    client::{BoxBody, BoxError, Client, Endpoint, Proto},
    forward::upstream_uri,
    metrics::{Metrics, ShedReason},
    target::MatchedRoute,
};
use crate::{config::DISPATCH_HEADER, routes::Route};

/// Resolved secondary addresses are reused for this long, so a copy does
/// not pay a DNS lookup, while a changed record is still picked up soon.
const RESOLVE_TTL: Duration = Duration::from_secs(5);

/// Sends copies for every mirror route. Shared by all connections.
pub struct Dispatcher {
    client: Client,
    metrics: Metrics,
    tasks: TaskTracker,
}

/// Per-route mirror state: where copies go and how many may be in flight.
pub struct MirrorTarget {
    route: Arc<Route>,
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    host: String,
    port: u16,
    path_prefix: String,
    tls: Option<ServerName<'static>>,
    permits: Arc<Semaphore>,
    in_flight: IntGauge,
    resolved: Mutex<Option<(Vec<std::net::SocketAddr>, Instant)>>,
    backoff: ConnectBackoff,
}

/// The parts of the primary request that a copy repeats.
struct CopyHead {
    method: Method,
    path_and_query: String,
    version: Version,
    headers: HeaderMap,
    /// The authority the application addressed, for `preserve_host`.
    authority: Option<http::uri::Authority>,
    had_content_length: bool,
}

// === impl Dispatcher ===

impl Dispatcher {
    pub fn new(client: Client, metrics: Metrics, tasks: TaskTracker) -> Self {
        Self {
            client,
            metrics,
            tasks,
        }
    }

    /// Starts a copy of `request` when it matched a mirror route and was
    /// sampled, and returns the request with a teeing body. The request is
    /// otherwise unchanged.
    fn tee(&self, request: Request<BoxBody>) -> Request<BoxBody> {
        let Some(MatchedRoute { route, mirror, .. }) = request.extensions().get::<MatchedRoute>()
        else {
            return request;
        };
        let target = Arc::clone(mirror);
        let route_name = route.name.as_str();
        let mode = route.mode().as_str();
        if !sampled(target.route.mirror.percent, request.headers()) {
            return request;
        }

        self.metrics.record_due(route_name, mode);
        let limit = target.route.mirror.max_body_bytes;
        if content_length(request.headers()).is_some_and(|len| len > limit as u64) {
            self.metrics
                .record_shed(route_name, mode, ShedReason::BodyTooLarge);
            return request;
        }
        if target.backoff.is_backing_off(Instant::now()) {
            self.metrics
                .record_shed(route_name, mode, ShedReason::Unavailable);
            return request;
        }
        let Ok(permit) = Arc::clone(&target.permits).try_acquire_owned() else {
            self.metrics
                .record_shed(route_name, mode, ShedReason::Overloaded);
            return request;
        };

        let slot = CopySlot::new(Arc::clone(&target), self.metrics.clone(), permit);
        let head = CopyHead {
            method: request.method().clone(),
            path_and_query: request
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_string(), |pq| pq.as_str().to_string()),
            version: request.version(),
            headers: request.headers().clone(),
            authority: request.uri().authority().cloned(),
            had_content_length: request.headers().contains_key(header::CONTENT_LENGTH),
        };
        let pending = PendingCopy {
            head,
            chunks: Vec::new(),
            len: 0,
            limit,
            trailers: None,
            slot,
            client: self.client.clone(),
            tasks: self.tasks.clone(),
        };

        if request.body().is_end_stream() {
            pending.send();
            return request;
        }
        request.map(|body| {
            TeeBody {
                inner: body,
                copy: Some(pending),
            }
            .boxed_unsync()
        })
    }
}

// === impl MirrorTarget ===

impl MirrorTarget {
    /// Builds the target of a validated mirror route.
    pub fn new(route: Arc<Route>, metrics: &Metrics) -> Self {
        let uri: Uri = route
            .mirror
            .to
            .parse()
            .expect("validated mirror URL parses");
        let scheme = uri
            .scheme()
            .cloned()
            .expect("validated mirror URL has a scheme");
        let authority = uri
            .authority()
            .cloned()
            .expect("validated mirror URL has an authority");
        let tls = (scheme == http::uri::Scheme::HTTPS).then(|| {
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            ServerName::try_from(host.to_string()).expect("validated mirror host is a server name")
        });
        let port = authority
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        let path_prefix = uri.path().trim_end_matches('/').to_string();
        let in_flight = metrics.in_flight(&route.name, route.mode().as_str());
        Self {
            permits: Arc::new(Semaphore::new(route.mirror.max_in_flight)),
            host: authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            route,
            scheme,
            authority,
            port,
            path_prefix,
            tls,
            in_flight,
            resolved: Mutex::new(None),
            backoff: ConnectBackoff::default(),
        }
    }

    async fn resolve(&self) -> Result<std::net::SocketAddr, ShedReason> {
        if let Ok(ip) = self.host.parse::<std::net::IpAddr>() {
            return Ok((ip, self.port).into());
        }
        {
            let cached = self
                .resolved
                .lock()
                .expect("resolve cache lock is never poisoned");
            if let Some((addrs, at)) = cached.as_ref() {
                if at.elapsed() < RESOLVE_TTL && !addrs.is_empty() {
                    return Ok(addrs[rand::random_range(0..addrs.len())]);
                }
            }
        }
        let addrs: Vec<_> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|error| {
                tracing::debug!(%error, host = %self.host, "failed to resolve the secondary");
                ShedReason::ConnectFailed
            })?
            .collect();
        let first = *addrs.first().ok_or(ShedReason::ConnectFailed)?;
        *self
            .resolved
            .lock()
            .expect("resolve cache lock is never poisoned") = Some((addrs, Instant::now()));
        Ok(first)
    }

    fn build_request(&self, head: CopyHead, body: BufferedBody) -> Request<BoxBody> {
        let proto = proto_for(head.version);
        let path_and_query = format!("{}{}", self.path_prefix, head.path_and_query);
        let mut headers = head.headers;

        if !self.route.mirror.preserve_host || !headers.contains_key(header::HOST) {
            headers.remove(header::HOST);
            if proto == Proto::Http1 {
                let host = HeaderValue::from_str(self.authority.as_str())
                    .expect("an authority is a valid header value");
                headers.insert(header::HOST, host);
            }
        }
        let authority = match (&proto, self.route.mirror.preserve_host) {
            (Proto::Http2, true) => head.authority.unwrap_or_else(|| self.authority.clone()),
            _ => self.authority.clone(),
        };

        // The copy is framed by the body it carries, whatever the original
        // framing was: an exact length when it has no trailers, chunked
        // otherwise (HTTP/1.1 sends trailers only in chunked framing).
        headers.remove(header::TRANSFER_ENCODING);
        headers.remove(header::CONTENT_LENGTH);
        let had_length = head.had_content_length;
        if !body.has_trailers() && (!body.is_empty() || had_length) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        headers.insert(DISPATCH_HEADER, HeaderValue::from_static("mirror"));

        let uri = upstream_uri(proto, &self.scheme, &authority, &path_and_query);
        let mut request = Request::new(body.boxed_unsync());
        *request.method_mut() = head.method;
        *request.uri_mut() = uri;
        *request.version_mut() = match proto {
            Proto::Http1 => Version::HTTP_11,
            Proto::Http2 => Version::HTTP_2,
        };
        *request.headers_mut() = headers;
        request
    }
}

fn proto_for(version: Version) -> Proto {
    if version == Version::HTTP_2 {
        Proto::Http2
    } else {
        Proto::Http1
    }
}

// === copies ===

/// A copy that owns an in-flight slot. It records exactly one outcome: a
/// response or a shed reason. Dropped unsettled, it records `on_drop`.
struct CopySlot {
    target: Arc<MirrorTarget>,
    metrics: Metrics,
    _permit: OwnedSemaphorePermit,
    on_drop: Option<ShedReason>,
}

impl CopySlot {
    fn new(target: Arc<MirrorTarget>, metrics: Metrics, permit: OwnedSemaphorePermit) -> Self {
        target.in_flight.inc();
        Self {
            target,
            metrics,
            _permit: permit,
            on_drop: Some(ShedReason::BodyIncomplete),
        }
    }

    fn route(&self) -> &str {
        &self.target.route.name
    }

    fn shed(mut self, reason: ShedReason) {
        self.on_drop = Some(reason);
    }

    fn delivered(mut self, status: StatusCode) {
        self.on_drop = None;
        let route = self.target.route.name.as_str();
        self.metrics.record_response(route, "mirror", status);
    }
}

impl Drop for CopySlot {
    fn drop(&mut self) {
        self.target.in_flight.dec();
        if let Some(reason) = self.on_drop {
            let route = &self.target.route;
            self.metrics
                .record_shed(&route.name, route.mode().as_str(), reason);
        }
    }
}

/// A copy whose body is still being read from the client.
struct PendingCopy {
    head: CopyHead,
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    trailers: Option<HeaderMap>,
    slot: CopySlot,
    client: Client,
    tasks: TaskTracker,
}

impl PendingCopy {
    /// Keeps a reference to the frame's data. Returns false when the body
    /// has grown past the limit and the copy was shed.
    fn push(&mut self, frame: &Frame<Bytes>) -> bool {
        if let Some(data) = frame.data_ref() {
            self.len += data.len();
            if self.len > self.limit {
                return false;
            }
            if !data.is_empty() {
                self.chunks.push(data.clone());
            }
        } else if let Some(trailers) = frame.trailers_ref() {
            self.trailers = Some(trailers.clone());
        }
        true
    }

    /// Sends the complete copy from a task of its own.
    fn send(self) {
        let PendingCopy {
            head,
            chunks,
            trailers,
            mut slot,
            client,
            tasks,
            ..
        } = self;
        // From here, a copy dropped before it settles was cut short by the
        // proxy shutting down.
        slot.on_drop = Some(ShedReason::Shutdown);
        let body = BufferedBody::new(chunks, trailers);
        tasks.spawn(async move {
            let target = Arc::clone(&slot.target);
            let timeout = target.route.mirror.timeout;
            let started = Instant::now();
            let outcome =
                tokio::time::timeout(timeout, deliver(&target, &client, head, body)).await;
            match outcome {
                Ok(Ok(status)) => {
                    target
                        .route_latency(&slot.metrics)
                        .observe(started.elapsed().as_secs_f64());
                    slot.delivered(status);
                }
                Ok(Err(reason)) => {
                    tracing::debug!(
                        route = slot.route(),
                        reason = reason.as_str(),
                        "mirror copy failed"
                    );
                    slot.shed(reason);
                }
                Err(_) => {
                    tracing::debug!(route = slot.route(), ?timeout, "mirror copy timed out");
                    slot.shed(ShedReason::Timeout);
                }
            }
        });
    }
}

impl MirrorTarget {
    fn route_latency(&self, metrics: &Metrics) -> prometheus::Histogram {
        metrics.latency(&self.route.name, "mirror")
    }
}

/// Sends one copy and discards the response body. Returns the status, or
/// the reason the copy failed.
async fn deliver(
    target: &MirrorTarget,
    client: &Client,
    head: CopyHead,
    body: BufferedBody,
) -> Result<StatusCode, ShedReason> {
    let addr = target
        .resolve()
        .await
        .inspect_err(|_| target.backoff.record_failure(Instant::now()))?;
    let request = target.build_request(head, body);
    let endpoint = Endpoint {
        addr,
        tls: target.tls.clone(),
        proto: proto_for(request.version()),
    };
    let response = client.send(&endpoint, request).await.map_err(|error| {
        tracing::debug!(%error, "mirror request failed");
        if error.is_connect() {
            target.backoff.record_failure(Instant::now());
            ShedReason::ConnectFailed
        } else {
            ShedReason::UpstreamError
        }
    })?;
    target.backoff.record_success();
    let status = response.status();
    // Reading the body to its end lets the connection go back to the pool.
    // A body that fails midway still counts as delivered, because the
    // secondary got the whole request and sent a response head.
    let _ = response.into_body().collect().await;
    Ok(status)
}

pin_project! {
    /// The primary request body, passed through frame by frame while a
    /// capped copy of each frame is kept for the mirror.
    pub struct TeeBody<B> {
        #[pin]
        inner: B,
        copy: Option<PendingCopy>,
    }
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(copy) = this.copy.as_mut() {
                    if !copy.push(frame) {
                        let copy = this.copy.take().expect("checked above");
                        copy.slot.shed(ShedReason::BodyTooLarge);
                    }
                }
                // hyper stops polling a body that reports its end, and after
                // trailers, which are always the last frame, so the copy is
                // complete as soon as either happens.
                if frame.is_trailers() || this.inner.is_end_stream() {
                    if let Some(copy) = this.copy.take() {
                        copy.send();
                    }
                }
            }
            Some(Err(_)) => {
                if let Some(copy) = this.copy.take() {
                    copy.slot.shed(ShedReason::BodyIncomplete);
                }
            }
            None => {
                if let Some(copy) = this.copy.take() {
                    copy.send();
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

// === layer ===

/// Tower layer that tees matched requests to their mirror.
#[derive(Clone)]
pub struct MirrorLayer {
    dispatcher: Arc<Dispatcher>,
}

#[derive(Clone)]
pub struct Mirror<S> {
    inner: S,
    dispatcher: Arc<Dispatcher>,
}

impl MirrorLayer {
    pub fn new(dispatcher: Arc<Dispatcher>) -> Self {
        Self { dispatcher }
    }
}

impl<S> tower::Layer<S> for MirrorLayer {
    type Service = Mirror<S>;

    fn layer(&self, inner: S) -> Mirror<S> {
        Mirror {
            inner,
            dispatcher: Arc::clone(&self.dispatcher),
        }
    }
}

impl<S> tower::Service<Request<BoxBody>> for Mirror<S>
where
    S: tower::Service<Request<BoxBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<BoxBody>) -> Self::Future {
        let request = self.dispatcher.tee(request);
        self.inner.call(request)
    }
}

// === sampling ===

/// Decides whether a request is copied at `percent`. With a W3C
/// `traceparent` header the decision is a function of the trace id, so every
/// hop of one trace decides alike. Without one it is random.
pub fn sampled(percent: f64, headers: &HeaderMap) -> bool {
    if percent >= 100.0 {
        return true;
    }
    if percent <= 0.0 {
        return false;
    }
    let draw = headers
        .get("traceparent")
        .and_then(trace_id_low_bits)
        .unwrap_or_else(rand::random::<u64>);
    // One in a million resolution lets percents like 0.01 work.
    (draw % 1_000_000) < (percent * 10_000.0) as u64
}

/// Returns the low 64 bits of the trace id in a `traceparent` value
/// (`version-traceid-parentid-flags`), which W3C Trace Context level 2
/// recommends be random.
fn trace_id_low_bits(value: &HeaderValue) -> Option<u64> {
    let value = value.to_str().ok()?;
    let mut parts = value.split('-');
    let _version = parts.next()?;
    let trace_id = parts.next()?;
    if trace_id.len() != 32 || trace_id.bytes().all(|b| b == b'0') {
        return None;
    }
    u64::from_str_radix(&trace_id[16..], 16).ok()
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn traceparent(trace_id: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = format!("00-{trace_id}-00f067aa0ba902b7-01");
        headers.insert("traceparent", value.parse().unwrap());
        headers
    }

    #[test]
    fn sampling_edges() {
        let headers = HeaderMap::new();
        assert!(sampled(100.0, &headers), "100 percent copies everything");
        assert!(!sampled(0.0, &headers), "0 percent copies nothing");
    }

    #[test]
    fn sampling_follows_trace_id() {
        for i in 0..200u64 {
            let trace_id = format!(
                "4bf92f3577b34da6{:016x}",
                i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            );
            let headers = traceparent(&trace_id);
            let first = sampled(10.0, &headers);
            for _ in 0..5 {
                assert_eq!(
                    sampled(10.0, &headers),
                    first,
                    "trace {trace_id} decided alike"
                );
            }
        }
    }

    #[test]
    fn sampling_rate_is_close() {
        let copied = (0..20_000u64)
            .filter(|i| {
                let trace_id = format!(
                    "0af7651916cd43dd{:016x}",
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                );
                sampled(10.0, &traceparent(&trace_id))
            })
            .count();
        assert!(
            (1_600..=2_400).contains(&copied),
            "expected about 2000 of 20000 copied at 10%, got {copied}"
        );
    }

    #[test]
    fn invalid_traceparent_is_ignored() {
        assert_eq!(
            trace_id_low_bits(&HeaderValue::from_static("garbage")),
            None
        );
        let zeros = format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32));
        assert_eq!(
            trace_id_low_bits(&HeaderValue::from_str(&zeros).unwrap()),
            None
        );
    }
}
