//! Live counts of connections and streams, so tests and operators can see leaks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// A count of live things; each is counted by a [`GaugeGuard`] for as long as it lives.
#[derive(Debug, Default)]
pub struct Gauge(AtomicUsize);

impl Gauge {
    /// The current count.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn track(self: &Arc<Self>) -> GaugeGuard {
        self.0.fetch_add(1, Ordering::AcqRel);
        GaugeGuard(self.clone())
    }
}

/// Decrements its gauge when dropped.
#[derive(Debug)]
pub(crate) struct GaugeGuard(Arc<Gauge>);

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What an HBONE server or client pool has open right now.
#[derive(Debug, Default)]
pub struct Stats {
    /// Live TLS connections.
    pub connections: Arc<Gauge>,
    /// Live CONNECT streams.
    pub streams: Arc<Gauge>,
    /// TLS handshakes that failed (refused peer certificates, plaintext or garbage on the port).
    pub handshake_failures: AtomicU64,
}

impl Stats {
    pub(crate) fn handshake_failed(&self) {
        self.handshake_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Failed TLS handshakes so far.
    pub fn handshake_failures(&self) -> u64 {
        self.handshake_failures.load(Ordering::Relaxed)
    }
}
