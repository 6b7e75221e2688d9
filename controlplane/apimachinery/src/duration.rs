//! Durations as Go writes them (`5s`, `500ms`, `1m30s`, `1.5h`), which Kubernetes flags and
//! CoreDNS's Corefile use, bounded by what Go's `time.Duration` holds.

use std::time::Duration;

/// The longest duration Go's `time.Duration` holds (2562047h47m16.854775807s): no timer or
/// deadline set from a parsed duration can overflow below it.
pub const MAX: Duration = Duration::new(9_223_372_036, 854_775_807);

/// Why a duration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("not a duration (like 5s, 500ms, 1m30s or 2h)")]
    Malformed,
    #[error("too large (at most 2562047h)")]
    TooLarge,
}

/// A Go duration: numbers each with a unit (`ns`, `us`, `ms`, `s`, `m`, `h`), at most [`MAX`].
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Malformed);
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits]
            .parse()
            .map_err(|_| DurationError::Malformed)?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(DurationError::Malformed),
        };
        rest = &rest[unit_len..];
        // A huge number of digits reads as infinity; both that and an overflowing sum are
        // "too large", never a panic.
        let term =
            Duration::try_from_secs_f64(number * seconds).map_err(|_| DurationError::TooLarge)?;
        total = total
            .checked_add(term)
            .filter(|t| *t <= MAX)
            .ok_or(DurationError::TooLarge)?;
    }
    Ok(total)
}

/// A duration flag: a Go duration, or a bare number of seconds.
pub fn parse_flag(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let parsed = match text.parse::<f64>() {
        Ok(seconds) => Duration::try_from_secs_f64(seconds).map_err(|_| DurationError::Malformed),
        Err(_) => parse(text),
    };
    parsed.map_err(|e| format!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_go_writes_them() {
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("2562047h"), Ok(Duration::from_secs(2562047 * 3600)));
        assert_eq!(parse("5"), Err(DurationError::Malformed));
        assert_eq!(parse(""), Err(DurationError::Malformed));
        assert_eq!(parse("5 s"), Err(DurationError::Malformed));
        for huge in [
            "2562048h",
            "99999999999999999999h",
            "6000000000000000000s1s",
            &"9".repeat(400),
        ] {
            let huge = if huge.ends_with(['h', 's']) {
                huge.to_string()
            } else {
                format!("{huge}s")
            };
            assert_eq!(parse(&huge), Err(DurationError::TooLarge), "{huge}");
        }
    }

    #[test]
    fn flags_take_a_go_duration_or_seconds() {
        assert_eq!(parse_flag("40s"), Ok(Duration::from_secs(40)));
        assert_eq!(parse_flag("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_flag("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_flag("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_flag("2"), Ok(Duration::from_secs(2)));
        for bad in ["4x", "", "s", "-1"] {
            assert!(parse_flag(bad).is_err(), "{bad}");
        }
    }
}
