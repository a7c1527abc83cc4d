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

use std::collections::HashMap;
use std::io::Read;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::host::hex;

/// Istio's Wasm image layer (`application/vnd.module.wasm.content.layer.v1+wasm`).
const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// What a manifest GET accepts: image manifests first, then indexes (resolved to one image).
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";
/// Registries refuse manifests over 4 MiB; so do we.
const MAX_MANIFEST: u64 = 4 << 20;
/// Token responses are small JSON objects.
const MAX_TOKEN: u64 = 1 << 20;
/// How much of a non-2xx answer is kept, to explain it.
const MAX_ERROR_BODY: u64 = 16 << 10;
/// The file a Docker-compatible Wasm image carries its module in.
const COMPAT_FILE: &str = "plugin.wasm";
const USER_AGENT: &str = concat!("mesh-plugins/", env!("CARGO_PKG_VERSION"));

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
    Ok(Client { options }.fetch(&source, sha256).await?.module)
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
        let fetched = Client {
            options: &self.options,
        }
        .fetch(&source, sha256)
        .await?;
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
}

fn invalid(url: &str, why: impl Into<String>) -> FetchError {
    FetchError::InvalidUrl {
        url: url.to_owned(),
        why: why.into(),
    }
}

/// An absolute `http` or `https` URL with a host and no credentials.
fn parse_http(url: &str) -> Result<Uri, FetchError> {
    let uri: Uri = url.parse().map_err(|e| invalid(url, format!("{e}")))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(invalid(url, "only http and https are fetched")),
    }
    let Some(authority) = uri.authority() else {
        return Err(invalid(url, "no host"));
    };
    if authority.as_str().contains('@') {
        return Err(invalid(url, "credentials in URLs are not supported"));
    }
    if authority.host().is_empty() {
        return Err(invalid(url, "no host"));
    }
    Ok(uri)
}

/// Where a redirect's `Location` points, relative to the URL that answered.
fn resolve(base: &Uri, location: &str) -> Result<Uri, FetchError> {
    let location = location.trim();
    let scheme = base.scheme_str().unwrap_or("http");
    let authority = base.authority().map_or("", |a| a.as_str());
    let absolute = match location.split_once("://") {
        Some((s, _))
            if !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')) =>
        {
            location.to_owned()
        }
        _ if location.starts_with("//") => format!("{scheme}:{location}"),
        _ if location.starts_with('/') => format!("{scheme}://{authority}{location}"),
        _ => {
            let path = base.path();
            let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
            let dir = if dir.is_empty() { "/" } else { dir };
            format!("{scheme}://{authority}{dir}{location}")
        }
    };
    parse_http(&absolute)
}

/// Scheme, host and port: the origin credentials are scoped to.
fn origin(uri: &Uri) -> (Option<&str>, Option<&str>, Option<u16>) {
    (uri.scheme_str(), uri.host(), uri.port_u16())
}

/// Whether `host` (as in a URL, IPv6 in brackets) is this machine: plain HTTP is used for it.
fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An OCI image reference.
#[derive(Debug)]
struct OciRef {
    /// The URL as given, for errors.
    url: String,
    /// `host[:port]` of the registry's API.
    registry: String,
    /// Plain HTTP (loopback registries).
    insecure: bool,
    /// The repository, e.g. `plugins/add-header`.
    repo: String,
    /// The tag (`latest` when none is given); unused when `digest` is set.
    tag: String,
    /// The pinned manifest digest (hex), from `@sha256:…`.
    digest: Option<String>,
}

impl OciRef {
    /// Parses `rest`, the reference after `oci://` (or the whole scheme-less URL).
    fn parse(url: &str, rest: &str) -> Result<OciRef, FetchError> {
        if rest.contains(['?', '#']) || rest.chars().any(char::is_whitespace) {
            return Err(invalid(
                url,
                "an image reference has no query, fragment or spaces",
            ));
        }
        let (name, digest) = match rest.split_once('@') {
            Some((name, digest)) => {
                let Some(hex) = digest.strip_prefix("sha256:") else {
                    return Err(invalid(url, "only sha256 digests are supported"));
                };
                if !is_sha256_hex(hex) {
                    return Err(invalid(
                        url,
                        "a digest is sha256: and 64 lower-case hex digits",
                    ));
                }
                (name, Some(hex.to_owned()))
            }
            None => (rest, None),
        };
        // A tag follows the last ':' after the last '/'.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], &name[last_slash + i + 1..]),
            None => (name, "latest"),
        };
        if !valid_tag(tag) {
            return Err(invalid(url, format!("invalid tag {tag:?}")));
        }
        // Docker's rule: the first segment is a registry when it has a '.' or ':' or is
        // `localhost`; otherwise the image is on Docker Hub.
        let (mut registry, mut repo) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_owned(), path.to_owned())
            }
            _ => ("docker.io".to_owned(), name.to_owned()),
        };
        if matches!(registry.as_str(), "docker.io" | "index.docker.io") {
            registry = "registry-1.docker.io".to_owned();
            if !repo.contains('/') {
                repo = format!("library/{repo}");
            }
        }
        let authority: hyper::http::uri::Authority = registry
            .parse()
            .map_err(|e| invalid(url, format!("registry {registry:?}: {e}")))?;
        if registry.contains('@') || authority.host().is_empty() {
            return Err(invalid(url, format!("invalid registry {registry:?}")));
        }
        if !valid_repo(&repo) {
            return Err(invalid(
                url,
                format!(
                    "invalid repository {repo:?}: lower-case letters, digits and separators \
                     ('.', '_', '-', '/')"
                ),
            ));
        }
        Ok(OciRef {
            url: url.to_owned(),
            insecure: is_loopback(authority.host()),
            registry,
            repo,
            tag: tag.to_owned(),
            digest,
        })
    }

    /// The manifest reference: the pinned digest, else the tag.
    fn reference(&self) -> String {
        match &self.digest {
            Some(d) => format!("sha256:{d}"),
            None => self.tag.clone(),
        }
    }

    fn name(&self) -> String {
        match &self.digest {
            Some(d) => format!("{}/{}@sha256:{d}", self.registry, self.repo),
            None => format!("{}/{}:{}", self.registry, self.repo, self.tag),
        }
    }
}

fn valid_tag(tag: &str) -> bool {
    let mut bytes = tag.bytes();
    tag.len() <= 128
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn valid_repo(repo: &str) -> bool {
    !repo.is_empty()
        && repo.len() <= 255
        && repo.split('/').all(|part| {
            part.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                && part.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
                })
        })
}

// ---------------------------------------------------------------------------------------------
// HTTP.

/// A module and the digests it may be asked for by.
#[derive(Debug)]
struct Fetched {
    module: Vec<u8>,
    /// The module's SHA-256, then any image manifest digests (lower-case hex).
    digests: Vec<String>,
}

/// An HTTP answer, its body read.
#[derive(Debug)]
struct Reply {
    /// The URL that answered.
    url: Uri,
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    /// The body, shortened to explain an error: a registry's error code and message when it
    /// sent the standard JSON, else the start of the text.
    fn detail(&self) -> String {
        #[derive(Deserialize)]
        struct Errors {
            errors: Vec<RegistryError>,
        }
        #[derive(Deserialize)]
        struct RegistryError {
            #[serde(default)]
            code: String,
            #[serde(default)]
            message: String,
        }
        if let Ok(e) = serde_json::from_slice::<Errors>(&self.body)
            && !e.errors.is_empty()
        {
            return e
                .errors
                .iter()
                .map(|e| format!("{} {}", e.code, e.message).trim().to_owned())
                .collect::<Vec<_>>()
                .join("; ");
        }
        let text = String::from_utf8_lossy(&self.body);
        let text: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(200)
            .collect();
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }

    fn http_error(&self) -> FetchError {
        FetchError::Http {
            url: self.url.to_string(),
            status: self.status.as_u16(),
            detail: self.detail(),
        }
    }
}

/// Aborts the connection task when the exchange ends, however it ends.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type TlsResult = Result<Arc<ClientConfig>, String>;

/// The TLS client configuration: Mozilla's roots plus `extra`.
fn tls_config(extra: &[CertificateDer<'static>]) -> TlsResult {
    fn build(extra: &[CertificateDer<'static>]) -> TlsResult {
        let mut roots = RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        for cert in extra {
            roots
                .add(cert.clone())
                .map_err(|e| format!("extra root certificate: {e}"))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
    static DEFAULT: OnceLock<TlsResult> = OnceLock::new();
    if extra.is_empty() {
        DEFAULT.get_or_init(|| build(&[])).clone()
    } else {
        build(extra)
    }
}

/// One fetch's HTTP client: a connection per exchange (fetches are rare).
#[derive(Debug)]
struct Client<'o> {
    options: &'o FetchOptions,
}

impl Client<'_> {
    async fn fetch(&self, source: &Source, sha256: Option<&str>) -> Result<Fetched, FetchError> {
        source.check_pin(sha256)?;
        match source {
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
                let reply = self
                    .get(uri.clone(), HeaderMap::new(), self.options.max_size)
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
                let pulled = Registry::new(self, oci).pull().await?;
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

    /// A GET, following redirects; the final answer whatever its status. A 2xx body longer
    /// than `limit` is an error; other bodies are cut to a few KiB.
    async fn get(&self, uri: Uri, mut headers: HeaderMap, limit: u64) -> Result<Reply, FetchError> {
        let first = uri.to_string();
        let mut uri = uri;
        for _ in 0..=self.options.max_redirects {
            let reply = self.exchange(&uri, &headers, limit).await?;
            let redirect = matches!(reply.status.as_u16(), 301 | 302 | 303 | 307 | 308);
            let location = reply
                .headers
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok());
            let (true, Some(location)) = (redirect, location) else {
                return Ok(reply);
            };
            let next = resolve(&uri, location)?;
            tracing::debug!(from = %uri, to = %next, "following redirect");
            if origin(&next) != origin(&uri) {
                // Blob downloads are redirected to storage that must not see the token.
                headers.remove(header::AUTHORIZATION);
            }
            uri = next;
        }
        Err(FetchError::TooManyRedirects {
            url: first,
            max: self.options.max_redirects,
        })
    }

    /// One request and its answer, within the time limit.
    async fn exchange(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        limit: u64,
    ) -> Result<Reply, FetchError> {
        let after = self.options.timeout;
        match tokio::time::timeout(after, self.exchange_untimed(uri, headers, limit)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout {
                url: uri.to_string(),
                after,
            }),
        }
    }

    async fn exchange_untimed(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        limit: u64,
    ) -> Result<Reply, FetchError> {
        let url = uri.to_string();
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(FetchError::Unsupported(url)),
        };
        let Some(authority) = uri.authority() else {
            return Err(invalid(&url, "no host"));
        };
        let host = authority.host();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });

        let mut request = Request::builder()
            .method(Method::GET)
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, authority.as_str())
            .header(header::USER_AGENT, USER_AGENT)
            .body(Empty::<Bytes>::new())
            .map_err(|e| invalid(&url, e.to_string()))?;
        for (name, value) in headers {
            request.headers_mut().append(name, value.clone());
        }

        let tcp = TcpStream::connect((bare, port))
            .await
            .map_err(|source| FetchError::Connect {
                url: url.clone(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        if https {
            let config = tls_config(&self.options.extra_roots).map_err(|why| FetchError::Tls {
                url: url.clone(),
                source: std::io::Error::other(why),
            })?;
            let name = ServerName::try_from(bare.to_owned())
                .map_err(|e| invalid(&url, format!("TLS server name {bare:?}: {e}")))?;
            let tls = TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|source| FetchError::Tls {
                    url: url.clone(),
                    source,
                })?;
            send(tls, request, uri, limit).await
        } else {
            send(tcp, request, uri, limit).await
        }
    }
}

/// Sends `request` over `io` (HTTP/1.1) and reads the answer.
async fn send<T>(
    io: T,
    request: Request<Empty<Bytes>>,
    uri: &Uri,
    limit: u64,
) -> Result<Reply, FetchError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let transport = |e: hyper::Error| FetchError::Transport {
        url: uri.to_string(),
        source: Box::new(e),
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(transport)?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let response = sender.send_request(request).await.map_err(transport)?;
    let (parts, mut body) = response.into_parts();
    let success = parts.status.is_success();
    let limit = if success { limit } else { MAX_ERROR_BODY };
    let too_large = || FetchError::TooLarge {
        url: uri.to_string(),
        limit,
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if success && declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let capacity = declared.unwrap_or(0).min(limit).min(16 << 20);
    let mut buf = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(transport)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let room = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .saturating_sub(buf.len());
        if data.len() > room {
            if success {
                return Err(too_large());
            }
            buf.extend_from_slice(&data[..room]);
            break;
        }
        buf.extend_from_slice(&data);
    }
    Ok(Reply {
        url: uri.clone(),
        status: parts.status,
        headers: parts.headers,
        body: buf,
    })
}

// ---------------------------------------------------------------------------------------------
// OCI distribution.

/// An image manifest or index (only the fields we use).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
}

/// One pull's conversation with a registry.
#[derive(Debug)]
struct Registry<'a> {
    client: &'a Client<'a>,
    oci: &'a OciRef,
    /// `Bearer <token>` once the registry asked for one.
    token: Option<HeaderValue>,
    /// Whether a token was already fetched (one try per pull).
    token_tried: bool,
}

impl<'a> Registry<'a> {
    fn new(client: &'a Client<'a>, oci: &'a OciRef) -> Self {
        Self {
            client,
            oci,
            token: None,
            token_tried: false,
        }
    }

    fn error(&self, why: impl Into<String>) -> FetchError {
        FetchError::Registry {
            url: self.oci.url.clone(),
            why: why.into(),
        }
    }

    async fn pull(mut self) -> Result<Fetched, FetchError> {
        let reference = self.oci.reference();
        let (bytes, content_type) = self.manifest(&reference).await?;
        let top = sha256_hex(&bytes);
        if let Some(pinned) = &self.oci.digest
            && top != *pinned
        {
            return Err(self.error(format!(
                "the manifest for sha256:{pinned} hashes to sha256:{top}"
            )));
        }
        let mut digests = vec![top];
        let mut manifest = self.parse_manifest(&bytes)?;
        let is_index = |m: &Manifest, content_type: &str| {
            [content_type, m.media_type.as_deref().unwrap_or("")]
                .iter()
                .any(|t| t.starts_with(OCI_INDEX) || t.starts_with(DOCKER_LIST))
                || (!m.manifests.is_empty() && m.layers.is_empty())
        };
        if is_index(&manifest, &content_type) {
            let Some(entry) = pick_manifest(&manifest.manifests) else {
                return Err(self.error("the image index lists no manifest"));
            };
            let want = self.digest_hex(&entry.digest)?;
            let (bytes, content_type) = self.manifest(&entry.digest).await?;
            let actual = sha256_hex(&bytes);
            if actual != want {
                return Err(self.error(format!(
                    "the manifest for {} hashes to sha256:{actual}",
                    entry.digest
                )));
            }
            digests.push(actual);
            manifest = self.parse_manifest(&bytes)?;
            if is_index(&manifest, &content_type) {
                return Err(self.error("nested image indexes are not supported"));
            }
        }
        let module = self.module(&manifest).await?;
        digests.insert(0, sha256_hex(&module));
        Ok(Fetched { module, digests })
    }

    fn parse_manifest(&self, bytes: &[u8]) -> Result<Manifest, FetchError> {
        serde_json::from_slice(bytes).map_err(|e| self.error(format!("malformed manifest: {e}")))
    }

    /// The module: the Wasm layer, else `plugin.wasm` from the topmost tar layer holding one.
    async fn module(&mut self, manifest: &Manifest) -> Result<Vec<u8>, FetchError> {
        if let Some(layer) = manifest.layers.iter().find(|l| l.media_type == WASM_LAYER) {
            return self.blob(layer).await;
        }
        let tars: Vec<&Descriptor> = manifest
            .layers
            .iter()
            .rev()
            .filter(|l| is_tar_layer(&l.media_type))
            .collect();
        if tars.is_empty() {
            let types: Vec<&str> = manifest
                .layers
                .iter()
                .map(|l| l.media_type.as_str())
                .collect();
            return Err(self.error(format!(
                "no Wasm layer: expected a layer of media type {WASM_LAYER} or a tar layer \
                 holding {COMPAT_FILE}; the image has layers {types:?}"
            )));
        }
        let limit = self.client.options.max_size;
        for layer in tars {
            let blob = self.blob(layer).await?;
            let found = tokio::task::spawn_blocking(move || extract_compat(&blob, limit))
                .await
                .map_err(|e| self.error(format!("reading a layer: {e}")))?
                .map_err(|e| self.error(format!("reading layer {}: {e}", layer.digest)))?;
            if let Some(module) = found {
                return Ok(module);
            }
        }
        Err(self.error(format!("no layer of the image holds {COMPAT_FILE}")))
    }

    /// `sha256:<hex>` → hex, for the digests a registry hands out.
    fn digest_hex(&self, digest: &str) -> Result<String, FetchError> {
        match digest.strip_prefix("sha256:") {
            Some(hex) if is_sha256_hex(hex) => Ok(hex.to_owned()),
            _ => Err(self.error(format!("unsupported digest {digest:?}"))),
        }
    }

    /// A manifest and its content type.
    async fn manifest(&mut self, reference: &str) -> Result<(Vec<u8>, String), FetchError> {
        let reply = self
            .get(
                &format!("manifests/{reference}"),
                Some(MANIFEST_ACCEPT),
                MAX_MANIFEST,
            )
            .await?;
        if !reply.status.is_success() {
            let what = if reference.starts_with("sha256:") {
                format!("manifest {reference}")
            } else {
                format!("tag {reference}")
            };
            return Err(self.refused(&reply, &what));
        }
        let content_type = reply
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        Ok((reply.body, content_type))
    }

    /// A blob, checked against its digest.
    async fn blob(&mut self, layer: &Descriptor) -> Result<Vec<u8>, FetchError> {
        let want = self.digest_hex(&layer.digest)?;
        let limit = self.client.options.max_size;
        if layer.size.is_some_and(|size| size > limit) {
            return Err(FetchError::TooLarge {
                url: self.oci.url.clone(),
                limit,
            });
        }
        let reply = self
            .get(&format!("blobs/{}", layer.digest), None, limit)
            .await?;
        if !reply.status.is_success() {
            return Err(self.refused(&reply, &format!("blob {}", layer.digest)));
        }
        let actual = sha256_hex(&reply.body);
        if actual != want {
            return Err(self.error(format!("blob {} hashes to sha256:{actual}", layer.digest)));
        }
        Ok(reply.body)
    }

    /// The error for a non-2xx answer about `what`.
    fn refused(&self, reply: &Reply, what: &str) -> FetchError {
        let status = reply.status;
        let detail = with_detail(&reply.detail());
        match status {
            StatusCode::NOT_FOUND => self.error(format!(
                "{} has no {what} in repository {} (HTTP 404{detail})",
                self.oci.registry, self.oci.repo
            )),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => self.error(format!(
                "{} refused access to {what} of {} (HTTP {}{detail}); only anonymous pulls \
                 are supported",
                self.oci.registry,
                self.oci.repo,
                status.as_u16()
            )),
            _ => reply.http_error(),
        }
    }

    /// A GET of `/v2/<repo>/<path>`, getting a bearer token once if the registry asks.
    async fn get(
        &mut self,
        path: &str,
        accept: Option<&'static str>,
        limit: u64,
    ) -> Result<Reply, FetchError> {
        let scheme = if self.oci.insecure { "http" } else { "https" };
        let url = format!(
            "{scheme}://{}/v2/{}/{path}",
            self.oci.registry, self.oci.repo
        );
        let uri: Uri = url.parse().map_err(|e| invalid(&url, format!("{e}")))?;
        loop {
            let mut headers = HeaderMap::new();
            if let Some(accept) = accept {
                headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
            }
            if let Some(token) = &self.token {
                headers.insert(header::AUTHORIZATION, token.clone());
            }
            let reply = self.client.get(uri.clone(), headers, limit).await?;
            if reply.status != StatusCode::UNAUTHORIZED || self.token_tried {
                return Ok(reply);
            }
            let challenge = reply
                .headers
                .get_all(header::WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(parse_bearer);
            let Some(challenge) = challenge else {
                return Ok(reply);
            };
            self.token_tried = true;
            self.token = Some(self.fetch_token(&challenge).await?);
        }
    }

    /// An anonymous token from the challenge's realm.
    async fn fetch_token(
        &self,
        challenge: &HashMap<String, String>,
    ) -> Result<HeaderValue, FetchError> {
        let Some(realm) = challenge.get("realm").filter(|r| !r.is_empty()) else {
            return Err(self.error("the registry asked for a bearer token without a realm"));
        };
        let default_scope = format!("repository:{}:pull", self.oci.repo);
        let scope = challenge.get("scope").unwrap_or(&default_scope);
        let mut query = String::new();
        if let Some(service) = challenge.get("service") {
            query.push_str("service=");
            query.push_str(&percent_encode(service));
            query.push('&');
        }
        query.push_str("scope=");
        query.push_str(&percent_encode(scope));
        let sep = if realm.contains('?') { '&' } else { '?' };
        let uri = parse_http(&format!("{realm}{sep}{query}"))?;
        tracing::debug!(realm = %realm, "getting a registry token");
        let reply = self.client.get(uri, HeaderMap::new(), MAX_TOKEN).await?;
        if !reply.status.is_success() {
            return Err(self.error(format!(
                "the token service {realm} answered HTTP {}{}",
                reply.status.as_u16(),
                with_detail(&reply.detail())
            )));
        }
        #[derive(Deserialize)]
        struct Token {
            #[serde(default)]
            token: Option<String>,
            #[serde(default)]
            access_token: Option<String>,
        }
        let token: Token = serde_json::from_slice(&reply.body)
            .map_err(|e| self.error(format!("malformed answer from {realm}: {e}")))?;
        let Some(token) = token.token.or(token.access_token).filter(|t| !t.is_empty()) else {
            return Err(self.error(format!("{realm} returned no token")));
        };
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            self.error(format!(
                "{realm} returned a token that is not a header value"
            ))
        })
    }
}

/// The index entry to pull: a Wasm platform, else linux/amd64, else the first.
fn pick_manifest(list: &[Descriptor]) -> Option<&Descriptor> {
    let platform = |d: &&Descriptor, os: &[&str], arch: &[&str]| {
        d.platform.as_ref().is_some_and(|p| {
            (os.is_empty() || os.contains(&p.os.as_str()))
                && (arch.is_empty() || arch.contains(&p.architecture.as_str()))
        })
    };
    list.iter()
        .find(|d| platform(d, &["wasi", "wasip1", "wasip2"], &[]) || platform(d, &[], &["wasm"]))
        .or_else(|| list.iter().find(|d| platform(d, &["linux"], &["amd64"])))
        .or_else(|| list.first())
}

fn is_tar_layer(media_type: &str) -> bool {
    (media_type.starts_with("application/vnd.oci.image.layer.v1.tar")
        || media_type.starts_with("application/vnd.docker.image.rootfs.diff.tar"))
        && !media_type.ends_with("zstd")
}

/// `plugin.wasm` from a tar layer (gzipped or not), reading at most `limit` uncompressed bytes.
fn extract_compat(layer: &[u8], limit: u64) -> std::io::Result<Option<Vec<u8>>> {
    let reader: Box<dyn Read + '_> = if layer.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(layer))
    } else {
        Box::new(layer)
    };
    let mut archive = tar::Archive::new(Capped {
        inner: reader,
        left: limit,
    });
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path()?;
        let mut parts = path.components().filter(|c| {
            !matches!(
                c,
                std::path::Component::CurDir | std::path::Component::RootDir
            )
        });
        let is_module =
            parts.next().is_some_and(|c| c.as_os_str() == COMPAT_FILE) && parts.next().is_none();
        if is_module {
            let size = usize::try_from(entry.size().min(limit)).unwrap_or(0);
            let mut module = Vec::with_capacity(size);
            entry.read_to_end(&mut module)?;
            return Ok(Some(module));
        }
    }
    Ok(None)
}

/// A reader that fails once more than `left` bytes were read.
struct Capped<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.left = self.left.checked_sub(n as u64).ok_or_else(|| {
            std::io::Error::other("the layer is larger than the size limit once decompressed")
        })?;
        Ok(n)
    }
}

/// Parameters of a `Bearer` challenge (keys lower-cased), or `None` for another scheme.
fn parse_bearer(value: &str) -> Option<HashMap<String, String>> {
    let value = value.trim();
    let (scheme, rest) = value.split_once(char::is_whitespace)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace() || *c == ',').is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && *c != ',') {
            key.push(c);
        }
        if key.trim().is_empty() {
            break;
        }
        let mut val = String::new();
        if chars.next_if_eq(&'=').is_some() {
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            if chars.next_if_eq(&'"').is_some() {
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => val.extend(chars.next()),
                        c => val.push(c),
                    }
                }
            }
            while let Some(c) = chars.next_if(|c| *c != ',') {
                val.push(c);
            }
        }
        params.insert(key.trim().to_ascii_lowercase(), val.trim().to_owned());
    }
    Some(params)
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    use std::fmt::Write;
    s.bytes()
        .fold(String::with_capacity(s.len()), |mut out, b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
            out
        })
}
