//! Requests the proxy refuses before any phase sees them (RFC 9112 sections 3.2 and 6, as
//! nginx does): the ones that a proxy and the server behind it could read in two ways.
//!
//! hyper has already refused what it cannot parse (obs-fold, bytes outside a header name's
//! token, conflicting Content-Length values, a Transfer-Encoding whose last coding is not
//! chunked). What is left to catch here is what hyper takes in good faith but another
//! server might frame or route differently: a second Host, a Host that contradicts the
//! target, header names that look like a framing header to a lenient reader, codings we
//! would silently drop.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Version};

use crate::error::{Error, ErrorKind};

/// Why a request was refused: the status and what to log (an [`Error`] of kind
/// `InvalidRequest` once it leaves this module).
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    pub message: String,
}

impl From<Refusal> for Error {
    fn from(refusal: Refusal) -> Self {
        Error::new(ErrorKind::InvalidRequest, refusal.message).with_status(refusal.status)
    }
}

type Result<T> = std::result::Result<T, Refusal>;

/// What the proxy may do with a request that passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Proxy it; the client's connection may carry more requests.
    Proxy,
    /// Proxy it with clean framing, then close the client's connection: its framing is
    /// legal but unusual enough that a server in front of us may have read it otherwise.
    ProxyThenClose,
}

/// Check a request head as hyper handed it over.
pub fn check(req: &http::request::Parts) -> Result<Admission> {
    check_host(req)?;
    check_header_names(&req.headers)?;
    check_transfer_coding(&req.headers)?;
    let carries_body = req.headers.contains_key(header::TRANSFER_ENCODING)
        || req
            .headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|len| len.as_bytes() != b"0");
    if carries_body && (req.method == Method::GET || req.method == Method::HEAD) {
        // A server in front of us that ignores a GET's body would take it for the next
        // request on the connection: answer this one and take no more.
        return Ok(Admission::ProxyThenClose);
    }
    Ok(Admission::Proxy)
}

fn refuse(message: impl Into<String>) -> Refusal {
    Refusal {
        status: 400,
        message: message.into(),
    }
}

/// A coding we do not implement: 501, as nginx answers.
fn unsupported(message: String) -> Refusal {
    Refusal {
        status: 501,
        message,
    }
}

/// One Host, well formed, agreeing with the target's authority if it has one (an
/// absolute-form target in HTTP/1.1, `:authority` in HTTP/2); HTTP/1.1 needs one of the two.
fn check_host(req: &http::request::Parts) -> Result<()> {
    let mut hosts = req.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(refuse("more than one Host header"));
    }
    let target = req.uri.authority();
    match (host, target) {
        (None, None) if req.version == Version::HTTP_11 => {
            Err(refuse("HTTP/1.1 request without a Host header"))
        }
        (None, _) => Ok(()),
        (Some(host), target) => {
            let host = parse_host(host).ok_or_else(|| refuse("malformed Host header"))?;
            match target {
                Some(target) if !same_authority(&host, target, req.uri.scheme_str()) => {
                    Err(refuse(format!(
                        "Host {host} differs from the target's authority {target}"
                    )))
                }
                _ => Ok(()),
            }
        }
    }
}

/// A Host value as an authority, without userinfo (`user@host` names a different host to
/// different readers).
fn parse_host(value: &HeaderValue) -> Option<http::uri::Authority> {
    let text = value.to_str().ok()?;
    if text.is_empty() || text.contains('@') {
        return None;
    }
    text.parse().ok()
}

/// Whether two authorities name the same origin: hosts equal ignoring case, ports equal once
/// the scheme's default port is filled in.
fn same_authority(
    host: &http::uri::Authority,
    target: &http::uri::Authority,
    scheme: Option<&str>,
) -> bool {
    let default_port = match scheme {
        Some("https") => 443,
        _ => 80,
    };
    host.host().eq_ignore_ascii_case(target.host())
        && host.port_u16().unwrap_or(default_port) == target.port_u16().unwrap_or(default_port)
}

/// The framing headers a lenient reader might find under another spelling, by their
/// letters alone.
const FRAMING_LETTERS: [(&str, &str); 2] = [
    ("contentlength", "content-length"),
    ("transferencoding", "transfer-encoding"),
];

/// Refuse names such as `Content_Length` or `Transfer---Encoding`: CGI-style servers read
/// `_` as `-`, and would frame the request by a header we forwarded as an unknown one.
fn check_header_names(headers: &HeaderMap) -> Result<()> {
    for name in headers.keys() {
        let name = name.as_str();
        // Every lookalike is at least as long as the shorter name's letters; the others
        // are told apart by their first letter or two.
        if name.len() < "contentlength".len() {
            continue;
        }
        for (letters, real) in FRAMING_LETTERS {
            if name != real && only_letters_equal(name, letters) {
                return Err(refuse(format!("header {name:?} imitates {real}")));
            }
        }
    }
    Ok(())
}

/// Whether `name`'s ASCII letters, in order, are exactly `letters` (names are lowercase).
fn only_letters_equal(name: &str, letters: &str) -> bool {
    name.bytes()
        .filter(u8::is_ascii_alphabetic)
        .eq(letters.bytes())
}

/// The one coding we decode and re-frame is a single final `chunked`. Others would reach
/// the upstream without their label (the hop-by-hop header goes): 501, as nginx answers.
/// `chunked` twice, on one line or two, is malformed: 400.
fn check_transfer_coding(headers: &HeaderMap) -> Result<()> {
    let mut lines = headers.get_all(header::TRANSFER_ENCODING).iter();
    let Some(line) = lines.next() else {
        return Ok(());
    };
    if lines.next().is_some() {
        return Err(refuse("more than one Transfer-Encoding header"));
    }
    let line = line
        .to_str()
        .map_err(|_| refuse("malformed Transfer-Encoding header"))?;
    let mut chunked = 0;
    for coding in line.split(',').map(str::trim) {
        if coding.eq_ignore_ascii_case("chunked") {
            chunked += 1;
        } else {
            return Err(unsupported(format!(
                "transfer coding {coding:?} is not supported"
            )));
        }
    }
    if chunked > 1 {
        return Err(refuse("chunked applied more than once"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(request: http::request::Builder) -> http::request::Parts {
        request.body(()).unwrap().into_parts().0
    }

    fn get(path: &str) -> http::request::Builder {
        http::Request::get(path).version(Version::HTTP_11)
    }

    fn refused(req: http::request::Builder) -> u16 {
        match check(&head(req)) {
            Ok(admission) => panic!("admitted ({admission:?})"),
            Err(refusal) => {
                let error = Error::from(refusal);
                assert_eq!(error.kind, ErrorKind::InvalidRequest);
                error.status
            }
        }
    }

    #[test]
    fn an_ordinary_request_is_proxied() {
        let req = get("/").header("host", "example.test");
        assert_eq!(check(&head(req)).unwrap(), Admission::Proxy);
        let post = http::Request::post("/")
            .header("host", "example.test")
            .header("transfer-encoding", "Chunked")
            .header("content_type", "text/plain");
        assert_eq!(check(&head(post)).unwrap(), Admission::Proxy);
    }

    #[test]
    fn host_must_be_one_and_agree_with_the_target() {
        let two = get("/")
            .header("host", "public.example")
            .header("host", "admin.internal");
        assert_eq!(refused(two), 400);
        assert_eq!(refused(get("/")), 400, "HTTP/1.1 without Host");
        let old = http::Request::get("/").version(Version::HTTP_10);
        assert_eq!(check(&head(old)).unwrap(), Admission::Proxy);
        let disagrees = get("http://public.example/").header("host", "admin.internal");
        assert_eq!(refused(disagrees), 400);
        for agreeing in ["Public.Example", "public.example:80"] {
            let req = get("http://public.example/").header("host", agreeing);
            assert_eq!(check(&head(req)).unwrap(), Admission::Proxy, "{agreeing}");
        }
        let absolute_only = get("http://public.example/");
        assert_eq!(check(&head(absolute_only)).unwrap(), Admission::Proxy);
        for malformed in ["user@admin.internal", "a b", ""] {
            assert_eq!(
                refused(get("/").header("host", malformed)),
                400,
                "{malformed:?}"
            );
        }
    }

    #[test]
    fn framing_lookalikes_are_refused() {
        for name in [
            "content_length",
            "transfer_encoding",
            "transfer---encoding",
            "content.length",
            "_transfer_encoding",
        ] {
            let req = get("/").header("host", "x").header(name, "5");
            assert_eq!(refused(req), 400, "{name}");
        }
        let unrelated = get("/")
            .header("host", "x")
            .header("content-language", "en");
        assert_eq!(check(&head(unrelated)).unwrap(), Admission::Proxy);
    }

    #[test]
    fn only_a_single_final_chunked_is_accepted() {
        let te = |value: &str| {
            http::Request::post("/")
                .header("host", "x")
                .header("transfer-encoding", value)
        };
        assert_eq!(refused(te("gzip, chunked")), 501);
        assert_eq!(refused(te("chunked, chunked")), 400);
        let twice = te("chunked").header("transfer-encoding", "chunked");
        assert_eq!(refused(twice), 400);
    }

    #[test]
    fn a_get_with_a_body_closes_the_connection_after() {
        let with_length = get("/").header("host", "x").header("content-length", "5");
        assert_eq!(
            check(&head(with_length)).unwrap(),
            Admission::ProxyThenClose
        );
        let chunked = http::Request::head("/")
            .header("host", "x")
            .header("transfer-encoding", "chunked");
        assert_eq!(check(&head(chunked)).unwrap(), Admission::ProxyThenClose);
        let empty = get("/").header("host", "x").header("content-length", "0");
        assert_eq!(check(&head(empty)).unwrap(), Admission::Proxy);
    }
}
