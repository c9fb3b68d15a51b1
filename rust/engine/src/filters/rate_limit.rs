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
//! [`STORE_WARNING_INTERVAL`]) or answers 503, as `on_store_error` says.
//!
//! The connection is made and warmed up (connect, `SCRIPT LOAD`) in a task of its own, given
//! [`STORE_CONNECT_TIMEOUT`] whatever `store_timeout` is, so a distant Redis is reached
//! however short the requests' timeout; requests skip the store until it is ready (the one
//! that started it waits for it up to `store_timeout`). After a failure the store is skipped
//! for [`STORE_RETRY_AFTER`] (requests are let through or refused at once, not each after
//! `store_timeout`), then one request tries it again; only a call started after the failure
//! ends the skipping. A timed-out call is a failure of the connection (dropped, a new one
//! made, the store skipped) only if the connection has answered nothing for as long as the
//! timeout, or after [`TIMEOUTS_BEFORE_DROP`] in a row; else it fails that request alone. An
//! error that leaves the connection unusable or the server unable to count (`READONLY`,
//! `LOADING`, `MASTERDOWN`) drops it too. A dropped connection's task ends once the calls on
//! it have given up. A call that timed out may still be counted, once Redis gets to it.
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
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
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
    /// and rate share their counters. `None`: a name derived from [`Self::identity`] and
    /// `occurrence`. Only with a `store`.
    pub name: Option<String>,
    /// What tells this filter from others with the same key and rate when it has no `name`,
    /// the same on every instance running the same configuration: its condition, as the
    /// layer above writes it.
    pub scope: String,
    /// How many filters before this one in its list have the same [`Self::identity`]; its
    /// place among those only, so adding or moving other filters does not rename it.
    pub occurrence: usize,
}

impl RateLimitOptions {
    /// What the default name is made of besides `occurrence`: the scope, the key (header
    /// names lower-cased) and the limit, as written.
    pub fn identity(&self) -> String {
        let key = HashKey::parse(&self.key).map_or_else(|_| self.key.clone(), |k| key_spec(&k));
        format!(
            "{}\n{key}\n{}\n{}",
            self.scope,
            self.rate.trim(),
            self.burst
        )
    }
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
            occurrence: 0,
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
        let count = |counts: &mut Counts| {
            let counts = counts.at(at.window);
            let verdict = decide(counts.previous, counts.current, at.elapsed, limit);
            if verdict == Verdict::Admit {
                counts.current += 1;
            }
            verdict
        };
        // A known key is looked up once; only a new one again, to be added.
        if let Some(counts) = shard.get_mut(&hash) {
            return count(counts);
        }
        if shard.len() >= MAX_KEYS / SHARDS {
            shard.pop_lru();
        }
        count(shard.get_or_insert_mut(hash, Counts::default))
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
    /// The store failed less than [`STORE_RETRY_AFTER`] ago, or its connection is still
    /// being made: not asked.
    Skipped,
    Failed(String),
}

/// A connection to the store that has answered (its warm-up at least), and its
/// generation (one more with each connection made). Dropping the last clone of
/// `connection` aborts its background task, so a dropped connection whose peer never
/// answers leaves nothing running once the calls on it have given up.
struct Link {
    generation: u64,
    connection: redis::aio::MultiplexedConnection,
    /// When it last answered: ms after `RedisCounters::started`, plus one.
    answered_at: AtomicU64,
    /// Calls on it in a row that got no answer in time.
    timeouts_in_a_row: AtomicU32,
}

/// The store's connection, as far as it has got.
#[derive(Default)]
enum Held {
    /// None: the next request that may ask the store starts making one.
    #[default]
    Idle,
    /// Being made and warmed up in a task of its own; requests skip the store meanwhile.
    Connecting,
    Ready(Arc<Link>),
}

#[derive(Default)]
struct Holder {
    generation: u64,
    held: Held,
    /// Failures that skipped the store ([`RedisCounters::trip`]), for telling a call that
    /// started after the last one (whose answer may end the skipping) from one that did not.
    trips: u64,
}

/// Counters in Redis, shared by every instance with the same filter (same name, key and
/// limit).
struct RedisCounters {
    client: redis::Client,
    /// Made, the first time a request needs it and again after it is dropped, in a task of
    /// its own (connect, then `SCRIPT LOAD`), so no request's timeout cuts a slow set-up
    /// short; dropped when it fails or goes silent.
    holder: Mutex<Holder>,
    /// `holder.trips`, readable without the lock.
    trips: AtomicU64,
    script: redis::Script,
    /// Distinguishes this filter's counters from other filters' in the same database.
    prefix: String,
    timeout: Duration,
    deny_on_error: bool,
    /// When the last "store failed" warning was logged: ms after `started`, plus one (0:
    /// never).
    warned_at: AtomicU64,
    /// While the store is skipped: when (ms after `started`, plus one) a request may try it
    /// again; 0 while it answers.
    retry_at: AtomicU64,
    started: Instant,
}

/// How long making and warming up a connection may take before it counts as failed.
/// Requests skip the store meanwhile, so it need not fit in `store_timeout`.
pub const STORE_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Calls in a row on one connection that may time out, while it answers others, before it
/// is dropped and the store skipped.
pub const TIMEOUTS_BEFORE_DROP: u32 = 3;

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
            holder: Mutex::default(),
            trips: AtomicU64::new(0),
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

    /// The connection to use, or `None` while it is being made (this request started
    /// making it if there was none, and waits for it until `deadline`).
    async fn link(self: &Arc<Self>, deadline: tokio::time::Instant) -> Option<Arc<Link>> {
        let made = {
            let mut holder = self.holder.lock();
            match &holder.held {
                Held::Ready(link) => return Some(link.clone()),
                Held::Connecting => return None,
                Held::Idle => {
                    holder.held = Held::Connecting;
                    self.start_connecting(holder.trips)
                }
            }
        };
        tokio::time::timeout_at(deadline, made).await.ok()?.ok()
    }

    /// Make and warm up a connection in a task of its own, so it is kept however long it
    /// takes (up to [`STORE_CONNECT_TIMEOUT`]); `trips`: the trips before it started.
    fn start_connecting(self: &Arc<Self>, trips: u64) -> tokio::sync::oneshot::Receiver<Arc<Link>> {
        let (made, receiver) = tokio::sync::oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move {
            let connected = tokio::time::timeout(STORE_CONNECT_TIMEOUT, this.connect()).await;
            let mut holder = this.holder.lock();
            match connected {
                Ok(Ok(connection)) => {
                    holder.generation += 1;
                    let link = Arc::new(Link {
                        generation: holder.generation,
                        connection,
                        answered_at: AtomicU64::new(this.now_ms()),
                        timeouts_in_a_row: AtomicU32::new(0),
                    });
                    holder.held = Held::Ready(link.clone());
                    this.recovered(&holder, trips);
                    drop(holder);
                    let _ = made.send(link);
                }
                failed => {
                    holder.held = Held::Idle;
                    this.trip(&mut holder);
                    drop(holder);
                    this.warn(&match failed {
                        Ok(Err(e)) => format!("connecting: {e}"),
                        _ => format!("not connected within {STORE_CONNECT_TIMEOUT:?}"),
                    });
                }
            }
        });
        receiver
    }

    async fn connect(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        // No response timeout of its own: ours bounds each call (a timeout firing inside the
        // connection would look like any other error); the connect timeout bounds set-up.
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(STORE_CONNECT_TIMEOUT))
            .set_response_timeout(None);
        let mut connection = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        self.script.load_async(&mut connection).await?;
        Ok(connection)
    }

    /// Forget connection `generation` (unless it was already replaced): the next request
    /// that may ask the store starts making a new one.
    fn drop_connection(&self, generation: u64) {
        let mut holder = self.holder.lock();
        if matches!(&holder.held, Held::Ready(link) if link.generation == generation) {
            holder.held = Held::Idle;
        }
    }

    /// Skip the store for [`STORE_RETRY_AFTER`].
    fn trip(&self, holder: &mut Holder) {
        holder.trips += 1;
        self.trips.store(holder.trips, Ordering::Relaxed);
        self.retry_at.store(
            self.now_ms() + STORE_RETRY_AFTER.as_millis() as u64,
            Ordering::Relaxed,
        );
    }

    /// The store answered a call that started after `trips` trips: stop skipping it, unless
    /// it tripped again while the call was under way.
    fn recovered(&self, holder: &Holder, trips: u64) {
        if holder.trips == trips {
            self.retry_at.store(0, Ordering::Relaxed);
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

    async fn check(self: &Arc<Self>, key: &[u8], limit: &Limit) -> Result<Verdict, StoreFailure> {
        if !self.may_ask() {
            return Err(StoreFailure::Skipped);
        }
        let trips = self.trips.load(Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let link = self.link(deadline).await.ok_or(StoreFailure::Skipped)?;
        let answer = self.ask(&link, key, limit, deadline).await;
        match answer {
            Ok(_) => {
                link.answered_at.store(self.now_ms(), Ordering::Relaxed);
                // Read first: a write on every request would bounce the line between cores.
                if link.timeouts_in_a_row.load(Ordering::Relaxed) != 0 {
                    link.timeouts_in_a_row.store(0, Ordering::Relaxed);
                }
                if self.retry_at.load(Ordering::Relaxed) != 0 {
                    self.recovered(&self.holder.lock(), trips);
                }
            }
            Err(Failure {
                reconnect, trip, ..
            }) => {
                if reconnect {
                    self.drop_connection(link.generation);
                }
                if trip {
                    self.trip(&mut self.holder.lock());
                }
            }
        }
        answer.map_err(|failure| StoreFailure::Failed(failure.error))
    }

    async fn ask(
        &self,
        link: &Link,
        key: &[u8],
        limit: &Limit,
        deadline: tokio::time::Instant,
    ) -> Result<Verdict, Failure> {
        let window_us = limit.window.as_micros() as u64;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(format!("{}:{}", self.prefix, key_digest(key)))
            .arg(limit.requests)
            .arg(window_us)
            // Counted while it is the current or the previous window (from its first count).
            .arg((limit.window * 2).as_millis() as u64 + 1000);
        let mut connection = link.connection.clone();
        let call = invocation.invoke_async::<(u8, u64, u64, u64)>(&mut connection);
        match tokio::time::timeout_at(deadline, call).await {
            Err(_) => {
                // One slow answer on a connection that answers others is this request's
                // failure only; silence as long as the timeout, or timeouts in a row, are
                // the connection's.
                let silent_ms = self
                    .now_ms()
                    .saturating_sub(link.answered_at.load(Ordering::Relaxed));
                let in_a_row = link.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
                let gone = silent_ms >= self.timeout.as_millis() as u64
                    || in_a_row >= TIMEOUTS_BEFORE_DROP;
                Err(Failure {
                    error: format!("no answer within {:?}", self.timeout),
                    reconnect: gone,
                    trip: gone,
                })
            }
            Ok(Err(e)) => Err(Failure {
                reconnect: needs_new_connection(&e),
                trip: true,
                error: e.to_string(),
            }),
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

/// A store call that gave no verdict.
struct Failure {
    error: String,
    /// Its connection is done for: drop it, the next request makes a new one.
    reconnect: bool,
    /// Skip the store for [`STORE_RETRY_AFTER`].
    trip: bool,
}

/// Whether `error` leaves the connection unusable, or on a server that cannot count now (a
/// replica, still loading, its primary down): a new connection may reach a working one.
fn needs_new_connection(error: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    error.is_timeout()
        || error.is_io_error()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::BusyLoading
                    | ServerErrorKind::MasterDown
            )
        )
}

enum Counters {
    Local {
        counters: LocalCounters,
        /// Where window 0 begins.
        epoch: Instant,
    },
    Redis(Arc<RedisCounters>),
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
            Some(_) if options.store.is_none() => {
                return Err(ConfigError::new(
                    "name",
                    "names the counters in a store: it only applies with store=",
                ))
            }
            Some(name) => checked_name(name)?,
            None => default_name(&options),
        };
        let counters = match &options.store {
            None => Counters::Local {
                counters: LocalCounters::new(),
                epoch: wall_clock_epoch(limit.window),
            },
            Some(url) => {
                let prefix = format!(
                    "ferroxy:ratelimit:{name}:{}:{}:{}us",
                    key_spec(&key),
                    limit.requests,
                    limit.window.as_micros()
                );
                Counters::Redis(Arc::new(RedisCounters::new(prefix, &options, url)?))
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
fn default_name(options: &RateLimitOptions) -> String {
    let described = format!("{}\n{}", options.identity(), options.occurrence);
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
        let name = |scope: &str, key: &str, occurrence: usize| {
            default_name(&RateLimitOptions {
                key: key.into(),
                rate: "2/h".into(),
                scope: scope.into(),
                occurrence,
                ..Default::default()
            })
        };
        // The same configuration names its filters alike; another condition, or another
        // filter like it earlier in the list, does not. Nothing else counts (not the place in
        // the list), so an unrelated filter added before it does not rename it.
        let login = name("PathPrefix('/login')", "client_ip", 0);
        assert_eq!(login, name("PathPrefix('/login')", "client_ip", 0));
        assert_ne!(login, name("PathPrefix('/signup')", "client_ip", 0));
        assert_ne!(login, name("PathPrefix('/login')", "client_ip", 1));
        assert_eq!(name("", "header:X-User", 0), name("", "header:x-user", 0));
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
        let named = |name: &str, store: Option<&str>| {
            RateLimit::new(RateLimitOptions {
                rate: "10/s".into(),
                name: Some(name.to_owned()),
                store: store.map(str::to_owned),
                ..Default::default()
            })
            .map(drop)
        };
        let store = Some("redis://127.0.0.1:1/0");
        for bad in ["", "a:b", "with space", &"x".repeat(65)] {
            assert_eq!(named(bad, store).unwrap_err().field, "name", "{bad:?}");
        }
        assert!(named("api", store).is_ok());
        // Local counters have no name: one there is a mistake, not silently ignored.
        let unstored = named("api", None).unwrap_err();
        assert_eq!(unstored.field, "name");
        assert!(unstored.message.contains("store="), "{}", unstored.message);
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

    /// What [`FakeStore`] answers to `EVALSHA`.
    #[derive(Clone)]
    enum Reply {
        /// `{1, 0, 1, 0}`: admitted, after this long (the connection's commands in order).
        Admit(Duration),
        Error(&'static str),
        /// Nothing, to this and every later command on the connection.
        Silent,
    }

    /// A "Redis" speaking just enough RESP: set-up commands get `+OK`, `SCRIPT LOAD` the
    /// script's hash after `script_delay`, `EVALSHA` what `reply` says now. It counts the
    /// connections it accepted and those the client closed.
    struct FakeStore {
        url: String,
        reply: Arc<Mutex<Reply>>,
        accepted: Arc<AtomicU64>,
        closed: Arc<AtomicU64>,
    }

    impl FakeStore {
        async fn start(script_delay: Duration, reply: Reply) -> Self {
            use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let store = FakeStore {
                url: format!("redis://{}/0", listener.local_addr().unwrap()),
                reply: Arc::new(Mutex::new(reply)),
                accepted: Arc::default(),
                closed: Arc::default(),
            };
            let (reply, accepted, closed) = (
                store.reply.clone(),
                store.accepted.clone(),
                store.closed.clone(),
            );
            let hash = redis::Script::new(CHECK_SCRIPT).get_hash().to_owned();
            tokio::spawn(async move {
                while let Ok((socket, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let (reply, closed, hash) = (reply.clone(), closed.clone(), hash.clone());
                    tokio::spawn(async move {
                        let (read, mut write) = socket.into_split();
                        let mut read = BufReader::new(read);
                        let mut silent = false;
                        // One command: `*N`, then N bulk strings; its name upper-cased.
                        let mut line = String::new();
                        while read.read_line(&mut line).await.unwrap_or(0) > 0 {
                            let parts: usize = line.trim()[1..].parse().unwrap();
                            let mut name = String::new();
                            for i in 0..parts {
                                line.clear();
                                read.read_line(&mut line).await.unwrap();
                                let length: usize = line.trim()[1..].parse().unwrap();
                                let mut part = vec![0; length + 2];
                                read.read_exact(&mut part).await.unwrap();
                                if i == 0 {
                                    name = String::from_utf8_lossy(&part[..length]).to_uppercase();
                                }
                            }
                            line.clear();
                            let reply = reply.lock().clone();
                            let answer = match name.as_str() {
                                _ if silent => continue,
                                "SCRIPT" => {
                                    tokio::time::sleep(script_delay).await;
                                    format!("${}\r\n{hash}\r\n", hash.len())
                                }
                                "EVALSHA" => match reply {
                                    Reply::Admit(after) => {
                                        tokio::time::sleep(after).await;
                                        "*4\r\n:1\r\n:0\r\n:1\r\n:0\r\n".to_owned()
                                    }
                                    Reply::Error(error) => format!("-{error}\r\n"),
                                    Reply::Silent => {
                                        silent = true;
                                        continue;
                                    }
                                },
                                _ => "+OK\r\n".to_owned(),
                            };
                            if write.write_all(answer.as_bytes()).await.is_err() {
                                break;
                            }
                        }
                        closed.fetch_add(1, Ordering::SeqCst);
                    });
                }
            });
            store
        }

        fn set(&self, reply: Reply) {
            *self.reply.lock() = reply;
        }
    }

    fn stored_filter(url: &str, on_store_error: &str) -> RateLimit {
        stored_filter_waiting(
            url,
            on_store_error,
            RateLimitOptions::default().store_timeout,
        )
    }

    fn stored_filter_waiting(url: &str, on_store_error: &str, timeout: Duration) -> RateLimit {
        RateLimit::new(RateLimitOptions {
            rate: "1000/s".into(),
            store: Some(url.to_owned()),
            on_store_error: on_store_error.into(),
            store_timeout: timeout,
            ..Default::default()
        })
        .unwrap()
    }

    fn store_of(filter: &RateLimit) -> &Arc<RedisCounters> {
        let Counters::Redis(redis) = &filter.counters else {
            panic!("not a stored filter")
        };
        redis
    }

    fn generation_ready(redis: &RedisCounters) -> Option<u64> {
        match &redis.holder.lock().held {
            Held::Ready(link) => Some(link.generation),
            _ => None,
        }
    }

    /// Poll `condition` every 5 ms until it holds; false if it did not within 5 s.
    async fn eventually(mut condition: impl AsyncFnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if condition().await {
                return true;
            }
            tokio::time::sleep(ms(5)).await;
        }
        false
    }

    /// A set-up slower than `store_timeout` (a distant Redis): the request that started it
    /// gives up waiting, but the connection is kept and made ready, not thrown away and
    /// started over; requests skip the store until then.
    #[tokio::test]
    async fn a_connection_slower_to_set_up_than_the_timeout_is_kept_and_used() {
        let store = FakeStore::start(ms(150), Reply::Admit(Duration::ZERO)).await;
        let filter = stored_filter(&store.url, "deny");
        let session = crate::session::test_session("GET", "/", &[]);
        let started = Instant::now();
        let first = filter.ask_store(&session).await.map(|a| a.status);
        assert_eq!(first, Some(STORE_ERROR_STATUS));
        assert!(started.elapsed() < ms(140), "{:?}", started.elapsed());
        // The next skip the store at once while the connection is being made...
        let started = Instant::now();
        assert!(filter.ask_store(&session).await.is_some());
        assert!(started.elapsed() < ms(10), "{:?}", started.elapsed());
        // ...then the store admits them, on the one connection made.
        assert!(eventually(async || filter.ask_store(&session).await.is_none()).await);
        assert_eq!(store.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(store_of(&filter).retry_at.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_stale_generation_does_not_drop_a_fresh_connection() {
        let store = FakeStore::start(Duration::ZERO, Reply::Admit(Duration::ZERO)).await;
        let filter = stored_filter(&store.url, "deny");
        let redis = store_of(&filter);
        let session = crate::session::test_session("GET", "/", &[]);
        assert!(filter.ask_store(&session).await.is_none());
        assert_eq!(generation_ready(redis), Some(1));
        redis.drop_connection(1);
        assert!(filter.ask_store(&session).await.is_none());
        assert_eq!(generation_ready(redis), Some(2));
        // A late call on the first connection dropping "its" connection: the second stays.
        redis.drop_connection(1);
        assert_eq!(generation_ready(redis), Some(2));
        assert!(filter.ask_store(&session).await.is_none());
        assert_eq!(store.accepted.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn one_request_probes_per_retry_slot_and_only_a_call_after_the_trip_resets_it() {
        let filter = stored_filter("redis://127.0.0.1:1/0", "allow");
        let redis = store_of(&filter);
        let before = redis.trips.load(Ordering::Relaxed);
        redis.trip(&mut redis.holder.lock());
        assert!(!redis.may_ask(), "skipped for a second after a trip");
        // The slot is due: one request of many probes.
        redis.retry_at.store(redis.now_ms(), Ordering::Relaxed);
        assert_eq!((0..10).filter(|_| redis.may_ask()).count(), 1);
        // An answer to a call started before the trip does not end the skipping...
        redis.recovered(&redis.holder.lock(), before);
        assert_ne!(redis.retry_at.load(Ordering::Relaxed), 0);
        // ...one started after it does.
        redis.recovered(&redis.holder.lock(), redis.trips.load(Ordering::Relaxed));
        assert_eq!(redis.retry_at.load(Ordering::Relaxed), 0);
        assert!(redis.may_ask());
    }

    /// An error from the server (not our timeout): one that says this server cannot count
    /// now drops the connection; any trips the breaker; the next connection works.
    #[tokio::test]
    async fn a_server_error_trips_the_breaker_and_a_loading_server_is_reconnected() {
        let store = FakeStore::start(Duration::ZERO, Reply::Error("OOM no memory")).await;
        let filter = stored_filter(&store.url, "deny");
        let redis = store_of(&filter);
        let session = crate::session::test_session("GET", "/", &[]);
        assert!(filter.ask_store(&session).await.is_some());
        assert_ne!(redis.retry_at.load(Ordering::Relaxed), 0);
        assert_eq!(generation_ready(redis), Some(1), "kept: it answers");
        store.set(Reply::Error(
            "LOADING Redis is loading the dataset in memory",
        ));
        redis.retry_at.store(redis.now_ms(), Ordering::Relaxed);
        assert!(filter.ask_store(&session).await.is_some());
        assert_eq!(
            generation_ready(redis),
            None,
            "dropped: this server cannot count"
        );
        assert!(eventually(async || store.closed.load(Ordering::SeqCst) == 1).await);
        store.set(Reply::Admit(Duration::ZERO));
        redis.retry_at.store(redis.now_ms(), Ordering::Relaxed);
        assert!(filter.ask_store(&session).await.is_none());
        assert_eq!(generation_ready(redis), Some(2));
        assert_eq!(redis.retry_at.load(Ordering::Relaxed), 0);
    }

    /// A store that answers every call a little late (each 120 ms after the one before, the
    /// timeout 200 ms): the late calls fail alone, the connection is kept, the store not
    /// skipped.
    #[tokio::test]
    async fn a_slow_answer_on_a_connection_that_answers_does_not_trip_the_breaker() {
        let store = FakeStore::start(Duration::ZERO, Reply::Admit(Duration::ZERO)).await;
        let filter = stored_filter_waiting(&store.url, "deny", ms(200));
        let redis = store_of(&filter);
        let session = crate::session::test_session("GET", "/", &[]);
        assert!(filter.ask_store(&session).await.is_none());
        store.set(Reply::Admit(ms(120)));
        let (a, b, c) = tokio::join!(
            filter.ask_store(&session),
            filter.ask_store(&session),
            filter.ask_store(&session)
        );
        let refused = [a, b, c].iter().filter(|a| a.is_some()).count();
        assert!((1..=2).contains(&refused), "{refused} of 3 timed out");
        assert_eq!(redis.retry_at.load(Ordering::Relaxed), 0, "not tripped");
        assert_eq!(generation_ready(redis), Some(1), "kept");
        store.set(Reply::Admit(Duration::ZERO));
        assert!(eventually(async || filter.ask_store(&session).await.is_none()).await);
        assert_eq!(store.accepted.load(Ordering::SeqCst), 1);
    }

    /// A connection that went silent is dropped, and its socket closed (its background task
    /// ended), once the calls on it have given up.
    #[tokio::test]
    async fn a_silent_connection_is_dropped_and_closed() {
        let store = FakeStore::start(Duration::ZERO, Reply::Admit(Duration::ZERO)).await;
        let filter = stored_filter(&store.url, "allow");
        let redis = store_of(&filter);
        let session = crate::session::test_session("GET", "/", &[]);
        assert!(filter.ask_store(&session).await.is_none());
        store.set(Reply::Silent);
        assert!(filter.ask_store(&session).await.is_none());
        assert_eq!(generation_ready(redis), None);
        assert_ne!(redis.retry_at.load(Ordering::Relaxed), 0);
        assert!(eventually(async || store.closed.load(Ordering::SeqCst) == 1).await);
    }
}
