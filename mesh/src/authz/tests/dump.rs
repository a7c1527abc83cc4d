//! Policies in upstream ztunnel's dump form, which `istioctl ztunnel-config policies` reads.

use serde_json::json;

use super::policy;

#[test]
fn rules_are_clauses_of_alternatives_with_upstream_field_names() {
    let p = policy(
        r#"
action: DENY
rules:
- from:
  - source: {principals: ["cluster.local/ns/app/sa/*"], notNamespaces: [kube-system]}
  - source: {ipBlocks: [10.0.0.0/8]}
  to: [{operation: {ports: ["8080"], notPorts: ["9090"]}}]
- from: [{source: {serviceAccounts: [client]}}]
- {}
"#,
    );
    assert_eq!(
        p.dump("Namespace"),
        json!({
            "name": "test",
            "namespace": "app",
            "scope": "Namespace",
            "action": "Deny",
            "dryRun": false,
            "rules": [
                [
                    [
                        {
                            "principals": [{"Prefix": "cluster.local/ns/app/sa/"}],
                            "notNamespaces": [{"Exact": "kube-system"}],
                        },
                        {"sourceIps": ["10.0.0.0/8"]},
                    ],
                    [{"destinationPorts": [8080], "notDestinationPorts": [9090]}],
                ],
                [[{"serviceAccounts": [{"namespace": "app", "serviceAccount": "client"}]}]],
                [],
            ],
        })
    );
}

#[test]
fn allow_nothing_has_no_rules_and_http_checks_are_named() {
    let nothing = policy("{}");
    assert_eq!(nothing.dump("Global")["rules"], json!([]));
    assert_eq!(nothing.dump("Global")["action"], "Allow");

    // Unlowered (as the waypoint holds it), an HTTP check is named rather than dropped; the
    // lowered DENY ztunnel enforces keeps only the port.
    let deny = policy(
        "action: DENY\nrules: [{to: [{operation: {ports: ['8080'], methods: [POST], hosts: ['*']}}]}]",
    );
    assert_eq!(
        deny.dump("WorkloadSelector")["rules"],
        json!([[[{"destinationPorts": [8080], "httpAttributes": ["hosts", "methods"]}]]])
    );
    let lowered = deny.for_l4().expect("a DENY with a port survives lowering");
    assert_eq!(
        lowered.dump("WorkloadSelector")["rules"],
        json!([[[{"destinationPorts": [8080]}]]])
    );
}
