//! Endpoint choice and outlier detection on a small mesh: service `web` (four pods, subsets
//! `v1` and `v2`, a second port only `web-a` has) and service `vm` (two weighted
//! WorkloadEntries).

use std::collections::{BTreeMap, BTreeSet};

use ::http::{HeaderName, HeaderValue};
use mesh::Options;
use mesh::route::{ConsistentHash, HashTable};

use super::*;

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: http-admin, port: 81, targetPort: admin}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, namespace: shop, labels: {app: web, version: v1}}
spec:
  nodeName: node-a
  containers: [{name: app, ports: [{name: admin, containerPort: 9090}]}]
status: {podIP: 10.0.1.1, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, namespace: shop, labels: {app: web, version: v1}}
spec: {nodeName: node-a}
status: {podIP: 10.0.1.2, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: web-c, namespace: shop, labels: {app: web, version: v2}}
spec: {nodeName: node-b}
status: {podIP: 10.0.2.1, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {name: web-d, namespace: shop, labels: {app: web, version: v2}}
spec: {nodeName: node-b}
status: {podIP: 10.0.2.2, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: vm, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  selector: {app: vm}
  ports: [{name: http, port: 80}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-light, namespace: shop, labels: {app: vm}}
spec: {address: 10.0.3.1, weight: 1}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-heavy, namespace: shop, labels: {app: vm}}
spec: {address: 10.0.3.2, weight: 3}
"#;

/// A pod whose uid sorts before the others, so that adding it moves every workload id.
const WEB_0: &str = r#"
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: shop, labels: {app: web, version: v1}}
spec: {nodeName: node-a}
status: {podIP: 10.0.1.10, phase: Running}
"#;

fn snapshot(extra: &str) -> Snapshot {
    Snapshot::from_yaml("test.yaml", &format!("{MESH}{extra}"), &Options::default())
        .unwrap_or_else(|e| panic!("configuration should be valid: {e}"))
}

fn service(s: &Snapshot, name: &str) -> ServiceId {
    s.service_by_name("shop", name).expect("service").0
}

/// Subset `name` of the DestinationRule a waypoint in `shop` applies to `web`.
fn subset<'n>(s: &Snapshot, name: &'n str) -> (DestinationRuleId, &'n str) {
    let web = s.service(service(s, "web"));
    let (rule, _) = s.destination_rule("shop", web).expect("web's rule");
    (rule, name)
}

fn workload(s: &Snapshot, name: &str) -> WorkloadId {
    let w = s.workloads().iter().find(|w| &*w.name == name);
    w.expect("workload").id
}

fn traffic(load_balancer: LoadBalancer) -> TrafficPolicy {
    TrafficPolicy {
        load_balancer,
        ..TrafficPolicy::default()
    }
}

fn detecting(load_balancer: LoadBalancer, detection: OutlierDetection) -> TrafficPolicy {
    TrafficPolicy {
        load_balancer,
        outlier_detection: Some(detection),
        ..TrafficPolicy::default()
    }
}

fn hashing(key: HashKey) -> LoadBalancer {
    LoadBalancer::ConsistentHash(ConsistentHash {
        key,
        table: HashTable::RingHash {
            minimum_ring_size: 1024,
        },
    })
}

/// A choice of `web` port 80, by name, released at once.
fn pick(
    b: &Balancer,
    s: &Snapshot,
    policy: &TrafficPolicy,
    subset: Option<&str>,
    exclude: &[WorkloadId],
) -> String {
    let chosen = (b.choose(
        s,
        service(s, "web"),
        0,
        subset.map(|name| self::subset(s, name)),
        policy,
        None,
        exclude,
        now(),
    ))
    .expect("an endpoint");
    assert_eq!(chosen.target_port, 8080);
    s.workload(chosen.workload).name.to_string()
}

/// How often each endpoint is picked in `n` choices.
fn tally(n: usize, mut pick: impl FnMut() -> String) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        *counts.entry(pick()).or_default() += 1;
    }
    counts
}

fn names(counts: &BTreeMap<String, usize>) -> Vec<&str> {
    counts.keys().map(String::as_str).collect()
}

fn now() -> Instant {
    Instant::now()
}

fn active(b: &Balancer, id: WorkloadId) -> u32 {
    b.workloads[id.index()].state.active.load(Relaxed)
}

fn ejected_names(b: &Balancer, s: &Snapshot, at: Instant) -> Vec<String> {
    let uids = b.ejected(at);
    let mut names: Vec<String> = (uids.iter())
        .map(|uid| s.workload_by_uid(uid).expect("uid").name.to_string())
        .collect();
    names.sort();
    names
}

fn fail(b: &Balancer, id: WorkloadId, times: usize, outcome: Outcome, d: &OutlierDetection) {
    for _ in 0..times {
        b.report(id, outcome, Some(d), now());
    }
}

const ALL: [&str; 4] = ["web-a", "web-b", "web-c", "web-d"];

// === load balancers ===

/// A ServiceEntry mixing an address with a DNS name: both are chosen, the name to be resolved
/// once it is.
#[test]
fn an_endpoint_that_is_a_dns_name_is_chosen_like_any_other() {
    let s = snapshot(
        r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: mixed, namespace: shop}
spec:
  hosts: [mixed.example.com]
  addresses: [240.0.0.9]
  ports: [{number: 80, name: http}]
  resolution: DNS
  endpoints: [{address: 10.0.9.1}, {address: far.example.net}]
"#,
    );
    let (id, mixed) = s.service_by_host("mixed.example.com").expect("service");
    assert_eq!(mixed.endpoints.len(), 2, "both are endpoints");
    let b = Balancer::new(&s, None);
    for policy in [
        LoadBalancer::RoundRobin,
        LoadBalancer::Random,
        LoadBalancer::LeastRequest,
    ] {
        let chosen = tally(20, || {
            let c = (b.choose(&s, id, 0, None, &traffic(policy.clone()), None, &[], now()))
                .expect("an endpoint");
            let w = s.workload(c.workload);
            (w.ips.first().map(|ip| ip.to_string()))
                .or_else(|| w.hostname.as_deref().map(str::to_owned))
                .unwrap_or_default()
        });
        assert_eq!(
            names(&chosen),
            ["10.0.9.1", "far.example.net"],
            "{policy:?}"
        );
    }
}

#[test]
fn round_robin_cycles_over_all_endpoints() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let policy = traffic(LoadBalancer::RoundRobin);
    let picks: Vec<String> = (0..12).map(|_| pick(&b, &s, &policy, None, &[])).collect();
    let first: BTreeSet<&str> = picks[..4].iter().map(String::as_str).collect();
    assert_eq!(first, BTreeSet::from(ALL), "{picks:?}");
    for (i, name) in picks.iter().enumerate().skip(4) {
        assert_eq!(name, &picks[i - 4], "in order: {picks:?}");
    }
}

#[test]
fn least_request_avoids_busy_endpoints() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let (web, a) = (service(&s, "web"), workload(&s, "web-a"));
    let others = [
        workload(&s, "web-b"),
        workload(&s, "web-c"),
        workload(&s, "web-d"),
    ];
    let policy = traffic(LoadBalancer::LeastRequest);
    let held: Vec<Chosen> = (0..3)
        .map(|_| b.choose(&s, web, 0, None, &policy, None, &others, now()))
        .map(|c| c.expect("web-a"))
        .collect();
    assert!(held.iter().all(|c| c.workload == a));
    assert_eq!(active(&b, a), 3);

    // web-a only wins when both draws are web-a: 1 in 9.
    let counts = tally(900, || pick(&b, &s, &policy, None, &[]));
    assert_eq!(names(&counts), ALL, "{counts:?}");
    assert!(counts["web-a"] < 200, "{counts:?}");
    for other in ["web-b", "web-c", "web-d"] {
        assert!(counts[other] > 200, "{counts:?}");
    }

    drop(held);
    assert_eq!(active(&b, a), 0);
    assert!(others.iter().all(|&o| active(&b, o) == 0));
}

#[test]
fn passthrough_balances_like_least_request() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let policy = traffic(LoadBalancer::Passthrough);
    let counts = tally(1000, || pick(&b, &s, &policy, None, &[]));
    assert_eq!(names(&counts), ALL);
}

#[test]
fn random_reaches_every_endpoint() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let policy = traffic(LoadBalancer::Random);
    let counts = tally(1000, || pick(&b, &s, &policy, None, &[]));
    assert_eq!(names(&counts), ALL);
    assert!(counts.values().all(|&n| n > 150), "{counts:?}");
}

#[test]
fn random_follows_workload_weights() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let vm = service(&s, "vm");
    let policy = traffic(LoadBalancer::Random);
    let counts = tally(4000, || {
        let chosen = b.choose(&s, vm, 0, None, &policy, None, &[], now());
        let chosen = chosen.expect("an endpoint");
        assert_eq!(chosen.target_port, 80);
        s.workload(chosen.workload).name.to_string()
    });
    // Weights 3 and 1: 3000 and 1000 expected, σ ≈ 27.
    assert!((2800..3200).contains(&counts["vm-heavy"]), "{counts:?}");
}

#[test]
fn endpoints_without_the_target_port_are_skipped() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let web = service(&s, "web");
    let a = workload(&s, "web-a");
    let header = HashKey::Header(HeaderName::from_static("x-user"));
    for lb in [
        LoadBalancer::RoundRobin,
        LoadBalancer::LeastRequest,
        LoadBalancer::Random,
        hashing(header),
    ] {
        let policy = traffic(lb);
        for k in 0..20 {
            // Port 81 targets the named port `admin`, which only web-a has.
            let chosen = b.choose(&s, web, 1, None, &policy, Some(k), &[], now());
            let chosen = chosen.expect("web-a");
            assert_eq!((chosen.workload, chosen.target_port), (a, 9090));
        }
        // Subset v2 has no endpoint with that port.
        assert!(
            (b.choose(
                &s,
                web,
                1,
                Some(subset(&s, "v2")),
                &policy,
                None,
                &[],
                now()
            ))
            .is_none(),
            "{policy:?}"
        );
    }
}

#[test]
fn consistent_hash_is_sticky_and_spreads_keys() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let other = Balancer::new(&s, None);
    let web = service(&s, "web");
    let key = HashKey::Header(HeaderName::from_static("x-user"));
    let policy = traffic(hashing(key.clone()));
    let choose = |b: &Balancer, user: &str, exclude: &[WorkloadId]| {
        let mut headers = HeaderMap::new();
        headers.insert("x-user", HeaderValue::from_str(user).expect("value"));
        let hash = hash_key(&key, &headers, "/", None);
        assert!(hash.is_some());
        let chosen = b.choose(&s, web, 0, None, &policy, hash, exclude, now());
        chosen.expect("an endpoint").workload
    };
    let users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let placed: Vec<WorkloadId> = users.iter().map(|u| choose(&b, u, &[])).collect();
    for (user, &at) in users.iter().zip(&placed) {
        assert_eq!(choose(&b, user, &[]), at, "same key, same endpoint");
        assert_eq!(choose(&other, user, &[]), at, "every balancer agrees");
    }
    let spread: BTreeSet<WorkloadId> = placed.iter().copied().collect();
    assert_eq!(spread.len(), 4, "200 keys reach all four endpoints");

    // Taking web-a away moves only the keys that were on it.
    let a = workload(&s, "web-a");
    for (user, &at) in users.iter().zip(&placed) {
        let moved = choose(&b, user, &[a]);
        if at == a {
            assert_ne!(moved, a);
        } else {
            assert_eq!(moved, at, "{user} stays");
        }
    }

    // Without the key the choice is random.
    let counts = tally(1000, || {
        let chosen = b.choose(&s, web, 0, None, &policy, None, &[], now());
        s.workload(chosen.expect("an endpoint").workload)
            .name
            .to_string()
    });
    assert_eq!(names(&counts), ALL);
}

#[test]
fn subsets_restrict_endpoints() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    for lb in [
        LoadBalancer::RoundRobin,
        LoadBalancer::LeastRequest,
        LoadBalancer::Random,
    ] {
        let policy = traffic(lb);
        let v1 = tally(200, || pick(&b, &s, &policy, Some("v1"), &[]));
        assert_eq!(names(&v1), ["web-a", "web-b"], "{policy:?}");
        let v2 = tally(200, || pick(&b, &s, &policy, Some("v2"), &[]));
        assert_eq!(names(&v2), ["web-c", "web-d"], "{policy:?}");
        let unknown = b.choose(
            &s,
            service(&s, "web"),
            0,
            Some(subset(&s, "v9")),
            &policy,
            None,
            &[],
            now(),
        );
        assert!(unknown.is_none());
    }
}

#[test]
fn round_robin_turns_are_per_subset() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let policy = traffic(LoadBalancer::RoundRobin);
    let picks: Vec<String> = (0..6)
        .map(|_| {
            // Interleaved picks of the whole service do not disturb the subset's alternation.
            pick(&b, &s, &policy, None, &[]);
            pick(&b, &s, &policy, Some("v1"), &[])
        })
        .collect();
    for pair in picks.windows(2) {
        assert_ne!(pair[0], pair[1], "{picks:?}");
    }
}

#[test]
fn exclude_skips_tried_endpoints_until_none_is_left() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let tried = [
        workload(&s, "web-a"),
        workload(&s, "web-b"),
        workload(&s, "web-c"),
    ];
    let key = HashKey::Header(HeaderName::from_static("x-user"));
    for lb in [
        LoadBalancer::RoundRobin,
        LoadBalancer::LeastRequest,
        LoadBalancer::Random,
        LoadBalancer::Passthrough,
        hashing(key),
    ] {
        let policy = traffic(lb);
        let counts = tally(100, || pick(&b, &s, &policy, None, &tried));
        assert_eq!(names(&counts), ["web-d"], "{policy:?}");
        // Everything tried: try again rather than fail.
        let all = [tried[0], tried[1], tried[2], workload(&s, "web-d")];
        let counts = tally(400, || pick(&b, &s, &policy, None, &all));
        assert_eq!(names(&counts), ALL, "{policy:?}");
        // v1 entirely tried: its endpoints again, never another subset's.
        let counts = tally(100, || pick(&b, &s, &policy, Some("v1"), &tried));
        assert!(
            names(&counts)
                .iter()
                .all(|n| ["web-a", "web-b"].contains(n))
        );
    }
}

// === outlier detection ===

fn consecutive_5xx(errors: u32, max_ejection_percent: u32) -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx_errors: errors,
        max_ejection_percent,
        ..OutlierDetection::default()
    }
}

#[test]
fn consecutive_5xx_eject_within_the_cap() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let [a, web_b, c] = ["web-a", "web-b", "web-c"].map(|n| workload(&s, n));
    let detection = consecutive_5xx(3, 10);

    fail(&b, a, 2, Outcome::ServerError(500), &detection);
    assert!(b.ejected(now()).is_empty(), "two errors are not three");
    fail(&b, a, 1, Outcome::ServerError(503), &detection);
    assert_eq!(ejected_names(&b, &s, now()), ["web-a"]);

    // Ejected endpoints are skipped while the policy detects outliers.
    let policy = detecting(LoadBalancer::RoundRobin, detection);
    let counts = tally(100, || pick(&b, &s, &policy, None, &[]));
    assert_eq!(names(&counts), ["web-b", "web-c", "web-d"]);
    let counts = tally(100, || {
        pick(&b, &s, &traffic(LoadBalancer::RoundRobin), None, &[])
    });
    assert_eq!(
        names(&counts),
        ALL,
        "without outlier detection nothing is skipped"
    );

    // 10% of four endpoints: the first ejection was allowed (Envoy always allows one), a
    // second is not.
    fail(&b, web_b, 3, Outcome::ServerError(500), &detection);
    assert_eq!(ejected_names(&b, &s, now()), ["web-a"]);

    // At 50%, a second endpoint may go (1 of 4 ejected is below 50%), a third may not.
    let half = consecutive_5xx(3, 50);
    fail(&b, web_b, 3, Outcome::ServerError(500), &half);
    fail(&b, c, 3, Outcome::ServerError(500), &half);
    assert_eq!(ejected_names(&b, &s, now()), ["web-a", "web-b"]);
}

#[test]
fn one_endpoint_is_ejectable_whatever_the_cap() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let [a, c] = ["web-a", "web-c"].map(|n| workload(&s, n));
    let detection = consecutive_5xx(1, 0);
    fail(&b, a, 1, Outcome::ServerError(500), &detection);
    fail(&b, c, 1, Outcome::ServerError(500), &detection);
    assert_eq!(ejected_names(&b, &s, now()), ["web-a"]);
}

#[test]
fn zero_consecutive_5xx_disables_ejection() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let a = workload(&s, "web-a");
    fail(
        &b,
        a,
        50,
        Outcome::ServerError(500),
        &consecutive_5xx(0, 100),
    );
    fail(
        &b,
        a,
        50,
        Outcome::LocalOriginFailure,
        &consecutive_5xx(0, 100),
    );
    assert!(b.ejected(now()).is_empty());
    // Without a policy, reports are ignored.
    for _ in 0..10 {
        b.report(a, Outcome::ServerError(500), None, now());
    }
    assert!(b.ejected(now()).is_empty());
}

#[test]
fn success_resets_the_count() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let a = workload(&s, "web-a");
    let detection = consecutive_5xx(3, 100);
    fail(&b, a, 2, Outcome::ServerError(500), &detection);
    b.report(a, Outcome::Success, Some(&detection), now());
    fail(&b, a, 2, Outcome::LocalOriginFailure, &detection);
    assert!(b.ejected(now()).is_empty());
    fail(&b, a, 1, Outcome::ServerError(500), &detection);
    assert_eq!(ejected_names(&b, &s, now()), ["web-a"]);
}

#[test]
fn ejection_expires_and_grows_with_each_ejection() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let a = workload(&s, "web-a");
    let detection = consecutive_5xx(1, 100);
    let t0 = now();
    let secs = |n| t0 + Duration::from_secs(n);
    b.report(a, Outcome::ServerError(500), Some(&detection), t0);
    assert_eq!(ejected_names(&b, &s, secs(29)), ["web-a"]);
    assert!(
        b.ejected(secs(31)).is_empty(),
        "back after the base ejection time"
    );
    let policy = detecting(LoadBalancer::Random, detection);
    let chosen = b.choose(
        &s,
        service(&s, "web"),
        0,
        Some(subset(&s, "v1")),
        &policy,
        None,
        &[],
        secs(31),
    );
    assert!(chosen.is_some());

    // Ejected again at once: twice the base time.
    b.report(a, Outcome::ServerError(500), Some(&detection), secs(31));
    assert_eq!(ejected_names(&b, &s, secs(31 + 59)), ["web-a"]);
    assert!(b.ejected(secs(31 + 61)).is_empty());

    // After a long healthy spell the multiplier is back to one.
    b.report(a, Outcome::ServerError(500), Some(&detection), secs(1000));
    assert_eq!(ejected_names(&b, &s, secs(1029)), ["web-a"]);
    assert!(b.ejected(secs(1031)).is_empty());
}

#[test]
fn ejection_time_is_capped() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let a = workload(&s, "web-a");
    let detection = OutlierDetection {
        base_ejection_time: Duration::from_secs(100),
        ..consecutive_5xx(1, 100)
    };
    let t0 = now();
    let mut at = t0;
    for _ in 0..6 {
        // Fail as soon as the previous ejection ends.
        while !b.ejected(at).is_empty() {
            at += Duration::from_secs(1);
        }
        b.report(a, Outcome::ServerError(500), Some(&detection), at);
    }
    // 100s, 200s, 300s, then 300s each time: Envoy's maximum.
    assert!(!b.ejected(at + Duration::from_secs(299)).is_empty());
    assert!(b.ejected(at + Duration::from_secs(301)).is_empty());
}

#[test]
fn gateway_errors_count_502_503_504_in_a_row() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let a = workload(&s, "web-a");
    let detection = OutlierDetection {
        consecutive_gateway_errors: Some(2),
        ..consecutive_5xx(0, 100)
    };
    fail(&b, a, 10, Outcome::ServerError(500), &detection);
    for status in [502, 500, 504, 505, 503] {
        b.report(a, Outcome::ServerError(status), Some(&detection), now());
    }
    assert!(b.ejected(now()).is_empty(), "a 500 or 505 breaks the run");
    b.report(a, Outcome::ServerError(502), Some(&detection), now());
    assert_eq!(ejected_names(&b, &s, now()), ["web-a"]);

    // Unsplit, a failure to connect is a gateway error too.
    let c = workload(&s, "web-c");
    fail(&b, c, 2, Outcome::LocalOriginFailure, &detection);
    assert_eq!(ejected_names(&b, &s, now()), ["web-a", "web-c"]);
}

#[test]
fn split_local_origin_failures_count_apart() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let [a, c] = ["web-a", "web-c"].map(|n| workload(&s, n));
    let split = OutlierDetection {
        split_external_local_origin_errors: true,
        consecutive_local_origin_failures: Some(2),
        ..consecutive_5xx(3, 100)
    };
    // Local-origin failures do not add to the 5xx count, and a response ends their run.
    fail(&b, a, 2, Outcome::ServerError(500), &split);
    fail(&b, a, 1, Outcome::LocalOriginFailure, &split);
    b.report(a, Outcome::ServerError(500), Some(&split), now());
    fail(&b, a, 1, Outcome::LocalOriginFailure, &split);
    assert_eq!(ejected_names(&b, &s, now()), ["web-a"], "third 5xx");
    fail(&b, c, 2, Outcome::LocalOriginFailure, &split);
    assert_eq!(ejected_names(&b, &s, now()), ["web-a", "web-c"]);

    // Envoy's default of 5 when the count is not set.
    let d = workload(&s, "web-d");
    let default = OutlierDetection {
        consecutive_local_origin_failures: None,
        ..split
    };
    fail(&b, d, 4, Outcome::LocalOriginFailure, &default);
    assert_eq!(ejected_names(&b, &s, now()).len(), 2);
    fail(&b, d, 1, Outcome::LocalOriginFailure, &default);
    assert_eq!(ejected_names(&b, &s, now()).len(), 3);
}

#[test]
fn ejected_endpoints_serve_when_none_is_healthy() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let [a, web_b] = ["web-a", "web-b"].map(|n| workload(&s, n));
    let detection = consecutive_5xx(1, 100);
    fail(&b, a, 1, Outcome::ServerError(500), &detection);
    fail(&b, web_b, 1, Outcome::ServerError(500), &detection);
    assert_eq!(ejected_names(&b, &s, now()), ["web-a", "web-b"]);
    let policy = detecting(LoadBalancer::LeastRequest, detection);
    let v1 = tally(200, || pick(&b, &s, &policy, Some("v1"), &[]));
    assert_eq!(
        names(&v1),
        ["web-a", "web-b"],
        "all of v1 is ejected: use it anyway"
    );
    let untried = tally(50, || pick(&b, &s, &policy, Some("v1"), &[a]));
    assert_eq!(names(&untried), ["web-b"], "and still skip what was tried");
    let all = tally(200, || pick(&b, &s, &policy, None, &[]));
    assert_eq!(names(&all), ["web-c", "web-d"]);

    // Below min_health_percent, ejections are ignored too (Envoy's panic threshold).
    let strict = detecting(
        LoadBalancer::LeastRequest,
        OutlierDetection {
            min_health_percent: 60,
            ..detection
        },
    );
    let all = tally(400, || pick(&b, &s, &strict, None, &[]));
    assert_eq!(names(&all), ALL, "2 of 4 healthy is below 60%");
}

#[test]
fn tried_endpoints_come_back_before_ejected_ones() {
    let s = snapshot("");
    let b = Balancer::new(&s, None);
    let [a, web_b] = ["web-a", "web-b"].map(|n| workload(&s, n));
    let detection = consecutive_5xx(1, 100);
    fail(&b, a, 1, Outcome::ServerError(500), &detection);
    for lb in [LoadBalancer::RoundRobin, LoadBalancer::LeastRequest] {
        let policy = detecting(lb, detection);
        let counts = tally(50, || pick(&b, &s, &policy, Some("v1"), &[web_b]));
        assert_eq!(names(&counts), ["web-b"], "{policy:?}");
    }
}

#[test]
fn state_carries_over_to_the_next_snapshot() {
    let s1 = snapshot("");
    let b1 = Balancer::new(&s1, None);
    let detection = consecutive_5xx(2, 100);
    let a1 = workload(&s1, "web-a");
    fail(&b1, a1, 2, Outcome::ServerError(500), &detection);
    let c1 = workload(&s1, "web-c");
    fail(&b1, c1, 1, Outcome::ServerError(500), &detection);
    let policy = traffic(LoadBalancer::LeastRequest);
    let others = [a1, workload(&s1, "web-c"), workload(&s1, "web-d")];
    let held = b1.choose(
        &s1,
        service(&s1, "web"),
        0,
        None,
        &policy,
        None,
        &others,
        now(),
    );
    let held = held.expect("web-b");

    // A new pod sorts first: every workload moves to another position.
    let s2 = snapshot(WEB_0);
    let b2 = Balancer::new(&s2, Some(&b1));
    let [a2, busy, c2] = ["web-a", "web-b", "web-c"].map(|n| workload(&s2, n));
    assert_ne!(a1, a2);
    assert_eq!(ejected_names(&b2, &s2, now()), ["web-a"]);
    let policy = detecting(LoadBalancer::Random, detection);
    let counts = tally(400, || pick(&b2, &s2, &policy, None, &[]));
    assert_eq!(names(&counts), ["web-0", "web-b", "web-c", "web-d"]);

    // Requests in flight are counted in the new balancer, and end there too.
    assert_eq!(active(&b2, busy), 1);
    drop(held);
    assert_eq!(active(&b2, busy), 0);

    // So is the failure count: one more error ejects web-c.
    fail(&b2, c2, 1, Outcome::ServerError(500), &detection);
    assert_eq!(ejected_names(&b2, &s2, now()), ["web-a", "web-c"]);
    // And the old balancer, still used by older requests, sees the same.
    assert_eq!(ejected_names(&b1, &s1, now()), ["web-a", "web-c"]);
}

// === hash keys ===

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for &(name, value) in pairs {
        map.append(name, HeaderValue::from_static(value));
    }
    map
}

#[test]
fn hash_key_of_a_header() {
    let key = HashKey::Header(HeaderName::from_static("x-user"));
    let hash = |pairs: &[(&'static str, &'static str)]| hash_key(&key, &headers(pairs), "/", None);
    let jason = hash(&[("x-user", "jason")]);
    assert!(jason.is_some());
    assert_eq!(jason, hash(&[("x-user", "jason"), ("x-other", "1")]));
    assert_ne!(jason, hash(&[("x-user", "alice")]));
    assert_eq!(hash(&[("x-other", "jason")]), None);
    // Repeated values: their order does not matter.
    assert_eq!(
        hash(&[("x-user", "a"), ("x-user", "b")]),
        hash(&[("x-user", "b"), ("x-user", "a")])
    );
    assert_ne!(
        hash(&[("x-user", "a"), ("x-user", "b")]),
        hash(&[("x-user", "a")])
    );
}

#[test]
fn hash_key_of_a_cookie() {
    let key = HashKey::Cookie {
        name: Arc::from("b"),
        path: None,
        ttl: None,
    };
    let hash = |cookie: &'static str| hash_key(&key, &headers(&[("cookie", cookie)]), "/", None);
    let two = hash("b=2");
    assert!(two.is_some());
    assert_eq!(hash("a=1; b=2"), two);
    assert_eq!(hash("a=1;b=2;c=3"), two);
    assert_eq!(hash("b=\"2\""), two, "quotes are not part of the value");
    assert_ne!(hash("a=1; b=3"), two);
    assert_eq!(hash("a=1; bb=2"), None);
    assert_eq!(hash_key(&key, &HeaderMap::new(), "/", None), None);
    // Several cookie headers (HTTP/2 sends one per cookie).
    let split = headers(&[("cookie", "a=1"), ("cookie", "b=2")]);
    assert_eq!(hash_key(&key, &split, "/", None), two);
}

#[test]
fn hash_key_of_a_query_parameter() {
    let key = HashKey::QueryParameter(Arc::from("user"));
    let hash = |target: &str| hash_key(&key, &HeaderMap::new(), target, None);
    let bob = hash("/?user=bob");
    assert!(bob.is_some());
    assert_eq!(hash("/cart?x=1&user=bob"), bob);
    assert_eq!(hash("/cart?user=bob&user=eve"), bob, "the first value");
    assert_ne!(hash("/cart?user=eve"), bob);
    assert_eq!(hash("/cart?username=bob"), None);
    assert_eq!(hash("/cart"), None);
    assert!(hash("/cart?user").is_some(), "present without a value");
}

#[test]
fn hash_key_of_the_source_ip() {
    let key = HashKey::SourceIp;
    let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
    let hash = |source: Option<IpAddr>| hash_key(&key, &HeaderMap::new(), "/", source);
    let one = hash(Some(ip("10.0.0.1")));
    assert!(one.is_some());
    assert_eq!(hash(Some(ip("::ffff:10.0.0.1"))), one);
    assert_ne!(hash(Some(ip("10.0.0.2"))), one);
    assert_eq!(hash(None), None);
}

// === near endpoints first ===

/// `node-a` in zone `z1`, `node-b` in `z2`; the waypoint's instance on `node-a`; service `near`
/// over the web pods, preferring the instance's zone, and `local`, which keeps to its node.
const ZONES: &str = r#"
---
apiVersion: v1
kind: Node
metadata: {name: node-a, labels: {topology.kubernetes.io/region: r, topology.kubernetes.io/zone: z1}}
---
apiVersion: v1
kind: Node
metadata: {name: node-b, labels: {topology.kubernetes.io/region: r, topology.kubernetes.io/zone: z2}}
---
apiVersion: v1
kind: Pod
metadata: {name: waypoint-1, namespace: shop}
spec: {nodeName: node-a}
status: {podIP: 10.0.9.1, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: near, namespace: shop}
spec:
  clusterIP: 10.96.0.30
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
  trafficDistribution: PreferClose
---
apiVersion: v1
kind: Service
metadata: {name: local, namespace: shop}
spec:
  clusterIP: 10.96.0.40
  selector: {version: v2}
  ports: [{name: http, port: 80, targetPort: 8080}]
  internalTrafficPolicy: Local
"#;

/// A choice of `name` port 80, by endpoint name, or None.
fn pick_of(
    b: &Balancer,
    s: &Snapshot,
    name: &str,
    policy: &TrafficPolicy,
    exclude: &[WorkloadId],
) -> Option<String> {
    let chosen = b.choose(s, service(s, name), 0, None, policy, None, exclude, now())?;
    Some(s.workload(chosen.workload).name.to_string())
}

#[test]
fn near_endpoints_serve_first_and_farther_ones_when_they_are_ejected() {
    let s = snapshot(ZONES);
    let b = Balancer::new(&s, None).measured_from(&s, "shop", Some(workload(&s, "waypoint-1")));
    for lb in [
        LoadBalancer::Random,
        LoadBalancer::RoundRobin,
        LoadBalancer::LeastRequest,
    ] {
        let what = format!("{lb:?}: the waypoint's zone");
        let policy = traffic(lb);
        let counts = tally(200, || {
            pick_of(&b, &s, "near", &policy, &[]).expect("endpoint")
        });
        assert_eq!(names(&counts), ["web-a", "web-b"], "{what}");
    }
    // Without a preference, or without knowing where the waypoint runs, every endpoint serves.
    let policy = traffic(LoadBalancer::Random);
    let counts = tally(400, || {
        pick_of(&b, &s, "web", &policy, &[]).expect("endpoint")
    });
    assert_eq!(names(&counts), ALL);
    let unplaced = Balancer::new(&s, None);
    let counts = tally(400, || {
        pick_of(&unplaced, &s, "near", &policy, &[]).expect("endpoint")
    });
    assert_eq!(names(&counts), ALL);

    // A retry stays in the zone: a tried near endpoint comes back before a farther one.
    let (a, b_) = (workload(&s, "web-a"), workload(&s, "web-b"));
    for _ in 0..50 {
        let retry = pick_of(&b, &s, "near", &policy, &[a]).expect("endpoint");
        assert_eq!(retry, "web-b");
        let again = pick_of(&b, &s, "near", &policy, &[a, b_]).expect("endpoint");
        assert!(again == "web-a" || again == "web-b", "{again}");
    }

    // With both near endpoints ejected, the farther zone takes the traffic.
    let detection = OutlierDetection {
        consecutive_5xx_errors: 1,
        max_ejection_percent: 100,
        ..OutlierDetection::default()
    };
    let detecting = detecting(LoadBalancer::Random, detection);
    fail(&b, a, 1, Outcome::ServerError(503), &detection);
    let counts = tally(100, || {
        pick_of(&b, &s, "near", &detecting, &[]).expect("endpoint")
    });
    assert_eq!(names(&counts), ["web-b"], "one near endpoint left");
    fail(&b, b_, 1, Outcome::ServerError(503), &detection);
    let counts = tally(200, || {
        pick_of(&b, &s, "near", &detecting, &[]).expect("endpoint")
    });
    assert_eq!(
        names(&counts),
        ["web-c", "web-d"],
        "failed over to the other zone"
    );
}

/// ZONES with web-e in the waypoint's zone (z1) on another node, and service `spread` over
/// all five web pods, with a DestinationRule of `traffic_policy`.
fn spread(traffic_policy: &str) -> String {
    format!(
        "{ZONES}---
apiVersion: v1
kind: Node
metadata: {{name: node-c, labels: {{topology.kubernetes.io/region: r, topology.kubernetes.io/zone: z1}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-e, namespace: shop, labels: {{app: web}}}}
spec: {{nodeName: node-c}}
status: {{podIP: 10.0.3.10, phase: Running}}
---
apiVersion: v1
kind: Service
metadata: {{name: spread, namespace: shop}}
spec:
  clusterIP: 10.96.0.50
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: spread, namespace: shop}}
spec:
  host: spread
  trafficPolicy: {traffic_policy}
"
    )
}

/// A DestinationRule with outlier detection makes the waypoint prefer endpoints in its own
/// locality, as Istio's default `localityLbSetting` does, unless the setting says otherwise.
#[test]
fn outlier_detection_prefers_the_waypoints_locality_unless_told_otherwise() {
    // web-e shares the waypoint's zone (z1) on another node.
    let zone = &["web-a", "web-b", "web-e"][..];
    let everywhere = &["web-a", "web-b", "web-c", "web-d", "web-e"][..];
    let detecting = "{outlierDetection: {consecutive5xxErrors: 3}";
    let cases = [
        (format!("{detecting}}}"), zone),
        (
            "{connectionPool: {tcp: {maxConnections: 9}}}".to_owned(),
            everywhere,
        ),
        (
            format!("{detecting}, loadBalancer: {{localityLbSetting: {{enabled: false}}}}}}"),
            everywhere,
        ),
        (
            format!(
                "{detecting}, loadBalancer: {{localityLbSetting: {{failoverPriority: \
                 [topology.istio.io/network]}}}}}}"
            ),
            everywhere,
        ),
        (
            format!(
                "{detecting}, loadBalancer: {{simple: ROUND_ROBIN, localityLbSetting: \
                 {{failoverPriority: [kubernetes.io/hostname, version]}}}}}}"
            ),
            &["web-a", "web-b"][..],
        ),
        (
            format!(
                "{detecting}, loadBalancer: {{localityLbSetting: {{distribute: \
                 [{{from: r/z1/*, to: {{r/z2/*: 100}}}}]}}}}}}"
            ),
            &["web-c", "web-d"][..],
        ),
    ];
    let policy = traffic(LoadBalancer::Random);
    for (traffic_policy, expected) in cases {
        let s = snapshot(&spread(&traffic_policy));
        let b = Balancer::new(&s, None).measured_from(&s, "shop", Some(workload(&s, "waypoint-1")));
        let counts = tally(400, || {
            pick_of(&b, &s, "spread", &policy, &[]).expect("endpoint")
        });
        assert_eq!(names(&counts), expected, "{traffic_policy}");
    }
}

/// `distribute` splits the traffic between localities by their percentages, whatever the
/// number of endpoints in each, and a locality whose endpoints are all ejected leaves its share
/// to the others, as Envoy's locality-weighted balancing does.
#[test]
fn distribute_shares_traffic_between_localities() {
    let s = snapshot(&spread(
        "{loadBalancer: {simple: ROUND_ROBIN, localityLbSetting: {distribute: [\
         {from: r/z2/*, to: {r/z2: 100}}, {from: \"r/*\", to: {r/z1: 25, \"r/z2/*\": 75}}]}}}",
    ));
    let b = Balancer::new(&s, None).measured_from(&s, "shop", Some(workload(&s, "waypoint-1")));
    // The waypoint is in z1: the first entry is not its, the second is. Three endpoints in z1
    // take a quarter, two in z2 three quarters.
    let policy = traffic(LoadBalancer::RoundRobin);
    let counts = tally(4000, || {
        pick_of(&b, &s, "spread", &policy, &[]).expect("endpoint")
    });
    let z2 = counts["web-c"] + counts["web-d"];
    assert!((2800..3200).contains(&z2), "{counts:?}");
    assert_eq!(
        names(&counts),
        ["web-a", "web-b", "web-c", "web-d", "web-e"]
    );

    // z2's endpoints ejected: z1 takes everything.
    let detection = OutlierDetection {
        consecutive_5xx_errors: 1,
        max_ejection_percent: 100,
        ..OutlierDetection::default()
    };
    for name in ["web-c", "web-d"] {
        fail(
            &b,
            workload(&s, name),
            1,
            Outcome::ServerError(503),
            &detection,
        );
    }
    let detecting = detecting(LoadBalancer::RoundRobin, detection);
    let counts = tally(300, || {
        pick_of(&b, &s, "spread", &detecting, &[]).expect("endpoint")
    });
    assert_eq!(names(&counts), ["web-a", "web-b", "web-e"]);

    // A retry takes an untried endpoint of any locality before a tried one: z2 draws 99 in
    // 100, yet with both its endpoints tried, z1 answers.
    let s = snapshot(&spread(
        "{loadBalancer: {localityLbSetting: {distribute: [{from: r/z1, to: {r/z1: 1, r/z2: 99}}]}}}",
    ));
    let b = Balancer::new(&s, None).measured_from(&s, "shop", Some(workload(&s, "waypoint-1")));
    let tried = [workload(&s, "web-c"), workload(&s, "web-d")];
    let counts = tally(200, || {
        pick_of(&b, &s, "spread", &policy, &tried).expect("endpoint")
    });
    assert_eq!(names(&counts), ["web-a", "web-b", "web-e"]);

    // A consistent-hash key keeps its endpoint, locality included.
    let hashed = traffic(hashing(HashKey::SourceIp));
    let by_key = |key: u64| {
        let chosen = b.choose(
            &s,
            service(&s, "spread"),
            0,
            None,
            &hashed,
            Some(key),
            &[],
            now(),
        );
        s.workload(chosen.expect("endpoint").workload)
            .name
            .to_string()
    };
    let mut seen = BTreeSet::new();
    for key in 0..200u64 {
        let key = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let first = by_key(key);
        assert!((0..10).all(|_| by_key(key) == first), "key {key} moved");
        seen.insert(first);
    }
    assert!(seen.len() > 2, "keys spread over endpoints: {seen:?}");

    // A locality no `to` names takes nothing, even when it is all that is left.
    let s = snapshot(&spread(
        "{loadBalancer: {localityLbSetting: {distribute: [{from: r/z1, to: {r/z3: 100}}]}}}",
    ));
    let b = Balancer::new(&s, None).measured_from(&s, "shop", Some(workload(&s, "waypoint-1")));
    assert_eq!(pick_of(&b, &s, "spread", &policy, &[]), None);
}

#[test]
fn a_node_local_service_with_no_endpoint_on_the_waypoints_node_has_none() {
    let s = snapshot(ZONES);
    let b = Balancer::new(&s, None).measured_from(&s, "shop", Some(workload(&s, "waypoint-1")));
    let policy = traffic(LoadBalancer::Random);
    assert_eq!(pick_of(&b, &s, "local", &policy, &[]), None);
    // From node-b it has two.
    let b = Balancer::new(&s, None).measured_from(&s, "shop", Some(workload(&s, "web-c")));
    let counts = tally(200, || {
        pick_of(&b, &s, "local", &policy, &[]).expect("endpoint")
    });
    assert_eq!(names(&counts), ["web-c", "web-d"]);
}

#[test]
fn round_robin_takes_the_near_endpoints_in_turn_whatever_lies_between_them() {
    // From node-b (zone z2), web-c and web-d are near; web-a and web-b, listed first, are not.
    let s = snapshot(ZONES);
    let b = Balancer::new(&s, None).measured_from(&s, "shop", Some(workload(&s, "web-c")));
    let policy = traffic(LoadBalancer::RoundRobin);
    let picks: Vec<String> = (0..8)
        .map(|_| pick_of(&b, &s, "near", &policy, &[]).expect("endpoint"))
        .collect();
    for pair in picks.windows(2) {
        assert_ne!(pair[0], pair[1], "{picks:?}");
    }
    let counts = tally(8, || {
        pick_of(&b, &s, "near", &policy, &[]).expect("endpoint")
    });
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        [4, 4],
        "{counts:?}"
    );
}
