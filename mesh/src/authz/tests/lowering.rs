//! The policy ztunnel enforces: HTTP attributes lowered away exactly as istiod does.

use super::{Request, policy};
use crate::authz::{Action, Policy, evaluate};

/// Whether a plaintext-free TCP connection (client-ns/client-sa, 10.0.0.1 → 10.0.0.2:`port`)
/// passes the L4 form of `yaml`, evaluated alone.
fn l4_allows(yaml: &str, port: u16) -> bool {
    let lowered: Vec<Policy> = policy(yaml).for_l4().into_iter().collect();
    let mut request = Request::tcp();
    request.destination_port = port;
    evaluate(&lowered, &request.attrs()).allowed
}

#[test]
fn lowering() {
    // (what, policy, destination port, allowed at L4)
    let cases: &[(&str, &str, u16, bool)] = &[
        (
            "ALLOW: a rule with an HTTP attribute is dropped, so nothing matches",
            "rules: [{from: [{source: {namespaces: [client-ns]}}], to: [{operation: {methods: [GET]}}]}]",
            8080,
            false,
        ),
        (
            "ALLOW: rules without HTTP attributes survive",
            "rules: [{to: [{operation: {methods: [GET]}}]}, {from: [{source: {namespaces: [client-ns]}}]}]",
            8080,
            true,
        ),
        (
            "ALLOW: an HTTP condition drops the rule",
            "rules: [{from: [{source: {namespaces: [client-ns]}}], when: [{key: 'request.headers[x]', values: ['*']}]}]",
            8080,
            false,
        ),
        (
            "ALLOW: remoteIpBlocks is an HTTP attribute",
            "rules: [{from: [{source: {remoteIpBlocks: [0.0.0.0/0]}}]}]",
            8080,
            false,
        ),
        (
            "ALLOW: source.serviceAccount and source.trustDomain are L4",
            "rules: [{when: [{key: source.serviceAccount, values: [client-ns/client-sa]}, {key: source.trustDomain, values: [cluster.local]}]}]",
            8080,
            true,
        ),
        (
            "DENY: the L4 part of a mixed operation is enforced",
            "action: DENY\nrules: [{to: [{operation: {ports: ['8080'], methods: [POST]}}]}]",
            8080,
            false,
        ),
        (
            "DENY: the L4 part of a mixed operation, other port",
            "action: DENY\nrules: [{to: [{operation: {ports: ['8080'], methods: [POST]}}]}]",
            9090,
            true,
        ),
        (
            "DENY: the L4 part of a mixed source is enforced",
            "action: DENY\nrules: [{from: [{source: {namespaces: [client-ns], requestPrincipals: ['*']}}]}]",
            8080,
            false,
        ),
        (
            "DENY: an HTTP-only rule has no effect",
            "action: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]",
            8080,
            true,
        ),
        (
            "DENY: notRequestPrincipals only has no effect (istio#61126)",
            "action: DENY\nrules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]",
            8080,
            true,
        ),
        (
            "DENY: an HTTP-only operation stops constraining; the source is enforced (broader)",
            "action: DENY\nrules: [{from: [{source: {namespaces: [client-ns]}}], to: [{operation: {paths: [/admin]}}]}]",
            8080,
            false,
        ),
        (
            "DENY: an HTTP-only source leaves the other sources",
            "action: DENY\nrules: [{from: [{source: {remoteIpBlocks: [1.2.3.4]}}, {source: {ipBlocks: [10.0.0.0/8]}}]}]",
            8080,
            false,
        ),
        (
            "DENY: an HTTP condition is dropped; the source is enforced (broader)",
            "action: DENY\nrules: [{from: [{source: {namespaces: [client-ns]}}], when: [{key: request.auth.principal, notValues: ['*']}]}]",
            8080,
            false,
        ),
        (
            "DENY: an HTTP-only source of one rule leaves the L4 operation",
            "action: DENY\nrules: [{from: [{source: {requestPrincipals: ['*']}}], to: [{operation: {ports: ['9090']}}]}]",
            9090,
            false,
        ),
        (
            "DENY: an empty rule still denies everything",
            "action: DENY\nrules: [{}]",
            8080,
            false,
        ),
        (
            "CUSTOM fails closed on its L4 part",
            "action: CUSTOM\nprovider: {name: ext-authz}\nrules: [{to: [{operation: {ports: ['8080'], paths: [/admin]}}]}]",
            8080,
            false,
        ),
        (
            "CUSTOM with HTTP attributes only has no effect",
            "action: CUSTOM\nprovider: {name: ext-authz}\nrules: [{to: [{operation: {paths: [/admin]}}]}]",
            8080,
            true,
        ),
    ];
    for (what, yaml, port, allowed) in cases {
        assert_eq!(l4_allows(yaml, *port), *allowed, "{what}: {yaml}");
    }
}

#[test]
fn without_lowering_http_fields_fail_at_l4() {
    // Unlowered, the mixed DENY does not fire at L4: callers must lower for ztunnel.
    let deny =
        policy("action: DENY\nrules: [{to: [{operation: {ports: ['8080'], methods: [POST]}}]}]");
    assert!(!deny.matches(&Request::tcp().attrs()));
    let lowered = deny.for_l4();
    assert!(lowered.is_some_and(|p| p.matches(&Request::tcp().attrs())));
}

#[test]
fn lowered_policies_keep_identity() {
    let custom = policy("action: CUSTOM\nprovider: {name: ext-authz}\nrules: [{}]");
    let lowered = custom.for_l4();
    assert!(
        lowered
            .as_ref()
            .is_some_and(|p| p.action() == Action::Custom && p.name() == "test")
    );
    assert!(
        policy("action: AUDIT\nrules: [{}]").for_l4().is_none(),
        "ztunnel has no AUDIT"
    );
}
