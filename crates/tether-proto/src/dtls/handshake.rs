//! The handshake phase of a session: OpenSSL over a datagram pipe, until it hands the
//! established session over to the Rust [`RecordLayer`].
//!
//! OpenSSL performs every handshake (full and abbreviated, PSK and ECDHE-ECDSA, cookies,
//! retransmissions). Around it this module does three things OpenSSL cannot:
//!
//! - It re-seals every encrypted record OpenSSL writes (the Finished message) with the
//!   explicit nonce tether uses for every later record, the epoch and sequence number. So all
//!   nonces under a key follow one rule and can never collide (OpenSSL's GCM nonces start at
//!   a random value), and every handshake checks that the keys tether derived are the ones
//!   OpenSSL uses: a record that does not open under them ends the handshake.
//! - With a Connection ID negotiated (RFC 9146, through OpenSSL's custom-extension API), it
//!   writes those records as `tls12_cid` records, and turns the peer's `tls12_cid` records
//!   back into records OpenSSL reads.
//! - It keeps the encrypted records the peer sent during the handshake, so the record layer's
//!   replay window starts where OpenSSL's ended, and the datagrams of this side's last
//!   flight, so the record layer can repeat them.

use std::collections::VecDeque;
use std::io;

use openssl::nid::Nid;
use openssl::ssl::{ErrorCode, Ssl, SslRef, SslSession, SslStream};

use super::config::{connection_id_index, CipherSuite, ConnectionIds, Role};
use super::error::{AlertDescription, CloseReason};
use super::ffi;
use super::keys::{RecordCipher, TrafficKeys, MASTER_SECRET_LEN, RANDOM_LEN};
use super::record::{self, ContentType, Record};
use super::record_layer::{open_record, seal_record, RecordLayer, MAX_SEQUENCE};
use super::replay::ReplayWindow;
use super::session::PeerIdentity;

/// Encrypted records of the peer kept during a handshake, at most.
const PEER_RECORDS_KEPT: usize = 16;

/// OpenSSL running one handshake.
pub(crate) struct Handshake {
    stream: SslStream<DatagramPipe>,
    role: Role,
    /// The peer's encrypted records as OpenSSL read them, for the replay window.
    peer_records: Vec<Vec<u8>>,
    /// The next epoch-1 sequence number after those OpenSSL wrote.
    next_write_sequence: u64,
    /// The datagrams of the most recent OpenSSL call that wrote any: on completion, this
    /// side's last flight if it sent the last flight.
    last_written: Vec<Vec<u8>>,
}

/// How a call into OpenSSL went.
pub(crate) enum Progress {
    /// More messages are needed.
    Continue,
    /// The handshake completed in this call.
    Complete,
    /// It failed.
    Failed(CloseReason),
}

/// What an established handshake hands to the session.
pub(crate) struct HandOff {
    pub(crate) layer: RecordLayer,
    pub(crate) identity: Option<PeerIdentity>,
    pub(crate) resumed: bool,
    /// A client's session, to offer for resumption later.
    pub(crate) saved: Option<SslSession>,
    /// A server's session in DER form, for the resumption cache, with its ID.
    pub(crate) resumption: Option<(Vec<u8>, Vec<u8>)>,
}

impl Handshake {
    pub(crate) fn new(ssl: Ssl, role: Role) -> Result<Self, openssl::error::ErrorStack> {
        let stream = SslStream::new(ssl, DatagramPipe::default())?;
        Ok(Self { stream, role, peer_records: Vec::new(), next_write_sequence: 0, last_written: Vec::new() })
    }

    pub(crate) fn ssl(&self) -> &SslRef {
        self.stream.ssl()
    }

    /// The negotiated Connection IDs (this side's, the peer's), once both hellos are
    /// exchanged and both sides agreed to use them.
    pub(crate) fn connection_ids(&self) -> Option<(&[u8], &[u8])> {
        let ids: &ConnectionIds = self.ssl().ex_data(connection_id_index())?;
        Some((ids.ours.as_deref()?, ids.peer.as_deref()?))
    }

    /// The length of the CID the peer puts in its records, if it puts one.
    pub(crate) fn expected_cid_len(&self) -> Option<usize> {
        self.connection_ids().map(|(ours, _)| ours.len()).filter(|n| *n > 0)
    }

    /// Hands one datagram (or a run of records of one) to OpenSSL's read side.
    pub(crate) fn deliver(&mut self, chunk: &[u8]) {
        // The newest few: the peer's Finished is among what completes the handshake, so
        // records injected earlier cannot push it out.
        if let Some(records) = record::parse_records(chunk) {
            for r in records.iter().filter(|r| r.epoch > 0) {
                if self.peer_records.len() == PEER_RECORDS_KEPT {
                    self.peer_records.remove(0);
                }
                self.peer_records.push(r.raw.to_vec());
            }
        }
        self.stream.get_mut().deliver(chunk);
    }

    /// Discards what OpenSSL left unread of the last datagram.
    pub(crate) fn clear_input(&mut self) {
        self.stream.get_mut().incoming = None;
    }

    /// Lets OpenSSL advance the handshake; its datagrams go to `out`.
    pub(crate) fn drive(&mut self, out: &mut VecDeque<Vec<u8>>) -> Progress {
        let result = self.stream.do_handshake();
        if let Err(reason) = self.collect_output(out) {
            return Progress::Failed(reason);
        }
        match result {
            Ok(()) => Progress::Complete,
            Err(err) if err.code() == ErrorCode::WANT_READ || err.code() == ErrorCode::WANT_WRITE => Progress::Continue,
            Err(err) => Progress::Failed(classify_failure(self.ssl(), Some(&err))),
        }
    }

    /// Runs OpenSSL's retransmission timer; true if it re-sent a flight.
    pub(crate) fn handle_timeout(&mut self, out: &mut VecDeque<Vec<u8>>) -> Result<bool, CloseReason> {
        let fired = match ffi::handle_dtls_timeout(self.ssl()) {
            Ok(fired) => fired,
            Err(()) => return Err(classify_failure(self.ssl(), None)),
        };
        self.collect_output(out)?;
        Ok(fired)
    }

    /// Time left on OpenSSL's retransmission timer (wall clock).
    pub(crate) fn retransmit_timer(&self) -> Option<std::time::Duration> {
        ffi::dtls_timeout(self.ssl())
    }

    /// True if OpenSSL has read the peer's ChangeCipherSpec and waits for its Finished.
    pub(crate) fn awaits_finished(&self) -> bool {
        // SSL_state_string: "TRCCS" is TLS_ST_{CR,SR}_CHANGE (ChangeCipherSpec read).
        self.ssl().state_string() == "TRCCS"
    }

    /// A plaintext fatal alert, for a failure OpenSSL would only time out on.
    pub(crate) fn fatal_alert(&self, alert: AlertDescription) -> Vec<u8> {
        record::fatal_alert(alert.0, self.stream.get_ref().next_epoch0_sequence)
    }

    /// The suite OpenSSL chose, once the ServerHello is through.
    pub(crate) fn cipher_suite(&self) -> Option<CipherSuite> {
        CipherSuite::from_openssl_name(self.ssl().current_cipher()?.name())
    }

    /// Turns a peer's `tls12_cid` record into the plain record OpenSSL reads (same key,
    /// epoch and sequence number). `None` if it does not authenticate or no keys exist yet.
    pub(crate) fn translate_incoming(&self, r: &Record<'_>) -> Option<Vec<u8>> {
        let kind = RecordCipher::of(self.cipher_suite()?);
        let keys = derive_keys(self.ssl(), kind)?;
        let key = match self.role {
            Role::Client => &keys.server_write,
            Role::Server => &keys.client_write,
        };
        let (content_type, plaintext) = open_record(kind, key, r)?;
        Some(seal_record(kind, key, &[], content_type, r.epoch, r.sequence, &plaintext))
    }

    /// Reads what OpenSSL buffered behind the peer's Finished (application data, alerts)
    /// before the session leaves OpenSSL.
    pub(crate) fn drain(&mut self) -> (Vec<Vec<u8>>, Option<CloseReason>) {
        let mut data = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.stream.ssl_read(&mut buf) {
                Ok(0) => return (data, None),
                Ok(n) => data.push(buf[..n].to_vec()),
                Err(err) if err.code() == ErrorCode::WANT_READ => return (data, None),
                Err(err) if err.code() == ErrorCode::ZERO_RETURN => return (data, Some(CloseReason::PeerClosed)),
                Err(err) => {
                    let reason = match alert_in(&err) {
                        Some(alert) => CloseReason::AlertReceived(alert),
                        None => CloseReason::Protocol(describe(&err)),
                    };
                    return (data, Some(reason));
                }
            }
        }
    }

    /// Takes the established session out of OpenSSL. `last_flight` says whether this side
    /// sent the handshake's last flight (then it keeps it, to repeat).
    pub(crate) fn finish(&self, mtu: u16, last_flight: bool) -> Result<HandOff, CloseReason> {
        let internal = |what: &str| CloseReason::Protocol(format!("record layer hand-off: {what}"));
        let ssl = self.ssl();
        let suite = self.cipher_suite().ok_or_else(|| internal("unknown cipher suite"))?;
        let kind = RecordCipher::of(suite);
        let keys = derive_keys(ssl, kind).ok_or_else(|| internal("no master secret"))?;
        if kind == RecordCipher::CbcSha256 && self.connection_ids().is_some() {
            return Err(internal(
                "a CBC suite with a connection ID (tether protects CID records with AEAD suites only)",
            ));
        }
        let (recv_cid, send_cid) = match self.connection_ids() {
            Some((ours, peer)) => (Box::from(ours), Box::from(peer)),
            None => (Box::default(), Box::default()),
        };
        let read_key = match self.role {
            Role::Client => &keys.server_write,
            Role::Server => &keys.client_write,
        };
        // The replay window starts with the peer's records OpenSSL accepted; the
        // unauthenticated ones (a forgery slipped in during the handshake) mark nothing.
        let mut window = ReplayWindow::default();
        let mut peer_finished_opened = false;
        for raw in &self.peer_records {
            let Some(records) = record::parse_records(raw) else { continue };
            for r in records.iter().filter(|r| r.epoch == 1) {
                if let Some((content_type, _)) = open_record(kind, read_key, r) {
                    window.mark(r.sequence);
                    peer_finished_opened |= content_type == ContentType::Handshake;
                }
            }
        }
        if !peer_finished_opened {
            return Err(internal("the peer's Finished does not open under the derived keys"));
        }
        let session = ssl.session().ok_or_else(|| internal("no session"))?;
        let id = session.id();
        let mut session_id = [0u8; 32];
        session_id[..id.len().min(32)].copy_from_slice(&id[..id.len().min(32)]);
        let layer = RecordLayer {
            role: self.role,
            suite,
            keys,
            epoch: 1,
            write_sequence: self.next_write_sequence,
            write_limit: MAX_SEQUENCE + 1,
            window,
            send_cid,
            recv_cid,
            mtu,
            extended_master_secret: ssl.extms_support().unwrap_or(false),
            session_id,
            session_id_len: id.len().min(32) as u8,
            last_flight: last_flight.then(|| self.last_written.iter().map(|d| d.clone().into_boxed_slice()).collect()),
        };
        let resumption = match self.role {
            Role::Server => session.to_der().ok().map(|der| (id.to_vec(), der)),
            Role::Client => None,
        };
        let saved = (self.role == Role::Client).then(|| session.to_owned());
        let hand_off = HandOff {
            identity: peer_identity(ssl, self.role),
            resumed: ssl.session_reused(),
            layer,
            saved,
            resumption,
        };
        // Freed without a shutdown, the session would count as broken: a client could not
        // offer it again.
        ffi::mark_shut_down(ssl);
        Ok(hand_off)
    }

    /// Moves OpenSSL's datagrams to `out`, re-sealing its encrypted records (see the module
    /// docs).
    fn collect_output(&mut self, out: &mut VecDeque<Vec<u8>>) -> Result<(), CloseReason> {
        if self.stream.get_ref().outgoing.is_empty() {
            return Ok(());
        }
        self.last_written.clear();
        let mtu = usize::from(self.stream.get_ref().mtu);
        while let Some(datagram) = self.stream.get_mut().outgoing.pop_front() {
            let Some(records) = record::parse_records(&datagram) else {
                self.push_written(out, datagram);
                continue;
            };
            if records.iter().all(|r| r.epoch == 0) {
                self.push_written(out, datagram);
                continue;
            }
            let mut resealed = Vec::with_capacity(records.len());
            for r in &records {
                if r.epoch == 0 {
                    resealed.push(r.raw.to_vec());
                    continue;
                }
                resealed.push(self.reseal(r)?);
                self.next_write_sequence = self.next_write_sequence.max(r.sequence + 1);
            }
            // A CID makes records longer: pack them into datagrams within the MTU again.
            let mut current = Vec::new();
            for r in resealed {
                if !current.is_empty() && current.len() + r.len() > mtu {
                    self.push_written(out, std::mem::take(&mut current));
                }
                current.extend_from_slice(&r);
            }
            self.push_written(out, current);
        }
        Ok(())
    }

    fn push_written(&mut self, out: &mut VecDeque<Vec<u8>>, datagram: Vec<u8>) {
        self.last_written.push(datagram.clone());
        out.push_back(datagram);
    }

    /// One of OpenSSL's encrypted records, opened with tether's derived keys and sealed again
    /// with tether's nonce rule (and the peer's CID, if one was negotiated).
    fn reseal(&self, r: &Record<'_>) -> Result<Vec<u8>, CloseReason> {
        let mismatch = || CloseReason::Protocol("record layer hand-off: derived keys do not match OpenSSL's".into());
        let suite = self.cipher_suite().ok_or_else(mismatch)?;
        let kind = RecordCipher::of(suite);
        let keys = derive_keys(self.ssl(), kind).ok_or_else(mismatch)?;
        let key = match self.role {
            Role::Client => &keys.client_write,
            Role::Server => &keys.server_write,
        };
        let (content_type, plaintext) = open_record(kind, key, r).ok_or_else(mismatch)?;
        let cid = self.connection_ids().map_or(&[][..], |(_, peer)| peer);
        Ok(seal_record(kind, key, cid, content_type, r.epoch, r.sequence, &plaintext))
    }
}

/// The traffic keys of the session OpenSSL negotiated: its master secret and both randoms
/// through the TLS 1.2 PRF. `None` before the master secret exists.
fn derive_keys(ssl: &SslRef, cipher: RecordCipher) -> Option<TrafficKeys> {
    let session = ssl.session()?;
    let mut master = [0u8; MASTER_SECRET_LEN];
    if session.master_key(&mut master) != MASTER_SECRET_LEN {
        return None;
    }
    let mut client_random = [0u8; RANDOM_LEN];
    let mut server_random = [0u8; RANDOM_LEN];
    let randoms =
        ssl.client_random(&mut client_random) == RANDOM_LEN && ssl.server_random(&mut server_random) == RANDOM_LEN;
    let keys = randoms.then(|| TrafficKeys::derive(cipher, &master, &client_random, &server_random));
    master.fill(0);
    keys
}

fn peer_identity(ssl: &SslRef, role: Role) -> Option<PeerIdentity> {
    if let Some(cert) = ssl.peer_certificate() {
        let common_name = cert
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .next()
            .map(|e| String::from_utf8_lossy(e.data().as_slice()).into_owned())
            .unwrap_or_default();
        return Some(PeerIdentity::Certificate { common_name });
    }
    if role == Role::Server {
        return ssl.psk_identity().map(|id| PeerIdentity::Psk(id.to_vec()));
    }
    None
}

/// OpenSSL reports a received fatal alert as reason `SSL_AD_REASON_OFFSET + description`.
const ALERT_REASON_OFFSET: i32 = 1000;
const REASON_CERTIFICATE_VERIFY_FAILED: i32 = 134;
const REASON_PEER_DID_NOT_RETURN_A_CERTIFICATE: i32 = 199;
const REASON_PSK_IDENTITY_NOT_FOUND: i32 = 223;
const REASON_READ_TIMEOUT_EXPIRED: i32 = 312;

fn alert_in(err: &openssl::ssl::Error) -> Option<AlertDescription> {
    let stack = err.ssl_error()?;
    stack.errors().iter().find_map(|e| {
        let code = e.reason_code() - ALERT_REASON_OFFSET;
        u8::try_from(code).ok().map(AlertDescription)
    })
}

/// Names the cause of a failed handshake from OpenSSL's error queue.
fn classify_failure(ssl: &SslRef, err: Option<&openssl::ssl::Error>) -> CloseReason {
    let owned_stack;
    let stack = match err.and_then(|e| e.ssl_error()) {
        Some(stack) => stack,
        None => {
            owned_stack = openssl::error::ErrorStack::get();
            &owned_stack
        }
    };
    for e in stack.errors() {
        match e.reason_code() {
            REASON_PSK_IDENTITY_NOT_FOUND => return CloseReason::UnknownPskIdentity,
            REASON_PEER_DID_NOT_RETURN_A_CERTIFICATE => return CloseReason::NoPeerCertificate,
            REASON_READ_TIMEOUT_EXPIRED => return CloseReason::RetransmissionLimit,
            REASON_CERTIFICATE_VERIFY_FAILED => {
                let why = ssl.verify_result().error_string().to_string();
                return CloseReason::CertificateRejected(why);
            }
            code if (ALERT_REASON_OFFSET..ALERT_REASON_OFFSET + 256).contains(&code) => {
                let alert = AlertDescription((code - ALERT_REASON_OFFSET) as u8);
                if alert == AlertDescription::UNKNOWN_PSK_IDENTITY {
                    return CloseReason::UnknownPskIdentity;
                }
                return CloseReason::AlertReceived(alert);
            }
            _ => {}
        }
    }
    let text = match err {
        Some(err) => describe(err),
        None => stack.to_string(),
    };
    CloseReason::HandshakeFailed(text)
}

fn describe(err: &openssl::ssl::Error) -> String {
    match err.ssl_error() {
        Some(stack) => {
            stack.errors().iter().map(|e| e.reason().unwrap_or("unknown").to_string()).collect::<Vec<_>>().join("; ")
        }
        None => err.to_string(),
    }
}

/// The `Read + Write` OpenSSL runs on: one read yields one whole datagram (or WouldBlock),
/// one write is one datagram. Datagrams are never concatenated.
pub(crate) struct DatagramPipe {
    incoming: Option<Vec<u8>>,
    spare: Vec<u8>,
    outgoing: VecDeque<Vec<u8>>,
    next_epoch0_sequence: u64,
    mtu: u16,
}

impl Default for DatagramPipe {
    fn default() -> Self {
        Self { incoming: None, spare: Vec::new(), outgoing: VecDeque::new(), next_epoch0_sequence: 0, mtu: 1200 }
    }
}

impl Handshake {
    /// Sets the MTU the re-sealed datagrams are packed into.
    pub(crate) fn set_mtu(&mut self, mtu: u16) {
        self.stream.get_mut().mtu = mtu;
    }
}

impl DatagramPipe {
    fn deliver(&mut self, datagram: &[u8]) {
        let mut buf = std::mem::take(&mut self.spare);
        buf.clear();
        buf.extend_from_slice(datagram);
        self.incoming = Some(buf);
    }
}

impl io::Read for DatagramPipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // A datagram socket has no end of stream: an empty datagram (legal on the wire) must
        // not read as Ok(0), which OpenSSL takes for EOF and a fatal error.
        let Some(datagram) = self.incoming.take().filter(|d| !d.is_empty()) else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let n = datagram.len().min(buf.len());
        buf[..n].copy_from_slice(&datagram[..n]);
        self.spare = datagram;
        Ok(n)
    }
}

impl io::Write for DatagramPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(records) = record::parse_records(buf) {
            for r in records.iter().filter(|r| r.epoch == 0) {
                self.next_epoch0_sequence = self.next_epoch0_sequence.max(r.sequence + 1);
            }
        }
        self.outgoing.push_back(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
