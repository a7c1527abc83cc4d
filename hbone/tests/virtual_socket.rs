//! The tunnel stream as a Pingora L4 stream, the way the waypoint uses it on both sides.
#![cfg(feature = "pingora")]

mod support;

use hbone::Config;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::l4::virt::VirtualSocketStream;
use pingora_core::protocols::{Peek, Shutdown};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_works_as_a_pingora_stream() {
    let f = Fixture::start(Config::default()).await;
    let tunnel = f
        .pool
        .connect(request(
            &id("client"),
            &id("server"),
            f.server.addr,
            port::ECHO,
        ))
        .await
        .unwrap();

    let mut stream = L4Stream::from(VirtualSocketStream::new(Box::new(tunnel)));
    // Pingora calls this right after connecting; a tunnel must accept it.
    stream.set_nodelay().unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0 preface-sized!")
        .await
        .unwrap();
    stream.flush().await.unwrap();
    // Peeking (how Pingora detects h2c) must not consume the bytes.
    let mut peeked = [0u8; 3];
    assert!(stream.try_peek(&mut peeked).await.unwrap());
    assert_eq!(&peeked, b"PRI");
    let mut echoed = [0u8; 29];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"PRI * HTTP/2.0 preface-sized!");
    Shutdown::shutdown(&mut stream).await;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "END_STREAM after shutdown reads as EOF");
}
