//! What consistent hashing hashes for a request: `hash_key="client_ip"`, `"path"`,
//! `"header:NAME"`, `"cookie:NAME"` or `"query:NAME"`, read from the request as the phases
//! before `upstream_peer` left it (a `request_filter` that sets the header sets the key).

use std::borrow::Cow;

use super::ConfigError;
use crate::session::Session;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address, as text (`127.0.0.1`, `::1`): nginx's `$remote_addr`.
    ClientIp,
    /// The path, without the query.
    Path,
    /// The first value of a request header.
    Header(http::HeaderName),
    /// The value of a cookie, as sent (not decoded).
    Cookie(String),
    /// The value of a query parameter, as sent (not percent-decoded).
    Query(String),
}

impl HashKey {
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let bad = |message: String| ConfigError::new("hash_key", message);
        let named = |kind: &str, name: &str| {
            if name.is_empty() {
                Err(bad(format!("{kind}: needs a name, as in \"{kind}:NAME\"")))
            } else {
                Ok(name.to_owned())
            }
        };
        match spec.split_once(':') {
            None if spec == "client_ip" => Ok(HashKey::ClientIp),
            None if spec == "path" => Ok(HashKey::Path),
            Some(("header", name)) => {
                http::HeaderName::from_bytes(named("header", name)?.as_bytes())
                    .map(HashKey::Header)
                    .map_err(|_| bad(format!("{name:?} is not a valid header name")))
            }
            Some(("cookie", name)) => Ok(HashKey::Cookie(named("cookie", name)?)),
            Some(("query", name)) => Ok(HashKey::Query(named("query", name)?)),
            _ => Err(bad(format!(
                "unknown key {spec:?}: expected \"client_ip\", \"path\", \"header:NAME\", \
                 \"cookie:NAME\" or \"query:NAME\""
            ))),
        }
    }

    /// The key of `session`'s request, or `None` when the request has none (no such header,
    /// cookie or parameter): the balancer then picks as round robin does.
    pub fn extract<'a>(&self, session: &'a Session) -> Option<Cow<'a, [u8]>> {
        let req = &session.req;
        match self {
            HashKey::ClientIp => Some(Cow::Owned(
                session.client_addr().ip().to_string().into_bytes(),
            )),
            HashKey::Path => Some(Cow::Borrowed(req.uri.path().as_bytes())),
            HashKey::Header(name) => req
                .headers
                .get(name)
                .map(|value| Cow::Borrowed(value.as_bytes())),
            HashKey::Cookie(name) => cookie(req, name).map(Cow::Borrowed),
            HashKey::Query(name) => query_param(req, name).map(Cow::Borrowed),
        }
    }
}

/// The value of cookie `name`, as sent (not decoded).
pub(crate) fn cookie<'a>(req: &'a http::request::Parts, name: &str) -> Option<&'a [u8]> {
    req.headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| pair_value(pair.trim_ascii_start(), name))
}

/// The value of query parameter `name`, as sent (not percent-decoded).
pub(crate) fn query_param<'a>(req: &'a http::request::Parts, name: &str) -> Option<&'a [u8]> {
    req.uri
        .query()?
        .as_bytes()
        .split(|&b| b == b'&')
        .find_map(|pair| pair_value(pair, name))
}

/// `value` of `name=value` when `pair` is for `name`.
fn pair_value<'a>(pair: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let value = pair.strip_prefix(name.as_bytes())?.strip_prefix(b"=")?;
    Some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(uri: &str, headers: &[(&str, &str)]) -> Session {
        crate::session::test_session("GET", uri, headers)
    }

    fn key(spec: &str, session: &Session) -> Option<Vec<u8>> {
        HashKey::parse(spec)
            .unwrap()
            .extract(session)
            .map(|k| k.into_owned())
    }

    #[test]
    fn reads_each_kind_of_key() {
        let s = session(
            "/a/b?x=1&user=u7&y",
            &[
                ("x-user", "alice"),
                ("cookie", "a=1; sid=s9"),
                ("cookie", "c=3"),
            ],
        );
        assert_eq!(key("client_ip", &s).unwrap(), b"10.1.2.3");
        assert_eq!(key("path", &s).unwrap(), b"/a/b");
        assert_eq!(key("header:x-user", &s).unwrap(), b"alice");
        assert_eq!(key("header:X-User", &s).unwrap(), b"alice");
        assert_eq!(key("cookie:sid", &s).unwrap(), b"s9");
        assert_eq!(key("cookie:c", &s).unwrap(), b"3");
        assert_eq!(key("query:user", &s).unwrap(), b"u7");
        // Prefixes of a name are other names.
        assert_eq!(key("query:use", &s), None);
        assert_eq!(key("cookie:si", &s), None);
        assert_eq!(key("header:x-other", &s), None);
        assert_eq!(key("query:user", &session("/", &[])), None);
    }

    #[test]
    fn bad_specs_name_the_field() {
        for bad in [
            "",
            "ip",
            "header:",
            "header:bad name",
            "cookie:",
            "query:",
            "path:x",
        ] {
            let error = HashKey::parse(bad).unwrap_err();
            assert_eq!(error.field, "hash_key", "{bad:?}");
        }
    }
}
