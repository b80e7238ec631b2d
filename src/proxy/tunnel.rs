//! Byte tunnels that are proxied but never copied: opaque TCP, `CONNECT`,
//! and HTTP/1.1 protocol upgrades such as WebSocket.

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::{body::Incoming, client::conn::http1};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    client::{connect_tcp, BoxBody, BoxError},
    errors::ProxyError,
    forward::resolve,
    target::{destination_of, host_header, ConnContext, Router},
};
use crate::config::DISPATCH_HEADER;

/// Copies bytes both ways between the client and `dst` until either side
/// closes.
pub async fn forward_opaque<I>(mut client: I, dst: SocketAddr, connect_timeout: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut upstream = match connect_tcp(dst, connect_timeout).await {
        Ok(stream) => stream,
        Err(error) => {
            tracing::info!(%error, "failed to open opaque TCP connection");
            return;
        }
    };
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => tracing::debug!(%dst, sent, received, "opaque connection closed"),
        Err(error) => tracing::debug!(%dst, %error, "opaque connection failed"),
    }
}

/// Handles a `CONNECT host:port` request: connects, replies 200 and then
/// copies bytes between the upgraded client connection and the upstream.
pub async fn connect(
    router: &Router,
    connect_timeout: Duration,
    mut request: Request<Incoming>,
) -> Result<Response<BoxBody>, ProxyError> {
    let authority = request
        .uri()
        .authority()
        .cloned()
        .ok_or_else(|| ProxyError::InvalidAuthority(request.uri().to_string()))?;
    if authority.port_u16().is_none() {
        return Err(ProxyError::InvalidAuthority(authority.to_string()));
    }
    let addr = resolve(&destination_of(&authority, None)?).await?;
    if addr == router.listen {
        return Err(ProxyError::Loop(addr));
    }
    let mut upstream = connect_tcp(addr, connect_timeout).await?;

    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let mut client = TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            }
            Err(error) => tracing::debug!(%error, "CONNECT upgrade failed"),
        }
    });
    Ok(Response::new(empty_body()))
}

/// Forwards an HTTP/1.1 upgrade request on a connection of its own, and
/// when the upstream switches protocols, joins the two upgraded streams.
pub async fn upgrade(
    router: &Router,
    ctx: &ConnContext,
    connect_timeout: Duration,
    mut request: Request<Incoming>,
) -> Result<Response<BoxBody>, ProxyError> {
    request.headers_mut().remove(DISPATCH_HEADER);
    let authority = request.uri().authority().cloned().or_else(|| {
        request
            .headers()
            .get(header::HOST)
            .and_then(|host| http::uri::Authority::try_from(host.as_bytes()).ok())
    });
    let destination = router.destination(ctx, request.uri(), authority.as_ref())?;
    let addr = resolve(&destination).await?;
    if addr == router.listen {
        return Err(ProxyError::Loop(addr));
    }
    let stream = connect_tcp(addr, connect_timeout).await?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| super::client::ClientError::Handshake { addr, source })?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upgrade connection failed");
        }
    });

    let client_upgrade = hyper::upgrade::on(&mut request);
    let absolute = request.uri().authority().is_some();
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    *request.uri_mut() = path.parse().expect("a path and query is a valid URI");
    // An absolute-form target overrides Host, as on the routed path.
    if let Some(authority) = &authority {
        if absolute || !request.headers().contains_key(header::HOST) {
            request
                .headers_mut()
                .insert(header::HOST, host_header(authority));
        }
    }
    let request = request.map(|body| body.map_err(BoxError::from).boxed_unsync());

    let mut response = sender
        .send_request(request)
        .await
        .map_err(|source| super::client::ClientError::Http { addr, source })?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
            let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::debug!(%error, "protocol upgrade failed");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
    Ok(response.map(|body| body.map_err(Into::into).boxed_unsync()))
}

fn empty_body() -> BoxBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}
