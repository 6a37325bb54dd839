//! Just enough of the DTLS 1.2 record and handshake framing (RFC 6347 §4.1, §4.2.2) to route
//! datagrams, answer ClientHellos statelessly and recognise flights, without OpenSSL.
//!
//! Every parser here reads bytes a peer sent: they return `None` on anything malformed and
//! never panic.

/// Length of a DTLS record header: type, version, epoch, sequence number, length.
pub const RECORD_HEADER_LEN: usize = 13;
/// Length of a DTLS handshake message header.
pub const HANDSHAKE_HEADER_LEN: usize = 12;

/// Record content types (RFC 5246 §6.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ContentType {
    /// `change_cipher_spec` (20).
    ChangeCipherSpec,
    /// `alert` (21).
    Alert,
    /// `handshake` (22).
    Handshake,
    /// `application_data` (23).
    ApplicationData,
    /// `tls12_cid` (25): an encrypted record carrying a connection ID (RFC 9146); its real
    /// content type is inside the ciphertext.
    Tls12Cid,
}

impl ContentType {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            20 => Some(Self::ChangeCipherSpec),
            21 => Some(Self::Alert),
            22 => Some(Self::Handshake),
            23 => Some(Self::ApplicationData),
            25 => Some(Self::Tls12Cid),
            _ => None,
        }
    }

    /// The byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            Self::ChangeCipherSpec => 20,
            Self::Alert => 21,
            Self::Handshake => 22,
            Self::ApplicationData => 23,
            Self::Tls12Cid => 25,
        }
    }

    /// The content type of `byte`, if it is one of these.
    pub fn from_wire(byte: u8) -> Option<Self> {
        Self::from_byte(byte)
    }
}

/// One record of a datagram, borrowed from it.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    /// The content type.
    pub content_type: ContentType,
    /// The protocol version on the record (0xfeff for DTLS 1.0, 0xfefd for DTLS 1.2).
    pub version: u16,
    /// The epoch: 0 before the first ChangeCipherSpec.
    pub epoch: u16,
    /// The 48-bit record sequence number.
    pub sequence: u64,
    /// The connection ID of a `tls12_cid` record; empty for every other record.
    pub cid: &'a [u8],
    /// The record's fragment (ciphertext after epoch 0).
    pub fragment: &'a [u8],
    /// The whole record as it was on the wire, header included.
    pub raw: &'a [u8],
}

impl Record<'_> {
    /// The record's epoch and sequence number as one 64-bit value (RFC 6347 §4.1: the
    /// `seq_num` of the MAC, and the explicit nonce tether sends).
    pub fn epoch_and_sequence(&self) -> u64 {
        (u64::from(self.epoch) << 48) | self.sequence
    }
}

/// The handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;

/// The record version of DTLS 1.0 (`{254, 255}`).
pub const DTLS_1_0: u16 = 0xfeff;
/// The record version of DTLS 1.2 (`{254, 253}`).
pub const DTLS_1_2: u16 = 0xfefd;

/// Splits a datagram into records. `None` if any record is truncated, has an unknown content
/// type or a version other than DTLS 1.0/1.2: such a datagram is not DTLS and is dropped whole.
/// `tls12_cid` records count as unknown here; see [`parse_records_with_cid`].
pub fn parse_records(datagram: &[u8]) -> Option<Vec<Record<'_>>> {
    parse_records_with_cid(datagram, None)
}

/// Like [`parse_records`], with `tls12_cid` records (RFC 9146) accepted when `cid_len` says
/// how long the receiver's connection ID is: their header has no length for it.
pub fn parse_records_with_cid(datagram: &[u8], cid_len: Option<usize>) -> Option<Vec<Record<'_>>> {
    let mut records = Vec::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let (record, tail) = parse_record(rest, cid_len)?;
        records.push(record);
        rest = tail;
    }
    if records.is_empty() {
        return None;
    }
    Some(records)
}

/// Checks a datagram's framing without allocating; returns the epoch of its first record.
pub fn first_record_epoch(datagram: &[u8]) -> Option<u16> {
    first_record_epoch_with_cid(datagram, None)
}

/// Like [`first_record_epoch`], with `tls12_cid` records of a `cid_len`-byte CID accepted.
pub fn first_record_epoch_with_cid(datagram: &[u8], cid_len: Option<usize>) -> Option<u16> {
    let mut rest = datagram;
    let mut first = None;
    while !rest.is_empty() {
        let (record, tail) = parse_record(rest, cid_len)?;
        first.get_or_insert(record.epoch);
        rest = tail;
    }
    first
}

/// The connection ID of a datagram whose first record is a `tls12_cid` record with a
/// `cid_len`-byte CID; `None` for any other datagram. Reads only the first header: the
/// session the CID names checks the rest.
pub fn leading_cid(datagram: &[u8], cid_len: usize) -> Option<&[u8]> {
    if datagram.first() != Some(&ContentType::Tls12Cid.byte()) {
        return None;
    }
    datagram.get(RECORD_HEADER_LEN - 2..RECORD_HEADER_LEN - 2 + cid_len)
}

fn parse_record(bytes: &[u8], cid_len: Option<usize>) -> Option<(Record<'_>, &[u8])> {
    let header = bytes.get(..RECORD_HEADER_LEN)?;
    let content_type = ContentType::from_byte(header[0])?;
    let version = u16::from_be_bytes([header[1], header[2]]);
    let epoch = u16::from_be_bytes([header[3], header[4]]);
    let sequence = read_u48(&header[5..11]);
    // A tls12_cid header has the CID between the sequence number and the length.
    let cid_len = match content_type {
        ContentType::Tls12Cid => cid_len?,
        _ => 0,
    };
    let cid = bytes.get(11..11 + cid_len)?;
    let length_at = 11 + cid_len;
    let length = bytes.get(length_at..length_at + 2)?;
    let length = usize::from(u16::from_be_bytes([length[0], length[1]]));
    let start = length_at + 2;
    let end = start.checked_add(length)?;
    let fragment = bytes.get(start..end)?;
    // RFC 6347 §4.1: an initial ClientHello may carry any {254, x} (Mbed TLS 2.x with a low
    // minimum version sends {254, 0}); its handshake version decides. Elsewhere only 1.0/1.2.
    let initial_client_hello = content_type == ContentType::Handshake
        && epoch == 0
        && header[1] == 0xfe
        && fragment.first() == Some(&HANDSHAKE_CLIENT_HELLO);
    if version != DTLS_1_0 && version != DTLS_1_2 && !initial_client_hello {
        return None;
    }
    let record = Record { content_type, version, epoch, sequence, cid, fragment, raw: &bytes[..end] };
    Some((record, &bytes[end..]))
}

/// Appends a record header: type, version, epoch, sequence number, the CID of a `tls12_cid`
/// record (empty otherwise) and the fragment's length.
pub fn write_header(
    out: &mut Vec<u8>,
    content_type: ContentType,
    epoch: u16,
    sequence: u64,
    cid: &[u8],
    fragment_len: usize,
) {
    write_record_header(out, content_type, DTLS_1_2, epoch, sequence);
    out.extend_from_slice(cid);
    out.extend_from_slice(&(fragment_len as u16).to_be_bytes());
}

fn read_u48(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

/// The parts of a ClientHello that a stateless cookie is computed over.
#[derive(Clone, Copy, Debug)]
pub struct ClientHello<'a> {
    /// Record sequence number of the record that carried it (echoed in the
    /// HelloVerifyRequest, RFC 6347 §4.2.1).
    pub record_sequence: u64,
    /// `message_seq` of the handshake message: 0 for a first ClientHello.
    pub message_seq: u16,
    /// `client_version`.
    pub client_version: u16,
    /// `random`.
    pub random: &'a [u8],
    /// `session_id`.
    pub session_id: &'a [u8],
    /// `cookie` (empty on a first ClientHello).
    pub cookie: &'a [u8],
    /// `cipher_suites`.
    pub cipher_suites: &'a [u8],
    /// `compression_methods`.
    pub compression_methods: &'a [u8],
}

/// Parses a datagram that begins with an epoch-0 handshake record holding one whole
/// (unfragmented) ClientHello. `None` for anything else.
pub fn parse_client_hello(datagram: &[u8]) -> Option<ClientHello<'_>> {
    let (record, _) = parse_record(datagram, None)?;
    if record.content_type != ContentType::Handshake || record.epoch != 0 {
        return None;
    }
    let message = record.fragment;
    let header = message.get(..HANDSHAKE_HEADER_LEN)?;
    if header[0] != HANDSHAKE_CLIENT_HELLO {
        return None;
    }
    let length = read_u24(&header[1..4]);
    let message_seq = u16::from_be_bytes([header[4], header[5]]);
    let fragment_offset = read_u24(&header[6..9]);
    let fragment_length = read_u24(&header[9..12]);
    if fragment_offset != 0 || fragment_length != length {
        return None;
    }
    let body = message.get(HANDSHAKE_HEADER_LEN..HANDSHAKE_HEADER_LEN + length)?;
    let mut reader = Reader(body);
    let client_version = u16::from_be_bytes(reader.take(2)?.try_into().ok()?);
    let random = reader.take(32)?;
    let session_id = reader.vector_u8()?;
    let cookie = reader.vector_u8()?;
    let cipher_suites = reader.vector_u16()?;
    let compression_methods = reader.vector_u8()?;
    if session_id.len() > 32 || cipher_suites.is_empty() || compression_methods.is_empty() {
        return None;
    }
    Some(ClientHello {
        record_sequence: record.sequence,
        message_seq,
        client_version,
        random,
        session_id,
        cookie,
        cipher_suites,
        compression_methods,
    })
}

fn read_u24(bytes: &[u8]) -> usize {
    bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b))
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }

    fn vector_u8(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(*self.take(1)?.first()?);
        self.take(len)
    }

    fn vector_u16(&mut self) -> Option<&'a [u8]> {
        let len = self.take(2)?;
        self.take(usize::from(u16::from_be_bytes([len[0], len[1]])))
    }
}

/// Builds a HelloVerifyRequest answering `hello` with `cookie` (at most 255 bytes), written
/// into `out` (cleared first). Per RFC 6347 §4.2.1 it carries DTLS 1.0 as its version and
/// echoes the ClientHello's record sequence number; its `message_seq` is 0.
pub fn write_hello_verify_request(hello: &ClientHello<'_>, cookie: &[u8], out: &mut Vec<u8>) {
    const HELLO_VERIFY_REQUEST: u8 = 3;
    let cookie_len = u8::try_from(cookie.len()).unwrap_or(u8::MAX);
    let cookie = &cookie[..usize::from(cookie_len)];
    let body_len = 2 + 1 + cookie.len();
    let fragment_len = HANDSHAKE_HEADER_LEN + body_len;
    out.clear();
    out.reserve(RECORD_HEADER_LEN + fragment_len);
    write_record_header(out, ContentType::Handshake, DTLS_1_0, 0, hello.record_sequence);
    out.extend_from_slice(&(fragment_len as u16).to_be_bytes());
    out.push(HELLO_VERIFY_REQUEST);
    out.extend_from_slice(&(body_len as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&0u16.to_be_bytes()); // message_seq
    out.extend_from_slice(&[0, 0, 0]); // fragment_offset
    out.extend_from_slice(&(body_len as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&DTLS_1_0.to_be_bytes());
    out.push(cookie_len);
    out.extend_from_slice(cookie);
}

/// Builds a plaintext (epoch 0) fatal alert record.
pub fn fatal_alert(description: u8, sequence: u64) -> Vec<u8> {
    const FATAL: u8 = 2;
    let mut out = Vec::with_capacity(RECORD_HEADER_LEN + 2);
    write_record_header(&mut out, ContentType::Alert, DTLS_1_2, 0, sequence);
    out.extend_from_slice(&2u16.to_be_bytes());
    out.extend_from_slice(&[FATAL, description]);
    out
}

fn write_record_header(out: &mut Vec<u8>, content_type: ContentType, version: u16, epoch: u16, sequence: u64) {
    out.push(content_type.byte());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&sequence.to_be_bytes()[2..]);
}

/// Handshake message types found in the plaintext (epoch-0) records of a datagram, in
/// order; encrypted records are reported as `None`. Used to count flights in tests.
pub fn handshake_messages(datagram: &[u8]) -> Vec<Option<u8>> {
    let Some(records) = parse_records(datagram) else {
        return Vec::new();
    };
    records
        .iter()
        .filter(|r| r.content_type == ContentType::Handshake)
        .map(|r| if r.epoch == 0 { r.fragment.first().copied() } else { None })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as OpenSSL 3.0 sends it (truncated extensions are fine for the parser).
    fn client_hello(cookie: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&DTLS_1_2.to_be_bytes());
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.push(cookie.len() as u8);
        body.extend_from_slice(cookie);
        body.extend_from_slice(&[0, 2, 0xc0, 0xa8]); // PSK-AES128-CCM8
        body.extend_from_slice(&[1, 0]);
        let mut message = vec![1];
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&[0, 0, 0, 0, 0]);
        message.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        message.extend_from_slice(&body);
        let mut datagram = Vec::new();
        write_record_header(&mut datagram, ContentType::Handshake, DTLS_1_0, 0, 5);
        datagram.extend_from_slice(&(message.len() as u16).to_be_bytes());
        datagram.extend_from_slice(&message);
        datagram
    }

    #[test]
    fn parses_a_client_hello_and_answers_it() {
        let datagram = client_hello(b"");
        let hello = parse_client_hello(&datagram).expect("parses");
        assert_eq!(hello.record_sequence, 5);
        assert!(hello.cookie.is_empty());
        assert_eq!(hello.cipher_suites, &[0xc0, 0xa8]);
        let mut hvr = Vec::new();
        write_hello_verify_request(&hello, b"0123456789abcdef", &mut hvr);
        let records = parse_records(&hvr).expect("hvr is framed");
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].sequence, 5);
        assert_eq!(records[0].fragment[0], 3);
        assert_eq!(handshake_messages(&hvr), vec![Some(3)]);
    }

    #[test]
    fn reads_the_cookie_back() {
        let datagram = client_hello(b"cookie!");
        assert_eq!(parse_client_hello(&datagram).unwrap().cookie, b"cookie!");
    }

    #[test]
    fn every_truncation_is_rejected_without_panicking() {
        let datagram = client_hello(b"cookie");
        for len in 0..datagram.len() {
            assert!(parse_client_hello(&datagram[..len]).is_none(), "len {len}");
            assert!(first_record_epoch(&datagram[..len]).is_none(), "len {len}");
        }
    }

    #[test]
    fn rejects_other_versions_and_types() {
        let mut datagram = client_hello(b"");
        datagram[1] = 0x03; // TLS, not DTLS
        assert!(parse_records(&datagram).is_none());
        let mut datagram = client_hello(b"");
        datagram[0] = 99;
        assert!(parse_records(&datagram).is_none());
    }

    #[test]
    fn alert_record_is_well_formed() {
        let alert = fatal_alert(51, 9);
        let records = parse_records(&alert).unwrap();
        assert_eq!(records[0].content_type, ContentType::Alert);
        assert_eq!(records[0].fragment, &[2, 51]);
        assert_eq!(records[0].sequence, 9);
    }
}
