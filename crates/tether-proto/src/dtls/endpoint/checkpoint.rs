//! Persisting an endpoint's established sessions: snapshots, restore, and checkpoints of
//! what changes while a session lives (its write-sequence reservation, its replay window,
//! its peer's address).
//!
//! The rule that keeps a restored session safe: a session only writes sequence numbers
//! below a limit that is on disk. A new session's first snapshot carries a limit a
//! reservation ahead (no row existed before it, so nothing can be restored from an older
//! one); from then on a limit moves up only when a checkpoint carrying it has been written
//! ([`Endpoint::checkpoint_written`]). A restored session starts writing at its stored
//! limit, so no sequence number, and no AEAD nonce, is ever used twice.

use std::net::SocketAddr;
use std::time::Instant;

use super::{Endpoint, Entry, SessionHandle};
use crate::dtls::session::Session;
use crate::dtls::snapshot::{SessionSnapshot, SnapshotError};

/// What a checkpoint stores for one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// The session.
    pub handle: SessionHandle,
    /// Its peer's address now.
    pub peer: SocketAddr,
    /// The write-sequence limit to store; the session may use it once it is stored.
    pub write_limit: u64,
    /// The replay window (next expected sequence number, bitmap).
    pub replay_window: (u64, u64),
}

/// A snapshot could not be restored into the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The handle is taken.
    #[error("session handle {0} is in use")]
    HandleInUse(SessionHandle),
    /// The endpoint holds `max_sessions` already.
    #[error("the endpoint is at its session limit")]
    SessionLimit,
    /// The snapshot's Connection ID is another session's, or of another length than the
    /// endpoint's.
    #[error("the snapshot's connection id is in use or of the wrong length")]
    ConnectionId,
    /// The snapshot itself was refused.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl Endpoint {
    /// The snapshot of an established session, to persist (keys included: store it where
    /// only this server reads it).
    pub fn snapshot(&self, handle: SessionHandle) -> Option<SessionSnapshot> {
        self.sessions.get(&handle)?.session.snapshot()
    }

    /// Brings back an established session from a snapshot, under the same handle, at
    /// `peer`, with no handshake. With a sequence reservation configured it writes nothing
    /// until the next [`checkpoint`](Self::checkpoint) is written; restore every session,
    /// then checkpoint once, before serving.
    pub fn restore(
        &mut self,
        now: Instant,
        handle: SessionHandle,
        peer: SocketAddr,
        snapshot: &SessionSnapshot,
    ) -> Result<(), RestoreError> {
        if self.sessions.contains_key(&handle) {
            return Err(RestoreError::HandleInUse(handle));
        }
        if self.sessions.len() >= self.config.max_sessions {
            return Err(RestoreError::SessionLimit);
        }
        let cid = match snapshot.connection_id() {
            None => None,
            Some(cid) if cid.len() == usize::from(self.config.cid_len()) => {
                let key = crate::dtls::cid::cid_number(cid);
                if self.cids.contains_key(&key) {
                    return Err(RestoreError::ConnectionId);
                }
                Some(key)
            }
            Some(_) => return Err(RestoreError::ConnectionId),
        };
        let mut session = Session::restore(&self.context, now, snapshot)?;
        if self.config.sequence_reservation.is_none() {
            session.extend_write_limit(u64::MAX);
        }
        if let Some(cid) = cid {
            self.cids.insert(cid, handle);
        }
        let entry = Entry {
            session,
            peer,
            client_random: Default::default(),
            timer: None,
            established: true,
            cid,
            dirty: false,
            started: now,
        };
        let identity = entry.session.peer_identity().cloned();
        self.sessions.insert(handle, Box::new(entry));
        self.last_now = now;
        if let Some(displaced) = self.peers.entry(peer).or_default().established.replace(handle) {
            self.remove(displaced, crate::dtls::CloseReason::Replaced);
        }
        let per_identity = self.config.max_sessions_per_identity;
        for old in self.admission.established(handle, peer.ip(), identity.as_ref(), per_identity) {
            if let Some(entry) = self.sessions.get_mut(&old) {
                entry.session.close_because(now, crate::dtls::CloseReason::Superseded);
                self.drain(old);
            }
        }
        if self.config.handles.holds(handle) {
            self.next_handle = self.next_handle.max(handle.0 + 1);
        }
        self.stats.sessions_restored += 1;
        self.mark_dirty(handle);
        self.checkpoint_urgent = true;
        Ok(())
    }

    /// Ends a stored session that must not be restored (its store was put back from an
    /// older copy, so it may have used sequence numbers and seen records since): its peer at
    /// `peer` is sent a close_notify sealed at the last sequence number, which the session
    /// cannot have used, so the device learns at once to handshake again, and no nonce is
    /// reused. Nothing of the session stays in the endpoint.
    pub fn farewell(&mut self, now: Instant, peer: SocketAddr, snapshot: &SessionSnapshot) -> Result<(), RestoreError> {
        let mut session = Session::restore(&self.context, now, &snapshot.at_last_sequence())?;
        session.extend_write_limit(u64::MAX);
        session.close(now);
        while let Some(transmit) = session.poll_transmit() {
            self.transmits.push_back(super::EndpointTransmit { destination: peer, contents: transmit.contents });
        }
        Ok(())
    }

    /// True when a session is about to run out of reserved sequence numbers (or a restored
    /// one has none yet): checkpoint now rather than at the next periodic checkpoint.
    pub fn checkpoint_due(&self) -> bool {
        self.checkpoint_urgent
    }

    /// Sessions whose state changed since the last checkpoint.
    pub fn dirty_sessions(&self) -> usize {
        self.dirty.len()
    }

    /// What to store for every session that changed since the last checkpoint. The new
    /// write limits take effect when [`checkpoint_written`](Self::checkpoint_written) says
    /// they are stored.
    pub fn checkpoint(&mut self) -> Vec<Checkpoint> {
        self.checkpoint_urgent = false;
        let reservation = self.config.sequence_reservation;
        let mut out = Vec::with_capacity(self.dirty.len());
        for handle in std::mem::take(&mut self.dirty) {
            let Some(entry) = self.sessions.get_mut(&handle) else { continue };
            entry.dirty = false;
            let (Some((next, limit)), Some(window)) = (entry.session.write_sequence(), entry.session.replay_window())
            else {
                continue;
            };
            let write_limit = reservation.map_or(limit, |r| limit.max(next.saturating_add(r)));
            out.push(Checkpoint { handle, peer: entry.peer, write_limit, replay_window: window });
        }
        out
    }

    /// Marks every established session for the next [`checkpoint`](Self::checkpoint): a
    /// node handing its sessions over to another writes them all as they are.
    pub fn checkpoint_all(&mut self) {
        let handles: Vec<SessionHandle> = self.sessions.keys().copied().collect();
        for handle in handles {
            self.mark_dirty(handle);
        }
    }

    /// The checkpoints are stored: their write limits may be used.
    pub fn checkpoint_written(&mut self, written: &[Checkpoint]) {
        for checkpoint in written {
            if let Some(entry) = self.sessions.get_mut(&checkpoint.handle) {
                entry.session.extend_write_limit(checkpoint.write_limit);
            }
        }
    }
}
