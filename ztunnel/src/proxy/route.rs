//! The outbound routing decision: a pure function of the snapshot, the source workload and the
//! original destination, returning a plain value that says where the connection goes.
//!
//! Keeping it pure (no I/O, randomness injected) means every rule below is a table test, and the
//! proxy code that acts on the decision has no policy in it. The rules follow Istio's ztunnel:
//!
//! 1. A connection to one of ztunnel's own ports on the source's own address, or on loopback,
//!    is refused (it would loop).
//! 2. A service (by VIP, or by hostname through SOCKS5) with a waypoint goes to the waypoint,
//!    carrying the original `VIP:port`, unless the caller is that waypoint. An instance in the
//!    caller's zone is preferred, as the Service Istio generates for a waypoint asks. Where
//!    services of several namespaces share a VIP, the caller's namespace's is the one dialled.
//! 3. A service that picks no endpoint (a ServiceEntry with `resolution: NONE`) is passed
//!    through to the address dialled, as plain TCP.
//! 4. Otherwise a service picks a ready endpoint, weighted by capacity, and the port the
//!    endpoint serves the service port on; a service that prefers near endpoints
//!    (`trafficDistribution`, `internalTrafficPolicy: Local`) picks among the nearest only.
//! 5. A workload address with a workload waypoint goes to the waypoint, unless the caller is it.
//! 6. A captured workload is reached with HBONE on its port 15008, `:authority` = `ip:port`;
//!    an uncaptured one with plain TCP; an address the mesh does not know is passed through.
//! 7. An endpoint that is a DNS name (a `resolution: DNS` ServiceEntry's) is reached with plain
//!    TCP at what the name resolves to, which the proxy looks up when it acts on the decision.
//! 8. A name the mesh does not know (through SOCKS5), or the name of a passed-through service
//!    with no address, is looked up by the proxy, and the address it finds routed as any other,
//!    as upstream's SOCKS5 does: a mesh address found so still takes its waypoint and mTLS.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hbone::Identity;
use mesh::Snapshot;
use mesh::model::{LoadBalancing, Protocol, Service, ServiceId, WaypointId, Workload, WorkloadId};
use rand::Rng;

/// Where the caller wanted to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination<'a> {
    /// An address (from `SO_ORIGINAL_DST`, or a SOCKS5 IP request).
    Addr(SocketAddr),
    /// A hostname and port (a SOCKS5 domain request), resolved from the mesh model.
    Host(&'a str, u16),
}

impl std::fmt::Display for Destination<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Addr(addr) => addr.fmt(f),
            Destination::Host(host, port) => write!(f, "{host}:{port}"),
        }
    }
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// HBONE straight to the destination workload's ztunnel.
    Direct {
        /// `podIP:15008`.
        next_hop: SocketAddr,
        /// `podIP:targetPort`, the CONNECT target.
        authority: SocketAddr,
        /// Identities the destination may present.
        identities: Vec<Identity>,
        /// The destination workload.
        workload: WorkloadId,
        /// The service, when the caller addressed one.
        service: Option<ServiceId>,
    },
    /// HBONE to a waypoint, which applies L7 policy and forwards.
    ViaWaypoint {
        /// `waypointIP:15008`.
        next_hop: SocketAddr,
        /// The original `VIP:port` (or `podIP:port` for a workload waypoint).
        authority: SocketAddr,
        /// The waypoint instance's identity.
        identities: Vec<Identity>,
        /// The waypoint.
        waypoint: WaypointId,
        /// The waypoint instance dialled.
        instance: WorkloadId,
        /// The service, when the caller addressed one.
        service: Option<ServiceId>,
    },
    /// Plain TCP: the destination is not captured, or not in the mesh at all.
    Passthrough {
        /// Where to connect.
        addr: SocketAddr,
        /// The destination workload, if the mesh knows it.
        workload: Option<WorkloadId>,
        /// The service, when the caller addressed one.
        service: Option<ServiceId>,
    },
    /// Plain TCP to what a DNS name resolves to (resolving is I/O, so it is the caller's).
    Resolve {
        /// The name.
        host: std::sync::Arc<str>,
        /// The port on it.
        port: u16,
        /// The address family the caller used (that of the VIP it dialled), preferred.
        v6: bool,
        /// The endpoint.
        workload: WorkloadId,
        /// The service the caller addressed.
        service: ServiceId,
    },
    /// Refused, with the reason.
    Refuse(Refusal),
}

/// Why an outbound connection is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The caller dialled ztunnel's own port on its own address, or on loopback.
    #[error("connection to ztunnel's own port {0} would loop")]
    SelfCall(u16),
    /// The service has no such port.
    #[error("service {service} has no port {port}")]
    UnknownPort {
        /// The service hostname.
        service: String,
        /// The port dialled.
        port: u16,
    },
    /// The service has no ready endpoint serving that port.
    #[error("service {0} has no healthy endpoint")]
    NoHealthyUpstream(String),
    /// The waypoint has no ready instance.
    #[error("waypoint {0} has no ready instance")]
    NoWaypointInstance(String),
    /// The endpoint is a DNS name that did not resolve.
    #[error("{host} did not resolve: {reason}")]
    Unresolved {
        /// The name.
        host: String,
        /// Why.
        reason: String,
    },
    /// A hostname-only service (no VIP) behind a waypoint has no address to carry.
    #[error("service {0} has no VIP to send to its waypoint")]
    NoVip(String),
}

/// A name the proxy looks up before it can route (looking up is I/O, so it is the caller's):
/// the address found is routed with [`route_addr`], as any other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// The name.
    pub host: Arc<str>,
    /// The port on it.
    pub port: u16,
}

/// Decides where a connection from `source` to `dst` goes, or which name must be looked up
/// first: one the mesh does not know, or that of a service passing connections through that
/// has no address of its own to pass them to.
pub fn route(
    snapshot: &Snapshot,
    source: &Workload,
    dst: Destination<'_>,
    rng: &mut impl Rng,
) -> Result<Route, Lookup> {
    let (host, port) = match dst {
        Destination::Addr(addr) => return Ok(route_addr(snapshot, source, addr, rng)),
        Destination::Host(host, port) => (host, port),
    };
    let Some((id, service)) = snapshot.resolve_host(host, &source.namespace) else {
        return Err(Lookup {
            host: host.into(),
            port,
        });
    };
    // The VIP the waypoint sees and the endpoint address family follow the service's first
    // IPv4 VIP.
    let vip = (service.vips.iter().find(|v| v.is_ipv4()))
        .or(service.vips.first())
        .copied();
    if vip.is_none() && waypoint_for(service, source).is_none() && passes_through(service) {
        return Err(Lookup {
            host: service.hostname.clone(),
            port,
        });
    }
    Ok(to_service(snapshot, source, (id, service, vip), port, rng))
}

/// Decides where a connection from `source` to the address `addr` goes.
pub fn route_addr(
    snapshot: &Snapshot,
    source: &Workload,
    addr: SocketAddr,
    rng: &mut impl Rng,
) -> Route {
    // Loopback is the caller's own host, unless the address is a workload's (in the local
    // mesh every workload has a loopback address of its own).
    let ip = addr.ip().to_canonical();
    let own = source.has_ip(ip)
        || ip.is_unspecified()
        || (ip.is_loopback() && snapshot.workload_by_ip(&source.network, ip).is_none());
    if super::ports::ALL.contains(&addr.port()) && own {
        return Route::Refuse(Refusal::SelfCall(addr.port()));
    }
    match snapshot.service_by_vip_from(addr.ip(), &source.namespace) {
        Some((id, service)) => to_service(
            snapshot,
            source,
            (id, service, Some(addr.ip())),
            addr.port(),
            rng,
        ),
        None => to_address(snapshot, source, addr, rng),
    }
}

/// The waypoint a connection from `source` to `service` goes through, unless `source` is it.
fn waypoint_for(service: &Service, source: &Workload) -> Option<WaypointId> {
    service
        .waypoint
        .filter(|&id| source.waypoint_instance != Some(id))
}

/// Whether `service` picks no endpoint and passes connections through to the address dialled.
fn passes_through(service: &Service) -> bool {
    (service.load_balancing.as_ref()).is_some_and(LoadBalancing::is_passthrough)
}

/// To `service`'s `port`; `vip` is the VIP the caller dialled, or the service's own when it
/// named the service (none when it has none).
fn to_service(
    snapshot: &Snapshot,
    source: &Workload,
    (id, service, vip): (ServiceId, &Service, Option<IpAddr>),
    port: u16,
    rng: &mut impl Rng,
) -> Route {
    if let Some(wp_id) = waypoint_for(service, source) {
        let Some(vip) = vip else {
            return Route::Refuse(Refusal::NoVip(service.hostname.to_string()));
        };
        let authority = SocketAddr::new(vip, port);
        return via_waypoint(snapshot, source, wp_id, authority, Some(id), rng);
    }
    // Without a VIP, a service that passes connections through is named for a lookup instead
    // ([`route`]).
    if let (true, Some(vip)) = (passes_through(service), vip) {
        // Named by no service, as upstream's passthrough is: no endpoint of it is involved.
        return Route::Passthrough {
            addr: SocketAddr::new(vip, port),
            workload: None,
            service: None,
        };
    }
    let Some((index, _)) = service.port(port) else {
        return Route::Refuse(Refusal::UnknownPort {
            service: service.hostname.to_string(),
            port,
        });
    };
    // Endpoints on other networks are reached through their network's gateway, which this
    // ztunnel does not do: dialling their addresses here could reach another pod entirely.
    let lb = service.load_balancing.as_ref();
    let candidates = || {
        service.endpoints.iter().filter_map(|e| {
            let w = snapshot.workload(e.workload);
            let target = e.target_port(index)?;
            let rank = rank(lb, source, w)?;
            let addressed = !w.ips.is_empty() || w.hostname.is_some();
            (addressed && w.network == source.network).then_some((
                e.workload,
                target,
                w.weight.max(1),
                rank,
            ))
        })
    };
    let Some((workload, target)) = nearest(candidates, rng) else {
        return Route::Refuse(Refusal::NoHealthyUpstream(service.hostname.to_string()));
    };
    let w = snapshot.workload(workload);
    let first = match (w.ips.first(), &w.hostname) {
        (Some(&ip), _) => ip,
        (None, Some(host)) => {
            return Route::Resolve {
                host: host.clone(),
                port: target,
                v6: vip.is_some_and(|v| v.is_ipv6()),
                workload,
                service: id,
            };
        }
        // Not a candidate: it has nothing to be reached at.
        (None, None) => {
            return Route::Refuse(Refusal::NoHealthyUpstream(service.hostname.to_string()));
        }
    };
    let ip = w.ip_like(vip.unwrap_or(first)).unwrap_or(first);
    let mut identities = vec![w.identity.clone()];
    identities.extend(
        service
            .subject_alt_names
            .iter()
            .filter_map(|san| san.parse::<Identity>().ok()),
    );
    direct(
        w,
        workload,
        SocketAddr::new(ip, target),
        identities,
        Some(id),
    )
}

fn to_address(
    snapshot: &Snapshot,
    source: &Workload,
    addr: SocketAddr,
    rng: &mut impl Rng,
) -> Route {
    let Some(w) = snapshot.workload_by_ip(&source.network, addr.ip()) else {
        return Route::Passthrough {
            addr,
            workload: None,
            service: None,
        };
    };
    if let Some(wp_id) = w.waypoint
        && source.waypoint_instance != Some(wp_id)
    {
        return via_waypoint(snapshot, source, wp_id, addr, None, rng);
    }
    direct(w, w.id, addr, vec![w.identity.clone()], None)
}

fn direct(
    w: &Workload,
    id: WorkloadId,
    authority: SocketAddr,
    identities: Vec<Identity>,
    service: Option<ServiceId>,
) -> Route {
    match w.protocol {
        Protocol::Hbone => Route::Direct {
            next_hop: SocketAddr::new(authority.ip(), hbone::HBONE_PORT),
            authority,
            identities,
            workload: id,
            service,
        },
        Protocol::Tcp => Route::Passthrough {
            addr: authority,
            workload: Some(id),
            service,
        },
    }
}

fn via_waypoint(
    snapshot: &Snapshot,
    source: &Workload,
    id: WaypointId,
    authority: SocketAddr,
    service: Option<ServiceId>,
    rng: &mut impl Rng,
) -> Route {
    let waypoint = snapshot.waypoint(id);
    let lb = waypoint.load_balancing.as_ref();
    let instances = || {
        waypoint.instances.iter().filter_map(|&i| {
            let w = snapshot.workload(i);
            let rank = rank(lb, source, w)?;
            (w.ready && !w.ips.is_empty()).then_some((i, (), w.weight.max(1), rank))
        })
    };
    let Some((instance, ())) = nearest(instances, rng) else {
        return Route::Refuse(Refusal::NoWaypointInstance(format!(
            "{}/{}",
            waypoint.namespace, waypoint.name
        )));
    };
    let w = snapshot.workload(instance);
    let ip: IpAddr = w.ip_like(authority.ip()).unwrap_or(w.ips[0]);
    Route::ViaWaypoint {
        next_hop: SocketAddr::new(ip, hbone::HBONE_PORT),
        authority,
        identities: vec![w.identity.clone()],
        waypoint: id,
        instance,
        service,
    }
}

/// How near `to` is to `from` by `lb`'s routing preference (0 for all without one); `None` when
/// a strict preference rules it out.
fn rank(lb: Option<&LoadBalancing>, from: &Workload, to: &Workload) -> Option<usize> {
    lb.map_or(Some(0), |lb| lb.rank(from, to))
}

/// A weighted random choice among the nearest of `candidates` (item, extra, weight, rank), in
/// two passes and without allocating: one finds the nearest rank, one chooses.
fn nearest<T, U, I: Iterator<Item = (T, U, u32, usize)>>(
    candidates: impl Fn() -> I,
    rng: &mut impl Rng,
) -> Option<(T, U)> {
    let best = candidates().map(|(.., rank)| rank).max()?;
    let nearest = candidates()
        .filter(|&(.., rank)| rank == best)
        .map(|(item, extra, weight, _)| (item, extra, weight));
    weighted(nearest, rng)
}

/// A weighted random choice, in one pass and without allocating (reservoir sampling).
fn weighted<T, U>(
    candidates: impl Iterator<Item = (T, U, u32)>,
    rng: &mut impl Rng,
) -> Option<(T, U)> {
    let mut total: u64 = 0;
    let mut chosen = None;
    for (item, extra, weight) in candidates {
        total += u64::from(weight);
        if rng.random_range(0..total) < u64::from(weight) {
            chosen = Some((item, extra));
        }
    }
    chosen
}

#[cfg(test)]
mod tests;
