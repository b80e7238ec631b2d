//! Test upstreams: a recording HTTP server that plays the primary or a
//! healthy (or slow, or failing) secondary, and raw TCP listeners for the
//! failures HTTP cannot express: refused, reset and black-holed secondaries.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{
    HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version,
};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinSet,
};

use super::{client::TestBody, Sha256Stream, TaskGuard};

/// Body bytes a recording server keeps per request. Longer bodies are still
/// counted and hashed in full.
pub const MAX_RECORDED_BODY: usize = 1 << 20;

/// How long the `wait_*` helpers wait before failing the test.
const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// One request as a recording server received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    /// The first [`MAX_RECORDED_BODY`] bytes of the body.
    pub body: Bytes,
    pub body_len: u64,
    pub body_sha256: String,
    pub trailers: Option<HeaderMap>,
    /// False when the body ended with an error, such as a sender that
    /// closed the connection early.
    pub complete: bool,
}

impl Recorded {
    /// Returns the first value of `name` as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn path_and_query(&self) -> &str {
        self.uri.path_and_query().map_or("/", |pq| pq.as_str())
    }

    /// Returns the authority the request named: the Host header on
    /// HTTP/1.1, `:authority` on HTTP/2.
    pub fn authority(&self) -> Option<String> {
        match self.uri.authority() {
            Some(authority) => Some(authority.to_string()),
            None => self.header("host").map(str::to_string),
        }
    }
}

/// The response of a recording server. Without a body it returns a JSON
/// echo of the request (method, path, headers, body length and hash).
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Option<Bytes>,
    pub trailers: Option<HeaderMap>,
    /// Time between receiving the whole request and responding.
    pub delay: Duration,
}

impl Default for Reply {
    fn default() -> Self {
        Self {
            status: StatusCode::OK,
            headers: Vec::new(),
            body: None,
            trailers: None,
            delay: Duration::ZERO,
        }
    }
}

/// Builder of a [`TestServer`].
pub struct ServerBuilder {
    bind: SocketAddr,
    reply: Reply,
}

impl ServerBuilder {
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }

    pub fn status(mut self, status: u16) -> Self {
        self.reply.status = StatusCode::from_u16(status).expect("test uses a valid status");
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.reply.headers.push((
            HeaderName::from_bytes(name.as_bytes()).expect("test uses a valid header name"),
            HeaderValue::from_str(value).expect("test uses a valid header value"),
        ));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.reply.body = Some(body.into());
        self
    }

    pub fn trailer(mut self, name: &str, value: &str) -> Self {
        self.reply
            .trailers
            .get_or_insert_with(HeaderMap::new)
            .append(
                HeaderName::from_bytes(name.as_bytes()).expect("test uses a valid trailer name"),
                HeaderValue::from_str(value).expect("test uses a valid trailer value"),
            );
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.reply.delay = delay;
        self
    }

    /// Binds, starts serving HTTP/1.1 and HTTP/2 (prior knowledge) and
    /// returns once the port is bound.
    pub async fn start(self) -> TestServer {
        self.try_start().await.expect("test server binds")
    }

    /// Like [`ServerBuilder::start`], but returns the bind error, for
    /// addresses that may be missing on the machine (such as `::1`).
    pub async fn try_start(self) -> std::io::Result<TestServer> {
        let listener = TcpListener::bind(self.bind).await?;
        let addr = listener.local_addr()?;
        let (count, _) = watch::channel(0);
        let state = Arc::new(State {
            reply: self.reply,
            requests: Mutex::new(Vec::new()),
            count,
        });
        let accept = tokio::spawn(serve(listener, Arc::clone(&state)));
        Ok(TestServer {
            addr,
            state,
            _accept: TaskGuard(accept),
        })
    }
}

/// A recording HTTP server on a loopback port. It stops when dropped.
pub struct TestServer {
    addr: SocketAddr,
    state: Arc<State>,
    _accept: TaskGuard,
}

struct State {
    reply: Reply,
    requests: Mutex<Vec<Recorded>>,
    count: watch::Sender<usize>,
}

impl TestServer {
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            bind: "127.0.0.1:0".parse().expect("valid address"),
            reply: Reply::default(),
        }
    }

    /// Starts a server that responds 200 with a JSON echo of each request.
    pub async fn echo() -> Self {
        Self::builder().start().await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Returns `http://ADDR`, the form a mirror route's `to` takes.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Returns every request received so far, oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state
            .requests
            .lock()
            .expect("request log lock is never poisoned")
            .clone()
    }

    pub fn count(&self) -> usize {
        *self.state.count.borrow()
    }

    /// Waits until at least `n` requests arrived and returns them all;
    /// fails the test after 10 s.
    pub async fn wait_for_requests(&self, n: usize) -> Vec<Recorded> {
        let mut count = self.state.count.subscribe();
        let reached = tokio::time::timeout(WAIT_LIMIT, count.wait_for(|c| *c >= n)).await;
        assert!(
            reached.is_ok(),
            "expected at least {n} requests at {} within {WAIT_LIMIT:?}, got {}",
            self.addr,
            self.count()
        );
        self.requests()
    }

    /// Waits for the first request and returns it.
    pub async fn wait_for_one(&self) -> Recorded {
        self.wait_for_requests(1).await.remove(0)
    }
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(respond(&state, request).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().timer(TokioTimer::new());
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

async fn respond(state: &State, request: Request<Incoming>) -> Response<TestBody> {
    let recorded = record(request).await;
    let echo = echo_json(&recorded);
    {
        let mut requests = state
            .requests
            .lock()
            .expect("request log lock is never poisoned");
        requests.push(recorded);
        state.count.send_replace(requests.len());
    }

    let reply = &state.reply;
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let body = reply.body.clone().unwrap_or(echo);
    let body = match &reply.trailers {
        None => Full::new(body).map_err(|never| match never {}).boxed(),
        Some(trailers) => {
            let frames = vec![
                Ok::<_, super::client::BoxError>(Frame::data(body)),
                Ok(Frame::trailers(trailers.clone())),
            ];
            StreamBody::new(futures_util::stream::iter(frames)).boxed()
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = reply.status;
    if reply.body.is_none() {
        response
            .headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
    }
    for (name, value) in &reply.headers {
        response.headers_mut().append(name.clone(), value.clone());
    }
    response
}

/// Reads the whole request, hashing the body as it streams so that large
/// uploads are never held in memory.
async fn record(request: Request<Incoming>) -> Recorded {
    let (parts, mut body) = request.into_parts();
    let mut hasher = Sha256Stream::new();
    let mut kept = BytesMut::new();
    let mut body_len = 0u64;
    let mut trailers = None;
    let mut complete = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    hasher.update(data);
                    body_len += data.len() as u64;
                    let room = MAX_RECORDED_BODY.saturating_sub(kept.len());
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                } else if let Some(map) = frame.trailers_ref() {
                    trailers = Some(map.clone());
                }
            }
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    Recorded {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers: parts.headers,
        body: kept.freeze(),
        body_len,
        body_sha256: hasher.finish(),
        trailers,
        complete,
    }
}

fn echo_json(recorded: &Recorded) -> Bytes {
    let headers: serde_json::Map<String, serde_json::Value> = recorded
        .headers
        .keys()
        .map(|name| {
            let values: Vec<serde_json::Value> = recorded
                .headers
                .get_all(name)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
                .collect();
            (name.to_string(), values.into())
        })
        .collect();
    let echo = serde_json::json!({
        "method": recorded.method.as_str(),
        "path": recorded.path_and_query(),
        "version": format!("{:?}", recorded.version),
        "headers": headers,
        "body_len": recorded.body_len,
        "body_sha256": recorded.body_sha256,
    });
    Bytes::from(serde_json::to_vec(&echo).expect("echo serializes"))
}

/// Returns a loopback address whose port was free a moment ago, so that
/// connecting to it is refused.
pub fn refused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

/// A secondary that accepts connections and keeps them open without ever
/// reading or responding.
pub struct BlackHole {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<TcpStream>>>,
    _accept: TaskGuard,
}

impl BlackHole {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let connections = Arc::new(Mutex::new(Vec::new()));
        let sockets = Arc::clone(&connections);
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                sockets
                    .lock()
                    .expect("socket list lock is never poisoned")
                    .push(stream);
            }
        });
        Self {
            addr,
            connections,
            _accept: TaskGuard(accept),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.connections
            .lock()
            .expect("socket list lock is never poisoned")
            .len()
    }
}

/// A secondary that reads the request head, then resets the connection
/// (SO_LINGER 0 and close) without responding.
pub struct Resetter {
    addr: SocketAddr,
    _accept: TaskGuard,
}

impl Resetter {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let accept = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                connections.spawn(async move {
                    let mut head = Vec::new();
                    let mut buffer = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&buffer[..n]),
                        }
                    }
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    drop(stream);
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            _accept: TaskGuard(accept),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A TCP echo server: every byte received is written back.
pub struct EchoServer {
    addr: SocketAddr,
    _accept: TaskGuard,
}

impl EchoServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let accept = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(async move {
                    let (mut read, mut write) = stream.into_split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self {
            addr,
            _accept: TaskGuard(accept),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}
