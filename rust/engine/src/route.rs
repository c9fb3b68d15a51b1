//! Routes: which upstream a request goes to, by its host and path, compiled once at start-up
//! into one matcher.
//!
//! Order: the host first (routes naming it exactly, then wildcard routes, longest suffix
//! first, then routes for any host); within those, the longest `path_prefix` that matches,
//! then the `path_regex` routes in list order (one `RegexSet` pass), then a route with
//! neither (the default). A host whose routes match no path falls through to the next kind
//! of host.

use std::collections::HashMap;
use std::sync::Arc;

use regex::{Regex, RegexSet};

use crate::filters::{replace_path, request_host, HostMatch};
use crate::lb::{ConfigError, Upstream};
use crate::session::Session;

#[derive(Debug, Clone)]
pub struct Route {
    pub host: Option<HostMatch>,
    pub path_prefix: Option<String>,
    pub path_regex: Option<Regex>,
    pub upstream: Upstream,
    /// Send the path upstream without its `path_prefix`.
    pub strip_prefix: bool,
}

impl Route {
    /// What the router needs of a route: a `path_prefix` that is a path, and one to strip
    /// when `strip_prefix` is set. Errors name the field.
    pub fn check(&self) -> Result<(), ConfigError> {
        match &self.path_prefix {
            Some(prefix) if !prefix.starts_with('/') => Err(ConfigError::new(
                "path_prefix",
                format!("must start with '/', got {prefix:?}"),
            )),
            None if self.strip_prefix => Err(ConfigError::new(
                "strip_prefix",
                "needs a path_prefix to strip",
            )),
            _ => Ok(()),
        }
    }
}

/// The routes for one kind of host, indexed for matching.
#[derive(Debug, Default)]
struct PathTable {
    /// Longest first; ties in list order.
    prefixes: Vec<(Arc<str>, usize)>,
    regexes: Option<(RegexSet, Vec<usize>)>,
    default: Option<usize>,
}

impl PathTable {
    fn build(routes: &[Route], members: &[usize]) -> Result<Self, ConfigError> {
        let mut table = PathTable::default();
        let mut patterns = Vec::new();
        let mut indexes = Vec::new();
        for &i in members {
            let route = &routes[i];
            match (&route.path_prefix, &route.path_regex) {
                (Some(prefix), _) => table.prefixes.push((prefix.as_str().into(), i)),
                (None, Some(regex)) => {
                    patterns.push(regex.as_str());
                    indexes.push(i);
                }
                (None, None) => {
                    table.default.get_or_insert(i);
                }
            }
        }
        // Stable: equal lengths keep list order.
        table
            .prefixes
            .sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        if !patterns.is_empty() {
            let set = RegexSet::new(&patterns)
                .map_err(|e| ConfigError::new("path_regex", e.to_string()))?;
            table.regexes = Some((set, indexes));
        }
        Ok(table)
    }

    fn find(&self, routes: &[Route], path: &str) -> Option<usize> {
        let by_prefix = self.prefixes.iter().find(|(prefix, i)| {
            path.starts_with(&**prefix)
                && routes[*i]
                    .path_regex
                    .as_ref()
                    .is_none_or(|r| r.is_match(path))
        });
        if let Some((_, i)) = by_prefix {
            return Some(*i);
        }
        if let Some((set, indexes)) = &self.regexes {
            if let Some(first) = set.matches(path).iter().next() {
                return Some(indexes[first]);
            }
        }
        self.default
    }
}

#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    /// By lowercase name.
    exact: HashMap<String, PathTable>,
    /// `(suffix, table)`, longest suffix first.
    wildcard: Vec<(String, PathTable)>,
    any: PathTable,
}

impl Router {
    /// Check and index `routes`; errors name the route as `routes[i].field`.
    pub fn new(routes: Vec<Route>) -> Result<Self, ConfigError> {
        let mut exact: Vec<(String, Vec<usize>)> = Vec::new();
        let mut wildcard: Vec<(String, Vec<usize>)> = Vec::new();
        let mut any = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            route
                .check()
                .map_err(|e| e.within(&format!("routes[{i}]")))?;
            let (list, key) = match &route.host {
                Some(HostMatch::Exact(name)) => (&mut exact, name),
                Some(HostMatch::Wildcard(suffix)) => (&mut wildcard, suffix),
                None => {
                    any.push(i);
                    continue;
                }
            };
            match list.iter_mut().find(|(k, _)| k == key) {
                Some((_, members)) => members.push(i),
                None => list.push((key.clone(), vec![i])),
            }
        }
        let table = |members: &[usize]| PathTable::build(&routes, members);
        let exact = exact
            .iter()
            .map(|(name, members)| Ok((name.clone(), table(members)?)))
            .collect::<Result<_, ConfigError>>()?;
        let mut wildcard = wildcard
            .iter()
            .map(|(suffix, members)| Ok((suffix.clone(), table(members)?)))
            .collect::<Result<Vec<_>, ConfigError>>()?;
        wildcard.sort_by_key(|(suffix, _)| std::cmp::Reverse(suffix.len()));
        let any = table(&any)?;
        Ok(Router {
            routes,
            exact,
            wildcard,
            any,
        })
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The index of the route `req` takes, if any.
    pub fn find(&self, req: &http::request::Parts) -> Option<usize> {
        let path = req.uri.path();
        // Lower-cased only when it has capitals: most clients send it lower-case already.
        let host = request_host(req).map(|h| {
            if h.bytes().any(|b| b.is_ascii_uppercase()) {
                std::borrow::Cow::Owned(h.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(h)
            }
        });
        let routes = &self.routes;
        let by_name = host
            .as_deref()
            .and_then(|h| self.exact.get(h))
            .and_then(|t| t.find(routes, path));
        by_name
            .or_else(|| {
                let host = host.as_deref()?;
                self.wildcard
                    .iter()
                    .filter(|(suffix, _)| host.len() > suffix.len() && host.ends_with(&**suffix))
                    .find_map(|(_, t)| t.find(routes, path))
            })
            .or_else(|| self.any.find(routes, path))
    }

    /// Route `session`'s request: its route's index in `session.route`, and what that
    /// route strips from the path sent upstream.
    pub fn route(&self, session: &mut Session) {
        session.route = self.find(&session.req);
        session.strip_prefix = session
            .route
            .map(|i| &self.routes[i])
            .filter(|r| r.strip_prefix)
            .and_then(|r| r.path_prefix.as_deref())
            .map(Arc::from);
    }

    /// The matched route's upstream.
    pub fn upstream(&self, session: &Session) -> Option<&Upstream> {
        session.route.map(|i| &self.routes[i].upstream)
    }
}

/// Take `prefix` off `head`'s path (`/v1/users` with `/v1/` or `/v1` gives `/users`), when
/// the path still starts with it.
pub fn strip_prefix(head: &mut http::request::Parts, prefix: &str) {
    let Some(rest) = head.uri.path().strip_prefix(prefix) else {
        return;
    };
    let path = if rest.starts_with('/') {
        rest.to_owned()
    } else {
        format!("/{rest}")
    };
    replace_path(head, &path);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer::Peer;

    fn route(host: Option<&str>, prefix: Option<&str>, regex: Option<&str>) -> Route {
        Route {
            host: host.map(|h| HostMatch::parse(h).unwrap()),
            path_prefix: prefix.map(str::to_owned),
            path_regex: regex.map(|r| Regex::new(r).unwrap()),
            upstream: Upstream::Peer(Peer::new("127.0.0.1:1").unwrap()),
            strip_prefix: false,
        }
    }

    fn req(host: &str, uri: &str) -> http::request::Parts {
        let request = http::Request::builder().uri(uri).header("host", host);
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn host_then_longest_prefix_then_regex_then_default() {
        let router = Router::new(vec![
            route(Some("api.example.com"), Some("/v1/"), None),
            route(Some("api.example.com"), Some("/v1/admin/"), None),
            route(Some("*.example.com"), Some("/"), None),
            route(None, None, Some(r"^/static/.*\.(css|js)$")),
            route(None, None, Some(r"^/static/")),
            route(None, None, None),
            route(None, Some("/v1/"), None),
        ])
        .unwrap();
        let find = |host, uri| router.find(&req(host, uri));
        assert_eq!(find("api.example.com", "/v1/users"), Some(0));
        assert_eq!(find("API.example.com:8443", "/v1/admin/x"), Some(1));
        // The exact host has no route for this path: the wildcard's.
        assert_eq!(find("api.example.com", "/other"), Some(2));
        assert_eq!(find("www.example.com", "/v1/users"), Some(2));
        // example.com itself is not *.example.com.
        assert_eq!(find("example.com", "/v1/users"), Some(6));
        assert_eq!(find("other.org", "/static/a.css"), Some(3));
        assert_eq!(find("other.org", "/static/a.png"), Some(4));
        assert_eq!(find("other.org", "/anything"), Some(5));
    }

    #[test]
    fn no_default_means_no_route() {
        let router = Router::new(vec![route(None, Some("/a/"), None)]).unwrap();
        assert_eq!(router.find(&req("h", "/b")), None);
    }

    #[test]
    fn strips_the_prefix_keeping_the_query() {
        for (prefix, uri, stripped) in [
            ("/v1/", "/v1/users?x=1", "/users?x=1"),
            ("/v1", "/v1/users", "/users"),
            ("/v1/", "/v1/", "/"),
        ] {
            let mut head = req("h", uri);
            strip_prefix(&mut head, prefix);
            assert_eq!(head.uri.path_and_query().unwrap().as_str(), stripped);
        }
    }

    #[test]
    fn bad_routes_name_the_route_and_field() {
        let mut strip = route(None, None, None);
        strip.strip_prefix = true;
        let error = Router::new(vec![route(None, None, None), strip]).unwrap_err();
        assert_eq!(error.field, "routes[1].strip_prefix");
        let error = Router::new(vec![route(None, Some("v1"), None)]).unwrap_err();
        assert_eq!(error.field, "routes[0].path_prefix");
    }
}
