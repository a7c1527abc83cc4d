//! DNS for the tests on loopback: a resolver the test plays (over UDP and TCP, noting every
//! question), and a client's queries to a DNS proxy.

#![allow(dead_code)] // each test binary uses part of it

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// A question the resolver was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Question {
    /// Where it came from.
    pub(crate) from: IpAddr,
    /// The name, fully qualified (`example.org.`).
    pub(crate) name: String,
    pub(crate) kind: RecordType,
    pub(crate) tcp: bool,
}

/// A resolver the test plays: each of its names has one IPv4 address (for 60 s) and no IPv6
/// one; any other name does not exist.
pub(crate) struct Resolver {
    asked: Arc<Mutex<Vec<Question>>>,
    task: JoinHandle<()>,
}

impl Resolver {
    /// Serves `names` (name, IPv4 address) at `at` over UDP and TCP, answering after `delay`.
    pub(crate) async fn start(
        at: &str,
        names: &'static [(&'static str, &'static str)],
        delay: Duration,
    ) -> Resolver {
        let udp = Arc::new(UdpSocket::bind(at).await.expect("bind the resolver"));
        let tcp = TcpListener::bind(at).await.expect("bind the resolver");
        let asked = Arc::new(Mutex::new(Vec::new()));
        let noted = asked.clone();
        let note = move |from: SocketAddr, query: &Message, tcp: bool| {
            if let Some(q) = query.queries().first() {
                noted.lock().expect("lock").push(Question {
                    from: from.ip(),
                    name: q.name().to_ascii(),
                    kind: q.query_type(),
                    tcp,
                });
            }
        };
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                tokio::select! {
                    Ok((n, peer)) = udp.recv_from(&mut buf) => {
                        let Ok(query) = Message::from_vec(&buf[..n]) else { continue };
                        note(peer, &query, false);
                        let udp = udp.clone();
                        tokio::spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = udp.send_to(&reply(&query, names), peer).await;
                        });
                    }
                    Ok((mut s, peer)) = tcp.accept() => {
                        let mut len = [0u8; 2];
                        let _ = s.read_exact(&mut len).await;
                        let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                        let _ = s.read_exact(&mut q).await;
                        let Ok(query) = Message::from_vec(&q) else { continue };
                        note(peer, &query, true);
                        tokio::time::sleep(delay).await;
                        let answer = reply(&query, names);
                        let _ = s.write_all(&(answer.len() as u16).to_be_bytes()).await;
                        let _ = s.write_all(&answer).await;
                    }
                }
            }
        });
        Resolver { asked, task }
    }

    /// Every question so far, in order.
    pub(crate) fn asked(&self) -> Vec<Question> {
        self.asked.lock().expect("lock").clone()
    }

    /// The names and types asked so far, in order.
    pub(crate) fn questions(&self) -> Vec<(String, RecordType)> {
        (self.asked().into_iter())
            .map(|q| (q.name, q.kind))
            .collect()
    }

    /// Stops answering: the resolver is gone.
    pub(crate) async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// The answer to `query`, encoded.
fn reply(query: &Message, names: &[(&str, &str)]) -> Vec<u8> {
    let mut r = Message::new();
    r.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_available(true)
        .add_queries(query.queries().iter().cloned());
    let q = &query.queries()[0];
    let name = q.name().to_ascii();
    let known = names
        .iter()
        .find(|(n, _)| name.strip_suffix('.') == Some(*n));
    match (known, q.query_type()) {
        (Some((_, ip)), RecordType::A) => {
            let ip = ip.parse().expect("an IPv4 address");
            r.add_answer(Record::from_rdata(q.name().clone(), 60, RData::A(A(ip))));
        }
        (Some(_), _) => {}
        (None, _) => {
            r.set_response_code(ResponseCode::NXDomain);
        }
    }
    r.to_vec().expect("encode")
}

/// A recursive query for `name` of `kind`.
pub(crate) fn query(id: u16, name: &str, kind: RecordType) -> Message {
    let mut m = Message::new();
    m.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).expect("name"), kind));
    m
}

/// `message` sent over UDP from `from` to the DNS proxy at `proxy`, and its answer.
pub(crate) async fn over_udp(from: IpAddr, proxy: &str, message: &Message) -> Message {
    let socket = UdpSocket::bind((from, 0)).await.expect("bind");
    socket
        .send_to(&message.to_vec().expect("encode"), proxy)
        .await
        .expect("send");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf))
        .await
        .expect("answered in time")
        .expect("recv");
    Message::from_vec(&buf[..n]).expect("a DNS answer")
}

/// `message` sent on a TCP connection to a DNS proxy, and its answer.
pub(crate) async fn over_tcp(stream: &mut TcpStream, message: &Message) -> Message {
    let bytes = message.to_vec().expect("encode");
    let len = u16::try_from(bytes.len()).expect("short");
    stream.write_all(&len.to_be_bytes()).await.expect("write");
    stream.write_all(&bytes).await.expect("write");
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.expect("length");
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut answer).await.expect("answer");
    Message::from_vec(&answer).expect("a DNS answer")
}

/// The addresses and CNAME targets of an answer, as text (`name target`).
pub(crate) fn answers(m: &Message) -> Vec<String> {
    m.answers()
        .iter()
        .map(|r| format!("{} {}", r.name(), r.data()))
        .collect()
}

/// The addresses of an answer.
pub(crate) fn addresses(m: &Message) -> Vec<IpAddr> {
    (m.answers().iter())
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}
