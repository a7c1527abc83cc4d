//! The errors of HBONE connections.

use std::io;
use std::net::SocketAddr;

use http::StatusCode;

use crate::cert::CertError;

/// Why an HBONE connection or stream failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server refused the CONNECT with this status (400 malformed, 401 denied by policy,
    /// 503 destination unreachable, ...).
    #[error("HBONE CONNECT refused with status {0}")]
    Status(StatusCode),
    /// The TCP connection to the next hop failed.
    #[error("connecting to {addr} failed: {source}; is HBONE port 15008 reachable?")]
    Connect {
        /// The next hop.
        addr: SocketAddr,
        /// The socket error.
        source: io::Error,
    },
    /// The mTLS handshake failed (untrusted root, wrong identity, expired certificate, ...).
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        /// The peer.
        addr: SocketAddr,
        /// The TLS error.
        source: io::Error,
    },
    /// The HTTP/2 handshake on a new connection failed.
    #[error("HTTP/2 handshake: {0}")]
    H2Handshake(h2::Error),
    /// An HTTP/2 protocol or connection error.
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    /// A step did not finish in time.
    #[error("{0} timed out")]
    Timeout(Step),
    /// No certificate to present.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
}

/// A step of opening a tunnel, which may time out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// The TCP connection to the next hop.
    Connect,
    /// The mTLS handshake.
    Handshake,
    /// The server's answer to the CONNECT.
    Response,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Connect => "TCP connect to the HBONE next hop",
            Step::Handshake => "HBONE TLS handshake",
            Step::Response => "waiting for the HBONE CONNECT response",
        })
    }
}

impl Error {
    /// The status the server answered, if it answered one.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Error::Status(s) => Some(*s),
            _ => None,
        }
    }

    /// Whether the failure was a timeout.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout(_))
    }

    /// Whether the mTLS handshake failed: the peer's certificate was refused (or ours), or
    /// the handshake did not finish in time.
    pub fn is_tls(&self) -> bool {
        matches!(self, Error::Tls { .. } | Error::Timeout(Step::Handshake))
    }

    /// Whether the HTTP/2 handshake on a new connection failed.
    pub fn is_h2_handshake(&self) -> bool {
        matches!(self, Error::H2Handshake(_))
    }

    /// Whether the peer presented a valid certificate for an identity other than the expected
    /// ones: the destination is not who the mesh says serves that address.
    pub fn is_identity_mismatch(&self) -> bool {
        matches!(self, Error::Tls { source, .. } if crate::tls::is_identity_mismatch(source))
    }
}
