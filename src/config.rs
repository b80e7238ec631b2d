//! Typed proxy settings: the YAML file, `TANDEM_*` environment overrides,
//! defaults and validation.
//!
//! Every error names the field, the rejected value and the expected form, so
//! `tandem check` output can be acted on without reading the source.

use std::{collections::BTreeMap, fmt, net::SocketAddr, str::FromStr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::routes::HostGlob;

mod dispatch;

pub use dispatch::*;

pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:4191";
pub const DEFAULT_OUTBOUND_LISTEN: &str = "127.0.0.1:4140";
/// Time a new connection gets to send its first bytes before it is treated
/// as opaque TCP. Server-speaks-first protocols pay this once per connection.
pub const DEFAULT_DETECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Same as nginx's `client_header_timeout`. hyper 1.x also runs this timer
/// while an HTTP/1.1 keep-alive connection waits for its next request, so it
/// bounds idle HTTP/1.1 connections too. A short value would close the idle
/// pooled connections of ordinary clients.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound on one request head (request line plus headers). Requests over
/// it get 431.
pub const DEFAULT_MAX_REQUEST_HEADER_BYTES: usize = 64 * 1024;
/// Upper bound on one request body. Requests over it get 413.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u64 = 1024 * 1024 * 1024;
pub const DEFAULT_MIRROR_MAX_BODY_BYTES: usize = 1024 * 1024;
pub const DEFAULT_MIRROR_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_MIRROR_MAX_IN_FLIGHT: usize = 512;
/// Smallest accepted header limit. Below it ordinary requests would fail:
/// nginx's default `large_client_header_buffers` allows 8 KiB per header line.
const MIN_HEADER_BYTES: usize = 8192;

/// The request header that tags a call for dispatch or suppresses it.
pub const DISPATCH_HEADER: &str = "tandem-dispatch";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub admin: AdminConfig,
    pub outbound: OutboundConfig,
    pub routes: Vec<RouteConfig>,
    pub tls: TlsConfig,
    pub log: LogConfig,
    /// Time in-flight primary requests get to finish after SIGTERM.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
}

/// TLS settings for connections to `https://` secondaries.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM file of CA certificates trusted for `https://` secondaries in
    /// addition to the Mozilla root store, for secondaries with certificates
    /// from a private CA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secondary_trusted_ca: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    #[serde(with = "socket_addr")]
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboundConfig {
    #[serde(with = "socket_addr")]
    pub listen: SocketAddr,
    /// `host:port` used when a connection has no original destination and
    /// the request is not in absolute form.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_target: Option<String>,
    #[serde(with = "duration")]
    pub detect_timeout: Duration,
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// A client connection with no request in flight for this long is closed.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Timeout for TCP (and TLS) connection setup to an upstream.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    pub max_request_header_bytes: usize,
    pub max_request_body_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(default, rename = "match")]
    pub match_: MatchConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fanout: Option<FanoutConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare: Option<CompareConfig>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchConfig {
    /// Glob on the host of the request authority, for example `orders*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Headers that must be present with exactly these values.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// When true, only requests that carry the dispatch header with this
    /// route's mode are copied.
    pub tagged: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// Base URL of the secondary, `http://` or `https://`. A path in it is
    /// prepended to the request path.
    pub to: String,
    /// Share of matching requests to copy, 0 to 100.
    #[serde(default = "default_percent")]
    pub percent: f64,
    /// Keep the original Host / `:authority` on the copy instead of the
    /// secondary's authority.
    #[serde(default)]
    pub preserve_host: bool,
    #[serde(default = "default_mirror_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default = "default_mirror_timeout", with = "duration")]
    pub timeout: Duration,
    #[serde(default = "default_mirror_max_in_flight")]
    pub max_in_flight: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter directive such as `info` or `tandem=debug`.
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

/// An invalid setting: the field path, the rejected value and what is
/// expected instead.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Syntax(String),
    #[error("invalid value {value:?} for {field}: expected {expected}")]
    Invalid {
        field: String,
        value: String,
        expected: String,
    },
}

// === impl Config ===

impl Default for Config {
    fn default() -> Self {
        Self {
            admin: AdminConfig::default(),
            outbound: OutboundConfig::default(),
            routes: Vec::new(),
            tls: TlsConfig::default(),
            log: LogConfig::default(),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

impl Config {
    /// Parses and validates a YAML document. Environment overrides are not
    /// applied; see [`Config::apply_env`].
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        // An empty file means "all defaults", like the embedded config.
        let config: Config = if text.trim().is_empty() {
            Config::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads the file at `path`, or returns the embedded default without one,
    /// then applies `TANDEM_*` overrides from the process environment.
    pub fn load(path: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                Self::from_yaml(&text)?
            }
            None => Config::default(),
        };
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Overrides settings from environment variables, read through `lookup`
    /// so tests can supply a map instead of the process environment.
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.is_empty());

        if let Some(v) = get(ENV_ADMIN_LISTEN) {
            self.admin.listen =
                parse_env(ENV_ADMIN_LISTEN, &v, "an address such as 127.0.0.1:4191")?;
        }
        if let Some(v) = get(ENV_OUTBOUND_LISTEN) {
            self.outbound.listen =
                parse_env(ENV_OUTBOUND_LISTEN, &v, "an address such as 127.0.0.1:4140")?;
        }
        if let Some(v) = get(ENV_OUTBOUND_DEFAULT_TARGET) {
            self.outbound.default_target = Some(v);
        }
        if let Some(v) = get(ENV_OUTBOUND_CONNECT_TIMEOUT) {
            self.outbound.connect_timeout = parse_env_duration(ENV_OUTBOUND_CONNECT_TIMEOUT, &v)?;
        }
        if let Some(v) = get(ENV_OUTBOUND_IDLE_TIMEOUT) {
            self.outbound.idle_timeout = parse_env_duration(ENV_OUTBOUND_IDLE_TIMEOUT, &v)?;
        }
        if let Some(v) = get(ENV_DRAIN_TIMEOUT) {
            self.drain_timeout = parse_env_duration(ENV_DRAIN_TIMEOUT, &v)?;
        }
        if let Some(v) = get(ENV_LOG) {
            validate_log_filter(ENV_LOG, &v)?;
            self.log.level = v;
        }
        if let Some(v) = get(ENV_LOG_FORMAT) {
            self.log.format = match v.as_str() {
                "plain" => LogFormat::Plain,
                "json" => LogFormat::Json,
                _ => return Err(invalid(ENV_LOG_FORMAT, &v, "plain or json")),
            };
        }
        Ok(())
    }

    /// Checks every field that serde cannot check by type alone.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let outbound = &self.outbound;
        if let Some(target) = &outbound.default_target {
            validate_host_port("outbound.default_target", target)?;
        }
        if outbound.max_request_header_bytes < MIN_HEADER_BYTES {
            return Err(invalid(
                "outbound.max_request_header_bytes",
                &outbound.max_request_header_bytes.to_string(),
                &format!("at least {MIN_HEADER_BYTES}"),
            ));
        }
        for (field, value) in [
            ("outbound.detect_timeout", outbound.detect_timeout),
            ("outbound.header_read_timeout", outbound.header_read_timeout),
            ("outbound.idle_timeout", outbound.idle_timeout),
            ("outbound.connect_timeout", outbound.connect_timeout),
        ] {
            validate_positive(field, value)?;
        }
        if self.admin.listen == outbound.listen && outbound.listen.port() != 0 {
            return Err(invalid(
                "admin.listen",
                &self.admin.listen.to_string(),
                "an address different from outbound.listen",
            ));
        }
        validate_log_filter("log.level", &self.log.level)?;
        self.tls.secondary_roots()?;

        let mut names = std::collections::HashSet::new();
        for (i, route) in self.routes.iter().enumerate() {
            let at = format!("routes[{i}]");
            route.validate(&at)?;
            if !names.insert(route.name.as_str()) {
                return Err(invalid(
                    &format!("{at}.name"),
                    &route.name,
                    "a name not used by another route",
                ));
            }
        }
        Ok(())
    }
}

// === impl TlsConfig ===

impl TlsConfig {
    /// Reads the extra trust roots for secondaries; empty without a file.
    pub fn secondary_roots(
        &self,
    ) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, ConfigError> {
        use rustls::pki_types::{pem::PemObject, CertificateDer};

        let Some(path) = &self.secondary_trusted_ca else {
            return Ok(Vec::new());
        };
        let field = "tls.secondary_trusted_ca";
        let shown = path.display().to_string();
        let text = std::fs::read(path).map_err(|error| {
            invalid(
                field,
                &shown,
                &format!("a readable PEM file of CA certificates ({error})"),
            )
        })?;
        let roots = CertificateDer::pem_slice_iter(&text)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| {
                invalid(
                    field,
                    &shown,
                    &format!("a PEM file of CA certificates ({error})"),
                )
            })?;
        if roots.is_empty() {
            return Err(invalid(
                field,
                &shown,
                "a PEM file with at least one CERTIFICATE block",
            ));
        }
        Ok(roots)
    }
}

// === impl RouteConfig ===

impl RouteConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !name_ok {
            return Err(invalid(
                &format!("{at}.name"),
                &self.name,
                "1 to 63 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        self.match_.validate(&format!("{at}.match"))?;
        match (&self.mirror, &self.fanout, &self.compare) {
            (Some(mirror), None, None) => mirror.validate(&format!("{at}.mirror")),
            (None, Some(fanout), None) => fanout.validate(&format!("{at}.fanout")),
            (None, None, Some(compare)) => compare.validate(&format!("{at}.compare")),
            (None, None, None) => Err(invalid(
                at,
                &self.name,
                "a dispatch mode: add a `mirror:`, `fanout:` or `compare:` section to the route",
            )),
            _ => Err(invalid(
                at,
                &self.name,
                "exactly one of `mirror:`, `fanout:` or `compare:` in the route",
            )),
        }
    }
}

impl MatchConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if let Some(host) = &self.host {
            HostGlob::new(host)
                .map_err(|e| invalid(&format!("{at}.host"), host, &format!("a host glob ({e})")))?;
        }
        if self.port == Some(0) {
            return Err(invalid(
                &format!("{at}.port"),
                "0",
                "a port from 1 to 65535",
            ));
        }
        if let Some(prefix) = &self.path_prefix {
            if !prefix.starts_with('/') {
                return Err(invalid(
                    &format!("{at}.path_prefix"),
                    prefix,
                    "a path starting with '/'",
                ));
            }
        }
        for (i, method) in self.methods.iter().enumerate() {
            let valid =
                !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase() || b == b'-');
            if !valid {
                return Err(invalid(
                    &format!("{at}.methods[{i}]"),
                    method,
                    "an upper-case HTTP method such as GET or POST",
                ));
            }
        }
        for (name, value) in &self.headers {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(invalid(
                    &format!("{at}.headers"),
                    name,
                    "a valid HTTP header name",
                ));
            }
            if http::HeaderValue::from_str(value).is_err() {
                return Err(invalid(
                    &format!("{at}.headers.{name}"),
                    value,
                    "a header value of visible ASCII characters",
                ));
            }
        }
        Ok(())
    }
}

impl MirrorConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        validate_secondary_url(&format!("{at}.to"), &self.to)?;
        if !(0.0..=100.0).contains(&self.percent) {
            return Err(invalid(
                &format!("{at}.percent"),
                &self.percent.to_string(),
                "a number from 0 to 100",
            ));
        }
        validate_positive(&format!("{at}.timeout"), self.timeout)?;
        if self.max_in_flight == 0 {
            return Err(invalid(
                &format!("{at}.max_in_flight"),
                "0",
                "at least 1 copy in flight",
            ));
        }
        Ok(())
    }
}

// === defaults ===

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_ADMIN_LISTEN
                .parse()
                .expect("default admin address is valid"),
        }
    }
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_OUTBOUND_LISTEN
                .parse()
                .expect("default outbound address is valid"),
            default_target: None,
            detect_timeout: DEFAULT_DETECT_TIMEOUT,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            max_request_header_bytes: DEFAULT_MAX_REQUEST_HEADER_BYTES,
            max_request_body_bytes: DEFAULT_MAX_REQUEST_BODY_BYTES,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_string(),
            format: LogFormat::Plain,
        }
    }
}

fn default_percent() -> f64 {
    100.0
}

fn default_mirror_max_body_bytes() -> usize {
    DEFAULT_MIRROR_MAX_BODY_BYTES
}

fn default_mirror_timeout() -> Duration {
    DEFAULT_MIRROR_TIMEOUT
}

fn default_mirror_max_in_flight() -> usize {
    DEFAULT_MIRROR_MAX_IN_FLIGHT
}

// === environment ===

pub const ENV_ADMIN_LISTEN: &str = "TANDEM_ADMIN_LISTEN";
pub const ENV_OUTBOUND_LISTEN: &str = "TANDEM_OUTBOUND_LISTEN";
pub const ENV_OUTBOUND_DEFAULT_TARGET: &str = "TANDEM_OUTBOUND_DEFAULT_TARGET";
pub const ENV_OUTBOUND_CONNECT_TIMEOUT: &str = "TANDEM_OUTBOUND_CONNECT_TIMEOUT";
pub const ENV_OUTBOUND_IDLE_TIMEOUT: &str = "TANDEM_OUTBOUND_IDLE_TIMEOUT";
pub const ENV_DRAIN_TIMEOUT: &str = "TANDEM_DRAIN_TIMEOUT";
pub const ENV_LOG: &str = "TANDEM_LOG";
pub const ENV_LOG_FORMAT: &str = "TANDEM_LOG_FORMAT";

fn parse_env<T: FromStr>(name: &str, value: &str, expected: &str) -> Result<T, ConfigError> {
    value.parse().map_err(|_| invalid(name, value, expected))
}

fn parse_env_duration(name: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value)
        .map_err(|_| invalid(name, value, "a duration such as 500ms, 2s or 1m"))
}

// === helpers ===

fn invalid(field: &str, value: &str, expected: &str) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_string(),
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

fn validate_positive(field: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(invalid(
            field,
            "0s",
            "a duration above zero, such as 500ms or 2s",
        ));
    }
    Ok(())
}

fn validate_host_port(field: &str, value: &str) -> Result<(), ConfigError> {
    let authority: http::uri::Authority = value
        .parse()
        .map_err(|_| invalid(field, value, "host:port, such as 127.0.0.1:8080"))?;
    if authority.port_u16().is_none() || authority.host().is_empty() {
        return Err(invalid(field, value, "host:port with an explicit port"));
    }
    Ok(())
}

fn validate_secondary_url(field: &str, value: &str) -> Result<(), ConfigError> {
    let expected = "an absolute http:// or https:// URL such as http://127.0.0.1:9090";
    let uri: http::Uri = value.parse().map_err(|_| invalid(field, value, expected))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(invalid(field, value, expected)),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid(field, value, expected));
    }
    let authority = uri.authority().expect("a URL with a host has an authority");
    if let Some((_, host)) = authority.as_str().rsplit_once('@') {
        // The message shows the URL without its credentials, which would
        // otherwise end up in terminals and CI logs.
        let shown = value.replacen(authority.as_str(), &format!("***@{host}"), 1);
        return Err(invalid(
            field,
            &shown,
            "a URL without user:password@; copies carry the client's own Authorization header",
        ));
    }
    // `Authority::port` is `None` for a port that does not fit in u16, so the
    // text after the last colon is checked instead (an IPv6 host ends in `]`).
    if let Some((_, port)) = authority.as_str().rsplit_once(':') {
        let in_range = port.parse::<u16>().is_ok_and(|port| port > 0);
        if !port.contains(']') && !in_range {
            return Err(invalid(field, value, "a URL whose port is from 1 to 65535"));
        }
    }
    if uri.query().is_some() {
        return Err(invalid(field, value, "a URL without a query string"));
    }
    Ok(())
}

/// Checks a `tracing` filter. `EnvFilter` takes a bare word such as
/// `warning` as a target name, which would silently turn off every log
/// line, so each directive must be a level or `target=level`.
fn validate_log_filter(field: &str, value: &str) -> Result<(), ConfigError> {
    let expected = "a level (trace, debug, info, warn, error, off) or target=level \
                    directives separated by commas, such as info or warn,tandem=debug";
    for directive in value.split(',').map(str::trim) {
        let level = match directive.rsplit_once('=') {
            Some((target, level)) if !target.is_empty() => level,
            Some(_) => return Err(invalid(field, value, expected)),
            None => directive,
        };
        if level
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_err()
        {
            return Err(invalid(field, value, expected));
        }
    }
    tracing_subscriber::EnvFilter::try_new(value).map_err(|_| invalid(field, value, expected))?;
    Ok(())
}

/// Serde support for listen addresses, with an error that shows the value.
mod socket_addr {
    use std::{fmt, net::SocketAddr};

    use serde::{
        de::{Error, Visitor},
        Deserializer, Serializer,
    };

    pub fn serialize<S: Serializer>(value: &SocketAddr, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
        deserializer.deserialize_str(SocketAddrVisitor)
    }

    struct SocketAddrVisitor;

    impl Visitor<'_> for SocketAddrVisitor {
        type Value = SocketAddr;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an IP address and port such as 127.0.0.1:4140")
        }

        fn visit_str<E: Error>(self, text: &str) -> Result<SocketAddr, E> {
            text.parse().map_err(|_| {
                E::custom(format!(
                    "invalid address {text:?}: expected an IP address and port such as \
                     127.0.0.1:4140 or [::]:4143 (host names are not accepted)"
                ))
            })
        }
    }
}

/// Serde support for durations written as `500ms`, `2s` or `1m`.
mod duration {
    use std::{fmt, time::Duration};

    use serde::{
        de::{Error, Visitor},
        Deserializer, Serializer,
    };

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&humantime::format_duration(*value).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        // The text is parsed inside the visitor, while the deserializer still
        // handles this value, so serde_yaml_ng tags a parse error with the
        // field's own path (`routes[0].mirror.timeout`, not `routes[0].mirror`).
        deserializer.deserialize_str(DurationVisitor)
    }

    struct DurationVisitor;

    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as 500ms, 2s or 1m")
        }

        fn visit_str<E: Error>(self, text: &str) -> Result<Duration, E> {
            humantime::parse_duration(text).map_err(|_| {
                E::custom(format!(
                    "invalid duration {text:?}: expected a number with a unit, such as 500ms, 2s or 1m"
                ))
            })
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogFormat::Plain => f.write_str("plain"),
            LogFormat::Json => f.write_str("json"),
        }
    }
}

#[cfg(test)]
mod tests;
