//! `RateLimit`: at most `rate` requests per key (client IP, header, path, cookie, query
//! parameter), counted with the sliding-window estimate pingora-limits uses: the current
//! window's count plus the previous window's count weighted by the part of it still inside
//! the sliding window. A refused request answers `status` with `Retry-After` and is not
//! counted.
//!
//! `burst`: a key that has been quiet may send `rate + burst` requests at once, and its long
//! run average stays `rate`: the counting window is `(N + burst) / N` units long and admits
//! `N + burst` requests (`rate="100/s", burst=50`: 150 per 1.5 s).
//!
//! The counters live in this process (bounded: [`MAX_KEYS`]), or in Redis
//! (`store="redis://..."`) so several instances share one limit. A Redis check is the one
//! filter step that waits ([`super::Step::Wait`]); it never waits longer than
//! `store_timeout`, and a store that fails lets the request through (one warning per
//! [`STORE_WARNING_INTERVAL`]) or answers 503, as `on_store_error` says.
//!
//! Why not the `pingora-limits` crate: its `Rate` reads `Instant::now()` itself (no injected
//! clock, so no exact tests); its `observe` counts every event, so leaving refused requests
//! uncounted would take a read and a separate write (racing each other); and its count-min
//! sketch over-counts every key once many distinct keys are seen, so a client sending
//! random header values would get honest clients limited. Here a flood of new keys only
//! shares a budget among the new keys.

use std::collections::hash_map::{HashMap, RandomState};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, StatusCode};
use parking_lot::Mutex;

use crate::lb::{ConfigError, HashKey};
use crate::response::Response;
use crate::session::Session;

/// Keys one local limiter tracks at most: 4096 per shard, in tables of 8192 slots of 33
/// bytes, about 4.3 MB per filter when full. Past it, requests whose key is not tracked share
/// one budget per shard until stale keys are swept out.
pub const MAX_KEYS: usize = 65_536;
const SHARDS: usize = 16;
/// At most one "store unreachable" warning per limiter in this time.
pub const STORE_WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// The status a request gets when the store fails and `on_store_error="deny"`: the client
/// is not over its limit, the proxy cannot tell.
pub const STORE_ERROR_STATUS: StatusCode = StatusCode::SERVICE_UNAVAILABLE;

/// What `RateLimit` is given, as the user wrote it; [`RateLimit::new`] checks every field.
#[derive(Debug, Clone)]
pub struct RateLimitOptions {
    /// `client_ip`, `path`, `header:NAME`, `cookie:NAME` or `query:NAME`.
    pub key: String,
    /// `N/s`, `N/m` or `N/h`.
    pub rate: String,
    pub burst: u64,
    pub status: StatusCode,
    /// `redis://host:port/db`, or `None` for counters in this process.
    pub store: Option<String>,
    /// `allow` (fail open) or `deny` (answer [`STORE_ERROR_STATUS`]).
    pub on_store_error: String,
    pub store_timeout: Duration,
}

impl Default for RateLimitOptions {
    fn default() -> Self {
        RateLimitOptions {
            key: "client_ip".into(),
            rate: String::new(),
            burst: 0,
            status: StatusCode::TOO_MANY_REQUESTS,
            store: None,
            on_store_error: "allow".into(),
            store_timeout: Duration::from_millis(50),
        }
    }
}

/// How many requests a key may make per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Requests admitted per window: the rate's N plus the burst.
    pub requests: u64,
    pub window: Duration,
}

impl Limit {
    /// `"N/s"`, `"N/m"` or `"N/h"` with `burst` more at once (see the module's doc).
    pub fn parse(rate: &str, burst: u64) -> Result<Self, ConfigError> {
        let bad = || {
            ConfigError::new(
                "rate",
                format!("expected \"N/s\", \"N/m\" or \"N/h\" with N >= 1, got {rate:?}"),
            )
        };
        let (count, unit) = rate.split_once('/').ok_or_else(bad)?;
        let count: u64 = count.trim().parse().map_err(|_| bad())?;
        let unit = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(bad()),
        };
        if count == 0 || count > 1_000_000_000 {
            return Err(bad());
        }
        if burst > 1_000_000_000 {
            return Err(ConfigError::new("burst", "must be 0..=1000000000"));
        }
        let requests = count + burst;
        let window = unit.as_nanos() * u128::from(requests) / u128::from(count);
        Ok(Limit {
            requests,
            window: Duration::from_nanos(window as u64),
        })
    }
}

/// Where a moment falls among the windows: which one, and how much of it has gone by (0..1).
#[derive(Debug, Clone, Copy)]
struct Position {
    window: u64,
    elapsed: f64,
}

impl Position {
    fn of(since_epoch: Duration, window: Duration) -> Self {
        let (now, window) = (since_epoch.as_nanos(), window.as_nanos());
        Position {
            window: (now / window) as u64,
            elapsed: (now % window) as f64 / window as f64,
        }
    }
}

/// The verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Admit,
    /// Over the limit; the estimate falls back under it after this long.
    Refuse {
        retry_after: Duration,
    },
}

/// The sliding-window estimate: `previous` weighted by the part of the previous window still
/// inside the sliding window, plus `current`. A request is admitted while the estimate is
/// under the limit.
fn decide(previous: u64, current: u64, at: Position, limit: &Limit) -> Verdict {
    let (previous, current, requests) = (previous as f64, current as f64, limit.requests as f64);
    if previous * (1.0 - at.elapsed) + current < requests {
        return Verdict::Admit;
    }
    // When the estimate drops under the limit again with no more requests counted: later in
    // this window as the previous one's weight falls, or in the next window, where this
    // window's count is the previous one.
    let fraction_left = if current < requests {
        (1.0 - (requests - current) / previous) - at.elapsed
    } else {
        (1.0 - at.elapsed) + (1.0 - requests / current)
    };
    Verdict::Refuse {
        retry_after: limit.window.mul_f64(fraction_left.max(0.0)),
    }
}

/// One key's counts in the window `window` and the one before it.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    window: u64,
    current: u64,
    previous: u64,
}

impl Counts {
    fn at(&mut self, window: u64) -> &mut Self {
        if window != self.window {
            self.previous = if window == self.window + 1 {
                self.current
            } else {
                0
            };
            self.current = 0;
            self.window = window;
        }
        self
    }

    /// Counts nothing inside the sliding window of `window`.
    fn is_stale(&self, window: u64) -> bool {
        self.window + 1 < window
    }
}

#[derive(Debug, Default)]
struct Shard {
    keys: HashMap<u64, Counts>,
    /// The budget keys share while `keys` is full of live ones.
    overflow: Counts,
    /// The window in which stale keys were last swept out (at most one sweep per window).
    swept: u64,
}

/// Counters in this process: keys hashed (with a per-process random key, so a client cannot
/// aim collisions) into shards of at most `MAX_KEYS / SHARDS` keys each.
struct LocalCounters {
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl LocalCounters {
    fn new() -> Self {
        LocalCounters {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    /// Count a request for `key` at `since_epoch` unless it is over `limit`.
    fn check(&self, key: &[u8], since_epoch: Duration, limit: &Limit) -> Verdict {
        let hash = self.hasher.hash_one(key);
        let at = Position::of(since_epoch, limit.window);
        let mut shard = self.shards[(hash >> 60) as usize % SHARDS].lock();
        let shard = &mut *shard;
        if shard.keys.len() >= MAX_KEYS / SHARDS
            && shard.swept != at.window
            && !shard.keys.contains_key(&hash)
        {
            shard.swept = at.window;
            shard.keys.retain(|_, counts| !counts.is_stale(at.window));
        }
        let counts = if shard.keys.len() < MAX_KEYS / SHARDS || shard.keys.contains_key(&hash) {
            shard.keys.entry(hash).or_default()
        } else {
            &mut shard.overflow
        };
        let counts = counts.at(at.window);
        let verdict = decide(counts.previous, counts.current, at, limit);
        if verdict == Verdict::Admit {
            counts.current += 1;
        }
        verdict
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.shards.iter().map(|s| s.lock().keys.len()).sum()
    }
}

/// Admits a request and counts it, in one atomic step on the server, unless the estimate is
/// at the limit (a refused request is not counted). KEYS: this window's counter, the
/// previous window's. ARGV: the limit, the previous window's weight, the counter's lifetime
/// in ms. Returns {admitted, previous, current}.
const CHECK_SCRIPT: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
if previous * tonumber(ARGV[2]) + current < tonumber(ARGV[1]) then
  current = redis.call('INCR', KEYS[1])
  if current == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
  return {1, previous, current}
end
return {0, previous, current}
";

/// Counters in Redis, shared by every instance with the same filter (same key kind and
/// limit). Windows are counted from the Unix epoch, so instances agree on them as far as
/// their clocks agree.
struct RedisCounters {
    client: redis::Client,
    /// Made on first use, inside the runtime that serves requests (it spawns a task there);
    /// it reconnects by itself when the server comes back.
    connection: OnceLock<redis::aio::ConnectionManager>,
    script: redis::Script,
    /// Distinguishes this filter's counters from other filters' in the same database.
    prefix: String,
    timeout: Duration,
    deny_on_error: bool,
    /// When the last "store failed" warning was logged: ms after `started`, plus one (0:
    /// never).
    warned_at: AtomicU64,
    started: Instant,
}

impl RedisCounters {
    fn new(
        options: &RateLimitOptions,
        url: &str,
        limit: &Limit,
        deny_on_error: bool,
    ) -> Result<Self, ConfigError> {
        let bad = |message: String| ConfigError::new("store", message);
        if !url.starts_with("redis://") {
            return Err(bad(format!(
                "expected a \"redis://host:port/db\" URL, got {url:?}"
            )));
        }
        let client = redis::Client::open(url).map_err(|e| bad(format!("{url:?}: {e}")))?;
        Ok(RedisCounters {
            client,
            connection: OnceLock::new(),
            script: redis::Script::new(CHECK_SCRIPT),
            prefix: format!(
                "ferroxy:ratelimit:{}:{}:{}ms",
                options.key,
                limit.requests,
                limit.window.as_millis()
            ),
            timeout: options.store_timeout,
            deny_on_error,
            warned_at: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    fn connection(&self) -> redis::RedisResult<redis::aio::ConnectionManager> {
        if let Some(connection) = self.connection.get() {
            return Ok(connection.clone());
        }
        // A request never waits on the connection's own timeouts (ours is shorter); they
        // bound how long a dead server keeps a connection attempt alive.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        let made =
            redis::aio::ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        Ok(self.connection.get_or_init(|| made).clone())
    }

    async fn check(&self, key: &[u8], limit: &Limit) -> Result<Verdict, String> {
        let since_epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let at = Position::of(since_epoch, limit.window);
        let counter = |window: u64| {
            let mut name = format!("{}:{window}:", self.prefix).into_bytes();
            name.extend_from_slice(key);
            name
        };
        let mut connection = self.connection().map_err(|e| e.to_string())?;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(counter(at.window))
            .key(counter(at.window.wrapping_sub(1)))
            .arg(limit.requests)
            .arg(1.0 - at.elapsed)
            // Counted while it is the current or the previous window.
            .arg((limit.window * 2).as_millis() as u64 + 1000);
        let call = invocation.invoke_async::<(u8, u64, u64)>(&mut connection);
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok((1, _, _))) => Ok(Verdict::Admit),
            Ok(Ok((_, previous, current))) => Ok(match decide(previous, current, at, limit) {
                // The server's float sum said no, ours yes: at the limit either way.
                Verdict::Admit => Verdict::Refuse {
                    retry_after: Duration::from_secs(1),
                },
                refused => refused,
            }),
        }
    }

    /// Log `error` unless a warning went out less than [`STORE_WARNING_INTERVAL`] ago.
    fn warn(&self, error: &str) {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let last = self.warned_at.load(Ordering::Relaxed);
        let interval = STORE_WARNING_INTERVAL.as_millis() as u64;
        if (last == 0 || now.saturating_sub(last) >= interval)
            && self
                .warned_at
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let url = self.client.get_connection_info().addr();
            let then = if self.deny_on_error {
                "requests get 503"
            } else {
                "requests pass unlimited"
            };
            tracing::warn!(
                target: "ferroxy.rate_limit",
                "RateLimit store {url} failed ({error}): {then} until it answers \
                 (at most one such warning per {} s)",
                STORE_WARNING_INTERVAL.as_secs()
            );
        }
    }
}

enum Counters {
    Local {
        counters: LocalCounters,
        /// Where window 0 begins.
        epoch: Instant,
    },
    Redis(Box<RedisCounters>),
}

/// A compiled `RateLimit` filter; one per filter, its counters shared by every request.
pub struct RateLimit {
    key: HashKey,
    limit: Limit,
    status: StatusCode,
    counters: Counters,
}

impl std::fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("key", &self.key)
            .field("limit", &self.limit)
            .field("status", &self.status)
            .field(
                "store",
                &match &self.counters {
                    Counters::Local { .. } => "local".to_owned(),
                    Counters::Redis(redis) => redis.prefix.clone(),
                },
            )
            .finish()
    }
}

/// What the synchronous filter run does with a request.
pub(crate) enum Check {
    Admit,
    Refuse(Response),
    /// The counters are in a store: ask it ([`RateLimit::ask_store`]).
    AskStore,
}

impl RateLimit {
    /// Check every option; errors name the field (`rate`, `burst`, `key`, `status`, `store`,
    /// `on_store_error`, `store_timeout`). Nothing connects yet.
    pub fn new(options: RateLimitOptions) -> Result<Self, ConfigError> {
        let key = HashKey::parse(&options.key).map_err(|e| ConfigError::new("key", e.message))?;
        let limit = Limit::parse(&options.rate, options.burst)?;
        if !(400..=599).contains(&options.status.as_u16()) {
            return Err(ConfigError::new(
                "status",
                format!("must be 400..=599, got {}", options.status.as_u16()),
            ));
        }
        if options.store_timeout.is_zero() || options.store_timeout > Duration::from_secs(10) {
            return Err(ConfigError::new(
                "store_timeout",
                format!(
                    "must be over 0 and at most 10 seconds, got {}",
                    options.store_timeout.as_secs_f64()
                ),
            ));
        }
        let deny_on_error = match options.on_store_error.as_str() {
            "allow" => false,
            "deny" => true,
            other => {
                return Err(ConfigError::new(
                    "on_store_error",
                    format!("expected \"allow\" or \"deny\", got {other:?}"),
                ))
            }
        };
        let counters = match &options.store {
            None => Counters::Local {
                counters: LocalCounters::new(),
                epoch: wall_clock_epoch(limit.window),
            },
            Some(url) => Counters::Redis(Box::new(RedisCounters::new(
                &options,
                url,
                &limit,
                deny_on_error,
            )?)),
        };
        Ok(RateLimit {
            key,
            limit,
            status: options.status,
            counters,
        })
    }

    /// The request's key; requests without one (no such header) share one budget.
    fn key_of<'a>(&self, session: &'a Session) -> std::borrow::Cow<'a, [u8]> {
        self.key.extract(session).unwrap_or_default()
    }

    pub(crate) fn check(&self, session: &Session) -> Check {
        match &self.counters {
            Counters::Local { counters, epoch } => {
                let key = self.key_of(session);
                self.answer(counters.check(&key, epoch.elapsed(), &self.limit))
            }
            Counters::Redis(_) => Check::AskStore,
        }
    }

    /// The store's verdict on the request (`Some` answers it).
    pub(crate) async fn ask_store(&self, session: &Session) -> Option<Response> {
        let Counters::Redis(redis) = &self.counters else {
            return None;
        };
        let key = self.key_of(session);
        match redis.check(&key, &self.limit).await {
            Ok(verdict) => match self.answer(verdict) {
                Check::Refuse(answer) => Some(answer),
                _ => None,
            },
            Err(error) => {
                redis.warn(&error);
                redis.deny_on_error.then(|| {
                    let mut answer = Response::status_page(STORE_ERROR_STATUS);
                    answer
                        .headers
                        .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
                    answer
                })
            }
        }
    }

    fn answer(&self, verdict: Verdict) -> Check {
        match verdict {
            Verdict::Admit => Check::Admit,
            Verdict::Refuse { retry_after } => {
                let mut answer = Response::status_page(self.status);
                answer.headers.insert(
                    http::header::RETRY_AFTER,
                    HeaderValue::from(retry_after_seconds(retry_after)),
                );
                Check::Refuse(answer)
            }
        }
    }
}

/// An instant a whole number of windows after the Unix epoch, so local windows begin where
/// the Redis store's do (a "N/s" window on a whole second of the wall clock); the local
/// counters then count from it on the monotonic clock.
fn wall_clock_epoch(window: Duration) -> Instant {
    let unix = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let into_window = Duration::from_nanos((unix.as_nanos() % window.as_nanos()) as u64);
    let now = Instant::now();
    now.checked_sub(into_window).unwrap_or(now)
}

/// `Retry-After` is whole seconds: rounded up, at least 1.
fn retry_after_seconds(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(rate: &str, burst: u64) -> Limit {
        Limit::parse(rate, burst).unwrap()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Offer `n` requests of `key` at 300/s from `start` ms; how many were admitted.
    fn offer(counters: &LocalCounters, key: &[u8], limit: &Limit, start: u64, n: u64) -> u64 {
        (0..n)
            .filter(|i| {
                let at = ms(start) + Duration::from_micros(i * 1_000_000 / 300);
                counters.check(key, at, limit) == Verdict::Admit
            })
            .count() as u64
    }

    #[test]
    fn rates_and_bursts_parse_into_a_window() {
        assert_eq!(
            limit("100/s", 0),
            Limit {
                requests: 100,
                window: Duration::from_secs(1)
            }
        );
        assert_eq!(limit("100/s", 50).window, ms(1500));
        assert_eq!(limit("30/m", 0).window, Duration::from_secs(60));
        assert_eq!(limit(" 2 / h ", 1).requests, 3);
        for bad in ["", "100", "0/s", "-1/s", "1.5/s", "10/d", "x/s", "10/"] {
            assert_eq!(Limit::parse(bad, 0).unwrap_err().field, "rate", "{bad:?}");
        }
    }

    #[test]
    fn a_quiet_key_gets_its_limit_at_once_then_nothing_until_the_estimate_falls() {
        let counters = LocalCounters::new();
        let limit = limit("10/s", 0);
        for _ in 0..10 {
            assert_eq!(counters.check(b"a", ms(100), &limit), Verdict::Admit);
        }
        let Verdict::Refuse { retry_after } = counters.check(b"a", ms(100), &limit) else {
            panic!("the 11th request in a window is refused");
        };
        // Ten in this window: in the next one the estimate is 10 * (1 - elapsed), under 10
        // as soon as any of it has gone by.
        assert!(retry_after.abs_diff(ms(900)) < Duration::from_micros(1));
        assert_eq!(retry_after_seconds(retry_after), 1);
        // Refused requests were not counted: one second on, the previous window holds 10.
        assert_eq!(
            counters.check(b"a", ms(1000), &limit),
            Verdict::Refuse {
                retry_after: Duration::ZERO
            }
        );
        assert_eq!(counters.check(b"a", ms(1001), &limit), Verdict::Admit);
        // 10 * 0.5 = 5 weighted, plus the one admitted: 4 more at half-way.
        let admitted = (0..10)
            .filter(|_| counters.check(b"a", ms(1500), &limit) == Verdict::Admit)
            .count();
        assert_eq!(admitted, 4);
    }

    #[test]
    fn retry_after_says_when_the_estimate_falls_under_the_limit() {
        let limit = limit("10/s", 0);
        let at = |elapsed| Position { window: 1, elapsed };
        // Previous window full, 5 in this one, a quarter gone: under 10 once
        // 10 * (1 - f) + 5 < 10, f > 0.5: a quarter of a second on.
        let Verdict::Refuse { retry_after } = decide(10, 5, at(0.25), &limit) else {
            panic!()
        };
        assert!((retry_after.as_secs_f64() - 0.25).abs() < 1e-9);
        // A long window: 60/h over by a full window waits for most of the next hour.
        let hourly = Limit::parse("60/h", 0).unwrap();
        let Verdict::Refuse { retry_after } = decide(0, 60, at(0.5), &hourly) else {
            panic!()
        };
        assert_eq!(retry_after_seconds(retry_after), 1800);
    }

    #[test]
    fn offered_three_times_the_rate_about_the_rate_passes() {
        let counters = LocalCounters::new();
        let limit = limit("100/s", 0);
        let admitted: u64 = (0..5)
            .map(|s| offer(&counters, b"k", &limit, s * 1000, 300))
            .sum();
        assert!(
            (450..=550).contains(&admitted),
            "{admitted} of 1500 admitted"
        );
    }

    #[test]
    fn a_burst_passes_at_once_and_the_long_run_rate_stays() {
        let counters = LocalCounters::new();
        let limit = limit("100/s", 50);
        let at_once = (0..200)
            .filter(|_| counters.check(b"k", ms(10), &limit) == Verdict::Admit)
            .count();
        assert_eq!(at_once, 150);
        let admitted: u64 = (1..=20)
            .map(|s| offer(&counters, b"k", &limit, s * 1000, 300))
            .sum();
        let per_second = admitted as f64 / 20.0;
        assert!((90.0..=115.0).contains(&per_second), "{per_second}/s");
    }

    #[test]
    fn keys_have_their_own_budgets() {
        let counters = LocalCounters::new();
        let limit = limit("2/s", 0);
        for key in [&b"a"[..], b"b"] {
            assert_eq!(counters.check(key, ms(0), &limit), Verdict::Admit);
            assert_eq!(counters.check(key, ms(0), &limit), Verdict::Admit);
            assert!(matches!(
                counters.check(key, ms(0), &limit),
                Verdict::Refuse { .. }
            ));
        }
    }

    #[test]
    fn a_flood_of_new_keys_stays_bounded_and_leaves_known_keys_their_budget() {
        let counters = LocalCounters::new();
        let limit = limit("5/s", 0);
        assert_eq!(counters.check(b"known", ms(0), &limit), Verdict::Admit);
        for i in 0..(MAX_KEYS as u64 * 3) {
            counters.check(&i.to_le_bytes(), ms(1), &limit);
        }
        assert!(counters.keys() <= MAX_KEYS, "{} keys", counters.keys());
        let known = (0..10)
            .filter(|_| counters.check(b"known", ms(2), &limit) == Verdict::Admit)
            .count();
        assert_eq!(known, 4, "the known key keeps its own count");
        // Two windows on, the flood's keys are stale and swept out: new keys get their own
        // budget again (in the shared one, they would get 5 admitted per shard at most). A
        // thousand keys reach every shard, so every shard is swept.
        let admitted = (0..1000u16)
            .map(|i| {
                let key = i.to_le_bytes();
                (0..5)
                    .filter(|_| counters.check(&key, ms(2500), &limit) == Verdict::Admit)
                    .count()
            })
            .sum::<usize>();
        assert_eq!(admitted, 5000);
        assert_eq!(counters.keys(), 1000);
    }

    #[test]
    fn bad_options_name_the_field() {
        let options = |edit: fn(&mut RateLimitOptions)| {
            let mut options = RateLimitOptions {
                rate: "10/s".into(),
                ..Default::default()
            };
            edit(&mut options);
            RateLimit::new(options).map(drop).unwrap_err().field
        };
        assert_eq!(options(|o| o.key = "ip".into()), "key");
        assert_eq!(options(|o| o.key = "header:".into()), "key");
        assert_eq!(options(|o| o.rate = "10/d".into()), "rate");
        assert_eq!(options(|o| o.status = StatusCode::OK), "status");
        assert_eq!(options(|o| o.store = Some("http://x".into())), "store");
        assert_eq!(options(|o| o.store = Some("redis://".into())), "store");
        assert_eq!(
            options(|o| o.on_store_error = "maybe".into()),
            "on_store_error"
        );
        assert_eq!(
            options(|o| o.store_timeout = Duration::ZERO),
            "store_timeout"
        );
    }

    /// A store that accepts connections and never answers: each check gives up after the
    /// store timeout, and the request passes or gets 503 as `on_store_error` says.
    #[tokio::test]
    async fn a_store_that_never_answers_costs_at_most_its_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}/0", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let session = crate::session::test_session("GET", "/", &[]);
        for (on_store_error, answer) in [("allow", None), ("deny", Some(STORE_ERROR_STATUS))] {
            let filter = RateLimit::new(RateLimitOptions {
                rate: "10/s".into(),
                store: Some(url.clone()),
                on_store_error: on_store_error.into(),
                ..Default::default()
            })
            .unwrap();
            assert!(matches!(filter.check(&session), Check::AskStore));
            for _ in 0..3 {
                let started = Instant::now();
                let got = filter.ask_store(&session).await.map(|a| a.status);
                assert_eq!(got, answer, "on_store_error={on_store_error}");
                assert!(
                    started.elapsed() < ms(250),
                    "waited {:?}",
                    started.elapsed()
                );
            }
        }
    }

    #[test]
    fn a_refused_request_answers_the_status_with_retry_after() {
        let filter = RateLimit::new(RateLimitOptions {
            key: "header:x-user".into(),
            rate: "1/m".into(),
            status: StatusCode::from_u16(420).unwrap(),
            ..Default::default()
        })
        .unwrap();
        let session = crate::session::test_session("GET", "/", &[("x-user", "a")]);
        assert!(matches!(filter.check(&session), Check::Admit));
        let Check::Refuse(answer) = filter.check(&session) else {
            panic!("the second request in a minute is refused");
        };
        assert_eq!(answer.status.as_u16(), 420);
        let seconds: u64 = answer.headers["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&seconds), "{seconds}");
        let other = crate::session::test_session("GET", "/", &[("x-user", "b")]);
        assert!(matches!(filter.check(&other), Check::Admit));
    }
}
