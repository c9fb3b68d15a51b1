//! HTTP Basic authentication (RFC 7617) against argon2 or bcrypt password hashes.
//!
//! A password hash costs milliseconds of CPU by design, so it is never computed on a tokio
//! worker: the synchronous filter run looks the credential up in a cache of verified ones
//! (microseconds) and only a miss stops the run ([`Checked::Unverified`] becomes
//! `Step::Wait`), to be verified on a blocking thread by [`BasicAuth::verify`].
//!
//! The cache is keyed by a keyed hash (BLAKE2s MAC, random key per filter) of the whole
//! `Authorization` value, so no password is kept in clear and a client cannot aim collisions
//! at it. It holds the credentials that passed and, apart, those that failed: the users are
//! fixed for the filter's life, so a credential's verdict never changes, and a client that
//! keeps sending a wrong one (a stale password in a script) costs a lookup, not a hash. The
//! two are bounded separately, so a flood of distinct wrong guesses evicts only other wrong
//! guesses, never the valid users. Guesses that miss both still cost a hash each: at most
//! one per CPU runs at a time (the rest queue), so they cannot take the blocking pool's
//! threads; a limit on failures per client is RateLimit's job.

use std::num::NonZeroUsize;
use std::sync::{Arc, OnceLock};

use base64ct::Encoding;
use blake2::digest::{KeyInit, Mac};
use http::{HeaderValue, StatusCode};
use lru::LruCache;
use parking_lot::Mutex;
use subtle::ConstantTimeEq;

use crate::lb::ConfigError;
use crate::response::Response;

/// How many verified credentials (and, apart, refused ones) a filter remembers.
pub const CACHED_CREDENTIALS: usize = 1024;

/// A password hash a user is given: a PHC argon2 string or a bcrypt one.
#[derive(Debug, Clone)]
enum PasswordHash {
    Argon2(Box<argon2::PasswordHash>),
    Bcrypt(String),
}

impl PasswordHash {
    fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with("$argon2") {
            let hash = argon2::PasswordHash::new(text).map_err(|e| format!("not argon2: {e}"))?;
            argon2::Algorithm::try_from(hash.algorithm.as_str())
                .map_err(|_| format!("unknown argon2 variant ${}$", hash.algorithm))?;
            if let Some(version) = hash.version {
                argon2::Version::try_from(version)
                    .map_err(|_| format!("unknown argon2 version {version}"))?;
            }
            argon2::Params::try_from(&hash).map_err(|e| format!("bad argon2 parameters: {e}"))?;
            if hash.salt.is_none() || hash.hash.is_none() {
                return Err("an argon2 hash needs its salt and its hash".into());
            }
            return Ok(PasswordHash::Argon2(Box::new(hash)));
        }
        if ["$2a$", "$2b$", "$2y$"].iter().any(|p| text.starts_with(p)) {
            let parts: bcrypt::HashParts = text.parse().map_err(|e| format!("not bcrypt: {e}"))?;
            let cost = parts.get_cost();
            if !(4..=31).contains(&cost) {
                return Err(format!("bcrypt cost must be 4..=31, got {cost}"));
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

/// A keyed hash of an `Authorization` value: what the cache knows a credential by.
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

    fn digest(&self, authorization: &[u8]) -> Digest {
        let mut mac = blake2::Blake2sMac256::new_from_slice(&self.key).expect("a 32-byte key");
        mac.update(authorization);
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

/// The blocking verifications allowed at once, for every BasicAuth filter of the process: one
/// per CPU, since each keeps one busy.
fn verifications() -> &'static tokio::sync::Semaphore {
    static SLOTS: OnceLock<tokio::sync::Semaphore> = OnceLock::new();
    SLOTS.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        tokio::sync::Semaphore::new(cpus)
    })
}

/// Requests pass with a valid `Authorization: Basic` credential of one of the users, else
/// are answered 401 with a `WWW-Authenticate` challenge. The `Authorization` header is kept
/// on the proxied request (as nginx does): the upstream may want to know the user.
pub struct BasicAuth {
    users: Vec<User>,
    challenge: HeaderValue,
    verified: Verified,
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

    /// The request's one `Authorization` value (two are refused: which would count?).
    fn authorization(req: &http::request::Parts) -> Option<&HeaderValue> {
        let mut values = req.headers.get_all(http::header::AUTHORIZATION).iter();
        let first = values.next()?;
        values.next().is_none().then_some(first)
    }

    /// The cheap part, on the request path: no credential, or one whose verdict is cached.
    pub(crate) fn check(&self, req: &http::request::Parts) -> Checked {
        let Some(authorization) = Self::authorization(req) else {
            return Checked::Refused;
        };
        match self
            .verified
            .verdict(&self.verified.digest(authorization.as_bytes()))
        {
            Some(true) => Checked::Allowed,
            Some(false) => Checked::Refused,
            None => Checked::Unverified,
        }
    }

    /// The credential's verdict, hashing it on a blocking thread when it is not cached (the
    /// part of the filter that waits). `Some` is the answer to a request refused.
    pub(crate) async fn verify(self: &Arc<Self>, req: &http::request::Parts) -> Option<Response> {
        let Some(authorization) = Self::authorization(req) else {
            return Some(self.challenge());
        };
        let digest = self.verified.digest(authorization.as_bytes());
        let Some((name, password)) = credential(authorization.as_bytes()) else {
            return Some(self.challenge());
        };
        let user = self.find(&name);
        let _slot = verifications()
            .acquire()
            .await
            .expect("the semaphore is never closed");
        // Requests sent together with a new credential queue here together: once one has
        // verified it, the rest find its verdict.
        let passed = match self.verified.verdict(&digest) {
            Some(passed) => passed,
            None => {
                let auth = Arc::clone(self);
                let hashing = tokio::task::spawn_blocking(move || {
                    // An unknown user's password is hashed too (against the first user's
                    // hash, the verdict thrown away): otherwise a quick 401 would tell
                    // which names exist.
                    let hashed = auth.users[user.unwrap_or(0)].hash.verify(&password);
                    user.is_some() && hashed
                });
                let Ok(passed) = hashing.await else {
                    tracing::warn!("BasicAuth: a password verification failed to run");
                    return Some(Response::status_page(StatusCode::INTERNAL_SERVER_ERROR));
                };
                self.verified.remember(digest, passed);
                passed
            }
        };
        (!passed).then(|| self.challenge())
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

/// The user name and password of a `Basic` credential: `Basic base64(name:password)`, the
/// scheme in any case.
fn credential(authorization: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let text = std::str::from_utf8(authorization).ok()?;
    let (scheme, token) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64ct::Base64::decode_vec(token.trim_matches(' ')).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let password = decoded[colon + 1..].to_vec();
    let mut name = decoded;
    name.truncate(colon);
    Some((name, password))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::test_session;

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
        let value = basic("ops", "a:b");
        assert_eq!(
            credential(value.as_bytes()),
            Some((b"ops".to_vec(), b"a:b".to_vec()))
        );
        let lower = value.replacen("Basic", "basic", 1);
        assert!(credential(lower.as_bytes()).is_some());
        assert_eq!(credential(b"Bearer abc"), None);
        assert_eq!(credential(b"Basic !!!"), None);
        let no_colon = format!("Basic {}", base64ct::Base64::encode_string(b"ops"));
        assert_eq!(credential(no_colon.as_bytes()), None);
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
}
