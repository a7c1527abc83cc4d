//! Fetching plugin modules, with SHA-256 verification and a cache that honours Istio's
//! `imagePullPolicy`.
//!
//! A WasmPlugin `url` may be:
//!
//! - `file:///path`: read from the local file system (never cached: re-reading is cheap).
//! - `http://…` or `https://…`: one GET, following up to [`FetchOptions::max_redirects`]
//!   redirects, within [`FetchOptions::timeout`] per exchange and [`FetchOptions::max_size`]
//!   bytes. `https` trusts the public web PKI (Mozilla's roots, from `webpki-roots`) plus
//!   [`FetchOptions::extra_roots`], with the URL's host as SNI.
//! - `oci://registry[:port]/repo[/more]:tag` or `oci://registry/repo@sha256:<manifest digest>`
//!   (tag `latest` when neither is given; a URL without a scheme is OCI too, as in Istio): the
//!   image is pulled with the OCI distribution API. Its module is the layer of media type
//!   `application/vnd.module.wasm.content.layer.v1+wasm` (Istio's Wasm image format), else the
//!   `plugin.wasm` file of a tar (optionally gzipped) layer (the Docker-compatible format).
//!   Registries are contacted over HTTPS, except `localhost`, `127.0.0.0/8` and `[::1]`, which
//!   use plain HTTP (Docker's insecure-localhost default). Docker Hub names (`docker.io/x`, a
//!   first path segment without `.` or `:`) are resolved as Docker does. Anonymous bearer-token
//!   authentication is supported (a 401 with `WWW-Authenticate: Bearer realm=…` gets a token
//!   from the realm, then the request is retried); pull secrets are not.
//!
//! `sha256` (64 hex digits) is checked against the module bytes. For an OCI image it may also
//! name the image (manifest) digest, as Istio documents; when the URL itself carries
//! `@sha256:<digest>`, a `sha256` given as well must be that same digest.
//!
//! Every digest the pull relies on is checked: a manifest pulled by digest must hash to it, an
//! index entry's manifest to its descriptor, and each blob to its layer digest.

mod cache;
mod http;
mod oci;

use std::time::Duration;

use hyper::Uri;
use hyper::header::HeaderMap;
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use crate::host::hex;

pub use cache::ModuleCache;
use http::{Client, parse_http};
use oci::{OciRef, Registry};

/// Why a module could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The URL's scheme is not one we fetch.
    #[error("unsupported module URL {0:?}")]
    Unsupported(String),
    /// The URL (or a redirect's `Location`) is malformed.
    #[error("invalid module URL {url:?}: {why}")]
    InvalidUrl {
        /// The offending URL.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// Reading a local file failed.
    #[error("reading {path}: {source}")]
    File {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No TCP connection could be made.
    #[error("connecting to {url}: {source}")]
    Connect {
        /// The URL being fetched.
        url: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TLS handshake failed (untrusted certificate, wrong name, no common protocol…).
    #[error("TLS with {url}: {source}")]
    Tls {
        /// The URL being fetched.
        url: String,
        /// The handshake error.
        source: std::io::Error,
    },
    /// The HTTP exchange failed after connecting (connection reset, malformed answer…).
    #[error("HTTP exchange with {url}: {source}")]
    Transport {
        /// The URL being fetched.
        url: String,
        /// The underlying error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The server did not answer completely in time.
    #[error("{url}: no complete answer within {after:?}")]
    Timeout {
        /// The URL being fetched.
        url: String,
        /// The time limit.
        after: Duration,
    },
    /// The server answered with a status other than 2xx.
    #[error("{url} answered HTTP {status}{}", with_detail(detail))]
    Http {
        /// The URL that answered (after redirects).
        url: String,
        /// The status code.
        status: u16,
        /// A short excerpt of the answer's body (a registry's error code and message), or empty.
        detail: String,
    },
    /// More redirects than allowed.
    #[error("{url}: more than {max} redirects")]
    TooManyRedirects {
        /// The URL first asked for.
        url: String,
        /// The limit.
        max: usize,
    },
    /// The answer is larger than allowed.
    #[error("{url}: larger than the limit of {limit} bytes")]
    TooLarge {
        /// The URL being fetched.
        url: String,
        /// The limit in bytes.
        limit: u64,
    },
    /// The registry's answers do not make a usable Wasm image.
    #[error("pulling {url}: {why}")]
    Registry {
        /// The `oci://` URL being pulled.
        url: String,
        /// What went wrong.
        why: String,
    },
    /// The URL pins a digest (`@sha256:…`) that differs from the `sha256` given with it.
    #[error("{url} pins sha256:{in_url} but the expected sha256 is {sha256}")]
    DigestMismatch {
        /// The `oci://` URL.
        url: String,
        /// The digest in the URL (hex).
        in_url: String,
        /// The `sha256` given.
        sha256: String,
    },
    /// The expected `sha256` is neither the pulled image's digest nor its module's.
    #[error(
        "pulling {url}: expected sha256 {expected}, but the image digest is {image} and the \
         module's sha256 is {module}"
    )]
    ImageChecksum {
        /// The `oci://` URL.
        url: String,
        /// The `sha256` given.
        expected: String,
        /// The image's manifest digest (hex).
        image: String,
        /// The module's SHA-256 (hex).
        module: String,
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

fn with_detail(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

/// Limits and trust for remote fetches.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Time allowed for each HTTP exchange: connecting, TLS, the answer and its whole body.
    pub timeout: Duration,
    /// The largest module, blob or image layer (compressed and uncompressed) accepted.
    pub max_size: u64,
    /// How many redirects one GET follows.
    pub max_redirects: usize,
    /// CA certificates trusted for `https` besides the public web PKI (a private registry's CA).
    pub extra_roots: Vec<CertificateDer<'static>>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            max_size: 256 << 20,
            max_redirects: 5,
            extra_roots: Vec::new(),
        }
    }
}

/// Istio's `imagePullPolicy`, for [`ModuleCache::get`].
///
/// Istio's `UNSPECIFIED_POLICY` is not a variant: it means `IfNotPresent`, except for an OCI
/// image with tag `latest` (explicit or implied), which means `Always`. The caller maps it, with
/// [`PullPolicy::unspecified`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Reuse the module cached for the same URL (and expected digest, when given) without
    /// contacting the server.
    #[default]
    IfNotPresent,
    /// Fetch again on every call.
    Always,
}

impl PullPolicy {
    /// What Istio's `UNSPECIFIED_POLICY` means for `url`: [`PullPolicy::Always`] for an OCI image
    /// referenced by the tag `latest` (explicit or implied), else [`PullPolicy::IfNotPresent`].
    pub fn unspecified(url: &str) -> PullPolicy {
        match Source::parse(url) {
            Ok(Source::Oci(oci)) if oci.digest.is_none() && oci.tag == "latest" => {
                PullPolicy::Always
            }
            _ => PullPolicy::IfNotPresent,
        }
    }
}

/// Fetches the module at `url` and checks it against `sha256` (lower-case hex) when given.
///
/// Uncached, with the default [`FetchOptions`]; see the module documentation for the URL forms.
pub async fn fetch(url: &str, sha256: Option<&str>) -> Result<Vec<u8>, FetchError> {
    fetch_with(url, sha256, &FetchOptions::default()).await
}

/// [`fetch`] with explicit limits and trust.
pub async fn fetch_with(
    url: &str,
    sha256: Option<&str>,
    options: &FetchOptions,
) -> Result<Vec<u8>, FetchError> {
    let source = Source::parse(url)?;
    Ok(source.fetch(sha256, options).await?.module)
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

/// Lower-case hex, without a `sha256:` prefix.
fn normalize_digest(digest: &str) -> String {
    let digest = digest.trim();
    digest
        .strip_prefix("sha256:")
        .unwrap_or(digest)
        .to_ascii_lowercase()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A module and the digests it may be asked for by.
#[derive(Debug)]
struct Fetched {
    module: Vec<u8>,
    /// The module's SHA-256, then any image manifest digests (lower-case hex).
    digests: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// URLs.

/// A parsed module URL.
#[derive(Debug)]
enum Source {
    File(String),
    Http(Uri),
    Oci(OciRef),
}

impl Source {
    fn parse(url: &str) -> Result<Source, FetchError> {
        let url = url.trim();
        match url.split_once("://") {
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "file" => Ok(Source::File(rest.to_owned())),
                "http" | "https" => parse_http(url).map(Source::Http),
                "oci" => OciRef::parse(url, rest).map(Source::Oci),
                _ => Err(FetchError::Unsupported(url.to_owned())),
            },
            // Istio: a URL without a scheme is an OCI image (`registry:5000/image:tag`).
            None if !url.is_empty() && !url.starts_with('/') => {
                OciRef::parse(url, url).map(Source::Oci)
            }
            None => Err(FetchError::Unsupported(url.to_owned())),
        }
    }

    /// A `sha256` given with a URL that pins a digest must be that digest.
    fn check_pin(&self, sha256: Option<&str>) -> Result<(), FetchError> {
        if let (Source::Oci(oci), Some(sha256)) = (self, sha256)
            && let Some(pinned) = &oci.digest
            && normalize_digest(sha256) != *pinned
        {
            return Err(FetchError::DigestMismatch {
                url: oci.url.clone(),
                in_url: pinned.clone(),
                sha256: sha256.to_owned(),
            });
        }
        Ok(())
    }

    /// The module this URL names, checked against `sha256` when given, with the digests it
    /// may be asked for by.
    async fn fetch(
        &self,
        sha256: Option<&str>,
        options: &FetchOptions,
    ) -> Result<Fetched, FetchError> {
        self.check_pin(sha256)?;
        let client = Client { options };
        match self {
            Source::File(path) => {
                let module = tokio::fs::read(path)
                    .await
                    .map_err(|source| FetchError::File {
                        path: path.clone(),
                        source,
                    })?;
                verify(&module, sha256)?;
                let digests = vec![sha256_hex(&module)];
                Ok(Fetched { module, digests })
            }
            Source::Http(uri) => {
                tracing::debug!(url = %uri, "fetching module");
                let reply = client
                    .get(uri.clone(), HeaderMap::new(), options.max_size)
                    .await?;
                if !reply.status.is_success() {
                    return Err(reply.http_error());
                }
                let module = reply.body;
                verify(&module, sha256)?;
                let digests = vec![sha256_hex(&module)];
                Ok(Fetched { module, digests })
            }
            Source::Oci(oci) => {
                tracing::debug!(url = %oci.url, image = %oci.name(), "pulling module image");
                let pulled = Registry::new(&client, oci).pull().await?;
                if let Some(expected) = sha256 {
                    let want = normalize_digest(expected);
                    if !pulled.digests.contains(&want) {
                        return Err(FetchError::ImageChecksum {
                            url: oci.url.clone(),
                            expected: expected.to_owned(),
                            image: pulled.digests.get(1).cloned().unwrap_or_default(),
                            module: pulled.digests.first().cloned().unwrap_or_default(),
                        });
                    }
                }
                Ok(pulled)
            }
        }
    }
}

fn invalid(url: &str, why: impl Into<String>) -> FetchError {
    FetchError::InvalidUrl {
        url: url.to_owned(),
        why: why.into(),
    }
}
