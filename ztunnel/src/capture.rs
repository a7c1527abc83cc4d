//! In-pod capture, ztunnel's side: follow the node agent (istio-cni, or our own `cni` tool)
//! over ZDS, hand each announced pod's network namespace to the in-pod socket factory, and
//! serve the pod once both its namespace and its configuration are known.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::Ztunnel;
use crate::inpod::{WorkloadEvent, ZdsClient, ZdsError};
use crate::socket::InPod;

/// Follows the node agent at `path` until it disconnects. Every request is acknowledged; a pod
/// that cannot be served is acknowledged with the reason, as istio-cni expects.
pub async fn follow_node_agent(
    path: &Path,
    sockets: &InPod,
    ztunnel: &Ztunnel,
) -> Result<(), ZdsError> {
    let mut client = ZdsClient::connect(path).await?;
    // Kubernetes pod uid (what ZDS names pods by) → our workload uid.
    let mut pods: HashMap<String, Arc<str>> = HashMap::new();
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
                    tracing::info!(pod = %uid, workload = %workload, netns = netns.inode(), "pod announced by the node agent");
                    sockets.insert(workload.clone(), netns);
                    pods.insert(uid, workload.clone());
                    served(ztunnel, &workload).await
                }
            },
            WorkloadEvent::Keep { .. } => Ok(()),
            WorkloadEvent::Del { uid } => {
                if let Some(workload) = pods.remove(&uid) {
                    sockets.remove(&workload);
                    tracing::info!(pod = %uid, workload = %workload, "pod removed by the node agent");
                    let _ = ztunnel.reconcile().await;
                }
                Ok(())
            }
            WorkloadEvent::SnapshotSent => Ok(()),
        };
        client.ack(outcome.err()).await?;
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
