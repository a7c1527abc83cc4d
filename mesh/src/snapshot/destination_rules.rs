//! Which DestinationRule a proxy applies to a service, chosen as istiod chooses it.
//!
//! istiod does not keep one rule per host: it chooses per proxy and service
//! (`PushContext.destinationRule`, then `SidecarScope.DestinationRule`), so a waypoint's own
//! rule for a backend in another namespace applies to that backend at that waypoint only. In
//! order:
//!
//! 1. a rule visible in the proxy's namespace (for a proxy in the root namespace, only the root
//!    namespace's private rules, so that its mesh-wide defaults do not shadow the services' own);
//! 2. a rule in the service's namespace exported to the proxy's namespace;
//! 3. a rule in the root namespace exported to the proxy's namespace.
//!
//! Each step takes the most specific host (the host itself, then the longest wildcard), and in
//! it the last rule (in istiod's order: rules with a `workloadSelector` first, then by
//! creation time, name and namespace) that is visible to the proxy. A step whose most specific
//! host has no such rule yields nothing rather than a less specific host's rule; in the first
//! step it ends the search. A rule with a `workloadSelector` is never a waypoint's: istiod
//! builds a waypoint's clusters as inbound ones, for which it skips them, so they only take
//! their place in the order.
//!
//! Rules of one namespace for one host are merged when their `exportTo` is the same as written
//! and their selectors are the same (istiod's enhanced merge, the default since 1.24): the
//! first keeps its top-level policy (a later one's applies when the first has none), and later
//! subsets are appended, a name already defined skipped. A waypoint's proxy namespace is its
//! own.

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

/// One namespace's rules of one kind, by [`key`]: a host's groups in istiod's order.
#[derive(Debug, Default)]
struct Hosts(HashMap<Arc<str>, Box<[Group]>>);

/// Rules merged into one.
#[derive(Debug)]
struct Group {
    rule: DestinationRuleId,
    export_to: ExportTo,
    /// The `workloadSelector`, if the rule has one.
    selector: Option<BTreeMap<String, String>>,
}

/// Who a rule is exported to, as written and sorted (empty: the mesh default, every
/// namespace; `.`: its own).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExportTo(Vec<Arc<str>>);

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
        if rule.spec.workload_selector.is_some() {
            // Such a rule is its namespace's only.
            return Self(vec![".".into()]);
        }
        let mut entries: Vec<Arc<str>> = (rule.spec.export_to.iter())
            .map(|e| Arc::from(e.as_str()))
            .collect();
        entries.sort();
        Self(entries)
    }

    /// Whether a proxy in `namespace` sees it when it is looked up from another namespace
    /// (istiod compares the entries as written, so `.` matches none).
    fn includes(&self, namespace: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|e| **e == *"*" || **e == *namespace)
    }

    /// Whether a proxy in `namespace`, the rule's own, sees it.
    fn visible_in_own(&self, namespace: &str) -> bool {
        self.includes(".") || self.includes(namespace)
    }

    /// Visible in `namespace`, its own, only.
    fn private_to(&self, namespace: &str) -> bool {
        matches!(&self.0[..], [only] if **only == *"." || **only == *namespace)
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
    /// The groups for `host`, as Istio picks them: those naming the host, else those of the
    /// most specific wildcard covering it (`*.ns.svc.cluster.local` before
    /// `*.svc.cluster.local`, `*` last).
    fn most_specific(&self, host: &str) -> Option<&[Group]> {
        if let Some(groups) = self.0.get(host) {
            return Some(groups);
        }
        (host.match_indices('.'))
            .find_map(|(dot, _)| self.0.get(&host[dot..]))
            .or_else(|| self.0.get("*"))
            .map(|groups| &groups[..])
    }
}

/// What rules merge on, besides namespace and host.
type MergeKey = (ExportTo, Option<BTreeMap<String, String>>);

/// Rules of one namespace and kind by host, then by what they merge on, in istiod's order
/// (ordered maps for hosts, so that ids follow the configuration, not hashing).
type Groups = BTreeMap<Arc<str>, Vec<(MergeKey, Vec<usize>)>>;

fn add(groups: &mut Groups, host: &Arc<str>, key: &MergeKey, rule: usize) {
    let host = groups.entry(host.clone()).or_default();
    match host.iter_mut().find(|(k, _)| k == key) {
        Some((_, members)) => members.push(rule),
        None => host.push((key.clone(), vec![rule])),
    }
}

impl DestinationRules {
    /// Indexes `written`, which is in istiod's order (see the module documentation), merging
    /// rules of one namespace for the same host; `lower` lowers a merged rule (a rule that
    /// needs no merging keeps its policy). Returns the merges' warnings too.
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
            let private = export_to.private_to(rule.namespace);
            let own = export_to.visible_in_own(rule.namespace);
            let selector = (rule.spec.workload_selector.as_ref()).map(|s| s.match_labels.clone());
            let key = (export_to, selector);
            let host: Arc<str> = self::key(&rule.policy.host).into();
            if own {
                add(
                    local.entry(rule.namespace.into()).or_default(),
                    &host,
                    &key,
                    i,
                );
            }
            if !private {
                add(
                    exported.entry(rule.namespace.into()).or_default(),
                    &host,
                    &key,
                    i,
                );
            } else if rule.namespace == root {
                add(&mut root_local, &host, &key, i);
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
        if let Some(groups) = own.and_then(|hosts| hosts.most_specific(host)) {
            let group = groups.iter().rfind(|g| g.selector.is_none());
            return group.map(|g| g.rule);
        }
        [service_namespace, &*self.root].into_iter().find_map(|ns| {
            let groups = self.exported.get(ns)?.most_specific(host)?;
            let group = groups
                .iter()
                .rfind(|g| g.export_to.includes(proxy_namespace));
            group.map(|g| g.rule)
        })
    }

    /// Every rule some waypoint may apply to the service `host` of namespace
    /// `service_namespace`, in id order: those without a selector for the most specific host
    /// among each namespace's own, and among those exported from the service's namespace and
    /// from the root namespace.
    pub(crate) fn candidates(&self, service_namespace: &str, host: &str) -> Vec<DestinationRuleId> {
        let own = (self.local.iter())
            .filter(|&(ns, _)| *ns != self.root)
            .map(|(_, hosts)| hosts)
            .chain([&self.root_local]);
        let exported = [service_namespace, &*self.root]
            .into_iter()
            .filter_map(|ns| self.exported.get(ns));
        let mut ids: Vec<DestinationRuleId> = (own.chain(exported))
            .filter_map(|hosts| hosts.most_specific(host))
            .flat_map(|groups| groups.iter().filter(|g| g.selector.is_none()))
            .map(|g| g.rule)
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
        for (host, keyed) in groups {
            let merged: Box<[Group]> = (keyed.into_iter())
                .filter_map(|((export_to, selector), members)| {
                    Some(Group {
                        rule: self.rule(members)?,
                        export_to,
                        selector,
                    })
                })
                .collect();
            hosts.insert(host, merged);
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
