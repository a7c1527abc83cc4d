//! One ztunnel: serves the workloads of one node and follows configuration changes.
//!
//! On every new snapshot it starts proxies for workloads that arrived on its node, drains
//! those of workloads that left, and re-checks live inbound connections against the new
//! policies.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mesh::model::Protocol;
use tokio::task::JoinHandle;

use crate::proxy::{Ctx, WorkloadProxy};

/// A running ztunnel.
#[derive(Debug)]
pub struct Ztunnel {
    ctx: Arc<Ctx>,
    node: Arc<str>,
    proxies: Arc<tokio::sync::Mutex<Proxies>>,
    follower: Option<JoinHandle<()>>,
}

/// The workload proxies running, by workload uid, and how many announced pods wait for one.
///
/// The metrics move by what changes here rather than being set to these counts, so several
/// ztunnels sharing one registry (the local mesh) add up.
#[derive(Debug, Default)]
struct Proxies {
    running: HashMap<Arc<str>, WorkloadProxy>,
    pending: usize,
}

impl Ztunnel {
    /// Starts serving the captured workloads of `node` and follows configuration changes.
    pub async fn start(ctx: Arc<Ctx>, node: &str) -> Result<Self, crate::Error> {
        let node: Arc<str> = node.into();
        let proxies = Arc::new(tokio::sync::Mutex::new(Proxies::default()));
        if let Err(e) = reconcile(&ctx, &node, &proxies).await {
            // The proxies that did start stop with it: count them out.
            proxies.lock().await.forget(&ctx.metrics);
            return Err(e);
        }
        let follower = tokio::spawn(follow(ctx.clone(), node.clone(), proxies.clone()));
        Ok(Self {
            ctx,
            node,
            proxies,
            follower: Some(follower),
        })
    }

    /// The shared context (store, metrics, certificates).
    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    /// The node served.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The uids of the workloads being served.
    pub async fn workloads(&self) -> Vec<Arc<str>> {
        let mut uids: Vec<_> = self.proxies.lock().await.running.keys().cloned().collect();
        uids.sort();
        uids
    }

    /// Starts and stops workload proxies to match the snapshot and the sockets available now
    /// (call it when the in-pod agent adds or removes a pod).
    pub async fn reconcile(&self) -> Result<(), crate::Error> {
        reconcile(&self.ctx, &self.node, &self.proxies).await
    }

    /// Stops accepting everywhere and lets connections finish, for up to `deadline`.
    pub async fn drain(mut self, deadline: Duration) {
        if let Some(f) = self.follower.take() {
            f.abort();
        }
        let proxies = self.proxies.lock().await.forget(&self.ctx.metrics);
        let all = futures_util::future::join_all(proxies.into_iter().map(WorkloadProxy::drain));
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!(node = %self.node, ?deadline, "drain deadline passed; closing the remaining connections");
        }
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        if let Some(f) = self.follower.take() {
            f.abort();
        }
        // Dropped without draining (after `drain`, nothing is left to count).
        if let Ok(mut proxies) = self.proxies.try_lock() {
            proxies.forget(&self.ctx.metrics);
        }
    }
}

impl Proxies {
    /// Takes every proxy out, counted as stopped, and no pod as pending any more.
    fn forget(&mut self, metrics: &crate::metrics::Metrics) -> Vec<WorkloadProxy> {
        metrics.proxies_pending.dec_by(self.pending as i64);
        self.pending = 0;
        metrics.proxies_active.dec_by(self.running.len() as i64);
        metrics.proxies_stopped.inc_by(self.running.len() as u64);
        self.running.drain().map(|(_, p)| p).collect()
    }
}

/// Starts and stops workload proxies to match the current snapshot.
async fn reconcile(
    ctx: &Arc<Ctx>,
    node: &str,
    proxies: &tokio::sync::Mutex<Proxies>,
) -> Result<(), crate::Error> {
    let snapshot = ctx.store.load();
    let wanted: HashMap<Arc<str>, &mesh::model::Workload> = snapshot
        .workloads_on_node(node)
        .filter(|w| w.protocol == Protocol::Hbone && !w.ips.is_empty() && ctx.sockets.serves(w))
        .map(|w| (w.uid.clone(), w))
        .collect();
    let mut proxies = proxies.lock().await;
    let gone: Vec<Arc<str>> = (proxies.running.keys())
        .filter(|uid| !wanted.contains_key(*uid))
        .cloned()
        .collect();
    for uid in gone {
        if let Some(proxy) = proxies.running.remove(&uid) {
            ctx.metrics.proxies_active.dec();
            ctx.metrics.proxies_stopped.inc();
            tokio::spawn(proxy.drain());
        }
    }
    let mut first_error = None;
    for (uid, workload) in wanted {
        if proxies.running.contains_key(&uid) {
            continue;
        }
        match WorkloadProxy::start(ctx.clone(), workload).await {
            Ok(proxy) => {
                ctx.metrics.proxies_active.inc();
                ctx.metrics.proxies_started.inc();
                proxies.running.insert(uid, proxy);
            }
            Err(e) => {
                tracing::error!(workload = %uid, error = %e, "cannot serve workload");
                first_error.get_or_insert(e);
            }
        }
    }
    let announced = ctx.sockets.announced();
    let pending = (announced.iter())
        .filter(|uid| !proxies.running.contains_key(*uid))
        .count();
    ctx.metrics
        .proxies_pending
        .inc_by(pending as i64 - proxies.pending as i64);
    proxies.pending = pending;
    first_error.map_or(Ok(()), Err)
}

async fn follow(ctx: Arc<Ctx>, node: Arc<str>, proxies: Arc<tokio::sync::Mutex<Proxies>>) {
    let mut changes = ctx.store.subscribe();
    while changes.changed().await.is_ok() {
        let snapshot = ctx.store.load();
        let stats = ctx.store.stats();
        ctx.metrics.config_applied.set(stats.applied as i64);
        ctx.metrics.config_rejected.set(stats.rejected as i64);
        let closed = ctx.live.reevaluate(&snapshot);
        if closed > 0 {
            tracing::info!(node = %node, closed, version = snapshot.version(), "closed connections the new configuration denies");
        }
        // Errors are logged per workload; the others keep being served.
        let _ = reconcile(&ctx, &node, &proxies).await;
    }
}
