//! Micro-benchmarks of the pieces every mirrored request passes through:
//! route matching, sampling, header clean-up and the tee layer with free
//! and exhausted in-flight slots.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use tandem::{
    config::RouteConfig,
    proxy::{
        client::{self, BoxBody, Client},
        headers::strip_hop_by_hop,
        metrics::Metrics,
        mirror::{sampled, Dispatcher, MirrorLayer, MirrorTarget},
        target::{BoxFuture, MatchedRoute, RouteTarget},
    },
    routes::{RequestFacts, RouteTable},
};
use tokio_util::task::TaskTracker;
use tower::{Layer, Service, ServiceExt};

fn routes(secondary: &str, max_in_flight: usize) -> RouteTable {
    let yaml = format!(
        r#"
- name: users
  match: {{host: "users*", path_prefix: /v1/}}
  mirror: {{to: "{secondary}"}}
- name: orders
  match: {{host: "orders*", path_prefix: /api/, methods: [POST, PUT], headers: {{x-env: canary}}}}
  mirror: {{to: "{secondary}", max_in_flight: {max_in_flight}, timeout: 30s}}
"#
    );
    let configs: Vec<RouteConfig> = serde_yaml_ng::from_str(&yaml).expect("bench routes parse");
    RouteTable::new(&configs)
}

fn request_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("orders.svc:8080"));
    headers.insert("x-env", HeaderValue::from_static("canary"));
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    headers.insert("connection", HeaderValue::from_static("keep-alive"));
    headers
}

fn matching(c: &mut Criterion) {
    let table = routes("http://127.0.0.1:9", 512);
    let headers = request_headers();
    let method = Method::POST;
    c.bench_function("route_find_second_of_two", |b| {
        b.iter(|| {
            let facts = RequestFacts {
                host: "orders.svc",
                port: Some(8080),
                path: "/api/orders/17",
                method: &method,
                headers: &headers,
                tag: None,
            };
            std::hint::black_box(table.find(&facts).is_some())
        })
    });
    c.bench_function("sampled_10_percent_by_trace_id", |b| {
        b.iter(|| std::hint::black_box(sampled(10.0, &headers)))
    });
    c.bench_function("strip_hop_by_hop_6_headers", |b| {
        b.iter_batched(
            request_headers,
            |mut headers| {
                strip_hop_by_hop(&mut headers);
                headers
            },
            criterion::BatchSize::SmallInput,
        )
    });
}

/// The tee layer in front of a service that reads the body and responds.
/// "slots free" sends every copy to a secondary that refuses connections;
/// "slots exhausted" has every slot held by copies to a secondary that
/// never responds, so each new copy is shed as overloaded.
fn tee(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime starts");

    let refused = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("address")
    };
    let blackhole = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        addr
    });

    for (name, secondary, max_in_flight) in [
        ("tee_1kib_body_slots_free", refused, 1 << 20),
        ("tee_1kib_body_slots_exhausted", blackhole, 1),
    ] {
        let metrics = Metrics::new();
        let table = routes(&format!("http://{secondary}"), max_in_flight);
        let route = table.iter().nth(1).expect("second route").clone();
        let matched = MatchedRoute {
            route: Arc::clone(&route),
            target: RouteTarget::Mirror(Arc::new(MirrorTarget::new(route, &metrics))),
        };
        let client = Client::new(Duration::from_secs(1), &client::tls_config(&[]));
        let dispatcher = Arc::new(Dispatcher::new(client, metrics, TaskTracker::new()));
        // The layer takes an inner service shaped like the upstream client
        // step: a boxed future of a boxed-body response.
        let service = MirrorLayer::new(dispatcher).layer(tower::service_fn(
            |request: Request<BoxBody>| -> BoxFuture<Result<Response<BoxBody>, Infallible>> {
                Box::pin(async move {
                    let body = request.into_body().collect().await.expect("body");
                    Ok(Response::new(
                        body.map_err(|never| match never {}).boxed_unsync(),
                    ))
                })
            },
        ));
        let body = Bytes::from(vec![b'x'; 1024]);

        c.bench_function(name, |b| {
            b.to_async(&runtime).iter(|| {
                let mut service = service.clone();
                let mut request = Request::post("/api/orders")
                    .body(
                        Full::new(body.clone())
                            .map_err(|never| match never {})
                            .boxed_unsync(),
                    )
                    .expect("valid request");
                *request.headers_mut() = request_headers();
                request.extensions_mut().insert(matched.clone());
                async move { service.ready().await.expect("ready").call(request).await }
            })
        });
    }
}

criterion_group!(benches, matching, tee);
criterion_main!(benches);
