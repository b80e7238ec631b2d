//! The innermost step: sends the routed primary request upstream and
//! returns the upstream response with hop-by-hop headers removed.

use std::{
    net::SocketAddr,
    task::{Context, Poll},
};

use http::{
    header,
    uri::{Authority, PathAndQuery, Scheme},
    HeaderValue, Request, Response, Uri, Version,
};
use http_body_util::BodyExt;

use super::{
    client::{BoxBody, Client, Endpoint, Proto},
    errors::ProxyError,
    headers::strip_hop_by_hop,
    target::{BoxFuture, Destination, Target},
};

#[derive(Clone)]
pub struct Forward {
    client: Client,
    listen: SocketAddr,
}

impl Forward {
    pub fn new(client: Client, listen: SocketAddr) -> Self {
        Self { client, listen }
    }
}

impl tower::Service<Request<BoxBody>> for Forward {
    type Response = Response<BoxBody>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Response<BoxBody>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<BoxBody>) -> Self::Future {
        let client = self.client.clone();
        let listen = self.listen;
        Box::pin(async move { forward(client, listen, request).await })
    }
}

async fn forward(
    client: Client,
    listen: SocketAddr,
    mut request: Request<BoxBody>,
) -> Result<Response<BoxBody>, ProxyError> {
    let target = request
        .extensions_mut()
        .remove::<Target>()
        .expect("the routing step sets a target on every request");
    let addr = resolve(&target.destination).await?;
    if addr == listen {
        return Err(ProxyError::Loop(addr));
    }

    let authority = target.authority.clone().unwrap_or_else(|| {
        Authority::try_from(addr.to_string()).expect("a socket address is an authority")
    });
    let path_and_query = request
        .uri()
        .path_and_query()
        .map_or("/", PathAndQuery::as_str)
        .to_string();
    *request.uri_mut() = upstream_uri(target.proto, &Scheme::HTTP, &authority, &path_and_query);
    match target.proto {
        Proto::Http1 => {
            *request.version_mut() = Version::HTTP_11;
            if !request.headers().contains_key(header::HOST) {
                let host = HeaderValue::from_str(authority.as_str())
                    .expect("an authority is a valid header value");
                request.headers_mut().insert(header::HOST, host);
            }
        }
        Proto::Http2 => *request.version_mut() = Version::HTTP_2,
    }

    let endpoint = Endpoint {
        addr,
        tls: None,
        proto: target.proto,
    };
    let response = client
        .send(&endpoint, request)
        .await
        .map_err(ProxyError::from_client_error)?;

    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(
        parts,
        body.map_err(Into::into).boxed_unsync(),
    ))
}

pub async fn resolve(destination: &Destination) -> Result<SocketAddr, ProxyError> {
    match destination {
        Destination::Addr(addr) => Ok(*addr),
        Destination::Name { host, port } => {
            let authority = format!("{host}:{port}");
            let mut addrs = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|error| ProxyError::Resolve {
                    authority: authority.clone(),
                    reason: error.to_string(),
                })?;
            addrs.next().ok_or_else(|| ProxyError::Resolve {
                authority,
                reason: "no addresses".to_string(),
            })
        }
    }
}

/// Builds the URI of an upstream request: origin form for HTTP/1.1, where
/// the Host header carries the authority, and absolute form for HTTP/2,
/// where it becomes `:scheme` and `:authority`.
pub fn upstream_uri(
    proto: Proto,
    scheme: &Scheme,
    authority: &Authority,
    path_and_query: &str,
) -> Uri {
    let builder = match proto {
        Proto::Http1 => Uri::builder(),
        Proto::Http2 => Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone()),
    };
    builder
        .path_and_query(path_and_query)
        .build()
        .expect("parts of a valid URI form a valid URI")
}
