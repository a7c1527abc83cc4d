//! Every source field and its `not*` form, and how rules combine sources.

use super::{Case, as_is, identity, ip, l4, plaintext, run};

#[test]
fn rules_structure() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("no rules matches nothing", "{}", as_is, false),
        ("an empty rule matches everything", "rules: [{}]", as_is, true),
        ("an empty rule matches plaintext L4", "rules: [{}]", |r| { r.identity = None; r.http = None }, true),
        ("any rule", "rules: [{to: [{operation: {methods: [POST]}}]}, {to: [{operation: {methods: [GET]}}]}]", as_is, true),
        ("any source", "rules: [{from: [{source: {namespaces: [x]}}, {source: {namespaces: [client-ns]}}]}]", as_is, true),
        ("fields of a source are ANDed", "rules: [{from: [{source: {namespaces: [client-ns], ipBlocks: [10.9.0.0/16]}}]}]", as_is, false),
        ("from AND to", "rules: [{from: [{source: {namespaces: [client-ns]}}], to: [{operation: {methods: [POST]}}]}]", as_is, false),
        ("every condition", "rules: [{when: [{key: source.namespace, values: [client-ns]}, {key: destination.port, values: ['80']}]}]", as_is, false),
        ("a not* field must fail too", "rules: [{from: [{source: {namespaces: [client-ns], notPrincipals: ['*/sa/client-sa']}}]}]", as_is, false),
    ];
    run("$", cases);
}

#[test]
fn source_fields() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("principal exact", "principals: [cluster.local/ns/client-ns/sa/client-sa]", as_is, true),
        ("principal exact, other", "principals: [cluster.local/ns/client-ns/sa/other]", as_is, false),
        ("principal longer than the identity", "principals: [cluster.local/ns/client-ns/sa/client-sa2]", as_is, false),
        ("principal prefix", "principals: [cluster.local/ns/client-ns/*]", as_is, true),
        ("principal prefix, other", "principals: [cluster.local/ns/other/*]", as_is, false),
        ("principal suffix", "principals: ['*/sa/client-sa']", as_is, true),
        ("principal presence", "principals: ['*']", as_is, true),
        ("principal presence, plaintext", "principals: ['*']", plaintext, false),
        ("principal exact, plaintext", "principals: [cluster.local/ns/client-ns/sa/client-sa]", plaintext, false),
        ("notPrincipals hit", "notPrincipals: [cluster.local/ns/client-ns/sa/client-sa]", as_is, false),
        ("notPrincipals miss", "notPrincipals: [cluster.local/ns/x/sa/y]", as_is, true),
        ("notPrincipals presence, mTLS", "notPrincipals: ['*']", as_is, false),
        ("notPrincipals presence, plaintext", "notPrincipals: ['*']", plaintext, true),
        ("namespace exact", "namespaces: [client-ns]", as_is, true),
        ("namespace other", "namespaces: [other]", as_is, false),
        ("namespace prefix", "namespaces: [client-*]", as_is, true),
        ("namespace suffix", "namespaces: ['*-ns']", as_is, true),
        ("namespace, plaintext", "namespaces: ['*']", plaintext, false),
        ("notNamespaces hit", "notNamespaces: [client-ns]", as_is, false),
        ("notNamespaces, plaintext", "notNamespaces: [client-ns]", plaintext, true),
        ("serviceAccount ns/sa", "serviceAccounts: [client-ns/client-sa]", as_is, true),
        ("serviceAccount other ns", "serviceAccounts: [other/client-sa]", as_is, false),
        ("bare serviceAccount is in the policy's namespace", "serviceAccounts: [client-sa]", as_is, false),
        ("bare serviceAccount, caller in the policy's namespace", "serviceAccounts: [client-sa]", |r| r.identity = Some(identity("app", "client-sa")), true),
        ("notServiceAccounts hit", "notServiceAccounts: [client-ns/client-sa]", as_is, false),
        ("serviceAccount, plaintext", "serviceAccounts: [client-ns/client-sa]", plaintext, false),
        ("ipBlocks v4 CIDR", "ipBlocks: [10.0.0.0/24]", as_is, true),
        ("ipBlocks v4 CIDR, other", "ipBlocks: [10.0.1.0/24]", as_is, false),
        ("ipBlocks plain v4 is /32", "ipBlocks: [10.0.0.1]", as_is, true),
        ("ipBlocks plain v4 is /32, other", "ipBlocks: [10.0.0.10]", as_is, false),
        ("ipBlocks v6 CIDR", "ipBlocks: ['2001:db8::/64']", |r| r.source_ip = ip("2001:db8::5"), true),
        ("ipBlocks v6 CIDR, other", "ipBlocks: ['2001:db8:1::/64']", |r| r.source_ip = ip("2001:db8::5"), false),
        ("ipBlocks plain v6 is /128", "ipBlocks: ['2001:db8::5']", |r| r.source_ip = ip("2001:db8::6"), false),
        ("ipBlocks v4 never holds a v6 peer", "ipBlocks: [0.0.0.0/0]", |r| r.source_ip = ip("::1"), false),
        ("ipBlocks is the peer, not the original client", "ipBlocks: [192.168.1.1]", as_is, false),
        ("notIpBlocks hit", "notIpBlocks: [10.0.0.1]", as_is, false),
        ("notIpBlocks miss", "notIpBlocks: [10.0.0.9]", as_is, true),
        ("remoteIpBlocks", "remoteIpBlocks: [192.168.1.0/24]", as_is, true),
        ("remoteIpBlocks is not the peer", "remoteIpBlocks: [10.0.0.1]", as_is, false),
        ("notRemoteIpBlocks hit", "notRemoteIpBlocks: [192.168.1.1]", as_is, false),
        ("remoteIpBlocks at L4 never matches", "remoteIpBlocks: [0.0.0.0/0]", l4, false),
        ("requestPrincipals: no JWT here", "requestPrincipals: ['*']", as_is, false),
        ("notRequestPrincipals: no JWT here", "notRequestPrincipals: ['*']", as_is, true),
    ];
    run("rules: [{from: [{source: {$}}]}]", cases);
}
