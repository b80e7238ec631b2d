//! Comparison of a primary and a secondary response: status, the listed
//! headers and the body, which is compared structurally when both sides
//! are JSON and byte for byte otherwise.

use std::fmt;

use http::{HeaderMap, HeaderName, StatusCode};
use serde_json::Value;

use super::json_path::{key_segment, JsonPath};

/// Differing JSON paths listed in one difference; the rest are counted.
const MAX_PATHS: usize = 10;
/// Header values in a diff are cut to this many characters.
const MAX_VALUE_CHARS: usize = 64;
/// Headers whose values never appear in a diff.
const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// Settings of a comparison: the listed headers and the ignored JSON
/// paths.
#[derive(Debug, Clone, Default)]
pub struct CompareSpec {
    pub headers: Vec<HeaderName>,
    pub ignore_json_paths: Vec<JsonPath>,
}

/// One side of a comparison.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub status: StatusCode,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    Status {
        primary: StatusCode,
        secondary: StatusCode,
    },
    /// A listed header differs. Values of secret headers are redacted.
    Header {
        name: HeaderName,
        primary: Option<String>,
        secondary: Option<String>,
    },
    /// JSON bodies differ at these paths, with `more` paths not listed.
    Json { paths: Vec<String>, more: usize },
    /// Bodies compared as bytes differ.
    Bytes {
        primary_len: usize,
        secondary_len: usize,
        first_offset: usize,
    },
}

/// Compares two responses and returns their differences; none means the
/// responses match.
pub fn compare(
    spec: &CompareSpec,
    primary: Observed<'_>,
    secondary: Observed<'_>,
) -> Vec<Difference> {
    let mut differences = Vec::new();
    if primary.status != secondary.status {
        differences.push(Difference::Status {
            primary: primary.status,
            secondary: secondary.status,
        });
    }
    for name in &spec.headers {
        let primary_value = joined(primary.headers, name);
        let secondary_value = joined(secondary.headers, name);
        if primary_value != secondary_value {
            let show = |value: Option<String>| value.map(|v| shown_value(name, &v));
            differences.push(Difference::Header {
                name: name.clone(),
                primary: show(primary_value),
                secondary: show(secondary_value),
            });
        }
    }
    if let Some(difference) = compare_bodies(spec, primary, secondary) {
        differences.push(difference);
    }
    differences
}

fn compare_bodies(
    spec: &CompareSpec,
    primary: Observed<'_>,
    secondary: Observed<'_>,
) -> Option<Difference> {
    let parsed = (
        serde_json::from_slice::<Value>(primary.body),
        serde_json::from_slice::<Value>(secondary.body),
    );
    if let (Ok(mut left), Ok(mut right)) = parsed {
        for path in &spec.ignore_json_paths {
            path.remove(&mut left);
            path.remove(&mut right);
        }
        let mut paths = Vec::new();
        let mut total = 0;
        walk(&mut "$".to_string(), &left, &right, &mut paths, &mut total);
        return (total > 0).then(|| Difference::Json {
            more: total - paths.len(),
            paths,
        });
    }
    if primary.body == secondary.body {
        return None;
    }
    let first_offset = primary
        .body
        .iter()
        .zip(secondary.body)
        .position(|(a, b)| a != b)
        .unwrap_or(primary.body.len().min(secondary.body.len()));
    Some(Difference::Bytes {
        primary_len: primary.body.len(),
        secondary_len: secondary.body.len(),
        first_offset,
    })
}

/// Records the paths where `left` and `right` differ, the first
/// [`MAX_PATHS`] in full and the rest in `total` only.
fn walk(
    path: &mut String,
    left: &Value,
    right: &Value,
    paths: &mut Vec<String>,
    total: &mut usize,
) {
    match (left, right) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let len = path.len();
                path.push_str(&key_segment(key));
                match (a.get(key), b.get(key)) {
                    (Some(x), Some(y)) => walk(path, x, y, paths, total),
                    (Some(_), None) => note(format!("{path} (missing in secondary)"), paths, total),
                    (None, Some(_)) => note(format!("{path} (missing in primary)"), paths, total),
                    (None, None) => unreachable!("the key comes from one of the maps"),
                }
                path.truncate(len);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                walk(path, x, y, paths, total);
                path.truncate(len);
            }
            if a.len() != b.len() {
                note(
                    format!("{path} (length {} vs {})", a.len(), b.len()),
                    paths,
                    total,
                );
            }
        }
        (a, b) if a == b => {}
        (a, b) if kind(a) != kind(b) => {
            note(format!("{path} ({} vs {})", kind(a), kind(b)), paths, total)
        }
        _ => note(path.clone(), paths, total),
    }
}

fn note(text: String, paths: &mut Vec<String>, total: &mut usize) {
    *total += 1;
    if paths.len() < MAX_PATHS {
        paths.push(text);
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Joins all values of a header with ", ".
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let values: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

fn shown_value(name: &HeaderName, value: &str) -> String {
    if SECRET_HEADERS.contains(&name.as_str()) {
        return "<redacted>".to_string();
    }
    if value.chars().count() > MAX_VALUE_CHARS {
        let cut: String = value.chars().take(MAX_VALUE_CHARS).collect();
        return format!("{cut}...");
    }
    value.to_string()
}

/// A short, one-line diff for logs: statuses, header values (secrets
/// redacted) and differing body paths, never body values.
pub struct Summary<'a>(pub &'a [Difference]);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, difference) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            match difference {
                Difference::Status { primary, secondary } => {
                    write!(f, "status {} vs {}", primary.as_u16(), secondary.as_u16())?
                }
                Difference::Header {
                    name,
                    primary,
                    secondary,
                } => write!(
                    f,
                    "header {name}: {} vs {}",
                    primary
                        .as_deref()
                        .map_or("(absent)".into(), |v| format!("{v:?}")),
                    secondary
                        .as_deref()
                        .map_or("(absent)".into(), |v| format!("{v:?}"))
                )?,
                Difference::Json { paths, more } => {
                    write!(f, "body differs at {}", paths.join(", "))?;
                    if *more > 0 {
                        write!(f, " and {more} more")?;
                    }
                }
                Difference::Bytes {
                    primary_len,
                    secondary_len,
                    first_offset,
                } => write!(
                    f,
                    "body bytes differ from offset {first_offset} ({primary_len} vs \
                     {secondary_len} bytes)"
                )?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(headers: &[&str], ignore: &[&str]) -> CompareSpec {
        CompareSpec {
            headers: headers.iter().map(|h| h.parse().unwrap()).collect(),
            ignore_json_paths: ignore.iter().map(|p| JsonPath::parse(p).unwrap()).collect(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn observed<'a>(status: u16, headers: &'a HeaderMap, body: &'a str) -> Observed<'a> {
        Observed {
            status: StatusCode::from_u16(status).unwrap(),
            headers,
            body: body.as_bytes(),
        }
    }

    #[test]
    fn equal_responses_match() {
        let h = headers(&[("content-type", "application/json")]);
        let diffs = compare(
            &spec(&["content-type"], &[]),
            observed(200, &h, r#"{"a": 1, "b": [1, 2]}"#),
            observed(200, &h, r#"{"b":[1,2],"a":1}"#),
        );
        assert_eq!(diffs, vec![], "key order and spacing do not matter");
    }

    #[test]
    fn ignored_paths_do_not_count() {
        let h = HeaderMap::new();
        let diffs = compare(
            &spec(&[], &["$.id", "$.items[*].at"]),
            observed(200, &h, r#"{"id": 1, "items": [{"at": 5, "n": 1}]}"#),
            observed(200, &h, r#"{"id": 2, "items": [{"at": 6, "n": 1}]}"#),
        );
        assert_eq!(diffs, vec![]);
    }

    #[test]
    fn json_differences_name_paths() {
        let h = HeaderMap::new();
        let diffs = compare(
            &spec(&[], &["$.id"]),
            observed(
                200,
                &h,
                r#"{"id": 1, "total": 10, "items": [1, 2], "x": "a", "gone": 1}"#,
            ),
            observed(
                200,
                &h,
                r#"{"id": 2, "total": 11, "items": [1, 2, 3], "x": 1, "new": 1}"#,
            ),
        );
        assert_eq!(
            diffs,
            vec![Difference::Json {
                paths: vec![
                    "$.gone (missing in secondary)".into(),
                    "$.items (length 2 vs 3)".into(),
                    "$.new (missing in primary)".into(),
                    "$.total".into(),
                    "$.x (string vs number)".into(),
                ],
                more: 0
            }]
        );
    }

    #[test]
    fn paths_beyond_limit_are_counted() {
        let h = HeaderMap::new();
        let left: Vec<u32> = (0..15).collect();
        let right: Vec<u32> = (100..115).collect();
        let diffs = compare(
            &spec(&[], &[]),
            observed(200, &h, &serde_json::to_string(&left).unwrap()),
            observed(200, &h, &serde_json::to_string(&right).unwrap()),
        );
        let [Difference::Json { paths, more }] = diffs.as_slice() else {
            panic!("expected one JSON difference: {diffs:?}");
        };
        assert_eq!(paths.len(), MAX_PATHS);
        assert_eq!(*more, 5);
    }

    #[test]
    fn status_and_headers_differ() {
        let a = headers(&[
            ("content-type", "text/plain"),
            ("set-cookie", "session=abc"),
        ]);
        let b = headers(&[("set-cookie", "session=xyz")]);
        let diffs = compare(
            &spec(&["content-type", "set-cookie"], &[]),
            observed(200, &a, "same"),
            observed(503, &b, "same"),
        );
        let summary = Summary(&diffs).to_string();
        assert!(summary.contains("status 200 vs 503"), "{summary}");
        assert!(
            summary.contains("header content-type: \"text/plain\" vs (absent)"),
            "{summary}"
        );
        assert!(
            summary.contains("set-cookie: \"<redacted>\" vs \"<redacted>\""),
            "{summary}"
        );
        assert!(!summary.contains("abc"), "cookie value leaked: {summary}");
        assert!(!summary.contains("xyz"), "cookie value leaked: {summary}");
    }

    #[test]
    fn non_json_bodies_compare_bytes() {
        let h = HeaderMap::new();
        let diffs = compare(
            &spec(&[], &[]),
            observed(200, &h, "hello world"),
            observed(200, &h, "hello there"),
        );
        assert_eq!(
            diffs,
            vec![Difference::Bytes {
                primary_len: 11,
                secondary_len: 11,
                first_offset: 6
            }]
        );
        assert_eq!(
            compare(
                &spec(&[], &[]),
                observed(200, &h, "<p>"),
                observed(200, &h, "<p>")
            ),
            vec![]
        );
    }

    #[test]
    fn summary_never_shows_body_values() {
        let h = HeaderMap::new();
        let diffs = compare(
            &spec(&[], &[]),
            observed(200, &h, r#"{"token": "secret-1"}"#),
            observed(200, &h, r#"{"token": "secret-2"}"#),
        );
        let summary = Summary(&diffs).to_string();
        assert_eq!(summary, "body differs at $.token");
    }
}
