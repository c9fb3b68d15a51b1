//! Requests the proxy refuses before any phase sees them (RFC 9112 sections 3.2 and 6, as
//! nginx does): the ones that a proxy and the server behind it could read in two ways.
//!
//! hyper has already refused what it cannot parse (obs-fold, bytes outside a header name's
//! token, conflicting Content-Length values, a Transfer-Encoding whose last coding is not
//! chunked). What is left to catch here is what hyper takes in good faith but another
//! server might frame or route differently: a second Host, a Host that contradicts the
//! target, header names that look like a framing header to a lenient reader, codings we
//! would silently drop.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
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
    let lines = HeaderLines::read(&req.headers);
    check_host(req, lines.host)?;
    if let Some(refusal) = lines.lookalike {
        return Err(refusal);
    }
    check_transfer_coding(lines.transfer_encoding)?;
    let carries_body = lines.transfer_encoding.first.is_some()
        || lines
            .content_length
            .is_some_and(|len| len.as_bytes() != b"0");
    if carries_body && (req.method == Method::GET || req.method == Method::HEAD) {
        // A server in front of us that ignores a GET's body would take it for the next
        // request on the connection: answer this one and take no more.
        return Ok(Admission::ProxyThenClose);
    }
    Ok(Admission::Proxy)
}

/// What the checks read of a request's headers, found in one pass over them: a lookup per
/// header would hash its name each time.
#[derive(Default)]
struct HeaderLines<'a> {
    host: FirstTwo<'a>,
    transfer_encoding: FirstTwo<'a>,
    content_length: Option<&'a HeaderValue>,
    /// Why the first name that imitates a header we interpret is refused.
    lookalike: Option<Refusal>,
}

/// A header's first two lines: whether there is a second is all the checks ask of the rest.
#[derive(Default, Clone, Copy)]
struct FirstTwo<'a> {
    first: Option<&'a HeaderValue>,
    second: Option<&'a HeaderValue>,
}

impl<'a> FirstTwo<'a> {
    fn note(&mut self, value: &'a HeaderValue) {
        if self.first.is_none() {
            self.first = Some(value);
        } else if self.second.is_none() {
            self.second = Some(value);
        }
    }
}

impl<'a> HeaderLines<'a> {
    fn read(headers: &'a HeaderMap) -> Self {
        let mut lines = HeaderLines::default();
        let mut last_name: Option<&HeaderName> = None;
        for (name, value) in headers {
            if name == header::HOST {
                lines.host.note(value);
            } else if name == header::TRANSFER_ENCODING {
                lines.transfer_encoding.note(value);
            } else if name == header::CONTENT_LENGTH {
                lines.content_length.get_or_insert(value);
            }
            // A name's lines come one after another, each with the same name.
            let new_name = !last_name.is_some_and(|last| std::ptr::eq(last, name));
            if new_name && lines.lookalike.is_none() {
                lines.lookalike = imitation(name.as_str());
            }
            last_name = Some(name);
        }
        lines
    }
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
/// absolute-form target in HTTP/1.1, `:authority` in HTTP/2). HTTP/1.1 needs it even with
/// an absolute-form target (RFC 9112 section 3.2).
fn check_host(req: &http::request::Parts, hosts: FirstTwo<'_>) -> Result<()> {
    if hosts.second.is_some() {
        return Err(refuse("more than one Host header"));
    }
    let Some(host) = hosts.first else {
        if req.version == Version::HTTP_11 {
            return Err(refuse("HTTP/1.1 request without a Host header"));
        }
        return Ok(());
    };
    let (name, port) =
        split_host(host.as_bytes()).ok_or_else(|| refuse("malformed Host header"))?;
    let Some(target) = req.uri.authority() else {
        return Ok(());
    };
    let default_port = match req.uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    };
    let same = name.eq_ignore_ascii_case(target.host().as_bytes())
        && port.unwrap_or(default_port) == target.port_u16().unwrap_or(default_port);
    if !same {
        let host = String::from_utf8_lossy(host.as_bytes());
        return Err(refuse(format!(
            "Host {host} differs from the target's authority {target}"
        )));
    }
    Ok(())
}

/// A Host value's name and port (RFC 3986 section 3.2.2: a reg-name or a bracketed IP
/// literal, then `:port`), checked in place. No userinfo: `user@host` names a different host
/// to different readers.
fn split_host(value: &[u8]) -> Option<(&[u8], Option<u16>)> {
    let (name, rest) = if value.first() == Some(&b'[') {
        let end = value.iter().position(|&b| b == b']')? + 1;
        let literal = &value[1..end - 1];
        let ok = !literal.is_empty()
            && literal
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
        (ok.then_some(&value[..end])?, &value[end..])
    } else {
        let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        let name = &value[..end];
        let ok = !name.is_empty() && name.iter().all(|&b| is_reg_name_byte(b));
        (ok.then_some(name)?, &value[end..])
    };
    let port = match rest {
        [] | [b':'] => None,
        [b':', digits @ ..] if digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit) => {
            // Five digits at most: no overflow in a u32. (`str::parse` costs more than the
            // rest of the Host check.)
            let port = digits
                .iter()
                .fold(0u32, |port, digit| port * 10 + u32::from(digit - b'0'));
            Some(u16::try_from(port).ok()?)
        }
        _ => return None,
    };
    Some((name, port))
}

/// unreserved, pct-encoded's `%` and hex digits, or sub-delims.
fn is_reg_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'-' | b'.'
                | b'_'
                | b'~'
                | b'%'
                | b'!'
                | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
        )
}

/// The framing headers a lenient reader might find under another spelling, by their
/// letters alone.
const FRAMING_LETTERS: [(&str, &str); 2] = [
    ("contentlength", "content-length"),
    ("transferencoding", "transfer-encoding"),
];

/// Headers the proxy reads, sets or strips: a CGI-style server (which reads `_` as `-`) must
/// not find another of them under a name with `_` that we forwarded as an unknown one.
const INTERPRETED: [&str; 15] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "proxy-connection",
    "proxy-authorization",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// The refusal of a name such as `Content_Length`, `Transfer---Encoding` or `X_Forwarded_For`:
/// a server behind us that reads `_` as `-` would frame the request, or trust a client
/// address, by a header we forwarded as an unknown one.
fn imitation(name: &str) -> Option<Refusal> {
    if name.contains('_') {
        let dashed = name.replace('_', "-");
        if let Some(real) = INTERPRETED.iter().find(|real| **real == dashed) {
            return Some(refuse(format!("header {name:?} imitates {real}")));
        }
    }
    // Every framing lookalike is at least as long as the shorter name's letters.
    if name.len() < "contentlength".len() {
        return None;
    }
    FRAMING_LETTERS
        .iter()
        .find(|(letters, real)| name != *real && only_letters_equal(name, letters))
        .map(|(_, real)| refuse(format!("header {name:?} imitates {real}")))
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
fn check_transfer_coding(lines: FirstTwo<'_>) -> Result<()> {
    let Some(line) = lines.first else {
        return Ok(());
    };
    if lines.second.is_some() {
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

/// Watches a client's raw bytes for a request head with two `Content-Length` lines. hyper
/// merges two equal ones before any head reaches us, so they can only be seen here; such a
/// request is framed by its one length, but a server in front of us may have read it
/// otherwise, so the connection closes after its response.
///
/// Looks only at line starts (after each `\n`, found with a byte search), so it costs little
/// per read. Body bytes are scanned too: a body that holds two such lines before a blank one
/// (a request smuggled inside another) also closes the connection, which is no harm.
#[derive(Default)]
pub struct RepeatedLengthScan {
    /// Content-Length lines in the head being read.
    lines: u8,
    /// The start of a line the last read cut short (the bytes after its `\n`, maybe none),
    /// when it may yet turn out to be a Content-Length line or the blank line.
    partial: [u8; LINE_START],
    partial_len: Option<u8>,
}

const CONTENT_LENGTH_LINE: &[u8] = b"content-length:";
/// Bytes of a line start that decide what it is.
const LINE_START: usize = CONTENT_LENGTH_LINE.len();

impl RepeatedLengthScan {
    /// Scan the next bytes read; true when a head with two Content-Length lines just ended.
    pub fn scan(&mut self, data: &[u8]) -> bool {
        let mut repeated = false;
        if let Some(have) = self.partial_len.take() {
            let have = usize::from(have);
            let take = (LINE_START - have).min(data.len());
            let mut start = [0; LINE_START];
            start[..have].copy_from_slice(&self.partial[..have]);
            start[have..have + take].copy_from_slice(&data[..take]);
            repeated |= self.line_start(&start[..have + take]);
        }
        for newline in memchr::memchr_iter(b'\n', data) {
            let rest = &data[newline + 1..];
            // Most line starts are decided by their first byte, without a call.
            match rest.first() {
                Some(b'\r' | b'\n' | b'c' | b'C') | None => {
                    repeated |= self.line_start(&rest[..rest.len().min(LINE_START)]);
                }
                Some(_) => {}
            }
        }
        repeated
    }

    /// Classify a line by its first bytes (fewer when the line or the read ended sooner).
    fn line_start(&mut self, start: &[u8]) -> bool {
        if start.starts_with(b"\r\n") || start.starts_with(b"\n") {
            // A blank line ends a head.
            return std::mem::take(&mut self.lines) >= 2;
        }
        if start.len() == LINE_START {
            if start.eq_ignore_ascii_case(CONTENT_LENGTH_LINE) {
                self.lines = self.lines.saturating_add(1);
            }
            return false;
        }
        // Short: the line ended inside (not ours, then), or the read did.
        let may_be_ours = !start.contains(&b'\n')
            && (start == b"\r" || start.eq_ignore_ascii_case(&CONTENT_LENGTH_LINE[..start.len()]));
        if may_be_ours {
            self.partial[..start.len()].copy_from_slice(start);
            self.partial_len = Some(start.len() as u8);
        }
        false
    }
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
        assert_eq!(refused(absolute_only), 400, "HTTP/1.1 needs Host even so");
        let h2 = http::Request::get("http://public.example/").version(Version::HTTP_2);
        assert_eq!(
            check(&head(h2)).unwrap(),
            Admission::Proxy,
            "HTTP/2 has :authority"
        );
        for fine in [
            "a.example:8080",
            "[::1]:80",
            "a.example:",
            "xn--bcher-kva.example",
        ] {
            let req = get("/").header("host", fine);
            assert_eq!(check(&head(req)).unwrap(), Admission::Proxy, "{fine:?}");
        }
        for malformed in [
            "user@admin.internal",
            "a b",
            "",
            "a.example:abc",
            "a.example:99999",
            "[::1",
            "a/b",
        ] {
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
            "x_forwarded_for",
            "proxy_connection",
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
    fn two_content_length_lines_are_seen_however_the_reads_fall() {
        let repeated: &[u8] =
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\nhello";
        let single: &[u8] = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        for split in 0..repeated.len() {
            let mut scan = RepeatedLengthScan::default();
            let seen = scan.scan(&repeated[..split]) | scan.scan(&repeated[split..]);
            assert!(seen, "missed when the read split at {split}");
        }
        for split in 0..single.len() {
            let mut scan = RepeatedLengthScan::default();
            let seen = scan.scan(&single[..split]) | scan.scan(&single[split..]);
            assert!(!seen, "false alarm when the read split at {split}");
        }
        // One byte at a time, and the next request on the connection starts afresh.
        let mut scan = RepeatedLengthScan::default();
        let seen: Vec<bool> = [repeated, single]
            .concat()
            .iter()
            .map(|b| scan.scan(&[*b]))
            .collect();
        assert_eq!(seen.iter().filter(|s| **s).count(), 1);
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
