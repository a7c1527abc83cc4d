//! The proxy: listeners for each local workload and what happens to each connection.
//!
//! Every local workload gets its own set of listeners on its own address (inbound HBONE 15008,
//! SOCKS5 15080 unless a captured pod's application holds that port, the DNS proxy on 15053,
//! and with capture the transparent 15001 and 15006), its own certificate and its own HBONE
//! pool. How those sockets are made is the [`SocketFactory`]'s business; nothing here
//! knows whether it runs on loopback or inside a pod's network namespace.

mod admission;
mod app_tunnel;
pub mod connection;
mod inbound;
pub mod live;
mod outbound;
mod plaintext;
pub mod route;
pub mod socks5;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hbone::drain::{DrainTrigger, DrainWatch};
use hbone::{CertManager, Pool, Server};
use mesh::model::{Protocol, Workload, WorkloadId};
use mesh::{Snapshot, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::socket::{Owner, SocketFactory};
use live::LiveConnections;

/// Ports on each workload address.
pub mod ports {
    /// Captured outbound traffic (`SO_ORIGINAL_DST`).
    pub const OUTBOUND: u16 = 15001;
    /// Captured inbound plaintext.
    pub const INBOUND_PLAINTEXT: u16 = 15006;
    /// Inbound HBONE.
    pub const INBOUND: u16 = hbone::HBONE_PORT;
    /// Explicit outbound (SOCKS5).
    pub const SOCKS5: u16 = 15080;
    /// The DNS proxy (UDP and TCP), where the pod's DNS queries are redirected.
    pub const DNS: u16 = 15053;
    /// All of them: a connection to one of them on a workload's address is ztunnel's own, and
    /// sending one there on the workload's behalf would loop (or, for SOCKS5, let the caller
    /// speak as the workload).
    pub const ALL: [u16; 5] = [OUTBOUND, INBOUND_PLAINTEXT, INBOUND, DNS, SOCKS5];

    /// Those of a workload, whose SOCKS5 port may be its application's instead.
    pub fn of_workload(socks5: bool) -> &'static [u16] {
        if socks5 { &ALL } else { &ALL[..4] }
    }
}

/// What every connection handler needs.
#[derive(Debug)]
pub struct Ctx {
    /// The node this ztunnel serves: its workloads are those the configuration places there
    /// and, captured, the pods the node agent announces.
    pub node: Arc<str>,
    /// The mesh.
    pub store: Arc<Store>,
    /// Workload certificates.
    pub certs: Arc<CertManager>,
    /// Telemetry.
    pub metrics: Arc<Metrics>,
    /// How sockets are made.
    pub sockets: Arc<dyn SocketFactory>,
    /// The connections open now: inbound ones re-checked on configuration changes, every one
    /// listed for `/config_dump`.
    pub live: Arc<LiveConnections>,
    /// HTTP/2 and TLS settings.
    pub hbone: hbone::Config,
    /// The resolvers ztunnel asks: for the DNS proxy's forwarded queries, and for the DNS names
    /// of `resolution: DNS` ServiceEntry endpoints.
    pub resolvers: Arc<crate::dns::Forwarder>,
    /// Whether each workload gets a DNS proxy (its DNS listeners).
    pub dns_proxy: bool,
    /// Whether each workload gets a SOCKS5 port.
    pub socks5: bool,
}

/// The listeners of one local workload; dropping it stops them (use [`WorkloadProxy::drain`]
/// to let connections finish).
#[derive(Debug)]
pub struct WorkloadProxy {
    owner: Owner,
    drain: Option<DrainTrigger>,
    /// Cancelled as the proxy stops (drained or dropped): what its connections still wait
    /// for ([`named`]) will not come.
    stopping: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The per-workload state outbound handlers share.
#[derive(Debug)]
pub(crate) struct Local {
    pub(crate) uid: Arc<str>,
    pub(crate) pool: Pool,
    pub(crate) stopping: CancellationToken,
}

impl WorkloadProxy {
    /// Binds the listeners of `owner` and starts serving them.
    pub async fn start(ctx: Arc<Ctx>, owner: Owner) -> Result<Self, crate::Error> {
        // Where errors say a listener failed: a pod the configuration does not name yet has
        // no address of its own, and its listeners take every address of its namespace.
        let ip = (owner.ips.first().copied()).unwrap_or(std::net::Ipv6Addr::UNSPECIFIED.into());
        let uid = owner.uid.clone();
        let bind = |port: u16| -> Result<TcpListener, crate::Error> {
            ctx.sockets
                .listen(&owner, port)
                .map_err(|source| crate::Error::Bind {
                    workload: uid.to_string(),
                    addr: SocketAddr::new(ip, port),
                    source,
                })
        };
        let inbound = bind(ports::INBOUND)?;
        // Captured, a pod needs no SOCKS5 port (upstream opens one only when asked to); an
        // application of its own on 15080 keeps the port, and the pod is served without it.
        let socks = match ctx.socks5.then(|| bind(ports::SOCKS5)) {
            None => None,
            Some(Ok(listener)) => Some(listener),
            Some(Err(crate::Error::Bind { source, .. }))
                if ctx.sockets.captures() && source.kind() == std::io::ErrorKind::AddrInUse =>
            {
                tracing::warn!(workload = %uid, error = %source, "port 15080 is taken in the pod; SOCKS5 not served for it");
                None
            }
            Some(Err(e)) => return Err(e),
        };
        let own_ports = ports::of_workload(socks.is_some());
        let captured = if ctx.sockets.captures() {
            Some((bind(ports::OUTBOUND)?, bind(ports::INBOUND_PLAINTEXT)?))
        } else {
            None
        };
        let dns = match ctx.dns_proxy.then_some(&ctx.resolvers) {
            Some(upstream) => {
                let sockets =
                    (ctx.sockets.dns(&owner, ports::DNS)).map_err(|source| crate::Error::Bind {
                        workload: uid.to_string(),
                        addr: SocketAddr::new(ip, ports::DNS),
                        source,
                    })?;
                Some((upstream.clone(), sockets))
            }
            None => None,
        };
        let cert = ctx.certs.fetch(&owner.identity).await?;
        let (drain, watch) = hbone::drain::channel();
        let stopping = CancellationToken::new();
        let local = Arc::new(Local {
            uid: uid.clone(),
            stopping: stopping.clone(),
            pool: Pool::with_dialer(
                ctx.certs.clone(),
                ctx.hbone.clone(),
                ctx.sockets.dialer(&owner),
            ),
        });
        let mut tasks = Vec::new();
        let server = Server::new(
            cert,
            inbound::Inbound::new(ctx.clone(), uid.clone(), own_ports, stopping.clone()),
            ctx.hbone.clone(),
        )?;
        tasks.push(tokio::spawn(server.serve(inbound, watch.clone())));
        if let Some(socks) = socks {
            tasks.push(tokio::spawn(outbound::serve_socks5(
                ctx.clone(),
                local.clone(),
                socks,
                watch.clone(),
            )));
        }
        if let Some((upstream, sockets)) = dns {
            let served =
                crate::dns::Served::new(ctx.clone(), uid.clone(), upstream, stopping.clone());
            for (udp, tcp) in sockets {
                tasks.push(tokio::spawn(crate::dns::serve_udp(
                    served.clone(),
                    udp,
                    watch.clone(),
                )));
                tasks.push(tokio::spawn(crate::dns::serve_tcp(
                    served.clone(),
                    tcp,
                    watch.clone(),
                )));
            }
        }
        if let Some((outbound, plaintext)) = captured {
            tasks.push(tokio::spawn(outbound::serve_captured(
                ctx.clone(),
                local,
                outbound,
                watch.clone(),
            )));
            tasks.push(tokio::spawn(plaintext::serve(
                ctx.clone(),
                uid.clone(),
                own_ports,
                stopping.clone(),
                plaintext,
                watch,
            )));
        }
        tracing::info!(workload = %uid, addrs = ?owner.ips, identity = %owner.identity, "workload proxy started");
        Ok(Self {
            owner,
            drain: Some(drain),
            stopping,
            tasks,
        })
    }

    /// The workload's uid.
    pub fn uid(&self) -> &str {
        &self.owner.uid
    }

    /// Whom it serves, with the identity and addresses it was started with.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// Stops accepting and waits until every connection has finished.
    pub async fn drain(mut self) {
        self.stopping.cancel();
        if let Some(trigger) = self.drain.take() {
            trigger.drain().await;
        }
        tracing::info!(workload = %self.owner.uid, "workload proxy drained");
    }
}

impl Drop for WorkloadProxy {
    fn drop(&mut self) {
        self.stopping.cancel();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// How long a connection of a pod the configuration does not name yet waits for the
/// configuration to name it (upstream waits as long for the workload from xDS).
const UNNAMED_WAIT: Duration = Duration::from_secs(5);

/// A local workload as the configuration names it, with the snapshot that names it: a
/// connection's handler works from both, and holds the snapshot for as long as it needs the
/// workload, as it holds the route made from it.
pub(crate) struct Named {
    pub(crate) snapshot: Arc<Snapshot>,
    id: WorkloadId,
}

impl Named {
    /// The workload.
    pub(crate) fn workload(&self) -> &Workload {
        self.snapshot.workload(self.id)
    }
}

/// Whether `workload`, as the configuration names it, is this ztunnel's to serve: on its node,
/// and in the mesh (reached over HBONE).
pub(crate) fn served_here(ctx: &Ctx, workload: &Workload) -> bool {
    workload.protocol == Protocol::Hbone && workload.node.as_deref() == Some(&*ctx.node)
}

/// The local workload `uid`, once the configuration names it as this ztunnel's to serve.
/// Captured, a pod is served from the moment the node agent announces it, which may come
/// before the configuration names it (istio-cni and the control plane race); its connections
/// then wait for the configuration, up to [`UNNAMED_WAIT`], rather than being refused while
/// the pod starts. Without capture a workload is served only once named, so one missing has
/// left and nothing waits. A workload named elsewhere (another node, outside the mesh) is not
/// ztunnel's: its proxy is stopping, and its connections are refused. So are those still
/// waiting when the proxy stops (`stopping`: the pod removed, ztunnel draining), at once.
pub(crate) async fn named(ctx: &Ctx, uid: &str, stopping: &CancellationToken) -> Option<Named> {
    // What one snapshot says: `None` while it does not name the workload.
    let named_in = |snapshot: Arc<Snapshot>| -> Option<Option<Named>> {
        let workload = snapshot.workload_by_uid(uid)?;
        let (id, ours) = (workload.id, served_here(ctx, workload));
        Some(ours.then_some(Named { snapshot, id }))
    };
    if let Some(named) = named_in(ctx.store.load()) {
        return named;
    }
    if !ctx.sockets.captures() {
        return None;
    }
    let mut changes = ctx.store.subscribe();
    let named = async {
        loop {
            // Loaded after subscribing, so a change published in between is not missed.
            match named_in(ctx.store.load()) {
                Some(named) => return named,
                None => changes.changed().await.ok()?,
            }
        }
    };
    let found = tokio::select! {
        found = tokio::time::timeout(UNNAMED_WAIT, named) => found,
        () = stopping.cancelled() => return None,
    };
    if found.is_err() {
        // Each caller says what it refused; a pod never named would repeat this for every try.
        tracing::debug!(workload = %uid, wait = ?UNNAMED_WAIT, "the configuration did not name the workload in time");
    }
    found.ok().flatten()
}

/// Accepts until the drain starts, handing each connection to `handle` in its own task.
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, mut drain: DrainWatch, handle: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr, DrainWatch) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = drain.signaled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let peer = hbone::canonical(peer);
                if let Err(e) = crate::socket::configure(&stream) {
                    tracing::debug!(%peer, error = %e, "socket options not set");
                }
                tokio::spawn(handle(stream, peer, drain.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
