//! Outbound: a local workload's connection, captured (15001) or explicit (SOCKS5 15080), routed
//! by [`route`](super::route::route) and carried over HBONE or plain TCP.

use std::net::SocketAddr;
use std::sync::Arc;

use hbone::drain::DrainWatch;
use hbone::headers::{Forwarded, TraceParent};
use hbone::{Authority, ChunkIo, ConnectHeaders, ConnectRequest, copy_bidirectional};
use mesh::Snapshot;
use mesh::telemetry::Peer;
use rand::seq::IndexedRandom;
use tokio::net::{TcpListener, TcpStream};

use super::connection::{ConnectionGuard, Direction, Ends, LoggedWorkload};
use super::live::Outbound;
use super::route::{Destination, Lookup, Refusal, Route, route, route_addr};
use super::socks5::{self, Reply, Target};
use super::{Ctx, Local, accept_loop};
use crate::dns::Asker;
use crate::metrics::{OnDemandDnsLabels, Reporter, TcpLabels};

pub(super) async fn serve_socks5(
    ctx: Arc<Ctx>,
    local: Arc<Local>,
    listener: TcpListener,
    drain: DrainWatch,
) {
    accept_loop(listener, drain, move |mut stream, peer, drain| {
        let (ctx, local) = (ctx.clone(), local.clone());
        async move {
            let target = match socks5::accept(&mut stream).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(src.addr = %peer, error = %e, "SOCKS5 handshake failed");
                    return;
                }
            };
            let dst = match &target {
                // `::ffff:<VIP>` is the VIP: routed as it, never dialled around the mesh.
                Target::Addr(a) => Destination::Addr(hbone::canonical(*a)),
                Target::Host(h, p) => Destination::Host(h, *p),
            };
            proxy(&ctx, &local, stream, peer, dst, true).await;
            drop(drain);
        }
    })
    .await;
}

pub(super) async fn serve_captured(
    ctx: Arc<Ctx>,
    local: Arc<Local>,
    listener: TcpListener,
    drain: DrainWatch,
) {
    accept_loop(listener, drain, move |stream, peer, drain| {
        let (ctx, local) = (ctx.clone(), local.clone());
        async move {
            let original = original_dst(&stream);
            match original {
                Some(dst) => proxy(&ctx, &local, stream, peer, Destination::Addr(dst), false).await,
                None => tracing::warn!(src.addr = %peer, "captured connection without an original destination"),
            }
            drop(drain);
        }
    })
    .await;
}

/// Routes and carries one connection. With `socks`, the SOCKS5 reply is sent once the upstream
/// is connected (or refused). The snapshot the decision was made on is held for the
/// connection's life, like the route itself.
async fn proxy(
    ctx: &Ctx,
    local: &Local,
    mut client: TcpStream,
    peer: SocketAddr,
    dst: Destination<'_>,
    socks: bool,
) {
    let Some(named) = super::named(ctx, &local.uid, &local.stopping).await else {
        tracing::warn!(workload = %local.uid, "outbound connection from a workload the configuration does not name as this ztunnel's");
        return;
    };
    let (snapshot, source) = (&named.snapshot, named.workload());
    let original_dst = dst.to_string();
    let cluster = &snapshot.options().cluster_id;
    // Decided before any lookup: the random source is not held across it.
    let first = route(snapshot, source, dst, &mut rand::rng());
    let decision = match first {
        Ok(decided) => decided,
        Err(Lookup { host, port }) => {
            match resolve(ctx, source, cluster, &host, port, false).await {
                Ok(addr) => route_addr(snapshot, source, addr, &mut rand::rng()),
                Err(why) => Route::Refuse(why),
            }
        }
    };
    // Listed for `/config_dump` once ztunnel knows where it sends the connection.
    // Called once, on the one path the connection takes: the destination's text moves in.
    let list = move |actual_dst, hbone| {
        ctx.live.list(Outbound {
            workload: local.uid.clone(),
            src: peer,
            original_dst,
            actual_dst,
            hbone,
        })
    };
    let (workload, service, dst_addr, hbone_addr, identity) = describe(snapshot, &decision);
    let mtls = matches!(decision, Route::Direct { .. } | Route::ViaWaypoint { .. });
    let labels = TcpLabels::new(
        Reporter::source,
        Peer::new(Some(source), cluster),
        service.map(|s| snapshot.service(s)),
        Peer::new(workload.map(|w| snapshot.workload(w)), cluster),
        mtls,
    );
    let trace = TraceParent::random();
    let ends = Ends {
        src_addr: Some(peer),
        src_workload: Some(LoggedWorkload::new(source, cluster)),
        // Identities are logged for mTLS only, as upstream logs them.
        src_identity: mtls.then(|| source.identity.to_string()),
        dst_addr,
        dst_hbone_addr: hbone_addr.map(|a| a.to_string()),
        dst_service: service.map(|s| snapshot.service(s).hostname.to_string()),
        dst_workload: workload.map(|w| LoggedWorkload::new(snapshot.workload(w), cluster)),
        dst_identity: identity,
        trace: Some(trace),
    };
    let mut guard = ConnectionGuard::open(ctx.metrics.clone(), labels, Direction::Outbound, ends);
    let source_identity = source.identity.clone();
    // The caller's address of the family it connected with, for `forwarded; for=` (its peer
    // may be the pod's loopback, for SOCKS5).
    let source_ip = source.ip_like(peer.ip());

    match decision {
        Route::Refuse(why) => refuse(&mut guard, &mut client, socks, why).await,
        Route::Direct {
            next_hop,
            authority,
            identities,
            ..
        }
        | Route::ViaWaypoint {
            next_hop,
            authority,
            identities,
            ..
        } => {
            let request = ConnectRequest {
                src: source_identity,
                dst_identities: identities,
                next_hop,
                authority: Authority::Addr(authority),
                headers: ConnectHeaders {
                    // `host=` names the service the caller addressed, which the destination's
                    // telemetry reports (a pod may back several on one port).
                    forwarded: Some(Forwarded {
                        client: source_ip.map(|ip| SocketAddr::new(ip, peer.port())),
                        host: service.map(|s| snapshot.service(s).hostname.to_string()),
                    }),
                    // Who is calling, for a destination that cannot look the caller up by its
                    // address (behind a gateway, or in another cluster).
                    baggage: Some(source.baggage(&snapshot.options().cluster_id)),
                    traceparent: Some(trace),
                },
            };
            let _listed = list(next_hop, true);
            match local.pool.connect(request).await {
                Ok(mut tunnel) => {
                    guard.established();
                    if socks
                        && socks5::reply(&mut client, Reply::Succeeded, None)
                            .await
                            .is_err()
                    {
                        return;
                    }
                    carry(&mut guard, &mut client, &mut tunnel).await;
                }
                Err(e) => {
                    let flag = tunnel_flag(&e);
                    if socks {
                        let code = if flag == "DENY" {
                            Reply::NotAllowed
                        } else {
                            Reply::ConnectionRefused
                        };
                        let _ = socks5::reply(&mut client, code, None).await;
                    }
                    guard.failed(flag, e);
                }
            }
        }
        Route::Passthrough { addr, .. } => {
            let _listed = list(addr, false);
            plain(ctx, source, addr, &mut guard, &mut client, socks).await;
        }
        Route::Resolve { host, port, v6, .. } => {
            match resolve(ctx, source, cluster, &host, port, v6).await {
                Ok(addr) => {
                    guard.resolved(addr);
                    let _listed = list(addr, false);
                    plain(ctx, source, addr, &mut guard, &mut client, socks).await;
                }
                Err(why) => refuse(&mut guard, &mut client, socks, why).await,
            }
        }
    }
}

/// Istio's response flag for a tunnel that could not be opened: refused by the destination's
/// policy, a destination that is not who the mesh says it is, another mTLS failure, an HTTP/2
/// handshake that failed, or no connection at all.
fn tunnel_flag(e: &hbone::Error) -> &'static str {
    if e.status() == Some(http::StatusCode::UNAUTHORIZED) {
        "DENY"
    } else if e.is_identity_mismatch() {
        "IDENTITY_ERROR"
    } else if e.is_tls() {
        "TLS_FAILURE"
    } else if e.is_h2_handshake() {
        "H2_HANDSHAKE_FAILURE"
    } else {
        "CONNECT"
    }
}

/// Refuses the connection (with a SOCKS5 reply that says why, for `socks`), with Envoy's
/// response flag: `DF` when a name did not resolve, else `NR` (no route).
async fn refuse(guard: &mut ConnectionGuard, client: &mut TcpStream, socks: bool, why: Refusal) {
    if socks {
        let _ = socks5::reply(client, refusal_reply(&why), None).await;
    }
    let flag = match why {
        Refusal::Unresolved { .. } => "DF",
        _ => "NR",
    };
    guard.failed(flag, why);
}

/// Carries the connection over plain TCP to `addr`, from `source`.
async fn plain(
    ctx: &Ctx,
    source: &mesh::model::Workload,
    addr: SocketAddr,
    guard: &mut ConnectionGuard,
    client: &mut TcpStream,
    socks: bool,
) {
    match ctx.sockets.connect(source, addr).await {
        Ok(mut upstream) => {
            guard.established();
            if socks
                && socks5::reply(client, Reply::Succeeded, upstream.local_addr().ok())
                    .await
                    .is_err()
            {
                return;
            }
            carry(guard, client, &mut upstream).await;
        }
        Err(e) => {
            if socks {
                let _ = socks5::reply(client, Reply::ConnectionRefused, None).await;
            }
            guard.failed("CONNECT", e);
        }
    }
}

/// The longest a connection waits for its destination's name to resolve, whatever the number
/// of resolvers and families tried.
const LOOKUP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Where an endpoint that is a DNS name is reached: one of the addresses it resolves to (asked
/// from where `source`'s own queries leave), chosen at random as each may serve, on `port`.
async fn resolve(
    ctx: &Ctx,
    source: &mesh::model::Workload,
    cluster: &str,
    host: &str,
    port: u16,
    v6: bool,
) -> Result<SocketAddr, Refusal> {
    let labels = OnDemandDnsLabels {
        source: Peer::new(Some(source), cluster),
        hostname: host.to_owned(),
    };
    ctx.metrics.on_demand_dns.get_or_create(&labels).inc();
    let asker = Asker {
        workload: source,
        sockets: &*ctx.sockets,
    };
    let unresolved = |reason: String| Refusal::Unresolved {
        host: host.to_owned(),
        reason,
    };
    let lookup = ctx.resolvers.lookup(asker, host, v6);
    let ips = match tokio::time::timeout(LOOKUP_DEADLINE, lookup).await {
        Ok(found) => found.map_err(|e| unresolved(e.to_string()))?,
        Err(_) => return Err(unresolved("no answer in time".to_owned())),
    };
    let ip = ips
        .choose(&mut rand::rng())
        .ok_or_else(|| unresolved("no address".to_owned()))?;
    Ok(SocketAddr::new(*ip, port))
}

/// Where a connection redirected by the capture rules was going (`SO_ORIGINAL_DST`).
fn original_dst(stream: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    // A dual-stack listener's connection is of either family: IPv4's conntrack entry first.
    let original = (sock.original_dst_v4()).or_else(|_| sock.original_dst_v6());
    original
        .ok()
        .and_then(|a| a.as_socket())
        .map(hbone::canonical)
}

async fn carry<A: ChunkIo, B: ChunkIo>(guard: &mut ConnectionGuard, a: &mut A, b: &mut B) {
    match copy_bidirectional(a, b).await {
        Ok(copied) => guard.copied(copied),
        Err(e) => {
            guard.copied(e.copied);
            guard.failed("-", e.source);
        }
    }
}

type Described = (
    Option<mesh::model::WorkloadId>,
    Option<mesh::model::ServiceId>,
    Option<SocketAddr>,
    Option<SocketAddr>,
    Option<String>,
);

/// The facts about a decision that telemetry reports.
fn describe(snapshot: &Snapshot, decision: &Route) -> Described {
    let identity = |w: mesh::model::WorkloadId| Some(snapshot.workload(w).identity.to_string());
    match decision {
        Route::Direct {
            next_hop,
            authority,
            workload,
            service,
            ..
        } => (
            Some(*workload),
            *service,
            Some(*next_hop),
            Some(*authority),
            identity(*workload),
        ),
        Route::ViaWaypoint {
            next_hop,
            authority,
            instance,
            service,
            ..
        } => (
            Some(*instance),
            *service,
            Some(*next_hop),
            Some(*authority),
            identity(*instance),
        ),
        Route::Passthrough {
            addr,
            workload,
            service,
        } => (*workload, *service, Some(*addr), None, None),
        // The address is known once the name is resolved (`ConnectionGuard::resolved`).
        Route::Resolve {
            workload, service, ..
        } => (Some(*workload), Some(*service), None, None, None),
        Route::Refuse(_) => (None, None, None, None, None),
    }
}

fn refusal_reply(why: &Refusal) -> Reply {
    match why {
        Refusal::SelfCall(_) => Reply::NotAllowed,
        Refusal::NoVip(_) | Refusal::Unresolved { .. } => Reply::HostUnreachable,
        Refusal::UnknownPort { .. } => Reply::ConnectionRefused,
        Refusal::NoHealthyUpstream(_) | Refusal::NoWaypointInstance(_) => Reply::HostUnreachable,
    }
}
