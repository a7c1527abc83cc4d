//! Protocol detection for ports whose protocol nobody declared (no `appProtocol`, no protocol
//! prefix in the port name), as Envoy's HTTP inspector does for Istio: a stream that opens with
//! an HTTP/1.x request method or the HTTP/2 connection preface is HTTP, anything else is TCP.
//!
//! The decision needs the client's first bytes, so a protocol where the server speaks first
//! (MySQL, SMTP) waits for a client that is waiting too: such ports must declare `tcp`, as
//! Istio's documentation asks.

use hbone::H2Stream;

/// What a stream that opens with these bytes is; `None` while they could still become either.
fn classify(first: &[u8]) -> Option<bool> {
    /// Request methods, with the space that ends them, and the HTTP/2 preface's first line.
    const HTTP: &[&[u8]] = &[
        b"GET ",
        b"HEAD ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"CONNECT ",
        b"OPTIONS ",
        b"TRACE ",
        b"PATCH ",
        b"PRI * HTTP/2.0",
    ];
    if HTTP.iter().any(|p| first.starts_with(p)) {
        return Some(true);
    }
    if HTTP.iter().any(|p| p.starts_with(first)) {
        return None;
    }
    Some(false)
}

/// Whether the stream opens as HTTP. Reads nothing away: what it looked at is read again by
/// whoever serves the stream. A stream that ends, or fails, before it could tell is not HTTP.
pub(crate) async fn is_http(stream: &mut H2Stream) -> bool {
    let mut want = 1;
    loop {
        let first = match stream.peek(want).await {
            Ok(first) => first,
            Err(_) => return false,
        };
        match classify(first) {
            Some(http) => return http,
            None if first.len() < want => return false,
            None => want = first.len() + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::classify;

    #[test]
    fn the_first_bytes_decide() {
        let cases: &[(&[u8], Option<bool>)] = &[
            (b"GET / HTTP/1.1\r\n", Some(true)),
            (b"POST /x HTTP/1.0\r\n", Some(true)),
            (b"OPTIONS * HTTP/1.1\r\n", Some(true)),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(true)),
            // Still a prefix of a method or the preface: wait for more.
            (b"", None),
            (b"G", None),
            (b"PO", None),
            (b"PRI * HTTP/2", None),
            // Settled as soon as no HTTP opening fits.
            (b"GETX", Some(false)),
            (b"get / HTTP/1.1", Some(false)),
            (b"\x16\x03\x01", Some(false)), // a TLS ClientHello
            (b"*1\r\n$4\r\nPING\r\n", Some(false)), // Redis
            (b"\x00\x01binary", Some(false)),
        ];
        for (first, want) in cases {
            assert_eq!(
                classify(first),
                *want,
                "{:?}",
                String::from_utf8_lossy(first)
            );
        }
    }
}
