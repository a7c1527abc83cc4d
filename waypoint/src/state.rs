//! What every request sees: the current snapshot, resolved for this waypoint, with its
//! load-balancing state; swapped whole when the configuration changes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hbone::Identity;
use mesh::model::{
    AppProtocol, DestinationRuleId, LoadBalancing, Service, ServiceId, ServicePort, WaypointId,
    WorkloadId,
};
use mesh::route::DestinationPolicy;
use mesh::{Snapshot, Store};

use crate::balance::{Balancer, Chosen};
use crate::keepalive::{IdleTunnels, PlainServed};
use crate::limits::Breakers;
use crate::metrics::Metrics;
use crate::origin_tls::TlsPeers;
use crate::resolve::Names;
use crate::wasm::{LoadedSet, Plugins};

/// The Gateway this process serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaypointName {
    /// Namespace of the Gateway.
    pub namespace: Arc<str>,
    /// Name of the Gateway.
    pub name: Arc<str>,
}

impl std::fmt::Display for WaypointName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One snapshot as this waypoint uses it.
#[derive(Debug)]
pub(crate) struct View {
    pub(crate) snapshot: Arc<Snapshot>,
    /// This waypoint in `snapshot`; `None` if the Gateway was removed (everything is refused).
    pub(crate) waypoint: Option<WaypointId>,
    /// The waypoint's namespace: its proxy namespace, which decides the DestinationRules it
    /// applies.
    pub(crate) namespace: Arc<str>,
    pub(crate) balancer: Balancer,
    pub(crate) breakers: Breakers,
    /// Upstream TLS settings in Pingora's form, built as first used.
    pub(crate) tls_peers: TlsPeers,
    /// The Wasm plugins this waypoint runs, started.
    pub(crate) plugins: LoadedSet,
}

/// A destination this waypoint serves, resolved in one snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// A service port, addressed by VIP.
    Service {
        id: ServiceId,
        port: u16,
        port_index: usize,
    },
    /// A workload port, addressed by pod IP (`waypoint-for: workload|all`).
    Workload { id: WorkloadId, port: u16 },
}

/// The next hop of an attempt or a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hop {
    /// An endpoint (chosen, or the workload addressed) and its target port.
    Endpoint(WorkloadId, u16),
    /// The address the caller dialled, in plain TCP: the service picks no endpoint (a
    /// ServiceEntry resolved `NONE`), and Envoy's original-destination cluster, which istiod
    /// gives a waypoint for it, sends there, as ztunnel does without a waypoint.
    Address(SocketAddr),
}

/// Why a service has no next hop for what reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NoHop {
    /// The balancer found no endpoint to choose.
    #[error("no healthy upstream")]
    Unhealthy,
    /// The service passes connections through, and the caller dialled another service (a
    /// route brought the request here), so no address of this service was dialled.
    #[error(
        "the service passes connections through to the address dialled, and the caller \
         dialled another service"
    )]
    NotDialled,
}

impl Hop {
    /// Where `service` sends what reaches it, the caller having dialled `dialled`: to the
    /// endpoint `choose` picks (the balancer, with what the caller's route asks of it), or, for
    /// a service that picks none, to the address dialled. A pass through keeps the address
    /// and, where the entry's port names another `targetPort`, goes to that port instead, as
    /// istiod overrides an original-destination cluster's port. The endpoint chosen is
    /// returned with the hop, as it counts the request as in flight until dropped.
    pub(crate) fn to_service(
        service: &Service,
        dialled: SocketAddr,
        choose: impl FnOnce() -> Option<Chosen>,
    ) -> Result<(Hop, Option<Chosen>), NoHop> {
        if !(service.load_balancing.as_ref()).is_some_and(LoadBalancing::is_passthrough) {
            let chosen = choose().ok_or(NoHop::Unhealthy)?;
            return Ok((
                Hop::Endpoint(chosen.workload, chosen.target_port),
                Some(chosen),
            ));
        }
        if !service.vips.contains(&dialled.ip()) {
            return Err(NoHop::NotDialled);
        }
        let port = match service.port(dialled.port()) {
            Some((
                _,
                ServicePort {
                    target: mesh::model::Target::Number(to),
                    ..
                },
            )) => *to,
            _ => dialled.port(),
        };
        Ok((Hop::Address(SocketAddr::new(dialled.ip(), port)), None))
    }
}

/// Why a destination is not served here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NotServed {
    #[error("the waypoint Gateway is not in the current configuration")]
    NoWaypoint,
    #[error("no service or workload has this address and port")]
    Unknown,
    #[error("the destination is not bound to this waypoint")]
    OtherWaypoint,
}

impl View {
    /// The view of `snapshot`, with its plugins loaded (reusing `previous`'s unchanged ones).
    pub(crate) async fn load(
        snapshot: Arc<Snapshot>,
        name: &WaypointName,
        address: IpAddr,
        wasm: &Plugins,
        previous: Option<&View>,
    ) -> Self {
        let waypoint = snapshot
            .waypoint_by_name(&name.namespace, &name.name)
            .map(|(id, _)| id);
        // Services that prefer near endpoints measure from this instance, the one on the
        // address served; one the configuration does not place has every endpoint as near.
        let instance = waypoint.and_then(|id| {
            (snapshot.waypoint(id).instances.iter().copied())
                .find(|&i| snapshot.workload(i).has_ip(address))
        });
        let plugins = wasm
            .load(&snapshot, waypoint, previous.map(|p| &p.plugins))
            .await;
        let namespace = name.namespace.clone();
        let balancer = Balancer::new(&snapshot, previous.map(|p| &p.balancer))
            .measured_from(&snapshot, &namespace, instance);
        let breakers = Breakers::new(&snapshot, &namespace, previous.map(|p| &p.breakers));
        Self {
            namespace,
            snapshot,
            waypoint,
            balancer,
            breakers,
            tls_peers: TlsPeers::default(),
            plugins,
        }
    }

    /// The DestinationRule this waypoint applies to `service`: istiod's choice for a proxy in
    /// the waypoint's namespace.
    pub(crate) fn destination_rule(
        &self,
        service: ServiceId,
    ) -> Option<(DestinationRuleId, &DestinationPolicy)> {
        let service = self.snapshot.service(service);
        self.snapshot.destination_rule(&self.namespace, service)
    }

    /// The subset `name` of `service` as the balancer takes it (`Some(None)`: no subset, every
    /// endpoint); `None` when a subset is named and no DestinationRule applies here.
    pub(crate) fn subset<'n>(
        &self,
        service: ServiceId,
        name: Option<&'n str>,
    ) -> Option<Option<(DestinationRuleId, &'n str)>> {
        match name {
            None => Some(None),
            Some(name) => Some(Some((self.destination_rule(service)?.0, name))),
        }
    }

    /// Resolves a tunnel's destination: a bound service's VIP and port, or a bound workload's
    /// address.
    pub(crate) fn resolve(&self, dst: SocketAddr) -> Result<Target, NotServed> {
        let waypoint = self.waypoint.ok_or(NotServed::NoWaypoint)?;
        let snapshot = &self.snapshot;
        // Where services of several namespaces declare the VIP, the one this waypoint serves
        // (the caller's ztunnel chose by its own namespace, and sent it here for that).
        let mut at_vip = (snapshot.services_by_vip(dst.ip()))
            .filter_map(|(id, service)| Some((id, service, service.port(dst.port())?.0)))
            .peekable();
        if at_vip.peek().is_some() {
            return match at_vip.find(|(_, service, _)| service.waypoint == Some(waypoint)) {
                Some((id, _, port_index)) => Ok(Target::Service {
                    id,
                    port: dst.port(),
                    port_index,
                }),
                None => Err(NotServed::OtherWaypoint),
            };
        }
        let network = &*snapshot.options().network;
        match snapshot.workload_by_ip(network, dst.ip()) {
            Some(w) if w.waypoint == Some(waypoint) => Ok(Target::Workload {
                id: w.id,
                port: dst.port(),
            }),
            Some(_) => Err(NotServed::OtherWaypoint),
            None => Err(NotServed::Unknown),
        }
    }

    /// The protocol of a destination port: the service port's; a workload port's is not
    /// declared anywhere. Unspecified ports are sniffed (`sniff`).
    pub(crate) fn protocol(&self, target: Target) -> AppProtocol {
        match target {
            Target::Service { id, port_index, .. } => {
                self.snapshot.service(id).ports[port_index].protocol
            }
            Target::Workload { .. } => AppProtocol::Unspecified,
        }
    }
}

/// Everything shared by the listeners and the HTTP proxy.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) store: Arc<Store>,
    pub(crate) name: WaypointName,
    /// The address it serves on.
    pub(crate) address: IpAddr,
    /// The waypoint's own identity (its service account): presented on both HBONE legs.
    pub(crate) identity: Identity,
    pub(crate) pool: hbone::Pool,
    /// HTTP/1.1 tunnels to endpoints, parked between requests.
    pub(crate) idle: Arc<IdleTunnels>,
    /// Requests carried by Pingora's plain TCP connections to endpoints out of the mesh.
    pub(crate) plain_served: PlainServed,
    /// Endpoint names resolved, kept briefly.
    pub(crate) names: Names,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) wasm: Plugins,
    view: ArcSwap<View>,
}

impl Shared {
    /// Loads the current snapshot (plugins included) before anything is served, so no
    /// request passes before its plugins are ready.
    pub(crate) async fn new(
        store: Arc<Store>,
        name: WaypointName,
        address: IpAddr,
        identity: Identity,
        pool: hbone::Pool,
        metrics: Arc<Metrics>,
        wasm: Plugins,
    ) -> Self {
        let view = View::load(store.load(), &name, address, &wasm, None).await;
        metrics.config_version.set(view.snapshot.version() as i64);
        Self {
            store,
            name,
            address,
            identity,
            pool,
            idle: Arc::default(),
            plain_served: PlainServed::default(),
            names: Names::default(),
            metrics,
            wasm,
            view: ArcSwap::from_pointee(view),
        }
    }

    /// The current view; one per request or tunnel, so a request sees one snapshot throughout.
    pub(crate) fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    /// Rebuilds the view whenever the store publishes a snapshot; returns when the store is gone.
    pub(crate) async fn follow(self: Arc<Self>) {
        let mut changes = self.store.subscribe();
        while changes.changed().await.is_ok() {
            let snapshot = self.store.load();
            let previous = self.view.load_full();
            let view = View::load(
                snapshot,
                &self.name,
                self.address,
                &self.wasm,
                Some(&previous),
            )
            .await;
            if view.waypoint.is_none() {
                tracing::warn!(waypoint = %self.name, version = view.snapshot.version(), "the waypoint Gateway is gone from the configuration; refusing all traffic");
            }
            let stats = self.store.stats();
            self.metrics.config_applied.set(stats.applied as i64);
            self.metrics.config_rejected.set(stats.rejected as i64);
            let version = view.snapshot.version();
            self.view.store(Arc::new(view));
            self.metrics.config_version.set(version as i64);
            tracing::info!(version, "configuration applied");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service that picks no endpoint sends to the address dialled when it is one of its
    /// own (at the port's `targetPort`, where it names one), and nowhere when the caller
    /// dialled another; every other service picks endpoints.
    #[test]
    fn a_service_resolved_none_passes_through_to_its_own_address() {
        let yaml = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ranges, namespace: app}
spec:
  hosts: [ranges.example.com]
  addresses: [203.0.113.7]
  location: MESH_EXTERNAL
  ports:
  - {number: 443, name: tls, protocol: TLS}
  - {number: 8443, name: alt, protocol: TLS, targetPort: 9443}
  endpoints: [{address: 198.51.100.9}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: fixed, namespace: app}
spec:
  hosts: [fixed.example.com]
  addresses: [203.0.113.8]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{number: 443, name: tls, protocol: TLS}]
  endpoints: [{address: 198.51.100.10}]
"#;
        let snapshot =
            Snapshot::from_yaml("mesh.yaml", yaml, &mesh::Options::default()).expect("snapshot");
        let service = |host: &str| snapshot.service_by_host(host).expect("service").1;
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        let pass = |host: &str, dialled: &str| {
            Hop::to_service(service(host), addr(dialled), || {
                unreachable!("a pass through chooses no endpoint")
            })
            .map(|(hop, chosen)| (hop, chosen.is_some()))
        };
        assert_eq!(
            pass("ranges.example.com", "203.0.113.7:443"),
            Ok((Hop::Address(addr("203.0.113.7:443")), false))
        );
        assert_eq!(
            pass("ranges.example.com", "203.0.113.7:8443"),
            Ok((Hop::Address(addr("203.0.113.7:9443")), false)),
            "the port's targetPort"
        );
        assert_eq!(
            pass("ranges.example.com", "203.0.113.8:443"),
            Err(NoHop::NotDialled),
            "another entry's address"
        );
        // An entry that picks its endpoints asks the balancer, and has none when it finds none.
        let mut asked = false;
        let balanced = Hop::to_service(
            service("fixed.example.com"),
            addr("203.0.113.8:443"),
            || {
                asked = true;
                None
            },
        );
        assert_eq!(balanced.map(|(hop, _)| hop), Err(NoHop::Unhealthy));
        assert!(asked);
    }
}
