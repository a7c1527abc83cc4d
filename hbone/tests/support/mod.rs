//! In-process harness for HBONE tests: a CA, servers on port 0 with handlers that report what they
//! saw, raw clients for protocol misuse, and a relay that can kill or freeze a connection.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use hbone::drain::{self, DrainTrigger};
use hbone::{
    Authority, CertError, CertHandle, CertManager, CertificateProvider, Config, ConnectHeaders,
    ConnectRequest, Handler, Identity, InboundRequest, MeshCa, Pool, Server, Stats, WorkloadCert,
};
use http::StatusCode;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub const TD: &str = "cluster.local";

/// Target ports the test handler gives meaning to.
pub mod port {
    /// Echo every byte back; shut down after the client's EOF.
    pub const ECHO: u16 = 7001;
    /// Write "hello" and shut down first, then read to EOF and report.
    pub const SPEAK_FIRST: u16 = 7002;
    /// Read to EOF, report length and hash, answer "done".
    pub const SINK: u16 = 7003;
    /// Refused with 401.
    pub const DENIED: u16 = 401;
    /// Refused with 503.
    pub const UNREACHABLE: u16 = 503;
}

pub fn id(sa: &str) -> Identity {
    Identity::new(TD, "default", sa).unwrap()
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A CA, a server for `id("server")` and a client pool sharing one certificate manager.
pub struct Fixture {
    pub ca: Arc<MeshCa>,
    pub certs: Arc<CertManager>,
    pub server: TestServer,
    pub pool: Pool,
}

impl Fixture {
    pub async fn start(config: Config) -> Fixture {
        init_tracing();
        let ca = Arc::new(MeshCa::generate(TD).unwrap());
        let certs = Arc::new(CertManager::new(ca.clone()));
        let server_cert = certs.fetch(&id("server")).await.unwrap();
        let server = TestServer::start(server_cert, config.clone()).await;
        let pool = Pool::new(certs.clone(), config);
        Fixture {
            ca,
            certs,
            server,
            pool,
        }
    }
}

/// A certificate provider serving preset certificates (expired, foreign, ...), falling back to a CA.
#[derive(Debug)]
pub struct Preset {
    pub ca: MeshCa,
    pub certs: Mutex<HashMap<Identity, WorkloadCert>>,
}

#[async_trait]
impl CertificateProvider for Preset {
    async fn issue(&self, identity: &Identity) -> Result<WorkloadCert, CertError> {
        if let Some(c) = self.certs.lock().unwrap().get(identity) {
            return Ok(c.clone());
        }
        self.ca.issue(identity)
    }
}

pub fn manager_with(ca: MeshCa, preset: Vec<WorkloadCert>) -> Arc<CertManager> {
    let certs = preset
        .into_iter()
        .map(|c| (c.identity().clone(), c))
        .collect();
    Arc::new(CertManager::new(Arc::new(Preset {
        ca,
        certs: Mutex::new(certs),
    })))
}

/// What the handler saw on one stream.
#[derive(Debug, Clone)]
pub struct Seen {
    pub peer: Identity,
    pub target: Authority,
    pub local: SocketAddr,
    pub headers: ConnectHeaders,
    /// Bytes received and their sha256 (SPEAK_FIRST, SINK), or the copy error.
    pub received: Result<(u64, [u8; 32]), String>,
}

#[derive(Clone)]
pub struct TestHandler {
    seen: mpsc::UnboundedSender<Seen>,
}

impl Handler for TestHandler {
    async fn handle(&self, req: InboundRequest) {
        let mut seen = Seen {
            peer: req.peer_identity().clone(),
            target: req.target().clone(),
            local: req.local_addr(),
            headers: req.headers().clone(),
            received: Ok((0, [0; 32])),
        };
        match req.target().port() {
            port::DENIED => return req.refuse(StatusCode::UNAUTHORIZED),
            port::UNREACHABLE => return req.refuse(StatusCode::SERVICE_UNAVAILABLE),
            _ => {}
        }
        let port = req.target().port();
        let Ok(mut stream) = req.accept() else { return };
        seen.received = match port {
            port::SPEAK_FIRST => {
                let r = async {
                    stream.write_all(b"hello").await?;
                    stream.shutdown().await?;
                    read_hash(&mut stream).await
                };
                r.await.map_err(|e| e.to_string())
            }
            port::SINK => {
                let r = async {
                    let got = read_hash(&mut stream).await?;
                    stream.write_all(b"done").await?;
                    stream.shutdown().await?;
                    Ok::<_, std::io::Error>(got)
                };
                r.await.map_err(|e| e.to_string())
            }
            _ => {
                let (mut r, mut w) = tokio::io::split(stream);
                match tokio::io::copy(&mut r, &mut w).await {
                    Ok(n) => w
                        .shutdown()
                        .await
                        .map(|()| (n, [0; 32]))
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        let _ = self.seen.send(seen);
    }
}

pub async fn read_hash<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> std::io::Result<(u64, [u8; 32])> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, hasher.finalize().into()));
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
}

/// Fills `buf` from an xorshift generator: incompressible, reproducible test data.
pub fn fill_pseudo_random(seed: &mut u64, buf: &mut [u8]) {
    for b in buf {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *b = *seed as u8;
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    pub seen: mpsc::UnboundedReceiver<Seen>,
    pub drain: Option<DrainTrigger>,
    pub task: JoinHandle<()>,
}

impl TestServer {
    pub async fn start(cert: CertHandle, config: Config) -> TestServer {
        Self::start_on(cert, config, "127.0.0.1:0".parse().unwrap()).await
    }

    pub async fn start_on(cert: CertHandle, config: Config, addr: SocketAddr) -> TestServer {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        let server = Server::new(cert, TestHandler { seen: tx }, config).unwrap();
        let stats = server.stats();
        let (trigger, watch) = drain::channel();
        let task = tokio::spawn(server.serve(listener, watch));
        TestServer {
            addr,
            stats,
            seen,
            drain: Some(trigger),
            task,
        }
    }

    pub async fn next_seen(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(10), self.seen.recv())
            .await
            .expect("handler reported in time")
            .expect("handler alive")
    }
}

pub fn request(src: &Identity, dst: &Identity, next_hop: SocketAddr, port: u16) -> ConnectRequest {
    ConnectRequest {
        src: src.clone(),
        dst_identities: vec![dst.clone()],
        next_hop,
        authority: Authority::Addr(SocketAddr::new(next_hop.ip(), port)),
        headers: ConnectHeaders::default(),
    }
}

/// Polls `check` until it holds or `patience` runs out.
pub async fn eventually(patience: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    check()
}

/// A TCP relay between the client and the server that can drop (kill) or stall (freeze) the
/// connections passing through it.
pub struct Relay {
    pub addr: SocketAddr,
    frozen: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (f, c) = (frozen.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let Ok(up) = TcpStream::connect(target).await else {
                    continue;
                };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                let a = tokio::spawn(pump(dr, uw, f.clone()));
                let b = tokio::spawn(pump(ur, dw, f.clone()));
                c.lock().unwrap().extend([a, b]);
            }
        });
        Relay {
            addr,
            frozen,
            conns,
            accept,
        }
    }

    /// Drops every relayed connection at once, as if the peer died.
    pub fn kill(&self) {
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Stops forwarding bytes while keeping the connections open.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
        self.kill();
    }
}

async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let Ok(n) = r.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            let _ = w.shutdown().await;
            return;
        }
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A raw mTLS + HTTP/2 client, for requests our pool would never send.
pub async fn raw_h2(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await?;
    let (send, conn) = h2::client::handshake(tls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// Sends one request on a raw connection and returns the response status.
pub async fn raw_request(
    send: &mut h2::client::SendRequest<Bytes>,
    request: http::Request<()>,
) -> anyhow::Result<StatusCode> {
    let mut send = send.clone().ready().await?;
    let (response, _stream) = send.send_request(request, false)?;
    Ok(tokio::time::timeout(Duration::from_secs(5), response)
        .await??
        .status())
}

/// The serial number (hex) of a DER certificate.
pub fn serial_of(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.tbs_certificate.raw_serial_as_string().replace(':', "")
}

/// A client config that presents no certificate and trusts any server: only a server that
/// forgets to demand client certificates would talk to it.
pub fn anonymous_client() -> Arc<rustls::ClientConfig> {
    let mut config = rustls::ClientConfig::builder_with_provider(hbone::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(TrustAnything))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

#[derive(Debug)]
struct TrustAnything;

impl rustls::client::danger::ServerCertVerifier for TrustAnything {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        hbone::tls::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
