use std::sync::Arc;

use http::{HeaderMap, HeaderName};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::*;
use crate::route::lower_common::full_match_regex;
use crate::route::test_support::{Req, Services, yaml};
use crate::route::{Backend, HeaderModifier, HttpRouteSpec, RouteRule, lower_http_route};

fn path_matches(m: &PathMatch, path: &str) -> bool {
    m.matches(path, false)
}

#[test]
fn path_prefix_respects_segment_boundaries() {
    let cases = [
        ("/foo", "/foo", true),
        ("/foo", "/foo/", true),
        ("/foo", "/foo/bar", true),
        ("/foo", "/foobar", false),
        ("/foo/", "/foo", true),
        ("/foo/", "/foo/bar", true),
        ("/foo/", "/foobar", false),
        ("/v2", "/v2example", false),
        ("/", "/anything", true),
        ("/", "/", true),
        ("/abc", "/ABC", false),
    ];
    for (prefix, path, want) in cases {
        let m = PathMatch::Segments(Arc::from(prefix));
        assert_eq!(
            path_matches(&m, path),
            want,
            "PathPrefix {prefix} on {path}"
        );
    }
}

#[test]
fn exact_plain_prefix_and_regex_paths() {
    let regex = |p: &str| PathMatch::Regex(full_match_regex(p, "f").expect("valid"));
    let cases = [
        (PathMatch::Exact("/one".into()), "/one", true),
        (PathMatch::Exact("/one".into()), "/one/", false),
        (PathMatch::Exact("/Two".into()), "/two", false),
        (PathMatch::Prefix("/api".into()), "/apiary", true),
        (PathMatch::Prefix("/api".into()), "/ap", false),
        (regex("/v[0-9]+"), "/v2", true),
        (regex("/v[0-9]+"), "/v2/x", false),
        (regex("/v[0-9]+"), "/x/v2", false),
        (regex(".*/foo"), "/a/b/foo", true),
    ];
    for (m, path, want) in cases {
        assert_eq!(path_matches(&m, path), want, "{m:?} on {path}");
    }
}

#[test]
fn ignore_case_applies_to_exact_and_prefix() {
    let cases = [
        (PathMatch::Exact("/Api".into()), "/aPI", true),
        (PathMatch::Prefix("/Api".into()), "/aPI/x", true),
        (PathMatch::Prefix("/Api".into()), "/ap", false),
        (PathMatch::Segments("/Api".into()), "/API/x", true),
        (PathMatch::Segments("/Api".into()), "/APIx", false),
        (PathMatch::Prefix("/é".into()), "/É", false),
    ];
    for (m, path, want) in cases {
        assert_eq!(m.matches(path, true), want, "{m:?} on {path}");
    }
}

fn header(name: &str, value: ValueMatch, invert: bool) -> HeaderMatch {
    HeaderMatch {
        name: HeaderName::from_bytes(name.as_bytes()).expect("name"),
        value,
        invert,
    }
}

#[test]
fn header_conditions() {
    let regex = |p: &str| ValueMatch::Regex(full_match_regex(p, "f").expect("valid"));
    let exact = |v: &str| ValueMatch::Exact(Arc::from(v));
    let headers = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .fold(Req::get("/"), |r, (k, v)| r.header(k, v))
            .headers
    };
    let cases: Vec<(HeaderMatch, HeaderMap, bool)> = vec![
        (
            header("version", exact("one"), false),
            headers(&[("Version", "one")]),
            true,
        ),
        (
            header("version", exact("one"), false),
            headers(&[("version", "One")]),
            false,
        ),
        (header("version", exact("one"), false), headers(&[]), false),
        (
            header("version", regex("v[12]"), false),
            headers(&[("version", "v2")]),
            true,
        ),
        (
            header("version", regex("v[12]"), false),
            headers(&[("version", "v22")]),
            false,
        ),
        (
            header("version", ValueMatch::Present, false),
            headers(&[("version", "")]),
            true,
        ),
        (
            header("version", ValueMatch::Prefix("be".into()), false),
            headers(&[("version", "beta")]),
            true,
        ),
        // Repeated headers are compared joined with `,`, as Envoy does.
        (
            header("x", exact("a,b"), false),
            headers(&[("x", "a"), ("x", "b")]),
            true,
        ),
        (
            header("x", exact("a"), false),
            headers(&[("x", "a"), ("x", "b")]),
            false,
        ),
        // withoutHeaders: absent or not matching.
        (header("debug", exact("1"), true), headers(&[]), true),
        (
            header("debug", exact("1"), true),
            headers(&[("debug", "0")]),
            true,
        ),
        (
            header("debug", exact("1"), true),
            headers(&[("debug", "1")]),
            false,
        ),
        (
            header("debug", ValueMatch::Present, true),
            headers(&[("debug", "")]),
            false,
        ),
    ];
    for (m, headers, want) in cases {
        assert_eq!(m.matches(&headers), want, "{m:?} on {headers:?}");
    }
}

#[test]
fn query_conditions() {
    let q = |name: &str, value: ValueMatch| QueryMatch {
        name: Arc::from(name),
        value,
    };
    let exact = |v: &str| ValueMatch::Exact(Arc::from(v));
    let cases = [
        (q("animal", exact("whale")), "animal=whale", true),
        (q("animal", exact("whale")), "animal=whaledolphin", false),
        (q("animal", exact("whale")), "color=blue&animal=whale", true),
        (
            q("animal", exact("whale")),
            "animal=dolphin&animal=whale",
            false,
        ),
        (q("animal", exact("whale")), "Animal=whale", false),
        (
            q("animal", exact("blue whale")),
            "animal=blue%20whale",
            true,
        ),
        (q("an imal", exact("x")), "an%20imal=x", true),
        (q("animal", exact("100%")), "animal=100%", true),
        (q("animal", exact("%zz")), "animal=%zz", true),
        (q("animal", exact("%+f")), "animal=%+f", true),
        (q("animal", ValueMatch::Present), "animal", true),
        (q("animal", ValueMatch::Present), "", false),
        (q("animal", exact("")), "animal=&x=1", true),
    ];
    for (m, query, want) in cases {
        assert_eq!(m.matches(query), want, "{m:?} on {query:?}");
    }
}

#[test]
fn match_fields_are_anded() {
    let m = RequestMatch {
        path: Some(PathMatch::Segments("/api".into())),
        method: Some(ValueMatch::Exact("POST".into())),
        port: Some(8080),
        authority: Some(ValueMatch::Prefix("echo".into())),
        source_namespace: Some("default".into()),
        ..RequestMatch::default()
    };
    let ok = Req::get("/api/x?y=1").method("POST").port(8080);
    assert!(m.matches(&ok.view()));
    let cases = [
        ok.clone().method("GET"),
        ok.clone().port(80),
        Req::get("/apix").method("POST").port(8080),
        ok.clone().authority("other"),
    ];
    for req in cases {
        assert!(!m.matches(&req.view()), "{req:?}");
    }
    let other_ns = RequestMatch {
        source_namespace: Some("shop".into()),
        ..RequestMatch::default()
    };
    assert!(!other_ns.matches(&ok.view()));
    assert!(RequestMatch::default().matches(&ok.view()));
}

/// One HTTPRoute whose rules are each named after what they match.
const PRECEDENCE: &str = r#"
parentRefs: [{group: "", kind: Service, name: echo}]
rules:
- name: prefix-root
  matches: [{path: {type: PathPrefix, value: /}}]
  backendRefs: [{name: echo, port: 80}]
- name: exact-one
  matches: [{path: {type: Exact, value: /one}}]
  backendRefs: [{name: echo, port: 80}]
- name: prefix-one
  matches: [{path: {type: PathPrefix, value: /one}}]
  backendRefs: [{name: echo, port: 80}]
- name: prefix-one-two
  matches: [{path: {type: PathPrefix, value: /one/two/}}]
  backendRefs: [{name: echo, port: 80}]
- name: regex-v
  matches: [{path: {type: RegularExpression, value: "/v[0-9]+"}}]
  backendRefs: [{name: echo, port: 80}]
- name: header-version-one
  matches: [{headers: [{name: version, value: one}]}]
  backendRefs: [{name: echo, port: 80}]
- name: header-color-blue
  matches: [{headers: [{name: color, value: blue}]}]
  backendRefs: [{name: echo, port: 80}]
- name: header-version-two
  matches: [{headers: [{name: version, value: two}]}]
  backendRefs: [{name: echo, port: 80}]
- name: headers-two-and-green
  matches: [{headers: [{name: version, value: two}, {name: color, value: green}]}]
  backendRefs: [{name: echo, port: 80}]
- name: method-post
  matches: [{method: POST}]
  backendRefs: [{name: echo, port: 80}]
- name: query-whale
  matches: [{queryParams: [{name: animal, value: whale}]}]
  backendRefs: [{name: echo, port: 80}]
- name: exact-path5-or-patch
  matches:
  - {path: {type: PathPrefix, value: /path5}}
  - {method: PATCH}
  backendRefs: [{name: echo, port: 80}]
"#;

fn table(routes: &[&str], precedence: Precedence) -> RouteTable {
    let services = Services::mesh();
    let mut rules: Vec<RouteRule> = Vec::new();
    for (i, text) in routes.iter().enumerate() {
        let spec: HttpRouteSpec = yaml(text);
        let attachments = lower_http_route("default", &format!("route-{i}"), &spec, &services)
            .expect("valid route");
        rules.extend(attachments.into_iter().next().expect("attached").rules);
    }
    RouteTable::new(rules, precedence)
}

fn winner(table: &RouteTable, req: &Req) -> Option<String> {
    table
        .select(&req.view())
        .map(|(rule, _)| rule.name.as_deref().unwrap_or("?").to_owned())
}

#[test]
fn gateway_api_precedence() {
    let t = table(&[PRECEDENCE], Precedence::GatewayApi);
    let cases = [
        (Req::get("/"), "prefix-root"),
        (Req::get("/one"), "exact-one"),
        (Req::get("/one/"), "prefix-one"),
        (Req::get("/one/two"), "prefix-one-two"),
        (Req::get("/one/two/three"), "prefix-one-two"),
        (Req::get("/onetwo"), "prefix-root"),
        (Req::get("/v12"), "prefix-root"), // Istio: any prefix outranks a regex
        (Req::get("/").header("version", "one"), "header-version-one"),
        (Req::get("/one").header("version", "one"), "exact-one"),
        (
            Req::get("/")
                .header("version", "two")
                .header("color", "green"),
            "headers-two-and-green",
        ),
        // Two single-header rules tie; the earlier rule wins.
        (
            Req::get("/")
                .header("version", "two")
                .header("color", "blue"),
            "header-color-blue",
        ),
        (Req::get("/").method("POST"), "method-post"),
        (
            Req::get("/").method("POST").header("version", "one"),
            "method-post",
        ),
        (Req::get("/?animal=whale"), "query-whale"),
        (Req::get("/?animal=whaledolphin"), "prefix-root"),
        (Req::get("/?animal=whale").method("POST"), "method-post"),
        (
            Req::get("/?animal=whale").header("version", "one"),
            "header-version-one",
        ),
        // Precedence is per match: the /path5 prefix beats a method match...
        (Req::get("/path5").method("POST"), "exact-path5-or-patch"),
        // ...and the same rule's PATCH match is weaker than a longer prefix.
        (Req::get("/one/two").method("PATCH"), "prefix-one-two"),
        (Req::get("/").method("PATCH"), "exact-path5-or-patch"),
    ];
    for (req, want) in cases {
        assert_eq!(winner(&t, &req).as_deref(), Some(want), "{req:?}");
    }
}

#[test]
fn gateway_api_ties_go_to_the_earlier_route() {
    let older = r#"
parentRefs: [{kind: Service, group: "", name: echo}]
rules: [{name: older, matches: [{path: {value: /shared}}], backendRefs: [{name: echo, port: 80}]}]
"#;
    let newer = r#"
parentRefs: [{kind: Service, group: "", name: echo}]
rules:
- {name: newer, matches: [{path: {value: /shared}}], backendRefs: [{name: echo, port: 80}]}
- {name: newer-longer, matches: [{path: {value: /shared/deeper}}], backendRefs: [{name: echo, port: 80}]}
"#;
    let t = table(&[older, newer], Precedence::GatewayApi);
    assert_eq!(winner(&t, &Req::get("/shared")).as_deref(), Some("older"));
    assert_eq!(
        winner(&t, &Req::get("/shared/deeper")).as_deref(),
        Some("newer-longer")
    );
    assert_eq!(winner(&t, &Req::get("/other")), None);
    let (_, m) = t
        .select(&Req::get("/shared/deeper/x").view())
        .expect("match");
    assert_eq!(m, 0);
}

#[test]
fn first_match_keeps_declaration_order() {
    let t = table(&[PRECEDENCE], Precedence::FirstMatch);
    assert_eq!(
        winner(&t, &Req::get("/one")).as_deref(),
        Some("prefix-root")
    );
    assert_eq!(t.rules().len(), 12);
    assert!(!t.is_empty());
}

fn backend(name: &str, weight: u32) -> WeightedBackend {
    WeightedBackend {
        backend: Backend {
            service: Arc::from(name),
            port: Some(80),
            subset: None,
        },
        weight,
        request_headers: HeaderModifier::default(),
        response_headers: HeaderModifier::default(),
    }
}

#[test]
fn pick_follows_weights_and_skips_zero() {
    let mut rng = StdRng::seed_from_u64(7);
    let backends = [backend("a", 1), backend("zero", 0), backend("b", 3)];
    let mut counts = [0usize; 3];
    for _ in 0..4000 {
        let chosen = pick(&backends, &mut rng).expect("positive weights");
        let i = backends
            .iter()
            .position(|b| b.backend.service == chosen.backend.service)
            .expect("one of them");
        counts[i] += 1;
    }
    assert_eq!(counts[1], 0);
    let share_a = counts[0] as f64 / 4000.0;
    assert!((share_a - 0.25).abs() < 0.05, "a got {share_a}");

    assert!(pick(&[backend("z", 0), backend("y", 0)], &mut rng).is_none());
    assert!(pick(&[backend("z", 0)], &mut rng).is_none());
    assert!(pick(&[], &mut rng).is_none());
    let only = [backend("only", 5)];
    assert_eq!(
        &*pick(&only, &mut rng).expect("one").backend.service,
        "only"
    );
}
