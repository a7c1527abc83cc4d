//! Pieces of lowering the resource kinds share: collecting problems, regexes, header names and
//! values, durations, `exportTo`.

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use regex::Regex;

use super::duration::parse_duration;
use super::model::HeaderModifier;
use crate::FieldError;

/// Every problem found while lowering one resource; lowering continues past a problem so that
/// one load reports all of them.
#[derive(Debug, Default)]
pub(super) struct Problems(Vec<FieldError>);

impl Problems {
    pub(super) fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError::new(field, message));
    }

    /// Keeps the value, or records the problem and returns `None`.
    pub(super) fn check<T>(&mut self, result: Result<T, FieldError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(e) => {
                self.0.push(e);
                None
            }
        }
    }

    pub(super) fn finish<T>(self, value: T) -> Result<T, Vec<FieldError>> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self.0)
        }
    }
}

/// Compiles a regex that must match the whole value, as Envoy's RE2 matchers do.
pub(super) fn full_match_regex(pattern: &str, field: &str) -> Result<Regex, FieldError> {
    // The pattern must stand on its own first: an unbalanced one (`/a)|(.*`) would otherwise
    // close the group below early and leave an alternative outside the anchors, matching
    // everything.
    search_regex(pattern, field)?;
    // A non-capturing group keeps alternations (`a|b`) inside the anchors.
    Regex::new(&format!("^(?:{pattern})$")).map_err(|e| invalid_regex(pattern, field, &e))
}

/// Compiles a regex used for search and replace (not anchored).
pub(super) fn search_regex(pattern: &str, field: &str) -> Result<Regex, FieldError> {
    Regex::new(pattern).map_err(|e| invalid_regex(pattern, field, &e))
}

fn invalid_regex(pattern: &str, field: &str, e: &regex::Error) -> FieldError {
    let reason = match e {
        regex::Error::Syntax(s) => s.lines().last().unwrap_or(s).trim().to_owned(),
        other => other.to_string(),
    };
    FieldError::new(
        field,
        format!(
            "invalid regular expression {pattern:?}: {reason}; use RE2 syntax (no look-around or backreferences)"
        ),
    )
}

pub(super) fn header_name(name: &str, field: &str) -> Result<HeaderName, FieldError> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        FieldError::new(
            field,
            format!(
                "{name:?} is not a valid HTTP header name; use letters, digits and -!#$%&'*+.^_`|~"
            ),
        )
    })
}

pub(super) fn header_value(value: &str, field: &str) -> Result<HeaderValue, FieldError> {
    HeaderValue::from_str(value).map_err(|_| {
        FieldError::new(
            field,
            format!(
                "{value:?} is not a valid HTTP header value; control characters are not allowed"
            ),
        )
    })
}

pub(super) fn duration(text: &str, field: &str) -> Result<Duration, FieldError> {
    parse_duration(text).map_err(|e| FieldError::new(field, e.to_string()))
}

/// A timeout where `0s` means "no timeout", as in both APIs.
pub(super) fn timeout(text: &str, field: &str) -> Result<Option<Duration>, FieldError> {
    duration(text, field).map(|d| (!d.is_zero()).then_some(d))
}

/// A percentage that must lie in 0–100.
pub(super) fn percent(value: f64, field: &str) -> Result<f64, FieldError> {
    if (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(FieldError::new(
            field,
            format!("{value} is not a percentage; use a number from 0 to 100"),
        ))
    }
}

/// One header operation as written, with the fields to blame for a bad name or value.
#[derive(Debug)]
pub(super) struct HeaderEntry<'a> {
    pub(super) name_field: String,
    pub(super) value_field: String,
    pub(super) name: &'a str,
    pub(super) value: &'a str,
}

/// Builds a [`HeaderModifier`]. A name given twice keeps its first action, as the Gateway API
/// specifies for duplicates.
pub(super) fn header_modifier<'a>(
    set: impl IntoIterator<Item = HeaderEntry<'a>>,
    add: impl IntoIterator<Item = HeaderEntry<'a>>,
    remove: impl IntoIterator<Item = (String, &'a str)>,
    problems: &mut Problems,
) -> HeaderModifier {
    let mut out = HeaderModifier::default();
    let mut seen: Vec<HeaderName> = Vec::new();
    let mut entry = |e: HeaderEntry<'a>, problems: &mut Problems| {
        let name = problems.check(header_name(e.name, &e.name_field))?;
        let value = problems.check(header_value(e.value, &e.value_field))?;
        if seen.contains(&name) {
            tracing::debug!(field = %e.name_field, "header named twice; the first action wins");
            return None;
        }
        seen.push(name.clone());
        Some((name, value))
    };
    for e in set {
        out.set.extend(entry(e, problems));
    }
    for e in add {
        out.add.extend(entry(e, problems));
    }
    for (field, name) in remove {
        if let Some(name) = problems.check(header_name(name, &field))
            && !out.remove.contains(&name)
        {
            out.remove.push(name);
        }
    }
    out
}

/// Decodes standard base64 (padding optional), the JSON form of protobuf `bytes`.
pub(super) fn base64(text: &str, field: &str) -> Result<Vec<u8>, FieldError> {
    let fail = || {
        FieldError::new(
            field,
            "not valid base64; use the standard alphabet (A-Z a-z 0-9 + /), or `string` for text",
        )
    };
    let digits = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for byte in digits.bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return Err(fail()),
        };
        acc = (acc << 6) | u32::from(value);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // Leftover bits must be padding zeros, and one lone sextet cannot encode a byte.
    if bits >= 6 || acc != 0 {
        return Err(fail());
    }
    Ok(out)
}

/// Checks an Istio resource's `exportTo` as istiod validates it: `.`, `*` or namespace names,
/// each once (`.` and the resource's own namespace are the same); `*` alone; never `~`, which
/// would hide the resource from its own namespace too.
pub(super) fn check_export_to(
    export_to: &[String],
    kind: &str,
    namespace: &str,
    problems: &mut Problems,
) {
    let own = |e: &str| e == "." || e == namespace;
    if export_to.len() > 1 && export_to.iter().any(|e| e == "*") {
        problems.push(
            "spec.exportTo",
            "\"*\" (every namespace) cannot be listed with other entries",
        );
    }
    for (k, entry) in export_to.iter().enumerate() {
        let field = format!("spec.exportTo[{k}]");
        let earlier = &export_to[..k];
        let message = if entry == "~" {
            format!("a {kind} cannot be exported to no namespace (\"~\")")
        } else if earlier.contains(entry) {
            format!("{entry:?} is listed twice")
        } else if own(entry) && earlier.iter().any(|e| own(e)) {
            format!("\".\" and {namespace:?}, its own namespace, are the same")
        } else if !(entry == "." || entry == "*" || is_namespace_name(entry)) {
            format!("{entry:?} is not \".\", \"*\" or a namespace name")
        } else {
            continue;
        };
        problems.push(field, message);
    }
}

/// A Kubernetes namespace name: an RFC 1123 label.
fn is_namespace_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regexes_match_the_whole_value() {
        let re = full_match_regex("/v[0-9]+|/beta", "f").expect("valid");
        assert!(re.is_match("/v12"));
        assert!(re.is_match("/beta"));
        assert!(!re.is_match("/v12/x"));
        assert!(!re.is_match("x/beta"));
        let err = full_match_regex("/(unclosed", "spec.x").expect_err("invalid");
        assert_eq!(err.field, "spec.x");
        assert!(
            err.message
                .starts_with("invalid regular expression \"/(unclosed\"")
        );
    }

    #[test]
    fn decodes_base64() {
        let cases = [
            ("", Some(&b""[..])),
            ("aGk=", Some(b"hi")),
            ("aGk", Some(b"hi")),
            ("aGVsbG8gd29ybGQ=", Some(b"hello world")),
            ("+/8=", Some(&[0xfb, 0xff][..])),
            ("a", None),
            ("aGk*", None),
        ];
        for (text, want) in cases {
            assert_eq!(base64(text, "f").ok().as_deref(), want, "{text}");
        }
    }

    #[test]
    fn header_modifier_keeps_the_first_action_per_name() {
        let entry = |name, value| HeaderEntry {
            name_field: "n".to_owned(),
            value_field: "v".to_owned(),
            name,
            value,
        };
        let mut problems = Problems::default();
        let m = header_modifier(
            [entry("X-A", "1"), entry("x-a", "2")],
            [entry("x-a", "3"), entry("x-b", "4")],
            [("r".to_owned(), "X-C")],
            &mut problems,
        );
        assert!(problems.finish(()).is_ok());
        assert_eq!(m.set.len(), 1);
        assert_eq!(m.set[0].1, "1");
        assert_eq!(m.add.len(), 1);
        assert_eq!(m.add[0].0, "x-b");
        assert_eq!(m.remove, ["x-c"]);
    }
}
