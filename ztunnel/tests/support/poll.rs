//! Waiting for what a test is not told of (a metric, a log line, a listener closing) by reading
//! it again until it holds.

use std::time::{Duration, Instant};

/// Reads `get` every 25 ms until `done` holds of it, for up to 10 s, and returns the last
/// reading for the caller to assert on, so that a failure shows what was seen.
pub(crate) async fn poll<T>(mut get: impl FnMut() -> T, done: impl Fn(&T) -> bool) -> T {
    let until = Instant::now() + Duration::from_secs(10);
    let mut value = get();
    while !done(&value) && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(25)).await;
        value = get();
    }
    value
}
