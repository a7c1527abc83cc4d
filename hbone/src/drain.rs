//! Graceful drain: a trigger that asks every holder of a [`DrainWatch`] to wind down, then waits
//! until all of them have dropped their watch.
//!
//! The watch is a `tokio::sync::watch::Receiver<bool>`, the same type as Pingora's
//! `ShutdownWatch`, so one signal drains HBONE listeners and Pingora services alike.

use tokio::sync::watch;

/// Creates a drain trigger and its first watch.
pub fn channel() -> (DrainTrigger, DrainWatch) {
    let (tx, rx) = watch::channel(false);
    (DrainTrigger(tx), DrainWatch(rx))
}

/// Starts the drain.
#[derive(Debug)]
pub struct DrainTrigger(watch::Sender<bool>);

impl DrainTrigger {
    /// Signals every watch, then waits until all watches are dropped (every connection is done).
    /// Callers bound this with their own deadline.
    pub async fn drain(self) {
        let _ = self.0.send(true);
        self.0.closed().await;
    }

    /// Another watch on this trigger.
    pub fn watch(&self) -> DrainWatch {
        DrainWatch(self.0.subscribe())
    }
}

/// Held by whatever must finish before the drain completes.
#[derive(Clone, Debug)]
pub struct DrainWatch(watch::Receiver<bool>);

impl DrainWatch {
    /// Resolves once the drain has started (or the trigger is gone).
    pub async fn signaled(&mut self) {
        let _ = self.0.wait_for(|draining| *draining).await;
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.0.borrow()
    }

    /// The underlying receiver, usable as Pingora's `ShutdownWatch`.
    pub fn into_receiver(self) -> watch::Receiver<bool> {
        self.0
    }
}
