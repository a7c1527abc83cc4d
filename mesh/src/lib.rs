//! The mesh model both proxies share.
//!
//! Users describe their mesh with the Kubernetes and Istio YAML they already write. This crate
//! reads it ([`resource`]), lowers it into one typed model ([`model`]), indexes it into an
//! immutable [`Snapshot`] that proxies consult on every connection without taking a lock, keeps
//! that snapshot current as files change ([`Store`]), and evaluates `AuthorizationPolicy` for
//! both the L4 (ztunnel) and L7 (waypoint) layers with one engine ([`authz`]). Routes
//! (`HTTPRoute`, `VirtualService`) and `DestinationRule`s lower into one route model ([`route`]);
//! both proxies name the ends of the traffic they count with one set of labels ([`telemetry`]).

pub mod authz;
mod error;
pub mod model;
pub mod resource;
pub mod route;
mod snapshot;
mod store;
pub mod telemetry;

pub use error::{ConfigError, FieldError, Invalid, Origin};
pub use snapshot::{Options, PeerAuthEntry, PolicyEntry, PolicyScope, Snapshot};
pub use store::{ConfigDir, DEFAULT_DEBOUNCE, ReloadStats, Store, WatchHandle};
