//! The engine's seams over real sockets: the phases it calls (retry through
//! `fail_to_connect`), the connection digests, HTTP/2 upstreams, listeners, error sides and
//! shutdown. A test ProxyHttp in front of the echo upstream reports what it saw.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::IntoRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ferroxy_echo::EchoUpstream;
use ferroxy_engine::error::Result;
use ferroxy_engine::{
    DownstreamDigest, Error, ErrorKind, ErrorSide, Listener, Peer, ProxyHttp, Server, ServerConfig,
    ServerHandle, Session, UpstreamDigest, UpstreamProtocol,
};

/// How many times the engine called the phases that are counted.
#[derive(Default)]
struct Calls {
    upstream_peer: AtomicUsize,
    upstream_request_filter: AtomicUsize,
}

/// What `response_filter` saw of a request's connections.
struct Facts {
    downstream: DownstreamDigest,
    upstream: Option<UpstreamDigest>,
}

struct SeamProxy {
    /// The peer for each connect attempt of a request; the last one for any attempt after.
    peers: Vec<Peer>,
    /// Have `fail_to_connect` ask for another attempt.
    retry_connect: bool,
    calls: Arc<Calls>,
    facts: mpsc::Sender<Facts>,
    logged: mpsc::Sender<Option<Error>>,
}

/// The test's side of a [`SeamProxy`].
struct Probe {
    calls: Arc<Calls>,
    facts: mpsc::Receiver<Facts>,
    logged: mpsc::Receiver<Option<Error>>,
}

impl SeamProxy {
    fn new(peers: Vec<Peer>) -> (SeamProxy, Probe) {
        let calls = Arc::new(Calls::default());
        let (facts, seen_facts) = mpsc::channel();
        let (logged, seen_logged) = mpsc::channel();
        let proxy = SeamProxy {
            peers,
            retry_connect: false,
            calls: calls.clone(),
            facts,
            logged,
        };
        let probe = Probe {
            calls,
            facts: seen_facts,
            logged: seen_logged,
        };
        (proxy, probe)
    }

    fn to(peer: Peer) -> (SeamProxy, Probe) {
        SeamProxy::new(vec![peer])
    }
}

impl ProxyHttp for SeamProxy {
    /// Connect attempts so far.
    type Ctx = usize;

    fn new_ctx(&self) -> usize {
        0
    }

    async fn upstream_peer(&self, _: &mut Session, attempts: &mut usize) -> Result<Peer> {
        self.calls.upstream_peer.fetch_add(1, Ordering::SeqCst);
        let peer = &self.peers[(*attempts).min(self.peers.len() - 1)];
        *attempts += 1;
        Ok(peer.clone())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        head: &mut http::request::Parts,
        _: &mut usize,
    ) -> Result<()> {
        self.calls
            .upstream_request_filter
            .fetch_add(1, Ordering::SeqCst);
        // Appended, so a head filtered twice would carry two.
        let peer = session
            .upstream
            .as_ref()
            .expect("the attempt's peer")
            .addr();
        head.headers.append(
            "x-filtered-for",
            peer.parse().expect("an address is a header value"),
        );
        Ok(())
    }

    async fn fail_to_connect(
        &self,
        _: &mut Session,
        _: &Peer,
        _: &mut usize,
        mut error: Error,
    ) -> Error {
        error.retry = self.retry_connect;
        error
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        _: &mut http::response::Parts,
        _: &mut usize,
    ) -> Result<()> {
        let _ = self.facts.send(Facts {
            downstream: (*session.downstream).clone(),
            upstream: session.upstream_digest,
        });
        Ok(())
    }

    fn logging(&self, _: &mut Session, error: Option<&Error>, _: &mut usize) {
        let _ = self.logged.send(error.cloned());
    }
}

fn config(listeners: Vec<Listener>) -> ServerConfig {
    ServerConfig {
        listeners: listeners.into_iter().map(Into::into).collect(),
        threads: 2,
        access_log: None,
        ..Default::default()
    }
}

fn start(proxy: SeamProxy) -> ServerHandle {
    Server::proxy(config(vec!["127.0.0.1:0".into()]), proxy)
        .start()
        .unwrap()
}

fn echo_peer(echo: &EchoUpstream) -> Peer {
    Peer::new(&echo.addr().to_string()).unwrap()
}

/// An address nothing listens on: bind, learn the port, close.
fn dead_port() -> Peer {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    Peer::new(&addr.to_string()).unwrap()
}

const WAIT: Duration = Duration::from_secs(10);

/// Wait, up to 10 s, until `condition` holds.
fn wait_until(condition: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !condition() {
        assert!(Instant::now() < deadline, "condition not met within 10 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The next report on `channel`, waiting up to 10 s for it.
fn next<T>(channel: &mpsc::Receiver<T>) -> T {
    channel
        .recv_timeout(WAIT)
        .expect("the proxy reported within 10 s")
}

/// A client connection, keep-alive.
fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
}

/// Send a GET on `stream` and read the answer: its status and its Content-Length-framed
/// body.
fn request(stream: &TcpStream, path: &str) -> (u16, Vec<u8>) {
    let mut writer = stream;
    write!(writer, "GET {path} HTTP/1.1\r\nhost: example.test\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {line:?}"));
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let (name, value) = header.split_once(':').unwrap();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    // A BufReader may only be dropped with nothing buffered: one response at a time.
    assert!(reader.buffer().is_empty(), "more than one response arrived");
    (status, body)
}

/// GET `path` on a connection of its own; the status.
fn get(addr: SocketAddr, path: &str) -> u16 {
    request(&connect(addr), path).0
}

#[test]
fn fail_to_connect_can_have_upstream_peer_chosen_again() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let (mut retrying, probe) = SeamProxy::new(vec![dead_port(), echo_peer(&echo)]);
    retrying.retry_connect = true;
    let server = start(retrying);
    let (status, body) = request(&connect(server.local_addr()), "/");
    assert_eq!(status, 200);
    assert_eq!(echo.stats().requests(), 1);
    assert_eq!(probe.calls.upstream_peer.load(Ordering::SeqCst), 2);
    // Each attempt filters a fresh head for its own peer: what arrives was filtered once,
    // for the peer it arrived at.
    assert_eq!(
        probe.calls.upstream_request_filter.load(Ordering::SeqCst),
        2
    );
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        echoed["headers"]["x-filtered-for"],
        echo.addr().to_string(),
        "{echoed}"
    );
    assert!(next(&probe.logged).is_none());

    let (giving_up, probe) = SeamProxy::new(vec![dead_port(), echo_peer(&echo)]);
    let server = start(giving_up);
    let (status, body) = request(&connect(server.local_addr()), "/");
    assert_eq!((status, body.as_slice()), (502, &b"502 Bad Gateway\n"[..]));
    assert_eq!(probe.calls.upstream_peer.load(Ordering::SeqCst), 1);
    let error = next(&probe.logged).expect("the failure is logged");
    assert_eq!(
        (error.kind, error.side),
        (ErrorKind::ConnectRefused, ErrorSide::Upstream)
    );
    assert_eq!(error.kind.as_str(), "connect_refused");
    assert_eq!(
        echo.stats().requests(),
        1,
        "the second peer was never tried"
    );
}

#[test]
fn concurrent_requests_share_one_http2_upstream_connection() {
    const CONCURRENT: usize = 16;
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let (proxy, probe) = SeamProxy::to(echo_peer(&echo).with_protocol(UpstreamProtocol::Http2));
    let server = start(proxy);
    let addr = server.local_addr();
    let (status, body) = request(&connect(addr), "/first?q=1");
    assert_eq!(status, 200);
    // Sent as HTTP/2 proper: the Host the client sent became the :authority.
    let echoed: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echoed["version"], "HTTP/2.0", "{echoed}");
    assert_eq!(echoed["authority"], "example.test", "{echoed}");
    assert_eq!(
        (echoed["path"].as_str(), echoed["query"].as_str()),
        (Some("/first"), Some("q=1"))
    );
    // Slow responses, so that the requests are in flight upstream at the same time.
    let clients: Vec<_> = (0..CONCURRENT)
        .map(|_| std::thread::spawn(move || get(addr, "/delay/300")))
        .collect();
    for client in clients {
        assert_eq!(client.join().unwrap(), 200);
    }
    assert_eq!(echo.stats().requests(), 1 + CONCURRENT as u64);
    assert_eq!(echo.stats().connections(), 1);
    let upstreams: Vec<UpstreamDigest> = (0..=CONCURRENT)
        .map(|_| next(&probe.facts).upstream.expect("sent upstream"))
        .collect();
    assert!(upstreams
        .iter()
        .all(|u| u.protocol == UpstreamProtocol::Http2));
    assert!(
        !upstreams[0].reused,
        "the first request opened the connection"
    );
    assert!(upstreams[1..].iter().all(|u| u.reused));
    assert!(upstreams
        .iter()
        .all(|u| u.local_addr == upstreams[0].local_addr));
}

#[test]
fn a_burst_of_first_requests_opens_one_http2_connection() {
    const CONCURRENT: usize = 16;
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let (proxy, _probe) = SeamProxy::to(echo_peer(&echo).with_protocol(UpstreamProtocol::Http2));
    let server = start(proxy);
    let addr = server.local_addr();
    let clients: Vec<_> = (0..CONCURRENT)
        .map(|_| std::thread::spawn(move || get(addr, "/delay/300")))
        .collect();
    for client in clients {
        assert_eq!(client.join().unwrap(), 200);
    }
    assert_eq!(echo.stats().connections(), 1);
}

#[test]
fn sessions_carry_the_facts_of_both_connections() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let (proxy, probe) = SeamProxy::to(echo_peer(&echo));
    let server = start(proxy);
    let client = connect(server.local_addr());
    assert_eq!(request(&client, "/first").0, 200);
    assert_eq!(request(&client, "/second").0, 200);

    let first = next(&probe.facts);
    assert_eq!(first.downstream.local_addr, server.local_addr());
    assert_eq!(first.downstream.client_addr, client.local_addr().unwrap());
    assert_eq!(first.downstream.scheme.as_str(), "http");
    assert!(first.downstream.tls.is_none());
    let first_upstream = first.upstream.expect("sent upstream");
    assert_eq!(first_upstream.peer_addr, echo.addr());
    assert_eq!(first_upstream.protocol, UpstreamProtocol::Http1);
    assert!(!first_upstream.reused);

    let second = next(&probe.facts);
    assert_eq!(second.downstream.client_addr, client.local_addr().unwrap());
    let second_upstream = second.upstream.expect("sent upstream");
    assert!(
        second_upstream.reused,
        "keep-alive reuses the upstream connection"
    );
    assert_eq!(second_upstream.local_addr, first_upstream.local_addr);
    assert_eq!(echo.stats().connections(), 1);
}

#[test]
fn one_server_answers_on_every_listener() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let listeners = vec!["127.0.0.1:0".into(), "127.0.0.1:0".into()];
    let server = Server::proxy(config(listeners), SeamProxy::to(echo_peer(&echo)).0)
        .start()
        .unwrap();
    let addrs = server.local_addrs().to_vec();
    assert_eq!(addrs.len(), 2);
    assert_ne!(addrs[0], addrs[1]);
    assert_eq!(server.local_addr(), addrs[0]);
    for addr in addrs {
        assert_eq!(get(addr, "/"), 200, "listener {addr}");
    }
    assert_eq!(echo.stats().requests(), 2);
}

#[test]
fn a_server_answers_on_an_inherited_listening_socket() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let inherited = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = inherited.local_addr().unwrap();
    let listeners = vec![Listener::Fd(inherited.into_raw_fd())];
    let server = Server::proxy(config(listeners), SeamProxy::to(echo_peer(&echo)).0)
        .start()
        .unwrap();
    assert_eq!(server.local_addr(), addr);
    assert_eq!(get(addr, "/"), 200);
}

/// A connection filter that counts the clients it was asked about.
#[derive(Debug)]
struct Counting {
    access: ferroxy_engine::IpAccess,
    asked: AtomicUsize,
}

impl ferroxy_engine::ConnectionFilter for Counting {
    fn should_accept(&self, client: SocketAddr) -> ferroxy_engine::connection_filter::Verdict<'_> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        self.access.should_accept(client)
    }
}

#[test]
fn a_refused_connection_is_closed_unanswered_and_never_proxied() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let none: [&str; 0] = [];
    let refusing = Arc::new(Counting {
        access: ferroxy_engine::IpAccess::allow_deny(&none, &["127.0.0.0/8"]).unwrap(),
        asked: AtomicUsize::new(0),
    });
    let accepting = Arc::new(Counting {
        access: ferroxy_engine::IpAccess::allow_deny(&["127.0.0.1"], &none).unwrap(),
        asked: AtomicUsize::new(0),
    });
    let endpoint = |filter: &Arc<Counting>| {
        let filter: Arc<dyn ferroxy_engine::ConnectionFilter> = filter.clone();
        ferroxy_engine::listener::Endpoint::from(Listener::from("127.0.0.1:0"))
            .with_connection_filter(Some(filter))
    };
    let config = ServerConfig {
        listeners: vec![endpoint(&refusing), endpoint(&accepting)],
        threads: 2,
        access_log: None,
        ..Default::default()
    };
    let server = Server::proxy(config, SeamProxy::to(echo_peer(&echo)).0)
        .start()
        .unwrap();
    let (refused_addr, accepted_addr) = (server.local_addrs()[0], server.local_addrs()[1]);

    let refused = connect(refused_addr);
    (&refused)
        .write_all(b"GET / HTTP/1.1\r\nhost: example.test\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    // Closed without a byte: EOF, or a reset for the request it never read.
    let _ = (&refused).read_to_end(&mut answer);
    assert!(answer.is_empty(), "refused, yet answered {answer:?}");
    assert_eq!(refusing.asked.load(Ordering::SeqCst), 1);
    assert_eq!(
        echo.stats().connections(),
        0,
        "the upstream saw the refused client"
    );

    // Asked once per connection, not per request.
    let kept_alive = connect(accepted_addr);
    for _ in 0..3 {
        assert_eq!(request(&kept_alive, "/").0, 200);
    }
    assert_eq!(accepting.asked.load(Ordering::SeqCst), 1);
    assert_eq!(echo.stats().requests(), 3);
}

#[test]
fn a_client_that_goes_away_mid_upload_is_blamed_for_it() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let (proxy, probe) = SeamProxy::to(echo_peer(&echo));
    let server = start(proxy);
    let mut client = connect(server.local_addr());
    client
        .write_all(b"POST /upload HTTP/1.1\r\nhost: example.test\r\ncontent-length: 100000\r\n\r\n")
        .unwrap();
    client.write_all(b"0123456789").unwrap();
    // The upload is under way upstream before the client goes.
    wait_until(|| echo.stats().requests() == 1);
    client.shutdown(Shutdown::Both).unwrap();
    drop(client);
    let error = next(&probe.logged).expect("an incomplete upload is a failure");
    assert_eq!(error.side, ErrorSide::Client, "{error}");
    assert_eq!(error.kind, ErrorKind::DownstreamClosed, "{error}");
}

/// A client thread with a `/delay/2000` request in flight; it returns what it received
/// before its connection closed.
fn slow_request(addr: SocketAddr) -> std::thread::JoinHandle<Vec<u8>> {
    let client = connect(addr);
    std::thread::spawn(move || {
        let mut writer = &client;
        write!(writer, "GET /delay/2000 HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        let _ = (&client).read_to_end(&mut answer);
        answer
    })
}

/// Shut `server` down without grace while a slow request is in flight; returns the client
/// thread, once `wait()` has returned.
fn stop_without_grace(
    server: &mut ServerHandle,
    echo: &EchoUpstream,
) -> std::thread::JoinHandle<Vec<u8>> {
    let addr = server.local_addr();
    let in_flight = slow_request(addr);
    wait_until(|| echo.stats().requests() == 1);
    let stopping = Instant::now();
    server.shutdown(Some(Duration::ZERO));
    server.wait().unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(1),
        "took {:?} to stop",
        stopping.elapsed()
    );
    assert!(server.is_stopped());
    assert!(TcpStream::connect(addr).is_err(), "still accepting");
    in_flight
}

fn assert_cut_off(in_flight: std::thread::JoinHandle<Vec<u8>>) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !in_flight.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the request in flight was not cut off"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let answer = in_flight.join().unwrap();
    assert!(
        answer.is_empty(),
        "answered after a shutdown without grace: {:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[test]
fn shutdown_without_grace_stops_at_once() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let mut server = start(SeamProxy::to(echo_peer(&echo)).0);
    let in_flight = stop_without_grace(&mut server, &echo);
    drop(server);
    assert_cut_off(in_flight);
}

#[test]
fn connections_past_the_grace_period_are_closed_when_the_server_stops() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let mut server = start(SeamProxy::to(echo_peer(&echo)).0);
    let in_flight = stop_without_grace(&mut server, &echo);
    assert_cut_off(in_flight);
}

#[test]
fn shutdown_with_the_default_grace_lets_requests_finish() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let mut server = start(SeamProxy::to(echo_peer(&echo)).0);
    let addr = server.local_addr();
    let in_flight = std::thread::spawn(move || get(addr, "/delay/2000"));
    wait_until(|| echo.stats().requests() == 1);
    server.shutdown(None);
    server.wait().unwrap();
    assert_eq!(in_flight.join().unwrap(), 200);
    assert!(TcpStream::connect(addr).is_err(), "still accepting");
}
