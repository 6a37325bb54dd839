//! What an operator reads in the log, without a flood flooding it: a budget of lines per
//! window for events an attacker can cause (failed handshakes), and a periodic one-line
//! summary of dropped datagrams by reason.

use std::time::{Duration, Instant};

use tether_proto::dtls::{DropReason, EndpointStats};

/// At most `burst` lines per `window`; the lines held back are counted and reported with
/// the first line of the next window.
#[derive(Debug)]
pub struct LogBudget {
    window: Duration,
    burst: u32,
    window_start: Option<Instant>,
    used: u32,
    held_back: u64,
}

impl LogBudget {
    /// A budget of `burst` lines per `window`.
    pub fn new(window: Duration, burst: u32) -> Self {
        Self { window, burst, window_start: None, used: 0, held_back: 0 }
    }

    /// Whether a line may be written at `now`; `Some(n)` with the lines held back since the
    /// last one written (to say so in it), `None` to hold this one back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let expired = self.window_start.is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used >= self.burst {
            self.held_back += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.held_back))
    }
}

/// Dropped datagrams by reason, summarised once per interval when any were dropped.
#[derive(Debug)]
pub(crate) struct DropSummary {
    interval: Duration,
    next: Instant,
    reported: [u64; DropReason::ALL.len()],
}

impl DropSummary {
    pub(crate) fn new(now: Instant, interval: Duration) -> Self {
        Self { interval, next: now + interval, reported: [0; DropReason::ALL.len()] }
    }

    /// When a summary is due, if drops are waiting to be reported.
    pub(crate) fn deadline(&self, stats: &EndpointStats) -> Option<Instant> {
        (self.current(stats) != self.reported).then_some(self.next)
    }

    fn current(&self, stats: &EndpointStats) -> [u64; DropReason::ALL.len()] {
        let mut counts = [0; DropReason::ALL.len()];
        for (i, reason) in DropReason::ALL.iter().enumerate() {
            counts[i] = stats.dropped(*reason);
        }
        counts
    }

    /// The summary line (`malformed=3 unknown_peer=120`) and the interval it covers, when
    /// one is due and something was dropped since the last.
    pub(crate) fn poll(&mut self, now: Instant, stats: &EndpointStats) -> Option<(String, Duration)> {
        if now < self.next {
            return None;
        }
        self.next = now + self.interval;
        let current = self.current(stats);
        let line: Vec<String> = DropReason::ALL
            .iter()
            .zip(current.iter().zip(&self.reported))
            .filter(|(_, (now, before))| now > before)
            .map(|(reason, (now, before))| format!("{}={}", reason.name(), now - before))
            .collect();
        self.reported = current;
        (!line.is_empty()).then(|| (line.join(" "), self.interval))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_writes_a_burst_per_window_and_then_says_how_much_it_held_back() {
        let t0 = Instant::now();
        let mut budget = LogBudget::new(Duration::from_secs(10), 5);
        let written: Vec<_> = (0..1000).filter_map(|i| budget.allow(t0 + Duration::from_millis(i))).collect();
        assert_eq!(written, [0, 0, 0, 0, 0]);
        assert_eq!(budget.allow(t0 + Duration::from_secs(10)), Some(995));
        assert_eq!(budget.allow(t0 + Duration::from_secs(11)), Some(0));
    }
}
