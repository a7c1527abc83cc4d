//! A real OCI registry for the `oci://` tests, Debian's `docker-registry` (the CNCF
//! distribution registry), and the few registry API calls that push an image to it. Included
//! by the plugin host's fetch tests and by the waypoint's plugin tests.

#![allow(dead_code, unreachable_pub)] // each test binary uses part of it

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

pub const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

pub type Exchange = (StatusCode, HeaderMap, Vec<u8>);

pub async fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<Exchange, String> {
    let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let authority = uri.authority().ok_or("no authority")?.clone();
    let tcp = TcpStream::connect(authority.as_str())
        .await
        .map_err(|e| format!("connecting to {authority}: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header("host", authority.as_str())
        .header("content-length", body.len());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status, parts.headers, body.to_vec()))
}

/// Uploads a blob (monolithic upload: POST, then PUT with the digest); returns its digest.
pub async fn push_blob(base: &str, repo: &str, data: &[u8]) -> String {
    let url = format!("{base}/v2/{repo}/blobs/uploads/");
    let (status, headers, body) = request(Method::POST, &url, &[], Vec::new())
        .await
        .expect("starting an upload");
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "POST {url}: {}",
        String::from_utf8_lossy(&body)
    );
    let location = headers["location"].to_str().expect("a textual Location");
    let location = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location.to_owned()
    };
    let digest = digest(data);
    let sep = if location.contains('?') { '&' } else { '?' };
    let (status, _, body) = request(
        Method::PUT,
        &format!("{location}{sep}digest={digest}"),
        &[("content-type", "application/octet-stream")],
        data.to_vec(),
    )
    .await
    .expect("finishing an upload");
    assert_eq!(
        status,
        StatusCode::CREATED,
        "PUT blob: {}",
        String::from_utf8_lossy(&body)
    );
    digest
}

/// Uploads a manifest under `reference`; returns its digest.
pub async fn push_manifest(base: &str, repo: &str, reference: &str, manifest: &[u8]) -> String {
    let url = format!("{base}/v2/{repo}/manifests/{reference}");
    let (status, headers, body) = request(
        Method::PUT,
        &url,
        &[("content-type", OCI_MANIFEST)],
        manifest.to_vec(),
    )
    .await
    .expect("pushing a manifest");
    assert_eq!(
        status,
        StatusCode::CREATED,
        "PUT {url}: {}",
        String::from_utf8_lossy(&body)
    );
    let digest = digest(manifest);
    assert_eq!(
        headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok()),
        Some(digest.as_str())
    );
    digest
}

pub fn manifest(media_type: &str, config: (&str, &[u8]), layers: &[(&str, &[u8])]) -> Vec<u8> {
    let descriptor = |(media_type, data): (&str, &[u8])| serde_json::json!({"mediaType": media_type, "digest": digest(data), "size": data.len()});
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": descriptor(config),
        "layers": layers.iter().copied().map(descriptor).collect::<Vec<_>>(),
    }))
    .expect("serializing a manifest")
}

/// Pushes `module` as a Wasm OCI image (`application/vnd.module.wasm.content.layer.v1+wasm`)
/// tagged `tag`; returns the image's digest.
pub async fn push_wasm_image(base: &str, repo: &str, tag: &str, module: &[u8]) -> String {
    let config = b"{}".as_slice();
    push_blob(base, repo, config).await;
    push_blob(base, repo, module).await;
    let image = manifest(OCI_MANIFEST, (OCI_CONFIG, config), &[(WASM_LAYER, module)]);
    push_manifest(base, repo, tag, &image).await
}

/// Debian's `docker-registry` (the CNCF distribution registry) on 127.0.0.1, killed on drop.
pub struct RealRegistry {
    child: Child,
    dir: PathBuf,
    pub addr: SocketAddr,
}

impl RealRegistry {
    pub async fn start() -> RealRegistry {
        let binary = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
            .chain([PathBuf::from("/usr/bin")])
            .map(|dir| dir.join("docker-registry"))
            .find(|candidate| candidate.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "docker-registry not found on PATH: the oci:// tests need a real registry; \
                     install Debian's `docker-registry` package (apt-get install -y docker-registry)"
                )
            });
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "oci-registry-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating the registry's directory");
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )
        .expect("writing the registry's configuration");
        let log = std::fs::File::create(dir.join("registry.log")).expect("creating a log file");
        let child = Command::new(&binary)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cloning the log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut registry = RealRegistry { child, dir, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = registry.child.try_wait() {
                panic!("docker-registry exited ({status}): {}", registry.log());
            }
            let probe = format!("{}/v2/", registry.base());
            if let Ok((StatusCode::OK, _, _)) = request(Method::GET, &probe, &[], Vec::new()).await
            {
                return registry;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not answer GET /v2/ within 30 s: {}",
                registry.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("registry.log")).unwrap_or_default()
    }
}

impl Drop for RealRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
