//! Connection IDs that name their node: every ID a node makes names it, to itself and to
//! every other node of the layout; any bytes at all decode to a node only if they are of
//! the layout, and then to the node at byte 1. Never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_proto::dtls::cid::{cid_bytes, CidGenerator, CidOwner, NodeCids, NodeId};

fuzz_target!(|data: &[u8]| {
    let [len, config, node, other, rest @ ..] = data else { return };
    let Ok(layout) = NodeCids::new(4 + len % 5, config % 7, NodeId(*node)) else { unreachable!("lengths 4 to 8") };
    let random = rest.iter().take(8).fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    let cid = cid_bytes(layout.generate(random), layout.cid_len());
    assert_eq!(cid.len(), usize::from(layout.cid_len()));
    assert_eq!(layout.owner(&cid), CidOwner::Local);
    let peer = NodeCids::new(layout.cid_len(), config % 7, NodeId(*other)).unwrap();
    let expected = if other == node { CidOwner::Local } else { CidOwner::Node(NodeId(*node)) };
    assert_eq!(peer.owner(&cid), expected);

    // Arbitrary bytes as an ID.
    match layout.owner(rest) {
        CidOwner::Node(named) => {
            assert_eq!(rest.len(), usize::from(layout.cid_len()));
            assert_eq!(named, NodeId(rest[1]));
            assert_ne!(named, NodeId(*node));
        }
        CidOwner::Local => assert_eq!((rest.len(), rest[1]), (usize::from(layout.cid_len()), *node)),
        CidOwner::Unknown => assert!(rest.len() != usize::from(layout.cid_len()) || rest[0] != cid[0]),
    }
});
