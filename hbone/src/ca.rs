//! A local mesh certificate authority: loads a root (certificate and PKCS#8 key, PEM) or makes one,
//! and mints workload certificates the way istiod does: ECDSA P-256, an empty subject, exactly one
//! URI SAN (the SPIFFE identity), server and client EKU, short-lived.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::cert::{CertError, WorkloadCert};
use crate::identity::Identity;

/// Istio's default workload certificate lifetime (`SECRET_TTL`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// How far `not_before` is set in the past: X.509 times have one-second resolution, and a peer
/// whose clock runs a little behind must not see a brand-new certificate as not yet valid.
const BACKDATE: Duration = Duration::from_secs(1);

/// The mesh root and its signing key.
pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
    ttl: Duration,
}

impl MeshCa {
    /// Generates a new self-signed ECDSA P-256 root, valid for ten years, named after the trust domain.
    pub fn generate(trust_domain: &str) -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + Duration::from_secs(10 * 365 * 24 * 60 * 60)).into();
        params.serial_number = Some(random_serial());
        let root = params.self_signed(&key)?;
        Ok(MeshCa {
            root_pem: root.pem(),
            root: root.der().clone(),
            issuer: Issuer::new(params, key),
            ttl: DEFAULT_TTL,
        })
    }

    /// Loads a root certificate and its PKCS#8 private key (both PEM).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let root =
            CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|e| CertError::Pem {
                what: "root certificate",
                reason: e.to_string(),
            })?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::Pem {
            what: "root key (PKCS#8 PEM expected)",
            reason: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_der(&root, key)?;
        Ok(MeshCa {
            issuer,
            root_pem: cert_pem.to_owned(),
            root,
            ttl: DEFAULT_TTL,
        })
    }

    /// Sets the lifetime of the certificates [`MeshCa::issue`] mints.
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The root certificate (DER).
    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The root certificate (PEM).
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// The root's private key (PKCS#8 PEM), to persist a generated CA.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Mints a certificate for `identity`, valid from now for the configured TTL.
    pub fn issue(&self, identity: &Identity) -> Result<WorkloadCert, CertError> {
        let now = SystemTime::now();
        self.issue_with_validity(identity, now - BACKDATE, now + self.ttl)
    }

    /// Mints a certificate with an explicit validity window (tests use it for expired certificates).
    pub fn issue_with_validity(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<WorkloadCert, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&key, &self.issuer)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        WorkloadCert::new(
            identity.clone(),
            vec![leaf.der().clone()],
            &key,
            vec![self.root.clone()],
        )
    }
}

impl fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshCa")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Positive 127-bit serials: unique per certificate, so a renewal is distinguishable.
fn random_serial() -> SerialNumber {
    let mut bytes = rand::random::<[u8; 16]>();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cert::LeafFacts;

    #[test]
    fn issues_spiffe_leaf() {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let id: Identity = "spiffe://cluster.local/ns/default/sa/reviews"
            .parse()
            .unwrap();
        let cert = ca.issue(&id).unwrap();
        assert_eq!(cert.identity(), &id);
        let facts = LeafFacts::parse(cert.leaf()).unwrap();
        assert_eq!(facts.identities, vec![id.clone()]);
        let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap();
        assert!(lifetime >= DEFAULT_TTL && lifetime <= DEFAULT_TTL + Duration::from_secs(2));

        let (_, x509) = x509_parser::parse_x509_certificate(cert.leaf()).unwrap();
        let eku = x509.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let san = x509.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 1, "exactly one SAN");
        assert!(x509.subject().iter().next().is_none(), "empty subject");
        assert_eq!(
            x509.public_key().algorithm.algorithm,
            x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
        );

        let again = ca.issue(&id).unwrap();
        assert_ne!(again.serial(), cert.serial());
    }

    #[test]
    fn round_trips_through_pem() {
        let ca = MeshCa::generate("example.org").unwrap();
        let loaded = MeshCa::from_pem(ca.root_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.root(), ca.root());
        let id: Identity = "spiffe://example.org/ns/a/sa/b".parse().unwrap();
        let cert = loaded.issue(&id).unwrap();
        assert_eq!(cert.root_ders(), &[ca.root().clone()]);
    }

    #[test]
    fn rejects_bad_pem() {
        let ca = MeshCa::generate("cluster.local").unwrap();
        let err = MeshCa::from_pem("not pem", &ca.key_pem()).unwrap_err();
        assert!(err.to_string().contains("root certificate"), "{err}");
        let err = MeshCa::from_pem(ca.root_pem(), "nope").unwrap_err();
        assert!(err.to_string().contains("root key"), "{err}");
    }
}
