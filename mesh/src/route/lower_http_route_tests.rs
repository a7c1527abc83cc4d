use std::time::Duration;

use super::*;
use crate::route::test_support::{Services, yaml};
use crate::route::{HttpRouteSpec, PathRewrite, RedirectPort, RetryCondition, UnmatchedPreflights};

fn lower(text: &str) -> Result<Vec<Attachment>, Vec<FieldError>> {
    lower_http_route(
        "default",
        "r",
        &yaml::<HttpRouteSpec>(text),
        &Services::mesh(),
    )
}

/// The rules of a route that must lower cleanly and attach exactly once.
fn rules(text: &str) -> Vec<RouteRule> {
    let mut attachments = lower(text).unwrap_or_else(|e| panic!("unexpected problems: {e:?}"));
    assert_eq!(attachments.len(), 1, "{attachments:?}");
    attachments.remove(0).rules
}

fn rule(text: &str) -> RouteRule {
    let mut rules = rules(text);
    assert_eq!(rules.len(), 1);
    rules.remove(0)
}

const PARENT: &str = "parentRefs: [{group: \"\", kind: Service, name: echo}]\n";

#[test]
fn parents_attach_to_services_and_ports() {
    type Case<'a> = (&'a str, &'a [(&'a str, Option<u16>)]);
    let cases: &[Case<'_>] = &[
        (
            "[{group: \"\", kind: Service, name: echo}]",
            &[("echo.default.svc.cluster.local", None)],
        ),
        (
            "[{group: core, kind: Service, name: echo, port: 8080}]",
            &[("echo.default.svc.cluster.local", Some(8080))],
        ),
        (
            "[{group: \"\", kind: Service, name: echo, sectionName: admin}]",
            &[("echo.default.svc.cluster.local", Some(8080))],
        ),
        (
            "[{group: \"\", kind: Service, name: echo, sectionName: http, port: 80}]",
            &[("echo.default.svc.cluster.local", Some(80))],
        ),
        (
            "[{group: \"\", kind: Service, name: productpage, namespace: shop}]",
            &[("productpage.shop.svc.cluster.local", None)],
        ),
        (
            "[{group: networking.istio.io, kind: ServiceEntry, name: external}]",
            &[("api.example.com", None)],
        ),
        // A waypoint Gateway parent is accepted and yields nothing; kind defaults to Gateway.
        ("[{name: waypoint}]", &[]),
        (
            "[{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}, {group: \"\", kind: Service, name: echo}, {group: \"\", kind: Service, name: echo}]",
            &[("echo.default.svc.cluster.local", None)],
        ),
        ("[]", &[]),
    ];
    for (parents, want) in cases {
        let text =
            format!("parentRefs: {parents}\nrules: [{{backendRefs: [{{name: echo, port: 80}}]}}]");
        let got = lower(&text).unwrap_or_else(|e| panic!("{parents}: {e:?}"));
        let got: Vec<(&str, Option<u16>)> = got.iter().map(|a| (&*a.service, a.port)).collect();
        assert_eq!(got, *want, "{parents}");
    }
}

#[test]
fn absent_rules_and_backends_answer_500() {
    for text in [
        PARENT.to_owned(),
        format!("{PARENT}rules: [{{matches: [{{path: {{value: /x}}}}]}}]"),
    ] {
        let r = rule(&text);
        assert!(
            matches!(
                r.action,
                RuleAction::DirectResponse {
                    status: 500,
                    body: None
                }
            ),
            "{text}"
        );
        assert!(matches!(&r.matches[0].path, Some(PathMatch::Segments(_))));
    }
    let r = rule(PARENT);
    assert!(matches!(&r.matches[0].path, Some(PathMatch::Segments(p)) if &**p == "/"));
    assert_eq!(r.source.to_string(), "HTTPRoute default/r rules[0]");
}

#[test]
fn backends_weights_and_backend_filters() {
    let r = rule(&format!(
        r#"{PARENT}rules:
- name: split
  backendRefs:
  - {{name: reviews, port: 9080}}
  - name: ratings
    port: 9080
    weight: 3
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {{set: [{{name: X-Backend, value: ratings}}]}}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {{remove: [x-internal]}}
  - {{group: networking.istio.io, kind: Hostname, name: api.example.com, port: 443, weight: 0}}
"#
    ));
    assert_eq!(r.name.as_deref(), Some("split"));
    let RuleAction::Forward(backends) = &r.action else {
        panic!("{:?}", r.action)
    };
    let got: Vec<(&str, Option<u16>, u32)> = backends
        .iter()
        .map(|b| (&*b.backend.service, b.backend.port, b.weight))
        .collect();
    assert_eq!(
        got,
        [
            ("reviews.default.svc.cluster.local", Some(9080), 1),
            ("ratings.default.svc.cluster.local", Some(9080), 3),
            ("api.example.com", Some(443), 0),
        ]
    );
    assert!(backends[0].request_headers.is_empty());
    assert_eq!(backends[1].request_headers.set[0].0, "x-backend");
    assert_eq!(backends[1].response_headers.remove, ["x-internal"]);
}

#[test]
fn matches_lower_with_gateway_defaults() {
    let r = rule(&format!(
        r#"{PARENT}rules:
- matches:
  - path: {{type: Exact, value: /one}}
    method: POST
  - headers: [{{name: Version, value: two}}, {{type: RegularExpression, name: color, value: "bl.*"}}, {{name: version, value: ignored}}]
    queryParams: [{{name: animal, value: whale}}, {{type: RegularExpression, name: n, value: "[0-9]+"}}]
  backendRefs: [{{name: echo, port: 80}}]
"#
    ));
    let [first, second] = &r.matches[..] else {
        panic!("{:?}", r.matches)
    };
    assert!(matches!(&first.path, Some(PathMatch::Exact(p)) if &**p == "/one"));
    assert!(matches!(&first.method, Some(ValueMatch::Exact(m)) if &**m == "POST"));
    assert!(matches!(&second.path, Some(PathMatch::Segments(p)) if &**p == "/"));
    // Duplicate header names: the first counts.
    let names: Vec<&str> = second.headers.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["version", "color"]);
    assert!(matches!(second.headers[1].value, ValueMatch::Regex(_)));
    assert_eq!(second.query.len(), 2);
    assert!(!second.headers[0].invert);
}

#[test]
fn filters_lower() {
    let rules = rules(&format!(
        r#"{PARENT}rules:
- name: headers
  filters:
  - type: RequestHeaderModifier
    requestHeaderModifier:
      set: [{{name: X-Set, value: a}}]
      add: [{{name: X-Add, value: b}}]
      remove: [X-Remove]
  - type: ResponseHeaderModifier
    responseHeaderModifier: {{add: [{{name: X-Resp, value: c}}]}}
  backendRefs: [{{name: echo, port: 80}}]
- name: redirect
  matches: [{{path: {{value: /old}}}}]
  filters:
  - type: RequestRedirect
    requestRedirect:
      scheme: https
      hostname: example.org
      path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}
      statusCode: 301
- name: redirect-defaults
  filters: [{{type: RequestRedirect, requestRedirect: {{hostname: example.org}}}}]
- name: redirect-port
  filters: [{{type: RequestRedirect, requestRedirect: {{port: 8443, path: {{type: ReplaceFullPath, replaceFullPath: /x}}}}}}]
- name: rewrite
  matches: [{{path: {{value: /api}}}}]
  filters:
  - type: URLRewrite
    urlRewrite: {{hostname: internal, path: {{type: ReplacePrefixMatch, replacePrefixMatch: /}}}}
  backendRefs: [{{name: echo, port: 80}}]
- name: mirrors
  filters:
  - {{type: RequestMirror, requestMirror: {{backendRef: {{name: reviews, port: 9080}}}}}}
  - {{type: RequestMirror, requestMirror: {{backendRef: {{name: ratings, port: 9080}}, percent: 25}}}}
  - {{type: RequestMirror, requestMirror: {{backendRef: {{name: ratings, port: 9080}}, fraction: {{numerator: 1, denominator: 8}}}}}}
  - {{type: RequestMirror, requestMirror: {{backendRef: {{name: ratings, port: 9080}}, fraction: {{numerator: 5}}}}}}
  backendRefs: [{{name: echo, port: 80}}]
- name: cors
  filters:
  - type: CORS
    cors:
      allowOrigins: ["https://foo.example", "https://*.bar.com"]
      allowMethods: [GET, POST]
      allowHeaders: [x-a]
      exposeHeaders: [x-b]
      allowCredentials: true
  backendRefs: [{{name: echo, port: 80}}]
"#
    ));
    let by_name = |name: &str| {
        rules
            .iter()
            .find(|r| r.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("rule {name}"))
    };

    let h = by_name("headers");
    assert_eq!(h.request_headers.set[0].0, "x-set");
    assert_eq!(h.request_headers.add[0].1, "b");
    assert_eq!(h.request_headers.remove, ["x-remove"]);
    assert_eq!(h.response_headers.add[0].0, "x-resp");

    let RuleAction::Redirect(r) = &by_name("redirect").action else {
        panic!("redirect")
    };
    assert_eq!(
        (r.scheme.as_deref(), r.host.as_deref(), r.status),
        (Some("https"), Some("example.org"), 301)
    );
    assert_eq!(r.port, RedirectPort::SchemeDefault);
    assert!(matches!(&r.path, Some(PathRewrite::Segments(p)) if &**p == "/new"));
    let RuleAction::Redirect(r) = &by_name("redirect-defaults").action else {
        panic!("redirect-defaults")
    };
    assert_eq!((r.status, r.port), (302, RedirectPort::Request));
    assert!(r.path.is_none() && r.scheme.is_none());
    let RuleAction::Redirect(r) = &by_name("redirect-port").action else {
        panic!("redirect-port")
    };
    assert_eq!(r.port, RedirectPort::Explicit(8443));
    assert!(matches!(&r.path, Some(PathRewrite::Full(p)) if &**p == "/x"));

    let rw = by_name("rewrite").rewrite.as_ref().expect("rewrite");
    assert_eq!(
        rw.authority.as_ref().map(|a| a.as_bytes()),
        Some(&b"internal"[..])
    );
    assert!(matches!(&rw.path, Some(PathRewrite::Segments(p)) if &**p == "/"));

    let mirrors: Vec<(&str, f64)> = by_name("mirrors")
        .mirrors
        .iter()
        .map(|m| (&*m.backend.service, m.percent))
        .collect();
    assert_eq!(
        mirrors,
        [
            ("reviews.default.svc.cluster.local", 100.0),
            ("ratings.default.svc.cluster.local", 25.0),
            ("ratings.default.svc.cluster.local", 12.5),
            ("ratings.default.svc.cluster.local", 5.0),
        ]
    );

    let cors = by_name("cors").cors.as_ref().expect("cors");
    assert!(cors.allows_origin("https://foo.example"));
    assert!(cors.allows_origin("https://a.b.bar.com"));
    assert!(!cors.allows_origin("https://bar.com"));
    assert!(!cors.allows_origin("http://a.bar.com"));
    assert_eq!(cors.max_age, Some(Duration::from_secs(5)));
    assert!(cors.allow_credentials);
    assert_eq!(cors.unmatched_preflights, UnmatchedPreflights::Ignore);
    assert_eq!(cors.allow_methods.len(), 2);
}

#[test]
fn timeouts_and_retries() {
    let rules = rules(&format!(
        r#"{PARENT}rules:
- name: defaults
  backendRefs: [{{name: echo, port: 80}}]
- name: timeouts
  timeouts: {{request: 10s, backendRequest: 2500ms}}
  backendRefs: [{{name: echo, port: 80}}]
- name: disabled
  timeouts: {{request: 0s}}
  retry: {{attempts: 0}}
  backendRefs: [{{name: echo, port: 80}}]
- name: retry
  retry: {{codes: [500, 503], attempts: 3, backoff: 100ms}}
  backendRefs: [{{name: echo, port: 80}}]
- name: retry-default-attempts
  retry: {{codes: [429]}}
  backendRefs: [{{name: echo, port: 80}}]
"#
    ));
    let [defaults, timeouts, disabled, retry, default_attempts] = &rules[..] else {
        panic!("{rules:?}")
    };
    assert_eq!((defaults.timeout, defaults.per_try_timeout), (None, None));
    assert_eq!(defaults.retry, Some(RetryPolicy::mesh_default()));
    assert_eq!(timeouts.timeout, Some(Duration::from_secs(10)));
    assert_eq!(timeouts.per_try_timeout, Some(Duration::from_millis(2500)));
    assert_eq!((disabled.timeout, &disabled.retry), (None, &None));
    let policy = retry.retry.as_ref().expect("retry");
    assert_eq!(policy.attempts, 3);
    assert_eq!(policy.backoff, Some(Duration::from_millis(100)));
    assert_eq!(policy.retry_on.status_codes, [500, 503]);
    assert!(policy.retry_on.contains(RetryCondition::ConnectFailure));
    assert!(policy.retry_on.retries_status(503));
    assert!(!policy.retry_on.retries_status(502));
    let policy = default_attempts.retry.as_ref().expect("retry");
    assert_eq!(
        (policy.attempts, policy.retry_on.retries_status(429)),
        (2, true)
    );
}

fn problems(text: &str) -> Vec<(String, String)> {
    let errors = lower(text).expect_err("should be invalid");
    errors.into_iter().map(|e| (e.field, e.message)).collect()
}

#[test]
fn semantic_errors_name_the_field() {
    let b = "backendRefs: [{name: echo, port: 80}]";
    let cases: Vec<(String, &str, &str)> = vec![
        (
            "parentRefs: [{group: \"\", kind: Service, name: ghost}]".to_owned(),
            "spec.parentRefs[0].name",
            "no Service \"ghost\" in namespace \"default\"; parentRefs must name an existing Service or ServiceEntry",
        ),
        (
            "parentRefs: [{group: apps, kind: Deployment, name: echo}]".to_owned(),
            "spec.parentRefs[0].kind",
            "unsupported parent kind \"Deployment\" in group \"apps\"",
        ),
        (
            "parentRefs: [{group: \"\", kind: Service, name: echo, sectionName: grpc}]".to_owned(),
            "spec.parentRefs[0].sectionName",
            "Service \"echo\" has no port named \"grpc\"; its ports are 80 (http), 8080 (admin)",
        ),
        (
            "parentRefs: [{group: \"\", kind: Service, name: echo, sectionName: http, port: 8080}]"
                .to_owned(),
            "spec.parentRefs[0].port",
            "sectionName \"http\" is port 80, not 8080",
        ),
        (
            "parentRefs: [{group: \"\", kind: Service, name: echo, port: 9999}]".to_owned(),
            "spec.parentRefs[0].port",
            "Service \"echo\" has no port 9999",
        ),
        (
            format!("{PARENT}rules: [{{{b}}}, {{backendRefs: [{{name: ratingz, port: 9080}}]}}]"),
            "spec.rules[1].backendRefs[0].name",
            "no Service \"ratingz\" in namespace \"default\"; backendRefs must name an existing Service or ServiceEntry",
        ),
        (
            format!(
                "{PARENT}rules: [{{backendRefs: [{{group: example.com, kind: Bucket, name: x}}]}}]"
            ),
            "spec.rules[0].backendRefs[0].kind",
            "unsupported backendRef kind \"Bucket\" in group \"example.com\"",
        ),
        (
            format!("{PARENT}rules: [{{{b}}}, {{backendRefs: [{{name: echo, port: 8081}}]}}]"),
            "spec.rules[1].backendRefs[0].port",
            "Service \"echo\" has no port 8081; its ports are 80 (http), 8080 (admin)",
        ),
        (
            format!("{PARENT}rules: [{{backendRefs: [{{name: echo}}]}}]"),
            "spec.rules[0].backendRefs[0].port",
            "port is required when the backend is a Service",
        ),
        (
            format!(
                "{PARENT}rules: [{{backendRefs: [{{name: echo, port: 80, weight: 0}}, {{name: reviews, port: 9080, weight: 0}}]}}]"
            ),
            "spec.rules[0].backendRefs",
            "every backendRef has weight 0",
        ),
        (
            format!(
                "{PARENT}rules: [{{backendRefs: [{{name: echo, port: 80, weight: 1000001}}]}}]"
            ),
            "spec.rules[0].backendRefs[0].weight",
            "weight 1000001 is out of range",
        ),
        (
            format!(
                "{PARENT}rules: [{{matches: [{{path: {{type: RegularExpression, value: \"/(a\"}}}}], {b}}}]"
            ),
            "spec.rules[0].matches[0].path.value",
            "invalid regular expression \"/(a\"",
        ),
        (
            format!(
                "{PARENT}rules: [{{matches: [{{headers: [{{type: RegularExpression, name: x, value: \"[\"}}]}}], {b}}}]"
            ),
            "spec.rules[0].matches[0].headers[0].value",
            "invalid regular expression",
        ),
        (
            format!("{PARENT}rules: [{{matches: [{{path: {{value: foo}}}}], {b}}}]"),
            "spec.rules[0].matches[0].path.value",
            "\"foo\" is not a valid path",
        ),
        (
            format!("{PARENT}rules: [{{matches: [{{method: FETCH}}], {b}}}]"),
            "spec.rules[0].matches[0].method",
            "\"FETCH\" is not a method",
        ),
        (
            format!("{PARENT}rules: [{{timeouts: {{request: 10 seconds}}, {b}}}]"),
            "spec.rules[0].timeouts.request",
            "invalid duration \"10 seconds\"",
        ),
        (
            format!("{PARENT}rules: [{{timeouts: {{request: 1s, backendRequest: 2s}}, {b}}}]"),
            "spec.rules[0].timeouts.backendRequest",
            "backendRequest (2s) must not exceed request (1s)",
        ),
        (
            format!("{PARENT}rules: [{{retry: {{codes: [302]}}, {b}}}]"),
            "spec.rules[0].retry.codes[0]",
            "302 cannot be retried",
        ),
        (
            format!("{PARENT}rules: [{{filters: [{{type: RequestHeaderModifier}}], {b}}}]"),
            "spec.rules[0].filters[0].requestHeaderModifier",
            "requestHeaderModifier must be set when type is RequestHeaderModifier",
        ),
        (
            format!(
                "{PARENT}rules: [{{filters: [{{type: CORS, cors: {{}}, urlRewrite: {{}}}}], {b}}}]"
            ),
            "spec.rules[0].filters[0].urlRewrite",
            "urlRewrite is only read when",
        ),
        (
            format!(
                "{PARENT}rules: [{{filters: [{{type: CORS, cors: {{}}}}, {{type: CORS, cors: {{}}}}], {b}}}]"
            ),
            "spec.rules[0].filters[1].type",
            "CORS may appear only once per rule",
        ),
        (
            format!(
                "{PARENT}rules: [{{filters: [{{type: RequestRedirect, requestRedirect: {{hostname: x}}}}], {b}}}]"
            ),
            "spec.rules[0].backendRefs",
            "cannot have backendRefs",
        ),
        (
            format!(
                "{PARENT}rules: [{{filters: [{{type: RequestRedirect, requestRedirect: {{hostname: x}}}}, {{type: URLRewrite, urlRewrite: {{hostname: y}}}}]}}]"
            ),
            "spec.rules[0].filters",
            "RequestRedirect and URLRewrite cannot be combined",
        ),
        (
            format!(
                "{PARENT}rules: [{{filters: [{{type: RequestRedirect, requestRedirect: {{port: 0}}}}]}}]"
            ),
            "spec.rules[0].filters[0].requestRedirect.port",
            "0 is not a port",
        ),
        (
            format!(
                "{PARENT}rules: [{{matches: [{{path: {{type: Exact, value: /a}}}}], filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /b}}}}}}], {b}}}]"
            ),
            "spec.rules[0].filters[0].urlRewrite.path.replacePrefixMatch",
            "exactly one match, with a PathPrefix path",
        ),
        (
            format!(
                "{PARENT}rules: [{{filters: [{{type: URLRewrite, urlRewrite: {{path: {{type: ReplaceFullPath}}}}}}], {b}}}]"
            ),
            "spec.rules[0].filters[0].urlRewrite.path.replaceFullPath",
            "replaceFullPath must be set when type is ReplaceFullPath",
        ),
        (
            format!(
                "{PARENT}rules: [{{filters: [{{type: RequestRedirect, requestRedirect: {{statusCode: 399}}}}]}}]"
            ),
            "spec.rules[0].filters[0].requestRedirect.statusCode",
            "399 is not a redirect status",
        ),
        (
            format!(
                "{PARENT}rules: [{{filters: [{{type: ExtensionRef, extensionRef: {{group: g, kind: K, name: n}}}}], {b}}}]"
            ),
            "spec.rules[0].filters[0].type",
            "ExtensionRef filters are not supported",
        ),
        (
            format!(
                "{PARENT}rules: [{{filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: nope, port: 1}}}}}}], {b}}}]"
            ),
            "spec.rules[0].filters[0].requestMirror.backendRef.name",
            "no Service \"nope\"",
        ),
        (
            format!(
                "{PARENT}rules: [{{filters: [{{type: RequestMirror, requestMirror: {{backendRef: {{name: echo, port: 80}}, percent: 5, fraction: {{numerator: 1}}}}}}], {b}}}]"
            ),
            "spec.rules[0].filters[0].requestMirror",
            "set percent or fraction, not both",
        ),
        (
            format!(
                "{PARENT}rules: [{{backendRefs: [{{name: echo, port: 80, filters: [{{type: CORS, cors: {{}}}}]}}]}}]"
            ),
            "spec.rules[0].backendRefs[0].filters[0].type",
            "CORS is not supported in backendRefs[].filters",
        ),
        (
            format!(
                "{PARENT}rules: [{{filters: [{{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: \"bad header\", value: x}}]}}}}], {b}}}]"
            ),
            "spec.rules[0].filters[0].requestHeaderModifier.set[0].name",
            "\"bad header\" is not a valid HTTP header name",
        ),
    ];
    for (text, field, message) in cases {
        let got = problems(&text);
        assert!(
            got.iter().any(|(f, m)| f == field && m.contains(message)),
            "expected {field}: {message}\n got {got:?}\n for {text}"
        );
    }
}

#[test]
fn all_problems_are_reported_together() {
    let got = problems(
        r#"parentRefs: [{group: "", kind: Service, name: ghost}]
rules:
- backendRefs: [{name: nope, port: 1}]
  timeouts: {request: soon}
- matches: [{path: {type: RegularExpression, value: "("}}]
  backendRefs: [{name: echo, port: 80}]
"#,
    );
    let fields: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.parentRefs[0].name",
            "spec.rules[0].backendRefs[0].name",
            "spec.rules[0].timeouts.request",
            "spec.rules[1].matches[0].path.value",
        ]
    );
}

#[test]
fn typos_are_rejected_with_the_valid_fields() {
    let err = serde_yaml::from_str::<HttpRouteSpec>("rules: [{backendRef: [{name: echo}]}]")
        .expect_err("typo");
    let message = err.to_string();
    assert!(message.contains("unknown field `backendRef`"), "{message}");
    assert!(message.contains("backendRefs"), "{message}");
    let err = serde_yaml::from_str::<HttpRouteSpec>("rules: [{matches: [{path: {type: Prefix}}]}]")
        .expect_err("bad enum");
    assert!(err.to_string().contains("PathPrefix"), "{err}");
}
