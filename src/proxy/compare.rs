//! Compare mode: a copy sent like a mirror copy, whose response is compared
//! with the primary response.
//!
//! The primary response is captured by a [`ResponseTap`] that copies each
//! frame as the client reads it, so the client never waits for the
//! comparison. The comparison runs in the copy's task once both responses
//! are complete; the pure logic is in [`diff`].

pub mod diff;
pub mod json_path;

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Response, StatusCode};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tokio::sync::oneshot;

use self::diff::{CompareSpec, Observed, Summary};
pub use self::json_path::JsonPath;
use super::{
    client::{BoxBody, BoxError},
    metrics::Metrics,
    mirror::{MirrorTarget, SecondaryResponse},
};
use crate::routes::{Dispatch, Route};

/// Per-route compare state.
pub struct CompareTarget {
    /// Sends the request copy, as for a mirror route.
    pub copy: Arc<MirrorTarget>,
    route: String,
    spec: CompareSpec,
    max_body_bytes: usize,
    /// How long a comparison waits for the primary response to complete
    /// once the secondary responded: the route's copy timeout.
    primary_wait: Duration,
    sampler: Mutex<DiffSampler>,
    metrics: Metrics,
}

/// Captures the primary response for one comparison.
pub struct ResponseTap {
    sender: oneshot::Sender<Result<Captured, String>>,
    limit: usize,
}

/// One pending comparison: waits for the primary response, then compares.
pub struct CompareJob {
    target: Arc<CompareTarget>,
    primary: oneshot::Receiver<Result<Captured, String>>,
    method: http::Method,
    path: String,
}

/// A complete primary response.
struct Captured {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

/// Lets at most `per_minute` mismatch logs through per minute and counts
/// the rest.
#[derive(Debug)]
pub struct DiffSampler {
    per_minute: u32,
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

// === impl CompareTarget ===

impl CompareTarget {
    /// Builds the state of a validated compare route.
    pub fn new(route: &Route, copy: Arc<MirrorTarget>, metrics: &Metrics) -> Self {
        let Dispatch::Compare(config) = &route.dispatch else {
            panic!("route {} is not a compare route", route.name);
        };
        let spec = CompareSpec {
            headers: config
                .headers
                .iter()
                .map(|name| name.parse().expect("validated header name"))
                .collect(),
            ignore_json_paths: config
                .ignore_json_paths
                .iter()
                .map(|path| JsonPath::parse(path).expect("validated JSON path"))
                .collect(),
        };
        Self {
            copy,
            route: route.name.clone(),
            spec,
            max_body_bytes: config.max_body_bytes,
            primary_wait: config.timeout,
            sampler: Mutex::new(DiffSampler::new(config.sample_diffs_per_minute)),
            metrics: metrics.clone(),
        }
    }

    /// Starts a comparison of the request with this method and path.
    pub fn start(self: &Arc<Self>, request: &http::Request<BoxBody>) -> (ResponseTap, CompareJob) {
        let (sender, primary) = oneshot::channel();
        let tap = ResponseTap {
            sender,
            limit: self.max_body_bytes,
        };
        let job = CompareJob {
            target: Arc::clone(self),
            primary,
            method: request.method().clone(),
            path: request.uri().path().to_string(),
        };
        (tap, job)
    }

    fn record(&self, result: &str) {
        self.metrics
            .fanout()
            .compare
            .with_label_values(&[self.route.as_str(), result])
            .inc();
    }
}

// === impl ResponseTap ===

impl ResponseTap {
    /// Returns the response with a body that copies its frames for the
    /// comparison as the client reads them.
    pub fn attach(self, response: Response<BoxBody>) -> Response<BoxBody> {
        if self.sender.is_closed() {
            return response;
        }
        let (parts, body) = response.into_parts();
        let capture = Capture {
            status: parts.status,
            headers: parts.headers.clone(),
            chunks: Vec::new(),
            len: 0,
            limit: self.limit,
            sender: self.sender,
        };
        if body.is_end_stream() {
            capture.complete();
            return Response::from_parts(parts, body);
        }
        let body = TapBody {
            inner: body,
            capture: Some(capture),
        };
        Response::from_parts(parts, body.boxed_unsync())
    }

    /// Reports that the primary request failed, so there is nothing to
    /// compare.
    pub fn primary_failed(self) {
        let _ = self
            .sender
            .send(Err("the primary request failed".to_string()));
    }
}

struct Capture {
    status: StatusCode,
    headers: HeaderMap,
    /// The body so far, kept as references to the frames the client gets.
    chunks: Vec<Bytes>,
    len: usize,
    limit: usize,
    sender: oneshot::Sender<Result<Captured, String>>,
}

impl Capture {
    fn complete(self) {
        let mut body = BytesMut::with_capacity(self.len);
        for chunk in &self.chunks {
            body.extend_from_slice(chunk);
        }
        let _ = self.sender.send(Ok(Captured {
            status: self.status,
            headers: self.headers,
            body: body.freeze(),
        }));
    }

    fn fail(self, reason: String) {
        let _ = self.sender.send(Err(reason));
    }
}

pin_project! {
    /// The primary response body, passed through while a capped copy is
    /// kept for the comparison.
    struct TapBody {
        #[pin]
        inner: BoxBody,
        capture: Option<Capture>,
    }
}

impl Body for TapBody {
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
                if let Some(data) = frame.data_ref() {
                    let over = this
                        .capture
                        .as_ref()
                        .is_some_and(|capture| capture.len + data.len() > capture.limit);
                    if over {
                        let capture = this.capture.take().expect("checked above");
                        let limit = capture.limit;
                        capture.fail(format!(
                            "the primary response body is larger than max_body_bytes \
                             ({limit} bytes)"
                        ));
                    } else if let Some(capture) = this.capture.as_mut() {
                        capture.len += data.len();
                        capture.chunks.push(data.clone());
                    }
                }
                if this.inner.is_end_stream() {
                    if let Some(capture) = this.capture.take() {
                        capture.complete();
                    }
                }
            }
            Some(Err(error)) => {
                if let Some(capture) = this.capture.take() {
                    capture.fail(format!("the primary response body failed: {error}"));
                }
            }
            None => {
                if let Some(capture) = this.capture.take() {
                    capture.complete();
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

// === impl CompareJob ===

impl CompareJob {
    pub fn max_body_bytes(&self) -> usize {
        self.target.max_body_bytes
    }

    /// Waits for the primary response, compares, and records the result.
    pub async fn compare(self, secondary: SecondaryResponse) {
        // A client that reads the primary response slowly must not hold
        // the comparison, and its in-flight slot, for longer than this.
        let wait = self.target.primary_wait;
        let primary = match tokio::time::timeout(wait, self.primary).await {
            Ok(Ok(Ok(primary))) => primary,
            Ok(Ok(Err(reason))) => return error(&self.target, &reason),
            Ok(Err(_)) => {
                return error(&self.target, "the primary response was not read to its end")
            }
            Err(_) => {
                let reason = format!("the primary response did not complete within {wait:?}");
                return error(&self.target, &reason);
            }
        };
        let secondary_body = match &secondary.body {
            Ok(body) => body,
            Err(reason) => return error(&self.target, reason),
        };
        let differences = diff::compare(
            &self.target.spec,
            Observed {
                status: primary.status,
                headers: &primary.headers,
                body: &primary.body,
            },
            Observed {
                status: secondary.status,
                headers: &secondary.headers,
                body: secondary_body,
            },
        );
        if differences.is_empty() {
            self.target.record("match");
            return;
        }
        self.target.record("mismatch");
        let admitted = self
            .target
            .sampler
            .lock()
            .expect("sampler lock is never poisoned")
            .admit(Instant::now());
        if let Some(suppressed) = admitted {
            tracing::info!(
                route = %self.target.route,
                method = %self.method,
                path = %self.path,
                diff = %Summary(&differences),
                suppressed,
                "compare mismatch"
            );
        }
    }

    /// Records a comparison that could not run because the copy failed.
    pub fn secondary_failed(self, reason: &str) {
        error(&self.target, reason);
    }
}

fn error(target: &CompareTarget, reason: &str) {
    target.record("error");
    tracing::debug!(route = %target.route, reason, "compare not possible");
}

// === impl DiffSampler ===

impl DiffSampler {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute,
            window_start: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Returns `Some(suppressed)` when a log line may be written now, with
    /// the number of lines suppressed since the last one, else `None`.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let window_over = self
            .window_start
            .is_none_or(|start| now.duration_since(start).as_secs() >= 60);
        if window_over {
            self.window_start = Some(now);
            self.logged = 0;
        }
        if self.logged < self.per_minute {
            self.logged += 1;
            return Some(std::mem::take(&mut self.suppressed));
        }
        self.suppressed += 1;
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn sampler_limits_per_minute() {
        let start = Instant::now();
        let mut sampler = DiffSampler::new(2);
        assert_eq!(sampler.admit(start), Some(0));
        assert_eq!(sampler.admit(start + Duration::from_secs(1)), Some(0));
        assert_eq!(sampler.admit(start + Duration::from_secs(2)), None);
        assert_eq!(sampler.admit(start + Duration::from_secs(59)), None);
        assert_eq!(
            sampler.admit(start + Duration::from_secs(60)),
            Some(2),
            "a new minute logs again and reports what was suppressed"
        );
    }

    #[test]
    fn sampler_at_zero_logs_nothing() {
        let mut sampler = DiffSampler::new(0);
        assert_eq!(sampler.admit(Instant::now()), None);
    }
}
