//! The DNS proxy: every local workload's queries (captured from port 53 in its pod, or sent to
//! its address's port 15053) are answered from the mesh model when they name a mesh service,
//! and forwarded to the upstream resolvers otherwise, as upstream ztunnel's DNS proxy does.
//!
//! It lets applications resolve what only the mesh knows (a ServiceEntry's host with its VIP,
//! a service's short names) and spares the cluster's DNS the queries for the mesh's own names.
//! [`resolve`] decides what a name means; this module speaks the protocol over UDP and TCP.
//!
//! Forwarded queries leave from the asking pod's network namespace, as upstream's do (see
//! [`Forwarder`]). The metrics carry upstream's labels: the record type, the transport, and the
//! asking workload's canonical service and revision.

mod forward;
pub mod resolve;

use std::net::SocketAddr;
use std::sync::Arc;

use hbone::drain::DrainWatch;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use mesh::Snapshot;
use mesh::model::Workload;
use rand::seq::SliceRandom;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use forward::{Asker, ForwardError, Forwarder, LookupError};
use resolve::{Answer, Family, resolve};

use crate::metrics::{DnsLabels, DnsProtocol};
use crate::proxy::Ctx;

/// How long answers about mesh names may be cached (upstream ztunnel's TTL).
const TTL: u32 = 30;

/// The largest query read over UDP: queries are a name and a few options; a larger one is cut
/// short, fails to parse and is answered `FORMERR`.
const MAX_QUERY: usize = 4096;

/// The largest UDP answer for a query without EDNS (RFC 1035).
const MAX_UDP_PLAIN: usize = 512;

/// The largest UDP answer whatever the client's EDNS says: what DNS Flag Day 2020 settled on,
/// so that no answer is fragmented; a larger one is truncated and the client asks over TCP.
const MAX_UDP: u16 = 1232;

/// Queries one workload may have in flight over UDP (most waiting for an upstream resolver);
/// more are dropped, as a loaded resolver drops them, and the client asks again.
const MAX_IN_FLIGHT: usize = 256;

/// How long a TCP connection may sit without a whole query before it is closed.
const TCP_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// Where one workload's queries are answered: the shared context, the workload, and the
/// resolvers for what the mesh does not know.
#[derive(Debug, Clone)]
pub(crate) struct Served {
    ctx: Arc<Ctx>,
    uid: Arc<str>,
    upstream: Arc<Forwarder>,
    /// The workload's UDP queries in flight, on all its sockets (one per address family in a
    /// pod).
    in_flight: Arc<Semaphore>,
    /// Cancelled as the workload's proxy stops.
    stopping: CancellationToken,
}

impl Served {
    pub(crate) fn new(
        ctx: Arc<Ctx>,
        uid: Arc<str>,
        upstream: Arc<Forwarder>,
        stopping: CancellationToken,
    ) -> Self {
        Self {
            ctx,
            uid,
            upstream,
            stopping,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }
}

/// Serves DNS over UDP on `socket` until the drain starts.
pub(crate) async fn serve_udp(served: Served, socket: UdpSocket, mut drain: DrainWatch) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_QUERY];
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buf) => received,
            () = drain.signaled() => return,
        };
        let (n, peer) = match received {
            Ok(received) => received,
            Err(e) => {
                tracing::debug!(workload = %served.uid, error = %e, "DNS receive failed");
                continue;
            }
        };
        let Ok(permit) = served.in_flight.clone().try_acquire_owned() else {
            served.ctx.metrics.dns_dropped.inc();
            tracing::debug!(workload = %served.uid, %peer, "DNS query dropped: too many in flight");
            continue;
        };
        let query = buf[..n].to_vec();
        let (served, socket) = (served.clone(), socket.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(answer) = answer(&served, &query, DnsProtocol::udp, peer).await
                && let Err(e) = socket.send_to(&answer, peer).await
            {
                tracing::debug!(workload = %served.uid, %peer, error = %e, "DNS answer not sent");
            }
        });
    }
}

/// Serves DNS over TCP on `listener` (RFC 7766: several queries per connection, answered in
/// turn) until the drain starts.
pub(crate) async fn serve_tcp(served: Served, listener: TcpListener, drain: DrainWatch) {
    crate::proxy::accept_loop(listener, drain, move |stream, peer, drain| {
        let served = served.clone();
        async move { serve_connection(&served, stream, peer, drain).await }
    })
    .await;
}

/// Answers a connection's queries in turn until it ends, idles for [`TCP_IDLE`], or the drain
/// starts.
async fn serve_connection(
    served: &Served,
    mut stream: TcpStream,
    peer: SocketAddr,
    mut drain: DrainWatch,
) {
    loop {
        let read = tokio::select! {
            read = tokio::time::timeout(TCP_IDLE, forward::read_framed(&mut stream)) => read,
            () = drain.signaled() => return,
        };
        let query = match read {
            Ok(Ok(Some(query))) => query,
            Ok(Ok(None)) | Err(_) => return,
            Ok(Err(e)) => {
                tracing::debug!(workload = %served.uid, %peer, error = %e, "DNS connection failed");
                return;
            }
        };
        let Some(answer) = answer(served, &query, DnsProtocol::tcp, peer).await else {
            return;
        };
        if forward::write_framed(&mut stream, &answer).await.is_err() {
            return;
        }
    }
}

/// The answer to one query (`None`: nothing can be answered, the message was not even a DNS
/// header).
async fn answer(
    served: &Served,
    query: &[u8],
    protocol: DnsProtocol,
    peer: SocketAddr,
) -> Option<Vec<u8>> {
    let Served {
        ctx,
        uid,
        upstream,
        stopping,
        ..
    } = served;
    let metrics = &ctx.metrics;
    let message = match Message::from_vec(query) {
        // An answer sent to a resolver is nobody's question: ignored, never reflected.
        Ok(m) if m.message_type() == MessageType::Response => return None,
        Ok(m) if m.op_code() != OpCode::Query => {
            let mut refused = Message::error_msg(m.id(), m.op_code(), ResponseCode::NotImp);
            refused.add_queries(m.queries().iter().cloned());
            return encode(&refused);
        }
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(workload = %uid, %peer, error = %e, "malformed DNS query");
            metrics.dns_malformed.inc();
            let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
            return encode(&Message::error_msg(
                id,
                OpCode::Query,
                ResponseCode::FormErr,
            ));
        }
    };
    // A pod served before the configuration names it waits for it, as its connections do.
    let named = crate::proxy::named(ctx, uid, stopping).await;
    let labels = labels(&message, protocol, named.as_ref().map(|n| n.workload()));
    metrics.dns_requests.get_or_create(&labels).inc();
    let Some(named) = named else {
        // Gone from the mesh or from this node while its query was read (its listeners are
        // closing), or not named in time.
        tracing::debug!(workload = %uid, %peer, "DNS query unanswered: the configuration does not name the workload as this ztunnel's");
        return servfail(&message);
    };
    let (snapshot, client) = (&*named.snapshot, named.workload());
    if let Some((q, alias_of, mut ips)) = from_mesh(snapshot, client, &message) {
        tracing::debug!(workload = %uid, name = %q.name(), r#type = %q.query_type(), ?alias_of, ?ips, "DNS answered from the mesh");
        // Most clients take the first address: a headless service's pods take turns at being it.
        ips.shuffle(&mut rand::rng());
        let response = mesh_answer(&message, q, alias_of.as_deref(), &ips)?;
        return fit(protocol, &message, &response);
    }
    metrics.dns_upstream_requests.get_or_create(&labels).inc();
    let asker = Asker {
        workload: client,
        sockets: &*ctx.sockets,
    };
    // Timed whole, as upstream times it: failures and the resolvers tried in turn included.
    let started = std::time::Instant::now();
    let forwarded = upstream
        .forward(asker, query, protocol == DnsProtocol::tcp)
        .await;
    (metrics.dns_upstream_duration.get_or_create(&labels)).observe(started.elapsed().as_secs_f64());
    match forwarded {
        Ok(answer) => Some(answer),
        Err(e) => {
            metrics.dns_upstream_failures.get_or_create(&labels).inc();
            match e {
                // The local mesh forwards nothing: nothing to warn about.
                ForwardError::NoUpstream => {
                    tracing::debug!(workload = %uid, %peer, error = %e, "DNS query not forwarded");
                }
                ForwardError::Upstream { .. } => {
                    tracing::warn!(workload = %uid, %peer, error = %e, "DNS query not forwarded");
                }
            }
            servfail(&message)
        }
    }
}

/// `SERVFAIL` to `message`: no answer could be had.
fn servfail(message: &Message) -> Option<Vec<u8>> {
    let mut failed = Message::error_msg(message.id(), message.op_code(), ResponseCode::ServFail);
    failed.add_queries(message.queries().iter().cloned());
    failed.set_recursion_desired(message.recursion_desired());
    encode(&failed)
}

/// The metrics' labels for `message`, asked over `protocol` by `client`, as upstream's: the
/// first question's record type (`unknown` without one), and `unknown` for a workload that has
/// left the mesh.
fn labels(message: &Message, protocol: DnsProtocol, client: Option<&Workload>) -> DnsLabels {
    // A type this proxy does not know is `other`: any pod could otherwise make 65,536 series.
    let query_type = message.queries().first().map(|q| match q.query_type() {
        RecordType::Unknown(_) => "other".to_owned(),
        known => known.to_string().to_ascii_lowercase(),
    });
    let canonical = |field: fn(&Workload) -> &str| client.map_or("unknown", field).to_owned();
    DnsLabels {
        request_query_type: query_type.unwrap_or_else(|| "unknown".to_owned()),
        request_protocol: protocol,
        source_canonical_service: canonical(|w| &w.canonical_name),
        source_canonical_revision: canonical(|w| &w.canonical_revision),
    }
}

/// What the mesh answers to `message`: its one question, the host it aliases and the addresses;
/// `None` for anything but an `A` or `AAAA` query for a mesh name.
fn from_mesh<'m>(
    snapshot: &Snapshot,
    client: &Workload,
    message: &'m Message,
) -> Option<(&'m Query, Option<String>, Vec<std::net::IpAddr>)> {
    let [q] = message.queries() else {
        return None;
    };
    let standard = message.message_type() == MessageType::Query
        && message.op_code() == OpCode::Query
        && q.query_class() == DNSClass::IN;
    let family = match q.query_type() {
        RecordType::A if standard => Family::V4,
        RecordType::AAAA if standard => Family::V6,
        _ => return None,
    };
    match resolve(snapshot, client, &q.name().to_ascii(), family) {
        Answer::Mesh { alias_of, ips } => Some((q, alias_of, ips)),
        Answer::Forward => None,
    }
}

/// The answer to `q` from the mesh: a CNAME to `alias_of` first when the name asked is an alias,
/// then the addresses, under the host they belong to.
fn mesh_answer(
    query: &Message,
    q: &Query,
    alias_of: Option<&str>,
    ips: &[std::net::IpAddr],
) -> Option<Message> {
    let mut response = Message::new();
    response
        .set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(ResponseCode::NoError)
        .add_query(q.clone());
    let mut owner = q.name().clone();
    if let Some(host) = alias_of {
        let mut target = Name::from_ascii(host).ok()?;
        target.set_fqdn(true);
        response.add_answer(Record::from_rdata(
            owner,
            TTL,
            RData::CNAME(CNAME(target.clone())),
        ));
        owner = target;
    }
    for &ip in ips {
        let rdata = match ip {
            std::net::IpAddr::V4(v4) => RData::A(A(v4)),
            std::net::IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        response.add_answer(Record::from_rdata(owner.clone(), TTL, rdata));
    }
    if query.extensions().is_some() {
        let mut ours = hickory_proto::op::Edns::new();
        ours.set_max_payload(MAX_UDP);
        response.set_edns(ours);
    }
    Some(response)
}

/// `response` encoded; over UDP, cut to the header and question with the truncated bit set when
/// it does not fit what the client takes (and [`MAX_UDP`]), so it asks again over TCP.
fn fit(protocol: DnsProtocol, query: &Message, response: &Message) -> Option<Vec<u8>> {
    let bytes = encode(response)?;
    let limit = query.extensions().as_ref().map_or(MAX_UDP_PLAIN, |e| {
        usize::from(e.max_payload().min(MAX_UDP)).max(MAX_UDP_PLAIN)
    });
    if protocol == DnsProtocol::udp && bytes.len() > limit {
        return encode(&response.truncate());
    }
    Some(bytes)
}

fn encode(message: &Message) -> Option<Vec<u8>> {
    message
        .to_vec()
        .inspect_err(|e| tracing::warn!(error = %e, "DNS answer could not be encoded"))
        .ok()
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Edns;

    use super::*;

    fn asking(edns: Option<u16>) -> Message {
        let mut m = Message::new();
        m.set_id(7).add_query(Query::query(
            Name::from_ascii("big.example.").expect("name"),
            RecordType::A,
        ));
        if let Some(payload) = edns {
            let mut e = Edns::new();
            e.set_max_payload(payload);
            m.set_edns(e);
        }
        m
    }

    #[test]
    fn an_answer_too_big_for_udp_is_truncated_so_the_client_asks_over_tcp() {
        let ips: Vec<std::net::IpAddr> = (1..=60u8)
            .map(|i| std::net::Ipv4Addr::new(10, 0, 0, i).into())
            .collect();
        let plain = asking(None);
        let response = mesh_answer(&plain, &plain.queries()[0], None, &ips).expect("answer");
        let udp = Message::from_vec(&fit(DnsProtocol::udp, &plain, &response).expect("encoded"))
            .expect("dns");
        assert!(udp.truncated());
        assert_eq!((udp.id(), udp.answers().len()), (7, 0));
        let tcp = Message::from_vec(&fit(DnsProtocol::tcp, &plain, &response).expect("encoded"))
            .expect("dns");
        assert_eq!((tcp.truncated(), tcp.answers().len()), (false, 60));
        // A client that takes 4 KiB over UDP gets it whole, up to 1,232 bytes.
        let edns = asking(Some(4096));
        let many: Vec<std::net::IpAddr> = (1..=100u8)
            .map(|i| std::net::Ipv4Addr::new(10, 0, 1, i).into())
            .collect();
        let response = mesh_answer(&edns, &edns.queries()[0], None, &many).expect("answer");
        let udp = Message::from_vec(&fit(DnsProtocol::udp, &edns, &response).expect("encoded"))
            .expect("dns");
        assert!(udp.truncated(), "over 1,232 bytes");
        let response = mesh_answer(&edns, &edns.queries()[0], None, &ips).expect("answer");
        let udp = Message::from_vec(&fit(DnsProtocol::udp, &edns, &response).expect("encoded"))
            .expect("dns");
        assert_eq!((udp.truncated(), udp.answers().len()), (false, 60));
    }
}
