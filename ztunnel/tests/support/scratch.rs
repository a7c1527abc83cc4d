//! A scratch configuration directory, for the tests that run a mesh from YAML and change it under
//! a watcher: ztunnel's, the local mesh's and the waypoint's, which include this file.

#![allow(dead_code)] // each test binary uses part of it

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A directory unique to this process and call, removed on drop.
pub(crate) struct Dir(pub(crate) PathBuf);

impl Dir {
    /// An empty directory.
    pub(crate) fn empty() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "mesh-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("mkdir");
        Self(path)
    }

    /// A directory holding `yaml` as `mesh.yaml`.
    pub(crate) fn with_mesh(yaml: &str) -> Self {
        let dir = Self::empty();
        dir.write("mesh.yaml", yaml);
        dir
    }

    /// Writes `name` whole (a temporary file, then a rename), as a configuration management tool
    /// would, so a watcher never reads half of it.
    pub(crate) fn write(&self, name: &str, yaml: &str) {
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml).expect("write");
        std::fs::rename(tmp, self.0.join(name)).expect("rename");
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
