//! Proxy header semantics (RFC 9110 section 7.6.1, RFC 9112): what a proxy must drop because
//! it describes one hop, and what it adds so the upstream knows who asked.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::net::{IpAddr, Ipv4Addr};

use http::{Uri, Version};

use crate::digest::Scheme;
use crate::peer::UpstreamProtocol;

/// Headers that describe one connection, never forwarded, whatever Connection says (RFC 9110
/// section 7.6.1). `Trailer` is not among them: it declares the trailer fields end to end,
/// and an HTTP/1.1 hop sends only the trailers it declares.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
];

/// Whether `name` describes one connection (so no one but the engine may set it).
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Remove hop-by-hop headers: the fixed list plus every header named in Connection (but
/// never Host: `Connection: host` must not make a request lose its target), and `also`.
/// A Content-Length beside Transfer-Encoding goes too: the body was framed by the chunked
/// coding (RFC 9112 section 6.3), and the length would tell the next hop otherwise.
///
/// One pass over the names present, rather than a removal per name that might be: each
/// lookup hashes its name, and most heads carry none of them but Connection.
///
/// Returns whether there was an `Upgrade` among them (rare: only then is it worth asking
/// whether the request wants to switch protocols).
fn strip_hop_by_hop(headers: &mut HeaderMap, also: &[HeaderName]) -> bool {
    let connection = headers.get_all(header::CONNECTION);
    let named_in_connection = |name: &HeaderName| {
        name != header::HOST
            && connection
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|named| named.trim().eq_ignore_ascii_case(name.as_str()))
    };
    let mut chunked = false;
    let mut te = false;
    let mut upgrade = false;
    let mut doomed = Vec::new();
    for name in headers.keys() {
        chunked |= name == header::TRANSFER_ENCODING;
        te |= name == header::TE;
        upgrade |= name == header::UPGRADE;
        if HOP_BY_HOP.contains(name) || also.contains(name) || named_in_connection(name) {
            doomed.push(name.clone());
        }
    }
    if chunked {
        doomed.push(header::CONTENT_LENGTH);
    }
    // A client that accepts trailers says so to each hop, and the next one must hear it
    // too, or trailers stop at us: gRPC servers refuse calls without `te: trailers`, and an
    // HTTP/1.1 server sends none unless asked (RFC 9110 section 10.1.4). Nothing else in TE
    // goes on: transfer codings are the hop's own.
    let trailers = te && accepts_trailers(headers);
    for name in doomed {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    upgrade
}

/// Whether a TE header lists `trailers` (`TE: gzip, trailers`; parameters aside).
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            let name = coding.split(';').next().unwrap_or("");
            name.trim().eq_ignore_ascii_case("trailers")
        })
}

/// Build the request head sent upstream from the downstream one: HTTP/1.1, origin-form
/// target, Host kept (or taken from an h2 :authority), hop-by-hop headers and Expect removed
/// (100-continue is answered on the downstream hop), X-Forwarded-* added.
pub fn upstream_request(
    req: &http::request::Parts,
    client_ip: IpAddr,
    scheme: Scheme,
) -> http::request::Parts {
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = req.method.clone();
    parts.version = Version::HTTP_11;
    parts.headers = req.headers.clone();
    parts.uri = origin_form(&req.uri);
    let headers = &mut parts.headers;
    // With both, the body is re-framed for the upstream: a Content-Length left behind would
    // let the upstream read it differently from us (request smuggling).
    if strip_hop_by_hop(headers, &[header::EXPECT]) {
        // A WebSocket handshake asks the upstream to switch too (see crate::upgrade).
        if let Some(protocols) = crate::upgrade::requested(req) {
            crate::upgrade::ask(headers, protocols.clone());
        }
    }
    // An absolute-form target (or h2's :authority) names the host; it wins over a Host
    // header (RFC 9112 section 3.2.2), so the upstream sees the host we route by.
    if let Some(value) = req
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        headers.insert(header::HOST, value);
    }
    if req.version == Version::HTTP_2 {
        join_cookies(headers);
    }
    append_forwarded_for(headers, client_ip);
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(scheme.as_str()),
    );
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    parts
}

/// Clean an upstream response head for the client: hop-by-hop headers go, and a
/// Content-Length beside Transfer-Encoding (the body was decoded by the chunked framing) goes
/// too, or the client would be told a length the body does not have.
pub fn response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers, &[]);
}

/// Clean a 101 (Switching Protocols) head for the client: as [`response_headers`], but the
/// upstream's `Upgrade` stays, with the `Connection: upgrade` that goes with it.
pub fn switching_headers(headers: &mut HeaderMap) {
    let protocols = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(headers, &[]);
    if let Some(protocols) = protocols {
        crate::upgrade::ask(headers, protocols);
    }
}

/// h2 clients may split Cookie into several fields; HTTP/1.1 wants one (RFC 9113 8.2.3).
fn join_cookies(headers: &mut HeaderMap) {
    if headers.get_all(header::COOKIE).iter().nth(1).is_none() {
        return;
    }
    let joined: Vec<&[u8]> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    if let Ok(value) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        headers.insert(header::COOKIE, value);
    }
}

/// X-Forwarded-For keeps what earlier proxies wrote and adds this hop's client.
fn append_forwarded_for(headers: &mut HeaderMap, client_ip: IpAddr) {
    let previous: Vec<&str> = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let value = match (previous.is_empty(), client_ip) {
        (true, IpAddr::V4(ip)) => HeaderValue::from_bytes(ipv4_text(ip).as_slice()),
        (true, ip) => HeaderValue::from_str(&ip.to_string()),
        (false, ip) => HeaderValue::from_str(&format!("{}, {ip}", previous.join(", "))),
    };
    if let Ok(value) = value {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
}

/// An IPv4 address in dotted decimal, written out here: `Display` takes the formatting
/// machinery's way, over a thousand instructions, and this is on every request.
fn ipv4_text(ip: Ipv4Addr) -> ArrayText {
    let mut text = ArrayText::default();
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            text.push(b'.');
        }
        if octet >= 100 {
            text.push(b'0' + octet / 100);
        }
        if octet >= 10 {
            text.push(b'0' + octet / 10 % 10);
        }
        text.push(b'0' + octet % 10);
    }
    text
}

/// The longest IPv4 address's text (`255.255.255.255`), on the stack.
#[derive(Default)]
struct ArrayText {
    bytes: [u8; 15],
    len: usize,
}

impl ArrayText {
    fn push(&mut self, byte: u8) {
        self.bytes[self.len] = byte;
        self.len += 1;
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Shape a head built for HTTP/1.1 (see [`upstream_request`]) for the protocol the peer
/// speaks. HTTP/2 carries the target as `:scheme`, `:authority` and `:path` (RFC 9113
/// section 8.3.1): the Host header becomes the authority.
pub fn for_upstream_protocol(head: &mut http::request::Parts, protocol: UpstreamProtocol) {
    if protocol != UpstreamProtocol::Http2 {
        return;
    }
    head.version = Version::HTTP_2;
    // HTTP/2 has no Upgrade (RFC 9113 section 8.2.2): the request goes as a plain one.
    if head.headers.contains_key(header::UPGRADE) {
        head.headers.remove(header::UPGRADE);
        head.headers.remove(header::CONNECTION);
    }
    let Some(host) = head.headers.remove(header::HOST) else {
        return;
    };
    let target = head.uri.path_and_query().map_or("/", |pq| pq.as_str());
    match host
        .to_str()
        .ok()
        .and_then(|host| format!("http://{host}{target}").parse::<Uri>().ok())
    {
        Some(uri) => head.uri = uri,
        // Not an authority: keep it as a header, as it came.
        None => {
            head.headers.insert(header::HOST, host);
        }
    }
}

/// `/path?query` from whatever form the client used (absolute-form, or h2's full URI).
fn origin_form(uri: &Uri) -> Uri {
    if uri.scheme().is_none() && uri.authority().is_none() {
        return uri.clone();
    }
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    path.parse().unwrap_or_else(|_| Uri::from_static("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut builder = http::Request::builder().uri(uri);
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let req = request(
            "/x",
            &[
                ("host", "example.com"),
                ("connection", "keep-alive, x-secret"),
                ("x-secret", "1"),
                ("te", "gzip"),
                ("proxy-authorization", "Basic x"),
                ("x-kept", "yes"),
            ],
        );
        let up = upstream_request(&req, "10.0.0.1".parse().unwrap(), Scheme::Http);
        for gone in ["connection", "x-secret", "te", "proxy-authorization"] {
            assert!(!up.headers.contains_key(gone), "{gone} forwarded");
        }
        assert_eq!(up.headers["x-kept"], "yes");
        assert_eq!(up.headers["host"], "example.com");
        assert_eq!(up.headers["x-forwarded-host"], "example.com");
        assert_eq!(up.headers["x-forwarded-proto"], "http");
        assert_eq!(up.headers["x-forwarded-for"], "10.0.0.1");
    }

    #[test]
    fn te_goes_on_as_trailers_alone_and_trailer_goes_on() {
        let req = request(
            "/x",
            &[
                ("te", "gzip;q=0.5, Trailers;q=1"),
                ("trailer", "x-checksum"),
            ],
        );
        let up = upstream_request(&req, "10.0.0.1".parse().unwrap(), Scheme::Http);
        assert_eq!(up.headers["te"], "trailers");
        assert_eq!(up.headers["trailer"], "x-checksum");
    }

    #[test]
    fn content_length_beside_transfer_encoding_is_dropped() {
        let req = request(
            "/",
            &[("transfer-encoding", "chunked"), ("content-length", "5")],
        );
        let up = upstream_request(&req, "127.0.0.1".parse().unwrap(), Scheme::Http);
        assert!(!up.headers.contains_key("content-length"));
        assert!(!up.headers.contains_key("transfer-encoding"));
    }

    #[test]
    fn connection_cannot_strip_host() {
        let req = request("/", &[("host", "example.com"), ("connection", "host")]);
        let up = upstream_request(&req, "127.0.0.1".parse().unwrap(), Scheme::Http);
        assert_eq!(up.headers["host"], "example.com");
    }

    #[test]
    fn h2_cookies_are_joined() {
        let mut req = request(
            "http://example.com/",
            &[("cookie", "a=1"), ("cookie", "b=2")],
        );
        req.version = Version::HTTP_2;
        let up = upstream_request(&req, "127.0.0.1".parse().unwrap(), Scheme::Http);
        assert_eq!(up.headers.get_all("cookie").iter().count(), 1);
        assert_eq!(up.headers["cookie"], "a=1; b=2");
    }

    #[test]
    fn response_length_beside_chunked_is_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("content-length", HeaderValue::from_static("10"));
        response_headers(&mut headers);
        assert!(headers.is_empty());
    }

    #[test]
    fn ipv4_text_is_dotted_decimal() {
        for octets in [
            [0, 0, 0, 0],
            [9, 10, 99, 100],
            [127, 0, 0, 1],
            [255, 255, 255, 255],
        ] {
            let ip = Ipv4Addr::from(octets);
            assert_eq!(ipv4_text(ip).as_slice(), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn appends_to_existing_forwarded_for() {
        let req = request(
            "/",
            &[
                ("x-forwarded-for", "1.1.1.1"),
                ("x-forwarded-for", "2.2.2.2"),
            ],
        );
        let up = upstream_request(&req, "3.3.3.3".parse().unwrap(), Scheme::Http);
        assert_eq!(up.headers["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 3.3.3.3");
    }

    #[test]
    fn an_http2_peer_gets_the_host_as_authority() {
        let req = request("/a?b=c", &[("host", "example.com:8080"), ("x-kept", "1")]);
        let mut up = upstream_request(&req, "127.0.0.1".parse().unwrap(), Scheme::Http);
        for_upstream_protocol(&mut up, UpstreamProtocol::Http1);
        assert_eq!(
            (up.version, up.uri.to_string()),
            (Version::HTTP_11, "/a?b=c".into())
        );
        for_upstream_protocol(&mut up, UpstreamProtocol::Http2);
        assert_eq!(up.version, Version::HTTP_2);
        assert_eq!(up.uri, "http://example.com:8080/a?b=c");
        assert!(
            !up.headers.contains_key("host"),
            "the authority replaces Host"
        );
        assert_eq!(up.headers["x-kept"], "1");
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_host() {
        let req = request("http://example.com:8080/a?b=c", &[("host", "other.test")]);
        let up = upstream_request(&req, "127.0.0.1".parse().unwrap(), Scheme::Http);
        assert_eq!(up.uri, "/a?b=c");
        assert_eq!(up.headers["host"], "example.com:8080");
    }
}
