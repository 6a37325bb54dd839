//! The simulated network does what its links say, and the same seed gives the same run.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether_sim::{Clock, LinkConfig, Loss, Network, Node, NodeId};

/// Logs arrivals.
struct Probe {
    arrivals: Vec<(Instant, SocketAddr, Vec<u8>)>,
}

impl Probe {
    fn sink() -> Self {
        Self { arrivals: Vec::new() }
    }

    fn numbers(&self) -> Vec<u32> {
        self.arrivals.iter().map(|(_, _, d)| u32::from_be_bytes(d[..4].try_into().unwrap())).collect()
    }
}

impl Node for Probe {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.arrivals.push((now, from, datagram.to_vec()));
    }
    fn handle_timeout(&mut self, _: Instant) {}
    fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        None
    }
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
}

/// Sends `count` numbered datagrams, one every `spacing`.
struct Ticker {
    to: SocketAddr,
    count: u32,
    sent: u32,
    spacing: Duration,
    next_send: Option<Instant>,
    outbox: Option<Vec<u8>>,
}

impl Node for Ticker {
    fn handle_datagram(&mut self, _: Instant, _: SocketAddr, _: &[u8]) {}
    fn handle_timeout(&mut self, now: Instant) {
        if self.next_send.is_some_and(|t| t <= now) {
            let mut d = self.sent.to_be_bytes().to_vec();
            d.resize(10, 0);
            self.outbox = Some(d);
            self.sent += 1;
            self.next_send = (self.sent < self.count).then(|| now + self.spacing);
        }
    }
    fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.outbox.take().map(|d| (self.to, d))
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.next_send
    }
}

/// A simpler sender: everything at once, at the start.
struct Burst {
    to: SocketAddr,
    queue: VecDeque<Vec<u8>>,
}

impl Node for Burst {
    fn handle_datagram(&mut self, _: Instant, _: SocketAddr, _: &[u8]) {}
    fn handle_timeout(&mut self, _: Instant) {}
    fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        self.queue.pop_front().map(|d| (self.to, d))
    }
    fn poll_timeout(&self) -> Option<Instant> {
        None
    }
}

enum Either {
    Burst(Burst),
    Probe(Probe),
    Ticker(Ticker),
}

impl Node for Either {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, d: &[u8]) {
        match self {
            Either::Burst(b) => b.handle_datagram(now, from, d),
            Either::Probe(p) => p.handle_datagram(now, from, d),
            Either::Ticker(t) => t.handle_datagram(now, from, d),
        }
    }
    fn handle_timeout(&mut self, now: Instant) {
        match self {
            Either::Burst(b) => b.handle_timeout(now),
            Either::Probe(p) => p.handle_timeout(now),
            Either::Ticker(t) => t.handle_timeout(now),
        }
    }
    fn poll_transmit(&mut self) -> Option<(SocketAddr, Vec<u8>)> {
        match self {
            Either::Burst(b) => b.poll_transmit(),
            Either::Probe(p) => p.poll_transmit(),
            Either::Ticker(t) => t.poll_transmit(),
        }
    }
    fn poll_timeout(&self) -> Option<Instant> {
        match self {
            Either::Burst(b) => b.poll_timeout(),
            Either::Probe(p) => p.poll_timeout(),
            Either::Ticker(t) => t.poll_timeout(),
        }
    }
}

const A: &str = "127.0.0.1:1000";
const B: &str = "127.0.0.1:2000";

fn burst_run(seed: u64, link: LinkConfig, count: u32, size: usize) -> (Network<Either>, NodeId) {
    let (a, b): (SocketAddr, SocketAddr) = (A.parse().unwrap(), B.parse().unwrap());
    let mut net = Network::new(seed, Clock::Virtual, LinkConfig::default());
    net.set_link(a, b, link);
    let sink = net.add(b, Either::Probe(Probe::sink()));
    let queue = (0..count)
        .map(|i| {
            let mut d = i.to_be_bytes().to_vec();
            d.resize(size.max(4), 0);
            d
        })
        .collect();
    net.add(a, Either::Burst(Burst { to: b, queue }));
    net.run_for(Duration::from_secs(10));
    (net, sink)
}

fn probe(net: &Network<Either>, id: NodeId) -> &Probe {
    match net.node(id) {
        Either::Probe(p) => p,
        _ => unreachable!(),
    }
}

#[test]
fn latency_is_applied_exactly() {
    let link = LinkConfig::default().latency(Duration::from_millis(25), Duration::ZERO);
    let (net, sink) = burst_run(1, link, 3, 10);
    let start = net.now() - net.elapsed();
    let p = probe(&net, sink);
    assert_eq!(p.numbers(), vec![0, 1, 2]);
    for (at, from, _) in &p.arrivals {
        assert_eq!(*at - start, Duration::from_millis(25));
        assert_eq!(*from, A.parse::<SocketAddr>().unwrap());
    }
}

#[test]
fn random_loss_matches_its_rate() {
    let (net, sink) = burst_run(2, LinkConfig::default().loss(Loss::Random(0.3)), 10_000, 10);
    let delivered = probe(&net, sink).arrivals.len() as f64;
    let loss = 1.0 - delivered / 10_000.0;
    assert!((loss - 0.3).abs() < 0.03, "loss {loss}");
    assert_eq!(net.stats().lost as usize, 10_000 - delivered as usize);
}

#[test]
fn bursty_loss_matches_its_average_and_comes_in_bursts() {
    let (net, sink) = burst_run(3, LinkConfig::default().loss(Loss::bursty(0.2, 4.0)), 20_000, 10);
    let got = probe(&net, sink).numbers();
    let loss = 1.0 - got.len() as f64 / 20_000.0;
    assert!((loss - 0.2).abs() < 0.04, "loss {loss}");
    // Mean length of runs of consecutive losses.
    let gaps: Vec<u32> = got.windows(2).map(|w| w[1] - w[0] - 1).filter(|g| *g > 0).collect();
    let mean_burst = gaps.iter().sum::<u32>() as f64 / gaps.len() as f64;
    assert!((3.0..5.5).contains(&mean_burst), "mean burst {mean_burst}");
}

#[test]
fn duplication_and_reordering_happen_at_their_rates() {
    let link = LinkConfig::default().chaos(0.1, 0.2).latency(Duration::from_millis(10), Duration::ZERO);
    // Spread the sends so that a held-back datagram can be overtaken.
    let (a, b): (SocketAddr, SocketAddr) = (A.parse().unwrap(), B.parse().unwrap());
    let mut net: Network<Either> = Network::new(4, Clock::Virtual, LinkConfig::default());
    net.set_link(a, b, link);
    let sink = net.add(b, Either::Probe(Probe::sink()));
    let start = net.now();
    let ticker = Ticker {
        to: b,
        count: 2_000,
        sent: 0,
        spacing: Duration::from_millis(5),
        next_send: Some(start),
        outbox: None,
    };
    net.add(a, Either::Ticker(ticker));
    net.run_for(Duration::from_secs(11));
    net.run_for(Duration::from_secs(1));
    let stats = net.stats();
    let dup = stats.duplicated as f64 / stats.sent as f64;
    let reordered = stats.reordered as f64 / stats.sent as f64;
    assert!((dup - 0.1).abs() < 0.03, "duplicated {dup}");
    assert!(reordered > 0.1, "reordered {reordered}");
    let numbers = probe(&net, sink).numbers();
    assert!(numbers.windows(2).any(|w| w[1] < w[0]), "something arrived out of order");
    assert_eq!(numbers.len() as u64, stats.delivered);
}

#[test]
fn datagrams_over_the_mtu_are_dropped() {
    let (net, sink) = burst_run(5, LinkConfig::default().mtu(100), 5, 101);
    assert!(probe(&net, sink).arrivals.is_empty());
    assert_eq!(net.stats().too_big, 5);
    let (net, sink) = burst_run(5, LinkConfig::default().mtu(100), 5, 100);
    assert_eq!(probe(&net, sink).arrivals.len(), 5);
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let link = || {
        LinkConfig::default()
            .loss(Loss::Random(0.2))
            .chaos(0.1, 0.1)
            .latency(Duration::from_millis(5), Duration::from_millis(20))
    };
    let order = |seed| {
        let (net, sink) = burst_run(seed, link(), 500, 10);
        let start = net.now() - net.elapsed();
        probe(&net, sink).arrivals.iter().map(|(t, _, d)| (*t - start, d.clone())).collect::<Vec<_>>()
    };
    assert_eq!(order(42), order(42));
    assert_ne!(order(42), order(43));
}
