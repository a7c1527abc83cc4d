//! Endpoint choice: which endpoint of a service (or subset) port takes a request, per the
//! DestinationRule's `loadBalancer`, and outlier detection, which sets failing endpoints aside.
//!
//! A [`Balancer`] is built with each snapshot and kept beside it. Per-endpoint state (active
//! requests, consecutive failures, ejections) lives in an `Arc<EndpointState>` per workload that
//! the next balancer takes over by workload uid, so a configuration change forgets neither an
//! ejection nor the requests in flight.
//!
//! `choose` and `report` run on every request: they allocate nothing and take no lock (only
//! deciding an ejection does). Random, least-request and round-robin choices are O(1) unless
//! most endpoints are filtered out; consistent hashing walks the endpoints once. Ejection
//! deadlines are only read while some ejection may still run (one atomic load tells).
//!
//! Where this departs from Envoy, deliberately:
//! - State is per workload, not per (cluster, host): an endpoint ejected while serving one
//!   service is ejected for every service with outlier detection that it backs, and the ejection
//!   cap is checked against every service it backs.
//! - Consistent hashing is rendezvous hashing (highest random weight), which keeps a key on its
//!   endpoint while the set is stable and moves only ~1/N of the keys when it changes, like a
//!   ring or Maglev table, without building one; `minimumRingSize` and `tableSize` are unused.
//! - `PASSTHROUGH` (the original destination) is `LEAST_REQUEST`: traffic reaching the waypoint
//!   is addressed to a service, so there is no original endpoint to pass through to.
//! - A ServiceEntry resolved `NONE` never comes here: its traffic goes to the address the caller
//!   dialled ([`crate::state::Hop::to_service`]), as Istio's waypoint sends it, whatever
//!   endpoints it selects; a mirror to one, of another service's request, is not sent.
//! - Workload weights count for `RANDOM` and for the two draws of `LEAST_REQUEST`; round robin
//!   and consistent hashing ignore them.
//! - Un-ejection happens lazily, when the ejection time is over, not at the next interval tick.
//! - A service that prefers near endpoints is served by its nearest admitted endpoints,
//!   measured from this waypoint's own instance, as istiod's locality failover priorities do for
//!   Envoy. The preference is chosen as istiod's `GetLocalityLbSetting` chooses it:
//!   `internalTrafficPolicy: Local` always; else the DestinationRule's own `localityLbSetting`
//!   when it sets one (even `enabled: false`, which turns the service's preference off too);
//!   else the service's `trafficDistribution`; else, with outlier detection, Istio's default of
//!   region, zone and subzone. A service's preference ranks endpoints as ztunnel does (how many
//!   leading scopes they share); a rule's as istiod does ([`LocalityPreference::rank`]:
//!   `failoverPriority` topology labels, region, zone and subzone, and `failover`'s next
//!   region). Farther ones take traffic only when every nearer one is ejected (or lacks the
//!   port), not in proportion to the nearer ones' health; a retry stays at the nearest rank,
//!   taking a tried endpoint again before a farther one, as Envoy's retry predicate does.
//!   With `localityLbSetting.distribute` each locality takes its share instead, drawn per
//!   request by weight among the localities with an endpoint to take, from the consistent-hash
//!   key when there is one (Envoy schedules them by weight and scales a locality's weight down
//!   as its endpoints are ejected; here a locality counts whole until its last endpoint is
//!   ejected). The preference is the service's
//!   DestinationRule's, not a subset's or a port's.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hasher};
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use std::fmt::Write as _;

use ::http::header::COOKIE;
use ::http::{HeaderMap, HeaderValue};
use mesh::Snapshot;
use mesh::model::{DestinationRuleId, ServiceId, SubsetEndpoints, WorkloadId};
use mesh::route::{HashKey, LoadBalancer, OutlierDetection, TrafficPolicy};
use rand::Rng;

use self::nearness::{Nearness, Tiers};

/// Envoy's default `max_ejection_time`, which Istio does not set: no ejection lasts longer
/// (unless the base ejection time itself is longer).
const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// Envoy's default `consecutive_local_origin_failure`.
const DEFAULT_LOCAL_ORIGIN_FAILURES: u32 = 5;

/// Random draws tried before scanning the endpoint list: enough that a scan only happens when
/// most endpoints are excluded or ejected, or weights are very uneven.
const DRAWS: usize = 4;

/// Load-balancing and outlier state for one snapshot, built when the snapshot changes.
///
/// Use it only with the snapshot it was built for: endpoints are found by position.
#[derive(Debug)]
pub(crate) struct Balancer {
    shared: Arc<Shared>,
    /// By [`WorkloadId::index`].
    workloads: Box<[Slot]>,
    /// By [`ServiceId::index`].
    services: Box<[ServiceSlot]>,
    /// Round-robin positions: per service, one for all its endpoints, then one per subset.
    turns: Box<[AtomicUsize]>,
    /// The endpoints of every service, end to end (for the ejection cap).
    members: Box<[WorkloadId]>,
    /// The services of every workload, end to end (for the ejection cap).
    memberships: Box<[ServiceId]>,
    /// By [`ServiceId::index`]: how near each endpoint is to this waypoint's own instance, for
    /// the services that prefer near endpoints (none: every endpoint is as near).
    nearness: Box<[Option<Nearness>]>,
}

/// What all balancers of one waypoint share, from the first snapshot on.
#[derive(Debug)]
struct Shared {
    /// Ejection deadlines are nanoseconds since this instant.
    base: Instant,
    /// Held while deciding an ejection, so that two endpoints failing at once cannot both pass
    /// the ejection cap; never taken by `choose`.
    ejecting: Mutex<()>,
    /// The latest ejection deadline ever set: once past it, no endpoint is ejected and `choose`
    /// does not look.
    latest_deadline: AtomicU64,
}

/// One workload, by position in the snapshot.
#[derive(Debug)]
struct Slot {
    uid: Arc<str>,
    /// Hash of the uid: the endpoint's side of the rendezvous score.
    key: u64,
    /// Load-balancing weight, at least 1.
    weight: u32,
    /// Its services, in `Balancer::memberships`.
    services: Span,
    /// Whether it has an address to dial, or a name to resolve to one (a `resolution: DNS`
    /// ServiceEntry's endpoint): a workload with neither is never chosen.
    addressed: bool,
    state: Arc<EndpointState>,
}

/// One service, by position in the snapshot.
#[derive(Debug)]
struct ServiceSlot {
    /// Its first round-robin position in `Balancer::turns`.
    turns: usize,
    /// Its endpoints, in `Balancer::members`.
    members: Span,
    /// The largest weight among its endpoints (1 when all are equal).
    max_weight: u32,
}

/// A range of one of the concatenated lists.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

/// What is known about one endpoint; outlives snapshots (shared by workload uid).
#[derive(Debug, Default)]
struct EndpointState {
    /// Requests in flight (held by [`Chosen`]).
    active: AtomicU32,
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local_origin: AtomicU32,
    /// The ejection-time multiplier: ejections in a row, less the intervals spent in service.
    ejections: AtomicU32,
    /// End of the last ejection, in nanoseconds since `Shared::base`; 0 = never ejected.
    ejected_until: AtomicU64,
}

/// An endpoint choice; holds the endpoint's active-request count up while alive (LEAST_REQUEST).
#[derive(Debug)]
pub(crate) struct Chosen {
    /// The endpoint.
    pub(crate) workload: WorkloadId,
    /// Its port for the service port the request came to.
    pub(crate) target_port: u16,
    _active: Active,
}

/// One request in flight to an endpoint, counted until dropped.
#[derive(Debug)]
struct Active(Arc<EndpointState>);

impl Active {
    fn new(state: &Arc<EndpointState>) -> Self {
        state.active.fetch_add(1, Relaxed);
        Self(Arc::clone(state))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Relaxed);
    }
}

/// How a request to an endpoint ended, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// A response below 500.
    Success,
    /// Status >= 500 from the upstream.
    ServerError(u16),
    /// Could not connect, reset, or timed out.
    LocalOriginFailure,
}

// === impl Balancer ===

impl Balancer {
    /// State for `snapshot`; endpoint state (active requests, consecutive failures, ejections)
    /// carries over from `previous` by workload uid, so a config reload does not forget an
    /// ejection.
    pub(crate) fn new(snapshot: &Snapshot, previous: Option<&Balancer>) -> Balancer {
        let shared = previous.map_or_else(|| Arc::new(Shared::new()), |p| Arc::clone(&p.shared));
        let carried: HashMap<&str, &Arc<EndpointState>> = previous
            .map(|p| p.workloads.iter().map(|s| (&*s.uid, &s.state)).collect())
            .unwrap_or_default();
        let mut memberships = Vec::new();
        let workloads = (snapshot.workloads().iter())
            .map(|w| Slot {
                uid: Arc::clone(&w.uid),
                key: hash_bytes(w.uid.as_bytes()),
                weight: w.weight.max(1),
                services: span(&mut memberships, w.services.iter().copied()),
                addressed: !w.ips.is_empty() || w.hostname.is_some(),
                state: carried
                    .get(&*w.uid)
                    .map_or_else(Arc::default, |s| Arc::clone(s)),
            })
            .collect();
        let mut members = Vec::new();
        let mut turns = 0;
        let services = (snapshot.services().iter())
            .map(|s| {
                let slot = ServiceSlot {
                    turns,
                    members: span(&mut members, s.endpoints.iter().map(|e| e.workload)),
                    max_weight: (s.endpoints.iter())
                        .map(|e| snapshot.workload(e.workload).weight.max(1))
                        .max()
                        .unwrap_or(1),
                };
                turns += 1 + s.subsets.len();
                slot
            })
            .collect();
        // Random starting points, so that waypoint replicas do not all begin with the same
        // endpoint after a configuration change.
        let mut rng = rand::rng();
        let turns = (0..turns)
            .map(|_| AtomicUsize::new(rng.random::<u32>() as usize))
            .collect();
        Balancer {
            shared,
            workloads,
            services,
            turns,
            members: members.into_boxed_slice(),
            memberships: memberships.into_boxed_slice(),
            nearness: Box::default(),
        }
    }

    /// Measures how near `snapshot`'s endpoints are to `instance` (this waypoint's own
    /// workload), for the services that prefer near endpoints; without one, every endpoint is
    /// as near.
    pub(crate) fn measured_from(
        self,
        snapshot: &Snapshot,
        namespace: &str,
        instance: Option<WorkloadId>,
    ) -> Self {
        let Some(me) = instance.and_then(|i| snapshot.workloads().get(i.index())) else {
            return self;
        };
        let nearness = (snapshot.services().iter())
            .map(|s| {
                let rule = snapshot.destination_rule(namespace, s);
                Nearness::measure(snapshot, s, rule.map(|(_, p)| &p.traffic.locality), me)
            })
            .collect();
        Self { nearness, ..self }
    }

    /// Chooses an endpoint of `service` (by id) for the service port at `port_index`, among the
    /// endpoints of `subset` (None = all), skipping endpoints without a target port for that
    /// port, ejected endpoints (unless ejecting would leave none healthy — then use them anyway,
    /// as Envoy's panic threshold does) and those in `exclude` (already tried by this request;
    /// if all remaining are excluded, allow the excluded ones again).
    /// `hash` is the consistent-hash key's hash when the policy is ConsistentHash (computed by
    /// `hash_key`), else ignored. Returns None when there is no endpoint.
    ///
    /// Ejections count only when `policy` has outlier detection; fewer healthy endpoints than
    /// its `min_health_percent` also means using them all.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call per request attempt; a struct would only be built to be taken apart"
    )]
    pub(crate) fn choose(
        &self,
        snapshot: &Snapshot,
        service: ServiceId,
        port_index: usize,
        subset: Option<(DestinationRuleId, &str)>,
        policy: &TrafficPolicy,
        hash: Option<u64>,
        exclude: &[WorkloadId],
        now: Instant,
    ) -> Option<Chosen> {
        let described = snapshot.services().get(service.index())?;
        let endpoints = described.subset_endpoints(subset)?;
        if endpoints.is_empty() {
            return None;
        }
        let slot = self.services.get(service.index());
        let nearness = self.nearness.get(service.index()).and_then(Option::as_ref);
        // A strict preference no endpoint meets leaves none.
        let tiers = Tiers::of(nearness)?;
        let mut pool = Pool {
            balancer: self,
            endpoints,
            port_index,
            exclude,
            healthy_at: None,
            nearness,
            rank: None,
            max_weight: slot.map_or(1, |s| s.max_weight),
        };
        let healthy_at = policy.outlier_detection.as_ref().and_then(|detection| {
            let now = self.nanos(now);
            let any_ejected = now < self.shared.latest_deadline.load(Relaxed);
            // With a minimum share of healthy endpoints, count them; without, a pass finding
            // no healthy endpoint tells, which saves walking the list on every request.
            let enough = |min| min == 0 || pool.healthy_enough(now, min);
            (any_ejected && enough(detection.min_health_percent)).then_some(now)
        });
        // Taken once, so that a second pass (everything excluded) does not skip a turn.
        let turn = match policy.load_balancer {
            LoadBalancer::RoundRobin => slot.and_then(|s| {
                let subset = match subset {
                    None => 0,
                    Some(subset) => 1 + described.subset_position(subset)?,
                };
                let turn = self.turns.get(s.turns + subset)?;
                Some(turn.fetch_add(1, Relaxed))
            }),
            _ => None,
        };
        let mut rng = rand::rng();
        // Relax the filters until an endpoint is admitted, as Envoy's priorities and retry
        // predicate do: a healthy endpoint, the nearest first, and one not tried yet before a
        // tried one of the same rank; ejected endpoints only when none is healthy. Under
        // shares, where Envoy draws the locality again for a retry, an untried endpoint of any
        // locality comes before a tried one. Passes that would repeat the previous one are
        // skipped.
        let tried_last: &[Option<bool>] = match tiers {
            Tiers::Shares { .. } if !exclude.is_empty() => &[Some(true), Some(false)],
            _ => &[None],
        };
        let found = 'found: {
            for skip_ejected in [true, false] {
                if skip_ejected && healthy_at.is_none() {
                    continue;
                }
                pool.healthy_at = healthy_at.filter(|_| skip_ejected);
                for &only in tried_last {
                    let mut tiers = tiers.clone();
                    while let Some(rank) = tiers.next(&mut rng, hash) {
                        pool.rank = rank;
                        for skip_tried in [true, false] {
                            if (skip_tried && exclude.is_empty())
                                || only.is_some_and(|o| o != skip_tried)
                            {
                                continue;
                            }
                            pool.exclude = if skip_tried { exclude } else { &[] };
                            let found = pool.pick(&policy.load_balancer, hash, turn, &mut rng);
                            if found.is_some() {
                                break 'found found;
                            }
                        }
                    }
                }
            }
            None
        };
        let found = found?;
        Some(Chosen {
            workload: found.workload,
            target_port: found.port,
            _active: Active::new(&found.slot.state),
        })
    }

    /// Records the outcome of a request to `workload` for outlier detection (`policy` None =
    /// off).
    pub(crate) fn report(
        &self,
        workload: WorkloadId,
        outcome: Outcome,
        policy: Option<&OutlierDetection>,
        now: Instant,
    ) {
        let (Some(policy), Some(slot)) = (policy, self.workloads.get(workload.index())) else {
            return;
        };
        let state = &*slot.state;
        let split = policy.split_external_local_origin_errors;
        let tripped = match outcome {
            Outcome::Success => {
                reset(&state.consecutive_5xx);
                reset(&state.consecutive_gateway);
                reset(&state.consecutive_local_origin);
                false
            }
            Outcome::ServerError(status) => {
                if split {
                    // A response means connecting worked.
                    reset(&state.consecutive_local_origin);
                }
                state.server_error(status, policy)
            }
            Outcome::LocalOriginFailure if split => count(
                &state.consecutive_local_origin,
                policy
                    .consecutive_local_origin_failures
                    .unwrap_or(DEFAULT_LOCAL_ORIGIN_FAILURES),
            ),
            // Unsplit, Envoy counts a failure to connect as the 503 it answers with.
            Outcome::LocalOriginFailure => state.server_error(503, policy),
        };
        if tripped {
            self.eject(slot, policy, self.nanos(now));
        }
    }

    /// Endpoints currently ejected, as workload uids.
    #[cfg(test)]
    pub(crate) fn ejected(&self, now: Instant) -> Vec<Arc<str>> {
        let now = self.nanos(now);
        (self.workloads.iter())
            .filter(|s| s.state.is_ejected(now))
            .map(|s| Arc::clone(&s.uid))
            .collect()
    }

    /// For `/config_dump`: every endpoint with something to tell (requests in flight, failures
    /// in a row, ejections), by workload uid.
    pub(crate) fn dump(&self, now: Instant) -> serde_json::Value {
        let now = self.nanos(now);
        let endpoints: Vec<serde_json::Value> = (self.workloads.iter())
            .filter_map(|slot| {
                let s = &*slot.state;
                let until = s.ejected_until.load(Relaxed);
                let fields = [
                    s.active.load(Relaxed),
                    s.consecutive_5xx.load(Relaxed),
                    s.consecutive_gateway.load(Relaxed),
                    s.consecutive_local_origin.load(Relaxed),
                    s.ejections.load(Relaxed),
                ];
                (fields.iter().any(|&n| n > 0) || until > now).then(|| {
                    serde_json::json!({
                        "workload": &*slot.uid,
                        "activeRequests": fields[0],
                        "consecutive5xx": fields[1],
                        "consecutiveGatewayErrors": fields[2],
                        "consecutiveLocalOriginFailures": fields[3],
                        "ejections": fields[4],
                        "ejectedForMs": (until > now).then(|| (until - now) / 1_000_000),
                    })
                })
            })
            .collect();
        serde_json::Value::Array(endpoints)
    }

    /// Ejects the endpoint of `slot` unless it already is or the cap forbids it.
    fn eject(&self, slot: &Slot, policy: &OutlierDetection, now: u64) {
        let _one_at_a_time = (self.shared.ejecting.lock()).unwrap_or_else(PoisonError::into_inner);
        let state = &*slot.state;
        let last = state.ejected_until.load(Relaxed);
        if last > now {
            return;
        }
        if !self.may_eject(slot, policy.max_ejection_percent, now) {
            tracing::debug!(endpoint = %slot.uid, max_ejection_percent = policy.max_ejection_percent, "outlier not ejected: too many endpoints are ejected already");
            return;
        }
        let base = policy.base_ejection_time;
        let longest = base.max(MAX_EJECTION_TIME);
        // The multiplier drops by one per interval spent in service since the last ejection,
        // and stops growing once the ejection time reaches its maximum (Envoy's backoff).
        let in_service = match last {
            0 => 0,
            last => (now - last) / nanos(policy.interval).max(1),
        };
        let limit = (longest.as_nanos() / base.as_nanos().max(1)).max(1);
        let times = (state.ejections.load(Relaxed))
            .saturating_sub(u32::try_from(in_service).unwrap_or(u32::MAX))
            .saturating_add(1)
            .min(u32::try_from(limit).unwrap_or(u32::MAX));
        state.ejections.store(times, Relaxed);
        let time = base.saturating_mul(times).min(longest);
        let until = now.saturating_add(nanos(time));
        state.ejected_until.store(until, Relaxed);
        self.shared.latest_deadline.fetch_max(until, Relaxed);
        tracing::info!(endpoint = %slot.uid, ?time, "outlier ejected");
    }

    /// Whether one more ejection keeps every service of `slot` within `max_percent` ejected.
    /// As Envoy, this compares the share ejected before this one, so the first ejection is
    /// always allowed and the cap may be exceeded by one endpoint.
    fn may_eject(&self, slot: &Slot, max_percent: u32, now: u64) -> bool {
        let max_percent = max_percent.min(100) as usize;
        let services = self.memberships.get(slot.services.range()).unwrap_or(&[]);
        services.iter().all(|service| {
            let members = (self.services.get(service.index()))
                .and_then(|s| self.members.get(s.members.range()))
                .unwrap_or(&[]);
            let ejected = (members.iter())
                .filter(|w| {
                    (self.workloads.get(w.index())).is_some_and(|s| s.state.is_ejected(now))
                })
                .count();
            ejected == 0 || ejected * 100 < max_percent * members.len()
        })
    }

    /// `t` in nanoseconds since the shared base.
    fn nanos(&self, t: Instant) -> u64 {
        nanos(t.saturating_duration_since(self.shared.base))
    }
}

impl Shared {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            // An hour back when the clock allows, so that instants taken just before the first
            // balancer (as tests do) still compare exactly.
            base: now.checked_sub(Duration::from_secs(3600)).unwrap_or(now),
            ejecting: Mutex::new(()),
            latest_deadline: AtomicU64::new(0),
        }
    }
}

impl Span {
    fn range(self) -> std::ops::Range<usize> {
        self.start..self.end
    }
}

/// Appends `items` to `list` and returns where they are.
fn span<T>(list: &mut Vec<T>, items: impl IntoIterator<Item = T>) -> Span {
    let start = list.len();
    list.extend(items);
    Span {
        start,
        end: list.len(),
    }
}

// === impl EndpointState ===

impl EndpointState {
    fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Relaxed) > now
    }

    /// Counts a response with `status` (>= 500); true when it calls for an ejection.
    fn server_error(&self, status: u16, policy: &OutlierDetection) -> bool {
        let gateway = match policy.consecutive_gateway_errors {
            Some(limit) if matches!(status, 502..=504) => count(&self.consecutive_gateway, limit),
            Some(_) => {
                reset(&self.consecutive_gateway);
                false
            }
            None => false,
        };
        let any = count(&self.consecutive_5xx, policy.consecutive_5xx_errors);
        gateway | any
    }
}

/// Counts one more failure; true when the count reaches `limit` (0 = never), which also
/// restarts it, so that the next ejection takes `limit` failures again (as in Envoy).
fn count(counter: &AtomicU32, limit: u32) -> bool {
    if limit == 0 {
        return false;
    }
    if counter.fetch_add(1, Relaxed).saturating_add(1) >= limit {
        counter.store(0, Relaxed);
        return true;
    }
    false
}

/// Zeroes a counter, without writing (and so without taking the cache line from other cores)
/// when it is zero already, as it is for a healthy endpoint.
fn reset(counter: &AtomicU32) {
    if counter.load(Relaxed) != 0 {
        counter.store(0, Relaxed);
    }
}

// === impl Pool ===

/// The endpoints one `choose` may take, and the filters on them.
#[derive(Debug)]
struct Pool<'a> {
    balancer: &'a Balancer,
    endpoints: SubsetEndpoints<'a>,
    port_index: usize,
    exclude: &'a [WorkloadId],
    /// Skip endpoints ejected at this time; `None` when nothing is ejected, outlier detection is
    /// off, or too few are healthy (Envoy's panic mode).
    healthy_at: Option<u64>,
    /// How near the service's endpoints are, when it prefers near ones.
    nearness: Option<&'a Nearness>,
    /// Admit only endpoints of this rank (with `nearness`).
    rank: Option<usize>,
    max_weight: u32,
}

/// An endpoint `Pool` admits.
#[derive(Debug, Clone, Copy)]
struct Candidate<'a> {
    workload: WorkloadId,
    port: u16,
    slot: &'a Slot,
}

impl<'a> Pool<'a> {
    /// An admitted endpoint, as `balancer` says.
    fn pick(
        &self,
        balancer: &LoadBalancer,
        hash: Option<u64>,
        turn: Option<usize>,
        rng: &mut impl Rng,
    ) -> Option<Candidate<'a>> {
        match (balancer, hash, turn) {
            (LoadBalancer::RoundRobin, _, Some(turn)) => self.round_robin(turn),
            (LoadBalancer::LeastRequest | LoadBalancer::Passthrough, _, _) => {
                self.least_request(rng)
            }
            (LoadBalancer::ConsistentHash(_), Some(hash), _) => self.rendezvous(hash),
            // Also a request without the hash key, as Envoy does; and round robin without a
            // position, which only a balancer used with the wrong snapshot lacks.
            (
                LoadBalancer::Random | LoadBalancer::ConsistentHash(_) | LoadBalancer::RoundRobin,
                _,
                _,
            ) => self.random(rng),
        }
    }

    /// The `i`th endpoint, if the filters admit it.
    fn admits(&self, i: usize) -> Option<Candidate<'a>> {
        let endpoint = self.endpoints.get(i)?;
        let port = endpoint.target_port(self.port_index)?;
        if self.exclude.contains(&endpoint.workload) {
            return None;
        }
        let slot = self.balancer.workloads.get(endpoint.workload.index())?;
        if !slot.addressed {
            return None;
        }
        if self
            .healthy_at
            .is_some_and(|now| slot.state.is_ejected(now))
        {
            return None;
        }
        if let (Some(rank), Some(nearness)) = (self.rank, self.nearness) {
            let position = self.endpoints.position(i)?;
            if nearness.rank(position) != Some(rank) {
                return None;
            }
        }
        Some(Candidate {
            workload: endpoint.workload,
            port,
            slot,
        })
    }

    fn admitted(&self) -> impl Iterator<Item = Candidate<'a>> + '_ {
        (0..self.endpoints.len()).filter_map(|i| self.admits(i))
    }

    /// Whether enough endpoints with the port are not ejected to skip the ejected ones: at
    /// least one, and at least `min_health_percent` of them.
    fn healthy_enough(&self, now: u64, min_health_percent: u32) -> bool {
        let (mut total, mut healthy) = (0usize, 0usize);
        for endpoint in self.endpoints.iter() {
            if endpoint.target_port(self.port_index).is_none() {
                continue;
            }
            total += 1;
            let workloads = &self.balancer.workloads;
            if (workloads.get(endpoint.workload.index())).is_some_and(|s| !s.state.is_ejected(now))
            {
                healthy += 1;
            }
        }
        healthy > 0 && healthy * 100 >= total * min_health_percent.min(100) as usize
    }

    /// The first admitted endpoint from position `turn` on; among the endpoints of one rank,
    /// the `turn`th of them, so that a rank's members take turns evenly however the others lie
    /// between them (a pass over the endpoints, as only a service preferring near ones pays).
    fn round_robin(&self, turn: usize) -> Option<Candidate<'a>> {
        let n = self.endpoints.len();
        if self.rank.is_some() {
            let admitted = self.admitted().count();
            return (admitted > 0)
                .then(|| self.admitted().nth(turn % admitted))
                .flatten();
        }
        let start = turn % n;
        (0..n).find_map(|k| self.admits((start + k) % n))
    }

    /// A random admitted endpoint, in proportion to weights.
    fn random(&self, rng: &mut impl Rng) -> Option<Candidate<'a>> {
        let n = self.endpoints.len();
        // Draw, and keep a draw with probability weight / max weight: exact in proportion to
        // weight, and O(1) while most endpoints are admitted.
        for _ in 0..DRAWS {
            if let Some(c) = self.admits(rng.random_range(0..n))
                && (self.max_weight <= 1 || rng.random_range(0..self.max_weight) < c.slot.weight)
            {
                return Some(c);
            }
        }
        // Weighted reservoir sampling over the admitted: one pass, so an ejection landing
        // meanwhile cannot make it miss.
        let mut total = 0u64;
        let mut chosen = None;
        for c in self.admitted() {
            let weight = u64::from(c.slot.weight);
            total += weight;
            if rng.random_range(0..total) < weight {
                chosen = Some(c);
            }
        }
        chosen
    }

    /// The less busy of two random draws (Envoy's power of two choices).
    fn least_request(&self, rng: &mut impl Rng) -> Option<Candidate<'a>> {
        let first = self.random(rng)?;
        let second = self.random(rng).unwrap_or(first);
        let active = |c: &Candidate<'a>| c.slot.state.active.load(Relaxed);
        Some(if active(&second) < active(&first) {
            second
        } else {
            first
        })
    }

    /// The admitted endpoint scoring highest for `hash`: the same while the set is stable, and
    /// a change moves only the keys of the endpoints that came or went.
    fn rendezvous(&self, hash: u64) -> Option<Candidate<'a>> {
        self.admitted().max_by_key(|c| mix(hash ^ c.slot.key))
    }
}

// === hashing ===

/// Hash of the consistent-hash key of a request; None when the key is absent (then choose falls
/// back to random, as Envoy does). `path_and_query` is the request target ("/a?b=c").
///
/// An absent cookie is not generated here (Envoy does when the key has a `ttl`).
pub(crate) fn hash_key(
    key: &HashKey,
    headers: &HeaderMap,
    path_and_query: &str,
    source_ip: Option<IpAddr>,
) -> Option<u64> {
    match key {
        // Envoy hashes all values of a repeated header, in sorted order: the sum of their
        // hashes is as independent of order, without sorting.
        HashKey::Header(name) => (headers.get_all(name).iter())
            .map(|v| hash_bytes(v.as_bytes()))
            .reduce(u64::wrapping_add),
        HashKey::Cookie { name, .. } => cookie(headers, name).map(hash_bytes),
        HashKey::SourceIp => source_ip.map(|ip| match ip.to_canonical() {
            IpAddr::V4(v4) => hash_bytes(&v4.octets()),
            IpAddr::V6(v6) => hash_bytes(&v6.octets()),
        }),
        HashKey::QueryParameter(name) => {
            query_parameter(path_and_query, name).map(|v| hash_bytes(v.as_bytes()))
        }
    }
}

/// A consistent-hash cookie made up for a client that did not send one.
#[derive(Debug)]
pub(crate) struct GeneratedCookie {
    /// What the request hashes to: the same as a later request carrying the cookie.
    pub(crate) hash: u64,
    /// The `set-cookie` value that hands it to the client.
    pub(crate) header: HeaderValue,
}

/// Makes up cookie `name` for a client, as Envoy does when the hash key's cookie is missing and
/// has a `ttl`: the value is a hash of the downstream connection (here the tunnel), so requests
/// on one connection agree even before the client stores it; `ttl` zero is a session cookie.
pub(crate) fn generated_cookie(
    name: &str,
    path: Option<&str>,
    ttl: Duration,
    tunnel: &crate::tunnel::Tunnel,
) -> Option<GeneratedCookie> {
    let connection = format!("{}/{}/{}", tunnel.client_ip, tunnel.id, tunnel.destination);
    let value = format!("{:016x}", hash_bytes(connection.as_bytes()));
    let mut header = format!("{name}=\"{value}\"");
    if !ttl.is_zero() {
        let _ = write!(header, "; Max-Age={}", ttl.as_secs());
    }
    if let Some(path) = path {
        let _ = write!(header, "; Path={path}");
    }
    header.push_str("; HttpOnly");
    // The DestinationRule's name and path were checked to fit a header when it was read.
    Some(GeneratedCookie {
        hash: hash_bytes(value.as_bytes()),
        header: HeaderValue::try_from(header).ok()?,
    })
}

/// The value of cookie `name`, unquoted, from the `cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    (headers.get_all(COOKIE).iter())
        .flat_map(|v| v.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (key, value) = (pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii());
            (key == name.as_bytes()).then(|| {
                value
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(value)
            })
        })
}

/// The first value of query parameter `name` (`""` when it has none), as written.
fn query_parameter<'p>(path_and_query: &'p str, name: &str) -> Option<&'p str> {
    let (_, query) = path_and_query.split_once('?')?;
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then_some(value)
    })
}

/// A stable 64-bit hash: SipHash with fixed keys, the same in every process of one build, so
/// waypoint replicas agree.
fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    hasher.write(bytes);
    hasher.finish()
}

/// SplitMix64's finalizer: turns a key ⊕ endpoint hash into an independent-looking score.
pub(super) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A duration in whole nanoseconds, saturating (after 584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[path = "balance/nearness.rs"]
mod nearness;
#[cfg(test)]
#[path = "balance/tests.rs"]
mod tests;
