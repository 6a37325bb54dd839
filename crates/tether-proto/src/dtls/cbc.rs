//! Records of the CBC suites (`*-AES128-CBC-SHA256`, off by default): AES-128-CBC and
//! HMAC-SHA256 in Encrypt-then-MAC, RFC 7366.
//!
//! Only Encrypt-then-MAC. MAC-then-encrypt CBC (RFC 5246 §6.2.3.2) must check padding before
//! it can check the MAC, and the time that takes is the Lucky Thirteen oracle (AlFardan and
//! Paterson, 2013, demonstrated against DTLS too); making it constant-time is delicate work
//! OpenSSL needed years for. Here the MAC covers the ciphertext and is compared (in constant
//! time, `hmac`'s `verify_slice`) before anything is decrypted, so padding is only ever read
//! from authenticated records. A server chooses a CBC suite only for a client that offers
//! `encrypt_then_mac` ([`super::config`]); a session whose Finished does not open this way is
//! refused at the hand-off.
//!
//! Record IVs are `AES_K(epoch ‖ sequence number ‖ 0…)` under the record's own encryption key:
//! the first method of NIST SP 800-38A Appendix C (the forward cipher applied to a nonce under
//! the same key). Sequence numbers never repeat, so neither do IVs, and without the key they
//! are unpredictable, as TLS 1.2 requires (RFC 5246 §6.2.3.2) — with no random source in a
//! sans-IO record layer.
//!
//! Connection IDs (RFC 9146) are not combined with these suites: a server that chose one does
//! not take a client's CID offer.

use aes::cipher::block_padding::NoPadding;
use aes::cipher::{BlockDecryptMut, BlockEncrypt, BlockEncryptMut, KeyInit, KeyIvInit};
use aes::Aes128;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::keys::DirectionKey;
use super::record::{ContentType, DTLS_1_2};

/// AES block length, and the length of a record's IV.
pub const BLOCK_LEN: usize = 16;
/// HMAC-SHA256 output length.
pub const MAC_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Protects `payload` into a record's fragment: IV ‖ AES-CBC(payload ‖ padding) ‖ HMAC.
/// `None` if `key` has no MAC key (it is not a CBC suite's).
pub(crate) fn seal(
    key: &DirectionKey,
    content_type: ContentType,
    epoch: u16,
    sequence: u64,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let mac_key = key.mac.as_deref()?;
    let iv = record_iv(&key.key, epoch, sequence);
    // RFC 5246 §6.2.3.2: padding bytes and the padding length byte all hold the padding
    // length; the shortest that fills the last block.
    let padding = (BLOCK_LEN - (payload.len() + 1) % BLOCK_LEN) % BLOCK_LEN;
    let mut fragment = Vec::with_capacity(BLOCK_LEN + payload.len() + padding + 1 + MAC_LEN);
    fragment.extend_from_slice(&iv);
    fragment.extend_from_slice(payload);
    fragment.resize(fragment.len() + padding + 1, padding as u8);
    let encrypted_len = fragment.len() - BLOCK_LEN;
    cbc::Encryptor::<Aes128>::new(&key.key.into(), &iv.into())
        .encrypt_padded_mut::<NoPadding>(&mut fragment[BLOCK_LEN..], encrypted_len)
        .ok()?;
    let mac = record_mac(mac_key, content_type, epoch, sequence, &fragment)?;
    fragment.extend_from_slice(&mac.finalize().into_bytes());
    Some(fragment)
}

/// Authenticates a record's `fragment`, then decrypts it: its plaintext, or `None` if it
/// does not authenticate (or, after authenticating, is malformed).
pub(crate) fn open(
    key: &DirectionKey,
    content_type: ContentType,
    epoch: u16,
    sequence: u64,
    fragment: &[u8],
) -> Option<Vec<u8>> {
    let mac_key = key.mac.as_deref()?;
    if fragment.len() < BLOCK_LEN + BLOCK_LEN + MAC_LEN || (fragment.len() - MAC_LEN) % BLOCK_LEN != 0 {
        return None;
    }
    let (protected, tag) = fragment.split_at(fragment.len() - MAC_LEN);
    record_mac(mac_key, content_type, epoch, sequence, protected)?.verify_slice(tag).ok()?;
    let (iv, ciphertext) = protected.split_at(BLOCK_LEN);
    let mut plaintext = ciphertext.to_vec();
    let iv: [u8; BLOCK_LEN] = iv.try_into().ok()?;
    cbc::Decryptor::<Aes128>::new(&key.key.into(), &iv.into()).decrypt_padded_mut::<NoPadding>(&mut plaintext).ok()?;
    let padding = usize::from(*plaintext.last()?);
    let content_len = plaintext.len().checked_sub(padding + 1)?;
    if plaintext[content_len..].iter().any(|b| usize::from(*b) != padding) {
        return None;
    }
    plaintext.truncate(content_len);
    Some(plaintext)
}

/// The MAC of RFC 7366 §3 over a DTLS record: `HMAC(MAC_write_key, epoch ‖ sequence ‖ type ‖
/// version ‖ length ‖ IV ‖ ENC(…))`, the length being that of IV and ciphertext.
fn record_mac(
    mac_key: &[u8; 32],
    content_type: ContentType,
    epoch: u16,
    sequence: u64,
    protected: &[u8],
) -> Option<HmacSha256> {
    let length = u16::try_from(protected.len()).ok()?;
    let mut mac = <HmacSha256 as Mac>::new_from_slice(mac_key).ok()?;
    mac.update(&((u64::from(epoch) << 48) | sequence).to_be_bytes());
    mac.update(&[content_type.byte()]);
    mac.update(&DTLS_1_2.to_be_bytes());
    mac.update(&length.to_be_bytes());
    mac.update(protected);
    Some(mac)
}

/// `AES_K(epoch ‖ sequence ‖ 0⁸)`: see the module docs.
fn record_iv(key: &[u8; 16], epoch: u16, sequence: u64) -> [u8; BLOCK_LEN] {
    let mut block = [0u8; BLOCK_LEN];
    block[..8].copy_from_slice(&((u64::from(epoch) << 48) | sequence).to_be_bytes());
    let mut block = block.into();
    Aes128::new(&(*key).into()).encrypt_block(&mut block);
    block.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DirectionKey {
        DirectionKey { key: [0x42; 16], salt: [0; 4], mac: Some(Box::new([0x17; 32])) }
    }

    #[test]
    fn every_length_round_trips_with_a_fresh_iv_per_record() {
        let key = key();
        let mut ivs = std::collections::HashSet::new();
        for len in 0..50 {
            let payload: Vec<u8> = (0..len as u8).collect();
            let fragment = seal(&key, ContentType::ApplicationData, 1, len, &payload).unwrap();
            assert_eq!((fragment.len() - MAC_LEN) % BLOCK_LEN, 0);
            assert!(ivs.insert(fragment[..BLOCK_LEN].to_vec()), "IVs never repeat");
            assert_eq!(open(&key, ContentType::ApplicationData, 1, len, &fragment), Some(payload));
        }
    }

    #[test]
    fn any_change_fails_before_decryption() {
        let key = key();
        let fragment = seal(&key, ContentType::ApplicationData, 1, 5, b"a CoAP request").unwrap();
        for i in 0..fragment.len() {
            let mut bad = fragment.clone();
            bad[i] ^= 0x01;
            assert_eq!(open(&key, ContentType::ApplicationData, 1, 5, &bad), None, "byte {i}");
        }
        // Header fields are authenticated too.
        assert_eq!(open(&key, ContentType::Alert, 1, 5, &fragment), None);
        assert_eq!(open(&key, ContentType::ApplicationData, 2, 5, &fragment), None);
        assert_eq!(open(&key, ContentType::ApplicationData, 1, 6, &fragment), None);
        // Truncated or not a whole number of blocks.
        assert_eq!(open(&key, ContentType::ApplicationData, 1, 5, &fragment[..fragment.len() - 1]), None);
        assert_eq!(open(&key, ContentType::ApplicationData, 1, 5, &fragment[..40]), None);
        assert_eq!(open(&key, ContentType::ApplicationData, 1, 5, &[]), None);
        // An AEAD suite's key (no MAC key) neither seals nor opens.
        let aead = DirectionKey { mac: None, ..key };
        assert_eq!(seal(&aead, ContentType::ApplicationData, 1, 5, b"x"), None);
        assert_eq!(open(&aead, ContentType::ApplicationData, 1, 5, &fragment), None);
    }
}
