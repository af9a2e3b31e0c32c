//! Durations as configuration and annotations spell them (`30s`, `10m`, `1h`, `500ms`),
//! pure: the floor that the flags, the pod annotations and the rotation decisions share.

use std::time::Duration;

/// Parses `30s`, `10m`, `2h`, `500ms` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 30s, 10m or 1h"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("`{s}` has an unknown unit `{unit}`; use ms, s, m or h")),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (input, want) in [
            ("30s", Some(30)),
            ("10m", Some(600)),
            ("1h", Some(3600)),
            ("45", Some(45)),
            ("", None),
            ("5d", None),
            ("m", None),
            ("-1s", None),
        ] {
            assert_eq!(
                parse_duration(input).ok().map(|d| d.as_secs()),
                want,
                "input {input:?}"
            );
        }
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    }
}
