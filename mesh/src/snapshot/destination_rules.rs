//! Which DestinationRule a proxy applies to a service, chosen as istiod chooses it.
//!
//! istiod does not keep one rule per host: it chooses per proxy namespace and service
//! (`PushContext.destinationRule`), so a waypoint's own rule for a backend in another
//! namespace applies to that backend at that waypoint only. In order:
//!
//! 1. a rule visible in the proxy's namespace (for a proxy in the root namespace, only the root
//!    namespace's private rules, so that its mesh-wide defaults do not shadow the services' own);
//! 2. a rule in the service's namespace exported to the proxy's namespace;
//! 3. a rule in the root namespace exported to the proxy's namespace.
//!
//! Each step takes the most specific host (the host itself, then the longest wildcard), and a
//! step whose most specific rule is not exported to the proxy yields nothing rather than a
//! less specific one. Rules of one namespace for the same host are merged, in namespace/name
//! order: the first keeps its top-level policy (a later one's applies when the first has
//! none), and later subsets are appended, a name already defined skipped. A waypoint's proxy
//! namespace is its own.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::model::DestinationRuleId;
use crate::route::{DestinationPolicy, DestinationRuleSpec};

/// The chosen rules, merged and indexed for choosing per request without allocating.
#[derive(Debug, Default)]
pub(crate) struct DestinationRules {
    rules: Vec<DestinationPolicy>,
    /// By namespace: the rules its proxies look at first (all of its rules but those exported
    /// only to other namespaces).
    local: HashMap<Arc<str>, Hosts>,
    /// By namespace: the rules exported beyond it.
    exported: HashMap<Arc<str>, Hosts>,
    /// The root namespace's private rules, which its own proxies look at first.
    root_local: Hosts,
    root: Arc<str>,
}

/// One namespace's rules of one kind, by [`key`].
#[derive(Debug, Default)]
struct Hosts(HashMap<Arc<str>, Entry>);

#[derive(Debug)]
struct Entry {
    rule: DestinationRuleId,
    export_to: ExportTo,
}

/// Who a rule is exported to; `.` is already its own namespace.
#[derive(Debug, Clone, PartialEq)]
enum ExportTo {
    /// No `exportTo` (the mesh default is every namespace), or `*`.
    All,
    /// These namespaces only (`~`, none, is kept and matches no namespace).
    Namespaces(Vec<Arc<str>>),
}

/// A valid DestinationRule as written, with its lowered policy.
#[derive(Debug)]
pub(crate) struct Written<'a> {
    pub(crate) namespace: &'a str,
    pub(crate) name: &'a str,
    pub(crate) spec: &'a DestinationRuleSpec,
    pub(crate) policy: DestinationPolicy,
}

impl ExportTo {
    fn of(rule: &Written<'_>) -> Self {
        let export_to = &rule.spec.export_to;
        if export_to.is_empty() || export_to.iter().any(|e| e == "*") {
            return Self::All;
        }
        let mut namespaces: Vec<Arc<str>> = (export_to.iter())
            .map(|e| Arc::from(if e == "." { rule.namespace } else { e }))
            .collect();
        namespaces.sort();
        namespaces.dedup();
        Self::Namespaces(namespaces)
    }

    fn includes(&self, namespace: &str) -> bool {
        match self {
            Self::All => true,
            Self::Namespaces(list) => list.iter().any(|n| **n == *namespace),
        }
    }

    /// Visible in `namespace` only, its own.
    fn private_to(&self, namespace: &str) -> bool {
        matches!(self, Self::Namespaces(list) if list.len() == 1 && *list[0] == *namespace)
    }

    fn union(self, other: Self) -> Self {
        match (self, other) {
            (Self::Namespaces(mut a), Self::Namespaces(b)) => {
                a.extend(b);
                a.sort();
                a.dedup();
                Self::Namespaces(a)
            }
            _ => Self::All,
        }
    }
}

/// The key a rule is kept under: its host, except that a wildcard host keeps only its suffix
/// (`*.example.com` under `.example.com`; `*` as it is), so that [`Hosts::most_specific`] finds
/// it by slicing the looked-up host rather than building a string per request.
fn key(host: &str) -> &str {
    host.strip_prefix('*')
        .filter(|s| !s.is_empty())
        .unwrap_or(host)
}

impl Hosts {
    /// The rule for `host`, as Istio picks it: the rule naming the host, else the most specific
    /// wildcard covering it (`*.ns.svc.cluster.local` before `*.svc.cluster.local`, `*` last).
    fn most_specific(&self, host: &str) -> Option<&Entry> {
        if let Some(entry) = self.0.get(host) {
            return Some(entry);
        }
        (host.match_indices('.'))
            .find_map(|(dot, _)| self.0.get(&host[dot..]))
            .or_else(|| self.0.get("*"))
    }
}

/// Rules of one namespace and kind grouped by host, in the order written (ordered maps, so
/// that ids follow the configuration, not hashing).
type Groups = BTreeMap<Arc<str>, Vec<usize>>;

impl DestinationRules {
    /// Indexes `written` (sorted by namespace and name), merging rules of one namespace for the
    /// same host; `lower` lowers a merged rule (a rule that needs no merging keeps its policy).
    /// Returns the merges' warnings too.
    pub(crate) fn build(
        root: &str,
        written: &[Written<'_>],
        mut lower: impl FnMut(&Written<'_>, &DestinationRuleSpec) -> Option<DestinationPolicy>,
    ) -> (Self, Vec<String>) {
        let mut local: BTreeMap<Arc<str>, Groups> = BTreeMap::new();
        let mut exported: BTreeMap<Arc<str>, Groups> = BTreeMap::new();
        let mut root_local = Groups::new();
        for (i, rule) in written.iter().enumerate() {
            let export_to = ExportTo::of(rule);
            let host: Arc<str> = key(&rule.policy.host).into();
            let namespace: Arc<str> = rule.namespace.into();
            if export_to.includes(rule.namespace) {
                let hosts = local.entry(namespace.clone()).or_default();
                hosts.entry(host.clone()).or_default().push(i);
            }
            if !export_to.private_to(rule.namespace) {
                let hosts = exported.entry(namespace).or_default();
                hosts.entry(host).or_default().push(i);
            } else if rule.namespace == root {
                root_local.entry(host).or_default().push(i);
            }
        }
        let mut merging = Merging {
            written,
            out: Self {
                root: root.into(),
                ..Self::default()
            },
            ids: HashMap::new(),
            warnings: Vec::new(),
            lower: &mut lower,
        };
        for (namespace, groups) in local {
            let hosts = merging.hosts(groups);
            merging.out.local.insert(namespace, hosts);
        }
        for (namespace, groups) in exported {
            let hosts = merging.hosts(groups);
            merging.out.exported.insert(namespace, hosts);
        }
        merging.out.root_local = merging.hosts(root_local);
        (merging.out, merging.warnings)
    }

    /// The rule a proxy in `proxy_namespace` applies to the service `host` of namespace
    /// `service_namespace`.
    pub(crate) fn choose(
        &self,
        proxy_namespace: &str,
        service_namespace: &str,
        host: &str,
    ) -> Option<DestinationRuleId> {
        let own = if proxy_namespace == &*self.root {
            Some(&self.root_local)
        } else {
            self.local.get(proxy_namespace)
        };
        if let Some(entry) = own.and_then(|hosts| hosts.most_specific(host)) {
            return Some(entry.rule);
        }
        [service_namespace, &*self.root].into_iter().find_map(|ns| {
            let entry = self.exported.get(ns)?.most_specific(host)?;
            entry
                .export_to
                .includes(proxy_namespace)
                .then_some(entry.rule)
        })
    }

    /// Every rule some proxy may apply to `host`, whatever its namespace: the most specific
    /// rule of each namespace, in id order.
    pub(crate) fn candidates(&self, host: &str) -> Vec<DestinationRuleId> {
        let scopes = (self.local.values())
            .chain(self.exported.values())
            .chain([&self.root_local]);
        let mut ids: Vec<DestinationRuleId> = scopes
            .filter_map(|hosts| Some(hosts.most_specific(host)?.rule))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    pub(crate) fn get(&self, id: DestinationRuleId) -> &DestinationPolicy {
        &self.rules[id.index()]
    }
}

/// The state of [`DestinationRules::build`]: a merged group is lowered once, whichever scopes
/// it appears in.
struct Merging<'w, 'a, L> {
    written: &'w [Written<'a>],
    out: DestinationRules,
    ids: HashMap<Vec<usize>, DestinationRuleId>,
    warnings: Vec<String>,
    lower: &'w mut L,
}

impl<L> Merging<'_, '_, L>
where
    L: FnMut(&Written<'_>, &DestinationRuleSpec) -> Option<DestinationPolicy>,
{
    fn hosts(&mut self, groups: Groups) -> Hosts {
        let mut hosts = HashMap::with_capacity(groups.len());
        for (host, members) in groups {
            let export_to = (members.iter())
                .map(|&i| ExportTo::of(&self.written[i]))
                .reduce(ExportTo::union)
                .unwrap_or(ExportTo::All);
            if let Some(rule) = self.rule(members) {
                hosts.insert(host, Entry { rule, export_to });
            }
        }
        Hosts(hosts)
    }

    fn rule(&mut self, members: Vec<usize>) -> Option<DestinationRuleId> {
        if let Some(&id) = self.ids.get(&members) {
            return Some(id);
        }
        let first = &self.written[members[0]];
        let policy = if let [_] = members[..] {
            first.policy.clone()
        } else {
            let spec = self.merged(&members);
            (self.lower)(first, &spec)?
        };
        let id = DestinationRuleId(self.out.rules.len() as u32);
        self.out.rules.push(policy);
        self.ids.insert(members, id);
        Some(id)
    }

    /// The rules `members` merged into the first, as istiod merges them.
    fn merged(&mut self, members: &[usize]) -> DestinationRuleSpec {
        let first = &self.written[members[0]];
        let mut spec = first.spec.clone();
        for &i in &members[1..] {
            let other = &self.written[i];
            if spec.traffic_policy.is_none() {
                spec.traffic_policy = other.spec.traffic_policy.clone();
            }
            for subset in &other.spec.subsets {
                if spec.subsets.iter().any(|s| s.name == subset.name) {
                    let warning = format!(
                        "DestinationRule {}/{} defines subset {:?} of {}, which \
                         DestinationRule {}/{} already defines; the first applies",
                        other.namespace,
                        other.name,
                        subset.name,
                        first.policy.host,
                        first.namespace,
                        first.name,
                    );
                    if !self.warnings.contains(&warning) {
                        self.warnings.push(warning);
                    }
                } else {
                    spec.subsets.push(subset.clone());
                }
            }
        }
        spec
    }
}

#[cfg(test)]
#[path = "destination_rules_tests.rs"]
mod tests;
