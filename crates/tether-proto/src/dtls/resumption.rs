//! The server's session cache for abbreviated handshakes (RFC 5246 §7.3, session IDs),
//! kept in Rust instead of in OpenSSL.
//!
//! OpenSSL's internal cache holds a live `SSL_SESSION` per entry and drops it when the
//! `SSL` that made it is freed without a shutdown. Once established sessions leave OpenSSL,
//! the cache keeps instead what an abbreviated handshake needs: the session in OpenSSL's own
//! DER form (`i2d_SSL_SESSION`: version, suite, session ID, master secret, PSK identity or
//! peer certificate, Extended Master Secret flag), about 150 bytes for a PSK session. OpenSSL
//! asks for it by session ID through the get-session callback and resumes from it; the
//! cache is bounded, the oldest entry leaves first, and an entry can be exported with a
//! session's snapshot so resumption survives a restart.
//!
//! Session tickets (RFC 5077) would need no per-session state, but the constrained clients
//! LwM2M serves (tinydtls, most Mbed TLS builds, node-dtls-client) resume by session ID
//! only, so that is what the cache serves.
//!
//! The cache belongs to the server context and is shared by its sessions, where OpenSSL's
//! own cache was; like that one it sits behind a lock (uncontended: one endpoint task).

use std::collections::{HashMap, VecDeque};

/// Session ID → the session's DER, bounded, oldest first out.
///
/// Keyed by the first 8 bytes of the session ID (OpenSSL's IDs are 32 random bytes), so an
/// entry costs its DER and two words; a lookup is confirmed against the whole ID in the DER.
#[derive(Debug, Default)]
pub(crate) struct ResumptionCache {
    capacity: usize,
    entries: HashMap<u64, Entry>,
    /// Insertion order with the generation of each insertion; stale ones are skipped.
    order: VecDeque<(u64, u64)>,
    next_generation: u64,
}

fn key(session_id: &[u8]) -> u64 {
    session_id.iter().take(8).fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

#[derive(Debug)]
struct Entry {
    der: Box<[u8]>,
    generation: u64,
}

impl ResumptionCache {
    /// An empty cache holding at most `capacity` sessions (0: none).
    pub fn new(capacity: usize) -> Self {
        Self { capacity, ..Self::default() }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Stores (or refreshes) a session, evicting the oldest beyond capacity.
    pub fn insert(&mut self, session_id: &[u8], der: Box<[u8]>) {
        if self.capacity == 0 || session_id.is_empty() {
            return;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        self.entries.insert(key(session_id), Entry { der, generation });
        self.order.push_back((key(session_id), generation));
        while self.entries.len() > self.capacity {
            let Some((id, generation)) = self.order.pop_front() else { break };
            if self.entries.get(&id).is_some_and(|e| e.generation == generation) {
                self.entries.remove(&id);
            }
        }
        // Refreshed entries leave stale order slots behind; compact when they dominate.
        if self.order.len() > 2 * self.capacity.max(16) {
            let entries = &self.entries;
            self.order.retain(|(id, g)| entries.get(id).is_some_and(|e| e.generation == *g));
        }
    }

    /// The DER of the session `session_id` (or of one whose ID begins the same: the caller
    /// confirms the whole ID).
    pub fn get(&self, session_id: &[u8]) -> Option<&[u8]> {
        self.entries.get(&key(session_id)).map(|e| &*e.der)
    }

    /// Forgets a session (it ended with a fatal alert and must not be resumed).
    pub fn remove(&mut self, session_id: &[u8]) {
        self.entries.remove(&key(session_id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_entry_leaves_first_and_refreshing_counts_as_new() {
        let mut cache = ResumptionCache::new(2);
        cache.insert(b"a", Box::new([1]));
        cache.insert(b"b", Box::new([2]));
        cache.insert(b"a", Box::new([3])); // refreshed: b is now the oldest
        cache.insert(b"c", Box::new([4]));
        assert_eq!(cache.get(b"a"), Some(&[3u8][..]));
        assert_eq!(cache.get(b"b"), None);
        assert_eq!(cache.get(b"c"), Some(&[4u8][..]));
        assert_eq!(cache.len(), 2);
        cache.remove(b"a");
        assert_eq!(cache.get(b"a"), None);
    }

    #[test]
    fn refreshing_forever_keeps_the_order_queue_bounded() {
        let mut cache = ResumptionCache::new(4);
        for i in 0..10_000u64 {
            cache.insert(&(i % 3).to_be_bytes(), Box::new([0]));
        }
        assert_eq!(cache.len(), 3);
        assert!(cache.order.len() <= 2 * 16 + 1);
    }

    #[test]
    fn a_zero_capacity_cache_holds_nothing() {
        let mut cache = ResumptionCache::new(0);
        cache.insert(b"a", Box::new([1]));
        assert_eq!(cache.len(), 0);
    }
}
