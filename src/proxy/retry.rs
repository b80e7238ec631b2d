//! Retry policy of fanout copies: which failures are retried, exponential
//! back-off with full jitter, and `Retry-After`.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use crate::config::{FanoutConfig, RetryClass};

/// When and how often a failed fanout attempt is retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    retry_on: Vec<RetryClass>,
}

/// Cause of a failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// A failure of a class that `retry_on` may list.
    Retryable {
        class: RetryClass,
        /// The wait a 429 or 503 response asked for.
        retry_after: Option<Duration>,
    },
    /// A response that is final whatever `retry_on` lists: 1xx, 3xx and
    /// 4xx other than 429.
    Rejected(StatusCode),
}

impl RetryPolicy {
    pub fn new(config: &FanoutConfig) -> Self {
        Self {
            max_attempts: config.retry.max_attempts,
            base_delay: config.retry.base_delay,
            max_delay: config.retry.max_delay,
            retry_on: config.retry_on.clone(),
        }
    }

    /// True when a failure may be retried, attempts permitting.
    pub fn retries(&self, failure: &Failure) -> bool {
        match failure {
            Failure::Retryable { class, .. } => self.retry_on.contains(class),
            Failure::Rejected(_) => false,
        }
    }

    /// Returns the wait before retry number `retry` (1 for the second
    /// attempt). A `Retry-After` wait is used as given, capped by
    /// `max_delay`. Otherwise the wait is drawn uniformly from zero to
    /// `base_delay * 2^(retry - 1)`, capped by `max_delay` ("full jitter").
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>, draw: f64) -> Duration {
        if let Some(wait) = retry_after {
            return wait.min(self.max_delay);
        }
        self.ceiling(retry).mul_f64(draw.clamp(0.0, 1.0))
    }

    /// Returns the upper bound of the jittered wait before retry `retry`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(32);
        self.base_delay
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max_delay)
    }
}

/// Classifies a response status: 2xx is success (`None`), everything else
/// is a failure.
pub fn classify_status(status: StatusCode, headers: &HeaderMap) -> Option<Failure> {
    if status.is_success() {
        return None;
    }
    let retry_after = || {
        headers
            .get(http::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| parse_retry_after(value, SystemTime::now()))
    };
    Some(match status.as_u16() {
        429 => Failure::Retryable {
            class: RetryClass::TooManyRequests,
            retry_after: retry_after(),
        },
        503 => Failure::Retryable {
            class: RetryClass::ServerError,
            retry_after: retry_after(),
        },
        500..=599 => Failure::Retryable {
            class: RetryClass::ServerError,
            retry_after: None,
        },
        _ => Failure::Rejected(status),
    })
}

/// Parses a `Retry-After` value (RFC 9110 section 10.2.3): delay seconds,
/// or an HTTP date, which counts from `now` and is zero when past.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return Some(Duration::from_secs(value.parse().unwrap_or(u64::MAX)));
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 6,
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(1),
            retry_on: RetryClass::all(),
        }
    }

    #[test]
    fn ceiling_doubles_up_to_max() {
        let policy = policy();
        let ceilings: Vec<u64> = (1..=7)
            .map(|retry| policy.ceiling(retry).as_millis() as u64)
            .collect();
        assert_eq!(ceilings, vec![50, 100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.ceiling(1000), Duration::from_secs(1), "no overflow");
    }

    #[test]
    fn jittered_delay_stays_below_ceiling() {
        let policy = policy();
        for retry in 1..=6 {
            for draw in [0.0, 0.25, 0.5, 0.999, 1.0] {
                let delay = policy.delay(retry, None, draw);
                assert!(delay <= policy.ceiling(retry), "retry {retry}, draw {draw}");
            }
        }
        assert_eq!(policy.delay(3, None, 0.5), Duration::from_millis(100));
        assert_eq!(policy.delay(3, None, 0.0), Duration::ZERO);
    }

    #[test]
    fn retry_after_is_capped() {
        let policy = policy();
        assert_eq!(
            policy.delay(1, Some(Duration::from_millis(300)), 0.0),
            Duration::from_millis(300)
        );
        assert_eq!(
            policy.delay(1, Some(Duration::from_secs(120)), 0.0),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn retry_after_parses_both_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn statuses_are_classified() {
        let headers = HeaderMap::new();
        assert_eq!(classify_status(StatusCode::OK, &headers), None);
        assert_eq!(classify_status(StatusCode::ACCEPTED, &headers), None);
        assert_eq!(
            classify_status(StatusCode::BAD_REQUEST, &headers),
            Some(Failure::Rejected(StatusCode::BAD_REQUEST))
        );
        assert_eq!(
            classify_status(StatusCode::BAD_GATEWAY, &headers),
            Some(Failure::Retryable {
                class: RetryClass::ServerError,
                retry_after: None
            })
        );
        let mut with_wait = HeaderMap::new();
        with_wait.insert(http::header::RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(
            classify_status(StatusCode::TOO_MANY_REQUESTS, &with_wait),
            Some(Failure::Retryable {
                class: RetryClass::TooManyRequests,
                retry_after: Some(Duration::from_secs(3))
            })
        );
    }

    #[test]
    fn retry_on_limits_classes() {
        let mut policy = policy();
        policy.retry_on = vec![RetryClass::Timeout];
        let timeout = Failure::Retryable {
            class: RetryClass::Timeout,
            retry_after: None,
        };
        let server_error = Failure::Retryable {
            class: RetryClass::ServerError,
            retry_after: None,
        };
        assert!(policy.retries(&timeout));
        assert!(!policy.retries(&server_error));
        assert!(!policy.retries(&Failure::Rejected(StatusCode::NOT_FOUND)));
    }
}
