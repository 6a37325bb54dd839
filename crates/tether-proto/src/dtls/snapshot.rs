//! An established session's compact state, as bytes: what a restarted server needs to go
//! on serving the session without a handshake.
//!
//! The encoding is tether's own, versioned and fixed-layout (a session is a few hundred
//! bytes, no schema evolves faster than the version byte). It holds key material: store it
//! where only the server can read it, and never log it (`Debug` shows no keys).

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use super::config::{CipherSuite, DtlsContext, Role};
use super::keys::{DirectionKey, TrafficKeys};
use super::record_layer::{RecordLayer, MAX_SEQUENCE};
use super::replay::ReplayWindow;
use super::session::{PeerIdentity, Session};

const VERSION: u8 = 1;

/// The state of an established session, to persist and restore.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionSnapshot {
    /// The record layer, without the last flight (a restored session's handshake is long
    /// over).
    pub(crate) layer: RecordLayer,
    pub(crate) identity: Option<PeerIdentity>,
    /// OpenSSL's DER of the session, for resumption after a restart.
    pub(crate) resumption: Option<Vec<u8>>,
}

impl fmt::Debug for SessionSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionSnapshot")
            .field("role", &self.layer.role)
            .field("suite", &self.layer.suite)
            .field("identity", &self.identity)
            .field("write_limit", &self.layer.write_limit)
            .finish_non_exhaustive()
    }
}

/// A snapshot could not be decoded or restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The bytes are not a snapshot of a version this build reads.
    #[error("not a session snapshot this version reads: {0}")]
    Malformed(&'static str),
    /// The snapshot's role differs from the context's (a client snapshot given to a server).
    #[error("the snapshot is of a {0:?} session")]
    WrongRole(Role),
}

impl SessionSnapshot {
    pub(crate) fn of(layer: &RecordLayer, identity: Option<&PeerIdentity>, resumption: Option<Vec<u8>>) -> Self {
        let layer = RecordLayer { last_flight: None, ..layer.clone() };
        Self { layer, identity: identity.cloned(), resumption }
    }

    /// The authenticated peer.
    pub fn identity(&self) -> Option<&PeerIdentity> {
        self.identity.as_ref()
    }

    /// This side's Connection ID, if the session has one.
    pub fn connection_id(&self) -> Option<&[u8]> {
        Some(&self.layer.recv_cid[..]).filter(|cid| !cid.is_empty())
    }

    /// The write-sequence limit: every sequence number below it may have been used. Above
    /// 2^48 when the session reserved none (its sequence numbers were not persisted).
    pub fn write_limit(&self) -> u64 {
        self.layer.write_limit.max(self.layer.write_sequence)
    }

    /// Where a restored session starts writing: at its limit when it had a reservation, so
    /// no sequence number is used twice; otherwise at the sequence number of the moment the
    /// snapshot was taken, which is safe only if the session sent nothing after it.
    fn restart_sequence(&self) -> u64 {
        let l = &self.layer;
        if l.write_limit > MAX_SEQUENCE {
            l.write_sequence
        } else {
            l.write_limit.max(l.write_sequence)
        }
    }

    /// This snapshot set to write its next record at the very last sequence number, which
    /// no session ever reaches: one record may be sealed under it (a farewell) whatever
    /// sequence numbers the session used after the snapshot was stored.
    pub(crate) fn at_last_sequence(&self) -> Self {
        let mut last = self.clone();
        last.layer.write_limit = MAX_SEQUENCE;
        last.layer.write_sequence = last.layer.write_sequence.min(MAX_SEQUENCE);
        last
    }

    /// Moves the persisted write limit and replay window forward (a checkpoint applied to
    /// a stored snapshot).
    pub fn advance(&mut self, write_limit: u64, window: (u64, u64)) {
        self.layer.write_limit = self.layer.write_limit.max(write_limit);
        if window.0 >= self.layer.window.next() {
            self.layer.window = ReplayWindow::from_parts(window.0, window.1);
        }
    }

    /// The bytes to store.
    pub fn encode(&self) -> Vec<u8> {
        let l = &self.layer;
        let mut out = Vec::with_capacity(160);
        out.push(VERSION);
        out.push(match l.role {
            Role::Client => 0,
            Role::Server => 1,
        });
        out.extend_from_slice(&l.suite.iana().to_be_bytes());
        out.extend_from_slice(&l.epoch.to_be_bytes());
        out.extend_from_slice(&l.write_sequence.to_be_bytes());
        out.extend_from_slice(&l.write_limit.to_be_bytes());
        let (next, seen) = l.window.parts();
        out.extend_from_slice(&next.to_be_bytes());
        out.extend_from_slice(&seen.to_be_bytes());
        for key in [&l.keys.client_write, &l.keys.server_write] {
            out.extend_from_slice(&key.key);
            out.extend_from_slice(&key.salt);
            // A CBC suite's MAC key follows its write key (the suite says whether it is there).
            if let Some(mac) = &key.mac {
                out.extend_from_slice(&mac[..]);
            }
        }
        put_short(&mut out, &l.send_cid);
        put_short(&mut out, &l.recv_cid);
        out.extend_from_slice(&l.mtu.to_be_bytes());
        out.push(u8::from(l.extended_master_secret));
        put_short(&mut out, l.session_id());
        match &self.identity {
            None => out.push(0),
            Some(PeerIdentity::Psk(id)) => {
                out.push(1);
                put_long(&mut out, id);
            }
            Some(PeerIdentity::Certificate { common_name }) => {
                out.push(2);
                put_long(&mut out, common_name.as_bytes());
            }
        }
        put_long(&mut out, self.resumption.as_deref().unwrap_or_default());
        out
    }

    /// Reads bytes written by [`encode`](Self::encode).
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let mut r = Reader(bytes);
        if r.u8()? != VERSION {
            return Err(SnapshotError::Malformed("unknown version"));
        }
        let role = match r.u8()? {
            0 => Role::Client,
            1 => Role::Server,
            _ => return Err(SnapshotError::Malformed("role")),
        };
        let suite = CipherSuite::from_iana(r.u16()?).ok_or(SnapshotError::Malformed("cipher suite"))?;
        let epoch = r.u16()?;
        let write_sequence = r.u64()?;
        let write_limit = r.u64()?;
        let window = ReplayWindow::from_parts(r.u64()?, r.u64()?);
        let cbc = suite.is_cbc();
        let mut key = || -> Result<DirectionKey, SnapshotError> {
            let key = r.take(16)?.try_into().map_err(|_| SnapshotError::Malformed("key"))?;
            let salt = r.take(4)?.try_into().map_err(|_| SnapshotError::Malformed("salt"))?;
            let mac = match cbc {
                true => Some(Box::new(r.take(32)?.try_into().map_err(|_| SnapshotError::Malformed("MAC key"))?)),
                false => None,
            };
            Ok(DirectionKey { key, salt, mac })
        };
        let keys = TrafficKeys { client_write: key()?, server_write: key()? };
        let send_cid = r.short()?;
        let recv_cid = r.short()?;
        let mtu = r.u16()?;
        let extended_master_secret = r.u8()? != 0;
        let session_id = r.short()?;
        let identity = match r.u8()? {
            0 => None,
            1 => Some(PeerIdentity::Psk(r.long()?.to_vec())),
            2 => Some(PeerIdentity::Certificate {
                common_name: String::from_utf8(r.long()?.to_vec()).map_err(|_| SnapshotError::Malformed("name"))?,
            }),
            _ => return Err(SnapshotError::Malformed("identity")),
        };
        let resumption = Some(r.long()?.to_vec()).filter(|der| !der.is_empty());
        if !r.0.is_empty() {
            return Err(SnapshotError::Malformed("trailing bytes"));
        }
        if epoch == 0 || write_sequence > MAX_SEQUENCE + 1 || session_id.len() > 32 || mtu < 256 {
            return Err(SnapshotError::Malformed("out of range"));
        }
        let mut id = [0u8; 32];
        id[..session_id.len()].copy_from_slice(session_id);
        let layer = RecordLayer {
            role,
            suite,
            keys,
            epoch,
            write_sequence,
            write_limit,
            window,
            send_cid: send_cid.into(),
            recv_cid: recv_cid.into(),
            mtu,
            extended_master_secret,
            session_id: id,
            session_id_len: session_id.len() as u8,
            last_flight: None,
        };
        Ok(Self { layer, identity, resumption })
    }
}

impl Session {
    /// The state of an established session, to persist: keys, sequence numbers, replay
    /// window, Connection IDs, the peer's identity and (for a server) what resuming the
    /// session later needs. `None` unless established.
    pub fn snapshot(&self) -> Option<SessionSnapshot> {
        if !self.is_established() {
            return None;
        }
        let layer = self.record_layer()?;
        let resumption = self.context().resumption_entry(layer.session_id());
        Some(SessionSnapshot::of(layer, self.peer_identity(), resumption))
    }

    /// An established session from a snapshot, with no handshake. It writes from the
    /// snapshot's write limit on, so no sequence number (and no AEAD nonce) is used twice,
    /// and sends nothing until [`Session::extend_write_limit`] reserves more. (A session
    /// that reserved nothing restarts where the snapshot was taken: restore such a snapshot
    /// only if the session sent nothing after it.) The
    /// snapshot's resumption entry goes back into the context's cache.
    pub fn restore(
        context: &Arc<DtlsContext>,
        now: Instant,
        snapshot: &SessionSnapshot,
    ) -> Result<Session, SnapshotError> {
        let l = &snapshot.layer;
        if l.role != context.role() {
            return Err(SnapshotError::WrongRole(l.role));
        }
        let start = snapshot.restart_sequence();
        let layer = RecordLayer { write_sequence: start, write_limit: start, ..l.clone() };
        if let Some(der) = &snapshot.resumption {
            context.insert_resumption_entry(l.session_id(), der.clone());
        }
        Ok(Session::established(context, layer, snapshot.identity.clone(), now))
    }

    /// Allows writing up to (not including) sequence number `limit`; it never moves down.
    pub fn extend_write_limit(&mut self, limit: u64) {
        if let Some(layer) = self.record_layer_mut() {
            layer.write_limit = layer.write_limit.max(limit.min(MAX_SEQUENCE + 1));
        }
    }

    /// Sets the write limit outright (a session that starts reserving).
    pub(crate) fn set_write_limit(&mut self, limit: u64) {
        if let Some(layer) = self.record_layer_mut() {
            layer.write_limit = limit.min(MAX_SEQUENCE + 1);
        }
    }

    /// The next write sequence number and the limit it may not reach, once established.
    pub fn write_sequence(&self) -> Option<(u64, u64)> {
        self.record_layer().map(|l| (l.write_sequence, l.write_limit))
    }

    /// The replay window as (next expected sequence number, bitmap), once established.
    pub fn replay_window(&self) -> Option<(u64, u64)> {
        self.record_layer().map(|l| l.window.parts())
    }
}

fn put_short(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(bytes.len().min(255) as u8);
    out.extend_from_slice(&bytes[..bytes.len().min(255)]);
}

fn put_long(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&bytes[..len]);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if self.0.len() < n {
            return Err(SnapshotError::Malformed("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, SnapshotError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().map_err(|_| SnapshotError::Malformed("truncated"))?))
    }

    fn short(&mut self) -> Result<&'a [u8], SnapshotError> {
        let n = usize::from(self.u8()?);
        self.take(n)
    }

    fn long(&mut self) -> Result<&'a [u8], SnapshotError> {
        let n = usize::from(self.u16()?);
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SessionSnapshot {
        SessionSnapshot {
            layer: RecordLayer {
                role: Role::Server,
                suite: CipherSuite::PskAes128Ccm8,
                keys: TrafficKeys::derive(crate::dtls::keys::RecordCipher::Ccm8, &[3; 48], &[1; 32], &[2; 32]),
                epoch: 1,
                write_sequence: 17,
                write_limit: 65_553,
                window: ReplayWindow::from_parts(9, 0b1011),
                send_cid: Box::default(),
                recv_cid: Box::new([1, 2, 3, 4, 5, 6]),
                mtu: 1200,
                extended_master_secret: true,
                session_id: [9; 32],
                session_id_len: 32,
                last_flight: None,
            },
            identity: Some(PeerIdentity::Psk(b"device-7".to_vec())),
            resumption: Some(vec![0x30, 0x82, 1, 2]),
        }
    }

    #[test]
    fn a_snapshot_round_trips_and_its_debug_shows_no_keys() {
        let snapshot = sample();
        let bytes = snapshot.encode();
        assert_eq!(SessionSnapshot::decode(&bytes).unwrap(), snapshot);
        let shown = format!("{snapshot:?}");
        assert!(shown.contains("Psk") && !shown.contains("keys") && !shown.contains("salt"), "{shown}");
        assert_eq!(snapshot.write_limit(), 65_553);
        assert_eq!(snapshot.connection_id(), Some(&[1, 2, 3, 4, 5, 6][..]));
    }

    #[test]
    fn every_truncation_and_corruption_is_refused_without_panicking() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(SessionSnapshot::decode(&bytes[..len]).is_err(), "len {len}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(SessionSnapshot::decode(&longer).is_err());
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0xff;
            let _ = SessionSnapshot::decode(&bad); // may decode to other values; must not panic
        }
        let mut other_version = bytes;
        other_version[0] = 9;
        assert_eq!(SessionSnapshot::decode(&other_version), Err(SnapshotError::Malformed("unknown version")));
    }

    #[test]
    fn advancing_never_moves_backwards() {
        let mut snapshot = sample();
        snapshot.advance(10, (5, 0));
        assert_eq!(snapshot.write_limit(), 65_553);
        assert_eq!(snapshot.layer.window.parts(), (9, 0b1011));
        snapshot.advance(100_000, (20, 1));
        assert_eq!(snapshot.write_limit(), 100_000);
        assert_eq!(snapshot.layer.window.parts(), (20, 1));
    }
}
