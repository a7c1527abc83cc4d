//! Inbound HBONE (15008): validate the target (never one of ztunnel's own ports), admit the
//! caller (`admission`: waypoint bypass, L4 policy), connect to the application (or to a
//! sandwiched waypoint's application tunnel), copy until the end or until a configuration change
//! refuses the connection.

use std::net::SocketAddr;
use std::sync::Arc;

use hbone::headers::TraceParent;
use hbone::{Authority, ChunkIo, Handler, InboundRequest, copy_bidirectional};
use http::StatusCode;
use mesh::Snapshot;
use mesh::model::Workload;
use mesh::telemetry::Peer;
use tokio_util::sync::CancellationToken;

use super::admission::{self, Refused};
use super::connection::{ConnectionGuard, Direction, Ends, LoggedWorkload};
use super::{Ctx, app_tunnel};
use crate::metrics::{Reporter, TcpLabels};

/// The inbound handler of one workload.
#[derive(Debug)]
pub(super) struct Inbound {
    ctx: Arc<Ctx>,
    uid: Arc<str>,
    /// ztunnel's ports on this workload, which no tunnel may target.
    own_ports: &'static [u16],
    /// Cancelled as the workload's proxy stops.
    stopping: CancellationToken,
}

impl Inbound {
    pub(super) fn new(
        ctx: Arc<Ctx>,
        uid: Arc<str>,
        own_ports: &'static [u16],
        stopping: CancellationToken,
    ) -> Self {
        Self {
            ctx,
            uid,
            own_ports,
            stopping,
        }
    }
}

impl Handler for Inbound {
    async fn handle(&self, mut request: InboundRequest) {
        let Some(named) = super::named(&self.ctx, &self.uid, &self.stopping).await else {
            request.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return;
        };
        let (snapshot, workload) = (&named.snapshot, named.workload());
        let peer = request.peer_addr();
        let peer_identity = request.peer_identity().clone();
        let source = snapshot.workload_by_ip(&workload.network, peer.ip());
        let local = request.local_addr().ip();
        // A sandwiched waypoint takes every tunnel on its application tunnel, whatever the
        // target: it routes (and refuses) by target itself.
        let app_tunnel = workload.app_tunnel;
        // A `hostname:port` authority (double HBONE, and peers that address services by name)
        // names a service port this workload backs: its target port, on this workload. For a
        // sandwiched waypoint it names the service's VIP and port, which the waypoint routes.
        let by_host = match request.target() {
            Authority::Host { host, port } => Some(match app_tunnel {
                None => host_target(snapshot, workload, host, *port, local),
                Some(_) => vip_target(snapshot, host, *port, local),
            }),
            Authority::Addr(_) => None,
        };
        let target = match &by_host {
            Some(Ok((_, target))) => Some(*target),
            Some(Err(_)) => None,
            None => request.target().addr(),
        };
        // Telemetry's destination service, as upstream finds it: the one the authority names,
        // else the one the caller addressed (`forwarded; host=`) if the workload backs it,
        // else the first of the workload's services with a port landing on the target port.
        let addressed = (request.headers().forwarded.as_ref())
            .and_then(|f| f.host.as_deref())
            .and_then(|host| {
                (workload.services.iter())
                    .map(|&s| snapshot.service(s))
                    .find(|s| &*s.hostname == host)
            });
        let service = match &by_host {
            Some(Ok((service, _))) => Some(*service),
            _ if addressed.is_some() => addressed,
            _ if app_tunnel.is_some() => target
                .and_then(|t| snapshot.service_by_vip_port(t.ip(), t.port()))
                .map(|(_, service, _)| service),
            _ => target.and_then(|t| service_on_port(snapshot, workload, t.port())),
        };
        let cluster = &snapshot.options().cluster_id;
        let baggage = request.headers().baggage.as_ref();
        let principal = peer_identity.to_string();
        let labels = TcpLabels::new(
            Reporter::destination,
            Peer::caller(source, &peer_identity, &principal, baggage, cluster),
            service,
            Peer::new(Some(workload), cluster),
            true,
        );
        let ends = Ends {
            src_addr: Some(peer),
            src_workload: source.map(|w| LoggedWorkload::new(w, cluster)),
            src_identity: Some(principal),
            dst_addr: Some(request.local_addr()),
            dst_hbone_addr: Some(request.target().to_string()),
            dst_service: service.map(|s| s.hostname.to_string()),
            dst_workload: Some(LoggedWorkload::new(workload, cluster)),
            dst_identity: Some(workload.identity.to_string()),
            trace: Some(
                request
                    .headers()
                    .traceparent
                    .unwrap_or_else(TraceParent::random),
            ),
        };
        let mut guard =
            ConnectionGuard::open(self.ctx.metrics.clone(), labels, Direction::Inbound, ends);

        if let Some(Err(why)) = by_host {
            guard.failed("NR", format!("refused with 503: {why}"));
            request.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
        let Some(target) = target.filter(|t| app_tunnel.is_some() || workload.has_ip(t.ip()))
        else {
            guard.failed(
                "NR",
                format!(
                    "refused with 400: target {} is not this workload's address",
                    request.target()
                ),
            );
            request.refuse(StatusCode::BAD_REQUEST);
            return;
        };
        // As upstream: the tunnel may not reach ztunnel's own listeners on this workload (a
        // loop, or for SOCKS5 a way to open connections as this workload).
        if self.own_ports.contains(&target.port()) {
            guard.failed(
                "NR",
                format!(
                    "refused with 503: target port {} is ztunnel's own",
                    target.port()
                ),
            );
            request.refuse(StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
        // A sandwiched waypoint's tunnel port: its binding's, or the target's own.
        let tunnel_port = app_tunnel.map(|t| t.port.unwrap_or(target.port()));
        // Policy sees where the connection goes on this workload: for a sandwiched waypoint
        // that is its pod's address and tunnel port, not the service the header names (as
        // upstream, so a policy selecting the waypoint's pod means the same in both).
        let destination = match tunnel_port {
            None => target,
            Some(port) => SocketAddr::new(local, port),
        };
        // Registered before it is admitted, and admitted by the configuration current after
        // registering: a change published at any point from here on closes it.
        let registration = self.ctx.live.register(
            self.uid.clone(),
            Some(peer_identity.clone()),
            peer,
            destination,
            service.map(|s| s.hostname.clone()),
        );
        let conn = admission::Conn {
            source: Some(&peer_identity),
            source_ip: peer.ip(),
            destination,
        };
        if let Err(why) = admission::admit_now(&self.ctx.store, &self.uid, &conn, &registration) {
            refuse(&mut guard, request, &why);
            return;
        }
        let connected = match tunnel_port {
            // The application sees the caller as its peer; a sandwiched waypoint learns it
            // from the PROXY header instead.
            None => {
                (self.ctx.sockets)
                    .connect_app(workload, peer.ip(), target)
                    .await
            }
            Some(port) => {
                let at = self.ctx.sockets.app_tunnel_addr(local, port);
                let service_host = match request.target() {
                    Authority::Host { host, .. } => Some(&**host),
                    Authority::Addr(_) => None,
                };
                let header = app_tunnel::Header {
                    src: peer,
                    dst: target,
                    client: &peer_identity,
                    service_host,
                };
                app_tunnel::open(&*self.ctx.sockets, workload, at, &header).await
            }
        };
        let mut app = match connected {
            Ok(app) => app,
            Err(e) => {
                let what = match tunnel_port {
                    None => format!("the application at {target}"),
                    Some(port) => format!("the waypoint's application tunnel on port {port}"),
                };
                guard.failed(
                    "CONNECT",
                    format!("refused with 503: connecting to {what}: {e}"),
                );
                request.refuse(StatusCode::SERVICE_UNAVAILABLE);
                return;
            }
        };
        // A change that refused it while the application connect ran: answer that, rather
        // than 200 and a reset.
        if let Some(why) = registration.refused() {
            refuse(&mut guard, request, &why);
            return;
        }
        // The 200 says who answered, as upstream's does, for a caller that cannot look the
        // destination up itself.
        let baggage = workload.baggage(&snapshot.options().cluster_id).to_string();
        if let Ok(value) = http::HeaderValue::from_str(&baggage) {
            (request.response_headers_mut()).insert(hbone::headers::name::BAGGAGE, value);
        }
        drop(named);
        let mut tunnel = match request.accept() {
            Ok(t) => t,
            Err(e) => {
                guard.failed("-", e);
                return;
            }
        };
        guard.established();
        tokio::select! {
            copied = copy_bidirectional(&mut tunnel, &mut app) => match copied {
                Ok(c) => guard.copied(c),
                Err(e) => {
                    guard.copied(e.copied);
                    guard.failed("-", e.source);
                }
            },
            why = registration.closed() => {
                tunnel.abort();
                self.ctx.metrics.late_rejections.inc();
                guard.failed("DENY", format!("closed: a configuration change refuses it: {why}"));
            }
        }
    }
}

/// Answers a refused CONNECT: 503 when the workload is gone, 401 otherwise.
fn refuse(guard: &mut ConnectionGuard, request: InboundRequest, why: &Refused) {
    let status = match why {
        Refused::Gone => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNAUTHORIZED,
    };
    let flag = why.response_flag();
    guard.failed(flag, format!("refused with {}: {why}", status.as_u16()));
    request.refuse(status);
}

/// The service `host` names and where its port `port` lands on `workload` (at `local`, the
/// address the tunnel arrived on), or why there is no such place.
fn host_target<'s>(
    snapshot: &'s Snapshot,
    workload: &Workload,
    host: &str,
    port: u16,
    local: std::net::IpAddr,
) -> Result<(&'s mesh::model::Service, SocketAddr), String> {
    let Some((id, service)) = snapshot.service_by_host(host) else {
        return Err(format!("no service has host {host}"));
    };
    if !workload.services.contains(&id) {
        return Err(format!("this workload does not back {host}"));
    }
    let Some(service_port) = service.ports.iter().find(|p| p.port == port) else {
        return Err(format!("{host} has no port {port}"));
    };
    match endpoint_port(service_port, workload) {
        Some(target) => Ok((service, SocketAddr::new(local, target))),
        None => Err(format!("{host}:{port} has no target port on this workload")),
    }
}

/// The service `host` names and its VIP (of `local`'s family when it has one) with `port`, for
/// a sandwiched waypoint, which routes by VIP.
fn vip_target<'s>(
    snapshot: &'s Snapshot,
    host: &str,
    port: u16,
    local: std::net::IpAddr,
) -> Result<(&'s mesh::model::Service, SocketAddr), String> {
    let Some((_, service)) = snapshot.service_by_host(host) else {
        return Err(format!("no service has host {host}"));
    };
    if service.port(port).is_none() {
        return Err(format!("{host} has no port {port}"));
    }
    let vip = (service.vips.iter().find(|v| v.is_ipv4() == local.is_ipv4()))
        .or(service.vips.first())
        .ok_or_else(|| format!("{host} has no VIP"))?;
    Ok((service, SocketAddr::new(*vip, port)))
}

/// The first of `workload`'s services with a port that lands on `port` of it: the service
/// telemetry names when the caller's own choice is unknown, as upstream guesses it.
pub(super) fn service_on_port<'s>(
    snapshot: &'s mesh::Snapshot,
    workload: &Workload,
    port: u16,
) -> Option<&'s mesh::model::Service> {
    (workload.services.iter())
        .map(|&s| snapshot.service(s))
        .find(|s| (s.ports.iter()).any(|p| endpoint_port(p, workload) == Some(port)))
}

fn endpoint_port(port: &mesh::model::ServicePort, workload: &Workload) -> Option<u16> {
    match &port.target {
        mesh::model::Target::Number(n) => Some(*n),
        mesh::model::Target::Named(name) => workload.named_port(name),
    }
}
