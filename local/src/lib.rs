//! The embedded default: the whole mesh of `deploy/local/` in one process on loopback.

mod mesh;

pub use mesh::{Error, LocalMesh};
