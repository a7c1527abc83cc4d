//! Circuit breaking: DestinationRule `connectionPool` limits per service, as Envoy enforces
//! them per cluster. Beyond `http2MaxRequests` requests in flight, or when every one of
//! `maxConnections` is busy and `http1MaxPendingRequests` requests already wait for one, a
//! request is answered 503 at once (response flag `UO`) instead of piling onto a struggling
//! service. With `maxRetries` retries in flight, a failed attempt is not retried (its failure is
//! the answer, flagged `UO`): retries cannot multiply the load on a service that is failing.
//!
//! Each upstream request uses its own tunnel stream, so a "connection" here is a request in
//! progress to the service. Breakers exist only for services whose DestinationRule sets a
//! limit, and are kept across configuration changes while the limits stay the same, so a
//! reload neither forgets the requests in flight nor lets a burst through.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use mesh::Snapshot;
use mesh::route::ConnectionPool;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The breakers of one snapshot, by service hostname.
#[derive(Debug, Default)]
pub(crate) struct Breakers(HashMap<Arc<str>, Arc<Breaker>>);

/// The limits and live counts of one service.
#[derive(Debug)]
pub(crate) struct Breaker {
    limits: ConnectionPool,
    active: AtomicU32,
    pending: AtomicU32,
    retries: AtomicU32,
    connections: Arc<Semaphore>,
}

/// A retry in flight; gives its place back when dropped.
#[derive(Debug)]
pub(crate) struct Retrying(Arc<Breaker>);

impl Drop for Retrying {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `maxRetries` retries are in flight already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RetryOverflow;

/// A request let through; releases its place when dropped.
#[derive(Debug)]
pub(crate) struct Admitted {
    breaker: Arc<Breaker>,
    _connection: OwnedSemaphorePermit,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.breaker.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a request was turned away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overflow {
    /// `http2MaxRequests` requests are in flight.
    Requests,
    /// No connection is free and the pending queue is full.
    Pending,
    /// The request waited for a connection until its deadline.
    Timeout,
}

impl Breakers {
    /// Breakers for the services of `snapshot` with limits, reusing `previous` ones whose
    /// limits did not change.
    pub(crate) fn new(snapshot: &Snapshot, namespace: &str, previous: Option<&Breakers>) -> Self {
        let default = ConnectionPool::default();
        let mut out = HashMap::new();
        for service in snapshot.services() {
            let Some((_, policy)) = snapshot.destination_rule(namespace, service) else {
                continue;
            };
            let limits = &policy.traffic.connection_pool;
            if limits.max_connections == default.max_connections
                && limits.http1_max_pending_requests == default.http1_max_pending_requests
                && limits.http2_max_requests == default.http2_max_requests
                && limits.max_retries == default.max_retries
            {
                continue;
            }
            let kept = previous
                .and_then(|p| p.0.get(&service.hostname))
                .filter(|b| b.limits == *limits)
                .cloned();
            let breaker = kept.unwrap_or_else(|| {
                let permits = (limits.max_connections as usize).min(Semaphore::MAX_PERMITS);
                Arc::new(Breaker {
                    limits: limits.clone(),
                    active: AtomicU32::new(0),
                    pending: AtomicU32::new(0),
                    retries: AtomicU32::new(0),
                    connections: Arc::new(Semaphore::new(permits)),
                })
            });
            out.insert(service.hostname.clone(), breaker);
        }
        Self(out)
    }

    /// Admits a request to `service`, waiting for a connection if the pending queue allows,
    /// never past `deadline`. `Ok(None)`: the service has no limits.
    pub(crate) async fn admit(
        &self,
        service: &str,
        deadline: Option<Instant>,
    ) -> Result<Option<Admitted>, Overflow> {
        let Some(breaker) = self.0.get(service) else {
            return Ok(None);
        };
        let active = breaker.active.fetch_add(1, Ordering::AcqRel);
        // From here on, `Admitted` or this guard gives the place back.
        let mut place = Place(Some(breaker));
        if active >= breaker.limits.http2_max_requests {
            return Err(Overflow::Requests);
        }
        let permit = match breaker.connections.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let waiting = breaker.pending.fetch_add(1, Ordering::AcqRel);
                let queued = async {
                    if waiting >= breaker.limits.http1_max_pending_requests {
                        return Err(Overflow::Pending);
                    }
                    let acquire = breaker.connections.clone().acquire_owned();
                    match deadline {
                        Some(d) => match tokio::time::timeout_at(d, acquire).await {
                            Ok(p) => p.map_err(|_| Overflow::Pending),
                            Err(_) => Err(Overflow::Timeout),
                        },
                        None => acquire.await.map_err(|_| Overflow::Pending),
                    }
                }
                .await;
                breaker.pending.fetch_sub(1, Ordering::AcqRel);
                queued?
            }
        };
        place.0 = None;
        Ok(Some(Admitted {
            breaker: breaker.clone(),
            _connection: permit,
        }))
    }
}

impl Breakers {
    /// A place for one more retry to `service`. `Ok(None)`: the service has no limits.
    pub(crate) fn retry(&self, service: &str) -> Result<Option<Retrying>, RetryOverflow> {
        let Some(breaker) = self.0.get(service) else {
            return Ok(None);
        };
        let retrying = Retrying(breaker.clone());
        if breaker.retries.fetch_add(1, Ordering::AcqRel) >= breaker.limits.max_retries {
            return Err(RetryOverflow); // dropping `retrying` gives the place back
        }
        Ok(Some(retrying))
    }
}

/// Gives back a place taken in `active` unless the request was admitted.
struct Place<'a>(Option<&'a Arc<Breaker>>);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.0 {
            b.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
