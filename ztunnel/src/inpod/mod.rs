//! In-pod traffic capture: the building blocks ztunnel needs to serve pods whose network namespace
//! it does not live in.
//!
//! In Istio ambient's in-pod mode the istio-cni node agent owns capture: it programs iptables rules
//! *inside* each pod's network namespace ([`iptables`]) and then hands ztunnel the namespace as a
//! file descriptor over a unix socket ([`zds`]). ztunnel opens its listeners (15001 outbound, 15006
//! inbound plaintext, 15008 inbound HBONE) and its upstream sockets inside that namespace
//! ([`socket`]), marking every one of them with [`ZTUNNEL_MARK`] so the pod's rules let ztunnel's
//! own traffic through instead of capturing it again. [`NetNs`] is the handle tying these together:
//! sockets are *created* in the pod namespace on a throwaway thread and then used from any tokio
//! worker, so no worker thread ever changes namespace.
//!
//! Namespaces and rules are the interface with istio-cni; the port numbers and marks below are wire
//! facts shared with it and must not change.

pub mod iptables;
pub mod netns;
pub mod socket;
pub mod zds;

pub use iptables::{IptablesBackend, PodRules, RulesError};
pub use netns::NetNs;
pub use socket::{ZTUNNEL_MARK, bind_listener, bind_udp, connect_socket, udp_to};
pub use zds::{WorkloadEvent, ZdsClient, ZdsConnection, ZdsError, ZdsServer};

/// Outbound capture port: the pod's outgoing TCP is `REDIRECT`ed here; the original destination is
/// read back with `SO_ORIGINAL_DST`.
pub const OUTBOUND_PORT: u16 = 15001;

/// Inbound plaintext capture port: TCP arriving at the pod on any port but 15008 is `TPROXY`ed here.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;

/// DNS capture port: the pod's DNS queries (UDP and TCP port 53) are `REDIRECT`ed to the DNS
/// proxy here.
pub const DNS_PORT: u16 = 15053;

/// Inbound HBONE port: the only port peers dial; `TPROXY`ed to the in-pod listener so the pod's own
/// IP stays the local address.
pub const INBOUND_HBONE_PORT: u16 = 15008;
