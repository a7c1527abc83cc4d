//! `AuthorizationPolicy` for both proxies, with one engine.
//!
//! The waypoint evaluates policies with HTTP attributes; ztunnel evaluates the same compiled
//! policies after [`Policy::for_l4`] has lowered them the way istiod lowers them for upstream
//! ztunnel, so a policy means the same thing here as in Istio ambient.
//!
//! - [`AuthorizationPolicySpec`] and friends mirror the YAML.
//! - [`Policy::compile`] validates a spec (every problem, with its field path) and builds
//!   matchers that evaluate without allocating.
//! - [`evaluate`] combines the policies that apply to a connection or request in Istio's order.
//!
//! Matching semantics: a policy matches when any rule matches; a rule when one `from` source,
//! one `to` operation and every `when` condition match (absent sections match anything); within
//! a source or operation the fields are ANDed, the values of a field ORed, and every `not*`
//! field must fail. An attribute the peer lacks (no identity over plaintext, no JWT) fails its
//! positive fields and passes its `not*` fields, so `notPrincipals: ["*"]` selects plaintext.

mod compile;
mod condition;
mod dump;
mod matcher;
mod policy;
mod spec;

#[cfg(test)]
mod tests;

use std::net::IpAddr;

pub use policy::{Action, Policy};
pub use spec::{
    ActionSpec, AuthorizationPolicySpec, ConditionSpec, ExtensionProvider, FromSpec, OperationSpec,
    PolicyTargetReference, RuleSpec, SourceSpec, ToSpec, WorkloadSelector,
};

/// What policies can see of a connection (L4) or request (L7). Borrowed, so building one per
/// request costs nothing.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    /// The peer's mTLS identity; `None` for plaintext, where identity fields cannot match.
    pub source: Option<&'a hbone::Identity>,
    /// The peer's address (`ipBlocks`, `source.ip`).
    pub source_ip: IpAddr,
    /// The original client from `X-Forwarded-For` at L7, else the same as `source_ip`
    /// (`remoteIpBlocks`, `remote.ip`).
    pub remote_ip: IpAddr,
    /// The destination address (`destination.ip`).
    pub destination_ip: IpAddr,
    /// The destination's target port, after any HBONE port swap (`ports`, `destination.port`).
    pub destination_port: u16,
    /// The TLS server name the client asked for, if any (`connection.sni`).
    pub sni: Option<&'a str>,
    /// The request, at L7; `None` at L4, where every HTTP field fails to match.
    pub http: Option<HttpAttributes<'a>>,
}

/// The parts of an HTTP request policies match.
#[derive(Debug, Clone, Copy)]
pub struct HttpAttributes<'a> {
    /// The method, matched case-sensitively.
    pub method: &'a str,
    /// The normalised path; a query string is ignored.
    pub path: &'a str,
    /// The `:authority` (with any port), matched case-insensitively.
    pub host: &'a str,
    /// Request headers (`request.headers[...]` conditions).
    pub headers: &'a http::HeaderMap,
}

/// The outcome of [`evaluate`], with what an access log needs to explain it.
#[derive(Debug, Clone, Copy)]
pub struct Verdict<'p> {
    /// Whether the connection or request may proceed.
    pub allowed: bool,
    /// The CUSTOM or DENY policy that denied, or the ALLOW policy that allowed. `None` when no
    /// ALLOW policy exists (allowed) or none matched (denied).
    pub policy: Option<&'p Policy>,
    /// Whether an AUDIT policy matched: the request should be audit-logged.
    pub audit: bool,
    /// A dry-run policy that would have changed `allowed` had it been enforced.
    pub dry_run: Option<&'p Policy>,
}

/// Decides a connection or request against the policies that apply to it, in Istio's order:
/// a matching CUSTOM denies (no external authorizer yet: fail closed); then a matching DENY
/// denies; with no ALLOW policy everything else is allowed; otherwise a matching ALLOW allows
/// and anything else is denied. AUDIT and dry-run policies never change the decision.
///
/// Pass policies already lowered with [`Policy::for_l4`] when evaluating at L4.
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p Policy>,
    attrs: &Attributes<'_>,
) -> Verdict<'p> {
    let mut deny = None;
    let mut allow = None;
    let mut any_allow = false;
    let mut audit = false;
    let mut dry_deny = None;
    let mut dry_allow = None;
    let mut first_dry_allow = None;
    for policy in policies {
        // Once an enforced CUSTOM/DENY matched, only AUDIT can still add anything: ALLOWs cannot
        // override it and dry-run policies cannot change a denial into anything else.
        match (policy.action, policy.dry_run) {
            (Action::Audit, false) => audit = audit || policy.matches(attrs),
            (Action::Audit, true) => {}
            (Action::Deny | Action::Custom, false) => {
                if deny.is_none() && policy.matches(attrs) {
                    deny = Some(policy);
                }
            }
            (Action::Allow, false) => {
                any_allow = true;
                if deny.is_none() && allow.is_none() && policy.matches(attrs) {
                    allow = Some(policy);
                }
            }
            (Action::Deny | Action::Custom, true) => {
                if deny.is_none() && dry_deny.is_none() && policy.matches(attrs) {
                    dry_deny = Some(policy);
                }
            }
            (Action::Allow, true) => {
                first_dry_allow.get_or_insert(policy);
                if deny.is_none() && dry_allow.is_none() && policy.matches(attrs) {
                    dry_allow = Some(policy);
                }
            }
        }
    }
    let (allowed, policy) = match (deny, allow) {
        (Some(deny), _) => (false, Some(deny)),
        (None, Some(allow)) => (true, Some(allow)),
        (None, None) => (!any_allow, None),
    };
    // The decision had the dry-run policies been enforced too.
    let would_allow = deny.or(dry_deny).is_none()
        && (!(any_allow || first_dry_allow.is_some()) || allow.or(dry_allow).is_some());
    let dry_run = match (allowed, would_allow) {
        (true, false) => dry_deny.or(first_dry_allow),
        (false, true) => dry_allow,
        _ => None,
    };
    Verdict {
        allowed,
        policy,
        audit,
        dry_run,
    }
}
