//! Shared helpers for the integration tests: real upstream servers on
//! ephemeral loopback ports, HTTP clients that go through the proxy, a
//! Prometheus scraper and proxy launchers (in-process and the binary).
//!
//! Every test binary compiles the whole module but uses only part of it.
#![allow(dead_code)]

pub mod client;
pub mod metrics;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod server;

use std::{future::Future, time::Duration};

#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use metrics::*;
#[allow(unused_imports)]
pub use proxy::*;
#[allow(unused_imports)]
pub use server::*;

/// Upper bound on one test body, so a bug fails the test instead of hanging
/// the suite.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts a `tracing` subscriber with the filter in `TANDEM_TEST_LOG` (such
/// as `tandem=debug`); without the variable tests log nothing.
pub fn init_tracing() {
    if let Ok(filter) = std::env::var("TANDEM_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// Runs a test body with logging set up and [`TEST_TIMEOUT`] on the whole.
pub async fn bounded<F: Future>(body: F) -> F::Output {
    init_tracing();
    tokio::time::timeout(TEST_TIMEOUT, body)
        .await
        .unwrap_or_else(|_| panic!("expected the test to finish within {TEST_TIMEOUT:?}"))
}

/// Aborts a spawned task when dropped, so a test's servers and clients stop
/// with the test.
pub struct TaskGuard(pub tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Incremental SHA-256 with a lower-case hex result.
///
/// The sha2 crate built without optimisation (the test profile) hashes about
/// 17 MB/s, too slow for 100 MiB uploads. ring's SHA-256 is assembly and
/// runs at full speed in any profile, so it is used here through rustls's
/// public hash provider, the way rustls reaches it.
pub struct Sha256Stream(Box<dyn rustls::crypto::hash::Context>);

impl Sha256Stream {
    pub fn new() -> Self {
        let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
        let hash = suite
            .tls13()
            .expect("TLS13_AES_128_GCM_SHA256 is a TLS 1.3 suite")
            .common
            .hash_provider;
        assert_eq!(
            hash.algorithm(),
            rustls::crypto::hash::HashAlgorithm::SHA256,
            "expected the suite's hash to be SHA-256"
        );
        Self(hash.start())
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> String {
        hex::encode(self.0.finish().as_ref())
    }
}

impl Default for Sha256Stream {
    fn default() -> Self {
        Self::new()
    }
}

/// Returns the SHA-256 of `data` as lower-case hex.
pub fn sha256_hex(data: &[u8]) -> String {
    let mut hasher = Sha256Stream::new();
    hasher.update(data);
    hasher.finish()
}

/// Returns the median of `samples`; panics on an empty slice.
pub fn median(samples: &[Duration]) -> Duration {
    assert!(!samples.is_empty(), "median needs at least one sample");
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}
