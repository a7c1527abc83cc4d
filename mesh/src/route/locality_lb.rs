//! `localityLbSetting`: how a DestinationRule orders a service's endpoints by their distance from
//! the proxy, lowered as istiod lowers it into Envoy's locality priorities.
//!
//! istiod gives every endpoint a priority and Envoy sends traffic to the best priority that still
//! has healthy endpoints. Here the same order is a rank, higher being nearer:
//! * by default, region, zone and subzone: an endpoint sharing all three with the proxy first,
//!   then one sharing region and zone, then one sharing the region, then the rest; with
//!   `failover`, an endpoint of the `to` region of the entry whose `from` is the proxy's region
//!   comes before endpoints of any other region;
//! * with `failoverPriority`, by how many of its labels (topology labels here) the endpoint
//!   shares with the proxy, from the first; with `failover` beside it, region, zone, subzone
//!   and `failover` then order the endpoints of each of those ranks, as istiod multiplies the
//!   two priorities.
//!
//! Whether the rule sets `localityLbSetting` at all matters too: istiod takes a rule's setting
//! over the service's `trafficDistribution`, and the service's over the mesh default.

use std::sync::Arc;

use super::lower_common::Problems;
use super::spec_destination::LocalityLbSetting;
use crate::model::Workload;
use crate::model::locality::Scope;

/// What a traffic policy's `localityLbSetting` makes of locality balancing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalityLb {
    /// Not set: the service's traffic distribution applies, else this, Istio's default (the
    /// mesh's `localityLbSetting.enabled: true`).
    Unset(Option<LocalityPreference>),
    /// Set by the rule: this, whatever the service's traffic distribution says (`None`: off).
    Set(Option<LocalityPreference>),
}

impl Default for LocalityLb {
    /// A host without a DestinationRule: no outlier detection, so no preference of its own.
    fn default() -> Self {
        Self::Unset(None)
    }
}

impl LocalityLb {
    /// What a rule without `localityLbSetting` asks for: Istio's default (the mesh's
    /// `localityLbSetting.enabled: true`), region, zone and subzone.
    pub(super) fn mesh_default() -> Self {
        Self::Unset(Some(LocalityPreference::default()))
    }

    /// The preference, before the service's traffic distribution is considered.
    pub fn preference(&self) -> Option<&LocalityPreference> {
        match self {
            Self::Unset(p) | Self::Set(p) => p.as_ref(),
        }
    }

    /// Only with outlier detection: Envoy moves to a farther priority only as nearer endpoints
    /// are ejected, so istiod sets no priorities without it.
    pub(super) fn needing_ejections(self, outlier_detection: bool) -> Self {
        match self {
            Self::Unset(p) => Self::Unset(p.filter(|_| outlier_detection)),
            Self::Set(p) => Self::Set(p.filter(|_| outlier_detection)),
        }
    }
}

/// An order of endpoints by nearness, as [`LocalityPreference::rank`] computes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalityPreference {
    /// `failoverPriority`'s scopes, most significant first (empty: none).
    pub priority: Box<[Scope]>,
    /// Whether region, zone, subzone and `failover` order endpoints (within each rank of
    /// `priority`): without `failoverPriority`, or with `failover` beside it.
    pub by_locality: bool,
    /// `failover`, in order; the first entry from the proxy's region applies.
    pub failover: Box<[RegionFailover]>,
}

/// One `failover` entry: a proxy in region `from` fails over to region `to` first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionFailover {
    pub from: Arc<str>,
    pub to: Arc<str>,
}

impl Default for LocalityPreference {
    /// Region, zone and subzone, without failover regions.
    fn default() -> Self {
        Self {
            priority: Box::default(),
            by_locality: true,
            failover: Box::default(),
        }
    }
}

impl LocalityPreference {
    /// How near `endpoint` is to `proxy`; higher is nearer. Ranks need not be consecutive.
    pub fn rank(&self, proxy: &Workload, endpoint: &Workload) -> usize {
        let by_priority = Scope::shared(&self.priority, proxy, endpoint);
        if !self.by_locality {
            return by_priority;
        }
        // istiod's priorities 0 to 4, reversed.
        let by_locality = if Scope::Region.shares(proxy, endpoint) {
            2 + Scope::shared(&[Scope::Zone, Scope::Subzone], proxy, endpoint)
        } else {
            let region = &proxy.locality.region;
            match self.failover.iter().find(|f| f.from == *region) {
                Some(f) if f.to == endpoint.locality.region => 1,
                Some(_) => 0,
                None => 1,
            }
        };
        by_priority * 5 + by_locality
    }
}

/// The label of a workload's cluster, which every endpoint shares with a single-cluster waypoint.
const CLUSTER: &str = "topology.istio.io/cluster";

/// Reads `setting` at `field` (`...loadBalancer.localityLbSetting`), refusing what istiod's
/// validation refuses. What we do not apply is valid Istio and accepted; `unapplied` says what
/// is done instead.
pub(super) fn lower(
    setting: Option<&LocalityLbSetting>,
    field: &str,
    problems: &mut Problems,
    unapplied: &mut Vec<String>,
) -> LocalityLb {
    let Some(setting) = setting else {
        return LocalityLb::mesh_default();
    };
    if setting.enabled == Some(false) {
        return LocalityLb::Set(None);
    }
    if !setting.distribute.is_empty() && !setting.failover.is_empty() {
        problems.push(field, "set distribute or failover, not both");
    }
    let mut failover = Vec::new();
    for (i, f) in setting.failover.iter().enumerate() {
        let field = format!("{field}.failover[{i}]");
        let problem = if f.from.is_empty() || f.to.is_empty() {
            Some("needs both from and to")
        } else if f.from == f.to {
            Some("from and to must be different regions")
        } else if f.from.contains('/') || f.to.contains('/') {
            Some("from and to are regions, without zones")
        } else if f.from.contains('*') || f.to.contains('*') {
            Some("from and to are regions, without wildcards")
        } else {
            None
        };
        match problem {
            Some(problem) => problems.push(field, problem),
            None => failover.push(RegionFailover {
                from: Arc::from(f.from.as_str()),
                to: Arc::from(f.to.as_str()),
            }),
        }
    }
    if !setting.distribute.is_empty() {
        unapplied.push(format!(
            "{field}.distribute is not supported; every endpoint is used alike"
        ));
        return LocalityLb::Set(None);
    }
    if setting.failover_priority.is_empty() {
        return LocalityLb::Set(Some(LocalityPreference {
            failover: failover.into(),
            ..LocalityPreference::default()
        }));
    }
    if !failover.is_empty() {
        let locality = |l: &&String| {
            matches!(
                topology_scope(l),
                Some(Scope::Region | Scope::Zone | Scope::Subzone)
            )
        };
        if let Some((i, label)) = setting
            .failover_priority
            .iter()
            .enumerate()
            .find(|(_, l)| locality(l))
        {
            problems.push(
                format!("{field}.failoverPriority[{i}]"),
                format!("{label:?} cannot be set together with failover"),
            );
        }
    }
    // Endpoints rank by how many leading labels they share with the waypoint, so the list is
    // cut at the first label we cannot compare. The cluster is skipped: with one cluster,
    // every endpoint shares it.
    let mut priority = Vec::new();
    for (i, label) in setting.failover_priority.iter().enumerate() {
        if label == CLUSTER {
            continue;
        }
        match topology_scope(label) {
            Some(scope) => priority.push(scope),
            None => {
                let why = if label.contains('=') {
                    "a `label=value` override is not supported"
                } else {
                    "only topology labels are supported"
                };
                unapplied.push(format!(
                    "{field}.failoverPriority[{i}]: {label:?}: {why}; it and the labels after \
                     it are not used"
                ));
                break;
            }
        }
    }
    let preference = LocalityPreference {
        priority: priority.into(),
        by_locality: !failover.is_empty(),
        failover: failover.into(),
    };
    // Nothing left to compare: every endpoint alike.
    let orders = !preference.priority.is_empty() || preference.by_locality;
    LocalityLb::Set(orders.then_some(preference))
}

/// The locality scope a `failoverPriority` label names.
fn topology_scope(label: &str) -> Option<Scope> {
    Some(match label {
        "topology.istio.io/network" => Scope::Network,
        "topology.kubernetes.io/region" => Scope::Region,
        "topology.kubernetes.io/zone" => Scope::Zone,
        "topology.istio.io/subzone" => Scope::Subzone,
        "kubernetes.io/hostname" => Scope::Node,
        _ => return None,
    })
}
