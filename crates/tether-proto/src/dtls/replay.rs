//! The anti-replay window of RFC 6347 §4.1.2.6: the highest record sequence number received
//! and a 64-record bitmap below it.

/// Records accepted once each, within a sliding window of the last [`ReplayWindow::SIZE`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    /// The next sequence number above everything seen (0: nothing seen yet).
    next: u64,
    /// Bit `i` set: `next - 1 - i` was seen.
    seen: u64,
}

impl ReplayWindow {
    /// Width of the window.
    pub const SIZE: u64 = 64;

    /// A window whose records up to `next - 1` count as seen, with `seen` as the bitmap below
    /// it (see [`ReplayWindow::parts`]).
    pub fn from_parts(next: u64, seen: u64) -> Self {
        Self { next, seen }
    }

    /// The state as (next, bitmap), for persistence.
    pub fn parts(&self) -> (u64, u64) {
        (self.next, self.seen)
    }

    /// The highest sequence number seen plus one.
    pub fn next(&self) -> u64 {
        self.next
    }

    /// True if `sequence` is new: above the window, or inside it and not yet seen. Check
    /// before authenticating; [`mark`](Self::mark) only after.
    pub fn is_fresh(&self, sequence: u64) -> bool {
        if sequence >= self.next {
            return true;
        }
        let age = self.next - 1 - sequence;
        age < Self::SIZE && self.seen & (1 << age) == 0
    }

    /// True if `sequence` is above everything seen so far (RFC 9146 §6: only such a record
    /// may move a peer's address).
    pub fn is_newest(&self, sequence: u64) -> bool {
        sequence >= self.next
    }

    /// Records `sequence` as seen. Call only for records that authenticated.
    pub fn mark(&mut self, sequence: u64) {
        if sequence >= self.next {
            let shift = sequence - self.next + 1;
            self.seen = if shift >= Self::SIZE { 0 } else { self.seen << shift };
            self.seen |= 1;
            self.next = sequence + 1;
            return;
        }
        let age = self.next - 1 - sequence;
        if age < Self::SIZE {
            self.seen |= 1 << age;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_sequence_number_is_accepted_once() {
        let mut w = ReplayWindow::default();
        for s in [0, 1, 5, 3, 2, 4] {
            assert!(w.is_fresh(s), "{s}");
            w.mark(s);
            assert!(!w.is_fresh(s), "{s} again");
        }
        assert_eq!(w.next(), 6);
        assert!(w.is_newest(6) && !w.is_newest(5));
    }

    #[test]
    fn records_older_than_the_window_are_refused_and_big_jumps_clear_it() {
        let mut w = ReplayWindow::default();
        w.mark(100);
        assert!(w.is_fresh(37) && !w.is_fresh(36), "64 below the newest is the edge");
        w.mark(37);
        assert!(!w.is_fresh(37));
        w.mark(1_000_000);
        assert!(w.is_fresh(999_999) && !w.is_fresh(100) && !w.is_fresh(1_000_000));
        let (next, seen) = w.parts();
        assert_eq!(ReplayWindow::from_parts(next, seen), w);
    }

    #[test]
    fn the_top_of_the_48_bit_space_does_not_overflow() {
        let mut w = ReplayWindow::default();
        let top = (1u64 << 48) - 1;
        w.mark(top);
        assert!(!w.is_fresh(top) && w.is_fresh(top - 1));
    }
}
