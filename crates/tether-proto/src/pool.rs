//! Session pool policy, sans-IO: which sessions exist, which generation each has, when they
//! go idle, which to evict at capacity, and the statistics.
//!
//! The pool keeps one entry per peer address with a second index by authenticated identity.
//! It holds no sessions itself: a driver (the tokio `SessionPool` or `DtlsServer`) tells it
//! what happened ([`PoolState::begin_connect`], [`PoolState::established`],
//! [`PoolState::insert_accepted`], [`PoolState::record`], [`PoolState::remove`]) and closes
//! the sessions named in the [`PoolEvent`]s it drains.
//!
//! Every entry carries a [`Generation`], never reused: a stale close or a late handshake
//! result names an old generation and changes nothing, so it can never delete or resurrect a
//! newer entry.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Pool limits and timers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// A session with no traffic in either direction for this long is closed. Default 5 min.
    pub idle_timeout: Duration,
    /// How often idle sessions are looked for. Default 1 min; a session therefore closes
    /// between `idle_timeout` and `idle_timeout + check_interval` after its last traffic.
    pub check_interval: Duration,
    /// Sessions held at most; the least recently active established one is evicted to make
    /// room. Default 10,000.
    pub capacity: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self { idle_timeout: Duration::from_secs(300), check_interval: Duration::from_secs(60), capacity: 10_000 }
    }
}

impl PoolConfig {
    /// Sets the idle timeout.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets the cleanup cadence.
    pub fn check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// Sets the capacity.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), PoolConfigError> {
        if self.idle_timeout.is_zero() {
            return Err(PoolConfigError("idle_timeout must be positive"));
        }
        if self.check_interval.is_zero() {
            return Err(PoolConfigError("check_interval must be positive"));
        }
        if self.capacity == 0 {
            return Err(PoolConfigError("capacity must be at least 1"));
        }
        Ok(())
    }
}

/// A pool setting is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid pool configuration: {0}")]
pub struct PoolConfigError(pub &'static str);

/// The pool is full of sessions still handshaking: none can be evicted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("session pool is full of handshakes in progress")]
pub struct PoolFull;

/// Distinguishes successive sessions of the same peer. Never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Generation(pub u64);

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// Who opened a pooled session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionRole {
    /// The peer connected to us.
    Accepted,
    /// We dialled the peer.
    Connected,
}

impl SessionRole {
    /// "accepted" or "connected".
    pub fn name(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Connected => "connected",
        }
    }
}

/// Where a pooled session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryState {
    /// Our handshake to the peer is in progress.
    Connecting,
    /// Established and usable.
    Established,
}

impl EntryState {
    /// "connecting" or "established".
    pub fn name(self) -> &'static str {
        match self {
            Self::Connecting => "connecting",
            Self::Established => "established",
        }
    }
}

/// Traffic to account to a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Application bytes received.
    pub bytes_in: u64,
    /// Application bytes sent.
    pub bytes_out: u64,
    /// Requests made over the session.
    pub requests: u64,
}

/// One pooled session as the pool sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolEntry {
    /// Peer address (the key).
    pub peer: SocketAddr,
    /// Its generation.
    pub generation: Generation,
    /// Who opened it.
    pub role: SessionRole,
    /// Where it is.
    pub state: EntryState,
    /// Authenticated identity (PSK identity, certificate CN or endpoint name), once known;
    /// shared with the pool's index by identity.
    pub identity: Option<Arc<str>>,
    /// When it entered the pool.
    pub created: Instant,
    /// Last traffic in either direction (or creation).
    pub last_activity: Instant,
    /// Handshakes this entry cost (1 per entry).
    pub handshakes: u64,
    /// Requests made over it.
    pub requests: u64,
    /// Application bytes received.
    pub bytes_in: u64,
    /// Application bytes sent.
    pub bytes_out: u64,
}

/// A session the driver must close: the pool has already removed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolEvent {
    /// Idle for `idle_timeout`.
    Expired {
        /// Peer.
        peer: SocketAddr,
        /// Generation removed.
        generation: Generation,
    },
    /// Least recently active when room was needed. Close it so it stays resumable.
    Evicted {
        /// Peer.
        peer: SocketAddr,
        /// Generation removed.
        generation: Generation,
    },
}

/// A session's statistics, as exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionStatistics {
    /// Peer address.
    pub peer: SocketAddr,
    /// Identity.
    pub identity: Option<String>,
    /// Accepted or connected.
    pub role: SessionRole,
    /// Connecting or established.
    pub state: EntryState,
    /// Generation.
    pub generation: Generation,
    /// Time in the pool.
    pub age: Duration,
    /// Time since the last traffic.
    pub idle: Duration,
    /// Handshakes.
    pub handshakes: u64,
    /// Requests.
    pub requests: u64,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
}

/// The pool's statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Sessions held now.
    pub sessions: usize,
    /// Of which established.
    pub established: usize,
    /// Of which connecting.
    pub connecting: usize,
    /// Handshakes performed since start (every entry that was ever created).
    pub handshakes_total: u64,
    /// Requests since start.
    pub requests_total: u64,
    /// Sessions closed for idleness since start.
    pub expired_total: u64,
    /// Sessions evicted for capacity since start.
    pub evicted_total: u64,
    /// Sessions removed for any other reason since start.
    pub closed_total: u64,
    /// Capacity.
    pub capacity: usize,
    /// Per session, most recently active first.
    pub per_session: Vec<SessionStatistics>,
}

/// The pool policy. See the module docs.
#[derive(Debug)]
pub struct PoolState {
    config: PoolConfig,
    /// Boxed entries: the table stays dense with 100,000 sessions.
    entries: HashMap<SocketAddr, Box<PoolEntry>>,
    by_identity: HashMap<Arc<str>, SocketAddr>,
    next_generation: u64,
    next_check: Instant,
    events: VecDeque<PoolEvent>,
    handshakes_total: u64,
    requests_total: u64,
    expired_total: u64,
    evicted_total: u64,
    closed_total: u64,
}

impl PoolState {
    /// An empty pool whose first idle check is due `check_interval` after `now`.
    pub fn new(config: PoolConfig, now: Instant) -> Result<Self, PoolConfigError> {
        config.validate()?;
        let next_check = now + config.check_interval;
        Ok(Self {
            config,
            entries: HashMap::new(),
            by_identity: HashMap::new(),
            next_generation: 1,
            next_check,
            events: VecDeque::new(),
            handshakes_total: 0,
            requests_total: 0,
            expired_total: 0,
            evicted_total: 0,
            closed_total: 0,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if no session is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry of `peer`.
    pub fn get(&self, peer: SocketAddr) -> Option<&PoolEntry> {
        self.entries.get(&peer).map(|e| &**e)
    }

    /// The entry whose authenticated identity (or endpoint name) is `identity`.
    pub fn by_identity(&self, identity: &str) -> Option<&PoolEntry> {
        self.by_identity.get(identity).and_then(|peer| self.entries.get(peer)).map(|e| &**e)
    }

    /// Every entry.
    pub fn entries(&self) -> impl Iterator<Item = &PoolEntry> {
        self.entries.values().map(|e| &**e)
    }

    /// Enters a handshake we start to `peer`, which must have no entry. Evicts the least
    /// recently active established session if the pool is full.
    pub fn begin_connect(&mut self, now: Instant, peer: SocketAddr) -> Result<Generation, PoolFull> {
        debug_assert!(!self.entries.contains_key(&peer), "begin_connect for a pooled peer");
        self.make_room()?;
        let generation = self.next_generation();
        self.entries.insert(
            peer,
            Box::new(self.new_entry(now, peer, generation, SessionRole::Connected, EntryState::Connecting)),
        );
        Ok(generation)
    }

    /// Our handshake of `generation` to `peer` finished. Returns false (and changes nothing)
    /// if that generation is no longer pooled: the entry was closed meanwhile, and the driver
    /// must close the new session instead of keeping it.
    pub fn established(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        generation: Generation,
        identity: Option<String>,
    ) -> bool {
        let Some(entry) = self.entries.get_mut(&peer).filter(|e| e.generation == generation) else {
            return false;
        };
        entry.state = EntryState::Established;
        entry.last_activity = now;
        if let Some(id) = identity {
            let id: Arc<str> = id.into();
            entry.identity = Some(Arc::clone(&id));
            self.by_identity.insert(id, peer);
        }
        true
    }

    /// Enters a session a peer opened to us, replacing any entry of that address (the
    /// replaced generation is returned; its session is the driver's to close). Evicts the
    /// least recently active established session if the pool is full.
    pub fn insert_accepted(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        identity: Option<String>,
    ) -> Result<(Generation, Option<Generation>), PoolFull> {
        let replaced = self.entries.get(&peer).map(|e| e.generation);
        if let Some(old) = replaced {
            self.remove_entry(peer, old);
            self.closed_total += 1;
        } else {
            self.make_room()?;
        }
        let generation = self.next_generation();
        let mut entry = self.new_entry(now, peer, generation, SessionRole::Accepted, EntryState::Established);
        if let Some(id) = identity {
            let id: Arc<str> = id.into();
            self.by_identity.insert(Arc::clone(&id), peer);
            entry.identity = Some(id);
        }
        self.entries.insert(peer, Box::new(entry));
        Ok((generation, replaced))
    }

    /// Enters a session restored from storage after a restart: accepted, established, and
    /// no handshake counted. Replaces any entry of that address (returned).
    pub fn insert_restored(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        identity: Option<String>,
    ) -> Result<(Generation, Option<Generation>), PoolFull> {
        let (generation, replaced) = self.insert_accepted(now, peer, identity)?;
        self.handshakes_total -= 1;
        if let Some(entry) = self.entries.get_mut(&peer) {
            entry.handshakes = 0;
        }
        Ok((generation, replaced))
    }

    /// The session `generation` of `from` now talks from `to` (a DTLS Connection ID moved
    /// it). Its statistics and identity go with it; an entry that held `to` is removed and
    /// returned (its session is the driver's to close). Nothing moves if `generation` is
    /// stale.
    pub fn move_peer(&mut self, from: SocketAddr, to: SocketAddr, generation: Generation) -> Option<Generation> {
        if from == to || self.entries.get(&from).map(|e| e.generation) != Some(generation) {
            return None;
        }
        let displaced = self.entries.get(&to).map(|e| e.generation);
        if let Some(old) = displaced {
            self.remove_entry(to, old);
            self.closed_total += 1;
        }
        let mut entry = self.entries.remove(&from)?;
        if let Some(id) = &entry.identity {
            if self.by_identity.get(id) == Some(&from) {
                self.by_identity.insert(Arc::clone(id), to);
            }
        }
        entry.peer = to;
        self.entries.insert(to, entry);
        displaced
    }

    /// Binds an identity (an LwM2M endpoint name, say) to a pooled session for lookups.
    pub fn set_identity(&mut self, peer: SocketAddr, generation: Generation, identity: String) -> bool {
        let Some(entry) = self.entries.get_mut(&peer).filter(|e| e.generation == generation) else {
            return false;
        };
        let identity: Arc<str> = identity.into();
        if let Some(old) = entry.identity.replace(Arc::clone(&identity)) {
            if self.by_identity.get(&old) == Some(&peer) {
                self.by_identity.remove(&old);
            }
        }
        self.by_identity.insert(identity, peer);
        true
    }

    /// Accounts traffic to a session and marks it active. False if `generation` is stale.
    pub fn record(&mut self, now: Instant, peer: SocketAddr, generation: Generation, traffic: Traffic) -> bool {
        let Some(entry) = self.entries.get_mut(&peer).filter(|e| e.generation == generation) else {
            return false;
        };
        entry.bytes_in += traffic.bytes_in;
        entry.bytes_out += traffic.bytes_out;
        entry.requests += traffic.requests;
        self.requests_total += traffic.requests;
        if entry.state == EntryState::Established && now > entry.last_activity {
            entry.last_activity = now;
        }
        true
    }

    /// Removes `generation` of `peer` (closed, failed, or closed by the user). Exactly once:
    /// a stale generation, or a second removal, returns `None` and changes nothing.
    pub fn remove(&mut self, peer: SocketAddr, generation: Generation) -> Option<PoolEntry> {
        let entry = self.remove_entry(peer, generation)?;
        self.closed_total += 1;
        Some(entry)
    }

    /// Closes idle sessions when the check is due.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_check {
            return;
        }
        while self.next_check <= now {
            self.next_check += self.config.check_interval;
        }
        let Some(cutoff) = now.checked_sub(self.config.idle_timeout) else {
            return;
        };
        // One pass over the entries per check interval: cheaper, in memory and per request,
        // than keeping them ordered by activity.
        let mut idle: Vec<(Instant, Generation, SocketAddr)> = self
            .entries
            .values()
            .filter(|e| e.state == EntryState::Established && e.last_activity <= cutoff)
            .map(|e| (e.last_activity, e.generation, e.peer))
            .collect();
        idle.sort_unstable();
        for (_, generation, peer) in idle {
            self.remove_entry(peer, generation);
            self.expired_total += 1;
            self.events.push_back(PoolEvent::Expired { peer, generation });
        }
    }

    /// When the next idle check is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_check)
    }

    /// The next session the driver must close.
    pub fn poll_event(&mut self) -> Option<PoolEvent> {
        self.events.pop_front()
    }

    /// Statistics at `now`.
    pub fn stats(&self, now: Instant) -> PoolStats {
        let mut per_session: Vec<SessionStatistics> = self
            .entries
            .values()
            .map(|e| SessionStatistics {
                peer: e.peer,
                identity: e.identity.as_deref().map(str::to_string),
                role: e.role,
                state: e.state,
                generation: e.generation,
                age: now.saturating_duration_since(e.created),
                idle: now.saturating_duration_since(e.last_activity),
                handshakes: e.handshakes,
                requests: e.requests,
                bytes_in: e.bytes_in,
                bytes_out: e.bytes_out,
            })
            .collect();
        per_session.sort_by(|a, b| a.idle.cmp(&b.idle).then(a.peer.cmp(&b.peer)));
        let established = self.entries.values().filter(|e| e.state == EntryState::Established).count();
        PoolStats {
            sessions: self.entries.len(),
            established,
            connecting: self.entries.len() - established,
            handshakes_total: self.handshakes_total,
            requests_total: self.requests_total,
            expired_total: self.expired_total,
            evicted_total: self.evicted_total,
            closed_total: self.closed_total,
            capacity: self.config.capacity,
            per_session,
        }
    }

    fn next_generation(&mut self) -> Generation {
        let generation = Generation(self.next_generation);
        self.next_generation += 1;
        self.handshakes_total += 1;
        generation
    }

    fn new_entry(
        &self,
        now: Instant,
        peer: SocketAddr,
        generation: Generation,
        role: SessionRole,
        state: EntryState,
    ) -> PoolEntry {
        PoolEntry {
            peer,
            generation,
            role,
            state,
            identity: None,
            created: now,
            last_activity: now,
            handshakes: 1,
            requests: 0,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    fn make_room(&mut self) -> Result<(), PoolFull> {
        while self.entries.len() >= self.config.capacity {
            // The least recently active established entry (a pass over all: eviction is rare).
            let oldest = self
                .entries
                .values()
                .filter(|e| e.state == EntryState::Established)
                .min_by_key(|e| (e.last_activity, e.generation))
                .map(|e| (e.generation, e.peer));
            let Some((generation, peer)) = oldest else {
                return Err(PoolFull);
            };
            self.remove_entry(peer, generation);
            self.evicted_total += 1;
            self.events.push_back(PoolEvent::Evicted { peer, generation });
        }
        Ok(())
    }

    fn remove_entry(&mut self, peer: SocketAddr, generation: Generation) -> Option<PoolEntry> {
        if self.entries.get(&peer)?.generation != generation {
            return None;
        }
        let entry = self.entries.remove(&peer)?;
        if let Some(id) = &entry.identity {
            if self.by_identity.get(id) == Some(&peer) {
                self.by_identity.remove(id);
            }
        }
        Some(*entry)
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "tests pick their starting instant")]
mod tests {
    use super::*;

    fn peer(i: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 10_000 + i))
    }

    fn pool(capacity: usize, now: Instant) -> PoolState {
        let config = PoolConfig::default()
            .idle_timeout(Duration::from_secs(300))
            .check_interval(Duration::from_secs(60))
            .capacity(capacity);
        PoolState::new(config, now).unwrap()
    }

    #[test]
    fn a_late_handshake_result_does_not_resurrect_a_closed_entry() {
        let t0 = Instant::now();
        let mut p = pool(10, t0);
        let g1 = p.begin_connect(t0, peer(1)).unwrap();
        assert!(p.remove(peer(1), g1).is_some(), "closed during the handshake");
        assert!(!p.established(t0, peer(1), g1, None), "late result is refused");
        assert!(p.get(peer(1)).is_none());
    }

    #[test]
    fn a_stale_close_does_not_remove_a_newer_entry() {
        let t0 = Instant::now();
        let mut p = pool(10, t0);
        let g1 = p.begin_connect(t0, peer(1)).unwrap();
        assert!(p.established(t0, peer(1), g1, Some("dev".into())));
        assert!(p.remove(peer(1), g1).is_some());
        let g2 = p.begin_connect(t0, peer(1)).unwrap();
        assert!(p.established(t0, peer(1), g2, Some("dev".into())));
        assert!(p.remove(peer(1), g1).is_none(), "the old session's close event arrives late");
        assert_eq!(p.get(peer(1)).unwrap().generation, g2);
        assert_eq!(p.by_identity("dev").unwrap().generation, g2);
        assert!(p.remove(peer(1), g2).is_some());
        assert!(p.remove(peer(1), g2).is_none(), "exactly once");
        assert!(p.by_identity("dev").is_none());
    }

    #[test]
    fn idle_sessions_expire_on_the_check_cadence() {
        let t0 = Instant::now();
        let mut p = pool(10, t0);
        let (g1, _) = p.insert_accepted(t0, peer(1), None).unwrap();
        let (g2, _) = p.insert_accepted(t0, peer(2), None).unwrap();
        p.record(t0 + Duration::from_secs(200), peer(2), g2, Traffic { bytes_in: 10, ..Traffic::default() });
        // Checks at 60, 120, ... 300: peer 1 idle since 0 expires at the 300 s check.
        for minute in 1..=4 {
            let at = t0 + Duration::from_secs(60 * minute);
            assert_eq!(p.poll_timeout(), Some(at));
            p.handle_timeout(at);
            assert!(p.poll_event().is_none(), "nothing idle long enough at {minute} min");
        }
        p.handle_timeout(t0 + Duration::from_secs(300));
        assert_eq!(p.poll_event(), Some(PoolEvent::Expired { peer: peer(1), generation: g1 }));
        assert!(p.poll_event().is_none());
        // Peer 2's traffic at 200 s keeps it until the 540 s check (first after 500 s).
        p.handle_timeout(t0 + Duration::from_secs(480));
        assert!(p.poll_event().is_none());
        p.handle_timeout(t0 + Duration::from_secs(540));
        assert_eq!(p.poll_event(), Some(PoolEvent::Expired { peer: peer(2), generation: g2 }));
        assert_eq!(p.stats(t0).expired_total, 2);
        assert!(p.is_empty());
    }

    #[test]
    fn capacity_evicts_the_least_recently_active_established_session() {
        let t0 = Instant::now();
        let mut p = pool(3, t0);
        let mut gens = Vec::new();
        for i in 0..3 {
            gens.push(p.insert_accepted(t0 + Duration::from_secs(i), peer(i as u16), None).unwrap().0);
        }
        // Peer 0 is active again; peer 1 is now the least recent.
        p.record(t0 + Duration::from_secs(10), peer(0), gens[0], Traffic::default());
        p.insert_accepted(t0 + Duration::from_secs(11), peer(9), None).unwrap();
        assert_eq!(p.poll_event(), Some(PoolEvent::Evicted { peer: peer(1), generation: gens[1] }));
        assert_eq!(p.len(), 3);
        assert!(p.get(peer(1)).is_none());
        // Handshakes in progress are never evicted; a pool full of them refuses.
        let mut p = pool(2, t0);
        p.begin_connect(t0, peer(1)).unwrap();
        p.begin_connect(t0, peer(2)).unwrap();
        assert_eq!(p.begin_connect(t0, peer(3)), Err(PoolFull));
    }

    #[test]
    fn stats_add_up() {
        let t0 = Instant::now();
        let mut p = pool(10, t0);
        let g = p.begin_connect(t0, peer(1)).unwrap();
        p.insert_accepted(t0, peer(2), Some("ep-2".into())).unwrap();
        let s = p.stats(t0);
        assert_eq!((s.sessions, s.established, s.connecting, s.handshakes_total), (2, 1, 1, 2));
        p.established(t0, peer(1), g, Some("ep-1".into()));
        p.record(t0 + Duration::from_secs(5), peer(1), g, Traffic { bytes_in: 7, bytes_out: 9, requests: 2 });
        let s = p.stats(t0 + Duration::from_secs(6));
        let e = s.per_session.iter().find(|e| e.peer == peer(1)).unwrap();
        assert_eq!((e.bytes_in, e.bytes_out, e.requests, e.handshakes), (7, 9, 2, 1));
        assert_eq!(e.idle, Duration::from_secs(1));
        assert_eq!(e.age, Duration::from_secs(6));
        assert_eq!(s.per_session[0].peer, peer(1), "most recently active first");
        assert_eq!(s.requests_total, 2);
    }

    #[test]
    fn a_moved_session_keeps_its_generation_identity_and_counters_at_the_new_address() {
        let now = Instant::now();
        let mut pool = pool(10, now);
        let (generation, _) = pool.insert_restored(now, peer(1), Some("dev".into())).unwrap();
        assert_eq!(pool.stats(now).handshakes_total, 0, "a restored session cost no handshake");
        let (other, _) = pool.insert_accepted(now, peer(2), None).unwrap();
        pool.record(now, peer(1), generation, Traffic { requests: 3, ..Traffic::default() });
        assert_eq!(pool.move_peer(peer(1), peer(2), generation), Some(other));
        assert!(pool.get(peer(1)).is_none());
        let moved = pool.get(peer(2)).unwrap();
        assert_eq!((moved.generation, moved.requests), (generation, 3));
        assert_eq!(pool.by_identity("dev").map(|e| e.peer), Some(peer(2)));
        assert_eq!(pool.move_peer(peer(1), peer(3), generation), None, "stale: nothing moves");
        assert!(pool.get(peer(3)).is_none());
        assert_eq!(pool.len(), 1);
    }

    #[test]
    fn a_new_accepted_session_from_the_same_address_replaces_the_entry() {
        let t0 = Instant::now();
        let mut p = pool(10, t0);
        let (g1, none) = p.insert_accepted(t0, peer(1), Some("dev".into())).unwrap();
        assert!(none.is_none());
        let (g2, replaced) = p.insert_accepted(t0, peer(1), Some("dev".into())).unwrap();
        assert_eq!(replaced, Some(g1));
        assert!(p.remove(peer(1), g1).is_none(), "the replaced session's close is stale");
        assert_eq!(p.by_identity("dev").unwrap().generation, g2);
    }
}
