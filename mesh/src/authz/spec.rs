//! The `AuthorizationPolicy` spec exactly as users write it (security.istio.io v1 and v1beta1).
//!
//! These types only mirror the YAML; [`Policy::compile`](super::Policy::compile) validates them
//! and lowers them into the matchers the proxies evaluate. Every struct rejects unknown fields so
//! a typo (`notPrincipal`) is reported with serde's list of the fields that would be valid,
//! instead of silently widening or narrowing a policy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `AuthorizationPolicy.spec`: who may do what to the workloads or services it targets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicySpec {
    /// Workloads it applies to (enforced by ztunnel); absent with no target refs means the whole
    /// namespace, or the whole mesh in the root namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated single form of `targetRefs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// The waypoint `Gateway`, a `Service`/`ServiceEntry` it serves, or a `GatewayClass`:
    /// policies with target refs are enforced by waypoints, not by ztunnel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// What a matching rule does; absent means `ALLOW`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<ActionSpec>,
    /// The external authorizer of a `CUSTOM` policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ExtensionProvider>,
    /// The rules; a policy matches when any rule matches. No rules matches nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
}

/// `selector: {matchLabels: ...}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    /// Labels a workload must carry, all of them.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

/// A reference to the resource a policy attaches to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PolicyTargetReference {
    /// API group; empty is the core group (`Service`).
    #[serde(default)]
    pub group: String,
    /// Kind: `Gateway`, `GatewayClass`, `Service` or `ServiceEntry`.
    pub kind: String,
    /// Name of the target.
    pub name: String,
    /// Namespace of the target; must be the policy's own namespace when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// `action:` as written in YAML.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ActionSpec {
    /// Allow matching requests; once any ALLOW policy applies, everything else is denied.
    #[default]
    Allow,
    /// Deny matching requests, before any ALLOW is considered.
    Deny,
    /// Mark matching requests for audit logging; never changes the decision.
    Audit,
    /// Delegate the decision to an external authorizer (`provider`).
    Custom,
}

/// `provider: {name: ...}` of a CUSTOM policy: an extension provider from the mesh config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExtensionProvider {
    /// The provider's name in `meshConfig.extensionProviders`.
    #[serde(default)]
    pub name: String,
}

/// One rule: any `from` AND any `to` AND every `when`. Absent sections match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    /// Request sources; any may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<FromSpec>,
    /// Request operations; any may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<ToSpec>,
    /// Extra conditions; all must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<ConditionSpec>,
}

/// `from: - source: ...`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FromSpec {
    /// The source to match.
    pub source: SourceSpec,
}

/// `to: - operation: ...`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ToSpec {
    /// The operation to match.
    pub operation: OperationSpec,
}

/// Who sends the request. Fields are ANDed, values within a field ORed; every `not*` field must
/// fail to match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SourceSpec {
    /// Peer identities `<trust-domain>/ns/<ns>/sa/<sa>` (mTLS only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Peer identities that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// JWT principals `<iss>/<sub>`; never present here, as there is no JWT authentication.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_principals: Vec<String>,
    /// JWT principals that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_request_principals: Vec<String>,
    /// Namespaces of the peer identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Namespaces that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// Service accounts `<ns>/<sa>` (or `<sa>` in the policy's namespace), matched exactly.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// Service accounts that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    /// IPs or CIDRs of the connection's peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    /// Peer IPs or CIDRs that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
    /// IPs or CIDRs of the original client (`X-Forwarded-For`); HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remote_ip_blocks: Vec<String>,
    /// Original-client IPs or CIDRs that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_remote_ip_blocks: Vec<String>,
}

/// What the request does. Fields are ANDed, values within a field ORed; every `not*` field must
/// fail to match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OperationSpec {
    /// `:authority` values, case-insensitive; HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// Hosts that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// Destination ports, as numeric strings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<String>,
    /// Ports that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<String>,
    /// HTTP methods, case-sensitive; HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Methods that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Paths without the query string, case-sensitive, `{*}`/`{**}` templates allowed; HTTP only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Paths that must not match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// `when: - key: ... values: [...] notValues: [...]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConditionSpec {
    /// The attribute, e.g. `request.headers[x-token]` or `source.ip`.
    pub key: String,
    /// Values of which one must match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// Values none of which may match.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}
