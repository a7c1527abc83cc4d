//! ztunnel: the per-node L4 proxy of Istio ambient mode.
//!
//! Which runtime runs what: the data plane (every listener and connection of every local
//! workload) runs on the main multi-threaded Tokio runtime; admin, metrics and readiness run on
//! their own single-threaded runtime on a dedicated thread (the `admin` crate); configuration reloads
//! run on the blocking pool ([`mesh::Store::watch`]).

pub mod capture;
pub mod dns;
mod error;
pub mod inpod;
pub mod metrics;
pub mod node;
pub mod proxy;
pub mod socket;

pub use error::Error;
pub use node::Ztunnel;
