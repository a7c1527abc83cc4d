//! Where a service's endpoints stand from this waypoint's own instance: which endpoints a
//! request tries first (nearest first, as istiod's locality priorities order them for Envoy),
//! or, under `localityLbSetting.distribute`, which locality takes which share of the traffic
//! (Envoy's locality-weighted balancing over the weights istiod computes).

use mesh::Snapshot;
use mesh::model::locality::Mode;
use mesh::model::{Endpoint, LoadBalancing, Locality, Service, Workload};
use mesh::route::{LocalityLb, LocalityPreference, LocalityShares};
use rand::Rng;

/// Localities a service's shares tell apart; endpoints of any further locality share the last
/// one's draw (a bit per locality marks it drawn).
const MAX_LOCALITIES: usize = 64;

/// How a service's endpoints stand, measured once per snapshot.
#[derive(Debug)]
pub(super) struct Nearness {
    /// By endpoint position in the service: its rank (higher is nearer), or with `shares` its
    /// locality's index; `None` when the preference rules it out.
    ranks: Box<[Option<usize>]>,
    /// The highest rank any endpoint has; `None` when none is eligible.
    best: Option<usize>,
    /// With `distribute`: each locality's weight, by index.
    shares: Option<Box<[u32]>>,
}

impl Nearness {
    /// For `service` as `me` sees it, under its DestinationRule's `locality` setting (`None`:
    /// no rule); `None` when every endpoint is alike.
    pub(super) fn measure(
        snapshot: &Snapshot,
        service: &Service,
        rule: Option<&LocalityLb>,
        me: &Workload,
    ) -> Option<Self> {
        let workload = |e: &Endpoint| snapshot.workload(e.workload);
        let near = (service.load_balancing.as_ref()).filter(|lb| lb.prefers_near());
        let preference = match (near, rule) {
            // Keeping traffic on the node is a filter istiod applies whatever the rule says
            // (with `distribute`, istiod then weighs the node's endpoints; here they are alike).
            (Some(lb), _) if lb.mode == Mode::Strict => Preference::Service(lb),
            // A rule's own setting wins over the service's traffic distribution, even `off`.
            (_, Some(LocalityLb::Set(p))) => Preference::Rule(p.as_ref()?),
            (_, Some(LocalityLb::Distribute(shares))) => {
                let endpoints: Vec<_> = service.endpoints.iter().map(workload).collect();
                return Self::shared(shares, &endpoints, me);
            }
            (Some(lb), _) => Preference::Service(lb),
            (None, Some(LocalityLb::Unset(p))) => Preference::Rule(p.as_ref()?),
            (None, None) => return None,
        };
        let mut ranks: Box<[Option<usize>]> = (service.endpoints.iter())
            .map(|e| preference.rank(me, workload(e)))
            .collect();
        // Consecutive from 0, as istiod renumbers priorities, so that falling back from one
        // rank to the next never walks ranks no endpoint has.
        let mut present: Vec<usize> = ranks.iter().flatten().copied().collect();
        present.sort_unstable();
        present.dedup();
        for rank in ranks.iter_mut().flatten() {
            *rank = present.binary_search(rank).unwrap_or_default();
        }
        let best = present.len().checked_sub(1);
        Some(Self {
            ranks,
            best,
            shares: None,
        })
    }

    /// `distribute` for `endpoints` (in service order): the first entry whose `from` matches
    /// `me` applies, and each endpoint locality the `to` pattern matching it claims takes the
    /// pattern's percentage in proportion to its endpoints' weights, rounded up, as istiod's
    /// `applyLocalityWeights` computes it; localities no pattern matches take nothing. No entry
    /// for `me`: every endpoint alike. The split is the service's: istiod splits a wildcard's
    /// percentage per subset, by the subset's endpoints.
    fn shared(entries: &[LocalityShares], endpoints: &[&Workload], me: &Workload) -> Option<Self> {
        let entry = entries.iter().find(|e| e.from.matches(&me.locality))?;
        // Each locality: its pattern and its endpoints' weight.
        let mut localities: Vec<(&Locality, usize, u64)> = Vec::new();
        let ranks: Box<[Option<usize>]> = (endpoints.iter())
            .map(|w| {
                let pattern = entry.to.iter().position(|(p, _)| p.matches(&w.locality))?;
                let i = match localities.iter().position(|(l, ..)| **l == w.locality) {
                    Some(i) => i,
                    None => {
                        localities.push((&w.locality, pattern, 0));
                        localities.len() - 1
                    }
                };
                localities[i].2 += u64::from(w.weight.max(1));
                Some(i.min(MAX_LOCALITIES - 1))
            })
            .collect();
        let pattern_weight = |pattern: usize| -> u64 {
            (localities.iter())
                .filter(|(_, p, _)| *p == pattern)
                .map(|(.., w)| w)
                .sum()
        };
        let mut shares = vec![0u32; localities.len().min(MAX_LOCALITIES)];
        for (i, &(_, pattern, weight)) in localities.iter().enumerate() {
            let percent = entry.to[pattern].1;
            // At most `percent` (at most 100): a locality's weight is part of its pattern's.
            let share = (weight * u64::from(percent)).div_ceil(pattern_weight(pattern));
            shares[i.min(MAX_LOCALITIES - 1)] += u32::try_from(share).unwrap_or(percent);
        }
        Some(Self {
            best: ranks.iter().flatten().max().copied(),
            ranks,
            shares: Some(shares.into()),
        })
    }

    /// The rank of the endpoint at `position` in its service.
    pub(super) fn rank(&self, position: usize) -> Option<usize> {
        self.ranks.get(position).copied().flatten()
    }
}

/// Which order of a service's endpoints by nearness applies at this waypoint, as istiod's
/// `GetLocalityLbSetting` chooses it.
enum Preference<'a> {
    /// The service's (`trafficDistribution`, or `internalTrafficPolicy: Local`).
    Service(&'a LoadBalancing),
    /// The DestinationRule's `localityLbSetting`, or Istio's default.
    Rule(&'a LocalityPreference),
}

impl Preference<'_> {
    /// Higher is nearer; `None` rules the endpoint out.
    fn rank(&self, me: &Workload, endpoint: &Workload) -> Option<usize> {
        match self {
            Self::Service(lb) => lb.rank(me, endpoint),
            Self::Rule(p) => Some(p.rank(me, endpoint)),
        }
    }
}

/// The ranks one pass of a choice tries, in turn: `None` admits every endpoint.
#[derive(Clone)]
pub(super) enum Tiers<'a> {
    /// Every endpoint alike: one pass.
    All { done: bool },
    /// Nearest first, down to rank 0.
    Nearest { next: Option<usize> },
    /// Localities drawn by their shares, each once, as Envoy picks a locality by weight among
    /// those with endpoints it can use.
    Shares { shares: &'a [u32], drawn: u64 },
}

/// Draws by a request's consistent-hash key, so that a key keeps its locality as long as the
/// localities it could draw keep theirs (Envoy's hash rings weigh hosts by their locality's
/// share, which keeps a key on its host the same way).
const KEYED_DRAW: u64 = 0x5bd1_e995_9e37_79b9;

impl<'a> Tiers<'a> {
    /// `None`: the preference leaves no endpoint.
    pub(super) fn of(nearness: Option<&'a Nearness>) -> Option<Self> {
        Some(match nearness {
            None => Self::All { done: false },
            Some(n) => {
                let best = n.best?;
                match &n.shares {
                    Some(shares) => Self::Shares { shares, drawn: 0 },
                    None => Self::Nearest { next: Some(best) },
                }
            }
        })
    }

    /// The next rank to try; `hash` is the request's consistent-hash key, if it has one.
    pub(super) fn next(&mut self, rng: &mut impl Rng, hash: Option<u64>) -> Option<Option<usize>> {
        match self {
            Self::All { done } => (!std::mem::replace(done, true)).then_some(None),
            Self::Nearest { next } => {
                let rank = (*next)?;
                *next = rank.checked_sub(1);
                Some(Some(rank))
            }
            Self::Shares { shares, drawn } => {
                let left = |i: usize| *drawn & (1 << i) == 0;
                let weights = (shares.iter().enumerate()).filter(|&(i, _)| left(i));
                let total: u64 = weights.clone().map(|(_, w)| u64::from(*w)).sum();
                if total == 0 {
                    return None;
                }
                let mut point = match hash {
                    Some(key) => super::mix(key ^ KEYED_DRAW ^ *drawn) % total,
                    None => rng.random_range(0..total),
                };
                for (i, w) in weights {
                    let w = u64::from(*w);
                    if point < w {
                        *drawn |= 1 << i;
                        return Some(Some(i));
                    }
                    point -= w;
                }
                None
            }
        }
    }
}
