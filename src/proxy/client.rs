//! Upstream HTTP client with a connection pool keyed by socket address.
//!
//! hyper-util's pooled client keys connections by the request URI's
//! authority and dials that authority. A transparent proxy must instead dial
//! the original destination address while the request keeps the authority
//! the application wrote. So this client pools hyper connections per
//! [`Endpoint`] itself. It keeps idle HTTP/1.1 senders in a list and one
//! shared multiplexed sender per HTTP/2 endpoint.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// Idle HTTP/1.1 connections kept per endpoint. Beyond it, a connection that
/// becomes idle is closed.
const MAX_IDLE_PER_ENDPOINT: usize = 256;
/// Idle pooled connections older than this are closed instead of reused, to
/// stay below common upstream keep-alive timeouts (nginx: 75s, Node.js: 5s
/// since v19 is shorter, which the retry on a stale connection covers).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// HTTP version spoken to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Http1,
    Http2,
}

/// Connection target: socket address, TLS server name and protocol.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// TLS server name; `None` for plain text.
    pub tls: Option<ServerName<'static>>,
    pub proto: Proto,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connection to {addr} timed out after {timeout:?}")]
    ConnectTimeout { addr: SocketAddr, timeout: Duration },
    #[error("failed to connect to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("request to {addr} failed: {source}")]
    Http {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl ClientError {
    /// True when no connection could be made at all.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            ClientError::ConnectTimeout { .. }
                | ClientError::Connect { .. }
                | ClientError::Tls { .. }
                | ClientError::Handshake { .. }
        )
    }
}

#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    connect_timeout: Duration,
    /// Fixed HTTP/1.1 read buffer size; `None` lets hyper size it.
    read_buffer_bytes: Option<usize>,
    tls_http1: TlsConnector,
    tls_http2: TlsConnector,
    idle: Mutex<HashMap<Endpoint, Vec<IdleSender>>>,
    shared_h2: Mutex<HashMap<Endpoint, http2::SendRequest<BoxBody>>>,
}

struct IdleSender {
    sender: http1::SendRequest<BoxBody>,
    since: Instant,
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

// === impl Client ===

impl Client {
    /// Returns a client with its own pool. Its HTTP/1.1 connections read into
    /// a fixed buffer of `bytes`, while hyper's default buffer starts at
    /// 8 KiB and grows. Meant for responses that are read only to be
    /// discarded, where many idle connections would each keep a larger buffer.
    pub fn with_read_buffer(
        connect_timeout: Duration,
        tls: &rustls::ClientConfig,
        bytes: usize,
    ) -> Self {
        let client = Self::new(connect_timeout, tls);
        let mut inner = Arc::into_inner(client.inner).expect("a new client is not shared");
        inner.read_buffer_bytes = Some(bytes);
        Self {
            inner: Arc::new(inner),
        }
    }

    pub fn connect_timeout(&self) -> Duration {
        self.inner.connect_timeout
    }

    pub fn new(connect_timeout: Duration, tls: &rustls::ClientConfig) -> Self {
        // ALPN must offer only the protocol this client will speak on the
        // connection, or a server could pick one the pool does not expect.
        let with_alpn = |protocol: &[u8]| {
            let mut config = tls.clone();
            config.alpn_protocols = vec![protocol.to_vec()];
            TlsConnector::from(Arc::new(config))
        };
        Self {
            inner: Arc::new(Inner {
                connect_timeout,
                read_buffer_bytes: None,
                tls_http1: with_alpn(b"http/1.1"),
                tls_http2: with_alpn(b"h2"),
                idle: Mutex::default(),
                shared_h2: Mutex::default(),
            }),
        }
    }

    /// Sends `request` over a pooled or new connection to `endpoint`. The
    /// request URI must already be in the form the protocol needs: origin
    /// form for HTTP/1.1, absolute form for HTTP/2.
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        request: Request<BoxBody>,
    ) -> Result<Response<Incoming>, ClientError> {
        match endpoint.proto {
            Proto::Http1 => self.send_http1(endpoint, request).await,
            Proto::Http2 => self.send_http2(endpoint, request).await,
        }
    }

    async fn send_http1(
        &self,
        endpoint: &Endpoint,
        mut request: Request<BoxBody>,
    ) -> Result<Response<Incoming>, ClientError> {
        let addr = endpoint.addr;
        // A pooled connection may have been closed by the upstream while it
        // sat idle. hyper hands the request back when it was not written, so
        // it can go out on another connection unchanged.
        while let Some(mut sender) = self.checkout_http1(endpoint) {
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.checkin_http1_when_ready(endpoint.clone(), sender);
                    return Ok(response);
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) => request = unsent,
                    None => {
                        return Err(ClientError::Http {
                            addr,
                            source: error.into_error(),
                        })
                    }
                },
            }
        }

        let io = self.connect(endpoint).await?;
        let (mut sender, connection) = http1::Builder::new()
            .read_buf_exact_size(self.inner.read_buffer_bytes)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| ClientError::Handshake { addr, source })?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %addr, "upstream connection closed with an error");
            }
        });
        let response = sender
            .send_request(request)
            .await
            .map_err(|source| ClientError::Http { addr, source })?;
        self.checkin_http1_when_ready(endpoint.clone(), sender);
        Ok(response)
    }

    fn checkout_http1(&self, endpoint: &Endpoint) -> Option<http1::SendRequest<BoxBody>> {
        let mut idle = self.inner.idle.lock().expect("pool lock is never poisoned");
        let senders = idle.get_mut(endpoint)?;
        while let Some(IdleSender { sender, since }) = senders.pop() {
            if !sender.is_closed() && sender.is_ready() && since.elapsed() < IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }

    /// Returns the connection to the pool once its response body has been
    /// read, which is when HTTP/1.1 can send the next request on it.
    fn checkin_http1_when_ready(
        &self,
        endpoint: Endpoint,
        mut sender: http1::SendRequest<BoxBody>,
    ) {
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            if sender.ready().await.is_err() {
                return;
            }
            let mut idle = inner.idle.lock().expect("pool lock is never poisoned");
            let senders = idle.entry(endpoint).or_default();
            senders.retain(|idle| !idle.sender.is_closed());
            if senders.len() < MAX_IDLE_PER_ENDPOINT {
                senders.push(IdleSender {
                    sender,
                    since: Instant::now(),
                });
            }
        });
    }

    async fn send_http2(
        &self,
        endpoint: &Endpoint,
        request: Request<BoxBody>,
    ) -> Result<Response<Incoming>, ClientError> {
        let addr = endpoint.addr;
        let mut sender = match self.checkout_http2(endpoint) {
            Some(sender) => sender,
            None => {
                let io = self.connect(endpoint).await?;
                let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|source| ClientError::Handshake { addr, source })?;
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, %addr, "upstream connection closed with an error");
                    }
                });
                self.inner
                    .shared_h2
                    .lock()
                    .expect("pool lock is never poisoned")
                    .insert(endpoint.clone(), sender.clone());
                sender
            }
        };
        sender
            .send_request(request)
            .await
            .map_err(|source| ClientError::Http { addr, source })
    }

    fn checkout_http2(&self, endpoint: &Endpoint) -> Option<http2::SendRequest<BoxBody>> {
        let mut shared = self
            .inner
            .shared_h2
            .lock()
            .expect("pool lock is never poisoned");
        match shared.get(endpoint) {
            Some(sender) if !sender.is_closed() && sender.is_ready() => Some(sender.clone()),
            Some(_) => {
                shared.remove(endpoint);
                None
            }
            None => None,
        }
    }

    async fn connect(&self, endpoint: &Endpoint) -> Result<Box<dyn Io>, ClientError> {
        let addr = endpoint.addr;
        let timeout = self.inner.connect_timeout;
        let stream = connect_tcp(addr, timeout).await?;

        let Some(server_name) = endpoint.tls.clone() else {
            return Ok(Box::new(stream));
        };
        let connector = match endpoint.proto {
            Proto::Http1 => &self.inner.tls_http1,
            Proto::Http2 => &self.inner.tls_http2,
        };
        let handshake = connector.connect(server_name, stream);
        let tls = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| ClientError::ConnectTimeout { addr, timeout })?
            .map_err(|source| ClientError::Tls { addr, source })?;
        Ok(Box::new(tls))
    }
}

/// Opens a TCP connection with `timeout` on the whole attempt.
pub async fn connect_tcp(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ClientError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| ClientError::ConnectTimeout { addr, timeout })?
        .map_err(|source| ClientError::Connect { addr, source })?;
    // Requests are small writes that must leave at once.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Builds the TLS client settings for `https://` secondaries: the Mozilla
/// root store plus `extra_roots` (for private CAs).
pub fn tls_config(
    extra_roots: &[rustls::pki_types::CertificateDer<'static>],
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let (_, ignored) = roots.add_parsable_certificates(extra_roots.iter().cloned());
    if ignored > 0 {
        tracing::warn!(ignored, "ignored trust roots that failed to parse");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}
