//! The external layer: Kubernetes, Gateway API and Istio resources exactly as users write them.
//!
//! A YAML document is read in two steps. First its envelope (`apiVersion`, `kind`, `metadata`)
//! decides which type the document is; then the whole document is deserialized into that type
//! while tracking the field path, so an error says `spec.ports[1].targetPort` rather than "invalid
//! type at line 40". Spec types of Istio and Gateway API resources reject unknown fields (a typo
//! is reported with the list of fields that would be valid); Kubernetes core kinds accept them,
//! because `kubectl get -o yaml` output carries many fields we have no use for.

mod gateway;
mod istio;
mod kube;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_yaml::Value;

pub use gateway::*;
pub use istio::*;
pub use kube::*;

use crate::authz::AuthorizationPolicySpec;
use crate::error::{FieldError, Invalid, Origin};
use crate::route::{DestinationRuleSpec, HttpRouteSpec, VirtualServiceSpec};

/// Kubernetes object metadata: the parts the mesh model reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    /// Object name.
    #[serde(default)]
    pub name: String,
    /// Namespace; absent means `default` for namespaced kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Kubernetes UID, when the document came from a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Creation time (RFC 3339); Gateway API precedence breaks ties by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// The prefix the name was generated from; set on pods a controller made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate_name: Option<String>,
    /// The objects this one belongs to; a pod's controller names its workload in telemetry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owner_references: Vec<OwnerReference>,
}

/// One `metadata.ownerReferences` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    /// The owner's API group and version (`apps/v1`).
    #[serde(default)]
    pub api_version: String,
    /// The owner's kind (`ReplicaSet`, `Job`, `StatefulSet`).
    #[serde(default)]
    pub kind: String,
    /// The owner's name.
    #[serde(default)]
    pub name: String,
    /// Whether the owner is the managing controller (at most one is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller: Option<bool>,
}

impl ObjectMeta {
    /// The namespace, defaulted as `kubectl apply` would.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }

    /// The managing controller among the owners, if any.
    pub fn controller(&self) -> Option<&OwnerReference> {
        self.owner_references
            .iter()
            .find(|o| o.controller == Some(true))
    }
}

/// A typed object: metadata, spec and (for pods) status.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(bound(
    serialize = "S: Serialize, T: Serialize + Status",
    deserialize = "S: Deserialize<'de> + Default, T: Deserialize<'de> + Default"
))]
pub struct Object<S, T = Empty> {
    /// Metadata.
    pub metadata: ObjectMeta,
    /// The desired state.
    #[serde(default)]
    pub spec: S,
    /// The observed state, for kinds whose status we read.
    #[serde(default, skip_serializing_if = "Status::is_absent")]
    pub status: T,
}

/// The status of kinds whose status we ignore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Empty;

impl<'de> Deserialize<'de> for Empty {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d).map(|_| Empty)
    }
}

/// A status type; [`Empty`] is left out of dumps.
pub trait Status {
    /// Whether there is nothing to print.
    fn is_absent(&self) -> bool;
}

impl Status for Empty {
    fn is_absent(&self) -> bool {
        true
    }
}

/// Everything the mesh model is built from.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind")]
#[allow(clippy::large_enum_variant)] // resources live in vectors, read once per build
pub enum Resource {
    /// `v1 Namespace`.
    Namespace(Object<Empty>),
    /// `v1 Node` (cluster-scoped); only its topology labels matter.
    Node(Object<Empty>),
    /// `v1 Service`.
    Service(Object<ServiceSpec>),
    /// `v1 Pod`.
    Pod(Object<PodSpec, PodStatus>),
    /// `networking.istio.io WorkloadEntry`.
    WorkloadEntry(Object<WorkloadEntrySpec>),
    /// `networking.istio.io ServiceEntry`.
    ServiceEntry(Object<ServiceEntrySpec, ServiceEntryStatus>),
    /// `gateway.networking.k8s.io Gateway`; only waypoints matter to the mesh.
    Gateway(Object<GatewaySpec>),
    /// `gateway.networking.k8s.io GatewayClass` (cluster-scoped); only its annotations matter.
    GatewayClass(Object<GatewayClassSpec>),
    /// `gateway.networking.k8s.io HTTPRoute`.
    HTTPRoute(Object<HttpRouteSpec>),
    /// `networking.istio.io VirtualService`.
    VirtualService(Object<VirtualServiceSpec>),
    /// `networking.istio.io DestinationRule`.
    DestinationRule(Object<DestinationRuleSpec>),
    /// `security.istio.io AuthorizationPolicy`.
    AuthorizationPolicy(Object<AuthorizationPolicySpec>),
    /// `security.istio.io PeerAuthentication`.
    PeerAuthentication(Object<PeerAuthenticationSpec>),
    /// `extensions.istio.io WasmPlugin`.
    WasmPlugin(Object<WasmPluginSpec>),
    /// `extensions.istio.io TrafficExtension`.
    TrafficExtension(Object<TrafficExtensionSpec>),
}

impl Resource {
    /// The kind, as written in YAML.
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::Namespace(_) => "Namespace",
            Resource::Node(_) => "Node",
            Resource::Service(_) => "Service",
            Resource::Pod(_) => "Pod",
            Resource::WorkloadEntry(_) => "WorkloadEntry",
            Resource::ServiceEntry(_) => "ServiceEntry",
            Resource::Gateway(_) => "Gateway",
            Resource::GatewayClass(_) => "GatewayClass",
            Resource::HTTPRoute(_) => "HTTPRoute",
            Resource::VirtualService(_) => "VirtualService",
            Resource::DestinationRule(_) => "DestinationRule",
            Resource::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Resource::PeerAuthentication(_) => "PeerAuthentication",
            Resource::WasmPlugin(_) => "WasmPlugin",
            Resource::TrafficExtension(_) => "TrafficExtension",
        }
    }

    /// The metadata.
    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Resource::Namespace(o) => &o.metadata,
            Resource::Node(o) => &o.metadata,
            Resource::Service(o) => &o.metadata,
            Resource::Pod(o) => &o.metadata,
            Resource::WorkloadEntry(o) => &o.metadata,
            Resource::ServiceEntry(o) => &o.metadata,
            Resource::Gateway(o) => &o.metadata,
            Resource::GatewayClass(o) => &o.metadata,
            Resource::HTTPRoute(o) => &o.metadata,
            Resource::VirtualService(o) => &o.metadata,
            Resource::DestinationRule(o) => &o.metadata,
            Resource::AuthorizationPolicy(o) => &o.metadata,
            Resource::PeerAuthentication(o) => &o.metadata,
            Resource::WasmPlugin(o) => &o.metadata,
            Resource::TrafficExtension(o) => &o.metadata,
        }
    }

    /// `Kind namespace/name` (or `Kind name` for cluster-scoped kinds), as errors print it.
    pub fn describe(&self) -> ResourceName<'_> {
        ResourceName {
            kind: self.kind(),
            namespace: (!matches!(
                self,
                Resource::Namespace(_) | Resource::Node(_) | Resource::GatewayClass(_)
            ))
            .then(|| self.meta().namespace()),
            name: &self.meta().name,
        }
    }
}

/// How a resource is named in messages.
#[derive(Debug, Clone, Copy)]
pub struct ResourceName<'a> {
    kind: &'a str,
    namespace: Option<&'a str>,
    name: &'a str,
}

impl fmt::Display for ResourceName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.namespace {
            Some(ns) => write!(f, "{} {ns}/{}", self.kind, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}

/// A resource and the place it was read from.
#[derive(Debug, Clone)]
pub struct Located {
    /// Where it came from.
    pub origin: Origin,
    /// The resource.
    pub resource: Resource,
}

/// What reading one file produced.
#[derive(Debug, Default)]
pub struct Parsed {
    /// The resources, in file order; each shared with the snapshots that show it in
    /// `/config_dump`.
    pub resources: Vec<Arc<Located>>,
    /// Documents that could not be read; the rest of the file is still used for reporting.
    pub invalid: Vec<Invalid>,
    /// Kinds we do not model, skipped (`Kind namespace/name` each).
    pub skipped: Vec<String>,
}

/// Which `apiVersion`s each kind is accepted under.
const KINDS: &[(&str, &[&str])] = &[
    ("Namespace", &["v1"]),
    ("Node", &["v1"]),
    ("Service", &["v1"]),
    ("Pod", &["v1"]),
    ("WorkloadEntry", ISTIO_NETWORKING),
    ("ServiceEntry", ISTIO_NETWORKING),
    ("VirtualService", ISTIO_NETWORKING),
    ("DestinationRule", ISTIO_NETWORKING),
    (
        "Gateway",
        &[
            "gateway.networking.k8s.io/v1",
            "gateway.networking.k8s.io/v1beta1",
        ],
    ),
    (
        "GatewayClass",
        &[
            "gateway.networking.k8s.io/v1",
            "gateway.networking.k8s.io/v1beta1",
        ],
    ),
    (
        "HTTPRoute",
        &[
            "gateway.networking.k8s.io/v1",
            "gateway.networking.k8s.io/v1beta1",
        ],
    ),
    (
        "AuthorizationPolicy",
        &["security.istio.io/v1", "security.istio.io/v1beta1"],
    ),
    (
        "PeerAuthentication",
        &["security.istio.io/v1", "security.istio.io/v1beta1"],
    ),
    ("WasmPlugin", &["extensions.istio.io/v1alpha1"]),
    ("TrafficExtension", &["extensions.istio.io/v1alpha1"]),
];

const ISTIO_NETWORKING: &[&str] = &[
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// Reads every YAML document of one file. `kind: List` documents (as `kubectl get -o yaml`
/// prints them) are expanded into their items.
pub fn parse_file(file: &Arc<PathBuf>, text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    for (document, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = Origin {
            file: file.clone(),
            document,
        };
        match Value::deserialize(de) {
            Ok(Value::Null) => {}
            Ok(value) => parse_value(value, &origin, "", &mut parsed),
            Err(e) => {
                parsed.invalid.push(Invalid {
                    origin,
                    resource: "(unreadable document)".to_owned(),
                    error: FieldError::new("", format!("not valid YAML: {e}")),
                });
                // The YAML stream cannot be resynchronised after a syntax error.
                break;
            }
        }
    }
    parsed
}

fn parse_value(value: Value, origin: &Origin, prefix: &str, parsed: &mut Parsed) {
    let envelope = Envelope::read(&value);
    let resource = envelope.describe();
    let fail = |field: &str, message: String| Invalid {
        origin: origin.clone(),
        resource: resource.clone(),
        error: FieldError::new(format!("{prefix}{field}"), message),
    };
    let Some(kind) = envelope.kind else {
        parsed.invalid.push(fail(
            "kind",
            "every document needs a `kind` (Service, Pod, HTTPRoute, ...)".to_owned(),
        ));
        return;
    };
    if kind == "List" {
        if let Some(Value::Sequence(items)) = value.get("items").cloned() {
            for (i, item) in items.into_iter().enumerate() {
                parse_value(item, origin, &format!("{prefix}items[{i}]."), parsed);
            }
        }
        return;
    }
    let Some((_, versions)) = KINDS.iter().find(|(k, _)| *k == kind) else {
        tracing::warn!(%origin, %resource, "skipping a kind the mesh model does not use");
        parsed.skipped.push(resource);
        return;
    };
    let api_version = envelope.api_version.unwrap_or_default();
    if !versions.contains(&api_version.as_str()) {
        parsed.invalid.push(fail(
            "apiVersion",
            format!(
                "{kind} is read as apiVersion {}; got {api_version:?}",
                versions.join(" or ")
            ),
        ));
        return;
    }
    if envelope.name.is_none() {
        parsed.invalid.push(fail(
            "metadata.name",
            "every resource needs a name".to_owned(),
        ));
        return;
    }
    let typed = match kind.as_str() {
        "Namespace" => typed(value).map(Resource::Namespace),
        "Node" => typed(value).map(Resource::Node),
        "Service" => typed(value).map(Resource::Service),
        "Pod" => typed(value).map(Resource::Pod),
        "WorkloadEntry" => typed(value).map(Resource::WorkloadEntry),
        "ServiceEntry" => typed(value).map(Resource::ServiceEntry),
        "Gateway" => typed(value).map(Resource::Gateway),
        "GatewayClass" => typed(value).map(Resource::GatewayClass),
        "HTTPRoute" => typed(value).map(Resource::HTTPRoute),
        "VirtualService" => typed(value).map(Resource::VirtualService),
        "DestinationRule" => typed(value).map(Resource::DestinationRule),
        "AuthorizationPolicy" => typed(value).map(Resource::AuthorizationPolicy),
        "PeerAuthentication" => typed(value).map(Resource::PeerAuthentication),
        "WasmPlugin" => typed(value).map(Resource::WasmPlugin),
        "TrafficExtension" => typed(value).map(Resource::TrafficExtension),
        _ => unreachable!("KINDS lists exactly the kinds matched here"),
    };
    match typed {
        Ok(resource) => parsed.resources.push(Arc::new(Located {
            origin: origin.clone(),
            resource,
        })),
        Err(e) => parsed.invalid.push(fail(&e.field, e.message)),
    }
}

/// Deserializes a whole document, keeping the path of the field that failed.
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        FieldError::new(field, e.into_inner().to_string())
    })
}

/// The envelope fields, read leniently so even a broken document can be named in errors.
struct Envelope {
    api_version: Option<String>,
    kind: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
}

impl Envelope {
    fn read(value: &Value) -> Self {
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
        let meta = value.get("metadata");
        Self {
            api_version: text(value.get("apiVersion")),
            kind: text(value.get("kind")),
            namespace: text(meta.and_then(|m| m.get("namespace"))),
            name: text(meta.and_then(|m| m.get("name"))),
        }
    }

    fn describe(&self) -> String {
        let kind = self.kind.as_deref().unwrap_or("(no kind)");
        let name = self.name.as_deref().unwrap_or("(no name)");
        match (kind, &self.namespace) {
            ("Namespace" | "GatewayClass", _) => format!("{kind} {name}"),
            (_, Some(ns)) => format!("{kind} {ns}/{name}"),
            (_, None) => format!("{kind} default/{name}"),
        }
    }
}

#[cfg(test)]
mod tests;
