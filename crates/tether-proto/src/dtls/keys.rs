//! Traffic keys of an established session, derived from its master secret with the TLS 1.2
//! PRF (RFC 5246 §5, §6.3), and the AEAD that protects its records (RFC 5288 for GCM,
//! RFC 6655 for CCM and CCM_8).
//!
//! Every AEAD suite tether speaks is AES-128 with a 4-byte implicit salt and an 8-byte
//! explicit nonce carried in the record, and uses the SHA-256 PRF, so one key schedule fits
//! them all: no MAC keys, two 16-byte write keys, two 4-byte salts. The CBC suites (off by
//! default) add two 32-byte HMAC-SHA256 keys and use no salt; their records are protected in
//! the `cbc` module.
//!
//! The AEAD is RustCrypto's (`aes-gcm`, `ccm` on the `aes` crate, which uses AES-NI and
//! CLMUL when the CPU has them). A key is expanded for each record rather than kept expanded:
//! a session then holds 40 bytes of key material instead of ~1 KiB of key schedules, and the
//! expansion costs well under a microsecond (`tether bench dtls` prints the figure beside
//! OpenSSL's own AEAD on the same records).

use std::fmt;

use aes::Aes128;
use aes_gcm::aead::consts::{U12, U16, U8};
use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::Aes128Gcm;
use ccm::Ccm;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::config::CipherSuite;

/// Length of a TLS 1.2 master secret.
pub const MASTER_SECRET_LEN: usize = 48;
/// Length of the client and server randoms.
pub const RANDOM_LEN: usize = 32;
/// Length of the explicit nonce every AEAD record carries before its ciphertext.
pub const EXPLICIT_NONCE_LEN: usize = 8;

/// How a suite protects records: AES-128 in GCM, CCM or CCM_8 (AEAD), or AES-128-CBC with
/// HMAC-SHA256, encrypt-then-MAC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordCipher {
    /// AES-128-GCM, 16-byte tag.
    Gcm,
    /// AES-128-CCM, 16-byte tag.
    Ccm,
    /// AES-128-CCM_8, 8-byte tag.
    Ccm8,
    /// AES-128-CBC and HMAC-SHA256 in Encrypt-then-MAC (RFC 7366): see the `cbc` module.
    CbcSha256,
}

impl RecordCipher {
    /// The record protection of `suite`.
    pub fn of(suite: CipherSuite) -> Self {
        match suite {
            CipherSuite::PskAes128Ccm8 | CipherSuite::EcdheEcdsaAes128Ccm8 => Self::Ccm8,
            CipherSuite::PskAes128GcmSha256 | CipherSuite::EcdheEcdsaAes128GcmSha256 => Self::Gcm,
            CipherSuite::PskAes128Ccm | CipherSuite::EcdheEcdsaAes128Ccm => Self::Ccm,
            CipherSuite::PskAes128CbcSha256
            | CipherSuite::EcdhePskAes128CbcSha256
            | CipherSuite::EcdheEcdsaAes128CbcSha256 => Self::CbcSha256,
        }
    }

    /// Length of the authentication tag (the MAC for CBC).
    pub fn tag_len(self) -> usize {
        match self {
            Self::Gcm | Self::Ccm => 16,
            Self::Ccm8 => 8,
            Self::CbcSha256 => super::cbc::MAC_LEN,
        }
    }

    /// The most bytes a record's fragment adds to its plaintext: explicit nonce and tag, or
    /// IV, padding (at most a block) and MAC.
    pub fn overhead(self) -> usize {
        match self {
            Self::CbcSha256 => super::cbc::BLOCK_LEN + super::cbc::BLOCK_LEN + super::cbc::MAC_LEN,
            aead => EXPLICIT_NONCE_LEN + aead.tag_len(),
        }
    }

    /// The shortest fragment a protected record can have: an AEAD's nonce and tag, or an IV,
    /// one block and the MAC.
    pub fn min_fragment(self) -> usize {
        match self {
            Self::CbcSha256 => super::cbc::BLOCK_LEN + super::cbc::BLOCK_LEN + super::cbc::MAC_LEN,
            aead => aead.overhead(),
        }
    }
}

/// One direction's key: the AES-128 write key and the 4-byte salt of the nonce; for a CBC
/// suite, the HMAC-SHA256 key too (boxed: AEAD sessions, the many, carry a null pointer).
#[derive(Clone, PartialEq, Eq)]
pub struct DirectionKey {
    /// AES-128 key.
    pub key: [u8; 16],
    /// Implicit part of the nonce (`client_write_IV` / `server_write_IV`); zero for CBC.
    pub salt: [u8; 4],
    /// `client_write_MAC_key` / `server_write_MAC_key` of a CBC suite.
    pub mac: Option<Box<[u8; 32]>>,
}

impl fmt::Debug for DirectionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DirectionKey(<redacted>)")
    }
}

/// The AEAD failed to authenticate a record: forged, corrupted, or under other keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenError;

impl DirectionKey {
    /// Encrypts `buffer` in place and returns the tag (its first `kind.tag_len()` bytes).
    /// `explicit_nonce` is the value carried in front of the ciphertext.
    pub fn seal(&self, kind: RecordCipher, explicit_nonce: u64, aad: &[u8], buffer: &mut [u8]) -> [u8; 16] {
        let nonce = self.nonce(explicit_nonce).into();
        let key = self.key.into();
        let mut tag = [0u8; 16];
        // Encryption only fails for plaintexts beyond the AEAD's limits (GCM: 64 GiB, CCM
        // with a 3-byte length field: 16 MiB); a record holds at most 16 KiB.
        match kind {
            // Not an AEAD: its records are sealed whole by `super::cbc`.
            RecordCipher::CbcSha256 => {}
            RecordCipher::Gcm => {
                if let Ok(t) = Aes128Gcm::new(&key).encrypt_in_place_detached(&nonce, aad, buffer) {
                    tag.copy_from_slice(&t);
                }
            }
            RecordCipher::Ccm => {
                if let Ok(t) = Ccm::<Aes128, U16, U12>::new(&key).encrypt_in_place_detached(&nonce, aad, buffer) {
                    tag.copy_from_slice(&t);
                }
            }
            RecordCipher::Ccm8 => {
                if let Ok(t) = Ccm::<Aes128, U8, U12>::new(&key).encrypt_in_place_detached(&nonce, aad, buffer) {
                    tag[..8].copy_from_slice(&t);
                }
            }
        }
        tag
    }

    /// Authenticates `buffer` (ciphertext) against `tag` and decrypts it in place.
    pub fn open(
        &self,
        kind: RecordCipher,
        explicit_nonce: u64,
        aad: &[u8],
        buffer: &mut [u8],
        tag: &[u8],
    ) -> Result<(), OpenError> {
        if tag.len() != kind.tag_len() {
            return Err(OpenError);
        }
        let nonce = self.nonce(explicit_nonce).into();
        let key = self.key.into();
        let opened = match kind {
            RecordCipher::CbcSha256 => return Err(OpenError),
            RecordCipher::Gcm => Aes128Gcm::new(&key).decrypt_in_place_detached(&nonce, aad, buffer, tag.into()),
            RecordCipher::Ccm => {
                Ccm::<Aes128, U16, U12>::new(&key).decrypt_in_place_detached(&nonce, aad, buffer, tag.into())
            }
            RecordCipher::Ccm8 => {
                Ccm::<Aes128, U8, U12>::new(&key).decrypt_in_place_detached(&nonce, aad, buffer, tag.into())
            }
        };
        opened.map_err(|_| OpenError)
    }

    fn nonce(&self, explicit_nonce: u64) -> [u8; 12] {
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&self.salt);
        nonce[4..].copy_from_slice(&explicit_nonce.to_be_bytes());
        nonce
    }
}

/// Both directions' keys of a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficKeys {
    /// Protects what the client writes.
    pub client_write: DirectionKey,
    /// Protects what the server writes.
    pub server_write: DirectionKey,
}

impl TrafficKeys {
    /// The key block of RFC 5246 §6.3,
    /// `PRF(master_secret, "key expansion", server_random + client_random)`, split as the
    /// suite's `cipher` needs it: for an AES-128 AEAD, client and server write keys, then
    /// client and server salts; for CBC-SHA256, client and server MAC keys, then client and
    /// server write keys (TLS 1.2 derives no IVs for CBC: each record carries its own).
    pub fn derive(cipher: RecordCipher, master_secret: &[u8], client_random: &[u8], server_random: &[u8]) -> Self {
        let mut seed = Vec::with_capacity(2 * RANDOM_LEN);
        seed.extend_from_slice(server_random);
        seed.extend_from_slice(client_random);
        let mut block = [0u8; 2 * 32 + 2 * 16];
        let used = match cipher {
            RecordCipher::CbcSha256 => 2 * 32 + 2 * 16,
            _ => 2 * 16 + 2 * 4,
        };
        prf_sha256(master_secret, b"key expansion", &seed, &mut block[..used]);
        let key = |at: usize| -> [u8; 16] { block[at..at + 16].try_into().unwrap_or([0; 16]) };
        let salt = |at: usize| -> [u8; 4] { block[at..at + 4].try_into().unwrap_or([0; 4]) };
        let mac = |at: usize| -> Option<Box<[u8; 32]>> { block[at..at + 32].try_into().ok().map(Box::new) };
        let keys = match cipher {
            RecordCipher::CbcSha256 => Self {
                client_write: DirectionKey { key: key(64), salt: [0; 4], mac: mac(0) },
                server_write: DirectionKey { key: key(80), salt: [0; 4], mac: mac(32) },
            },
            _ => Self {
                client_write: DirectionKey { key: key(0), salt: salt(32), mac: None },
                server_write: DirectionKey { key: key(16), salt: salt(36), mac: None },
            },
        };
        block.fill(0);
        keys
    }
}

/// The TLS 1.2 PRF with SHA-256 (RFC 5246 §5): `P_SHA256(secret, label + seed)`, filling
/// `out`.
pub fn prf_sha256(secret: &[u8], label: &[u8], seed: &[u8], out: &mut [u8]) {
    type HmacSha256 = Hmac<Sha256>;
    let mac = |parts: &[&[u8]]| -> [u8; 32] {
        let mut m = <HmacSha256 as Mac>::new_from_slice(secret).expect("HMAC takes keys of any length");
        for part in parts {
            m.update(part);
        }
        m.finalize().into_bytes().into()
    };
    // A(1) = HMAC(secret, label + seed); A(i) = HMAC(secret, A(i-1)).
    let mut a = mac(&[label, seed]);
    let mut written = 0;
    while written < out.len() {
        let chunk = mac(&[&a, label, seed]);
        let n = (out.len() - written).min(chunk.len());
        out[written..written + n].copy_from_slice(&chunk[..n]);
        written += n;
        a = mac(&[&a]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// The widely published TLS 1.2 PRF-SHA256 test vector (IETF TLS WG mailing list,
    /// also used by Go's crypto/tls and other implementations).
    #[test]
    fn prf_sha256_matches_the_published_vector() {
        let secret = hex("9bbe436ba940f017b17652849a71db35");
        let seed = hex("a0ba9f936cda311827a6f796ffd5198c");
        let mut out = [0u8; 100];
        prf_sha256(&secret, b"test label", &seed, &mut out);
        let expected =
            hex("e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a6b301791e90d35c9c9a46b4e14baf9af\
             0fa022f7077def17abfd3797c0564bab4fbc91666e9def9b97fce34f796789baa48082d122ee42c5a72e5a5110fff701\
             87347b66");
        assert_eq!(out.to_vec(), expected);
    }

    /// What is sealed opens; any change to ciphertext, tag, AAD or nonce fails.
    #[test]
    fn every_aead_round_trips_and_rejects_tampering() {
        let key = DirectionKey { key: [0x42; 16], salt: [1, 2, 3, 4], mac: None };
        for kind in [RecordCipher::Gcm, RecordCipher::Ccm, RecordCipher::Ccm8] {
            let mut buffer = b"a CoAP request".to_vec();
            let tag = key.seal(kind, 7, b"aad", &mut buffer);
            let tag = &tag[..kind.tag_len()];
            assert_ne!(buffer, b"a CoAP request");
            let sealed = buffer.clone();
            key.open(kind, 7, b"aad", &mut buffer, tag).unwrap();
            assert_eq!(buffer, b"a CoAP request");
            for i in 0..sealed.len() {
                let mut bad = sealed.clone();
                bad[i] ^= 0x80;
                assert_eq!(key.open(kind, 7, b"aad", &mut bad, tag), Err(OpenError), "{kind:?} byte {i}");
            }
            let mut bad_tag = tag.to_vec();
            bad_tag[0] ^= 1;
            assert_eq!(key.open(kind, 7, b"aad", &mut sealed.clone(), &bad_tag), Err(OpenError));
            assert_eq!(key.open(kind, 8, b"aad", &mut sealed.clone(), tag), Err(OpenError));
            assert_eq!(key.open(kind, 7, b"aaD", &mut sealed.clone(), tag), Err(OpenError));
            assert_eq!(key.open(kind, 7, b"aad", &mut sealed.clone(), &tag[..3]), Err(OpenError));
        }
    }

    #[test]
    fn debug_never_shows_key_material() {
        for cipher in [RecordCipher::Ccm8, RecordCipher::CbcSha256] {
            let keys = TrafficKeys::derive(cipher, &[9; 48], &[1; 32], &[2; 32]);
            let shown = format!("{keys:?}");
            assert!(!shown.contains("key: [") && !shown.contains("mac"), "{shown}");
            assert_ne!(keys.client_write, keys.server_write);
            assert_eq!(keys.client_write.mac.is_some(), cipher == RecordCipher::CbcSha256);
        }
    }
}
