//! A loopback impairment proxy between real UDP sockets: drops, duplicates, reorders and
//! delays datagrams in both directions, decided by a seeded generator.
//!
//! Clients send to [`Proxy::addr`]; each client address gets its own upstream socket, so the
//! server sees one stable address per client (the address a reboot or a forged datagram
//! would come from: [`Proxy::inject_upstream`]). [`Proxy::rebind_all`] acts as a NAT whose
//! mappings change: every client's next datagram leaves from a new port. With
//! [`Behaviour::capture`] it keeps every datagram it forwards.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;

/// What the proxy does to each datagram, in each direction.
#[derive(Debug, Clone, Copy)]
pub struct Impairment {
    /// Probability a datagram is dropped.
    pub loss: f64,
    /// Probability a forwarded datagram is sent twice.
    pub duplicate: f64,
    /// Probability a datagram is held back behind later ones (by `reorder_by`).
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_by: Duration,
    /// Delay of every datagram.
    pub delay: Duration,
    /// Extra random delay, uniform in [0, jitter).
    pub jitter: Duration,
    /// Seed of every decision.
    pub seed: u64,
}

impl Impairment {
    /// A clean path: nothing dropped, duplicated, reordered or delayed.
    pub fn none() -> Self {
        Self {
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_by: Duration::ZERO,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            seed: 0,
        }
    }

    /// `loss` with 5 % duplication and 10 % reordering, 1 ms ± 1 ms of delay.
    pub fn lossy(loss: f64, seed: u64) -> Self {
        Self {
            loss,
            duplicate: 0.05,
            reorder: 0.10,
            reorder_by: Duration::from_millis(15),
            delay: Duration::from_millis(1),
            jitter: Duration::from_millis(1),
            seed,
        }
    }
}

/// Counters.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Datagrams received from either side.
    pub received: AtomicU64,
    /// Dropped.
    pub dropped: AtomicU64,
    /// Extra copies sent.
    pub duplicated: AtomicU64,
    /// Held back behind later datagrams.
    pub reordered: AtomicU64,
}

/// What the proxy does besides impairing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Behaviour {
    /// Keep every forwarded datagram ([`Proxy::captured`]).
    pub capture: bool,
}

/// A datagram the proxy forwarded.
#[derive(Debug, Clone)]
pub struct Captured {
    /// The client's address.
    pub client: SocketAddr,
    /// The upstream address the server saw for it.
    pub upstream: SocketAddr,
    /// True: client to server.
    pub to_server: bool,
    /// The datagram.
    pub datagram: Vec<u8>,
}

/// A running proxy; its tasks end when it is dropped.
pub struct Proxy {
    addr: SocketAddr,
    upstreams: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>,
    /// Bumped by `rebind_all`: upstreams made before the current value are replaced.
    mapping: Arc<AtomicU64>,
    captured: Arc<Mutex<Vec<Captured>>>,
    /// Counters.
    pub stats: Arc<ProxyStats>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

struct Impairer {
    config: Impairment,
    rng: Mutex<StdRng>,
    stats: Arc<ProxyStats>,
}

impl Impairer {
    /// Sends `datagram` to `to` on `socket` as impaired: maybe not, maybe twice, later.
    fn forward(self: &Arc<Self>, socket: &Arc<UdpSocket>, to: Option<SocketAddr>, datagram: Vec<u8>) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        let (copies, delays) = {
            let mut rng = self.rng.lock().unwrap();
            if rng.gen_bool(self.config.loss) {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let copies = if rng.gen_bool(self.config.duplicate) { 2 } else { 1 };
            let delays: Vec<Duration> = (0..copies)
                .map(|_| {
                    let jitter = self.config.jitter.mul_f64(rng.gen::<f64>());
                    let held = if rng.gen_bool(self.config.reorder) { self.config.reorder_by } else { Duration::ZERO };
                    self.config.delay + jitter + held
                })
                .collect();
            (copies, delays)
        };
        if copies == 2 {
            self.stats.duplicated.fetch_add(1, Ordering::Relaxed);
        }
        for delay in delays {
            if delay > self.config.delay + self.config.jitter {
                self.stats.reordered.fetch_add(1, Ordering::Relaxed);
            }
            let socket = Arc::clone(socket);
            let datagram = datagram.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = match to {
                    Some(to) => socket.send_to(&datagram, to).await,
                    None => socket.send(&datagram).await,
                };
            });
        }
    }
}

impl Proxy {
    /// A proxy on 127.0.0.1 in front of `server`.
    pub async fn start(server: SocketAddr, config: Impairment) -> Self {
        Self::start_with(server, config, Behaviour::default()).await
    }

    /// A proxy that also rebinds or captures (see [`Behaviour`]).
    pub async fn start_with(server: SocketAddr, config: Impairment, behaviour: Behaviour) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = front.local_addr().unwrap();
        let stats = Arc::new(ProxyStats::default());
        let impairer = Arc::new(Impairer {
            config,
            rng: Mutex::new(StdRng::seed_from_u64(config.seed)),
            stats: Arc::clone(&stats),
        });
        let upstreams: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let captured: Arc<Mutex<Vec<Captured>>> = Arc::default();
        let mapping = Arc::new(AtomicU64::new(0));
        let (map, task_list, log) = (Arc::clone(&upstreams), Arc::clone(&tasks), Arc::clone(&captured));
        let current_mapping = Arc::clone(&mapping);
        let front_task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            let mut made_in: HashMap<SocketAddr, u64> = HashMap::new();
            loop {
                let Ok((n, client)) = front.recv_from(&mut buf).await else { continue };
                let now_mapping = current_mapping.load(Ordering::Relaxed);
                let fresh = made_in.get(&client) == Some(&now_mapping);
                let existing = map.lock().unwrap().get(&client).cloned().filter(|_| fresh);
                let upstream = match existing {
                    Some(upstream) => upstream,
                    None => {
                        let upstream = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                        upstream.connect(server).await.unwrap();
                        map.lock().unwrap().insert(client, Arc::clone(&upstream));
                        made_in.insert(client, now_mapping);
                        // Server → client, impaired the same way.
                        let (reader, front, impairer, log) =
                            (Arc::clone(&upstream), Arc::clone(&front), Arc::clone(&impairer), Arc::clone(&log));
                        task_list.lock().unwrap().push(tokio::spawn(async move {
                            let mut buf = vec![0u8; 65_536];
                            let upstream = reader.local_addr().unwrap();
                            loop {
                                match reader.recv(&mut buf).await {
                                    Ok(n) => {
                                        if behaviour.capture {
                                            let datagram = buf[..n].to_vec();
                                            let seen = Captured { client, upstream, to_server: false, datagram };
                                            log.lock().unwrap().push(seen);
                                        }
                                        impairer.forward(&front, Some(client), buf[..n].to_vec())
                                    }
                                    // Port unreachable while the server is away: keep going.
                                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                                }
                            }
                        }));
                        upstream
                    }
                };
                if behaviour.capture {
                    let upstream = upstream.local_addr().unwrap();
                    let seen = Captured { client, upstream, to_server: true, datagram: buf[..n].to_vec() };
                    log.lock().unwrap().push(seen);
                }
                impairer.forward(&upstream, None, buf[..n].to_vec());
            }
        });
        tasks.lock().unwrap().push(front_task);
        Self { addr, upstreams, mapping, captured, stats, tasks }
    }

    /// Every client's next datagram leaves from a new port (a NAT rebinding); answers to the
    /// old ports still reach the client.
    pub fn rebind_all(&self) {
        self.mapping.fetch_add(1, Ordering::Relaxed);
    }

    /// Every datagram forwarded so far (with [`Behaviour::capture`]).
    pub fn captured(&self) -> Vec<Captured> {
        self.captured.lock().unwrap().clone()
    }

    /// Where clients send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the server sees for `client`, once it has sent something.
    pub fn upstream_addr_of(&self, client: SocketAddr) -> Option<SocketAddr> {
        self.upstreams.lock().unwrap().get(&client).and_then(|s| s.local_addr().ok())
    }

    /// Sends `datagram` to the server from `client`'s upstream address, unimpaired: a
    /// datagram forged with the device's source address.
    pub async fn inject_upstream(&self, client: SocketAddr, datagram: &[u8]) {
        let upstream = self.upstreams.lock().unwrap().get(&client).cloned().expect("client seen by the proxy");
        upstream.send(datagram).await.unwrap();
    }
}

/// Checks every protected record in `captured`: its explicit nonce is its epoch and sequence
/// number (as tether writes it), and no nonce repeats per client, direction and key (a
/// ClientHello from a client starts a new key): under one key a repeated nonce would break
/// the AEAD. Returns how many records it checked.
pub fn assert_unique_nonces(captured: &[Captured]) -> usize {
    use tether_proto::dtls::record;
    let mut seen: HashMap<(SocketAddr, bool), std::collections::HashSet<u64>> = HashMap::new();
    let mut records = 0;
    for c in captured {
        if c.to_server && record::parse_client_hello(&c.datagram).is_some() {
            seen.retain(|(client, _), _| *client != c.client); // a new handshake: new keys
            continue;
        }
        let Some(parsed) = record::parse_records_with_cid(&c.datagram, Some(6)) else { continue };
        for r in parsed.iter().filter(|r| r.epoch > 0) {
            let nonce = u64::from_be_bytes(r.fragment[..8].try_into().unwrap());
            assert_eq!(nonce, r.epoch_and_sequence(), "tether's nonce is the epoch and sequence number");
            records += 1;
            assert!(
                seen.entry((c.client, c.to_server)).or_default().insert(nonce),
                "client {} ({}) reused sequence number {nonce:#x} under one key",
                c.client,
                if c.to_server { "to server" } else { "from server" }
            );
        }
    }
    records
}
