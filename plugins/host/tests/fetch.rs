//! Fetching modules over real loopback sockets: an in-test HTTP server (redirects, errors,
//! limits, TLS, and a mock registry with token authentication and redirected blobs), and a real
//! registry, Debian's `docker-registry` (the CNCF distribution registry), for `oci://` pulls.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use plugins::{FetchError, FetchOptions, ModuleCache, PullPolicy, fetch, fetch_with};
use rustls::pki_types::PrivateKeyDer;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

#[path = "support/registry.rs"]
mod registry;
use registry::{
    OCI_CONFIG, OCI_MANIFEST, RealRegistry, WASM_LAYER, digest, manifest, push_blob, push_manifest,
    sha256_hex,
};

/// Any bytes do: the fetcher does not parse Wasm.
const MODULE: &[u8] = b"\0asm\x01\0\0\0 pretend add-header module";
const OTHER_MODULE: &[u8] = b"\0asm\x01\0\0\0 pretend module from a Docker-format image";

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_TAR_GZ: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

fn temp_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "plugins-fetch-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("creating a temporary directory");
    dir
}

/// A gzipped tar of `files`.
fn tar_gz(files: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        tar.append_data(&mut header, path, *data)
            .expect("adding to the tar");
    }
    tar.into_inner()
        .expect("finishing the tar")
        .finish()
        .expect("finishing the gzip stream")
}

// ---------------------------------------------------------------------------------------------
// An in-test HTTP server.

/// A request as routes see it.
#[derive(Debug)]
struct Seen {
    /// Path and query.
    path: String,
    /// The `Host` header.
    host: String,
    authorization: Option<String>,
}

/// What a route answers.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    delay: Option<Duration>,
}

impl Answer {
    fn ok(body: &[u8]) -> Self {
        Self::status(200).body(body)
    }

    fn status(status: u16) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            delay: None,
        }
    }

    fn body(mut self, body: &[u8]) -> Self {
        self.body = body.to_vec();
        self
    }

    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

type Route = Arc<dyn Fn(&Seen) -> Answer + Send + Sync>;

/// An HTTP/1.1 server on 127.0.0.1 that logs the paths it is asked for.
struct Server {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(route: Route) -> Server {
        Self::start_with(route, None).await
    }

    async fn start_with(route: Route, tls: Option<TlsAcceptor>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("local address");
        let log = Arc::new(Mutex::new(Vec::new()));
        let task_log = log.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let route = route.clone();
                let log = task_log.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let route = route.clone();
                        let log = log.clone();
                        async move { Ok::<_, Infallible>(answer(&route, &log, &req).await) }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = builder
                                    .serve_connection(TokioIo::new(stream), service)
                                    .await;
                            }
                        }
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                    }
                });
            }
        });
        Server { addr, log, task }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// How many requests asked for exactly `path` (with its query).
    fn hits(&self, path: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == path)
            .count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    route: &Route,
    log: &Mutex<Vec<String>>,
    req: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let seen = Seen {
        path: req
            .uri()
            .path_and_query()
            .map_or_else(String::new, |p| p.to_string()),
        host: header("host").unwrap_or_default(),
        authorization: header("authorization"),
    };
    log.lock().unwrap().push(seen.path.clone());
    let answer = route(&seen);
    if let Some(delay) = answer.delay {
        tokio::time::sleep(delay).await;
    }
    let mut response = Response::builder().status(answer.status);
    for (name, value) in &answer.headers {
        response = response.header(name, value);
    }
    response
        .body(Full::new(Bytes::from(answer.body)))
        .expect("a valid response")
}

// ---------------------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------------------
// http:// and https://

fn web_routes() -> Route {
    Arc::new(|req: &Seen| match req.path.as_str() {
        "/module.wasm" | "/dir/module.wasm" => Answer::ok(MODULE),
        "/redirect" => Answer::status(302).header("location", "/module.wasm"),
        "/redirect-absolute" => {
            Answer::status(301).header("location", &format!("http://{}/redirect", req.host))
        }
        "/dir/start" => Answer::status(307).header("location", "module.wasm"),
        "/loop" => Answer::status(302).header("location", "/loop"),
        "/big" => Answer::ok(&[7; 4096]),
        "/slow" => Answer::ok(MODULE).delay(Duration::from_secs(30)),
        _ => Answer::status(404).body(b"no such module here"),
    })
}

#[tokio::test]
async fn http_fetch_follows_redirects_and_reports_errors() {
    let server = Server::start(web_routes()).await;

    let module = fetch(&server.url("/module.wasm"), Some(&sha256_hex(MODULE)))
        .await
        .expect("fetching a module");
    assert_eq!(module, MODULE);

    let wrong = "0".repeat(64);
    match fetch(&server.url("/module.wasm"), Some(&wrong)).await {
        Err(FetchError::Checksum { expected, actual }) => {
            assert_eq!(expected, wrong);
            assert_eq!(actual, sha256_hex(MODULE));
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }

    for path in ["/redirect", "/redirect-absolute", "/dir/start"] {
        let module = fetch(&server.url(path), None)
            .await
            .unwrap_or_else(|e| panic!("fetching {path}: {e}"));
        assert_eq!(module, MODULE, "{path}");
    }
    assert_eq!(
        server.hits("/redirect"),
        2,
        "the absolute redirect leads there"
    );
    assert_eq!(server.hits("/dir/module.wasm"), 1, "relative Location");

    match fetch(&server.url("/loop"), None).await {
        Err(FetchError::TooManyRedirects { max, .. }) => assert_eq!(max, 5),
        other => panic!("expected too many redirects, got {other:?}"),
    }
    assert_eq!(
        server.hits("/loop"),
        6,
        "the first request and five redirects"
    );

    let missing = server.url("/missing.wasm");
    let err = fetch(&missing, None).await.expect_err("a 404");
    match &err {
        FetchError::Http {
            url,
            status,
            detail,
        } => {
            assert_eq!(url, &missing);
            assert_eq!(*status, 404);
            assert_eq!(detail, "no such module here");
        }
        other => panic!("expected an HTTP error, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains(&missing) && message.contains("404"),
        "{message}"
    );

    let small = FetchOptions {
        max_size: 1024,
        ..FetchOptions::default()
    };
    match fetch_with(&server.url("/big"), None, &small).await {
        Err(FetchError::TooLarge { limit, .. }) => assert_eq!(limit, 1024),
        other => panic!("expected too large, got {other:?}"),
    }
    assert_eq!(
        fetch_with(&server.url("/module.wasm"), None, &small)
            .await
            .expect("a small module fits"),
        MODULE
    );

    let impatient = FetchOptions {
        timeout: Duration::from_millis(200),
        ..FetchOptions::default()
    };
    let started = Instant::now();
    match fetch_with(&server.url("/slow"), None, &impatient).await {
        Err(FetchError::Timeout { after, .. }) => assert_eq!(after, Duration::from_millis(200)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));

    // Nothing listens on a port just released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    match fetch(&format!("http://{closed}/module.wasm"), None).await {
        Err(FetchError::Connect { url, .. }) => assert!(url.contains(&closed.to_string())),
        other => panic!("expected a connection error, got {other:?}"),
    }
}

#[tokio::test]
async fn cache_honours_the_pull_policy() {
    let server = Server::start(web_routes()).await;
    let url = server.url("/module.wasm");
    let cache = ModuleCache::new();

    let first = cache
        .get(&url, None, PullPolicy::IfNotPresent)
        .await
        .expect("first fetch");
    assert_eq!(&*first, MODULE);
    let again = cache
        .get(&url, Some(&sha256_hex(MODULE)), PullPolicy::IfNotPresent)
        .await
        .expect("cached");
    assert_eq!(&*again, MODULE);
    assert_eq!(
        server.hits("/module.wasm"),
        1,
        "IfNotPresent reuses the module"
    );
    assert_eq!(cache.len(), 1);

    for expected_hits in [2, 3] {
        let module = cache
            .get(&url, None, PullPolicy::Always)
            .await
            .expect("refetch");
        assert_eq!(&*module, MODULE);
        assert_eq!(
            server.hits("/module.wasm"),
            expected_hits,
            "Always refetches"
        );
    }

    // A different expected digest is not satisfied by the cached module: fetch, and fail.
    let wrong = "1".repeat(64);
    assert!(matches!(
        cache
            .get(&url, Some(&wrong), PullPolicy::IfNotPresent)
            .await,
        Err(FetchError::Checksum { .. })
    ));
    assert_eq!(server.hits("/module.wasm"), 4);
    // The failure left the cached module in place.
    cache
        .get(&url, None, PullPolicy::IfNotPresent)
        .await
        .expect("still cached");
    assert_eq!(server.hits("/module.wasm"), 4);

    cache.retain(|u| u != url);
    assert!(cache.is_empty());
    cache
        .get(&url, None, PullPolicy::IfNotPresent)
        .await
        .expect("fetched again");
    assert_eq!(server.hits("/module.wasm"), 5);

    // file:// is read every time, whatever the policy.
    let dir = temp_dir("file");
    let path = dir.join("plugin.wasm");
    std::fs::write(&path, b"one").expect("writing");
    let file_url = format!("file://{}", path.display());
    let one = cache
        .get(&file_url, None, PullPolicy::IfNotPresent)
        .await
        .expect("reading");
    std::fs::write(&path, b"two").expect("writing");
    let two = cache
        .get(
            &file_url,
            Some(&sha256_hex(b"two")),
            PullPolicy::IfNotPresent,
        )
        .await
        .expect("reading again");
    assert_eq!((&*one, &*two), (&b"one"[..], &b"two"[..]));
    assert_eq!(cache.len(), 1, "file URLs are not cached");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn https_trusts_extra_roots_and_checks_the_name() {
    let key =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("a certificate");
    let cert = key.cert.der().clone();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.clone()],
            PrivateKeyDer::Pkcs8(key.signing_key.serialize_der().into()),
        )
        .expect("a server configuration");
    let server = Server::start_with(web_routes(), Some(TlsAcceptor::from(Arc::new(config)))).await;
    let port = server.addr.port();
    let trusting = FetchOptions {
        extra_roots: vec![cert],
        ..FetchOptions::default()
    };

    let url = format!("https://localhost:{port}/redirect");
    let module = fetch_with(&url, Some(&sha256_hex(MODULE)), &trusting)
        .await
        .expect("fetching over TLS");
    assert_eq!(module, MODULE);

    // Without the root, the public PKI does not vouch for the server.
    match fetch(&url, None).await {
        Err(FetchError::Tls { url: u, source }) => {
            assert_eq!(u, url);
            assert!(source.to_string().contains("certificate"), "{source}");
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    // The certificate names localhost, not 127.0.0.1.
    let by_ip = format!("https://127.0.0.1:{port}/module.wasm");
    assert!(matches!(
        fetch_with(&by_ip, None, &trusting).await,
        Err(FetchError::Tls { .. })
    ));
}

#[tokio::test]
async fn malformed_urls_are_errors() {
    for url in [
        "ftp://example.com/plugin.wasm",
        "/plugin.wasm",
        "",
        "http://",
        "https://user:secret@example.com/plugin.wasm",
        "oci://",
        "oci://127.0.0.1:9/Plugins/Upper:v1",
        "oci://127.0.0.1:9/plugins/a@sha256:1234",
        "oci://127.0.0.1:9/plugins/a@md5:0123456789abcdef0123456789abcdef",
        "oci://127.0.0.1:9/plugins/a:bad tag",
        "oci://127.0.0.1:9/plugins/a:-tag",
        "oci://127.0.0.1:9/plugins//a:v1",
        "oci://127.0.0.1:9/plugins/a:v1?x=y",
    ] {
        match fetch(url, None).await {
            Err(FetchError::Unsupported(_) | FetchError::InvalidUrl { .. }) => {}
            other => panic!("{url:?}: expected an invalid-URL error, got {other:?}"),
        }
    }
    // A pinned digest and a different sha256 disagree before any network access.
    let pinned = format!("oci://127.0.0.1:9/plugins/a@sha256:{}", "a".repeat(64));
    assert!(matches!(
        fetch(&pinned, Some(&"b".repeat(64))).await,
        Err(FetchError::DigestMismatch { .. })
    ));

    for (url, policy) in [
        ("oci://registry.example/plugins/a", PullPolicy::Always),
        (
            "oci://registry.example/plugins/a:latest",
            PullPolicy::Always,
        ),
        ("registry.example:5000/plugins/a", PullPolicy::Always),
        (
            "oci://registry.example/plugins/a:v1",
            PullPolicy::IfNotPresent,
        ),
        (pinned.as_str(), PullPolicy::IfNotPresent),
        ("https://example.com/latest", PullPolicy::IfNotPresent),
        ("file:///latest", PullPolicy::IfNotPresent),
    ] {
        assert_eq!(PullPolicy::unspecified(url), policy, "{url}");
    }
}

// ---------------------------------------------------------------------------------------------
// oci:// against a mock registry: token authentication, redirected blobs, Docker-format images,
// indexes and bad content.

#[tokio::test]
async fn oci_mock_registry_with_token_auth() {
    let with_plugin = tar_gz(&[("./plugin.wasm", OTHER_MODULE), ("README", b"docs")]);
    let without = tar_gz(&[("etc/motd", b"hello")]);
    let config = b"{}".as_slice();
    let docker = manifest(
        DOCKER_MANIFEST,
        (DOCKER_CONFIG, config),
        &[(DOCKER_TAR_GZ, &with_plugin), (DOCKER_TAR_GZ, &without)],
    );
    let platform = |arch: &str| {
        serde_json::json!({"mediaType": DOCKER_MANIFEST, "digest": digest(&docker),
            "size": docker.len(), "platform": {"os": "linux", "architecture": arch}})
    };
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [platform("arm64"), platform("amd64")],
    }))
    .expect("an index");
    let no_wasm = manifest(
        OCI_MANIFEST,
        (OCI_CONFIG, config),
        &[("application/octet-stream", config)],
    );
    let corrupt = manifest(
        OCI_MANIFEST,
        (OCI_CONFIG, config),
        &[(WASM_LAYER, b"expected")],
    );

    let mut blobs: HashMap<String, Vec<u8>> = [config, &with_plugin, &without]
        .into_iter()
        .map(|b| (digest(b), b.to_vec()))
        .collect();
    blobs.insert(digest(b"expected"), b"but served".to_vec());
    let storage = Server::start(Arc::new(move |req: &Seen| {
        if req.authorization.is_some() {
            return Answer::status(400).body(b"storage must not see the registry's token");
        }
        let blob = req
            .path
            .strip_prefix("/storage/")
            .and_then(|d| blobs.get(d));
        blob.map_or_else(|| Answer::status(404), |b| Answer::ok(b))
    }))
    .await;

    let manifests: HashMap<String, (&str, Vec<u8>)> = [
        ("v1".to_owned(), (DOCKER_MANIFEST, docker.clone())),
        (digest(&docker), (DOCKER_MANIFEST, docker.clone())),
        ("multi".to_owned(), (OCI_INDEX, index.clone())),
        ("no-wasm".to_owned(), (OCI_MANIFEST, no_wasm)),
        ("corrupt".to_owned(), (OCI_MANIFEST, corrupt)),
    ]
    .into_iter()
    .collect();
    let storage_addr = storage.addr;
    let registry = Server::start(Arc::new(move |req: &Seen| {
        if let Some(query) = req.path.strip_prefix("/token?") {
            return if query == "service=mock&scope=repository%3Acompat%2Fplugin%3Apull" {
                Answer::ok(br#"{"token": "t0k", "expires_in": 300}"#)
            } else {
                Answer::status(400).body(query.as_bytes())
            };
        }
        if req.authorization.as_deref() != Some("Bearer t0k") {
            let challenge = format!(
                r#"Bearer realm="http://{}/token",service="mock",scope="repository:compat/plugin:pull""#,
                req.host
            );
            return Answer::status(401)
                .header("www-authenticate", &challenge)
                .body(br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#);
        }
        if let Some(reference) = req.path.strip_prefix("/v2/compat/plugin/manifests/") {
            return match manifests.get(reference) {
                Some((media_type, body)) => Answer::ok(body).header("content-type", media_type),
                None => Answer::status(404)
                    .body(br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#),
            };
        }
        if let Some(digest) = req.path.strip_prefix("/v2/compat/plugin/blobs/") {
            return Answer::status(307)
                .header("location", &format!("http://{storage_addr}/storage/{digest}"));
        }
        Answer::status(404)
    }))
    .await;
    let base = format!("oci://{}/compat/plugin", registry.addr);

    let module = fetch(&format!("{base}:v1"), Some(&sha256_hex(OTHER_MODULE)))
        .await
        .expect("pulling a Docker-format image");
    assert_eq!(module, OTHER_MODULE);
    assert_eq!(
        registry.hits("/token?service=mock&scope=repository%3Acompat%2Fplugin%3Apull"),
        1,
        "one token per pull, reused for the blobs"
    );
    assert_eq!(storage.hits(&format!("/storage/{}", digest(&without))), 1);
    assert_eq!(
        storage.hits(&format!("/storage/{}", digest(&with_plugin))),
        1
    );

    // sha256 may name the image (manifest) digest instead of the module's.
    let by_image = fetch(&format!("{base}:v1"), Some(&sha256_hex(&docker)))
        .await
        .expect("sha256 = image digest");
    assert_eq!(by_image, OTHER_MODULE);

    // An index resolves to its linux/amd64 image; its own digest works as sha256 too.
    let from_index = fetch(&format!("{base}:multi"), Some(&sha256_hex(&index)))
        .await
        .expect("pulling through an index");
    assert_eq!(from_index, OTHER_MODULE);

    match fetch(&format!("{base}:v1"), Some(&"c".repeat(64))).await {
        Err(FetchError::ImageChecksum { image, module, .. }) => {
            assert_eq!(image, sha256_hex(&docker));
            assert_eq!(module, sha256_hex(OTHER_MODULE));
        }
        other => panic!("expected an image checksum error, got {other:?}"),
    }

    let err = fetch(&format!("{base}:no-wasm"), None)
        .await
        .expect_err("no Wasm layer");
    assert!(
        matches!(&err, FetchError::Registry { why, .. } if why.contains("no Wasm layer")),
        "{err}"
    );
    let err = fetch(&format!("{base}:corrupt"), None)
        .await
        .expect_err("a blob that does not match its digest");
    assert!(
        matches!(&err, FetchError::Registry { why, .. } if why.contains("hashes to")),
        "{err}"
    );
    let err = fetch(&format!("{base}:v9"), None)
        .await
        .expect_err("an unknown tag");
    assert!(err.to_string().contains("MANIFEST_UNKNOWN"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// oci:// against a real registry.

#[tokio::test]
async fn oci_pull_from_a_real_registry() {
    let registry = RealRegistry::start().await;
    let base = registry.base();
    let repo = "plugins/add-header";

    let config = b"{}".as_slice();
    push_blob(&base, repo, config).await;
    let layer = push_blob(&base, repo, MODULE).await;
    assert_eq!(layer, digest(MODULE));
    let wasm_image = manifest(OCI_MANIFEST, (OCI_CONFIG, config), &[(WASM_LAYER, MODULE)]);
    let image_digest = push_manifest(&base, repo, "v1", &wasm_image).await;

    let compat_layer = tar_gz(&[("plugin.wasm", OTHER_MODULE)]);
    push_blob(&base, repo, &compat_layer).await;
    let compat_image = manifest(
        OCI_MANIFEST,
        (OCI_CONFIG, config),
        &[(OCI_TAR_GZ, &compat_layer)],
    );
    push_manifest(&base, repo, "compat", &compat_image).await;

    let host = registry.addr;
    let by_tag = format!("oci://{host}/{repo}:v1");
    assert_eq!(fetch(&by_tag, None).await.expect("by tag"), MODULE);
    assert_eq!(
        fetch(&by_tag, Some(&sha256_hex(MODULE)))
            .await
            .expect("by tag, with the module's sha256"),
        MODULE
    );
    let by_digest = format!("oci://{host}/{repo}@{image_digest}");
    assert_eq!(fetch(&by_digest, None).await.expect("by digest"), MODULE);
    assert_eq!(
        fetch(&by_digest, Some(image_digest.trim_start_matches("sha256:")))
            .await
            .expect("by digest, with the same sha256"),
        MODULE
    );
    assert!(matches!(
        fetch(&by_digest, Some(&sha256_hex(MODULE))).await,
        Err(FetchError::DigestMismatch { .. })
    ));
    let localhost = format!("oci://localhost:{}/{repo}:v1", host.port());
    assert_eq!(fetch(&localhost, None).await.expect("localhost"), MODULE);
    let schemeless = format!("{host}/{repo}:compat");
    assert_eq!(
        fetch(&schemeless, Some(&sha256_hex(OTHER_MODULE)))
            .await
            .expect("a Docker-compatible image, without a scheme"),
        OTHER_MODULE
    );

    let err = fetch(&format!("oci://{host}/{repo}:v9"), None)
        .await
        .expect_err("an unknown tag");
    let message = err.to_string();
    assert!(
        matches!(err, FetchError::Registry { .. })
            && message.contains("v9")
            && message.contains("MANIFEST_UNKNOWN"),
        "{message}"
    );
    let err = fetch(&format!("oci://{host}/plugins/nothing:v1"), None)
        .await
        .expect_err("an unknown repository");
    assert!(err.to_string().contains("404"), "{err}");

    // The cache serves IfNotPresent without the registry; Always needs it.
    let cache = ModuleCache::new();
    let cached = cache
        .get(&by_tag, None, PullPolicy::IfNotPresent)
        .await
        .expect("pulling into the cache");
    assert_eq!(&*cached, MODULE);
    drop(registry);
    let cached = cache
        .get(&by_tag, Some(&sha256_hex(MODULE)), PullPolicy::IfNotPresent)
        .await
        .expect("served from the cache");
    assert_eq!(&*cached, MODULE);
    assert!(matches!(
        cache.get(&by_tag, None, PullPolicy::Always).await,
        Err(FetchError::Connect { .. })
    ));
}
