//! End-to-end request cost on loopback: a keep-alive HTTP/1.1 client sends
//! small requests straight to an upstream, through the proxy, and through
//! the proxy with every request mirrored to a healthy secondary.

use std::{convert::Infallible, net::SocketAddr};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use tandem::config::Config;
use tokio::net::{TcpListener, TcpStream};

async fn upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    sender
}

async fn round_trip(sender: &mut Sender, host: SocketAddr) {
    sender.ready().await.expect("connection ready");
    let request = Request::get("/api/items")
        .header("host", host.to_string())
        .body(Empty::new())
        .expect("valid request");
    let response = sender.send_request(request).await.expect("response");
    response.into_body().collect().await.expect("body");
}

fn e2e(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime starts");

    let (primary, secondary) = runtime.block_on(async { (upstream().await, upstream().await) });
    let plain = format!(
        "admin: {{listen: 127.0.0.1:0}}\noutbound: {{listen: 127.0.0.1:0, default_target: \"{primary}\"}}\nlog: {{level: error}}\n"
    );
    let mirrored = format!(
        "{plain}routes: [{{name: all, match: {{path_prefix: /}}, mirror: {{to: \"http://{secondary}\"}}}}]\n"
    );

    let mut cases = vec![("get_direct", primary, None)];
    for (name, yaml) in [
        ("get_via_proxy", plain),
        ("get_via_proxy_mirrored", mirrored),
    ] {
        let config = Config::from_yaml(&yaml).expect("bench config is valid");
        let proxy = runtime
            .block_on(tandem::proxy::start(config))
            .expect("proxy starts");
        cases.push((name, proxy.outbound_addr(), Some(proxy)));
    }

    for (name, addr, _proxy) in &cases {
        let mut sender = runtime.block_on(connect(*addr));
        c.bench_function(name, |b| {
            b.iter(|| runtime.block_on(round_trip(&mut sender, primary)))
        });
    }
}

criterion_group!(benches, e2e);
criterion_main!(benches);
