//! Which routes a waypoint applies to a service port, by the waypoint's namespace.
//!
//! istiod gives a waypoint the routes of the service's namespace and of the waypoint's own,
//! visible to the waypoint's namespace (`getVirtualServiceForWaypoint` over the routes its
//! namespace sees): a route in a third namespace never applies, a VirtualService applies only
//! where its `exportTo` reaches, and an HTTPRoute in another namespace than its Service's (a
//! consumer route) only at waypoints of its own namespace. The routes a waypoint sees are tried
//! in istiod's order for its namespace: those private to it first, so that a consumer's own
//! route wins at its waypoint, then those exported to it by name, then the public ones. So a
//! table is built for each namespace that sees something different: the service's, each
//! route's own, each named in an `exportTo`, and one for every other namespace.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::route::{Attachment, Precedence, RouteTable};

/// The route tables of one service port, by the namespace of the waypoint looking.
#[derive(Debug)]
pub(crate) struct RouteTables {
    /// Namespaces whose waypoints see another table than `elsewhere`.
    named: Box<[(Arc<str>, Seen)]>,
    /// What a waypoint in any other namespace sees.
    elsewhere: Seen,
}

/// The table a waypoint sees; `None`: no route, the default route applies.
type Seen = Option<Arc<RouteTable>>;

impl RouteTables {
    /// The table a waypoint in `proxy_namespace` applies; `None`: the default route.
    pub(crate) fn get(&self, proxy_namespace: &str) -> Option<&RouteTable> {
        match self.named.iter().find(|(ns, _)| **ns == *proxy_namespace) {
            Some((_, table)) => table.as_deref(),
            None => self.elsewhere.as_deref(),
        }
    }

    /// Builds the tables of each of `ports` of a service in `service_namespace` from the
    /// attachments naming the service: HTTPRoutes (`gateway_api`, route by route, oldest
    /// first) and VirtualServices (`istio`). A port an HTTPRoute a waypoint sees routes is the
    /// HTTPRoutes' alone at that waypoint. Ports without a route any waypoint sees are left
    /// out.
    pub(super) fn build(
        service_namespace: &str,
        ports: impl IntoIterator<Item = u16>,
        mut gateway_api: Vec<Attachment>,
        mut istio: Vec<Attachment>,
    ) -> Vec<(u16, Self)> {
        // What each namespace sees at each port, as (kind, [(tier, attachment)]) keys into
        // `distinct`, in the order tried, so that namespaces and ports seeing the same routes
        // in the same order share one table.
        let mut distinct: Vec<(usize, Vec<(u8, usize)>)> = Vec::new();
        let mut plans = Vec::new();
        for port in ports {
            let kinds = [&gateway_api, &istio];
            let on_port = |a: &Attachment| a.port.is_none_or(|p| p == port);
            // Every namespace that may see something of its own; `None` stands for the others.
            let mut namespaces: BTreeSet<&str> = BTreeSet::from([service_namespace]);
            for a in kinds.iter().flat_map(|k| k.iter()).filter(|a| on_port(a)) {
                namespaces.insert(&a.namespace);
                let named = a.export_to.iter().filter(|e| !matches!(&***e, "." | "*"));
                namespaces.extend(named.map(|e| &**e));
            }
            let mut table_for = |proxy: Option<&str>| -> Option<usize> {
                let key = kinds.iter().enumerate().find_map(|(k, kind)| {
                    let mut seen: Vec<(u8, usize)> = (kind.iter().enumerate())
                        .filter(|(_, a)| on_port(a) && sees(proxy, service_namespace, a))
                        .map(|(i, a)| (class(proxy, service_namespace, k == 0, a), i))
                        .collect();
                    seen.sort_unstable();
                    canonical_tiers(&mut seen, k == 0);
                    (!seen.is_empty()).then_some((k, seen))
                })?;
                Some(match distinct.iter().position(|d| *d == key) {
                    Some(t) => t,
                    None => {
                        distinct.push(key);
                        distinct.len() - 1
                    }
                })
            };
            let elsewhere = table_for(None);
            let named: Vec<(Arc<str>, Option<usize>)> = (namespaces.into_iter())
                .map(|ns| (ns, table_for(Some(ns))))
                .filter(|(_, table)| *table != elsewhere)
                .map(|(ns, table)| (Arc::from(ns), table))
                .collect();
            if elsewhere.is_some() || named.iter().any(|(_, t)| t.is_some()) {
                plans.push((port, named, elsewhere));
            }
        }
        // Each table takes its rules; an attachment's last table takes them without a copy
        // (most routes name one port and are seen alike everywhere), as a reload lowers every
        // route.
        let mut uses = [vec![0usize; gateway_api.len()], vec![0usize; istio.len()]];
        for (k, seen) in &distinct {
            for &(_, i) in seen {
                uses[*k][i] += 1;
            }
        }
        let tables: Vec<Arc<RouteTable>> = (distinct.iter())
            .map(|(k, seen)| {
                let (kind, precedence) = match k {
                    0 => (&mut gateway_api, Precedence::GatewayApi),
                    _ => (&mut istio, Precedence::FirstMatch),
                };
                let (mut rules, mut tiers) = (Vec::new(), Vec::new());
                for &(class, i) in seen {
                    uses[*k][i] -= 1;
                    let taken = kind[i].rules.len();
                    if uses[*k][i] == 0 {
                        rules.append(&mut kind[i].rules);
                    } else {
                        rules.extend(kind[i].rules.iter().cloned());
                    }
                    tiers.extend(std::iter::repeat_n(class, taken));
                }
                Arc::new(RouteTable::in_tiers(rules, &tiers, precedence))
            })
            .collect();
        let table = |t: Option<usize>| t.map(|t| tables[t].clone());
        (plans.into_iter())
            .map(|(port, named, elsewhere)| {
                let named = (named.into_iter()).map(|(ns, t)| (ns, table(t))).collect();
                let elsewhere = table(elsewhere);
                (port, Self { named, elsewhere })
            })
            .collect()
    }
}

/// Renumbers the classes of `seen` (sorted) as consecutive tiers from 0, or, for VirtualServices,
/// whose rules are simply tried in the order given, drops them: the key then says only what is
/// tried in which order.
fn canonical_tiers(seen: &mut [(u8, usize)], tiered: bool) {
    let mut previous = None;
    let mut tier = 0;
    for (class, _) in seen.iter_mut() {
        if previous.is_some_and(|p| p != *class) {
            tier += 1;
        }
        previous = Some(*class);
        *class = if tiered { tier } else { 0 };
    }
}

/// Where `route` stands among the routes a waypoint in `proxy` applies, as istiod orders the
/// routes its namespace sees: those private to it first (a VirtualService kept to it, or an
/// HTTPRoute of it for another namespace's service, which istiod keeps to it), then those
/// exported to it by name, then those exported everywhere.
fn class(proxy: Option<&str>, service_namespace: &str, http_route: bool, route: &Attachment) -> u8 {
    let own = proxy == Some(&*route.namespace);
    let private = (route.export_to.iter()).any(|e| **e == *"." || *e == route.namespace);
    if own && (private || (http_route && *route.namespace != *service_namespace)) {
        0
    } else if (route.export_to.iter()).any(|e| proxy == Some(&**e)) {
        1
    } else {
        2
    }
}

/// Whether a waypoint in `proxy` (`None`: a namespace no route names) applies `route` to a
/// service of `service_namespace`.
fn sees(proxy: Option<&str>, service_namespace: &str, route: &Attachment) -> bool {
    let own = proxy == Some(&*route.namespace);
    if !own && *route.namespace != *service_namespace {
        return false;
    }
    let export_to = &route.export_to;
    export_to.is_empty()
        || export_to.iter().any(|e| match &**e {
            "*" => true,
            "." => own,
            name => proxy == Some(name),
        })
}
