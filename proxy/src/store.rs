//! The active configuration: a validated [`Config`] plus the runtime state built from it
//! (per-service pickers, per-endpoint latency estimates and connection pools), published
//! as one immutable [`Snapshot`] behind an atomically swapped `Arc`.
//!
//! ```text
//! ProxyConfig ──ConfigStore::apply──▶ validate ──▶ Snapshot::build (reuses endpoint state
//!                                                   of endpoints that stay) ──▶ ArcSwap
//! request ──ConfigStore::load──▶ Arc<Snapshot> (held until the request completes)
//! ```
//!
//! A request holds the `Arc` of the service state it started with, so a swap never
//! disturbs it; endpoints that stay keep their pools and estimates.
//!
//! # One state per endpoint address
//!
//! Two services may list the same endpoint (two Services selecting the same pod and port,
//! or a Route whose backends overlap). They share one [`EndpointState`], in the first
//! snapshot and in every later one alike, keyed by address and connect timeout (the only
//! per-service setting an endpoint's connections carry):
//!
//! - the connection pool: it is the same server, so one set of keep-alive connections
//!   serves both rather than two;
//! - the in-flight count: P2C uses it as the queue at that server, and the server's queue
//!   holds the requests of both services;
//! - the latency estimate: it is the same process on the same host, and a server slowed by
//!   one service's traffic is slow for the other's too, so each service learns of it from
//!   the other's requests rather than only from its own.
//!
//! A service whose Breaker limits connections (`maxConnections`, `maxPendingRequests`,
//! `maxRequestsPerConnection`) is the exception: its endpoints' states are its own (the key
//! carries its breaker lineage), so that its counts and limits are its own too.
//!
//! # Breaker state
//!
//! A service's [`ServiceBreaker`] (see [`crate::breaker`]) is kept by a config update that
//! keeps the service's Breaker spec, with the outlier state of each endpoint that stays
//! (by address); an endpoint that goes takes its state along, and a changed spec starts a
//! fresh lineage.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwapOption;
use weft_api::proxy_config::{self as wire, ProxyConfig};

use crate::{
    balance::{DEFAULT_DECAY, DEFAULT_SEED, Load, PeakEwma, Picker},
    breaker::{EndpointOutlier, Outcome, Overloaded, RequestPermit, ServiceBreaker},
    config::{Config, ConfigError, Service},
    identity::{ClientTls, IdentityStore},
    limits::Limits,
    metrics::{Direction, Metrics, RequestMetrics, RouteRuleLabel, ServiceLabel},
    ratelimit::RateLimiter,
    retry::{BudgetSpec, RetryBudget},
    upstream::{PoolLimits, Upstream},
};

/// Which endpoints share one [`EndpointState`]: everything the state's connections depend
/// on. Services that list the same address with the same connect timeout (and expected
/// identity) share it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct EndpointKey {
    addr: SocketAddr,
    connect_timeout: Duration,
    /// The breaker lineage whose connection limits the state's pools obey, if any.
    lineage: Option<u64>,
    /// The identity the endpoint must present when its connections are mutual TLS.
    identity: Option<Arc<str>>,
}

impl EndpointKey {
    fn of(state: &EndpointState) -> Self {
        EndpointKey {
            addr: state.addr,
            connect_timeout: state.upstream.connect_timeout,
            lineage: state.lineage,
            identity: state.upstream.tls().map(|t| t.identity.clone()),
        }
    }
}

/// Runtime state of one endpoint (an address), shared by every service that lists it and
/// by every snapshot that keeps it; see the module documentation for why.
#[derive(Debug)]
pub struct EndpointState {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Pooled HTTP clients.
    pub upstream: Upstream,
    ewma: Mutex<PeakEwma>,
    in_flight: AtomicUsize,
    /// The breaker lineage this state belongs to alone (see [`EndpointKey`]).
    lineage: Option<u64>,
}

impl EndpointState {
    /// Fresh state for an endpoint, with the default pool limits.
    pub fn new(addr: SocketAddr, connect_timeout: Duration) -> Self {
        Self::from_source(addr, None, connect_timeout, PoolLimits::default())
    }

    /// Fresh state for an endpoint that allows at most `max_http1` HTTP/1 connections (and
    /// the default idle timeout).
    pub fn with_http1_limit(addr: SocketAddr, connect_timeout: Duration, max_http1: usize) -> Self {
        let limits = PoolLimits {
            max_http1,
            ..PoolLimits::default()
        };
        Self::from_source(addr, None, connect_timeout, limits)
    }

    /// Fresh state for an endpoint dialled from `source` when given (the inbound side's
    /// loopback source, see [`crate::upstream::connect_from`]).
    pub fn from_source(
        addr: SocketAddr,
        source: Option<std::net::IpAddr>,
        connect_timeout: Duration,
        limits: PoolLimits,
    ) -> Self {
        EndpointState {
            addr,
            upstream: Upstream::from_source(addr, source, connect_timeout, limits),
            ewma: Mutex::new(PeakEwma::new(DEFAULT_SEED, DEFAULT_DECAY, Instant::now())),
            in_flight: AtomicUsize::new(0),
            lineage: None,
        }
    }

    /// Fresh state for an endpoint of one service only, whose pools obey the connection
    /// limits of `breaker`.
    fn for_breaker(
        addr: SocketAddr,
        connect_timeout: Duration,
        limits: PoolLimits,
        breaker: &ServiceBreaker,
        tls: Option<Arc<ClientTls>>,
    ) -> Self {
        EndpointState {
            addr,
            upstream: Upstream::for_service(
                addr,
                None,
                connect_timeout,
                limits,
                breaker.pool.clone(),
                tls,
            ),
            ewma: Mutex::new(PeakEwma::new(DEFAULT_SEED, DEFAULT_DECAY, Instant::now())),
            in_flight: AtomicUsize::new(0),
            lineage: Some(breaker.id),
        }
    }

    /// Fresh state for a meshed endpoint: its connections are mutual TLS, and it must
    /// present `tls`'s identity.
    fn meshed(
        addr: SocketAddr,
        connect_timeout: Duration,
        limits: PoolLimits,
        tls: Option<Arc<ClientTls>>,
    ) -> Self {
        let mut state = Self::from_source(addr, None, connect_timeout, limits);
        if tls.is_some() {
            state.upstream = Upstream::for_service(addr, None, connect_timeout, limits, None, tls);
        }
        state
    }

    /// Marks a request started; the guard marks it finished when dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone(), None)
    }

    /// Records the latency of a successful request.
    pub fn observe(&self, rtt: Duration) {
        self.observe_at(rtt, Instant::now());
    }

    /// Records the latency of a successful request, made at `now` (for a caller that has
    /// read the clock already).
    pub fn observe_at(&self, rtt: Duration, now: Instant) {
        if let Ok(mut e) = self.ewma.lock() {
            e.observe(rtt, now);
        }
    }

    /// Records a request that failed after `rtt` (a 5xx, a reset, a per-try timeout): a run
    /// of them raises the estimate so that P2C steers away (see [`crate::balance`]).
    pub fn observe_failure_at(&self, rtt: Duration, now: Instant) {
        if let Ok(mut e) = self.ewma.lock() {
            e.observe_failure(rtt, now);
        }
    }

    /// Records a connect failure as a latency penalty.
    pub fn penalize(&self) {
        if let Ok(mut e) = self.ewma.lock() {
            e.observe_connect_failure(Instant::now());
        }
    }

    /// The requests in flight to this endpoint.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn estimate_ns(&self, now: Instant) -> f64 {
        self.ewma
            .lock()
            .map(|e| e.estimate_ns(now))
            .unwrap_or(DEFAULT_SEED.as_nanos() as f64)
    }
}

/// One request in flight to an endpoint, and its admission under the service's
/// `maxRequests` once it has a response ([`InFlight::holding`]).
#[derive(Debug)]
pub struct InFlight(Arc<EndpointState>, Option<RequestPermit>);

impl InFlight {
    /// Keeps `permit` for as long as this request is in flight (until its response body
    /// ends, or its tunnel closes).
    pub fn holding(mut self, permit: RequestPermit) -> Self {
        self.1 = Some(permit);
        self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The most mirrored requests one proxy has in flight; a copy beyond it is not sent (and
/// counted), so that a slow mirror cannot grow memory without bound.
pub const MIRROR_SLOTS: usize = 256;

/// A service's Route with its runtime state.
#[derive(Debug)]
pub struct RouteState {
    /// The compiled Route.
    pub spec: Arc<crate::rules::Route>,
    /// Per rule, its own retry budget (`None`: the service's).
    pub budgets: Vec<Option<Arc<RetryBudget>>>,
    /// Per rule, its request series per direction (inbound, outbound), looked up on the
    /// rule's first request as [`ServiceState`]'s are.
    rule_metrics: Vec<[OnceLock<RequestMetrics>; 2]>,
}

impl RouteState {
    /// The request series of rule `index` of this Route, for requests of `direction` to
    /// `service`; `None` for an index the Route does not have.
    pub fn rule_metrics(
        &self,
        index: usize,
        metrics: &Metrics,
        direction: Direction,
        service: &ServiceLabel,
    ) -> Option<&RequestMetrics> {
        let rule = self.spec.rules.get(index)?;
        let slot = self.rule_metrics.get(index)?;
        Some(slot[direction_index(direction)].get_or_init(|| {
            metrics.for_rule_requests(
                direction,
                service,
                RouteRuleLabel::new(self.spec.name.clone(), rule.label.clone()),
            )
        }))
    }
}

fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::Inbound => 0,
        Direction::Outbound => 1,
    }
}

/// Runtime state of one service in one snapshot.
#[derive(Debug)]
pub struct ServiceState {
    /// The validated service.
    pub spec: Arc<Service>,
    /// The metric label.
    pub label: ServiceLabel,
    /// Endpoint state, index-aligned with `spec.endpoints`.
    pub endpoints: Vec<Arc<EndpointState>>,
    /// The Route and its rules' budgets.
    pub route: Option<RouteState>,
    /// The service's retry budget.
    pub budget: Arc<RetryBudget>,
    picker: Picker,
    /// This service's request series per direction (inbound, outbound), looked up on the
    /// first request rather than on every one.
    request_metrics: [OnceLock<RequestMetrics>; 2],
    /// The service's breaker lineage, when it has a Breaker.
    pub breaker: Option<Arc<ServiceBreaker>>,
    /// Outlier state, index-aligned with `endpoints`; empty without outlier detection.
    outliers: Vec<Arc<EndpointOutlier>>,
}

impl ServiceState {
    /// The request series of this service for `direction`.
    pub fn request_metrics(&self, metrics: &Metrics, direction: Direction) -> &RequestMetrics {
        self.request_metrics[direction_index(direction)]
            .get_or_init(|| metrics.for_requests(direction, &self.label))
    }

    /// Picks an endpoint for one request or connection, avoiding `exclude` (an index that
    /// just failed) and endpoints ejected by outlier detection when there is another; when
    /// every endpoint is ejected or excluded, picks as if none were ejected.
    pub fn pick(&self, exclude: Option<usize>) -> Option<(usize, &Arc<EndpointState>)> {
        // Read the clock only when costs are compared (P2C between two or more endpoints).
        let now = std::cell::OnceCell::new();
        let load = |i: usize| {
            let e = &self.endpoints[i];
            let now = *now.get_or_init(Instant::now);
            Load {
                estimate_ns: e.estimate_ns(now),
                in_flight: e.in_flight(),
            }
        };
        let mut rng = rand::rng();
        if let Some(breaker) = &self.breaker
            && let Some(detector) = &breaker.outlier
            && detector.any_ejected()
        {
            let at = Instant::now();
            let picked = self.picker.pick_allowed(
                &mut rng,
                |i| Some(i) != exclude && !detector.is_ejected_at(&self.outliers, i, at),
                load,
            );
            breaker.ejections_changed();
            if let Some(i) = picked {
                return self.endpoints.get(i).map(|e| (i, e));
            }
        }
        let i = self.picker.pick(&mut rng, exclude, load)?;
        self.endpoints.get(i).map(|e| (i, e))
    }

    /// Counts what became of a request to `endpoints[endpoint]`, for outlier ejection.
    pub fn record(&self, endpoint: usize, outcome: Outcome) {
        if let Some(breaker) = &self.breaker
            && let Some(e) = self.endpoints.get(endpoint)
        {
            breaker.record(&self.outliers, endpoint, e.addr, outcome);
        }
    }

    /// Admits a request under the service's `maxRequests`; the permit is held until the
    /// request ends (see [`InFlight::holding`]). Refused: answer 503 `overloaded`.
    pub fn admit(&self) -> Result<RequestPermit, Overloaded> {
        match &self.breaker {
            Some(b) => b.admit(),
            None => Ok(RequestPermit::unlimited()),
        }
    }
}

/// The breaker lineage and per-endpoint outlier state of `spec` in a new snapshot: the
/// previous ones when the service keeps its Breaker, fresh ones otherwise. Outlier state
/// of endpoints that left is retired.
fn carry_breaker(
    spec: &Service,
    previous: Option<&ServiceState>,
    metrics: &Metrics,
) -> (Option<Arc<ServiceBreaker>>, Vec<Arc<EndpointOutlier>>) {
    let Some(wanted) = &spec.breaker else {
        return (None, Vec::new());
    };
    let kept = previous.and_then(|p| {
        p.breaker
            .as_ref()
            .filter(|b| &b.spec == wanted)
            .map(|b| (p, b.clone()))
    });
    let Some((prev, breaker)) = kept else {
        let breaker = ServiceBreaker::new(
            wanted.clone(),
            metrics,
            ServiceLabel(Arc::from(spec.name.as_str())),
        );
        let outliers = if breaker.outlier.is_some() {
            spec.endpoints.iter().map(|_| Arc::default()).collect()
        } else {
            Vec::new()
        };
        return (Some(Arc::new(breaker)), outliers);
    };
    let Some(detector) = &breaker.outlier else {
        return (Some(breaker), Vec::new());
    };
    let old: HashMap<SocketAddr, &Arc<EndpointOutlier>> = prev
        .spec
        .endpoints
        .iter()
        .map(|e| e.addr)
        .zip(&prev.outliers)
        .collect();
    let outliers: Vec<Arc<EndpointOutlier>> = spec
        .endpoints
        .iter()
        .map(|e| old.get(&e.addr).map_or_else(Arc::default, |o| (*o).clone()))
        .collect();
    for (addr, o) in &old {
        if !spec.endpoints.iter().any(|e| e.addr == *addr) {
            detector.retire(o);
        }
    }
    breaker.ejections_changed();
    (Some(breaker), outliers)
}

/// One immutable generation of the proxy's configuration and runtime state.
#[derive(Debug)]
pub struct Snapshot {
    /// The config as received, for `/config`.
    pub raw: ProxyConfig,
    /// The validated config.
    pub config: Config,
    /// Service state, index-aligned with `config.services`.
    pub services: Vec<Arc<ServiceState>>,
    /// This process's count of accepted configs, starting at 1.
    pub generation: u64,
    /// The version shown to users: the config's own label, or the generation.
    pub version: String,
    /// The rate limit on requests to this proxy's workload.
    pub inbound_limit: Option<Arc<RateLimiter>>,
}

impl Snapshot {
    fn build(
        raw: ProxyConfig,
        config: Config,
        generation: u64,
        previous: Option<&Snapshot>,
        pools: PoolLimits,
        metrics: &Metrics,
        identity: Option<&IdentityStore>,
    ) -> Snapshot {
        // One rule for the first build and every reload: endpoint state is keyed by what
        // its connections depend on, and the previous snapshot's states seed the map.
        let mut states: HashMap<EndpointKey, Arc<EndpointState>> = HashMap::new();
        // Budgets carry over by service, rule and spec: an update that leaves them keeps
        // their count of recent requests and retries.
        let mut budgets: Vec<(String, Option<Arc<str>>, Arc<RetryBudget>)> = Vec::new();
        if let Some(prev) = previous {
            for s in &prev.services {
                for e in &s.endpoints {
                    states.insert(EndpointKey::of(e), e.clone());
                }
                budgets.push((s.spec.name.clone(), None, s.budget.clone()));
                if let Some(route) = &s.route {
                    for (rule, b) in route.spec.rules.iter().zip(&route.budgets) {
                        if let Some(b) = b {
                            budgets.push((
                                s.spec.name.clone(),
                                Some(rule.label.clone()),
                                b.clone(),
                            ));
                        }
                    }
                }
            }
        }
        let budget = |service: &str, rule: Option<&Arc<str>>, spec: &BudgetSpec| {
            budgets
                .iter()
                .find(|(s, r, b)| s == service && r.as_ref() == rule && b.spec() == spec)
                .map_or_else(
                    || Arc::new(RetryBudget::new(spec.clone())),
                    |(_, _, b)| b.clone(),
                )
        };
        let services = config
            .services
            .iter()
            .map(|spec| {
                let prev_service =
                    previous.and_then(|p| p.service_by_name(&spec.name).map(|s| &**s));
                let (breaker, outliers) = carry_breaker(spec, prev_service, metrics);
                let own = breaker.as_ref().filter(|b| b.owns_connections());
                let endpoints: Vec<Arc<EndpointState>> = spec
                    .endpoints
                    .iter()
                    .map(|e| {
                        // mTLS when the endpoint is meshed (has an identity) and this
                        // proxy has one to present.
                        let peer: Option<Arc<str>> = identity
                            .and(e.identity.as_deref())
                            .map(Arc::from);
                        states
                            .entry(EndpointKey {
                                addr: e.addr,
                                connect_timeout: spec.connect_timeout,
                                lineage: own.map(|b| b.id),
                                identity: peer.clone(),
                            })
                            .or_insert_with(|| {
                                let tls = peer.and_then(|p| {
                                    let store = identity?;
                                    match store.client_tls(p) {
                                        Ok(t) => Some(t),
                                        Err(error) => {
                                            tracing::error!(%error, "building the TLS client config");
                                            None
                                        }
                                    }
                                });
                                Arc::new(match own {
                                    Some(b) => EndpointState::for_breaker(
                                        e.addr,
                                        spec.connect_timeout,
                                        pools,
                                        b,
                                        tls,
                                    ),
                                    None => EndpointState::meshed(
                                        e.addr,
                                        spec.connect_timeout,
                                        pools,
                                        tls,
                                    ),
                                })
                            })
                            .clone()
                    })
                    .collect();
                let weights: Vec<u32> = spec.endpoints.iter().map(|e| e.weight.get()).collect();
                let picker = match spec.balancer {
                    wire::Balancer::PeakEwma => Picker::p2c(&weights),
                    wire::Balancer::RoundRobin => Picker::round_robin(&weights),
                };
                let route = spec.route.as_ref().map(|r| RouteState {
                    spec: r.clone(),
                    budgets: r
                        .rules
                        .iter()
                        .map(|rule| {
                            rule.budget
                                .as_ref()
                                .map(|b| budget(&spec.name, Some(&rule.label), b))
                        })
                        .collect(),
                    rule_metrics: r.rules.iter().map(|_| Default::default()).collect(),
                });
                Arc::new(ServiceState {
                    label: ServiceLabel(Arc::from(spec.name.as_str())),
                    budget: budget(&spec.name, None, &spec.retry_budget),
                    route,
                    spec: spec.clone(),
                    endpoints,
                    picker,
                    request_metrics: Default::default(),
                    breaker,
                    outliers,
                })
            })
            .collect();
        let version = config
            .version
            .clone()
            .unwrap_or_else(|| generation.to_string());
        let inbound_limit = config.inbound_rate_limit.as_ref().and_then(|w| {
            let kept = previous
                .and_then(|p| p.inbound_limit.as_ref())
                .filter(|l| l.spec_eq(w));
            match kept {
                Some(l) => Some(l.clone()),
                None => RateLimiter::from_wire(w, "inbound.rateLimit")
                    .ok()
                    .map(Arc::new),
            }
        });
        Snapshot {
            raw,
            config,
            services,
            generation,
            version,
            inbound_limit,
        }
    }

    /// The service claiming a cluster address.
    pub fn service_for_addr(&self, addr: SocketAddr) -> Option<&Arc<ServiceState>> {
        let (i, _) = self.config.service_for_addr(addr)?;
        self.services.get(i)
    }

    /// The meshed endpoint at an address, with the service that lists it (for a pod dialled
    /// by its address rather than a service's).
    pub fn meshed_endpoint_for_addr(
        &self,
        addr: SocketAddr,
    ) -> Option<(&Arc<ServiceState>, &Arc<EndpointState>)> {
        let (i, j) = self.config.meshed_endpoint(addr)?;
        let service = self.services.get(i)?;
        Some((service, service.endpoints.get(j)?))
    }

    /// The service with a name.
    pub fn service_by_name(&self, name: &str) -> Option<&Arc<ServiceState>> {
        let (i, _) = self.config.service_by_name(name)?;
        self.services.get(i)
    }
}

/// Holds the active snapshot and swaps in new ones.
#[derive(Debug)]
pub struct ConfigStore {
    current: ArcSwapOption<Snapshot>,
    /// Serialises `apply` so generations are assigned in order.
    apply_lock: Mutex<u64>,
    metrics: Arc<Metrics>,
    /// What each endpoint's pools are built with (process limits, not config fields).
    pools: PoolLimits,
    /// The request limits a config's Route edits must leave room under.
    limits: Limits,
    /// Mirrored requests in flight, across snapshots ([`MIRROR_SLOTS`]).
    mirror_slots: Arc<tokio::sync::Semaphore>,
    /// This proxy's identity: endpoints with one get mutual TLS.
    identity: Option<Arc<IdentityStore>>,
}

impl ConfigStore {
    /// A store with no config yet (the proxy is not ready).
    pub fn new(metrics: Arc<Metrics>) -> Self {
        ConfigStore {
            current: ArcSwapOption::const_empty(),
            apply_lock: Mutex::new(0),
            metrics,
            pools: PoolLimits::default(),
            limits: Limits::default(),
            mirror_slots: Arc::new(tokio::sync::Semaphore::new(MIRROR_SLOTS)),
            identity: None,
        }
    }

    /// The slots of mirrored requests in flight.
    pub fn mirror_slots(&self) -> &Arc<tokio::sync::Semaphore> {
        &self.mirror_slots
    }

    /// Sets the process limits: the pools of each endpoint built from now on, and the
    /// request limits a config is checked against when applied.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.pools = limits.upstream_pools();
        self.limits = limits;
        self
    }

    /// Whether this proxy holds a mesh certificate now (it then speaks mutual TLS).
    pub fn has_identity(&self) -> bool {
        self.identity
            .as_ref()
            .is_some_and(|i| i.current().is_some())
    }

    /// Gives endpoints built from now on mutual TLS with this identity, when the config
    /// says they are meshed.
    pub fn with_identity(mut self, identity: Option<Arc<IdentityStore>>) -> Self {
        self.identity = identity;
        self
    }

    /// The metrics this store reports config changes to.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The active snapshot, if a config has been accepted.
    pub fn load(&self) -> Option<Arc<Snapshot>> {
        self.current.load_full()
    }

    /// Validates `raw` (against the store's request limits too) and, if valid, makes it
    /// active. An invalid config changes nothing and is counted in
    /// `weft_config_rejected_total`.
    pub fn apply(&self, raw: ProxyConfig) -> Result<Arc<Snapshot>, ConfigError> {
        let config = match Config::validate_within(&raw, &self.limits) {
            Ok(c) => c,
            Err(e) => {
                self.metrics.config_rejected();
                tracing::warn!(error = %e, "config rejected; keeping the active config");
                return Err(e);
            }
        };
        let mut generation = self
            .apply_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *generation += 1;
        let previous = self.current.load_full();
        let snapshot = Arc::new(Snapshot::build(
            raw,
            config,
            *generation,
            previous.as_deref(),
            self.pools,
            &self.metrics,
            self.identity.as_deref(),
        ));
        self.current.store(Some(snapshot.clone()));
        self.metrics.config_applied(
            snapshot.generation,
            &snapshot.version,
            snapshot
                .services
                .iter()
                .map(|s| (s.label.clone(), s.endpoints.len())),
        );
        tracing::info!(
            version = %snapshot.version,
            generation = snapshot.generation,
            services = snapshot.services.len(),
            "config applied"
        );
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(endpoints: &[&str]) -> ProxyConfig {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "weft.dev/proxy/v1alpha1",
            "kind": "ProxyConfig",
            "services": [{
                "name": "web",
                "endpoints": endpoints.iter().map(|a| serde_json::json!({"address": a})).collect::<Vec<_>>()
            }]
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn swap_keeps_state_of_endpoints_that_stay_and_old_snapshots_stay_intact() {
        let store = ConfigStore::new(Arc::new(Metrics::new()));
        assert!(store.load().is_none());
        let first = store.apply(raw(&["127.0.0.1:1", "127.0.0.1:2"])).unwrap();
        let held = first.service_by_name("web").unwrap().clone();
        let _req = held.endpoints[1].start();
        let second = store.apply(raw(&["127.0.0.1:2", "127.0.0.1:3"])).unwrap();
        assert_eq!(second.generation, 2);
        assert_eq!(second.version, "2");
        let web = second.service_by_name("web").unwrap();
        assert!(Arc::ptr_eq(&web.endpoints[0], &held.endpoints[1]));
        assert_eq!(web.endpoints[0].in_flight(), 1);
        // The request that started on the first config still sees both of its endpoints.
        assert_eq!(held.endpoints.len(), 2);
        assert_eq!(held.endpoints[0].addr, "127.0.0.1:1".parse().unwrap());
    }

    #[tokio::test]
    async fn an_invalid_config_leaves_the_active_one() {
        let store = ConfigStore::new(Arc::new(Metrics::new()));
        store.apply(raw(&["127.0.0.1:1"])).unwrap();
        assert!(store.apply(raw(&["not-an-address"])).is_err());
        let active = store.load().unwrap();
        assert_eq!(active.generation, 1);
        assert_eq!(active.service_by_name("web").unwrap().endpoints.len(), 1);
    }
    fn two_services(a: &[&str], b: &[&str]) -> ProxyConfig {
        let eps = |list: &[&str]| {
            list.iter()
                .map(|a| serde_json::json!({"address": a}))
                .collect::<Vec<_>>()
        };
        serde_json::from_value(serde_json::json!({
            "apiVersion": "weft.dev/proxy/v1alpha1",
            "kind": "ProxyConfig",
            "services": [
                {"name": "a", "endpoints": eps(a)},
                {"name": "b", "endpoints": eps(b)},
                {"name": "c", "connectTimeout": "3s", "endpoints": eps(b)},
            ]
        }))
        .unwrap()
    }

    /// Whether services `a` and `b` share their state for 127.0.0.1:7, and whether `c`
    /// (same address, another connect timeout) has its own.
    fn sharing(s: &Snapshot) -> (bool, bool) {
        let a = &s.service_by_name("a").unwrap().endpoints[0];
        let b = &s.service_by_name("b").unwrap().endpoints[1];
        let c = &s.service_by_name("c").unwrap().endpoints[1];
        assert_eq!((a.addr, b.addr), (c.addr, c.addr));
        (Arc::ptr_eq(a, b), !Arc::ptr_eq(a, c))
    }

    #[tokio::test]
    async fn services_listing_one_address_share_its_state_before_and_after_a_reload() {
        let store = ConfigStore::new(Arc::new(Metrics::new()));
        let first = store
            .apply(two_services(
                &["127.0.0.1:7"],
                &["127.0.0.1:8", "127.0.0.1:7"],
            ))
            .unwrap();
        assert_eq!(sharing(&first), (true, true), "first build");
        // A request through one service counts as in flight at the shared server.
        let _req = first.service_by_name("a").unwrap().endpoints[0].start();
        let second = store
            .apply(two_services(
                &["127.0.0.1:7"],
                &["127.0.0.1:9", "127.0.0.1:7"],
            ))
            .unwrap();
        assert_eq!(sharing(&second), (true, true), "after a reload");
        assert_eq!(
            second.service_by_name("b").unwrap().endpoints[1].in_flight(),
            1
        );
        assert!(Arc::ptr_eq(
            &first.service_by_name("a").unwrap().endpoints[0],
            &second.service_by_name("b").unwrap().endpoints[1],
        ));
    }
    fn with_breaker(endpoints: &[&str], breaker: serde_json::Value) -> ProxyConfig {
        let mut c = raw(endpoints);
        c.services[0].breaker = Some(serde_json::from_value(breaker).unwrap());
        c
    }

    fn outlier(base: &str) -> serde_json::Value {
        serde_json::json!({"name": "shop/web", "outlierDetection": {
            "consecutive5xx": 1, "consecutiveConnectFailures": 1, "interval": "10s",
            "baseEjectionTime": base, "maxEjectionTime": "5m", "maxEjectedPercent": 100}})
    }

    #[tokio::test]
    async fn breaker_state_stays_with_its_spec_and_endpoints_across_updates() {
        let store = ConfigStore::new(Arc::new(Metrics::new()));
        let eps = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"];
        let first = store.apply(with_breaker(&eps, outlier("30s"))).unwrap();
        let web = first.service_by_name("web").unwrap();
        web.record(0, Outcome::ServerError);
        web.record(1, Outcome::ServerError);
        // Same spec, endpoint 2 gone: endpoint 0 stays ejected, 1's ejection goes with it.
        let second = store
            .apply(with_breaker(&eps[..1], outlier("30s")))
            .unwrap();
        let web2 = second.service_by_name("web").unwrap();
        assert!(Arc::ptr_eq(
            web.breaker.as_ref().unwrap(),
            web2.breaker.as_ref().unwrap()
        ));
        let detector = web2.breaker.as_ref().unwrap().outlier.as_ref().unwrap();
        assert_eq!(detector.ejected(), 1);
        assert!(detector.is_ejected_at(&web2.outliers, 0, Instant::now()));
        // A changed spec starts fresh.
        let third = store.apply(with_breaker(&eps, outlier("1m"))).unwrap();
        let web3 = third.service_by_name("web").unwrap();
        assert_eq!(
            web3.breaker
                .as_ref()
                .unwrap()
                .outlier
                .as_ref()
                .unwrap()
                .ejected(),
            0
        );
        assert!(web3.pick(None).is_some());
    }

    #[tokio::test]
    async fn a_service_with_connection_limits_gets_endpoint_pools_of_its_own() {
        let store = ConfigStore::new(Arc::new(Metrics::new()));
        let mut c = two_services(&["127.0.0.1:7"], &["127.0.0.1:7"]);
        c.services[1].breaker = Some(
            serde_json::from_value(serde_json::json!({"name": "shop/b",
                "connectionPool": {"maxConnections": 1}}))
            .unwrap(),
        );
        let first = store.apply(c.clone()).unwrap();
        let a = &first.service_by_name("a").unwrap().endpoints[0];
        let b = &first.service_by_name("b").unwrap().endpoints[0];
        assert!(!Arc::ptr_eq(a, b), "b's pools are its own");
        let second = store.apply(c).unwrap();
        assert!(
            Arc::ptr_eq(b, &second.service_by_name("b").unwrap().endpoints[0]),
            "and kept while its Breaker stays"
        );
    }

    /// Endpoint states of a snapshot that should be one and the same but are not.
    fn unshared(s: &Snapshot) -> Vec<SocketAddr> {
        let mut seen: HashMap<EndpointKey, &Arc<EndpointState>> = HashMap::new();
        let mut bad = Vec::new();
        for svc in &s.services {
            for e in &svc.endpoints {
                let first = seen.entry(EndpointKey::of(e)).or_insert(e);
                if !Arc::ptr_eq(first, e) {
                    bad.push(e.addr);
                }
            }
        }
        bad
    }

    mod properties {
        use super::*;
        use crate::config::tests::properties::raw_config;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]

            #[test]
            fn any_sequence_of_configs_applies_with_one_sharing_rule(
                configs in proptest::collection::vec(raw_config(), 1..4),
            ) {
                let store = ConfigStore::new(Arc::new(Metrics::new()));
                for raw in configs {
                    if let Ok(s) = store.apply(raw) {
                        prop_assert_eq!(unshared(&s), Vec::<SocketAddr>::new());
                        for svc in &s.services {
                            if !svc.endpoints.is_empty() {
                                let (i, _) = svc.pick(None).unwrap();
                                prop_assert!(i < svc.endpoints.len());
                            }
                        }
                    }
                }
            }
        }
    }
}
