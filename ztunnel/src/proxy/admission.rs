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

use super::live::Registration;

/// Who is connecting, and to where on the workload.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conn<'a> {
    /// The caller's identity, proven by mTLS; `None` for plaintext.
    pub(crate) source: Option<&'a Identity>,
    pub(crate) source_ip: IpAddr,
    /// Where the connection goes on the workload (what policy sees as the destination).
    pub(crate) destination: SocketAddr,
}

/// Why a connection is refused; its message is the access log's error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Plaintext to a sandwiched waypoint's PROXY port, which only ztunnel may write to.
    ProxyPort,
    /// Plaintext under a STRICT PeerAuthentication.
    Strict,
    /// The workload is bound to these waypoints, the caller is none of them, and no
    /// AuthorizationPolicy of the user's allows it explicitly.
    Bypass(String),
    /// An AuthorizationPolicy denies it (the policy, when one decided).
    Denied(Option<String>),
    /// The workload is no longer in the configuration.
    Gone,
}

impl Refused {
    /// The access log's and metrics' response flag: a workload that is gone is no route, the
    /// rest are denials.
    pub(crate) fn response_flag(&self) -> &'static str {
        match self {
            Self::Gone => "NR",
            _ => "DENY",
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ProxyPort => f.write_str(
                "plaintext refused: the sandwiched waypoint's PROXY port takes tunnels from ztunnel only",
            ),
            Self::Strict => f.write_str("plaintext refused: PeerAuthentication requires mTLS (STRICT)"),
            Self::Bypass(waypoints) => write!(
                f,
                "the caller bypasses the destination's waypoint ({waypoints}) and no ALLOW policy admits it"
            ),
            Self::Denied(Some(policy)) => write!(f, "RBAC: access denied by {policy}"),
            Self::Denied(None) => f.write_str("RBAC: access denied: no ALLOW policy matches"),
            Self::Gone => f.write_str("the workload is no longer in the configuration"),
        }
    }
}

/// Admits `conn` to the workload `uid` by the configuration current now, and records which
/// configuration that was on `registration`. The connection must be registered first (hence
/// the argument): a change published before this reads the configuration is in what it reads,
/// and one published after is re-checked against the registration, so none slips between.
pub(crate) fn admit_now(
    store: &Store,
    uid: &str,
    conn: &Conn<'_>,
    registration: &Registration,
) -> Result<(), Refused> {
    let snapshot = store.load();
    // Gone from the configuration, the workload is refused; named on another node or outside
    // the mesh, it is not: its proxy stops, and its connections finish as a draining proxy's.
    let workload = snapshot.workload_by_uid(uid).ok_or(Refused::Gone)?;
    admit(&snapshot, workload, conn)?;
    registration.admitted_under(snapshot.version());
    Ok(())
}

/// Admits `conn` to `workload`, or says why not.
pub(crate) fn admit(
    snapshot: &Snapshot,
    workload: &Workload,
    conn: &Conn<'_>,
) -> Result<(), Refused> {
    if conn.source.is_none() {
        // A sandwiched waypoint trusts the PROXY header on its binding port (every port, when
        // the binding names none): only ztunnel may write one, after terminating mTLS.
        let port = conn.destination.port();
        if (workload.app_tunnel).is_some_and(|t| t.port.is_none_or(|p| p == port)) {
            return Err(Refused::ProxyPort);
        }
        if snapshot.mtls_mode(workload, port) == MtlsMode::Strict {
            return Err(Refused::Strict);
        }
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
    let by = |p: &mesh::authz::Policy| format!("{}/{}", p.namespace(), p.name());
    match (
        waypoint_gate(snapshot, workload, conn.source),
        verdict.policy,
    ) {
        // A DENY (or CUSTOM) policy that matches refuses everyone, waypoints included.
        (_, Some(policy)) if !verdict.allowed => Err(Refused::Denied(Some(by(policy)))),
        (Gate::Open, _) if verdict.allowed => Ok(()),
        (Gate::Open, _) => Err(Refused::Denied(None)),
        // The waypoint's own implicit ALLOW matches it.
        (Gate::FromWaypoint, _) => Ok(()),
        // Someone else: only an ALLOW policy of the user's that matches lets it past.
        (Gate::Bypassed(_), Some(_)) if verdict.allowed => Ok(()),
        (Gate::Bypassed(waypoints), _) => Err(Refused::Bypass(waypoints)),
    }
}

/// What the waypoints bound to a workload say about a caller.
enum Gate {
    /// The workload has none.
    Open,
    /// The caller is one of them.
    FromWaypoint,
    /// The caller is none of them (their names).
    Bypassed(String),
}

/// When `workload` is bound to waypoints (its own, or its services'), a caller that is none of
/// them, plaintext callers included, would skip the L7 policy the waypoint enforces.
///
/// This is the implicit ALLOW policy istiod gives such workloads with
/// `PILOT_AUTO_ALLOW_WAYPOINT_POLICY` (`implicitWaypointPolicies`: the waypoint's principals,
/// for the workload's own waypoint and its services'): enforced here whether or not the
/// control plane sends it, and with the same effect: the waypoint passes, DENY policies still
/// apply to it, and anyone else needs an ALLOW policy of the user's to get in.
fn waypoint_gate(snapshot: &Snapshot, workload: &Workload, caller: Option<&Identity>) -> Gate {
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
            return Gate::FromWaypoint;
        }
        names.push(format!("{}/{}", waypoint.namespace, waypoint.name));
    }
    if names.is_empty() {
        Gate::Open
    } else {
        Gate::Bypassed(names.join(", "))
    }
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

    /// The monitoring system, outside the mesh, may scrape `guarded` directly; `client` may
    /// never reach it, not even through the waypoint.
    const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: scrape, namespace: app}
spec:
  selector: {matchLabels: {app: guarded}}
  action: ALLOW
  rules: [{from: [{source: {ipBlocks: [10.0.0.60/32]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-client, namespace: app}
spec:
  selector: {matchLabels: {app: guarded}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/app/sa/wp]}}], to: [{operation: {ports: ["9090"]}}]}]
"#;

    fn uid(pod: &str) -> String {
        format!("Kubernetes//Pod/app/{pod}")
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "app", sa).unwrap()
    }

    fn mesh(extra: &str) -> Snapshot {
        Snapshot::from_yaml(
            "mesh.yaml",
            &format!("{MESH}---{extra}"),
            &Options::default(),
        )
        .unwrap()
    }

    fn check(
        snapshot: &Snapshot,
        pod: &str,
        (source, from): (Option<&Identity>, &str),
        to: &str,
    ) -> Result<(), Refused> {
        let workload = snapshot.workload_by_uid(&uid(pod)).expect(pod);
        let conn = Conn {
            source,
            source_ip: from.parse().unwrap(),
            destination: to.parse().unwrap(),
        };
        admit(snapshot, workload, &conn)
    }

    #[test]
    fn each_check_refuses_what_it_should() {
        let s = mesh("");
        let (client, wp) = (id("client"), id("wp"));
        let plaintext = (None, "10.0.0.50");
        let bypass = Err(Refused::Bypass("app/wp".into()));
        assert_eq!(
            check(&s, "open", plaintext, "10.0.0.3:8080"),
            Ok(()),
            "PERMISSIVE"
        );
        assert_eq!(
            check(&s, "open", (Some(&client), "10.0.0.1"), "10.0.0.3:8080"),
            Ok(())
        );
        assert_eq!(
            check(&s, "guarded", (Some(&wp), "10.0.0.9"), "10.0.0.2:8080"),
            Ok(())
        );
        assert_eq!(
            check(&s, "guarded", (Some(&client), "10.0.0.1"), "10.0.0.2:8080"),
            bypass
        );
        assert_eq!(
            check(&s, "guarded", plaintext, "10.0.0.2:8080"),
            bypass,
            "plaintext too"
        );
        assert_eq!(
            check(&s, "sandwich-0", plaintext, "10.0.0.4:15088"),
            Err(Refused::ProxyPort)
        );
        assert_eq!(
            check(&s, "sandwich-0", plaintext, "10.0.0.4:8080"),
            Ok(()),
            "another port"
        );
        assert_eq!(
            check(
                &s,
                "sandwich-0",
                (Some(&client), "10.0.0.1"),
                "10.0.0.4:15088"
            ),
            Ok(()),
            "ztunnel's own tunnel"
        );

        let strict = mesh(STRICT);
        assert_eq!(
            check(&strict, "open", plaintext, "10.0.0.3:8080"),
            Err(Refused::Strict)
        );
        assert_eq!(
            check(
                &strict,
                "open",
                (Some(&client), "10.0.0.1"),
                "10.0.0.3:8080"
            ),
            Ok(())
        );
    }

    /// As istiod's implicit ALLOW for the waypoint: an ALLOW policy of the user's admits a
    /// caller that skips the waypoint, the waypoint needs none, and DENY binds it too.
    #[test]
    fn the_waypoint_gate_is_an_allow_policy_among_the_users() {
        let s = mesh(POLICIES);
        let (client, wp) = (id("client"), id("wp"));
        assert_eq!(
            check(&s, "guarded", (None, "10.0.0.60"), "10.0.0.2:8080"),
            Ok(()),
            "scrape"
        );
        assert_eq!(
            check(&s, "guarded", (None, "10.0.0.61"), "10.0.0.2:8080"),
            Err(Refused::Bypass("app/wp".into()))
        );
        assert_eq!(
            check(&s, "guarded", (Some(&client), "10.0.0.1"), "10.0.0.2:8080"),
            Err(Refused::Bypass("app/wp".into()))
        );
        assert_eq!(
            check(&s, "guarded", (Some(&wp), "10.0.0.9"), "10.0.0.2:8080"),
            Ok(())
        );
        assert_eq!(
            check(&s, "guarded", (Some(&wp), "10.0.0.9"), "10.0.0.2:9090"),
            Err(Refused::Denied(Some("app/no-client".into())))
        );
    }

    /// A change published before the handler reads the configuration is in what it reads; one
    /// published after reaches the registration, which the handler must make first. Either way
    /// the connection is refused, and a re-check against a configuration older than the one it
    /// was admitted under leaves it alone.
    #[test]
    fn a_change_on_either_side_of_admission_refuses_the_connection() {
        let dir = std::env::temp_dir().join(format!("ztunnel-admission-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("mesh.yaml"), MESH).unwrap();
        let mut config = ConfigDir::new(&dir, Options::default());
        let store = Store::open(&mut config).unwrap();
        let live = Arc::new(LiveConnections::default());
        let conn = Conn {
            source: None,
            source_ip: "10.0.0.50".parse().unwrap(),
            destination: "10.0.0.3:8080".parse().unwrap(),
        };
        let source = SocketAddr::new(conn.source_ip, 40000);
        let register = || live.register(uid("open").into(), None, source, conn.destination, None);
        let first = store.load();

        let before = register();
        assert_eq!(admit_now(&store, &uid("open"), &conn, &before), Ok(()));
        std::fs::write(dir.join("strict.yaml"), STRICT).unwrap();
        store.reload(&mut config).unwrap();
        assert_eq!(live.reevaluate(&first), 0, "an older configuration");
        assert_eq!(
            live.reevaluate(&store.load()),
            1,
            "the registration is re-checked"
        );
        assert_eq!(before.refused(), Some(Refused::Strict));
        assert_eq!(before.closed().now_or_never(), Some(Refused::Strict));

        let after = register();
        assert_eq!(
            admit_now(&store, &uid("open"), &conn, &after),
            Err(Refused::Strict)
        );
        assert_eq!(after.refused(), None, "refused on arrival, not closed");
        drop((before, after));
        assert!(live.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
