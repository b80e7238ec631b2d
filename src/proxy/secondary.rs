//! A fanout secondary's address and the requests sent to it, shared by the
//! fanout workers and `tandem dlq replay`.

use std::{
    io::{self, Seek},
    net::SocketAddr,
    path::Path,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::routes::Mode;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{
    header,
    uri::{Authority, Scheme},
    HeaderMap, HeaderValue, Method, Request, Version,
};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio_util::io::ReaderStream;

use super::{
    client::{BoxBody, BoxError, Endpoint, Proto},
    forward::upstream_uri,
};

/// Header that numbers the attempts of one fanout copy, from 1.
pub const ATTEMPT_HEADER: &str = "tandem-attempt";
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Resolved addresses are reused for this long, so a copy does not pay a
/// DNS lookup, while a changed record is still picked up soon.
const RESOLVE_TTL: Duration = Duration::from_secs(5);

/// A secondary's base URL, parsed.
pub struct SecondaryUrl {
    /// The URL as configured, also the `secondary` metric label.
    pub url: String,
    scheme: Scheme,
    authority: Authority,
    host: String,
    port: u16,
    path_prefix: String,
    tls: Option<ServerName<'static>>,
    resolved: Mutex<Option<(Vec<SocketAddr>, Instant)>>,
}

/// Everything of a copy's request except its body and attempt number.
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    pub method: Method,
    pub proto: Proto,
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path and query on the secondary, its path prefix included.
    pub path_and_query: String,
    pub headers: HeaderMap,
}

/// Length and trailers of the body a copy carries, which set its framing.
#[derive(Debug, Clone, Copy)]
pub struct BodyShape {
    pub len: u64,
    pub has_trailers: bool,
}

/// The parts of a client request that a copy repeats.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    pub path_and_query: String,
    pub version: Version,
    pub headers: HeaderMap,
    /// The authority the application addressed, for `preserve_host`.
    pub authority: Option<Authority>,
    pub had_content_length: bool,
}

// === impl RequestHead ===

impl RequestHead {
    /// Copies the parts of `request` that a copy repeats.
    pub fn of<B>(request: &Request<B>) -> Self {
        Self {
            method: request.method().clone(),
            path_and_query: request
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_string(), |pq| pq.as_str().to_string()),
            version: request.version(),
            headers: request.headers().clone(),
            authority: request.uri().authority().cloned(),
            had_content_length: request.headers().contains_key(header::CONTENT_LENGTH),
        }
    }
}

// === impl SecondaryUrl ===

impl SecondaryUrl {
    /// Parses an absolute `http://` or `https://` URL.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url
            .parse()
            .map_err(|error| format!("invalid URL {url:?}: {error}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .filter(|s| *s == Scheme::HTTP || *s == Scheme::HTTPS)
            .ok_or_else(|| format!("invalid URL {url:?}: expected http:// or https://"))?;
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("invalid URL {url:?}: expected a host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = if scheme == Scheme::HTTPS {
            Some(
                ServerName::try_from(host.clone())
                    .map_err(|_| format!("invalid URL {url:?}: {host} is not a server name"))?,
            )
        } else {
            None
        };
        let port = authority
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        Ok(Self {
            url: url.to_string(),
            scheme,
            authority,
            host,
            port,
            path_prefix: uri.path().trim_end_matches('/').to_string(),
            tls,
            resolved: Mutex::new(None),
        })
    }

    /// Resolves the host, reusing a lookup for [`RESOLVE_TTL`].
    pub async fn resolve(&self) -> io::Result<SocketAddr> {
        if let Ok(ip) = self.host.parse::<std::net::IpAddr>() {
            return Ok((ip, self.port).into());
        }
        {
            let cached = self.resolved.lock().expect("resolve cache lock");
            if let Some((addrs, at)) = cached.as_ref() {
                if at.elapsed() < RESOLVE_TTL && !addrs.is_empty() {
                    return Ok(addrs[rand::random_range(0..addrs.len())]);
                }
            }
        }
        let addrs: Vec<_> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await?
            .collect();
        let first = *addrs.first().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} has no addresses", self.host),
            )
        })?;
        *self.resolved.lock().expect("resolve cache lock") = Some((addrs, Instant::now()));
        Ok(first)
    }

    pub fn endpoint(&self, addr: SocketAddr, proto: Proto) -> Endpoint {
        Endpoint {
            addr,
            tls: self.tls.clone(),
            proto,
        }
    }

    /// Prepares the copy of a client request for this secondary: the path
    /// prefix, Host or `:authority`, framing headers, the dispatch tag of
    /// `mode` and, for fanout, the idempotency key.
    pub fn prepare(
        &self,
        head: &RequestHead,
        body: BodyShape,
        preserve_host: bool,
        mode: Mode,
        idempotency_key: Option<&HeaderValue>,
    ) -> PreparedRequest {
        let proto = if head.version == Version::HTTP_2 {
            Proto::Http2
        } else {
            Proto::Http1
        };

        let mut headers = head.headers.clone();
        if !preserve_host || !headers.contains_key(header::HOST) {
            headers.remove(header::HOST);
            if proto == Proto::Http1 {
                let host = HeaderValue::from_str(self.authority.as_str())
                    .expect("an authority is a valid header value");
                headers.insert(header::HOST, host);
            }
        }
        let authority = match (proto, preserve_host) {
            (Proto::Http2, true) => head
                .authority
                .clone()
                .unwrap_or_else(|| self.authority.clone()),
            _ => self.authority.clone(),
        };

        // The copy is framed by the body it carries, whatever the original
        // framing was: an exact length when it has no trailers, chunked
        // otherwise (HTTP/1.1 sends trailers only in chunked framing).
        headers.remove(header::TRANSFER_ENCODING);
        headers.remove(header::CONTENT_LENGTH);
        if !body.has_trailers && (body.len > 0 || head.had_content_length) {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len));
        }
        headers.insert(
            crate::config::DISPATCH_HEADER,
            HeaderValue::from_static(mode.as_str()),
        );
        if let Some(key) = idempotency_key {
            headers.insert(IDEMPOTENCY_KEY_HEADER, key.clone());
        }

        PreparedRequest {
            method: head.method.clone(),
            proto,
            scheme: self.scheme.clone(),
            authority,
            path_and_query: format!("{}{}", self.path_prefix, head.path_and_query),
            headers,
        }
    }
}

// === impl PreparedRequest ===

impl PreparedRequest {
    /// Returns the full URL of the request, as stored in dead-letter records.
    pub fn url(&self) -> String {
        format!(
            "{}://{}{}",
            self.scheme, self.authority, self.path_and_query
        )
    }

    /// Builds the request. Fanout numbers its attempts from 1 in the
    /// attempt header; mirror and compare send one request without it.
    pub fn build(&self, attempt: Option<u32>, body: BoxBody) -> Request<BoxBody> {
        let mut request = Request::new(body);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = upstream_uri(
            self.proto,
            &self.scheme,
            &self.authority,
            &self.path_and_query,
        );
        *request.version_mut() = match self.proto {
            Proto::Http1 => Version::HTTP_11,
            Proto::Http2 => Version::HTTP_2,
        };
        let mut headers = self.headers.clone();
        if let Some(attempt) = attempt {
            headers.insert(ATTEMPT_HEADER, HeaderValue::from(attempt));
        }
        *request.headers_mut() = headers;
        request
    }
}

/// Returns a body that streams `len` bytes of the file at `path` from
/// `offset`, then `trailers` if any. The file is opened at once, so a
/// missing file fails here rather than mid-request.
pub fn file_body(
    path: &Path,
    offset: u64,
    len: u64,
    trailers: Option<HeaderMap>,
) -> io::Result<BoxBody> {
    let mut file = std::fs::File::open(path)?;
    file.seek(io::SeekFrom::Start(offset))?;
    let file = tokio::fs::File::from_std(file).take(len);
    let data = ReaderStream::with_capacity(file, 64 * 1024)
        .map(|chunk: io::Result<Bytes>| chunk.map(Frame::data).map_err(BoxError::from));
    let trailers = futures_util::stream::iter(trailers.map(|t| Ok(Frame::trailers(t))));
    Ok(StreamBody::new(data.chain(trailers)).boxed_unsync())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(headers: &[(&str, &str)]) -> RequestHead {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        RequestHead {
            method: Method::POST,
            path_and_query: "/orders?id=7".into(),
            version: Version::HTTP_11,
            headers: map,
            authority: None,
            had_content_length: true,
        }
    }

    #[test]
    fn prepare_sets_fanout_headers() {
        let secondary = SecondaryUrl::parse("http://127.0.0.1:9191/v2/").unwrap();
        let key = HeaderValue::from_static("key-1");
        let body = BodyShape {
            len: 5,
            has_trailers: false,
        };
        let prepared = secondary.prepare(
            &head(&[("host", "orders.svc"), ("transfer-encoding", "chunked")]),
            body,
            false,
            Mode::Fanout,
            Some(&key),
        );
        assert_eq!(prepared.url(), "http://127.0.0.1:9191/v2/orders?id=7");
        assert_eq!(prepared.headers["host"], "127.0.0.1:9191");
        assert_eq!(prepared.headers["content-length"], "5");
        assert!(!prepared.headers.contains_key("transfer-encoding"));
        assert_eq!(prepared.headers["tandem-dispatch"], "fanout");
        assert_eq!(prepared.headers["idempotency-key"], "key-1");

        let request = prepared.build(
            Some(3),
            http_body_util::Empty::new()
                .map_err(|n| match n {})
                .boxed_unsync(),
        );
        assert_eq!(request.headers()[ATTEMPT_HEADER], "3");
        assert_eq!(request.uri(), "/v2/orders?id=7");
    }

    #[test]
    fn preserve_host_keeps_host() {
        let secondary = SecondaryUrl::parse("http://127.0.0.1:9191").unwrap();
        let key = HeaderValue::from_static("k");
        let body = BodyShape {
            len: 0,
            has_trailers: true,
        };
        let prepared = secondary.prepare(
            &head(&[("host", "orders.svc")]),
            body,
            true,
            Mode::Fanout,
            Some(&key),
        );
        assert_eq!(prepared.headers["host"], "orders.svc");
        assert!(
            !prepared.headers.contains_key("content-length"),
            "a body with trailers is sent chunked"
        );
    }

    #[test]
    fn parse_rejects_other_schemes() {
        assert!(SecondaryUrl::parse("ftp://127.0.0.1").is_err());
        assert!(SecondaryUrl::parse("/relative").is_err());
    }
}
