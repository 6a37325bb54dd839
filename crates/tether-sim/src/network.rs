//! The network: nodes, links, an event queue and the clock.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::link::{Fate, Link, LinkConfig};

/// A sans-IO participant of the simulated network.
pub trait Node {
    /// A datagram arrived from `from`.
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]);
    /// The node's timer fired (possibly early; nodes must tolerate that).
    fn handle_timeout(&mut self, now: Instant);
    /// The next datagram to send, with its destination.
    fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)>;
    /// When the node wants `handle_timeout`.
    fn poll_timeout(&self) -> Option<Instant>;
}

/// Index of a node in its network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeId(pub usize);

/// How the network's clock advances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Jump straight to the next event.
    Virtual,
    /// Reach each virtual instant no sooner than the same real time after the start, so
    /// that timers kept on the wall clock (OpenSSL's DTLS timers) fire in step.
    FollowWallClock,
}

/// What the network did to the datagrams it carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetworkStats {
    /// Datagrams nodes sent.
    pub sent: u64,
    /// Datagrams delivered (duplicates counted).
    pub delivered: u64,
    /// Datagrams lost by the loss model.
    pub lost: u64,
    /// Datagrams dropped for exceeding the MTU.
    pub too_big: u64,
    /// Extra copies delivered.
    pub duplicated: u64,
    /// Datagrams held back so later ones overtook them.
    pub reordered: u64,
    /// Datagrams sent to an address no node has.
    pub unroutable: u64,
}

struct InFlight {
    to: usize,
    from: SocketAddr,
    datagram: Vec<u8>,
}

/// A seeded network of nodes of type `N`.
pub struct Network<N: Node> {
    seed: u64,
    rng: ChaCha8Rng,
    clock: Clock,
    start: Instant,
    real_start: Instant,
    now: Instant,
    nodes: Vec<N>,
    addrs: Vec<SocketAddr>,
    by_addr: HashMap<SocketAddr, usize>,
    timeouts: Vec<Option<Instant>>,
    default_link: LinkConfig,
    links: HashMap<(SocketAddr, SocketAddr), Link>,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: HashMap<u64, InFlight>,
    next_seq: u64,
    stats: NetworkStats,
}

impl<N: Node> Network<N> {
    /// An empty network whose links default to `default_link`.
    pub fn new(seed: u64, clock: Clock, default_link: LinkConfig) -> Self {
        let now = Instant::now();
        Self {
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            clock,
            start: now,
            real_start: now,
            now,
            nodes: Vec::new(),
            addrs: Vec::new(),
            by_addr: HashMap::new(),
            timeouts: Vec::new(),
            default_link,
            links: HashMap::new(),
            queue: BinaryHeap::new(),
            in_flight: HashMap::new(),
            next_seq: 0,
            stats: NetworkStats::default(),
        }
    }

    /// The seed the scenario runs with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The current virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time elapsed since the network was made.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Adds a node at `addr`. The node's initial transmits are collected on the next step.
    pub fn add(&mut self, addr: SocketAddr, node: N) -> NodeId {
        let id = self.nodes.len();
        self.timeouts.push(node.poll_timeout());
        self.nodes.push(node);
        self.addrs.push(addr);
        self.by_addr.insert(addr, id);
        self.collect(id);
        NodeId(id)
    }

    /// Sets the impairments of the direction `from` → `to`.
    pub fn set_link(&mut self, from: SocketAddr, to: SocketAddr, config: LinkConfig) {
        self.links.insert((from, to), Link::new(config));
    }

    /// Sets both directions between `a` and `b`.
    pub fn set_links(&mut self, a: SocketAddr, b: SocketAddr, config: LinkConfig) {
        self.set_link(a, b, config.clone());
        self.set_link(b, a, config);
    }

    /// A node.
    pub fn node(&self, id: NodeId) -> &N {
        &self.nodes[id.0]
    }

    /// A node, mutably. Call [`Network::touch`] after giving it input.
    pub fn node_mut(&mut self, id: NodeId) -> &mut N {
        &mut self.nodes[id.0]
    }

    /// Every node.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &N)> {
        self.nodes.iter().enumerate().map(|(i, n)| (NodeId(i), n))
    }

    /// Collects a node's transmits and timer after it was driven from outside.
    pub fn touch(&mut self, id: NodeId) {
        self.collect(id.0);
    }

    /// Counters.
    pub fn stats(&self) -> NetworkStats {
        self.stats
    }

    /// Runs until `done` holds, nothing is left to happen, or `limit` of virtual time has
    /// passed. Returns whether `done` held.
    pub fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Self) -> bool) -> bool {
        let end = self.now + limit;
        loop {
            if done(self) {
                return true;
            }
            let Some(next) = self.next_event() else {
                return false;
            };
            if next > end {
                self.advance_to(end);
                return done(self);
            }
            self.advance_to(next.max(self.now));
            self.fire_due();
        }
    }

    /// Runs for `duration` of virtual time.
    pub fn run_for(&mut self, duration: Duration) {
        self.run_until(duration, |_| false);
    }

    fn next_event(&self) -> Option<Instant> {
        let packet = self.queue.peek().map(|Reverse((at, _))| *at);
        let timer = self.timeouts.iter().flatten().min().copied();
        match (packet, timer) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn advance_to(&mut self, at: Instant) {
        if at <= self.now {
            return;
        }
        self.now = at;
        if self.clock == Clock::FollowWallClock {
            let real_target = self.real_start + (at - self.start);
            let real_now = Instant::now();
            if real_target > real_now {
                std::thread::sleep(real_target - real_now);
            }
        }
    }

    fn fire_due(&mut self) {
        let now = self.now;
        while let Some(Reverse((at, seq))) = self.queue.peek().copied() {
            if at > now {
                break;
            }
            self.queue.pop();
            let Some(packet) = self.in_flight.remove(&seq) else {
                continue;
            };
            self.stats.delivered += 1;
            self.nodes[packet.to].handle_datagram(now, packet.from, &packet.datagram);
            self.collect(packet.to);
        }
        for id in 0..self.nodes.len() {
            if self.timeouts[id].is_some_and(|t| t <= now) {
                self.nodes[id].handle_timeout(now);
                self.collect(id);
            }
        }
    }

    fn collect(&mut self, id: usize) {
        let from = self.addrs[id];
        while let Some((to, datagram)) = self.nodes[id].poll_transmit() {
            self.stats.sent += 1;
            let Some(&to_id) = self.by_addr.get(&to) else {
                self.stats.unroutable += 1;
                continue;
            };
            let default = &self.default_link;
            let link = self.links.entry((from, to)).or_insert_with(|| Link::new(default.clone()));
            match link.fate(datagram.len(), &mut self.rng) {
                Fate::Lost => self.stats.lost += 1,
                Fate::TooBig => self.stats.too_big += 1,
                Fate::Delivered { delays, reordered } => {
                    self.stats.duplicated += delays.len() as u64 - 1;
                    self.stats.reordered += u64::from(reordered);
                    for delay in delays {
                        let seq = self.next_seq;
                        self.next_seq += 1;
                        self.queue.push(Reverse((self.now + delay, seq)));
                        self.in_flight.insert(seq, InFlight { to: to_id, from, datagram: datagram.clone() });
                    }
                }
            }
        }
        self.timeouts[id] = self.nodes[id].poll_timeout();
    }
}

impl<N: Node> Drop for Network<N> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "tether-sim: scenario failed with seed {seed}; rerun with TETHER_SIM_SEED={seed}",
                seed = self.seed
            );
        }
    }
}
