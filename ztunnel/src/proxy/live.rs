//! Live connections. Inbound ones are re-checked against every new configuration: a change that
//! refuses an established connection (a policy, STRICT mTLS, a waypoint bound to its
//! destination) closes it (Istio counts these as late rejections). Outbound ones are only
//! listed. Both are what `/config_dump` shows of each workload's connections (upstream's
//! `workloadState`, which `istioctl ztunnel-config connections` reads).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use hbone::Identity;
use mesh::Snapshot;
use tokio::sync::Notify;

use super::admission::{self, Refused};

/// The connections open now.
#[derive(Debug, Default)]
pub struct LiveConnections {
    next: AtomicU64,
    entries: Mutex<HashMap<u64, Live>>,
    outbound: Mutex<HashMap<u64, Outbound>>,
}

/// An inbound connection.
#[derive(Debug)]
struct Live {
    workload: Arc<str>,
    source: Option<Identity>,
    source_addr: SocketAddr,
    destination: SocketAddr,
    /// The service the caller addressed, as telemetry names it.
    service: Option<Arc<str>>,
    state: Arc<State>,
}

/// An outbound connection, as upstream lists one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outbound {
    /// The local workload's uid.
    pub workload: Arc<str>,
    /// The application's address.
    pub src: SocketAddr,
    /// Where the application sent it: the address it connected to, or the name it gave SOCKS5.
    pub original_dst: String,
    /// Where ztunnel sends it: an endpoint's or a waypoint's HBONE address, or the destination
    /// itself.
    pub actual_dst: SocketAddr,
    /// Whether it is tunnelled (HBONE) or sent as it is (TCP).
    pub hbone: bool,
}

/// One workload's connections, each with its `src` to sort by.
#[derive(Default)]
struct Lists {
    inbound: Vec<(SocketAddr, serde_json::Value)>,
    outbound: Vec<(SocketAddr, serde_json::Value)>,
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

/// A listed outbound connection; unlisted on drop.
#[derive(Debug)]
pub(crate) struct Listed {
    id: u64,
    owner: Arc<LiveConnections>,
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.owner
            .outbound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl LiveConnections {
    /// Registers an inbound connection from `source_addr` to `workload` (uid) at `destination`,
    /// before it is admitted (see `admission::admit_now`).
    pub(crate) fn register(
        self: &Arc<Self>,
        workload: Arc<str>,
        source: Option<Identity>,
        source_addr: SocketAddr,
        destination: SocketAddr,
        service: Option<Arc<str>>,
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
                    source_addr,
                    destination,
                    service,
                    state: state.clone(),
                },
            );
        Registration {
            id,
            owner: self.clone(),
            state,
        }
    }

    /// Lists an outbound connection until the returned guard is dropped.
    pub(crate) fn list(self: &Arc<Self>, connection: Outbound) -> Listed {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.outbound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, connection);
        Listed {
            id,
            owner: self.clone(),
        }
    }

    /// Each workload's connections in upstream's form, by workload uid: `inbound` with the
    /// caller's address (`src`), the service it addressed (`originalDst`), where it arrived
    /// (`actualDst`) and `protocol`; `outbound` with the application's address, where it sent
    /// the connection, where ztunnel sends it and how. Each list is sorted by `src`.
    pub fn dump(&self) -> BTreeMap<Arc<str>, serde_json::Value> {
        let mut by_workload: BTreeMap<Arc<str>, Lists> = BTreeMap::new();
        let protocol = |hbone: bool| if hbone { "HBONE" } else { "TCP" };
        for live in (self.entries.lock().unwrap_or_else(PoisonError::into_inner)).values() {
            let lists = by_workload.entry(live.workload.clone()).or_default();
            lists.inbound.push((
                live.source_addr,
                serde_json::json!({
                    "src": live.source_addr.to_string(),
                    "originalDst": live.service.as_deref(),
                    "actualDst": live.destination.to_string(),
                    "protocol": protocol(live.source.is_some()),
                }),
            ));
        }
        for out in (self.outbound.lock().unwrap_or_else(PoisonError::into_inner)).values() {
            let lists = by_workload.entry(out.workload.clone()).or_default();
            lists.outbound.push((
                out.src,
                serde_json::json!({
                    "src": out.src.to_string(),
                    "originalDst": out.original_dst,
                    "actualDst": out.actual_dst.to_string(),
                    "protocol": protocol(out.hbone),
                }),
            ));
        }
        let sorted = |mut list: Vec<(SocketAddr, serde_json::Value)>| {
            list.sort_by_key(|(src, _)| *src);
            list.into_iter().map(|(_, v)| v).collect::<Vec<_>>()
        };
        (by_workload.into_iter())
            .map(|(uid, lists)| {
                let dump = serde_json::json!({
                    "inbound": sorted(lists.inbound),
                    "outbound": sorted(lists.outbound),
                });
                (uid, dump)
            })
            .collect()
    }

    /// How many inbound connections are registered.
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
                source_ip: live.source_addr.ip(),
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
                    src.addr = %live.source_addr,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each workload's connections as upstream lists them: plaintext inbound and passthrough
    /// outbound are TCP, tunnelled ones HBONE; a connection that ends leaves the list.
    #[test]
    fn connections_are_listed_by_workload_until_they_end() {
        let live = Arc::new(LiveConnections::default());
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let caller = Identity::new("cluster.local", "app", "client").unwrap();
        let tunnelled = live.register(
            "server".into(),
            Some(caller),
            addr("10.0.0.1:40001"),
            addr("10.0.0.2:8080"),
            Some("echo.app.svc.cluster.local".into()),
        );
        let plaintext = live.register(
            "server".into(),
            None,
            addr("10.0.0.9:40000"),
            addr("10.0.0.2:8080"),
            None,
        );
        let outbound = |src: &str, actual_dst: &str, hbone| Outbound {
            workload: "client".into(),
            src: addr(src),
            original_dst: "10.96.0.1:80".to_owned(),
            actual_dst: addr(actual_dst),
            hbone,
        };
        let out = live.list(outbound("10.0.0.1:5000", "10.0.0.2:15008", true));
        let passthrough = live.list(outbound("10.0.0.1:4000", "203.0.113.1:80", false));

        let dump = live.dump();
        assert_eq!(
            dump[&Arc::from("server")],
            serde_json::json!({
                "inbound": [
                    {"src": "10.0.0.1:40001", "originalDst": "echo.app.svc.cluster.local",
                     "actualDst": "10.0.0.2:8080", "protocol": "HBONE"},
                    {"src": "10.0.0.9:40000", "originalDst": null,
                     "actualDst": "10.0.0.2:8080", "protocol": "TCP"},
                ],
                "outbound": [],
            })
        );
        let client = &dump[&Arc::from("client")];
        assert_eq!(client["inbound"], serde_json::json!([]));
        assert_eq!(client["outbound"][0]["actualDst"], "203.0.113.1:80");
        assert_eq!(client["outbound"][0]["protocol"], "TCP");
        assert_eq!(client["outbound"][1]["actualDst"], "10.0.0.2:15008");
        assert_eq!(client["outbound"][1]["protocol"], "HBONE");

        drop((tunnelled, plaintext, out, passthrough));
        assert!(live.dump().is_empty());
    }
}
