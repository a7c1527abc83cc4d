//! Gateway API `Gateway` and `GatewayClass`: the mesh reads only waypoints (class
//! `istio-waypoint`, or any class whose Gateways are sandwiched waypoints, such as kgateway's
//! `kgateway-waypoint`, which carries `ambient.istio.io/waypoint-inbound-binding`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `Gateway.spec`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    /// `istio-waypoint` makes this Gateway a waypoint, and so does an inbound binding on the
    /// Gateway or its class; other Gateways are kept but unused.
    #[serde(default)]
    pub gateway_class_name: String,
    /// Listeners; a waypoint has one `{name: mesh, port: 15008, protocol: HBONE}`.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Requested addresses; accepted, the waypoint's address is its Service's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<serde_json::Value>,
    /// What Istio puts on the resources it generates for the Gateway (its Service among them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infrastructure: Option<Infrastructure>,
}

/// `Gateway.spec.infrastructure`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Infrastructure {
    /// Labels for the generated resources; accepted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations for the generated resources; a traffic distribution here is the waypoint
    /// Service's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Parameters for the generated deployment; accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters_ref: Option<serde_json::Value>,
}

/// `GatewayClass.spec`: accepted as written; the mesh reads only the class's annotations.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayClassSpec {
    /// The controller that implements the class.
    #[serde(default)]
    pub controller_name: String,
    /// Description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The controller's parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters_ref: Option<serde_json::Value>,
}

/// A Gateway listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    /// Name.
    pub name: String,
    /// Port.
    pub port: u16,
    /// Protocol (`HBONE` for waypoints).
    pub protocol: String,
    /// Hostname; unused by waypoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Which namespaces may bind to it (`istio.io/use-waypoint-namespace`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_routes: Option<AllowedRoutes>,
    /// TLS settings; unused by waypoints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<serde_json::Value>,
}

/// `allowedRoutes`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AllowedRoutes {
    /// Namespace admission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<ListenerNamespaces>,
    /// Route kinds; unused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<serde_json::Value>,
}

/// `allowedRoutes.namespaces`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerNamespaces {
    /// `Same` (default), `All` or `Selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// For `Selector`: namespace labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<crate::resource::WorkloadSelector>,
}
