//! OCI images: references, the registry conversation (manifests, indexes, blobs, anonymous
//! token auth), layer selection and Docker-format tar extraction.

use std::collections::HashMap;
use std::io::Read;
use std::net::IpAddr;

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{StatusCode, Uri};
use serde::Deserialize;

use super::http::{Client, Reply, parse_http};
use super::{FetchError, Fetched, invalid, is_sha256_hex, sha256_hex, with_detail};

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
/// The file a Docker-compatible Wasm image carries its module in.
const COMPAT_FILE: &str = "plugin.wasm";

/// An OCI image reference.
#[derive(Debug)]
pub(super) struct OciRef {
    /// The URL as given, for errors.
    pub(super) url: String,
    /// `host[:port]` of the registry's API.
    registry: String,
    /// Plain HTTP (loopback registries).
    insecure: bool,
    /// The repository, e.g. `plugins/add-header`.
    repo: String,
    /// The tag (`latest` when none is given); unused when `digest` is set.
    pub(super) tag: String,
    /// The pinned manifest digest (hex), from `@sha256:…`.
    pub(super) digest: Option<String>,
}

impl OciRef {
    /// Parses `rest`, the reference after `oci://` (or the whole scheme-less URL).
    pub(super) fn parse(url: &str, rest: &str) -> Result<OciRef, FetchError> {
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

    pub(super) fn name(&self) -> String {
        match &self.digest {
            Some(d) => format!("{}/{}@sha256:{d}", self.registry, self.repo),
            None => format!("{}/{}:{}", self.registry, self.repo, self.tag),
        }
    }
}

/// Whether `host` (as in a URL, IPv6 in brackets) is this machine: plain HTTP is used for it.
fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
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
pub(super) struct Registry<'a> {
    client: &'a Client<'a>,
    oci: &'a OciRef,
    /// `Bearer <token>` once the registry asked for one.
    token: Option<HeaderValue>,
    /// Whether a token was already fetched (one try per pull).
    token_tried: bool,
}

impl<'a> Registry<'a> {
    pub(super) fn new(client: &'a Client<'a>, oci: &'a OciRef) -> Self {
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

    pub(super) async fn pull(mut self) -> Result<Fetched, FetchError> {
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
