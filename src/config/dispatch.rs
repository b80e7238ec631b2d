//! Settings of the `fanout` and `compare` dispatch modes.

use std::{fmt, path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{default_percent, duration, invalid, validate_positive, validate_secondary_url};
use super::{ConfigError, MirrorConfig};

pub const DEFAULT_FANOUT_TIMEOUT: Duration = Duration::from_secs(2);
pub const DEFAULT_FANOUT_MAX_ATTEMPTS: u32 = 6;
pub const DEFAULT_FANOUT_BASE_DELAY: Duration = Duration::from_millis(50);
pub const DEFAULT_FANOUT_MAX_DELAY: Duration = Duration::from_secs(5);
pub const DEFAULT_CIRCUIT_CONSECUTIVE_FAILURES: u32 = 5;
pub const DEFAULT_CIRCUIT_OPEN_FOR: Duration = Duration::from_secs(10);
pub const DEFAULT_FANOUT_QUEUE_CAPACITY: usize = 10_000;
/// Copies sent to one secondary at the same time, retries and their
/// back-off waits included.
pub const DEFAULT_FANOUT_MAX_IN_FLIGHT: usize = 64;
pub const DEFAULT_FANOUT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Memory that the in-memory bodies of one route's pending copies may take
/// together: 16 bodies at the default `max_body_bytes`.
pub const DEFAULT_FANOUT_MAX_QUEUED_BODY_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_SPOOL_DIR: &str = "/var/lib/tandem/spool";
pub const DEFAULT_SPOOL_FSYNC_INTERVAL: Duration = Duration::from_secs(1);
pub const DEFAULT_COMPARE_SAMPLE_DIFFS_PER_MINUTE: u32 = 10;

/// A `fanout` route: every matching request is delivered to each secondary
/// at least once, or written to the dead-letter spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FanoutConfig {
    /// Base URLs of the secondaries, `http://` or `https://`. Each one gets
    /// every matching request.
    pub to: Vec<String>,
    /// Timeout of one attempt, from sending the request to the end of the
    /// response body.
    #[serde(default = "default_fanout_timeout", with = "duration")]
    pub timeout: Duration,
    #[serde(default)]
    pub retry: RetryConfig,
    /// Failure classes that are retried. Others end the copy at once.
    #[serde(default = "RetryClass::all")]
    pub retry_on: Vec<RetryClass>,
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// Copies waiting per secondary. A copy that finds the queue full goes
    /// to the dead-letter spool.
    #[serde(default = "default_fanout_queue_capacity")]
    pub queue_capacity: usize,
    /// Copies sent to one secondary at the same time, back-off waits
    /// included.
    #[serde(default = "default_fanout_max_in_flight")]
    pub max_in_flight: usize,
    /// Bodies up to this size are kept in memory for retries. Larger ones
    /// are written to a file in `spool_dir` while the primary streams.
    #[serde(default = "default_fanout_max_body_bytes")]
    pub max_body_bytes: usize,
    /// Memory that the in-memory bodies of this route's queued and in-flight
    /// copies may take together. A copy that would pass it goes to the
    /// dead-letter spool with reason `queue_full`, so a slow secondary cannot
    /// make the proxy hold `queue_capacity` full bodies.
    #[serde(default = "default_fanout_max_queued_body_bytes")]
    pub max_queued_body_bytes: u64,
    /// Directory of the dead-letter spool and of large bodies awaiting
    /// delivery. Routes may share one.
    #[serde(default = "default_spool_dir")]
    pub spool_dir: PathBuf,
    /// How often appended dead letters are flushed to disk with fsync.
    #[serde(default = "default_spool_fsync_interval", with = "duration")]
    pub spool_fsync_interval: Duration,
    /// Keep the original Host / `:authority` on the copies.
    #[serde(default)]
    pub preserve_host: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts per copy, the first one included.
    pub max_attempts: u32,
    /// Upper bound of the first back-off wait. Each retry doubles it, up to
    /// `max_delay`, and the wait is drawn uniformly below it (full jitter).
    #[serde(with = "duration")]
    pub base_delay: Duration,
    /// Upper bound of every wait, `Retry-After` included.
    #[serde(with = "duration")]
    pub max_delay: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Failed attempts in a row that open the circuit.
    pub consecutive_failures: u32,
    /// How long an open circuit sends copies straight to the spool before
    /// one probe is let through.
    #[serde(with = "duration")]
    pub open_for: Duration,
}

/// A class of failed attempt, as named in `retry_on`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RetryClass {
    /// No connection could be made.
    ConnectFailure,
    /// The connection failed after it was made.
    Reset,
    /// The attempt did not finish within the timeout.
    Timeout,
    /// A 5xx response.
    ServerError,
    /// A 429 response.
    TooManyRequests,
}

/// A `compare` route: like mirror, and the secondary response is compared
/// with the primary response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareConfig {
    /// Base URL of the secondary, `http://` or `https://`.
    pub to: String,
    /// Share of matching requests to compare, 0 to 100.
    #[serde(default = "default_percent")]
    pub percent: f64,
    /// Response headers whose values must be equal.
    #[serde(default)]
    pub headers: Vec<String>,
    /// JSON paths left out of the body comparison, such as `$.id`,
    /// `$.items[0]` or `$.items[*].updated_at`.
    #[serde(default)]
    pub ignore_json_paths: Vec<String>,
    /// Mismatches logged per minute; the rest are only counted.
    #[serde(default = "default_sample_diffs_per_minute")]
    pub sample_diffs_per_minute: u32,
    /// Upper bound of the request body and of each response body. A larger
    /// request is not compared, and a larger response makes the result
    /// `error`.
    #[serde(default = "super::default_mirror_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default = "super::default_mirror_timeout", with = "duration")]
    pub timeout: Duration,
    #[serde(default = "super::default_mirror_max_in_flight")]
    pub max_in_flight: usize,
    #[serde(default)]
    pub preserve_host: bool,
}

// === impl FanoutConfig ===

impl FanoutConfig {
    pub(super) fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.to.is_empty() {
            return Err(invalid(
                &format!("{at}.to"),
                "[]",
                "a list of one or more secondary URLs",
            ));
        }
        for (i, url) in self.to.iter().enumerate() {
            let field = format!("{at}.to[{i}]");
            validate_secondary_url(&field, url)?;
            // `http://a:1` and `http://a:1/` name the same secondary.
            let same = |other: &String| other.trim_end_matches('/') == url.trim_end_matches('/');
            if self.to[..i].iter().any(same) {
                return Err(invalid(&field, url, "a URL not listed twice"));
            }
        }
        validate_positive(&format!("{at}.timeout"), self.timeout)?;
        self.retry.validate(&format!("{at}.retry"))?;
        self.circuit_breaker
            .validate(&format!("{at}.circuit_breaker"))?;
        for (field, value) in [
            ("queue_capacity", self.queue_capacity),
            ("max_in_flight", self.max_in_flight),
            ("max_body_bytes", self.max_body_bytes),
        ] {
            if value == 0 {
                return Err(invalid(&format!("{at}.{field}"), "0", "at least 1"));
            }
        }
        if self.max_queued_body_bytes < self.max_body_bytes as u64 {
            return Err(invalid(
                &format!("{at}.max_queued_body_bytes"),
                &self.max_queued_body_bytes.to_string(),
                &format!("at least max_body_bytes ({})", self.max_body_bytes),
            ));
        }
        if self.spool_dir.as_os_str().is_empty() {
            return Err(invalid(
                &format!("{at}.spool_dir"),
                "",
                "a directory path such as /var/lib/tandem/spool",
            ));
        }
        validate_positive(
            &format!("{at}.spool_fsync_interval"),
            self.spool_fsync_interval,
        )?;
        Ok(())
    }
}

impl RetryConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.max_attempts == 0 {
            return Err(invalid(
                &format!("{at}.max_attempts"),
                "0",
                "at least 1 attempt",
            ));
        }
        validate_positive(&format!("{at}.base_delay"), self.base_delay)?;
        if self.max_delay < self.base_delay {
            return Err(invalid(
                &format!("{at}.max_delay"),
                &humantime::format_duration(self.max_delay).to_string(),
                "a duration no shorter than base_delay",
            ));
        }
        Ok(())
    }
}

impl CircuitBreakerConfig {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if self.consecutive_failures == 0 {
            return Err(invalid(
                &format!("{at}.consecutive_failures"),
                "0",
                "at least 1 failure",
            ));
        }
        validate_positive(&format!("{at}.open_for"), self.open_for)
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: DEFAULT_FANOUT_MAX_ATTEMPTS,
            base_delay: DEFAULT_FANOUT_BASE_DELAY,
            max_delay: DEFAULT_FANOUT_MAX_DELAY,
        }
    }
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_CIRCUIT_CONSECUTIVE_FAILURES,
            open_for: DEFAULT_CIRCUIT_OPEN_FOR,
        }
    }
}

// === impl RetryClass ===

impl RetryClass {
    pub fn all() -> Vec<RetryClass> {
        vec![
            RetryClass::ConnectFailure,
            RetryClass::Reset,
            RetryClass::Timeout,
            RetryClass::ServerError,
            RetryClass::TooManyRequests,
        ]
    }

    /// Returns the name used in `retry_on` and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryClass::ConnectFailure => "connect-failure",
            RetryClass::Reset => "reset",
            RetryClass::Timeout => "timeout",
            RetryClass::ServerError => "5xx",
            RetryClass::TooManyRequests => "429",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        RetryClass::all()
            .into_iter()
            .find(|class| class.as_str() == text)
    }
}

impl fmt::Display for RetryClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for RetryClass {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for RetryClass {
    /// Accepts `429` written as a YAML number as well as a string.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(u64),
        }
        let text = match Raw::deserialize(deserializer)? {
            Raw::Text(text) => text,
            Raw::Number(number) => number.to_string(),
        };
        RetryClass::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "invalid retry class {text:?}: expected one of connect-failure, reset, \
                 timeout, 5xx or 429"
            ))
        })
    }
}

// === impl CompareConfig ===

impl CompareConfig {
    pub(super) fn validate(&self, at: &str) -> Result<(), ConfigError> {
        self.copy_settings().validate(at)?;
        for (i, name) in self.headers.iter().enumerate() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(invalid(
                    &format!("{at}.headers[{i}]"),
                    name,
                    "a valid HTTP header name",
                ));
            }
        }
        for (i, path) in self.ignore_json_paths.iter().enumerate() {
            if let Err(error) = crate::proxy::compare::JsonPath::parse(path) {
                return Err(invalid(
                    &format!("{at}.ignore_json_paths[{i}]"),
                    path,
                    &format!("a JSON path such as $.id, $.items[0] or $.items[*].id ({error})"),
                ));
            }
        }
        Ok(())
    }

    /// Returns the settings of the request copy, which a compare route sends
    /// the way a mirror route does.
    pub fn copy_settings(&self) -> MirrorConfig {
        MirrorConfig {
            to: self.to.clone(),
            percent: self.percent,
            preserve_host: self.preserve_host,
            max_body_bytes: self.max_body_bytes,
            timeout: self.timeout,
            max_in_flight: self.max_in_flight,
        }
    }
}

// === defaults ===

fn default_fanout_timeout() -> Duration {
    DEFAULT_FANOUT_TIMEOUT
}

fn default_fanout_queue_capacity() -> usize {
    DEFAULT_FANOUT_QUEUE_CAPACITY
}

fn default_fanout_max_in_flight() -> usize {
    DEFAULT_FANOUT_MAX_IN_FLIGHT
}

fn default_fanout_max_body_bytes() -> usize {
    DEFAULT_FANOUT_MAX_BODY_BYTES
}

fn default_fanout_max_queued_body_bytes() -> u64 {
    DEFAULT_FANOUT_MAX_QUEUED_BODY_BYTES
}

fn default_spool_dir() -> PathBuf {
    PathBuf::from(DEFAULT_SPOOL_DIR)
}

fn default_spool_fsync_interval() -> Duration {
    DEFAULT_SPOOL_FSYNC_INTERVAL
}

fn default_sample_diffs_per_minute() -> u32 {
    DEFAULT_COMPARE_SAMPLE_DIFFS_PER_MINUTE
}

impl super::Config {
    /// Returns the distinct spool directories of the fanout routes, in
    /// route order.
    pub fn spool_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for fanout in self.routes.iter().filter_map(|route| route.fanout.as_ref()) {
            if !dirs.contains(&fanout.spool_dir) {
                dirs.push(fanout.spool_dir.clone());
            }
        }
        dirs
    }
}
