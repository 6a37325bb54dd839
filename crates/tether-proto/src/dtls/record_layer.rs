//! The record layer of an established session, in Rust: what OpenSSL hands over once its
//! handshake is done.
//!
//! It holds the traffic keys, the epoch, the write sequence number and the replay window,
//! the connection IDs (RFC 9146) if they were negotiated, and the last handshake flight
//! this side sent, to repeat it when the peer retransmits its own (RFC 6347 §4.2.4). It
//! protects application data and alerts, and authenticates everything that arrives:
//! records of another epoch, replays (§4.1.2.6), forgeries and garbage are dropped without
//! a word, as DTLS requires.
//!
//! Every parser here reads bytes a peer sent: nothing panics, nothing allocates more than
//! the datagram's size.

use super::cbc;
use super::config::{CipherSuite, Role};
use super::error::AlertDescription;
use super::keys::{DirectionKey, RecordCipher, TrafficKeys, EXPLICIT_NONCE_LEN};
use super::record::{self, ContentType, Record, DTLS_1_2, RECORD_HEADER_LEN};
use super::replay::ReplayWindow;

/// The largest record sequence number (48 bits).
pub const MAX_SEQUENCE: u64 = (1 << 48) - 1;

/// `seq_num_placeholder` of RFC 9146 §5: eight 0xff bytes in front of a CID record's AAD.
const SEQ_NUM_PLACEHOLDER: [u8; 8] = [0xff; 8];

/// Alert levels (RFC 5246 §7.2).
const WARNING: u8 = 1;
const FATAL: u8 = 2;
const CLOSE_NOTIFY: u8 = 0;

/// What an authenticated datagram carried that the session must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Inbound {
    /// Application data.
    Data(Vec<u8>),
    /// The peer sent close_notify.
    CloseNotify,
    /// The peer sent a fatal alert.
    FatalAlert(AlertDescription),
}

/// What handling one datagram did, besides its [`Inbound`] items.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DatagramOutcome {
    /// Records that failed to authenticate, were replays, or belonged to no epoch of ours.
    pub dropped: u32,
    /// Some record authenticated and was newer than every record before it: the condition
    /// of RFC 9146 §6 for following a peer to a new address.
    pub advanced: bool,
    /// The peer repeated a flight of its handshake: the cached last flight was re-sent.
    pub retransmitted: bool,
}

/// Why a record could not be sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SealError {
    /// The sequence numbers reserved durably are used up; a checkpoint must extend them.
    ReservationExhausted,
    /// The 48-bit sequence number space is used up; the session must end.
    SequenceExhausted,
}

/// The state of an established session's records. See the module docs.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct RecordLayer {
    pub(crate) role: Role,
    pub(crate) suite: CipherSuite,
    pub(crate) keys: TrafficKeys,
    pub(crate) epoch: u16,
    /// The next sequence number to write.
    pub(crate) write_sequence: u64,
    /// Sequence numbers at or above this are not used until a checkpoint moves it up.
    pub(crate) write_limit: u64,
    pub(crate) window: ReplayWindow,
    /// The peer's connection ID, written into every record sent; empty: plain records.
    pub(crate) send_cid: Box<[u8]>,
    /// This side's connection ID, expected in every record received; empty: plain records.
    pub(crate) recv_cid: Box<[u8]>,
    pub(crate) mtu: u16,
    pub(crate) extended_master_secret: bool,
    /// The session ID (for the resumption cache), `session_id_len` bytes of it.
    pub(crate) session_id: [u8; 32],
    pub(crate) session_id_len: u8,
    /// This side's last handshake flight, while the peer may still need it repeated.
    pub(crate) last_flight: Option<Box<[Box<[u8]>]>>,
}

impl std::fmt::Debug for RecordLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordLayer")
            .field("role", &self.role)
            .field("suite", &self.suite)
            .field("epoch", &self.epoch)
            .field("write_sequence", &self.write_sequence)
            .field("cid", &(!self.send_cid.is_empty(), !self.recv_cid.is_empty()))
            .finish_non_exhaustive()
    }
}

impl RecordLayer {
    /// The session ID the handshake established.
    pub(crate) fn session_id(&self) -> &[u8] {
        &self.session_id[..usize::from(self.session_id_len).min(32)]
    }

    fn kind(&self) -> RecordCipher {
        RecordCipher::of(self.suite)
    }

    fn write_key(&self) -> &DirectionKey {
        match self.role {
            Role::Client => &self.keys.client_write,
            Role::Server => &self.keys.server_write,
        }
    }

    fn read_key(&self) -> &DirectionKey {
        match self.role {
            Role::Client => &self.keys.server_write,
            Role::Server => &self.keys.client_write,
        }
    }

    /// The largest plaintext one record carries at the MTU.
    pub(crate) fn max_payload(&self) -> usize {
        let cid = if self.send_cid.is_empty() { 0 } else { self.send_cid.len() + 1 };
        usize::from(self.mtu).saturating_sub(RECORD_HEADER_LEN + cid + self.kind().overhead())
    }

    /// Protects application data into one record.
    pub(crate) fn seal_application_data(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        self.seal(ContentType::ApplicationData, plaintext)
    }

    /// Protects close_notify.
    pub(crate) fn seal_close_notify(&mut self) -> Result<Vec<u8>, SealError> {
        self.seal(ContentType::Alert, &[WARNING, CLOSE_NOTIFY])
    }

    fn seal(&mut self, content_type: ContentType, payload: &[u8]) -> Result<Vec<u8>, SealError> {
        let sequence = self.write_sequence;
        if sequence > MAX_SEQUENCE {
            return Err(SealError::SequenceExhausted);
        }
        if sequence >= self.write_limit {
            return Err(SealError::ReservationExhausted);
        }
        self.write_sequence += 1;
        let record =
            seal_record(self.kind(), self.write_key(), &self.send_cid, content_type, self.epoch, sequence, payload);
        Ok(record)
    }

    /// Authenticates and opens every record of `datagram`, appending what they carried to
    /// `out`. The cached last flight is re-sent (into `retransmit`) when the peer repeats its
    /// own last flight: once per repeated Finished, as OpenSSL does, so only the peer (not a
    /// spoofer of its address) can make this side send it.
    pub(crate) fn handle_datagram(
        &mut self,
        datagram: &[u8],
        out: &mut Vec<Inbound>,
        retransmit: &mut Vec<Vec<u8>>,
    ) -> DatagramOutcome {
        let mut outcome = DatagramOutcome::default();
        let cid_len = (!self.recv_cid.is_empty()).then_some(self.recv_cid.len());
        let Some(records) = record::parse_records_with_cid(datagram, cid_len) else {
            outcome.dropped += 1;
            return outcome;
        };
        let mut peer_repeated_flight = false;
        for r in &records {
            if r.epoch == 0 {
                // Plaintext after the handshake: the peer repeating its last flight (it did
                // not get ours), answered when its Finished arrives, authenticated, behind
                // it; or anyone's forgery.
                outcome.dropped += 1;
                continue;
            }
            let Some((content_type, plaintext, newest)) = self.open(r) else {
                outcome.dropped += 1;
                continue;
            };
            outcome.advanced |= newest;
            match content_type {
                ContentType::ApplicationData => {
                    // The peer is past its Finished: it will not need our flight again.
                    self.last_flight = None;
                    if !plaintext.is_empty() {
                        out.push(Inbound::Data(plaintext));
                    }
                }
                ContentType::Alert => {
                    // Alerts are two bytes each; a record may hold several.
                    for alert in plaintext.chunks_exact(2) {
                        match (alert[0], alert[1]) {
                            (_, CLOSE_NOTIFY) => out.push(Inbound::CloseNotify),
                            (FATAL, description) => out.push(Inbound::FatalAlert(AlertDescription(description))),
                            _ => {} // warnings other than close_notify change nothing
                        }
                    }
                }
                // The peer's Finished again: it is still waiting for our last flight. (Any
                // other handshake message would ask for renegotiation, which is off.)
                ContentType::Handshake => peer_repeated_flight = true,
                _ => {}
            }
        }
        if peer_repeated_flight {
            if let Some(flight) = &self.last_flight {
                retransmit.extend(flight.iter().map(|d| d.to_vec()));
                outcome.retransmitted = true;
            }
        }
        outcome
    }

    /// Opens one protected record of this session: returns its real content type, its
    /// plaintext and whether it was the newest record so far.
    fn open(&mut self, r: &Record<'_>) -> Option<(ContentType, Vec<u8>, bool)> {
        if r.epoch != self.epoch || r.version != DTLS_1_2 {
            return None;
        }
        // RFC 9146 §3: with a CID of ours, only tls12_cid records; without one, none.
        let expects_cid = !self.recv_cid.is_empty();
        if (r.content_type == ContentType::Tls12Cid) != expects_cid || r.cid != &*self.recv_cid {
            return None;
        }
        if !self.window.is_fresh(r.sequence) {
            return None;
        }
        let (content_type, plaintext) = open_record(self.kind(), self.read_key(), r)?;
        let newest = self.window.is_newest(r.sequence);
        self.window.mark(r.sequence);
        Some((content_type, plaintext, newest))
    }
}

/// Protects `payload` into one record: RFC 6347 with an empty `cid`, RFC 9146 `tls12_cid`
/// otherwise. The explicit nonce is the epoch and sequence number, unique under the key.
pub(crate) fn seal_record(
    kind: RecordCipher,
    key: &DirectionKey,
    cid: &[u8],
    content_type: ContentType,
    epoch: u16,
    sequence: u64,
    payload: &[u8],
) -> Vec<u8> {
    if kind == RecordCipher::CbcSha256 {
        // A CBC session never has a CID (see `super::cbc`): plain records only.
        let fragment = cbc::seal(key, content_type, epoch, sequence, payload).unwrap_or_default();
        let mut out = Vec::with_capacity(RECORD_HEADER_LEN + fragment.len());
        record::write_header(&mut out, content_type, epoch, sequence, &[], fragment.len());
        out.extend_from_slice(&fragment);
        return out;
    }
    let explicit_nonce = (u64::from(epoch) << 48) | sequence;
    let with_cid = !cid.is_empty();
    let inner_len = payload.len() + usize::from(with_cid);
    let fragment_len = EXPLICIT_NONCE_LEN + inner_len + kind.tag_len();
    let wire_type = if with_cid { ContentType::Tls12Cid } else { content_type };
    let mut out = Vec::with_capacity(RECORD_HEADER_LEN + cid.len() + fragment_len);
    record::write_header(&mut out, wire_type, epoch, sequence, cid, fragment_len);
    out.extend_from_slice(&explicit_nonce.to_be_bytes());
    let start = out.len();
    out.extend_from_slice(payload);
    if with_cid {
        // DTLSInnerPlaintext: the content, its real type, no padding.
        out.push(content_type.byte());
    }
    let aad = additional_data(content_type, epoch, sequence, cid, inner_len);
    let tag = key.seal(kind, explicit_nonce, aad.as_slice(), &mut out[start..]);
    out.extend_from_slice(&tag[..kind.tag_len()]);
    out
}

/// Authenticates and decrypts one protected record (either format) under `key`; returns its
/// real content type and plaintext.
pub(crate) fn open_record(kind: RecordCipher, key: &DirectionKey, r: &Record<'_>) -> Option<(ContentType, Vec<u8>)> {
    if kind == RecordCipher::CbcSha256 {
        if r.content_type == ContentType::Tls12Cid {
            return None;
        }
        return Some((r.content_type, cbc::open(key, r.content_type, r.epoch, r.sequence, r.fragment)?));
    }
    let fragment = r.fragment;
    if fragment.len() < kind.overhead() {
        return None;
    }
    let (nonce, rest) = fragment.split_at(EXPLICIT_NONCE_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - kind.tag_len());
    let explicit_nonce = u64::from_be_bytes(nonce.try_into().ok()?);
    let with_cid = r.content_type == ContentType::Tls12Cid;
    let claimed_type = if with_cid { ContentType::Tls12Cid } else { r.content_type };
    let aad = additional_data(claimed_type, r.epoch, r.sequence, r.cid, ciphertext.len());
    let mut plaintext = ciphertext.to_vec();
    key.open(kind, explicit_nonce, aad.as_slice(), &mut plaintext, tag).ok()?;
    if !with_cid {
        return Some((r.content_type, plaintext));
    }
    // DTLSInnerPlaintext: content, real type, zero padding.
    let type_at = plaintext.iter().rposition(|b| *b != 0)?;
    let real_type = ContentType::from_wire(plaintext[type_at])?;
    if real_type == ContentType::Tls12Cid {
        return None;
    }
    plaintext.truncate(type_at);
    Some((real_type, plaintext))
}

/// The AEAD's additional data: RFC 5246 §6.2.3.3 for plain records (`seq_num`, type,
/// version, plaintext length), RFC 9146 §5.3 for `tls12_cid` records (placeholder, type,
/// CID length, type, version, epoch, sequence number, CID, inner plaintext length).
fn additional_data(content_type: ContentType, epoch: u16, sequence: u64, cid: &[u8], length: usize) -> Aad {
    let mut aad = Aad::default();
    let epoch_and_sequence = ((u64::from(epoch) << 48) | sequence).to_be_bytes();
    if content_type == ContentType::Tls12Cid || !cid.is_empty() {
        aad.push(&SEQ_NUM_PLACEHOLDER);
        aad.push(&[ContentType::Tls12Cid.byte(), cid.len() as u8, ContentType::Tls12Cid.byte()]);
        aad.push(&DTLS_1_2.to_be_bytes());
        aad.push(&epoch_and_sequence);
        aad.push(cid);
    } else {
        aad.push(&epoch_and_sequence);
        aad.push(&[content_type.byte()]);
        aad.push(&DTLS_1_2.to_be_bytes());
    }
    aad.push(&(length as u16).to_be_bytes());
    aad
}

/// Additional data on the stack: at most 23 bytes plus a 255-byte CID.
struct Aad {
    bytes: [u8; 23 + 255],
    len: usize,
}

impl Default for Aad {
    fn default() -> Self {
        Self { bytes: [0; 23 + 255], len: 0 }
    }
}

impl Aad {
    fn push(&mut self, part: &[u8]) {
        let end = (self.len + part.len()).min(self.bytes.len());
        let n = end - self.len;
        self.bytes[self.len..end].copy_from_slice(&part[..n]);
        self.len = end;
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(cid: bool) -> (RecordLayer, RecordLayer) {
        let keys = TrafficKeys::derive(RecordCipher::Ccm8, &[7; 48], &[1; 32], &[2; 32]);
        let client_cid: Box<[u8]> = if cid { Box::new([0xc1, 0xc2]) } else { Box::new([]) };
        let server_cid: Box<[u8]> = if cid { Box::new([5, 6, 7, 8, 9, 10]) } else { Box::new([]) };
        let base = RecordLayer {
            role: Role::Client,
            suite: CipherSuite::PskAes128Ccm8,
            keys,
            epoch: 1,
            write_sequence: 1,
            write_limit: MAX_SEQUENCE + 1,
            window: ReplayWindow::default(),
            send_cid: server_cid.clone(),
            recv_cid: client_cid.clone(),
            mtu: 1200,
            extended_master_secret: true,
            session_id: [0; 32],
            session_id_len: 0,
            last_flight: None,
        };
        let server = RecordLayer { role: Role::Server, send_cid: client_cid, recv_cid: server_cid, ..base.clone() };
        (base, server)
    }

    fn deliver(to: &mut RecordLayer, datagram: &[u8]) -> (Vec<Inbound>, DatagramOutcome) {
        let mut out = Vec::new();
        let mut again = Vec::new();
        let outcome = to.handle_datagram(datagram, &mut out, &mut again);
        (out, outcome)
    }

    #[test]
    fn data_and_alerts_cross_in_both_formats() {
        for cid in [false, true] {
            let (mut client, mut server) = pair(cid);
            let record = client.seal_application_data(b"hello").unwrap();
            assert_eq!(record[0], if cid { 25 } else { 23 }, "cid {cid}");
            let (got, outcome) = deliver(&mut server, &record);
            assert_eq!(got, vec![Inbound::Data(b"hello".to_vec())]);
            assert!(outcome.advanced);
            let (again, outcome) = deliver(&mut server, &record);
            assert!(again.is_empty() && outcome.dropped == 1, "a replay is dropped");
            let close = server.seal_close_notify().unwrap();
            assert_eq!(deliver(&mut client, &close).0, vec![Inbound::CloseNotify]);
            let fatal = server.seal(ContentType::Alert, &[FATAL, 80]).unwrap();
            assert_eq!(deliver(&mut client, &fatal).0, vec![Inbound::FatalAlert(AlertDescription(80))]);
            assert_eq!(record.len(), RECORD_HEADER_LEN + client.send_cid.len() + 8 + 5 + usize::from(cid) + 8);
        }
    }

    #[test]
    fn every_bit_flip_and_truncation_is_dropped() {
        for cid in [false, true] {
            let (mut client, mut server) = pair(cid);
            let record = client.seal_application_data(b"a CoAP message").unwrap();
            for i in 0..record.len() {
                for bit in [0x01, 0x80] {
                    let mut bad = record.clone();
                    bad[i] ^= bit;
                    let (got, _) = deliver(&mut server, &bad);
                    assert!(got.is_empty(), "cid {cid}: flip at {i} surfaced {got:?}");
                }
            }
            for cut in 0..record.len() {
                assert!(deliver(&mut server, &record[..cut]).0.is_empty());
            }
            assert_eq!(deliver(&mut server, &record).0.len(), 1, "the genuine record still opens");
        }
    }

    #[test]
    fn records_in_the_wrong_format_or_epoch_are_dropped() {
        let (mut plain_client, mut plain_server) = pair(false);
        let (mut cid_client, mut cid_server) = pair(true);
        let plain = plain_client.seal_application_data(b"x").unwrap();
        let with_cid = cid_client.seal_application_data(b"x").unwrap();
        assert!(deliver(&mut cid_server, &plain).0.is_empty(), "a CID session refuses plain records");
        assert!(deliver(&mut plain_server, &with_cid).0.is_empty(), "a plain session refuses CID records");
        let mut other_epoch = plain_client.clone();
        other_epoch.epoch = 2;
        let record = other_epoch.seal_application_data(b"x").unwrap();
        assert!(deliver(&mut plain_server, &record).0.is_empty());
    }

    #[test]
    fn the_last_flight_is_repeated_for_a_repeated_finished_until_data_arrives() {
        let (mut client, mut server) = pair(false);
        server.last_flight = Some(vec![b"flight".to_vec().into_boxed_slice()].into_boxed_slice());
        let mut out = Vec::new();
        let mut again = Vec::new();
        // Plaintext handshake records (anyone can send them) make nothing go out.
        let plaintext_hello = record::fatal_alert(0, 3);
        let mut plaintext_hello = plaintext_hello.clone();
        plaintext_hello[0] = ContentType::Handshake.byte();
        server.handle_datagram(&plaintext_hello, &mut out, &mut again);
        assert!(again.is_empty());
        // The peer's Finished again, authenticated: the last flight, once.
        let finished = client.seal(ContentType::Handshake, b"finished").unwrap();
        server.handle_datagram(&finished, &mut out, &mut again);
        assert_eq!(again, vec![b"flight".to_vec()]);
        let data = client.seal_application_data(b"done").unwrap();
        server.handle_datagram(&data, &mut out, &mut again);
        assert!(server.last_flight.is_none(), "data means the peer has our flight");
    }

    #[test]
    fn the_write_limit_is_never_crossed() {
        let (mut client, _) = pair(false);
        client.write_limit = 3;
        assert!(client.seal_application_data(b"1").is_ok());
        assert!(client.seal_application_data(b"2").is_ok());
        assert_eq!(client.seal_application_data(b"3"), Err(SealError::ReservationExhausted));
        client.write_sequence = MAX_SEQUENCE + 1;
        client.write_limit = u64::MAX;
        assert_eq!(client.seal_application_data(b"4"), Err(SealError::SequenceExhausted));
    }

    #[test]
    fn max_payload_fills_the_mtu_exactly() {
        for cid in [false, true] {
            let (mut client, _) = pair(cid);
            let max = client.max_payload();
            let record = client.seal_application_data(&vec![0; max]).unwrap();
            assert_eq!(record.len(), 1200, "cid {cid}");
        }
    }
}
