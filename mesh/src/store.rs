//! Keeping the snapshot current: a configuration directory, a parse cache, a watcher, and the
//! store proxies read from.
//!
//! Proxies call [`Store::snapshot`] on every connection: an `arc-swap` load, which takes no lock
//! and does not allocate. A configuration change builds a whole new snapshot off the data path
//! and swaps it in with one atomic store; connections that already hold the old snapshot finish
//! with it. A change that does not validate is logged and counted, and the last good snapshot
//! stays in force.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use notify::Watcher as _;
use tokio::sync::{mpsc, watch};

use crate::error::{ConfigError, Invalid};
use crate::resource::{self, Located, Parsed};
use crate::snapshot::{self, Options, Snapshot};

/// How long the directory must be quiet before a change is applied: editors and `kubectl cp`
/// write a file in several steps, and a ConfigMap update swaps a symlink after writing files.
/// Those steps land within a few milliseconds of each other; 25 ms coalesces them and leaves
/// most of a 100 ms route-change budget to parsing and rebuilding.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(25);

/// A directory of YAML files, read recursively, with a cache of parsed files so a reload only
/// parses what changed.
#[derive(Debug)]
pub struct ConfigDir {
    root: PathBuf,
    options: Options,
    cache: HashMap<PathBuf, CachedFile>,
}

#[derive(Debug)]
struct CachedFile {
    hash: u64,
    parsed: Parsed,
}

impl ConfigDir {
    /// A directory to read with mesh-wide `options`.
    pub fn new(root: impl Into<PathBuf>, options: Options) -> Self {
        Self {
            root: root.into(),
            options,
            cache: HashMap::new(),
        }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Reads the directory and builds a snapshot with `version`. Files whose contents did not
    /// change since the last call are not parsed again.
    pub fn load(&mut self, version: u64) -> Result<Snapshot, ConfigError> {
        let files = list_files(&self.root)?;
        let mut texts = Vec::with_capacity(files.len());
        for path in &files {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                path: path.clone(),
                source,
            })?;
            texts.push(text);
        }
        let mut stale = Vec::new();
        for (path, text) in files.iter().zip(&texts) {
            let hash = hash(text);
            if self.cache.get(path).is_none_or(|c| c.hash != hash) {
                stale.push((path.clone(), hash, text.as_str()));
            }
        }
        let root = self.root.clone();
        for (path, hash, parsed) in parse_all(&root, stale) {
            self.cache.insert(path, CachedFile { hash, parsed });
        }
        self.cache.retain(|path, _| files.contains(path));

        let mut problems: Vec<Invalid> = Vec::new();
        let mut resources: Vec<&Arc<Located>> = Vec::new();
        for path in &files {
            let cached = &self.cache[path];
            problems.extend(cached.parsed.invalid.iter().cloned());
            resources.extend(cached.parsed.resources.iter());
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        snapshot::build(&resources, &self.options, version)
    }
}

impl Snapshot {
    /// Builds a snapshot (version 1) from YAML text named `name` in messages: for tests,
    /// and for configuration embedded in a binary.
    pub fn from_yaml(name: &str, text: &str, options: &Options) -> Result<Snapshot, ConfigError> {
        let parsed = resource::parse_file(&Arc::new(PathBuf::from(name)), text);
        if !parsed.invalid.is_empty() {
            return Err(ConfigError::Invalid(parsed.invalid));
        }
        let resources: Vec<&Arc<Located>> = parsed.resources.iter().collect();
        snapshot::build(&resources, options, 1)
    }
}

/// Parses files on all cores: an initial load of tens of megabytes of YAML is dominated by
/// parsing, and files are independent.
fn parse_all(root: &Path, files: Vec<(PathBuf, u64, &str)>) -> Vec<(PathBuf, u64, Parsed)> {
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(files.len().max(1));
    let parse = |(path, hash, text): (PathBuf, u64, &str)| {
        let shown = Arc::new(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        let parsed = resource::parse_file(&shown, text);
        (path, hash, parsed)
    };
    if threads <= 1 {
        return files.into_iter().map(parse).collect();
    }
    let mut shards: Vec<Vec<(PathBuf, u64, &str)>> = (0..threads).map(|_| Vec::new()).collect();
    // Largest files first, each to the lightest shard, so one huge file does not idle a core.
    let mut files = files;
    files.sort_by_key(|f| std::cmp::Reverse(f.2.len()));
    let mut loads = vec![0usize; threads];
    for f in files {
        let lightest = (0..threads).min_by_key(|&i| loads[i]).unwrap_or(0);
        loads[lightest] += f.2.len();
        shards[lightest].push(f);
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = shards
            .into_iter()
            .map(|shard| scope.spawn(move || shard.into_iter().map(parse).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

fn hash(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

/// Every `.yaml`/`.yml` file below `root`, sorted. Entries starting with `.` are skipped: editor
/// swap files, and the `..data` indirection Kubernetes uses for ConfigMap volumes (whose files
/// are reached through the top-level symlinks instead).
fn list_files(root: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ConfigError::Io { path, source }
    };
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let entry = entry.map_err(io(&dir))?;
            let path = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let meta = std::fs::metadata(&path).map_err(io(&path))?;
            if meta.is_dir() {
                dirs.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Counters of configuration changes, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReloadStats {
    /// Snapshots applied (including the first).
    pub applied: u64,
    /// Changes rejected because they did not validate.
    pub rejected: u64,
}

/// The current snapshot and how it got there.
#[derive(Debug)]
pub struct Store {
    current: ArcSwap<Snapshot>,
    next_version: AtomicU64,
    applied: AtomicU64,
    rejected: AtomicU64,
    last_error: Mutex<Option<Arc<str>>>,
    changes: watch::Sender<u64>,
}

impl Store {
    /// A store holding `first` (whose version should be 1).
    pub fn new(first: Snapshot) -> Arc<Self> {
        let version = first.version();
        Arc::new(Self {
            current: ArcSwap::from_pointee(first),
            next_version: AtomicU64::new(version + 1),
            applied: AtomicU64::new(1),
            rejected: AtomicU64::new(0),
            last_error: Mutex::new(None),
            changes: watch::channel(version).0,
        })
    }

    /// Loads `dir` (version 1) into a new store; fails if the configuration is invalid.
    pub fn open(dir: &mut ConfigDir) -> Result<Arc<Self>, ConfigError> {
        Ok(Self::new(dir.load(1)?))
    }

    /// The current snapshot, without locking or allocating. Hold it for the duration of one
    /// decision; use [`Store::load`] to keep it longer (a connection's lifetime).
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The current snapshot, owned.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Notified with the new version after each applied change (for re-checking live
    /// connections against new policy).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Counters.
    pub fn stats(&self) -> ReloadStats {
        ReloadStats {
            applied: self.applied.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
        }
    }

    /// The last rejected change's error, until a change is applied.
    pub fn last_error(&self) -> Option<Arc<str>> {
        self.last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reloads `dir` now: swaps in the new snapshot, or logs and counts why not. Blocking;
    /// call it off the data-plane runtime.
    pub fn reload(&self, dir: &mut ConfigDir) -> Result<u64, ConfigError> {
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = dir.load(version);
        let mut last_error = self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match result {
            Ok(snapshot) => {
                let stats = (snapshot.workloads().len(), snapshot.services().len());
                self.current.store(Arc::new(snapshot));
                self.applied.fetch_add(1, Ordering::Relaxed);
                *last_error = None;
                self.changes.send_replace(version);
                tracing::info!(
                    version,
                    workloads = stats.0,
                    services = stats.1,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    dir = %dir.root().display(),
                    "applied configuration"
                );
                Ok(version)
            }
            Err(e) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                *last_error = Some(e.to_string().into());
                tracing::error!(
                    in_force = self.current.load().version(),
                    dir = %dir.root().display(),
                    "rejected configuration change; the last good configuration stays in force: {e}"
                );
                Err(e)
            }
        }
    }

    /// Watches `dir` and applies changes after `debounce` of quiet, until the returned handle is
    /// dropped. Must be called within a Tokio runtime; reloads run on its blocking pool.
    pub fn watch(
        self: &Arc<Self>,
        mut dir: ConfigDir,
        debounce: Duration,
    ) -> Result<WatchHandle, ConfigError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let root = dir.root().to_path_buf();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.send(());
            }
        })
        .and_then(|mut w| w.watch(&root, notify::RecursiveMode::Recursive).map(|()| w))
        .map_err(|e| ConfigError::Io {
            path: root.clone(),
            source: std::io::Error::other(e),
        })?;
        let store = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // Wait until the directory has been quiet for `debounce`.
                while let Ok(Some(())) = tokio::time::timeout(debounce, rx.recv()).await {}
                let Some(store) = store.upgrade() else { return };
                let reloaded = tokio::task::spawn_blocking(move || {
                    let _ = store.reload(&mut dir);
                    dir
                })
                .await;
                match reloaded {
                    Ok(d) => dir = d,
                    Err(e) => {
                        tracing::error!("configuration reload panicked; watching stops: {e}");
                        return;
                    }
                }
            }
        });
        Ok(WatchHandle {
            _watcher: Box::new(watcher),
            task,
        })
    }
}

/// Stops watching when dropped (the watcher stops delivering events once dropped).
pub struct WatchHandle {
    _watcher: Box<dyn notify::Watcher + Send>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for WatchHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchHandle").finish_non_exhaustive()
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}
