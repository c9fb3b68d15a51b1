//! The proxy path end to end over real sockets: a test ProxyHttp in front of the echo upstream.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ferroxy_echo::EchoUpstream;
use ferroxy_engine::error::Result;
use ferroxy_engine::peer::PeerTimeouts;
use ferroxy_engine::{
    Error, Peer, ProxyHttp, Response, Server, ServerConfig, ServerHandle, Session,
};

struct TestProxy {
    upstream: Peer,
}

impl ProxyHttp for TestProxy {
    type Ctx = ();
    fn new_ctx(&self) {}

    async fn request_filter(&self, session: &mut Session, _: &mut ()) -> Result<Option<Response>> {
        if session.req.uri.path() == "/blocked" {
            return Ok(Some(Response::new(
                http::StatusCode::FORBIDDEN,
                "blocked\n",
            )));
        }
        Ok(None)
    }

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Peer> {
        Ok(self.upstream.clone())
    }

    async fn response_filter(
        &self,
        _: &mut Session,
        resp: &mut http::response::Parts,
        _: &mut (),
    ) -> Result<()> {
        resp.headers
            .insert("x-served-by", http::HeaderValue::from_static("ferroxy"));
        Ok(())
    }

    async fn fail_to_proxy(&self, _: &mut Session, error: &Error, _: &mut ()) -> Option<Response> {
        (error.kind.as_str() == "read_timeout")
            .then(|| Response::new(http::StatusCode::GATEWAY_TIMEOUT, "slow upstream\n"))
    }
}

fn start_proxy(upstream: Peer) -> ServerHandle {
    start_proxy_on(upstream, 2)
}

/// `threads: 1` runs the engine on a current-thread runtime, more on the multi-thread one.
fn start_proxy_on(upstream: Peer, threads: usize) -> ServerHandle {
    start_proxy_with(upstream, threads, Default::default())
}

/// A proxy running `rules` (filters and routes) before it asks `upstream_peer`.
fn start_proxy_with(
    upstream: Peer,
    threads: usize,
    rules: ferroxy_engine::RulesHandle,
) -> ServerHandle {
    let config = ServerConfig {
        listeners: vec!["127.0.0.1:0".into()],
        threads,
        grace_period: Duration::from_secs(3),
        rules,
        ..Default::default()
    };
    Server::proxy(config, TestProxy { upstream })
        .start()
        .unwrap()
}

/// Wait, up to 10 s, until `condition` holds.
fn wait_until(condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "condition not met within 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// Read one Content-Length-framed response off a keep-alive connection.
fn read_reply(reader: &mut BufReader<TcpStream>) -> Reply {
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split(' ')
        .nth(1)
        .expect("status line")
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        let (k, v) = trimmed.split_once(':').unwrap();
        headers.push((k.to_owned(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, v)| v.parse().unwrap());
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

fn get(addr: SocketAddr, path: &str, extra: &str) -> Reply {
    let stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    (&stream)
        .write_all(
            format!(
                "GET {path} HTTP/1.1\r\nhost: example.test\r\n{extra}connection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    read_reply(&mut BufReader::new(stream))
}

#[test]
fn forwards_with_proxy_headers_and_filters() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let proxy = start_proxy(Peer::new(&echo.addr().to_string()).unwrap());
    let reply = get(
        proxy.local_addr(),
        "/a?b=c",
        "x-forwarded-for: 10.1.1.1\r\nconnection: x-drop\r\nx-drop: 1\r\n",
    );
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-served-by"), Some("ferroxy"));
    let seen = reply.json();
    assert_eq!(seen["path"], "/a");
    assert_eq!(seen["query"], "b=c");
    assert_eq!(seen["headers"]["host"], "example.test");
    assert_eq!(seen["headers"]["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
    assert_eq!(seen["headers"]["x-forwarded-host"], "example.test");
    assert!(
        seen["headers"].get("x-drop").is_none(),
        "Connection-named header forwarded"
    );
    assert!(seen["headers"].get("connection").is_none());

    let blocked = get(proxy.local_addr(), "/blocked", "");
    assert_eq!(
        (blocked.status, blocked.body.as_slice()),
        (403, &b"blocked\n"[..])
    );
}

#[test]
fn sequential_requests_reuse_one_upstream_connection() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let proxy = start_proxy_on(Peer::new(&echo.addr().to_string()).unwrap(), 1);
    let stream = TcpStream::connect(proxy.local_addr()).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for i in 0..100 {
        (&stream)
            .write_all(format!("GET /r{i} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .unwrap();
        assert_eq!(read_reply(&mut reader).status, 200);
    }
    assert_eq!(echo.stats().requests(), 100);
    assert_eq!(echo.stats().connections(), 1);
}

#[test]
fn upstream_failures_map_to_502_and_504() {
    // A port with nothing listening: bind, learn the port, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = start_proxy(Peer::new(&closed.to_string()).unwrap());
    let reply = get(proxy.local_addr(), "/", "");
    assert_eq!(reply.status, 502);
    assert_eq!(reply.body, b"502 Bad Gateway\n");

    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let timeouts = PeerTimeouts {
        read: Duration::from_millis(200),
        ..Default::default()
    };
    let proxy = start_proxy(
        Peer::new(&echo.addr().to_string())
            .unwrap()
            .with_timeouts(timeouts),
    );
    let started = Instant::now();
    let reply = get(proxy.local_addr(), "/delay/3000", "");
    assert_eq!(
        (reply.status, reply.body.as_slice()),
        (504, &b"slow upstream\n"[..])
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn malformed_request_gets_400_and_close() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let proxy = start_proxy(Peer::new(&echo.addr().to_string()).unwrap());
    let mut stream = TcpStream::connect(proxy.local_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nbad header line\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert_eq!(echo.stats().requests(), 0);
}

#[test]
fn graceful_shutdown_finishes_in_flight_requests() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let mut proxy = start_proxy_on(Peer::new(&echo.addr().to_string()).unwrap(), 1);
    let addr = proxy.local_addr();
    let in_flight = std::thread::spawn(move || get(addr, "/delay/500", ""));
    wait_until(|| echo.stats().requests() == 1);
    proxy.shutdown(None);
    proxy.wait().unwrap();
    assert_eq!(in_flight.join().unwrap().status, 200);
    assert!(
        TcpStream::connect(addr).is_err(),
        "still accepting after shutdown"
    );
}

/// Filters and routes are engine steps: a Rust-only app whose own `upstream_peer` points
/// nowhere gets them as a Python one does.
#[test]
fn filters_and_routes_run_for_a_rust_only_app() {
    use std::sync::Arc;

    use ferroxy_engine::filters::{Action, Condition, Filter, Filters, HostMatch, TextMatch};
    use ferroxy_engine::lb::Upstream;
    use ferroxy_engine::route::{Route, Router};
    use ferroxy_engine::Rules;

    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let routes = Router::new(vec![Route {
        host: Some(HostMatch::parse("*.test").unwrap()),
        path_prefix: Some("/api/".into()),
        path_regex: None,
        upstream: Upstream::Peer(Peer::new(&echo.addr().to_string()).unwrap()),
        strip_prefix: true,
    }])
    .unwrap();
    let filters = Filters::new(vec![
        Filter::new(
            Some(Condition::Path(TextMatch::Exact("/healthz".into()))),
            Action::Respond {
                status: http::StatusCode::OK,
                body: "ok".into(),
                headers: http::HeaderMap::new(),
            },
        ),
        Filter::new(None, Action::RequestId),
        Filter::new(
            None,
            Action::RemoveResponseHeader(http::HeaderName::from_static("x-served-by")),
        ),
    ])
    .unwrap();
    let rules = Rules::new(Some(Arc::new(filters)), Some(Arc::new(routes.into())));
    let nowhere = Peer::new("127.0.0.1:1").unwrap();
    let proxy = start_proxy_with(nowhere, 1, rules.into());
    let addr = proxy.local_addr();

    let health = get(addr, "/healthz", "");
    assert_eq!((health.status, &health.body[..]), (200, &b"ok"[..]));
    let routed = get(addr, "/api/users?x=1", "x-request-id: rid-1\r\n");
    assert_eq!(routed.status, 200);
    let echoed: serde_json::Value = serde_json::from_slice(&routed.body).unwrap();
    assert_eq!(echoed["path"], "/users");
    assert_eq!(echoed["headers"]["x-request-id"], "rid-1");
    // The app's response_filter ran, then the filter removed what it added.
    assert!(!routed.headers.iter().any(|(k, _)| k == "x-served-by"));
    // No route: the app's own upstream_peer, which points nowhere.
    assert_eq!(get(addr, "/other", "").status, 502);
}

/// A Rust-only app reloads its filters and routes through the handle it configured: requests
/// after the store see the new set, and a request in flight finishes on the set it began with
/// (its response filter is the old set's).
#[test]
fn a_rust_only_app_reloads_its_rules_and_in_flight_requests_keep_theirs() {
    use std::sync::Arc;

    use ferroxy_engine::filters::{Action, Filter, Filters, Groups, Template};
    use ferroxy_engine::lb::Upstream;
    use ferroxy_engine::route::{Route, Router};
    use ferroxy_engine::{Rules, RulesHandle};

    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let tagged = |tag: &'static str| {
        let filters = Filters::new(vec![Filter::new(
            None,
            Action::SetResponseHeader(
                http::HeaderName::from_static("x-set"),
                Template::parse("value", tag, Groups::of(None)).unwrap(),
            ),
        )])
        .unwrap();
        Some(Arc::new(filters))
    };
    let rules = RulesHandle::new(Rules::new(tagged("old"), None));
    let nowhere = Peer::new("127.0.0.1:1").unwrap();
    let proxy = start_proxy_with(nowhere, 2, rules.clone());
    let addr = proxy.local_addr();
    // The old set has no routes: the app's own upstream_peer, which points nowhere.
    assert_eq!(get(addr, "/", "").status, 502);

    // The echo upstream counts requests; the routed one below waits in it during the reload.
    let routes = Router::new(vec![Route {
        host: None,
        path_prefix: None,
        path_regex: None,
        upstream: Upstream::Peer(Peer::new(&echo.addr().to_string()).unwrap()),
        strip_prefix: false,
    }])
    .unwrap();
    rules.store(Rules::new(tagged("old"), Some(Arc::new(routes.into()))));
    let in_flight = std::thread::spawn(move || get(addr, "/delay/500", ""));
    wait_until(|| echo.stats().requests() == 1);
    rules.update(|current| Rules {
        filters: tagged("new"),
        ..current.clone()
    });
    let after = get(addr, "/after", "");
    assert_eq!(after.status, 200, "the routes were kept");
    assert_eq!(after.header("x-set"), Some("new"));
    let before = in_flight.join().unwrap();
    assert_eq!(before.status, 200);
    assert_eq!(before.header("x-set"), Some("old"));
}
