//! A registration's times are `Instant`s in memory and wall-clock milliseconds in a store.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The wall-clock time of `at`, given that `now` is the present.
pub(crate) fn unix_ms(at: Instant, now: Instant) -> i64 {
    now_unix_ms() - i64::try_from(now.saturating_duration_since(at).as_millis()).unwrap_or(i64::MAX / 2)
}

/// The instant of wall-clock time `unix_ms`, given that `now` is the present.
pub(crate) fn instant(unix_ms: i64, now: Instant) -> Instant {
    let ago = Duration::from_millis(u64::try_from(now_unix_ms() - unix_ms).unwrap_or(0));
    now.checked_sub(ago).unwrap_or(now)
}
