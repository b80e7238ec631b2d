//! The fanout tee: captures a request body in memory, or in a body file
//! once it outgrows `max_body_bytes`, and queues the copies when the body
//! is complete.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    task::{Context, Poll},
    time::SystemTime,
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use tokio::{
    io::AsyncWriteExt,
    sync::{mpsc, oneshot},
};
use tokio_util::sync::PollSender;

use super::{BodyData, CopyBody, DueCopies, FanoutRoute, Outstanding};
use crate::{
    proxy::{metrics::ShedReason, mirror::CopySink, secondary::RequestHead},
    spool::BodyFile,
};

/// Batches of frames buffered between the tee and the body file writer.
/// When the writer falls this far behind, the primary body waits for it.
const SPILL_QUEUE_BATCHES: usize = 16;

pub(in crate::proxy) struct FanoutSink {
    route: Arc<FanoutRoute>,
    head: Option<RequestHead>,
    idempotency_key: HeaderValue,
    accepted_at: SystemTime,
    state: State,
    trailers: Option<HeaderMap>,
    /// The copies' accounting, until it moves to the body file writer or to
    /// the queues.
    due: Option<DueCopies>,
}

enum State {
    Memory {
        chunks: Vec<Bytes>,
        len: usize,
    },
    /// The body goes to a file written by a task of its own.
    Spilling {
        data: PollSender<Vec<Bytes>>,
        done: Option<oneshot::Sender<Option<HeaderMap>>>,
    },
    /// The body file writer stopped; its task recorded why.
    Failed,
}

impl FanoutSink {
    pub(super) fn new(
        route: Arc<FanoutRoute>,
        head: RequestHead,
        idempotency_key: HeaderValue,
        due: DueCopies,
    ) -> Self {
        Self {
            route,
            head: Some(head),
            idempotency_key,
            accepted_at: SystemTime::now(),
            state: State::Memory {
                chunks: Vec::new(),
                len: 0,
            },
            trailers: None,
            due: Some(due),
        }
    }

    /// Completes a copy whose request has no body.
    pub(super) fn finish_now(self: Box<Self>) {
        CopySink::finish(self);
    }

    /// Hands the buffered chunks and every later frame to a task that
    /// writes them to a body file.
    fn start_spill(&mut self, chunks: Vec<Bytes>) {
        let ctx = &self.route.ctx;
        let path = ctx
            .spool
            .body_dir()
            .join(format!("{}.body", uuid::Uuid::new_v4()));
        let (sender, receiver) = mpsc::channel(SPILL_QUEUE_BATCHES);
        sender
            .try_send(chunks)
            .unwrap_or_else(|_| unreachable!("a new channel has room"));
        let (done, done_receiver) = oneshot::channel();
        let job = SpillJob {
            route: Arc::clone(&self.route),
            path,
            head: self
                .head
                .take()
                .expect("the head stays until the copy starts"),
            idempotency_key: self.idempotency_key.clone(),
            accepted_at: self.accepted_at,
            due: self
                .due
                .take()
                .expect("the accounting stays until handed over"),
            _outstanding: Outstanding::new(&ctx.shared),
        };
        ctx.shared.tasks.spawn(job.run(receiver, done_receiver));
        self.state = State::Spilling {
            data: PollSender::new(sender),
            done: Some(done),
        };
    }
}

impl CopySink for FanoutSink {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let State::Spilling { data, .. } = &mut self.state else {
            return Poll::Ready(());
        };
        match data.poll_reserve(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Ready(Err(_)) => {
                self.state = State::Failed;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn push(&mut self, frame: &Frame<Bytes>) -> bool {
        if let Some(trailers) = frame.trailers_ref() {
            self.trailers = Some(trailers.clone());
            return true;
        }
        let Some(data) = frame.data_ref() else {
            return true;
        };
        let limit = self.route.ctx.config.max_body_bytes;
        match &mut self.state {
            State::Memory { chunks, len } => {
                *len += data.len();
                if !data.is_empty() {
                    chunks.push(data.clone());
                }
                if *len > limit {
                    let chunks = std::mem::take(chunks);
                    self.start_spill(chunks);
                }
                true
            }
            State::Spilling { data: sender, .. } => {
                data.is_empty() || sender.send_item(vec![data.clone()]).is_ok()
            }
            State::Failed => false,
        }
    }

    fn finish(self: Box<Self>) {
        let mut this = *self;
        match std::mem::replace(&mut this.state, State::Failed) {
            State::Memory { chunks, .. } => {
                let body = CopyBody {
                    data: BodyData::Memory(chunks),
                    trailers: this.trailers.take(),
                    queued: None,
                };
                let head = this
                    .head
                    .take()
                    .expect("the head stays until the copy starts");
                let due = this
                    .due
                    .take()
                    .expect("the accounting stays until handed over");
                this.route.enqueue(
                    head,
                    body,
                    this.idempotency_key.clone(),
                    this.accepted_at,
                    due,
                );
            }
            State::Spilling { data, done } => {
                // The trailers go first: the writer checks for them once
                // the data channel closes.
                if let Some(done) = done {
                    let _ = done.send(this.trailers.take());
                }
                drop(data);
            }
            State::Failed => {}
        }
    }
}

/// A body file being written, and what to queue once it is complete.
struct SpillJob {
    route: Arc<FanoutRoute>,
    path: PathBuf,
    head: RequestHead,
    idempotency_key: HeaderValue,
    accepted_at: SystemTime,
    due: DueCopies,
    _outstanding: Outstanding,
}

impl SpillJob {
    async fn run(
        mut self,
        mut data: mpsc::Receiver<Vec<Bytes>>,
        done: oneshot::Receiver<Option<HeaderMap>>,
    ) {
        let ctx = Arc::clone(&self.route.ctx);
        let deadline = ctx.shared.deadline.clone();
        let written = tokio::select! {
            written = write_body_file(&self.path, &mut data) => written,
            // A body still arriving at the drain deadline never completes.
            _ = deadline.cancelled() => {
                remove(&self.path).await;
                return;
            }
        };
        let len = match written {
            Ok(len) => len,
            Err(error) => {
                ctx.metrics.fanout().spool_write_errors.inc();
                tracing::error!(
                    %error,
                    path = %self.path.display(),
                    route = %ctx.name,
                    "failed to write a request body to the spool directory; its fanout \
                     copies are shed"
                );
                self.due.reason = Some(ShedReason::SpoolFailed);
                remove(&self.path).await;
                return;
            }
        };
        match done.await {
            Ok(trailers) => {
                let body = CopyBody {
                    data: BodyData::File(Arc::new(BodyFile::new(self.path, len))),
                    trailers,
                    queued: None,
                };
                self.route.enqueue(
                    self.head,
                    body,
                    self.idempotency_key,
                    self.accepted_at,
                    self.due,
                );
            }
            // The request body ended early; dropping `due` records it.
            Err(_) => remove(&self.path).await,
        }
    }
}

async fn write_body_file(
    path: &Path,
    data: &mut mpsc::Receiver<Vec<Bytes>>,
) -> std::io::Result<u64> {
    let mut file = tokio::fs::File::create(path).await?;
    let mut len = 0;
    while let Some(chunks) = data.recv().await {
        for chunk in chunks {
            file.write_all(&chunk).await?;
            len += chunk.len() as u64;
        }
    }
    file.flush().await?;
    Ok(len)
}

async fn remove(path: &Path) {
    let _ = tokio::fs::remove_file(path).await;
}
