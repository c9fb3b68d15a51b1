//! Cross-origin resource sharing, answered by the proxy: a preflight (`OPTIONS` with `Origin`
//! and `Access-Control-Request-Method`) gets its answer here, in the request phase, and never
//! reaches the upstream; other requests from an allowed origin are proxied and their response
//! gets `Access-Control-Allow-Origin` (and `-Expose-Headers`, `-Allow-Credentials`) in the
//! response phase. Whether a Cors filter applies, and the `Origin` it answers, are decided in
//! the request phase ([`CorsApplied`]): the filters and hooks after it may change the request.
//! Where it applies, the response's own `Access-Control-*` headers are replaced by the
//! filter's, on the upstream's responses and the proxy's own answers and error pages alike.
//!
//! A preflight from an origin not allowed is answered 403 with no `Access-Control-*` header:
//! the browser then refuses the cross-origin request (it needs a 2xx with the allow headers),
//! and whoever reads the answer sees why. Other requests from such an origin are proxied
//! without allow headers: the browser keeps their response from the page.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use crate::lb::ConfigError;
use crate::response::Response;

/// What a user declares (`f.Cors(...)`), before it is checked.
#[derive(Debug, Clone, Default)]
pub struct CorsConfig {
    /// Exact origins (`https://app.example.com`), or `["*"]` for any.
    pub origins: Vec<String>,
    pub methods: Vec<String>,
    /// The request headers a page may send (`Access-Control-Allow-Headers`).
    pub headers: Vec<String>,
    /// The response headers a page may read (`Access-Control-Expose-Headers`).
    pub expose_headers: Vec<String>,
    pub credentials: bool,
    /// How long, in seconds, a browser may keep a preflight's answer.
    pub max_age: Option<u64>,
}

#[derive(Debug, Clone)]
enum Origins {
    Any,
    /// Lowercased, compared without regard to case.
    Listed(Vec<String>),
}

/// A checked [`CorsConfig`], its header values made once.
#[derive(Debug)]
pub struct Cors {
    origins: Origins,
    allow_methods: HeaderValue,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    credentials: bool,
    max_age: Option<HeaderValue>,
}

/// How many Cors filters a list may have: one bit each in [`CorsApplied`].
pub const MAX_CORS_FILTERS: usize = 64;

/// The `Access-Control-*` response headers a Cors filter decides: any the response has
/// already (an upstream's own CORS) are removed where the filter applies.
static DECIDED: [HeaderName; 6] = [
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
    header::ACCESS_CONTROL_EXPOSE_HEADERS,
    header::ACCESS_CONTROL_ALLOW_METHODS,
    header::ACCESS_CONTROL_ALLOW_HEADERS,
    header::ACCESS_CONTROL_MAX_AGE,
];

/// Which Cors filters of the list applied to a request (one bit each, by their rank among
/// the list's Cors filters), and the request's `Origin` when the first did: recorded in the
/// request phase, so that the response phase answers the request as it was then. Nothing
/// allocated for requests no Cors filter applies to.
#[derive(Debug, Default)]
pub struct CorsApplied {
    filters: u64,
    origin: Option<HeaderValue>,
}

impl CorsApplied {
    pub(crate) fn record(&mut self, bit: u64, req: &http::request::Parts) {
        if self.filters == 0 {
            self.origin = req.headers.get(header::ORIGIN).cloned();
        }
        self.filters |= bit;
    }

    pub(crate) fn any(&self) -> bool {
        self.filters != 0
    }

    /// The request's `Origin` if the Cors filter with this bit applied to it.
    pub(crate) fn applied(&self, bit: u64) -> Option<Option<&HeaderValue>> {
        (self.filters & bit != 0).then_some(self.origin.as_ref())
    }
}

static TRUE: HeaderValue = HeaderValue::from_static("true");
static ANY: HeaderValue = HeaderValue::from_static("*");
static ORIGIN: HeaderValue = HeaderValue::from_static("Origin");

/// `values` joined by `, `, each checked by `valid` (errors name `field[i]`); `*` alone is
/// the wildcard, which browsers ignore on credentialed requests.
fn list(
    field: &str,
    values: &[String],
    credentials: bool,
    valid: impl Fn(&str) -> bool,
) -> Result<Option<HeaderValue>, ConfigError> {
    for (i, value) in values.iter().enumerate() {
        let wildcard = value == "*";
        if wildcard && credentials {
            return Err(ConfigError::new(
                format!("{field}[{i}]"),
                "'*' with credentials=True is refused by browsers: name them",
            ));
        }
        if !wildcard && !valid(value) {
            return Err(ConfigError::new(
                format!("{field}[{i}]"),
                format!("{value:?} is not valid here"),
            ));
        }
    }
    if values.is_empty() {
        return Ok(None);
    }
    let joined = values.join(", ");
    Ok(Some(
        HeaderValue::try_from(joined).expect("names and methods are valid header text"),
    ))
}

/// Why `text` is not an origin as a browser sends it in `Origin` (`scheme://host[:port]`,
/// without user info, a path, or the scheme's default port, which browsers leave out), or
/// `None` for one.
fn not_origin(text: &str) -> Option<&'static str> {
    const FORM: &str = "is not an origin (scheme://host[:port], no path)";
    let Ok(uri) = text.parse::<http::Uri>() else {
        return Some(FORM);
    };
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Some(FORM);
    };
    if text != format!("{scheme}://{authority}") {
        return Some(FORM);
    }
    if authority.as_str().contains('@') {
        return Some("has user info, which browsers never send in Origin");
    }
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "https" => Some(443),
        "http" => Some(80),
        _ => None,
    };
    if authority.port_u16().is_some() && authority.port_u16() == default_port {
        return Some("names its scheme's default port, which browsers leave out of Origin");
    }
    None
}

impl Cors {
    /// Errors name the field: `origins[1]`, `methods[0]`, `credentials`.
    pub fn new(config: &CorsConfig) -> Result<Self, ConfigError> {
        let CorsConfig {
            origins,
            methods,
            headers,
            expose_headers,
            credentials,
            max_age,
        } = config;
        if origins.is_empty() {
            return Err(ConfigError::new(
                "origins",
                "name at least one origin, or \"*\"",
            ));
        }
        let origins = if origins.iter().any(|o| o == "*") {
            if origins.len() > 1 {
                return Err(ConfigError::new("origins", "\"*\" stands alone"));
            }
            if *credentials {
                return Err(ConfigError::new(
                    "credentials",
                    "origins=[\"*\"] with credentials=True is refused by browsers: name the origins",
                ));
            }
            Origins::Any
        } else {
            for (i, origin) in origins.iter().enumerate() {
                if let Some(why) = not_origin(origin) {
                    return Err(ConfigError::new(
                        format!("origins[{i}]"),
                        format!("{origin:?} {why}"),
                    ));
                }
            }
            Origins::Listed(origins.iter().map(|o| o.to_ascii_lowercase()).collect())
        };
        if methods.is_empty() {
            return Err(ConfigError::new("methods", "name at least one method"));
        }
        let is_method = |m: &str| Method::from_bytes(m.as_bytes()).is_ok();
        let is_header = |h: &str| HeaderName::from_bytes(h.as_bytes()).is_ok();
        Ok(Cors {
            origins,
            allow_methods: list("methods", methods, *credentials, is_method)?.expect("not empty"),
            allow_headers: list("headers", headers, *credentials, is_header)?,
            expose_headers: list("expose_headers", expose_headers, *credentials, is_header)?,
            credentials: *credentials,
            max_age: max_age.map(HeaderValue::from),
        })
    }

    /// `origin` when it is allowed.
    fn allowed<'r>(&self, origin: Option<&'r HeaderValue>) -> Option<&'r HeaderValue> {
        let origin = origin?;
        match &self.origins {
            Origins::Any => Some(origin),
            Origins::Listed(origins) => origins
                .iter()
                .any(|o| o.as_bytes().eq_ignore_ascii_case(origin.as_bytes()))
                .then_some(origin),
        }
    }

    /// `Access-Control-Allow-Origin` (and the headers that go with it on every answer) for an
    /// allowed origin, `*` for any (even without `Origin`: the same answer for every request,
    /// which caches may keep); `Vary: Origin` whenever the answer depends on the origin.
    /// Whether the origin is allowed.
    fn allow_origin(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) -> bool {
        if let Origins::Any = self.origins {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, ANY.clone());
            return true;
        }
        vary_on_origin(headers);
        let Some(origin) = self.allowed(origin) else {
            return false;
        };
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.credentials {
            headers.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, TRUE.clone());
        }
        true
    }

    /// The request phase: the answer to a preflight, `None` for any other request.
    pub fn preflight(&self, req: &http::request::Parts) -> Option<Response> {
        let preflight = req.method == Method::OPTIONS
            && req.headers.contains_key(header::ORIGIN)
            && req
                .headers
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if !preflight {
            return None;
        }
        let Some(origin) = self.allowed(req.headers.get(header::ORIGIN)) else {
            let mut refused = Response::status_page(StatusCode::FORBIDDEN);
            if matches!(self.origins, Origins::Listed(_)) {
                vary_on_origin(&mut refused.headers);
            }
            return Some(refused);
        };
        let mut answer = Response::new(StatusCode::NO_CONTENT, bytes::Bytes::new());
        let headers = &mut answer.headers;
        self.allow_origin(Some(origin), headers);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            self.allow_methods.clone(),
        );
        if let Some(allowed) = &self.allow_headers {
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed.clone());
        }
        if let Some(max_age) = &self.max_age {
            headers.insert(header::ACCESS_CONTROL_MAX_AGE, max_age.clone());
        }
        Some(answer)
    }

    /// The response phase, for a request this filter applied to (its `Origin` as it was
    /// then): the response's own `Access-Control-*` headers go (an upstream reflecting any
    /// `Origin` would let every site read it), and a request from an allowed origin gets the
    /// filter's.
    pub fn on_response(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap) {
        for name in &DECIDED {
            headers.remove(name);
        }
        if self.allow_origin(origin, headers) {
            if let Some(exposed) = &self.expose_headers {
                headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, exposed.clone());
            }
        }
    }
}

/// Add `Origin` to `Vary` unless it is there (or `Vary: *`), so that caches keep one answer
/// per origin.
fn vary_on_origin(headers: &mut HeaderMap) {
    let covered = headers.get_all(header::VARY).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .map(str::trim)
                .any(|token| token == "*" || token.eq_ignore_ascii_case("origin"))
        })
    });
    if !covered {
        headers.append(header::VARY, ORIGIN.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::test_session;

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|v| (*v).to_owned()).collect()
    }

    fn cors(origins: &[&str], credentials: bool) -> Result<Cors, ConfigError> {
        Cors::new(&CorsConfig {
            origins: strings(origins),
            methods: strings(&["GET", "POST"]),
            headers: strings(&["content-type", "x-token"]),
            expose_headers: strings(&["x-total"]),
            credentials,
            max_age: Some(600),
        })
    }

    fn preflight(origin: &str) -> http::request::Parts {
        let headers = [
            ("origin", origin),
            ("access-control-request-method", "POST"),
        ];
        test_session("OPTIONS", "/api", &headers).req
    }

    #[test]
    fn a_preflight_from_an_allowed_origin_is_answered_with_the_allow_headers() {
        let cors = cors(&["https://app.example.com"], true).unwrap();
        let answer = cors
            .preflight(&preflight("https://APP.example.com"))
            .unwrap();
        assert_eq!(answer.status, StatusCode::NO_CONTENT);
        let h = &answer.headers;
        assert_eq!(h["access-control-allow-origin"], "https://APP.example.com");
        assert_eq!(h["vary"], "Origin");
        assert_eq!(h["access-control-allow-methods"], "GET, POST");
        assert_eq!(h["access-control-allow-headers"], "content-type, x-token");
        assert_eq!(h["access-control-max-age"], "600");
        assert_eq!(h["access-control-allow-credentials"], "true");

        let refused = cors.preflight(&preflight("https://evil.example")).unwrap();
        assert_eq!(refused.status, StatusCode::FORBIDDEN);
        assert!(!refused.headers.contains_key("access-control-allow-origin"));
        // An OPTIONS that is not a preflight goes on.
        let plain = test_session("OPTIONS", "/", &[("origin", "https://app.example.com")]);
        assert!(cors.preflight(&plain.req).is_none());
    }

    #[test]
    fn responses_get_the_origin_and_vary_once() {
        let cors = cors(&["https://app.example.com"], false).unwrap();
        let req = test_session("GET", "/", &[("origin", "https://app.example.com")]).req;
        let mut headers = HeaderMap::new();
        headers.insert("vary", HeaderValue::from_static("accept-encoding"));
        headers.insert("access-control-allow-origin", HeaderValue::from_static("*"));
        cors.on_response(req.headers.get("origin"), &mut headers);
        assert_eq!(
            headers
                .get_all("access-control-allow-origin")
                .iter()
                .collect::<Vec<_>>(),
            ["https://app.example.com"]
        );
        assert_eq!(
            headers.get_all("vary").iter().collect::<Vec<_>>(),
            ["accept-encoding", "Origin"]
        );
        assert_eq!(headers["access-control-expose-headers"], "x-total");
        assert!(!headers.contains_key("access-control-allow-credentials"));
        cors.on_response(req.headers.get("origin"), &mut headers);
        assert_eq!(headers.get_all("vary").iter().count(), 2);

        let other = test_session("GET", "/", &[("origin", "https://other.example")]).req;
        let mut headers = HeaderMap::new();
        cors.on_response(other.headers.get("origin"), &mut headers);
        assert!(!headers.contains_key("access-control-allow-origin"));
        assert_eq!(headers["vary"], "Origin");

        let any = cors_any();
        let mut headers = HeaderMap::new();
        any.on_response(other.headers.get("origin"), &mut headers);
        assert_eq!(headers["access-control-allow-origin"], "*");
        assert!(!headers.contains_key("vary"));
        // The same answer for every request, with an Origin or without.
        let mut headers = HeaderMap::new();
        any.on_response(None, &mut headers);
        assert_eq!(headers["access-control-allow-origin"], "*");
        assert!(!headers.contains_key("vary"));
    }

    /// An upstream that does its own CORS (reflecting any Origin) is overruled where the
    /// filter applies: a disallowed origin is not let in through the upstream's headers.
    #[test]
    fn the_upstream_s_own_cors_headers_are_replaced() {
        let cors = cors(&["https://app.example.com"], false).unwrap();
        let upstream_cors = || {
            let mut headers = HeaderMap::new();
            for (name, value) in [
                ("access-control-allow-origin", "https://evil.example"),
                ("access-control-allow-credentials", "true"),
                ("access-control-expose-headers", "x-secret"),
                ("access-control-allow-methods", "PUT"),
                ("access-control-allow-headers", "x-any"),
                ("access-control-max-age", "86400"),
            ] {
                headers.insert(name, HeaderValue::from_static(value));
            }
            headers
        };
        let mut headers = upstream_cors();
        cors.on_response(
            Some(&HeaderValue::from_static("https://evil.example")),
            &mut headers,
        );
        let left: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["vary"]);

        let mut headers = upstream_cors();
        cors.on_response(
            Some(&HeaderValue::from_static("https://app.example.com")),
            &mut headers,
        );
        assert_eq!(
            headers["access-control-allow-origin"],
            "https://app.example.com"
        );
        assert_eq!(headers["access-control-expose-headers"], "x-total");
        for gone in [
            "access-control-allow-credentials",
            "access-control-allow-methods",
            "access-control-allow-headers",
            "access-control-max-age",
        ] {
            assert!(!headers.contains_key(gone), "{gone}");
        }
    }

    /// The response part answers the request as the Cors filter saw it: a later RewritePath
    /// (or a hook removing Origin) does not take the allow headers away.
    #[test]
    fn the_response_part_follows_what_the_request_part_decided() {
        use crate::filters::{Action, Condition, Filter, Filters, Step, Template, TextMatch};
        let old = Condition::Path(TextMatch::Prefix("/old/".into()));
        let to = Template::parse("to", "/new/", Default::default()).unwrap();
        let filters = Filters::new(vec![
            Filter::new(
                Some(old),
                Action::Cors(std::sync::Arc::new(
                    cors(&["https://app.example.com"], false).unwrap(),
                )),
            ),
            Filter::new(
                None,
                Action::RewritePath {
                    pattern: regex::Regex::new("^/old/").unwrap(),
                    to,
                },
            ),
        ])
        .unwrap();
        let origin = [("origin", "https://app.example.com")];
        let mut session = test_session("GET", "/old/x", &origin);
        assert!(matches!(filters.on_request(&mut session), Step::Continue));
        assert_eq!(session.req.uri.path(), "/new/");
        session.req.headers.remove("origin");
        let mut head = http::Response::new(()).into_parts().0;
        filters.on_response(&mut session, &mut head);
        assert_eq!(
            head.headers["access-control-allow-origin"],
            "https://app.example.com"
        );

        // A request the filter did not apply to gets nothing, even once rewritten to a path
        // it covers.
        let mut session = test_session("GET", "/new/", &origin);
        session.req.uri = "/old/y".parse().unwrap();
        let mut head = http::Response::new(()).into_parts().0;
        filters.on_response(&mut session, &mut head);
        assert!(head.headers.is_empty());
    }

    /// The proxy's own answers get the response part too (a 401 the page can read), but a
    /// preflight's answer is left as the filter made it.
    #[test]
    fn local_answers_get_the_allow_headers_but_preflight_answers_are_left_alone() {
        use crate::filters::{Action, Filter, Filters, Step};
        let cors = std::sync::Arc::new(cors(&["https://app.example.com"], true).unwrap());
        let filters = Filters::new(vec![
            Filter::new(None, Action::Cors(cors)),
            Filter::new(None, Action::Deny(StatusCode::FORBIDDEN)),
        ])
        .unwrap();
        let mut session = test_session("GET", "/", &[("origin", "https://app.example.com")]);
        let Step::Answer(mut denied) = filters.on_request(&mut session) else {
            panic!("denied")
        };
        filters.on_local_response(&session, &mut denied.headers);
        assert_eq!(
            denied.headers["access-control-allow-origin"],
            "https://app.example.com"
        );
        assert_eq!(denied.headers["access-control-allow-credentials"], "true");

        let mut session = test_session("GET", "/", &[]);
        session.req = preflight("https://app.example.com");
        let Step::Answer(mut answer) = filters.on_request(&mut session) else {
            panic!("a preflight is answered")
        };
        filters.on_local_response(&session, &mut answer.headers);
        assert_eq!(answer.headers["access-control-allow-methods"], "GET, POST");
        assert_eq!(answer.headers["access-control-max-age"], "600");
    }

    fn cors_any() -> Cors {
        cors(&["*"], false).unwrap()
    }

    /// One filter, a part in each phase: the list runs the right one in each.
    #[test]
    fn a_cors_filter_runs_in_both_phases() {
        use crate::filters::{Action, Filter, Filters, Step};
        let action = Action::Cors(std::sync::Arc::new(cors_any()));
        let filters = Filters::new(vec![Filter::new(None, action)]).unwrap();
        let mut session = test_session("OPTIONS", "/", &[]);
        session.req = preflight("https://a.example");
        let Step::Answer(answer) = filters.on_request(&mut session) else {
            panic!("a preflight is answered")
        };
        assert_eq!(answer.headers["access-control-allow-origin"], "*");
        let mut actual = test_session("GET", "/", &[("origin", "https://a.example")]);
        assert!(matches!(filters.on_request(&mut actual), Step::Continue));
        let mut head = http::Response::new(()).into_parts().0;
        filters.on_response(&mut actual, &mut head);
        assert_eq!(head.headers["access-control-allow-origin"], "*");
    }

    #[test]
    fn bad_configurations_name_the_field() {
        assert_eq!(cors(&["*"], true).unwrap_err().field, "credentials");
        assert_eq!(
            cors(&["*", "https://a.example"], false).unwrap_err().field,
            "origins"
        );
        assert_eq!(cors(&[], false).unwrap_err().field, "origins");
        for bad in [
            "app.example.com",
            "https://a.example/",
            "https://a.example/x",
            "https://a.example:443",
            "http://a.example:80",
            "https://user@a.example",
        ] {
            let error = cors(&["https://ok.example", bad], false).unwrap_err();
            assert_eq!(error.field, "origins[1]", "{bad}");
        }
        assert!(cors(&["http://localhost:3000", "http://a.example:443"], false).is_ok());
        let message = cors(&["https://a.example:443"], false).unwrap_err().message;
        assert!(message.contains("default port"), "{message}");
        let mut config = CorsConfig {
            origins: strings(&["https://a.example"]),
            methods: strings(&["GET", "NOT A METHOD"]),
            ..CorsConfig::default()
        };
        assert_eq!(Cors::new(&config).unwrap_err().field, "methods[1]");
        config.methods = strings(&["GET"]);
        config.headers = strings(&["*"]);
        assert!(Cors::new(&config).is_ok());
        config.credentials = true;
        assert_eq!(Cors::new(&config).unwrap_err().field, "headers[0]");
    }
}
