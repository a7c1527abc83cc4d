//! Invalid policies: every problem is reported, at its path from the document root.

use super::{errors, spec};
use crate::authz::AuthorizationPolicySpec;

fn fields(yaml: &str) -> Vec<String> {
    errors(yaml).into_iter().map(|e| e.field).collect()
}

#[test]
fn field_paths() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "selector and targetRefs",
            "selector: {matchLabels: {app: a}}\ntargetRefs: [{kind: Service, name: a}]\nrules: [{}]",
            &["spec.targetRefs"],
        ),
        (
            "selector and targetRef",
            "selector: {matchLabels: {app: a}}\ntargetRef: {kind: Service, name: a}\nrules: [{}]",
            &["spec.targetRef"],
        ),
        (
            "wildcard selector",
            "selector: {matchLabels: {app: 'a*'}}",
            &["spec.selector.matchLabels"],
        ),
        (
            "unknown target kind, other namespace",
            "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}, {kind: Pod, name: x, namespace: other}]",
            &["spec.targetRefs[1].kind", "spec.targetRefs[1].namespace"],
        ),
        (
            "bad ports",
            "rules: [{to: [{operation: {ports: ['0', '8080'], notPorts: ['80', http, '65536']}}]}]",
            &[
                "spec.rules[0].to[0].operation.ports[0]",
                "spec.rules[0].to[0].operation.notPorts[1]",
                "spec.rules[0].to[0].operation.notPorts[2]",
            ],
        ),
        (
            "bad IPs everywhere",
            "rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}, {source: {notIpBlocks: [x], remoteIpBlocks: ['::1/129']}}], when: [{key: destination.ip, values: [1.2.3]}]}]",
            &[
                "spec.rules[0].from[1].source.notIpBlocks[0]",
                "spec.rules[0].from[1].source.remoteIpBlocks[0]",
                "spec.rules[0].when[0].values[0]",
            ],
        ),
        (
            "serviceAccounts with principals",
            "rules: [{from: [{source: {serviceAccounts: [a/b], principals: [x]}}]}]",
            &["spec.rules[0].from[0].source.serviceAccounts"],
        ),
        (
            "notServiceAccounts with namespaces, wildcard service account",
            "rules: [{from: [{source: {notServiceAccounts: ['a/*'], namespaces: [x]}}]}]",
            &[
                "spec.rules[0].from[0].source.notServiceAccounts",
                "spec.rules[0].from[0].source.notServiceAccounts[0]",
            ],
        ),
        (
            "empty source and operation",
            "rules: [{from: [{source: {}}], to: [{operation: {}}]}]",
            &[
                "spec.rules[0].from[0].source",
                "spec.rules[0].to[0].operation",
            ],
        ),
        (
            "empty values",
            "rules: [{from: [{source: {principals: ['']}}], to: [{operation: {methods: [GET, '']}}]}]",
            &[
                "spec.rules[0].from[0].source.principals[0]",
                "spec.rules[0].to[0].operation.methods[1]",
            ],
        ),
        (
            "bad path templates",
            "rules: [{}, {to: [{operation: {paths: ['/{**}/a/{*}'], notPaths: ['/a/{*}.txt']}}]}]",
            &[
                "spec.rules[1].to[0].operation.paths[0]",
                "spec.rules[1].to[0].operation.notPaths[0]",
            ],
        ),
        (
            "unknown key, missing values, bad header, bad port",
            "rules: [{when: [{key: destination.namespace, values: [x]}, {key: source.ip}, {key: 'request.headers[a b]', values: [x]}, {key: destination.port, notValues: ['99999']}, {key: 'request.headers[]', values: [x]}]}]",
            &[
                "spec.rules[0].when[0].key",
                "spec.rules[0].when[1].values",
                "spec.rules[0].when[2].key",
                "spec.rules[0].when[3].notValues[0]",
                "spec.rules[0].when[4].key",
            ],
        ),
        (
            "CUSTOM without provider",
            "action: CUSTOM\nrules: [{}]",
            &["spec.provider"],
        ),
        (
            "CUSTOM with an empty provider name",
            "action: CUSTOM\nprovider: {}\nrules: [{}]",
            &["spec.provider.name"],
        ),
        (
            "provider on ALLOW",
            "provider: {name: x}\nrules: [{}]",
            &["spec.provider"],
        ),
        ("DENY without rules", "action: DENY", &["spec.rules"]),
    ];
    for (what, yaml, want) in cases {
        assert_eq!(fields(yaml), *want, "{what}: {yaml}");
    }
}

#[test]
fn messages_say_what_would_be_valid() {
    let errors = errors(
        "rules: [{from: [{source: {namespaces: [a]}}, {source: {ipBlocks: [10.0.0.300/8]}}]}]",
    );
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].field, "spec.rules[0].from[1].source.ipBlocks[0]");
    assert_eq!(
        errors[0].message,
        "\"10.0.0.300/8\" is not an IP address or CIDR block (e.g. 10.0.0.0/8)"
    );
    let errors = errors_of("rules: [{when: [{key: source.user, values: [x]}]}]");
    assert!(
        errors[0].contains("unknown condition key \"source.user\""),
        "{errors:?}"
    );
    assert!(errors[0].contains("request.headers[<name>]"), "{errors:?}");
    let errors = errors_of("rules: [{to: [{operation: {ports: ['0']}}]}]");
    assert_eq!(errors, ["\"0\" is not a port number (1-65535)"]);
}

fn errors_of(yaml: &str) -> Vec<String> {
    errors(yaml).into_iter().map(|e| e.message).collect()
}

#[test]
fn valid_templates_and_keys_compile() {
    let yaml = "rules: [{to: [{operation: {paths: ['/a/{*}/b/{**}', '/x*', '*']}}], when: [{key: 'request.auth.claims[groups]', values: [admin]}, {key: 'experimental.envoy.filters.network.mysql_proxy[db.table]', notValues: [x]}]}]";
    assert!(crate::authz::Policy::compile("app", "ok", &spec(yaml), false).is_ok());
}

#[test]
fn typos_are_rejected_with_the_valid_fields() {
    let cases = [
        (
            "rules: [{from: [{source: {principal: [x]}}]}]",
            "unknown field `principal`",
        ),
        (
            "rules: [{to: [{operation: {method: [GET]}}]}]",
            "unknown field `method`",
        ),
        ("rule: [{}]", "unknown field `rule`"),
        ("action: deny", "unknown variant `deny`"),
    ];
    for (yaml, want) in cases {
        let error = match serde_yaml::from_str::<AuthorizationPolicySpec>(yaml) {
            Ok(parsed) => panic!("{yaml}: parsed as {parsed:?}"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains(want), "{yaml}: {error}");
        assert!(error.contains("expected"), "{yaml}: {error}");
    }
}

#[test]
fn spec_round_trips() {
    let yaml = "selector: {matchLabels: {app: a}}\naction: DENY\nrules: [{from: [{source: {notPrincipals: ['*']}}], to: [{operation: {ports: ['80']}}], when: [{key: source.ip, values: [10.0.0.0/8]}]}]";
    let parsed = spec(yaml);
    let again: AuthorizationPolicySpec =
        serde_yaml::from_str(&serde_yaml::to_string(&parsed).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed, again);
}
