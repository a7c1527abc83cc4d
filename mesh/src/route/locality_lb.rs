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
//! `distribute` is not an order but shares: a proxy in a `from` locality sends each `to`
//! locality its percentage of the traffic, split among the endpoint localities it matches by
//! their endpoints' weights, and nothing to endpoints no `to` matches ([`LocalityShares`]).
//!
//! Whether the rule sets `localityLbSetting` at all matters too: istiod takes a rule's setting
//! over the service's `trafficDistribution`, and the service's over the mesh default.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::lower_common::Problems;
use super::spec_destination::{LocalityDistribute, LocalityLbSetting};
use crate::model::locality::Scope;
use crate::model::{Locality, Workload};

/// What a traffic policy's `localityLbSetting` makes of locality balancing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalityLb {
    /// Not set: the service's traffic distribution applies, else this, Istio's default (the
    /// mesh's `localityLbSetting.enabled: true`).
    Unset(Option<LocalityPreference>),
    /// Set by the rule: this, whatever the service's traffic distribution says (`None`: off).
    Set(Option<LocalityPreference>),
    /// Set by the rule, with `distribute`: the first entry whose `from` matches the proxy's
    /// locality applies; none matching, every endpoint alike. Envoy needs no ejections for it.
    Distribute(Box<[LocalityShares]>),
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
            Self::Distribute(_) => None,
        }
    }

    /// Only with outlier detection: Envoy moves to a farther priority only as nearer endpoints
    /// are ejected, so istiod sets no priorities without it.
    pub(super) fn needing_ejections(self, outlier_detection: bool) -> Self {
        match self {
            Self::Unset(p) => Self::Unset(p.filter(|_| outlier_detection)),
            Self::Set(p) => Self::Set(p.filter(|_| outlier_detection)),
            Self::Distribute(shares) => Self::Distribute(shares),
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

/// One `distribute` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalityShares {
    /// The proxy localities it applies to.
    pub from: LocalityPattern,
    /// Endpoint localities and their percentages. No two overlap (the load refuses it, as
    /// istiod does), so an endpoint locality is at most one pattern's.
    pub to: Box<[(LocalityPattern, u32)]>,
}

/// `region/zone/subzone` as `distribute` writes it: a `*` part, or one left out, matches any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalityPattern {
    parts: [Option<Arc<str>>; 3],
}

impl LocalityPattern {
    /// Parses what istiod's validation accepts: no empty part, at most one `*`, last.
    fn parse(s: &str) -> Result<Self, String> {
        let stars = s.matches('*').count();
        if stars > 1 || (stars == 1 && !s.ends_with('*')) {
            return Err(format!("{s:?}: a locality may have one '*', at its end"));
        }
        let mut parts: [Option<Arc<str>>; 3] = Default::default();
        for (i, part) in s.splitn(3, '/').enumerate() {
            if part.is_empty() {
                return Err(format!(
                    "{s:?}: a locality has no empty region, zone or subzone"
                ));
            }
            parts[i] = (part != "*").then(|| Arc::from(part));
        }
        Ok(Self { parts })
    }

    /// Whether `locality` is one this pattern names.
    pub fn matches(&self, locality: &Locality) -> bool {
        let [region, zone, subzone] = &self.parts;
        let part = |p: &Option<Arc<str>>, value: &Arc<str>| p.as_ref().is_none_or(|p| p == value);
        part(region, &locality.region)
            && part(zone, &locality.zone)
            && part(subzone, &locality.subzone)
    }
}

/// istiod's overlap check of a list of localities, in its order: a locality may not fall
/// within one listed before it, nor a region or zone given whole contain one listed before.
fn check_overlaps<'a>(localities: impl IntoIterator<Item = &'a str>) -> Result<(), String> {
    // region → zone → subzones; "*" for the whole of a region or zone, or for every region.
    let mut seen: BTreeMap<&str, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for locality in localities {
        let overlap = || Err(format!("{locality:?} overlaps a locality listed before it"));
        if seen.contains_key("*") {
            return overlap();
        }
        let mut parts = locality.splitn(3, '/');
        let (region, zone, subzone) = (parts.next().unwrap_or(""), parts.next(), parts.next());
        let Some(zones) = seen.get_mut(region) else {
            let subzones = BTreeSet::from([subzone.unwrap_or("*")]);
            seen.insert(region, BTreeMap::from([(zone.unwrap_or("*"), subzones)]));
            continue;
        };
        // A region listed whole, or given again whole, overlaps.
        let Some(zone) = zone.filter(|_| !zones.contains_key("*")) else {
            return overlap();
        };
        let Some(subzones) = zones.get_mut(zone) else {
            zones.insert(zone, BTreeSet::from([subzone.unwrap_or("*")]));
            continue;
        };
        match subzone {
            Some(subzone) if !subzones.contains("*") && subzones.insert(subzone) => {}
            _ => return overlap(),
        }
    }
    Ok(())
}

/// Reads `distribute` at `field`, refusing what istiod's validation refuses.
fn distribute(
    entries: &[LocalityDistribute],
    field: &str,
    problems: &mut Problems,
) -> Box<[LocalityShares]> {
    let field = format!("{field}.distribute");
    if let Err(e) = check_overlaps(entries.iter().map(|e| e.from.as_str())) {
        problems.push(&field, e);
    }
    let mut out = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let field = format!("{field}[{i}]");
        let from = LocalityPattern::parse(&entry.from);
        if let Err(e) = &from {
            problems.push(format!("{field}.from"), e.clone());
        }
        let total: u64 = entry.to.values().map(|&w| u64::from(w)).sum();
        if entry.to.values().any(|w| !(1..=100).contains(w)) {
            problems.push(format!("{field}.to"), "each weight must be from 1 to 100");
        } else if total != 100 {
            problems.push(
                format!("{field}.to"),
                format!("the weights must add up to 100, not {total}"),
            );
        }
        if let Err(e) = check_overlaps(entry.to.keys().map(String::as_str)) {
            problems.push(format!("{field}.to"), e);
        }
        let mut to = Vec::new();
        for (locality, weight) in &entry.to {
            match LocalityPattern::parse(locality) {
                Ok(pattern) => to.push((pattern, *weight)),
                Err(e) => problems.push(format!("{field}.to"), e),
            }
        }
        if let Ok(from) = from {
            out.push(LocalityShares {
                from,
                to: to.into(),
            });
        }
    }
    out.into()
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
    if !setting.distribute.is_empty() && !setting.failover.is_empty() {
        problems.push(field, "set distribute or failover, not both");
    }
    let mut failover = Vec::new();
    for (i, f) in setting.failover.iter().enumerate() {
        let field = format!("{field}.failover[{i}]");
        let problem = if f.from == f.to {
            Some("from and to must be different regions")
        } else if f.from.contains('/') || f.to.contains('/') {
            Some("from and to must be regions, without zones")
        } else if f.from.contains('*') || f.to.contains('*') {
            Some("from and to must be regions, without wildcards")
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
    if !setting.failover.is_empty() {
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
    let distribute = distribute(&setting.distribute, field, problems);
    // istiod checks the setting whole before reading `enabled`.
    if setting.enabled == Some(false) {
        return LocalityLb::Set(None);
    }
    if !distribute.is_empty() {
        return LocalityLb::Distribute(distribute);
    }
    if setting.failover_priority.is_empty() {
        return LocalityLb::Set(Some(LocalityPreference {
            failover: failover.into(),
            ..LocalityPreference::default()
        }));
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
