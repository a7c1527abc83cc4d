//! A policy as upstream ztunnel's `/config_dump` shows it, so `istioctl ztunnel-config
//! policies` reads ours: `rules` hold clauses that must all match, each a list of matches of
//! which one must, with Istio's field names and `{"Exact": ..}`-style string matches.

use serde_json::{Map, Value, json};

use super::matcher::{Set, StrMatch};
use super::policy::{Action, Alternative, Check, Policy};

impl Policy {
    /// The policy in upstream's dump form; `scope` is upstream's name for where it applies
    /// (`Global`, `Namespace`, `WorkloadSelector`).
    ///
    /// Meant for the policy ztunnel enforces ([`Policy::for_l4`]), whose checks have upstream's
    /// fields, but for `trustDomains`, which istiod folds into principals. A check on an HTTP
    /// attribute is named under `httpAttributes` rather than dropped, so a dump never shows a
    /// match broader than the one evaluated. Ztunnel enforces CUSTOM as a deny (no external
    /// authorizer is wired up), so it shows as `Deny`.
    pub fn dump(&self, scope: &str) -> Value {
        let rules: Vec<Value> = (self.rules.iter())
            .map(|rule| {
                let clauses: Vec<Value> = (rule.clauses.iter())
                    .map(|clause| clause.alternatives.iter().map(alternative).collect())
                    .collect();
                Value::Array(clauses)
            })
            .collect();
        json!({
            "name": self.name(),
            "namespace": self.namespace(),
            "scope": scope,
            "action": match self.action() {
                Action::Allow => "Allow",
                Action::Deny | Action::Custom => "Deny",
                Action::Audit => "Audit",
            },
            "dryRun": self.dry_run(),
            "rules": rules,
        })
    }
}

fn alternative(alt: &Alternative) -> Value {
    let mut fields = Map::new();
    let mut http = Vec::new();
    for check in &alt.checks {
        match check {
            Check::Principal(set) => put(&mut fields, "principals", set, string),
            Check::Namespace(set) => put(&mut fields, "namespaces", set, string),
            Check::ServiceAccount(set) => put(
                &mut fields,
                "serviceAccounts",
                set,
                |sa| json!({"namespace": &*sa.namespace, "serviceAccount": &*sa.name}),
            ),
            Check::TrustDomain(set) => put(&mut fields, "trustDomains", set, string),
            Check::SourceIp(set) => put(&mut fields, "sourceIps", set, |n| json!(n.to_string())),
            Check::DestinationIp(set) => {
                put(&mut fields, "destinationIps", set, |n| json!(n.to_string()))
            }
            Check::DestinationPort(set) => put(&mut fields, "destinationPorts", set, |p| json!(p)),
            Check::RemoteIp(_) => http.push("remoteIpBlocks"),
            Check::Sni(_) => http.push("sni"),
            Check::Host(_) => http.push("hosts"),
            Check::Method(_) => http.push("methods"),
            Check::Path(_) => http.push("paths"),
            Check::Header(..) => http.push("headers"),
            Check::Absent(_) => http.push("requestAuth"),
        }
    }
    if !http.is_empty() {
        fields.insert("httpAttributes".into(), json!(http));
    }
    Value::Object(fields)
}

/// `field` and its `not*` twin (`principals`, `notPrincipals`), each only when it has values.
fn put<T>(fields: &mut Map<String, Value>, field: &str, set: &Set<T>, show: impl Fn(&T) -> Value) {
    if !set.any.is_empty() {
        fields.insert(field.into(), set.any.iter().map(&show).collect());
    }
    if !set.none.is_empty() {
        let mut not = String::with_capacity(field.len() + 3);
        not.push_str("not");
        not.push_str(&field[..1].to_ascii_uppercase());
        not.push_str(&field[1..]);
        fields.insert(not, set.none.iter().map(&show).collect());
    }
}

fn string(m: &StrMatch) -> Value {
    match m {
        StrMatch::Exact(s) => json!({"Exact": &**s}),
        StrMatch::Prefix(s) => json!({"Prefix": &**s}),
        StrMatch::Suffix(s) => json!({"Suffix": &**s}),
        StrMatch::Presence => json!({"Presence": {}}),
    }
}
