//! The internal model: what the YAML means, resolved and cross-referenced.
//!
//! Every entity lives in one vector of the [`Snapshot`](crate::Snapshot) and refers to others by
//! index ([`WorkloadId`], [`ServiceId`], ...), so the snapshot is a flat, immutable value that is
//! cheap to share and to walk without locks. Strings that repeat across thousands of entities
//! (namespaces, label keys and values, service accounts, nodes) are interned while building, so
//! 50,000 pods in a handful of namespaces hold one copy of each namespace name.

mod labels;
pub mod locality;
mod plugin;
mod service;
pub(crate) mod waypoint;
pub(crate) mod workload;

use std::collections::HashSet;
use std::sync::Arc;

pub use labels::Labels;
pub use locality::{HealthPolicy, LoadBalancing, Locality};
pub use plugin::{EnvEntry, FailStrategy, Plugin, PluginPhase, Ports, PullPolicy};
pub use service::{
    AppProtocol, Endpoint, Service, ServiceKind, ServicePort, Subset, SubsetEndpoints, Target,
};
pub use waypoint::{Waypoint, WaypointFor};
pub use workload::{AppTunnel, Protocol, Workload, WorkloadKind};

pub(crate) use labels::selector_matches;
pub(crate) use plugin::lower_plugin;
pub(crate) use service::app_protocol;
pub(crate) use waypoint::{Binding, WaypointLabels};

macro_rules! id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(pub(crate) u32);

        impl $name {
            /// The position in the snapshot's vector.
            pub fn index(self) -> usize {
                self.0 as usize
            }
        }
    };
}

id!(
    /// A workload's position in the snapshot.
    WorkloadId
);
id!(
    /// A service's position in the snapshot.
    ServiceId
);
id!(
    /// A waypoint's position in the snapshot.
    WaypointId
);
id!(
    /// An authorization policy's position in the snapshot.
    PolicyId
);
id!(
    /// A Wasm plugin's position in the snapshot.
    PluginId
);
id!(
    /// A DestinationRule's position in the snapshot: one rule as written, or the rules of one
    /// namespace for one host merged as istiod merges them.
    DestinationRuleId
);

/// Shares one allocation per distinct string while a snapshot is built.
#[derive(Debug, Default)]
pub(crate) struct Interner {
    strings: HashSet<Arc<str>>,
}

impl Interner {
    pub(crate) fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(existing) = self.strings.get(s) {
            return existing.clone();
        }
        let new: Arc<str> = Arc::from(s);
        self.strings.insert(new.clone());
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interner_shares_allocations() {
        let mut i = Interner::default();
        let a = i.get("default");
        let b = i.get(&String::from("default"));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &i.get("other")));
    }
}
