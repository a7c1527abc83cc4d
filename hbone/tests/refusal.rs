//! What the HBONE server and client refuse: the wrong identities and certificates, plaintext,
//! garbage, and requests that are not valid CONNECTs. None of it may harm other connections.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hbone::{CertHandle, CertManager, Config, Error, Identity, MeshCa, Pool};
use http::{Method, Request, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A server for `id("server")` and a healthy client connection to it.
struct Healthy {
    ca: Arc<MeshCa>,
    server: TestServer,
    stream: hbone::H2Stream,
}

async fn healthy() -> Healthy {
    let f = Fixture::start(Config::default()).await;
    let stream = f
        .pool
        .connect(request(
            &id("client"),
            &id("server"),
            f.server.addr,
            port::ECHO,
        ))
        .await
        .unwrap();
    Healthy {
        ca: f.ca,
        server: f.server,
        stream,
    }
}

impl Healthy {
    /// The healthy connection still works.
    async fn assert_alive(&mut self) {
        self.stream.write_all(b"alive").await.unwrap();
        let mut buf = [0u8; 5];
        self.stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"alive");
    }
}

/// A client presenting `cert` (and trusting the server's CA) tries the server.
async fn connect_with(
    h: &Healthy,
    cert: hbone::WorkloadCert,
    expect: Identity,
) -> Result<(), Error> {
    let src = cert.identity().clone();
    let cert = cert.with_roots(vec![h.ca.root().clone()]).unwrap();
    let pool = Pool::new(
        manager_with(MeshCa::generate(TD).unwrap(), vec![cert]),
        Config::default(),
    );
    pool.connect(request(&src, &expect, h.server.addr, port::ECHO))
        .await
        .map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_bad_client_certificates() {
    let mut h = healthy().await;
    let other_ca = MeshCa::generate(TD).unwrap();
    let now = SystemTime::now();
    let cases = [
        ("untrusted root", other_ca.issue(&id("client")).unwrap()),
        (
            "foreign trust domain",
            h.ca.issue(&Identity::new("evil.example", "default", "client").unwrap())
                .unwrap(),
        ),
        (
            "expired",
            h.ca.issue_with_validity(
                &id("client"),
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
            .unwrap(),
        ),
    ];
    for (what, cert) in cases {
        let before = h.server.stats.handshake_failures();
        let result = connect_with(&h, cert, id("server")).await;
        assert!(result.is_err(), "{what}: connected");
        let stats = h.server.stats.clone();
        assert!(
            eventually(Duration::from_secs(2), || stats.handshake_failures()
                == before + 1)
            .await,
            "{what}: server did not refuse the handshake"
        );
        h.assert_alive().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_a_client_without_certificate() {
    let mut h = healthy().await;
    let outcome = async {
        let mut send = raw_h2(h.server.addr, anonymous_client()).await?;
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("127.0.0.1:7001")
            .body(())?;
        raw_request(&mut send, req).await
    }
    .await;
    assert!(outcome.is_err(), "anonymous client got {outcome:?}");
    let stats = h.server.stats.clone();
    assert!(eventually(Duration::from_secs(2), || stats.handshake_failures() == 1).await);
    h.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_bad_server_certificates() {
    init_tracing();
    let ca = Arc::new(MeshCa::generate(TD).unwrap());
    let other_ca = MeshCa::generate(TD).unwrap();
    let now = SystemTime::now();
    let cases = [
        (
            "wrong identity",
            ca.issue(&id("impostor")).unwrap(),
            "sa/impostor",
        ),
        (
            "untrusted root",
            other_ca
                .issue(&id("server"))
                .unwrap()
                .with_roots(vec![ca.root().clone()])
                .unwrap(),
            "invalid peer certificate",
        ),
        (
            "expired",
            ca.issue_with_validity(
                &id("server"),
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
            )
            .unwrap(),
            "certificate expired",
        ),
    ];
    for (what, cert, message) in cases {
        let server = TestServer::start(CertHandle::fixed(cert), Config::default()).await;
        let pool = Pool::new(Arc::new(CertManager::new(ca.clone())), Config::default());
        let err = pool
            .connect(request(
                &id("client"),
                &id("server"),
                server.addr,
                port::ECHO,
            ))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Tls { .. }), "{what}: {err}");
        assert!(err.is_tls(), "{what}: {err}");
        assert_eq!(
            err.is_identity_mismatch(),
            what == "wrong identity",
            "{what}: {err}"
        );
        assert!(err.to_string().contains(message), "{what}: {err}");
        assert_eq!(pool.stats().connections.get(), 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_garbage_are_refused_without_harm() {
    let mut h = healthy().await;
    let inputs: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        &[
            0x16, 0x03, 0x01, 0xff, 0xff, 0xde, 0xad, 0xbe, 0xef, 0x00, 0x42, 0x13,
        ],
    ];
    for (i, input) in inputs.iter().enumerate() {
        let mut tcp = TcpStream::connect(h.server.addr).await.unwrap();
        tcp.write_all(input).await.unwrap();
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
        assert!(closed.is_ok(), "input {i}: connection left open");
        let stats = h.server.stats.clone();
        let expected = i as u64 + 1;
        assert!(
            eventually(Duration::from_secs(2), || stats.handshake_failures()
                == expected)
            .await
        );
        h.assert_alive().await;
    }
    // Random bytes, lots of them.
    let mut tcp = TcpStream::connect(h.server.addr).await.unwrap();
    let noise: Vec<u8> = (0..64 * 1024).map(|_| rand::random::<u8>()).collect();
    let _ = tcp.write_all(&noise).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf))
        .await
        .expect("garbage connection closed");
    h.assert_alive().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_get_400() {
    let mut h = healthy().await;
    let client = h.ca.issue(&id("client")).unwrap();
    let config =
        hbone::tls::client_config(CertHandle::fixed(client), Arc::from([id("server")])).unwrap();
    let mut send = raw_h2(h.server.addr, config).await.unwrap();
    let cases = [
        ("GET", Method::GET, "http://127.0.0.1:7001/"),
        ("POST", Method::POST, "http://127.0.0.1:7001/"),
        ("CONNECT port 0", Method::CONNECT, "127.0.0.1:0"),
        (
            "CONNECT hostname with underscore",
            Method::CONNECT,
            "bad_host:80",
        ),
        ("CONNECT without port", Method::CONNECT, "localhost"),
    ];
    for (what, method, uri) in cases {
        let req = Request::builder().method(method).uri(uri).body(()).unwrap();
        let status = raw_request(&mut send, req).await.unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}");
    }
    // A valid CONNECT on the same connection still works.
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("127.0.0.1:7001")
        .body(())
        .unwrap();
    assert_eq!(raw_request(&mut send, req).await.unwrap(), StatusCode::OK);
    h.assert_alive().await;
}
