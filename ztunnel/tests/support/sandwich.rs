//! For the tests that play a sandwiched waypoint (the local mesh's and the capture test) and the
//! waypoint's test that refuses to be one, which include this file: the waypoint's Gateway and
//! pod, and a reader for what ztunnel writes to it, a PROXY protocol v2 header.

use std::net::{IpAddr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// How the test's waypoint is sandwiched.
#[derive(Clone, Copy)]
#[allow(dead_code)] // each test binary uses one
pub(crate) enum Binding {
    /// An `istio-waypoint` Gateway annotated `PROXY/15088`: every tunnel to port 15088.
    OnGateway,
    /// As kgateway's waypoints are: a Gateway of class `kgateway-waypoint`, whose GatewayClass
    /// says `PROXY` with no port: each tunnel to its own target port.
    OnClassWithoutPort,
}

/// A sandwiched waypoint `sandwich` in namespace `app`, bound as `binding` says, and its one
/// pod, `sandwich-0` on node-b at `pod_ip`.
pub(crate) fn waypoint_yaml(pod_ip: &str, binding: Binding) -> String {
    let gateway = match binding {
        Binding::OnGateway => {
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: sandwich
  namespace: app
  annotations: {ambient.istio.io/waypoint-inbound-binding: PROXY/15088}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
"#
        }
        Binding::OnClassWithoutPort => {
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata:
  name: kgateway-waypoint
  annotations: {ambient.istio.io/waypoint-inbound-binding: PROXY}
spec: {controllerName: kgateway.dev/kgateway}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: sandwich, namespace: app}
spec: {gatewayClassName: kgateway-waypoint, listeners: [{name: proxy, port: 15088, protocol: istio.io/PROXY}]}
"#
        }
    };
    format!(
        r#"
---{gateway}---
apiVersion: v1
kind: Pod
metadata: {{name: sandwich-0, namespace: app, labels: {{gateway.networking.k8s.io/gateway-name: sandwich}}}}
spec: {{nodeName: node-b, serviceAccountName: sandwich}}
status: {{podIP: {pod_ip}}}
"#
    )
}

/// Reads a PROXY protocol v2 header for TCP over IPv4: (source, destination, TLVs).
pub(crate) async fn read_proxy_header(
    s: &mut TcpStream,
) -> (SocketAddr, SocketAddr, Vec<(u8, Vec<u8>)>) {
    let mut fixed = [0u8; 16];
    s.read_exact(&mut fixed).await.expect("PROXY header");
    assert_eq!(&fixed[..12], b"\r\n\r\n\0\r\nQUIT\n", "v2 signature");
    assert_eq!(fixed[12], 0x21, "version 2, command PROXY");
    assert_eq!(fixed[13], 0x11, "TCP over IPv4");
    let mut rest = vec![0u8; u16::from_be_bytes([fixed[14], fixed[15]]) as usize];
    s.read_exact(&mut rest)
        .await
        .expect("PROXY addresses and TLVs");
    let v4 = |b: &[u8]| IpAddr::from([b[0], b[1], b[2], b[3]]);
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let src = SocketAddr::new(v4(&rest[0..4]), port(&rest[8..10]));
    let dst = SocketAddr::new(v4(&rest[4..8]), port(&rest[10..12]));
    let mut tlvs = Vec::new();
    let mut at = 12;
    while at < rest.len() {
        let len = port(&rest[at + 1..at + 3]) as usize;
        tlvs.push((rest[at], rest[at + 3..at + 3 + len].to_vec()));
        at += 3 + len;
    }
    (src, dst, tlvs)
}
