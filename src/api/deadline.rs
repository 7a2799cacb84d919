//! The client's `grpc-timeout` header as an instant, so queued work past it is dropped.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

pub fn from_metadata(meta: &MetadataMap) -> Option<Instant> {
    let value = meta.get("grpc-timeout")?.to_str().ok()?;
    parse_timeout(value).map(|d| Instant::now() + d)
}

/// Least time the server answers before the deadline.
const MIN_MARGIN: Duration = Duration::from_millis(50);
/// Most time the server answers before the deadline.
const MAX_MARGIN: Duration = Duration::from_millis(1000);

/// When the server must answer by: early enough that our DEADLINE_EXCEEDED status reaches the
/// client before the client's own timer fires (a client that gives up itself sees a bare
/// CANCELLED or its library's local error, and the server's answer is lost).
///
/// The client's timer started when it sent the request; ours starts only once the message is
/// received and decoded, so we run late by the transfer and our scheduling delay, and the answer
/// still has to travel back. On a loaded machine those took well over the former 20 ms margin
/// (the margin lost the race in `streaming_batching` under CI load). So: a tenth of the time left,
/// at least 50 ms and at most 1 s, and never more than half the time left (a 40 ms deadline is
/// answered after 20 ms at the latest, not at once).
pub fn answer_by(deadline: Instant) -> tokio::time::Instant {
    let margin = margin(deadline.saturating_duration_since(Instant::now()));
    tokio::time::Instant::from_std(deadline.checked_sub(margin).unwrap_or(deadline))
}

fn margin(left: Duration) -> Duration {
    (left / 10).clamp(MIN_MARGIN, MAX_MARGIN).min(left / 2)
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
    fn the_margin_grows_with_the_time_left_within_its_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(margin(ms(300)), ms(50));
        assert_eq!(margin(ms(100)), ms(50));
        assert_eq!(margin(ms(40)), ms(20));
        assert_eq!(margin(ms(5_000)), ms(500));
        assert_eq!(margin(Duration::from_secs(60)), ms(1000));
        assert_eq!(margin(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn parses_wire_units() {
        assert_eq!(parse_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("3u"), Some(Duration::from_micros(3)));
        assert_eq!(parse_timeout("x"), None);
        assert_eq!(parse_timeout("12Q"), None);
    }
}
