//! HTTP Basic authentication (RFC 7617) against argon2 or bcrypt password hashes.
//!
//! A password hash costs milliseconds of CPU by design, so it is never computed on a tokio
//! worker: the synchronous filter run looks the credential up in a cache of verified ones
//! (microseconds) and only a miss stops the run ([`Checked::Unverified`] becomes
//! `Step::Wait`), to be verified on a blocking thread by [`BasicAuth::verify`].
//!
//! The cache is keyed by a keyed hash (BLAKE2s MAC, random key per filter) of the decoded
//! `name:password`, so no password is kept in clear, a client cannot aim collisions at it,
//! and spellings of one credential (`basic`, extra spaces) are one entry. It holds the
//! credentials that passed and, apart, those that failed: the users are fixed for the
//! filter's life, so a credential's verdict never changes, and a client that keeps sending a
//! wrong one (a stale password in a script) costs a lookup, not a hash. The two are bounded
//! separately, so a flood of distinct wrong guesses evicts only other wrong guesses, never
//! the valid users. Guesses that miss both still cost a hash each: at most
//! [`hashes_at_once`] run at a time in the process, at most [`QUEUED_VERIFICATIONS`] more
//! wait, and past those a request is answered 503 with `Retry-After`, so guesses can take
//! neither the blocking pool's threads nor unbounded memory. A limit on failures per client
//! is a rate limit's job (`f.RateLimit` keyed on the client, before this filter).

use std::num::NonZeroUsize;
use std::sync::{Arc, OnceLock};

use base64ct::Encoding;
use blake2::digest::{KeyInit, Mac};
use http::{HeaderValue, StatusCode};
use lru::LruCache;
use parking_lot::Mutex;
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;

use crate::lb::ConfigError;
use crate::response::Response;

/// How many verified credentials (and, apart, refused ones) a filter remembers.
pub const CACHED_CREDENTIALS: usize = 1024;

/// How many credentials may wait for a hashing slot, for every BasicAuth filter of the
/// process together; a request past them is answered 503 with `Retry-After`.
pub const QUEUED_VERIFICATIONS: usize = 64;

/// How long, in seconds, `Retry-After` asks a client refused for a full queue to wait.
const RETRY_AFTER_SECONDS: u64 = 1;

/// The highest bcrypt cost accepted: 2^16 rounds, seconds of CPU per check already.
const MAX_BCRYPT_COST: u32 = 16;

/// The highest argon2 memory accepted, in KiB (1 GiB): each check fills that much.
const MAX_ARGON2_MEMORY_KIB: u32 = 1 << 20;

/// The highest argon2 work accepted: memory times passes, in KiB (4 GiB filled per check,
/// seconds of CPU).
const MAX_ARGON2_WORK_KIB: u64 = 4 << 20;

/// How many password hashes run at once, for every BasicAuth filter of the process: half
/// the CPUs (at least one), so that a flood of guesses leaves the rest to proxying.
pub fn hashes_at_once() -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    (cpus / 2).max(1)
}

/// A password hash a user is given: a PHC argon2 string or a bcrypt one.
#[derive(Debug, Clone)]
enum PasswordHash {
    Argon2(Box<argon2::PasswordHash>),
    Bcrypt(String),
}

impl PasswordHash {
    /// Checks what would make every verification fail (parameters argon2 refuses) or take
    /// too long, from the string alone: a trial verification would cost each user a hash (up to
    /// seconds) whenever a filter is made, and `simulate` and the Python face make them often.
    fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with("$argon2") {
            let hash = argon2::PasswordHash::new(text).map_err(|e| format!("not argon2: {e}"))?;
            argon2::Algorithm::try_from(hash.algorithm.as_str())
                .map_err(|_| format!("unknown argon2 variant ${}$", hash.algorithm))?;
            if let Some(version) = hash.version {
                argon2::Version::try_from(version)
                    .map_err(|_| format!("unknown argon2 version {version}"))?;
            }
            let params = argon2::Params::try_from(&hash)
                .map_err(|e| format!("bad argon2 parameters: {e}"))?;
            // A salt under argon2's 8 bytes is refused by the PHC parser above.
            if hash.salt.is_none() || hash.hash.is_none() {
                return Err("an argon2 hash needs its salt and its hash".into());
            }
            let (memory, passes) = (params.m_cost(), params.t_cost());
            if memory > MAX_ARGON2_MEMORY_KIB
                || u64::from(memory) * u64::from(passes) > MAX_ARGON2_WORK_KIB
            {
                return Err(format!(
                    "cost too high: one check would fill {} MiB {passes} times (at most {} MiB, \
                     and {} MiB in all)",
                    memory / 1024,
                    MAX_ARGON2_MEMORY_KIB / 1024,
                    MAX_ARGON2_WORK_KIB / 1024
                ));
            }
            return Ok(PasswordHash::Argon2(Box::new(hash)));
        }
        if ["$2a$", "$2b$", "$2y$"].iter().any(|p| text.starts_with(p)) {
            let parts: bcrypt::HashParts = text.parse().map_err(|e| format!("not bcrypt: {e}"))?;
            let cost = parts.get_cost();
            if cost < 4 {
                return Err(format!(
                    "bcrypt cost must be 4..={MAX_BCRYPT_COST}, got {cost}"
                ));
            }
            if cost > MAX_BCRYPT_COST {
                return Err(format!(
                    "cost too high: one check would take 2^{cost} bcrypt rounds, {}x the \
                     2^{MAX_BCRYPT_COST} (seconds of CPU) accepted",
                    1u64 << (cost - MAX_BCRYPT_COST)
                ));
            }
            return Ok(PasswordHash::Bcrypt(text.to_owned()));
        }
        Err("not an argon2 ($argon2id$...) or bcrypt ($2b$...) hash".into())
    }

    /// Whether `password` is the one hashed. Milliseconds of CPU: call it off the runtime.
    fn verify(&self, password: &[u8]) -> bool {
        use argon2::PasswordVerifier;
        match self {
            PasswordHash::Argon2(hash) => argon2::Argon2::default()
                .verify_password(password, &**hash)
                .is_ok(),
            // Passwords past bcrypt's 72 bytes are cut there, as every bcrypt does.
            PasswordHash::Bcrypt(hash) => bcrypt::verify(password, hash).unwrap_or(false),
        }
    }
}

#[derive(Debug, Clone)]
struct User {
    name: String,
    hash: PasswordHash,
}

/// A keyed hash of a decoded credential: what the cache knows it by.
type Digest = [u8; 32];

/// The credentials already verified, and those already refused.
struct Verified {
    key: Digest,
    allowed: Mutex<LruCache<Digest, ()>>,
    refused: Mutex<LruCache<Digest, ()>>,
}

impl Verified {
    fn new() -> Self {
        let capacity = NonZeroUsize::new(CACHED_CREDENTIALS).expect("not zero");
        Verified {
            key: random_key(),
            allowed: Mutex::new(LruCache::new(capacity)),
            refused: Mutex::new(LruCache::new(capacity)),
        }
    }

    fn digest(&self, credential: &[u8]) -> Digest {
        let mut mac = blake2::Blake2sMac256::new_from_slice(&self.key).expect("a 32-byte key");
        mac.update(credential);
        mac.finalize().into_bytes().into()
    }

    /// `Some(true)` for a credential that passed, `Some(false)` for one refused, `None` for
    /// one not seen (or forgotten).
    fn verdict(&self, digest: &Digest) -> Option<bool> {
        if self.allowed.lock().get(digest).is_some() {
            return Some(true);
        }
        self.refused.lock().get(digest).map(|()| false)
    }

    fn remember(&self, digest: Digest, passed: bool) {
        let cache = if passed { &self.allowed } else { &self.refused };
        cache.lock().put(digest, ());
    }
}

/// 32 random bytes from the process's hash keys (the OS's randomness), so the digests of
/// one filter cannot be computed outside it.
fn random_key() -> Digest {
    use std::hash::BuildHasher;
    let state = std::collections::hash_map::RandomState::new();
    let mut key = [0; 32];
    for (i, chunk) in key.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&state.hash_one(i).to_le_bytes());
    }
    key
}

/// What the synchronous run can tell of a request's credential.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Checked {
    /// Verified before: the request goes on.
    Allowed,
    /// None, malformed, or refused before: answer [`BasicAuth::challenge`].
    Refused,
    /// Not seen yet: [`BasicAuth::verify`] it.
    Unverified,
}

/// The hashing slots and the queue before them, shared by the BasicAuth filters of a
/// process ([`verifications`]).
struct Verifications {
    hashing: Semaphore,
    queue: Semaphore,
}

impl Verifications {
    fn new(hashing: usize, queued: usize) -> Self {
        Verifications {
            hashing: Semaphore::new(hashing),
            queue: Semaphore::new(queued),
        }
    }
}

fn verifications() -> &'static Verifications {
    static SLOTS: OnceLock<Verifications> = OnceLock::new();
    SLOTS.get_or_init(|| Verifications::new(hashes_at_once(), QUEUED_VERIFICATIONS))
}

/// The user name and password of a `Basic` credential (`Basic base64(name:password)`, the
/// scheme in any case), decoded.
struct Credential {
    decoded: Vec<u8>,
    colon: usize,
}

impl Credential {
    fn parse(authorization: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(authorization).ok()?;
        let (scheme, token) = text.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64ct::Base64::decode_vec(token.trim_matches(' ')).ok()?;
        let colon = decoded.iter().position(|&b| b == b':')?;
        Some(Credential { decoded, colon })
    }

    fn name(&self) -> &[u8] {
        &self.decoded[..self.colon]
    }

    fn password(&self) -> &[u8] {
        &self.decoded[self.colon + 1..]
    }
}

/// Requests pass with a valid `Authorization: Basic` credential of one of the users, else
/// are answered 401 with a `WWW-Authenticate` challenge. The `Authorization` header is kept
/// on the proxied request (as nginx does): the upstream may want to know the user.
pub struct BasicAuth {
    users: Vec<User>,
    challenge: HeaderValue,
    verified: Verified,
    slots: &'static Verifications,
    #[cfg(test)]
    counts: tests::HashCounts,
}

impl std::fmt::Debug for BasicAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.users.iter().map(|u| u.name.as_str()).collect();
        f.debug_struct("BasicAuth")
            .field("users", &names)
            .field("challenge", &self.challenge)
            .finish_non_exhaustive()
    }
}

impl BasicAuth {
    /// `users` as (name, hash) pairs. Errors name the field: `users["ops"]`, `realm`.
    pub fn new(users: &[(String, String)], realm: &str) -> Result<Self, ConfigError> {
        Self::with_slots(users, realm, verifications())
    }

    fn with_slots(
        users: &[(String, String)],
        realm: &str,
        slots: &'static Verifications,
    ) -> Result<Self, ConfigError> {
        if users.is_empty() {
            return Err(ConfigError::new("users", "give at least one user"));
        }
        let users = users
            .iter()
            .map(|(name, hash)| {
                let field = || format!("users[{name:?}]");
                if name.is_empty() || name.contains(':') || name.chars().any(char::is_control) {
                    return Err(ConfigError::new(
                        field(),
                        "a user name is not empty and has no ':' or control character",
                    ));
                }
                let hash = PasswordHash::parse(hash).map_err(|e| ConfigError::new(field(), e))?;
                Ok(User {
                    name: name.clone(),
                    hash,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let printable = |c: char| c.is_ascii() && !c.is_ascii_control() && !"\"\\".contains(c);
        if !realm.chars().all(printable) {
            return Err(ConfigError::new(
                "realm",
                "must be printable ASCII without '\"' or '\\'",
            ));
        }
        let challenge = format!("Basic realm=\"{realm}\", charset=\"UTF-8\"");
        Ok(BasicAuth {
            users,
            challenge: HeaderValue::try_from(challenge).expect("checked printable ASCII"),
            verified: Verified::new(),
            slots,
            #[cfg(test)]
            counts: Default::default(),
        })
    }

    /// The 401 a request without a valid credential gets.
    pub fn challenge(&self) -> Response {
        let mut response = Response::status_page(StatusCode::UNAUTHORIZED);
        response
            .headers
            .insert(http::header::WWW_AUTHENTICATE, self.challenge.clone());
        response
    }

    /// The 503 a request gets when too many credentials already wait for a hash.
    fn busy() -> Response {
        let mut response = Response::status_page(StatusCode::SERVICE_UNAVAILABLE);
        response
            .headers
            .insert(http::header::RETRY_AFTER, RETRY_AFTER_SECONDS.into());
        response
    }

    /// The request's one `Basic` credential (two `Authorization` values are refused: which
    /// would count?).
    fn credential(req: &http::request::Parts) -> Option<Credential> {
        let mut values = req.headers.get_all(http::header::AUTHORIZATION).iter();
        let first = values.next()?;
        if values.next().is_some() {
            return None;
        }
        Credential::parse(first.as_bytes())
    }

    /// The cheap part, on the request path: no credential, or one whose verdict is cached.
    pub(crate) fn check(&self, req: &http::request::Parts) -> Checked {
        let Some(credential) = Self::credential(req) else {
            return Checked::Refused;
        };
        match self
            .verified
            .verdict(&self.verified.digest(&credential.decoded))
        {
            Some(true) => Checked::Allowed,
            Some(false) => Checked::Refused,
            None => Checked::Unverified,
        }
    }

    /// The credential's verdict, hashing it on a blocking thread when it is not cached (the
    /// part of the filter that waits). `Some` is the answer to a request refused: 401, or 503
    /// when the queue for hashing is full.
    pub(crate) async fn verify(self: &Arc<Self>, req: &http::request::Parts) -> Option<Response> {
        let Some(credential) = Self::credential(req) else {
            return Some(self.challenge());
        };
        let digest = self.verified.digest(&credential.decoded);
        let refused = |passed: bool| (!passed).then(|| self.challenge());
        if let Some(passed) = self.verified.verdict(&digest) {
            return refused(passed);
        }
        let Ok(queued) = self.slots.queue.try_acquire() else {
            return Some(Self::busy());
        };
        let slot = self
            .slots
            .hashing
            .acquire()
            .await
            .expect("the semaphore is never closed");
        drop(queued);
        // Requests sent together with a new credential queue here together: once one has
        // verified it, the rest find its verdict.
        if let Some(passed) = self.verified.verdict(&digest) {
            return refused(passed);
        }
        let auth = Arc::clone(self);
        let hashing = tokio::task::spawn_blocking(move || {
            // The slot is the hash's, not the request's: a client that goes away mid-hash
            // drops the request, and the slot must stay taken until the hash is done. Its
            // verdict is remembered here for the same reason: the work is not lost.
            let _slot = slot;
            let passed = auth.hash(&credential);
            auth.verified.remember(digest, passed);
            passed
        });
        let Ok(passed) = hashing.await else {
            tracing::warn!("BasicAuth: a password verification failed to run");
            return Some(Response::status_page(StatusCode::INTERNAL_SERVER_ERROR));
        };
        refused(passed)
    }

    /// Whether `credential` is a user's: one password hash, on a blocking thread.
    fn hash(&self, credential: &Credential) -> bool {
        #[cfg(test)]
        let _counted = self.counts.start();
        let user = self.find(credential.name());
        // An unknown user's password is hashed too (against the first user's hash, the
        // verdict thrown away): otherwise a quick 401 would tell which names exist.
        let hashed = self.users[user.unwrap_or(0)]
            .hash
            .verify(credential.password());
        user.is_some() && hashed
    }

    /// The index of the user named `name`, comparing with every name in constant time.
    fn find(&self, name: &[u8]) -> Option<usize> {
        let mut found = None;
        for (i, user) in self.users.iter().enumerate() {
            if bool::from(user.name.as_bytes().ct_eq(name)) {
                found = Some(i);
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::session::test_session;

    /// How many hashes a filter ran, runs now, and ran at most at once.
    #[derive(Default)]
    pub(super) struct HashCounts {
        total: AtomicUsize,
        now: AtomicUsize,
        most: AtomicUsize,
    }

    pub(super) struct Hashing<'a>(&'a HashCounts);

    impl HashCounts {
        pub(super) fn start(&self) -> Hashing<'_> {
            self.total.fetch_add(1, Ordering::SeqCst);
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            Hashing(self)
        }

        fn total(&self) -> usize {
            self.total.load(Ordering::SeqCst)
        }
    }

    impl Drop for Hashing<'_> {
        fn drop(&mut self) {
            self.0.now.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Wait (on the runtime) until `done` holds, failing after 10 s.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Slots and a queue of the test's own, so that tests running at once do not share them.
    fn own_slots(hashing: usize, queued: usize) -> &'static Verifications {
        Box::leak(Box::new(Verifications::new(hashing, queued)))
    }

    /// An argon2 hash that takes a while even in an optimized build (tens of milliseconds),
    /// for the tests that need hashes still running while they act.
    fn slow_auth(slots: &'static Verifications) -> Arc<BasicAuth> {
        use argon2::PasswordHasher;
        let params = argon2::Params::new(4 * 1024, 1, 1, None).unwrap();
        let hasher =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let hash = hasher
            .hash_password_with_salt(b"s3cret", b"saltsaltsalt")
            .unwrap()
            .to_string();
        Arc::new(BasicAuth::with_slots(&[("ops".into(), hash)], "r", slots).unwrap())
    }

    /// Hashes made with the crates' cheapest parameters: the tests check the plumbing, not
    /// the cost.
    fn argon2_hash(password: &str) -> String {
        use argon2::PasswordHasher;
        let params = argon2::Params::new(8, 1, 1, None).unwrap();
        let hasher =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        hasher
            .hash_password_with_salt(password.as_bytes(), b"saltsaltsalt")
            .unwrap()
            .to_string()
    }

    fn basic(name: &str, password: &str) -> String {
        format!(
            "Basic {}",
            base64ct::Base64::encode_string(format!("{name}:{password}").as_bytes())
        )
    }

    fn auth() -> Arc<BasicAuth> {
        let users = [
            ("ops".to_owned(), argon2_hash("s3cret")),
            ("dev".to_owned(), bcrypt::hash("hunter2", 4).unwrap()),
        ];
        Arc::new(BasicAuth::new(&users, "ferroxy").unwrap())
    }

    fn req(authorization: &[&str]) -> http::request::Parts {
        let headers: Vec<_> = authorization
            .iter()
            .map(|v| ("authorization", *v))
            .collect();
        test_session("GET", "/admin/", &headers).req
    }

    #[test]
    fn credentials_parse_any_scheme_case_and_a_colon_in_the_password() {
        let parsed = |value: &str| {
            Credential::parse(value.as_bytes()).map(|c| (c.name().to_vec(), c.password().to_vec()))
        };
        let value = basic("ops", "a:b");
        assert_eq!(parsed(&value), Some((b"ops".to_vec(), b"a:b".to_vec())));
        let lower = value.replacen("Basic", "basic", 1);
        assert!(parsed(&lower).is_some());
        assert_eq!(parsed("Bearer abc"), None);
        assert_eq!(parsed("Basic !!!"), None);
        let no_colon = format!("Basic {}", base64ct::Base64::encode_string(b"ops"));
        assert_eq!(parsed(&no_colon), None);
    }

    #[test]
    fn bad_hashes_name_the_user() {
        let make = |hash: &str| BasicAuth::new(&[("ops".into(), hash.into())], "r").unwrap_err();
        let error = make("plaintext");
        assert_eq!(error.field, "users[\"ops\"]");
        assert!(error.message.contains("not an argon2"), "{}", error.message);
        assert!(make("$argon2id$v=19$m=8,t=1,p=1$c2FsdA")
            .message
            .contains("argon2"));
        assert!(make("$2b$03$abc").message.contains("bcrypt"));
        let cheap = bcrypt::hash("x", 4).unwrap().replacen("$04$", "$03$", 1);
        assert!(make(&cheap).message.contains("cost"));
        let dear = bcrypt::hash("x", 4).unwrap().replacen("$04$", "$17$", 1);
        assert!(make(&dear).message.starts_with("cost too high"));
        let ok = argon2_hash("x");
        let short_salt = ok.replace("c2FsdHNhbHRzYWx0", "c2FsdA");
        assert_ne!(short_salt, ok);
        let message = make(&short_salt).message;
        assert!(message.contains("salt too short"), "{message}");
        let huge = ok.replace("m=8,", &format!("m={},", 2 << 20));
        assert!(make(&huge).message.starts_with("cost too high"));
        let long = ok
            .replace("t=1,", "t=5,")
            .replace("m=8,", &format!("m={},", 1 << 20));
        assert!(make(&long).message.starts_with("cost too high"));
        assert_eq!(BasicAuth::new(&[], "r").unwrap_err().field, "users");
        let quote = BasicAuth::new(&[("ops".into(), argon2_hash("x"))], "a\"b").unwrap_err();
        assert_eq!(quote.field, "realm");
    }

    #[tokio::test]
    async fn a_verified_credential_is_cached_and_a_refused_one_too() {
        let auth = auth();
        let ops = req(&[&basic("ops", "s3cret")]);
        assert_eq!(auth.check(&ops), Checked::Unverified);
        assert!(auth.verify(&ops).await.is_none());
        assert_eq!(auth.check(&ops), Checked::Allowed);

        let dev = req(&[&basic("dev", "hunter2")]);
        assert!(auth.verify(&dev).await.is_none());
        assert_eq!(auth.check(&dev), Checked::Allowed);

        let wrong = req(&[&basic("ops", "hunter2")]);
        assert_eq!(auth.check(&wrong), Checked::Unverified);
        let answer = auth.verify(&wrong).await.unwrap();
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            answer.headers["www-authenticate"],
            "Basic realm=\"ferroxy\", charset=\"UTF-8\""
        );
        assert_eq!(auth.check(&wrong), Checked::Refused);

        // An unknown user with another user's password is refused.
        let unknown = req(&[&basic("nobody", "s3cret")]);
        assert!(auth.verify(&unknown).await.is_some());
        assert_eq!(auth.check(&req(&[])), Checked::Refused);
        let twice = req(&[&basic("ops", "s3cret"), &basic("ops", "s3cret")]);
        assert_eq!(auth.check(&twice), Checked::Refused);
    }

    /// Through the filter list: a miss stops the run at the filter's index and the run
    /// resumes after it; a hit does not stop it.
    #[tokio::test]
    async fn a_run_waits_only_for_a_credential_not_cached() {
        use crate::filters::{Action, Condition, Filter, Filters, Step, Template, TextMatch};
        let mark = Template::parse("value", "1", Default::default()).unwrap();
        let admin = Condition::Path(TextMatch::Prefix("/admin/".into()));
        let filters = Filters::new(vec![
            Filter::new(None, Action::RequestId),
            Filter::new(Some(admin), Action::BasicAuth(auth())),
            Filter::new(
                None,
                Action::SetRequestHeader(http::HeaderName::from_static("x-after"), mark),
            ),
        ])
        .unwrap();
        let valid = basic("ops", "s3cret");
        let mut session = test_session("GET", "/admin/", &[("authorization", &valid)]);
        let Step::Wait(at) = filters.on_request(&mut session) else {
            panic!("a new credential waits")
        };
        assert_eq!(at, 1);
        assert!(filters.resume(&mut session, at).await.is_none());
        assert_eq!(session.req.headers["x-after"], "1");
        let mut again = test_session("GET", "/admin/x", &[("authorization", &valid)]);
        assert!(matches!(filters.on_request(&mut again), Step::Continue));

        let wrong = basic("ops", "nope");
        let mut refused = test_session("GET", "/admin/", &[("authorization", &wrong)]);
        let Step::Wait(at) = filters.on_request(&mut refused) else {
            panic!("a new credential waits")
        };
        let answer = filters.resume(&mut refused, at).await.unwrap();
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert!(!refused.req.headers.contains_key("x-after"));
        let mut public = test_session("GET", "/public", &[]);
        assert!(matches!(filters.on_request(&mut public), Step::Continue));
    }

    #[test]
    fn the_cache_is_bounded_and_keyed_per_filter() {
        let verified = Verified::new();
        for i in 0..CACHED_CREDENTIALS + 10 {
            verified.remember(verified.digest(format!("Basic {i}").as_bytes()), false);
        }
        assert_eq!(verified.refused.lock().len(), CACHED_CREDENTIALS);
        assert_eq!(verified.verdict(&verified.digest(b"Basic 0")), None);
        let last = format!("Basic {}", CACHED_CREDENTIALS + 9);
        assert_eq!(
            verified.verdict(&verified.digest(last.as_bytes())),
            Some(false)
        );
        // Refusals never push out the credentials that passed.
        assert_eq!(verified.allowed.lock().len(), 0);
        assert_ne!(Verified::new().digest(b"x"), verified.digest(b"x"));
    }

    /// A client that goes away mid-hash frees its request, not its hash's slot: the hashes
    /// still running stay within the slots, however many clients come and go.
    #[tokio::test]
    async fn a_cancelled_request_keeps_its_hash_s_slot_until_the_hash_ends() {
        let auth = slow_auth(own_slots(1, QUEUED_VERIFICATIONS));
        let spawn = |i: usize| {
            let auth = Arc::clone(&auth);
            let req = req(&[&basic("ops", &format!("guess-{i}"))]);
            tokio::spawn(async move { auth.verify(&req).await })
        };
        let gone: Vec<_> = (0..4).map(spawn).collect();
        until("a hash starts", || auth.counts.total() == 1).await;
        for request in &gone {
            request.abort();
        }
        let after: Vec<_> = (4..8).map(spawn).collect();
        for request in after {
            let answer = request.await.unwrap().unwrap();
            assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        }
        assert_eq!(auth.counts.most.load(Ordering::SeqCst), 1);
        // The cancelled request's hash ran to its end, and its verdict was kept.
        until("the cancelled hash ends", || {
            auth.counts.now.load(Ordering::SeqCst) == 0
        })
        .await;
        assert_eq!(
            auth.check(&req(&[&basic("ops", "guess-0")])),
            Checked::Refused
        );
    }

    #[tokio::test]
    async fn past_the_queue_a_request_is_answered_503_with_retry_after() {
        let slots = own_slots(1, 2);
        let auth = slow_auth(slots);
        let spawn = |i: usize| {
            let auth = Arc::clone(&auth);
            let req = req(&[&basic("ops", &format!("guess-{i}"))]);
            tokio::spawn(async move { auth.verify(&req).await })
        };
        let hashing = spawn(0);
        until("a hash starts", || auth.counts.total() == 1).await;
        let queued = [spawn(1), spawn(2)];
        until("two wait", || slots.queue.available_permits() == 0).await;
        let busy = auth
            .verify(&req(&[&basic("ops", "guess-3")]))
            .await
            .unwrap();
        assert_eq!(busy.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(busy.headers["retry-after"], "1");
        for request in [hashing].into_iter().chain(queued) {
            assert_eq!(
                request.await.unwrap().unwrap().status,
                StatusCode::UNAUTHORIZED
            );
        }
        // A refusal for a full queue is not a verdict: the credential is not remembered.
        assert_eq!(
            auth.check(&req(&[&basic("ops", "guess-3")])),
            Checked::Unverified
        );
    }

    #[tokio::test]
    async fn an_unknown_user_s_password_is_hashed_too() {
        let auth = auth();
        assert!(auth.verify(&req(&[&basic("nobody", "x")])).await.is_some());
        assert_eq!(auth.counts.total(), 1);
        assert!(auth.verify(&req(&[&basic("ops", "x")])).await.is_some());
        assert_eq!(auth.counts.total(), 2);
    }

    /// The cache knows a credential by what it decodes to: another spelling of the header
    /// costs no hash, and cannot push real users out.
    #[tokio::test]
    async fn spellings_of_one_credential_are_one_cache_entry() {
        let auth = auth();
        let value = basic("ops", "s3cret");
        assert!(auth.verify(&req(&[&value])).await.is_none());
        let token = value.strip_prefix("Basic ").unwrap();
        for spelling in [
            format!("basic {token}"),
            format!("bAsIc  {token}"),
            format!("Basic {token}  "),
        ] {
            assert_eq!(
                auth.check(&req(&[&spelling])),
                Checked::Allowed,
                "{spelling}"
            );
        }
        assert_eq!(auth.counts.total(), 1);
    }

    /// Two BasicAuth filters with another between them: the second waits at its own index
    /// (a run resumed from past the first), and each checks against its own users.
    #[tokio::test]
    async fn a_second_basic_auth_after_another_filter_waits_at_its_own_index() {
        use crate::filters::{Action, Filter, Filters, Step, Template};
        let mark = Template::parse("value", "1", Default::default()).unwrap();
        let only_dev = [("dev".to_owned(), bcrypt::hash("hunter2", 4).unwrap())];
        let second = Arc::new(BasicAuth::new(&only_dev, "inner").unwrap());
        let filters = Filters::new(vec![
            Filter::new(None, Action::BasicAuth(auth())),
            Filter::new(
                None,
                Action::SetRequestHeader(http::HeaderName::from_static("x-between"), mark),
            ),
            Filter::new(None, Action::BasicAuth(Arc::clone(&second))),
        ])
        .unwrap();
        let dev = basic("dev", "hunter2");
        let mut session = test_session("GET", "/", &[("authorization", &dev)]);
        let Step::Wait(0) = filters.on_request(&mut session) else {
            panic!("the first filter waits")
        };
        assert!(filters.request[0].action.wait(&mut session).await.is_none());
        let Step::Wait(2) = filters.run_request(&mut session, 1) else {
            panic!("the second BasicAuth waits at its own index")
        };
        assert_eq!(session.req.headers["x-between"], "1");
        assert!(filters.resume(&mut session, 2).await.is_none());
        assert_eq!(second.check(&session.req), Checked::Allowed);

        // Known to the first filter only: refused by the second, with its own realm.
        let ops = basic("ops", "s3cret");
        let mut session = test_session("GET", "/", &[("authorization", &ops)]);
        let Step::Wait(at) = filters.on_request(&mut session) else {
            panic!("a new credential waits")
        };
        let answer = filters.resume(&mut session, at).await.unwrap();
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert!(answer.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("realm=\"inner\""));
        assert_eq!(session.req.headers["x-between"], "1");
    }
}
