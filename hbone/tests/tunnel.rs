//! HBONE tunnels end to end over real sockets, TLS and HTTP/2: data, half-close, pooling,
//! drain, failures and certificate renewal.

mod support;

use std::sync::Arc;
use std::time::Duration;

use hbone::headers::{Baggage, Forwarded, TraceParent};
use hbone::{CertHandle, CertManager, Config, ConnectHeaders, MeshCa, Pool};
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn fixture(config: Config) -> Fixture {
    Fixture::start(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_carries_identity_target_and_headers() {
    let mut f = fixture(Config::default()).await;
    let mut req = request(&id("client"), &id("server"), f.server.addr, port::ECHO);
    req.headers = ConnectHeaders {
        forwarded: Some(Forwarded {
            client: Some("10.0.0.7:4444".parse().unwrap()),
            host: Some("echo.default.svc.cluster.local".into()),
        }),
        baggage: Some(Baggage::parse(
            "k8s.namespace.name=default,service.name=client",
        )),
        traceparent: Some(TraceParent::random()),
    };
    let mut stream = f.pool.connect(req.clone()).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    stream.shutdown().await.unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());

    let seen = f.server.next_seen().await;
    assert_eq!(seen.peer, id("client"));
    assert_eq!(seen.target, req.authority);
    assert_eq!(seen.local, f.server.addr);
    assert_eq!(seen.headers, req.headers);
    assert_eq!(seen.received.unwrap().0, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_client() {
    let mut f = fixture(Config::default()).await;
    let req = request(&id("client"), &id("server"), f.server.addr, port::SINK);
    let mut stream = f.pool.connect(req).await.unwrap();
    stream.write_all(b"all of it").await.unwrap();
    stream.shutdown().await.unwrap();
    // The server saw EOF, and can still answer on its own half.
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"done");
    let seen = f.server.next_seen().await;
    assert_eq!(seen.received.unwrap().0, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_shows_what_arrived_without_consuming_it() {
    let f = fixture(Config::default()).await;
    let req = request(&id("client"), &id("server"), f.server.addr, port::ECHO);
    let mut stream = f.pool.connect(req).await.unwrap();
    stream.write_all(b"ab").await.unwrap();
    assert_eq!(stream.peek(2).await.unwrap(), b"ab");
    // The echo of a second write is a second DATA frame: peek joins them.
    stream.write_all(b"cd").await.unwrap();
    assert_eq!(stream.peek(4).await.unwrap(), b"abcd");
    stream.shutdown().await.unwrap();
    assert_eq!(
        stream.peek(100).await.unwrap(),
        b"abcd",
        "the end of the stream ends the wait"
    );
    let mut all = Vec::new();
    stream.read_to_end(&mut all).await.unwrap();
    assert_eq!(all, b"abcd", "reads still return what was peeked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_from_the_server() {
    let mut f = fixture(Config::default()).await;
    let req = request(
        &id("client"),
        &id("server"),
        f.server.addr,
        port::SPEAK_FIRST,
    );
    let mut stream = f.pool.connect(req).await.unwrap();
    let mut greeting = Vec::new();
    stream.read_to_end(&mut greeting).await.unwrap();
    assert_eq!(greeting, b"hello", "server's END_STREAM reads as EOF");
    // Our half is still open after the server's EOF.
    stream.write_all(b"still here").await.unwrap();
    stream.shutdown().await.unwrap();
    let seen = f.server.next_seen().await;
    assert_eq!(seen.received.unwrap().0, 10);
}

/// Dropping a tunnel without closing it resets it with `CANCEL`, which is how HTTP/2 clients
/// (Envoy's and our waypoint's idle pools) let go of a tunnel they are done with: the server
/// reads it as the end of the stream, as upstream ztunnel does, and closes its side without
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_tunnel_ends_the_stream_cleanly() {
    let mut f = fixture(Config::default()).await;
    let req = request(&id("client"), &id("server"), f.server.addr, port::ECHO);
    let mut stream = f.pool.connect(req).await.unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    drop(stream);
    let seen = f.server.next_seen().await;
    assert_eq!(seen.received, Ok((4, [0; 32])));
}

/// Any other reset still fails the stream: the server's copy reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_with_an_error_fails_the_stream() {
    let mut f = fixture(Config::default()).await;
    let client = f.ca.issue(&id("client")).unwrap();
    let tls = hbone::tls::client_config(CertHandle::fixed(client), Arc::from([id("server")]));
    let send = raw_h2(f.server.addr, tls.unwrap()).await.unwrap();
    let mut send = send.ready().await.unwrap();
    let connect = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("127.0.0.1:{}", port::ECHO))
        .body(())
        .unwrap();
    let (response, mut stream) = send.send_request(connect, false).unwrap();
    assert_eq!(response.await.unwrap().status(), http::StatusCode::OK);
    stream.send_reset(h2::Reason::CONNECT_ERROR);
    let seen = f.server.next_seen().await;
    let error = seen.received.expect_err("the reset failed the copy");
    assert!(error.contains("CONNECT request was reset"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_256_mib_echo_hashes_match() {
    const TOTAL: usize = 256 * 1024 * 1024;
    let f = fixture(Config::default()).await;
    let req = request(&id("client"), &id("server"), f.server.addr, port::ECHO);
    let stream = f.pool.connect(req).await.unwrap();
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut chunk = vec![0u8; 256 * 1024];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut sent = 0;
        while sent < TOTAL {
            fill_pseudo_random(&mut seed, &mut chunk);
            hasher.update(&chunk);
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        w.shutdown().await.unwrap();
        <[u8; 32]>::from(hasher.finalize())
    });
    let (received, got_hash) = read_hash(&mut r).await.unwrap();
    let sent_hash = writer.await.unwrap();
    assert_eq!(received, TOTAL as u64);
    assert_eq!(got_hash, sent_hash);
}

/// The proxies' copy loop between a TCP socket and a tunnel: a socket's reads are handed to
/// HTTP/2 as they are, DATA payloads go to the socket as they are, and neither direction loses,
/// reorders or duplicates a byte while the read size grows to its largest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_between_a_socket_and_a_tunnel_keeps_every_byte() {
    const TOTAL: usize = 48 * 1024 * 1024;
    let f = fixture(Config::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let req = request(&id("client"), &id("server"), f.server.addr, port::ECHO);
    let pool = f.pool.clone();
    let proxy = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut tunnel = pool.connect(req).await.unwrap();
        hbone::copy_bidirectional(&mut socket, &mut tunnel).await
    });
    let client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = client.into_split();
    let writer = tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut sent = 0;
        // Odd sizes, so chunks never line up with frames or read sizes.
        for size in [1usize, 700, 5_000, 70_001].into_iter().cycle() {
            let mut chunk = vec![0u8; size.min(TOTAL - sent)];
            fill_pseudo_random(&mut seed, &mut chunk);
            hasher.update(&chunk);
            w.write_all(&chunk).await.unwrap();
            sent += chunk.len();
            if sent == TOTAL {
                break;
            }
        }
        w.shutdown().await.unwrap();
        <[u8; 32]>::from(hasher.finalize())
    });
    let (received, got_hash) = read_hash(&mut r).await.unwrap();
    assert_eq!(received, TOTAL as u64, "the echo ends with the half-close");
    assert_eq!(got_hash, writer.await.unwrap());
    let copied = proxy.await.unwrap().unwrap();
    assert_eq!(copied.a_to_b, TOTAL as u64);
    assert_eq!(copied.b_to_a, TOTAL as u64);
}

/// A copy that fails on one side aborts the other: a TCP reset from the client reaches the
/// tunnel's server as a reset (`CONNECT_ERROR`), not as the end of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_copy_resets_the_tunnel() {
    let mut f = fixture(Config::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let req = request(&id("client"), &id("server"), f.server.addr, port::SINK);
    let pool = f.pool.clone();
    let (connected, tunnel_up) = tokio::sync::oneshot::channel();
    let proxy = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut tunnel = pool.connect(req).await.unwrap();
        let _ = connected.send(());
        hbone::copy_bidirectional(&mut socket, &mut tunnel).await
    });
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    tunnel_up.await.unwrap();
    client.write_all(b"partial").await.unwrap();
    client.set_zero_linger().unwrap();
    drop(client);
    let failed = proxy
        .await
        .unwrap()
        .expect_err("the client's reset fails the copy");
    assert_eq!(failed.source.kind(), std::io::ErrorKind::ConnectionReset);
    let seen = f.server.next_seen().await;
    let error = seen
        .received
        .expect_err("the server saw a reset, not an end");
    assert!(error.contains("CONNECT request was reset"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams_share_ten_connections() {
    const STREAMS: usize = 1000;
    let f = fixture(Config::default()).await;
    let barrier = Arc::new(tokio::sync::Barrier::new(STREAMS));
    let tasks: Vec<_> = (0..STREAMS)
        .map(|i| {
            let pool = f.pool.clone();
            let barrier = barrier.clone();
            let req = request(&id("client"), &id("server"), f.server.addr, port::ECHO);
            tokio::spawn(async move {
                let mut s = pool.connect(req).await.unwrap();
                let msg = format!("stream {i}");
                s.write_all(msg.as_bytes()).await.unwrap();
                let mut buf = vec![0u8; msg.len()];
                s.read_exact(&mut buf).await.unwrap();
                assert_eq!(buf, msg.as_bytes());
                // Hold every stream open at once.
                barrier.wait().await;
                s.shutdown().await.unwrap();
                s.read_to_end(&mut buf).await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let stats = f.pool.stats();
    assert!(
        f.pool.dials() <= 10,
        "dialed {} connections",
        f.pool.dials()
    );
    assert!(stats.connections.get() <= 10);
    assert!(eventually(Duration::from_secs(5), || stats.streams.get() == 0).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_reach_the_client_as_typed_statuses() {
    let f = fixture(Config::default()).await;
    for (port, status) in [(port::DENIED, 401), (port::UNREACHABLE, 503)] {
        let req = request(&id("client"), &id("server"), f.server.addr, port);
        let err = f.pool.connect(req).await.unwrap_err();
        assert_eq!(err.status().map(|s| s.as_u16()), Some(status), "{err}");
    }
    // The connection survives refused streams.
    let req = request(&id("client"), &id("server"), f.server.addr, port::ECHO);
    f.pool.connect(req).await.unwrap();
    assert_eq!(f.pool.dials(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_streams_while_new_ones_use_a_new_connection() {
    let mut f = fixture(Config::default()).await;
    let addr = f.server.addr;
    let req = request(&id("client"), &id("server"), addr, port::ECHO);
    let mut in_flight = f.pool.connect(req.clone()).await.unwrap();

    let drain = tokio::spawn(f.server.drain.take().unwrap().drain());
    // The listener closes; the old connection gets GOAWAY but keeps its stream.
    tokio::time::timeout(Duration::from_secs(5), &mut f.server.task)
        .await
        .unwrap()
        .unwrap();
    let cert = f.certs.fetch(&id("server")).await.unwrap();
    let replacement = TestServer::start_on(cert, Config::default(), addr).await;

    // A stream opened before the client has read the GOAWAY may still land on the old
    // connection (the server accepts it, as HTTP/2 allows); once the GOAWAY is read, new streams
    // must go to a fresh connection.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut fresh = loop {
        let stream = f.pool.connect(req.clone()).await.unwrap();
        if f.pool.dials() == 2 {
            break stream;
        }
        drop(stream);
        assert!(
            tokio::time::Instant::now() < deadline,
            "GOAWAY'd connection is still reused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    fresh.write_all(b"new").await.unwrap();
    let mut buf = [0u8; 3];
    fresh.read_exact(&mut buf).await.unwrap();
    assert_eq!(replacement.stats.streams.get(), 1);

    assert!(!drain.is_finished(), "drain waits for the in-flight stream");
    in_flight.write_all(b"old").await.unwrap();
    in_flight.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"old");
    in_flight.shutdown().await.unwrap();
    let mut rest = Vec::new();
    in_flight.read_to_end(&mut rest).await.unwrap();
    drop(in_flight);
    tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .expect("drain completes once the last stream is done")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_peer_mid_stream_errors_both_sides_and_leaks_nothing() {
    let mut f = fixture(Config::default()).await;
    let relay = Relay::start(f.server.addr).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let req = request(&id("client"), &id("server"), relay.addr, port::ECHO);
        let mut s = f.pool.connect(req).await.unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        streams.push(s);
    }
    assert_eq!(f.server.stats.streams.get(), 3);
    relay.kill();

    for mut s in streams {
        let mut buf = Vec::new();
        let result = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .unwrap();
        assert!(
            result.is_err(),
            "client side sees an error, not a clean EOF"
        );
    }
    for _ in 0..3 {
        let seen = f.server.next_seen().await;
        assert!(
            seen.received.is_err(),
            "server side sees an error: {seen:?}"
        );
    }
    let (server, pool) = (f.server.stats.clone(), f.pool.stats());
    let clean = eventually(Duration::from_secs(5), || {
        server.streams.get() == 0
            && server.connections.get() == 0
            && pool.streams.get() == 0
            && pool.connections.get() == 0
    })
    .await;
    assert!(clean, "server {server:?}, pool {pool:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_released() {
    let mut config = Config::default();
    config.pool_idle_timeout = Duration::from_millis(200);
    let f = fixture(config).await;
    let req = request(&id("client"), &id("server"), f.server.addr, port::ECHO);
    let stream = f.pool.connect(req.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(f.pool.stats().connections.get(), 1, "busy connections stay");
    drop(stream);
    let stats = f.pool.stats();
    assert!(eventually(Duration::from_secs(3), || stats.connections.get() == 0).await);
    assert!(
        eventually(Duration::from_secs(3), || f.server.stats.connections.get()
            == 0)
        .await
    );
    f.pool.connect(req).await.unwrap();
    assert_eq!(f.pool.dials(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_pings_evict_the_connection() {
    let mut config = Config::default();
    config.ping_interval = Duration::from_millis(100);
    config.ping_timeout = Duration::from_millis(300);
    let f = fixture(config).await;
    let relay = Relay::start(f.server.addr).await;
    let req = request(&id("client"), &id("server"), relay.addr, port::ECHO);
    let stream = f.pool.connect(req).await.unwrap();
    relay.freeze();
    let stats = f.pool.stats();
    assert!(eventually(Duration::from_secs(3), || stats.connections.get() == 0).await);
    drop(stream);
    let direct = request(&id("client"), &id("server"), f.server.addr, port::ECHO);
    f.pool.connect(direct).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_keeps_connections_and_new_handshakes_use_the_new_certificate() {
    init_tracing();
    let ca = MeshCa::generate(TD)
        .unwrap()
        .with_ttl(Duration::from_secs(3));
    let certs = Arc::new(CertManager::new(Arc::new(ca)));
    let server_cert = certs.fetch(&id("server")).await.unwrap();
    let old_serial = server_cert.current().serial().to_owned();
    let server = TestServer::start(server_cert.clone(), Config::default()).await;
    let pool = Pool::new(certs.clone(), Config::default());
    let req = request(&id("client"), &id("server"), server.addr, port::ECHO);
    let mut long_lived = pool.connect(req.clone()).await.unwrap();

    // Renewal happens at half-life (about 1.5 s after issuance).
    let renewed = eventually(Duration::from_secs(5), || {
        server_cert.current().serial() != old_serial
    })
    .await;
    assert!(renewed);
    let new_serial = server_cert.current().serial().to_owned();

    // The established connection and its stream are untouched.
    long_lived.write_all(b"still").await.unwrap();
    let mut buf = [0u8; 5];
    long_lived.read_exact(&mut buf).await.unwrap();
    pool.connect(req).await.unwrap();
    assert_eq!(pool.dials(), 1);

    // A new handshake sees the renewed certificate.
    let client_cert = certs.fetch(&id("client")).await.unwrap();
    let config = hbone::tls::client_config(client_cert, Arc::from([id("server")])).unwrap();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(
            rustls_pki_types::ServerName::IpAddress(server.addr.ip().into()),
            tcp,
        )
        .await
        .unwrap();
    let presented = &tls.get_ref().1.peer_certificates().unwrap()[0];
    assert_eq!(serial_of(presented), new_serial);
}
