//! Queries that are not about the mesh go to the resolvers ztunnel itself uses (its own
//! `/etc/resolv.conf`, as upstream ztunnel's), unchanged, from where the asking workload's own
//! queries would have left: its pod's network namespace (the socket marked, so the pod's capture
//! rules let it out instead of sending it back to the proxy), or its own address. So the
//! resolver sees the pod's address, and the pod's egress NetworkPolicy applies, as without the
//! proxy. The answer is relayed as the upstream resolver wrote it.
//!
//! The same resolvers answer what ztunnel itself must resolve: the ServiceEntry endpoints that
//! are DNS names ([`Forwarder::lookup`]), asked the same way, on the connecting workload's behalf.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use mesh::model::Workload;

use crate::socket::SocketFactory;

/// Largest DNS message over UDP with EDNS, and over TCP.
const MAX_MESSAGE: usize = 65_535;

/// The upstream resolvers, tried in order, and the names ztunnel itself resolved with them.
#[derive(Debug)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    timeout: Duration,
    /// Addresses looked up by [`Forwarder::lookup`], by name and family, until their TTL ends.
    resolved: Mutex<HashMap<Key, Resolved>>,
    /// Lookups being asked, by name and family: who needs the same waits for the first asker's
    /// answer instead of asking again, so a burst of connections to one name sends one query.
    asking: Mutex<HashMap<Key, watch::Receiver<Option<Looked>>>>,
}

/// A name and the family of addresses looked up.
type Key = (Arc<str>, RecordType);

/// What one lookup of one family came to, for everyone waiting on it.
type Looked = Result<Found, Arc<LookupError>>;

/// What a name's lookup of one family found, and until when it holds.
#[derive(Debug, Clone)]
struct Resolved {
    found: Found,
    until: Instant,
}

/// What the resolvers said of a name, for one family.
#[derive(Debug, Clone)]
enum Found {
    Addresses(Arc<[IpAddr]>),
    /// The name exists without addresses of the family.
    NoData,
    /// The name does not exist (`NXDOMAIN`).
    NoSuchName,
}

/// The shortest and longest a looked-up name is kept, whatever its TTL says: a zero TTL would
/// cost a query per connection, a day-long one would outlive a moved endpoint.
const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(300);

/// The longest a name without addresses is kept (and how long without the zone's word on it).
const NEGATIVE_TTL: Duration = Duration::from_secs(30);

/// Past this many names, expired ones are dropped before another is kept.
const PRUNE_AT: usize = 256;

/// The workload a query is forwarded for, and what makes its sockets.
#[derive(Debug, Clone, Copy)]
pub struct Asker<'a> {
    /// The workload that asked.
    pub workload: &'a Workload,
    /// Makes its sockets: on its address, or in its network namespace.
    pub sockets: &'a dyn SocketFactory,
}

/// Why no upstream resolver answered.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream resolver is configured")]
    NoUpstream,
    #[error("upstream resolver {upstream}: {source}")]
    Upstream {
        upstream: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl Forwarder {
    /// Forwards to `upstreams`, giving each `timeout` to answer.
    pub fn new(upstreams: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self {
            upstreams,
            timeout,
            resolved: Mutex::default(),
            asking: Mutex::default(),
        }
    }

    /// The `nameserver` lines of a `resolv.conf`, on port 53.
    pub fn from_resolv_conf(path: &Path, timeout: Duration) -> io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        let upstreams = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .collect();
        Ok(Self::new(upstreams, timeout))
    }

    /// The resolvers it forwards to.
    pub fn upstreams(&self) -> &[SocketAddr] {
        &self.upstreams
    }

    /// The first answer an upstream resolver gives to `asker`'s `query`, over TCP when `tcp`;
    /// the error of the last one tried when none answers.
    pub async fn forward(
        &self,
        asker: Asker<'_>,
        query: &[u8],
        tcp: bool,
    ) -> Result<Vec<u8>, ForwardError> {
        let mut last = ForwardError::NoUpstream;
        for &upstream in &self.upstreams {
            let asked = if tcp {
                tokio::time::timeout(self.timeout, over_tcp(asker, upstream, query)).await
            } else {
                tokio::time::timeout(self.timeout, over_udp(asker, upstream, query)).await
            };
            let source = match asked {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => e,
                Err(_) => io::Error::new(io::ErrorKind::TimedOut, "no answer in time"),
            };
            last = ForwardError::Upstream { upstream, source };
        }
        Err(last)
    }
}

/// Why a name ztunnel looked up has no address.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("{0:?} is not a DNS name")]
    Name(String),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("the resolver's answer is not DNS: {0}")]
    Answer(String),
    #[error("the resolver answered {0}")]
    Failed(ResponseCode),
    #[error("no address")]
    NoAddress,
    #[error("no such name")]
    NoSuchName,
}

impl Forwarder {
    /// The addresses `name` resolves to, asked for `asker` (from where its own queries would
    /// leave): those of the preferred family (IPv6 with `v6`), else of the other, as a resolver
    /// library's combined lookup gives them. Answers, empty ones included, are kept for their
    /// TTL and shared by every workload of this ztunnel.
    pub async fn lookup(
        &self,
        asker: Asker<'_>,
        name: &str,
        v6: bool,
    ) -> Result<Arc<[IpAddr]>, Arc<LookupError>> {
        let (first, second) = if v6 {
            (RecordType::AAAA, RecordType::A)
        } else {
            (RecordType::A, RecordType::AAAA)
        };
        let failed = match self.lookup_type(asker, name, first).await {
            Ok(Found::Addresses(ips)) => return Ok(ips),
            Ok(Found::NoSuchName) => return Err(Arc::new(LookupError::NoSuchName)),
            Ok(Found::NoData) => None,
            // The other family may still answer (a resolver that mishandles AAAA, say).
            Err(e) => Some(e),
        };
        match self.lookup_type(asker, name, second).await {
            Ok(Found::Addresses(ips)) => Ok(ips),
            Ok(Found::NoSuchName) => Err(Arc::new(LookupError::NoSuchName)),
            Ok(Found::NoData) => Err(failed.unwrap_or_else(|| Arc::new(LookupError::NoAddress))),
            Err(e) => Err(failed.unwrap_or(e)),
        }
    }

    /// One family of `name`'s addresses: from the cache, from a lookup already being asked, or
    /// asked now.
    async fn lookup_type(&self, asker: Asker<'_>, name: &str, kind: RecordType) -> Looked {
        let key: Key = (Arc::from(name), kind);
        loop {
            let now = Instant::now();
            if let Some(hit) = self.cache().get(&key).filter(|r| r.until > now) {
                return Ok(hit.found.clone());
            }
            // Another asker's lookup to wait for, or this one's to answer.
            let waiting = {
                let mut asking = self.asking();
                match asking.get(&key) {
                    Some(answer) => Ok(answer.clone()),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        asking.insert(key.clone(), rx);
                        Err(tx)
                    }
                }
            };
            match waiting {
                Ok(mut answer) => {
                    if let Ok(looked) = answer.wait_for(Option::is_some).await {
                        return looked.clone().expect("waited for an answer");
                    }
                    // The first asker gave up (its connection went away): ask again.
                }
                Err(tx) => {
                    let _asking = Asking {
                        forwarder: self,
                        key: key.clone(),
                    };
                    let looked = self.ask(asker, name, kind).await.map_err(Arc::new);
                    // Answered (and cached): later askers find it in the cache.
                    let _ = tx.send(Some(looked.clone()));
                    return looked;
                }
            }
        }
    }

    /// Asks the resolvers for one family of `name`'s addresses, and keeps the answer.
    async fn ask(
        &self,
        asker: Asker<'_>,
        name: &str,
        kind: RecordType,
    ) -> Result<Found, LookupError> {
        let key: Key = (Arc::from(name), kind);
        let now = Instant::now();
        let mut fqdn = Name::from_ascii(name).map_err(|_| LookupError::Name(name.to_owned()))?;
        fqdn.set_fqdn(true);
        let mut query = Message::new();
        query
            .set_id(rand::random())
            .set_recursion_desired(true)
            .add_query(Query::query(fqdn, kind));
        let bytes = query
            .to_vec()
            .map_err(|e| LookupError::Answer(e.to_string()))?;
        let mut answer = self.answer(asker, &bytes, false).await?;
        if answer.truncated() {
            answer = self.answer(asker, &bytes, true).await?;
        }
        let found = match answer.response_code() {
            ResponseCode::NoError => {
                // The chain of CNAMEs to the addresses comes in the same answer.
                let ips: Arc<[IpAddr]> = (answer.answers().iter())
                    .filter_map(|r| match r.data() {
                        RData::A(a) if kind == RecordType::A => Some(IpAddr::V4(a.0)),
                        RData::AAAA(a) if kind == RecordType::AAAA => Some(IpAddr::V6(a.0)),
                        _ => None,
                    })
                    .collect();
                if ips.is_empty() {
                    Found::NoData
                } else {
                    Found::Addresses(ips)
                }
            }
            ResponseCode::NXDomain => Found::NoSuchName,
            // A failure is not kept: the next connection asks again.
            code => return Err(LookupError::Failed(code)),
        };
        let ttl = match found {
            Found::Addresses(_) => (answer.answers().iter())
                .map(|r| Duration::from_secs(r.ttl().into()))
                .min()
                .unwrap_or(MIN_TTL)
                .clamp(MIN_TTL, MAX_TTL),
            // As long as the zone says a negative answer holds (RFC 2308), within bounds.
            Found::NoData | Found::NoSuchName => (answer.name_servers().iter())
                .find_map(|r| match r.data() {
                    RData::SOA(soa) => Some(r.ttl().min(soa.minimum())),
                    _ => None,
                })
                .map_or(NEGATIVE_TTL, |secs| Duration::from_secs(secs.into()))
                .clamp(MIN_TTL, NEGATIVE_TTL),
        };
        let mut cache = self.cache();
        if cache.len() >= PRUNE_AT {
            cache.retain(|_, r| r.until > now);
        }
        cache.insert(
            key,
            Resolved {
                found: found.clone(),
                until: now + ttl,
            },
        );
        Ok(found)
    }

    /// `query`'s answer, parsed.
    async fn answer(
        &self,
        asker: Asker<'_>,
        query: &[u8],
        tcp: bool,
    ) -> Result<Message, LookupError> {
        let answer = self.forward(asker, query, tcp).await?;
        Message::from_vec(&answer).map_err(|e| LookupError::Answer(e.to_string()))
    }

    fn cache(&self) -> MutexGuard<'_, HashMap<Key, Resolved>> {
        self.resolved.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn asking(&self) -> MutexGuard<'_, HashMap<Key, watch::Receiver<Option<Looked>>>> {
        self.asking.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A lookup being asked: no longer listed once it is answered or given up.
struct Asking<'f> {
    forwarder: &'f Forwarder,
    key: Key,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.forwarder.asking().remove(&self.key);
    }
}

/// One exchange over a fresh UDP socket (a fresh source port per query, so answers cannot be
/// confused); an answer whose id is not the query's is ignored.
async fn over_udp(asker: Asker<'_>, upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let socket = asker.sockets.udp_to(asker.workload, upstream)?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = socket.recv(&mut buf).await?;
        if n >= 2 && query.len() >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

/// One exchange over TCP: both messages prefixed by their length.
async fn over_tcp(asker: Asker<'_>, upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let mut stream = asker.sockets.connect(asker.workload, upstream).await?;
    write_framed(&mut stream, query).await?;
    read_framed(&mut stream)
        .await?
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed without an answer"))
}

/// Writes one length-prefixed DNS message (RFC 1035, section 4.2.2).
pub(crate) async fn write_framed(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "DNS message over 64 KiB"))?;
    let mut framed = Vec::with_capacity(2 + message.len());
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

/// Reads one length-prefixed DNS message; `None` at a clean end of the stream.
pub(crate) async fn read_framed(stream: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut message).await?;
    Ok(Some(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_come_from_resolv_conf() {
        let dir = std::env::temp_dir().join(format!("ztunnel-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("resolv.conf");
        std::fs::write(
            &path,
            "# generated\nsearch shop.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\n\
             nameserver fd00::a\nnameserver not-an-ip\noptions ndots:5\n",
        )
        .expect("write");
        let f = Forwarder::from_resolv_conf(&path, Duration::from_secs(1)).expect("read");
        let want: Vec<SocketAddr> = vec![
            "10.96.0.10:53".parse().expect("addr"),
            "[fd00::a]:53".parse().expect("addr"),
        ];
        assert_eq!(f.upstreams(), want);
        let _ = std::fs::remove_dir_all(dir);
    }
}
