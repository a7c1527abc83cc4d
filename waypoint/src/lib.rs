//! waypoint: the L7 proxy of Istio ambient mode, on Pingora.
//!
//! One request lifecycle, in this order (each step is a module or a named Pingora phase):
//!
//! 1. **connect_terminate** ([`terminate`]): our HBONE listener on the waypoint's address, port
//!    15008, accepts a CONNECT from a client's ztunnel. The tunnel names the original
//!    destination (a service `VIP:port`, or a pod `IP:port` for `waypoint-for: workload`) and the
//!    caller's identity. A destination this waypoint does not serve is refused with 400.
//! 2. **main_internal**: an HTTP port's tunnel becomes a Pingora downstream
//!    ([`tunnel::downstream`]) served by one `HttpProxy<`[`Waypoint`]`>`, HTTP/1.1 or h2c. Per
//!    request ([`http`]): resolve the destination in the current snapshot → L7 authorization
//!    → route (HTTPRoute or VirtualService) → CORS, redirect, direct response, fault injection
//!    → choose backend, subset and endpoint ([`balance`]) → header and URL changes → forward,
//!    with retries, per-try and overall timeouts, and mirroring. A TCP port's tunnel takes the
//!    [`l4`] path instead: authorization, then a byte copy, never the HTTP parser. A port whose
//!    protocol nobody declared is told apart by its first bytes ([`sniff`]).
//! 3. **connect_originate** ([`originate`]): each upstream attempt is a CONNECT stream on our
//!    pooled HBONE connection to the chosen endpoint's `podIP:15008`, expecting that workload's
//!    identity: an HTTP/1.1 tunnel an earlier request to the endpoint left open ([`keepalive`]),
//!    or a new one.
//!
//! Configuration is the mesh snapshot ([`mesh::Store`]); a new snapshot applies to the next
//! request, and load-balancing state (active requests, ejections) carries over ([`state`]).

mod balance;
mod callout;
mod error;
mod http;
mod keepalive;
mod l4;
mod limits;
pub mod metrics;
mod origin_tls;
mod originate;
mod resolve;
mod server;
mod sniff;
mod state;
mod stream;
mod terminate;
mod tunnel;
mod wasm;

pub use error::Error;
pub use http::Waypoint;
pub use server::{WaypointServer, WaypointSpec};
