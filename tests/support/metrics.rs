//! Reads the proxy's Prometheus text from the admin listener into labelled
//! samples, and waits for conditions on them.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

/// How long [`wait_for_metrics`] polls before failing the test.
pub const METRICS_WAIT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// One parsed sample: metric name, labels and value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// All samples of one scrape.
#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl MetricsSnapshot {
    /// Parses the Prometheus text exposition format (comments are skipped).
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .map(|line| {
                parse_sample(line).unwrap_or_else(|| panic!("invalid sample line {line:?}"))
            })
            .collect();
        Self {
            samples,
            text: text.to_string(),
        }
    }

    /// Returns the sum of the samples named `name` whose labels include all
    /// of `labels`; 0 when there are none, as for a counter never touched.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Copies that were due on `route`.
    pub fn due(&self, route: &str) -> u64 {
        self.sum("tandem_dispatch_due_total", &[("route", route)]) as u64
    }

    /// Copies on `route` shed for `reason`.
    pub fn shed(&self, route: &str, reason: &str) -> u64 {
        self.sum(
            "tandem_dispatch_shed_total",
            &[("route", route), ("reason", reason)],
        ) as u64
    }

    /// Copies on `route` shed for any reason.
    pub fn shed_total(&self, route: &str) -> u64 {
        self.sum("tandem_dispatch_shed_total", &[("route", route)]) as u64
    }

    /// Copies on `route` that got a response from the secondary, any status.
    pub fn delivered(&self, route: &str) -> u64 {
        self.sum(
            "tandem_requests_total",
            &[("route", route), ("role", "mirror")],
        ) as u64
    }

    /// Copies on `route` that got a response of `class` (such as `5xx`).
    pub fn delivered_class(&self, route: &str, class: &str) -> u64 {
        self.sum(
            "tandem_requests_total",
            &[
                ("route", route),
                ("role", "mirror"),
                ("status_class", class),
            ],
        ) as u64
    }

    /// Primary responses on `route` (`default` for requests no route matched).
    pub fn primary(&self, route: &str) -> u64 {
        self.sum(
            "tandem_requests_total",
            &[("route", route), ("role", "primary")],
        ) as u64
    }

    pub fn in_flight(&self, route: &str) -> i64 {
        self.sum("tandem_dispatch_in_flight", &[("route", route)]) as i64
    }

    /// True when every due copy on `route` has ended as a response or a shed,
    /// the accounting invariant of the dispatch metrics.
    pub fn settled(&self, route: &str) -> bool {
        self.due(route) == self.delivered(route) + self.shed_total(route)
            && self.in_flight(route) == 0
    }
}

fn parse_sample(line: &str) -> Option<Sample> {
    let (name_and_labels, value) = line.rsplit_once(' ')?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    let Some((name, labels)) = name_and_labels.split_once('{') else {
        return Some(Sample {
            name: name_and_labels.to_string(),
            labels: BTreeMap::new(),
            value,
        });
    };
    Some(Sample {
        name: name.to_string(),
        labels: parse_labels(labels.strip_suffix('}')?)?,
        value,
    })
}

/// Parses `a="x",b="y\"z"` with the format's escapes (`\\`, `\"`, `\n`).
fn parse_labels(text: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                other => value.push(other),
            }
        };
        labels.insert(key.trim_start_matches(',').to_string(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some(labels)
}

/// Fetches `/metrics` from the admin listener.
pub async fn scrape(admin: SocketAddr) -> MetricsSnapshot {
    let response = super::client::get(admin, "/metrics").await;
    assert_eq!(
        response.status, 200,
        "expected /metrics to answer 200, got {}",
        response.status
    );
    MetricsSnapshot::parse(&String::from_utf8_lossy(&response.body))
}

/// Polls `/metrics` every 20 ms until `condition` is true and returns that
/// scrape. After 10 s it fails the test with `description` and the last
/// scrape.
pub async fn wait_for_metrics(
    admin: SocketAddr,
    description: &str,
    condition: impl Fn(&MetricsSnapshot) -> bool,
) -> MetricsSnapshot {
    let deadline = tokio::time::Instant::now() + METRICS_WAIT;
    loop {
        let snapshot = scrape(admin).await;
        if condition(&snapshot) {
            return snapshot;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "expected {description} within {METRICS_WAIT:?}; last scrape:\n{}",
                relevant_lines(&snapshot.text)
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Keeps the counter and gauge lines of a scrape, dropping histograms, so a
/// failure message stays readable.
fn relevant_lines(text: &str) -> String {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.contains("_bucket{"))
        .collect::<Vec<_>>()
        .join("\n")
}
