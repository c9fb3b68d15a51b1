//! Integration tests for the built-in echo upstream, over real sockets on 127.0.0.1.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferroxy_echo::{serve, EchoStats, EchoUpstream};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

type H1 = http1::SendRequest<Full<Bytes>>;

async fn h1_connect(addr: SocketAddr) -> H1 {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

fn request(method: Method, uri: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "echo.test")
        .body(Full::new(body.into()))
        .unwrap()
}

/// Sends `req` and collects the whole response.
async fn send(sender: &mut H1, req: Request<Full<Bytes>>) -> (StatusCode, HeaderMap, Bytes) {
    sender.ready().await.unwrap();
    let response = sender.send_request(req).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status, parts.headers, body)
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap()
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn echoes_request_as_json() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let mut client = h1_connect(echo.addr()).await;

    // Large enough to arrive in several frames; not a repeating pattern.
    let body: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut req = request(Method::POST, "/a/b?x=1&y=2", body.clone());
    let headers = req.headers_mut();
    headers.insert("x-custom", HeaderValue::from_static("hello"));
    headers.append("x-multi", HeaderValue::from_static("one"));
    headers.append("x-multi", HeaderValue::from_static("two"));
    headers.insert("x-latin1", HeaderValue::from_bytes(b"caf\xe9").unwrap());

    let (status, headers, raw) = send(&mut client, req).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    let doc = json(&raw);
    assert_eq!(doc["method"], "POST");
    assert_eq!(doc["path"], "/a/b");
    assert_eq!(doc["query"], "x=1&y=2");
    assert_eq!(doc["version"], "HTTP/1.1");
    assert_eq!(doc["headers"]["x-custom"], "hello");
    assert_eq!(doc["headers"]["x-multi"], "one, two");
    assert_eq!(doc["headers"]["x-latin1"], "caf\u{fffd}");
    assert_eq!(doc["headers"]["host"], "echo.test");
    let list = doc["header_list"].as_array().unwrap();
    assert!(list.contains(&serde_json::json!(["x-custom", "hello"])));
    assert!(list.contains(&serde_json::json!(["x-multi", "one"])));
    assert!(list.contains(&serde_json::json!(["x-multi", "two"])));
    assert_eq!(doc["body_length"], body.len() as u64);
    assert_eq!(doc["body_sha256"], hex_sha256(&body));
    assert_eq!(doc["connection"], 1);

    // No query, no body.
    let (_, _, raw) = send(&mut client, request(Method::GET, "/", Bytes::new())).await;
    let doc = json(&raw);
    assert_eq!(doc["method"], "GET");
    assert_eq!(doc["query"], "");
    assert_eq!(doc["body_length"], 0);
    assert_eq!(doc["body_sha256"], hex_sha256(b""));
}

#[tokio::test]
async fn status_route() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let mut client = h1_connect(echo.addr()).await;

    let (status, _, raw) = send(
        &mut client,
        request(Method::GET, "/status/418", Bytes::new()),
    )
    .await;
    assert_eq!(status, StatusCode::IM_A_TEAPOT);
    assert_eq!(json(&raw)["path"], "/status/418");

    let (status, headers, raw) = send(
        &mut client,
        request(Method::GET, "/status/204", Bytes::new()),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(raw.is_empty());
    assert!(headers.get("content-type").is_none());

    for bad in ["/status/600", "/status/99", "/status/abc", "/status/"] {
        let (status, _, _) = send(&mut client, request(Method::GET, bad, Bytes::new())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn delay_route() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let mut client = h1_connect(echo.addr()).await;
    let started = Instant::now();
    let (status, _, raw) = send(&mut client, request(Method::POST, "/delay/200", "abc")).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&raw)["body_length"], 3);
}

#[tokio::test]
async fn bytes_route_streams_pattern() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let mut client = h1_connect(echo.addr()).await;

    let (status, headers, body) = send(
        &mut client,
        request(Method::GET, "/bytes/1000000", Bytes::new()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-length"], "1000000");
    assert_eq!(headers["content-type"], "application/octet-stream");
    assert_eq!(body.len(), 1_000_000);
    assert!(body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));

    let (status, headers, body) =
        send(&mut client, request(Method::GET, "/bytes/0", Bytes::new())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-length"], "0");
    assert!(body.is_empty());

    // Huge sizes are generated lazily: read the first frames and hang up.
    client.ready().await.unwrap();
    let response = client
        .send_request(request(Method::GET, "/bytes/1099511627776", Bytes::new()))
        .await
        .unwrap();
    assert_eq!(response.headers()["content-length"], "1099511627776");
    let mut body = response.into_body();
    let mut seen = 0usize;
    while seen < 300_000 {
        let frame = body.frame().await.unwrap().unwrap();
        let data = frame.into_data().unwrap();
        assert!(data
            .iter()
            .enumerate()
            .all(|(i, &b)| b == ((seen + i) % 251) as u8));
        seen += data.len();
    }
}

#[tokio::test]
async fn close_route_truncates() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let mut client = h1_connect(echo.addr()).await;
    client.ready().await.unwrap();
    let response = client
        .send_request(request(Method::GET, "/close", Bytes::new()))
        .await
        .expect("the response head is sent before the abort");
    assert_eq!(response.headers()["content-length"], "1000000");
    let result = response.into_body().collect().await;
    assert!(result.is_err(), "body must end in an error, not cleanly");
}

#[tokio::test]
async fn counts_connections_and_requests() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let stats = echo.stats();
    let mut client = h1_connect(echo.addr()).await;
    for _ in 0..3 {
        let (_, _, raw) = send(&mut client, request(Method::GET, "/x", Bytes::new())).await;
        assert_eq!(json(&raw)["connection"], 1);
    }
    assert_eq!(stats.connections(), 1);
    assert_eq!(stats.requests(), 3);

    let mut second = h1_connect(echo.addr()).await;
    let (_, _, raw) = send(&mut second, request(Method::GET, "/x", Bytes::new())).await;
    assert_eq!(json(&raw)["connection"], 2);
    assert_eq!(stats.connections(), 2);
    assert_eq!(stats.requests(), 4);
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let stream = TcpStream::connect(echo.addr()).await.unwrap();
    let (mut sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });

    let req = Request::builder()
        .method(Method::PUT)
        .uri("http://echo.test/h2/path?q=2")
        .body(Full::new(Bytes::from_static(b"hello h2")))
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let doc = json(&response.into_body().collect().await.unwrap().to_bytes());
    assert_eq!(doc["method"], "PUT");
    assert_eq!(doc["path"], "/h2/path");
    assert_eq!(doc["query"], "q=2");
    assert_eq!(doc["version"], "HTTP/2.0");
    assert_eq!(doc["body_sha256"], hex_sha256(b"hello h2"));

    // Larger than the default h2 windows, so flow control must work.
    let req = Request::builder()
        .uri("http://echo.test/bytes/200000")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let body = sender
        .send_request(req)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), 200_000);
    assert!(body.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    assert_eq!(echo.stats().connections(), 1);
    assert_eq!(echo.stats().requests(), 2);
}

/// `serve` in the caller's runtime returns promptly on shutdown, even with a
/// request still in flight.
#[tokio::test]
async fn serve_stops_within_grace_period() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stats = Arc::new(EchoStats::default());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, stats.clone(), async {
        let _ = rx.await;
    }));

    let mut client = h1_connect(addr).await;
    let (status, _, _) = send(&mut client, request(Method::GET, "/", Bytes::new())).await;
    assert_eq!(status, StatusCode::OK);
    client.ready().await.unwrap();
    let slow = client.send_request(
        Request::get("/delay/10000")
            .body(Full::new(Bytes::new()))
            .unwrap(),
    );
    let slow = tokio::spawn(slow);
    // In flight once the echo has counted it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.requests() < 2 {
        assert!(Instant::now() < deadline, "the slow request never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let started = Instant::now();
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(3), server)
        .await
        .expect("serve must return within the grace period")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    // The in-flight request was cut off, and nothing accepts any more.
    assert!(slow.await.unwrap().is_err());
    assert!(TcpStream::connect(addr).await.is_err());
    assert_eq!(stats.requests(), 2);
}

/// Raw HTTP/1.1 over a blocking std socket: no tokio on this thread at all.
fn blocking_get(addr: SocketAddr, path: &str) -> (String, Value) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: echo.test\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head.to_owned(), json(body.as_bytes()))
}

#[test]
fn start_stop_from_plain_thread() {
    let mut echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let addr = echo.addr();
    assert_ne!(addr.port(), 0);

    let (head, doc) = blocking_get(addr, "/plain?t=1");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(doc["path"], "/plain");
    assert_eq!(doc["query"], "t=1");

    // Binding an address in use fails up front.
    assert!(EchoUpstream::start(&addr.to_string()).is_err());

    // An idle keep-alive connection must not hold up stop(), and gets closed.
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        idle,
        "GET / HTTP/1.1\r\nhost: echo.test\r\ncontent-length: 0\r\n\r\n"
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    assert!(idle.read(&mut buf).unwrap() > 0);

    let started = Instant::now();
    echo.stop();
    assert!(started.elapsed() < Duration::from_secs(2));
    let mut rest = Vec::new();
    // EOF (or a reset), not a timeout.
    match idle.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(err) => assert_ne!(err.kind(), std::io::ErrorKind::WouldBlock, "{err}"),
    }
    assert!(std::net::TcpStream::connect(addr).is_err());
    assert_eq!(echo.stats().connections(), 2);
    assert_eq!(echo.stats().requests(), 2);

    echo.stop(); // idempotent
    drop(echo); // and Drop after stop is fine
}

#[test]
fn drop_stops_server() {
    let echo = EchoUpstream::start("127.0.0.1:0").unwrap();
    let addr = echo.addr();
    let (_, doc) = blocking_get(addr, "/");
    assert_eq!(doc["connection"], 1);
    drop(echo);
    assert!(std::net::TcpStream::connect(addr).is_err());
}
