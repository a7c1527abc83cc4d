//! Wasm plugins: `WasmPlugin` resources lowered into what the waypoint's plugin host loads.

use std::sync::Arc;

use serde::Serialize;

use crate::FieldError;
use crate::resource::WasmPluginSpec;

/// A plugin to run in a waypoint.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Plugin {
    /// Namespace of the WasmPlugin.
    pub namespace: Arc<str>,
    /// Name of the WasmPlugin.
    pub name: Arc<str>,
    /// The root context id (`pluginName`, else the resource name).
    pub root_id: Arc<str>,
    /// Where the module comes from: `file://`, `http(s)://` or `oci://`.
    pub url: Arc<str>,
    /// Expected sha256 of the module, lowercase hex.
    pub sha256: Option<Arc<str>>,
    /// When to fetch the module again.
    pub pull_policy: PullPolicy,
    /// `pluginConfig` serialized as JSON, handed to `on_configure`.
    pub config: Arc<str>,
    /// Where in the request lifecycle it runs, relative to authorization.
    pub phase: PluginPhase,
    /// Order within the phase; higher runs first.
    pub priority: i32,
    /// What happens when the module cannot load or traps.
    pub fail_strategy: FailStrategy,
    /// Environment variables visible to the module.
    pub env: Box<[EnvEntry]>,
    /// Service ports it applies to, from `match`.
    pub ports: Ports,
}

impl Plugin {
    /// Whether it applies to traffic on service port `port`.
    pub fn applies_to_port(&self, port: u16) -> bool {
        match &self.ports {
            Ports::Any => true,
            Ports::Listed(ports) => ports.contains(&port),
            Ports::ClientOnly => false,
        }
    }
}

/// Which of a waypoint's traffic a plugin's `match` selects. A plugin applies when any selector
/// matches; a waypoint serves the traffic it sees, so only selectors whose mode includes SERVER
/// (or leaves the mode undefined) count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Ports {
    /// No `match`, or a server selector without ports.
    Any,
    /// The ports the server selectors list.
    Listed(Box<[u16]>),
    /// Every selector is `mode: CLIENT`: nothing a waypoint serves.
    ClientOnly,
}

/// One environment variable: `(name, value)`; a `None` value is read from the proxy's own
/// environment (`valueFrom: HOST`) when the module starts.
pub type EnvEntry = (Arc<str>, Option<Arc<str>>);

/// `phase`: plugins run AUTHN, then AUTHZ, then (after authorization) STATS; unspecified plugins
/// run last, as Envoy inserts them at the end of the filter chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum PluginPhase {
    /// Before authentication (and so before authorization).
    Authn,
    /// Before authorization.
    Authz,
    /// After authorization.
    Stats,
    /// After everything else.
    Unspecified,
}

/// `failStrategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum FailStrategy {
    /// Fail the request with 503.
    FailClose,
    /// Skip the plugin.
    FailOpen,
    /// Fail the request with 503 and give the next one a new VM (ours always replace an instance
    /// that trapped); a module that cannot load fails requests as FAIL_CLOSE.
    FailReload,
}

/// `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PullPolicy {
    /// Not set: Istio pulls `:latest` (and untagged) images every time, others once.
    Unspecified,
    /// Reuse a cached module with the same URL (and digest).
    IfNotPresent,
    /// Fetch on every configuration change.
    Always,
}

/// Validates and lowers one WasmPlugin. Field paths are relative to the document root.
pub(crate) fn lower_plugin(
    namespace: &str,
    name: &str,
    spec: &WasmPluginSpec,
) -> Result<Plugin, Vec<FieldError>> {
    let mut errors = Vec::new();
    let url = if spec.url.contains("://") {
        spec.url.clone()
    } else {
        // Istio treats a bare image reference as OCI.
        format!("oci://{}", spec.url)
    };
    let scheme = url.split_once("://").map_or("", |(s, _)| s);
    if !matches!(scheme, "file" | "http" | "https" | "oci") || url.ends_with("://") {
        errors.push(FieldError::new(
            "spec.url",
            format!(
                "{:?} is not a module location; use file://, http(s):// or oci://",
                spec.url
            ),
        ));
    }
    let sha256 = spec.sha256.as_deref().map(str::to_ascii_lowercase);
    if let Some(sha) = &sha256
        && (sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        errors.push(FieldError::new(
            "spec.sha256",
            "must be 64 hexadecimal digits (the module's SHA-256)",
        ));
    }
    let pull_policy = match spec.image_pull_policy.as_deref() {
        None | Some("UNSPECIFIED_POLICY") => PullPolicy::Unspecified,
        Some("IfNotPresent") => PullPolicy::IfNotPresent,
        Some("Always") => PullPolicy::Always,
        Some(other) => {
            errors.push(FieldError::new(
                "spec.imagePullPolicy",
                format!("{other:?} is not valid; use IfNotPresent or Always"),
            ));
            PullPolicy::IfNotPresent
        }
    };
    let phase = match spec.phase.as_deref() {
        None | Some("UNSPECIFIED_PHASE") => PluginPhase::Unspecified,
        Some("AUTHN") => PluginPhase::Authn,
        Some("AUTHZ") => PluginPhase::Authz,
        Some("STATS") => PluginPhase::Stats,
        Some(other) => {
            errors.push(FieldError::new(
                "spec.phase",
                format!("{other:?} is not valid; use AUTHN, AUTHZ, STATS or UNSPECIFIED_PHASE"),
            ));
            PluginPhase::Unspecified
        }
    };
    let fail_strategy = match spec.fail_strategy.as_deref() {
        None | Some("FAIL_CLOSE") => FailStrategy::FailClose,
        Some("FAIL_OPEN") => FailStrategy::FailOpen,
        Some("FAIL_RELOAD") => FailStrategy::FailReload,
        Some(other) => {
            errors.push(FieldError::new(
                "spec.failStrategy",
                format!("{other:?} is not valid; use FAIL_CLOSE, FAIL_OPEN or FAIL_RELOAD"),
            ));
            FailStrategy::FailClose
        }
    };
    match spec.plugin_type.as_deref() {
        None | Some("HTTP") | Some("UNSPECIFIED_PLUGIN_TYPE") => {}
        Some(other) => errors.push(FieldError::new(
            "spec.type",
            format!("{other:?} plugins are not supported by the waypoint; use HTTP"),
        )),
    }
    if spec.selector.is_some() && (spec.target_ref.is_some() || !spec.target_refs.is_empty()) {
        errors.push(FieldError::new(
            "spec.targetRefs",
            "set either selector or targetRefs, not both",
        ));
    }
    let mut env = Vec::new();
    for (i, var) in spec
        .vm_config
        .iter()
        .flat_map(|vm| vm.env.iter())
        .enumerate()
    {
        match var.value_from.as_deref() {
            None | Some("INLINE") => {
                env.push((Arc::from(&*var.name), Some(Arc::from(&*var.value))))
            }
            Some("HOST") => env.push((Arc::from(&*var.name), None)),
            Some(other) => errors.push(FieldError::new(
                format!("spec.vmConfig.env[{i}].valueFrom"),
                format!("{other:?} is not valid; use INLINE or HOST"),
            )),
        }
    }
    let ports = match_ports(spec, &mut errors);
    let config = match &spec.plugin_config {
        None => String::new(),
        Some(value) => value.to_string(),
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Plugin {
        namespace: namespace.into(),
        name: name.into(),
        root_id: spec.plugin_name.as_deref().unwrap_or(name).into(),
        url: url.into(),
        sha256: sha256.map(Arc::from),
        pull_policy,
        config: config.into(),
        phase,
        priority: spec.priority.unwrap_or(0),
        fail_strategy,
        env: env.into_boxed_slice(),
        ports,
    })
}

/// Lowers `match[]` as a waypoint (a server of its traffic) reads it.
fn match_ports(spec: &WasmPluginSpec, errors: &mut Vec<FieldError>) -> Ports {
    if spec.traffic_match.is_empty() {
        return Ports::Any;
    }
    let mut listed = Vec::new();
    let mut any = false;
    let mut server = false;
    for (i, selector) in spec.traffic_match.iter().enumerate() {
        match selector.mode.as_deref() {
            None | Some("UNDEFINED" | "SERVER" | "CLIENT_AND_SERVER") => {}
            Some("CLIENT") => continue,
            Some(other) => {
                errors.push(FieldError::new(
                    format!("spec.match[{i}].mode"),
                    format!(
                        "{other:?} is not valid; use UNDEFINED, CLIENT, SERVER or CLIENT_AND_SERVER"
                    ),
                ));
                continue;
            }
        }
        server = true;
        any |= selector.ports.is_empty();
        listed.extend(selector.ports.iter().map(|p| p.number));
    }
    match (server, any) {
        (false, _) => Ports::ClientOnly,
        (true, true) => Ports::Any,
        (true, false) => {
            listed.sort_unstable();
            listed.dedup();
            Ports::Listed(listed.into_boxed_slice())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> WasmPluginSpec {
        serde_yaml::from_str(yaml).expect("test spec parses")
    }

    #[test]
    fn lowers_fields_and_defaults() {
        let p = lower_plugin(
            "default",
            "add-header",
            &spec(
                r#"
url: file:///plugins/add_header.wasm
phase: AUTHZ
priority: 10
failStrategy: FAIL_OPEN
pluginConfig: {header: x-added, value: "1"}
vmConfig: {env: [{name: A, value: b}, {name: HOME, valueFrom: HOST}]}
match: [{ports: [{number: 9080}]}]
"#,
            ),
        )
        .expect("valid");
        assert_eq!(&*p.root_id, "add-header");
        assert_eq!(p.phase, PluginPhase::Authz);
        assert_eq!(p.priority, 10);
        assert_eq!(p.fail_strategy, FailStrategy::FailOpen);
        assert_eq!(&*p.config, r#"{"header":"x-added","value":"1"}"#);
        assert_eq!(p.env.len(), 2);
        assert!(p.env[1].1.is_none());
        assert!(p.applies_to_port(9080) && !p.applies_to_port(80));

        let modes = |m: &str| lower_plugin("d", "n", &spec(&format!("url: file:///x\nmatch: {m}")));
        let client = modes("[{mode: CLIENT, ports: [{number: 80}]}]").expect("valid");
        assert_eq!(client.ports, Ports::ClientOnly);
        assert!(!client.applies_to_port(80));
        let mixed = modes("[{mode: CLIENT}, {mode: SERVER, ports: [{number: 80}]}]").expect("ok");
        assert_eq!(mixed.ports, Ports::Listed(Box::new([80])));
        let open = modes("[{mode: CLIENT_AND_SERVER}, {ports: [{number: 80}]}]").expect("ok");
        assert_eq!(open.ports, Ports::Any);
        let reload = lower_plugin("d", "n", &spec("url: file:///x\nfailStrategy: FAIL_RELOAD"));
        assert_eq!(
            reload.expect("valid").fail_strategy,
            FailStrategy::FailReload
        );

        let bare = lower_plugin("d", "n", &spec("url: registry.local/plugins/x:v1")).expect("ok");
        assert_eq!(&*bare.url, "oci://registry.local/plugins/x:v1");
        assert_eq!(bare.fail_strategy, FailStrategy::FailClose);
        assert_eq!(bare.phase, PluginPhase::Unspecified);
    }

    #[test]
    fn reports_each_bad_field() {
        let errors = lower_plugin(
            "d",
            "n",
            &spec(
                "url: ftp://x\nsha256: abc\nphase: LATE\nfailStrategy: MAYBE\n\
                 imagePullPolicy: Never\ntype: NETWORK\nmatch: [{mode: INBOUND}]\n\
                 selector: {matchLabels: {a: b}}\ntargetRefs: [{kind: Service, name: s}]",
            ),
        )
        .expect_err("invalid");
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.url",
                "spec.sha256",
                "spec.imagePullPolicy",
                "spec.phase",
                "spec.failStrategy",
                "spec.type",
                "spec.targetRefs",
                "spec.match[0].mode"
            ]
        );
    }
}
