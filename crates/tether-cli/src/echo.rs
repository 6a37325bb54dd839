//! `tether echo`: a DTLS echo server on one UDP socket, for trying peers against tether's
//! engine (openssl s_client, libcoap, tinydtls, node-dtls-client). The LwM2M server is
//! `tether serve`.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use tether_proto::dtls::{Endpoint, EndpointEvent};

/// 32 bytes of OS entropy for cookie secrets.
pub fn os_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    rand::Rng::fill(&mut rand::rngs::OsRng, &mut seed);
    seed
}

/// Serves `endpoint` on `socket`, echoing application data, until `stop` is set. Every
/// endpoint event is passed to `observe` before it is acted on.
pub fn serve(
    socket: &UdpSocket,
    mut endpoint: Endpoint,
    stop: &AtomicBool,
    mut observe: impl FnMut(&EndpointEvent),
) -> Result<Endpoint> {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let wake = endpoint.poll_timeout().map_or(Duration::from_millis(100), |at| at.saturating_duration_since(now));
        socket.set_read_timeout(Some(wake.clamp(Duration::from_millis(1), Duration::from_millis(100))))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) => endpoint.handle(Instant::now(), from, &buf[..n]),
            Err(_) => endpoint.handle_timeout(Instant::now()),
        }
        while let Some(event) = endpoint.poll_event() {
            observe(&event);
            if let EndpointEvent::Data { handle, data, .. } = event {
                let _ = endpoint.send(Instant::now(), handle, &data);
            }
        }
        while let Some(t) = endpoint.poll_transmit() {
            let _ = socket.send_to(&t.contents, t.destination);
        }
    }
    Ok(endpoint)
}
