//! Upstream keep-alive: an HTTP/1.1 tunnel to an endpoint serves the next request to it.
//!
//! Pingora never reuses an upstream connection it did not make itself (its reuse check needs a
//! socket descriptor, pingora#883), so on its own every request would open a new CONNECT stream
//! and, behind it, the endpoint's ztunnel a new TCP connection to the application. Instead, a
//! tunnel whose response ended cleanly on a message boundary (the response complete, the
//! request body sent, keep-alive allowed) is parked here when Pingora lets go of it, and the
//! next attempt to the same endpoint takes it up: Envoy's upstream connection pool, one level
//! down.
//!
//! A parked tunnel that the far side has closed or written to since is dropped when it is
//! taken, not reused; one idle longer than the DestinationRule's `idleTimeout`, or that has
//! served `maxRequestsPerConnection` requests, is not kept.
//!
//! Plain TCP connections to endpoints out of the mesh are Pingora's to pool; [`PlainServed`]
//! counts their requests so that the one reaching `maxRequestsPerConnection` asks for the
//! connection to close after it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hbone::H2Stream;
use tokio::time::Instant;

/// Tunnels parked per endpoint at most: enough for the concurrency one waypoint drives to one
/// endpoint, not a reservoir of idle application connections.
const MAX_IDLE_PER_ENDPOINT: usize = 64;

/// Which tunnels are interchangeable: same endpoint, same target port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Endpoint {
    /// The endpoint's ztunnel (`podIP:15008`).
    pub(crate) next_hop: SocketAddr,
    /// The application (`podIP:targetPort`).
    pub(crate) target: SocketAddr,
}

/// Parked tunnels, by endpoint.
#[derive(Debug, Default)]
pub(crate) struct IdleTunnels(Mutex<HashMap<Endpoint, Vec<Parked>>>);

#[derive(Debug)]
struct Parked {
    stream: H2Stream,
    since: Instant,
    /// Requests it has carried.
    served: u32,
}

/// A tunnel taken up again, and how many requests it carried before.
#[derive(Debug)]
pub(crate) struct Reused {
    pub(crate) stream: H2Stream,
    pub(crate) served: u32,
}

impl IdleTunnels {
    /// The most recently parked tunnel to `endpoint` that is still good.
    pub(crate) fn take(&self, endpoint: Endpoint, idle_timeout: Duration) -> Option<Reused> {
        let mut idle = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let parked = idle.get_mut(&endpoint)?;
        let now = Instant::now();
        // Parked oldest first: whatever idled too long is at the front.
        parked.retain(|p| now.duration_since(p.since) < idle_timeout);
        while let Some(mut p) = parked.pop() {
            if quiet(&mut p.stream) {
                return Some(Reused {
                    stream: p.stream,
                    served: p.served,
                });
            }
            tracing::debug!(upstream = %endpoint.target, "parked upstream tunnel was closed or written to; dropped");
        }
        None
    }

    /// Parks `stream` after its `served`-th request.
    fn park(&self, endpoint: Endpoint, stream: H2Stream, served: u32) {
        let mut idle = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let parked = idle.entry(endpoint).or_default();
        if parked.len() >= MAX_IDLE_PER_ENDPOINT {
            return; // dropped: reset, as an HTTP client closes a surplus idle connection
        }
        parked.push(Parked {
            stream,
            since: Instant::now(),
            served,
        });
    }
}

/// Whether nothing (no data, no end, no error) has arrived on an idle tunnel.
fn quiet(stream: &mut H2Stream) -> bool {
    let mut peek = std::pin::pin!(stream.peek(1));
    matches!(
        peek.as_mut().poll(&mut Context::from_waker(Waker::noop())),
        Poll::Pending
    )
}

/// What one upstream attempt's request and its tunnel tell each other.
#[derive(Debug, Default)]
pub(crate) struct Attempt {
    /// The exchange ended cleanly on a message boundary: the tunnel may be parked.
    clean: AtomicBool,
    /// The tunnel was a parked one.
    reused: AtomicBool,
}

impl Attempt {
    pub(crate) fn ended_cleanly(&self) {
        self.clean.store(true, Ordering::Release);
    }

    pub(crate) fn reused(&self) -> bool {
        self.reused.load(Ordering::Acquire)
    }

    pub(crate) fn mark_reused(&self) {
        self.reused.store(true, Ordering::Release);
    }
}

/// What a tunnel handed to Pingora needs to be parked again when Pingora lets go of it.
#[derive(Debug)]
pub(crate) struct Parking {
    pub(crate) idle: Arc<IdleTunnels>,
    pub(crate) endpoint: Endpoint,
    pub(crate) attempt: Arc<Attempt>,
    /// Requests the tunnel carries with this one.
    pub(crate) served: u32,
    /// `maxRequestsPerConnection` (0: no limit).
    pub(crate) max_requests: u32,
}

impl Parking {
    /// Parks `stream` if its exchange ended cleanly and it may carry more requests; otherwise
    /// gives it back to be closed.
    pub(crate) fn park(self, stream: H2Stream) -> Option<H2Stream> {
        let spent = self.max_requests != 0 && self.served >= self.max_requests;
        if !self.attempt.clean.load(Ordering::Acquire) || spent {
            return Some(stream);
        }
        self.idle.park(self.endpoint, stream, self.served);
        None
    }
}

/// Requests served per pooled plain TCP upstream connection (HTTP/1.1), by socket descriptor:
/// Pingora tells whether an attempt's connection is new or reused, and a descriptor is only
/// reused by the kernel after its connection closed, which a new connection's count resets.
#[derive(Debug, Default)]
pub(crate) struct PlainServed(Mutex<HashMap<i32, u32>>);

impl PlainServed {
    /// Counts a request on connection `fd` (`reused` as Pingora says) and returns how many the
    /// connection has carried with it.
    pub(crate) fn count(&self, fd: i32, reused: bool) -> u32 {
        let mut served = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let n = served.entry(fd).or_default();
        *n = if reused { n.saturating_add(1) } else { 1 };
        *n
    }

    /// Forgets connection `fd`, which is closed after this request.
    pub(crate) fn forget(&self, fd: i32) {
        let mut served = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        served.remove(&fd);
    }
}
