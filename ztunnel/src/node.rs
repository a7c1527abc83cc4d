//! One ztunnel: serves the workloads of one node and follows configuration changes.
//!
//! On every new snapshot, and whenever the node agent announces or removes a pod, it starts
//! proxies for workloads that arrived on its node (captured, for every pod the agent announced,
//! named by the configuration yet or not), drains those of workloads that left, and re-checks
//! live inbound connections against the new policies.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use tokio::task::JoinHandle;

use hbone::Identity;

use crate::inpod::zds::proto::WorkloadInfo;
use crate::proxy::{Ctx, WorkloadProxy, served_here};
use crate::socket::Owner;

/// A running ztunnel.
#[derive(Debug)]
pub struct Ztunnel {
    ctx: Arc<Ctx>,
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
    /// The uids of `running`, which `/config_dump` reads without waiting for a reconcile to
    /// finish.
    up: Arc<RwLock<BTreeSet<Arc<str>>>>,
}

/// What `/config_dump` shows of a ztunnel's workloads (see [`WorkloadState::dump`]).
#[derive(Debug, Clone)]
pub struct WorkloadState {
    ctx: Arc<Ctx>,
    up: Arc<RwLock<BTreeSet<Arc<str>>>>,
}

impl Ztunnel {
    /// Starts serving the workloads of the context's node and follows configuration changes.
    pub async fn start(ctx: Arc<Ctx>) -> Result<Self, crate::Error> {
        let proxies = Arc::new(tokio::sync::Mutex::new(Proxies::default()));
        if let Some((_, e)) = reconcile(&ctx, &proxies).await.into_iter().next() {
            // The proxies that did start stop with it: count them out.
            proxies.lock().await.forget(&ctx.metrics);
            return Err(e);
        }
        let follower = tokio::spawn(follow(ctx.clone(), proxies.clone()));
        Ok(Self {
            ctx,
            proxies,
            follower: Some(follower),
        })
    }

    /// The state of its workloads, for `/config_dump`.
    pub async fn workload_state(&self) -> WorkloadState {
        WorkloadState {
            ctx: self.ctx.clone(),
            up: self.proxies.lock().await.up.clone(),
        }
    }

    /// The shared context (store, metrics, certificates).
    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    /// The node served.
    pub fn node(&self) -> &str {
        &self.ctx.node
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
        let failed = reconcile(&self.ctx, &self.proxies).await;
        failed.into_iter().next().map_or(Ok(()), |(_, e)| Err(e))
    }

    /// Reconciles (see [`Ztunnel::reconcile`]) and says whether the workload `uid` is served
    /// now, or why its proxy could not start.
    pub async fn reconcile_serving(&self, uid: &str) -> Result<bool, crate::Error> {
        let failed = reconcile(&self.ctx, &self.proxies).await;
        if let Some((_, e)) = failed.into_iter().find(|(failed, _)| **failed == *uid) {
            return Err(e);
        }
        Ok(self.proxies.lock().await.running.contains_key(uid))
    }

    /// Stops accepting everywhere and lets connections finish, for up to `deadline`.
    pub async fn drain(mut self, deadline: Duration) {
        if let Some(f) = self.follower.take() {
            f.abort();
        }
        let proxies = self.proxies.lock().await.forget(&self.ctx.metrics);
        let all = futures_util::future::join_all(proxies.into_iter().map(WorkloadProxy::drain));
        if tokio::time::timeout(deadline, all).await.is_err() {
            tracing::warn!(node = %self.ctx.node, ?deadline, "drain deadline passed; closing the remaining connections");
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
    /// Records a proxy started, counted as such.
    fn started(&mut self, proxy: WorkloadProxy, metrics: &crate::metrics::Metrics) {
        metrics.proxies_active.inc();
        metrics.proxies_started.inc();
        let uid: Arc<str> = proxy.uid().into();
        self.up_mut().insert(uid.clone());
        self.running.insert(uid, proxy);
    }

    /// Takes the proxy of `uid` out, counted as stopped.
    fn stopped(&mut self, uid: &str, metrics: &crate::metrics::Metrics) -> Option<WorkloadProxy> {
        let proxy = self.running.remove(uid)?;
        self.up_mut().remove(uid);
        metrics.proxies_active.dec();
        metrics.proxies_stopped.inc();
        Some(proxy)
    }

    /// Takes every proxy out, counted as stopped, and no pod as pending any more.
    fn forget(&mut self, metrics: &crate::metrics::Metrics) -> Vec<WorkloadProxy> {
        metrics.proxies_pending.dec_by(self.pending as i64);
        self.pending = 0;
        metrics.proxies_active.dec_by(self.running.len() as i64);
        metrics.proxies_stopped.inc_by(self.running.len() as u64);
        self.up_mut().clear();
        self.running.drain().map(|(_, p)| p).collect()
    }

    fn up_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeSet<Arc<str>>> {
        self.up.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl WorkloadState {
    /// Upstream's `workloadState`, by workload uid: each workload served (`Up`), with its
    /// live `connections`, and each pod the node agent announced that is not served
    /// (`Pending`: the configuration names it on another node or outside the mesh, or its
    /// proxy could not start), with `info` naming it (`name`, `namespace`,
    /// `serviceAccount`) as the configuration does, or else as the agent did.
    pub fn dump(&self) -> serde_json::Map<String, serde_json::Value> {
        let snapshot = self.ctx.store.load();
        let mut connections = self.ctx.live.dump();
        let up = self.up.read().unwrap_or_else(PoisonError::into_inner);
        let announced: HashMap<Arc<str>, WorkloadInfo> =
            self.ctx.sockets.announced().into_iter().collect();
        let info = |uid: &str| match snapshot.workload_by_uid(uid) {
            Some(w) => Some(serde_json::json!({
                "name": &*w.name,
                "namespace": &*w.namespace,
                "serviceAccount": w.identity.service_account(),
            })),
            None => announced.get(uid).map(|info| {
                serde_json::json!({
                    "name": info.name,
                    "namespace": info.namespace,
                    "serviceAccount": info.service_account,
                })
            }),
        };
        let mut state = serde_json::Map::new();
        for uid in up.iter() {
            let Some(info) = info(uid) else {
                continue;
            };
            let connections = connections
                .remove(uid)
                .unwrap_or_else(|| serde_json::json!({ "inbound": [], "outbound": [] }));
            let entry =
                serde_json::json!({ "state": "Up", "info": info, "connections": connections });
            state.insert(uid.to_string(), entry);
        }
        for uid in announced.keys() {
            if up.contains(uid) {
                continue;
            }
            if let Some(info) = info(uid) {
                let entry = serde_json::json!({ "state": "Pending", "info": info });
                state.insert(uid.to_string(), entry);
            }
        }
        state
    }
}

/// Starts and stops workload proxies to match the current snapshot and the pods announced;
/// returns the workloads whose proxy could not start, and why.
async fn reconcile(
    ctx: &Arc<Ctx>,
    proxies: &tokio::sync::Mutex<Proxies>,
) -> Vec<(Arc<str>, crate::Error)> {
    let snapshot = ctx.store.load();
    let mut wanted: HashMap<Arc<str>, Owner> = snapshot
        .workloads_on_node(&ctx.node)
        .filter(|w| served_here(ctx, w) && ctx.sockets.serves(&w.uid))
        // Captured, the listeners take every address of the pod's namespace: a pod whose
        // address the configuration does not have yet is served all the same.
        .filter(|w| !w.ips.is_empty() || ctx.sockets.captures())
        .map(|w| (w.uid.clone(), Owner::from(w)))
        .collect();
    let mut failed = Vec::new();
    // A pod the node agent announced is served at once, as upstream serves it, even before
    // the configuration names it: with the identity the agent gave, its connections waiting
    // for the configuration (see `proxy::named`).
    let announced = ctx.sockets.announced();
    for (uid, info) in &announced {
        if snapshot.workload_by_uid(uid).is_some() {
            continue;
        }
        match announced_identity(&snapshot.options().trust_domain, info) {
            Ok(identity) => {
                let ips = Box::default();
                wanted.insert(
                    uid.clone(),
                    Owner {
                        uid: uid.clone(),
                        identity,
                        ips,
                    },
                );
            }
            Err(e) => {
                tracing::error!(workload = %uid, error = %e, "cannot serve the pod the node agent announced");
                failed.push((uid.clone(), crate::Error::AnnouncedIdentity(e)));
            }
        }
    }
    let mut proxies = proxies.lock().await;
    // Those no longer wanted stop. Captured, so do those whose identity changed (a pod served
    // as announced, which the configuration names with another service account), to start
    // again with the new one: in-pod listeners share their ports (`SO_REUSEPORT`), so the new
    // binds while the old drains. Loopback listeners cannot be bound twice: a workload there
    // keeps its certificate until it is served again.
    let captures = ctx.sockets.captures();
    let gone: Vec<Arc<str>> = (proxies.running.iter())
        .filter(|(uid, proxy)| match wanted.get(*uid) {
            None => true,
            Some(owner) => captures && owner.identity != proxy.owner().identity,
        })
        .map(|(uid, _)| uid.clone())
        .collect();
    for uid in gone {
        if let Some(proxy) = proxies.stopped(&uid, &ctx.metrics) {
            tokio::spawn(proxy.drain());
        }
    }
    for (uid, owner) in wanted {
        if proxies.running.contains_key(&uid) {
            continue;
        }
        match WorkloadProxy::start(ctx.clone(), owner).await {
            Ok(proxy) => proxies.started(proxy, &ctx.metrics),
            Err(e) => {
                tracing::error!(workload = %uid, error = %e, "cannot serve workload");
                failed.push((uid, e));
            }
        }
    }
    let pending = (announced.iter())
        .filter(|(uid, _)| !proxies.running.contains_key(uid))
        .count();
    ctx.metrics
        .proxies_pending
        .inc_by(pending as i64 - proxies.pending as i64);
    proxies.pending = pending;
    failed
}

/// The identity of a pod as the node agent announced it; a pod that names no service account
/// runs as its namespace's `default`, as Kubernetes runs it.
fn announced_identity(
    trust_domain: &str,
    info: &WorkloadInfo,
) -> Result<Identity, hbone::IdentityError> {
    let service_account = match info.service_account.as_str() {
        "" => "default",
        named => named,
    };
    Identity::new(trust_domain, &info.namespace, service_account)
}

async fn follow(ctx: Arc<Ctx>, proxies: Arc<tokio::sync::Mutex<Proxies>>) {
    let mut changes = ctx.store.subscribe();
    while changes.changed().await.is_ok() {
        let snapshot = ctx.store.load();
        let stats = ctx.store.stats();
        ctx.metrics.config_applied.set(stats.applied as i64);
        ctx.metrics.config_rejected.set(stats.rejected as i64);
        let closed = ctx.live.reevaluate(&snapshot);
        if closed > 0 {
            tracing::info!(node = %ctx.node, closed, version = snapshot.version(), "closed connections the new configuration denies");
        }
        // Failures are logged per workload; the others keep being served.
        reconcile(&ctx, &proxies).await;
    }
}
