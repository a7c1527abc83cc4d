//! Live inbound connections, re-checked against every new configuration: a policy change that
//! denies an established connection closes it (Istio counts these as late rejections).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use hbone::Identity;
use mesh::Snapshot;
use mesh::authz::{Attributes, evaluate};
use tokio::sync::Notify;

/// The connections to re-check.
#[derive(Debug, Default)]
pub struct LiveConnections {
    next: AtomicU64,
    entries: Mutex<HashMap<u64, Live>>,
}

#[derive(Debug)]
struct Live {
    workload: Arc<str>,
    source: Option<Identity>,
    source_ip: IpAddr,
    destination: SocketAddr,
    close: Arc<Notify>,
}

/// A registered connection; deregisters on drop. Await [`Registration::closed`] alongside the
/// copy to learn that policy now denies it.
#[derive(Debug)]
pub struct Registration {
    id: u64,
    owner: Arc<LiveConnections>,
    close: Arc<Notify>,
}

impl Registration {
    /// Resolves when a configuration change denies this connection.
    pub async fn closed(&self) {
        self.close.notified().await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.owner
            .entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl LiveConnections {
    /// Registers an inbound connection to `workload` (uid).
    pub fn register(
        self: &Arc<Self>,
        workload: Arc<str>,
        source: Option<Identity>,
        source_ip: IpAddr,
        destination: SocketAddr,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                Live {
                    workload,
                    source,
                    source_ip,
                    destination,
                    close: close.clone(),
                },
            );
        Registration {
            id,
            owner: self.clone(),
            close,
        }
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-evaluates every connection against `snapshot`; closes and counts those now denied
    /// (including those whose workload is gone).
    pub fn reevaluate(&self, snapshot: &Snapshot) -> usize {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut closed = 0;
        for live in entries.values() {
            let allowed = snapshot.workload_by_uid(&live.workload).is_some_and(|w| {
                let attrs = Attributes {
                    source: live.source.as_ref(),
                    source_ip: live.source_ip,
                    remote_ip: live.source_ip,
                    destination_ip: live.destination.ip(),
                    destination_port: live.destination.port(),
                    sni: None,
                    http: None,
                };
                evaluate(snapshot.ztunnel_policies(w), &attrs).allowed
            });
            if !allowed {
                tracing::info!(
                    workload = %live.workload,
                    src.identity = %live.source.as_ref().map(ToString::to_string).unwrap_or_default(),
                    src.addr = %live.source_ip,
                    dst.addr = %live.destination,
                    "closing a live connection that the new configuration denies"
                );
                live.close.notify_one();
                closed += 1;
            }
        }
        closed
    }
}
