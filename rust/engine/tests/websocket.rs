//! A WebSocket tunnel whose messages a phase sees (`ProxyHttp::websocket_filter`): messages
//! changed, dropped or passed on, both ways, over real sockets. The upstream answers the
//! handshake with 101 and then echoes every byte back.

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use ferroxy_engine::error::Result;
use ferroxy_engine::websocket::{Message, MessageFilter, Verdict};
use ferroxy_engine::{Peer, ProxyHttp, Server, ServerConfig, Session};

/// Answers any request with a 101, then echoes bytes; records the handshake it got.
fn switching_echo(handshakes: Arc<Mutex<Vec<String>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let handshakes = handshakes.clone();
            thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                handshakes.lock().unwrap().push(head.to_ascii_lowercase());
                let mut writer = conn;
                writer
                    .write_all(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                          Connection: Upgrade\r\n\r\n",
                    )
                    .unwrap();
                let mut buf = [0u8; 65536];
                loop {
                    match reader.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if writer.write_all(&buf[..n]).is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

struct Shouting {
    upstream: Peer,
    seen: Arc<AtomicUsize>,
}

struct Shout(Arc<AtomicUsize>);

impl MessageFilter for Shout {
    fn on_message(
        &self,
        message: Message,
        _from_client: bool,
    ) -> Pin<Box<dyn Future<Output = Verdict> + Send + 'static>> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
            match message {
                Message::Text(text) if text == "drop me" => Verdict::Drop,
                Message::Text(text) => Verdict::Replace(Message::Text(text.to_uppercase())),
                Message::Binary(_) => Verdict::Forward,
            }
        })
    }
}

impl ProxyHttp for Shouting {
    type Ctx = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Peer> {
        Ok(self.upstream.clone())
    }
    fn websocket_filter(&self, _: &Session, _: &mut ()) -> Option<Arc<dyn MessageFilter>> {
        Some(Arc::new(Shout(self.seen.clone())))
    }
}

fn masked_text(text: &[u8]) -> Vec<u8> {
    let key = [7u8, 1, 9, 3];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&key);
    frame.extend(text.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    frame
}

/// Read one frame; its opcode and unmasked payload.
fn read_frame(conn: &mut impl Read) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    conn.read_exact(&mut head).unwrap();
    let length = usize::from(head[1] & 0x7f);
    assert!(length < 126);
    let key = if head[1] & 0x80 != 0 {
        let mut key = [0u8; 4];
        conn.read_exact(&mut key).unwrap();
        Some(key)
    } else {
        None
    };
    let mut payload = vec![0u8; length];
    conn.read_exact(&mut payload).unwrap();
    if let Some(key) = key {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    (head[0] & 0x0f, payload)
}

#[test]
fn a_phase_sees_changes_and_drops_each_message() {
    let handshakes = Arc::new(Mutex::new(Vec::new()));
    let upstream = Peer::new(&switching_echo(handshakes.clone()).to_string()).unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let config = ServerConfig {
        listeners: vec!["127.0.0.1:0".into()],
        threads: 2,
        access_log: None,
        ..Default::default()
    };
    let proxy = Shouting {
        upstream,
        seen: seen.clone(),
    };
    let handle = Server::proxy(config, proxy).start().unwrap();
    let mut conn = TcpStream::connect(handle.local_addr()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    conn.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
    )
    .unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
    }
    // The handshake went without its extensions: none may hide the messages.
    let handshake = handshakes.lock().unwrap()[0].clone();
    assert!(handshake.contains("upgrade: websocket"), "{handshake}");
    assert!(
        !handshake.contains("sec-websocket-extensions"),
        "{handshake}"
    );

    conn.write_all(&masked_text(b"drop me")).unwrap();
    conn.write_all(&masked_text(b"hello")).unwrap();
    // Shouted on the way up, echoed, seen again on the way down.
    assert_eq!(read_frame(&mut reader), (0x1, b"HELLO".to_vec()));
    assert_eq!(seen.load(Ordering::Relaxed), 3);
    // A ping goes through as it is, unseen.
    let mut ping = vec![0x89, 0x84, 1, 2, 3, 4];
    ping.extend(
        b"ping"
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
    );
    conn.write_all(&ping).unwrap();
    assert_eq!(read_frame(&mut reader), (0x9, b"ping".to_vec()));
    assert_eq!(seen.load(Ordering::Relaxed), 3);
    handle.shutdown(Some(Duration::ZERO));
}
