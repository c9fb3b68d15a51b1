//! The TCP (L4) proxy over real sockets: many concurrent connections copied byte-exact to an
//! echo server, a balancer that tries another backend when one refuses, the idle timeout, and
//! a chooser that names the peer per connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ferroxy_engine::digest::DownstreamDigest;
use ferroxy_engine::error::{Error, ErrorKind};
use ferroxy_engine::lb::{LoadBalancer, Strategy, Upstream};
use ferroxy_engine::tcp_proxy::{PeerChooser, PeerFuture, TcpProxy, TcpProxyConfig, TcpUpstream};
use ferroxy_engine::{Listener, Peer, Server, ServerHandle};

/// A TCP echo server on its own threads; its address.
fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// An address nothing listens on.
fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn start(config: TcpProxyConfig) -> ServerHandle {
    let mut server = Server::new(2, Duration::from_secs(1));
    let listeners = vec![Listener::Addr("127.0.0.1:0".into()).into()];
    server.add_service(listeners, Arc::new(TcpProxy::new(config)));
    server.start().unwrap()
}

fn round_trip(proxy: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut conn = TcpStream::connect(proxy).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut writer = conn.try_clone().unwrap();
    let sent = payload.to_vec();
    let sending = thread::spawn(move || writer.write_all(&sent).unwrap());
    let mut echoed = vec![0u8; payload.len()];
    conn.read_exact(&mut echoed).unwrap();
    sending.join().unwrap();
    echoed
}

#[test]
fn concurrent_connections_arrive_byte_exact() {
    let upstream = Peer::new(&echo_server().to_string()).unwrap();
    let handle = start(TcpProxyConfig::new(Upstream::Peer(upstream)));
    let proxy = handle.local_addrs()[0];
    let clients: Vec<_> = (0..200u32)
        .map(|i| {
            thread::spawn(move || {
                let payload: Vec<u8> = (0..(64 * 1024 + i as usize * 97))
                    .map(|b| (b as u32 * 31 + i) as u8)
                    .collect();
                assert!(round_trip(proxy, &payload) == payload, "client {i}");
            })
        })
        .collect();
    for client in clients {
        client.join().unwrap();
    }
    handle.shutdown(None);
}

#[test]
fn a_refusing_backend_is_passed_over() {
    let backends = [
        (closed_port().to_string(), 1),
        (echo_server().to_string(), 1),
    ];
    let balancer = LoadBalancer::new(Strategy::RoundRobin, backends).unwrap();
    let handle = start(TcpProxyConfig::new(Upstream::Balanced(Arc::new(balancer))));
    let proxy = handle.local_addrs()[0];
    for i in 0..6u8 {
        assert_eq!(round_trip(proxy, &[i; 1000]), vec![i; 1000]);
    }
    handle.shutdown(None);
}

#[test]
fn an_idle_connection_is_closed() {
    let upstream = Peer::new(&echo_server().to_string()).unwrap();
    let mut config = TcpProxyConfig::new(Upstream::Peer(upstream));
    config.idle_timeout = Duration::from_millis(300);
    let handle = start(config);
    let proxy = handle.local_addrs()[0];
    assert_eq!(round_trip(proxy, b"hello"), b"hello");
    let mut conn = TcpStream::connect(proxy).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    // The proxy closes it: EOF well before the client's own 5 s read timeout.
    assert_eq!(conn.read_to_end(&mut rest).unwrap(), 0);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    handle.shutdown(None);
}

/// Sends the upstream named `connection % peers.len()` (failing every `fail_every`th
/// connection), and records the client addresses it was asked about.
struct Rotating {
    peers: Vec<Peer>,
    fail_every: usize,
    asked: AtomicUsize,
    clients: Mutex<Vec<SocketAddr>>,
}

impl PeerChooser for Rotating {
    fn upstream_peer(&self, client: &DownstreamDigest) -> PeerFuture {
        let n = self.asked.fetch_add(1, Ordering::Relaxed) + 1;
        self.clients.lock().unwrap().push(client.client_addr);
        let chosen = if n % self.fail_every == 0 {
            Err(Error::new(ErrorKind::HookError, "no peer for this one"))
        } else {
            Ok(self.peers[n % self.peers.len()].clone().into())
        };
        Box::pin(async move {
            // The answer comes later, as a hook's does.
            tokio::time::sleep(Duration::from_millis(5)).await;
            chosen
        })
    }
}

/// A server that greets each connection with `name`, then echoes.
fn greeting_server(name: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            thread::spawn(move || {
                if conn.write_all(name).is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[test]
fn a_chooser_names_each_connections_peer_and_its_failure_closes_only_that_one() {
    let peers = [greeting_server(b"A"), greeting_server(b"B")]
        .iter()
        .map(|addr| Peer::new(&addr.to_string()).unwrap())
        .collect();
    let chooser = Arc::new(Rotating {
        peers,
        fail_every: 3,
        asked: AtomicUsize::new(0),
        clients: Mutex::new(Vec::new()),
    });
    let handle = start(TcpProxyConfig::new(TcpUpstream::Chosen(chooser.clone())));
    let proxy = handle.local_addrs()[0];
    let mut greetings = Vec::new();
    for i in 0..6u8 {
        let mut conn = TcpStream::connect(proxy).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut greeting = [0u8; 1];
        match conn.read(&mut greeting).unwrap() {
            // Refused by the chooser: closed unanswered.
            0 => greetings.push(b'-'),
            _ => {
                conn.write_all(&[i; 100]).unwrap();
                let mut echoed = [0u8; 100];
                conn.read_exact(&mut echoed).unwrap();
                assert_eq!(echoed, [i; 100]);
                greetings.push(greeting[0]);
            }
        }
    }
    assert_eq!(greetings, b"BA-AB-");
    let clients = chooser.clients.lock().unwrap();
    assert_eq!(clients.len(), 6);
    assert!(clients.iter().all(|client| client.ip().is_loopback()));
    handle.shutdown(None);
}
