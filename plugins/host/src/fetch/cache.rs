//! [`ModuleCache`]: fetched modules by URL, reused as Istio's `imagePullPolicy` allows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::{FetchError, FetchOptions, PullPolicy, Source, normalize_digest};

/// Fetched modules by URL, so that configuration changes do not pull every module again.
///
/// Entries live until [`ModuleCache::retain`] drops them. `file://` URLs are never cached.
#[derive(Debug, Default)]
pub struct ModuleCache {
    options: FetchOptions,
    entries: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    module: Arc<[u8]>,
    /// The module's SHA-256 and, for an image, its manifest digests (lower-case hex).
    digests: Vec<String>,
}

impl ModuleCache {
    /// An empty cache fetching with the default [`FetchOptions`].
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache fetching with `options`.
    pub fn with_options(options: FetchOptions) -> Self {
        Self {
            options,
            entries: Mutex::default(),
        }
    }

    /// The module at `url`, checked against `sha256` when given.
    ///
    /// With [`PullPolicy::IfNotPresent`], a module cached for the same URL is returned without
    /// network access, provided `sha256` (when given) matches it; otherwise the module is
    /// fetched and replaces the cached one. A failed fetch leaves the cache as it was.
    pub async fn get(
        &self,
        url: &str,
        sha256: Option<&str>,
        policy: PullPolicy,
    ) -> Result<Arc<[u8]>, FetchError> {
        let url = url.trim();
        let source = Source::parse(url)?;
        source.check_pin(sha256)?;
        let cacheable = !matches!(source, Source::File(_));
        if cacheable && policy == PullPolicy::IfNotPresent {
            let want = sha256.map(normalize_digest);
            let entries = self.lock();
            if let Some(entry) = entries.get(url)
                && want.as_ref().is_none_or(|w| entry.digests.contains(w))
            {
                tracing::debug!(url, "module cache hit");
                return Ok(entry.module.clone());
            }
        }
        let fetched = source.fetch(sha256, &self.options).await?;
        let module: Arc<[u8]> = fetched.module.into();
        if cacheable {
            self.lock().insert(
                url.to_owned(),
                Entry {
                    module: module.clone(),
                    digests: fetched.digests,
                },
            );
        }
        Ok(module)
    }

    /// Keeps only the URLs for which `keep` answers true (drop modules no plugin uses).
    pub fn retain(&self, mut keep: impl FnMut(&str) -> bool) {
        self.lock().retain(|url, _| keep(url));
    }

    /// How many modules are cached.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no module is cached.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
