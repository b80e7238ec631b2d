//! Route rules: which outbound requests are copied, and to where.
//!
//! Rules are checked in config order and the first match wins, like Envoy
//! routes and Kubernetes HTTPRoute rules within one route.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::config::{CompareConfig, FanoutConfig, MatchConfig, MirrorConfig, RouteConfig};

/// Dispatch mode of a route, also the value of the `tandem-dispatch` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    Mirror,
    Fanout,
    Compare,
}

/// The `tandem-dispatch` request header, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchTag {
    /// Copy with this mode when a route of that mode matches.
    Mode(Mode),
    /// Never copy this request.
    Off,
}

/// A compiled route table.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    matcher: Matcher,
    pub dispatch: Dispatch,
}

/// The dispatch section of a route: exactly one mode and its settings.
#[derive(Debug, Clone)]
pub enum Dispatch {
    Mirror(MirrorConfig),
    Fanout(FanoutConfig),
    Compare(CompareConfig),
}

/// The parts of a request that rules look at.
#[derive(Debug)]
pub struct RequestFacts<'a> {
    /// Lower-case host without port; empty when the request names none.
    pub host: &'a str,
    pub port: Option<u16>,
    pub path: &'a str,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    pub tag: Option<DispatchTag>,
}

#[derive(Debug)]
struct Matcher {
    host: Option<HostGlob>,
    port: Option<u16>,
    path_prefix: Option<String>,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
    tagged: bool,
}

/// A case-insensitive glob on a host name (`*` and `?`, like globset).
#[derive(Debug, Clone)]
pub struct HostGlob {
    matcher: globset::GlobMatcher,
}

// === impl Mode ===

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Mirror => "mirror",
            Mode::Fanout => "fanout",
            Mode::Compare => "compare",
        }
    }
}

impl DispatchTag {
    /// Parses the header value; `None` for a value that names no mode.
    pub fn parse(value: &HeaderValue) -> Option<Self> {
        let value = value.to_str().ok()?.trim();
        if value.eq_ignore_ascii_case("mirror") {
            Some(DispatchTag::Mode(Mode::Mirror))
        } else if value.eq_ignore_ascii_case("fanout") {
            Some(DispatchTag::Mode(Mode::Fanout))
        } else if value.eq_ignore_ascii_case("compare") {
            Some(DispatchTag::Mode(Mode::Compare))
        } else if value.eq_ignore_ascii_case("off") {
            Some(DispatchTag::Off)
        } else {
            None
        }
    }
}

// === impl RouteTable ===

impl RouteTable {
    /// Compiles validated route configs.
    ///
    /// # Panics
    ///
    /// On a config that [`crate::config::Config::validate`] would reject.
    pub fn new(routes: &[RouteConfig]) -> Self {
        let routes = routes
            .iter()
            .map(|route| {
                let dispatch = match (&route.mirror, &route.fanout, &route.compare) {
                    (Some(mirror), _, _) => Dispatch::Mirror(mirror.clone()),
                    (_, Some(fanout), _) => Dispatch::Fanout(fanout.clone()),
                    (_, _, Some(compare)) => Dispatch::Compare(compare.clone()),
                    (None, None, None) => panic!("validated routes have a dispatch mode"),
                };
                Arc::new(Route {
                    name: route.name.clone(),
                    matcher: Matcher::new(&route.match_),
                    dispatch,
                })
            })
            .collect();
        Self { routes }
    }

    /// Returns the first route that matches the request and should be
    /// dispatched, honouring the dispatch tag.
    pub fn find(&self, facts: &RequestFacts<'_>) -> Option<&Arc<Route>> {
        if facts.tag == Some(DispatchTag::Off) {
            return None;
        }
        self.routes
            .iter()
            .find(|route| route.matcher.matches(facts, route.mode()))
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

impl Route {
    pub fn mode(&self) -> Mode {
        match self.dispatch {
            Dispatch::Mirror(_) => Mode::Mirror,
            Dispatch::Fanout(_) => Mode::Fanout,
            Dispatch::Compare(_) => Mode::Compare,
        }
    }
}

// === impl Matcher ===

impl Matcher {
    fn new(config: &MatchConfig) -> Self {
        Self {
            host: config
                .host
                .as_deref()
                .map(|glob| HostGlob::new(glob).expect("validated host glob compiles")),
            port: config.port,
            path_prefix: config.path_prefix.clone(),
            methods: config
                .methods
                .iter()
                .map(|m| Method::from_bytes(m.as_bytes()).expect("validated method parses"))
                .collect(),
            headers: config
                .headers
                .iter()
                .map(|(name, value)| {
                    (
                        HeaderName::from_bytes(name.as_bytes()).expect("validated header name"),
                        HeaderValue::from_str(value).expect("validated header value"),
                    )
                })
                .collect(),
            tagged: config.tagged,
        }
    }

    /// Checks the request against every given field. A tagged route also
    /// needs the dispatch header to name the route's `mode`.
    fn matches(&self, facts: &RequestFacts<'_>, mode: Mode) -> bool {
        if self.tagged && facts.tag != Some(DispatchTag::Mode(mode)) {
            return false;
        }
        if let Some(glob) = &self.host {
            if !glob.is_match(facts.host) {
                return false;
            }
        }
        if self.port.is_some() && self.port != facts.port {
            return false;
        }
        if let Some(prefix) = &self.path_prefix {
            if !facts.path.starts_with(prefix.as_str()) {
                return false;
            }
        }
        if !self.methods.is_empty() && !self.methods.contains(facts.method) {
            return false;
        }
        self.headers
            .iter()
            .all(|(name, value)| facts.headers.get_all(name).iter().any(|v| v == value))
    }
}

// === impl HostGlob ===

impl HostGlob {
    pub fn new(pattern: &str) -> Result<Self, globset::Error> {
        let glob = globset::GlobBuilder::new(pattern)
            .case_insensitive(true)
            .literal_separator(false)
            .build()?;
        Ok(Self {
            matcher: glob.compile_matcher(),
        })
    }

    pub fn is_match(&self, host: &str) -> bool {
        self.matcher.is_match(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(yaml: &str) -> RouteTable {
        let routes: Vec<RouteConfig> = serde_yaml_ng::from_str(yaml).expect("test routes parse");
        RouteTable::new(&routes)
    }

    fn facts<'a>(
        host: &'a str,
        path: &'a str,
        method: &'a Method,
        headers: &'a HeaderMap,
    ) -> RequestFacts<'a> {
        RequestFacts {
            host,
            port: Some(8080),
            path,
            method,
            headers,
            tag: None,
        }
    }

    const ROUTES: &str = r#"
- name: orders
  match: {host: "orders*", port: 8080, path_prefix: /api/, methods: [POST], headers: {x-env: canary}}
  mirror: {to: "http://127.0.0.1:9090"}
- name: tagged
  match: {tagged: true}
  mirror: {to: "http://127.0.0.1:9091"}
"#;

    #[test]
    fn every_given_field_must_match() {
        let table = table(ROUTES);
        let post = Method::POST;
        let mut headers = HeaderMap::new();
        headers.insert("x-env", HeaderValue::from_static("canary"));

        let found = table.find(&facts("orders.svc", "/api/1", &post, &headers));
        assert_eq!(found.map(|r| r.name.as_str()), Some("orders"));

        let found = table.find(&facts("ORDERS.svc", "/api/1", &post, &headers));
        assert_eq!(
            found.map(|r| r.name.as_str()),
            Some("orders"),
            "host glob ignores case"
        );

        assert!(table
            .find(&facts("users.svc", "/api/1", &post, &headers))
            .is_none());
        assert!(table
            .find(&facts("orders.svc", "/web/1", &post, &headers))
            .is_none());
        assert!(table
            .find(&facts("orders.svc", "/api/1", &Method::GET, &headers))
            .is_none());
        assert!(table
            .find(&facts("orders.svc", "/api/1", &post, &HeaderMap::new()))
            .is_none());

        let mut wrong_port = facts("orders.svc", "/api/1", &post, &headers);
        wrong_port.port = Some(80);
        assert!(table.find(&wrong_port).is_none());
    }

    #[test]
    fn tagged_route_needs_header() {
        let table = table(ROUTES);
        let get = Method::GET;
        let headers = HeaderMap::new();

        let mut untagged = facts("users", "/", &get, &headers);
        assert!(table.find(&untagged).is_none());

        untagged.tag = Some(DispatchTag::Mode(Mode::Mirror));
        assert_eq!(
            table.find(&untagged).map(|r| r.name.as_str()),
            Some("tagged")
        );
    }

    #[test]
    fn off_tag_suppresses_routes() {
        let table = table(ROUTES);
        let post = Method::POST;
        let mut headers = HeaderMap::new();
        headers.insert("x-env", HeaderValue::from_static("canary"));
        let mut request = facts("orders.svc", "/api/1", &post, &headers);
        request.tag = Some(DispatchTag::Off);
        assert!(table.find(&request).is_none());
    }

    #[test]
    fn tagged_route_needs_its_own_mode() {
        let table = table(
            r#"
- name: audit
  match: {tagged: true}
  fanout: {to: ["http://127.0.0.1:9191"]}
- name: shadow
  match: {tagged: true}
  compare: {to: "http://127.0.0.1:9090"}
"#,
        );
        let get = Method::GET;
        let headers = HeaderMap::new();
        let mut request = facts("users", "/", &get, &headers);
        request.tag = Some(DispatchTag::Mode(Mode::Mirror));
        assert!(
            table.find(&request).is_none(),
            "a mirror tag matches neither"
        );

        request.tag = Some(DispatchTag::Mode(Mode::Fanout));
        let found = table.find(&request).expect("fanout tag matches");
        assert_eq!(found.name, "audit");
        assert_eq!(found.mode(), Mode::Fanout);

        request.tag = Some(DispatchTag::Mode(Mode::Compare));
        assert_eq!(
            table.find(&request).map(|r| r.name.as_str()),
            Some("shadow")
        );
    }

    #[test]
    fn dispatch_tag_parses_known_values() {
        assert_eq!(
            DispatchTag::parse(&HeaderValue::from_static("fanout")),
            Some(DispatchTag::Mode(Mode::Fanout))
        );
        assert_eq!(
            DispatchTag::parse(&HeaderValue::from_static("COMPARE")),
            Some(DispatchTag::Mode(Mode::Compare))
        );
        assert_eq!(
            DispatchTag::parse(&HeaderValue::from_static("Mirror")),
            Some(DispatchTag::Mode(Mode::Mirror))
        );
        assert_eq!(
            DispatchTag::parse(&HeaderValue::from_static("off")),
            Some(DispatchTag::Off)
        );
        assert_eq!(DispatchTag::parse(&HeaderValue::from_static("copy")), None);
    }
}
