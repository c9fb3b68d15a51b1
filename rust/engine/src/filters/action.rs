//! What a filter does when its condition holds: answer (Deny, Respond, Redirect), edit the
//! request or the response head, rewrite the path, limit the body, give the request an id,
//! ask for a password, answer cross-origin requests.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use regex::Regex;

use super::basic_auth::BasicAuth;
use super::cors::Cors;
use super::template::Template;

#[derive(Debug, Clone)]
pub enum Action {
    /// Answer `status` with its plain-text page.
    Deny(StatusCode),
    /// Answer `status` with `body` and `headers`.
    Respond {
        status: StatusCode,
        body: Bytes,
        headers: http::HeaderMap,
    },
    /// Answer `status` (a 3xx) with `Location: to`.
    Redirect {
        to: Template,
        status: StatusCode,
    },
    SetRequestHeader(HeaderName, Template),
    AddRequestHeader(HeaderName, Template),
    RemoveRequestHeader(HeaderName),
    SetResponseHeader(HeaderName, Template),
    AddResponseHeader(HeaderName, Template),
    RemoveResponseHeader(HeaderName),
    /// When `pattern` matches the path, the path becomes `to` (which may name its captures);
    /// the query is kept.
    RewritePath {
        pattern: Regex,
        to: Template,
    },
    /// Requests with a body longer than this many bytes get 413: at once when the length
    /// is announced, else when the stream crosses it.
    MaxBodySize(u64),
    /// Give the request an `x-request-id` (a new one unless the client sent one).
    RequestId,
    /// Let only requests with a user's password through (401 for the others).
    BasicAuth(Arc<BasicAuth>),
    /// Answer preflights; mark responses to allowed origins (both phases).
    Cors(Arc<Cors>),
    /// Answer the limit's status with `Retry-After` to a key over its rate.
    RateLimit(Arc<super::rate_limit::RateLimit>),
}

/// The phase an action runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Request,
    Response,
    /// A part in each: the filter is in both lists.
    Both,
}

impl Action {
    pub fn phase(&self) -> Phase {
        match self {
            Action::SetResponseHeader(..)
            | Action::AddResponseHeader(..)
            | Action::RemoveResponseHeader(_) => Phase::Response,
            Action::Cors(_) => Phase::Both,
            _ => Phase::Request,
        }
    }

    /// The templates in this action.
    pub fn templates(&self) -> impl Iterator<Item = &Template> {
        let template = match self {
            Action::Redirect { to, .. } | Action::RewritePath { to, .. } => Some(to),
            Action::SetRequestHeader(_, t)
            | Action::AddRequestHeader(_, t)
            | Action::SetResponseHeader(_, t)
            | Action::AddResponseHeader(_, t) => Some(t),
            _ => None,
        };
        template.into_iter()
    }
}

impl Action {
    /// The part of this action that waits (a store round trip, a password hash on a blocking
    /// thread), for a filter that stopped the synchronous run with [`super::Step::Wait`].
    /// `Some` answers the request.
    pub(crate) async fn wait(
        &self,
        session: &mut crate::session::Session,
    ) -> Option<crate::response::Response> {
        match self {
            Action::BasicAuth(auth) => auth.verify(&session.req).await,
            Action::RateLimit(limit) => limit.ask_store(session).await,
            _ => None,
        }
    }
}

/// Replace `parts`' path, keeping its query, scheme and authority. `false` (nothing changed)
/// when `path` cannot be a request path.
pub(crate) fn replace_path(parts: &mut http::request::Parts, path: &str) -> bool {
    let target = match parts.uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_owned(),
    };
    let Ok(path_and_query) = target.parse::<http::uri::PathAndQuery>() else {
        return false;
    };
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.path_and_query = Some(path_and_query);
    match http::Uri::from_parts(uri) {
        Ok(new) => {
            parts.uri = new;
            true
        }
        Err(_) => false,
    }
}

/// Set (replace) or add `name: value` in `headers`; a rendered value that is not a valid
/// header value (`None`: a capture with a control byte) is left out.
pub(crate) fn put_header(
    headers: &mut http::HeaderMap,
    name: &HeaderName,
    value: Option<HeaderValue>,
    append: bool,
) {
    let Some(value) = value else {
        tracing::debug!(header = %name, "a filter's header value is not valid: left out");
        return;
    };
    if append {
        headers.append(name.clone(), value);
    } else {
        headers.insert(name.clone(), value);
    }
}
