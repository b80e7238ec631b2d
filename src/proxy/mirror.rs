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
//!
//! Compare routes take the same path and also tap the primary response
//! (see [`super::compare`]). Fanout routes share the [`TeeBody`] with a
//! sink of their own that queues the copies (see [`super::fanout`]).

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Version};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use super::{
    backoff::ConnectBackoff,
    body::BufferedBody,
    client::{BoxBody, BoxError, Client, Proto},
    compare::{CompareJob, ResponseTap},
    metrics::{Metrics, ShedReason},
    secondary::{BodyShape, RequestHead, SecondaryUrl},
    target::{content_length, BoxFuture, MatchedRoute, RouteTarget},
};
use crate::{
    config::MirrorConfig,
    routes::{Dispatch, Route},
};

/// Sends copies for every mirror route. Shared by all connections.
pub struct Dispatcher {
    client: Client,
    metrics: Metrics,
    tasks: TaskTracker,
}

/// Per-route mirror state: where copies go and how many may be in flight.
pub struct MirrorTarget {
    route: Arc<Route>,
    /// The copy settings: the route's mirror section, or those of its
    /// compare section.
    settings: MirrorConfig,
    secondary: SecondaryUrl,
    permits: Arc<Semaphore>,
    in_flight: IntGauge,
    backoff: ConnectBackoff,
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

    /// Starts the copies that the matched route's mode calls for and
    /// returns the request with a teeing body, otherwise unchanged. For a compare
    /// copy it also returns the tap that captures the primary response.
    fn tee(&self, request: Request<BoxBody>) -> (Request<BoxBody>, Option<ResponseTap>) {
        let Some(matched) = request.extensions().get::<MatchedRoute>() else {
            return (request, None);
        };
        match &matched.target {
            RouteTarget::Mirror(target) => {
                let target = Arc::clone(target);
                (self.tee_copy(request, target, None).0, None)
            }
            RouteTarget::Compare(compare) => {
                let compare = Arc::clone(compare);
                let (tap, job) = compare.start(&request);
                let (request, started) =
                    self.tee_copy(request, Arc::clone(&compare.copy), Some(job));
                (request, started.then_some(tap))
            }
            RouteTarget::Fanout(fanout) => {
                let fanout = Arc::clone(fanout);
                (fanout.tee(request), None)
            }
        }
    }

    /// Starts a mirror or compare copy when the request is sampled and a
    /// slot is free. Returns the request and whether the copy started.
    fn tee_copy(
        &self,
        request: Request<BoxBody>,
        target: Arc<MirrorTarget>,
        compare: Option<CompareJob>,
    ) -> (Request<BoxBody>, bool) {
        let route_name = target.route.name.clone();
        let mode = target.route.mode().as_str();
        if !sampled(target.settings.percent, request.headers()) {
            return (request, false);
        }

        self.metrics.record_due(&route_name, mode);
        let limit = target.settings.max_body_bytes;
        if content_length(request.headers()).is_some_and(|len| len > limit as u64) {
            self.metrics
                .record_shed(&route_name, mode, ShedReason::BodyTooLarge);
            return (request, false);
        }
        if target.backoff.is_backing_off(Instant::now()) {
            self.metrics
                .record_shed(&route_name, mode, ShedReason::Unavailable);
            return (request, false);
        }
        let Ok(permit) = Arc::clone(&target.permits).try_acquire_owned() else {
            self.metrics
                .record_shed(&route_name, mode, ShedReason::Overloaded);
            return (request, false);
        };

        let slot = CopySlot::new(Arc::clone(&target), self.metrics.clone(), permit);
        let head = RequestHead::of(&request);
        let pending = PendingCopy {
            head,
            chunks: Vec::new(),
            len: 0,
            limit,
            trailers: None,
            slot,
            client: self.client.clone(),
            tasks: self.tasks.clone(),
            compare,
        };

        if request.body().is_end_stream() {
            pending.send();
            return (request, true);
        }
        let request = request.map(|body| TeeBody::new(body, Box::new(pending)).boxed_unsync());
        (request, true)
    }
}

// === impl MirrorTarget ===

impl MirrorTarget {
    /// Builds the target of a validated mirror or compare route.
    ///
    /// # Panics
    ///
    /// On a fanout route, which sends its copies through its own queues.
    pub fn new(route: Arc<Route>, metrics: &Metrics) -> Self {
        let settings = match &route.dispatch {
            Dispatch::Mirror(mirror) => mirror.clone(),
            Dispatch::Compare(compare) => compare.copy_settings(),
            Dispatch::Fanout(_) => panic!("a fanout route has no mirror target"),
        };
        let secondary =
            SecondaryUrl::parse(&settings.to).expect("a validated secondary URL parses");
        let in_flight = metrics.in_flight(&route.name, route.mode().as_str());
        Self {
            permits: Arc::new(Semaphore::new(settings.max_in_flight)),
            route,
            settings,
            secondary,
            in_flight,
            backoff: ConnectBackoff::default(),
        }
    }

    /// Starts or extends the connect backoff, logging once per outage
    /// rather than once per copy.
    fn record_connect_failure(&self, error: &dyn std::fmt::Display) {
        if self.backoff.record_failure(Instant::now()) {
            tracing::warn!(
                route = %self.route.name,
                secondary = %self.secondary.url,
                %error,
                "secondary is unreachable; copies are shed as unavailable until a retry connects"
            );
        }
    }

    async fn resolve(&self) -> Result<std::net::SocketAddr, ShedReason> {
        self.secondary.resolve().await.map_err(|error| {
            tracing::debug!(%error, secondary = %self.secondary.url, "failed to resolve the secondary");
            self.record_connect_failure(&error);
            ShedReason::ConnectFailed
        })
    }

    fn build_request(&self, head: &RequestHead, body: BufferedBody) -> Request<BoxBody> {
        let shape = BodyShape {
            len: body.len(),
            has_trailers: body.has_trailers(),
        };
        let prepared = self.secondary.prepare(
            head,
            shape,
            self.settings.preserve_host,
            self.route.mode(),
            None,
        );
        prepared.build(None, body.boxed_unsync())
    }
}

pub(crate) fn proto_for(version: Version) -> Proto {
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
        let route = &self.target.route;
        self.metrics
            .record_response(&route.name, route.mode().as_str(), status);
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
    head: RequestHead,
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    trailers: Option<HeaderMap>,
    slot: CopySlot,
    client: Client,
    tasks: TaskTracker,
    /// The comparison that runs once the secondary responds, on compare
    /// copies only.
    compare: Option<CompareJob>,
}

impl CopySink for PendingCopy {
    /// Keeps a reference to the frame's data. Returns false when the body
    /// has grown past the limit, and the copy is then shed when dropped.
    fn push(&mut self, frame: &Frame<Bytes>) -> bool {
        if let Some(data) = frame.data_ref() {
            self.len += data.len();
            if self.len > self.limit {
                self.slot.on_drop = Some(ShedReason::BodyTooLarge);
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

    fn finish(self: Box<Self>) {
        self.send();
    }
}

impl PendingCopy {
    /// Sends the complete copy from a task of its own.
    fn send(self) {
        let PendingCopy {
            head,
            chunks,
            trailers,
            mut slot,
            client,
            tasks,
            compare,
            ..
        } = self;
        // From here, a copy dropped before it settles was cut short by the
        // proxy shutting down.
        slot.on_drop = Some(ShedReason::Shutdown);
        let body = BufferedBody::new(chunks, trailers);
        tasks.spawn(async move {
            let target = Arc::clone(&slot.target);
            let timeout = target.settings.timeout;
            let started = Instant::now();
            let limit = compare.as_ref().map(CompareJob::max_body_bytes);
            let exchange = deliver(&target, &client, head, body, limit);
            let outcome = tokio::time::timeout(timeout, exchange).await;
            let mode = target.route.mode().as_str();
            match outcome {
                Ok(Ok(secondary)) => {
                    target
                        .route_latency(&slot.metrics)
                        .observe(started.elapsed().as_secs_f64());
                    let status = secondary.status;
                    if let Some(job) = compare {
                        job.compare(secondary).await;
                    }
                    slot.delivered(status);
                }
                Ok(Err(reason)) => {
                    tracing::debug!(
                        route = slot.route(),
                        reason = reason.as_str(),
                        "{mode} copy failed"
                    );
                    if let Some(job) = compare {
                        job.secondary_failed(reason.as_str());
                    }
                    slot.shed(reason);
                }
                Err(_) => {
                    tracing::debug!(route = slot.route(), ?timeout, "{mode} copy timed out");
                    if let Some(job) = compare {
                        job.secondary_failed("the secondary timed out");
                    }
                    slot.shed(ShedReason::Timeout);
                }
            }
        });
    }
}

impl MirrorTarget {
    fn route_latency(&self, metrics: &Metrics) -> prometheus::Histogram {
        metrics.latency(&self.route.name, self.route.mode().as_str())
    }
}

/// The secondary's response to a copy.
pub struct SecondaryResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The body when it was read (compare copies only) and fit the limit.
    pub body: Result<Bytes, String>,
}

/// Sends one copy. Reads the response body up to `read_limit` bytes when
/// one is given (compare) and discards it otherwise. Returns the response,
/// or the reason the copy failed.
async fn deliver(
    target: &MirrorTarget,
    client: &Client,
    head: RequestHead,
    body: BufferedBody,
    read_limit: Option<usize>,
) -> Result<SecondaryResponse, ShedReason> {
    let addr = target.resolve().await?;
    let request = target.build_request(&head, body);
    let endpoint = target
        .secondary
        .endpoint(addr, proto_for(request.version()));
    let response = client.send(&endpoint, request).await.map_err(|error| {
        tracing::debug!(%error, "mirror request failed");
        if error.is_connect() {
            target.record_connect_failure(&error);
            ShedReason::ConnectFailed
        } else {
            ShedReason::UpstreamError
        }
    })?;
    if target.backoff.record_success() {
        tracing::info!(route = %target.route.name, secondary = %target.secondary.url, "secondary is reachable again");
    }
    let (parts, body) = response.into_parts();
    // Reading the body to its end lets the connection go back to the pool.
    // A body that fails midway still counts as delivered, because the
    // secondary got the whole request and sent a response head.
    let body = match read_limit {
        None => {
            let _ = body.collect().await;
            Err("the body was not read".to_string())
        }
        Some(limit) => match http_body_util::Limited::new(body, limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(error) if error.is::<http_body_util::LengthLimitError>() => Err(format!(
                "the secondary response body is larger than max_body_bytes ({limit} bytes)"
            )),
            Err(error) => Err(format!(
                "failed to read the secondary response body: {error}"
            )),
        },
    };
    Ok(SecondaryResponse {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Receiver of the frames that a tee copies from a request body.
pub(crate) trait CopySink: Send {
    /// Polls until the sink can take the next frame. Only a sink that
    /// writes the body to disk ever returns `Pending`, which holds back the
    /// primary body until the disk catches up.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }

    /// Takes a frame. Returns false when the copy was given up; dropping the
    /// sink then records why.
    fn push(&mut self, frame: &Frame<Bytes>) -> bool;

    /// Called once the body ended complete. A sink dropped without this
    /// call records its copies as shed with `body_incomplete`.
    fn finish(self: Box<Self>);
}

pin_project! {
    /// The primary request body, passed through frame by frame while a
    /// copy of each frame goes to a [`CopySink`].
    pub struct TeeBody<B> {
        #[pin]
        inner: B,
        copy: Option<Box<dyn CopySink>>,
    }
}

impl<B> TeeBody<B> {
    pub(crate) fn new(inner: B, copy: Box<dyn CopySink>) -> Self {
        Self {
            inner,
            copy: Some(copy),
        }
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
        if let Some(copy) = this.copy.as_mut() {
            std::task::ready!(copy.poll_ready(cx));
        }
        let polled = std::task::ready!(this.inner.as_mut().poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(copy) = this.copy.as_mut() {
                    if !copy.push(frame) {
                        drop(this.copy.take());
                    }
                }
                // hyper stops polling a body that reports its end, and after
                // trailers, which are always the last frame, so the copy is
                // complete as soon as either happens.
                if frame.is_trailers() || this.inner.is_end_stream() {
                    if let Some(copy) = this.copy.take() {
                        copy.finish();
                    }
                }
            }
            Some(Err(_)) => {
                // Dropping the sink records the copy as incomplete.
                drop(this.copy.take());
            }
            None => {
                if let Some(copy) = this.copy.take() {
                    copy.finish();
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

/// Tower layer that tees matched requests to their route's secondaries:
/// mirror, compare and fanout copies all start here.
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
    S: tower::Service<
        Request<BoxBody>,
        Response = http::Response<BoxBody>,
        Future = BoxFuture<
            Result<http::Response<BoxBody>, <S as tower::Service<Request<BoxBody>>>::Error>,
        >,
    >,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<BoxBody>) -> Self::Future {
        let (request, tap) = self.dispatcher.tee(request);
        let response = self.inner.call(request);
        let Some(tap) = tap else {
            return response;
        };
        // A compare copy also needs the primary response. The tap copies its
        // frames as the client reads them, so the response is not held back.
        Box::pin(async move {
            match response.await {
                Ok(response) => Ok(tap.attach(response)),
                Err(error) => {
                    tap.primary_failed();
                    Err(error)
                }
            }
        })
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
