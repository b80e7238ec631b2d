//! Errors on the primary request path and the responses that replace them.
//!
//! Each error is classified by the side at fault, which fixes the status:
//! the client's request (4xx), the upstream (502/504) or the proxy itself.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::client::{BoxBody, ClientError};

/// Response header that names the error when the proxy, not the upstream,
/// produced the response.
pub const PROXY_ERROR_HEADER: &str = "tandem-proxy-error";

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "request has no destination: the connection was not redirected, the request \
         target is not in absolute form and outbound.default_target is not set"
    )]
    NoDestination,
    #[error("request target {0:?} is not a valid authority")]
    InvalidAuthority(String),
    #[error("request body is larger than outbound.max_request_body_bytes ({limit} bytes)")]
    BodyTooLarge { limit: u64 },
    #[error("destination {0} is the proxy's own listener; the request would loop")]
    Loop(SocketAddr),
    #[error("failed to resolve {authority}: {reason}")]
    Resolve { authority: String, reason: String },
    #[error(transparent)]
    Upstream(#[from] ClientError),
}

/// Side of the proxy that an error comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Proxy,
}

impl ProxyError {
    pub fn side(&self) -> Side {
        match self {
            ProxyError::NoDestination
            | ProxyError::InvalidAuthority(_)
            | ProxyError::BodyTooLarge { .. } => Side::Client,
            ProxyError::Loop(_) => Side::Proxy,
            ProxyError::Resolve { .. } | ProxyError::Upstream(_) => Side::Upstream,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoDestination | ProxyError::InvalidAuthority(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::Loop(_) | ProxyError::Resolve { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Upstream(ClientError::ConnectTimeout { .. }) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// Returns a short, bounded name for metric labels and the error header.
    pub fn error_type(&self) -> &'static str {
        match self {
            ProxyError::NoDestination => "no_destination",
            ProxyError::InvalidAuthority(_) => "invalid_authority",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::Loop(_) => "loop",
            ProxyError::Resolve { .. } => "resolve_failed",
            ProxyError::Upstream(ClientError::ConnectTimeout { .. }) => "connect_timeout",
            ProxyError::Upstream(error) if error.is_connect() => "connect_failed",
            ProxyError::Upstream(_) => "upstream_failed",
        }
    }

    /// Reclassifies an upstream failure whose cause was the request body
    /// crossing the size limit; the client gets 413, not 502.
    pub fn from_client_error(error: ClientError) -> Self {
        if let Some(limit) = body_limit_in_chain(&error) {
            return ProxyError::BodyTooLarge { limit };
        }
        ProxyError::Upstream(error)
    }

    /// Builds the response the client gets instead of an upstream one.
    pub fn to_response(&self) -> Response<BoxBody> {
        let mut response = Response::new(
            Full::new(Bytes::from(format!("{self}\n")))
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(
            PROXY_ERROR_HEADER,
            HeaderValue::from_static(self.error_type()),
        );
        response
    }
}

/// Marker error that the request body limit raises, so it can be found in an
/// upstream error's source chain.
#[derive(Debug, thiserror::Error)]
#[error("request body is larger than {limit} bytes")]
pub struct BodyLimitExceeded {
    pub limit: u64,
}

fn body_limit_in_chain(error: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(exceeded) = error.downcast_ref::<BodyLimitExceeded>() {
            return Some(exceeded.limit);
        }
        current = error.source();
    }
    None
}
