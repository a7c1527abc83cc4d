use super::*;
use crate::route::test_support::{Services, yaml};

fn lower(text: &str) -> Result<DestinationPolicy, Vec<FieldError>> {
    let spec: DestinationRuleSpec = yaml(text);
    lower_destination_rule("default", "dr", &spec, &Services::mesh())
}

fn policy(text: &str) -> DestinationPolicy {
    lower(text).unwrap_or_else(|e| panic!("unexpected problems: {e:?}"))
}

#[test]
fn defaults_without_a_traffic_policy() {
    let p = policy("host: reviews\nsubsets: [{name: v1, labels: {version: v1}}]");
    assert_eq!(&*p.host, "reviews.default.svc.cluster.local");
    assert_eq!(p.traffic, TrafficPolicy::default());
    assert_eq!(p.traffic.load_balancer, LoadBalancer::LeastRequest);
    assert_eq!(
        p.traffic.connection_pool.connect_timeout,
        Duration::from_secs(10)
    );
    assert_eq!(p.traffic.outlier_detection, None);
    let v1 = p.subset("v1").expect("subset");
    assert_eq!(v1.labels.get("version").map(String::as_str), Some("v1"));
    assert_eq!(v1.traffic, p.traffic);
    assert!(p.subset("v2").is_none());
}

#[test]
fn load_balancer_kinds() {
    let header = HeaderName::from_static("x-user");
    let cases = [
        ("{simple: ROUND_ROBIN}", LoadBalancer::RoundRobin),
        ("{simple: RANDOM}", LoadBalancer::Random),
        ("{simple: PASSTHROUGH}", LoadBalancer::Passthrough),
        ("{simple: LEAST_REQUEST}", LoadBalancer::LeastRequest),
        ("{simple: LEAST_CONN}", LoadBalancer::LeastRequest),
        ("{simple: UNSPECIFIED}", LoadBalancer::LeastRequest),
        (
            "{localityLbSetting: {enabled: true}}",
            LoadBalancer::LeastRequest,
        ),
        (
            "{consistentHash: {httpHeaderName: X-User}}",
            LoadBalancer::ConsistentHash(ConsistentHash {
                key: HashKey::Header(header),
                table: HashTable::RingHash {
                    minimum_ring_size: 1024,
                },
            }),
        ),
        (
            "{consistentHash: {httpCookie: {name: session, path: /, ttl: 1h}, ringHash: {minimumRingSize: 2048}}}",
            LoadBalancer::ConsistentHash(ConsistentHash {
                key: HashKey::Cookie {
                    name: "session".into(),
                    path: Some("/".into()),
                    ttl: Some(Duration::from_secs(3600)),
                },
                table: HashTable::RingHash {
                    minimum_ring_size: 2048,
                },
            }),
        ),
        (
            "{consistentHash: {useSourceIp: true, maglev: {}}}",
            LoadBalancer::ConsistentHash(ConsistentHash {
                key: HashKey::SourceIp,
                table: HashTable::Maglev { table_size: 65537 },
            }),
        ),
        (
            "{consistentHash: {httpQueryParameterName: user, minimumRingSize: 64}}",
            LoadBalancer::ConsistentHash(ConsistentHash {
                key: HashKey::QueryParameter("user".into()),
                table: HashTable::RingHash {
                    minimum_ring_size: 64,
                },
            }),
        ),
    ];
    for (lb, want) in cases {
        let p = policy(&format!(
            "host: reviews\ntrafficPolicy: {{loadBalancer: {lb}}}"
        ));
        assert_eq!(p.traffic.load_balancer, want, "{lb}");
    }
}

#[test]
fn connection_pool_and_outlier_detection() {
    let p = policy(
        r#"
host: reviews
trafficPolicy:
  connectionPool:
    tcp: {maxConnections: 100, connectTimeout: 250ms, tcpKeepalive: {probes: 3, time: 60s}, maxConnectionDuration: 10m}
    http: {http1MaxPendingRequests: 10, http2MaxRequests: 1000, maxRequestsPerConnection: 1, maxRetries: 3, idleTimeout: 30s, h2UpgradePolicy: UPGRADE, useClientProtocol: true}
  outlierDetection: {}
"#,
    );
    let pool = &p.traffic.connection_pool;
    assert_eq!(pool.max_connections, 100);
    assert_eq!(pool.connect_timeout, Duration::from_millis(250));
    assert_eq!(
        pool.tcp_keepalive,
        Some(TcpKeepalive {
            probes: Some(3),
            time: Some(Duration::from_secs(60)),
            interval: None
        })
    );
    assert_eq!(pool.max_connection_duration, Some(Duration::from_secs(600)));
    assert_eq!(pool.tcp_idle_timeout, Duration::from_secs(3600));
    assert_eq!(
        (pool.http1_max_pending_requests, pool.http2_max_requests),
        (10, 1000)
    );
    assert_eq!((pool.max_requests_per_connection, pool.max_retries), (1, 3));
    assert_eq!(pool.http_idle_timeout, Duration::from_secs(30));
    assert_eq!(pool.h2_upgrade, H2Upgrade::Upgrade);
    assert!(pool.use_client_protocol);
    assert_eq!(pool.max_concurrent_streams, 2_147_483_647);
    // Limits of 0 are unset, as Istio applies only those above zero.
    let zeros = policy(
        "host: reviews\ntrafficPolicy: {connectionPool: {tcp: {maxConnections: 0}, http: {http1MaxPendingRequests: 0, http2MaxRequests: 0, maxRetries: 0, maxConcurrentStreams: 0}}}",
    );
    assert_eq!(zeros.traffic.connection_pool, ConnectionPool::default());
    // An empty section gets Istio's defaults.
    let outlier = p.traffic.outlier_detection.expect("outlier");
    assert_eq!(outlier.consecutive_5xx_errors, 5);
    assert_eq!(outlier.interval, Duration::from_secs(10));
    assert_eq!(outlier.base_ejection_time, Duration::from_secs(30));
    assert_eq!(outlier.max_ejection_percent, 10);
    assert_eq!(outlier.min_health_percent, 0);
    assert_eq!(outlier.consecutive_gateway_errors, None);

    let p = policy(
        "host: reviews\ntrafficPolicy: {outlierDetection: {consecutive5xxErrors: 0, consecutiveGatewayErrors: 3, interval: 1s, baseEjectionTime: 1m, maxEjectionPercent: 100, minHealthPercent: 50, splitExternalLocalOriginErrors: true}}",
    );
    let outlier = p.traffic.outlier_detection.expect("outlier");
    assert_eq!(
        outlier,
        OutlierDetection {
            consecutive_5xx_errors: 0,
            consecutive_gateway_errors: Some(3),
            consecutive_local_origin_failures: None,
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_secs(60),
            max_ejection_percent: 100,
            min_health_percent: 50,
            split_external_local_origin_errors: true,
        }
    );
}

#[test]
fn subset_policy_overrides_the_host_section_by_section() {
    let p = policy(
        r#"
host: reviews.default.svc.cluster.local
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN}
  connectionPool: {tcp: {maxConnections: 100}, http: {maxRetries: 7}}
  outlierDetection: {consecutive5xxErrors: 7}
subsets:
- name: v1
  labels: {version: v1}
- name: v2
  labels: {version: v2}
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    connectionPool: {tcp: {maxConnections: 5}}
"#,
    );
    let v1 = &p.subset("v1").expect("v1").traffic;
    assert_eq!(*v1, p.traffic);
    let v2 = &p.subset("v2").expect("v2").traffic;
    assert_eq!(v2.load_balancer, LoadBalancer::Random);
    assert_eq!(v2.connection_pool.max_connections, 5);
    // The whole connectionPool section is replaced, not merged field by field (as Istio does).
    assert_eq!(v2.connection_pool.max_retries, u32::MAX);
    assert_eq!(
        v2.outlier_detection.map(|o| o.consecutive_5xx_errors),
        Some(7)
    );
    assert_eq!(p.traffic.connection_pool.max_retries, 7);
}

#[test]
fn wildcard_hosts_are_kept() {
    assert_eq!(&*policy("host: \"*.example.com\"").host, "*.example.com");
}

#[test]
fn semantic_errors_name_the_field() {
    let cases = [
        (
            "host: reviews\nexportTo: [\"~\"]",
            "spec.exportTo[0]",
            "cannot be exported to no namespace",
        ),
        (
            "host: reviews\nexportTo: [\".\", \"*\"]",
            "spec.exportTo",
            "cannot be listed with other entries",
        ),
        (
            "host: reviews\nexportTo: [\".\", default]",
            "spec.exportTo[1]",
            "its own namespace, are the same",
        ),
        (
            "host: reviews\nworkloadSelector: {matchLabels: {app: a}}\nexportTo: [\".\", shop]",
            "spec.exportTo",
            "cannot be exported beyond its namespace",
        ),
        (
            "host: reviews\nexportTo: [shop, shop]",
            "spec.exportTo[1]",
            "\"shop\" is listed twice",
        ),
        (
            "host: reviews\nexportTo: [Shop]",
            "spec.exportTo[0]",
            "is not \".\", \"*\" or a namespace name",
        ),
        (
            "host: ghost",
            "spec.host",
            "no Service or ServiceEntry has host \"ghost\"",
        ),
        (
            "host: reviews\ntrafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}",
            "spec.trafficPolicy.loadBalancer",
            "set simple or consistentHash, not both",
        ),
        (
            "host: reviews\ntrafficPolicy: {loadBalancer: {consistentHash: {}}}",
            "spec.trafficPolicy.loadBalancer.consistentHash",
            "set one of httpHeaderName",
        ),
        (
            "host: reviews\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, httpHeaderName: x}}}",
            "spec.trafficPolicy.loadBalancer.consistentHash",
            "set only one of",
        ),
        (
            "host: reviews\ntrafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true, ringHash: {}, maglev: {}}}}",
            "spec.trafficPolicy.loadBalancer.consistentHash",
            "set ringHash or maglev, not both",
        ),
        (
            "host: reviews\ntrafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: \"a b\"}}}",
            "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
            "is not a valid HTTP header name",
        ),
        (
            "host: reviews\ntrafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: \"my session\", ttl: 0s}}}}",
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
            "is not a valid cookie name",
        ),
        (
            "host: reviews\ntrafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: s, path: \"/a; Secure\", ttl: 1h}}}}",
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.path",
            "is not a valid cookie path",
        ),
        (
            "host: reviews\ntrafficPolicy: {connectionPool: {tcp: {connectTimeout: 3 seconds}}}",
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "invalid duration \"3 seconds\"",
        ),
        (
            "host: reviews\nsubsets: [{name: v1, trafficPolicy: {outlierDetection: {interval: often}}}]",
            "spec.subsets[0].trafficPolicy.outlierDetection.interval",
            "invalid duration \"often\"",
        ),
        (
            "host: reviews\ntrafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}",
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
            "101 is not a percentage",
        ),
        (
            "host: reviews\nsubsets: [{name: v1}, {name: v1}]",
            "spec.subsets[1].name",
            "subset \"v1\" is defined twice",
        ),
        (
            "host: reviews\nsubsets: [{name: \"\"}]",
            "spec.subsets[0].name",
            "every subset needs a name",
        ),
    ];
    for (text, field, message) in cases {
        let errors = lower(text).expect_err(text);
        assert!(
            errors
                .iter()
                .any(|e| e.field == field && e.message.contains(message)),
            "expected {field}: {message}\n got {errors:?}"
        );
    }
}

#[test]
fn typos_are_rejected_with_the_valid_fields() {
    let err = serde_yaml::from_str::<DestinationRuleSpec>(
        "host: a\ntrafficPolicy: {loadBalancer: {simpel: RANDOM}}",
    )
    .expect_err("typo");
    assert!(err.to_string().contains("unknown field `simpel`"), "{err}");
    let err = serde_yaml::from_str::<DestinationRuleSpec>(
        "host: a\ntrafficPolicy: {loadBalancer: {simple: FASTEST}}",
    )
    .expect_err("bad enum");
    assert!(err.to_string().contains("ROUND_ROBIN"), "{err}");
    let err = serde_yaml::from_str::<DestinationRuleSpec>(
        "host: a\ntrafficPolicy: {loadBalancer: {localityLbSetting: {failover: [{from: r1, too: r2}]}}}",
    )
    .expect_err("typo");
    assert!(err.to_string().contains("unknown field `too`"), "{err}");
}

#[test]
fn locality_preference_follows_outlier_detection_and_the_setting() {
    use crate::model::locality::Scope::{self, *};
    // (set by the rule, failoverPriority scopes, by locality, failover regions); None: off.
    type Seen = (bool, Option<(Vec<Scope>, bool, Vec<(String, String)>)>);
    let seen = |traffic: &str| -> Seen {
        let p = policy(&format!("host: reviews\ntrafficPolicy: {traffic}"));
        let set = matches!(p.traffic.locality, LocalityLb::Set(_));
        let preference = p.traffic.locality.preference().map(|lb| {
            let failover = (lb.failover.iter())
                .map(|f| (f.from.to_string(), f.to.to_string()))
                .collect();
            (lb.priority.to_vec(), lb.by_locality, failover)
        });
        (set, preference)
    };
    let detecting = "{outlierDetection: {consecutive5xxErrors: 3}";
    let regions = |pairs: &[(&str, &str)]| {
        (pairs.iter())
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    };
    let cases: [(String, Seen); 9] = [
        // Without outlier detection, no preference: Envoy would never fail over.
        ("{loadBalancer: {simple: RANDOM}}".to_owned(), (false, None)),
        (
            "{loadBalancer: {localityLbSetting: {enabled: true}}}".to_owned(),
            (true, None),
        ),
        (
            format!("{detecting}}}"),
            (false, Some((vec![], true, vec![]))),
        ),
        (
            format!("{detecting}, loadBalancer: {{localityLbSetting: {{enabled: true}}}}}}"),
            (true, Some((vec![], true, vec![]))),
        ),
        (
            format!("{detecting}, loadBalancer: {{localityLbSetting: {{enabled: false}}}}}}"),
            (true, None),
        ),
        (
            format!(
                "{detecting}, loadBalancer: {{localityLbSetting: {{failoverPriority: \
                 [topology.istio.io/cluster, topology.istio.io/network, \
                 topology.kubernetes.io/zone, version, kubernetes.io/hostname]}}}}}}"
            ),
            (true, Some((vec![Network, Zone], false, vec![]))),
        ),
        (
            format!(
                "{detecting}, loadBalancer: {{localityLbSetting: {{failoverPriority: [version]}}}}}}"
            ),
            (true, None),
        ),
        (
            format!(
                "{detecting}, loadBalancer: {{localityLbSetting: {{failover: \
                 [{{from: r1, to: r2}}, {{from: r2, to: r1}}]}}}}}}"
            ),
            (
                true,
                Some((vec![], true, regions(&[("r1", "r2"), ("r2", "r1")]))),
            ),
        ),
        // failoverPriority with failover: both order, the priority first.
        (
            format!(
                "{detecting}, loadBalancer: {{localityLbSetting: {{failover: \
                 [{{from: r1, to: r2}}], failoverPriority: [kubernetes.io/hostname]}}}}}}"
            ),
            (true, Some((vec![Node], true, regions(&[("r1", "r2")])))),
        ),
    ];
    for (traffic, expected) in cases {
        assert_eq!(seen(&traffic), expected, "{traffic}");
    }
    // A subset's own load balancer replaces the host's locality setting with it.
    let p = policy(&format!(
        "host: reviews\ntrafficPolicy: {detecting}, loadBalancer: {{localityLbSetting: \
         {{enabled: false}}}}}}\nsubsets: [{{name: v1, labels: {{version: v1}}, trafficPolicy: \
         {{loadBalancer: {{simple: RANDOM}}}}}}]"
    ));
    assert_eq!(p.traffic.locality, LocalityLb::Set(None));
    let v1 = &p.subset("v1").expect("v1").traffic.locality;
    assert!(matches!(v1, LocalityLb::Unset(Some(_))), "{v1:?}");
}

#[test]
fn distribute_keeps_its_shares_without_outlier_detection() {
    let p = policy(
        "host: reviews\ntrafficPolicy: {loadBalancer: {localityLbSetting: {distribute: [\
         {from: r1/z1/*, to: {\"r1/*\": 60, r2/z2/s2: 30, r3: 10}}, {from: \"r2/*\", to: {r2: 100}}]}}}",
    );
    let LocalityLb::Distribute(entries) = &p.traffic.locality else {
        panic!("{:?}", p.traffic.locality);
    };
    assert_eq!(entries.len(), 2);
    let at = |l: &str| {
        let mut parts = l.split('/').map(Arc::<str>::from);
        let mut next = || parts.next().unwrap_or_else(|| Arc::from(""));
        crate::model::Locality {
            region: next(),
            zone: next(),
            subzone: next(),
        }
    };
    let first = &entries[0];
    assert!(first.from.matches(&at("r1/z1/s9")) && first.from.matches(&at("r1/z1")));
    assert!(!first.from.matches(&at("r1/z2/s1")));
    let weights: Vec<u32> = first.to.iter().map(|(_, w)| *w).collect();
    assert_eq!(weights, [60, 30, 10]);
    let (r1, _) = &first.to[0];
    assert!(r1.matches(&at("r1/z7/s7")) && !r1.matches(&at("r2/z1/s1")));
}

#[test]
fn locality_settings_istiod_refuses_are_refused() {
    let lb = "host: reviews\ntrafficPolicy: {outlierDetection: {consecutive5xxErrors: 3}, \
              loadBalancer: {localityLbSetting: ";
    let field = "spec.trafficPolicy.loadBalancer.localityLbSetting";
    let cases = [
        (
            "{failover: [{from: r1, to: r1}]}",
            format!("{field}.failover[0]"),
            "different regions",
        ),
        (
            "{failover: [{from: r1, to: r2}, {from: r1/z1, to: r2}]}",
            format!("{field}.failover[1]"),
            "without zones",
        ),
        (
            "{failover: [{from: r1, to: \"r*\"}]}",
            format!("{field}.failover[0]"),
            "without wildcards",
        ),
        (
            "{enabled: false, failover: [{from: r1, to: r1}]}",
            format!("{field}.failover[0]"),
            "different regions",
        ),
        (
            "{failover: [{from: r1, to: r2}], distribute: [{from: r1/*, to: {r2/*: 100}}]}",
            field.to_owned(),
            "distribute or failover",
        ),
        (
            "{failover: [{from: r1, to: r2}], failoverPriority: [version, topology.kubernetes.io/zone]}",
            format!("{field}.failoverPriority[1]"),
            "together with failover",
        ),
        (
            "{distribute: [{from: r1, to: {r1: 60, r2: 30}}]}",
            format!("{field}.distribute[0].to"),
            "add up to 100",
        ),
        (
            "{distribute: [{from: r1, to: {r1: 0, r2: 100}}]}",
            format!("{field}.distribute[0].to"),
            "from 1 to 100",
        ),
        (
            "{distribute: [{from: \"r1/*/z1\", to: {r1: 100}}]}",
            format!("{field}.distribute[0].from"),
            "at its end",
        ),
        (
            "{distribute: [{from: r1//z1, to: {r1: 100}}]}",
            format!("{field}.distribute[0].from"),
            "empty region",
        ),
        (
            "{distribute: [{from: r1, to: {r1: 50, r1/z1: 50}}]}",
            format!("{field}.distribute[0].to"),
            "overlaps",
        ),
        (
            "{distribute: [{from: r1/z1, to: {r1: 100}}, {from: r1/z1/s1, to: {r1: 100}}]}",
            format!("{field}.distribute"),
            "overlaps",
        ),
    ];
    for (setting, at, says) in cases {
        let errors = lower(&format!("{lb}{setting}}}}}")).expect_err(setting);
        assert!(
            errors
                .iter()
                .any(|e| e.field == at && e.message.contains(says)),
            "{setting}: {errors:?}"
        );
    }
}

/// A directory of PEM files for TLS settings: a CA certificate and its key.
fn tls_files(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = hbone::MeshCa::generate("cluster.local").expect("ca");
    std::fs::write(dir.join("ca.pem"), ca.root_pem()).expect("write");
    std::fs::write(dir.join("key.pem"), ca.key_pem()).expect("write");
    std::fs::write(dir.join("garbage.pem"), "not pem").expect("write");
    dir
}

#[test]
fn tls_to_endpoints_out_of_the_mesh() {
    let dir = tls_files("lower");
    let file = |name: &str| dir.join(name).display().to_string();
    let p = policy(&format!(
        "host: reviews\ntrafficPolicy: {{tls: {{mode: SIMPLE, sni: api.example.com, \
         caCertificates: {}}}}}\nsubsets: [{{name: plain, labels: {{version: v1}}, \
         trafficPolicy: {{tls: {{mode: DISABLE}}}}}}, {{name: same, labels: {{version: v2}}}}]",
        file("ca.pem")
    ));
    let tls = p.traffic.tls.as_deref().expect("tls");
    assert_eq!(tls.sni.as_deref(), Some("api.example.com"));
    assert_eq!(tls.ca.as_ref().map(|c| c.len()), Some(1));
    assert!(tls.verify && tls.client.is_none());
    // A subset's own `tls` replaces the host's; without one it inherits it.
    assert_eq!(p.subset("plain").expect("plain").traffic.tls, None);
    assert_eq!(p.subset("same").expect("same").traffic.tls, p.traffic.tls);

    // MUTUAL with a client certificate; no SNI (the request's host) and no CA (the system's).
    let p = policy(&format!(
        "host: reviews\ntrafficPolicy: {{tls: {{mode: MUTUAL, clientCertificate: {}, \
         privateKey: {}, insecureSkipVerify: true}}}}",
        file("ca.pem"),
        file("key.pem")
    ));
    let tls = p.traffic.tls.as_deref().expect("tls");
    assert_eq!(
        (tls.sni.clone(), tls.ca.clone(), tls.verify),
        (None, None, false)
    );
    let client = tls.client.as_ref().expect("client certificate");
    assert_eq!(client.chain.len(), 1);
    assert!(!client.key.is_empty());

    // Mesh traffic is HBONE: nothing to originate.
    for mode in ["DISABLE", "ISTIO_MUTUAL"] {
        let p = policy(&format!(
            "host: reviews\ntrafficPolicy: {{tls: {{mode: {mode}}}}}"
        ));
        assert_eq!(p.traffic.tls, None, "{mode}");
    }

    let cases = [
        (
            format!("{{mode: SIMPLE, caCertificates: {}}}", file("missing.pem")),
            "spec.trafficPolicy.tls.caCertificates",
            "cannot read certificates from",
        ),
        (
            format!("{{mode: SIMPLE, caCertificates: {}}}", file("garbage.pem")),
            "spec.trafficPolicy.tls.caCertificates",
            "no certificate in the file",
        ),
        (
            format!("{{mode: MUTUAL, clientCertificate: {}}}", file("ca.pem")),
            "spec.trafficPolicy.tls",
            "MUTUAL needs clientCertificate and privateKey",
        ),
        (
            format!(
                "{{mode: MUTUAL, clientCertificate: {}, privateKey: {}}}",
                file("ca.pem"),
                file("ca.pem")
            ),
            "spec.trafficPolicy.tls.privateKey",
            "cannot read a private key from",
        ),
        (
            "{mode: SIMPLE, subjectAltNames: [api.example.com]}".to_owned(),
            "spec.trafficPolicy.tls.subjectAltNames",
            "is not supported by this waypoint",
        ),
        (
            "{mode: SIMPLE, credentialName: api-cacert}".to_owned(),
            "spec.trafficPolicy.tls.credentialName",
            "is not supported by this waypoint",
        ),
        (
            "{mode: STRICT}".to_owned(),
            "spec.trafficPolicy.tls.mode",
            "is not DISABLE, SIMPLE, MUTUAL or ISTIO_MUTUAL",
        ),
    ];
    for (tls, field, message) in cases {
        let errors =
            lower(&format!("host: reviews\ntrafficPolicy: {{tls: {tls}}}")).expect_err("refused");
        assert!(
            errors
                .iter()
                .any(|e| e.field == field && e.message.contains(message)),
            "{tls}: {errors:?}"
        );
    }
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[test]
fn port_level_settings_override_section_by_section() {
    let p = policy(
        "host: reviews\ntrafficPolicy:\n  connectionPool: {tcp: {maxConnections: 10}}\n  \
         portLevelSettings:\n  - port: {number: 9080}\n    connectionPool: {tcp: {maxConnections: 20}}\n\
         subsets:\n- name: v1\n  labels: {version: v1}\n  trafficPolicy:\n    loadBalancer: {simple: RANDOM}\n    \
         portLevelSettings:\n    - port: {number: 9081}\n      loadBalancer: {simple: ROUND_ROBIN}",
    );
    let at = |subset: Option<&str>, port| {
        let t = p.traffic(subset, port).expect("known subset");
        (t.load_balancer.clone(), t.connection_pool.max_connections)
    };
    assert_eq!(at(None, 9080), (LoadBalancer::LeastRequest, 20));
    assert_eq!(at(None, 9081), (LoadBalancer::LeastRequest, 10));
    // The subset's sections over the host's at that port; a port's own settings whole, what
    // they leave unset the default rather than inherited.
    assert_eq!(at(Some("v1"), 9080), (LoadBalancer::Random, 20));
    assert_eq!(at(Some("v1"), 9081), (LoadBalancer::RoundRobin, u32::MAX));
    assert_eq!(at(Some("v1"), 1), (LoadBalancer::Random, 10));
    assert!(p.traffic(Some("v9"), 9080).is_none());
    let p = policy(
        "host: reviews\ntrafficPolicy: {connectionPool: {tcp: {maxConnections: 10}}, \
         portLevelSettings: [{port: {number: 9080}, loadBalancer: {simple: RANDOM}}]}",
    );
    let t = p.traffic(None, 9080).expect("host");
    assert_eq!(
        (t.load_balancer.clone(), t.connection_pool.max_connections),
        (LoadBalancer::Random, u32::MAX)
    );

    for (settings, message) in [
        (
            "[{connectionPool: {tcp: {maxConnections: 1}}}]",
            "needs a port number",
        ),
        ("[{port: {number: 70000}}]", "needs a port number"),
    ] {
        let errors = lower(&format!(
            "host: reviews\ntrafficPolicy: {{portLevelSettings: {settings}}}"
        ))
        .expect_err("refused");
        assert!(
            errors.iter().any(
                |e| e.field.starts_with("spec.trafficPolicy.portLevelSettings[")
                    && e.field.ends_with("].port")
                    && e.message.contains(message)
            ),
            "{settings}: {errors:?}"
        );
    }
}
