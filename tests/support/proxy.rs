//! Proxy configs for tests and an in-process proxy handle.

use std::net::SocketAddr;

use tandem::{config::Config, proxy::Proxy};

use super::metrics::{scrape, wait_for_metrics, MetricsSnapshot};

/// One route of a test config: a path prefix copied to a secondary.
#[derive(Clone, Debug)]
pub struct RouteSpec {
    name: String,
    to: String,
    path_prefix: String,
    tagged: bool,
    mirror: Vec<(String, String)>,
}

/// Starts a route named `name` that copies every path to `to`.
pub fn route(name: &str, to: &str) -> RouteSpec {
    RouteSpec {
        name: name.to_string(),
        to: to.to_string(),
        path_prefix: "/".to_string(),
        tagged: false,
        mirror: Vec::new(),
    }
}

impl RouteSpec {
    pub fn path_prefix(mut self, prefix: &str) -> Self {
        self.path_prefix = prefix.to_string();
        self
    }

    pub fn tagged(mut self) -> Self {
        self.tagged = true;
        self
    }

    /// Sets a field of the route's `mirror:` section, written as YAML.
    pub fn mirror(mut self, key: &str, value: impl ToString) -> Self {
        self.mirror.push((key.to_string(), value.to_string()));
        self
    }

    fn yaml(&self) -> String {
        let mut mirror = format!("to: {:?}", self.to);
        for (key, value) in &self.mirror {
            mirror.push_str(&format!(", {key}: {value}"));
        }
        format!(
            "  - name: {}\n    match: {{path_prefix: {:?}, tagged: {}}}\n    mirror: {{{mirror}}}\n",
            self.name, self.path_prefix, self.tagged
        )
    }
}

/// A test config: ephemeral loopback listeners, a short drain timeout and
/// the given routes.
#[derive(Clone, Debug, Default)]
pub struct ProxySpec {
    default_target: Option<SocketAddr>,
    outbound: Vec<(String, String)>,
    top_level: Vec<(String, String)>,
    routes: Vec<RouteSpec>,
}

pub fn proxy_spec() -> ProxySpec {
    ProxySpec::default()
}

impl ProxySpec {
    pub fn default_target(mut self, addr: SocketAddr) -> Self {
        self.default_target = Some(addr);
        self
    }

    /// Sets a field of the `outbound:` section, written as YAML.
    pub fn outbound(mut self, key: &str, value: impl ToString) -> Self {
        self.outbound.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets a top-level field, written as YAML.
    pub fn set(mut self, key: &str, value: impl ToString) -> Self {
        self.top_level.push((key.to_string(), value.to_string()));
        self
    }

    pub fn route(mut self, route: RouteSpec) -> Self {
        self.routes.push(route);
        self
    }

    pub fn yaml(&self) -> String {
        let mut yaml = String::from(
            "admin:\n  listen: \"127.0.0.1:0\"\noutbound:\n  listen: \"127.0.0.1:0\"\n",
        );
        if let Some(target) = self.default_target {
            yaml.push_str(&format!("  default_target: \"{target}\"\n"));
        }
        for (key, value) in &self.outbound {
            yaml.push_str(&format!("  {key}: {value}\n"));
        }
        if !self.top_level.iter().any(|(key, _)| key == "drain_timeout") {
            yaml.push_str("drain_timeout: 2s\n");
        }
        for (key, value) in &self.top_level {
            yaml.push_str(&format!("{key}: {value}\n"));
        }
        if self.routes.is_empty() {
            yaml.push_str("routes: []\n");
        } else {
            yaml.push_str("routes:\n");
            for route in &self.routes {
                yaml.push_str(&route.yaml());
            }
        }
        yaml
    }

    /// Starts the proxy in this process.
    pub async fn start(&self) -> TestProxy {
        let yaml = self.yaml();
        let config = Config::from_yaml(&yaml)
            .unwrap_or_else(|error| panic!("expected a valid test config, got {error}:\n{yaml}"));
        let proxy = tandem::proxy::start(config)
            .await
            .expect("expected the proxy to bind its ephemeral listeners");
        TestProxy { proxy }
    }
}

/// A proxy running in the test's runtime.
pub struct TestProxy {
    proxy: Proxy,
}

impl TestProxy {
    pub fn addr(&self) -> SocketAddr {
        self.proxy.outbound_addr()
    }

    pub fn admin(&self) -> SocketAddr {
        self.proxy.admin_addr()
    }

    pub async fn metrics(&self) -> MetricsSnapshot {
        scrape(self.admin()).await
    }

    pub async fn wait_for_metrics(
        &self,
        description: &str,
        condition: impl Fn(&MetricsSnapshot) -> bool,
    ) -> MetricsSnapshot {
        wait_for_metrics(self.admin(), description, condition).await
    }

    /// Waits until every copy due on `route` has ended as a response or a
    /// shed, and returns that scrape.
    pub async fn wait_settled(&self, route: &str, due: u64) -> MetricsSnapshot {
        self.wait_for_metrics(
            &format!("{due} copies due on route {route}, each delivered or shed"),
            |m| m.due(route) == due && m.settled(route),
        )
        .await
    }

    /// Drains the proxy; returns true when everything finished in time.
    pub async fn shutdown(self) -> bool {
        self.proxy.shutdown().await
    }
}
