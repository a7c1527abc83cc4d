//! The example plugins, built with the crates.io proxy-wasm SDK, run unchanged on the host.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use plugins::{
    CallFuture, CallRequest, CallResponse, Dispatcher, Headers, Host, NodeInfo, Verdict,
};
use support::{example, info, load, load_on, request, response};

#[tokio::test]
async fn add_header_adds_configured_response_headers() {
    let (_host, plugin) = load(
        "add_header",
        r#"{"headers": {"x-wasm": "hello", "x-two": "2"}}"#,
    );
    let mut s = plugin.stream(info()).unwrap();
    let mut req = request("/", &[]);
    assert!(matches!(
        s.request_headers(&mut req, true).await,
        Verdict::Continue
    ));
    assert!(!req.is_modified());
    let mut resp = response();
    assert!(matches!(
        s.response_headers(&mut resp, false).await,
        Verdict::Continue
    ));
    assert_eq!(resp.get_str("x-wasm"), Some("hello"));
    assert_eq!(resp.get_str("x-two"), Some("2"));
    assert_eq!(resp.get_str(":status"), Some("200"));
    drop(s);
    assert_eq!(
        plugin.live_streams(),
        0,
        "on_delete ran and the context is gone"
    );
}

#[tokio::test]
async fn invalid_configuration_is_refused_at_load() {
    let host = Host::new(NodeInfo::default(), Arc::new(plugins::NoCalls)).unwrap();
    let module = host.compile(&example("api_key")).unwrap();
    let cfg = plugins::PluginConfig::new("default.k", "k", &b"{not json"[..]);
    let err = host.load(&module, cfg).unwrap_err();
    assert!(matches!(err, plugins::LoadError::ConfigureRefused), "{err}");
}

#[tokio::test]
async fn api_key_answers_401_locally_and_strips_the_key() {
    let (_host, plugin) = load("api_key", r#"{"keys": ["secret"]}"#);
    let mut s = plugin.stream(info()).unwrap();
    let mut req = request("/", &[]);
    let Verdict::Local(r) = s.request_headers(&mut req, true).await else {
        panic!("expected a local response");
    };
    assert_eq!(r.status, 401);
    assert_eq!(r.headers.get_str("www-authenticate"), Some("ApiKey"));
    assert_eq!(&r.body[..], b"missing or invalid API key\n");
    // The request headers come back even though the plugin answered.
    assert_eq!(req.get_str(":path"), Some("/"));

    let mut s = plugin.stream(info()).unwrap();
    let mut req = request("/", &[("x-api-key", "secret")]);
    assert!(matches!(
        s.request_headers(&mut req, true).await,
        Verdict::Continue
    ));
    assert!(req.get("x-api-key").is_none());
    assert!(req.is_modified());
}

#[tokio::test]
async fn rewrite_path_changes_the_pseudo_header() {
    let (_host, plugin) = load(
        "rewrite_path",
        r#"{"prefix": "/old", "replacement": "/new"}"#,
    );
    let mut s = plugin.stream(info()).unwrap();
    let mut req = request("/old/x?q=1", &[]);
    assert!(matches!(
        s.request_headers(&mut req, true).await,
        Verdict::Continue
    ));
    assert_eq!(req.get_str(":path"), Some("/new/x?q=1"));
    assert_eq!(req.get_str("x-original-path"), Some("/old/x?q=1"));
}

#[tokio::test]
async fn counter_counts_across_requests_in_a_plugin_metric() {
    let (host, plugin) = load("counter", r#"{"metric": "hits_total"}"#);
    for n in 1..=3 {
        let mut s = plugin.stream(info()).unwrap();
        let mut req = request("/", &[]);
        assert!(matches!(
            s.request_headers(&mut req, true).await,
            Verdict::Continue
        ));
        let mut resp = response();
        assert!(matches!(
            s.response_headers(&mut resp, true).await,
            Verdict::Continue
        ));
        assert_eq!(
            resp.get_str("x-request-count"),
            Some(n.to_string().as_str())
        );
    }
    let snapshot = host.metrics().snapshot();
    assert_eq!(
        snapshot,
        vec![("hits_total".to_owned(), plugins::MetricValue::Counter(3))]
    );
}

#[tokio::test]
async fn body_inspect_buffers_until_the_end_and_refuses_forbidden_bodies() {
    let (_host, plugin) = load("body_inspect", r#"{"deny": ["DROP TABLE"]}"#);
    let mut s = plugin.stream(info()).unwrap();
    let mut req = request("/", &[]);
    assert!(matches!(
        s.request_headers(&mut req, false).await,
        Verdict::Continue
    ));
    let mut chunk = Some(Bytes::from_static(b"hello "));
    assert!(matches!(
        s.request_body(&mut chunk, false).await,
        Verdict::Continue
    ));
    assert_eq!(chunk, None, "buffered while the plugin pauses");
    let mut chunk = Some(Bytes::from_static(b"world"));
    assert!(matches!(
        s.request_body(&mut chunk, true).await,
        Verdict::Continue
    ));
    assert_eq!(
        chunk.as_deref(),
        Some(&b"hello world"[..]),
        "the whole body is released"
    );
    let mut resp = response();
    assert!(matches!(
        s.response_headers(&mut resp, false).await,
        Verdict::Continue
    ));
    assert_eq!(resp.get_str("x-body-bytes"), Some("11"));

    let mut s = plugin.stream(info()).unwrap();
    let mut req = request("/", &[]);
    let _ = s.request_headers(&mut req, false).await;
    let mut chunk = Some(Bytes::from_static(b"x'; DROP "));
    let _ = s.request_body(&mut chunk, false).await;
    let mut chunk = Some(Bytes::from_static(b"TABLE users"));
    let Verdict::Local(r) = s.request_body(&mut chunk, true).await else {
        panic!("expected a local response");
    };
    assert_eq!(r.status, 403);
}

/// An auth service that allows requests carrying `authorization: ok`.
struct Auth;

impl Dispatcher for Auth {
    fn dispatch(&self, upstream: &str, request: CallRequest) -> Option<CallFuture> {
        if upstream != "outbound|8080||auth.default.svc.cluster.local" {
            return None;
        }
        Some(Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let allowed = request.headers.get_str("authorization") == Some("ok");
            let mut headers = Headers::new();
            headers.push(":status", if allowed { "200" } else { "403" });
            if allowed {
                headers.push("x-auth-user", "alice");
            }
            match request.headers.get_str("x-original-path") {
                Some("/broken") => return Err("connection reset".to_owned()),
                // Longer than the plugin's timeout: the host gives up first.
                Some("/slow") => tokio::time::sleep(Duration::from_secs(30)).await,
                _ => {}
            }
            Ok(CallResponse {
                headers,
                body: Bytes::new(),
                trailers: Headers::new(),
            })
        }))
    }
}

#[tokio::test]
async fn auth_call_pauses_until_the_auth_service_answers() {
    let host = Host::new(NodeInfo::default(), Arc::new(Auth)).unwrap();
    let config = r#"{"upstream": "outbound|8080||auth.default.svc.cluster.local", "authority": "auth.default.svc.cluster.local"}"#;
    let plugin = load_on(&host, &example("auth_call"), "auth_call", config);

    let mut s = plugin.stream(info()).unwrap();
    let mut req = request("/", &[("authorization", "ok"), ("x-auth-user", "forged")]);
    assert!(matches!(
        s.request_headers(&mut req, true).await,
        Verdict::Continue
    ));
    assert_eq!(
        req.get_str("x-auth-user"),
        Some("alice"),
        "set from the auth answer while paused"
    );
    assert_eq!(req.get_str(":path"), Some("/"));

    let mut s = plugin.stream(info()).unwrap();
    let mut req = request("/", &[("authorization", "bad")]);
    let Verdict::Local(r) = s.request_headers(&mut req, true).await else {
        panic!("expected a local response");
    };
    assert_eq!(r.status, 403);

    let mut s = plugin.stream(info()).unwrap();
    let mut req = request("/broken", &[("authorization", "ok")]);
    let Verdict::Local(r) = s.request_headers(&mut req, true).await else {
        panic!("expected a local response");
    };
    assert_eq!(r.status, 503, "a failed call is answered by the plugin");
}

#[tokio::test]
async fn an_http_call_that_outlives_its_timeout_fails() {
    let host = Host::new(NodeInfo::default(), Arc::new(Auth)).unwrap();
    let config = r#"{"upstream": "outbound|8080||auth.default.svc.cluster.local", "authority": "auth", "timeout_ms": 100}"#;
    let plugin = load_on(&host, &example("auth_call"), "auth_call", config);
    let mut s = plugin.stream(info()).unwrap();
    let mut req = request("/slow", &[("authorization", "ok")]);
    let started = std::time::Instant::now();
    let Verdict::Local(r) = s.request_headers(&mut req, true).await else {
        panic!("expected a local response");
    };
    assert_eq!(r.status, 503);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn auth_call_to_an_unknown_upstream_fails_at_dispatch() {
    let host = Host::new(NodeInfo::default(), Arc::new(Auth)).unwrap();
    let config = r#"{"upstream": "outbound|1||nowhere", "authority": "nowhere"}"#;
    let plugin = load_on(&host, &example("auth_call"), "auth_call", config);
    let mut s = plugin.stream(info()).unwrap();
    let mut req = request("/", &[]);
    let Verdict::Local(r) = s.request_headers(&mut req, true).await else {
        panic!("expected a local response");
    };
    assert_eq!(r.status, 503);
}

#[tokio::test]
async fn a_thousand_requests_leave_no_stream_context_behind() {
    let (_host, plugin) = load("noop", "");
    for _ in 0..1000 {
        let mut s = plugin.stream(info()).unwrap();
        let mut req = request("/", &[]);
        assert!(matches!(
            s.request_headers(&mut req, true).await,
            Verdict::Continue
        ));
    }
    assert_eq!(plugin.live_streams(), 0);
    assert_eq!(plugin.traps(), 0);
}
