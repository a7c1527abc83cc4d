//! Fetching plugin modules: `file://` paths, with SHA-256 verification.

use sha2::{Digest, Sha256};

use crate::host::hex;

/// Why a module could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL's scheme is not one we fetch.
    #[error("unsupported module URL {0:?}")]
    Unsupported(String),
    /// Reading a local file failed.
    #[error("reading {path}: {source}")]
    File {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The bytes do not hash to the expected digest.
    #[error("module sha256 is {actual}, expected {expected}")]
    Checksum {
        /// What the resource asked for.
        expected: String,
        /// What the bytes hash to.
        actual: String,
    },
}

/// Fetches the module at `url` and checks it against `sha256` (lower-case hex) when given.
pub async fn fetch(url: &str, sha256: Option<&str>) -> Result<Vec<u8>, FetchError> {
    let bytes = match url.split_once("://") {
        Some(("file", path)) => tokio::fs::read(path)
            .await
            .map_err(|source| FetchError::File {
                path: path.to_owned(),
                source,
            })?,
        _ => return Err(FetchError::Unsupported(url.to_owned())),
    };
    verify(&bytes, sha256)?;
    Ok(bytes)
}

/// Checks `bytes` against an expected SHA-256.
pub fn verify(bytes: &[u8], sha256: Option<&str>) -> Result<(), FetchError> {
    let Some(expected) = sha256 else {
        return Ok(());
    };
    let actual = hex(&Sha256::digest(bytes));
    if actual.eq_ignore_ascii_case(expected) {
        Ok(())
    } else {
        Err(FetchError::Checksum {
            expected: expected.to_owned(),
            actual,
        })
    }
}
