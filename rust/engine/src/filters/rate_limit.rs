//! `RateLimit`: at most `rate` requests per key (client IP, header, path, cookie, query
//! parameter), counted with the sliding-window estimate pingora-limits uses: the current
//! window's count plus the previous window's count weighted by the part of it still inside
//! the sliding window. A refused request answers `status` with `Retry-After` and is not
//! counted.
//!
//! `burst`: a key that has been quiet may send `rate + burst` requests at once, and its long
//! run average stays `rate`: the counting window is `(N + burst) / N` units long and admits
//! `N + burst` requests (`rate="100/s", burst=50`: 150 per 1.5 s), at most [`MAX_WINDOW`].
//!
//! `client_ip` keys an IPv6 client by its /64 (one host usually holds a whole /64, so
//! rotating addresses inside it would otherwise buy a fresh budget each time); IPv4 by its
//! address.
//!
//! The counters live in this process (bounded: [`MAX_KEYS`], least recently used evicted),
//! or in Redis (`store="redis://..."`) so several instances share one limit. A Redis check
//! is the one filter step that waits ([`super::Step::Wait`]); it never waits longer than
//! `store_timeout`, and a store that fails lets the request through (one warning per
//! [`STORE_WARNING_INTERVAL`]) or answers 503, as `on_store_error` says. After a failure the
//! store is skipped for [`STORE_RETRY_AFTER`] (requests are let through or refused at once,
//! not each after `store_timeout`), then one request tries it again; a call that timed out
//! drops the connection, so a connection that went silent is replaced, not waited on. A call
//! that timed out may still be counted, once Redis gets to it.
//!
//! Why not the `pingora-limits` crate: its `Rate` reads `Instant::now()` itself (no injected
//! clock, so no exact tests); its `observe` counts every event, so leaving refused requests
//! uncounted would take a read and a separate write (racing each other); and its count-min
//! sketch over-counts every key once many distinct keys are seen, so a client sending
//! random header values would get honest clients limited. Here a flood of new keys evicts
//! the least recently seen keys, as nginx's `limit_req` does: a new honest client always
//! gets its own fresh budget. What remains: a client that can make more distinct keys than
//! a shard holds within one of a victim's request intervals evicts the victim's counter,
//! which then starts again from zero (a client with that many keys could as well spread its
//! requests over them).

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use blake2::{Blake2b128, Digest};
use http::{HeaderValue, StatusCode};
use lru::LruCache;
use parking_lot::Mutex;

use crate::lb::{ConfigError, HashKey};
use crate::response::Response;
use crate::session::Session;

/// Keys one local limiter tracks at most: 4096 per shard, about 6 MB per filter when full.
/// A new key past it evicts its shard's least recently seen key.
pub const MAX_KEYS: usize = 65_536;
const SHARDS: usize = 16;
/// The longest counting window a rate and burst may make (`rate="1/h", burst=719`).
pub const MAX_WINDOW: Duration = Duration::from_secs(30 * 24 * 3600);
/// At most one "store unreachable" warning per limiter in this time.
pub const STORE_WARNING_INTERVAL: Duration = Duration::from_secs(10);
/// After a store failure, requests skip the store this long before one tries it again.
pub const STORE_RETRY_AFTER: Duration = Duration::from_secs(1);
/// The status a request gets when the store fails and `on_store_error="deny"`: the client
/// is not over its limit, the proxy cannot tell.
pub const STORE_ERROR_STATUS: StatusCode = StatusCode::SERVICE_UNAVAILABLE;
/// TCP keepalive and `TCP_USER_TIMEOUT` on the store's connection: a peer that vanished
/// without closing it is noticed within a few seconds, not the system's two hours.
const STORE_KEEPALIVE: Duration = Duration::from_secs(1);
const STORE_USER_TIMEOUT: Duration = Duration::from_secs(2);

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
    /// The counters' scope in the store: filters (on any instance) with the same name, key
    /// and rate share their counters. `None`: a name derived from `scope`, the key, the rate
    /// and the burst.
    pub name: Option<String>,
    /// What tells this filter from others with the same key and rate when it has no `name`,
    /// the same on every instance running the same configuration: its place in the filter
    /// list and its condition, as the layer above writes them.
    pub scope: String,
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
            name: None,
            scope: String::new(),
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
        // Without a burst the window is the unit (at most an hour): only a burst makes it long.
        let window = u64::try_from(unit.as_nanos() * u128::from(requests) / u128::from(count))
            .map(Duration::from_nanos)
            .ok()
            .filter(|window| *window <= MAX_WINDOW)
            .ok_or_else(|| {
                ConfigError::new(
                    "burst",
                    format!(
                        "{burst} with rate {rate:?} makes a window of {requests}/{count} units, \
                         over the {} days at most",
                        MAX_WINDOW.as_secs() / 86_400
                    ),
                )
            })?;
        Ok(Limit { requests, window })
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
fn decide(previous: u64, current: u64, elapsed: f64, limit: &Limit) -> Verdict {
    let (previous, current, requests) = (previous as f64, current as f64, limit.requests as f64);
    if previous * (1.0 - elapsed) + current < requests {
        return Verdict::Admit;
    }
    // When the estimate drops under the limit again with no more requests counted: later in
    // this window as the previous one's weight falls, or in the next window, where this
    // window's count is the previous one.
    let fraction_left = if current < requests {
        (1.0 - (requests - current) / previous) - elapsed
    } else {
        (1.0 - elapsed) + (1.0 - requests / current)
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
}

/// Counters in this process: keys hashed (with a per-process random key, so a client cannot
/// aim collisions) into shards of at most `MAX_KEYS / SHARDS` keys each, the least recently
/// seen evicted first (an exact LRU: a list through the table, O(1) per request).
struct LocalCounters {
    hasher: RandomState,
    shards: Box<[Mutex<LruCache<u64, Counts>>]>,
}

impl LocalCounters {
    fn new() -> Self {
        LocalCounters {
            hasher: RandomState::new(),
            // Unbounded (so grown on demand, not allocated full up front), bounded in `check`.
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::unbounded()))
                .collect(),
        }
    }

    /// Count a request for `key` at `since_epoch` unless it is over `limit`.
    fn check(&self, key: &[u8], since_epoch: Duration, limit: &Limit) -> Verdict {
        let hash = self.hasher.hash_one(key);
        let at = Position::of(since_epoch, limit.window);
        let mut shard = self.shards[(hash >> 60) as usize % SHARDS].lock();
        if shard.len() >= MAX_KEYS / SHARDS && !shard.contains(&hash) {
            shard.pop_lru();
        }
        let counts = shard.get_or_insert_mut(hash, Counts::default).at(at.window);
        let verdict = decide(counts.previous, counts.current, at.elapsed, limit);
        if verdict == Verdict::Admit {
            counts.current += 1;
        }
        verdict
    }

    #[cfg(test)]
    fn keys(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

/// Admits a request and counts it, in one atomic step on the server, unless the estimate is
/// at the limit (a refused request is not counted). The window is placed on the server's
/// clock (`TIME`), so instances whose clocks disagree still count the same windows. KEYS:
/// the key's counter name without its window (the window's counters are that name plus
/// `:WINDOW`; a single server, not a cluster, so names made here are fine). ARGV: the
/// limit, the window in microseconds, the counter's lifetime in ms. Returns {admitted,
/// previous, current, microseconds into the window}.
const CHECK_SCRIPT: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local window_us = tonumber(ARGV[2])
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local window = math.floor(now / window_us)
local into = now - window * window_us
local current_key = KEYS[1] .. ':' .. string.format('%d', window)
local previous_key = KEYS[1] .. ':' .. string.format('%d', window - 1)
local current = tonumber(redis.call('GET', current_key) or '0')
local previous = tonumber(redis.call('GET', previous_key) or '0')
if previous * (1 - into / window_us) + current < tonumber(ARGV[1]) then
  current = redis.call('INCR', current_key)
  if current == 1 then redis.call('PEXPIRE', current_key, ARGV[3]) end
  return {1, previous, current, into}
end
return {0, previous, current, into}
";

/// Why a store check gave no verdict.
enum StoreFailure {
    /// The store failed less than [`STORE_RETRY_AFTER`] ago: not asked.
    Skipped,
    Failed(String),
}

/// The connection in use and its generation (one more with each connection made).
#[derive(Default)]
struct Held {
    generation: u64,
    manager: Option<redis::aio::ConnectionManager>,
}

/// Counters in Redis, shared by every instance with the same filter (same name, key and
/// limit).
struct RedisCounters {
    client: redis::Client,
    /// Made on first use, inside the runtime that serves requests (it spawns a task there);
    /// it reconnects by itself when the server closes the connection, and is dropped (a new
    /// one made) when a call times out.
    connection: Mutex<Held>,
    script: redis::Script,
    /// Distinguishes this filter's counters from other filters' in the same database.
    prefix: String,
    timeout: Duration,
    deny_on_error: bool,
    /// When the last "store failed" warning was logged: ms after `started`, plus one (0:
    /// never).
    warned_at: AtomicU64,
    /// While the store is failing: when (ms after `started`, plus one) a request may try it
    /// again; 0 while it answers.
    retry_at: AtomicU64,
    started: Instant,
}

impl RedisCounters {
    fn new(prefix: String, options: &RateLimitOptions, url: &str) -> Result<Self, ConfigError> {
        use redis::IntoConnectionInfo;
        let bad = |message: String| ConfigError::new("store", message);
        if !url.starts_with("redis://") {
            return Err(bad(format!(
                "expected a \"redis://host:port/db\" URL, got {url:?}"
            )));
        }
        let info = url
            .into_connection_info()
            .map_err(|e| bad(format!("{url:?}: {e}")))?
            .set_tcp_settings(store_tcp_settings());
        let client = redis::Client::open(info).map_err(|e| bad(format!("{url:?}: {e}")))?;
        Ok(RedisCounters {
            client,
            connection: Mutex::default(),
            script: redis::Script::new(CHECK_SCRIPT),
            prefix,
            timeout: options.store_timeout,
            deny_on_error: options.on_store_error == "deny",
            warned_at: AtomicU64::new(0),
            retry_at: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    /// Milliseconds since `started`, plus one (so never 0).
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    /// The connection to use and its generation (for [`Self::drop_connection`]).
    fn connection(&self) -> redis::RedisResult<(u64, redis::aio::ConnectionManager)> {
        let mut held = self.connection.lock();
        if let Some(manager) = &held.manager {
            return Ok((held.generation, manager.clone()));
        }
        // A request never waits on the connection's own timeouts (ours is shorter); they
        // bound how long a dead server keeps a connection attempt alive.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        let manager =
            redis::aio::ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        held.generation += 1;
        held.manager = Some(manager.clone());
        Ok((held.generation, manager))
    }

    /// Forget connection `generation` (unless another call already did): the next call
    /// makes a new one. Our timeout cancels the call before the connection's own would
    /// fire, so the connection never sees an error and would never reconnect by itself.
    fn drop_connection(&self, generation: u64) {
        let mut held = self.connection.lock();
        if held.generation == generation {
            held.manager = None;
        }
    }

    /// Whether this request may ask the store: it answered last time, or it failed over
    /// [`STORE_RETRY_AFTER`] ago and no other request is trying it now.
    fn may_ask(&self) -> bool {
        let retry_at = self.retry_at.load(Ordering::Relaxed);
        if retry_at == 0 {
            return true;
        }
        let now = self.now_ms();
        // The one request that moves `retry_at` on tries the store; the others keep
        // skipping it until that try is answered.
        let trying = now + self.timeout.as_millis() as u64 + 1;
        now >= retry_at
            && self
                .retry_at
                .compare_exchange(retry_at, trying, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    async fn check(&self, key: &[u8], limit: &Limit) -> Result<Verdict, StoreFailure> {
        if !self.may_ask() {
            return Err(StoreFailure::Skipped);
        }
        let answer = self.ask(key, limit).await;
        match answer {
            // Read first: a write on every request would bounce the line between cores.
            Ok(_) if self.retry_at.load(Ordering::Relaxed) == 0 => {}
            Ok(_) => self.retry_at.store(0, Ordering::Relaxed),
            Err(_) => self.retry_at.store(
                self.now_ms() + STORE_RETRY_AFTER.as_millis() as u64,
                Ordering::Relaxed,
            ),
        }
        answer.map_err(StoreFailure::Failed)
    }

    async fn ask(&self, key: &[u8], limit: &Limit) -> Result<Verdict, String> {
        let (generation, mut connection) = self.connection().map_err(|e| e.to_string())?;
        let window_us = limit.window.as_micros() as u64;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(format!("{}:{}", self.prefix, key_digest(key)))
            .arg(limit.requests)
            .arg(window_us)
            // Counted while it is the current or the previous window.
            .arg((limit.window * 2).as_millis() as u64 + 1000);
        let call = invocation.invoke_async::<(u8, u64, u64, u64)>(&mut connection);
        match tokio::time::timeout(self.timeout, call).await {
            Err(_) => {
                self.drop_connection(generation);
                Err(format!("no answer within {:?}", self.timeout))
            }
            Ok(Err(e)) => Err(e.to_string()),
            Ok(Ok((1, _, _, _))) => Ok(Verdict::Admit),
            Ok(Ok((_, previous, current, into))) => {
                let elapsed = into as f64 / window_us as f64;
                Ok(match decide(previous, current, elapsed, limit) {
                    // The server's float sum said no, ours yes: at the limit either way.
                    Verdict::Admit => Verdict::Refuse {
                        retry_after: Duration::from_secs(1),
                    },
                    refused => refused,
                })
            }
        }
    }

    /// Log `error` unless a warning went out less than [`STORE_WARNING_INTERVAL`] ago.
    fn warn(&self, error: &str) {
        let now = self.now_ms();
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
    /// `on_store_error`, `store_timeout`, `name`). Nothing connects yet.
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
        if !matches!(options.on_store_error.as_str(), "allow" | "deny") {
            return Err(ConfigError::new(
                "on_store_error",
                format!(
                    "expected \"allow\" or \"deny\", got {:?}",
                    options.on_store_error
                ),
            ));
        }
        let name = match &options.name {
            Some(name) => checked_name(name)?,
            None => default_name(&options.scope, &key, &options.rate, options.burst),
        };
        let counters = match &options.store {
            None => Counters::Local {
                counters: LocalCounters::new(),
                epoch: wall_clock_epoch(limit.window),
            },
            Some(url) => {
                let prefix = format!(
                    "ferroxy:ratelimit:{name}:{}:{}:{}ms",
                    key_spec(&key),
                    limit.requests,
                    limit.window.as_millis()
                );
                Counters::Redis(Box::new(RedisCounters::new(prefix, &options, url)?))
            }
        };
        Ok(RateLimit {
            key,
            limit,
            status: options.status,
            counters,
        })
    }

    /// The request's key; requests without one (no such header) share one budget.
    fn key_of<'a>(&self, session: &'a Session) -> Cow<'a, [u8]> {
        match self.key {
            HashKey::ClientIp => {
                Cow::Owned(client_network(session.client_addr().ip()).into_bytes())
            }
            _ => self.key.extract(session).unwrap_or_default(),
        }
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
            Err(failure) => {
                if let StoreFailure::Failed(error) = failure {
                    redis.warn(&error);
                }
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

/// `name=`: it becomes part of Redis key names, so short and plain.
fn checked_name(name: &str) -> Result<String, ConfigError> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if (1..=64).contains(&name.len()) && name.chars().all(plain) {
        Ok(name.to_owned())
    } else {
        Err(ConfigError::new(
            "name",
            format!("must be 1 to 64 of A-Z a-z 0-9 - _ ., got {name:?}"),
        ))
    }
}

/// A name that differs between filters of one configuration and is the same on every
/// instance running it.
fn default_name(scope: &str, key: &HashKey, rate: &str, burst: u64) -> String {
    let described = format!("{scope}\n{}\n{}\n{burst}", key_spec(key), rate.trim());
    format!("auto-{}", &key_digest(described.as_bytes())[..16])
}

/// The key as written, header names lower-cased (`header:X-User` counts as `header:x-user`).
fn key_spec(key: &HashKey) -> String {
    match key {
        HashKey::ClientIp => "client_ip".to_owned(),
        HashKey::Path => "path".to_owned(),
        HashKey::Header(name) => format!("header:{}", name.as_str()),
        HashKey::Cookie(name) => format!("cookie:{name}"),
        HashKey::Query(name) => format!("query:{name}"),
    }
}

/// A key's value as it is named in Redis: fixed length whatever the value (a 32 KB header
/// makes a 32-character name), and the same on every instance (an unkeyed hash).
fn key_digest(key: &[u8]) -> String {
    Blake2b128::digest(key)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The client's budget: an IPv4 address, or an IPv6 /64.
fn client_network(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let network = Ipv6Addr::from(u128::from(v6) & !(u128::from(u64::MAX)));
            format!("{network}/64")
        }
        v4 => v4.to_string(),
    }
}

/// Keepalive probes and `TCP_USER_TIMEOUT` where the system has them.
fn store_tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::socket2::TcpKeepalive;
    let keepalive = TcpKeepalive::new().with_time(STORE_KEEPALIVE);
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "windows"))]
    let keepalive = keepalive.with_interval(STORE_KEEPALIVE);
    let settings = redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive);
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let settings = settings.set_user_timeout(STORE_USER_TIMEOUT);
    settings
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
        // Previous window full, 5 in this one, a quarter gone: under 10 once
        // 10 * (1 - f) + 5 < 10, f > 0.5: a quarter of a second on.
        let Verdict::Refuse { retry_after } = decide(10, 5, 0.25, &limit) else {
            panic!()
        };
        assert!((retry_after.as_secs_f64() - 0.25).abs() < 1e-9);
        // A long window: 60/h over by a full window waits for most of the next hour.
        let hourly = Limit::parse("60/h", 0).unwrap();
        let Verdict::Refuse { retry_after } = decide(0, 60, 0.5, &hourly) else {
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
    fn a_flood_of_new_keys_stays_bounded_and_new_keys_get_their_own_budget() {
        let counters = LocalCounters::new();
        let limit = limit("5/s", 0);
        let known = |at: u64| counters.check(b"known", ms(at), &limit) == Verdict::Admit;
        assert!(known(0));
        // The flood evicts the least recently seen keys: a key seen through it keeps its
        // count (4 more in this window, not a fresh 5).
        let mut known_admitted = 0;
        for i in 0..(MAX_KEYS as u64 * 3) {
            counters.check(&i.to_le_bytes(), ms(1), &limit);
            if i % 1000 == 0 {
                known_admitted += usize::from(known(1));
            }
        }
        assert!(counters.keys() <= MAX_KEYS, "{} keys", counters.keys());
        assert_eq!(known_admitted, 4, "the known key keeps its own count");
        // In the same window, a thousand new honest clients (reaching every shard, all full
        // of the flood's live keys) each get their own full budget.
        let admitted = (0..1000u16)
            .map(|i| {
                let key = [b"new", &i.to_le_bytes()[..]].concat();
                (0..6)
                    .filter(|_| counters.check(&key, ms(2), &limit) == Verdict::Admit)
                    .count()
            })
            .sum::<usize>();
        assert_eq!(admitted, 5000);
        assert!(counters.keys() <= MAX_KEYS, "{} keys", counters.keys());
    }

    #[test]
    fn a_long_burst_window_is_refused_naming_burst_not_wrapped() {
        assert_eq!(
            Limit::parse("92/h", 471_416_701).unwrap_err().field,
            "burst"
        );
        assert_eq!(
            Limit::parse("1/h", 1_000_000_000).unwrap_err().field,
            "burst"
        );
        assert_eq!(limit("1/h", 719).window, MAX_WINDOW);
        assert_eq!(Limit::parse("1/h", 720).unwrap_err().field, "burst");
    }

    #[test]
    fn store_names_are_bounded_and_agree_across_instances() {
        assert_eq!(key_digest(&[b'x'; 32 * 1024]).len(), 32);
        assert_eq!(key_digest(b"alice"), key_digest(b"alice"));
        assert_ne!(key_digest(b"alice"), key_digest(b"bob"));
        let key = |spec: &str| HashKey::parse(spec).unwrap();
        // The same configuration names its filters alike; another place or condition does not.
        let login = default_name(
            "filters[0] PathPrefix('/login')",
            &key("client_ip"),
            "2/h",
            0,
        );
        let signup = default_name(
            "filters[1] PathPrefix('/signup')",
            &key("client_ip"),
            "2/h",
            0,
        );
        assert_eq!(
            login,
            default_name(
                "filters[0] PathPrefix('/login')",
                &key("client_ip"),
                "2/h",
                0
            )
        );
        assert_ne!(login, signup);
        assert_eq!(
            default_name("", &key("header:X-User"), "2/h", 0),
            default_name("", &key("header:x-user"), "2/h", 0)
        );
        assert_eq!(key_spec(&key("header:X-User")), "header:x-user");
    }

    #[test]
    fn ipv6_clients_share_their_64_and_ipv4_clients_their_address() {
        let ip = |text: &str| client_network(text.parse().unwrap());
        assert_eq!(ip("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(ip("2001:db8:1:2:bbbb::9"), ip("2001:db8:1:2:aaaa::1"));
        assert_ne!(ip("2001:db8:1:3::1"), ip("2001:db8:1:2::1"));
        assert_eq!(ip("192.0.2.7"), "192.0.2.7");
        assert_eq!(ip("::ffff:192.0.2.7"), "192.0.2.7");
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
        assert_eq!(
            options(|o| {
                o.rate = "1/h".into();
                o.burst = 720;
            }),
            "burst"
        );
        for bad in ["", "a:b", "with space", &"x".repeat(65)] {
            let named = RateLimit::new(RateLimitOptions {
                rate: "10/s".into(),
                name: Some(bad.to_owned()),
                ..Default::default()
            });
            assert_eq!(named.map(drop).unwrap_err().field, "name", "{bad:?}");
        }
    }

    /// A store that accepts connections and never answers: a check gives up after the store
    /// timeout, the checks after it skip the store at once, and the request passes or gets
    /// 503 as `on_store_error` says.
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
            for i in 0..5 {
                let started = Instant::now();
                let got = filter.ask_store(&session).await.map(|a| a.status);
                assert_eq!(got, answer, "on_store_error={on_store_error}");
                // The first waits for the store; the next skip it, failed a moment ago.
                let most = if i == 0 { ms(250) } else { ms(10) };
                assert!(
                    started.elapsed() < most,
                    "request {i} waited {:?}",
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
