//! In-pod capture, ztunnel's side: follow the node agent (istio-cni, or our own `cni` tool)
//! over ZDS, hand each announced pod's network namespace to the in-pod socket factory, and
//! serve the pod once both its namespace and its configuration are known.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::Ztunnel;
use crate::inpod::{NetNs, WorkloadEvent, ZdsClient, ZdsError};
use crate::socket::InPod;

/// How long to wait before connecting to the node agent again.
const RECONNECT: Duration = Duration::from_secs(1);

/// Follows the node agent at `path` for as long as ztunnel runs, connecting again whenever it
/// goes away (istio-cni restarts, or is not up yet). Every request is acknowledged; a pod that
/// cannot be served is acknowledged with the reason, as istio-cni expects.
pub async fn follow_node_agent(path: &Path, sockets: &InPod, ztunnel: &Ztunnel) {
    let mut pods = Pods::default();
    loop {
        match pods.follow(path, sockets, ztunnel).await {
            Ok(()) => {
                tracing::info!(uds = %path.display(), "node agent disconnected; reconnecting")
            }
            Err(e) => {
                tracing::warn!(uds = %path.display(), error = %e, "node agent unavailable; retrying")
            }
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

/// The pods the node agent announced, kept across its connections: on every connection it
/// replays the pods it still has (adding them again, or keeping those whose namespace it no
/// longer holds) and then says the snapshot is sent; a pod it did not replay is gone.
#[derive(Debug, Default)]
struct Pods {
    /// Kubernetes pod uid (what ZDS names pods by) → our workload uid.
    announced: HashMap<String, Arc<str>>,
}

impl Pods {
    /// Follows one connection to the agent until it ends.
    async fn follow(
        &mut self,
        path: &Path,
        sockets: &InPod,
        ztunnel: &Ztunnel,
    ) -> Result<(), ZdsError> {
        let mut client = ZdsClient::connect(path).await?;
        // The pods replayed on this connection, until its snapshot is sent.
        let mut replayed = Some(HashSet::new());
        loop {
            let event = match client.next().await {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(()),
                // Already rejected to the agent; the connection is still usable.
                Err(e) if e.is_protocol() => continue,
                Err(e) => return Err(e),
            };
            let outcome = match event {
                WorkloadEvent::Add { uid, info, netns } => match info {
                    None => Err(format!(
                        "pod {uid}: ZDS add without workload info; cannot map it to a workload"
                    )),
                    Some(info) => {
                        let cluster = ztunnel.ctx().store.snapshot().options().cluster_id.clone();
                        let workload: Arc<str> =
                            format!("{cluster}//v1/Pod/{}/{}", info.namespace, info.name).into();
                        if let Some(seen) = &mut replayed {
                            seen.insert(uid.clone());
                        }
                        self.add(uid, workload.clone(), netns, sockets, ztunnel)
                            .await;
                        served(ztunnel, &workload).await
                    }
                },
                WorkloadEvent::Keep { uid } => {
                    match &mut replayed {
                        Some(seen) if self.announced.contains_key(&uid) => {
                            seen.insert(uid);
                        }
                        Some(_) => {
                            tracing::debug!(pod = %uid, "node agent keeps a pod this ztunnel never had")
                        }
                        None => {
                            tracing::warn!(pod = %uid, "node agent keeps a pod after its snapshot; ignored")
                        }
                    }
                    Ok(())
                }
                WorkloadEvent::Del { uid } => {
                    if let Some(seen) = &mut replayed {
                        seen.remove(&uid);
                    }
                    if let Some(workload) = self.announced.remove(&uid) {
                        sockets.remove(&workload);
                        tracing::info!(pod = %uid, workload = %workload, "pod removed by the node agent");
                        let _ = ztunnel.reconcile().await;
                    }
                    Ok(())
                }
                WorkloadEvent::SnapshotSent => {
                    if let Some(seen) = replayed.take() {
                        self.forget_unless(&seen, sockets, ztunnel).await;
                    }
                    Ok(())
                }
            };
            client.ack(outcome.err()).await?;
        }
    }

    /// Records `uid`'s namespace as `workload`'s. The workload may already be served: replayed
    /// after a reconnect (the same namespace), or a pod recreated under the same name (a
    /// StatefulSet's; a new namespace). In a new namespace its proxy starts again there; and the
    /// pod it replaces is forgotten, so that the agent deleting that pod later leaves this one
    /// alone.
    async fn add(
        &mut self,
        uid: String,
        workload: Arc<str>,
        netns: NetNs,
        sockets: &InPod,
        ztunnel: &Ztunnel,
    ) {
        tracing::info!(pod = %uid, workload = %workload, netns = netns.inode(), "pod announced by the node agent");
        self.announced
            .retain(|other, w| *other == uid || *w != workload);
        let moved = sockets
            .inode(&workload)
            .is_some_and(|inode| inode != netns.inode());
        if moved {
            tracing::info!(pod = %uid, workload = %workload, "workload in a new network namespace; serving it there");
            sockets.remove(&workload);
            let _ = ztunnel.reconcile().await;
        }
        sockets.insert(workload.clone(), netns);
        self.announced.insert(uid, workload);
    }

    /// Forgets the pods a reconnected agent did not replay.
    async fn forget_unless(
        &mut self,
        replayed: &HashSet<String>,
        sockets: &InPod,
        ztunnel: &Ztunnel,
    ) {
        let gone: Vec<String> = (self.announced.keys())
            .filter(|uid| !replayed.contains(*uid))
            .cloned()
            .collect();
        if gone.is_empty() {
            return;
        }
        for uid in gone {
            if let Some(workload) = self.announced.remove(&uid) {
                sockets.remove(&workload);
                tracing::info!(pod = %uid, workload = %workload, "pod not replayed by the node agent; no longer served");
            }
        }
        let _ = ztunnel.reconcile().await;
    }
}

/// Reconciles and reports whether `workload` is now served. A pod the configuration does not
/// know yet is accepted: it is served as soon as the configuration names it.
async fn served(ztunnel: &Ztunnel, workload: &Arc<str>) -> Result<(), String> {
    let result = ztunnel.reconcile().await;
    let known = ztunnel
        .ctx()
        .store
        .snapshot()
        .workload_by_uid(workload)
        .is_some();
    if !known || ztunnel.workloads().await.contains(workload) {
        return Ok(());
    }
    Err(match result {
        Err(e) => format!("cannot serve {workload}: {e}"),
        Ok(()) => format!("{workload} is not served by this ztunnel (other node, or not captured)"),
    })
}
