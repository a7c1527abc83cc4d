//! A workload certificate: the leaf (and intermediates), its private key, and the mesh roots that
//! peers' certificates must chain to.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::identity::Identity;

/// Errors building, loading or reading certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// Certificate generation or signing failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM input held no usable item.
    #[error("{what}: {reason}")]
    Pem {
        /// What was being read (e.g. "root certificate").
        what: &'static str,
        /// Why it could not be used.
        reason: String,
    },
    /// A certificate could not be parsed as X.509.
    #[error("certificate is not valid X.509: {0}")]
    Parse(String),
    /// rustls refused the key or certificates.
    #[error("TLS rejected the certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
    /// The certificate does not carry the identity it was issued for.
    #[error("certificate carries no SPIFFE identity {0}")]
    WrongIdentity(Identity),
    /// The certificate provider could not issue a certificate.
    #[error("could not obtain a certificate for {identity}: {reason}")]
    Provider {
        /// The identity asked for.
        identity: Identity,
        /// The provider's reason.
        reason: String,
    },
}

/// A leaf certificate with its key and trust roots, ready for rustls.
#[derive(Clone)]
pub struct WorkloadCert {
    identity: Identity,
    certified: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    root_ders: Arc<[CertificateDer<'static>]>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
}

impl WorkloadCert {
    /// Assembles a workload certificate. `chain` is leaf first; `roots` are the mesh trust anchors.
    /// The leaf must carry `identity` as a URI SAN.
    pub fn new(
        identity: Identity,
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'_>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, CertError> {
        let leaf = chain.first().ok_or_else(|| CertError::Pem {
            what: "certificate chain",
            reason: "is empty".into(),
        })?;
        let facts = LeafFacts::parse(leaf)?;
        if !facts.identities.contains(&identity) {
            return Err(CertError::WrongIdentity(identity));
        }
        let signer = rustls::crypto::ring::sign::any_supported_type(key)?;
        let (roots, root_ders) = trust_store(roots)?;
        Ok(WorkloadCert {
            identity,
            certified: Arc::new(CertifiedKey::new(chain, signer)),
            roots,
            root_ders,
            not_before: facts.not_before,
            not_after: facts.not_after,
            serial: facts.serial,
        })
    }

    /// The same certificate trusting `roots` instead (a trust bundle, e.g. during root rotation).
    pub fn with_roots(&self, roots: Vec<CertificateDer<'static>>) -> Result<Self, CertError> {
        let (roots, root_ders) = trust_store(roots)?;
        Ok(WorkloadCert {
            roots,
            root_ders,
            ..self.clone()
        })
    }

    /// The identity this certificate proves.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Chain and signing key, as rustls presents them.
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.certified
    }

    /// The chain it presents, leaf first (DER).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.certified.cert
    }

    /// The leaf certificate (DER).
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.certified.cert[0]
    }

    /// The mesh roots peers must chain to.
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }

    /// The mesh roots as DER, for dumps and for building other trust stores.
    pub fn root_ders(&self) -> &[CertificateDer<'static>] {
        &self.root_ders
    }

    /// Start of validity.
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// The leaf's serial number in hex: distinguishes a renewed certificate from the old one.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// When to renew: at half of the validity period, as Istio does, so a failed renewal has the
    /// other half to be retried before anything breaks.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + lifetime / 2
    }
}

impl fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity)
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

type TrustStore = (Arc<RootCertStore>, Arc<[CertificateDer<'static>]>);

fn trust_store(roots: Vec<CertificateDer<'static>>) -> Result<TrustStore, CertError> {
    let mut store = RootCertStore::empty();
    for root in &roots {
        store.add(root.clone())?;
    }
    Ok((Arc::new(store), roots.into()))
}

/// What we read from a leaf certificate.
#[derive(Debug)]
pub(crate) struct LeafFacts {
    /// Every URI SAN that is a SPIFFE identity, in certificate order.
    pub(crate) identities: Vec<Identity>,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    pub(crate) serial: String,
}

impl LeafFacts {
    pub(crate) fn parse(der: &CertificateDer<'_>) -> Result<Self, CertError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
        let mut identities = Vec::new();
        for ext in cert.extensions() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
                identities.extend(san.general_names.iter().filter_map(|name| match name {
                    GeneralName::URI(uri) => uri.parse::<Identity>().ok(),
                    _ => None,
                }));
            }
        }
        let validity = cert.validity();
        Ok(LeafFacts {
            identities,
            not_before: system_time(validity.not_before),
            not_after: system_time(validity.not_after),
            serial: cert.tbs_certificate.raw_serial_as_string().replace(':', ""),
        })
    }
}

/// An ASN.1 time as a `SystemTime` (the epoch for anything before it).
fn system_time(t: x509_parser::time::ASN1Time) -> SystemTime {
    u64::try_from(t.timestamp()).map_or(SystemTime::UNIX_EPOCH, |secs| {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    })
}

/// One certificate of a chain as operators read it, and as upstream ztunnel's `/config_dump`
/// shows it.
#[derive(Debug, Clone)]
pub struct CertSummary {
    /// The certificate in PEM.
    pub pem: String,
    /// Its serial number in decimal.
    pub serial_number: String,
    /// Start of validity.
    pub valid_from: SystemTime,
    /// End of validity.
    pub expiration_time: SystemTime,
}

/// Reads `der` for a dump.
pub fn summarize(der: &CertificateDer<'_>) -> Result<CertSummary, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
    let validity = cert.validity();
    Ok(CertSummary {
        pem: pem::encode_config(
            &pem::Pem::new("CERTIFICATE", der.to_vec()),
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        ),
        serial_number: cert.tbs_certificate.serial.to_string(),
        valid_from: system_time(validity.not_before),
        expiration_time: system_time(validity.not_after),
    })
}

/// The SPIFFE identities in a peer's leaf certificate (URI SANs only; DNS names are never used).
pub fn identities_of(der: &CertificateDer<'_>) -> Vec<Identity> {
    LeafFacts::parse(der)
        .map(|f| f.identities)
        .unwrap_or_default()
}
