//! Test servers, a client and metric helpers shared by the fanout, compare
//! and dlq tests. Every server listens on 127.0.0.1.

#![allow(dead_code)]

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    task::JoinHandle,
};

/// A request as a test server received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    }

    pub fn sha256(&self) -> String {
        sha256(&self.body)
    }
}

/// What a test server does with a request.
pub enum Reply {
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    /// Returns 200 only once the test calls [`TestServer::release`].
    Hang,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply::Respond {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn with_header(status: u16, name: &str, value: &str) -> Reply {
        Reply::Respond {
            status,
            headers: vec![(name.to_string(), value.to_string())],
            body: Bytes::new(),
        }
    }

    pub fn json(status: u16, body: &str) -> Reply {
        Reply::Respond {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from(body.to_string()),
        }
    }
}

/// Decides the reply to the request with this 0-based index.
pub type Handler = Arc<dyn Fn(&Received, usize) -> Reply + Send + Sync>;

pub fn handler(f: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static) -> Handler {
    Arc::new(f)
}

/// An HTTP/1.1 server on 127.0.0.1 that records what it receives.
pub struct TestServer {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    released: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl TestServer {
    pub async fn start(handler: Handler) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, handler)
    }

    /// Starts on a given address, such as one a secondary was down on.
    pub async fn start_on(addr: SocketAddr, handler: Handler) -> TestServer {
        let listener = TcpListener::bind(addr).await.unwrap();
        Self::serve(listener, handler)
    }

    fn serve(listener: TcpListener, handler: Handler) -> TestServer {
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let (released, _) = watch::channel(false);
        let state = (Arc::clone(&received), released.clone(), handler);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (received, released, handler) = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let received = Arc::clone(&received);
                        let released = released.subscribe();
                        let handler = Arc::clone(&handler);
                        async move {
                            Ok::<_, Infallible>(answer(request, received, released, handler).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        TestServer {
            addr,
            received,
            released,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until at least `count` requests arrived, for up to 20 s.
    pub async fn wait_for(&self, count: usize) -> Vec<Received> {
        wait_until(&format!("{count} requests at {}", self.addr), || {
            self.received.lock().unwrap().len() >= count
        })
        .await;
        self.received()
    }

    /// Makes every hanging request, now and later, get its 200 response.
    pub fn release(&self) {
        let _ = self.released.send(true);
    }

    /// Stops accepting. Connections already open keep being served.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    request: Request<Incoming>,
    received: Arc<Mutex<Vec<Received>>>,
    mut released: watch::Receiver<bool>,
    handler: Handler,
) -> Response<Full<Bytes>> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let request = Received {
        method: parts.method.to_string(),
        path: parts
            .uri
            .path_and_query()
            .map_or("/".to_string(), |pq| pq.to_string()),
        headers: parts.headers,
        body,
        at: Instant::now(),
    };
    let index = {
        let mut all = received.lock().unwrap();
        all.push(request.clone());
        all.len() - 1
    };
    match handler(&request, index) {
        Reply::Respond {
            status,
            headers,
            body,
        } => {
            let mut response = Response::new(Full::new(body));
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            for (name, value) in headers {
                response.headers_mut().append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value.parse().unwrap(),
                );
            }
            response
        }
        Reply::Hang => {
            let _ = released.wait_for(|released| *released).await;
            Response::new(Full::new(Bytes::new()))
        }
    }
}

/// A TCP front that resets its first `resets` connections after reading
/// `after_bytes` of the request, and relays later ones to `backend`.
pub struct ResetFront {
    pub addr: SocketAddr,
    pub resets_done: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl ResetFront {
    pub async fn start(backend: SocketAddr, resets: usize, after_bytes: usize) -> ResetFront {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let resets_done = Arc::new(AtomicUsize::new(0));
        let done = Arc::clone(&resets_done);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                if done.load(Ordering::SeqCst) < resets {
                    let mut buffer = vec![0u8; after_bytes];
                    let _ = stream.read_exact(&mut buffer).await;
                    // SO_LINGER 0 makes the close send RST instead of FIN.
                    let socket = socket2::SockRef::from(&stream);
                    let _ = socket.set_linger(Some(Duration::ZERO));
                    drop(stream);
                    done.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut upstream) = TcpStream::connect(backend).await {
                        let _ = tokio::io::copy_bidirectional(&mut stream, &mut upstream).await;
                    }
                });
            }
        });
        ResetFront {
            addr,
            resets_done,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ResetFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A complete response from the proxy.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Sends one request over a new HTTP/1.1 connection to `proxy` and reads
/// the whole response.
pub async fn send(
    proxy: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let stream = TcpStream::connect(proxy).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "primary.test");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(Full::new(body.into())).unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Sends a GET to the admin listener and returns status and body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> (StatusCode, String) {
    let answer = send(admin, "GET", path, &[], Bytes::new()).await;
    (
        answer.status,
        String::from_utf8_lossy(&answer.body).into_owned(),
    )
}

/// Sums the samples of metric `name` whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, l)) => (n, l),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}

/// Polls `condition` every 10 ms for up to 20 s, then fails naming `what`.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Pseudo-random bytes, different for each `seed`.
pub fn random_body(len: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// Returns an address on 127.0.0.1 with nothing listening on it.
pub async fn unused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "tandem-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Reads the valid records of a spool directory.
pub fn spool_records(dir: &Path) -> Vec<tandem::spool::RecordEntry> {
    let path = tandem::spool::spool_path(dir);
    let reader = tandem::spool::SpoolReader::open(&path).unwrap();
    let end = reader.len().unwrap();
    reader
        .scan(end)
        .unwrap()
        .into_iter()
        .filter_map(|entry| match entry {
            tandem::spool::Entry::Record(record) => Some(*record),
            tandem::spool::Entry::Corrupt(_) => None,
        })
        .collect()
}

/// Writes `bytes` to a file in `dir` and returns its path.
pub async fn write_file(dir: &Path, name: &str, bytes: &str) -> PathBuf {
    let path = dir.join(name);
    let mut file = tokio::fs::File::create(&path).await.unwrap();
    file.write_all(bytes.as_bytes()).await.unwrap();
    path
}
