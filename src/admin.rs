//! The admin listener: `/metrics`, `/ready`, `/live` and `/config`.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch};

use crate::{config::Config, proxy::metrics::Metrics, readiness::Readiness};

/// Shared state of the admin endpoints.
#[derive(Clone)]
pub struct State {
    metrics: Metrics,
    config: Arc<Config>,
    readiness: Readiness,
}

impl State {
    pub fn new(metrics: Metrics, config: Config) -> Self {
        Self {
            metrics,
            config: Arc::new(config),
            readiness: Readiness::new(),
        }
    }

    /// Makes `/ready` report the problems recorded in `readiness`.
    pub fn with_readiness(mut self, readiness: Readiness) -> Self {
        self.readiness = readiness;
        self
    }
}

/// Serves admin requests until `drain` fires.
pub async fn serve(listener: TcpListener, state: State, mut drain: watch::Receiver<bool>) {
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "failed to accept an admin connection");
                    continue;
                }
            },
            _ = drain.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = respond(&state, peer, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "admin connection failed");
            }
        });
    }
}

fn respond(state: &State, peer: SocketAddr, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are allowed\n",
        );
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, state.metrics.encode());
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/ready" => {
            let problems = state.readiness.problems();
            if problems.is_empty() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready:\n{}\n", problems.join("\n")),
                )
            }
        }
        "/live" => text(StatusCode::OK, "live\n"),
        // The effective config names internal addresses, so only local
        // callers (an operator on the pod, `kubectl port-forward`) see it.
        "/config" if peer.ip().is_loopback() => {
            let mut response = text(
                StatusCode::OK,
                serde_yaml_ng::to_string(&*state.config).expect("the config serializes to YAML"),
            );
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/yaml"),
            );
            response
        }
        "/config" => text(
            StatusCode::FORBIDDEN,
            "/config is served to loopback clients only\n",
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /ready, /live or /config\n",
        ),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}
