//! `tether bench dtls`: the DTLS engine on real UDP sockets on 127.0.0.1.
//!
//! Server and client each run on their own thread with a blocking socket, so the figures
//! include the kernel's loopback path; every DTLS figure has a baseline from the same run.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tether_proto::dtls::pki::{CertificateAuthority, Validity};
use tether_proto::dtls::{
    CipherSuite, ClientConfig, DtlsContext, Endpoint, EndpointConfig, Event, PskKey, SavedSession, ServerConfig,
    Session, SessionConfig, StaticPskStore,
};

use super::{heap_in_use_bytes, live_rss_bytes};
use super::{percentiles_us, Figure};

/// What to measure and for how long.
#[derive(Debug, Clone)]
pub struct DtlsBenchOptions {
    /// Time spent on each rate measurement.
    pub duration: Duration,
    /// Sessions held for the memory figure.
    pub sessions: usize,
    /// Bytes per record in the round-trip figure.
    pub payload: usize,
}

const IDENTITY: &str = "bench";

/// Runs every DTLS measurement and returns the figures.
pub fn run(options: &DtlsBenchOptions) -> Result<Vec<Figure>> {
    let psk = PskKey::from_hex("73656372657450534b")?;
    let session = SessionConfig::default().handshake_timeout(Duration::from_secs(5));
    let psk_session = session.clone().cipher_suites(&[CipherSuite::PskAes128Ccm8]);
    let psk_server = DtlsContext::server(
        ServerConfig::psk(StaticPskStore::new().with(IDENTITY, psk.clone())).session(psk_session.clone()),
    )?;
    let psk_client = DtlsContext::client(ClientConfig::psk(IDENTITY, psk).session(psk_session))?;

    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let validity = Validity::days_around(now, 7);
    let mut ca = CertificateAuthority::generate("tether bench ca", validity)?;
    let ecdhe_session = session.cipher_suites(&[CipherSuite::EcdheEcdsaAes128GcmSha256]);
    let x509_server =
        DtlsContext::server(ServerConfig::x509(ca.issue("localhost", validity)?).session(ecdhe_session.clone()))?;
    let x509_client = DtlsContext::client(
        ClientConfig::x509(vec![ca.certificate.clone()]).server_name("localhost").session(ecdhe_session),
    )?;

    let mut figures = Vec::new();

    let server = EchoServer::dtls(Arc::clone(&psk_server))?;
    let (dtls_rtt, mut dtls_lat) = dtls_round_trips(&psk_client, server.addr, options.duration, options.payload)?;
    let mut full = handshakes(&psk_client, server.addr, options.duration, Resume::Never)?;
    let mut resumed = handshakes(&psk_client, server.addr, options.duration, Resume::Always)?;
    server.stop();
    let udp = EchoServer::plain()?;
    let (udp_rtt, mut udp_lat) = udp_round_trips(udp.addr, options.duration, options.payload)?;
    udp.stop();
    let (d50, d99) = percentiles_us(&mut dtls_lat);
    let (u50, u99) = percentiles_us(&mut udp_lat);
    let (full_p50, full_p99) = percentiles_us(&mut full.latencies);
    let (res_p50, res_p99) = percentiles_us(&mut resumed.latencies);
    figures.push(Figure::new(
        format!("{}-byte DTLS round trips/s", options.payload),
        dtls_rtt,
        "rt/s",
        "plain UDP round trips/s",
        udp_rtt,
        format!("DTLS p50 {d50:.0} us p99 {d99:.0} us; UDP p50 {u50:.0} us p99 {u99:.0} us; PSK-AES128-CCM8"),
    ));
    figures.push(Figure::new(
        "full PSK handshakes/s",
        full.rate(),
        "hs/s",
        "pooled DTLS round trips/s",
        dtls_rtt,
        format!(
            "{} handshakes (cookie exchange included), p50 {full_p50:.0} us, p99 {full_p99:.0} us; one handshake costs {:.1} pooled round trips",
            full.count,
            dtls_rtt / full.rate()
        ),
    ));
    figures.push(Figure::new(
        "resumed PSK handshakes/s",
        resumed.rate(),
        "hs/s",
        "full PSK handshakes/s",
        full.rate(),
        format!("{} abbreviated handshakes, p50 {res_p50:.0} us, p99 {res_p99:.0} us", resumed.count),
    ));

    let server = EchoServer::dtls(Arc::clone(&x509_server))?;
    let mut ecdhe = handshakes(&x509_client, server.addr, options.duration, Resume::Never)?;
    server.stop();
    let (e50, e99) = percentiles_us(&mut ecdhe.latencies);
    figures.push(Figure::new(
        "ECDHE-ECDSA handshakes/s",
        ecdhe.rate(),
        "hs/s",
        "full PSK handshakes/s",
        full.rate(),
        format!("{} handshakes, P-256, p50 {e50:.0} us, p99 {e99:.0} us", ecdhe.count),
    ));

    let (heap, rss) = memory_per_session(&psk_server, &psk_client, options.sessions)?;
    let openssl = super::openssl_baseline::openssl_session_heap_bytes(options.sessions.min(2000))?;
    figures.push(Figure::new(
        "heap per established session",
        heap / 1024.0,
        "KiB",
        "OpenSSL established session (this run)",
        openssl / 1024.0,
        format!(
            "{} in-process server sessions, resumption cache entries included (glibc mallinfo2); RSS after malloc_trim \
             {:.2} KiB per session",
            options.sessions,
            rss / 1024.0
        ),
    ));
    let (rustcrypto, evp, ccm8) = aead_cost(options.payload)?;
    figures.push(Figure::new(
        format!("AEAD seal + open of a {}-byte record (RustCrypto)", options.payload),
        rustcrypto,
        "ns",
        "OpenSSL EVP through the openssl crate",
        evp,
        format!(
            "AES-128-GCM, the key expanded for every record as the record layer does (it keeps 40 bytes of keys, \
             not schedules); RustCrypto AES-128-CCM_8 (the LwM2M suite, which the openssl crate's one-shot AEAD \
             calls do not set up): {ccm8:.0} ns"
        ),
    ));
    Ok(figures)
}

/// An echo server on its own thread: DTLS through an [`Endpoint`], or plain UDP.
struct EchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl EchoServer {
    fn dtls(context: Arc<DtlsContext>) -> Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        let addr = socket.local_addr()?;
        let config = super::capacity_limits(EndpointConfig::new(crate::echo::os_seed()));
        let endpoint = Endpoint::new(context, config, Instant::now())?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let _ = crate::echo::serve(&socket, endpoint, &flag, |_| {});
        });
        Ok(Self { addr, stop, thread })
    }

    fn plain() -> Result<Self> {
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        let addr = socket.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            socket.set_read_timeout(Some(Duration::from_millis(20))).ok();
            while !flag.load(Ordering::Relaxed) {
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&buf[..n], from);
                }
            }
        });
        Ok(Self { addr, stop, thread })
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Resume {
    Never,
    Always,
}

struct Rate {
    count: u64,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Rate {
    fn rate(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `session` on `socket` until it emits an event `until` accepts; fails after 5 s.
fn drive(socket: &UdpSocket, session: &mut Session, until: impl Fn(&Event) -> bool) -> Result<()> {
    let cap = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 65_536];
    loop {
        while let Some(t) = session.poll_transmit() {
            socket.send(&t.contents)?;
        }
        while let Some(event) = session.poll_event() {
            if until(&event) {
                return Ok(());
            }
            if let Event::Closed { reason } = event {
                bail!("session closed: {reason}");
            }
        }
        let now = Instant::now();
        if now >= cap {
            bail!("no progress within 5 s");
        }
        let wake = session.poll_timeout().unwrap_or(cap).min(cap);
        socket.set_read_timeout(Some(wake.saturating_duration_since(now).max(Duration::from_millis(1))))?;
        match socket.recv(&mut buf) {
            Ok(n) => session.handle_datagram(Instant::now(), &buf[..n]),
            Err(_) => session.handle_timeout(Instant::now()),
        }
    }
}

/// Sequential handshakes against `server` for `duration`, each closed with close_notify.
fn handshakes(client: &Arc<DtlsContext>, server: SocketAddr, duration: Duration, resume: Resume) -> Result<Rate> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(server)?;
    let mut saved: Option<SavedSession> = None;
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < duration {
        let began = Instant::now();
        let mut session = match (&saved, resume) {
            (Some(s), Resume::Always) => Session::client_resuming(client, began, s)?,
            _ => Session::client(client, began)?,
        };
        drive(&socket, &mut session, |e| matches!(e, Event::Connected { .. })).context("bench handshake")?;
        latencies.push(began.elapsed());
        if resume == Resume::Always && saved.is_some() && !session.is_resumed() {
            bail!("the server did not resume the saved session");
        }
        if saved.is_none() {
            saved = session.saved_session(client);
        }
        session.close(Instant::now());
        while let Some(t) = session.poll_transmit() {
            socket.send(&t.contents)?;
        }
    }
    Ok(Rate { count: latencies.len() as u64, elapsed: start.elapsed(), latencies })
}

fn dtls_round_trips(
    client: &Arc<DtlsContext>,
    server: SocketAddr,
    duration: Duration,
    payload: usize,
) -> Result<(f64, Vec<Duration>)> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(server)?;
    let mut session = Session::client(client, Instant::now())?;
    drive(&socket, &mut session, |e| matches!(e, Event::Connected { .. }))?;
    let record = vec![0x5au8; payload];
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < duration {
        let began = Instant::now();
        session.send(began, &record)?;
        drive(&socket, &mut session, |e| matches!(e, Event::Data(_)))?;
        latencies.push(began.elapsed());
    }
    Ok((latencies.len() as f64 / start.elapsed().as_secs_f64(), latencies))
}

fn udp_round_trips(server: SocketAddr, duration: Duration, payload: usize) -> Result<(f64, Vec<Duration>)> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    let datagram = vec![0x5au8; payload];
    let mut buf = vec![0u8; 65_536];
    let mut latencies = Vec::new();
    let start = Instant::now();
    while start.elapsed() < duration {
        let began = Instant::now();
        socket.send(&datagram)?;
        socket.recv(&mut buf).context("plain UDP echo")?;
        latencies.push(began.elapsed());
    }
    Ok((latencies.len() as f64 / start.elapsed().as_secs_f64(), latencies))
}

/// Heap and live-RSS growth per established server session, over `count` sessions held
/// at once.
fn memory_per_session(server: &Arc<DtlsContext>, client: &Arc<DtlsContext>, count: usize) -> Result<(f64, f64)> {
    let now = Instant::now();
    let rss_before = live_rss_bytes()?;
    let heap_before = heap_in_use_bytes();
    let mut held = Vec::with_capacity(count);
    for _ in 0..count {
        let mut c = Session::client(client, now)?;
        let mut s = Session::server(server, now)?;
        for _ in 0..10 {
            while let Some(t) = c.poll_transmit() {
                s.handle_datagram(now, &t.contents);
            }
            while let Some(t) = s.poll_transmit() {
                c.handle_datagram(now, &t.contents);
            }
        }
        if !s.is_established() {
            bail!("in-process handshake did not complete");
        }
        while s.poll_event().is_some() {}
        held.push(s);
    }
    let heap = (heap_in_use_bytes() - heap_before) / count as f64;
    let rss = (live_rss_bytes()? - rss_before) / count as f64;
    drop(held);
    Ok((heap, rss))
}

/// Nanoseconds to seal and open one record of `payload` bytes: AES-128-GCM with the record
/// layer's RustCrypto AEAD and with OpenSSL's EVP interface, and AES-128-CCM_8 with
/// RustCrypto; each over 20,000 records.
fn aead_cost(payload: usize) -> Result<(f64, f64, f64)> {
    use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};
    use tether_proto::dtls::keys::{DirectionKey, RecordCipher};
    const ROUNDS: u32 = 20_000;
    let key = DirectionKey { key: [7; 16], salt: [1, 2, 3, 4], mac: None };
    let aad = [9u8; 13];
    let plaintext = vec![0x5au8; payload];
    let rustcrypto = |kind: RecordCipher| -> Result<f64> {
        let start = Instant::now();
        for i in 0..ROUNDS {
            let mut buffer = plaintext.clone();
            let tag = key.seal(kind, u64::from(i), &aad, &mut buffer);
            key.open(kind, u64::from(i), &aad, &mut buffer, &tag[..kind.tag_len()])
                .map_err(|_| anyhow::anyhow!("RustCrypto round trip failed"))?;
        }
        Ok(start.elapsed().as_nanos() as f64 / f64::from(ROUNDS))
    };
    let gcm = rustcrypto(RecordCipher::Gcm)?;
    let ccm8 = rustcrypto(RecordCipher::Ccm8)?;
    let cipher = Cipher::aes_128_gcm();
    let start = Instant::now();
    for i in 0..ROUNDS {
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&key.salt);
        nonce[4..].copy_from_slice(&u64::from(i).to_be_bytes());
        let mut tag = [0u8; 16];
        let sealed = encrypt_aead(cipher, &key.key, Some(&nonce), &aad, &plaintext, &mut tag)?;
        decrypt_aead(cipher, &key.key, Some(&nonce), &aad, &sealed, &tag)?;
    }
    let evp = start.elapsed().as_nanos() as f64 / f64::from(ROUNDS);
    Ok((gcm, evp, ccm8))
}
