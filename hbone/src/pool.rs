//! The HBONE client: pooled mTLS HTTP/2 connections, one CONNECT stream per tunnel.
//!
//! Connections are keyed by (source identity, expected destination identities, next-hop address):
//! a connection proves exactly one pair of identities, so it may only be shared by tunnels that
//! need the same proof. Per key:
//! * a connection carries at most `pool_max_streams` tunnels (or the peer's lower limit); a new one
//!   is dialed when all are full;
//! * only one dial is in flight at a time, and callers queued behind it reuse what it produced
//!   (no thundering herd of handshakes when a burst of connections starts);
//! * a connection that received GOAWAY, failed a PING, or broke is never handed out again; one
//!   unused for `pool_idle_timeout` is closed.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request, StatusCode};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{debug, warn};

use crate::authority::Authority;
use crate::config::{Config, keepalive};
use crate::dial::{Dial, DirectDial};
use crate::error::{Error, Step};
use crate::headers::ConnectHeaders;
use crate::identity::Identity;
use crate::manager::CertManager;
use crate::stats::{GaugeGuard, Stats};
use crate::stream::H2Stream;
use crate::tls;

/// What to open: a tunnel from `src` to `authority`, through `next_hop`, which must prove one of
/// `dst_identities`.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// Our identity (the source workload's).
    pub src: Identity,
    /// Identities the next hop may present (the destination workload's, or its waypoint's).
    pub dst_identities: Vec<Identity>,
    /// Where to dial: a pod IP (or waypoint IP) and port 15008.
    pub next_hop: SocketAddr,
    /// The CONNECT target.
    pub authority: Authority,
    /// `forwarded`, `baggage`, `traceparent`.
    pub headers: ConnectHeaders,
}

/// A pool of HBONE client connections.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    certs: Arc<CertManager>,
    dialer: Arc<dyn Dial>,
    keys: Mutex<HashMap<Key, Arc<Entry>>>,
    stats: Arc<Stats>,
    dials: AtomicU64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    src: Identity,
    dst: Arc<[Identity]>,
    addr: SocketAddr,
}

/// The connections of one key.
#[derive(Default)]
struct Entry {
    conns: Mutex<Vec<Pooled>>,
    dialing: tokio::sync::Mutex<()>,
}

struct Pooled {
    send: SendRequest<Bytes>,
    state: Arc<ConnState>,
}

struct ConnState {
    active: AtomicUsize,
    closed: AtomicBool,
    idle_since: Mutex<Instant>,
}

/// A reserved stream slot on a connection; released when the tunnel is dropped.
struct Slot {
    state: Arc<ConnState>,
    _live: GaugeGuard,
}

impl Pool {
    /// A pool presenting certificates from `certs`, dialing directly.
    pub fn new(certs: Arc<CertManager>, config: Config) -> Self {
        Self::with_dialer(certs, config, Arc::new(DirectDial))
    }

    /// A pool whose TCP connections are opened by `dialer`.
    pub fn with_dialer(certs: Arc<CertManager>, config: Config, dialer: Arc<dyn Dial>) -> Self {
        Pool {
            inner: Arc::new(Inner {
                config,
                certs,
                dialer,
                keys: Mutex::default(),
                stats: Arc::default(),
                dials: AtomicU64::new(0),
            }),
        }
    }

    /// Live connections and streams of this pool.
    pub fn stats(&self) -> Arc<Stats> {
        self.inner.stats.clone()
    }

    /// Connections dialed since the pool was created.
    pub fn dials(&self) -> u64 {
        self.inner.dials.load(Ordering::Relaxed)
    }

    /// Opens a tunnel. On a non-200 answer the error carries the status ([`Error::status`]).
    pub async fn connect(&self, request: ConnectRequest) -> Result<H2Stream, Error> {
        let mut dst = request.dst_identities;
        dst.sort();
        dst.dedup();
        let key = Key {
            src: request.src,
            dst: dst.into(),
            addr: request.next_hop,
        };
        let entry = self.inner.entry(&key);
        // A connection can receive GOAWAY between checkout and our HEADERS; the stream is then
        // refused without being processed, so one retry on a fresh connection is safe.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (send, slot) = self.inner.checkout_or_dial(&key, &entry).await?;
            let state = slot.state.clone();
            match self
                .open(send, slot, &request.authority, &request.headers)
                .await
            {
                Err(Error::H2(e))
                    if attempts < 2
                        && (e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)) =>
                {
                    debug!(error = %e, "HBONE stream refused by a closing connection; retrying");
                    state.closed.store(true, Ordering::Release);
                }
                result => return result,
            }
        }
    }

    async fn open(
        &self,
        send: SendRequest<Bytes>,
        slot: Slot,
        authority: &Authority,
        headers: &ConnectHeaders,
    ) -> Result<H2Stream, Error> {
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(authority.to_string())
            .body(())
            .expect("an Authority is a valid CONNECT URI");
        headers.write_to(request.headers_mut());
        let mut send = send.ready().await?;
        let (response, stream) = send.send_request(request, false)?;
        let response = tokio::time::timeout(self.inner.config.connect_timeout, response)
            .await
            .map_err(|_| Error::Timeout(Step::Response))??;
        if response.status() != StatusCode::OK {
            return Err(Error::Status(response.status()));
        }
        Ok(H2Stream::new(stream, response.into_body(), Box::new(slot)))
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("stats", &self.inner.stats)
            .field("dials", &self.dials())
            .finish_non_exhaustive()
    }
}

// === impl Inner ===

impl Inner {
    fn entry(&self, key: &Key) -> Arc<Entry> {
        let mut keys = self.keys.lock().expect("pool poisoned");
        keys.entry(key.clone()).or_default().clone()
    }

    /// Drops a key's entry once it has no connections and no caller is using it, so the map does
    /// not grow with every peer ever dialed.
    fn forget_if_unused(&self, key: &Key) {
        let mut keys = self.keys.lock().expect("pool poisoned");
        if let Some(entry) = keys.get(key) {
            let empty = entry.conns.lock().expect("pool poisoned").is_empty();
            if empty && Arc::strong_count(entry) == 1 {
                keys.remove(key);
            }
        }
    }

    async fn checkout_or_dial(
        self: &Arc<Self>,
        key: &Key,
        entry: &Arc<Entry>,
    ) -> Result<(SendRequest<Bytes>, Slot), Error> {
        let cap = self.config.pool_max_streams;
        if let Some(found) = entry.checkout(cap, &self.stats) {
            return Ok(found);
        }
        let _dialing = entry.dialing.lock().await;
        // Whoever dialed while we waited may have made room for us.
        if let Some(found) = entry.checkout(cap, &self.stats) {
            return Ok(found);
        }
        let pooled = self.dial(key, entry).await?;
        let mut conns = entry.conns.lock().expect("pool poisoned");
        conns.push(pooled);
        let last = conns.last_mut().expect("just pushed");
        Ok(last.reserve(&self.stats))
    }

    async fn dial(self: &Arc<Self>, key: &Key, entry: &Arc<Entry>) -> Result<Pooled, Error> {
        self.dials.fetch_add(1, Ordering::Relaxed);
        let addr = key.addr;
        let timeout = self.config.connect_timeout;
        let cert = self.certs.fetch(&key.src).await?;
        let connector = TlsConnector::from(tls::client_config(cert, key.dst.clone())?);
        let tcp = tokio::time::timeout(timeout, self.dialer.dial(addr))
            .await
            .map_err(|_| Error::Timeout(Step::Connect))?
            .map_err(|source| Error::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(timeout, connector.connect(tls::server_name(addr), tcp))
            .await
            .map_err(|_| Error::Timeout(Step::Handshake))
            .and_then(|r| r.map_err(|source| Error::Tls { addr, source }))
            .inspect_err(|_| self.stats.handshake_failed())?;
        let (send, conn) =
            (self.config.client_builder().handshake(tls).await).map_err(Error::H2Handshake)?;
        let state = Arc::new(ConnState {
            active: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        });
        debug!(dst.addr = %addr, src.identity = %key.src, "HBONE connection established");
        tokio::spawn(drive(
            conn,
            state.clone(),
            Owner {
                pool: Arc::downgrade(self),
                entry: Arc::downgrade(entry),
                key: key.clone(),
            },
            self.stats.connections.track(),
        ));
        Ok(Pooled { send, state })
    }
}

// === impl Entry ===

impl Entry {
    /// Reserves a slot on a usable connection, dropping connections that can no longer be used.
    fn checkout(&self, cap: usize, stats: &Arc<Stats>) -> Option<(SendRequest<Bytes>, Slot)> {
        let mut conns = self.conns.lock().expect("pool poisoned");
        let mut found = None;
        for pooled in conns.iter_mut() {
            if pooled.state.closed.load(Ordering::Acquire) {
                continue;
            }
            let limit = cap.min(pooled.send.current_max_send_streams());
            if pooled.state.active.load(Ordering::Acquire) >= limit {
                continue;
            }
            // After GOAWAY the handle reports an error instead of being ready.
            let mut cx = Context::from_waker(Waker::noop());
            match pooled.send.poll_ready(&mut cx) {
                Poll::Ready(Ok(())) => {
                    found = Some(pooled.reserve(stats));
                    break;
                }
                Poll::Ready(Err(_)) => pooled.state.closed.store(true, Ordering::Release),
                Poll::Pending => {}
            }
        }
        conns.retain(|c| !c.state.closed.load(Ordering::Acquire));
        found
    }

    /// Removes a connection that is closed, or idle past the timeout. Returns whether it is gone.
    fn evict(&self, state: &Arc<ConnState>, idle_timeout: std::time::Duration) -> bool {
        let mut conns = self.conns.lock().expect("pool poisoned");
        // Reservations happen under this lock, so `active` cannot grow while we decide.
        let idle = state.active.load(Ordering::Acquire) == 0
            && state.idle_since.lock().expect("poisoned").elapsed() >= idle_timeout;
        if idle {
            state.closed.store(true, Ordering::Release);
        }
        if state.closed.load(Ordering::Acquire) {
            conns.retain(|c| !Arc::ptr_eq(&c.state, state));
            return true;
        }
        false
    }
}

impl Pooled {
    fn reserve(&mut self, stats: &Arc<Stats>) -> (SendRequest<Bytes>, Slot) {
        self.state.active.fetch_add(1, Ordering::AcqRel);
        let slot = Slot {
            state: self.state.clone(),
            _live: stats.streams.track(),
        };
        (self.send.clone(), slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.state.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.state.idle_since.lock().expect("poisoned") = Instant::now();
        }
    }
}

/// Where a connection lives in the pool, held weakly so a dropped pool ends its connections.
struct Owner {
    pool: Weak<Inner>,
    entry: Weak<Entry>,
    key: Key,
}

/// Drives one connection: HTTP/2 I/O, keepalive PINGs, and idle eviction. When it returns the
/// connection is gone and has been removed from the pool.
async fn drive(
    conn: h2::client::Connection<TlsStream<TcpStream>, Bytes>,
    state: Arc<ConnState>,
    owner: Owner,
    _live: GaugeGuard,
) {
    let Some(config) = owner.pool.upgrade().map(|p| p.config.clone()) else {
        return;
    };
    let addr = owner.key.addr;
    let mut conn = conn;
    let mut pings = conn
        .ping_pong()
        .expect("ping_pong is taken once per connection");
    let dead = keepalive(&mut pings, config.ping_interval, config.ping_timeout);
    tokio::pin!(dead);
    let check_every = (config.pool_idle_timeout / 4).max(std::time::Duration::from_millis(10));
    let mut idle_check = tokio::time::interval(check_every);
    let mut released = false;
    loop {
        tokio::select! {
            result = &mut conn => {
                if let Err(error) = result {
                    debug!(dst.addr = %addr, %error, "HBONE connection closed with an error");
                }
                break;
            }
            reason = &mut dead => {
                warn!(dst.addr = %addr, reason, "dropping HBONE connection");
                break;
            }
            _ = idle_check.tick(), if !released => {
                // Once evicted the pool's handle is dropped; the connection then closes itself
                // when its last stream ends, and `conn` completes.
                if let Some(entry) = owner.entry.upgrade() {
                    released = entry.evict(&state, config.pool_idle_timeout);
                    if released {
                        debug!(dst.addr = %addr, "released idle HBONE connection");
                    }
                }
            }
        }
    }
    state.closed.store(true, Ordering::Release);
    if let Some(entry) = owner.entry.upgrade() {
        entry.evict(&state, config.pool_idle_timeout);
    }
    if let Some(pool) = owner.pool.upgrade() {
        pool.forget_if_unused(&owner.key);
    }
}
