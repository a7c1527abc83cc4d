//! Durations as Kubernetes resources spell them.
//!
//! Istio fields are protobuf `Duration`s, written in YAML as `1.5s`; Gateway API fields follow
//! GEP-2257 (`1h30m`, `300ms`). Both are subsets of Go's `time.ParseDuration` syntax, so we accept
//! that syntax once: a sequence of decimal numbers, each with a unit (`h`, `m`, `s`, `ms`, `us`,
//! `µs`, `ns`). Negative durations have no meaning for timeouts and are rejected.

use std::time::Duration;

/// Why a duration string could not be read; the message says what would be valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid duration {input:?}: {reason}; write a number and a unit (h, m, s, ms, us, ns), e.g. \"1.5s\", \"300ms\" or \"1h30m\""
)]
pub struct InvalidDuration {
    /// The text that was read.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The longest duration protobuf can carry (10,000 years), which Istio's validation enforces.
/// It also keeps every deadline the proxies compute from a duration (now + timeout, backoff
/// times ten) far from overflowing an `Instant`.
const MAX_SECONDS: u64 = 315_576_000_000;
const TOO_LARGE: &str = "too large (at most 315576000000s, as protobuf's)";

/// Reads `1.5s`, `300ms`, `2m`, `1h30m` or `0` into a [`Duration`].
///
/// Public because every layer that reads durations from YAML (routes, destination rules,
/// plugins) should agree on one syntax and one error message.
pub fn parse_duration(input: &str) -> Result<Duration, InvalidDuration> {
    let fail = |reason| InvalidDuration {
        input: input.to_owned(),
        reason,
    };
    let text = input.trim();
    if text.starts_with('-') {
        return Err(fail("durations cannot be negative"));
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(fail("it is empty"));
    }
    let mut rest = text;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| fail("the last number has no unit"))?;
        let (number, after) = rest.split_at(digits);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos = unit_nanos(unit).ok_or_else(|| fail("unknown unit"))?;
        total = total
            .checked_add(scaled(number, unit_nanos).map_err(fail)?)
            .ok_or_else(|| fail(TOO_LARGE))?;
        rest = after;
    }
    let secs = u64::try_from(total / 1_000_000_000)
        .ok()
        .filter(|&secs| secs <= MAX_SECONDS)
        .ok_or_else(|| fail(TOO_LARGE))?;
    // The remainder of a division by 10^9 always fits in u32.
    let nanos = (total % 1_000_000_000) as u32;
    Ok(Duration::new(secs, nanos))
}

fn unit_nanos(unit: &str) -> Option<u128> {
    Some(match unit {
        "ns" => 1,
        "us" | "µs" | "μs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// `number` (decimal, optional fraction) times `unit` nanoseconds, truncated to whole nanoseconds.
/// Integer arithmetic keeps `0.1s` exactly 100 ms, which floating point would not.
fn scaled(number: &str, unit: u128) -> Result<u128, &'static str> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err("not a number");
    }
    let parse = |s: &str| -> Result<u128, &'static str> {
        if s.is_empty() {
            Ok(0)
        } else {
            s.parse().map_err(|_| TOO_LARGE)
        }
    };
    let whole = parse(whole)?.checked_mul(unit).ok_or(TOO_LARGE)?;
    // Digits beyond nanosecond precision cannot change the result; dropping them avoids overflow.
    let fraction = &fraction[..fraction.len().min(18)];
    let scale = 10u128.pow(fraction.len() as u32);
    let fraction = parse(fraction)?.checked_mul(unit).ok_or(TOO_LARGE)? / scale;
    whole.checked_add(fraction).ok_or(TOO_LARGE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_go_and_protobuf_forms() {
        let cases = [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("1.5s", Duration::from_millis(1500)),
            ("300ms", Duration::from_millis(300)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1h30m", Duration::from_secs(5400)),
            ("0.1s", Duration::from_millis(100)),
            ("10us", Duration::from_micros(10)),
            ("10µs", Duration::from_micros(10)),
            ("7ns", Duration::from_nanos(7)),
            (".5s", Duration::from_millis(500)),
            ("1.000000001s", Duration::new(1, 1)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_with_a_reason() {
        let cases = [
            ("", "it is empty"),
            ("10", "the last number has no unit"),
            ("5 s", "unknown unit"),
            ("5d", "unknown unit"),
            ("-1s", "durations cannot be negative"),
            ("1..5s", "not a number"),
            (".s", "not a number"),
            ("99999999999999999999999h", TOO_LARGE),
            ("9999999999999999999999999999999999999999s", TOO_LARGE),
            ("9300000000000000000s", TOO_LARGE),
            ("315576000001s", TOO_LARGE),
        ];
        assert_eq!(
            parse_duration("315576000000s"),
            Ok(Duration::from_secs(MAX_SECONDS))
        );
        for (text, reason) in cases {
            let err = parse_duration(text).expect_err(text);
            assert_eq!(err.reason, reason, "{text}");
        }
        let message = parse_duration("5d").expect_err("bad unit").to_string();
        assert!(
            message.contains("\"5d\"") && message.contains("300ms"),
            "{message}"
        );
    }
}
