//! Drives client sessions against an endpoint in memory.

use std::net::SocketAddr;
use std::time::Instant;

use tether_proto::dtls::{Endpoint, EndpointEvent, Event, Session, SessionHandle};

/// Delivers everything queued, both ways, until quiet. Returns the endpoint's events and
/// the client's.
pub fn exchange(
    now: Instant,
    endpoint: &mut Endpoint,
    client: &mut Session,
    addr: SocketAddr,
) -> (Vec<EndpointEvent>, Vec<Event>) {
    let (mut ee, mut ce) = (Vec::new(), Vec::new());
    for _ in 0..100 {
        let mut moved = false;
        while let Some(t) = client.poll_transmit() {
            endpoint.handle(now, addr, &t.contents);
            moved = true;
        }
        while let Some(t) = endpoint.poll_transmit() {
            if t.destination == addr {
                client.handle_datagram(now, &t.contents);
                moved = true;
            }
        }
        ee.extend(std::iter::from_fn(|| endpoint.poll_event()));
        ce.extend(std::iter::from_fn(|| client.poll_event()));
        if !moved {
            break;
        }
    }
    (ee, ce)
}

pub fn addr(i: u32) -> SocketAddr {
    let [a, b, c, d] = i.to_be_bytes();
    SocketAddr::from(([127, a.max(1), b ^ c, d], 10_000 + (i % 50_000) as u16))
}

/// The handle of the first `Connected` event.
pub fn connected_handle(events: &[EndpointEvent]) -> SessionHandle {
    events
        .iter()
        .find_map(|e| match e {
            EndpointEvent::Connected { handle, .. } => Some(*handle),
            _ => None,
        })
        .expect("a Connected event")
}
