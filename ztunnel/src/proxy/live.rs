//! Live inbound connections, re-checked against every new configuration: a change that refuses
//! an established connection (a policy, STRICT mTLS, a waypoint bound to its destination) closes
//! it (Istio counts these as late rejections).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use hbone::Identity;
use mesh::Snapshot;
use tokio::sync::Notify;

use super::admission::{self, Refusal};

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

    /// Re-evaluates every connection against `snapshot`, with the checks new connections pass
    /// (`admission::admit`); closes and counts those now refused (including those whose
    /// workload is gone).
    pub fn reevaluate(&self, snapshot: &Snapshot) -> usize {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut closed = 0;
        for live in entries.values() {
            let conn = admission::Inbound {
                source: live.source.as_ref(),
                source_ip: live.source_ip,
                destination: live.destination,
            };
            let admitted = match snapshot.workload_by_uid(&live.workload) {
                Some(w) => admission::admit(snapshot, w, &conn),
                None => Err(Refusal::Gone),
            };
            if let Err(why) = admitted {
                tracing::info!(
                    workload = %live.workload,
                    src.identity = %live.source.as_ref().map(ToString::to_string).unwrap_or_default(),
                    src.addr = %live.source_ip,
                    dst.addr = %live.destination,
                    reason = %why,
                    "closing a live connection that the new configuration refuses"
                );
                live.close.notify_one();
                closed += 1;
            }
        }
        closed
    }
}
