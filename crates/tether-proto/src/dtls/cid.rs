//! Connection IDs (RFC 9146) and who issued them.
//!
//! An [`Endpoint`](super::Endpoint) gives each session a Connection ID from its
//! [`CidGenerator`] and routes records by it. Alone, a server's IDs need only be unique:
//! [`RandomCids`]. In a cluster every node must tell, from the ID alone, which node holds the
//! session a record belongs to, whatever node the load balancer sent it to: [`NodeCids`]
//! writes the node's id at a fixed offset, as QUIC-LB does for QUIC
//! (draft-ietf-quic-load-balancers §3):
//!
//! ```text
//! byte 0       config byte: bits 7–5 the layout's config id (0–6; 7 is never issued),
//!              bits 4–0 the length of the rest of the ID
//! byte 1       the node id
//! bytes 2..    a random nonce (2 to 6 bytes)
//! ```
//!
//! The config byte lets a cluster change its layout (length, a future encrypted form)
//! while IDs of the old one are still in use: an ID whose config byte is not the layout's
//! is not read as naming a node. The node id is in the clear; the nonce makes the rest of the
//! ID unpredictable, and a record still has to authenticate under its session's keys.

use std::fmt;

/// A node of a cluster, as its Connection IDs name it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u8);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}", self.0)
    }
}

/// The longest Connection ID an endpoint issues (it keys sessions by the ID as a `u64`).
pub const MAX_CID_LEN: u8 = 8;

/// Who issued a Connection ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CidOwner {
    /// This endpoint (its session may have ended).
    Local,
    /// Another node of the cluster.
    Node(NodeId),
    /// Nobody this layout knows: not a Connection ID of the cluster.
    Unknown,
}

/// Makes Connection IDs for new sessions and tells whose an ID is.
///
/// Stateless, so that a configuration holding one can be cloned and shared: the endpoint
/// draws the randomness (from its seeded generator, keeping runs reproducible) and checks
/// that no session already holds the ID.
pub trait CidGenerator: Send + Sync + fmt::Debug {
    /// The length of every ID this generator makes, 1 to [`MAX_CID_LEN`] bytes.
    fn cid_len(&self) -> u8;

    /// An ID made from `random` (uniformly random bits), as the big-endian number of its
    /// [`cid_len`](Self::cid_len) bytes.
    fn generate(&self, random: u64) -> u64;

    /// Who issued `cid`.
    fn owner(&self, cid: &[u8]) -> CidOwner;
}

/// A generator's length is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a Connection ID of {len} bytes: {what} take {min} to {max}")]
pub struct CidLengthError {
    /// The length asked for.
    pub len: u8,
    /// Which generator.
    pub what: &'static str,
    /// The shortest it takes.
    pub min: u8,
    /// The longest it takes.
    pub max: u8,
}

/// Random Connection IDs of one length: one server, no cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RandomCids {
    len: u8,
}

impl RandomCids {
    /// IDs of `len` bytes (1 to [`MAX_CID_LEN`]).
    pub fn new(len: u8) -> Result<Self, CidLengthError> {
        if !(1..=MAX_CID_LEN).contains(&len) {
            return Err(CidLengthError { len, what: "random IDs", min: 1, max: MAX_CID_LEN });
        }
        Ok(Self { len })
    }

    /// IDs of `len` bytes, checked when an endpoint is made with them.
    pub(crate) fn unchecked(len: u8) -> Self {
        Self { len }
    }
}

impl CidGenerator for RandomCids {
    fn cid_len(&self) -> u8 {
        self.len
    }

    fn generate(&self, random: u64) -> u64 {
        random & mask(self.len)
    }

    fn owner(&self, _cid: &[u8]) -> CidOwner {
        CidOwner::Local
    }
}

/// Connection IDs that carry the issuing node's id (the layout in the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeCids {
    len: u8,
    config_id: u8,
    node: NodeId,
}

/// The shortest node ID: config byte, node id, two bytes of nonce.
const NODE_CID_MIN_LEN: u8 = 4;
/// The config id QUIC-LB reserves for IDs no load balancer may route.
const UNROUTABLE_CONFIG_ID: u8 = 7;

impl NodeCids {
    /// IDs of `len` bytes (4 to [`MAX_CID_LEN`]) of layout `config_id` (0 to 6) issued by
    /// `node`.
    pub fn new(len: u8, config_id: u8, node: NodeId) -> Result<Self, CidLengthError> {
        if !(NODE_CID_MIN_LEN..=MAX_CID_LEN).contains(&len) {
            return Err(CidLengthError { len, what: "node IDs", min: NODE_CID_MIN_LEN, max: MAX_CID_LEN });
        }
        Ok(Self { len, config_id: config_id.min(UNROUTABLE_CONFIG_ID - 1), node })
    }

    /// The node these IDs name.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The config byte of this layout.
    fn config_byte(&self) -> u8 {
        (self.config_id << 5) | (self.len - 1)
    }

    /// The node `cid` names, if it is an ID of this layout.
    pub fn node_of(&self, cid: &[u8]) -> Option<NodeId> {
        match cid {
            [config, node, ..] if cid.len() == usize::from(self.len) && *config == self.config_byte() => {
                Some(NodeId(*node))
            }
            _ => None,
        }
    }
}

impl CidGenerator for NodeCids {
    fn cid_len(&self) -> u8 {
        self.len
    }

    fn generate(&self, random: u64) -> u64 {
        let nonce_bits = 8 * u32::from(self.len - 2);
        let header = (u64::from(self.config_byte()) << 8) | u64::from(self.node.0);
        (header << nonce_bits) | (random & mask(self.len - 2))
    }

    fn owner(&self, cid: &[u8]) -> CidOwner {
        match self.node_of(cid) {
            Some(node) if node == self.node => CidOwner::Local,
            Some(node) => CidOwner::Node(node),
            None => CidOwner::Unknown,
        }
    }
}

/// The low `len` bytes of a `u64`.
fn mask(len: u8) -> u64 {
    if len >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * u32::from(len))) - 1
    }
}

/// The bytes of an ID of `len` bytes held as the big-endian number `cid`.
pub fn cid_bytes(cid: u64, len: u8) -> Vec<u8> {
    cid.to_be_bytes()[8 - usize::from(len.min(MAX_CID_LEN))..].to_vec()
}

/// The big-endian number of an ID's bytes (at most [`MAX_CID_LEN`] of them).
pub fn cid_number(cid: &[u8]) -> u64 {
    cid.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_carry_their_node_at_a_fixed_offset_and_their_length_in_the_config_byte() {
        let layout = NodeCids::new(6, 1, NodeId(42)).unwrap();
        let cid = cid_bytes(layout.generate(0x0123_4567_89ab_cdef), 6);
        assert_eq!(cid, [0b001_00101, 42, 0x89, 0xab, 0xcd, 0xef]);
        assert_eq!(layout.owner(&cid), CidOwner::Local);
        let other = NodeCids::new(6, 1, NodeId(7)).unwrap();
        assert_eq!(other.owner(&cid), CidOwner::Node(NodeId(42)), "any node of the layout reads it");
        assert_eq!(NodeCids::new(6, 2, NodeId(7)).unwrap().owner(&cid), CidOwner::Unknown, "another config id");
        assert_eq!(NodeCids::new(8, 1, NodeId(7)).unwrap().owner(&cid), CidOwner::Unknown, "another length");
        assert_eq!(other.owner(&cid[..5]), CidOwner::Unknown);
        assert_eq!(other.owner(&[]), CidOwner::Unknown);
    }

    #[test]
    fn lengths_out_of_range_are_refused_with_the_range() {
        assert_eq!(
            NodeCids::new(3, 0, NodeId(1)).unwrap_err().to_string(),
            "a Connection ID of 3 bytes: node IDs take 4 to 8"
        );
        assert!(NodeCids::new(9, 0, NodeId(1)).is_err());
        assert!(RandomCids::new(0).is_err() && RandomCids::new(9).is_err());
        assert_eq!(RandomCids::new(8).unwrap().generate(u64::MAX), u64::MAX);
        assert_eq!(RandomCids::new(2).unwrap().generate(u64::MAX), 0xffff);
        assert_eq!(NodeCids::new(4, 9, NodeId(1)).unwrap().config_id, 6, "7 is never issued");
    }

    #[test]
    fn bytes_and_numbers_round_trip() {
        for len in 1..=MAX_CID_LEN {
            let cid = RandomCids::new(len).unwrap().generate(0xfedc_ba98_7654_3210);
            assert_eq!(cid_number(&cid_bytes(cid, len)), cid);
            assert_eq!(cid_bytes(cid, len).len(), usize::from(len));
        }
    }
}
