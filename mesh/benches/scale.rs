//! The mesh model at scale: 10,000 services, 50,000 pods, 5,000 authorization policies and
//! 10,000 HTTPRoutes, generated as YAML files (100 namespaces × 4 files, plus 50 mesh-wide
//! policies so that every workload has 100 policies in scope), then:
//!
//! * full load: read, parse (on all cores) and index the whole directory, cold;
//! * rebuild after one file changes: one namespace's routes file edited, warm parse cache;
//! * snapshot memory per workload and per service (live heap bytes, counted by the allocator,
//!   of snapshots built from pods only and from pods plus services, parse cache dropped);
//! * policy evaluation per connection with 100 policies in scope (50 DENY that do not match,
//!   50 ALLOW with the matching one last), at L4 as ztunnel evaluates and at L7 as the waypoint
//!   does.
//!
//! Run with `cargo bench -p mesh --bench scale`; `MESH_BENCH_QUICK=1` generates a tenth of the
//! mesh (a smoke run, not figures to quote).

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mesh::authz::{Attributes, HttpAttributes, evaluate};
use mesh::{ConfigDir, Options};

/// jemalloc, as the proxies ship; its statistics give the memory figures.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes currently allocated by the application (jemalloc's `stats.allocated`).
fn live() -> isize {
    let _ = tikv_jemalloc_ctl::epoch::advance();
    tikv_jemalloc_ctl::stats::allocated::read().map_or(0, |b| b as isize)
}

/// Root-namespace policies, in scope for every workload.
const MESH_POLICIES: usize = 50;

struct Scale {
    namespaces: usize,
    services_per_ns: usize,
    pods_per_service: usize,
    policies_per_ns: usize,
    routes_per_ns: usize,
}

fn main() {
    let quick = std::env::var_os("MESH_BENCH_QUICK").is_some();
    let scale = Scale {
        namespaces: if quick { 10 } else { 100 },
        services_per_ns: 100,
        pods_per_service: 5,
        policies_per_ns: 50,
        routes_per_ns: 100,
    };
    let root = std::env::temp_dir().join(format!("mesh-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let started = Instant::now();
    let bytes = generate(&root, &scale, Parts::all());
    let services = scale.namespaces * scale.services_per_ns;
    let pods = services * scale.pods_per_service;
    println!(
        "mesh scale benchmark: {services} services, {pods} pods, {} policies, {} routes \
         ({:.1} MiB of YAML in {} files, generated in {:.1} s)",
        scale.namespaces * scale.policies_per_ns + MESH_POLICIES,
        scale.namespaces * scale.routes_per_ns,
        bytes as f64 / (1 << 20) as f64,
        scale.namespaces * 4,
        started.elapsed().as_secs_f64()
    );
    println!();

    // Full load, cold.
    let mut dir = ConfigDir::new(&root, Options::default());
    let started = Instant::now();
    let snapshot = dir
        .load(1)
        .unwrap_or_else(|e| panic!("generated mesh is invalid: {e}"));
    let load = started.elapsed();
    assert_eq!(snapshot.services().len(), services);
    assert_eq!(snapshot.workloads().len(), pods);

    // Rebuild after one file changes (median of 5 edits).
    let mut rebuilds = Vec::new();
    for i in 0..5 {
        let file = root.join("ns-0").join("routes.yaml");
        let text = std::fs::read_to_string(&file).expect("read routes");
        std::fs::write(
            &file,
            text.replacen("prefix-0", &format!("prefix-edit-{i}"), 1),
        )
        .expect("edit routes");
        let started = Instant::now();
        let s = dir
            .load(2 + i)
            .unwrap_or_else(|e| panic!("edited mesh is invalid: {e}"));
        rebuilds.push(started.elapsed());
        drop(s);
    }
    rebuilds.sort();
    let rebuild = rebuilds[rebuilds.len() / 2];

    // Policy evaluation with 100 policies in scope.
    let (l4_ns, l7_ns) = evaluation_cost(&snapshot);
    drop(snapshot);
    drop(dir);

    // Memory: pods only, then pods and services, each without the parse cache.
    let per_workload = snapshot_bytes(&root, &scale, Parts::pods()) as f64 / pods as f64;
    let with_services = snapshot_bytes(&root, &scale, Parts::pods_and_services());
    let per_service = (with_services as f64 - per_workload * pods as f64) / services as f64;
    let _ = std::fs::remove_dir_all(&root);

    let target = |quick_note: &str| {
        if quick {
            quick_note.to_owned()
        } else {
            String::new()
        }
    };
    verdict(
        "full load (s)",
        load.as_secs_f64(),
        "3.00",
        load <= Duration::from_secs(3),
    );
    verdict(
        "rebuild after one file changes (s)",
        rebuild.as_secs_f64(),
        "1.00",
        rebuild <= Duration::from_secs(1),
    );
    verdict(
        "snapshot bytes per workload",
        per_workload,
        "2048",
        per_workload <= 2048.0,
    );
    verdict(
        "snapshot bytes per service",
        per_service,
        "4096",
        per_service <= 4096.0,
    );
    verdict(
        "L4 evaluation, 100 policies (µs)",
        l4_ns / 1000.0,
        "2.00",
        l4_ns <= 2000.0,
    );
    verdict(
        "L7 evaluation, 100 policies (µs)",
        l7_ns / 1000.0,
        "2.00",
        l7_ns <= 2000.0,
    );
    print!(
        "{}",
        target("\n(quick run: a tenth of the mesh; figures are not comparable)\n")
    );
}

fn verdict(what: &str, value: f64, target: &str, ok: bool) {
    let mark = if ok { "ok" } else { "MISSED" };
    println!("{what:>40}: {value:10.2}   target {target:>6}   {mark}");
}

/// Evaluates the 100 policies of namespace `ns-0` for a connection that only the last ALLOW
/// admits; returns nanoseconds per evaluation at L4 and L7.
fn evaluation_cost(snapshot: &mesh::Snapshot) -> (f64, f64) {
    let target = snapshot
        .workloads()
        .iter()
        .find(|w| &*w.namespace == "ns-0")
        .expect("a workload in ns-0");
    let l4: Vec<_> = snapshot.ztunnel_policies(target).collect();
    assert_eq!(l4.len(), 100, "policies in scope");
    let source: hbone::Identity = "spiffe://cluster.local/ns/ns-0/sa/sa-49"
        .parse()
        .expect("id");
    let headers = http::HeaderMap::new();
    let mut attrs = Attributes {
        source: Some(&source),
        source_ip: "10.1.0.1".parse::<IpAddr>().expect("ip"),
        remote_ip: "10.1.0.1".parse::<IpAddr>().expect("ip"),
        destination_ip: target.ips[0],
        destination_port: 8080,
        sni: None,
        http: None,
    };
    let verdict = evaluate(snapshot.ztunnel_policies(target), &attrs);
    assert!(verdict.allowed, "the last ALLOW admits the connection");
    let l4_ns = time_per_call(|| evaluate(snapshot.ztunnel_policies(target), &attrs).allowed);
    attrs.http = Some(HttpAttributes {
        method: "GET",
        path: "/api/v1/items?page=2",
        host: "svc-0.ns-0.svc.cluster.local",
        headers: &headers,
    });
    let policies: Vec<&mesh::authz::Policy> = snapshot
        .policies()
        .iter()
        .map(|e| &e.policy)
        .filter(|p| p.namespace() == "ns-0" || p.namespace() == "istio-system")
        .collect();
    assert_eq!(policies.len(), 100);
    let verdict = evaluate(policies.iter().copied(), &attrs);
    assert!(verdict.allowed);
    let l7_ns = time_per_call(|| evaluate(policies.iter().copied(), &attrs).allowed);
    (l4_ns, l7_ns)
}

fn time_per_call(mut f: impl FnMut() -> bool) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let n = 100_000;
        let started = Instant::now();
        let mut allowed = 0usize;
        for _ in 0..n {
            allowed += usize::from(std::hint::black_box(f()));
        }
        assert_eq!(allowed, n);
        best = best.min(started.elapsed().as_nanos() as f64 / n as f64);
    }
    best
}

fn snapshot_bytes(root: &Path, scale: &Scale, parts: Parts) -> isize {
    let _ = std::fs::remove_dir_all(root);
    generate(root, scale, parts);
    let before = live();
    let mut dir = ConfigDir::new(root, Options::default());
    let snapshot = dir
        .load(1)
        .unwrap_or_else(|e| panic!("generated mesh is invalid: {e}"));
    drop(dir);
    let bytes = live() - before;
    drop(snapshot);
    bytes
}

#[derive(Clone, Copy)]
struct Parts {
    services: bool,
    policies_and_routes: bool,
}

impl Parts {
    fn all() -> Self {
        Parts {
            services: true,
            policies_and_routes: true,
        }
    }
    fn pods() -> Self {
        Parts {
            services: false,
            policies_and_routes: false,
        }
    }
    fn pods_and_services() -> Self {
        Parts {
            services: true,
            policies_and_routes: false,
        }
    }
}

/// Writes the mesh; returns the bytes written.
fn generate(root: &Path, scale: &Scale, parts: Parts) -> usize {
    let mut total = 0;
    if parts.policies_and_routes {
        // Mesh-wide policies (root namespace) that match nobody: with a namespace's own 50,
        // every workload has 100 policies in scope.
        let mut mesh = String::new();
        for p in 0..MESH_POLICIES {
            let action = if p % 2 == 0 { "DENY" } else { "ALLOW" };
            let _ = write!(
                mesh,
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: mesh-{p}\n  namespace: istio-system\n\
                 spec:\n  action: {action}\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/istio-system/sa/mesh-{p}]\n"
            );
        }
        std::fs::create_dir_all(root).expect("mkdir");
        total += mesh.len();
        std::fs::write(root.join("mesh-policies.yaml"), mesh).expect("write");
    }
    for n in 0..scale.namespaces {
        let ns = format!("ns-{n}");
        let dir: PathBuf = root.join(&ns);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut pods = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels: {{istio.io/dataplane-mode: ambient}}\n"
        );
        let mut services = String::new();
        for s in 0..scale.services_per_ns {
            let id = n * scale.services_per_ns + s;
            let _ = write!(
                services,
                "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc-{s}\n  namespace: {ns}\n  labels: {{app: svc-{s}}}\n\
                 spec:\n  clusterIP: 10.{}.{}.{}\n  selector: {{app: svc-{s}}}\n  ports:\n  - {{name: http, port: 80, targetPort: http}}\n  - {{name: grpc, port: 9090, targetPort: 9090}}\n",
                96 + id / 65536,
                (id / 256) % 256,
                id % 256
            );
            for p in 0..scale.pods_per_service {
                let pid = id * scale.pods_per_service + p;
                let _ = write!(
                    pods,
                    "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: svc-{s}-v{v}-7d9f8-{p:05}\n  namespace: {ns}\n  labels: {{app: svc-{s}, version: v{v}, pod-template-hash: 7d9f8}}\n\
                     spec:\n  nodeName: node-{node}\n  serviceAccountName: sa-{s}\n  containers:\n  - name: app\n    ports: [{{name: http, containerPort: 8080}}]\n\
                     status:\n  phase: Running\n  podIP: 10.{}.{}.{}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
                    pid / 65536,
                    (pid / 256) % 256,
                    pid % 256,
                    v = p % 2 + 1,
                    node = pid % 50,
                );
            }
        }
        let mut policies = String::new();
        let mut routes = String::new();
        if parts.policies_and_routes {
            for p in 0..scale.policies_per_ns {
                // DENY: an L4 source that does not match plus HTTP conditions (which ztunnel
                // drops); ALLOW: L4 only, so both layers admit the benchmark's connection.
                if p < scale.policies_per_ns / 2 {
                    let _ = write!(
                        policies,
                        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: policy-{p}\n  namespace: {ns}\n\
                         spec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/{ns}/sa/sa-{p}]\n\
                         \x20   to:\n    - operation:\n        methods: [DELETE]\n        paths: [/admin/*]\n\
                         \x20   when:\n    - key: request.headers[x-tenant]\n      values: [blocked-{p}]\n"
                    );
                } else {
                    let _ = write!(
                        policies,
                        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: policy-{p}\n  namespace: {ns}\n\
                         spec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/{ns}/sa/sa-{p}]\n        ipBlocks: [10.0.0.0/8]\n\
                         \x20   to:\n    - operation:\n        ports: [\"8080\", \"9090\"]\n"
                    );
                }
            }
            for r in 0..scale.routes_per_ns {
                let _ = write!(
                    routes,
                    "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: route-{r}\n  namespace: {ns}\n\
                     spec:\n  parentRefs: [{{group: \"\", kind: Service, name: svc-{r}, port: 80}}]\n  rules:\n\
                     \x20 - matches: [{{path: {{type: PathPrefix, value: /prefix-{r}}}}}, {{headers: [{{name: x-canary, value: \"true\"}}]}}]\n\
                     \x20   backendRefs: [{{name: svc-{r}, port: 80, weight: 90}}, {{name: svc-{}, port: 80, weight: 10}}]\n\
                     \x20   timeouts: {{request: 10s}}\n  - backendRefs: [{{name: svc-{r}, port: 80}}]\n",
                    (r + 1) % scale.services_per_ns
                );
            }
        }
        let files = [
            ("pods.yaml", pods),
            (
                "services.yaml",
                if parts.services {
                    services
                } else {
                    String::new()
                },
            ),
            ("policies.yaml", policies),
            ("routes.yaml", routes),
        ];
        for (name, text) in files {
            total += text.len();
            std::fs::write(dir.join(name), text).expect("write");
        }
    }
    total
}
