//! The whole snapshot as JSON, for the proxies' `/config_dump`.

use serde_json::{Value, json};

use super::Snapshot;
use crate::resource::Resource;

impl Snapshot {
    /// Everything the snapshot holds: the resolved model (workloads with their services and
    /// waypoints, services with endpoints and subsets, waypoints with what they serve, policy
    /// scopes, plugins) and the routing and policy resources as written.
    pub fn dump(&self) -> Value {
        let policies: Vec<Value> = self
            .policies
            .iter()
            .map(|p| {
                json!({
                    "namespace": p.policy.namespace(),
                    "name": p.policy.name(),
                    "action": format!("{:?}", p.policy.action()),
                    "dryRun": p.policy.dry_run(),
                    "scope": p.scope,
                    "enforcedByZtunnel": p.l4.is_some() && p.scope != super::PolicyScope::Targets,
                })
            })
            .collect();
        // Serialized here, when asked for, rather than kept as JSON in every snapshot: a
        // reload would otherwise spend most of its time building and dropping JSON trees.
        let resources: Vec<&Resource> = self.sources.iter().map(|r| &r.resource).collect();
        json!({
            "version": self.version,
            "options": self.options,
            "workloads": self.workloads,
            "services": self.services,
            "waypoints": self.waypoints,
            "authorizationPolicies": policies,
            "peerAuthentications": self.peer_authentications,
            "plugins": self.plugins,
            "resources": resources,
            "warnings": self.warnings,
        })
    }
}
