//! One certificate per workload identity, fetched once and renewed at half-life in the background.
//!
//! Connections never hold a certificate: TLS configs resolve the *current* one from a
//! [`CertHandle`] at each handshake. Renewal therefore never disturbs an established connection,
//! and the next handshake presents the new certificate.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use tokio::sync::OnceCell;

use crate::ca::MeshCa;
use crate::cert::{CertError, WorkloadCert};
use crate::identity::Identity;

/// Where certificates come from: the local [`MeshCa`] today, Istio's CA service later.
#[async_trait]
pub trait CertificateProvider: Send + Sync + fmt::Debug + 'static {
    /// Issues a fresh certificate for `identity`.
    async fn issue(&self, identity: &Identity) -> Result<WorkloadCert, CertError>;
}

#[async_trait]
impl CertificateProvider for MeshCa {
    async fn issue(&self, identity: &Identity) -> Result<WorkloadCert, CertError> {
        MeshCa::issue(self, identity)
    }
}

/// A live view of one identity's certificate; renewals show up here.
#[derive(Clone)]
pub struct CertHandle {
    slot: Arc<Slot>,
}

struct Slot {
    identity: Identity,
    current: ArcSwap<WorkloadCert>,
}

impl CertHandle {
    /// A handle on a fixed certificate that is never renewed (tests, static configs).
    pub fn fixed(cert: WorkloadCert) -> CertHandle {
        CertHandle {
            slot: Arc::new(Slot {
                identity: cert.identity().clone(),
                current: ArcSwap::from_pointee(cert),
            }),
        }
    }

    /// The certificate in force now.
    pub fn current(&self) -> Arc<WorkloadCert> {
        self.slot.current.load_full()
    }

    /// The identity this handle is for.
    pub fn identity(&self) -> &Identity {
        &self.slot.identity
    }
}

impl fmt::Debug for CertHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("CertHandle")
            .field(&*self.slot.current.load())
            .finish()
    }
}

/// Caches one certificate per identity and keeps each renewed.
pub struct CertManager {
    provider: Arc<dyn CertificateProvider>,
    slots: Mutex<HashMap<Identity, Arc<OnceCell<CertHandle>>>>,
}

impl CertManager {
    /// A manager that obtains certificates from `provider`.
    pub fn new(provider: Arc<dyn CertificateProvider>) -> Self {
        CertManager {
            provider,
            slots: Mutex::default(),
        }
    }

    /// The certificate handle for `identity`, issuing the first certificate if needed.
    /// Concurrent callers for the same identity share one issuance.
    pub async fn fetch(&self, identity: &Identity) -> Result<CertHandle, CertError> {
        let cell = self
            .slots
            .lock()
            .expect("cert cache poisoned")
            .entry(identity.clone())
            .or_default()
            .clone();
        let handle = cell
            .get_or_try_init(|| async {
                let cert = self.provider.issue(identity).await?;
                let handle = CertHandle::fixed(cert);
                tokio::spawn(renew(Arc::downgrade(&handle.slot), self.provider.clone()));
                Ok::<_, CertError>(handle)
            })
            .await?;
        Ok(handle.clone())
    }

    /// Stops caching `identity` (its workload left the node). Handles still held keep working
    /// until they are dropped; renewal stops with the last of them.
    pub fn forget(&self, identity: &Identity) {
        self.slots
            .lock()
            .expect("cert cache poisoned")
            .remove(identity);
    }

    /// The identities currently cached, with their certificates (for config dumps).
    pub fn certificates(&self) -> Vec<Arc<WorkloadCert>> {
        let slots = self.slots.lock().expect("cert cache poisoned");
        slots
            .values()
            .filter_map(|cell| cell.get().map(CertHandle::current))
            .collect()
    }
}

impl fmt::Debug for CertManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertManager")
            .field("provider", &self.provider)
            .finish_non_exhaustive()
    }
}

/// Renews at half-life; on failure retries with backoff, never past what the old cert allows.
async fn renew(slot: Weak<Slot>, provider: Arc<dyn CertificateProvider>) {
    let mut backoff = Duration::from_secs(1);
    let mut wait = match slot.upgrade() {
        Some(s) => until(s.current.load().refresh_at()),
        None => return,
    };
    loop {
        tokio::time::sleep(wait).await;
        let Some(slot) = slot.upgrade() else { return };
        match provider.issue(&slot.identity).await {
            Ok(cert) => {
                tracing::info!(
                    identity = %slot.identity,
                    serial = cert.serial(),
                    expires = ?cert.not_after(),
                    "renewed workload certificate"
                );
                wait = until(cert.refresh_at());
                slot.current.store(Arc::new(cert));
                backoff = Duration::from_secs(1);
            }
            Err(error) => {
                let expires_in = until(slot.current.load().not_after());
                tracing::warn!(
                    identity = %slot.identity,
                    %error,
                    ?expires_in,
                    "certificate renewal failed; retrying"
                );
                wait = backoff.min(expires_in.max(Duration::from_millis(100)));
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

fn until(t: SystemTime) -> Duration {
    t.duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Debug)]
    struct Counting {
        ca: MeshCa,
        issued: AtomicUsize,
    }

    #[async_trait]
    impl CertificateProvider for Counting {
        async fn issue(&self, identity: &Identity) -> Result<WorkloadCert, CertError> {
            self.issued.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.ca.issue(identity)
        }
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa).unwrap()
    }

    #[tokio::test]
    async fn concurrent_fetches_share_one_issuance() {
        let provider = Arc::new(Counting {
            ca: MeshCa::generate("cluster.local").unwrap(),
            issued: AtomicUsize::new(0),
        });
        let mgr = Arc::new(CertManager::new(provider.clone()));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let mgr = mgr.clone();
                tokio::spawn(async move { mgr.fetch(&id("a")).await.unwrap() })
            })
            .collect();
        let mut serials = Vec::new();
        for t in tasks {
            serials.push(t.await.unwrap().current().serial().to_owned());
        }
        serials.dedup();
        assert_eq!(serials.len(), 1);
        assert_eq!(provider.issued.load(Ordering::SeqCst), 1);
        mgr.fetch(&id("b")).await.unwrap();
        assert_eq!(provider.issued.load(Ordering::SeqCst), 2);
        assert_eq!(mgr.certificates().len(), 2);
    }

    #[tokio::test]
    async fn renews_at_half_life_and_stops_when_forgotten() {
        let ca = MeshCa::generate("cluster.local")
            .unwrap()
            .with_ttl(Duration::from_secs(3));
        let mgr = CertManager::new(Arc::new(ca));
        let handle = mgr.fetch(&id("a")).await.unwrap();
        let first = handle.current();
        // Refresh is at not_before + lifetime/2: about one second from now.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while handle.current().serial() == first.serial() && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let second = handle.current();
        assert_ne!(first.serial(), second.serial(), "renewed at half-life");
        assert!(second.not_after() > first.not_after());

        mgr.forget(&id("a"));
        let weak = Arc::downgrade(&handle.slot);
        drop(handle);
        assert!(
            weak.upgrade().is_none(),
            "renewal holds no strong reference"
        );
    }
}
