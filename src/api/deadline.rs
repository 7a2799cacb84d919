//! The client's `grpc-timeout` header as an instant, so queued work past it is dropped.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

pub fn from_metadata(meta: &MetadataMap) -> Option<Instant> {
    let value = meta.get("grpc-timeout")?.to_str().ok()?;
    parse_timeout(value).map(|d| Instant::now() + d)
}

/// When the server must answer by: a little before the deadline, so that our DEADLINE_EXCEEDED
/// status wins the race against the transport's own timeout.
pub fn answer_by(deadline: Instant) -> tokio::time::Instant {
    let margin = Duration::from_millis(20);
    tokio::time::Instant::from_std(deadline.checked_sub(margin).unwrap_or(deadline))
}

/// Parses the gRPC wire format: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wire_units() {
        assert_eq!(parse_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("3u"), Some(Duration::from_micros(3)));
        assert_eq!(parse_timeout("x"), None);
        assert_eq!(parse_timeout("12Q"), None);
    }
}
