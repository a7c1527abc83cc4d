//! Istio kinds other than routing and authorization: workload entries, service entries, peer
//! authentication and Wasm plugins.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::authz::{PolicyTargetReference, WorkloadSelector};

use super::Status;

/// `WorkloadEntry.spec`: a workload that is not a pod (a VM, a process on the host).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntrySpec {
    /// Its IP address.
    #[serde(default)]
    pub address: String,
    /// Named ports (`http: 8080`), resolving named target ports.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    /// Labels that Service and ServiceEntry selectors match (in addition to metadata labels).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Network; empty is the default network.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    /// Locality (`region/zone/subzone`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
    /// Load-balancing weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Service account; `default` when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
}

/// `ServiceEntry.spec`: a service the registry does not know, declared by hand.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    /// Hostnames; each becomes its own service, as in Istio.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// VIPs (or CIDRs of one address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<ServiceEntryPort>,
    /// `MESH_INTERNAL` or `MESH_EXTERNAL` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// `NONE`, `STATIC`, `DNS`, `DNS_ROUND_ROBIN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<String>,
    /// Inline endpoints.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<ServiceEntryEndpoint>,
    /// Selects pods and workload entries in the same namespace as endpoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelectorLabels>,
    /// Visibility; accepted, every service is visible to our proxies.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    /// Identities the endpoints may present, in addition to their own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

/// `ServiceEntry.status`: only the addresses istiod's IP auto-allocation controller wrote, which
/// pin a host's addresses when the configuration was exported from a cluster.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryStatus {
    /// One address of one host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<ServiceEntryAddress>,
}

impl Status for ServiceEntryStatus {
    fn is_absent(&self) -> bool {
        self.addresses.is_empty()
    }
}

/// One of `ServiceEntry.status.addresses`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryAddress {
    /// The address.
    #[serde(default)]
    pub value: String,
    /// The host it was allocated to.
    #[serde(default)]
    pub host: String,
}

/// `ServiceEntry.spec.workloadSelector` (the field is `labels`, unlike policies' `matchLabels`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSelectorLabels {
    /// Labels an endpoint must carry.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A ServiceEntry port.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntryPort {
    /// The service port.
    pub number: u16,
    /// `HTTP`, `HTTP2`, `GRPC`, `TCP`, `TLS`, `HTTPS`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Port name (endpoint `ports` maps refer to it).
    #[serde(default)]
    pub name: String,
    /// Endpoint port when it differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
}

/// An inline ServiceEntry endpoint.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntryEndpoint {
    /// IP address, or with `resolution: DNS` a DNS name the proxies resolve when they choose it.
    #[serde(default)]
    pub address: String,
    /// Port name → endpoint port.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
    /// Labels for subsets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Network.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    /// Locality.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
    /// Weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Service account.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
}

/// `PeerAuthentication.spec`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Workloads it applies to; absent means the whole namespace (or mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The mode for every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<Mtls>,
    /// Per-port overrides (workload-selector policies only, as in Istio).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<u16, Mtls>,
}

/// `{mode: STRICT}`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Mtls {
    /// The mode; `UNSET` inherits from the parent scope.
    #[serde(default)]
    pub mode: MtlsMode,
}

/// Whether a workload accepts plaintext.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Inherit from the enclosing scope; at the top, PERMISSIVE.
    #[default]
    Unset,
    /// Plaintext and mTLS are both accepted.
    Permissive,
    /// Only mTLS (HBONE) is accepted.
    Strict,
    /// mTLS is not required; the same as PERMISSIVE for an ambient data plane.
    Disable,
}

/// `WasmPlugin.spec` (extensions.istio.io/v1alpha1).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WasmPluginSpec {
    /// Selector; selector-only plugins apply to sidecars and gateways, never to waypoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Deprecated single target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<PolicyTargetReference>,
    /// The waypoint `Gateway` or a `Service` it serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// `file://`, `http(s)://` or `oci://` (a bare reference means `oci://`).
    pub url: String,
    /// Expected sha256 of the module, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `IfNotPresent` (default) or `Always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// Registry credentials secret; accepted, unused by file configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secret: Option<String>,
    /// Verification key; accepted, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_key: Option<String>,
    /// Configuration handed to `on_configure` as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_config: Option<serde_json::Value>,
    /// The root id; defaults to the resource's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_name: Option<String>,
    /// `AUTHN`, `AUTHZ`, `STATS` or `UNSPECIFIED_PHASE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Order within a phase; higher runs first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// `FAIL_CLOSE` (default), `FAIL_OPEN` or `FAIL_RELOAD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_strategy: Option<String>,
    /// VM settings: environment only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_config: Option<VmConfig>,
    /// Traffic selectors (mode and ports).
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub traffic_match: Vec<TrafficSelector>,
    /// `HTTP` (default) or `NETWORK`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub plugin_type: Option<String>,
}

/// `TrafficExtension.spec` (extensions.istio.io/v1alpha1, Istio 1.30): WasmPlugin's successor,
/// the same targeting and ordering around a `wasm` or a `lua` filter.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficExtensionSpec {
    /// Selector; selector-only extensions apply to sidecars and gateways, never to waypoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The waypoint `Gateway` or a `Service` it serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetReference>,
    /// `AUTHN`, `AUTHZ`, `STATS` or `UNSPECIFIED_PHASE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Order within a phase; higher runs first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Traffic selectors (mode and ports).
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub traffic_match: Vec<TrafficSelector>,
    /// A proxy-wasm module; exactly one of `wasm` and `lua` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wasm: Option<WasmConfig>,
    /// An inline Lua script, which this waypoint does not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lua: Option<LuaConfig>,
}

/// `TrafficExtension.spec.wasm`: WasmPlugin's module fields.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WasmConfig {
    /// `file://`, `http(s)://` or `oci://` (a bare reference means `oci://`).
    pub url: String,
    /// Expected sha256 of the module, hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `IfNotPresent` (default) or `Always`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// Registry credentials secret; accepted, unused by file configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secret: Option<String>,
    /// Verification key; accepted, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification_key: Option<String>,
    /// Configuration handed to `on_configure` as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_config: Option<serde_json::Value>,
    /// The root id; defaults to the resource's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_name: Option<String>,
    /// `FAIL_CLOSE` (default), `FAIL_OPEN` or `FAIL_RELOAD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_strategy: Option<String>,
    /// VM settings: environment only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_config: Option<VmConfig>,
    /// `HTTP` (default) or `NETWORK`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub plugin_type: Option<String>,
}

/// `TrafficExtension.spec.lua`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LuaConfig {
    /// The script.
    pub inline_code: String,
}

impl TrafficExtensionSpec {
    /// The extension as the WasmPlugin it is equivalent to, if it is a Wasm one.
    pub fn wasm_plugin(&self) -> Option<WasmPluginSpec> {
        let wasm = self.wasm.clone()?;
        Some(WasmPluginSpec {
            selector: self.selector.clone(),
            target_ref: None,
            target_refs: self.target_refs.clone(),
            url: wasm.url,
            sha256: wasm.sha256,
            image_pull_policy: wasm.image_pull_policy,
            image_pull_secret: wasm.image_pull_secret,
            verification_key: wasm.verification_key,
            plugin_config: wasm.plugin_config,
            plugin_name: wasm.plugin_name,
            phase: self.phase.clone(),
            priority: self.priority,
            fail_strategy: wasm.fail_strategy,
            vm_config: wasm.vm_config,
            traffic_match: self.traffic_match.clone(),
            plugin_type: wasm.plugin_type,
        })
    }
}

/// WasmPlugin fields that TrafficExtension moves under `spec.wasm`.
const WASM_CONFIG_FIELDS: &[&str] = &[
    "url",
    "sha256",
    "imagePullPolicy",
    "imagePullSecret",
    "pluginConfig",
    "pluginName",
    "failStrategy",
    "vmConfig",
    "type",
];

/// Rewrites a WasmPlugin field path (`spec.url`) to where TrafficExtension keeps it
/// (`spec.wasm.url`), so errors name the field the user wrote.
pub(crate) fn traffic_extension_field(field: &str) -> String {
    match field.strip_prefix("spec.") {
        Some(rest)
            if WASM_CONFIG_FIELDS
                .iter()
                .any(|f| rest.split(['.', '[']).next() == Some(f)) =>
        {
            format!("spec.wasm.{rest}")
        }
        _ => field.to_owned(),
    }
}

/// `vmConfig`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Environment variables visible to the module; nothing else is inherited.
    #[serde(default)]
    pub env: Vec<EnvVar>,
}

/// One environment variable.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    /// Name.
    pub name: String,
    /// Value, for `valueFrom: INLINE` (the default).
    #[serde(default)]
    pub value: String,
    /// `INLINE` or `HOST` (the proxy's own environment variable of that name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_from: Option<String>,
}

/// `match[]`: which traffic the plugin sees.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficSelector {
    /// `UNDEFINED` (default), `CLIENT`, `SERVER` or `CLIENT_AND_SERVER`. Istio builds a
    /// waypoint's HTTP filters as inbound ones, so a `CLIENT`-only selector never matches there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Ports the plugin applies to; empty means all.
    #[serde(default)]
    pub ports: Vec<PortSelector>,
}

/// `{number: 8080}`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortSelector {
    /// The port.
    pub number: u16,
}
