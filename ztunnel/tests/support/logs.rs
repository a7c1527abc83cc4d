//! The test binary's log, captured as an operator's collector would get it, for the tests (of
//! ztunnel and of the waypoint, which include this file) that check what access logs say.

#![allow(dead_code)] // each test binary uses part of it

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Every line logged at `INFO` or above in this test binary, from the first call of [`log`].
#[derive(Clone, Default)]
pub(crate) struct Log(Arc<Mutex<Vec<u8>>>);

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The binary's log; the first call installs the capture, so call it before anything logs.
pub(crate) fn log() -> &'static Log {
    static LOG: OnceLock<Log> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Log::default();
        let writer = log.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .init();
        log
    })
}

impl Log {
    /// The first access log line with every one of `fields`, waiting (ten seconds at most) for
    /// it to be written, which happens just after the connection or request ends.
    pub(crate) async fn line(&self, fields: &[&str]) -> String {
        for _ in 0..400 {
            let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
            let found = text
                .lines()
                .find(|l| l.contains(" access: ") && fields.iter().all(|f| l.contains(f)));
            if let Some(line) = found {
                return line.to_owned();
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no access log line with {fields:?}");
    }
}

/// The value of `trace_id=` in a log line.
pub(crate) fn trace_id(line: &str) -> &str {
    let at = line.find("trace_id=").expect("a trace id") + "trace_id=".len();
    &line[at..at + 32]
}
