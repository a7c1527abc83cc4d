//! From spec to [`Policy`]: validate every field, report every problem with its path from the
//! document root (`spec.rules[0].from[1].source.ipBlocks[0]`), and build the matchers.

use std::sync::Arc;

use crate::FieldError;

use super::condition::condition;
use super::matcher::{PathMatch, ServiceAccount, Set, StrMatch, parse_ip_block, parse_port};
use super::policy::{Action, Alternative, Check, Clause, Policy, Rule};
use super::spec::{
    ActionSpec, AuthorizationPolicySpec, OperationSpec, PolicyTargetReference, RuleSpec, SourceSpec,
};

impl Policy {
    /// Validates `spec` and compiles it, or returns every problem found (not just the first), so
    /// one edit can fix them all. `namespace` and `name` come from the resource's metadata;
    /// `dry_run` from its `istio.io/dry-run` annotation.
    ///
    /// CUSTOM policies compile, but no external authorizer is wired up yet: a request they
    /// match is denied (fail closed), and a warning says so here, once per compilation.
    pub fn compile(
        namespace: &str,
        name: &str,
        spec: &AuthorizationPolicySpec,
        dry_run: bool,
    ) -> Result<Policy, Vec<FieldError>> {
        let mut errors = Vec::new();
        let action = match spec.action.unwrap_or_default() {
            ActionSpec::Allow => Action::Allow,
            ActionSpec::Deny => Action::Deny,
            ActionSpec::Audit => Action::Audit,
            ActionSpec::Custom => Action::Custom,
        };
        let rules = nested(&mut errors, "spec", |errors| {
            check_targets(spec, namespace, errors);
            check_action(spec, action, errors);
            let mut rules = Vec::with_capacity(spec.rules.len());
            for (i, rule_spec) in spec.rules.iter().enumerate() {
                rules.push(nested(errors, &format!("rules[{i}]"), |errors| {
                    rule(rule_spec, namespace, errors)
                }));
            }
            rules
        });
        if !errors.is_empty() {
            return Err(errors);
        }
        if action == Action::Custom {
            tracing::warn!(
                policy.namespace = namespace,
                policy.name = name,
                provider = spec.provider.as_ref().map_or("", |p| p.name.as_str()),
                "CUSTOM authorization is not supported yet; requests this policy matches are \
                 denied (fail closed)"
            );
        }
        Ok(Policy {
            namespace: Arc::from(namespace),
            name: Arc::from(name),
            action,
            dry_run,
            rules,
        })
    }
}

/// Runs `f`, then prefixes the paths of the errors it added with `prefix`.
pub(super) fn nested<T>(
    errors: &mut Vec<FieldError>,
    prefix: &str,
    f: impl FnOnce(&mut Vec<FieldError>) -> T,
) -> T {
    let start = errors.len();
    let out = f(errors);
    let added: Vec<FieldError> = errors.drain(start..).collect();
    errors.extend(added.into_iter().map(|e| e.within(prefix)));
    out
}

/// Parses a field and its `not*` twin into one check's values; `None` when both are empty.
/// Empty and unparsable values are reported at `field[i]`.
pub(super) fn set<T>(
    errors: &mut Vec<FieldError>,
    (field, values): (&str, &[String]),
    (not_field, not_values): (&str, &[String]),
    parse: impl Fn(&str) -> Result<T, String>,
) -> Option<Set<T>> {
    if values.is_empty() && not_values.is_empty() {
        return None;
    }
    let mut parse_all = |field: &str, values: &[String]| -> Box<[T]> {
        let mut out = Vec::with_capacity(values.len());
        for (i, value) in values.iter().enumerate() {
            let parsed = if value.is_empty() {
                Err("empty value is not allowed (use \"*\" to require any value)".to_owned())
            } else {
                parse(value)
            };
            match parsed {
                Ok(v) => out.push(v),
                Err(message) => errors.push(FieldError::new(format!("{field}[{i}]"), message)),
            }
        }
        out.into()
    };
    Some(Set {
        any: parse_all(field, values),
        none: parse_all(not_field, not_values),
    })
}

/// Istio's string-match syntax; never fails.
pub(super) fn string(value: &str) -> Result<StrMatch, String> {
    Ok(StrMatch::parse(value))
}

fn check_targets(spec: &AuthorizationPolicySpec, namespace: &str, errors: &mut Vec<FieldError>) {
    if let Some(selector) = &spec.selector {
        for (key, value) in &selector.match_labels {
            if key.is_empty() || key.contains('*') || value.contains('*') {
                errors.push(FieldError::new(
                    "selector.matchLabels",
                    format!(
                        "{key:?}: {value:?}: label keys must be non-empty and selectors cannot \
                         use wildcards"
                    ),
                ));
            }
        }
    }
    let has_refs = spec.target_ref.is_some() || !spec.target_refs.is_empty();
    let refs_field = if spec.target_refs.is_empty() {
        "targetRef"
    } else {
        "targetRefs"
    };
    if spec.selector.is_some() && has_refs {
        errors.push(FieldError::new(
            refs_field,
            "set either selector (enforced by ztunnel) or targetRefs (enforced by waypoints), \
             not both",
        ));
    }
    if spec.target_ref.is_some() && !spec.target_refs.is_empty() {
        errors.push(FieldError::new(
            "targetRef",
            "set only targetRefs; targetRef is its deprecated single form",
        ));
    }
    let single = spec.target_ref.iter().map(|r| ("targetRef".to_owned(), r));
    let many = (spec.target_refs.iter().enumerate()).map(|(i, r)| (format!("targetRefs[{i}]"), r));
    for (field, target) in single.chain(many) {
        nested(errors, &field, |errors| {
            check_target(target, namespace, errors)
        });
    }
}

fn check_target(target: &PolicyTargetReference, namespace: &str, errors: &mut Vec<FieldError>) {
    let known = matches!(
        (target.group.as_str(), target.kind.as_str()),
        ("gateway.networking.k8s.io", "Gateway" | "GatewayClass")
            | ("" | "core", "Service")
            | ("networking.istio.io", "ServiceEntry")
    );
    if !known {
        errors.push(FieldError::new(
            "kind",
            format!(
                "{:?} in group {:?} cannot be targeted; use a Gateway or GatewayClass (group \
                 gateway.networking.k8s.io), a Service (group \"\") or a ServiceEntry (group \
                 networking.istio.io)",
                target.kind, target.group
            ),
        ));
    }
    if target.name.is_empty() {
        errors.push(FieldError::new(
            "name",
            "the target's name must not be empty",
        ));
    }
    if let Some(ns) = target.namespace.as_deref().filter(|ns| *ns != namespace) {
        errors.push(FieldError::new(
            "namespace",
            format!(
                "{ns:?}: a policy can only target resources in its own namespace ({namespace:?})"
            ),
        ));
    }
}

fn check_action(spec: &AuthorizationPolicySpec, action: Action, errors: &mut Vec<FieldError>) {
    match (&spec.provider, action) {
        (None, Action::Custom) => errors.push(FieldError::new(
            "provider",
            "a CUSTOM policy needs provider.name, an extension provider of the mesh config",
        )),
        (Some(provider), Action::Custom) if provider.name.is_empty() => {
            errors.push(FieldError::new(
                "provider.name",
                "the extension provider's name must not be empty",
            ))
        }
        (Some(_), Action::Allow | Action::Deny | Action::Audit) => errors.push(FieldError::new(
            "provider",
            "provider is only valid with action CUSTOM",
        )),
        _ => {}
    }
    if spec.rules.is_empty() && matches!(action, Action::Deny | Action::Custom) {
        errors.push(FieldError::new(
            "rules",
            "a DENY or CUSTOM policy without rules never matches; add an empty rule `{}` to \
             match every request",
        ));
    }
}

fn rule(spec: &RuleSpec, namespace: &str, errors: &mut Vec<FieldError>) -> Rule {
    let mut clauses = Vec::with_capacity(2 + spec.when.len());
    if !spec.from.is_empty() {
        let alternatives = (spec.from.iter().enumerate())
            .map(|(i, from)| {
                nested(errors, &format!("from[{i}].source"), |errors| {
                    source(&from.source, namespace, errors)
                })
            })
            .collect();
        clauses.push(Clause { alternatives });
    }
    if !spec.to.is_empty() {
        let alternatives = (spec.to.iter().enumerate())
            .map(|(i, to)| {
                nested(errors, &format!("to[{i}].operation"), |errors| {
                    operation(&to.operation, errors)
                })
            })
            .collect();
        clauses.push(Clause { alternatives });
    }
    for (i, when) in spec.when.iter().enumerate() {
        let alternative = nested(errors, &format!("when[{i}]"), |errors| {
            condition(when, namespace, errors)
        });
        clauses.push(Clause {
            alternatives: vec![alternative],
        });
    }
    Rule { clauses }
}

fn source(spec: &SourceSpec, namespace: &str, errors: &mut Vec<FieldError>) -> Alternative {
    if *spec == SourceSpec::default() {
        errors.push(FieldError::new("", "a source must set at least one field"));
    }
    let by_identity = [
        &spec.principals,
        &spec.not_principals,
        &spec.namespaces,
        &spec.not_namespaces,
    ];
    if by_identity.iter().any(|v| !v.is_empty())
        && !(spec.service_accounts.is_empty() && spec.not_service_accounts.is_empty())
    {
        let field = if spec.service_accounts.is_empty() {
            "notServiceAccounts"
        } else {
            "serviceAccounts"
        };
        errors.push(FieldError::new(
            field,
            "serviceAccounts cannot be combined with principals or namespaces in one source; \
             use separate sources",
        ));
    }
    let sa = |v: &str| ServiceAccount::parse(v, namespace);
    let checks = [
        set(
            errors,
            ("principals", &spec.principals),
            ("notPrincipals", &spec.not_principals),
            string,
        )
        .map(Check::Principal),
        set(
            errors,
            ("requestPrincipals", &spec.request_principals),
            ("notRequestPrincipals", &spec.not_request_principals),
            string,
        )
        .map(Check::Absent),
        set(
            errors,
            ("namespaces", &spec.namespaces),
            ("notNamespaces", &spec.not_namespaces),
            string,
        )
        .map(Check::Namespace),
        set(
            errors,
            ("serviceAccounts", &spec.service_accounts),
            ("notServiceAccounts", &spec.not_service_accounts),
            sa,
        )
        .map(Check::ServiceAccount),
        set(
            errors,
            ("ipBlocks", &spec.ip_blocks),
            ("notIpBlocks", &spec.not_ip_blocks),
            parse_ip_block,
        )
        .map(Check::SourceIp),
        set(
            errors,
            ("remoteIpBlocks", &spec.remote_ip_blocks),
            ("notRemoteIpBlocks", &spec.not_remote_ip_blocks),
            parse_ip_block,
        )
        .map(Check::RemoteIp),
    ];
    Alternative {
        checks: checks.into_iter().flatten().collect(),
    }
}

fn operation(spec: &OperationSpec, errors: &mut Vec<FieldError>) -> Alternative {
    if *spec == OperationSpec::default() {
        errors.push(FieldError::new(
            "",
            "an operation must set at least one field",
        ));
    }
    let host = |v: &str| Ok::<_, String>(StrMatch::parse(v).lowercase());
    let checks = [
        set(
            errors,
            ("hosts", &spec.hosts),
            ("notHosts", &spec.not_hosts),
            host,
        )
        .map(Check::Host),
        set(
            errors,
            ("ports", &spec.ports),
            ("notPorts", &spec.not_ports),
            parse_port,
        )
        .map(Check::DestinationPort),
        set(
            errors,
            ("methods", &spec.methods),
            ("notMethods", &spec.not_methods),
            string,
        )
        .map(Check::Method),
        set(
            errors,
            ("paths", &spec.paths),
            ("notPaths", &spec.not_paths),
            PathMatch::parse,
        )
        .map(Check::Path),
    ];
    Alternative {
        checks: checks.into_iter().flatten().collect(),
    }
}
