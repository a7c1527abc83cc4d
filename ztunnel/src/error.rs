//! Errors of the ztunnel library, said so an operator can act on them.

use std::net::SocketAddr;

/// Why ztunnel (or one workload's proxy) could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error(
        "cannot listen on {addr} for {workload}: {source} (is another ztunnel serving this workload address?)"
    )]
    Bind {
        /// The workload's uid.
        workload: String,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The node agent announced a pod whose namespace or service account makes no identity.
    #[error("the announced pod has no valid identity: {0}")]
    AnnouncedIdentity(hbone::IdentityError),
    /// A certificate could not be issued.
    #[error(transparent)]
    Cert(#[from] hbone::CertError),
    /// HBONE setup failed.
    #[error(transparent)]
    Hbone(#[from] hbone::Error),
    /// The configuration could not be loaded.
    #[error(transparent)]
    Config(#[from] mesh::ConfigError),
}
