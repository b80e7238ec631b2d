//! `https://` secondaries: a certificate from a CA named in
//! `tls.secondary_trusted_ca` is trusted, an expired one is not, and a bad
//! CA file is a config error that names the field.

mod support;

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use support::*;
use tandem::config::Config;

/// A CA and a server certificate for 127.0.0.1 that it signed.
struct Pki {
    ca_pem: String,
    server_cert: rustls::pki_types::CertificateDer<'static>,
    server_key: rustls::pki_types::PrivateKeyDer<'static>,
}

fn pki(expired: bool) -> Pki {
    let ca_key = KeyPair::generate().expect("expected a CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .expect("expected a CA certificate");
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().expect("expected a server key");
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("server parameters");
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let server_cert = params
        .signed_by(&server_key, &issuer)
        .expect("expected a server certificate");
    Pki {
        ca_pem: ca_cert.pem(),
        server_cert: server_cert.der().clone(),
        server_key: rustls::pki_types::PrivateKeyDer::try_from(server_key.serialize_der())
            .expect("expected a PKCS#8 key"),
    }
}

/// Serves HTTPS on 127.0.0.1 and records the `tandem-dispatch` header of
/// every request.
async fn https_secondary(pki: &Pki) -> (SocketAddr, Arc<Mutex<Vec<String>>>, TaskGuard) {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_no_client_auth()
    .with_single_cert(vec![pki.server_cert.clone()], pki.server_key.clone_key())
    .expect("expected the certificate and key to match");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let recorded = Arc::clone(&recorded);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request: Request<_>| {
                    let tag = request
                        .headers()
                        .get("tandem-dispatch")
                        .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
                        .unwrap_or_default();
                    recorded.lock().unwrap().push(tag);
                    async { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok")))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, seen, TaskGuard(task))
}

fn write_ca(dir: &Path, pem: &str) -> String {
    let path = dir.join("ca.pem");
    std::fs::write(&path, pem).expect("expected to write the CA file");
    path.display().to_string()
}

async fn send_one(proxy: &TestProxy) {
    let request = Request::post("/orders/1")
        .header("host", "orders")
        .body(full("payload"))
        .unwrap();
    let response = send(proxy.addr(), request).await;
    assert_eq!(response.status, 200, "expected the primary call to succeed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_ca_secondary_gets_copy() {
    bounded(async {
        let pki = pki(false);
        let (secondary, seen, _task) = https_secondary(&pki).await;
        let dir = tempfile_dir();
        let ca_file = write_ca(dir.path(), &pki.ca_pem);
        let primary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .set("tls", format!("{{secondary_trusted_ca: \"{ca_file}\"}}"))
            .route(route("r", &format!("https://{secondary}")))
            .start()
            .await;

        send_one(&proxy).await;

        let metrics = proxy.wait_settled("r", 1).await;
        assert_eq!(
            metrics.delivered("r"),
            1,
            "expected the copy delivered over TLS to a CA-signed secondary"
        );
        assert_eq!(
            seen.lock().unwrap().as_slice(),
            ["mirror"],
            "expected the secondary to receive one tagged copy"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_sheds_copy() {
    bounded(async {
        let pki = pki(true);
        let (secondary, seen, _task) = https_secondary(&pki).await;
        let dir = tempfile_dir();
        let ca_file = write_ca(dir.path(), &pki.ca_pem);
        let primary = TestServer::echo().await;
        let proxy = proxy_spec()
            .default_target(primary.addr())
            .set("tls", format!("{{secondary_trusted_ca: \"{ca_file}\"}}"))
            .route(route("r", &format!("https://{secondary}")))
            .start()
            .await;

        send_one(&proxy).await;

        let metrics = proxy.wait_settled("r", 1).await;
        assert_eq!(
            metrics.shed("r", "connect_failed"),
            1,
            "expected the copy to an expired certificate shed as connect_failed"
        );
        assert!(
            seen.lock().unwrap().is_empty(),
            "expected no request over a rejected handshake"
        );
    })
    .await;
}

#[test]
fn bad_ca_file_names_field() {
    let dir = tempfile_dir();
    let missing = dir.path().join("missing.pem");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").unwrap();

    for path in [missing, not_pem] {
        let yaml = format!("tls: {{secondary_trusted_ca: \"{}\"}}", path.display());
        let error = Config::from_yaml(&yaml)
            .expect_err("expected an unusable CA file to be rejected")
            .to_string();
        assert!(
            error.contains("tls.secondary_trusted_ca"),
            "expected the error to name the field: {error}"
        );
        assert!(
            error.contains(&path.display().to_string()),
            "expected the error to show the path: {error}"
        );
    }
}

/// A temporary directory removed when the guard drops.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> TempDir {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "tandem-tls-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("expected to create a temporary directory");
    TempDir(dir)
}
