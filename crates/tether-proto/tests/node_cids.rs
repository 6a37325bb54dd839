//! Connection IDs that name their node: what a cluster routes by. A record that reaches a
//! node whose Connection ID another node issued is handed out for forwarding, untouched and
//! with the address it came from; delivered to its node, it is served as if it had arrived
//! there. Unknown IDs of the node's own, and IDs of no known layout, are dropped. Session
//! handles name their node too, and never repeat across a node's starts.

#![allow(clippy::disallowed_methods, reason = "tests pick their starting instant")]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use support::endpoint::{addr, connected_handle, exchange};
use support::*;
use tether_proto::dtls::{
    ClientConfig, DropReason, DtlsContext, Endpoint, EndpointConfig, EndpointEvent, Event, ForeignDatagram,
    HandleSpace, NodeCids, NodeId, Session,
};

fn node(id: u8, now: Instant) -> Endpoint {
    let cids = NodeCids::new(6, 0, NodeId(id)).unwrap();
    let config = EndpointConfig::new([id; 32]).connection_ids(Arc::new(cids));
    Endpoint::new(psk_server(fast_session()), config, now).unwrap()
}

fn cid_client() -> Arc<DtlsContext> {
    DtlsContext::client(ClientConfig::psk(IDENTITY, psk()).session(fast_session()).connection_id(Vec::new())).unwrap()
}

#[test]
fn a_record_for_another_nodes_session_is_handed_out_for_it_and_served_there() {
    let now = Instant::now();
    let (mut one, mut two) = (node(1, now), node(2, now));
    let mut client = Session::client(&cid_client(), now).unwrap();
    let at = addr(1);
    let (events, _) = exchange(now, &mut one, &mut client, at);
    let handle = connected_handle(&events);
    let cid = one.session(handle).unwrap().connection_id().unwrap().to_vec();
    assert_eq!((cid.len(), cid[1]), (6, 1), "the ID names node 1 at byte 1: {cid:02x?}");

    // The balancer sends the client's next record, from a new port, to node 2.
    client.send(now, b"via node 2").unwrap();
    let datagram = client.poll_transmit().unwrap().contents;
    let moved: SocketAddr = "127.0.0.1:40001".parse().unwrap();
    two.handle(now, moved, &datagram);
    let forwarded = two.poll_foreign().expect("handed out for node 1");
    assert_eq!(forwarded, ForeignDatagram { node: NodeId(1), cid: cid.clone(), from: moved, contents: datagram });
    assert_eq!(two.poll_foreign(), None);
    assert_eq!(two.stats().foreign_records, 1);
    assert_eq!(two.stats().dropped_total(), 0);
    assert_eq!(two.session_count(), 0, "node 2 keeps nothing of it");

    one.handle(now, forwarded.from, &forwarded.contents);
    let events: Vec<_> = std::iter::from_fn(|| one.poll_event()).collect();
    assert!(
        events.iter().any(|e| matches!(e, EndpointEvent::Data { data, .. } if data == b"via node 2")),
        "{events:?}"
    );
    assert!(events.iter().any(|e| matches!(e, EndpointEvent::Migrated { to, .. } if *to == moved)), "{events:?}");
    one.send(now, handle, b"answer").unwrap();
    let answer = one.poll_transmit().unwrap();
    assert_eq!(answer.destination, moved, "the answer goes to where the record came from");
    client.handle_datagram(now, &answer.contents);
    assert_eq!(client.poll_event(), Some(Event::Data(b"answer".to_vec())));
}

#[test]
fn unknown_ids_of_the_node_itself_or_of_no_layout_are_dropped() {
    let now = Instant::now();
    let mut one = node(1, now);
    let record = |cid: [u8; 6]| {
        let mut datagram = vec![25, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1];
        datagram.extend_from_slice(&cid);
        datagram.extend_from_slice(&[0, 24]);
        datagram.extend_from_slice(&[0u8; 24]);
        datagram
    };
    // Node 1's own layout, no such session: dropped as unknown.
    one.handle(now, addr(2), &record([0b000_00101, 1, 9, 9, 9, 9]));
    // Another config byte (another length, or a layout of no one): dropped too.
    one.handle(now, addr(2), &record([0b001_00101, 2, 9, 9, 9, 9]));
    one.handle(now, addr(2), &record([0b000_00111, 2, 9, 9, 9, 9]));
    assert_eq!(one.poll_foreign(), None);
    assert_eq!(one.stats().dropped(DropReason::UnknownConnectionId), 3);
    // Node 2's layout: handed out (the owner authenticates it, or not).
    one.handle(now, addr(2), &record([0b000_00101, 2, 9, 9, 9, 9]));
    assert_eq!(one.poll_foreign().map(|f| f.node), Some(NodeId(2)));

    // A node that may have had its sessions adopted hands its own unknown IDs out too.
    let cids = NodeCids::new(6, 0, NodeId(1)).unwrap();
    let mut config = EndpointConfig::new([1; 32]).connection_ids(Arc::new(cids));
    config.handles = HandleSpace { node: NodeId(1), boot: 2 };
    config.relay_unknown_own_ids = true;
    let mut rejoined = Endpoint::new(psk_server(fast_session()), config, now).unwrap();
    rejoined.handle(now, addr(2), &record([0b000_00101, 1, 9, 9, 9, 9]));
    assert_eq!(rejoined.poll_foreign().map(|f| (f.node, f.cid)), Some((NodeId(1), vec![0b000_00101, 1, 9, 9, 9, 9])));
}

#[test]
fn records_for_other_nodes_wait_in_a_bounded_queue() {
    let now = Instant::now();
    let mut one = node(1, now);
    let mut datagram = vec![25, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0b000_00101, 2, 1, 2, 3, 4, 0, 1, 0];
    for i in 0..5000u16 {
        datagram[15..17].copy_from_slice(&i.to_be_bytes());
        one.handle(now, addr(3), &datagram);
    }
    assert_eq!(std::iter::from_fn(|| one.poll_foreign()).count(), 4096);
    assert_eq!(one.stats().dropped(DropReason::ForeignBacklog), 5000 - 4096);
}

#[test]
fn handles_name_their_node_and_never_repeat_across_starts() {
    let now = Instant::now();
    let space = |node, boot| HandleSpace { node: NodeId(node), boot };
    let mut first =
        Endpoint::new(psk_server(fast_session()), EndpointConfig::new([1; 32]).handles(space(3, 5)), now).unwrap();
    let mut client = Session::client(&cid_client(), now).unwrap();
    let (events, _) = exchange(now, &mut first, &mut client, addr(1));
    let made = connected_handle(&events);
    assert_eq!(made.node(), NodeId(3));
    let snapshot = first.snapshot(made).unwrap();

    // The next start of the node restores the session and makes new handles past every
    // handle of the start before, and never one of another node.
    let mut next =
        Endpoint::new(psk_server(fast_session()), EndpointConfig::new([1; 32]).handles(space(3, 6)), now).unwrap();
    next.restore(now, made, addr(1), &snapshot).unwrap();
    let mut other = Session::client(&cid_client(), now).unwrap();
    let (events, _) = exchange(now, &mut next, &mut other, addr(2));
    let newer = connected_handle(&events);
    assert_ne!(newer, made);
    assert_eq!(newer.node(), NodeId(3));
    assert!(newer > made, "{newer} after {made}");
    let mut node_four =
        Endpoint::new(psk_server(fast_session()), EndpointConfig::new([4; 32]).handles(space(4, 6)), now).unwrap();
    let mut third = Session::client(&cid_client(), now).unwrap();
    let (events, _) = exchange(now, &mut node_four, &mut third, addr(3));
    let elsewhere = connected_handle(&events);
    assert_eq!(elsewhere.node(), NodeId(4));
    assert_ne!(elsewhere, newer);
}
