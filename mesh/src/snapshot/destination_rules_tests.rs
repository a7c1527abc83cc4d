use super::*;
use crate::route::{Subset, SubsetSpec, TrafficPolicy, TrafficPolicySpec, WorkloadSelector};

const ROOT: &str = "istio-system";

/// A valid rule, lowered.
fn written<'a>(namespace: &'a str, name: &'a str, spec: &'a DestinationRuleSpec) -> Written<'a> {
    Written {
        namespace,
        name,
        spec,
        policy: lowered(spec),
    }
}

/// A rule for `host`, exported as written, with a subset named after the rule (which tells the
/// chosen rule in assertions).
fn spec(host: &str, name: &str, export_to: &[&str]) -> DestinationRuleSpec {
    DestinationRuleSpec {
        host: host.into(),
        subsets: vec![SubsetSpec {
            name: name.into(),
            ..SubsetSpec::default()
        }],
        export_to: export_to.iter().map(|e| e.to_string()).collect(),
        ..DestinationRuleSpec::default()
    }
}

/// Lowering as far as these tests look: the host, the subsets' names, and whether a top-level
/// policy was written (as a connection limit of 7).
fn lowered(spec: &DestinationRuleSpec) -> DestinationPolicy {
    let mut traffic = TrafficPolicy::default();
    if spec.traffic_policy.is_some() {
        traffic.connection_pool.max_connections = 7;
    }
    DestinationPolicy {
        host: spec.host.as_str().into(),
        subsets: (spec.subsets.iter())
            .map(|s| Subset {
                name: s.name.as_str().into(),
                labels: s.labels.clone(),
                traffic: traffic.clone(),
                ports: Vec::new(),
            })
            .collect(),
        traffic,
        ports: Vec::new(),
    }
}

fn svc(name: &str, namespace: &str) -> String {
    format!("{name}.{namespace}.svc.cluster.local")
}

/// The name of the rule `rules` chooses for a proxy in `namespace`, by its first subset.
fn chosen(
    rules: &DestinationRules,
    namespace: &str,
    service_ns: &str,
    host: &str,
) -> Option<String> {
    let id = rules.choose(namespace, service_ns, host)?;
    Some(rules.get(id).subsets[0].name.to_string())
}

/// The names of the rules `ids` by their first subsets, sorted.
fn names(rules: &DestinationRules, ids: Vec<DestinationRuleId>) -> Vec<String> {
    let mut names: Vec<String> = (ids.into_iter())
        .map(|id| rules.get(id).subsets[0].name.to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn chosen_per_proxy_namespace_as_istiod_chooses() {
    let (reviews, ratings) = (svc("reviews", "app"), svc("ratings", "app"));
    let productpage = svc("productpage", "app");
    let specs = [
        (
            ROOT,
            "mesh-default",
            spec("*.svc.cluster.local", "mesh-default", &[]),
        ),
        (ROOT, "root-private", spec(&reviews, "root-private", &["."])),
        (
            "app",
            "app-wide",
            spec("*.app.svc.cluster.local", "app-wide", &[]),
        ),
        ("elsewhere", "unseen", spec(&reviews, "unseen", &["other"])),
        ("app", "ratings", spec(&ratings, "ratings", &["shop"])),
        ("app", "reviews", spec(&reviews, "reviews", &["."])),
        ("shop", "shop-reviews", spec(&reviews, "shop-reviews", &[])),
    ];
    let written: Vec<_> = (specs.iter())
        .map(|(ns, name, spec)| written(ns, name, spec))
        .collect();
    let (rules, warnings) = DestinationRules::build(ROOT, &written, |_, s| Some(lowered(s)));
    assert!(warnings.is_empty(), "{warnings:?}");
    let cases = [
        // The proxy's own namespace first, private rules included.
        ("app", &reviews, Some("reviews")),
        // A proxy's own rule for a service in another namespace applies to it there.
        ("shop", &reviews, Some("shop-reviews")),
        // A private rule is not seen elsewhere, nor one exported to the proxy's namespace from
        // a namespace neither the service's nor the root: the service's namespace's wildcard
        // applies.
        ("other", &reviews, Some("app-wide")),
        // The service's namespace's rule, exported to the proxy's.
        ("shop", &ratings, Some("ratings")),
        // Not exported here: the most specific rule hides the wildcard behind it in the same
        // namespace, and the root namespace's applies.
        ("other", &ratings, Some("mesh-default")),
        ("other", &productpage, Some("app-wide")),
        // A proxy in the root namespace: its private rules first, then as anyone else.
        (ROOT, &reviews, Some("root-private")),
        (ROOT, &ratings, Some("mesh-default")),
        (ROOT, &productpage, Some("app-wide")),
    ];
    for (proxy, host, want) in cases {
        assert_eq!(
            chosen(&rules, proxy, "app", host).as_deref(),
            want,
            "proxy in {proxy}, service {host}"
        );
    }
    assert_eq!(chosen(&rules, "app", "web", "api.example.com"), None);
    // What some proxy may apply: not `elsewhere`'s rule, which no proxy looks at for `app`.
    assert_eq!(
        names(&rules, rules.candidates("app", &reviews)),
        [
            "app-wide",
            "mesh-default",
            "reviews",
            "root-private",
            "shop-reviews"
        ]
    );
}

#[test]
fn rules_of_one_namespace_for_one_host_merge_when_exported_alike() {
    let reviews = svc("reviews", "app");
    let subset = |name: &str| SubsetSpec {
        name: name.into(),
        ..SubsetSpec::default()
    };
    let star = spec(&reviews, "star", &["*"]);
    let mut first = spec(&reviews, "v1", &[]);
    first.subsets.push(subset("v2"));
    let mut second = spec(&reviews, "v2", &[]);
    second.subsets.push(subset("v3"));
    second.traffic_policy = Some(TrafficPolicySpec::default());
    let private = spec(&reviews, "v4", &["."]);
    let written = [
        written("app", "a", &star),
        written("app", "b", &first),
        written("app", "c", &second),
        written("app", "d", &private),
    ];
    let (rules, warnings) = DestinationRules::build(ROOT, &written, |_, s| Some(lowered(s)));
    let names = |namespace: &str| {
        let id = rules.choose(namespace, "app", &reviews).expect("a rule");
        let policy = rules.get(id);
        let names: Vec<&str> = policy.subsets.iter().map(|s| &*s.name).collect();
        (
            names.join(","),
            policy.traffic.connection_pool.max_connections,
        )
    };
    // `b` and `c` are exported alike (no exportTo, which `*` is not as written): merged, the
    // later one's subsets appended, its duplicate skipped, its top-level policy applying as the
    // first has none; the last rule visible elsewhere.
    assert_eq!(names("other"), ("v1,v2,v3".to_owned(), 7));
    // In the namespace, the last rule applies: the private one.
    assert_eq!(names("app"), ("v4".to_owned(), u32::MAX));
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("app/c defines subset \"v2\"") && warnings[0].contains("app/b"),
        "{warnings:?}"
    );
    assert_eq!(
        self::names(&rules, rules.candidates("app", &reviews)),
        ["star", "v1", "v4"]
    );
}

#[test]
fn a_rule_with_a_workload_selector_is_never_a_waypoints() {
    let reviews = svc("reviews", "app");
    let mut selecting = spec(&reviews, "selected", &[]);
    selecting.workload_selector = Some(WorkloadSelector {
        match_labels: [(
            "gateway.networking.k8s.io/gateway-name".to_owned(),
            "waypoint".to_owned(),
        )]
        .into(),
    });
    let mesh_default = spec("*.svc.cluster.local", "mesh-default", &[]);
    let written = [
        written("app", "selecting", &selecting),
        written(ROOT, "mesh-default", &mesh_default),
    ];
    let (rules, _) = DestinationRules::build(ROOT, &written, |_, s| Some(lowered(s)));
    // In its namespace it hides the rules of later steps, as in istiod.
    assert_eq!(chosen(&rules, "app", "app", &reviews), None);
    // Elsewhere it is not seen at all.
    assert_eq!(
        chosen(&rules, "other", "app", &reviews).as_deref(),
        Some("mesh-default")
    );
    assert_eq!(
        names(&rules, rules.candidates("app", &reviews)),
        ["mesh-default"]
    );
}
