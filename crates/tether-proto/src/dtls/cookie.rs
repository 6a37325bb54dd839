//! Stateless DTLS cookies (RFC 6347 §4.2.1): an HMAC over the peer's address and the
//! ClientHello's parameters, under a secret that rotates; the previous secret is still
//! accepted so a rotation between HelloVerifyRequest and the second ClientHello is harmless.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::RngCore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::Sha256;

use super::record::ClientHello;

/// Length of the cookies issued.
pub const COOKIE_LEN: usize = 32;

/// The rotating cookie secrets of an endpoint.
pub struct CookieKeys {
    rng: ChaCha20Rng,
    current: [u8; 32],
    previous: [u8; 32],
    rotate_every: Duration,
    next_rotation: Instant,
}

impl std::fmt::Debug for CookieKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieKeys").field("rotate_every", &self.rotate_every).finish_non_exhaustive()
    }
}

impl CookieKeys {
    /// Secrets drawn from a ChaCha20 generator seeded with `seed` (give it OS entropy in
    /// production, a fixed value in tests), rotated every `rotate_every` from `now`.
    pub fn new(seed: [u8; 32], rotate_every: Duration, now: Instant) -> Self {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut current = [0u8; 32];
        let mut previous = [0u8; 32];
        rng.fill_bytes(&mut current);
        rng.fill_bytes(&mut previous);
        Self { rng, current, previous, rotate_every, next_rotation: now + rotate_every }
    }

    /// Rotates if due. Returns when to call again.
    pub fn handle_timeout(&mut self, now: Instant) -> Instant {
        while now >= self.next_rotation {
            self.previous = self.current;
            self.rng.fill_bytes(&mut self.current);
            self.next_rotation += self.rotate_every;
        }
        self.next_rotation
    }

    /// When the next rotation is due.
    pub fn poll_timeout(&self) -> Instant {
        self.next_rotation
    }

    /// The cookie for `hello` from `peer` under the current secret.
    pub fn issue(&self, peer: SocketAddr, hello: &ClientHello<'_>) -> [u8; COOKIE_LEN] {
        compute(&self.current, peer, hello)
    }

    /// Whether `hello` carries a cookie issued to `peer` under the current or previous secret.
    pub fn verify(&self, peer: SocketAddr, hello: &ClientHello<'_>) -> bool {
        if hello.cookie.len() != COOKIE_LEN {
            return false;
        }
        [&self.current, &self.previous].into_iter().any(|secret| {
            let mut mac = keyed(secret, peer, hello);
            mac_client_hello(&mut mac, hello);
            mac.verify_slice(hello.cookie).is_ok()
        })
    }
}

fn compute(secret: &[u8; 32], peer: SocketAddr, hello: &ClientHello<'_>) -> [u8; COOKIE_LEN] {
    let mut mac = keyed(secret, peer, hello);
    mac_client_hello(&mut mac, hello);
    mac.finalize().into_bytes().into()
}

fn keyed(secret: &[u8; 32], peer: SocketAddr, _hello: &ClientHello<'_>) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("hmac takes any key length");
    match peer {
        SocketAddr::V4(a) => mac.update(&a.ip().octets()),
        SocketAddr::V6(a) => mac.update(&a.ip().octets()),
    }
    mac.update(&peer.port().to_be_bytes());
    mac
}

fn mac_client_hello(mac: &mut Hmac<Sha256>, hello: &ClientHello<'_>) {
    mac.update(&hello.client_version.to_be_bytes());
    mac.update(hello.random);
    for field in [hello.session_id, hello.cipher_suites, hello.compression_methods] {
        mac.update(&(field.len() as u16).to_be_bytes());
        mac.update(field);
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods, reason = "tests pick their starting instant")]
mod tests {
    use super::*;

    fn hello<'a>(random: &'a [u8], cookie: &'a [u8]) -> ClientHello<'a> {
        ClientHello {
            record_sequence: 0,
            message_seq: 0,
            client_version: 0xfefd,
            random,
            session_id: &[],
            cookie,
            cipher_suites: &[0xc0, 0xa8],
            compression_methods: &[0],
        }
    }

    #[test]
    fn a_cookie_verifies_for_its_peer_only() {
        let now = Instant::now();
        let keys = CookieKeys::new([1; 32], Duration::from_secs(60), now);
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let cookie = keys.issue(peer, &hello(&[7; 32], &[]));
        assert!(keys.verify(peer, &hello(&[7; 32], &cookie)));
        assert!(!keys.verify("127.0.0.1:5001".parse().unwrap(), &hello(&[7; 32], &cookie)));
        assert!(!keys.verify(peer, &hello(&[8; 32], &cookie)), "other client parameters");
        assert!(!keys.verify(peer, &hello(&[7; 32], &cookie[..31])));
    }

    #[test]
    fn the_previous_secret_is_accepted_for_one_rotation() {
        let now = Instant::now();
        let mut keys = CookieKeys::new([1; 32], Duration::from_secs(60), now);
        let peer: SocketAddr = "[::1]:5000".parse().unwrap();
        let cookie = keys.issue(peer, &hello(&[7; 32], &[]));
        assert_eq!(keys.handle_timeout(now + Duration::from_secs(60)), now + Duration::from_secs(120));
        assert!(keys.verify(peer, &hello(&[7; 32], &cookie)), "previous secret");
        keys.handle_timeout(now + Duration::from_secs(120));
        assert!(!keys.verify(peer, &hello(&[7; 32], &cookie)), "two rotations old");
    }
}
