//! A small JSON path subset for `ignore_json_paths`: `$`, `.name`,
//! `['name']`, `[index]`, `[*]` and `.*`.

use std::fmt;

use serde_json::Value;

/// A parsed path such as `$.items[*].id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
    /// Every member of an object or element of an array.
    Wildcard,
}

impl JsonPath {
    /// Parses a path. Returns a message naming the problem on bad input.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut rest = text
            .strip_prefix('$')
            .ok_or_else(|| "a path starts with $".to_string())?;
        let mut segments = Vec::new();
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('.') {
                let end = after.find(['.', '[']).unwrap_or(after.len());
                let name = &after[..end];
                if name.is_empty() {
                    return Err("a name is missing after '.'".to_string());
                }
                segments.push(if name == "*" {
                    Segment::Wildcard
                } else {
                    Segment::Key(name.to_string())
                });
                rest = &after[end..];
            } else if let Some(after) = rest.strip_prefix('[') {
                let end = after
                    .find(']')
                    .ok_or_else(|| "a '[' has no matching ']'".to_string())?;
                segments.push(parse_bracket(&after[..end])?);
                rest = &after[end + 1..];
            } else {
                return Err(format!("unexpected text {rest:?}; expected '.' or '['"));
            }
        }
        Ok(Self { segments })
    }

    /// Removes what the path matches from `value`: object members are
    /// deleted, array elements become `null` so later indices keep their
    /// positions. The bare path `$` turns the whole value into `null`.
    pub fn remove(&self, value: &mut Value) {
        if self.segments.is_empty() {
            *value = Value::Null;
            return;
        }
        remove_at(value, &self.segments);
    }
}

fn parse_bracket(inner: &str) -> Result<Segment, String> {
    let inner = inner.trim();
    if inner == "*" {
        return Ok(Segment::Wildcard);
    }
    for quote in ['\'', '"'] {
        if let Some(name) = inner
            .strip_prefix(quote)
            .and_then(|rest| rest.strip_suffix(quote))
        {
            return Ok(Segment::Key(name.to_string()));
        }
    }
    inner
        .parse()
        .map(Segment::Index)
        .map_err(|_| format!("[{inner}] is not an index, '*' or a quoted name"))
}

fn remove_at(value: &mut Value, segments: &[Segment]) {
    let (first, rest) = segments.split_first().expect("callers pass a segment");
    let last = rest.is_empty();
    match (first, value) {
        (Segment::Key(key), Value::Object(map)) => {
            if last {
                map.remove(key);
            } else if let Some(child) = map.get_mut(key) {
                remove_at(child, rest);
            }
        }
        (Segment::Index(index), Value::Array(items)) => {
            if let Some(child) = items.get_mut(*index) {
                if last {
                    *child = Value::Null;
                } else {
                    remove_at(child, rest);
                }
            }
        }
        (Segment::Wildcard, Value::Object(map)) => {
            if last {
                map.clear();
            } else {
                map.values_mut().for_each(|child| remove_at(child, rest));
            }
        }
        (Segment::Wildcard, Value::Array(items)) => {
            for child in items.iter_mut() {
                if last {
                    *child = Value::Null;
                } else {
                    remove_at(child, rest);
                }
            }
        }
        _ => {}
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("$")?;
        for segment in &self.segments {
            match segment {
                Segment::Key(key) => f.write_str(&key_segment(key))?,
                Segment::Index(index) => write!(f, "[{index}]")?,
                Segment::Wildcard => f.write_str("[*]")?,
            }
        }
        Ok(())
    }
}

/// Formats an object key as a path segment: `.name` for plain names,
/// `['name']` otherwise.
pub fn key_segment(key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if plain {
        format!(".{key}")
    } else {
        format!("['{key}']")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn removed(path: &str, mut value: Value) -> Value {
        JsonPath::parse(path).unwrap().remove(&mut value);
        value
    }

    #[test]
    fn parses_supported_forms() {
        for (text, shown) in [
            ("$", "$"),
            ("$.a.b", "$.a.b"),
            ("$.a[0]", "$.a[0]"),
            ("$.a[*].b", "$.a[*].b"),
            ("$['a b'].c", "$['a b'].c"),
            ("$.*", "$[*]"),
        ] {
            let path = JsonPath::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(path.to_string(), shown);
        }
    }

    #[test]
    fn rejects_bad_paths() {
        for text in ["a.b", "$.", "$.a[", "$.a[x]", "$a", "$.a[-1]"] {
            assert!(JsonPath::parse(text).is_err(), "{text} must be rejected");
        }
    }

    #[test]
    fn removes_keys_indices_and_wildcards() {
        let value =
            json!({"id": 1, "a": {"b": 2, "c": 3}, "items": [{"t": 1, "k": 1}, {"t": 2, "k": 2}]});
        assert_eq!(
            removed("$.id", value.clone()),
            json!({"a": {"b": 2, "c": 3}, "items": [{"t": 1, "k": 1}, {"t": 2, "k": 2}]})
        );
        assert_eq!(removed("$.a.b", value.clone())["a"], json!({"c": 3}));
        assert_eq!(
            removed("$.items[0]", value.clone())["items"],
            json!([null, {"t": 2, "k": 2}])
        );
        assert_eq!(
            removed("$.items[*].t", value.clone())["items"],
            json!([{"k": 1}, {"k": 2}])
        );
        assert_eq!(removed("$.missing.deeper", value.clone()), value);
        assert_eq!(removed("$", value), Value::Null);
    }
}
