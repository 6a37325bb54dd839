//! Frames between the nodes of a cluster, sans-IO: a record a node received for a session
//! another node holds (forwarded with the address it came from), and the answer that node
//! sends back through the first (the load balancer's flow for the device is bound there).
//!
//! ```text
//! 0..4    b"TTN1"
//! 4       kind: 1 forward, 2 reply
//! 5       the sending node
//! 6..14   when it was sent: Unix time in ms, big-endian
//! 14      the device address's family: 4 or 6
//! 15..    the address (4 or 16 bytes) and port (2)
//! ..      the datagram, as the device sent it or as it is to receive it
//! last 16 HMAC-SHA256 over everything before, truncated to 16 bytes
//! ```
//!
//! Every node of a cluster holds the same key. A frame that does not authenticate, or whose
//! time is further than the allowed skew from the receiver's, is refused: nobody without the
//! key can make a node send a datagram to an address of their choosing, and a captured frame
//! replays only within the skew (the datagram inside is DTLS-protected and replay-checked by
//! its session).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use openssl::memcmp;
use openssl::pkey::{PKey, Private};
use openssl::sign::Signer;

use crate::dtls::NodeId;

const MAGIC: &[u8; 4] = b"TTN1";
const MAC_LEN: usize = 16;
/// The shortest key a cluster may use.
pub const MIN_KEY_LEN: usize = 16;

/// What a frame asks of the node that receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    /// A datagram for a session the receiver holds, as it came from `peer`.
    Forward,
    /// A datagram to send to `peer` from the receiver's own socket.
    Reply,
    /// The sender claimed the registration whose id is the datagram (its device moved
    /// there): the receiver lets go of it. `peer` is unused.
    Release,
}

/// A frame, opened or to be sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    /// What it asks.
    pub kind: FrameKind,
    /// The node that sent it.
    pub sender: NodeId,
    /// When it was sent, Unix time in ms.
    pub sent_unix_ms: u64,
    /// The device's address (as the node that received its datagram saw it).
    pub peer: SocketAddr,
    /// The datagram.
    pub datagram: &'a [u8],
}

/// Why a frame was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Too short, a bad magic, kind or address family.
    #[error("not a cluster frame")]
    Malformed,
    /// The MAC does not verify: another key, or the frame was changed.
    #[error("the frame does not authenticate (another cluster key?)")]
    Unauthentic,
    /// Sent longer ago (or further ahead) than the allowed skew.
    #[error("the frame's time is {0} ms from ours")]
    Stale(u64),
}

/// The key the nodes of a cluster share.
pub struct ClusterKey {
    key: PKey<Private>,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(…)")
    }
}

/// A key shorter than [`MIN_KEY_LEN`] bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a cluster key of {0} bytes: at least {MIN_KEY_LEN} random bytes")]
pub struct WeakKey(pub usize);

impl ClusterKey {
    /// The key `bytes` (at least [`MIN_KEY_LEN`] random bytes).
    pub fn new(bytes: &[u8]) -> Result<Self, WeakKey> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(WeakKey(bytes.len()));
        }
        let key = PKey::hmac(bytes).map_err(|_| WeakKey(bytes.len()))?;
        Ok(Self { key })
    }

    /// `frame`, sealed.
    pub fn seal(&self, frame: &Frame<'_>) -> Vec<u8> {
        let mut out = Vec::with_capacity(15 + 18 + frame.datagram.len() + MAC_LEN);
        out.extend_from_slice(MAGIC);
        out.push(match frame.kind {
            FrameKind::Forward => 1,
            FrameKind::Reply => 2,
            FrameKind::Release => 3,
        });
        out.push(frame.sender.0);
        out.extend_from_slice(&frame.sent_unix_ms.to_be_bytes());
        match frame.peer.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(6);
                out.extend_from_slice(&ip.octets());
            }
        }
        out.extend_from_slice(&frame.peer.port().to_be_bytes());
        out.extend_from_slice(frame.datagram);
        let mac = self.mac(&out);
        out.extend_from_slice(&mac);
        out
    }

    /// Opens `bytes`, received when the time was `now_unix_ms`, refusing frames further
    /// than `max_skew_ms` from it.
    pub fn open<'a>(&self, bytes: &'a [u8], now_unix_ms: u64, max_skew_ms: u64) -> Result<Frame<'a>, FrameError> {
        let body_len = bytes.len().checked_sub(MAC_LEN).ok_or(FrameError::Malformed)?;
        let (body, mac) = bytes.split_at(body_len);
        if body.len() < 15 || &body[..4] != MAGIC {
            return Err(FrameError::Malformed);
        }
        if !memcmp::eq(&self.mac(body), mac) {
            return Err(FrameError::Unauthentic);
        }
        let kind = match body[4] {
            1 => FrameKind::Forward,
            2 => FrameKind::Reply,
            3 => FrameKind::Release,
            _ => return Err(FrameError::Malformed),
        };
        let sent_unix_ms = u64::from_be_bytes(body[6..14].try_into().map_err(|_| FrameError::Malformed)?);
        let skew = now_unix_ms.abs_diff(sent_unix_ms);
        if skew > max_skew_ms {
            return Err(FrameError::Stale(skew));
        }
        let (ip, rest): (IpAddr, &[u8]) = match body[14] {
            4 if body.len() >= 15 + 6 => {
                let octets: [u8; 4] = body[15..19].try_into().map_err(|_| FrameError::Malformed)?;
                (IpAddr::V4(Ipv4Addr::from(octets)), &body[19..])
            }
            6 if body.len() >= 15 + 18 => {
                let octets: [u8; 16] = body[15..31].try_into().map_err(|_| FrameError::Malformed)?;
                (IpAddr::V6(Ipv6Addr::from(octets)), &body[31..])
            }
            _ => return Err(FrameError::Malformed),
        };
        let port = u16::from_be_bytes([rest[0], rest[1]]);
        Ok(Frame { kind, sender: NodeId(body[5]), sent_unix_ms, peer: SocketAddr::new(ip, port), datagram: &rest[2..] })
    }

    /// A secret of its own for `label`, derived from the key (HMAC-SHA256 of the label): the
    /// token nodes present to each other's HTTP API, say.
    pub fn derive(&self, label: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        if let Ok(full) = Signer::new(openssl::hash::MessageDigest::sha256(), &self.key)
            .and_then(|mut signer| signer.update(label).and_then(|()| signer.sign_to_vec()))
        {
            out.copy_from_slice(&full[..32]);
        }
        out
    }

    fn mac(&self, body: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = [0u8; MAC_LEN];
        // HMAC-SHA256 with a valid key does not fail; a zero MAC would only fail to verify.
        if let Ok(full) = Signer::new(openssl::hash::MessageDigest::sha256(), &self.key)
            .and_then(|mut signer| signer.update(body).and_then(|()| signer.sign_to_vec()))
        {
            mac.copy_from_slice(&full[..MAC_LEN]);
        }
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame<'a>(peer: &str, datagram: &'a [u8]) -> Frame<'a> {
        Frame {
            kind: FrameKind::Forward,
            sender: NodeId(3),
            sent_unix_ms: 1_800_000_000_000,
            peer: peer.parse().unwrap(),
            datagram,
        }
    }

    #[test]
    fn frames_round_trip_for_both_families_and_an_empty_datagram() {
        let key = ClusterKey::new(&[7; 32]).unwrap();
        for (peer, datagram) in [("192.0.2.1:5684", &b"record"[..]), ("[2001:db8::1]:40000", &b""[..])] {
            let sealed = key.seal(&frame(peer, datagram));
            assert_eq!(key.open(&sealed, 1_800_000_000_500, 30_000).unwrap(), frame(peer, datagram));
        }
        for kind in [FrameKind::Reply, FrameKind::Release] {
            let sealed = Frame { kind, ..frame("192.0.2.1:1", b"x") };
            assert_eq!(key.open(&key.seal(&sealed), 1_800_000_000_000, 0).unwrap().kind, kind);
        }
    }

    #[test]
    fn another_key_a_changed_byte_an_old_frame_and_garbage_are_refused() {
        let key = ClusterKey::new(&[7; 32]).unwrap();
        let sealed = key.seal(&frame("192.0.2.1:5684", b"record"));
        let now = 1_800_000_000_000;
        assert_eq!(ClusterKey::new(&[8; 32]).unwrap().open(&sealed, now, 30_000), Err(FrameError::Unauthentic));
        for i in 4..sealed.len() {
            let mut changed = sealed.clone();
            changed[i] ^= 1;
            assert!(key.open(&changed, now, 30_000).is_err(), "byte {i} changed");
        }
        assert_eq!(key.open(&sealed, now + 30_001, 30_000), Err(FrameError::Stale(30_001)));
        assert_eq!(key.open(&sealed[..40], now, 30_000), Err(FrameError::Unauthentic), "cut short");
        assert_eq!(key.open(&sealed[..20], now, 30_000), Err(FrameError::Malformed));
        assert_eq!(key.open(b"short", now, 30_000), Err(FrameError::Malformed));
        assert_eq!(
            ClusterKey::new(&[1; 15]).unwrap_err().to_string(),
            "a cluster key of 15 bytes: at least 16 random bytes"
        );
    }
}
