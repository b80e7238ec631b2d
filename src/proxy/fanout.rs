//! Fanout: every matching request is delivered to each of the route's
//! secondaries at least once, or written to the dead-letter spool.
//!
//! The tee ([`FanoutSink`]) captures the request body as the primary
//! upstream reads it: in memory up to `max_body_bytes`, beyond that in a
//! file in the spool directory. A complete body becomes one copy per
//! secondary, queued in that secondary's bounded queue. Workers drain each
//! queue with at most `max_in_flight` copies at a time, retry failed
//! attempts with back-off, and stop sending while the secondary's circuit
//! is open. Every copy ends delivered (a 2xx response) or dead-lettered:
//! queue full, circuit open, attempts exhausted, a final response, or
//! shutdown. A copy dropped without either outcome spools itself with
//! reason `shutdown`, so no code path loses one silently.

mod sink;

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use prometheus::IntGauge;
use tokio::{
    sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::sink::FanoutSink;
use super::{
    body::BufferedBody,
    circuit::CircuitBreaker,
    client::{BoxBody, Client},
    metrics::{Metrics, ShedReason},
    mirror::TeeBody,
    retry::{classify_status, Failure, RetryPolicy},
    secondary::{
        file_body, BodyShape, PreparedRequest, RequestHead, SecondaryUrl, IDEMPOTENCY_KEY_HEADER,
    },
};
use crate::{
    config::{FanoutConfig, RetryClass},
    readiness::Readiness,
    routes::{Dispatch, Mode, RouteTable},
    spool::{self, BodyFile, DeadLetter, LetterBody, RecordMeta, Spool, SpoolError},
};

const MODE: &str = "fanout";

/// Reason a fanout copy was written to the dead-letter spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// Every attempt failed with a retryable failure.
    AttemptsExhausted,
    /// An attempt failed in a way that is not retried: a response other
    /// than 2xx, 429 and 5xx, or a class missing from `retry_on`.
    NonRetryable,
    /// The secondary's queue was full when the copy arrived.
    QueueFull,
    /// The secondary's circuit was open.
    CircuitOpen,
    /// The proxy stopped before the copy was delivered.
    Shutdown,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterReason::AttemptsExhausted => "attempts_exhausted",
            DeadLetterReason::NonRetryable => "non_retryable",
            DeadLetterReason::QueueFull => "queue_full",
            DeadLetterReason::CircuitOpen => "circuit_open",
            DeadLetterReason::Shutdown => "shutdown",
        }
    }
}

/// The fanout side of a running proxy: every fanout route, their spools
/// and workers.
pub struct Fanout {
    shared: Arc<Shared>,
    spools: Vec<Spool>,
    workers: Vec<JoinHandle<()>>,
}

/// State shared by all fanout routes of one proxy.
struct Shared {
    /// Copies accepted and not yet settled, plus body files being written.
    outstanding: AtomicUsize,
    settled: Notify,
    /// Set once the drain deadline passed: copies are spooled at once.
    closed: AtomicBool,
    deadline: CancellationToken,
    tasks: TaskTracker,
}

/// Per-route fanout state: one queue per secondary.
pub struct FanoutRoute {
    ctx: Arc<RouteContext>,
    queues: Vec<Queue>,
}

struct RouteContext {
    name: String,
    config: FanoutConfig,
    policy: RetryPolicy,
    spool: Spool,
    metrics: Metrics,
    client: Client,
    shared: Arc<Shared>,
    /// Bytes of in-memory bodies held by this route's pending copies,
    /// bounded by `max_queued_body_bytes`.
    queued_body_bytes: Arc<AtomicU64>,
}

struct Queue {
    secondary: Arc<Secondary>,
    sender: mpsc::Sender<FanoutCopy>,
}

struct Secondary {
    url: SecondaryUrl,
    circuit: Arc<CircuitBreaker>,
    depth: IntGauge,
}

/// A complete request body, shared by the copies to every secondary.
struct CopyBody {
    data: BodyData,
    trailers: Option<HeaderMap>,
    /// The in-memory body's share of `max_queued_body_bytes`; `None` for a
    /// body on disk or before the copies are queued.
    queued: Option<QueuedBytes>,
}

/// Bytes of a body counted against the route's `max_queued_body_bytes`,
/// released when the last copy that shares the body is done with it.
struct QueuedBytes {
    counter: Arc<AtomicU64>,
    bytes: u64,
}

impl QueuedBytes {
    /// Counts `bytes` against `limit`, or returns `None` when they do not
    /// fit.
    fn reserve(counter: &Arc<AtomicU64>, bytes: u64, limit: u64) -> Option<Self> {
        let previous = counter.fetch_add(bytes, Ordering::AcqRel);
        if previous + bytes > limit {
            counter.fetch_sub(bytes, Ordering::AcqRel);
            return None;
        }
        Some(Self {
            counter: Arc::clone(counter),
            bytes,
        })
    }
}

impl Drop for QueuedBytes {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

enum BodyData {
    Memory(Vec<Bytes>),
    File(Arc<BodyFile>),
}

/// One request on its way to one secondary.
struct FanoutCopy {
    ctx: Arc<RouteContext>,
    secondary: Arc<Secondary>,
    prepared: PreparedRequest,
    body: Arc<CopyBody>,
    idempotency_key: String,
    accepted_at: SystemTime,
    attempts: u32,
    first_error: Option<String>,
    last_error: Option<String>,
    settled: bool,
    _outstanding: Outstanding,
}

/// Final state of a copy.
enum Outcome {
    Delivered(StatusCode),
    DeadLetter(DeadLetterReason),
}

/// Counts as outstanding work until dropped.
struct Outstanding {
    shared: Arc<Shared>,
}

/// Copies counted as due whose outcome is not recorded yet. Dropped before
/// they are handed to the queues, they are recorded as shed with `reason`.
struct DueCopies {
    ctx: Arc<RouteContext>,
    count: usize,
    reason: Option<ShedReason>,
}

/// A failed attempt: its class and a message for logs and dead letters.
struct AttemptError {
    failure: Failure,
    message: String,
}

// === impl Fanout ===

impl Fanout {
    /// Opens the spools of every fanout route and starts their workers.
    /// Returns the per-route state by route name.
    pub fn start(
        routes: &RouteTable,
        client: &Client,
        metrics: &Metrics,
        readiness: &Readiness,
    ) -> Result<(Fanout, HashMap<String, Arc<FanoutRoute>>), SpoolError> {
        let shared = Arc::new(Shared {
            outstanding: AtomicUsize::new(0),
            settled: Notify::new(),
            closed: AtomicBool::new(false),
            deadline: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });

        let configs: Vec<(String, FanoutConfig)> = routes
            .iter()
            .filter_map(|route| match &route.dispatch {
                Dispatch::Fanout(config) => Some((route.name.clone(), config.clone())),
                _ => None,
            })
            .collect();
        let mut spools: HashMap<PathBuf, Spool> = HashMap::new();
        for (_, config) in &configs {
            if spools.contains_key(&config.spool_dir) {
                continue;
            }
            // Routes that share a directory share its writer, flushed at
            // the shortest interval among them.
            let interval = configs
                .iter()
                .filter(|(_, other)| other.spool_dir == config.spool_dir)
                .map(|(_, other)| other.spool_fsync_interval)
                .min()
                .expect("the route itself is in the list");
            let spool = Spool::open(
                &config.spool_dir,
                interval,
                metrics.fanout().clone(),
                readiness.clone(),
            )?;
            spools.insert(config.spool_dir.clone(), spool);
        }

        let mut workers = Vec::new();
        let mut by_name = HashMap::new();
        for (name, config) in configs {
            let ctx = Arc::new(RouteContext {
                policy: RetryPolicy::new(&config),
                spool: spools[&config.spool_dir].clone(),
                metrics: metrics.clone(),
                client: client.clone(),
                shared: Arc::clone(&shared),
                name: name.clone(),
                config,
                queued_body_bytes: Arc::new(AtomicU64::new(0)),
            });
            let mut queues = Vec::new();
            for url in &ctx.config.to {
                let labels = [name.as_str(), url.as_str()];
                let fanout_metrics = metrics.fanout();
                let secondary = Arc::new(Secondary {
                    url: SecondaryUrl::parse(url).expect("validated secondary URL parses"),
                    circuit: Arc::new(CircuitBreaker::new(
                        &ctx.config.circuit_breaker,
                        fanout_metrics.circuit_state.with_label_values(&labels),
                        &name,
                        url,
                    )),
                    depth: fanout_metrics.queue_depth.with_label_values(&labels),
                });
                let (sender, receiver) = mpsc::channel(ctx.config.queue_capacity);
                workers.push(tokio::spawn(run_queue(
                    Arc::clone(&ctx),
                    Arc::clone(&secondary),
                    receiver,
                )));
                queues.push(Queue { secondary, sender });
            }
            by_name.insert(name, Arc::new(FanoutRoute { ctx, queues }));
        }

        let fanout = Fanout {
            shared,
            spools: spools.into_values().collect(),
            workers,
        };
        Ok((fanout, by_name))
    }

    /// Waits until every accepted copy is delivered or dead-lettered.
    pub async fn settled(&self) {
        loop {
            let notified = self.shared.settled.notified();
            if self.shared.outstanding.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Ends fanout at the drain deadline: in-flight and queued copies go to
    /// the spool with reason `shutdown`, later copies too, and the spools
    /// are flushed with fsync.
    pub async fn shutdown(self) {
        let left = self.shared.outstanding.load(Ordering::Acquire);
        if left > 0 {
            tracing::warn!(copies = left, "spooling fanout copies left at shutdown");
        }
        self.shared.closed.store(true, Ordering::Release);
        self.shared.deadline.cancel();
        for worker in self.workers {
            let _ = worker.await;
        }
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        for spool in &self.spools {
            spool.close().await;
        }
    }
}

// === impl FanoutRoute ===

impl FanoutRoute {
    /// Counts a copy as due for every secondary and returns the request with
    /// a body that captures the copy.
    pub fn tee(self: Arc<Self>, request: Request<BoxBody>) -> Request<BoxBody> {
        let count = self.queues.len();
        for _ in 0..count {
            self.ctx.metrics.record_due(&self.ctx.name, MODE);
        }
        let due = DueCopies {
            ctx: Arc::clone(&self.ctx),
            count,
            reason: Some(ShedReason::BodyIncomplete),
        };
        let idempotency_key = request
            .headers()
            .get(IDEMPOTENCY_KEY_HEADER)
            .cloned()
            .unwrap_or_else(|| {
                HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
                    .expect("a UUID is a valid header value")
            });
        let head = RequestHead::of(&request);
        let sink = FanoutSink::new(Arc::clone(&self), head, idempotency_key, due);

        if request.body().is_end_stream() {
            Box::new(sink).finish_now();
            return request;
        }
        request.map(|body| TeeBody::new(body, Box::new(sink)).boxed_unsync())
    }

    /// Queues one copy per secondary. Copies that cannot be queued go to the
    /// spool at once.
    fn enqueue(
        &self,
        head: RequestHead,
        body: CopyBody,
        idempotency_key: HeaderValue,
        accepted_at: SystemTime,
        mut due: DueCopies,
    ) {
        due.reason = None;
        let body_len = body.len();
        let has_trailers = body.trailers.is_some();
        // Bodies on disk take no memory. In-memory ones count against the
        // route's budget for as long as any copy references them.
        let mut body = body;
        let mut over_budget = false;
        if let BodyData::Memory(_) = body.data {
            body.queued = QueuedBytes::reserve(
                &self.ctx.queued_body_bytes,
                body_len,
                self.ctx.config.max_queued_body_bytes,
            );
            over_budget = body.queued.is_none();
        }
        let body = Arc::new(body);
        let key_text = String::from_utf8_lossy(idempotency_key.as_bytes()).into_owned();
        for queue in &self.queues {
            let shape = BodyShape {
                len: body_len,
                has_trailers,
            };
            let prepared = queue.secondary.url.prepare(
                &head,
                shape,
                self.ctx.config.preserve_host,
                Mode::Fanout,
                Some(&idempotency_key),
            );
            let copy = FanoutCopy {
                ctx: Arc::clone(&self.ctx),
                secondary: Arc::clone(&queue.secondary),
                prepared,
                body: Arc::clone(&body),
                idempotency_key: key_text.clone(),
                accepted_at,
                attempts: 0,
                first_error: None,
                last_error: None,
                settled: false,
                _outstanding: Outstanding::new(&self.ctx.shared),
            };
            if over_budget {
                copy.dead_letter(DeadLetterReason::QueueFull);
            } else {
                self.dispatch(queue, copy);
            }
        }
    }

    fn dispatch(&self, queue: &Queue, copy: FanoutCopy) {
        if self.ctx.shared.closed.load(Ordering::Acquire) {
            copy.dead_letter(DeadLetterReason::Shutdown);
            return;
        }
        if queue.secondary.circuit.is_open() {
            copy.dead_letter(DeadLetterReason::CircuitOpen);
            return;
        }
        queue.secondary.depth.inc();
        match queue.sender.try_send(copy) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(copy)) => {
                queue.secondary.depth.dec();
                copy.dead_letter(DeadLetterReason::QueueFull);
            }
            Err(mpsc::error::TrySendError::Closed(copy)) => {
                queue.secondary.depth.dec();
                copy.dead_letter(DeadLetterReason::Shutdown);
            }
        }
    }
}

// === workers ===

/// Drains one secondary's queue until the drain deadline, then spools what
/// is left in it.
async fn run_queue(
    ctx: Arc<RouteContext>,
    secondary: Arc<Secondary>,
    mut receiver: mpsc::Receiver<FanoutCopy>,
) {
    let permits = Arc::new(Semaphore::new(ctx.config.max_in_flight));
    let deadline = ctx.shared.deadline.clone();
    loop {
        let permit = tokio::select! {
            biased;
            _ = deadline.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => {
                permit.expect("the semaphore is never closed")
            }
        };
        let copy = tokio::select! {
            biased;
            _ = deadline.cancelled() => break,
            copy = receiver.recv() => match copy {
                Some(copy) => copy,
                None => break,
            },
        };
        secondary.depth.dec();
        ctx.shared.tasks.spawn(deliver(copy, permit));
    }
    receiver.close();
    while let Ok(copy) = receiver.try_recv() {
        secondary.depth.dec();
        copy.dead_letter(DeadLetterReason::Shutdown);
    }
}

/// Sends a copy until it settles or the drain deadline passes.
async fn deliver(mut copy: FanoutCopy, _permit: OwnedSemaphorePermit) {
    let deadline = copy.ctx.shared.deadline.clone();
    let outcome = tokio::select! {
        outcome = copy.attempt_until_settled() => outcome,
        _ = deadline.cancelled() => Outcome::DeadLetter(DeadLetterReason::Shutdown),
    };
    match outcome {
        Outcome::Delivered(status) => copy.delivered(status),
        Outcome::DeadLetter(reason) => copy.dead_letter(reason),
    }
}

// === impl FanoutCopy ===

impl FanoutCopy {
    async fn attempt_until_settled(&mut self) -> Outcome {
        let ctx = Arc::clone(&self.ctx);
        let labels = [ctx.name.as_str(), self.secondary.url.url.as_str()];
        let fanout_metrics = ctx.metrics.fanout();
        loop {
            let Some(permit) = self.secondary.circuit.admit() else {
                return Outcome::DeadLetter(DeadLetterReason::CircuitOpen);
            };
            self.attempts += 1;
            if self.attempts > 1 {
                fanout_metrics.retries.with_label_values(&labels).inc();
            }

            let started = Instant::now();
            let timeout = ctx.config.timeout;
            let result = match tokio::time::timeout(timeout, self.attempt()).await {
                Ok(result) => result,
                Err(_) => Err(AttemptError {
                    failure: Failure::Retryable {
                        class: RetryClass::Timeout,
                        retry_after: None,
                    },
                    message: format!("timeout: no complete response within {timeout:?}"),
                }),
            };
            let error = match result {
                Ok(status) => {
                    ctx.metrics
                        .latency(&ctx.name, MODE)
                        .observe(started.elapsed().as_secs_f64());
                    permit.success();
                    fanout_metrics
                        .attempts
                        .with_label_values(&[labels[0], labels[1], "success"])
                        .inc();
                    return Outcome::Delivered(status);
                }
                Err(error) => error,
            };

            fanout_metrics
                .attempts
                .with_label_values(&[labels[0], labels[1], error.failure.label()])
                .inc();
            match error.failure {
                // The secondary responded, so it is up, and a final
                // response does not count toward opening the circuit.
                Failure::Rejected(_) => permit.success(),
                Failure::Retryable { .. } => permit.failure(),
            }
            self.first_error
                .get_or_insert_with(|| error.message.clone());
            self.last_error = Some(error.message.clone());

            if !ctx.policy.retries(&error.failure) {
                return Outcome::DeadLetter(DeadLetterReason::NonRetryable);
            }
            if self.attempts >= ctx.policy.max_attempts {
                return Outcome::DeadLetter(DeadLetterReason::AttemptsExhausted);
            }
            let retry_after = match error.failure {
                Failure::Retryable { retry_after, .. } => retry_after,
                Failure::Rejected(_) => None,
            };
            let delay = ctx
                .policy
                .delay(self.attempts, retry_after, rand::random::<f64>());
            tracing::debug!(
                route = %ctx.name,
                secondary = %self.secondary.url.url,
                idempotency_key = %self.idempotency_key,
                attempt = self.attempts,
                error = %error.message,
                ?delay,
                "fanout attempt failed; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// Sends one attempt and reads the response to its end. Returns the 2xx
    /// status, or why the attempt failed.
    async fn attempt(&self) -> Result<StatusCode, AttemptError> {
        let connect_failure = |message: String| AttemptError {
            failure: Failure::Retryable {
                class: RetryClass::ConnectFailure,
                retry_after: None,
            },
            message,
        };
        let reset = |message: String| AttemptError {
            failure: Failure::Retryable {
                class: RetryClass::Reset,
                retry_after: None,
            },
            message,
        };

        let addr = self
            .secondary
            .url
            .resolve()
            .await
            .map_err(|error| connect_failure(format!("connect-failure: {error}")))?;
        let body = self.body.attempt_body().map_err(|error| {
            // The body file is the proxy's own; failing to read it is
            // retried like a broken connection.
            reset(format!("reset: failed to read the spooled body: {error}"))
        })?;
        let request = self.prepared.build(Some(self.attempts), body);
        let endpoint = self.secondary.url.endpoint(addr, self.prepared.proto);
        let response = self
            .ctx
            .client
            .send(&endpoint, request)
            .await
            .map_err(|error| {
                if error.is_connect() {
                    connect_failure(format!("connect-failure: {error}"))
                } else {
                    reset(format!("reset: {error}"))
                }
            })?;

        let (parts, mut body) = response.into_parts();
        // The response body is read to its end, without keeping it, so the
        // connection can be reused. A body cut short means the secondary may
        // not have finished, so the attempt counts as reset.
        while let Some(frame) = body.frame().await {
            frame.map_err(|error| reset(format!("reset: response body failed: {error}")))?;
        }
        match classify_status(parts.status, &parts.headers) {
            None => Ok(parts.status),
            Some(failure) => Err(AttemptError {
                message: format!("{}: status {}", failure.label(), parts.status),
                failure,
            }),
        }
    }

    fn delivered(mut self, status: StatusCode) {
        self.settled = true;
        self.ctx
            .metrics
            .record_response(&self.ctx.name, MODE, status);
    }

    fn dead_letter(mut self, reason: DeadLetterReason) {
        self.spool(reason);
    }

    fn spool(&mut self, reason: DeadLetterReason) {
        self.settled = true;
        let ctx = &self.ctx;
        ctx.metrics
            .fanout()
            .dead_lettered
            .with_label_values(&[ctx.name.as_str(), reason.as_str()])
            .inc();
        tracing::debug!(
            route = %ctx.name,
            secondary = %self.secondary.url.url,
            idempotency_key = %self.idempotency_key,
            attempts = self.attempts,
            reason = reason.as_str(),
            last_error = self.last_error.as_deref().unwrap_or(""),
            "fanout copy dead-lettered"
        );
        let meta = RecordMeta {
            accepted_at_ms: spool::unix_millis(self.accepted_at),
            dead_lettered_at_ms: spool::unix_millis(SystemTime::now()),
            attempts: self.attempts,
            http_version: match self.prepared.proto {
                super::client::Proto::Http1 => 1,
                super::client::Proto::Http2 => 2,
            },
            route: ctx.name.clone(),
            secondary: self.secondary.url.url.clone(),
            reason: reason.as_str().to_string(),
            method: self.prepared.method.to_string(),
            url: self.prepared.url(),
            idempotency_key: self.idempotency_key.clone(),
            first_error: self.first_error.clone().unwrap_or_default(),
            last_error: self.last_error.clone().unwrap_or_default(),
            headers: spool::header_pairs(&self.prepared.headers),
            trailers: self.body.trailers.as_ref().map(spool::header_pairs),
        };
        let body = match &self.body.data {
            BodyData::Memory(chunks) => LetterBody::Memory(chunks.clone()),
            BodyData::File(file) => LetterBody::File(Arc::clone(file)),
        };
        ctx.spool.submit(DeadLetter { meta, body });
    }
}

impl Drop for FanoutCopy {
    fn drop(&mut self) {
        if !self.settled {
            self.spool(DeadLetterReason::Shutdown);
        }
    }
}

// === impl CopyBody ===

impl CopyBody {
    fn len(&self) -> u64 {
        match &self.data {
            BodyData::Memory(chunks) => chunks.iter().map(|c| c.len() as u64).sum(),
            BodyData::File(file) => file.len(),
        }
    }

    fn attempt_body(&self) -> std::io::Result<BoxBody> {
        match &self.data {
            BodyData::Memory(chunks) => {
                Ok(BufferedBody::new(chunks.clone(), self.trailers.clone()).boxed_unsync())
            }
            BodyData::File(file) => file_body(file.path(), 0, file.len(), self.trailers.clone()),
        }
    }
}

// === impl Failure ===

impl Failure {
    /// Returns the `outcome` label of a failed attempt.
    fn label(&self) -> &'static str {
        match self {
            Failure::Retryable { class, .. } => class.as_str(),
            Failure::Rejected(status) if status.is_client_error() => "4xx",
            Failure::Rejected(status) if status.is_redirection() => "3xx",
            Failure::Rejected(_) => "other",
        }
    }
}

// === accounting ===

impl Outstanding {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.outstanding.fetch_add(1, Ordering::AcqRel);
        Self {
            shared: Arc::clone(shared),
        }
    }
}

impl Drop for Outstanding {
    fn drop(&mut self) {
        if self.shared.outstanding.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.settled.notify_waiters();
        }
    }
}

impl Drop for DueCopies {
    fn drop(&mut self) {
        if let Some(reason) = self.reason {
            for _ in 0..self.count {
                self.ctx.metrics.record_shed(&self.ctx.name, MODE, reason);
            }
        }
    }
}
