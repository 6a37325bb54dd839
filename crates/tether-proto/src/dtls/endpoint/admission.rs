//! Who gets a handshake slot and a session slot when they are short.
//!
//! The rules, each against a way one party could lock everyone else out:
//!
//! - **Per source.** Handshakes in progress are capped per IP address and per network (/24
//!   for IPv4, /64 for IPv6), far below the endpoint's total: one host, or one subnet, cannot
//!   hold every slot with ClientHellos it never follows up.
//! - **Stalled handshakes go first.** A handshake whose client sent nothing after its
//!   ClientHello is *stalled*; it gets a short deadline, and when the table is full the oldest
//!   stalled one yields its slot to a new ClientHello.
//! - **Capacity kept for known devices.** Some handshake slots are reserved for sources that
//!   hold, or recently held, an established session (a rebooted device, one whose NAT moved
//!   it) and for clients resuming a session the server knows: a flood of unknown sources
//!   never takes the last slots.
//! - **Per identity.** An identity holds a bounded number of established sessions; a new one
//!   beyond the cap replaces that identity's oldest.
//! - **Sessions nobody uses go first.** When the session table is full, a new handshake may
//!   still start if an established session that no application bound a name to (an LwM2M
//!   device registers over its session within seconds) could make room; when the newcomer
//!   has authenticated, the oldest such session is closed for it. An unauthenticated
//!   ClientHello never costs anyone a session.
//!
//! This is bookkeeping only: the endpoint asks and acts.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::SessionHandle;
use crate::dtls::session::PeerIdentity;

/// How long an address that held an established session counts as known after its last
/// session ended.
pub(super) const KNOWN_FOR: Duration = Duration::from_secs(3600);
/// Addresses remembered as known after their sessions ended, at most (the oldest are
/// forgotten first).
pub(super) const KNOWN_REMEMBERED: usize = 16_384;

/// The network an address belongs to for per-network caps: its /24 (IPv4, IPv4-mapped IPv6
/// included) or /64 (IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Network {
    V4([u8; 3]),
    V6([u8; 8]),
}

impl Network {
    pub(super) fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, _] = v4.octets();
                Self::V4([a, b, c])
            }
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::of(IpAddr::V4(v4)),
                None => {
                    let mut prefix = [0u8; 8];
                    prefix.copy_from_slice(&v6.octets()[..8]);
                    Self::V6(prefix)
                }
            },
        }
    }
}

/// The endpoint's admission bookkeeping. See the module docs.
#[derive(Debug, Default)]
pub(super) struct Admission {
    /// Handshakes in progress per address.
    handshakes_by_address: HashMap<IpAddr, u32>,
    /// Handshakes in progress per network.
    handshakes_by_network: HashMap<Network, u32>,
    /// Stalled handshakes by the time their session was created.
    stalled: BTreeSet<(Instant, SessionHandle)>,
    /// Established sessions per address.
    established_by_address: HashMap<IpAddr, u32>,
    /// Addresses whose last established session ended, and when; oldest first.
    recent: VecDeque<(IpAddr, Instant)>,
    recent_index: HashMap<IpAddr, Instant>,
    /// Established sessions per identity; handles grow with time, so the first is the oldest.
    by_identity: HashMap<PeerIdentity, BTreeSet<SessionHandle>>,
    /// Established sessions no application has bound a name to; the first is the oldest.
    unbound: BTreeSet<SessionHandle>,
}

impl Admission {
    /// Whether `ip` holds an established session or held one within [`KNOWN_FOR`].
    pub(super) fn is_known(&self, ip: IpAddr, now: Instant) -> bool {
        self.established_by_address.contains_key(&ip)
            || self.recent_index.get(&ip).is_some_and(|at| now.saturating_duration_since(*at) < KNOWN_FOR)
    }

    /// Handshakes in progress from `ip`, and from its network.
    pub(super) fn handshakes_from(&self, ip: IpAddr) -> (u32, u32) {
        let address = self.handshakes_by_address.get(&ip).copied().unwrap_or(0);
        let network = self.handshakes_by_network.get(&Network::of(ip)).copied().unwrap_or(0);
        (address, network)
    }

    /// A handshake from `ip` began at `now` (stalled until its client is heard from again).
    pub(super) fn handshake_started(&mut self, handle: SessionHandle, ip: IpAddr, now: Instant) {
        *self.handshakes_by_address.entry(ip).or_default() += 1;
        *self.handshakes_by_network.entry(Network::of(ip)).or_default() += 1;
        self.stalled.insert((now, handle));
    }

    /// The client of a handshake sent more than its ClientHello.
    pub(super) fn heard(&mut self, handle: SessionHandle, started: Instant) {
        self.stalled.remove(&(started, handle));
    }

    /// A handshake from `ip` that began at `started` ended (established or not).
    pub(super) fn handshake_ended(&mut self, handle: SessionHandle, ip: IpAddr, started: Instant) {
        self.stalled.remove(&(started, handle));
        decrement(&mut self.handshakes_by_address, ip);
        decrement(&mut self.handshakes_by_network, Network::of(ip));
    }

    /// The oldest stalled handshake.
    pub(super) fn oldest_stalled(&self) -> Option<SessionHandle> {
        self.stalled.first().map(|(_, handle)| *handle)
    }

    /// Stalled handshakes created at or before `before`, oldest first.
    pub(super) fn stalled_since(&self, before: Instant) -> Vec<SessionHandle> {
        self.stalled.iter().take_while(|(at, _)| *at <= before).map(|(_, handle)| *handle).collect()
    }

    /// A session of `identity` at `ip` is established (by a handshake or a restore). Returns
    /// that identity's oldest sessions beyond `per_identity`, which the endpoint closes.
    pub(super) fn established(
        &mut self,
        handle: SessionHandle,
        ip: IpAddr,
        identity: Option<&PeerIdentity>,
        per_identity: usize,
    ) -> Vec<SessionHandle> {
        *self.established_by_address.entry(ip).or_default() += 1;
        self.unbound.insert(handle);
        let Some(identity) = identity else { return Vec::new() };
        let sessions = self.by_identity.entry(identity.clone()).or_default();
        sessions.insert(handle);
        let excess = sessions.len().saturating_sub(per_identity);
        sessions.iter().copied().filter(|h| *h != handle).take(excess).collect()
    }

    /// An established session moved from `from` to `to` (Connection ID).
    pub(super) fn moved(&mut self, from: IpAddr, to: IpAddr, now: Instant) {
        if from == to {
            return;
        }
        *self.established_by_address.entry(to).or_default() += 1;
        if decrement(&mut self.established_by_address, from) {
            self.remember(from, now);
        }
    }

    /// The established session `handle` of `identity` at `ip` ended.
    pub(super) fn session_ended(
        &mut self,
        handle: SessionHandle,
        ip: IpAddr,
        identity: Option<&PeerIdentity>,
        now: Instant,
    ) {
        self.unbound.remove(&handle);
        if let Some(identity) = identity {
            if let Some(sessions) = self.by_identity.get_mut(identity) {
                sessions.remove(&handle);
                if sessions.is_empty() {
                    self.by_identity.remove(identity);
                }
            }
        }
        if decrement(&mut self.established_by_address, ip) {
            self.remember(ip, now);
        }
    }

    /// An application uses session `handle` (it bound a name to it): it is no longer among
    /// the first to go when room is short.
    pub(super) fn bound(&mut self, handle: SessionHandle) {
        self.unbound.remove(&handle);
    }

    /// The oldest established session no application uses, but `except`.
    pub(super) fn oldest_unbound(&self, except: SessionHandle) -> Option<SessionHandle> {
        self.unbound.iter().copied().find(|h| *h != except)
    }

    /// Established sessions no application uses.
    pub(super) fn unbound_count(&self) -> usize {
        self.unbound.len()
    }

    fn remember(&mut self, ip: IpAddr, now: Instant) {
        if self.recent_index.insert(ip, now).is_none() {
            self.recent.push_back((ip, now));
        }
        while self.recent.len() > KNOWN_REMEMBERED {
            let Some((old, at)) = self.recent.pop_front() else { break };
            if self.recent_index.get(&old) == Some(&at) {
                self.recent_index.remove(&old);
            } else if let Some(later) = self.recent_index.get(&old).copied() {
                // Remembered again since: keep its newer place in line.
                self.recent.push_back((old, later));
            }
        }
    }
}

/// Lowers a count, dropping it at zero; true if it reached zero.
fn decrement<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, u32>, key: K) -> bool {
    let Some(count) = counts.get_mut(&key) else { return false };
    *count = count.saturating_sub(1);
    if *count == 0 {
        counts.remove(&key);
        return true;
    }
    false
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "tests pick their starting instant")]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn networks_are_slash_24_and_slash_64() {
        assert_eq!(Network::of(ip("10.1.2.3")), Network::of(ip("10.1.2.200")));
        assert_ne!(Network::of(ip("10.1.2.3")), Network::of(ip("10.1.3.3")));
        assert_eq!(Network::of(ip("::ffff:10.1.2.3")), Network::of(ip("10.1.2.9")));
        assert_eq!(Network::of(ip("2001:db8:1:2::1")), Network::of(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(Network::of(ip("2001:db8:1:2::1")), Network::of(ip("2001:db8:1:3::1")));
    }

    #[test]
    fn counts_follow_handshakes_and_stalled_ones_are_found_oldest_first() {
        let now = Instant::now();
        let mut admission = Admission::default();
        for i in 0..3 {
            admission.handshake_started(SessionHandle(i), ip("10.0.0.1"), now + Duration::from_secs(i));
        }
        admission.handshake_started(SessionHandle(9), ip("10.0.0.2"), now);
        assert_eq!(admission.handshakes_from(ip("10.0.0.1")), (3, 4));
        assert_eq!(admission.oldest_stalled(), Some(SessionHandle(0)));
        admission.heard(SessionHandle(0), now);
        assert_eq!(admission.stalled_since(now + Duration::from_secs(1)), [SessionHandle(9), SessionHandle(1)]);
        for i in 0..3 {
            admission.handshake_ended(SessionHandle(i), ip("10.0.0.1"), now + Duration::from_secs(i));
        }
        admission.handshake_ended(SessionHandle(9), ip("10.0.0.2"), now);
        assert_eq!(admission.handshakes_from(ip("10.0.0.1")), (0, 0));
        assert!(admission.oldest_stalled().is_none());
        assert!(admission.handshakes_by_address.is_empty() && admission.handshakes_by_network.is_empty());
    }

    #[test]
    fn an_identity_beyond_its_cap_gives_up_its_oldest_sessions() {
        let now = Instant::now();
        let mut admission = Admission::default();
        let id = PeerIdentity::Psk(b"one".to_vec());
        for i in 1..=3 {
            assert!(admission.established(SessionHandle(i), ip("10.0.0.1"), Some(&id), 3).is_empty());
        }
        assert_eq!(admission.established(SessionHandle(4), ip("10.0.0.1"), Some(&id), 3), [SessionHandle(1)]);
        admission.session_ended(SessionHandle(1), ip("10.0.0.1"), Some(&id), now);
        assert_eq!(admission.oldest_unbound(SessionHandle(9)), Some(SessionHandle(2)));
        assert_eq!(admission.oldest_unbound(SessionHandle(2)), Some(SessionHandle(3)));
        admission.bound(SessionHandle(2));
        assert_eq!(admission.oldest_unbound(SessionHandle(9)), Some(SessionHandle(3)));
        assert_eq!(admission.unbound_count(), 2);
        assert!(admission.is_known(ip("10.0.0.1"), now));
        for i in 2..=4 {
            admission.session_ended(SessionHandle(i), ip("10.0.0.1"), Some(&id), now);
        }
        assert!(admission.by_identity.is_empty() && admission.unbound.is_empty());
        assert!(admission.is_known(ip("10.0.0.1"), now + KNOWN_FOR / 2), "recently held a session");
        assert!(!admission.is_known(ip("10.0.0.1"), now + KNOWN_FOR), "forgotten after an hour");
        assert!(!admission.is_known(ip("10.0.0.2"), now));
    }

    #[test]
    fn remembered_addresses_are_bounded() {
        let now = Instant::now();
        let mut admission = Admission::default();
        for i in 0..(KNOWN_REMEMBERED as u32 + 10) {
            let address = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            admission.established(SessionHandle(u64::from(i)), address, None, 1);
            admission.session_ended(SessionHandle(u64::from(i)), address, None, now);
        }
        assert_eq!(admission.recent.len(), KNOWN_REMEMBERED);
        assert_eq!(admission.recent_index.len(), KNOWN_REMEMBERED);
        assert!(!admission.is_known(ip("10.0.0.0"), now), "the oldest went first");
        assert!(admission.established_by_address.is_empty());
    }
}
