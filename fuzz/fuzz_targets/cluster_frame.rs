//! Any bytes as a frame between cluster nodes: refused or opened, never a panic; a frame
//! sealed from any parts opens to the same parts, and one changed byte is refused.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tether_proto::cluster::{ClusterKey, Frame, FrameKind};
use tether_proto::dtls::NodeId;

fn key() -> &'static ClusterKey {
    static KEY: OnceLock<ClusterKey> = OnceLock::new();
    KEY.get_or_init(|| ClusterKey::new(b"fuzzing cluster key, 32 bytes..").unwrap())
}

fuzz_target!(|data: &[u8]| {
    let now = 1_800_000_000_000;
    let _ = key().open(data, now, 30_000);
    let [kind, node, port_hi, port_lo, flip, datagram @ ..] = data else { return };
    let peer = SocketAddr::from(([192, 0, 2, *node], u16::from_be_bytes([*port_hi, *port_lo])));
    let kind = [FrameKind::Forward, FrameKind::Reply, FrameKind::Release][usize::from(*kind) % 3];
    let frame = Frame { kind, sender: NodeId(*node), sent_unix_ms: now, peer, datagram };
    let sealed = key().seal(&frame);
    assert_eq!(key().open(&sealed, now, 0).as_ref(), Ok(&frame));
    let mut changed = sealed.clone();
    let at = usize::from(*flip) % changed.len();
    changed[at] ^= 0x80;
    assert!(key().open(&changed, now, 0).is_err(), "byte {at} changed");
});
