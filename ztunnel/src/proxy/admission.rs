//! Whether a local workload admits an inbound connection: every check that depends on the
//! configuration, in one place, so that it runs when the connection arrives and again on each
//! configuration change while the connection lives. A new DENY policy, STRICT mTLS, or a
//! waypoint bound to the workload therefore closes connections that no longer qualify, as new
//! ones would be refused.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use hbone::Identity;
use mesh::authz::{Attributes, evaluate};
use mesh::model::Workload;
use mesh::resource::MtlsMode;
use mesh::{Snapshot, Store};

/// Who is connecting, and to where on the workload.
#[derive(Debug, Clone, Copy)]
pub(super) struct Inbound<'a> {
    /// The caller's identity, proven by mTLS; `None` for plaintext.
    pub(super) source: Option<&'a Identity>,
    pub(super) source_ip: IpAddr,
    /// Where the connection goes on the workload (what policy sees as the destination).
    pub(super) destination: SocketAddr,
}

/// Why a connection is refused; its message is the access log's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Plaintext to a sandwiched waypoint's PROXY port, which only ztunnel may write to.
    ProxyPort,
    /// Plaintext under a STRICT PeerAuthentication.
    Strict,
    /// The workload is bound to these waypoints and the caller is none of them.
    Bypass(String),
    /// An AuthorizationPolicy denies it (the policy, when one decided).
    Denied(Option<String>),
    /// The workload is no longer in the configuration.
    Gone,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ProxyPort => f.write_str(
                "plaintext refused: the sandwiched waypoint's PROXY port takes tunnels from ztunnel only",
            ),
            Self::Strict => f.write_str("plaintext refused: PeerAuthentication requires mTLS (STRICT)"),
            Self::Bypass(waypoints) => {
                write!(f, "the caller bypasses the destination's waypoint ({waypoints})")
            }
            Self::Denied(Some(policy)) => write!(f, "RBAC: access denied by {policy}"),
            Self::Denied(None) => f.write_str("RBAC: access denied: no ALLOW policy matches"),
            Self::Gone => f.write_str("the workload is no longer in the configuration"),
        }
    }
}

/// Admits `conn` to the workload `uid` by the configuration current now. Call it after
/// registering the connection with [`LiveConnections`](super::live::LiveConnections): a change
/// published before this reads the configuration is in what it reads, and one published after
/// is re-checked against the registration, so none slips between the two.
pub(super) fn admit_now(store: &Store, uid: &str, conn: &Inbound<'_>) -> Result<(), Refusal> {
    let snapshot = store.load();
    let workload = snapshot.workload_by_uid(uid).ok_or(Refusal::Gone)?;
    admit(&snapshot, workload, conn)
}

/// Admits `conn` to `workload`, or says why not.
pub(super) fn admit(
    snapshot: &Snapshot,
    workload: &Workload,
    conn: &Inbound<'_>,
) -> Result<(), Refusal> {
    if conn.source.is_none() {
        // A sandwiched waypoint trusts the PROXY header on its binding port (every port, when
        // the binding names none): only ztunnel may write one, after terminating mTLS.
        let port = conn.destination.port();
        if (workload.app_tunnel).is_some_and(|t| t.port.is_none_or(|p| p == port)) {
            return Err(Refusal::ProxyPort);
        }
        if snapshot.mtls_mode(workload, port) == MtlsMode::Strict {
            return Err(Refusal::Strict);
        }
    }
    if let Some(waypoints) = bypassed_waypoint(snapshot, workload, conn.source) {
        return Err(Refusal::Bypass(waypoints));
    }
    let attrs = Attributes {
        source: conn.source,
        source_ip: conn.source_ip,
        remote_ip: conn.source_ip,
        destination_ip: conn.destination.ip(),
        destination_port: conn.destination.port(),
        sni: None,
        http: None,
    };
    let verdict = evaluate(snapshot.ztunnel_policies(workload), &attrs);
    if !verdict.allowed {
        let policy = verdict
            .policy
            .map(|p| format!("{}/{}", p.namespace(), p.name()));
        return Err(Refusal::Denied(policy));
    }
    Ok(())
}

/// When `workload` is bound to waypoints (its own, or its services'), only those waypoints may
/// call it: anyone else, plaintext callers included, would skip the L7 policy the waypoint
/// enforces. Returns the waypoints that were bypassed, or `None` when the caller may connect.
///
/// Upstream ztunnel leaves this to an ALLOW policy istiod can add
/// (`PILOT_AUTO_ALLOW_WAYPOINT_POLICY`), which has the same effect; enforcing it here makes "no
/// bypass" hold without it.
fn bypassed_waypoint(
    snapshot: &Snapshot,
    workload: &Workload,
    caller: Option<&Identity>,
) -> Option<String> {
    let bound = workload.waypoint.into_iter().chain(
        workload
            .services
            .iter()
            .filter_map(|&s| snapshot.service(s).waypoint),
    );
    let mut names = Vec::new();
    for id in bound {
        let waypoint = snapshot.waypoint(id);
        if let Some(caller) = caller
            && waypoint
                .instances
                .iter()
                .any(|&i| snapshot.workload(i).identity == *caller)
        {
            return None;
        }
        names.push(format!("{}/{}", waypoint.namespace, waypoint.name));
    }
    (!names.is_empty()).then(|| names.join(", "))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::FutureExt;
    use mesh::{ConfigDir, Options};

    use super::*;
    use crate::proxy::live::LiveConnections;

    /// `app` is ambient; `guarded` (10.0.0.2) backs a service bound to waypoint `wp` (10.0.0.9),
    /// `open` (10.0.0.3) has no waypoint; `sandwich-0` (10.0.0.4) is a sandwiched waypoint's pod.
    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: app}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: wp, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {serviceAccountName: wp}
status: {podIP: 10.0.0.9}
---
apiVersion: v1
kind: Service
metadata: {name: guarded, namespace: app, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.2, selector: {app: guarded}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: guarded, namespace: app, labels: {app: guarded}}
spec: {serviceAccountName: guarded}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: open, namespace: app}
spec: {serviceAccountName: open}
status: {podIP: 10.0.0.3}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: sandwich
  namespace: app
  annotations: {ambient.istio.io/waypoint-inbound-binding: PROXY/15088}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Pod
metadata: {name: sandwich-0, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: sandwich}}
spec: {serviceAccountName: sandwich}
status: {podIP: 10.0.0.4}
"#;

    const STRICT: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: app}
spec: {mtls: {mode: STRICT}}
"#;

    fn uid(pod: &str) -> String {
        format!("Kubernetes//v1/Pod/app/{pod}")
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "app", sa).unwrap()
    }

    fn check(
        snapshot: &Snapshot,
        pod: &str,
        source: Option<&Identity>,
        to: &str,
    ) -> Result<(), Refusal> {
        let workload = snapshot.workload_by_uid(&uid(pod)).expect(pod);
        let conn = Inbound {
            source,
            source_ip: "10.0.0.50".parse().unwrap(),
            destination: to.parse().unwrap(),
        };
        admit(snapshot, workload, &conn)
    }

    #[test]
    fn each_check_refuses_what_it_should() {
        let s = Snapshot::from_yaml("mesh.yaml", MESH, &Options::default()).unwrap();
        let (client, wp) = (id("client"), id("wp"));
        assert_eq!(
            check(&s, "open", None, "10.0.0.3:8080"),
            Ok(()),
            "PERMISSIVE plaintext"
        );
        assert_eq!(check(&s, "open", Some(&client), "10.0.0.3:8080"), Ok(()));
        assert_eq!(
            check(&s, "guarded", Some(&wp), "10.0.0.2:8080"),
            Ok(()),
            "from its waypoint"
        );
        assert_eq!(
            check(&s, "guarded", Some(&client), "10.0.0.2:8080"),
            Err(Refusal::Bypass("app/wp".into()))
        );
        assert_eq!(
            check(&s, "guarded", None, "10.0.0.2:8080"),
            Err(Refusal::Bypass("app/wp".into())),
            "plaintext skips the waypoint too"
        );
        assert_eq!(
            check(&s, "sandwich-0", None, "10.0.0.4:15088"),
            Err(Refusal::ProxyPort)
        );
        assert_eq!(
            check(&s, "sandwich-0", None, "10.0.0.4:8080"),
            Ok(()),
            "another port"
        );
        assert_eq!(
            check(&s, "sandwich-0", Some(&client), "10.0.0.4:15088"),
            Ok(()),
            "ztunnel's own tunnel"
        );

        let strict = Snapshot::from_yaml(
            "mesh.yaml",
            &format!("{MESH}---{STRICT}"),
            &Options::default(),
        )
        .unwrap();
        assert_eq!(
            check(&strict, "open", None, "10.0.0.3:8080"),
            Err(Refusal::Strict)
        );
        assert_eq!(
            check(&strict, "open", Some(&client), "10.0.0.3:8080"),
            Ok(())
        );
    }

    /// A change published before the handler reads the configuration is in what it reads; one
    /// published after reaches the registration, which the handler made first. Either way the
    /// connection is refused.
    #[test]
    fn a_change_on_either_side_of_admission_refuses_the_connection() {
        let dir = std::env::temp_dir().join(format!("ztunnel-admission-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
        let mut config = ConfigDir::new(&dir, Options::default());
        let store = Store::open(&mut config).unwrap();
        let live = Arc::new(LiveConnections::default());
        let conn = Inbound {
            source: None,
            source_ip: "10.0.0.50".parse().unwrap(),
            destination: "10.0.0.3:8080".parse().unwrap(),
        };
        let register = || live.register(uid("open").into(), None, conn.source_ip, conn.destination);

        let before = register();
        assert_eq!(admit_now(&store, &uid("open"), &conn), Ok(()));
        std::fs::write(dir.join("strict.yaml"), STRICT).unwrap();
        store.reload(&mut config).unwrap();
        assert_eq!(
            live.reevaluate(&store.load()),
            1,
            "the registration is re-checked"
        );
        assert!(
            before.closed().now_or_never().is_some(),
            "and told to close"
        );

        let after = register();
        assert_eq!(admit_now(&store, &uid("open"), &conn), Err(Refusal::Strict));
        drop(after);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
