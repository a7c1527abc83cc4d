use std::path::PathBuf;
use std::sync::Arc;

use super::*;

fn parse(text: &str) -> Parsed {
    parse_file(&Arc::new(PathBuf::from("mesh.yaml")), text)
}

#[test]
fn reads_multi_document_files() {
    let parsed = parse(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  clusterIP: 10.96.0.20
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: http}]
---
# an empty document is fine
---
apiVersion: v1
kind: Pod
metadata: {name: reviews-v1, namespace: bookinfo, labels: {app: reviews}}
spec:
  nodeName: node-a
  serviceAccountName: reviews
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.0.0.5, phase: Running}
"#,
    );
    assert!(parsed.invalid.is_empty(), "{:?}", parsed.invalid);
    let kinds: Vec<_> = parsed.resources.iter().map(|r| r.resource.kind()).collect();
    assert_eq!(kinds, ["Namespace", "Service", "Pod"]);
    assert_eq!(parsed.resources[2].origin.document, 3);
    let Resource::Service(svc) = &parsed.resources[1].resource else {
        panic!("not a service")
    };
    assert_eq!(
        svc.spec.ports[0].target_port,
        Some(TargetPort::Name("http".into()))
    );
    assert_eq!(
        parsed.resources[2].resource.describe().to_string(),
        "Pod bookinfo/reviews-v1"
    );
}

#[test]
fn errors_name_file_document_resource_and_field() {
    let parsed = parse(
        r#"
apiVersion: v1
kind: Service
metadata: {name: ok}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  ports: [{port: 9080}, {port: 70000}]
"#,
    );
    assert_eq!(parsed.resources.len(), 1);
    let [problem] = &parsed.invalid[..] else {
        panic!("{:?}", parsed.invalid)
    };
    assert_eq!(problem.origin.document, 1);
    assert_eq!(problem.resource, "Service bookinfo/reviews");
    assert_eq!(problem.error.field, "spec.ports[1].port");
    let shown = problem.to_string();
    assert!(
        shown.starts_with("mesh.yaml (document 1): Service bookinfo/reviews: spec.ports[1].port"),
        "{shown}"
    );
}

#[test]
fn unknown_fields_in_istio_specs_list_the_valid_ones() {
    let parsed = parse(
        r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext, namespace: default}
spec:
  hosts: [api.example.com]
  prots: [{number: 443}]
"#,
    );
    let [problem] = &parsed.invalid[..] else {
        panic!("{:?}", parsed.invalid)
    };
    assert_eq!(problem.error.field, "spec.prots");
    assert!(
        problem.error.message.contains("unknown field `prots`"),
        "{}",
        problem.error.message
    );
    assert!(
        problem.error.message.contains("`ports`"),
        "{}",
        problem.error.message
    );
}

#[test]
fn envelope_problems() {
    let cases = [
        ("metadata: {name: x}\nspec: {}", "kind", "needs a `kind`"),
        (
            "apiVersion: v2\nkind: Service\nmetadata: {name: x}",
            "apiVersion",
            "apiVersion v1",
        ),
        (
            "apiVersion: networking.istio.io/v1\nkind: Service\nmetadata: {name: x}",
            "apiVersion",
            "got \"networking.istio.io/v1\"",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {}",
            "metadata.name",
            "needs a name",
        ),
    ];
    for (doc, field, message) in cases {
        let parsed = parse(doc);
        let [problem] = &parsed.invalid[..] else {
            panic!("{doc}: {:?}", parsed.invalid)
        };
        assert_eq!(problem.error.field, field, "{doc}");
        assert!(
            problem.error.message.contains(message),
            "{doc}: {}",
            problem.error.message
        );
    }
}

#[test]
fn unknown_kinds_are_skipped_and_named() {
    let parsed = parse(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: reviews, namespace: bookinfo}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: bookinfo}",
    );
    assert!(parsed.invalid.is_empty());
    assert_eq!(parsed.skipped, ["Deployment bookinfo/reviews"]);
    assert_eq!(parsed.resources.len(), 1);
}

#[test]
fn lists_are_expanded_with_item_paths() {
    let parsed = parse(
        r#"
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Namespace, metadata: {name: a}}
- {apiVersion: v1, kind: Service, metadata: {name: s}, spec: {ports: [{port: x}]}}
"#,
    );
    assert_eq!(parsed.resources.len(), 1);
    let [problem] = &parsed.invalid[..] else {
        panic!("{:?}", parsed.invalid)
    };
    assert_eq!(problem.error.field, "items[1].spec.ports[0].port");
}

#[test]
fn yaml_syntax_errors_are_reported() {
    let parsed = parse("apiVersion: v1\nkind: Namespace\nmetadata: {name: [unclosed\n");
    let [problem] = &parsed.invalid[..] else {
        panic!("{:?}", parsed.invalid)
    };
    assert!(
        problem.error.message.contains("not valid YAML"),
        "{}",
        problem.error.message
    );
}
