//! How policies combine: CUSTOM, then DENY, then ALLOW; AUDIT and dry-run never decide.

use super::{Request, dry_run, named, policy};
use crate::authz::{Policy, evaluate};

const ALLOW_ALL: &str = "rules: [{}]";
const ALLOW_NONE: &str = "{}";
const ALLOW_CLIENT: &str = "rules: [{from: [{source: {namespaces: [client-ns]}}]}]";
const ALLOW_OTHER: &str = "rules: [{from: [{source: {namespaces: [other]}}]}]";
const DENY_GET: &str = "action: DENY\nrules: [{to: [{operation: {methods: [GET]}}]}]";
const DENY_POST: &str = "action: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]";
const AUDIT_GET: &str = "action: AUDIT\nrules: [{to: [{operation: {methods: [GET]}}]}]";
const AUDIT_POST: &str = "action: AUDIT\nrules: [{to: [{operation: {methods: [POST]}}]}]";
const CUSTOM_API: &str = "action: CUSTOM\nprovider: {name: ext-authz}\nrules: [{to: [{operation: {paths: ['/api/*']}}]}]";
const CUSTOM_ADMIN: &str = "action: CUSTOM\nprovider: {name: ext-authz}\nrules: [{to: [{operation: {paths: ['/admin/*']}}]}]";
const STRICT: &str = "action: DENY\nrules: [{from: [{source: {notPrincipals: ['*']}}]}]";

/// (what, enforced policies, dry-run policies, allowed, name of the deciding policy, audit,
/// name of the dry-run policy that would have changed the decision)
type Case = (
    &'static str,
    &'static [&'static str],
    &'static [&'static str],
    bool,
    Option<&'static str>,
    bool,
    Option<&'static str>,
);

fn compile_all(yamls: &[&str], make: fn(&str, &str) -> Policy, prefix: &str) -> Vec<Policy> {
    (yamls.iter().enumerate())
        .map(|(i, yaml)| make(&format!("{prefix}{i}"), yaml))
        .collect()
}

#[test]
fn decisions() {
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("no policies allow", &[], &[], true, None, false, None),
        ("spec {} denies everything", &[ALLOW_NONE], &[], false, None, false, None),
        ("rules [{}] allows everything", &[ALLOW_ALL], &[], true, Some("p0"), false, None),
        ("matching ALLOW allows", &[ALLOW_OTHER, ALLOW_CLIENT], &[], true, Some("p1"), false, None),
        ("no ALLOW matches: deny", &[ALLOW_OTHER], &[], false, None, false, None),
        ("no ALLOW policy: allow", &[DENY_POST], &[], true, None, false, None),
        ("DENY wins over ALLOW", &[ALLOW_ALL, DENY_GET], &[], false, Some("p1"), false, None),
        ("DENY wins over ALLOW, either order", &[DENY_GET, ALLOW_ALL], &[], false, Some("p0"), false, None),
        ("non-matching DENY leaves ALLOW", &[DENY_POST, ALLOW_CLIENT], &[], true, Some("p1"), false, None),
        ("AUDIT has no effect on allow", &[AUDIT_GET], &[], true, None, true, None),
        ("AUDIT has no effect on deny", &[AUDIT_GET, ALLOW_OTHER], &[], false, None, true, None),
        ("non-matching AUDIT", &[AUDIT_POST], &[], true, None, false, None),
        ("AUDIT is reported even when denied", &[DENY_GET, AUDIT_GET], &[], false, Some("p0"), true, None),
        ("CUSTOM fails closed", &[CUSTOM_API, ALLOW_ALL], &[], false, Some("p0"), false, None),
        ("non-matching CUSTOM", &[CUSTOM_ADMIN], &[], true, None, false, None),
        ("dry-run DENY reported, not enforced", &[ALLOW_ALL], &[DENY_GET], true, Some("p0"), false, Some("d0")),
        ("non-matching dry-run DENY", &[ALLOW_ALL], &[DENY_POST], true, Some("p0"), false, None),
        ("dry-run CUSTOM reported, not enforced", &[], &[CUSTOM_API], true, None, false, Some("d0")),
        ("dry-run ALLOW would deny when nothing matches", &[], &[ALLOW_OTHER], true, None, false, Some("d0")),
        ("dry-run ALLOW that matches changes nothing", &[], &[ALLOW_CLIENT], true, None, false, None),
        ("dry-run ALLOW would allow", &[ALLOW_OTHER], &[ALLOW_CLIENT], false, None, false, Some("d0")),
        ("dry-run ALLOW cannot beat a DENY", &[DENY_GET], &[ALLOW_ALL], false, Some("p0"), false, None),
        ("dry-run ALLOW beaten by a dry-run DENY", &[ALLOW_OTHER], &[ALLOW_CLIENT, DENY_GET], false, None, false, None),
        ("dry-run AUDIT neither audits nor decides", &[], &[AUDIT_GET], true, None, false, None),
    ];
    for (what, enforced, dry, allowed, decided_by, audit, would_change) in cases {
        let mut policies = compile_all(enforced, named, "p");
        policies.extend(compile_all(dry, dry_run, "d"));
        let request = Request::http();
        let verdict = evaluate(&policies, &request.attrs());
        assert_eq!(verdict.allowed, *allowed, "{what}: allowed");
        assert_eq!(
            verdict.policy.map(Policy::name),
            *decided_by,
            "{what}: policy"
        );
        assert_eq!(verdict.audit, *audit, "{what}: audit");
        assert_eq!(
            verdict.dry_run.map(Policy::name),
            *would_change,
            "{what}: dry_run"
        );
    }
}

#[test]
fn strict_peer_authentication_rejects_plaintext() {
    let policies = [policy(STRICT)];
    let mut request = Request::tcp();
    assert!(evaluate(&policies, &request.attrs()).allowed, "mTLS passes");
    request.identity = None;
    let verdict = evaluate(&policies, &request.attrs());
    assert!(!verdict.allowed, "plaintext is denied");
    assert_eq!(verdict.policy.map(Policy::name), Some("test"));
}

#[test]
fn accessors_report_the_resource() {
    let p = dry_run("audit-me", AUDIT_GET);
    assert_eq!((p.namespace(), p.name()), ("app", "audit-me"));
    assert_eq!(p.action(), crate::authz::Action::Audit);
    assert!(p.dry_run());
}
