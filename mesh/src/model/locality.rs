//! Locality: where a workload runs, and how a service prefers the endpoints nearest its caller.
//!
//! Kubernetes puts a node's region and zone in its `topology.kubernetes.io/*` labels and Istio
//! adds a subzone; a pod's locality is its node's, as istiod's ambient controller reads it (the
//! `istio-locality` pod label is a sidecar-mode override istiod does not send ztunnel), and a
//! WorkloadEntry's is its `locality`. A Service asks for near endpoints with `spec.trafficDistribution` (or
//! Istio's `networking.istio.io/traffic-distribution` annotation, for clusters older than the
//! field) and keeps traffic on the caller's node with `internalTrafficPolicy: Local`. Istio hands
//! ztunnel both as one [`LoadBalancing`]: an ordered list of scopes to match the caller on, and
//! whether a partial match falls back (`Failover`) or is refused (`Strict`). The same value says
//! whether not-ready endpoints take traffic (`publishNotReadyAddresses`) and whether the service
//! picks no endpoint at all (`Passthrough`: a ServiceEntry with `resolution: NONE`).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use super::{Interner, Workload};

/// A node's region label.
pub const REGION: &str = "topology.kubernetes.io/region";
/// A node's zone label.
pub const ZONE: &str = "topology.kubernetes.io/zone";
/// A node's subzone label (Istio's own).
pub const SUBZONE: &str = "topology.istio.io/subzone";
/// Istio's annotation for a traffic distribution, read when `spec.trafficDistribution` is unset.
pub const TRAFFIC_DISTRIBUTION: &str = "networking.istio.io/traffic-distribution";

/// Region, zone and subzone; empty parts are unknown, and two unknowns match, as in Istio.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Locality {
    pub region: Arc<str>,
    pub zone: Arc<str>,
    pub subzone: Arc<str>,
}

impl Locality {
    /// From a node's topology labels.
    pub(crate) fn of_node(labels: &BTreeMap<String, String>, interner: &mut Interner) -> Self {
        let mut get = |key| interner.get(labels.get(key).map_or("", String::as_str));
        Self {
            region: get(REGION),
            zone: get(ZONE),
            subzone: get(SUBZONE),
        }
    }

    /// From `region/zone/subzone` (a WorkloadEntry's or ServiceEntry endpoint's `locality`);
    /// missing parts are unknown.
    pub(crate) fn parse(s: &str, interner: &mut Interner) -> Self {
        let mut parts = s.splitn(3, '/');
        let mut next = || interner.get(parts.next().unwrap_or("").trim());
        Self {
            region: next(),
            zone: next(),
            subzone: next(),
        }
    }

    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }
}

/// How a service picks among its endpoints: by their distance from the caller, among the
/// healthy ones or all, or not at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancing {
    /// Scopes in order; an endpoint's rank is how many leading ones it shares with the caller.
    pub routing_preference: Box<[Scope]>,
    /// What a partial match means, or that no endpoint is picked.
    pub mode: Mode,
    /// Which endpoints may be picked.
    pub health_policy: HealthPolicy,
}

/// Something a caller and an endpoint can share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Scope {
    Network,
    Region,
    Zone,
    Subzone,
    Node,
}

/// What happens to endpoints that do not share every scope with the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Mode {
    /// Any endpoint, near or far (no routing preference).
    Standard,
    /// Only the best-ranked endpoints are used, however far they are.
    Failover,
    /// Only endpoints sharing every scope are used; with none, the connection is refused.
    Strict,
    /// No endpoint is picked: the connection goes to the address the caller dialled.
    Passthrough,
}

/// Which of a service's endpoints may take traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum HealthPolicy {
    /// The ready ones.
    OnlyHealthy,
    /// Every one that has not ended (`publishNotReadyAddresses`).
    AllowAll,
}

/// A service's traffic distribution, as Istio reads it, or `None` for any endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Distribution {
    /// `PreferClose` (the older name) or `PreferSameZone`.
    SameZone,
    /// `PreferSameNode`.
    SameNode,
}

impl Distribution {
    /// `spec.trafficDistribution` when it names a known distribution, else the annotation (in
    /// any case). `Err` carries a value neither knows, which means any endpoint.
    pub(crate) fn read(
        spec: Option<&str>,
        annotations: &BTreeMap<String, String>,
    ) -> Result<Option<Self>, String> {
        let known = |s: &str| match s.to_ascii_lowercase().as_str() {
            "preferclose" | "prefersamezone" => Some(Distribution::SameZone),
            "prefersamenode" => Some(Distribution::SameNode),
            _ => None,
        };
        if let Some(d) = spec.and_then(known) {
            return Ok(Some(d));
        }
        match annotations.get(TRAFFIC_DISTRIBUTION) {
            Some(a) => known(a).map(Some).ok_or_else(|| a.clone()),
            None => spec.map_or(Ok(None), |s| Err(s.to_owned())),
        }
    }
}

impl LoadBalancing {
    /// What istiod sends for a service: `internalTrafficPolicy: Local` keeps traffic on the
    /// caller's node (and wins); a traffic distribution prefers the nearest endpoints;
    /// `publishNotReadyAddresses` lets every endpoint take traffic. `None`: the defaults.
    pub(crate) fn for_service(
        local: bool,
        distribution: Option<Distribution>,
        publish_not_ready: bool,
    ) -> Option<Self> {
        use Scope::*;
        let (routing_preference, mode): (&[Scope], _) = match (local, distribution) {
            (true, _) => (&[Node], Mode::Strict),
            (false, Some(Distribution::SameZone)) => (&[Network, Region, Zone], Mode::Failover),
            (false, Some(Distribution::SameNode)) => {
                (&[Network, Region, Zone, Subzone, Node], Mode::Failover)
            }
            (false, None) if publish_not_ready => (&[], Mode::Standard),
            (false, None) => return None,
        };
        Some(Self {
            routing_preference: routing_preference.into(),
            mode,
            health_policy: if publish_not_ready {
                HealthPolicy::AllowAll
            } else {
                HealthPolicy::OnlyHealthy
            },
        })
    }

    /// What istiod sends for a ServiceEntry with `resolution: NONE`: connections go where the
    /// caller sent them (every endpoint allowed, which says no endpoint is judged).
    pub(crate) fn passthrough() -> Self {
        Self {
            routing_preference: Box::default(),
            mode: Mode::Passthrough,
            health_policy: HealthPolicy::AllowAll,
        }
    }

    /// Whether the service picks no endpoint.
    pub fn is_passthrough(&self) -> bool {
        self.mode == Mode::Passthrough
    }

    /// Whether the caller's locality matters at all.
    pub fn prefers_near(&self) -> bool {
        !self.routing_preference.is_empty()
    }

    /// How near `endpoint` is to `source`: the number of leading scopes they share; `None` when
    /// the mode is strict and they do not share them all.
    pub fn rank(&self, source: &Workload, endpoint: &Workload) -> Option<usize> {
        let rank = Scope::shared(&self.routing_preference, source, endpoint);
        (self.mode != Mode::Strict || rank == self.routing_preference.len()).then_some(rank)
    }
}

impl Scope {
    /// Whether `a` and `b` are in the same scope of this kind (unknowns match unknowns).
    pub fn shares(self, a: &Workload, b: &Workload) -> bool {
        match self {
            Scope::Network => a.network == b.network,
            Scope::Region => a.locality.region == b.locality.region,
            Scope::Zone => a.locality.zone == b.locality.zone,
            Scope::Subzone => a.locality.subzone == b.locality.subzone,
            Scope::Node => a.node == b.node,
        }
    }

    /// How many of `scopes`, from the first, `a` and `b` share.
    pub fn shared(scopes: &[Scope], a: &Workload, b: &Workload) -> usize {
        scopes.iter().take_while(|s| s.shares(a, b)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotated(value: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(TRAFFIC_DISTRIBUTION.to_owned(), value.to_owned())])
    }

    #[test]
    fn traffic_distribution_from_the_field_then_the_annotation() {
        let none = BTreeMap::new();
        let cases = [
            (Some("PreferClose"), &none, Ok(Some(Distribution::SameZone))),
            (
                Some("PreferSameZone"),
                &none,
                Ok(Some(Distribution::SameZone)),
            ),
            (
                Some("PreferSameNode"),
                &none,
                Ok(Some(Distribution::SameNode)),
            ),
            (None, &none, Ok(None)),
            (Some("Nearby"), &none, Err("Nearby".to_owned())),
        ];
        for (spec, annotations, want) in cases {
            assert_eq!(Distribution::read(spec, annotations), want, "{spec:?}");
        }
        let close = annotated("preferclose");
        assert_eq!(
            Distribution::read(None, &close),
            Ok(Some(Distribution::SameZone))
        );
        // The field wins when it names a distribution; an unknown field falls to the annotation.
        let node = annotated("PreferSameNode");
        assert_eq!(
            Distribution::read(Some("PreferClose"), &node),
            Ok(Some(Distribution::SameZone))
        );
        assert_eq!(
            Distribution::read(Some("Nearby"), &node),
            Ok(Some(Distribution::SameNode))
        );
        assert_eq!(
            Distribution::read(None, &annotated("everywhere")),
            Err("everywhere".to_owned())
        );
    }

    #[test]
    fn load_balancing_as_istiod_sends_it() {
        use Scope::*;
        let lb = |local, d| LoadBalancing::for_service(local, d, false);
        assert_eq!(lb(false, None), None);
        let not_ready = LoadBalancing::for_service(false, None, true).expect("lb");
        assert_eq!(
            (&*not_ready.routing_preference, not_ready.mode),
            (&[][..], Mode::Standard)
        );
        assert_eq!(not_ready.health_policy, HealthPolicy::AllowAll);
        assert!(!not_ready.prefers_near());
        let zone = lb(false, Some(Distribution::SameZone)).expect("lb");
        assert_eq!(
            (&*zone.routing_preference, zone.mode),
            (&[Network, Region, Zone][..], Mode::Failover)
        );
        let node = lb(false, Some(Distribution::SameNode)).expect("lb");
        assert_eq!(
            (&*node.routing_preference, node.mode),
            (&[Network, Region, Zone, Subzone, Node][..], Mode::Failover)
        );
        for d in [None, Some(Distribution::SameZone)] {
            let local = lb(true, d).expect("lb");
            assert_eq!(
                (&*local.routing_preference, local.mode),
                (&[Node][..], Mode::Strict)
            );
            assert_eq!(local.health_policy, HealthPolicy::OnlyHealthy);
        }
        let local = LoadBalancing::for_service(true, None, true).expect("lb");
        assert_eq!(
            (local.mode, local.health_policy),
            (Mode::Strict, HealthPolicy::AllowAll)
        );
        assert!(LoadBalancing::passthrough().is_passthrough());
    }

    #[test]
    fn localities_parse_with_missing_parts_unknown() {
        let mut i = Interner::default();
        let l = Locality::parse("us-east1/us-east1-b", &mut i);
        assert_eq!(
            (&*l.region, &*l.zone, &*l.subzone),
            ("us-east1", "us-east1-b", "")
        );
        let l = Locality::parse("eu/eu-a/rack-7", &mut i);
        assert_eq!(
            (&*l.region, &*l.zone, &*l.subzone),
            ("eu", "eu-a", "rack-7")
        );
        assert!(Locality::parse("", &mut i).is_empty());
        let node = BTreeMap::from([
            (REGION.to_owned(), "eu".to_owned()),
            (ZONE.to_owned(), "eu-b".to_owned()),
        ]);
        let l = Locality::of_node(&node, &mut i);
        assert_eq!((&*l.region, &*l.zone, &*l.subzone), ("eu", "eu-b", ""));
    }
}
