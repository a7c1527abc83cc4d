//! The example plugins of `plugins/examples`, built from source for tests, benchmarks and the
//! local mesh. They are a separate cargo workspace (target `wasm32-wasip1`); building them needs
//! that target installed (`rustup target add wasm32-wasip1`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The examples workspace in this source tree.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Builds every example (once per process) and returns the path of `<name>.wasm`.
///
/// # Panics
/// If the build fails: callers are tests and tools that cannot go on without the modules.
pub fn build(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let workspace = workspace();
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip1",
                "--manifest-path",
            ])
            .arg(workspace.join("Cargo.toml"))
            .status()
            .expect("run cargo to build the example plugins");
        assert!(
            status.success(),
            "building the example plugins failed (is the wasm32-wasip1 target installed?)"
        );
        let dir = workspace.join("target/wasm32-wasip1/release");
        dir.canonicalize().unwrap_or(dir)
    });
    dir.join(format!("{name}.wasm"))
}
