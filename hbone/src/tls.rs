//! rustls configuration for HBONE, as upstream ztunnel configures it.
//!
//! TLS 1.3 only, AES-GCM suites only (no ChaCha20), ALPN `h2`, no SNI, always mutual.
//! * The **server** requires a client certificate that chains to the mesh roots and carries a SPIFFE
//!   identity in the server's own trust domain. *Which* identity may connect is authorization's job.
//! * The **client** checks the chain and that the server's SPIFFE identity is one of an expected set.
//!   DNS names are never checked: HBONE dials pod IPs, and identities live in URI SANs.

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms, ring};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::cert::identities_of;
use crate::identity::Identity;
use crate::manager::CertHandle;

/// The only ALPN protocol HBONE speaks.
pub const ALPN_H2: &[u8] = b"h2";

/// ring with upstream ztunnel's suite and group choices.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
                    ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
                ],
                kx_groups: vec![
                    ring::kx_group::X25519,
                    ring::kx_group::SECP256R1,
                    ring::kx_group::SECP384R1,
                ],
                ..ring::default_provider()
            })
        })
        .clone()
}

/// A server config presenting `cert`'s current certificate at every handshake.
pub fn server_config(cert: CertHandle) -> Result<Arc<ServerConfig>, rustls::Error> {
    let current = cert.current();
    let webpki = WebPkiClientVerifier::builder_with_provider(current.roots().clone(), provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let verifier = TrustDomainVerifier {
        inner: webpki,
        trust_domain: current.identity().trust_domain().into(),
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(Current(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A client config presenting `cert` and accepting only servers proving one of `expected`.
pub fn client_config(
    cert: CertHandle,
    expected: Arc<[Identity]>,
) -> Result<Arc<ClientConfig>, rustls::Error> {
    let verifier = SpiffeServerVerifier {
        roots: cert.current().roots().clone(),
        expected,
        algs: provider().signature_verification_algorithms,
    };
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(Current(cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    // Like upstream: a resumed session would skip the identity check of a re-keyed peer.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The server name rustls needs: the peer's IP (never sent, since SNI is off).
pub(crate) fn server_name(addr: std::net::SocketAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.ip().into())
}

/// The peer's identity on an established connection: the first SPIFFE URI SAN of its leaf in
/// `trust_domain` (the verifiers above guarantee there is one).
pub fn peer_identity(conn: &rustls::CommonState, trust_domain: &str) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    identities_of(leaf)
        .into_iter()
        .find(|id| id.trust_domain() == trust_domain)
}

// === impl Current ===

/// Resolves the certificate in force at handshake time, so renewals apply to new connections.
struct Current(CertHandle);

impl fmt::Debug for Current {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Current").field(self.0.identity()).finish()
    }
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key().clone())
    }
}

impl ResolvesClientCert for Current {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current().certified_key().clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Why a peer certificate was refused after its chain verified.
#[derive(Debug, thiserror::Error)]
enum IdentityMismatch {
    #[error(
        "client certificate has no SPIFFE identity in trust domain {trust_domain:?} (found {found:?})"
    )]
    TrustDomain {
        trust_domain: String,
        found: Vec<Identity>,
    },
    #[error("server identity {found:?} is not one of the expected {expected:?}")]
    Unexpected {
        expected: Arc<[Identity]>,
        found: Vec<Identity>,
    },
}

/// Whether `err` is a handshake that failed because the peer's certificate, valid as it was,
/// named an identity other than the expected ones.
pub(crate) fn is_identity_mismatch(err: &std::io::Error) -> bool {
    let Some(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner)))) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return false;
    };
    inner.is::<IdentityMismatch>()
}

fn refuse(err: IdentityMismatch) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(err))))
}

// === impl TrustDomainVerifier ===

#[derive(Debug)]
struct TrustDomainVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for TrustDomainVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let found = identities_of(end_entity);
        if found
            .iter()
            .any(|id| id.trust_domain() == self.trust_domain)
        {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(refuse(IdentityMismatch::TrustDomain {
                trust_domain: self.trust_domain.clone(),
                found,
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

// === impl SpiffeServerVerifier ===

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Arc<[Identity]>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let found = identities_of(end_entity);
        if found.iter().any(|id| self.expected.contains(id)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(refuse(IdentityMismatch::Unexpected {
                expected: self.expected.clone(),
                found,
            }))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
