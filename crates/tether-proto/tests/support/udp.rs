//! Blocking drivers that run a sans-IO session or endpoint on a real UDP socket, for
//! interoperability tests against peer processes. Real time, real sockets on 127.0.0.1.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tether_proto::dtls::{Endpoint, EndpointEvent, Event, Session};

fn wait_for(socket: &UdpSocket, next: Option<Instant>, cap: Instant) {
    let until = next.unwrap_or(cap).min(cap);
    let wait = until.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    socket.set_read_timeout(Some(wait)).unwrap();
}

/// Runs `session` on `socket` (connected to its peer) until `done` says so or `limit` passes.
pub fn drive_session(
    socket: &UdpSocket,
    session: &mut Session,
    limit: Duration,
    mut done: impl FnMut(&mut Session, &Event) -> bool,
) -> bool {
    let cap = Instant::now() + limit;
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < cap {
        while let Some(t) = session.poll_transmit() {
            socket.send(&t.contents).unwrap();
        }
        while let Some(event) = session.poll_event() {
            if done(session, &event) {
                while let Some(t) = session.poll_transmit() {
                    socket.send(&t.contents).unwrap();
                }
                return true;
            }
        }
        wait_for(socket, session.poll_timeout(), cap);
        match socket.recv(&mut buf) {
            Ok(n) => session.handle_datagram(Instant::now(), &buf[..n]),
            Err(_) => session.handle_timeout(Instant::now()),
        }
    }
    false
}

/// Runs an echo endpoint on `socket` until `limit` passes or `stop` receives; reports every
/// event on `events`.
pub fn serve_echo(
    socket: UdpSocket,
    mut endpoint: Endpoint,
    limit: Duration,
    events: mpsc::Sender<EndpointEvent>,
    stop: mpsc::Receiver<()>,
) -> Endpoint {
    let cap = Instant::now() + limit;
    let mut buf = vec![0u8; 65_536];
    while Instant::now() < cap && stop.try_recv().is_err() {
        wait_for(&socket, endpoint.poll_timeout(), cap.min(Instant::now() + Duration::from_millis(50)));
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => endpoint.handle(Instant::now(), from, &buf[..n]),
            Err(_) => endpoint.handle_timeout(Instant::now()),
        }
        while let Some(event) = endpoint.poll_event() {
            if let EndpointEvent::Data { handle, data, .. } = &event {
                let _ = endpoint.send(Instant::now(), *handle, data);
            }
            let _ = events.send(event);
        }
        while let Some(t) = endpoint.poll_transmit() {
            let _ = socket.send_to(&t.contents, t.destination);
        }
    }
    endpoint
}

/// Lines a child process prints, read on a thread.
pub struct Lines(mpsc::Receiver<String>);

impl Lines {
    /// Reads `stream` line by line.
    pub fn new(stream: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self(rx)
    }

    /// Waits up to `limit` for a line satisfying `want`; returns it, with what came before.
    pub fn wait(&self, limit: Duration, want: impl Fn(&str) -> bool) -> Result<String, Vec<String>> {
        let cap = Instant::now() + limit;
        let mut seen = Vec::new();
        while let Some(left) = cap.checked_duration_since(Instant::now()) {
            match self.0.recv_timeout(left) {
                Ok(line) if want(&line) => return Ok(line),
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        Err(seen)
    }
}

/// Ends a child process this test started (by its handle, hence its PID).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The address a socket bound to 127.0.0.1:0 got.
pub fn local(socket: &UdpSocket) -> SocketAddr {
    socket.local_addr().unwrap()
}
