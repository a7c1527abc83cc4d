//! Every `when` key, with `values` and `notValues`.

use super::{Case, as_is, l4, plaintext, run};

#[test]
fn conditions() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("header value", "key: 'request.headers[x-token]', values: [secret]", as_is, true),
        ("header name is case-insensitive", "key: 'request.headers[X-Token]', values: [sec*]", as_is, true),
        ("header other value", "key: 'request.headers[x-token]', values: [other]", as_is, false),
        ("header notValues hit", "key: 'request.headers[x-token]', notValues: [secret]", as_is, false),
        ("absent header, presence", "key: 'request.headers[x-missing]', values: ['*']", as_is, false),
        ("absent header, not presence", "key: 'request.headers[x-missing]', notValues: ['*']", as_is, true),
        ("header at L4", "key: 'request.headers[x-token]', values: ['*']", l4, false),
        ("source.ip", "key: source.ip, values: [10.0.0.0/8]", as_is, true),
        ("source.ip notValues", "key: source.ip, notValues: [10.0.0.1]", as_is, false),
        ("remote.ip", "key: remote.ip, values: [192.168.1.1]", as_is, true),
        ("remote.ip other", "key: remote.ip, values: [10.0.0.1]", as_is, false),
        ("source.namespace", "key: source.namespace, values: [client-ns]", as_is, true),
        ("source.namespace notValues", "key: source.namespace, notValues: ['client-*']", as_is, false),
        ("source.principal", "key: source.principal, values: [cluster.local/ns/client-ns/sa/client-sa]", as_is, true),
        ("source.principal absent over plaintext", "key: source.principal, notValues: ['*']", plaintext, true),
        ("source.serviceAccount", "key: source.serviceAccount, values: [client-ns/client-sa]", as_is, true),
        ("source.serviceAccount other", "key: source.serviceAccount, values: [client-ns/other]", as_is, false),
        ("source.trustDomain", "key: source.trustDomain, values: [cluster.local]", as_is, true),
        ("source.trustDomain other", "key: source.trustDomain, values: [example.org]", as_is, false),
        ("destination.ip", "key: destination.ip, values: [10.0.0.2]", as_is, true),
        ("destination.ip other", "key: destination.ip, values: ['fd00::/8']", as_is, false),
        ("destination.port", "key: destination.port, values: ['8080']", as_is, true),
        ("destination.port notValues", "key: destination.port, notValues: ['8080']", as_is, false),
        ("connection.sni", "key: connection.sni, values: ['*.example.com']", as_is, true),
        ("connection.sni absent", "key: connection.sni, values: ['*']", |r| r.sni = None, false),
        ("values AND notValues", "key: source.ip, values: [10.0.0.0/8], notValues: [10.0.0.0/24]", as_is, false),
        ("request.auth.principal is never present", "key: request.auth.principal, values: ['*']", as_is, false),
        ("request.auth.principal notValues pass", "key: request.auth.principal, notValues: ['*']", as_is, true),
        ("request.auth.claims are never present", "key: 'request.auth.claims[iss]', values: [issuer]", as_is, false),
        ("Envoy filter metadata is never present", "key: 'experimental.envoy.filters.network.mysql_proxy[db.table]', values: [x]", as_is, false),
    ];
    run("rules: [{when: [{$}]}]", cases);
}
