//! Session configuration: plain structs with documented defaults, compiled once into a
//! [`DtlsContext`] (an OpenSSL `SSL_CTX`) that many sessions share.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use openssl::pkey::{PKey, Private};
use openssl::ssl::{
    ExtensionContext, SslAlert, SslContext, SslContextBuilder, SslMethod, SslOptions, SslRef, SslSessionCacheMode,
    SslVerifyMode, SslVersion,
};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;

use super::error::ConfigError;
use super::resumption::ResumptionCache;

/// Which end of the handshake a session plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Sends the ClientHello.
    Client,
    /// Answers it.
    Server,
}

/// The cipher suites tether speaks (DTLS 1.2 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CipherSuite {
    /// `TLS_PSK_WITH_AES_128_CCM_8`: mandatory in LwM2M, the only suite tinydtls offers.
    PskAes128Ccm8,
    /// `TLS_PSK_WITH_AES_128_GCM_SHA256`.
    PskAes128GcmSha256,
    /// `TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8`.
    EcdheEcdsaAes128Ccm8,
    /// `TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256`.
    EcdheEcdsaAes128GcmSha256,
    /// `TLS_PSK_WITH_AES_128_CCM` (RFC 6655; the 16-byte tag): in LwM2M 1.1's list, offered by
    /// Mbed TLS and Zephyr devices.
    PskAes128Ccm,
    /// `TLS_ECDHE_ECDSA_WITH_AES_128_CCM` (RFC 7251; the 16-byte tag).
    EcdheEcdsaAes128Ccm,
    /// `TLS_PSK_WITH_AES_128_CBC_SHA256` (RFC 5487): in LwM2M 1.0's list. CBC: off by
    /// default, and used only with Encrypt-then-MAC (RFC 7366; see the `cbc` module).
    PskAes128CbcSha256,
    /// `TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA256` (RFC 5489). CBC: off by default, EtM only.
    EcdhePskAes128CbcSha256,
    /// `TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256` (RFC 5289). CBC: off by default, EtM only.
    EcdheEcdsaAes128CbcSha256,
}

impl CipherSuite {
    /// The suites on by default, in tether's order of preference: every AEAD suite.
    pub const DEFAULT: [CipherSuite; 6] = [
        Self::PskAes128Ccm8,
        Self::PskAes128GcmSha256,
        Self::PskAes128Ccm,
        Self::EcdheEcdsaAes128Ccm8,
        Self::EcdheEcdsaAes128GcmSha256,
        Self::EcdheEcdsaAes128Ccm,
    ];

    /// Every suite tether speaks: the defaults, then the CBC suites older devices offer
    /// (weaker: MAC and encryption composed by hand, no AEAD), to be turned on by name.
    pub const ALL: [CipherSuite; 9] = [
        Self::PskAes128Ccm8,
        Self::PskAes128GcmSha256,
        Self::PskAes128Ccm,
        Self::EcdheEcdsaAes128Ccm8,
        Self::EcdheEcdsaAes128GcmSha256,
        Self::EcdheEcdsaAes128Ccm,
        Self::PskAes128CbcSha256,
        Self::EcdhePskAes128CbcSha256,
        Self::EcdheEcdsaAes128CbcSha256,
    ];

    /// OpenSSL's name of the suite.
    pub fn openssl_name(self) -> &'static str {
        match self {
            Self::PskAes128Ccm8 => "PSK-AES128-CCM8",
            Self::PskAes128GcmSha256 => "PSK-AES128-GCM-SHA256",
            Self::EcdheEcdsaAes128Ccm8 => "ECDHE-ECDSA-AES128-CCM8",
            Self::EcdheEcdsaAes128GcmSha256 => "ECDHE-ECDSA-AES128-GCM-SHA256",
            Self::PskAes128Ccm => "PSK-AES128-CCM",
            Self::EcdheEcdsaAes128Ccm => "ECDHE-ECDSA-AES128-CCM",
            Self::PskAes128CbcSha256 => "PSK-AES128-CBC-SHA256",
            Self::EcdhePskAes128CbcSha256 => "ECDHE-PSK-AES128-CBC-SHA256",
            Self::EcdheEcdsaAes128CbcSha256 => "ECDHE-ECDSA-AES128-SHA256",
        }
    }

    /// Whether the suite authenticates with a pre-shared key.
    pub fn is_psk(self) -> bool {
        matches!(
            self,
            Self::PskAes128Ccm8
                | Self::PskAes128GcmSha256
                | Self::PskAes128Ccm
                | Self::PskAes128CbcSha256
                | Self::EcdhePskAes128CbcSha256
        )
    }

    /// Whether the suite is AES-CBC with HMAC (not an AEAD).
    pub fn is_cbc(self) -> bool {
        matches!(self, Self::PskAes128CbcSha256 | Self::EcdhePskAes128CbcSha256 | Self::EcdheEcdsaAes128CbcSha256)
    }

    /// The suite's IANA code point.
    pub fn iana(self) -> u16 {
        match self {
            Self::PskAes128Ccm8 => 0xc0a8,
            Self::PskAes128GcmSha256 => 0x00a8,
            Self::EcdheEcdsaAes128Ccm8 => 0xc0ae,
            Self::EcdheEcdsaAes128GcmSha256 => 0xc02b,
            Self::PskAes128Ccm => 0xc0a4,
            Self::EcdheEcdsaAes128Ccm => 0xc0ac,
            Self::PskAes128CbcSha256 => 0x00ae,
            Self::EcdhePskAes128CbcSha256 => 0xc037,
            Self::EcdheEcdsaAes128CbcSha256 => 0xc023,
        }
    }

    /// Looks a suite up by its IANA code point.
    pub fn from_iana(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.iana() == code)
    }

    /// Looks a suite up by its OpenSSL name.
    pub fn from_openssl_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.openssl_name() == name)
    }

    /// Looks a suite up by its OpenSSL name or its name in the LwM2M specification's lists
    /// (`ECDHE-ECDSA-AES128-CBC-SHA256` for OpenSSL's `ECDHE-ECDSA-AES128-SHA256`), in any
    /// case.
    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.trim().to_ascii_uppercase();
        let name = if name == "ECDHE-ECDSA-AES128-CBC-SHA256" { "ECDHE-ECDSA-AES128-SHA256" } else { &name };
        Self::from_openssl_name(name)
    }
}

/// The handshake retransmission policy (RFC 6347 §4.2.4.1): the first timeout, doubled on
/// every expiry up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetransmitPolicy {
    /// First retransmission timeout. Default 1 s; at least [`RetransmitPolicy::FLOOR`].
    pub initial: Duration,
    /// Cap on the doubled timeout. Default 60 s.
    pub max: Duration,
}

impl RetransmitPolicy {
    /// The smallest timeout accepted. OpenSSL treats less than 15 ms left as expired.
    pub const FLOOR: Duration = Duration::from_millis(20);

    /// The timeout that follows `current` (zero: the first one).
    pub fn next(&self, current: Duration) -> Duration {
        if current.is_zero() {
            return self.initial;
        }
        current.saturating_mul(2).min(self.max).max(self.initial)
    }
}

impl Default for RetransmitPolicy {
    fn default() -> Self {
        Self { initial: Duration::from_secs(1), max: Duration::from_secs(60) }
    }
}

/// Settings every session has, client or server.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Largest datagram sent, handshake fragments included. Default 1200.
    pub mtu: u16,
    /// Handshake retransmission timers. Default 1 s doubling to 60 s.
    pub retransmit: RetransmitPolicy,
    /// Overall deadline for a handshake, on the caller's clock. Default 30 s.
    pub handshake_timeout: Duration,
    /// Suites offered or accepted, filtered by the credentials present. Default:
    /// [`CipherSuite::DEFAULT`] (every AEAD suite; the CBC suites are off).
    pub cipher_suites: Vec<CipherSuite>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            mtu: 1200,
            retransmit: RetransmitPolicy::default(),
            handshake_timeout: Duration::from_secs(30),
            cipher_suites: CipherSuite::DEFAULT.to_vec(),
        }
    }
}

impl SessionConfig {
    /// Sets the MTU.
    pub fn mtu(mut self, mtu: u16) -> Self {
        self.mtu = mtu;
        self
    }

    /// Sets the retransmission policy.
    pub fn retransmit(mut self, initial: Duration, max: Duration) -> Self {
        self.retransmit = RetransmitPolicy { initial, max };
        self
    }

    /// Sets the handshake deadline.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// Restricts the cipher suites.
    pub fn cipher_suites(mut self, suites: &[CipherSuite]) -> Self {
        self.cipher_suites = suites.to_vec();
        self
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(256..=65507).contains(&self.mtu) {
            return Err(ConfigError::InvalidMtu(self.mtu));
        }
        let r = &self.retransmit;
        if r.initial < RetransmitPolicy::FLOOR {
            return Err(ConfigError::InvalidDuration { name: "retransmit.initial", reason: "below the 20 ms floor" });
        }
        if r.max < r.initial || r.max > Duration::from_secs(3600) {
            return Err(ConfigError::InvalidDuration {
                name: "retransmit.max",
                reason: "must lie between retransmit.initial and one hour",
            });
        }
        if self.handshake_timeout.is_zero() {
            return Err(ConfigError::InvalidDuration { name: "handshake_timeout", reason: "must be positive" });
        }
        Ok(())
    }
}

/// A pre-shared key. Its `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct PskKey(Vec<u8>);

impl PskKey {
    /// Wraps key bytes (1..=64 bytes).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, ConfigError> {
        let bytes = bytes.into();
        if bytes.is_empty() || bytes.len() > 64 {
            return Err(ConfigError::InvalidPsk("key must be 1 to 64 bytes"));
        }
        Ok(Self(bytes))
    }

    /// Parses a key written in hex.
    pub fn from_hex(hex: &str) -> Result<Self, ConfigError> {
        let hex = hex.trim();
        if hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ConfigError::InvalidPsk("key must be an even number of hex digits"));
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| ConfigError::InvalidPsk("key must be hex"))?;
        Self::new(bytes)
    }

    /// The key bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for PskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PskKey(<{} bytes redacted>)", self.0.len())
    }
}

/// Where a server finds the key for a PSK identity: a file, a database or a remote store can
/// back it. Called during handshakes, so it must answer quickly.
pub trait PskStore: Send + Sync + 'static {
    /// The key for `identity`, or `None` if the identity is unknown.
    fn key(&self, identity: &[u8]) -> Option<PskKey>;
}

/// A [`PskStore`] held in memory.
#[derive(Debug, Default, Clone)]
pub struct StaticPskStore {
    keys: HashMap<Vec<u8>, PskKey>,
}

impl StaticPskStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an identity.
    pub fn insert(&mut self, identity: impl Into<Vec<u8>>, key: PskKey) -> &mut Self {
        self.keys.insert(identity.into(), key);
        self
    }

    /// Builder form of [`StaticPskStore::insert`].
    pub fn with(mut self, identity: impl Into<Vec<u8>>, key: PskKey) -> Self {
        self.insert(identity, key);
        self
    }
}

impl PskStore for StaticPskStore {
    fn key(&self, identity: &[u8]) -> Option<PskKey> {
        self.keys.get(identity).cloned()
    }
}

/// A certificate chain (leaf first) with its private key.
#[derive(Clone)]
pub struct CertifiedKey {
    /// Leaf certificate, then intermediates.
    pub chain: Vec<X509>,
    /// The leaf's private key (ECDSA P-256 for the suites tether speaks).
    pub key: PKey<Private>,
}

impl CertifiedKey {
    /// Loads a PEM certificate chain and a PEM private key.
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<Self, ConfigError> {
        let chain = X509::stack_from_pem(chain_pem)?;
        if chain.is_empty() {
            return Err(ConfigError::NoCredentials("the certificate file holds no certificate"));
        }
        let key = PKey::private_key_from_pem(key_pem)?;
        Ok(Self { chain, key })
    }
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let subject = self.chain.first().map(|c| format!("{:?}", c.subject_name()));
        f.debug_struct("CertifiedKey").field("leaf", &subject).finish_non_exhaustive()
    }
}

/// A client's configuration.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Common session settings.
    pub session: SessionConfig,
    /// PSK identity and key, if the client authenticates with a PSK.
    pub psk: Option<(Vec<u8>, PskKey)>,
    /// CAs the server's certificate must chain to; required for certificate suites.
    pub trust_anchors: Vec<X509>,
    /// The client's own certificate, for mutual authentication.
    pub certificate: Option<CertifiedKey>,
    /// If set, the server certificate must name this host (SAN or CN).
    pub server_name: Option<String>,
    /// Offer Extended Master Secret (RFC 7627). Default true. Turn it off only to reproduce
    /// peers that lack it, such as node-dtls-client.
    pub offer_extended_master_secret: bool,
    /// Offer a DTLS Connection ID (RFC 9146) with this value: the CID the server is to put
    /// in the records it sends here. Empty: this side needs none (one session per socket)
    /// but the server's own CID is used, so the session survives a change of this side's
    /// address or port. Default `None`: not offered. At most 255 bytes.
    pub connection_id: Option<Vec<u8>>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            session: SessionConfig::default(),
            psk: None,
            trust_anchors: Vec::new(),
            certificate: None,
            server_name: None,
            offer_extended_master_secret: true,
            connection_id: None,
        }
    }
}

impl ClientConfig {
    /// A PSK client with default session settings.
    pub fn psk(identity: impl Into<Vec<u8>>, key: PskKey) -> Self {
        Self { psk: Some((identity.into(), key)), ..Self::default() }
    }

    /// A certificate-verifying client with default session settings.
    pub fn x509(trust_anchors: Vec<X509>) -> Self {
        Self { trust_anchors, ..Self::default() }
    }

    /// Sets the common session settings.
    pub fn session(mut self, session: SessionConfig) -> Self {
        self.session = session;
        self
    }

    /// Presents `certificate` when the server asks for one.
    pub fn certificate(mut self, certificate: CertifiedKey) -> Self {
        self.certificate = Some(certificate);
        self
    }

    /// Requires the server certificate to name `name`.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Offers a DTLS Connection ID (see [`ClientConfig::connection_id`]).
    pub fn connection_id(mut self, cid: impl Into<Vec<u8>>) -> Self {
        self.connection_id = Some(cid.into());
        self
    }
}

/// Whether a server asks clients for certificates.
#[derive(Debug, Clone, Default)]
pub enum ClientAuth {
    /// No client certificates (PSK clients authenticate with their key).
    #[default]
    None,
    /// Ask for a certificate chaining to these CAs; a client without one may continue.
    Optional(Vec<X509>),
    /// Require a certificate chaining to these CAs.
    Required(Vec<X509>),
}

/// A server's configuration.
#[derive(Clone)]
pub struct ServerConfig {
    /// Common session settings.
    pub session: SessionConfig,
    /// Keys for PSK clients.
    pub psk_store: Option<Arc<dyn PskStore>>,
    /// The server's certificate, for certificate suites.
    pub certificate: Option<CertifiedKey>,
    /// Client certificate policy.
    pub client_auth: ClientAuth,
    /// PSK identity hint sent in ServerKeyExchange. Default none: node-dtls-client aborts on
    /// a hint.
    pub psk_identity_hint: Option<String>,
    /// Sessions kept for resumption. Default 20,000; 0 disables resumption.
    pub session_cache_size: u32,
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("session", &self.session)
            .field("psk_store", &self.psk_store.is_some())
            .field("certificate", &self.certificate)
            .field("client_auth", &self.client_auth)
            .field("session_cache_size", &self.session_cache_size)
            .finish()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            session: SessionConfig::default(),
            psk_store: None,
            certificate: None,
            client_auth: ClientAuth::None,
            psk_identity_hint: None,
            session_cache_size: 20_000,
        }
    }
}

impl ServerConfig {
    /// A PSK server with default session settings.
    pub fn psk(store: impl PskStore) -> Self {
        Self { psk_store: Some(Arc::new(store)), ..Self::default() }
    }

    /// A certificate server with default session settings.
    pub fn x509(certificate: CertifiedKey) -> Self {
        Self { certificate: Some(certificate), ..Self::default() }
    }

    /// Sets the common session settings.
    pub fn session(mut self, session: SessionConfig) -> Self {
        self.session = session;
        self
    }

    /// Adds a PSK store (a server may accept PSK and certificate clients at once).
    pub fn psk_store(mut self, store: Arc<dyn PskStore>) -> Self {
        self.psk_store = Some(store);
        self
    }

    /// Adds a certificate.
    pub fn certificate(mut self, certificate: CertifiedKey) -> Self {
        self.certificate = Some(certificate);
        self
    }

    /// Sets the client certificate policy.
    pub fn client_auth(mut self, client_auth: ClientAuth) -> Self {
        self.client_auth = client_auth;
        self
    }

    /// Sets the session cache size.
    pub fn session_cache_size(mut self, size: u32) -> Self {
        self.session_cache_size = size;
        self
    }
}

/// A compiled configuration: the OpenSSL context plus the timing policy, shared by every
/// session made from it.
pub struct DtlsContext {
    pub(crate) ssl: SslContext,
    pub(crate) role: Role,
    pub(crate) session: SessionConfig,
    /// A client's Connection ID offer.
    pub(crate) connection_id: Option<Vec<u8>>,
    /// A server's sessions for abbreviated handshakes.
    pub(crate) resumption: Option<Arc<Mutex<ResumptionCache>>>,
}

impl fmt::Debug for DtlsContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DtlsContext").field("role", &self.role).finish_non_exhaustive()
    }
}

impl DtlsContext {
    /// Compiles a client configuration.
    pub fn client(config: ClientConfig) -> Result<Arc<Self>, ConfigError> {
        config.session.validate()?;
        let has_psk = config.psk.is_some();
        let has_x509 = !config.trust_anchors.is_empty();
        if !has_psk && !has_x509 {
            return Err(ConfigError::NoCredentials("a client needs a psk or trust anchors"));
        }
        let mut builder = base_builder(&config.session, has_psk, has_x509)?;
        if let Some((identity, key)) = config.psk {
            check_psk_identity(&identity)?;
            builder.set_psk_client_callback(move |ssl, _hint, identity_out, key_out| {
                // A session may carry its own identity and key (a fleet on one context).
                let (identity, key) = match ssl.ex_data(psk_override_index()) {
                    Some(own) => (&own.identity[..], &own.key.0[..]),
                    None => (&identity[..], &key.0[..]),
                };
                let (Some(id_slot), Some(key_slot)) =
                    (identity_out.get_mut(..=identity.len()), key_out.get_mut(..key.len()))
                else {
                    return Ok(0);
                };
                id_slot[..identity.len()].copy_from_slice(identity);
                id_slot[identity.len()] = 0;
                key_slot.copy_from_slice(key);
                Ok(key.len())
            });
        }
        if has_x509 {
            builder.set_cert_store(trust_store(&config.trust_anchors)?);
            builder.set_verify(SslVerifyMode::PEER);
            if let Some(name) = &config.server_name {
                builder.verify_param_mut().set_host(name)?;
            }
        }
        if let Some(cert) = &config.certificate {
            install_certificate(&mut builder, cert)?;
        }
        if !config.offer_extended_master_secret {
            builder.set_options(SslOptions::from_bits_retain(NO_EXTENDED_MASTER_SECRET));
        }
        if config.connection_id.as_ref().is_some_and(|cid| cid.len() > 255) {
            return Err(ConfigError::InvalidConnectionId("at most 255 bytes"));
        }
        add_connection_id_extension(&mut builder)?;
        Ok(Arc::new(Self {
            ssl: builder.build(),
            role: Role::Client,
            session: config.session,
            connection_id: config.connection_id,
            resumption: None,
        }))
    }

    /// Compiles a server configuration.
    pub fn server(config: ServerConfig) -> Result<Arc<Self>, ConfigError> {
        config.session.validate()?;
        let has_psk = config.psk_store.is_some();
        let has_x509 = config.certificate.is_some();
        if !has_psk && !has_x509 {
            return Err(ConfigError::NoCredentials("a server needs a psk store or a certificate"));
        }
        let mut builder = base_builder(&config.session, has_psk, has_x509)?;
        if let Some(store) = config.psk_store {
            builder.set_psk_server_callback(move |_ssl, identity, key_out| {
                let Some(key) = identity.and_then(|id| store.key(id)) else {
                    return Ok(0);
                };
                let Some(slot) = key_out.get_mut(..key.0.len()) else {
                    return Ok(0);
                };
                slot.copy_from_slice(&key.0);
                Ok(key.0.len())
            });
            if let Some(hint) = &config.psk_identity_hint {
                let hint = std::ffi::CString::new(hint.as_str())
                    .map_err(|_| ConfigError::InvalidPsk("identity hint contains NUL"))?;
                super::ffi::use_psk_identity_hint(&mut builder, &hint)?;
            }
        }
        if let Some(cert) = &config.certificate {
            install_certificate(&mut builder, cert)?;
        }
        match &config.client_auth {
            ClientAuth::None => builder.set_verify(SslVerifyMode::NONE),
            ClientAuth::Optional(cas) | ClientAuth::Required(cas) => {
                builder.set_cert_store(trust_store(cas)?);
                let mut mode = SslVerifyMode::PEER;
                if matches!(config.client_auth, ClientAuth::Required(_)) {
                    mode |= SslVerifyMode::FAIL_IF_NO_PEER_CERT;
                }
                builder.set_verify(mode);
            }
        }
        // Sessions to resume live in tether's cache, not OpenSSL's: established sessions
        // leave OpenSSL (see `resumption`).
        let resumption = if config.session_cache_size == 0 {
            builder.set_session_cache_mode(SslSessionCacheMode::OFF);
            None
        } else {
            builder.set_session_cache_mode(SslSessionCacheMode::SERVER | SslSessionCacheMode::NO_INTERNAL);
            let cache = Arc::new(Mutex::new(ResumptionCache::new(config.session_cache_size as usize)));
            super::ffi::serve_sessions_from(&mut builder, Arc::clone(&cache));
            Some(cache)
        };
        builder.set_session_id_context(b"tether-dtls")?;
        add_connection_id_extension(&mut builder)?;
        offer_cbc_only_with_encrypt_then_mac(&mut builder, &config.session, has_psk, has_x509)?;
        // DTLSv1_listen requires both callbacks. The endpoint checks cookies itself before a
        // session exists and leaves the verified cookie on the new SSL for OpenSSL to
        // compare; OpenSSL is never asked to generate one.
        builder.set_cookie_generate_cb(|_ssl, _out| Err(openssl::error::ErrorStack::get()));
        builder.set_cookie_verify_cb(|ssl, cookie| {
            ssl.ex_data(verified_cookie_index()).is_some_and(|expected| expected.0 == cookie)
        });
        Ok(Arc::new(Self {
            ssl: builder.build(),
            role: Role::Server,
            session: config.session,
            connection_id: None,
            resumption,
        }))
    }

    /// The role of sessions made from this context.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The common session settings.
    pub fn session_config(&self) -> &SessionConfig {
        &self.session
    }

    /// Sessions held for abbreviated handshakes (a server with a session cache).
    pub fn resumable_sessions(&self) -> usize {
        self.resumption.as_ref().map_or(0, |cache| lock(cache).len())
    }

    /// The resumption entry (OpenSSL's DER of the session) of `session_id`, to persist.
    pub fn resumption_entry(&self, session_id: &[u8]) -> Option<Vec<u8>> {
        let der = self.resumption.as_ref().and_then(|cache| lock(cache).get(session_id).map(<[u8]>::to_vec))?;
        let session = openssl::ssl::SslSession::from_der(&der).ok()?;
        (session.id() == session_id).then_some(der)
    }

    /// Stores a resumption entry (from [`DtlsContext::resumption_entry`], after a restart).
    pub fn insert_resumption_entry(&self, session_id: &[u8], der: Vec<u8>) {
        if let Some(cache) = &self.resumption {
            lock(cache).insert(session_id, der.into_boxed_slice());
        }
    }

    /// Whether a ClientHello's `session_id` names a session this server can resume.
    pub fn knows_session(&self, session_id: &[u8]) -> bool {
        self.resumption.as_ref().is_some_and(|cache| lock(cache).get(session_id).is_some())
    }

    pub(crate) fn forget_resumption_entry(&self, session_id: &[u8]) {
        if let Some(cache) = &self.resumption {
            lock(cache).remove(session_id);
        }
    }
}

/// Locks the resumption cache; a panic elsewhere cannot leave it half-updated (every
/// operation is a single map update), so a poisoned lock is taken as it is.
pub(crate) fn lock(cache: &Mutex<ResumptionCache>) -> std::sync::MutexGuard<'_, ResumptionCache> {
    cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A client session's own PSK identity and key, overriding its context's.
pub(crate) struct PskOverride {
    pub(crate) identity: Vec<u8>,
    pub(crate) key: PskKey,
}

pub(crate) fn psk_override_index() -> openssl::ex_data::Index<openssl::ssl::Ssl, PskOverride> {
    static INDEX: OnceLock<openssl::ex_data::Index<openssl::ssl::Ssl, PskOverride>> = OnceLock::new();
    *INDEX.get_or_init(|| openssl::ssl::Ssl::new_ex_index().expect("ssl ex_data index"))
}

/// Checks a PSK identity: 1 to 128 bytes, no NUL (OpenSSL passes it as a C string).
pub(crate) fn check_psk_identity(identity: &[u8]) -> Result<(), ConfigError> {
    if identity.is_empty() || identity.len() > 128 || identity.contains(&0) {
        return Err(ConfigError::InvalidPsk("identity must be 1 to 128 non-NUL bytes"));
    }
    Ok(())
}

/// The `connection_id` extension's code point (RFC 9146 §3).
const CONNECTION_ID_EXTENSION: u16 = 54;

/// Connection IDs of one handshake, kept on its `SSL`: the one this side asks for (set
/// before the handshake) and the peer's (parsed from its hello).
#[derive(Debug, Clone, Default)]
pub(crate) struct ConnectionIds {
    pub(crate) ours: Option<Vec<u8>>,
    pub(crate) peer: Option<Vec<u8>>,
}

pub(crate) fn connection_id_index() -> openssl::ex_data::Index<openssl::ssl::Ssl, ConnectionIds> {
    static INDEX: OnceLock<openssl::ex_data::Index<openssl::ssl::Ssl, ConnectionIds>> = OnceLock::new();
    *INDEX.get_or_init(|| openssl::ssl::Ssl::new_ex_index().expect("ssl ex_data index"))
}

/// Registers the `connection_id` extension (RFC 9146) with OpenSSL as a custom extension:
/// `opaque cid<0..2^8-1>` in ClientHello and ServerHello. A client offers the CID on its
/// `SSL`; a server answers only a client that offered, and only when the endpoint gave the
/// session a CID of its own.
fn add_connection_id_extension(builder: &mut SslContextBuilder) -> Result<(), ConfigError> {
    let context = ExtensionContext::DTLS_ONLY
        | ExtensionContext::TLS1_2_AND_BELOW_ONLY
        | ExtensionContext::CLIENT_HELLO
        | ExtensionContext::TLS1_2_SERVER_HELLO;
    builder.add_custom_ext(
        CONNECTION_ID_EXTENSION,
        context,
        |ssl: &mut SslRef, context, _| -> Result<Option<Vec<u8>>, SslAlert> {
            let answering = context.contains(ExtensionContext::TLS1_2_SERVER_HELLO);
            // tether's record layer protects CID records with AEAD suites only: a server that
            // chose a CBC suite does not take the client's offer.
            let chosen = super::ffi::pending_cipher_name(ssl).and_then(|name| CipherSuite::from_openssl_name(&name));
            if answering && chosen.is_some_and(CipherSuite::is_cbc) {
                if let Some(ids) = ssl.ex_data_mut(connection_id_index()) {
                    *ids = ConnectionIds { ours: None, peer: None };
                }
                return Ok(None);
            }
            let Some(ids) = ssl.ex_data(connection_id_index()) else { return Ok(None) };
            if answering && ids.peer.is_none() {
                return Ok(None);
            }
            Ok(ids.ours.as_ref().map(|cid| {
                let mut data = Vec::with_capacity(1 + cid.len());
                data.push(cid.len() as u8);
                data.extend_from_slice(cid);
                data
            }))
        },
        |ssl: &mut SslRef, _, data: &[u8], _| -> Result<(), SslAlert> {
            let (len, cid) = data.split_first().ok_or(SslAlert::DECODE_ERROR)?;
            if usize::from(*len) != cid.len() {
                return Err(SslAlert::DECODE_ERROR);
            }
            match ssl.ex_data_mut(connection_id_index()) {
                Some(ids) => ids.peer = Some(cid.to_vec()),
                None => ssl.set_ex_data(connection_id_index(), ConnectionIds { ours: None, peer: Some(cid.to_vec()) }),
            }
            Ok(())
        },
    )?;
    Ok(())
}

/// The `encrypt_then_mac` extension's code point (RFC 7366).
const ENCRYPT_THEN_MAC_EXTENSION: u32 = 22;

/// With CBC suites configured, a server chooses one only for a client that offers
/// Encrypt-then-MAC (RFC 7366): for any other, the `SSL` is restricted to the AEAD suites
/// before OpenSSL selects (and the handshake fails if none is configured). MAC-then-encrypt
/// CBC, the Lucky Thirteen construction, never reaches tether's record layer.
fn offer_cbc_only_with_encrypt_then_mac(
    builder: &mut SslContextBuilder,
    session: &SessionConfig,
    psk: bool,
    x509: bool,
) -> Result<(), ConfigError> {
    if !session.cipher_suites.iter().any(|s| s.is_cbc()) {
        return Ok(());
    }
    let aead: Vec<&str> = session
        .cipher_suites
        .iter()
        .filter(|s| !s.is_cbc() && if s.is_psk() { psk } else { x509 })
        .map(|s| s.openssl_name())
        .collect();
    let aead = aead.join(":");
    builder.set_client_hello_callback(move |ssl, alert| {
        if super::ffi::client_hello_has_extension(ssl, ENCRYPT_THEN_MAC_EXTENSION) {
            return Ok(openssl::ssl::ClientHelloResponse::SUCCESS);
        }
        if aead.is_empty() || ssl.set_cipher_list(&aead).is_err() {
            *alert = SslAlert::HANDSHAKE_FAILURE;
            return Err(openssl::error::ErrorStack::get());
        }
        Ok(openssl::ssl::ClientHelloResponse::SUCCESS)
    });
    Ok(())
}

/// `SSL_OP_NO_EXTENDED_MASTER_SECRET` (OpenSSL 3.0), which the crate does not name.
const NO_EXTENDED_MASTER_SECRET: u64 = 1;

/// The cookie the endpoint verified, left on a new server SSL for OpenSSL's verify callback.
pub(crate) struct VerifiedCookie(pub(crate) Vec<u8>);

pub(crate) fn verified_cookie_index() -> openssl::ex_data::Index<openssl::ssl::Ssl, VerifiedCookie> {
    static INDEX: OnceLock<openssl::ex_data::Index<openssl::ssl::Ssl, VerifiedCookie>> = OnceLock::new();
    *INDEX.get_or_init(|| openssl::ssl::Ssl::new_ex_index().expect("ssl ex_data index"))
}

fn retransmit_index() -> openssl::ex_data::Index<SslContext, RetransmitPolicy> {
    static INDEX: OnceLock<openssl::ex_data::Index<SslContext, RetransmitPolicy>> = OnceLock::new();
    *INDEX.get_or_init(|| SslContext::new_ex_index().expect("ssl_ctx ex_data index"))
}

/// The next retransmission timeout in microseconds after `timer_us` (0: the first), by the
/// context's policy. Called from OpenSSL's timer callback.
pub(crate) fn next_retransmit_us(ssl: &openssl::ssl::SslRef, timer_us: u32) -> u32 {
    let policy = ssl.ssl_context().ex_data(retransmit_index()).copied().unwrap_or_default();
    let next = policy.next(Duration::from_micros(u64::from(timer_us)));
    u32::try_from(next.as_micros()).unwrap_or(u32::MAX)
}

fn base_builder(session: &SessionConfig, psk: bool, x509: bool) -> Result<SslContextBuilder, ConfigError> {
    let mut builder = SslContextBuilder::new(SslMethod::dtls())?;
    builder.set_min_proto_version(Some(SslVersion::DTLS1_2))?;
    builder.set_max_proto_version(Some(SslVersion::DTLS1_2))?;
    builder.set_options(SslOptions::NO_QUERY_MTU | SslOptions::NO_RENEGOTIATION | SslOptions::NO_TICKET);
    let suites: Vec<&str> = session
        .cipher_suites
        .iter()
        .filter(|s| if s.is_psk() { psk } else { x509 })
        .map(|s| s.openssl_name())
        .collect();
    if suites.is_empty() {
        return Err(ConfigError::NoUsableCipherSuite);
    }
    let mut list = suites.join(":");
    // OpenSSL 3.2 moved CCM8 below security level 1; tinydtls peers offer nothing else.
    if openssl::version::number() >= 0x3020_0000 && list.contains("CCM8") {
        list.push_str(":@SECLEVEL=0");
    }
    builder.set_cipher_list(&list)?;
    if x509 {
        builder.set_groups_list("P-256")?;
        builder.set_sigalgs_list("ECDSA+SHA256")?;
    }
    builder.set_ex_data(retransmit_index(), session.retransmit);
    Ok(builder)
}

fn trust_store(cas: &[X509]) -> Result<openssl::x509::store::X509Store, ConfigError> {
    let mut store = X509StoreBuilder::new()?;
    for ca in cas {
        store.add_cert(ca.clone())?;
    }
    Ok(store.build())
}

fn install_certificate(builder: &mut SslContextBuilder, cert: &CertifiedKey) -> Result<(), ConfigError> {
    let (leaf, chain) = cert.chain.split_first().ok_or(ConfigError::NoCredentials("empty certificate chain"))?;
    builder.set_certificate(leaf)?;
    for extra in chain {
        builder.add_extra_chain_cert(extra.clone())?;
    }
    builder.set_private_key(&cert.key)?;
    builder.check_private_key()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retransmit_policy_doubles_to_the_cap() {
        let policy = RetransmitPolicy { initial: Duration::from_secs(1), max: Duration::from_secs(60) };
        let mut t = Duration::ZERO;
        let mut seen = Vec::new();
        for _ in 0..9 {
            t = policy.next(t);
            seen.push(t.as_secs());
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn psk_key_debug_hides_the_key() {
        let key = PskKey::from_hex("73656372657450534b").unwrap();
        assert_eq!(key.expose(), b"secretPSK");
        assert!(!format!("{key:?}").contains("secret"));
        assert!(PskKey::from_hex("abc").is_err());
        assert!(PskKey::from_hex("zz").is_err());
    }

    #[test]
    fn bad_settings_are_named() {
        let key = PskKey::new(b"k".to_vec()).unwrap();
        let err = DtlsContext::client(ClientConfig::psk("id", key.clone()).session(SessionConfig::default().mtu(100)))
            .unwrap_err();
        assert!(err.to_string().contains("mtu 100"), "{err}");
        let err = DtlsContext::client(
            ClientConfig::psk("id", key)
                .session(SessionConfig::default().retransmit(Duration::from_millis(1), Duration::from_secs(1))),
        )
        .unwrap_err();
        assert!(err.to_string().contains("retransmit.initial"), "{err}");
        let err = DtlsContext::client(ClientConfig::default()).unwrap_err();
        assert!(err.to_string().contains("no credentials"), "{err}");
    }
}
