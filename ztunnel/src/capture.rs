//! In-pod capture, ztunnel's side: follow the node agent (istio-cni, or our own `cni` tool)
//! over ZDS, hand each announced pod's network namespace to the in-pod socket factory, and
//! serve the pod once both its namespace and its configuration are known.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::Ztunnel;
use crate::inpod::zds::proto::WorkloadInfo;
use crate::inpod::{NetNs, WorkloadEvent, ZdsClient, ZdsError};
use crate::socket::InPod;

/// How long to wait before connecting to the node agent again.
const RECONNECT: Duration = Duration::from_secs(1);

/// Follows the node agent at `path` for as long as ztunnel runs, connecting again whenever it
/// goes away (istio-cni restarts, or is not up yet). Every request is acknowledged; a pod that
/// cannot be served is acknowledged with the reason, as istio-cni expects.
///
/// `synced` says whether this ztunnel holds the node's pods as the agent has them, which is
/// when upstream's ztunnel is ready: from the end of the agent's snapshot on a connection until
/// that connection ends. Before, a pod being replayed may not be served yet; after, the agent
/// cannot announce new pods, whose start then waits on a ztunnel that looks healthy.
pub async fn follow_node_agent(
    path: &Path,
    sockets: &InPod,
    ztunnel: &Ztunnel,
    synced: &AtomicBool,
) {
    let mut pods = Pods::default();
    loop {
        let followed = pods.follow(path, sockets, ztunnel, synced).await;
        synced.store(false, Ordering::Release);
        match followed {
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
///
/// Pods are named by their Kubernetes uid, workloads by namespace and name, so a pod recreated
/// under its name (a StatefulSet's) is a second pod of the same workload until the first is
/// deleted: the workload is served from the namespace announced last, and from another of its
/// pods' once that one is deleted.
#[derive(Debug, Default)]
struct Pods {
    /// Kubernetes pod uid → the pod.
    announced: HashMap<String, Pod>,
}

#[derive(Debug)]
struct Pod {
    /// Our workload uid.
    workload: Arc<str>,
    netns: Arc<NetNs>,
    /// As the agent named it.
    info: WorkloadInfo,
}

impl Pods {
    /// Follows one connection to the agent until it ends.
    async fn follow(
        &mut self,
        path: &Path,
        sockets: &InPod,
        ztunnel: &Ztunnel,
        synced: &AtomicBool,
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
                            format!("{cluster}//Pod/{}/{}", info.namespace, info.name).into();
                        if let Some(seen) = &mut replayed {
                            seen.insert(uid.clone());
                        }
                        tracing::info!(pod = %uid, workload = %workload, netns = netns.inode(), "pod announced by the node agent");
                        let pod = Pod {
                            workload: workload.clone(),
                            netns: Arc::new(netns),
                            info,
                        };
                        serve(&pod, sockets, ztunnel).await;
                        self.announced.insert(uid, pod);
                        served(ztunnel, &workload).await
                    }
                },
                // Only a replay keeps pods, as upstream insists.
                WorkloadEvent::Keep { uid } => match &mut replayed {
                    Some(seen) => {
                        if self.announced.contains_key(&uid) {
                            seen.insert(uid);
                        } else {
                            tracing::debug!(pod = %uid, "node agent keeps a pod this ztunnel never had");
                        }
                        Ok(())
                    }
                    None => Err(format!("pod {uid}: keep received after the snapshot")),
                },
                WorkloadEvent::Del { uid } => {
                    if let Some(seen) = &mut replayed {
                        seen.remove(&uid);
                    }
                    if self
                        .remove(&uid, "removed by the node agent", sockets, ztunnel)
                        .await
                    {
                        let _ = ztunnel.reconcile().await;
                    }
                    Ok(())
                }
                WorkloadEvent::SnapshotSent => {
                    if let Some(seen) = replayed.take() {
                        self.forget_unless(&seen, sockets, ztunnel).await;
                        tracing::info!(pods = self.announced.len(), "node agent's pods synced");
                        synced.store(true, Ordering::Release);
                    }
                    Ok(())
                }
            };
            client.ack(outcome.err()).await?;
        }
    }

    /// Forgets pod `uid`. Its workload stays served while another announced pod has its name,
    /// from that pod's namespace. Returns whether anything changed, for the caller to reconcile.
    async fn remove(&mut self, uid: &str, why: &str, sockets: &InPod, ztunnel: &Ztunnel) -> bool {
        let Some(pod) = self.announced.remove(uid) else {
            return false;
        };
        tracing::info!(pod = %uid, workload = %pod.workload, "pod {why}");
        let other = (self.announced.values()).find(|other| other.workload == pod.workload);
        match other {
            Some(other) => serve(other, sockets, ztunnel).await,
            None => {
                sockets.remove(&pod.workload);
            }
        }
        true
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
        let mut changed = false;
        for uid in gone {
            changed |=
                (self.remove(&uid, "not replayed by the node agent", sockets, ztunnel)).await;
        }
        if changed {
            let _ = ztunnel.reconcile().await;
        }
    }
}

/// Serves `pod`'s workload from its namespace. A workload already served from another
/// namespace (its pod recreated) has its proxy stopped there first, to be started in this one by
/// the next reconcile; in the same namespace (a replay) it carries on undisturbed.
async fn serve(pod: &Pod, sockets: &InPod, ztunnel: &Ztunnel) {
    let workload = &pod.workload;
    let moved = (sockets.inode(workload)).is_some_and(|inode| inode != pod.netns.inode());
    if moved {
        tracing::info!(workload = %workload, netns = pod.netns.inode(), "workload in another network namespace; serving it there");
        sockets.remove(workload);
        let _ = ztunnel.reconcile().await;
    }
    sockets.insert(workload.clone(), pod.netns.clone(), pod.info.clone());
}

/// Reconciles and reports whether `workload` is now served. A pod the configuration does not
/// name yet is served too, as the agent named it, its connections waiting for the
/// configuration; one it names on another node, or outside the mesh, is not.
async fn served(ztunnel: &Ztunnel, workload: &Arc<str>) -> Result<(), String> {
    match ztunnel.reconcile_serving(workload).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "{workload} is not served by this ztunnel (other node, or not captured)"
        )),
        Err(e) => Err(format!("cannot serve {workload}: {e}")),
    }
}
