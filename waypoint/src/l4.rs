//! The TCP path: ports whose protocol is not HTTP are authorized on their L4 attributes and
//! copied byte for byte to an endpoint, never parsed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use hbone::{Authority, ConnectRequest, H2Stream, HBONE_PORT};
use mesh::authz::{self, Attributes};
use mesh::model::Protocol;
use mesh::route::TrafficPolicy;
use tokio::net::TcpStream;

use crate::balance::Outcome;
use crate::metrics::{Labels, Parties};
use crate::state::{Hop, Shared, Target, View};
use crate::tunnel::Tunnel;

/// The connection to the chosen endpoint.
enum Upstream {
    /// A CONNECT stream to the endpoint's ztunnel.
    Tunnel(H2Stream),
    /// Plain TCP to an endpoint out of the mesh.
    Plain(TcpStream),
}

/// Serves one tunnel to a TCP port until both directions are done.
pub(crate) async fn serve(
    shared: &Shared,
    view: Arc<View>,
    target: Target,
    tunnel: Tunnel,
    mut downstream: H2Stream,
) {
    let snapshot = &view.snapshot;
    let Some(waypoint) = view.waypoint.map(|id| snapshot.waypoint(id)) else {
        return;
    };
    let network = &*snapshot.options().network;
    let source = snapshot.workload_by_ip(network, tunnel.client_ip);
    let service = match target {
        Target::Service { id, .. } => Some(snapshot.service(id)),
        Target::Workload { .. } => None,
    };
    let attrs = Attributes {
        source: Some(&tunnel.source),
        source_ip: tunnel.client_ip,
        remote_ip: tunnel.client_ip,
        destination_ip: tunnel.destination.ip(),
        destination_port: tunnel.destination.port(),
        sni: None,
        http: None,
    };
    let verdict = authz::evaluate(snapshot.waypoint_l4_policies(waypoint, service), &attrs);
    if !verdict.allowed {
        tracing::info!(
            target: "access",
            protocol = "tcp",
            src.identity = %tunnel.principal,
            trace_id = %tunnel.trace_id(),
            src.addr = %tunnel.client_ip,
            dst.addr = %tunnel.destination,
            policy = verdict.policy.map(|p| p.name()),
            "connection denied by authorization policy"
        );
        return;
    }

    // Choose the endpoint: a service's, by its DestinationRule; the addressed workload; or,
    // for a service that picks none, the address the caller dialled (no workload).
    let default_policy = TrafficPolicy::default();
    let mut connect_timeout = default_policy.connection_pool.connect_timeout;
    let mut detection = None;
    let mut tls = false;
    let (chosen, hop) = match target {
        Target::Service {
            id,
            port,
            port_index,
        } => {
            let policy = (view.destination_rule(id))
                .and_then(|(_, p)| p.traffic(None, port))
                .unwrap_or(&default_policy);
            detection = policy.outlier_detection;
            connect_timeout = policy.connection_pool.connect_timeout;
            tls = policy.tls.is_some();
            let choose = || {
                view.balancer.choose(
                    snapshot,
                    id,
                    port_index,
                    None,
                    policy,
                    None,
                    &[],
                    Instant::now(),
                )
            };
            match Hop::to_service(snapshot.service(id), tunnel.destination, choose) {
                Ok((hop, chosen)) => (chosen, hop),
                Err(error) => {
                    tracing::info!(target: "access", protocol = "tcp", src.identity = %tunnel.principal, trace_id = %tunnel.trace_id(), dst.addr = %tunnel.destination, response_flags = "UH", %error, "no upstream");
                    return;
                }
            }
        }
        Target::Workload { id, port } => (None, Hop::Endpoint(id, port)),
    };
    let (workload, endpoint) = match hop {
        Hop::Endpoint(id, port) => {
            let workload = snapshot.workload(id);
            match shared.names.address_of(workload, connect_timeout).await {
                Ok(ip) => (Some(workload), SocketAddr::new(ip, port)),
                Err(error) => {
                    tracing::info!(target: "access", protocol = "tcp", src.identity = %tunnel.principal, trace_id = %tunnel.trace_id(), dst.addr = %tunnel.destination, response_flags = error.flag(), %error, "no address for the endpoint");
                    return;
                }
            }
        }
        Hop::Address(addr) => (None, addr),
    };
    let parties = Parties {
        snapshot,
        source,
        source_identity: &tunnel.source,
        source_principal: &tunnel.principal,
        source_baggage: tunnel.baggage.as_deref(),
        service,
        destination: workload,
    };
    // In the mesh: a CONNECT to its ztunnel. Out of it (a ServiceEntry's endpoint outside the
    // mesh, or the address dialled): plain TCP, as Envoy reaches it, unless its
    // DestinationRule asks for TLS, which this waypoint originates on HTTP ports only: refused
    // rather than sent in the clear.
    let tunnelled = workload.filter(|w| w.protocol == Protocol::Hbone);
    let connected = if tunnelled.is_none() && tls {
        Err("the DestinationRule asks for TLS, which is originated on HTTP ports only".to_owned())
    } else if let Some(workload) = tunnelled {
        let request = ConnectRequest {
            src: shared.identity.clone(),
            dst_identities: vec![workload.identity.clone()],
            next_hop: SocketAddr::new(endpoint.ip(), HBONE_PORT),
            authority: Authority::Addr(endpoint),
            headers: tunnel.onward(service.map(|s| s.hostname.to_string())),
        };
        (shared.pool.connect(request).await)
            .map(Upstream::Tunnel)
            .map_err(|e| e.to_string())
    } else {
        match tokio::time::timeout(connect_timeout, TcpStream::connect(endpoint)).await {
            Ok(Ok(s)) => Ok(Upstream::Plain(s)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no connection within {connect_timeout:?}")),
        }
    };
    let upstream = match connected {
        Ok(s) => s,
        Err(error) => {
            if let Some(c) = &chosen {
                view.balancer.report(
                    c.workload,
                    Outcome::LocalOriginFailure,
                    detection.as_ref(),
                    Instant::now(),
                );
            }
            tracing::info!(target: "access", protocol = "tcp", src.identity = %tunnel.principal, trace_id = %tunnel.trace_id(), dst.addr = %tunnel.destination, dst.workload = workload.map(|w| &*w.name), response_flags = "UF", %error, "upstream connect failed");
            let labels = Labels::new(&parties, "tcp", 0, "UF");
            shared.metrics.tcp_opened.get_or_create(&labels).inc();
            shared.metrics.tcp_closed.get_or_create(&labels).inc();
            return;
        }
    };
    let labels = Labels::new(&parties, "tcp", 0, "-");
    shared.metrics.tcp_opened.get_or_create(&labels).inc();
    let started = Instant::now();
    let copied = match upstream {
        Upstream::Tunnel(mut up) => hbone::copy_bidirectional(&mut downstream, &mut up).await,
        Upstream::Plain(mut up) => hbone::copy_bidirectional(&mut downstream, &mut up).await,
    };
    let (copied, error) = match copied {
        Ok(c) => (c, None),
        Err(e) => (e.copied, Some(e.source)),
    };
    shared
        .metrics
        .tcp_received
        .get_or_create(&labels)
        .inc_by(copied.a_to_b);
    shared
        .metrics
        .tcp_sent
        .get_or_create(&labels)
        .inc_by(copied.b_to_a);
    shared.metrics.tcp_closed.get_or_create(&labels).inc();
    tracing::info!(
        target: "access",
        protocol = "tcp",
        src.identity = %tunnel.principal,
        trace_id = %tunnel.trace_id(),
        src.addr = %tunnel.client_ip,
        dst.addr = %tunnel.destination,
        dst.workload = workload.map(|w| &*w.name),
        upstream = %endpoint,
        // As Envoy's access log counts them: received from the caller, sent back to it.
        bytes_received = copied.a_to_b,
        bytes_sent = copied.b_to_a,
        duration_ms = started.elapsed().as_millis() as u64,
        error = error.as_ref().map(tracing::field::display),
        "connection complete"
    );
    drop(chosen);
}
