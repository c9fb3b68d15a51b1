//! Load balancing: a list of [`Backend`]s and a [`Strategy`] that picks one per request,
//! skipping unhealthy backends (see [`health`] for the checks; [`discovery`] for backends
//! given by name). The list can be replaced at run time ([`LoadBalancer::set_backends`])
//! without stopping selection: requests already picked keep their backend and its count.
//!
//! When no backend is healthy, the ones out only by passive ejection are picked among as if
//! healthy (nginx tries them all then): a pool that passive checks alone emptied, say when
//! every backend answered 500 to one bad endpoint, keeps serving. Backends failing active
//! checks are not: with none left, selection returns `None` (as Pingora does), so the proxy
//! answers 502 at once instead of waiting on dead backends.

mod backend;
pub mod discovery;
#[cfg(test)]
mod discovery_tests;
pub(crate) mod hash_key;
pub mod health;
#[cfg(test)]
mod health_tests;
mod ketama;
#[cfg(test)]
mod tests;
mod upstream;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::sync::{watch, Semaphore};

use crate::retry::RetryPolicy;
use crate::service::BackgroundService;
pub use backend::{Backend, BackendStatus, ConfigError, MAX_WEIGHT};
pub use hash_key::HashKey;
pub use health::{
    ExpectStatus, HealthChange, HealthCheck, HealthConfig, HealthListener, Observation,
    PassiveCheck, Probe,
};
pub use upstream::Upstream;

/// How a [`LoadBalancer`] picks a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// Each healthy backend in turn, ignoring weights.
    RoundRobin,
    /// nginx's smooth weighted round robin: weights 5, 1, 1 give a a b a c a a.
    WeightedRoundRobin,
    /// A random backend, each chosen in proportion to its weight.
    Random,
    /// The backend with the fewest requests in flight; ties go round robin.
    LeastConnections,
    /// Ketama consistent hashing of the key; without a key, round robin.
    Consistent,
}

impl Strategy {
    /// The names the Python layer accepts (`strategy="round_robin"`, ...).
    pub fn parse(name: &str) -> Result<Self, ConfigError> {
        Ok(match name {
            "round_robin" => Strategy::RoundRobin,
            "weighted_round_robin" => Strategy::WeightedRoundRobin,
            "random" => Strategy::Random,
            "least_connections" => Strategy::LeastConnections,
            "consistent" => Strategy::Consistent,
            _ => {
                return Err(ConfigError::new(
                    "strategy",
                    format!(
                        "unknown strategy {name:?}: expected \"round_robin\", \"weighted_round_robin\", \
                         \"random\", \"least_connections\" or \"consistent\""
                    ),
                ))
            }
        })
    }
}

/// A backend picked for one request. It counts as in flight on that backend until this is
/// dropped, which is what least connections balances on.
#[derive(Debug)]
pub struct Selected {
    backend: Arc<Backend>,
}

impl Selected {
    fn new(backend: &Arc<Backend>) -> Self {
        backend.begin_request();
        Selected {
            backend: backend.clone(),
        }
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl std::ops::Deref for Selected {
    type Target = Backend;

    fn deref(&self) -> &Backend {
        &self.backend
    }
}

impl Drop for Selected {
    fn drop(&mut self) {
        self.backend.end_request();
    }
}

/// One backend list with what each strategy derives from it, swapped as a whole so a
/// selection never sees a list and a ring that disagree.
#[derive(Debug)]
struct Pool {
    backends: Arc<[Arc<Backend>]>,
    /// Round robin's position; also where least connections starts looking, so ties rotate.
    next: AtomicUsize,
    derived: Derived,
}

#[derive(Debug)]
enum Derived {
    None,
    /// Smooth weighted round robin's current weight per backend.
    Smooth(Mutex<Box<[i64]>>),
    /// Running sums of the weights, for drawing in proportion to them.
    Cumulative(Box<[u64]>),
    Ring(ketama::Ring),
}

impl Pool {
    fn new(strategy: Strategy, backends: Arc<[Arc<Backend>]>) -> Self {
        let derived = match strategy {
            Strategy::RoundRobin | Strategy::LeastConnections => Derived::None,
            Strategy::WeightedRoundRobin => {
                Derived::Smooth(Mutex::new(vec![0; backends.len()].into_boxed_slice()))
            }
            Strategy::Random => Derived::Cumulative(
                backends
                    .iter()
                    .scan(0u64, |sum, backend| {
                        *sum += u64::from(backend.weight());
                        Some(*sum)
                    })
                    .collect(),
            ),
            Strategy::Consistent => Derived::Ring(ketama::Ring::new(&backends)),
        };
        Pool {
            backends,
            next: AtomicUsize::new(0),
            derived,
        }
    }

    /// Advancing the shared position past unhealthy backends too is what keeps the rotation
    /// exact over the healthy ones.
    fn round_robin(&self, usable: impl Fn(&Backend) -> bool) -> Option<usize> {
        let count = self.backends.len();
        (0..count)
            .map(|_| self.next.fetch_add(1, Ordering::Relaxed) % count)
            .find(|&index| usable(&self.backends[index]))
    }

    fn least_connections(&self, usable: impl Fn(&Backend) -> bool) -> Option<usize> {
        let count = self.backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..count)
            .map(|offset| (start + offset) % count)
            .filter(|&index| usable(&self.backends[index]))
            // min_by_key keeps the first of equals: the one nearest the rotating start.
            .min_by_key(|&index| self.backends[index].in_flight())
    }

    /// nginx's `ngx_http_upstream_get_peer`: every healthy backend gains its weight, the
    /// highest (first among equals) is picked and loses the total.
    fn smooth_weighted(
        &self,
        current: &Mutex<Box<[i64]>>,
        usable: impl Fn(&Backend) -> bool,
    ) -> Option<usize> {
        let mut current = current.lock();
        let mut total = 0i64;
        let mut best: Option<usize> = None;
        for (index, backend) in self.backends.iter().enumerate() {
            if !usable(backend) {
                continue;
            }
            let weight = i64::from(backend.weight());
            current[index] += weight;
            total += weight;
            if best.is_none_or(|best| current[index] > current[best]) {
                best = Some(index);
            }
        }
        let best = best?;
        current[best] -= total;
        Some(best)
    }

    /// Draws over all weights and redraws among the healthy ones only when the first draw
    /// lands on an unhealthy backend: still in proportion to weight, and one binary search
    /// while all are healthy.
    fn random(
        &self,
        cumulative: &[u64],
        random: &Random,
        usable: impl Fn(&Backend) -> bool,
    ) -> Option<usize> {
        let total = *cumulative.last()?;
        let draw = random.below(total);
        let index = cumulative.partition_point(|&sum| sum <= draw);
        if usable(&self.backends[index]) {
            return Some(index);
        }
        let healthy_total: u64 = self
            .backends
            .iter()
            .filter(|backend| usable(backend))
            .map(|backend| u64::from(backend.weight()))
            .sum();
        if healthy_total == 0 {
            return None;
        }
        let mut draw = random.below(healthy_total);
        self.backends.iter().position(|backend| {
            if !usable(backend) {
                return false;
            }
            let weight = u64::from(backend.weight());
            if draw < weight {
                return true;
            }
            draw -= weight;
            false
        })
    }
}

/// Tries after a failed one, unless configured otherwise: enough to get past one or two
/// dead backends, as nginx's `proxy_next_upstream` does by default.
pub const DEFAULT_MAX_RETRIES: usize = 2;

/// A seed that differs from balancer to balancer.
fn random_seed() -> u64 {
    // Each RandomState is keyed afresh, so each balancer draws its own sequence.
    std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), ())
}

/// splitmix64: one `fetch_add` per draw, so threads share it without a lock, and a seed
/// makes a test's draws repeatable.
#[derive(Debug)]
struct Random(AtomicU64);

impl Random {
    fn below(&self, bound: u64) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // Lemire's multiply-shift: maps to [0, bound) without a division.
        ((u128::from(z) * u128::from(bound)) >> 64) as u64
    }
}

/// How a [`LoadBalancer`] checks and finds its backends, beside its strategy.
#[derive(Debug, Clone)]
pub struct LoadBalancerConfig {
    pub health: HealthConfig,
    /// How often backends given by name are resolved again (see [`discovery`]).
    pub dns_refresh: Duration,
    /// Fixes the random strategy's draws (tests); a different one per balancer when `None`.
    pub seed: Option<u64>,
}

impl Default for LoadBalancerConfig {
    fn default() -> Self {
        LoadBalancerConfig {
            health: HealthConfig::default(),
            dns_refresh: discovery::DEFAULT_DNS_REFRESH,
            seed: None,
        }
    }
}

/// Picks a backend per request by its [`Strategy`]. Shared by every request (`&self`
/// throughout); the backend list is swapped atomically by [`set_backends`](Self::set_backends).
pub struct LoadBalancer {
    strategy: Strategy,
    pool: RwLock<Arc<Pool>>,
    random: Random,
    health: Arc<HealthConfig>,
    /// The backends as given, names unresolved; held while the pool is replaced, so a DNS
    /// refresh never undoes a `set_backends` that overtook it.
    specs: Mutex<discovery::Specs>,
    dns_refresh: Duration,
    resolver_factory: discovery::ResolverFactory,
    /// One permit each: held by the service checking, or refreshing, this balancer.
    checking: Arc<Semaphore>,
    discovering: Arc<Semaphore>,
    /// Sent on each change of the backend list, so the checks follow it.
    changes: watch::Sender<()>,
    hash_key: Option<HashKey>,
    retry: RetryPolicy,
}

impl std::fmt::Debug for LoadBalancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadBalancer")
            .field("strategy", &self.strategy)
            .field("specs", &self.specs())
            .field("backends", &self.backends())
            .field("health", &self.health)
            .field("dns_refresh", &self.dns_refresh)
            .finish_non_exhaustive()
    }
}

impl LoadBalancer {
    /// `backends` are `(address, weight)` pairs; an address whose host is a name stands for
    /// every address it resolves to (see [`discovery`]). Errors name the field: `backends`
    /// when empty, `backends[i].address`, `backends[i].weight`, or `backends[i]` for a name
    /// that does not resolve. Resolving names blocks the calling thread.
    pub fn new<A: AsRef<str>>(
        strategy: Strategy,
        backends: impl IntoIterator<Item = (A, u32)>,
    ) -> Result<Self, ConfigError> {
        Self::with_config(strategy, backends, LoadBalancerConfig::default())
    }

    /// As [`new`](Self::new), with the random strategy's draws fixed by `seed`.
    pub fn with_seed<A: AsRef<str>>(
        strategy: Strategy,
        backends: impl IntoIterator<Item = (A, u32)>,
        seed: u64,
    ) -> Result<Self, ConfigError> {
        let config = LoadBalancerConfig {
            seed: Some(seed),
            ..LoadBalancerConfig::default()
        };
        Self::with_config(strategy, backends, config)
    }

    /// As [`new`](Self::new), configured: backends checked as `config.health` says (see
    /// [`health`]). Errors name the field, `health_check.interval` for one.
    pub fn with_config<A: AsRef<str>>(
        strategy: Strategy,
        backends: impl IntoIterator<Item = (A, u32)>,
        config: LoadBalancerConfig,
    ) -> Result<Self, ConfigError> {
        Self::with_resolver(strategy, backends, config, discovery::system_resolver())
    }

    fn with_resolver<A: AsRef<str>>(
        strategy: Strategy,
        backends: impl IntoIterator<Item = (A, u32)>,
        config: LoadBalancerConfig,
        resolver_factory: discovery::ResolverFactory,
    ) -> Result<Self, ConfigError> {
        config.health.validate()?;
        if config.dns_refresh.is_zero() {
            return Err(ConfigError::new("dns_refresh", "must be positive"));
        }
        let specs = checked_specs(backends)?;
        let resolved = discovery::resolve_blocking(&resolver_factory, &specs)?;
        let health = Arc::new(config.health);
        let backends = build_backends(resolved, &HashMap::new(), &health)?;
        Ok(LoadBalancer {
            strategy,
            pool: RwLock::new(Arc::new(Pool::new(strategy, backends))),
            random: Random(AtomicU64::new(config.seed.unwrap_or_else(random_seed))),
            health,
            specs: Mutex::new(specs),
            dns_refresh: config.dns_refresh,
            resolver_factory,
            checking: Arc::new(Semaphore::new(1)),
            discovering: Arc::new(Semaphore::new(1)),
            changes: watch::Sender::new(()),
            hash_key: None,
            retry: RetryPolicy {
                max_retries: DEFAULT_MAX_RETRIES,
                ..RetryPolicy::default()
            },
        })
    }

    /// What consistent hashing hashes of each request (without one, requests picked through
    /// [`select_for`](Self::select_for) are spread round robin).
    pub fn with_hash_key(mut self, hash_key: Option<HashKey>) -> Self {
        self.hash_key = hash_key;
        self
    }

    pub fn hash_key(&self) -> Option<&HashKey> {
        self.hash_key.as_ref()
    }

    /// The retries and time limits of requests sent to this balancer's backends.
    pub fn with_retry_policy(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// The background services this balancer needs while a server runs it
    /// (`Server::add_background`): its [health checks](Self::health_service), if any, and
    /// its [DNS refresh](Self::discovery_service).
    pub fn background_services(self: &Arc<Self>) -> Vec<Box<dyn BackgroundService>> {
        self.health_service()
            .into_iter()
            .chain([self.discovery_service()])
            .collect()
    }

    /// The background service that runs this balancer's active checks while a server runs
    /// it; `None` without active checks. A balancer is checked by one running service at a
    /// time: a second waits for the first to stop, then takes over. Checks stop with the
    /// server.
    pub fn health_service(self: &Arc<Self>) -> Option<Box<dyn BackgroundService>> {
        let check = self.health.active.clone()?;
        Some(Box::new(health::HealthService {
            balancer: self.clone(),
            check: Arc::new(check),
        }))
    }

    /// The background service that resolves the names among the backends again every
    /// `dns_refresh` (it idles while there are none, so names given later by
    /// [`set_backends`](Self::set_backends) are refreshed too). One at a time per balancer,
    /// as [`health_service`](Self::health_service).
    pub fn discovery_service(self: &Arc<Self>) -> Box<dyn BackgroundService> {
        Box::new(discovery::DiscoveryService {
            balancer: self.clone(),
        })
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// The current backend list, in the order given (a name's addresses in its place).
    pub fn backends(&self) -> Arc<[Arc<Backend>]> {
        self.pool.read().backends.clone()
    }

    /// The backends as last given, names unresolved.
    pub fn specs(&self) -> Arc<[(String, u32)]> {
        self.specs.lock().clone()
    }

    /// Replaces the backend list in one step; a selection sees the old list or the new one.
    /// Names are resolved first (blocking the calling thread). A backend whose address and
    /// weight are unchanged is kept, with its health and counts. On error the list is left
    /// as it was.
    pub fn set_backends<A: AsRef<str>>(
        &self,
        backends: impl IntoIterator<Item = (A, u32)>,
    ) -> Result<(), ConfigError> {
        let specs = checked_specs(backends)?;
        let resolved = discovery::resolve_blocking(&self.resolver_factory, &specs)?;
        let mut current = self.specs.lock();
        self.replace(resolved)?;
        *current = specs;
        Ok(())
    }

    /// Swaps in `backends` (resolved), keeping the backends that stay.
    fn replace(&self, backends: Vec<(String, u32)>) -> Result<(), ConfigError> {
        let current = self.backends();
        let kept: HashMap<(&str, u32), &Arc<Backend>> = current
            .iter()
            .map(|backend| ((backend.addr(), backend.weight()), backend))
            .collect();
        let backends = build_backends(backends, &kept, &self.health)?;
        *self.pool.write() = Arc::new(Pool::new(self.strategy, backends));
        self.changes.send_modify(|()| {});
        Ok(())
    }

    /// A healthy backend for one request, or `None` when none is healthy. `key` is what
    /// consistent hashing hashes (other strategies ignore it).
    pub fn select(&self, key: Option<&[u8]>) -> Option<Selected> {
        let pool = self.pool.read();
        let index = self
            .pick(&pool, key, Backend::is_healthy)
            .or_else(|| self.pick(&pool, key, Backend::passes_active_checks))?;
        Some(Selected::new(&pool.backends[index]))
    }

    /// As [`select`](Self::select), preferring a backend whose address is not in `tried` (a
    /// retry goes elsewhere). In order: a healthy untried one, a healthy one, then among the
    /// passively ejected (when no backend is healthy) an untried one, any one.
    pub fn select_untried(&self, key: Option<&[u8]>, tried: &[&str]) -> Option<Selected> {
        if tried.is_empty() {
            return self.select(key);
        }
        let untried = |backend: &Backend| !tried.contains(&backend.addr());
        let pool = self.pool.read();
        let index = self
            .pick(&pool, key, |b| b.is_healthy() && untried(b))
            .or_else(|| self.pick(&pool, key, Backend::is_healthy))
            .or_else(|| self.pick(&pool, key, |b| b.passes_active_checks() && untried(b)))
            .or_else(|| self.pick(&pool, key, Backend::passes_active_checks))?;
        Some(Selected::new(&pool.backends[index]))
    }

    fn pick(
        &self,
        pool: &Pool,
        key: Option<&[u8]>,
        usable: impl Fn(&Backend) -> bool,
    ) -> Option<usize> {
        match (&pool.derived, self.strategy, key) {
            (Derived::Ring(ring), _, Some(key)) => ring.lookup(key, &pool.backends, usable),
            (Derived::Smooth(current), _, _) => pool.smooth_weighted(current, usable),
            (Derived::Cumulative(cumulative), _, _) => {
                pool.random(cumulative, &self.random, usable)
            }
            (_, Strategy::LeastConnections, _) => pool.least_connections(usable),
            _ => pool.round_robin(usable),
        }
    }
}

/// The backends as given, each checked (errors name `backends[i].address` or `.weight`).
fn checked_specs<A: AsRef<str>>(
    specs: impl IntoIterator<Item = (A, u32)>,
) -> Result<discovery::Specs, ConfigError> {
    let specs: discovery::Specs = specs
        .into_iter()
        .map(|(addr, weight)| (addr.as_ref().to_owned(), weight))
        .collect();
    for (index, (addr, weight)) in specs.iter().enumerate() {
        backend::check_spec(addr, *weight)
            .map_err(|err| err.within(&format!("backends[{index}]")))?;
    }
    if specs.is_empty() {
        return Err(ConfigError::new(
            "backends",
            "at least one backend is needed",
        ));
    }
    Ok(specs)
}

/// Backends for `specs` (checked, names resolved), reusing those in `kept`.
fn build_backends<A: AsRef<str>>(
    specs: impl IntoIterator<Item = (A, u32)>,
    kept: &HashMap<(&str, u32), &Arc<Backend>>,
    health: &Arc<HealthConfig>,
) -> Result<Arc<[Arc<Backend>]>, ConfigError> {
    let backends = specs
        .into_iter()
        .enumerate()
        .map(|(index, (addr, weight))| {
            let addr = addr.as_ref();
            match kept.get(&(addr, weight)) {
                Some(backend) => Ok(Arc::clone(backend)),
                None => Backend::checked(addr, weight, health.clone())
                    .map(Arc::new)
                    .map_err(|err| err.within(&format!("backends[{index}]"))),
            }
        })
        .collect::<Result<Arc<[_]>, _>>()?;
    Ok(backends)
}
