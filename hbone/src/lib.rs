//! HBONE: HTTP/2 CONNECT over mutual TLS, as Istio ambient's ztunnel speaks it on port 15008.
//!
//! Both of our proxies stand on this crate:
//! * [`Identity`]: SPIFFE workload identities, the only names HBONE trusts.
//! * [`MeshCa`], [`CertManager`]: workload certificates, minted locally and renewed at half-life.
//! * [`tls`]: rustls configured like upstream (TLS 1.3, ALPN `h2`, no SNI, SPIFFE verification).
//! * [`Server`]: accepts HBONE connections and hands each CONNECT to a [`Handler`].
//! * [`Pool`]: opens tunnels over pooled client connections.
//! * [`H2Stream`]: one tunnel as `AsyncRead + AsyncWrite` (and a Pingora `VirtualSocket` with the
//!   `pingora` feature).
//! * [`copy_bidirectional`]: moves bytes between a tunnel and a socket with half-close.

mod authority;
mod ca;
mod cert;
mod config;
mod copy;
mod dial;
pub mod drain;
mod error;
pub mod headers;
mod identity;
mod manager;
mod pool;
mod server;
mod stats;
mod stream;
pub mod tls;

pub use authority::{Authority, AuthorityError};
pub use ca::{DEFAULT_TTL, MeshCa};
pub use cert::{CertError, CertSummary, WorkloadCert, identities_of, summarize};
pub use config::Config;
pub use copy::{ChunkIo, Copied, CopyError, copy_bidirectional};
pub use dial::{Dial, DirectDial, SourceDial, canonical, connect_from, source_for};
pub use error::{Error, Step};
pub use headers::ConnectHeaders;
pub use identity::{Identity, IdentityError};
pub use manager::{CertHandle, CertManager, CertificateProvider};
pub use pool::{ConnectRequest, Pool};
pub use server::{Handler, InboundRequest, Server};
pub use stats::{Gauge, Stats};
pub use stream::H2Stream;

/// The port peers dial for HBONE.
pub const HBONE_PORT: u16 = 15008;
