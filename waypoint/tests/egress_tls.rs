//! TLS origination at an egress waypoint: a ServiceEntry out of the mesh whose DestinationRule
//! asks for TLS is reached over TLS, with the request's host as SNI (or the rule's own) and the
//! server's certificate verified against the CA file the rule names, presenting a client
//! certificate for `MUTUAL`; a server whose certificate does not verify is answered 503.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use support::Mesh;

const NET: u8 = 98;

/// A test CA, written to `dir` as `<name>.pem`.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

impl Ca {
    fn new(dir: &std::path::Path, name: &str) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("ca");
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).expect("write");
        Ca {
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A certificate for `names` and its key.
    fn issue(&self, names: &[&str]) -> (Certificate, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let params = CertificateParams::new(names).expect("params");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf");
        (cert, key)
    }
}

/// What the TLS servers saw: the SNI of each handshake, and whether the client presented a
/// certificate.
type Handshakes = Arc<Mutex<Vec<(String, bool)>>>;

/// Terminates TLS on `listener` with `cert` and `key` and forwards the plaintext to `backend`;
/// with `clients`, asks for a client certificate that chains to that CA.
async fn tls_front(
    listener: TcpListener,
    (cert, key): (CertificateDer<'static>, PrivateKeyDer<'static>),
    clients: Option<CertificateDer<'static>>,
    backend: SocketAddr,
    seen: Handshakes,
) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca).expect("root");
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .expect("verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(vec![cert], key)
        .expect("server config");
    let acceptor = TlsAcceptor::from(Arc::new(config));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, seen) = (acceptor.clone(), seen.clone());
        tokio::spawn(async move {
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                return;
            };
            let session = tls.get_ref().1;
            let sni = session.server_name().unwrap_or_default().to_owned();
            let client = session.peer_certificates().is_some_and(|c| !c.is_empty());
            seen.lock().unwrap().push((sni, client));
            let Ok(mut plain) = TcpStream::connect(backend).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
        });
    }
}

/// `api.secure.test` (TLS at 127.98.9.2:8443, and a TCP port) and `api.mutual.test` (TLS with
/// client certificates at 127.98.9.3:9443), both out of the mesh and bound to the waypoint,
/// with the rules `secure` (`secure` its traffic policy) and `mutual`.
fn config(dir: &std::path::Path, secure: &str) -> String {
    let file = |name: &str| dir.join(name).display().to_string();
    let (ca, client, key) = (file("ca.pem"), file("client.pem"), file("client-key.pem"));
    format!(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  hosts: [api.secure.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP, targetPort: 8443}}
  - {{number: 5432, name: tcp, protocol: TCP, targetPort: 9000}}
  endpoints: [{{address: 127.{NET}.9.2}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: mutual, namespace: app, labels: {{istio.io/use-waypoint: waypoint}}}}
spec:
  hosts: [api.mutual.test]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 9443}}]
  endpoints: [{{address: 127.{NET}.9.3}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure, namespace: app}}
spec:
  host: api.secure.test
  trafficPolicy: {secure}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: mutual, namespace: app}}
spec:
  host: api.mutual.test
  trafficPolicy:
    tls: {{mode: MUTUAL, caCertificates: {ca}, clientCertificate: {client}, privateKey: {key}}}
"#
    )
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_originated_to_an_external_service_as_its_destination_rule_asks() {
    let dir = TempDir(std::env::temp_dir().join(format!("egress-tls-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).expect("dir");
    let ca = Ca::new(&dir.0, "ca");
    let _other = Ca::new(&dir.0, "other-ca");
    let (server, server_key) = ca.issue(&["api.secure.test", "api.mutual.test"]);
    let (client, client_key) = ca.issue(&["client.app"]);
    std::fs::write(dir.0.join("client.pem"), client.pem()).expect("write");
    std::fs::write(dir.0.join("client-key.pem"), client_key.serialize_pem()).expect("write");

    let ca_file = dir.0.join("ca.pem").display().to_string();
    // As Istio's egress TLS origination task writes it: for port 80.
    let simple = format!(
        "{{portLevelSettings: [{{port: {{number: 80}}, tls: {{mode: SIMPLE, caCertificates: \
         {ca_file}}}}}]}}"
    );
    let mesh = Mesh::start(NET, &config(&dir.0, &simple)).await;
    let backend = TcpListener::bind((mesh.ip("9.1"), 8080))
        .await
        .expect("bind");
    let backend_addr = backend.local_addr().expect("addr");
    tokio::spawn(support::echo(backend, "external", mesh.seen.clone()));
    let seen = Handshakes::default();
    let identity = || {
        let key = PrivatePkcs8KeyDer::from(server_key.serialize_der());
        (server.der().clone(), PrivateKeyDer::Pkcs8(key))
    };
    let secure = TcpListener::bind((mesh.ip("9.2"), 8443))
        .await
        .expect("bind");
    tokio::spawn(tls_front(
        secure,
        identity(),
        None,
        backend_addr,
        seen.clone(),
    ));
    let mutual = TcpListener::bind((mesh.ip("9.3"), 9443))
        .await
        .expect("bind");
    let clients = Some(ca.der.clone());
    tokio::spawn(tls_front(
        mutual,
        identity(),
        clients,
        backend_addr,
        seen.clone(),
    ));

    let get = |host: &'static str| {
        let mesh = &mesh;
        async move {
            let vip = {
                let snapshot = mesh.store.load();
                let (_, service) = snapshot.service_by_host(host).expect("host");
                service.vips[0].to_string()
            };
            let r = mesh
                .request_to(&vip, 80, "GET", "/", &[("host", host)], "")
                .await
                .expect("request");
            (r.status, r.body)
        }
    };
    let last = |seen: &Handshakes| seen.lock().unwrap().last().cloned();

    // SIMPLE: the request's host as SNI, verified against the rule's CA; twice over one
    // pooled connection.
    for _ in 0..2 {
        let (status, body) = get("api.secure.test").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("backend=external"), "{body}");
    }
    assert_eq!(
        seen.lock().unwrap().clone(),
        [("api.secure.test".to_owned(), false)]
    );
    // MUTUAL: with the client certificate.
    let (status, body) = get("api.mutual.test").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(last(&seen), Some(("api.mutual.test".to_owned(), true)));

    // Another CA: the server's certificate does not verify, and the pooled connection made
    // under the old CA is not reused.
    let other = dir.0.join("other-ca.pem").display().to_string();
    mesh.set_routes(&config(
        &dir.0,
        &format!("{{tls: {{mode: SIMPLE, caCertificates: {other}}}}}"),
    ))
    .await;
    assert_eq!(get("api.secure.test").await.0, 503);
    // The rule's SNI, which the certificate does not name: refused, unless verification is
    // off.
    let named = format!("{{tls: {{mode: SIMPLE, caCertificates: {ca_file}, sni: other.test}}}}");
    mesh.set_routes(&config(&dir.0, &named)).await;
    assert_eq!(get("api.secure.test").await.0, 503);
    // A TCP port of a host whose rule asks for TLS: refused, not sent in the clear.
    let tcp = TcpListener::bind((mesh.ip("9.2"), 9000))
        .await
        .expect("bind");
    tokio::spawn(support::tcp_echo(tcp, "plain"));
    let vip = {
        let snapshot = mesh.store.load();
        let (_, service) = snapshot.service_by_host("api.secure.test").expect("host");
        service.vips[0].to_string()
    };
    let mut s = mesh.socks(&vip, 5432).await.expect("socks");
    let _ = s.write_all(b"ping").await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection stayed open");
    assert!(got.is_empty(), "{}", String::from_utf8_lossy(&got));

    let unverified = "{tls: {mode: SIMPLE, sni: other.test, insecureSkipVerify: true}}";
    mesh.set_routes(&config(&dir.0, unverified)).await;
    assert_eq!(get("api.secure.test").await.0, 200);
    assert_eq!(last(&seen), Some(("other.test".to_owned(), false)));
    // Without a rule SNI: the authority the request goes upstream with, after a rewrite.
    let rewrite = r#"
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure, namespace: app}
spec:
  hosts: [api.secure.test]
  http: [{rewrite: {authority: api.mutual.test}, route: [{destination: {host: api.secure.test}}]}]
"#;
    let verified = format!("{{tls: {{mode: SIMPLE, caCertificates: {ca_file}}}}}");
    let rewritten = format!("{}{rewrite}", config(&dir.0, &verified));
    mesh.set_routes(&rewritten).await;
    assert_eq!(get("api.secure.test").await.0, 200);
    assert_eq!(last(&seen), Some(("api.mutual.test".to_owned(), false)));
    mesh.shutdown().await;
}
