//! Pure parsers and formatters of the command line: fsync policies, `key=value` headers,
//! `--since` times, JSON output. No I/O.

use bytes::Bytes;
use rill_engine::{FsyncPolicy, Header};

use super::ConsumedRecord;

/// Parses `always`, `never` or `interval:<ms>`.
pub fn parse_fsync(s: &str) -> Result<FsyncPolicy, String> {
    match s {
        "always" => Ok(FsyncPolicy::Always),
        "never" => Ok(FsyncPolicy::Never),
        _ => {
            let Some(ms) = s.strip_prefix("interval:") else {
                return Err(format!("'{s}' is not always, never or interval:<ms>"));
            };
            let interval_ms: u64 = ms.parse().map_err(|e| format!("interval '{ms}': {e}"))?;
            if interval_ms == 0 {
                return Err("the fsync interval must be positive".into());
            }
            Ok(FsyncPolicy::Interval { interval_ms })
        }
    }
}

/// Formats a fsync policy the way [`parse_fsync`] reads it.
pub fn format_fsync(policy: FsyncPolicy) -> String {
    match policy {
        FsyncPolicy::Always => "always".into(),
        FsyncPolicy::Never => "never".into(),
        FsyncPolicy::Interval { interval_ms } => format!("interval:{interval_ms}"),
    }
}

/// Parses a header: `key=value` (split at the first `=`), or `key` alone for a header
/// without a value.
pub fn parse_header(s: &str) -> Result<Header, String> {
    let (key, value) = match s.split_once('=') {
        Some((key, value)) => (key, Some(Bytes::from(value.to_string()))),
        None => (s, None),
    };
    if key.is_empty() {
        return Err(format!("header '{s}' has an empty key"));
    }
    Ok(Header { key: key.to_string(), value })
}

/// A `--since` argument: a point in time, or a duration before now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Since {
    /// Milliseconds since the Unix epoch.
    At(i64),
    /// This many milliseconds before now.
    Ago(i64),
}

impl Since {
    /// The time in ms since the Unix epoch, given the current time.
    pub fn resolve(self, now_ms: i64) -> i64 {
        match self {
            Since::At(ms) => ms,
            Since::Ago(ms) => now_ms.saturating_sub(ms),
        }
    }
}

/// Parses an RFC 3339 time (`2024-05-01T12:00:00Z`, `2024-05-01T14:00:00.250+02:00`), a
/// date (`2024-05-01`, midnight UTC), Unix milliseconds (`1714564800000`), or a duration
/// before now: numbers with units `ms`, `s`, `m`, `h`, `d`, `w` (`10m`, `1h30m`).
pub fn parse_since(s: &str) -> Result<Since, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty time".into());
    }
    if s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map(Since::At).map_err(|e| format!("'{s}': {e}"));
    }
    if s.len() >= 10 && s.as_bytes()[4] == b'-' {
        return parse_rfc3339(s).map(Since::At);
    }
    parse_duration_ms(s).map(Since::Ago)
}

/// Parses `10m`, `1h30m`, `500ms`, ... into milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<i64, String> {
    let mut total: i64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!("'{s}' is not a duration like 10m or 1h30m"));
        }
        let number: i64 = rest[..digits].parse().map_err(|e| format!("'{s}': {e}"))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit_ms = match &rest[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            "" => return Err(format!("'{s}': a number needs a unit (ms, s, m, h, d, w)")),
            other => return Err(format!("'{s}': unknown unit '{other}'")),
        };
        rest = &rest[unit_len..];
        let part = number.checked_mul(unit_ms).ok_or_else(|| format!("'{s}' is too long"))?;
        total = total.checked_add(part).ok_or_else(|| format!("'{s}' is too long"))?;
    }
    Ok(total)
}

/// Parses an RFC 3339 date-time, or a bare date at midnight UTC, into Unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let bad = |why: &str| format!("'{s}' is not an RFC 3339 time ({why})");
    let b = s.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Result<i64, String> {
        let part = s.get(range).ok_or_else(|| bad("too short"))?;
        if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad("expected digits"));
        }
        part.parse::<i64>().map_err(|e| bad(&e.to_string()))
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b.get(7) != Some(&b'-') {
        return Err(bad("expected YYYY-MM-DD"));
    }
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(bad("no such date"));
    }
    let days = days_from_civil(year, month, day);
    if b.len() == 10 {
        return Ok(days * 86_400_000);
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) || b.get(13) != Some(&b':') || b.get(16) != Some(&b':') {
        return Err(bad("expected THH:MM:SS"));
    }
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if hour > 23 || minute > 59 || second > 60 {
        return Err(bad("no such time of day"));
    }
    let mut at = 19;
    let mut millis = 0;
    if b.get(at) == Some(&b'.') {
        let digits = b[at + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(bad("expected fraction digits"));
        }
        let fraction = &s[at + 1..at + 1 + digits];
        let padded = format!("{:0<3}", &fraction[..digits.min(3)]);
        millis = padded.parse::<i64>().map_err(|e| bad(&e.to_string()))?;
        at += 1 + digits;
    }
    let offset_minutes = match &s[at..] {
        "Z" | "z" => 0,
        zone if zone.len() == 6 && matches!(zone.as_bytes()[0], b'+' | b'-') && zone.as_bytes()[3] == b':' => {
            let hours = num(at + 1..at + 3)?;
            let minutes = num(at + 4..at + 6)?;
            if hours > 23 || minutes > 59 {
                return Err(bad("no such zone offset"));
            }
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            sign * (hours * 60 + minutes)
        }
        _ => return Err(bad("expected Z or a +HH:MM offset")),
    };
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_minutes * 60;
    Ok(seconds * 1_000 + millis)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Appends `bytes` as a JSON string (invalid UTF-8 is replaced with U+FFFD).
pub fn push_json_string(out: &mut String, bytes: &[u8]) {
    out.push('"');
    for c in String::from_utf8_lossy(bytes).chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn push_json_bytes(out: &mut String, bytes: Option<&Bytes>) {
    match bytes {
        Some(b) => push_json_string(out, b),
        None => out.push_str("null"),
    }
}

/// One record as a single-line JSON object.
pub fn record_json(record: &ConsumedRecord) -> String {
    let mut out = format!(
        "{{\"partition\":{},\"offset\":{},\"timestamp_ms\":{},\"key\":",
        record.partition, record.offset, record.timestamp_ms
    );
    push_json_bytes(&mut out, record.key.as_ref());
    out.push_str(",\"value\":");
    push_json_bytes(&mut out, record.value.as_ref());
    out.push_str(",\"headers\":[");
    for (i, header) in record.headers.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"key\":");
        push_json_string(&mut out, header.key.as_bytes());
        out.push_str(",\"value\":");
        push_json_bytes(&mut out, header.value.as_ref());
        out.push('}');
    }
    out.push_str("]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three fsync spellings parse and print back identically; bad ones are refused.
    #[test]
    fn fsync_round_trips() {
        for s in ["always", "never", "interval:250"] {
            assert_eq!(format_fsync(parse_fsync(s).expect(s)), s);
        }
        for s in ["sometimes", "interval:", "interval:0", "interval:x", ""] {
            assert!(parse_fsync(s).is_err(), "{s}");
        }
    }

    /// Headers split at the first '='; a bare key has no value; an empty key is refused.
    #[test]
    fn headers_parse() {
        let h = parse_header("trace=a=b").expect("parses");
        assert_eq!((h.key.as_str(), h.value.as_deref()), ("trace", Some(&b"a=b"[..])));
        let h = parse_header("flag").expect("parses");
        assert_eq!((h.key.as_str(), h.value), ("flag", None));
        let h = parse_header("empty=").expect("parses");
        assert_eq!(h.value.as_deref(), Some(&b""[..]));
        assert!(parse_header("=v").is_err());
    }

    /// Unix milliseconds, relative durations and RFC 3339 times (with fractions and zone
    /// offsets) give the expected instants; malformed input is an error, never a panic.
    #[test]
    fn since_parses_every_form() {
        assert_eq!(parse_since("1714564800000"), Ok(Since::At(1_714_564_800_000)));
        assert_eq!(parse_since("10m"), Ok(Since::Ago(600_000)));
        assert_eq!(parse_since("1h30m"), Ok(Since::Ago(5_400_000)));
        assert_eq!(parse_since("500ms"), Ok(Since::Ago(500)));
        assert_eq!(parse_since("2d"), Ok(Since::Ago(172_800_000)));
        assert_eq!(parse_since("10m").expect("ok").resolve(1_000_000), 400_000);
        assert_eq!(parse_since("1970-01-01T00:00:00Z"), Ok(Since::At(0)));
        assert_eq!(parse_since("2024-05-01T12:00:00Z"), Ok(Since::At(1_714_564_800_000)));
        assert_eq!(parse_since("2024-05-01T14:00:00.25+02:00"), Ok(Since::At(1_714_564_800_250)));
        assert_eq!(parse_since("2024-05-01T07:30:00.123456-04:30"), Ok(Since::At(1_714_564_800_123)));
        assert_eq!(parse_since("2024-05-01"), Ok(Since::At(1_714_521_600_000)));
        assert_eq!(parse_since("2000-02-29T00:00:00Z"), Ok(Since::At(951_782_400_000)));
        assert_eq!(parse_since("1969-12-31T23:59:59Z"), Ok(Since::At(-1_000)));
        for bad in [
            "",
            "m",
            "10x",
            "1h30",
            "2023-02-29",
            "2024-13-01T00:00:00Z",
            "2024-05-01T25:00:00Z",
            "2024-05-01T12:00:00",
            "2024-05-01T12:00:00+2:00",
            "2024-05-01T12:00:00.Z",
            "2024-05-01X12:00:00Z",
            "2024-5-1",
            "99999999999999999999m",
        ] {
            assert!(parse_since(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    /// JSON output escapes quotes, control characters and invalid UTF-8, and writes absent
    /// keys and values as null.
    #[test]
    fn record_json_escapes() {
        let record = ConsumedRecord {
            partition: 1,
            offset: 7,
            timestamp_ms: 9,
            key: None,
            value: Some(Bytes::from_static(b"a\"b\\c\n\x01\xff")),
            headers: vec![Header { key: "k".into(), value: None }],
        };
        assert_eq!(
            record_json(&record),
            r#"{"partition":1,"offset":7,"timestamp_ms":9,"key":null,"value":"a\"b\\c\n\u0001�","headers":[{"key":"k","value":null}]}"#
        );
    }
}
