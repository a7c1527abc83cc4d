//! The compiled policy: rules of clauses of alternatives of checks, and how ztunnel lowers it.
//!
//! The shape follows ztunnel's: a rule is a list of clauses that must all match (its `from`, its
//! `to`, and one clause per `when` condition); a clause is a list of alternatives of which one
//! must match (one per source or operation); an alternative is a list of checks on single
//! attributes that must all pass. Keeping that shape makes the L4 lowering a filter over checks
//! with exactly ztunnel's outcome.

use std::sync::Arc;

use http::HeaderName;
use ipnet::IpNet;

use super::matcher::{PathMatch, ServiceAccount, Set, StrMatch};
use super::{Attributes, HttpAttributes};

/// What a policy does when one of its rules matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Allow the request; once any ALLOW policy applies, unmatched requests are denied.
    Allow,
    /// Deny the request, whatever ALLOW policies say.
    Deny,
    /// Mark the request for audit; never changes the decision.
    Audit,
    /// Ask an external authorizer. None is wired up yet, so a match denies (fails closed).
    Custom,
}

impl Action {
    /// The action as written (`ALLOW`, `DENY`, `AUDIT`, `CUSTOM`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
            Action::Custom => "CUSTOM",
        }
    }
}

/// An `AuthorizationPolicy` compiled for evaluation: matchers pre-parsed, nothing left to
/// allocate on the request path. Build one with [`Policy::compile`].
#[derive(Debug, Clone)]
pub struct Policy {
    pub(super) namespace: Arc<str>,
    pub(super) name: Arc<str>,
    pub(super) action: Action,
    pub(super) dry_run: bool,
    pub(super) rules: Vec<Rule>,
}

/// Clauses that must all match; no clauses (`rules: [{}]`) matches everything.
#[derive(Debug, Clone)]
pub(super) struct Rule {
    pub(super) clauses: Vec<Clause>,
}

/// Alternatives of which one must match: the sources of `from`, the operations of `to`, or the
/// single alternative of a `when` condition.
#[derive(Debug, Clone)]
pub(super) struct Clause {
    pub(super) alternatives: Vec<Alternative>,
}

/// Checks that must all pass: the fields of one source or operation, or one condition.
#[derive(Debug, Clone)]
pub(super) struct Alternative {
    pub(super) checks: Vec<Check>,
}

/// One attribute against the values a field (and its `not*` twin) names.
#[derive(Debug, Clone)]
pub(super) enum Check {
    Principal(Set<StrMatch>),
    Namespace(Set<StrMatch>),
    ServiceAccount(Set<ServiceAccount>),
    TrustDomain(Set<StrMatch>),
    SourceIp(Set<IpNet>),
    DestinationIp(Set<IpNet>),
    DestinationPort(Set<u16>),
    RemoteIp(Set<IpNet>),
    Sni(Set<StrMatch>),
    Host(Set<StrMatch>),
    Method(Set<StrMatch>),
    Path(Set<PathMatch>),
    Header(HeaderName, Set<StrMatch>),
    /// An attribute this data plane never has: JWT claims (`requestPrincipals`,
    /// `request.auth.*`; there is no RequestAuthentication) and Envoy filter metadata.
    Absent(Set<StrMatch>),
}

impl Check {
    /// Whether ztunnel can evaluate this check: peer identity, addresses and ports.
    fn is_l4(&self) -> bool {
        matches!(
            self,
            Check::Principal(_)
                | Check::Namespace(_)
                | Check::ServiceAccount(_)
                | Check::TrustDomain(_)
                | Check::SourceIp(_)
                | Check::DestinationIp(_)
                | Check::DestinationPort(_)
        )
    }

    fn matches(&self, attrs: &Attributes<'_>) -> bool {
        let id = attrs.source;
        match self {
            Check::Principal(set) => set.eval(|m| {
                id.is_some_and(|id| {
                    m.matches_parts(&[
                        id.trust_domain(),
                        "/ns/",
                        id.namespace(),
                        "/sa/",
                        id.service_account(),
                    ])
                })
            }),
            Check::Namespace(set) => {
                set.eval(|m| id.is_some_and(|id| m.matches(id.namespace().as_bytes())))
            }
            Check::ServiceAccount(set) => set.eval(|sa| {
                id.is_some_and(|id| {
                    *sa.namespace == *id.namespace() && *sa.name == *id.service_account()
                })
            }),
            Check::TrustDomain(set) => {
                set.eval(|m| id.is_some_and(|id| m.matches(id.trust_domain().as_bytes())))
            }
            Check::SourceIp(set) => set.eval(|net| net.contains(&attrs.source_ip)),
            Check::DestinationIp(set) => set.eval(|net| net.contains(&attrs.destination_ip)),
            Check::DestinationPort(set) => set.eval(|port| *port == attrs.destination_port),
            // Everything below is HTTP-level (ztunnel cannot see it); without HTTP attributes
            // it fails whichever side it is on, so an unlowered policy never widens at L4.
            _ => attrs
                .http
                .as_ref()
                .is_some_and(|http| self.matches_l7(attrs, http)),
        }
    }

    fn matches_l7(&self, attrs: &Attributes<'_>, http: &HttpAttributes<'_>) -> bool {
        match self {
            Check::RemoteIp(set) => set.eval(|net| net.contains(&attrs.remote_ip)),
            Check::Sni(set) => set.eval(|m| attrs.sni.is_some_and(|sni| m.matches(sni.as_bytes()))),
            Check::Host(set) => set.eval(|m| m.matches_ignore_case(http.host)),
            Check::Method(set) => set.eval(|m| m.matches(http.method.as_bytes())),
            Check::Path(set) => {
                let path = http
                    .path
                    .split_once('?')
                    .map_or(http.path, |(path, _)| path);
                set.eval(|m| m.matches(path))
            }
            // Envoy joins repeated headers with ',' before matching; matching each value on
            // its own gives the same answer for single-valued headers without allocating.
            Check::Header(name, set) => set.eval(|m| {
                http.headers
                    .get_all(name)
                    .iter()
                    .any(|value| m.matches(value.as_bytes()))
            }),
            Check::Absent(set) => set.eval(|_| false),
            _ => false,
        }
    }
}

impl Rule {
    fn matches(&self, attrs: &Attributes<'_>) -> bool {
        self.clauses.iter().all(|clause| {
            clause
                .alternatives
                .iter()
                .any(|alt| alt.checks.iter().all(|check| check.matches(attrs)))
        })
    }

    /// The rule as ztunnel enforces it, or `None` when it can never match there.
    ///
    /// istiod drops every rule that mentions an HTTP attribute from an ALLOW policy (stricter
    /// than written). For DENY it drops the HTTP checks and keeps the rest: an alternative left
    /// with no checks is dropped, and a clause left with no alternatives is not emitted at all,
    /// so it no longer constrains the rule (broader than written). A DENY rule whose only
    /// attributes were HTTP ones has no effect at L4, while `{}` (no attributes at all) still
    /// matches everything.
    fn lower(&self, keep_l4_parts: bool) -> Option<Rule> {
        let mut clauses = Vec::with_capacity(self.clauses.len());
        for clause in &self.clauses {
            let mut alternatives = Vec::with_capacity(clause.alternatives.len());
            for alt in &clause.alternatives {
                if !keep_l4_parts && alt.checks.iter().any(|c| !c.is_l4()) {
                    return None;
                }
                let checks: Vec<Check> = alt.checks.iter().filter(|c| c.is_l4()).cloned().collect();
                if !checks.is_empty() {
                    alternatives.push(Alternative { checks });
                }
            }
            if alternatives.is_empty() {
                // Only DENY and CUSTOM get here: istiod emits no match for a `to`, `from` or
                // `when` part that held only HTTP attributes, so that part stops constraining
                // the rule and the rest of it is enforced (a broader deny).
                continue;
            }
            clauses.push(Clause { alternatives });
        }
        if clauses.is_empty() && !self.clauses.is_empty() {
            // Nothing but HTTP attributes: the rule has no effect at L4 (istio#61126).
            return None;
        }
        Some(Rule { clauses })
    }

    fn has_l7(&self) -> bool {
        self.clauses
            .iter()
            .flat_map(|clause| &clause.alternatives)
            .flat_map(|alt| &alt.checks)
            .any(|check| !check.is_l4())
    }
}

impl Policy {
    /// The policy's namespace; with its name, what access logs and status messages cite.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What a match does.
    pub fn action(&self) -> Action {
        self.action
    }

    /// Whether the policy only reports what it would have done
    /// (`istio.io/dry-run: "true"` annotation).
    pub fn dry_run(&self) -> bool {
        self.dry_run
    }

    /// Whether any rule matches; a policy without rules matches nothing. Callers normally use
    /// [`evaluate`](super::evaluate), which combines policies in Istio's order.
    pub fn matches(&self, attrs: &Attributes<'_>) -> bool {
        self.rules.iter().any(|rule| rule.matches(attrs))
    }

    /// Whether a rule checks an HTTP attribute (methods, paths, hosts, headers, JWT claims),
    /// which [`Policy::for_l4`] cannot keep as written.
    pub fn uses_http_attributes(&self) -> bool {
        self.rules.iter().any(Rule::has_l7)
    }

    /// The policy as ztunnel enforces it, where only L4 attributes exist: principals,
    /// namespaces, service accounts, `ipBlocks`, ports and the `source.*`/`destination.*`
    /// conditions, exactly as istiod and ztunnel treat HTTP attributes:
    ///
    /// - ALLOW: a rule that uses any HTTP attribute is dropped (never matches; stricter than
    ///   written).
    /// - DENY: HTTP checks are dropped and the rest enforced (broader than written). A source,
    ///   operation or condition left with nothing no longer constrains the rule (`from: ns a,
    ///   to: methods [GET]` denies everything from `a`); a rule whose only attributes were HTTP
    ///   ones has no effect; `rules: [{}]` still matches everything.
    ///
    /// `None` for AUDIT, which ztunnel does not support and which never changes a decision.
    /// CUSTOM is kept and lowered like DENY: ztunnel has no external authorizer, and skipping
    /// the policy (as istiod does) would silently allow what it was written to check, so a
    /// match denies (fails closed).
    pub fn for_l4(&self) -> Option<Policy> {
        let keep_l4_parts = match self.action {
            Action::Allow => false,
            Action::Deny | Action::Custom => true,
            Action::Audit => return None,
        };
        Some(Policy {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            action: self.action,
            dry_run: self.dry_run,
            rules: self
                .rules
                .iter()
                .filter_map(|rule| rule.lower(keep_l4_parts))
                .collect(),
        })
    }
}
