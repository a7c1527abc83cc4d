//! Inbound plaintext (15006): captured TCP to a local workload that did not come over HBONE
//! (a caller outside the mesh). Authorization runs with no peer identity, so a STRICT
//! PeerAuthentication refuses it, and so does any policy that needs a principal. A sandwiched
//! waypoint's PROXY port, and ztunnel's own ports, are refused outright.

use std::net::SocketAddr;
use std::sync::Arc;

use hbone::copy_bidirectional;
use hbone::drain::DrainWatch;
use mesh::authz::{Attributes, evaluate};
use mesh::resource::MtlsMode;
use tokio::net::{TcpListener, TcpStream};

use super::connection::{ConnectionGuard, Direction, Ends};
use super::{Ctx, accept_loop, ports};
use crate::metrics::{Reporter, TcpLabels};

pub(super) async fn serve(ctx: Arc<Ctx>, uid: Arc<str>, listener: TcpListener, drain: DrainWatch) {
    accept_loop(listener, drain, move |stream, peer, drain| {
        let (ctx, uid) = (ctx.clone(), uid.clone());
        async move {
            // TPROXY keeps the original destination as the socket's local address.
            match stream.local_addr() {
                Ok(target) => handle(&ctx, &uid, stream, peer, target).await,
                Err(e) => tracing::warn!(src.addr = %peer, error = %e, "plaintext connection without a local address"),
            }
            drop(drain);
        }
    })
    .await;
}

async fn handle(ctx: &Ctx, uid: &str, mut client: TcpStream, peer: SocketAddr, target: SocketAddr) {
    let snapshot = ctx.store.load();
    let Some(workload) = snapshot.workload_by_uid(uid) else {
        return;
    };
    let source = snapshot.workload_by_ip(&workload.network, peer.ip());
    let labels = TcpLabels::new(
        Reporter::destination,
        &snapshot,
        source,
        Some(workload),
        None,
        false,
    );
    let ends = Ends {
        src_addr: Some(peer),
        src_workload: source.map(|w| format!("{}/{}", w.namespace, w.name)),
        dst_addr: Some(target),
        dst_workload: Some(format!("{}/{}", workload.namespace, workload.name)),
        ..Ends::default()
    };
    let mut guard = ConnectionGuard::open(ctx.metrics.clone(), labels, Direction::Inbound, ends);
    // A sandwiched waypoint trusts the PROXY header on its binding port (every port, when the
    // binding names none): only ztunnel may write one, after terminating the caller's mTLS.
    if workload
        .app_tunnel
        .is_some_and(|tunnel| tunnel.port.is_none_or(|port| port == target.port()))
    {
        guard.failed(
            "DENY",
            "plaintext refused: the sandwiched waypoint's PROXY port takes tunnels from ztunnel only",
        );
        return;
    }
    // A connection straight to one of ztunnel's own ports in the pod would come back to it.
    if ports::ALL.contains(&target.port()) {
        guard.failed(
            "NR",
            format!("plaintext refused: port {} is ztunnel's own", target.port()),
        );
        return;
    }
    if snapshot.mtls_mode(workload, target.port()) == MtlsMode::Strict {
        guard.failed(
            "DENY",
            "plaintext refused: PeerAuthentication requires mTLS (STRICT)",
        );
        return;
    }
    let attrs = Attributes {
        source: None,
        source_ip: peer.ip(),
        remote_ip: peer.ip(),
        destination_ip: target.ip(),
        destination_port: target.port(),
        sni: None,
        http: None,
    };
    let verdict = evaluate(snapshot.ztunnel_policies(workload), &attrs);
    if !verdict.allowed {
        guard.failed("DENY", "RBAC: access denied (plaintext, no peer identity)");
        return;
    }
    let mut app = match ctx.sockets.connect(workload, target).await {
        Ok(app) => app,
        Err(e) => {
            guard.failed(
                "CONNECT",
                format!("connecting to the application at {target}: {e}"),
            );
            return;
        }
    };
    let registration = ctx.live.register(uid.into(), None, peer.ip(), target);
    drop(snapshot);
    guard.established();
    tokio::select! {
        copied = copy_bidirectional(&mut client, &mut app) => match copied {
            Ok(c) => guard.copied(c),
            Err(e) => {
                guard.copied(e.copied);
                guard.failed("-", e.source);
            }
        },
        () = registration.closed() => {
            ctx.metrics.late_rejections.inc();
            guard.failed("DENY", "closed: a configuration change denies this connection");
        }
    }
}
