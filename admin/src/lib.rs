//! The operator endpoints both proxies serve: admin (`/config_dump`, `/logging`,
//! `/quitquitquit`), metrics
//! (`/stats/prometheus`) and readiness (`/healthz/ready`), on their own thread and runtime so a
//! busy data plane never delays a scrape or a probe, and a stuck scrape never takes a
//! data-plane worker.
//!
//! Metrics and readiness listen on every address, where Prometheus and the kubelet reach the
//! pod, and answer only their own paths; the configuration and the log level stay on the admin
//! port, on localhost: an IPv4 loopback admin address is served on IPv6's loopback too, on the
//! same port, where the host has IPv6, as upstream binds its `localhost` admin address in both
//! families (so a port-forward or a probe that resolves `localhost` to `::1` finds it).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The proxy's live state beyond the mesh snapshot, as sections `/config_dump` adds at its top
/// level: a waypoint's endpoints (`proxyState`), a ztunnel's workloads and their connections
/// (`workloadState`).
pub type StateDump = Arc<dyn Fn() -> serde_json::Map<String, serde_json::Value> + Send + Sync>;

/// Whether the proxy is ready (`/healthz/ready`): `Ok`, or what it still waits on, which the
/// failing answer names (`not ready: <what>`), as upstream's names its pending tasks, so a
/// probe's failure says why.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Upstream's build info, `istio_build{component="<component>",tag="<version>"} 1`: one family
/// per registry, a series per component, so the local mesh's ztunnels and waypoints, which share
/// a registry, export it once (a family registered twice would be exported twice, which
/// Prometheus refuses).
#[derive(Debug, Clone, Default)]
pub struct BuildInfo(Family<[(&'static str, &'static str); 2], Gauge>);

impl BuildInfo {
    /// Registers the family in `registry`, under upstream's name.
    pub fn register(&self, registry: &mut Registry) {
        registry.sub_registry_with_prefix("istio").register(
            "build",
            "Istio component build info",
            self.0.clone(),
        );
    }

    /// Adds `component`'s series: `ztunnel`, or `proxy` for a waypoint, as Istio's proxies
    /// name theirs, with its version as the `tag`.
    pub fn component(&self, component: &'static str, tag: &'static str) {
        self.0
            .get_or_create(&[("component", component), ("tag", tag)])
            .set(1);
    }
}

/// A proxy's life as readiness sees it: starting, then serving, then draining on shutdown.
#[derive(Debug, Default)]
pub struct Lifecycle(AtomicU8);

impl Lifecycle {
    const STARTING: u8 = 0;
    const SERVING: u8 = 1;
    const DRAINING: u8 = 2;

    /// The proxy serves.
    pub fn serving(&self) {
        self.0.store(Self::SERVING, Ordering::Release);
    }

    /// The proxy drains: the kubelet takes it out of its Service before connections end.
    pub fn draining(&self) {
        self.0.store(Self::DRAINING, Ordering::Release);
    }

    /// `Ok` while serving, else what it is doing instead.
    pub fn check(&self) -> Result<(), String> {
        match self.0.load(Ordering::Acquire) {
            Self::SERVING => Ok(()),
            Self::STARTING => Err("starting".to_owned()),
            _ => Err("draining".to_owned()),
        }
    }
}

/// Changes the log filter (`/logging?level=debug`); returns the new filter or why not.
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<String, String> + Send + Sync>;

/// Installs the process's log subscriber with `filter` (else `RUST_LOG`, else `default`) and
/// returns the handle `/logging` changes it through.
pub fn logging(filter: Option<&str>, default: &str) -> SetLogLevel {
    use std::io::IsTerminal;

    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = filter
        .map(EnvFilter::new)
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        // Colours only for a person at a terminal: a pod's log is a file that tools grep.
        .with(tracing_subscriber::fmt::layer().with_ansi(std::io::stdout().is_terminal()))
        .init();
    Arc::new(move |level: &str| {
        let new =
            EnvFilter::try_new(level).map_err(|e| format!("invalid filter {level:?}: {e}"))?;
        handle.reload(new).map_err(|e| e.to_string())?;
        Ok(level.to_owned())
    })
}

/// Resolves on SIGTERM (Kubernetes stopping the pod), Ctrl-C or `POST /quitquitquit` (`quit`
/// notified), when the process drains.
pub async fn shutdown_signal(quit: &tokio::sync::Notify) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C and /quitquitquit stop the process");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = quit.notified() => {}
            }
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = quit.notified() => tracing::info!("asked to quit on the admin endpoint"),
    }
}

/// What the admin endpoints serve.
pub struct Admin {
    /// Names the serving thread (`ztunnel-admin`, `waypoint-admin`).
    pub name: &'static str,
    /// The mesh, for `/config_dump`.
    pub store: Arc<mesh::Store>,
    /// Certificates, for `/config_dump`.
    pub certs: Arc<hbone::CertManager>,
    /// Prometheus metrics.
    pub registry: Arc<Registry>,
    /// Whether the proxy is ready (`/healthz/ready`): what that takes is the proxy's to say.
    pub ready: Readiness,
    /// Log filter control.
    pub set_log_level: Option<SetLogLevel>,
    /// Live proxy state, set once the proxy runs (the endpoints serve before it does).
    pub state: Arc<std::sync::OnceLock<StateDump>>,
    /// Notified by `POST /quitquitquit`, for [`shutdown_signal`]: a graceful stop asked over
    /// HTTP, as upstream's admin offers.
    pub quit: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

/// Addresses of the three endpoints.
#[derive(Debug, Clone, Copy)]
pub struct AdminAddrs {
    /// `/config_dump`, `/logging`, `/quitquitquit` (Istio: 127.0.0.1:15000); served on `[::1]`
    /// too when this is IPv4's loopback.
    pub admin: SocketAddr,
    /// `/stats/prometheus` (Istio: 15020).
    pub metrics: SocketAddr,
    /// `/healthz/ready` (Istio: 15021).
    pub readiness: SocketAddr,
}

/// Which endpoint a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    /// Everything, metrics and readiness included.
    Admin,
    /// `/stats/prometheus` (and `/metrics`, as upstream) only.
    Metrics,
    /// `/healthz/ready` only.
    Readiness,
}

impl Endpoint {
    /// Whether this endpoint answers `path`.
    fn serves(self, path: &str) -> bool {
        match self {
            Endpoint::Admin => true,
            Endpoint::Metrics => matches!(path, "/stats/prometheus" | "/metrics"),
            Endpoint::Readiness => path == "/healthz/ready",
        }
    }

    /// The paths it answers, for a 404.
    fn paths(self) -> &'static str {
        match self {
            Endpoint::Admin => {
                "endpoints: /config_dump /logging?level= /quitquitquit (POST) /stats/prometheus \
                 /healthz/ready\n"
            }
            Endpoint::Metrics => "endpoints: /stats/prometheus /metrics\n",
            Endpoint::Readiness => "endpoints: /healthz/ready\n",
        }
    }
}

/// Binds `addr`. The IPv6 wildcard takes IPv4 too, whatever `net.ipv6.bindv6only` says, and
/// falls back to IPv4's on a host without IPv6, as upstream's dual-stack listeners do; any
/// other failure (the port taken) is the caller's.
fn bind_or_ipv4(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    match bind(addr) {
        Err(e) if addr.ip() == std::net::Ipv6Addr::UNSPECIFIED && no_ipv6(&e) => {
            let v4 = SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), addr.port());
            tracing::info!(%addr, error = %e, "no IPv6 on this host; listening on IPv4 only");
            bind(v4)
        }
        bound => bound,
    }
}

/// Whether `e` says the host has no IPv6 (the family unsupported, or no address of it).
fn no_ipv6(e: &std::io::Error) -> bool {
    const EAFNOSUPPORT: i32 = 97;
    e.kind() == std::io::ErrorKind::AddrNotAvailable || e.raw_os_error() == Some(EAFNOSUPPORT)
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds the endpoints and serves them on a dedicated thread. Returns the bound addresses
/// (useful with port 0).
pub fn spawn(admin: Admin, addrs: AdminAddrs) -> std::io::Result<AdminAddrs> {
    let bind = |addr: SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let l = bind_or_ipv4(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let mut listeners = vec![
        (bind(addrs.admin)?, Endpoint::Admin),
        (bind(addrs.metrics)?, Endpoint::Metrics),
        (bind(addrs.readiness)?, Endpoint::Readiness),
    ];
    let bound = AdminAddrs {
        admin: listeners[0].0.local_addr()?,
        metrics: listeners[1].0.local_addr()?,
        readiness: listeners[2].0.local_addr()?,
    };
    if bound.admin.ip() == std::net::Ipv4Addr::LOCALHOST {
        let v6 = SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), bound.admin.port());
        match bind(v6) {
            Ok(listener) => listeners.push((listener, Endpoint::Admin)),
            Err(e) if no_ipv6(&e) => {
                tracing::info!(addr = %v6, error = %e, "no IPv6 loopback; admin on IPv4's only");
            }
            // A convenience beside the address asked for: another process holding the port
            // there does not stop this one.
            Err(e) => tracing::warn!(addr = %v6, error = %e, "admin not served on IPv6's loopback"),
        }
    }
    let admin = Arc::new(admin);
    std::thread::Builder::new()
        .name(admin.name.into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "admin runtime failed to start");
                    return;
                }
            };
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                for (listener, endpoint) in listeners {
                    let admin = admin.clone();
                    tasks.push(tokio::spawn(async move {
                        match TcpListener::from_std(listener) {
                            Ok(l) => serve(l, admin, endpoint).await,
                            Err(e) => tracing::error!(error = %e, "admin listener failed"),
                        }
                    }));
                }
                futures_util::future::join_all(tasks).await;
            });
        })?;
    Ok(bound)
}

async fn serve(listener: TcpListener, admin: Arc<Admin>, endpoint: Endpoint) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, endpoint, &req)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    response
}

fn route(admin: &Admin, endpoint: Endpoint, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !endpoint.serves(path) {
        return respond(StatusCode::NOT_FOUND, "text/plain", endpoint.paths());
    }
    match path {
        "/stats/prometheus" | "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &admin.registry) {
                Ok(()) => respond(StatusCode::OK, "text/plain; version=0.0.4", text),
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/healthz/ready" => match (admin.ready)() {
            Ok(()) => respond(StatusCode::OK, "text/plain", "ready\n"),
            Err(waiting) => respond(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("not ready: {waiting}\n"),
            ),
        },
        "/config_dump" => {
            let snapshot = admin.store.load();
            let mut dump = snapshot.dump();
            let certificates: Vec<serde_json::Value> = (admin.certs.certificates().iter())
                .map(|c| certificate(c))
                .collect();
            dump["certificates"] = serde_json::Value::Array(certificates);
            if let Some(state) = admin.state.get() {
                for (section, value) in state() {
                    dump[section] = value;
                }
            }
            let stats = admin.store.stats();
            dump["configStatus"] = serde_json::json!({
                "applied": stats.applied,
                "rejected": stats.rejected,
                "lastError": admin.store.last_error().map(|e| e.to_string()),
            });
            match serde_json::to_vec_pretty(&dump) {
                Ok(body) => respond(StatusCode::OK, "application/json", body),
                Err(e) => respond(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/quitquitquit" => {
            if req.method() != http::Method::POST {
                let mut refused =
                    respond(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use POST\n");
                (refused.headers_mut())
                    .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
                refused
            } else if req.headers().contains_key(http::header::ORIGIN) {
                // A web page's form may POST to localhost without a preflight; an operator's
                // curl sends no Origin.
                respond(StatusCode::FORBIDDEN, "text/plain", "not from a browser\n")
            } else {
                admin.quit.notify_one();
                respond(StatusCode::OK, "text/plain", "draining\n")
            }
        }
        "/logging" => {
            let level = req
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")));
            match (level, &admin.set_log_level) {
                (Some(level), Some(set)) => match set(level) {
                    Ok(now) => respond(StatusCode::OK, "text/plain", format!("log level: {now}\n")),
                    Err(e) => respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
                },
                (None, _) => respond(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "use /logging?level=<filter>\n",
                ),
                (Some(_), None) => respond(
                    StatusCode::NOT_IMPLEMENTED,
                    "text/plain",
                    "log level is fixed\n",
                ),
            }
        }
        _ => respond(StatusCode::NOT_FOUND, "text/plain", endpoint.paths()),
    }
}

/// A workload certificate in upstream ztunnel's dump form (`istioctl ztunnel-config
/// certificates` reads it), with when it renews.
fn certificate(c: &hbone::WorkloadCert) -> serde_json::Value {
    let show = |ders: &[rustls_pki_types::CertificateDer<'static>]| -> Vec<serde_json::Value> {
        ders.iter()
            .map(|der| match hbone::summarize(der) {
                Ok(s) => serde_json::json!({
                    "pem": s.pem,
                    "serialNumber": s.serial_number,
                    "validFrom": rfc3339(s.valid_from),
                    "expirationTime": rfc3339(s.expiration_time),
                }),
                Err(e) => serde_json::json!({"error": e.to_string()}),
            })
            .collect()
    };
    // A certificate past its end is still held when renewing it failed; upstream shows such
    // an identity as unavailable.
    let state = if c.not_after() > std::time::SystemTime::now() {
        "Available"
    } else {
        "Unavailable: expired"
    };
    serde_json::json!({
        "identity": c.identity().to_string(),
        "state": state,
        "certChain": show(c.chain()),
        "rootCerts": show(c.root_ders()),
        "refreshAt": rfc3339(c.refresh_at()),
    })
}

/// `t` as RFC 3339 in UTC (`2026-12-06T13:44:42Z`), as upstream's dump shows certificate times;
/// empty if it cannot be shown.
fn rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two components sharing a registry export one family with a series each.
    #[test]
    fn build_info_is_one_family_with_a_series_per_component() {
        let build = BuildInfo::default();
        let mut registry = Registry::default();
        build.register(&mut registry);
        build.component("ztunnel", "1.2.3");
        build.component("proxy", "1.2.4");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for series in [
            "istio_build{component=\"ztunnel\",tag=\"1.2.3\"} 1\n",
            "istio_build{component=\"proxy\",tag=\"1.2.4\"} 1\n",
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
        assert_eq!(
            text.matches("# TYPE istio_build gauge").count(),
            1,
            "{text}"
        );
    }

    /// The default `[::]` endpoints answer over IPv4 too, where the kubelet and Prometheus of
    /// an IPv4 cluster reach them.
    #[test]
    fn the_ipv6_wildcard_takes_ipv4_connections() {
        let listener = bind_or_ipv4("[::]:0".parse().expect("addr")).expect("bind");
        let port = listener.local_addr().expect("addr").port();
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("an IPv4 connection");
    }

    #[test]
    fn certificate_times_are_rfc3339_in_utc() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_796_564_682_250);
        assert_eq!(rfc3339(t), "2026-12-06T13:44:42Z");
    }

    /// Each certificate as upstream's dump shows it: the chain and the roots, each in PEM with
    /// its serial number in decimal and its validity in RFC 3339.
    #[test]
    fn certificates_are_dumped_in_upstream_form() {
        let ca = hbone::MeshCa::generate("cluster.local").expect("ca");
        let identity: hbone::Identity =
            "spiffe://cluster.local/ns/app/sa/echo".parse().expect("id");
        let cert = ca.issue(&identity).expect("issued");
        let dump = certificate(&cert);
        assert_eq!(dump["identity"], "spiffe://cluster.local/ns/app/sa/echo");
        assert_eq!(dump["state"], "Available");
        let leaf = &dump["certChain"][0];
        let pem = leaf["pem"].as_str().expect("pem");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
        let serial = leaf["serialNumber"].as_str().expect("serial");
        assert_eq!(
            u128::from_str_radix(cert.serial(), 16)
                .map(|n| n.to_string())
                .as_deref(),
            Ok(serial),
            "the hex serial in decimal"
        );
        assert_eq!(leaf["validFrom"], rfc3339(cert.not_before()));
        assert_eq!(leaf["expirationTime"], rfc3339(cert.not_after()));
        let roots = dump["rootCerts"].as_array().expect("roots");
        assert_eq!(roots.len(), 1);
        assert_eq!(roots[0]["pem"], ca.root_pem());

        // One whose renewal failed, held past its end, is shown as unavailable.
        let day = std::time::Duration::from_secs(86_400);
        let now = std::time::SystemTime::now();
        let expired =
            (ca.issue_with_validity(&identity, now - 2 * day, now - day)).expect("issued");
        assert_eq!(certificate(&expired)["state"], "Unavailable: expired");
    }

    /// Serves an admin with `ready` on ephemeral loopback ports.
    fn serve_test_admin(ready: Readiness, quit: Arc<tokio::sync::Notify>) -> AdminAddrs {
        let snapshot =
            mesh::Snapshot::from_yaml("mesh.yaml", "", &mesh::Options::default()).expect("mesh");
        let ca = hbone::MeshCa::generate("cluster.local").expect("ca");
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        spawn(
            Admin {
                name: "admin-test",
                store: mesh::Store::new(snapshot),
                certs: Arc::new(hbone::CertManager::new(Arc::new(ca))),
                registry: Arc::new(Registry::default()),
                ready,
                set_log_level: None,
                state: Arc::default(),
                quit,
            },
            AdminAddrs {
                admin: local,
                metrics: local,
                readiness: local,
            },
        )
        .expect("spawn")
    }

    /// The status code and body of `method path` on `addr`.
    fn request(addr: SocketAddr, method: &str, path: &str) -> (String, String) {
        request_with(addr, method, path, "")
    }

    /// The same, with extra header lines (each ending in CRLF).
    fn request_with(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (String, String) {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .expect("send");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).expect("read");
        let status = answer.split(' ').nth(1).unwrap_or_default().to_owned();
        let body = answer
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        (status, body)
    }

    /// `/healthz/ready` answers 200 while the proxy serves, and otherwise 500 naming what it
    /// waits on, as upstream's does: starting, then serving, then draining.
    #[test]
    fn readiness_names_what_the_proxy_waits_on() {
        let lifecycle = Arc::new(Lifecycle::default());
        let ready = lifecycle.clone();
        let bound = serve_test_admin(Arc::new(move || ready.check()), Arc::default());
        let probe = || request(bound.readiness, "GET", "/healthz/ready");
        assert_eq!(probe(), ("500".into(), "not ready: starting\n".into()));
        lifecycle.serving();
        assert_eq!(probe(), ("200".into(), "ready\n".into()));
        lifecycle.draining();
        assert_eq!(probe(), ("500".into(), "not ready: draining\n".into()));
    }

    /// `POST /quitquitquit` on the admin port asks the process to drain; nothing else does.
    #[tokio::test]
    async fn quitquitquit_takes_a_post_on_the_admin_port() {
        let quit = Arc::new(tokio::sync::Notify::new());
        let bound = serve_test_admin(Arc::new(|| Ok(())), quit.clone());
        let asked = async |method: &'static str, addr: SocketAddr| {
            let answer =
                tokio::task::spawn_blocking(move || request(addr, method, "/quitquitquit"))
                    .await
                    .expect("request");
            let notified =
                tokio::time::timeout(std::time::Duration::from_millis(200), quit.notified());
            (answer, notified.await.is_ok())
        };
        assert_eq!(
            asked("GET", bound.admin).await,
            (("405".into(), "use POST\n".into()), false)
        );
        assert!(!asked("POST", bound.metrics).await.1, "not on metrics");
        let from_a_page = tokio::task::spawn_blocking(move || {
            request_with(
                bound.admin,
                "POST",
                "/quitquitquit",
                "Origin: http://example.com\r\n",
            )
        })
        .await
        .expect("request");
        assert_eq!(from_a_page, ("403".into(), "not from a browser\n".into()));
        assert_eq!(
            asked("POST", bound.admin).await,
            (("200".into(), "draining\n".into()), true)
        );
    }

    /// An admin on IPv4's loopback answers on IPv6's too, on the same port, as upstream's
    /// `localhost`; the endpoints open to the pod network are not doubled.
    #[test]
    fn the_admin_answers_on_both_loopbacks() {
        let ipv6 = std::net::TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0));
        if let Err(e) = ipv6 {
            assert!(no_ipv6(&e), "{e}");
            return; // a host without IPv6: the IPv4 admin alone is the documented behaviour
        }
        let bound = serve_test_admin(Arc::new(|| Ok(())), Arc::default());
        assert_eq!(bound.admin.ip(), std::net::Ipv4Addr::LOCALHOST);
        let v6 = |port| SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), port);
        let (status, body) = request(v6(bound.admin.port()), "GET", "/config_dump");
        assert_eq!(status, "200", "{body}");
        assert!(body.contains("\"certificates\""), "{body}");
        assert_eq!(request(bound.admin, "GET", "/healthz/ready").0, "200");
        let metrics = std::net::TcpStream::connect(v6(bound.metrics.port()));
        assert!(
            metrics.is_err(),
            "metrics were asked on IPv4's loopback only"
        );
    }

    /// A port taken is an error, not a quiet fallback to IPv4's wildcard.
    #[test]
    fn a_port_taken_is_reported() {
        let taken = bind_or_ipv4("[::]:0".parse().expect("addr")).expect("bind");
        let port = taken.local_addr().expect("addr").port();
        let again = bind_or_ipv4(SocketAddr::new(
            std::net::Ipv6Addr::UNSPECIFIED.into(),
            port,
        ));
        let err = again.expect_err("the port is taken");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    }

    /// The ports open to the pod network answer only their own paths: the configuration and
    /// the log level are the admin port's alone.
    #[test]
    fn each_endpoint_answers_its_own_paths() {
        let cases = [
            (
                Endpoint::Admin,
                [
                    "/config_dump",
                    "/logging",
                    "/stats/prometheus",
                    "/healthz/ready",
                ]
                .as_slice(),
                true,
            ),
            (Endpoint::Metrics, &["/stats/prometheus", "/metrics"], true),
            (
                Endpoint::Metrics,
                &["/config_dump", "/logging", "/healthz/ready"],
                false,
            ),
            (Endpoint::Readiness, &["/healthz/ready"], true),
            (
                Endpoint::Readiness,
                &["/config_dump", "/logging", "/stats/prometheus"],
                false,
            ),
        ];
        for (endpoint, paths, served) in cases {
            for path in paths {
                assert_eq!(endpoint.serves(path), served, "{endpoint:?} {path}");
            }
        }
    }
}
