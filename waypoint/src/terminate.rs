//! connect_terminate: each CONNECT on the waypoint's HBONE listener.
//!
//! The tunnel's `:authority` is the original destination. Only destinations bound to this
//! waypoint are served; anything else is refused with 400 before a byte is accepted, so a
//! misrouted client learns it at once and no tunnel is opened to a destination the waypoint
//! does not own.

use std::sync::Arc;

use hbone::InboundRequest;
use http::StatusCode;
use pingora_core::apps::ServerApp;
use pingora_proxy::HttpProxy;
use tokio::sync::watch;

use crate::http::Waypoint;
use crate::l4;
use crate::sniff;
use crate::state::Shared;
use crate::tunnel::{self, Tunnel};

/// The HBONE handler.
pub(crate) struct Terminate {
    pub(crate) shared: Arc<Shared>,
    pub(crate) proxy: Arc<HttpProxy<Waypoint>>,
    /// Pingora's shutdown signal: set when the drain starts, ending keep-alive.
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl hbone::Handler for Terminate {
    async fn handle(&self, request: InboundRequest) {
        let view = self.shared.view();
        let principal: Arc<str> = request.peer_identity().to_string().into();
        let Some(destination) = request.target().addr() else {
            tracing::info!(src.identity = %principal, dst = %request.target(), "refused tunnel: the waypoint is addressed by IP and port");
            self.shared.metrics.refused_tunnels.inc();
            request.refuse(StatusCode::BAD_REQUEST);
            return;
        };
        let target = match view.resolve(destination) {
            Ok(t) => t,
            Err(reason) => {
                tracing::info!(src.identity = %principal, dst.addr = %destination, %reason, "refused tunnel");
                self.shared.metrics.refused_tunnels.inc();
                request.refuse(StatusCode::BAD_REQUEST);
                return;
            }
        };
        let tunnel = Tunnel::new(&request, principal, destination);
        let protocol = view.protocol(target);
        let mut stream = match request.accept() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "tunnel closed before it was accepted");
                return;
            }
        };
        let http = match protocol {
            mesh::model::AppProtocol::Unspecified => sniff::is_http(&mut stream).await,
            protocol => protocol.is_http(),
        };
        tracing::debug!(src.identity = %tunnel.principal, src.addr = %tunnel.client_ip, peer = %tunnel.peer, dst.addr = %destination, http, "tunnel accepted");
        if !http {
            l4::serve(&self.shared, view, target, tunnel, stream).await;
            return;
        }
        // Requests load their own view; this tunnel keeps none alive.
        drop(view);
        let mut stream = tunnel::downstream(stream, tunnel);
        // Pingora hands a keep-alive connection back between requests.
        while let Some(again) = self.proxy.process_new(stream, &self.shutdown).await {
            stream = again;
        }
    }
}
