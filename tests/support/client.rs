//! HTTP/1.1 and HTTP/2 (prior knowledge) clients that talk to the proxy,
//! and the request bodies the tests send.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::{Sha256Stream, TaskGuard};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = BoxBody<Bytes, BoxError>;

pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// Returns a body of unknown length, which HTTP/1.1 sends with chunked
/// framing. Each element of `chunks` is one data frame, then come the
/// trailers if any.
pub fn streamed(chunks: Vec<Bytes>, trailers: Option<HeaderMap>) -> TestBody {
    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> =
        chunks.into_iter().map(|c| Ok(Frame::data(c))).collect();
    if let Some(trailers) = trailers {
        frames.push(Ok(Frame::trailers(trailers)));
    }
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

/// Bytes of a deterministic test upload, generated chunk by chunk so that a
/// large body never sits in memory whole.
#[derive(Clone)]
pub struct PatternUpload {
    pub len: u64,
    pattern: Bytes,
}

impl PatternUpload {
    const CHUNK_LEN: usize = 64 * 1024;

    pub fn new(len: u64) -> Self {
        let pattern = (0..Self::CHUNK_LEN)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>();
        Self {
            len,
            pattern: Bytes::from(pattern),
        }
    }

    fn chunk(&self, index: u64) -> Bytes {
        let offset = index * Self::CHUNK_LEN as u64;
        let len = (self.len - offset).min(Self::CHUNK_LEN as u64) as usize;
        // Each chunk differs in its first 8 bytes, so a lost, repeated or
        // reordered chunk changes the hash.
        let mut data = self.pattern[..len].to_vec();
        let stamp = index.to_le_bytes();
        let stamped = len.min(stamp.len());
        data[..stamped].copy_from_slice(&stamp[..stamped]);
        Bytes::from(data)
    }

    fn chunk_count(&self) -> u64 {
        self.len.div_ceil(Self::CHUNK_LEN as u64)
    }

    /// Returns the sha256 of the whole upload as lower-case hex.
    pub fn sha256(&self) -> String {
        let mut hasher = Sha256Stream::new();
        for index in 0..self.chunk_count() {
            hasher.update(&self.chunk(index));
        }
        hasher.finish()
    }

    /// Returns the upload as a streamed body (chunked on HTTP/1.1 unless the
    /// request carries a Content-Length).
    pub fn body(&self) -> TestBody {
        let upload = self.clone();
        let frames = futures_util::stream::unfold(0u64, move |index| {
            let upload = upload.clone();
            async move {
                (index < upload.chunk_count()).then(|| {
                    (
                        Ok::<_, BoxError>(Frame::data(upload.chunk(index))),
                        index + 1,
                    )
                })
            }
        });
        StreamBody::new(frames).boxed()
    }
}

/// A response read to its end.
#[derive(Debug)]
pub struct Collected {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Collected {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Parses the body as the JSON echo of a recording server.
    pub fn echo(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "expected a JSON echo body, got {error}: {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Reads a response to its end; fails the test when the body fails.
pub async fn collect(response: Response<Incoming>) -> Collected {
    let (parts, body) = response.into_parts();
    let collected = body
        .collect()
        .await
        .expect("expected the response body to arrive whole");
    let trailers = collected.trailers().cloned();
    Collected {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

/// One HTTP/1.1 keep-alive connection.
pub struct H1Conn {
    sender: http1::SendRequest<TestBody>,
    _connection: TaskGuard,
}

impl H1Conn {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|error| panic!("expected to connect to {addr}: {error}"));
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake needs no I/O and succeeds");
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Self {
            sender,
            _connection: TaskGuard(task),
        }
    }

    /// Sends a request and returns the response head without reading the
    /// body, or the client error.
    pub async fn try_send(
        &mut self,
        request: Request<TestBody>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        self.sender.ready().await?;
        self.sender.send_request(request).await
    }

    /// Sends a request and reads the whole response.
    pub async fn send(&mut self, request: Request<TestBody>) -> Collected {
        let response = self
            .try_send(request)
            .await
            .expect("expected the proxy to answer the request");
        collect(response).await
    }
}

/// One HTTP/2 connection (prior knowledge, no TLS). The sender is cheap to
/// clone for concurrent streams.
pub struct H2Conn {
    sender: http2::SendRequest<TestBody>,
    _connection: TaskGuard,
}

impl H2Conn {
    pub async fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|error| panic!("expected to connect to {addr}: {error}"));
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .expect("expected the HTTP/2 handshake with the proxy to succeed");
        let task = tokio::spawn(async move {
            let _ = connection.await;
        });
        Self {
            sender,
            _connection: TaskGuard(task),
        }
    }

    pub fn sender(&self) -> http2::SendRequest<TestBody> {
        self.sender.clone()
    }

    /// Sends a request on a new stream and reads the whole response.
    pub async fn send(&self, request: Request<TestBody>) -> Collected {
        send_h2(self.sender(), request).await
    }
}

/// Sends a request on a new stream of an HTTP/2 connection.
pub async fn send_h2(
    mut sender: http2::SendRequest<TestBody>,
    request: Request<TestBody>,
) -> Collected {
    sender
        .ready()
        .await
        .expect("expected the HTTP/2 connection to accept a stream");
    let response = sender
        .send_request(request)
        .await
        .expect("expected the proxy to answer the HTTP/2 request");
    collect(response).await
}

/// Sends one request on a new HTTP/1.1 connection.
pub async fn send(addr: SocketAddr, request: Request<TestBody>) -> Collected {
    H1Conn::connect(addr).await.send(request).await
}

/// Sends `GET path` on a new HTTP/1.1 connection.
pub async fn get(addr: SocketAddr, path: &str) -> Collected {
    let request = Request::get(path)
        .header("host", addr.to_string())
        .body(empty())
        .expect("valid request");
    send(addr, request).await
}
