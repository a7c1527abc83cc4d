//! Every operation field and its `not*` form, and the string-match forms on each.

use super::{Case, Request, as_is, l4, run};

fn host(r: &mut Request, host: &'static str) {
    if let Some(http) = &mut r.http {
        http.host = host;
    }
}

#[test]
fn operation_fields() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("host, case-insensitive", "hosts: [app.example.com]", as_is, true),
        ("host pattern in upper case", "hosts: [APP.example.com]", as_is, true),
        ("host suffix", "hosts: ['*.EXAMPLE.com']", as_is, true),
        ("host prefix", "hosts: [app.*]", as_is, true),
        ("host presence", "hosts: ['*']", as_is, true),
        ("host other", "hosts: [other.example.com]", as_is, false),
        ("a host's port must be matched explicitly", "hosts: [app.example.com]", |r| host(r, "app.example.com:8080"), false),
        ("host with its port", "hosts: ['app.example.com:8080']", |r| host(r, "App.example.com:8080"), true),
        ("notHosts hit", "notHosts: [app.example.com]", as_is, false),
        ("notHosts miss", "notHosts: ['*.internal']", as_is, true),
        ("port", "ports: ['8080']", as_is, true),
        ("port other", "ports: ['9090']", as_is, false),
        ("port at L4", "ports: ['8080']", l4, true),
        ("notPorts hit", "notPorts: ['8080']", as_is, false),
        ("notPorts miss", "notPorts: ['9090']", as_is, true),
        ("method", "methods: [GET]", as_is, true),
        ("method is case-sensitive", "methods: [get]", as_is, false),
        ("notMethods hit", "notMethods: [GET]", as_is, false),
        ("notMethods miss", "notMethods: [POST]", as_is, true),
        ("method at L4 never matches", "methods: ['*']", l4, false),
        ("notMethods at L4 never matches either", "notMethods: [POST]", l4, false),
        ("path without the query string", "paths: [/api/v1/items]", as_is, true),
        ("path with a query string never matches", "paths: ['/api/v1/items?limit=1']", as_is, false),
        ("path prefix", "paths: ['/api/*']", as_is, true),
        ("path suffix", "paths: ['*/items']", as_is, true),
        ("path suffix sees no query", "paths: ['*=1']", as_is, false),
        ("path is case-sensitive", "paths: [/API/v1/items]", as_is, false),
        ("path template {*}", "paths: ['/api/{*}/items']", as_is, true),
        ("path template {*} is one segment", "paths: ['/{*}/items']", as_is, false),
        ("path template {**}", "paths: ['/api/{**}']", as_is, true),
        ("notPaths hit", "notPaths: [/api/v1/items]", as_is, false),
        ("notPaths miss", "notPaths: ['/admin/*']", as_is, true),
        ("fields are ANDed", "methods: [GET], paths: ['/admin/*']", as_is, false),
    ];
    run("rules: [{to: [{operation: {$}}]}]", cases);
}

#[test]
fn any_operation() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("one of two operations", "{operation: {methods: [POST]}}, {operation: {paths: ['/api/*']}}", as_is, true),
        ("neither operation", "{operation: {methods: [POST]}}, {operation: {paths: ['/admin/*']}}", as_is, false),
    ];
    run("rules: [{to: [$]}]", cases);
}
