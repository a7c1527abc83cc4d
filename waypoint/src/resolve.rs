//! Endpoints known by name (a `resolution: DNS` ServiceEntry's), resolved when an attempt
//! chooses one.
//!
//! The waypoint asks the system resolver (its pod's `/etc/resolv.conf` and `/etc/hosts`), as
//! Envoy's DNS clusters do, and prefers IPv4, as Istio's default lookup family does: the IPv6
//! addresses are used only when a name has no IPv4 one. The system resolver tells no TTL, so an
//! answer is kept for a few seconds, enough that a burst of requests asks once and short enough
//! that a changed record is followed about as soon as Envoy's refresh would. Failures are not
//! kept: the next attempt asks again.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mesh::model::Workload;
use rand::seq::IndexedRandom;

/// How long an answer is used.
const KEEP: Duration = Duration::from_secs(5);

/// Names prune their expired answers once they hold this many.
const PRUNE_AT: usize = 256;

/// Why an endpoint chosen for an attempt has no address to connect to.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NoAddress {
    /// The endpoint has neither an address nor a name.
    #[error("endpoint has no address")]
    Unaddressed,
    /// Its name did not resolve in time, or to nothing.
    #[error("endpoint name {name} did not resolve: {source}")]
    Unresolved { name: Arc<str>, source: io::Error },
}

impl NoAddress {
    /// Envoy's response flag for it: no healthy upstream, or a DNS resolution failure.
    pub(crate) fn flag(&self) -> &'static str {
        match self {
            NoAddress::Unaddressed => "UH",
            NoAddress::Unresolved { .. } => "DF",
        }
    }
}

/// Resolved endpoint names, shared by every request.
#[derive(Debug, Default)]
pub(crate) struct Names {
    answers: Mutex<HashMap<Arc<str>, Answer>>,
}

#[derive(Debug, Clone)]
struct Answer {
    addresses: Arc<[IpAddr]>,
    until: Instant,
}

impl Names {
    /// `name`'s addresses, of one family: IPv4 if it has any.
    pub(crate) async fn resolve(&self, name: &Arc<str>) -> io::Result<Arc<[IpAddr]>> {
        let now = Instant::now();
        if let Some(hit) = self.answers().get(name).filter(|a| a.until > now) {
            return Ok(hit.addresses.clone());
        }
        // The port is the resolver's to ignore.
        let found: Vec<IpAddr> = tokio::net::lookup_host((&**name, 0))
            .await?
            .map(|a| a.ip())
            .collect();
        let v4: Vec<IpAddr> = found.iter().copied().filter(IpAddr::is_ipv4).collect();
        let mut addresses = if v4.is_empty() { found } else { v4 };
        addresses.sort_unstable();
        addresses.dedup();
        if addresses.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "no address"));
        }
        let addresses: Arc<[IpAddr]> = addresses.into();
        let mut answers = self.answers();
        if answers.len() >= PRUNE_AT {
            answers.retain(|_, a| a.until > now);
        }
        answers.insert(
            name.clone(),
            Answer {
                addresses: addresses.clone(),
                until: now + KEEP,
            },
        );
        Ok(addresses)
    }

    /// The address to connect to `endpoint` at, for the HTTP and the TCP path alike: its own,
    /// or, for an endpoint known by name, one of the name's addresses at random, resolved
    /// within `limit` (the attempt's connect timeout).
    pub(crate) async fn address_of(
        &self,
        endpoint: &Workload,
        limit: Duration,
    ) -> Result<IpAddr, NoAddress> {
        let name = match (endpoint.ips.first(), &endpoint.hostname) {
            (Some(&ip), _) => return Ok(ip),
            (None, Some(name)) => name,
            (None, None) => return Err(NoAddress::Unaddressed),
        };
        let unresolved = |source| NoAddress::Unresolved {
            name: name.clone(),
            source,
        };
        let addresses = tokio::time::timeout(limit, self.resolve(name))
            .await
            .map_err(|_| unresolved(io::Error::new(io::ErrorKind::TimedOut, "no answer in time")))?
            .map_err(unresolved)?;
        let ip = addresses.choose(&mut rand::rng()).copied();
        Ok(ip.expect("never empty"))
    }

    fn answers(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Answer>> {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn localhost_resolves_to_ipv4_and_is_kept() {
        let names = Names::default();
        let name: Arc<str> = Arc::from("localhost");
        let first = names.resolve(&name).await.expect("localhost resolves");
        assert!(first.iter().all(IpAddr::is_ipv4), "{first:?}");
        assert!(first.contains(&IpAddr::from([127, 0, 0, 1])), "{first:?}");
        let again = names.resolve(&name).await.expect("kept");
        assert!(Arc::ptr_eq(&first, &again), "answered from what was kept");
    }
}
