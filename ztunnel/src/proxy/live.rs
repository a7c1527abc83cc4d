//! Live inbound connections, re-checked against every new configuration: a change that refuses
//! an established connection (a policy, STRICT mTLS, a waypoint bound to its destination) closes
//! it (Istio counts these as late rejections).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use hbone::Identity;
use mesh::Snapshot;
use tokio::sync::Notify;

use super::admission::{self, Refused};

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
    state: Arc<State>,
}

/// What the connection's handler and the re-checks share.
#[derive(Debug, Default)]
struct State {
    /// The configuration version it was admitted under; 0 until then.
    admitted: AtomicU64,
    /// Why a configuration change refused it, once one has.
    refused: OnceLock<Refused>,
    wake: Notify,
}

/// A registered connection; deregisters on drop. Check [`Registration::refused`] before
/// answering the caller, and await [`Registration::closed`] alongside the copy: either tells
/// that a configuration change now refuses the connection, and why.
#[derive(Debug)]
pub(crate) struct Registration {
    id: u64,
    owner: Arc<LiveConnections>,
    state: Arc<State>,
}

impl Registration {
    /// Records the configuration version the connection was admitted under: re-checks against
    /// older ones (still in flight when it was admitted) leave it alone.
    pub(crate) fn admitted_under(&self, version: u64) {
        self.state.admitted.store(version, Ordering::Release);
    }

    /// Why a configuration change has refused the connection, if one has.
    pub(crate) fn refused(&self) -> Option<Refused> {
        self.state.refused.get().cloned()
    }

    /// Resolves, with the reason, when a configuration change refuses the connection.
    pub(crate) async fn closed(&self) -> Refused {
        loop {
            if let Some(why) = self.refused() {
                return why;
            }
            // A wake sent between the check and this wait is kept as a permit.
            self.state.wake.notified().await;
        }
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
    /// Registers an inbound connection to `workload` (uid), before it is admitted (see
    /// `admission::admit_now`).
    pub(crate) fn register(
        self: &Arc<Self>,
        workload: Arc<str>,
        source: Option<Identity>,
        source_ip: IpAddr,
        destination: SocketAddr,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(State::default());
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
                    state: state.clone(),
                },
            );
        Registration {
            id,
            owner: self.clone(),
            state,
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
    /// workload is gone). Connections admitted under a newer configuration are left alone.
    pub fn reevaluate(&self, snapshot: &Snapshot) -> usize {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut closed = 0;
        for live in entries.values() {
            if live.state.admitted.load(Ordering::Acquire) > snapshot.version()
                || live.state.refused.get().is_some()
            {
                continue;
            }
            let conn = admission::Conn {
                source: live.source.as_ref(),
                source_ip: live.source_ip,
                destination: live.destination,
            };
            let admitted = match snapshot.workload_by_uid(&live.workload) {
                Some(w) => admission::admit(snapshot, w, &conn),
                None => Err(Refused::Gone),
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
                let _ = live.state.refused.set(why);
                live.state.wake.notify_one();
                closed += 1;
            }
        }
        closed
    }
}
