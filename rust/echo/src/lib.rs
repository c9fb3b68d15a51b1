//! Built-in echo upstream: a fast, dependency-free HTTP server used by tests
//! (`ferroxy_upstream` pytest fixture) and demos (`python -m ferroxy --demo-upstream`).
//!
//! Serves HTTP/1.1 (keep-alive) and h2c prior knowledge on the same port; or, given a
//! certificate ([`EchoTls`]), TLS with HTTP/1.1 and h2 by ALPN, optionally requiring a client
//! certificate. The JSON echo says which (`version`, `tls`, `sni`, `client_cert`).
//!
//! Routes:
//! - default (any method/path): drains the request body (streaming, hashed with
//!   SHA-256) and answers 200 with a JSON description of the request.
//! - `/status/{code}`: same JSON with that status (100..=599, else 400).
//! - `/delay/{ms}`: same JSON after sleeping `ms` milliseconds.
//! - `/bytes/{n}`: `n` bytes of the pattern `byte[i] = i % 251`, generated lazily.
//! - `/close`: announces `content-length: 1000000`, sends 1000 bytes, then aborts
//!   the connection.
//! - `/trailers`: the JSON echo (which reports the request's trailers on every route) with
//!   no length, then trailers: the request's own and `x-body-sha256`, declared in a
//!   `Trailer` header (HTTP/1.1 sends them when the request says `TE: trailers`).

use std::future::Future;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, TRAILER};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// How long `serve` waits for connections to finish after shutdown before
/// aborting them.
const GRACE: Duration = Duration::from_secs(1);
/// Frame size for `/bytes/{n}`.
const FRAME: usize = 64 * 1024;
/// Pattern period for `/bytes/{n}` (prime, so it never aligns with frame sizes).
const PERIOD: u64 = 251;

/// Counters shared between the server and its owner.
#[derive(Debug, Default)]
pub struct EchoStats {
    connections: AtomicU64,
    requests: AtomicU64,
}

impl EchoStats {
    /// Number of TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Number of requests received so far (all routes, all connections).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// A certificate to serve TLS with, and the CA whose client certificates it requires.
#[derive(Debug, Clone)]
pub struct EchoTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set: a client must present a certificate this CA signed.
    pub client_ca: Option<PathBuf>,
}

impl EchoTls {
    fn acceptor(&self) -> io::Result<TlsAcceptor> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let invalid = |path: &PathBuf, e: &dyn std::fmt::Display| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: {e}", path.display()),
            )
        };
        let certificates = |path: &PathBuf| {
            CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| invalid(path, &e))
        };
        let chain = certificates(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| invalid(&self.key, &e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(&self.cert, &e))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for certificate in certificates(ca)? {
                    roots.add(certificate).map_err(|e| invalid(ca, &e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| invalid(ca, &e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| invalid(&self.key, &e))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// What the echo reports of the connection a request came on.
#[derive(Debug, Clone)]
struct Conn {
    no: u64,
    tls: bool,
    /// The server name the client sent, if any.
    sni: Option<Arc<str>>,
    client_cert: bool,
}

/// Serve the echo protocol on `listener` until `shutdown` resolves; runs inside
/// the caller's tokio runtime.
///
/// On shutdown it stops accepting, asks open connections to close gracefully,
/// and aborts whatever is still open after about one second. All connection
/// tasks have ended when this returns.
pub async fn serve(
    listener: TcpListener,
    stats: Arc<EchoStats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    serve_tls(listener, stats, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given.
async fn serve_tls(
    listener: TcpListener,
    stats: Arc<EchoStats>,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let mut tasks = JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connection tasks so the set doesn't grow forever.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        // Usually transient (ECONNABORTED, EMFILE): back off briefly
                        // instead of spinning on the error.
                        tracing::debug!(%err, "echo: accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let conn_no = stats.connections.fetch_add(1, Ordering::Relaxed) + 1;
                let stats = stats.clone();
                let builder = builder.clone();
                let watcher = graceful.watcher();
                let tls = tls.clone();
                // The TLS handshake runs on the connection's task: a slow client must not
                // hold up accepting the next one.
                tasks.spawn(async move {
                    let served = match tls {
                        None => {
                            let conn = Conn { no: conn_no, tls: false, sni: None, client_cert: false };
                            let service =
                                service_fn(move |req| handle(req, conn.clone(), stats.clone()));
                            watcher
                                .watch(builder.serve_connection(TokioIo::new(stream), service).into_owned())
                                .await
                        }
                        Some(acceptor) => {
                            let stream = match acceptor.accept(stream).await {
                                Ok(stream) => stream,
                                Err(err) => {
                                    tracing::debug!(%err, conn_no, "echo: TLS handshake failed");
                                    return;
                                }
                            };
                            let session = stream.get_ref().1;
                            let conn = Conn {
                                no: conn_no,
                                tls: true,
                                sni: session.server_name().map(Arc::from),
                                client_cert: session.peer_certificates().is_some(),
                            };
                            let service =
                                service_fn(move |req| handle(req, conn.clone(), stats.clone()));
                            watcher
                                .watch(builder.serve_connection(TokioIo::new(stream), service).into_owned())
                                .await
                        }
                    };
                    if let Err(err) = served {
                        tracing::debug!(err, conn_no, "echo: connection error");
                    }
                });
            }
        }
    }

    drop(listener);
    if tokio::time::timeout(GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!(
            open = tasks.len(),
            "echo: aborting connections after grace period"
        );
    }
    // Dropping the connection futures closes their sockets.
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// An echo upstream on its own small tokio runtime (2 worker threads, thread
/// names "ferroxy-echo").
pub struct EchoUpstream {
    addr: SocketAddr,
    stats: Arc<EchoStats>,
    runtime: Option<tokio::runtime::Runtime>,
    shutdown: Option<oneshot::Sender<()>>,
    /// Disconnects (or receives) when the `serve` task has finished.
    done: mpsc::Receiver<()>,
}

impl EchoUpstream {
    /// Binds `listen` (e.g. "127.0.0.1:0") before returning; io::Error on bind
    /// failure.
    pub fn start(listen: &str) -> io::Result<EchoUpstream> {
        EchoUpstream::start_with(listen, None)
    }

    /// [`EchoUpstream::start`], serving TLS when `tls` is given (its files are read first:
    /// io::Error naming the file when one is bad).
    pub fn start_with(listen: &str, tls: Option<&EchoTls>) -> io::Result<EchoUpstream> {
        let acceptor = tls.map(EchoTls::acceptor).transpose()?;
        let std_listener = bind(listen)?;
        let addr = std_listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferroxy-echo")
            .enable_all()
            .build()?;
        let listener = {
            // Registering with the reactor needs the runtime's context.
            let _guard = runtime.enter();
            TcpListener::from_std(std_listener)?
        };
        let stats = Arc::new(EchoStats::default());
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let (done_tx, done) = mpsc::channel();
        let serve_stats = stats.clone();
        runtime.spawn(async move {
            // A dropped sender also means "shut down".
            serve_tls(listener, serve_stats, acceptor, async {
                let _ = shutdown_rx.await;
            })
            .await;
            let _ = done_tx.send(());
        });
        Ok(EchoUpstream {
            addr,
            stats,
            runtime: Some(runtime),
            shutdown: Some(shutdown_tx),
            done,
        })
    }

    /// The bound address (with the actual port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<EchoStats> {
        self.stats.clone()
    }

    /// Stop accepting, close connections, shut the runtime down (idempotent).
    /// Must not panic when called from a non-tokio thread. Drop calls it too.
    pub fn stop(&mut self) {
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            // Inside an async context blocking is forbidden (tokio panics when a
            // runtime is shut down with a timeout there), so don't wait for the
            // graceful close: drop everything in the background.
            runtime.shutdown_background();
        } else {
            // `serve` returns within GRACE; the margin covers scheduling delays.
            let _ = self.done.recv_timeout(GRACE + Duration::from_millis(500));
            runtime.shutdown_timeout(Duration::from_millis(100));
        }
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Binds a non-blocking listener with a large backlog (std uses 128, which drops
/// SYNs under benchmark connection bursts).
fn bind(listen: &str) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};

    let mut last_err = None;
    for addr in listen.to_socket_addrs()? {
        let attempt = (|| {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            // Allows restarting on a fixed port while old sockets are in TIME_WAIT.
            socket.set_reuse_address(true)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            socket.set_nonblocking(true)?;
            Ok::<_, io::Error>(std::net::TcpListener::from(socket))
        })();
        match attempt {
            Ok(listener) => return Ok(listener),
            Err(err) => last_err = Some(err),
        }
    }
    Err(last_err.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{listen:?} resolved to no address"),
        )
    }))
}

enum Route {
    Echo {
        status: StatusCode,
        delay: Duration,
    },
    /// `/trailers`: the echo, then trailers (see [`Reply::WithTrailers`]).
    Trailers,
    Bytes(u64),
    Close,
    BadRequest(&'static str),
}

fn route(path: &str) -> Route {
    let echo = |status, delay| Route::Echo { status, delay };
    if path == "/close" {
        Route::Close
    } else if path == "/trailers" {
        Route::Trailers
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code.parse::<u16>() {
            Ok(code @ 100..=599) => match StatusCode::from_u16(code) {
                Ok(status) => echo(status, Duration::ZERO),
                Err(_) => Route::BadRequest("invalid status code\n"),
            },
            _ => Route::BadRequest("invalid status code\n"),
        }
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        match ms.parse::<u64>() {
            Ok(ms) => echo(StatusCode::OK, Duration::from_millis(ms)),
            Err(_) => Route::BadRequest("invalid delay\n"),
        }
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        match n.parse::<u64>() {
            Ok(n) => Route::Bytes(n),
            Err(_) => Route::BadRequest("invalid byte count\n"),
        }
    } else {
        echo(StatusCode::OK, Duration::ZERO)
    }
}

async fn handle(
    req: Request<Incoming>,
    conn: Conn,
    stats: Arc<EchoStats>,
) -> Result<Response<Reply>, hyper::Error> {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let response = match route(req.uri().path()) {
        Route::Echo { status, delay } => {
            let (parts, body) = req.into_parts();
            let (body_length, body_sha256, trailers) = drain(body).await?;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            // Note: hyper cannot send a 1xx as a final response; for HTTP/1.1 it
            // turns it into a 500 and closes the connection.
            if status.is_informational()
                || status == StatusCode::NO_CONTENT
                || status == StatusCode::NOT_MODIFIED
            {
                respond(status, None, Reply::Full(None))
            } else {
                let json = echo_json(&parts, body_length, &body_sha256, trailers.as_ref(), &conn);
                respond(status, Some("application/json"), Reply::Full(Some(json)))
            }
        }
        Route::Trailers => {
            let (parts, body) = req.into_parts();
            let (body_length, body_sha256, trailers) = drain(body).await?;
            let json = echo_json(&parts, body_length, &body_sha256, trailers.as_ref(), &conn);
            // The request's trailers come back, with the body's digest beside them.
            let mut sent = trailers.unwrap_or_default();
            sent.insert(
                HeaderName::from_static("x-body-sha256"),
                HeaderValue::try_from(body_sha256).expect("hex is a valid header value"),
            );
            let declared: Vec<&str> = sent.keys().map(HeaderName::as_str).collect();
            let declared = HeaderValue::try_from(declared.join(", ")).expect("names are valid");
            let mut response = respond(
                StatusCode::OK,
                Some("application/json"),
                Reply::WithTrailers {
                    body: Some(json),
                    trailers: Some(sent),
                },
            );
            // HTTP/1.1 sends only the trailers its head declares.
            response.headers_mut().insert(TRAILER, declared);
            response
        }
        Route::Bytes(total) => {
            let mut response = respond(
                StatusCode::OK,
                Some("application/octet-stream"),
                Reply::Pattern { sent: 0, total },
            );
            response.headers_mut().insert(CONTENT_LENGTH, total.into());
            response
        }
        Route::Close => {
            let first = pattern().slice(..1000);
            let mut response = respond(
                StatusCode::OK,
                Some("application/octet-stream"),
                Reply::Truncated {
                    first: Some(first),
                    pause: None,
                },
            );
            // Promise far more than we send, so the abort is a visible truncation.
            response
                .headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from_static("1000000"));
            response
        }
        Route::BadRequest(msg) => respond(
            StatusCode::BAD_REQUEST,
            Some("text/plain"),
            Reply::Full(Some(Bytes::from_static(msg.as_bytes()))),
        ),
    };
    Ok(response)
}

fn respond(status: StatusCode, content_type: Option<&'static str>, body: Reply) -> Response<Reply> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    if let Some(content_type) = content_type {
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    response
}

/// Reads the body frame by frame (never buffering it), returning its length, hex SHA-256
/// and trailers.
async fn drain(mut body: Incoming) -> Result<(u64, String, Option<HeaderMap>), hyper::Error> {
    let mut hasher = Sha256::new();
    let mut length = 0u64;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(data) => {
                hasher.update(&data);
                length += data.len() as u64;
            }
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    Ok((length, hex(&hasher.finalize()), trailers))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

fn echo_json(
    parts: &http::request::Parts,
    body_length: u64,
    body_sha256: &str,
    trailers: Option<&HeaderMap>,
    conn: &Conn,
) -> Bytes {
    let lossy = |value: &HeaderValue| String::from_utf8_lossy(value.as_bytes()).into_owned();
    // `keys()` yields each distinct name once; `get_all` gives its values in order.
    let headers: Map<String, Value> = parts
        .headers
        .keys()
        .map(|name| {
            let values: Vec<String> = parts.headers.get_all(name).iter().map(lossy).collect();
            (name.as_str().to_owned(), Value::String(values.join(", ")))
        })
        .collect();
    let header_list: Vec<Value> = parts
        .headers
        .iter()
        .map(|(name, value)| json!([name.as_str(), lossy(value)]))
        .collect();
    let doc = json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query().unwrap_or(""),
        // HTTP/2's :authority (HTTP/1.1 requests carry a Host header instead).
        "authority": parts.uri.authority().map(|a| a.as_str()),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "header_list": header_list,
        "body_length": body_length,
        "body_sha256": body_sha256,
        "trailers": trailers.map(|trailers| {
            trailers
                .iter()
                .map(|(name, value)| (name.as_str().to_owned(), Value::String(lossy(value))))
                .collect::<Map<String, Value>>()
        }),
        "connection": conn.no,
        "tls": conn.tls,
        "sni": conn.sni.as_deref(),
        "client_cert": conn.client_cert,
    });
    Bytes::from(doc.to_string())
}

/// `PERIOD`-periodic pattern long enough that any frame is a zero-copy slice of
/// it: frame at offset `o` is `pattern()[o % PERIOD..][..len]`.
fn pattern() -> &'static Bytes {
    static PATTERN: OnceLock<Bytes> = OnceLock::new();
    PATTERN.get_or_init(|| {
        (0..FRAME + PERIOD as usize)
            .map(|i| (i as u64 % PERIOD) as u8)
            .collect::<Vec<u8>>()
            .into()
    })
}

/// Response bodies. One enum instead of boxed bodies: no per-response allocation.
enum Reply {
    /// A single (possibly absent) chunk.
    Full(Option<Bytes>),
    /// `/bytes/{n}`: generated one frame per poll, so hyper's write readiness
    /// (and h2 flow control) paces generation.
    Pattern { sent: u64, total: u64 },
    /// `/close`: one frame, a short pause, then an error that makes hyper abort
    /// the connection (HTTP/1.1) or reset the stream (h2).
    Truncated {
        first: Option<Bytes>,
        pause: Option<Pin<Box<tokio::time::Sleep>>>,
    },
    /// `/trailers`: one chunk of unknown length (chunked on HTTP/1.1), then trailers.
    WithTrailers {
        body: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
}

impl Body for Reply {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            Reply::Full(chunk) => Poll::Ready(chunk.take().map(|c| Ok(Frame::data(c)))),
            Reply::Pattern { sent, total } => {
                if *sent >= *total {
                    return Poll::Ready(None);
                }
                let len = (*total - *sent).min(FRAME as u64) as usize;
                let start = (*sent % PERIOD) as usize;
                *sent += len as u64;
                Poll::Ready(Some(Ok(Frame::data(pattern().slice(start..start + len)))))
            }
            Reply::Truncated { first, pause } => {
                if let Some(chunk) = first.take() {
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                // The pause lets hyper flush the head and first bytes, so the
                // client sees a truncated body rather than no response at all.
                let sleep = pause
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(20))));
                ready!(sleep.as_mut().poll(cx));
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "echo /close: aborting mid-body",
                ))))
            }
            Reply::WithTrailers { body, trailers } => Poll::Ready(
                body.take()
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Reply::Full(chunk) => chunk.is_none(),
            Reply::Pattern { sent, total } => sent >= total,
            Reply::Truncated { .. } => false,
            Reply::WithTrailers { body, trailers } => body.is_none() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Reply::Full(chunk) => {
                SizeHint::with_exact(chunk.as_ref().map_or(0, |c| c.len() as u64))
            }
            Reply::Pattern { sent, total } => SizeHint::with_exact(total - sent),
            Reply::Truncated { .. } | Reply::WithTrailers { .. } => SizeHint::default(),
        }
    }
}
