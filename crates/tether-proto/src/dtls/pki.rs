//! A small development PKI: an ECDSA P-256 CA and the certificates it issues, for tests,
//! benchmarks and development servers. Validity is given in Unix seconds by the caller
//! (nothing here reads a clock).

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509Builder, X509NameBuilder, X509};

use super::config::CertifiedKey;
use super::error::ConfigError;

/// When a certificate is valid, in Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start of validity.
    pub not_before: i64,
    /// End of validity.
    pub not_after: i64,
}

impl Validity {
    /// Valid from a day before `now` for `days` days.
    pub fn days_around(now: i64, days: i64) -> Self {
        Self { not_before: now - 86_400, not_after: now + days * 86_400 }
    }
}

/// A certificate authority with its key.
#[derive(Clone)]
pub struct CertificateAuthority {
    /// The self-signed CA certificate (a trust anchor).
    pub certificate: X509,
    key: PKey<Private>,
    next_serial: u32,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority").field("subject", &self.certificate.subject_name()).finish()
    }
}

/// A new ECDSA P-256 private key.
pub fn generate_p256_key() -> Result<PKey<Private>, ConfigError> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

impl CertificateAuthority {
    /// A self-signed CA named `common_name`.
    pub fn generate(common_name: &str, validity: Validity) -> Result<Self, ConfigError> {
        let key = generate_p256_key()?;
        let mut builder = base(common_name, &key, validity, 1)?;
        let issuer = name(common_name)?;
        builder.set_issuer_name(&issuer)?;
        builder.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        builder.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build()?)?;
        builder.sign(&key, MessageDigest::sha256())?;
        Ok(Self { certificate: builder.build(), key, next_serial: 2 })
    }

    /// Issues an end-entity certificate for `common_name` (also its DNS SAN) with a fresh key.
    pub fn issue(&mut self, common_name: &str, validity: Validity) -> Result<CertifiedKey, ConfigError> {
        let key = generate_p256_key()?;
        let mut builder = base(common_name, &key, validity, self.next_serial)?;
        self.next_serial += 1;
        builder.set_issuer_name(self.certificate.subject_name())?;
        builder.append_extension(BasicConstraints::new().build()?)?;
        builder.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
        let san = SubjectAlternativeName::new()
            .dns(common_name)
            .build(&builder.x509v3_context(Some(&self.certificate), None))?;
        builder.append_extension(san)?;
        builder.sign(&self.key, MessageDigest::sha256())?;
        Ok(CertifiedKey { chain: vec![builder.build()], key })
    }
}

fn name(common_name: &str) -> Result<openssl::x509::X509Name, ConfigError> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    Ok(name.build())
}

fn base(common_name: &str, key: &PKey<Private>, validity: Validity, serial: u32) -> Result<X509Builder, ConfigError> {
    let mut builder = X509Builder::new()?;
    builder.set_version(2)?;
    let serial = BigNum::from_u32(serial)?;
    let serial = Asn1Integer::from_bn(&serial)?;
    builder.set_serial_number(&serial)?;
    let subject = name(common_name)?;
    builder.set_subject_name(&subject)?;
    builder.set_pubkey(key)?;
    let not_before = Asn1Time::from_unix(validity.not_before)?;
    let not_after = Asn1Time::from_unix(validity.not_after)?;
    builder.set_not_before(&not_before)?;
    builder.set_not_after(&not_after)?;
    Ok(builder)
}
