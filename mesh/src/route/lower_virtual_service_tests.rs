use std::time::Duration;

use super::*;
use crate::route::test_support::{Req, Services, yaml};
use crate::route::{
    PathRewrite, Precedence, RedirectPort, RetryCondition, RetryPolicy, RouteTable,
    UnmatchedPreflights, VirtualServiceSpec,
};

const REVIEWS: &str = "reviews.default.svc.cluster.local";

/// DestinationRules define subsets v1 and v2 of reviews only.
fn subsets(host: &str, subset: &str) -> bool {
    host == REVIEWS && (subset == "v1" || subset == "v2")
}

fn lower(text: &str) -> Result<Vec<Attachment>, Vec<FieldError>> {
    let spec: VirtualServiceSpec = yaml(text);
    lower_virtual_service("default", "vs", &spec, &Services::mesh(), &subsets)
}

fn rules(text: &str) -> Vec<RouteRule> {
    let mut attachments = lower(text).unwrap_or_else(|e| panic!("unexpected problems: {e:?}"));
    assert_eq!(attachments.len(), 1, "{attachments:?}");
    attachments.remove(0).rules
}

fn by_name<'a>(rules: &'a [RouteRule], name: &str) -> &'a RouteRule {
    rules
        .iter()
        .find(|r| r.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("rule {name}"))
}

#[test]
fn hosts_and_gateways_decide_attachment() {
    let route = "http: [{route: [{destination: {host: echo}}]}]";
    let cases: &[(&str, &[&str])] = &[
        ("hosts: [echo]", &["echo.default.svc.cluster.local"]),
        (
            "hosts: [echo.default, reviews.default.svc.cluster.local, echo]",
            &["echo.default.svc.cluster.local", REVIEWS],
        ),
        (
            "hosts: [productpage.shop]",
            &["productpage.shop.svc.cluster.local"],
        ),
        (
            "hosts: [api.example.com]\ngateways: [mesh, istio-system/ingress]",
            &["api.example.com"],
        ),
        ("hosts: [echo]\ngateways: [istio-system/ingress]", &[]),
    ];
    for (head, want) in cases {
        let got = lower(&format!("{head}\n{route}")).unwrap_or_else(|e| panic!("{head}: {e:?}"));
        let got: Vec<&str> = got.iter().map(|a| &*a.service).collect();
        assert_eq!(got, *want, "{head}");
    }
    // Only TCP routes: nothing for the HTTP router.
    assert!(
        lower("hosts: [echo]\ntcp: [{route: [{destination: {host: echo}}]}]")
            .expect("valid")
            .is_empty()
    );
}

const MATCHING: &str = r#"
hosts: [echo]
http:
- {name: exact, match: [{uri: {exact: /exact}}], route: [{destination: {host: echo}}]}
- {name: prefix, match: [{uri: {prefix: /api}}], route: [{destination: {host: echo}}]}
- {name: regex, match: [{uri: {regex: "/v[0-9]+/.*"}}], route: [{destination: {host: echo}}]}
- {name: header, match: [{headers: {x-user: {exact: admin}}}], route: [{destination: {host: echo}}]}
- {name: header-present, match: [{headers: {x-debug: {}}}], route: [{destination: {host: echo}}]}
- {name: query, match: [{queryParams: {q: {regex: "[0-9]+"}}}], route: [{destination: {host: echo}}]}
- {name: method, match: [{method: {exact: DELETE}}], route: [{destination: {host: echo}}]}
- {name: authority, match: [{authority: {prefix: echo.other}}], route: [{destination: {host: echo}}]}
- {name: ignore-case, match: [{uri: {exact: /CaSe}, ignoreUriCase: true}], route: [{destination: {host: echo}}]}
- {name: without, match: [{uri: {prefix: /w}, withoutHeaders: {x-block: {exact: "1"}}}], route: [{destination: {host: echo}}]}
- {name: port, match: [{port: 8080}], route: [{destination: {host: echo}}]}
- {name: other-gateway, match: [{gateways: [ingress], uri: {prefix: /}}], route: [{destination: {host: echo}}]}
- {name: source, match: [{sourceNamespace: shop}], route: [{destination: {host: echo}}]}
- {name: labels-ignored, match: [{uri: {prefix: /labels}, sourceLabels: {app: x}}], route: [{destination: {host: echo}}]}
- {name: or, match: [{uri: {exact: /a}}, {uri: {exact: /b}}], route: [{destination: {host: echo}}]}
- {name: catch-all, route: [{destination: {host: echo}}]}
"#;

#[test]
fn first_match_wins() {
    let table = RouteTable::new(rules(MATCHING), Precedence::FirstMatch);
    assert_eq!(table.rules().len(), 15, "the other-gateway rule is dropped");
    let cases = [
        (Req::get("/exact"), "exact", 0),
        (Req::get("/exactly"), "catch-all", 0),
        (Req::get("/apiary"), "prefix", 0),
        (Req::get("/api").method("DELETE"), "prefix", 0),
        (Req::get("/v1/x"), "regex", 0),
        (Req::get("/v1"), "catch-all", 0),
        (Req::get("/").header("x-user", "admin"), "header", 0),
        (Req::get("/").header("x-user", "Admin"), "catch-all", 0),
        (Req::get("/").header("x-debug", ""), "header-present", 0),
        (Req::get("/search?q=42"), "query", 0),
        (Req::get("/search?q=4x"), "catch-all", 0),
        (Req::get("/").method("DELETE"), "method", 0),
        (Req::get("/").authority("echo.other:80"), "authority", 0),
        (Req::get("/case"), "ignore-case", 0),
        (Req::get("/w"), "without", 0),
        (Req::get("/w").header("x-block", "0"), "without", 0),
        (Req::get("/w").header("x-block", "1"), "catch-all", 0),
        (Req::get("/z").port(8080), "port", 0),
        (Req::get("/labels"), "labels-ignored", 0),
        (Req::get("/a"), "or", 0),
        (Req::get("/b"), "or", 1),
        (Req::get("/zzz"), "catch-all", 0),
    ];
    for (req, want, index) in cases {
        let (rule, m) = table.select(&req.view()).expect("catch-all");
        assert_eq!((rule.name.as_deref(), m), (Some(want), index), "{req:?}");
    }
    let source = by_name(table.rules(), "source");
    assert_eq!(source.matches[0].source_namespace.as_deref(), Some("shop"));
    assert_eq!(
        source.source.to_string(),
        "VirtualService default/vs http[12]"
    );
}

#[test]
fn destinations_weights_and_headers() {
    let rules = rules(
        r#"
hosts: [reviews]
http:
- name: single
  route: [{destination: {host: reviews, subset: v1, port: {number: 9080}}, weight: 0}]
- name: split
  route:
  - destination: {host: reviews, subset: v1}
    weight: 25
    headers: {request: {set: {x-version: v1}}, response: {remove: [x-internal]}}
  - {destination: {host: reviews.default.svc.cluster.local, subset: v2}, weight: 75}
  - {destination: {host: ratings}}
"#,
    );
    let forward = |name: &str| match &by_name(&rules, name).action {
        RuleAction::Forward(backends) => backends.clone(),
        other => panic!("{other:?}"),
    };
    let single = forward("single");
    assert_eq!(single.len(), 1);
    assert_eq!(single[0].weight, 100);
    assert_eq!(single[0].backend.port, Some(9080));
    assert_eq!(single[0].backend.subset.as_deref(), Some("v1"));
    let split = forward("split");
    let weights: Vec<(&str, Option<&str>, u32)> = split
        .iter()
        .map(|b| (&*b.backend.service, b.backend.subset.as_deref(), b.weight))
        .collect();
    assert_eq!(
        weights,
        [
            (REVIEWS, Some("v1"), 25),
            (REVIEWS, Some("v2"), 75),
            ("ratings.default.svc.cluster.local", None, 0),
        ]
    );
    assert_eq!(split[0].request_headers.set[0].0, "x-version");
    assert_eq!(split[0].response_headers.remove, ["x-internal"]);
    assert!(split[1].request_headers.is_empty());
}

#[test]
fn rule_features_lower() {
    let rules = rules(
        r#"
hosts: [echo]
http:
- name: redirect
  redirect: {uri: /new, authority: example.org, scheme: https}
- name: redirect-port
  redirect: {port: 8443, redirectCode: 308}
- name: redirect-derive
  redirect: {derivePort: FROM_PROTOCOL_DEFAULT, scheme: https}
- name: direct
  directResponse: {status: 418, body: {string: teapot}}
- name: direct-bytes
  directResponse: {status: 200, body: {bytes: aGk=}}
- name: rewrite
  rewrite: {uri: /v2, authority: internal}
  timeout: 3s
  retries: {attempts: 3, perTryTimeout: 500ms, retryOn: "5xx,reset,429", backoff: 50ms}
  route: [{destination: {host: echo}}]
- name: regex-rewrite
  rewrite: {uriRegexRewrite: {match: "^/svc/([^/]+)", rewrite: '/\1'}}
  retries: {attempts: 0, perTryTimeout: 1s}
  route: [{destination: {host: echo}}]
- name: fault
  fault:
    delay: {fixedDelay: 5s, percentage: {value: 10.5}}
    abort: {httpStatus: 503}
  route: [{destination: {host: echo}}]
- name: fault-legacy
  fault: {delay: {fixedDelay: 1s, percent: 20}}
  route: [{destination: {host: echo}}]
- name: mirror
  mirror: {host: reviews, subset: v2}
  mirrorPercentage: {value: 12.5}
  route: [{destination: {host: echo}}]
- name: mirrors
  mirrors:
  - {destination: {host: ratings}}
  - {destination: {host: reviews}, percentage: {value: 0}}
  route: [{destination: {host: echo}}]
- name: cors
  corsPolicy:
    allowOrigins: [{exact: "https://a.example"}, {prefix: "https://b."}, {regex: "https://c[0-9]\\.example"}]
    allowOrigin: ["https://legacy.example"]
    allowMethods: [GET]
    maxAge: 24h
    allowCredentials: true
    unmatchedPreflights: IGNORE
  headers:
    request: {set: {x-a: "1"}, add: {x-b: "2"}, remove: [x-c]}
    response: {set: {x-d: "3"}}
  route: [{destination: {host: echo}}]
"#,
    );
    let redirect = |name: &str| match &by_name(&rules, name).action {
        RuleAction::Redirect(r) => r.clone(),
        other => panic!("{other:?}"),
    };
    let r = redirect("redirect");
    assert_eq!((r.status, r.port), (301, RedirectPort::Request));
    assert_eq!(
        (r.scheme.as_deref(), r.host.as_deref()),
        (Some("https"), Some("example.org"))
    );
    assert!(matches!(&r.path, Some(PathRewrite::Full(p)) if &**p == "/new"));
    let r = redirect("redirect-port");
    assert_eq!((r.status, r.port), (308, RedirectPort::Explicit(8443)));
    assert_eq!(
        redirect("redirect-derive").port,
        RedirectPort::SchemeDefault
    );

    let direct = |name: &str| match &by_name(&rules, name).action {
        RuleAction::DirectResponse { status, body } => {
            (*status, body.as_deref().map(<[u8]>::to_vec))
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(direct("direct"), (418, Some(b"teapot".to_vec())));
    assert_eq!(direct("direct-bytes"), (200, Some(b"hi".to_vec())));

    let rw = by_name(&rules, "rewrite");
    let rewrite = rw.rewrite.as_ref().expect("rewrite");
    assert!(matches!(&rewrite.path, Some(PathRewrite::Prefix(p)) if &**p == "/v2"));
    assert_eq!(
        rewrite.authority.as_ref().map(|a| a.as_bytes()),
        Some(&b"internal"[..])
    );
    assert_eq!(rw.timeout, Some(Duration::from_secs(3)));
    assert_eq!(rw.per_try_timeout, Some(Duration::from_millis(500)));
    let retry = rw.retry.as_ref().expect("retry");
    assert_eq!(
        (retry.attempts, retry.backoff),
        (3, Some(Duration::from_millis(50)))
    );
    assert_eq!(
        retry.retry_on.conditions,
        [
            RetryCondition::ServerError,
            RetryCondition::Reset,
            RetryCondition::RetriableStatusCodes
        ]
    );
    assert_eq!(retry.retry_on.status_codes, [429]);

    let regex = by_name(&rules, "regex-rewrite");
    let matched = &regex.matches[0];
    let path = regex
        .rewrite
        .as_ref()
        .and_then(|r| r.path.as_ref())
        .expect("path");
    assert_eq!(path.apply("/svc/foo/bar?x", matched), "/foo/bar?x");
    assert_eq!((&regex.retry, regex.per_try_timeout), (&None, None));
    assert_eq!(
        by_name(&rules, "redirect").retry,
        Some(RetryPolicy::mesh_default())
    );

    let fault = by_name(&rules, "fault").fault.expect("fault");
    let delay = fault.delay.expect("delay");
    assert_eq!((delay.delay, delay.percent), (Duration::from_secs(5), 10.5));
    let abort = fault.abort.expect("abort");
    assert_eq!((abort.status, abort.percent), (503, 0.0));
    let legacy = by_name(&rules, "fault-legacy")
        .fault
        .expect("fault")
        .delay
        .expect("delay");
    assert_eq!(legacy.percent, 20.0);

    let mirror = &by_name(&rules, "mirror").mirrors;
    assert_eq!(mirror.len(), 1);
    assert_eq!(
        (mirror[0].backend.subset.as_deref(), mirror[0].percent),
        (Some("v2"), 12.5)
    );
    let mirrors = &by_name(&rules, "mirrors").mirrors;
    assert_eq!(mirrors.len(), 1, "0% mirrors are off");
    assert_eq!(
        (&*mirrors[0].backend.service, mirrors[0].percent),
        ("ratings.default.svc.cluster.local", 100.0)
    );

    let c = by_name(&rules, "cors");
    let cors = c.cors.as_ref().expect("cors");
    for (origin, allowed) in [
        ("https://a.example", true),
        ("https://b.anything", true),
        ("https://c7.example", true),
        ("https://c77.example", false),
        ("https://legacy.example", true),
        ("https://d.example", false),
    ] {
        assert_eq!(cors.allows_origin(origin), allowed, "{origin}");
    }
    assert_eq!(cors.max_age, Some(Duration::from_secs(86400)));
    assert!(cors.allow_credentials);
    assert_eq!(cors.unmatched_preflights, UnmatchedPreflights::Ignore);
    assert_eq!(c.request_headers.set[0].0, "x-a");
    assert_eq!(c.request_headers.add[0].0, "x-b");
    assert_eq!(c.request_headers.remove, ["x-c"]);
    assert_eq!(c.response_headers.set[0].0, "x-d");
}

#[test]
fn a_shared_match_port_becomes_the_attachment_port() {
    let text = |second: &str| {
        format!(
            "hosts: [echo]\nhttp:\n- {{match: [{{port: 8080, uri: {{prefix: /a}}}}], route: [{{destination: {{host: echo}}}}]}}\n- {{match: [{second}], route: [{{destination: {{host: echo}}}}]}}"
        )
    };
    let port = |t: String| lower(&t).expect("valid")[0].port;
    assert_eq!(port(text("{port: 8080}")), Some(8080));
    assert_eq!(port(text("{port: 80}")), None);
    assert_eq!(port(text("{uri: {prefix: /b}}")), None);
}

fn problems(text: &str) -> Vec<(String, String)> {
    let errors = lower(text).expect_err("should be invalid");
    errors.into_iter().map(|e| (e.field, e.message)).collect()
}

#[test]
fn semantic_errors_name_the_field() {
    let to = "route: [{destination: {host: echo}}]";
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("hosts: [ghost]\nhttp: [{{{to}}}]"),
            "spec.hosts[0]",
            "no Service or ServiceEntry has host \"ghost\" (short names resolve in namespace \"default\")",
        ),
        (format!("hosts: [\"*.example.com\"]\nhttp: [{{{to}}}]"), "spec.hosts[0]", "wildcard host"),
        (format!("http: [{{{to}}}]"), "spec.hosts", "at least one host is required"),
        (
            format!("hosts: [echo]\nexportTo: [\"~\"]\nhttp: [{{{to}}}]"),
            "spec.exportTo[0]",
            "a VirtualService cannot be exported to no namespace",
        ),
        (
            format!("hosts: [echo]\nexportTo: [\".\", default]\nhttp: [{{{to}}}]"),
            "spec.exportTo[1]",
            "its own namespace, are the same",
        ),
        (
            "hosts: [echo]\nhttp: [{route: [{destination: {host: nope}}]}]".to_owned(),
            "spec.http[0].route[0].destination.host",
            "no Service or ServiceEntry has host \"nope\"",
        ),
        (
            "hosts: [echo]\nhttp: [{route: [{destination: {host: reviews, subset: v3}}]}]".to_owned(),
            "spec.http[0].route[0].destination.subset",
            "subset \"v3\" is not defined by any DestinationRule for reviews.default.svc.cluster.local",
        ),
        (
            "hosts: [echo]\nhttp: [{route: [{destination: {host: echo}}, {destination: {host: reviews}, weight: 0}]}]".to_owned(),
            "spec.http[0].route",
            "every destination has weight 0",
        ),
        (
            "hosts: [echo]\nhttp: [{route: [{destination: {host: echo, port: {number: 70000}}}]}]".to_owned(),
            "spec.http[0].route[0].destination.port.number",
            "70000 is not a port",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{match: [{{uri: {{regex: \"(\"}}}}], {to}}}]"),
            "spec.http[0].match[0].uri.regex",
            "invalid regular expression \"(\"",
        ),
        (
            // Unbalanced: anchored as written it would be `^(?:/a)|(.*)$`, matching every path.
            format!("hosts: [echo]\nhttp: [{{match: [{{uri: {{regex: \"/a)|(.*\"}}}}], {to}}}]"),
            "spec.http[0].match[0].uri.regex",
            "invalid regular expression \"/a)|(.*\"",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{match: [{{headers: {{x: {{regex: \"[\"}}}}}}], {to}}}]"),
            "spec.http[0].match[0].headers.x.regex",
            "invalid regular expression",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{match: [{{uri: {{exact: /a, prefix: /b}}}}], {to}}}]"),
            "spec.http[0].match[0].uri",
            "set only one of exact, prefix and regex",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{match: [{{headers: {{\":authority\": {{exact: a}}}}}}], {to}}}]"),
            "spec.http[0].match[0].headers.:authority",
            "pseudo-headers cannot be matched here",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{match: [{{port: 0}}], {to}}}]"),
            "spec.http[0].match[0].port",
            "0 is not a port",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{timeout: 1x, {to}}}]"),
            "spec.http[0].timeout",
            "invalid duration \"1x\"",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{retries: {{attempts: 2, perTryTimeout: fast}}, {to}}}]"),
            "spec.http[0].retries.perTryTimeout",
            "invalid duration \"fast\"",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{retries: {{attempts: 2, retryOn: \"5xx,sometimes\"}}, {to}}}]"),
            "spec.http[0].retries.retryOn",
            "\"sometimes\" is not a retry policy",
        ),
        ("hosts: [echo]\nhttp: [{name: empty}]".to_owned(), "spec.http[0]", "one of route, redirect or directResponse is required"),
        (
            format!("hosts: [echo]\nhttp: [{{redirect: {{uri: /x}}, {to}}}]"),
            "spec.http[0]",
            "route, redirect are mutually exclusive",
        ),
        (
            "hosts: [echo]\nhttp: [{delegate: {name: other}}]".to_owned(),
            "spec.http[0].delegate",
            "delegate is only supported by ingress gateways",
        ),
        (
            "hosts: [echo]\nhttp: [{redirect: {uri: /x}, rewrite: {uri: /y}}]".to_owned(),
            "spec.http[0].rewrite",
            "rewrite cannot be combined with redirect",
        ),
        (
            "hosts: [echo]\nhttp: [{redirect: {redirectCode: 200}}]".to_owned(),
            "spec.http[0].redirect.redirectCode",
            "200 is not a redirect status",
        ),
        (
            "hosts: [echo]\nhttp: [{redirect: {port: 80, derivePort: FROM_REQUEST_PORT}}]".to_owned(),
            "spec.http[0].redirect",
            "set port or derivePort, not both",
        ),
        (
            "hosts: [echo]\nhttp: [{directResponse: {status: 700}}]".to_owned(),
            "spec.http[0].directResponse.status",
            "700 is not a response status",
        ),
        (
            "hosts: [echo]\nhttp: [{directResponse: {status: 200, body: {bytes: \"***\"}}}]".to_owned(),
            "spec.http[0].directResponse.body.bytes",
            "not valid base64",
        ),
        (
            "hosts: [echo]\nhttp: [{directResponse: {status: 200, body: {string: a, bytes: YQ==}}}]".to_owned(),
            "spec.http[0].directResponse.body",
            "set string or bytes, not both",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{rewrite: {{uri: /a, uriRegexRewrite: {{match: a, rewrite: b}}}}, {to}}}]"),
            "spec.http[0].rewrite",
            "set uri or uriRegexRewrite, not both",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{fault: {{abort: {{httpStatus: 503, percentage: {{value: 150}}}}}}, {to}}}]"),
            "spec.http[0].fault.abort.percentage.value",
            "150 is not a percentage",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{fault: {{abort: {{grpcStatus: UNAVAILABLE}}}}, {to}}}]"),
            "spec.http[0].fault.abort.grpcStatus",
            "gRPC aborts are not supported",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{fault: {{delay: {{percentage: {{value: 5}}}}}}, {to}}}]"),
            "spec.http[0].fault.delay.fixedDelay",
            "fixedDelay is required",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{mirror: {{host: echo}}, mirrors: [{{destination: {{host: echo}}}}], {to}}}]"),
            "spec.http[0].mirrors",
            "set mirror or mirrors, not both",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{mirrors: [{{destination: {{host: reviews, subset: v9}}}}], {to}}}]"),
            "spec.http[0].mirrors[0].destination.subset",
            "subset \"v9\" is not defined",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{corsPolicy: {{maxAge: forever}}, {to}}}]"),
            "spec.http[0].corsPolicy.maxAge",
            "invalid duration \"forever\"",
        ),
        (
            format!("hosts: [echo]\nhttp: [{{headers: {{request: {{set: {{\"bad name\": x}}}}}}, {to}}}]"),
            "spec.http[0].headers.request.set.bad name",
            "is not a valid HTTP header name",
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
fn typos_are_rejected_with_the_valid_fields() {
    let err =
        serde_yaml::from_str::<VirtualServiceSpec>("http: [{matches: []}]").expect_err("typo");
    let message = err.to_string();
    assert!(message.contains("unknown field `matches`"), "{message}");
    assert!(message.contains("`match`"), "{message}");
}
