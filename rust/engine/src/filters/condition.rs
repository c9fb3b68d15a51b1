//! When a filter applies: tests on the request as it stands (method, path, host, a header, a
//! query parameter, a cookie, the client's address) and their combinations.

use std::net::IpAddr;

use regex::Regex;

use crate::cidr::Networks;
use crate::lb::hash_key;

/// How a text (a path, a header's value, ...) is tested.
#[derive(Debug, Clone)]
pub enum TextMatch {
    /// The value is there at all (headers, query parameters, cookies).
    Present,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl TextMatch {
    fn matches(&self, value: &[u8]) -> bool {
        match self {
            TextMatch::Present => true,
            TextMatch::Exact(expected) => value == expected.as_bytes(),
            TextMatch::Prefix(prefix) => value.starts_with(prefix.as_bytes()),
            // A value that is not UTF-8 matches no pattern.
            TextMatch::Regex(regex) => std::str::from_utf8(value).is_ok_and(|v| regex.is_match(v)),
        }
    }

    fn regex(&self) -> Option<&Regex> {
        match self {
            TextMatch::Regex(regex) => Some(regex),
            _ => None,
        }
    }
}

/// How a request's host is tested: case-insensitive, its port ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `api.example.com`.
    Exact(String),
    /// `*.example.com`: any name ending in `.example.com` (not `example.com` itself). Holds
    /// the suffix, `.example.com`.
    Wildcard(String),
}

impl HostMatch {
    /// `*.example.com` is a wildcard; anything else a name (or an address, `[::1]`).
    /// Lowercased here, once.
    pub fn parse(pattern: &str) -> Result<Self, crate::lb::ConfigError> {
        let name = pattern.strip_prefix("*.").unwrap_or(pattern);
        let valid = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._[]:".contains(&b));
        if !valid {
            return Err(crate::lb::ConfigError::new(
                "host",
                format!("{pattern:?} is not a host name or *.suffix"),
            ));
        }
        let pattern = pattern.to_ascii_lowercase();
        Ok(match pattern.strip_prefix('*') {
            Some(suffix) => HostMatch::Wildcard(suffix.to_owned()),
            None => HostMatch::Exact(pattern),
        })
    }

    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostMatch::Exact(name) => host.eq_ignore_ascii_case(name),
            HostMatch::Wildcard(suffix) => {
                host.len() > suffix.len()
                    && host.is_char_boundary(host.len() - suffix.len())
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub enum Condition {
    /// The method is one of these.
    Method(Vec<http::Method>),
    Path(TextMatch),
    Host(HostMatch),
    Header(http::HeaderName, TextMatch),
    Query(String, TextMatch),
    Cookie(String, TextMatch),
    /// The client's address is in one of `inside` (any address when empty) and in none of
    /// `outside`.
    ClientIp {
        inside: Networks,
        outside: Networks,
    },
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
}

/// The request's host as a client named it (the target's authority, else `Host`), without
/// its port; `None` when it names none.
pub fn request_host(req: &http::request::Parts) -> Option<&str> {
    let authority = match req.uri.host() {
        Some(host) => host,
        None => req.headers.get(http::header::HOST)?.to_str().ok()?,
    };
    Some(without_port(authority))
}

fn without_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        // An IPv6 literal keeps its brackets, as in a URL.
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _port)| host)
}

impl Condition {
    /// A client-IP condition from CIDR lists (a bare address is a /32 or /128); errors name
    /// the entry, as `not_in[1]`.
    pub fn client_ip(
        inside: &[impl AsRef<str>],
        outside: &[impl AsRef<str>],
    ) -> Result<Self, crate::lb::ConfigError> {
        Ok(Condition::ClientIp {
            inside: Networks::parse("in_", inside)?,
            outside: Networks::parse("not_in", outside)?,
        })
    }

    pub fn matches(&self, req: &http::request::Parts, client: IpAddr) -> bool {
        match self {
            Condition::Method(methods) => methods.contains(&req.method),
            Condition::Path(test) => test.matches(req.uri.path().as_bytes()),
            Condition::Host(test) => request_host(req).is_some_and(|host| test.matches(host)),
            Condition::Header(name, test) => req
                .headers
                .get_all(name)
                .iter()
                .any(|value| test.matches(value.as_bytes())),
            Condition::Query(name, test) => {
                hash_key::query_param(req, name).is_some_and(|value| test.matches(value))
            }
            Condition::Cookie(name, test) => {
                hash_key::cookie(req, name).is_some_and(|value| test.matches(value))
            }
            Condition::ClientIp { inside, outside } => {
                (inside.is_empty() || inside.contains(client)) && !outside.contains(client)
            }
            Condition::All(all) => all.iter().all(|c| c.matches(req, client)),
            Condition::Any(any) => any.iter().any(|c| c.matches(req, client)),
            Condition::Not(inner) => !inner.matches(req, client),
        }
    }

    /// The regex whose capture groups a filter's templates may name: the first one this
    /// condition tests with (outside a `Not`, where nothing matched).
    pub fn capturing(&self) -> Option<(&Regex, Subject<'_>)> {
        match self {
            Condition::Path(test) => test.regex().map(|r| (r, Subject::Path)),
            Condition::Header(name, test) => test.regex().map(|r| (r, Subject::Header(name))),
            Condition::All(all) | Condition::Any(all) => all.iter().find_map(Condition::capturing),
            _ => None,
        }
    }
}

/// What a capturing regex was matched against.
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    Path,
    Header(&'a http::HeaderName),
}

impl Subject<'_> {
    /// The text the regex matched in `req` (for a header, the first value it matches).
    pub fn captures<'r>(
        &self,
        regex: &Regex,
        req: &'r http::request::Parts,
    ) -> Option<regex::Captures<'r>> {
        match self {
            Subject::Path => regex.captures(req.uri.path()),
            Subject::Header(name) => req
                .headers
                .get_all(*name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(|v| regex.captures(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut builder = http::Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3));

    #[test]
    fn hosts_match_case_insensitively_without_port() {
        let r = req("GET", "/", &[("host", "API.Example.com:8080")]);
        assert!(Condition::Host(HostMatch::parse("api.example.com").unwrap()).matches(&r, CLIENT));
        assert!(Condition::Host(HostMatch::parse("*.EXAMPLE.com").unwrap()).matches(&r, CLIENT));
        assert!(
            !Condition::Host(HostMatch::parse("*.api.example.com").unwrap()).matches(&r, CLIENT)
        );
        let bare = req("GET", "/", &[("host", "example.com")]);
        assert!(!Condition::Host(HostMatch::parse("*.example.com").unwrap()).matches(&bare, CLIENT));
        assert!(HostMatch::parse("bad host").is_err());
        assert!(HostMatch::parse("*.").is_err());
        let v6 = req("GET", "/", &[("host", "[::1]:8080")]);
        assert_eq!(request_host(&v6), Some("[::1]"));
        let absolute = req("GET", "http://other.example:81/x", &[]);
        assert_eq!(request_host(&absolute), Some("other.example"));
    }

    #[test]
    fn headers_queries_and_cookies() {
        let r = req(
            "POST",
            "/api/v1?debug=1&user=bob",
            &[
                ("x-a", "one"),
                ("x-a", "two"),
                ("cookie", "sid=abc; theme=dark"),
            ],
        );
        let header = |t| Condition::Header(http::HeaderName::from_static("x-a"), t);
        assert!(header(TextMatch::Present).matches(&r, CLIENT));
        assert!(header(TextMatch::Exact("two".into())).matches(&r, CLIENT));
        assert!(!header(TextMatch::Exact("Two".into())).matches(&r, CLIENT));
        assert!(header(TextMatch::Regex(Regex::new("^t").unwrap())).matches(&r, CLIENT));
        assert!(
            Condition::Query("user".into(), TextMatch::Exact("bob".into())).matches(&r, CLIENT)
        );
        assert!(!Condition::Query("use".into(), TextMatch::Present).matches(&r, CLIENT));
        assert!(
            Condition::Cookie("theme".into(), TextMatch::Exact("dark".into())).matches(&r, CLIENT)
        );
        assert!(Condition::Method(vec![http::Method::POST]).matches(&r, CLIENT));
        assert!(Condition::Path(TextMatch::Prefix("/api/".into())).matches(&r, CLIENT));
        assert!(!Condition::Path(TextMatch::Exact("/api".into())).matches(&r, CLIENT));
    }

    #[test]
    fn client_ip_lists_v4_v6_and_mapped() {
        let allowed =
            Condition::client_ip(&["10.0.0.0/8", "2001:db8::/32"], &["10.9.0.0/16"]).unwrap();
        let r = req("GET", "/", &[]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(allowed.matches(&r, ip("10.1.2.3")));
        assert!(allowed.matches(&r, ip("::ffff:10.1.2.3")));
        assert!(!allowed.matches(&r, ip("10.9.0.1")));
        assert!(allowed.matches(&r, ip("2001:db8::1")));
        assert!(!allowed.matches(&r, ip("2001:db9::1")));
        let all = Condition::All(vec![allowed.clone(), Condition::Not(Box::new(allowed))]);
        assert!(!all.matches(&r, ip("10.1.2.3")));
    }
}
