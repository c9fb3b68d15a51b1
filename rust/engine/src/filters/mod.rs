//! Declarative filters: a list of (condition, action) pairs compiled once at start-up and run
//! by the proxy on every request, in Rust, between the phases (see [`crate::proxy`]):
//! request-phase filters in list order before `request_filter` (the first that answers ends
//! the request), response-phase filters in list order after `response_filter`.

mod action;
mod basic_auth;
mod condition;
mod cors;
pub mod rate_limit;
mod template;

use std::sync::atomic::{AtomicU64, Ordering};

use http::{HeaderValue, StatusCode};

pub(crate) use action::replace_path;
pub use action::{Action, Phase};
pub use basic_auth::BasicAuth;
pub use condition::{request_host, Condition, HostMatch, Subject, TextMatch};
pub use cors::{Cors, CorsApplied, CorsConfig, MAX_CORS_FILTERS};
pub use template::{Groups, Template, Values, PLACEHOLDERS};

use crate::lb::ConfigError;
use crate::response::Response;
use crate::session::Session;

/// The header a request's id travels in.
pub static REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// Where a run of the request-phase filters stopped.
#[derive(Debug)]
pub enum Step {
    /// Every filter ran: the request goes on.
    Continue,
    /// A filter answered: the request ends with this response.
    Answer(Response),
    /// Filter `i` (an index into the request-phase list) has work that waits: run
    /// [`Filters::resume`] with it.
    Wait(usize),
}

/// One filter: its action, when its condition holds (always, without one).
#[derive(Debug, Clone)]
pub struct Filter {
    pub when: Option<Condition>,
    pub action: Action,
    /// A Cors filter's bit in [`CorsApplied`], given by [`Filters::new`] (0 for the others).
    cors_bit: u64,
}

impl Filter {
    pub fn new(when: Option<Condition>, action: Action) -> Self {
        Filter {
            when,
            action,
            cors_bit: 0,
        }
    }

    /// The regex whose captures this filter's templates may name: a `RewritePath`'s own
    /// pattern, else the first the condition tests with.
    pub fn groups<'a>(when: Option<&'a Condition>, action: Option<&'a Action>) -> Groups<'a> {
        if let Some(Action::RewritePath { pattern, .. }) = action {
            return Groups::of(Some(pattern));
        }
        Groups::of(when.and_then(Condition::capturing).map(|(regex, _)| regex))
    }

    fn applies(&self, session: &Session) -> bool {
        self.when
            .as_ref()
            .is_none_or(|c| c.matches(&session.req, session.client_addr().ip()))
    }

    /// `template` as a header value for this request: a literal's was made at start-up, a
    /// lone `{request_id}` is the request's own; the others are rendered. `None` when the
    /// rendering is not a valid header value (a capture with a control byte).
    fn header_value(&self, template: &Template, session: &mut Session) -> Option<HeaderValue> {
        if let Some(value) = template.literal_value() {
            return Some(value.clone());
        }
        if template.is_request_id() {
            return Some(request_id(session).clone());
        }
        HeaderValue::try_from(self.render(template, session)).ok()
    }

    /// Render `template` for this request. Capture groups come from the filter's regex,
    /// matched again here (only for templates that name one).
    fn render(&self, template: &Template, session: &mut Session) -> String {
        if let Some(text) = template.as_literal() {
            return text.to_owned();
        }
        let request_id = if template.uses_request_id() {
            request_id(session).to_str().unwrap_or("").to_owned()
        } else {
            String::new()
        };
        let req = &session.req;
        let captures = if !template.uses_captures() {
            None
        } else if let Action::RewritePath { pattern, .. } = &self.action {
            pattern.captures(req.uri.path())
        } else {
            self.when
                .as_ref()
                .and_then(Condition::capturing)
                .and_then(|(regex, subject)| subject.captures(regex, req))
        };
        let host = if template.uses_host() {
            request_host(req).unwrap_or("")
        } else {
            ""
        };
        template.render(&Values {
            host,
            path: req.uri.path(),
            query: req.uri.query().unwrap_or(""),
            request_id: &request_id,
            captures: captures.as_ref(),
        })
    }
}

/// A compiled list of filters, split by the phase each runs in (list order kept in each).
#[derive(Debug, Clone, Default)]
pub struct Filters {
    request: Vec<Filter>,
    response: Vec<Filter>,
}

impl Filters {
    /// Check each filter ([`Filter::check`]) and split them by phase. Errors name each as
    /// `filters[i]`.
    pub fn new(filters: Vec<Filter>) -> Result<Self, ConfigError> {
        let mut compiled = Filters::default();
        let mut cors_filters = 0;
        for (i, mut filter) in filters.into_iter().enumerate() {
            filter
                .check()
                .map_err(|e| e.within(&format!("filters[{i}]")))?;
            if let Action::Cors(_) = filter.action {
                if cors_filters == MAX_CORS_FILTERS {
                    return Err(ConfigError::new(
                        format!("filters[{i}]"),
                        format!("at most {MAX_CORS_FILTERS} Cors filters in a list"),
                    ));
                }
                filter.cors_bit = 1 << cors_filters;
                cors_filters += 1;
            }
            match filter.action.phase() {
                Phase::Request => compiled.request.push(filter),
                Phase::Response => compiled.response.push(filter),
                Phase::Both => {
                    compiled.request.push(filter.clone());
                    compiled.response.push(filter);
                }
            }
        }
        Ok(compiled)
    }

    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }

    /// Run the request-phase filters in order; the first that answers ends the request with
    /// its response. The run is synchronous: a filter whose work waits (on a store, on a
    /// password hash) stops it with [`Step::Wait`], and [`Filters::resume`] carries on, so
    /// apps without such filters never build a future for them.
    pub fn on_request(&self, session: &mut Session) -> Step {
        self.run_request(session, 0)
    }

    /// Finish a run that stopped at `Step::Wait(at)`: filter `at`'s waiting work, then the
    /// filters after it (which may wait in turn). `Some` when one of them answers.
    pub async fn resume(&self, session: &mut Session, mut at: usize) -> Option<Response> {
        loop {
            if let Some(answer) = self.request[at].action.wait(session).await {
                return Some(answer);
            }
            match self.run_request(session, at + 1) {
                Step::Continue => return None,
                Step::Answer(answer) => return Some(answer),
                Step::Wait(next) => at = next,
            }
        }
    }

    fn run_request(&self, session: &mut Session, from: usize) -> Step {
        // A filter that waits returns `Step::Wait` with its index in `self.request`: its
        // position in this slice plus `from`.
        for (i, filter) in self.request[from..].iter().enumerate() {
            if !filter.applies(session) {
                continue;
            }
            match &filter.action {
                Action::Deny(status) => return Step::Answer(Response::status_page(*status)),
                Action::Respond {
                    status,
                    body,
                    headers,
                } => {
                    let mut answer = Response::new(*status, body.clone());
                    answer.headers = headers.clone();
                    return Step::Answer(answer);
                }
                Action::Redirect { to, status } => {
                    let mut response = Response::new(*status, bytes::Bytes::new());
                    let location = filter.header_value(to, session);
                    action::put_header(
                        &mut response.headers,
                        &http::header::LOCATION,
                        location,
                        false,
                    );
                    return Step::Answer(response);
                }
                Action::SetRequestHeader(name, value) | Action::AddRequestHeader(name, value) => {
                    let append = matches!(filter.action, Action::AddRequestHeader(..));
                    let value = filter.header_value(value, session);
                    action::put_header(&mut session.req.headers, name, value, append);
                }
                Action::RemoveRequestHeader(name) => {
                    session.req.headers.remove(name);
                }
                Action::RewritePath { pattern, to } => {
                    if pattern.is_match(session.req.uri.path()) {
                        let path = filter.render(to, session);
                        if !replace_path(&mut session.req, &path) {
                            tracing::debug!(path, "RewritePath made no valid path: left as it was");
                        }
                    }
                }
                Action::MaxBodySize(max) => {
                    let fits = session.body_mut().is_none_or(|body| body.limit(*max));
                    if !fits {
                        // The rest of the body is not read: the connection cannot be reused.
                        session.keepalive = false;
                        return Step::Answer(Response::status_page(StatusCode::PAYLOAD_TOO_LARGE));
                    }
                }
                Action::RequestId => {
                    let id = request_id(session).clone();
                    session.req.headers.insert(REQUEST_ID.clone(), id);
                }
                Action::BasicAuth(auth) => match auth.check(&session.req) {
                    basic_auth::Checked::Allowed => {}
                    basic_auth::Checked::Refused => return Step::Answer(auth.challenge()),
                    basic_auth::Checked::Unverified => return Step::Wait(from + i),
                },
                Action::RateLimit(limit) => match limit.check(session) {
                    rate_limit::Check::Admit => {}
                    rate_limit::Check::Refuse(answer) => return Step::Answer(answer),
                    rate_limit::Check::AskStore => return Step::Wait(from + i),
                },
                Action::Cors(cors) => {
                    // A preflight's answer is the filter's whole say: not recorded, so the
                    // response part leaves it alone.
                    if let Some(answer) = cors.preflight(&session.req) {
                        return Step::Answer(answer);
                    }
                    session.cors.record(filter.cors_bit, &session.req);
                }
                Action::SetResponseHeader(..)
                | Action::AddResponseHeader(..)
                | Action::RemoveResponseHeader(_) => {}
            }
        }
        Step::Continue
    }

    /// Run the response-phase filters in order on the response head (their conditions test
    /// the request; a Cors filter's part runs where its request part applied).
    pub fn on_response(&self, session: &mut Session, head: &mut http::response::Parts) {
        for filter in &self.response {
            if let Action::Cors(cors) = &filter.action {
                if let Some(origin) = session.cors.applied(filter.cors_bit) {
                    cors.on_response(origin, &mut head.headers);
                }
                continue;
            }
            if !filter.applies(session) {
                continue;
            }
            match &filter.action {
                Action::SetResponseHeader(name, value) | Action::AddResponseHeader(name, value) => {
                    let append = matches!(filter.action, Action::AddResponseHeader(..));
                    let value = filter.header_value(value, session);
                    action::put_header(&mut head.headers, name, value, append);
                }
                Action::RemoveResponseHeader(name) => {
                    head.headers.remove(name);
                }
                _ => {}
            }
        }
    }

    /// The response part of the Cors filters that applied, on an answer of the proxy's own
    /// (a filter's, a hook's, an error page): a page that cannot read a 401 or a 502 cannot
    /// tell its user why (nginx's `add_header ... always`). Their other response-phase
    /// filters do not run on those.
    pub fn on_local_response(&self, session: &Session, headers: &mut http::HeaderMap) {
        if !session.cors.any() {
            return;
        }
        for filter in &self.response {
            if let (Action::Cors(cors), Some(origin)) =
                (&filter.action, session.cors.applied(filter.cors_bit))
            {
                cors.on_response(origin, headers);
            }
        }
    }
}

impl Filter {
    /// What the engine needs of a filter: a 3xx for a redirect, a final status (200..=599)
    /// for an answer, a `RewritePath` target that is a path. Errors name the field.
    pub fn check(&self) -> Result<(), ConfigError> {
        let status_in = |status: StatusCode, range: std::ops::RangeInclusive<u16>| {
            if range.contains(&status.as_u16()) {
                Ok(())
            } else {
                Err(ConfigError::new(
                    "status",
                    format!(
                        "must be {}..={}, got {}",
                        range.start(),
                        range.end(),
                        status.as_u16()
                    ),
                ))
            }
        };
        match &self.action {
            Action::Redirect { status, .. } => status_in(*status, 300..=399),
            Action::Deny(status) => status_in(*status, 200..=599),
            Action::RewritePath { to, .. } if !to.is_path() => {
                Err(ConfigError::new("to", "must start with '/' (or {path})"))
            }
            Action::Respond {
                status, headers, ..
            } => {
                status_in(*status, 200..=599)?;
                // The engine frames the body and speaks for the connection.
                let framing = headers.keys().find(|name| {
                    *name == http::header::CONTENT_LENGTH || crate::forward::is_hop_by_hop(name)
                });
                match framing {
                    Some(name) => Err(ConfigError::new(
                        format!("headers[{:?}]", name.as_str()),
                        "is set by the engine, not by a filter",
                    )),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }
}

/// The request's id: the one already given it, else the client's `x-request-id`, else a new
/// one (kept on the session either way, so every filter and `session.request_id` agree).
pub fn request_id(session: &mut Session) -> &HeaderValue {
    let Session {
        request_id, req, ..
    } = session;
    request_id.get_or_insert_with(|| match req.headers.get(&REQUEST_ID) {
        Some(incoming) => incoming.clone(),
        None => new_request_id(),
    })
}

/// 32 hex digits, unique in this process (a counter) and not guessable from outside (hashed
/// with a per-process random key).
fn new_request_id() -> HeaderValue {
    use std::hash::BuildHasher;
    static KEYS: std::sync::OnceLock<[std::collections::hash_map::RandomState; 2]> =
        std::sync::OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let keys = KEYS.get_or_init(Default::default);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // Hex by hand: `format!` costs several times the two hashes.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    let halves = [keys[0].hash_one(n), keys[1].hash_one(n)];
    for (i, digit) in id.iter_mut().enumerate() {
        let half = halves[i / 16];
        *digit = HEX[((half >> (60 - 4 * (i % 16))) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).expect("hex digits are a valid header value")
}

#[cfg(test)]
mod tests;
