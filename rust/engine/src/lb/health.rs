//! Backend health. Passive checks: what requests observe of their backend ([`Backend::observe`])
//! ejects it for a cool-down after failures in a row. Active checks: a background service
//! ([`LoadBalancer::health_service`](super::LoadBalancer::health_service)) probes each backend
//! on an interval, by TCP connect or HTTP GET. The two verdicts are kept apart (a backend is
//! picked only when both let it) so that neither undoes the other.
//!
//! Defaults, stated here once (the Python layer reads them from here):
//! - active: every 2 s, 1 s timeout, down after 3 failed probes in a row, up after 2 passed
//!   (HAProxy's `inter 2s fall 3 rise 2`); HTTP expects 200-399.
//! - passive: ejected after 3 failures in a row (connect failure, failed exchange or 5xx)
//!   for 10 s; a backend that fails again on its first tries after a cool-down is ejected for
//!   twice as long, up to 5 min. nginx's `max_fails` is 1, but nginx counts no 5xx by
//!   default: with 5xx counted, one bad endpoint would eject a backend at its first error.

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderValue, CONNECTION, HOST, USER_AGENT};
use http::uri::PathAndQuery;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{Backend, ConfigError, LoadBalancer};
use crate::service::{BackgroundService, BoxFuture, ShutdownSignal};

/// Where health logs go: the `ferroxy.health` logger on the Python side.
const LOG_TARGET: &str = "ferroxy.health";

/// What one request learned about its backend, for passive health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// Connecting to the backend failed (refused, unreachable, connect timeout).
    ConnectFailed,
    /// The exchange failed after connecting (reset, read timeout) before a response head.
    ExchangeFailed,
    /// The backend answered with this status (5xx counts against it).
    Status(u16),
}

impl Observation {
    fn is_failure(self) -> bool {
        match self {
            Observation::ConnectFailed | Observation::ExchangeFailed => true,
            Observation::Status(status) => status >= 500,
        }
    }

    fn describe(self) -> String {
        match self {
            Observation::ConnectFailed => "connect failed".into(),
            Observation::ExchangeFailed => "exchange failed".into(),
            Observation::Status(status) => format!("answered {status}"),
        }
    }
}

/// Passive checks: consecutive failures eject a backend for a cool-down that doubles each
/// time it fails again straight after one, from `fail_timeout` up to `max_fail_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PassiveCheck {
    /// Failures in a row that eject a backend; 0 turns passive checks off.
    pub max_fails: u32,
    /// The first cool-down.
    pub fail_timeout: Duration,
    /// The longest cool-down.
    pub max_fail_timeout: Duration,
}

impl Default for PassiveCheck {
    fn default() -> Self {
        PassiveCheck {
            max_fails: 3,
            fail_timeout: Duration::from_secs(10),
            max_fail_timeout: Duration::from_secs(300),
        }
    }
}

impl PassiveCheck {
    /// Errors name the field (`fail_timeout`, `max_fail_timeout`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.fail_timeout.is_zero() {
            return Err(ConfigError::new("fail_timeout", "must be positive"));
        }
        if self.max_fail_timeout < self.fail_timeout {
            return Err(ConfigError::new(
                "max_fail_timeout",
                format!(
                    "must be at least fail_timeout ({}s), got {}s",
                    self.fail_timeout.as_secs_f64(),
                    self.max_fail_timeout.as_secs_f64()
                ),
            ));
        }
        Ok(())
    }

    /// The cool-down for a backend ejected `ejections` times in a row (the first is 1).
    fn cool_down(&self, ejections: u32) -> Duration {
        let doublings = ejections.saturating_sub(1).min(31);
        self.fail_timeout
            .saturating_mul(1 << doublings)
            .min(self.max_fail_timeout)
    }
}

/// What an active check sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A TCP connect that completes within the timeout passes.
    Tcp,
    /// An HTTP/1.1 GET whose response status is expected passes.
    Http {
        path: PathAndQuery,
        /// The `Host` header; the backend's address when `None`.
        host: Option<HeaderValue>,
        expect_status: ExpectStatus,
    },
}

/// Response statuses an HTTP check accepts (100-599).
#[derive(Clone, PartialEq, Eq)]
pub struct ExpectStatus([u64; 10]);

impl ExpectStatus {
    /// Errors name `expect_status` (an empty set, or a status outside 100-599).
    pub fn new(statuses: impl IntoIterator<Item = u16>) -> Result<Self, ConfigError> {
        let mut bits = [0u64; 10];
        for status in statuses {
            if !(100..=599).contains(&status) {
                return Err(ConfigError::new(
                    "expect_status",
                    format!("statuses are 100-599, got {status}"),
                ));
            }
            bits[usize::from(status / 64)] |= 1 << (status % 64);
        }
        if bits == [0; 10] {
            return Err(ConfigError::new(
                "expect_status",
                "at least one status is needed",
            ));
        }
        Ok(ExpectStatus(bits))
    }

    pub fn contains(&self, status: u16) -> bool {
        status < 640 && self.0[usize::from(status / 64)] & (1 << (status % 64)) != 0
    }
}

impl Default for ExpectStatus {
    fn default() -> Self {
        ExpectStatus::new(200..400).expect("200-399 are statuses")
    }
}

impl std::fmt::Debug for ExpectStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries((100..600).filter(|&status| self.contains(status)))
            .finish()
    }
}

/// Active checks: each backend probed every `interval`, on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: Duration,
    /// How long a probe may take (connect, and for HTTP the response head too).
    pub timeout: Duration,
    /// Passed probes in a row that bring an unhealthy backend back.
    pub healthy: u32,
    /// Failed probes in a row that mark a healthy backend unhealthy.
    pub unhealthy: u32,
}

impl HealthCheck {
    /// A TCP connect check with the default interval, timeout and thresholds.
    pub fn tcp() -> Self {
        HealthCheck {
            probe: Probe::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            healthy: 2,
            unhealthy: 3,
        }
    }

    /// An HTTP GET of `path` expecting 200-399, otherwise as [`tcp`](Self::tcp). Errors
    /// name `path`.
    pub fn http(path: &str) -> Result<Self, ConfigError> {
        let path = path
            .starts_with('/')
            .then(|| PathAndQuery::try_from(path).ok())
            .flatten()
            .ok_or_else(|| {
                ConfigError::new(
                    "path",
                    format!("expected a path such as \"/health\", got {path:?}"),
                )
            })?;
        Ok(HealthCheck {
            probe: Probe::Http {
                path,
                host: None,
                expect_status: ExpectStatus::default(),
            },
            ..HealthCheck::tcp()
        })
    }

    /// Errors name the field (`interval`, `timeout`, `healthy`, `unhealthy`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [("interval", self.interval), ("timeout", self.timeout)] {
            if value.is_zero() {
                return Err(ConfigError::new(field, "must be positive"));
            }
        }
        for (field, value) in [("healthy", self.healthy), ("unhealthy", self.unhealthy)] {
            if value == 0 {
                return Err(ConfigError::new(field, "must be at least 1, got 0"));
            }
        }
        Ok(())
    }

    /// Probes `backend` once: `Err` says why it failed.
    async fn probe(&self, backend: &Backend) -> Result<(), String> {
        match tokio::time::timeout(self.timeout, self.exchange(backend)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(format!("no answer within {}s", self.timeout.as_secs_f64())),
        }
    }

    async fn exchange(&self, backend: &Backend) -> Result<(), String> {
        let peer = backend.peer();
        let stream = match peer.socket_addr() {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect(peer.addr()).await,
        }
        .map_err(|error| format!("connect failed: {error}"))?;
        let Probe::Http {
            path,
            host,
            expect_status,
        } = &self.probe
        else {
            return Ok(());
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| format!("HTTP handshake failed: {error}"))?;
        // Driven here, not spawned: dropped (and the socket closed) when the probe ends or
        // times out.
        let connection = async move {
            let _ = connection.await;
        };
        let host = match host {
            Some(host) => host.clone(),
            None => HeaderValue::from_str(peer.addr())
                .map_err(|_| format!("{:?} is no Host header", peer.addr()))?,
        };
        let request = http::Request::get(path.as_str())
            .header(HOST, host)
            .header(USER_AGENT, HeaderValue::from_static("ferroxy-health-check"))
            .header(CONNECTION, HeaderValue::from_static("close"))
            .body(String::new())
            .map_err(|error| error.to_string())?;
        let response = sender.send_request(request);
        tokio::pin!(response);
        let response = tokio::select! {
            response = &mut response => response,
            // The connection may end as it hands the response over: then it is ready (or,
            // when none came, an error).
            () = connection => response.await,
        }
        .map_err(|error| format!("GET {path} failed: {error}"))?;
        let status = response.status().as_u16();
        if expect_status.contains(status) {
            Ok(())
        } else {
            Err(format!("GET {path} answered {status}"))
        }
    }
}

/// A health change, as [`HealthListener`]s are told it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    /// Whether the backend may be picked now.
    pub healthy: bool,
    /// Why, for people: "3 failures in a row (last: connect failed)".
    pub reason: String,
}

/// Told of each health change of a balancer's backends, on the thread that saw it (a
/// runtime worker or a request's thread): it must not block, nor call back into its
/// balancer (it may run while a selection holds the backend list); hand the change off, as
/// the Python layer does to a thread of its own.
pub type HealthListener = Arc<dyn Fn(&Backend, &HealthChange) + Send + Sync>;

/// How a balancer's backends are checked: shared by all of them.
#[derive(Clone, Default)]
pub struct HealthConfig {
    /// Active checks; `None` for none.
    pub active: Option<HealthCheck>,
    pub passive: PassiveCheck,
    pub listener: Option<HealthListener>,
}

impl HealthConfig {
    /// Errors name the field: `health_check.interval`, `fail_timeout`, ...
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(active) = &self.active {
            active
                .validate()
                .map_err(|error| error.within("health_check"))?;
        }
        self.passive.validate()
    }
}

impl std::fmt::Debug for HealthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthConfig")
            .field("active", &self.active)
            .field("passive", &self.passive)
            .field("listener", &self.listener.is_some())
            .finish()
    }
}

const AVAILABLE: u8 = 0;
const EJECTED: u8 = 1;
/// The cool-down is over and the backend gets requests again; a failure now ejects it at
/// once for a longer cool-down, a success makes it [`AVAILABLE`].
const PROBATION: u8 = 2;

/// A backend's passive-check state. Selection reads `state` only (one relaxed load; the
/// deadline too while ejected); a request that went well reads `state` and `failing`.
#[derive(Debug, Default)]
pub(super) struct PassiveState {
    state: AtomicU8,
    /// Failures in a row while available.
    failing: AtomicU32,
    /// Transitions take this, so concurrent observations eject a backend once.
    ejection: Mutex<Ejection>,
}

#[derive(Debug, Default)]
struct Ejection {
    until: Option<Instant>,
    /// Ejections in a row (with only probation between them): what the cool-down doubles by.
    count: u32,
}

impl PassiveState {
    /// Not ejected. The first look after a cool-down ends it (and reports the backend back).
    pub(super) fn admits(&self, backend: &Backend) -> bool {
        if self.state.load(Ordering::Relaxed) != EJECTED {
            return true;
        }
        // Selections never wait for each other here: whoever holds the lock is ending the
        // cool-down or ejecting, and a selection that skips the backend meanwhile is fine.
        let Some(mut ejection) = self.ejection.try_lock() else {
            return false;
        };
        if self.state.load(Ordering::Relaxed) != EJECTED {
            return true;
        }
        if ejection.until.is_some_and(|until| Instant::now() < until) {
            return false;
        }
        ejection.until = None;
        self.state.store(PROBATION, Ordering::Relaxed);
        drop(ejection);
        backend.health_changed(HealthChange {
            healthy: true,
            reason: "its passive-check cool-down is over".into(),
        });
        true
    }

    pub(super) fn is_ejected(&self) -> bool {
        self.state.load(Ordering::Relaxed) == EJECTED
    }

    /// Whether it is ejected and its cool-down still runs; no side effects.
    pub(super) fn keeps_out(&self) -> bool {
        self.is_ejected()
            && self
                .ejection
                .lock()
                .until
                .is_some_and(|until| Instant::now() < until)
    }

    /// Forgets past failures and any ejection: active checks have just seen the backend
    /// come back, which is better evidence than the failures that ejected it (a restarted
    /// backend would otherwise sit out a cool-down that grew while it was down).
    fn clear(&self) {
        let mut ejection = self.ejection.lock();
        *ejection = Ejection::default();
        self.failing.store(0, Ordering::Relaxed);
        self.state.store(AVAILABLE, Ordering::Relaxed);
    }
}

impl PassiveState {
    fn succeeded(&self) {
        match self.state.load(Ordering::Relaxed) {
            // Written only when it changes: most requests succeed, and a store would bounce
            // the cache line between the threads serving this backend.
            AVAILABLE if self.failing.load(Ordering::Relaxed) != 0 => {
                self.failing.store(0, Ordering::Relaxed);
            }
            PROBATION => {
                let mut ejection = self.ejection.lock();
                if self.state.load(Ordering::Relaxed) == PROBATION {
                    self.state.store(AVAILABLE, Ordering::Relaxed);
                    self.failing.store(0, Ordering::Relaxed);
                    ejection.count = 0;
                }
            }
            // An answer to a request sent before the ejection ends nothing.
            _ => {}
        }
    }

    /// The ejection this failure causes, if any.
    fn failed(&self, passive: &PassiveCheck, observation: Observation) -> Option<HealthChange> {
        if passive.max_fails == 0 {
            return None;
        }
        let reason = match self.state.load(Ordering::Relaxed) {
            // Requests picked before the ejection finishing late do not lengthen it.
            EJECTED => return None,
            PROBATION => format!("{} after its cool-down", observation.describe()),
            _ => {
                let failing = self.failing.fetch_add(1, Ordering::Relaxed) + 1;
                if failing < passive.max_fails {
                    return None;
                }
                format!(
                    "{failing} failure{} in a row (last: {})",
                    plural(failing),
                    observation.describe()
                )
            }
        };
        let mut ejection = self.ejection.lock();
        if self.state.load(Ordering::Relaxed) == EJECTED {
            return None;
        }
        ejection.count += 1;
        let cool_down = passive.cool_down(ejection.count);
        ejection.until = Some(Instant::now() + cool_down);
        self.failing.store(0, Ordering::Relaxed);
        self.state.store(EJECTED, Ordering::Relaxed);
        Some(HealthChange {
            healthy: false,
            reason: format!("ejected for {}s: {reason}", cool_down.as_secs_f64()),
        })
    }
}

impl Backend {
    /// Counts `observation` towards this backend's passive health: failures in a row eject
    /// it (see [`PassiveCheck`]); a success resets the count. Cheap when all is well.
    pub fn observe(&self, observation: Observation) {
        if !observation.is_failure() {
            self.passive_state().succeeded();
            return;
        }
        self.count_failure();
        if let Some(change) = self
            .passive_state()
            .failed(&self.health().passive, observation)
        {
            self.health_changed(change);
        }
    }

    /// Logs a change and tells the balancer's listener.
    pub(super) fn health_changed(&self, change: HealthChange) {
        if change.healthy {
            tracing::info!(target: LOG_TARGET, "backend {} is healthy again: {}", self.addr(), change.reason);
        } else {
            tracing::warn!(target: LOG_TARGET, "backend {} is unhealthy: {}", self.addr(), change.reason);
        }
        if let Some(listener) = &self.health().listener {
            listener(self, &change);
        }
    }
}

/// Probes one backend until aborted, turning its active verdict after enough probes in a row
/// go the other way.
async fn check_backend(backend: Arc<Backend>, check: Arc<HealthCheck>) {
    let mut ticks = tokio::time::interval(check.interval);
    // A probe that outlasts the interval delays the next one rather than bunching them.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut streak = 0;
    loop {
        ticks.tick().await;
        let outcome = check.probe(&backend).await;
        let up = backend.passes_active_checks();
        if outcome.is_ok() == up {
            streak = 0;
            continue;
        }
        streak += 1;
        let needed = if up { check.unhealthy } else { check.healthy };
        if streak < needed {
            continue;
        }
        streak = 0;
        let reason = match outcome {
            Ok(()) => format!("{needed} health check{} passed", plural(needed)),
            Err(error) => format!(
                "{needed} health check{} failed (last: {error})",
                plural(needed)
            ),
        };
        if backend.set_healthy(!up) {
            if !up {
                backend.passive_state().clear();
            }
            backend.health_changed(HealthChange {
                healthy: !up,
                reason,
            });
        }
    }
}

fn plural(count: u32) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}

/// Runs a balancer's active checks while a server runs: one task per backend, following
/// [`LoadBalancer::set_backends`]. Of several such services for one balancer (several
/// servers), one checks at a time; the next takes over when it stops.
pub(super) struct HealthService {
    pub(super) balancer: Arc<LoadBalancer>,
    pub(super) check: Arc<HealthCheck>,
}

impl BackgroundService for HealthService {
    fn name(&self) -> &'static str {
        "health checks"
    }

    fn run(self: Box<Self>, mut shutdown: ShutdownSignal) -> BoxFuture {
        Box::pin(async move {
            let checking = self.balancer.checking.clone();
            let _turn = tokio::select! {
                turn = checking.acquire_owned() => turn,
                () = shutdown.begun() => return,
            };
            let mut changes = self.balancer.changes.subscribe();
            // Dropping the set (when shutdown begins) aborts every check.
            let mut checks = tokio::task::JoinSet::new();
            let mut running: Vec<(Arc<Backend>, tokio::task::AbortHandle)> = Vec::new();
            loop {
                changes.mark_unchanged();
                let backends = self.balancer.backends();
                running.retain(|(backend, task)| {
                    let kept = backends.iter().any(|b| Arc::ptr_eq(b, backend));
                    if !kept {
                        task.abort();
                    }
                    kept
                });
                for backend in backends.iter() {
                    if !running.iter().any(|(b, _)| Arc::ptr_eq(b, backend)) {
                        let task = checks.spawn(check_backend(backend.clone(), self.check.clone()));
                        running.push((backend.clone(), task));
                    }
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { break },
                    () = shutdown.begun() => break,
                    // Reap aborted checks so the set holds live ones only.
                    Some(_) = checks.join_next(), if !checks.is_empty() => {}
                }
            }
        })
    }
}
