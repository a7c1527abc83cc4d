//! HBONE tuning, defaulting to upstream ztunnel's values so throughput and fairness match.

use std::time::Duration;

/// Settings shared by the HBONE server and client pool.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Config {
    /// Per-stream HTTP/2 flow-control window (upstream: 4 MiB).
    pub stream_window: u32,
    /// Per-connection window. Kept at 4x the stream window so one slow stream cannot starve the
    /// others sharing the connection (upstream: 16 MiB).
    pub connection_window: u32,
    /// Largest DATA frame (upstream: 1 MiB): fewer frames per byte on bulk transfers.
    pub max_frame_size: u32,
    /// Streams a server accepts concurrently on one connection (upstream: 200).
    pub server_max_concurrent_streams: u32,
    /// Largest header block a server accepts (upstream: 64 KiB).
    pub server_max_header_list_size: u32,
    /// Bytes a server buffers per stream before applying backpressure (upstream: 400 KiB).
    pub server_send_buffer: usize,
    /// Largest header block a client accepts (upstream: 16 KiB).
    pub client_max_header_list_size: u32,
    /// Streams the pool puts on one connection before dialing another (upstream: 100); the
    /// peer's SETTINGS_MAX_CONCURRENT_STREAMS lowers it further.
    pub pool_max_streams: usize,
    /// How long an unused pooled connection is kept (upstream: 5 minutes).
    pub pool_idle_timeout: Duration,
    /// Interval between HTTP/2 PINGs on every connection (upstream: 10 s).
    pub ping_interval: Duration,
    /// A PING unanswered for this long closes the connection (upstream: 20 s).
    pub ping_timeout: Duration,
    /// Bound on TCP connect, TLS handshake, and waiting for a CONNECT response.
    pub connect_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            server_max_concurrent_streams: 200,
            server_max_header_list_size: 64 * 1024,
            server_send_buffer: 400 * 1024,
            client_max_header_list_size: 16 * 1024,
            pool_max_streams: 100,
            pool_idle_timeout: Duration::from_secs(5 * 60),
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl Config {
    pub(crate) fn server_builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_concurrent_streams(self.server_max_concurrent_streams)
            .max_header_list_size(self.server_max_header_list_size)
            .max_send_buffer_size(self.server_send_buffer);
        b
    }

    pub(crate) fn client_builder(&self) -> h2::client::Builder {
        let mut b = h2::client::Builder::new();
        b.initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(self.max_frame_size)
            .max_header_list_size(self.client_max_header_list_size)
            .max_send_buffer_size(self.stream_window as usize)
            .initial_max_send_streams(self.pool_max_streams)
            .enable_push(false);
        b
    }
}

/// Sends a PING every `interval`; resolves (with the reason) when one is not answered in time.
/// Not data-aware, like upstream: a busy connection is pinged too, which is cheap.
pub(crate) async fn keepalive(
    pings: &mut h2::PingPong,
    interval: Duration,
    timeout: Duration,
) -> &'static str {
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return "connection failed while waiting for PING ack",
            Err(_) => return "PING not acknowledged in time",
        }
    }
}
