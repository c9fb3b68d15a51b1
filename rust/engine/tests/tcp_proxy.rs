//! The TCP (L4) proxy over real sockets: many concurrent connections copied byte-exact to an
//! echo server, a balancer that tries another backend when one refuses, and the idle timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ferroxy_engine::lb::{LoadBalancer, Strategy, Upstream};
use ferroxy_engine::tcp_proxy::{TcpProxy, TcpProxyConfig};
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
