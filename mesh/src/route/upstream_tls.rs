//! DestinationRule `tls` → [`UpstreamTls`]: the TLS a waypoint originates to an endpoint out of
//! the mesh (an egress ServiceEntry's), as Envoy's upstream TLS context does.
//!
//! Mesh endpoints are always reached over HBONE, whatever the rule says, so `ISTIO_MUTUAL`
//! and `DISABLE` both leave plain connections plain. The files a rule names are read when the
//! configuration loads: one that cannot be read or parsed fails the load with the field named,
//! so the last good configuration stays in force.

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::lower_common::Problems;
use super::spec_destination::ClientTlsSettings;

/// TLS to originate to an endpoint out of the mesh.
#[derive(Clone, PartialEq)]
pub struct UpstreamTls {
    /// The server name sent and verified (`sni`); `None`: the request's host, as Istio's
    /// automatic SNI does.
    pub sni: Option<Arc<str>>,
    /// DER certificates the server's must chain to (`caCertificates`); `None`: the system's
    /// roots.
    pub ca: Option<Arc<[Vec<u8>]>>,
    /// The client certificate (`MUTUAL`).
    pub client: Option<Arc<ClientCertificate>>,
    /// Whether the server's certificate is verified (not `insecureSkipVerify`).
    pub verify: bool,
    /// A digest of all of the above: connections made under other settings (another CA, say)
    /// must not be reused for these.
    pub digest: u64,
}

/// A client certificate chain, leaf first, and its private key, all DER.
#[derive(Clone, PartialEq, Hash)]
pub struct ClientCertificate {
    /// The certificates.
    pub chain: Vec<Vec<u8>>,
    /// The key.
    pub key: Vec<u8>,
}

impl fmt::Debug for ClientCertificate {
    /// Without the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for UpstreamTls {
    /// Without the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("sni", &self.sni)
            .field("ca", &self.ca.as_ref().map(|c| c.len()))
            .field("client", &self.client.is_some())
            .field("verify", &self.verify)
            .finish()
    }
}

/// Lowers `tls` at `field`; `None` for plain connections.
pub(super) fn lower(
    tls: &ClientTlsSettings,
    field: &str,
    problems: &mut Problems,
) -> Option<Arc<UpstreamTls>> {
    let mutual = match tls.mode.as_deref().unwrap_or("DISABLE") {
        "DISABLE" | "ISTIO_MUTUAL" => return None,
        "SIMPLE" => false,
        "MUTUAL" => true,
        other => {
            problems.push(
                format!("{field}.mode"),
                format!("{other:?} is not DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL"),
            );
            return None;
        }
    };
    // Settings that would make verification stricter than what is applied are refused, not
    // dropped: the rule would otherwise be weaker than written.
    let mut unsupported = |what: &str, instead: &str| {
        let message = format!("is not supported by this waypoint; {instead}");
        problems.push(format!("{field}.{what}"), message);
    };
    if tls.credential_name.is_some() {
        unsupported(
            "credentialName",
            "name the files (caCertificates, clientCertificate, privateKey) instead",
        );
    }
    if !tls.subject_alt_names.is_empty() {
        unsupported(
            "subjectAltNames",
            "the certificate is verified against the SNI, which `sni` sets",
        );
    }
    if tls.ca_crl.is_some() {
        unsupported("caCrl", "revocation is not checked");
    }
    let ca = (tls.ca_certificates.as_deref()).and_then(|path| {
        let field = format!("{field}.caCertificates");
        let certs = certificates(path, &field, problems)?;
        Some(Arc::from(certs))
    });
    let client = match (&tls.client_certificate, &tls.private_key) {
        (Some(chain), Some(key)) if mutual => {
            let chain = certificates(chain, &format!("{field}.clientCertificate"), problems);
            let key = private_key(key, &format!("{field}.privateKey"), problems);
            let client = chain
                .zip(key)
                .map(|(chain, key)| ClientCertificate { chain, key });
            client.map(Arc::new)
        }
        (None, _) | (_, None) if mutual => {
            problems.push(
                field.to_owned(),
                "MUTUAL needs clientCertificate and privateKey",
            );
            None
        }
        _ => None,
    };
    let sni = (tls.sni.as_deref()).filter(|s| !s.is_empty());
    let verify = !tls.insecure_skip_verify.unwrap_or(false);
    let mut digest = DefaultHasher::new();
    (sni, &ca, &client, verify).hash(&mut digest);
    Some(Arc::new(UpstreamTls {
        sni: sni.map(Arc::from),
        ca,
        client,
        verify,
        digest: digest.finish(),
    }))
}

/// The certificates of the PEM file at `path`, each checked to parse as the waypoint's TLS
/// connector will parse it.
fn certificates(path: &str, field: &str, problems: &mut Problems) -> Option<Vec<Vec<u8>>> {
    let read = |e: &dyn fmt::Display| format!("cannot read certificates from {path:?}: {e}");
    let certs: Result<Vec<CertificateDer<'static>>, _> = match CertificateDer::pem_file_iter(path) {
        Ok(iter) => iter.collect(),
        Err(e) => Err(e),
    };
    let certs = match certs {
        Ok(certs) if certs.is_empty() => {
            problems.push(field, read(&"no certificate in the file"));
            return None;
        }
        Ok(certs) => certs,
        Err(e) => {
            problems.push(field, read(&e));
            return None;
        }
    };
    for cert in &certs {
        if let Err(e) = x509_parser::parse_x509_certificate(cert) {
            problems.push(field, read(&e));
            return None;
        }
    }
    Some(certs.into_iter().map(|c| c.to_vec()).collect())
}

/// The private key in the PEM file at `path`.
fn private_key(path: &str, field: &str, problems: &mut Problems) -> Option<Vec<u8>> {
    match PrivateKeyDer::from_pem_file(path) {
        // Only keys whose kind can be told from their DER, as the connector reads them.
        Ok(key) if PrivateKeyDer::try_from(key.secret_der()).is_ok() => {
            Some(key.secret_der().to_vec())
        }
        Ok(_) => {
            problems.push(field, format!("{path:?} holds a key of an unknown kind"));
            None
        }
        Err(e) => {
            problems.push(
                field,
                format!("cannot read a private key from {path:?}: {e}"),
            );
            None
        }
    }
}
