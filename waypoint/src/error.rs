//! Errors at the waypoint's edges: starting up. Per-request failures never surface as Rust
//! errors; they become HTTP statuses with response flags (see `http`).

use std::net::SocketAddr;

/// Why the waypoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configured Gateway is not an `istio-waypoint` Gateway in the mesh.
    #[error(
        "no waypoint Gateway {0} in the configuration (a Gateway with gatewayClassName istio-waypoint)"
    )]
    UnknownWaypoint(String),
    /// The waypoint has no instance with an address to listen on.
    #[error(
        "waypoint {0} has no instance pod with an IP (label gateway.networking.k8s.io/gateway-name: <name>)"
    )]
    NoInstance(String),
    /// The Gateway asks for a sandwiched waypoint, which ztunnel feeds over PROXY protocol; this
    /// waypoint terminates HBONE itself.
    #[error(
        "waypoint {0} is sandwiched (its Gateway or GatewayClass says ambient.istio.io/waypoint-inbound-binding: PROXY): its pods are captured and ztunnel hands it PROXY protocol connections, which this waypoint does not take; remove the binding to let it terminate HBONE itself"
    )]
    Sandwiched(String),
    /// A listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificates or TLS settings.
    #[error(transparent)]
    Hbone(#[from] hbone::Error),
    /// A certificate could not be issued.
    #[error(transparent)]
    Cert(#[from] hbone::CertError),
    /// The Wasm plugin host could not start.
    #[error("wasm plugin host: {0}")]
    Plugins(String),
}
