//! Inbound plaintext (15006): captured TCP to a local workload that did not come over HBONE
//! (a caller outside the mesh). Authorization runs with no peer identity, so a STRICT
//! PeerAuthentication refuses it, and so does any policy that needs a principal, and a workload
//! bound to a waypoint (the caller would skip it). A sandwiched waypoint's PROXY port, and
//! ztunnel's own ports, are refused outright.

use std::net::SocketAddr;
use std::sync::Arc;

use hbone::copy_bidirectional;
use hbone::drain::DrainWatch;
use hbone::headers::TraceParent;
use mesh::telemetry::Peer;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::admission;
use super::connection::{ConnectionGuard, Direction, Ends, LoggedWorkload};
use super::{Ctx, accept_loop, inbound};
use crate::metrics::{Reporter, TcpLabels};

/// Serves `uid`'s captured plaintext on `listener`; `own_ports` are ztunnel's on it, and
/// `stopping` is cancelled as its proxy stops.
pub(super) async fn serve(
    ctx: Arc<Ctx>,
    uid: Arc<str>,
    own_ports: &'static [u16],
    stopping: CancellationToken,
    listener: TcpListener,
    drain: DrainWatch,
) {
    accept_loop(listener, drain, move |stream, peer, drain| {
        let (ctx, uid, stopping) = (ctx.clone(), uid.clone(), stopping.clone());
        async move {
            // TPROXY keeps the original destination as the socket's local address.
            match stream.local_addr().map(hbone::canonical) {
                Ok(target) => handle(&ctx, &uid, own_ports, &stopping, stream, peer, target).await,
                Err(e) => tracing::warn!(src.addr = %peer, error = %e, "plaintext connection without a local address"),
            }
            drop(drain);
        }
    })
    .await;
}

async fn handle(
    ctx: &Ctx,
    uid: &str,
    own_ports: &[u16],
    stopping: &CancellationToken,
    mut client: TcpStream,
    peer: SocketAddr,
    target: SocketAddr,
) {
    let Some(named) = super::named(ctx, uid, stopping).await else {
        return;
    };
    let (snapshot, workload) = (&named.snapshot, named.workload());
    let source = snapshot.workload_by_ip(&workload.network, peer.ip());
    let cluster = &snapshot.options().cluster_id;
    // The caller dialled this pod's address (capture gives no VIP), so the service is guessed
    // from the port, as upstream guesses it.
    let service = inbound::service_on_port(snapshot, workload, target.port());
    let labels = TcpLabels::new(
        Reporter::destination,
        Peer::new(source, cluster),
        service,
        Peer::new(Some(workload), cluster),
        false,
    );
    let ends = Ends {
        src_addr: Some(peer),
        src_workload: source.map(|w| LoggedWorkload::new(w, cluster)),
        dst_addr: Some(target),
        dst_service: service.map(|s| s.hostname.to_string()),
        dst_workload: Some(LoggedWorkload::new(workload, cluster)),
        trace: Some(TraceParent::random()),
        ..Ends::default()
    };
    let mut guard = ConnectionGuard::open(ctx.metrics.clone(), labels, Direction::Inbound, ends);
    // A connection straight to one of ztunnel's own ports in the pod would come back to it.
    if own_ports.contains(&target.port()) {
        guard.failed(
            "NR",
            format!("plaintext refused: port {} is ztunnel's own", target.port()),
        );
        return;
    }
    // Registered first, then admitted by the configuration current now (see `admission`).
    let registration = ctx.live.register(uid.into(), None, peer, target, None);
    let conn = admission::Conn {
        source: None,
        source_ip: peer.ip(),
        destination: target,
    };
    if let Err(why) = admission::admit_now(&ctx.store, uid, &conn, &registration) {
        guard.failed(why.response_flag(), why);
        return;
    }
    let mut app = match ctx.sockets.connect_app(workload, peer.ip(), target).await {
        Ok(app) => app,
        Err(e) => {
            guard.failed(
                "CONNECT",
                format!("connecting to the application at {target}: {e}"),
            );
            return;
        }
    };
    // A change that refused it while the application connect ran.
    if let Some(why) = registration.refused() {
        guard.failed(why.response_flag(), why);
        return;
    }
    drop(named);
    guard.established();
    tokio::select! {
        copied = copy_bidirectional(&mut client, &mut app) => match copied {
            Ok(c) => guard.copied(c),
            Err(e) => {
                guard.copied(e.copied);
                guard.failed("-", e.source);
            }
        },
        why = registration.closed() => {
            ctx.metrics.late_rejections.inc();
            guard.failed("DENY", format!("closed: a configuration change refuses it: {why}"));
        }
    }
}
