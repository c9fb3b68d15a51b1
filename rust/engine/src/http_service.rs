//! The HTTP proxy service: HTTP/1.1 and h2c (prior knowledge) on the same port, each request
//! run through a [`ProxyService`].
//!
//! A connection is told apart by its first bytes, peeked: HTTP/2 goes to hyper-util's auto
//! builder behind the flood guard; HTTP/1 to hyper's own HTTP/1 builder, whose connection can
//! hand its socket back. That is how an idle HTTP/1 connection gives up hyper's buffers
//! (8 KiB to read, 8 KiB to write, the request's slot): once it has been quiet a while, hyper
//! is asked to stop, and the socket waits for the next request's bytes holding no buffer,
//! as nginx's keep-alive connections do.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_io_timeout::TimeoutStream;

use crate::body::ProxyBody;
use crate::client_conn::{ConnectionWatch, Tracked, Watched};
use crate::digest::DownstreamDigest;
use crate::error::ErrorSide;
use crate::listener::DownstreamStream;
use crate::phase::ProxyHttp;
use crate::proxy::{ProxyService, ResponseBody};
use crate::service::{BackgroundService, BoxFuture, Service, ShutdownSignal};
use crate::upstream::ConnectionPool;

/// How the HTTP service treats its client connections.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Longest wait for a client to send its request head, or more of its request body.
    pub client_read_timeout: Duration,
    /// Longest a write to a client may stall.
    pub client_write_timeout: Duration,
    /// How long an idle HTTP/1.1 keep-alive connection waits for its next request (capped
    /// by client_read_timeout: hyper times the idle wait and the head together).
    pub keepalive_timeout: Duration,
    /// How long a tunnel (a WebSocket, after its 101) may go without a byte either way
    /// before it is closed.
    pub tunnel_idle_timeout: Duration,
}

/// End the stream as the protocol says (close_notify over TLS), if the client reads within
/// a moment; hyper, served without shutdown, leaves that to us.
async fn close_tls<S: tokio::io::AsyncWrite + Unpin>(io: &mut S) {
    let _ = tokio::time::timeout(QUIET_BEFORE_CLOSE, tokio::io::AsyncWriteExt::shutdown(io)).await;
}

/// How long an HTTP/1 connection must have been idle (answered, quiet) before hyper gives its
/// buffers back. Checked this often, so a connection is released 1-2 periods into its idle
/// time; a busy connection never is, and pays one timer tick per period.
const RELEASE_IDLE_AFTER: Duration = Duration::from_millis(250);

/// How long a client connection whose last bytes were our answer must stay quiet, once
/// shutdown has begun, before it is closed as idle. A keep-alive client sends its next request
/// right after the last response: closing in that gap would lose the request.
const QUIET_BEFORE_CLOSE: Duration = Duration::from_millis(100);

/// Streams one HTTP/2 client connection may have open at once.
const H2_MAX_CONCURRENT_STREAMS: u32 = 200;
/// Bytes of request headers per HTTP/2 request (decoded, as SETTINGS_MAX_HEADER_LIST_SIZE).
const H2_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Streams a client may open and reset before we accept them (rapid reset, CVE-2023-44487).
const H2_MAX_PENDING_RESETS: usize = 20;
/// Streams we reset for a client's protocol errors before the connection ends.
const H2_MAX_LOCAL_ERROR_RESETS: usize = 1024;

type Io = TimeoutStream<DownstreamStream>;
type Handling<P> = Pin<Box<dyn Future<Output = Result<Response<P>, Infallible>> + Send>>;
type Response<P> = http::Response<Tracked<ResponseBody<P>>>;

pub struct HttpProxy<P: ProxyHttp> {
    proxy: ProxyService<P>,
    /// For connections that begin with the HTTP/2 preface (or may yet).
    auto: auto::Builder<TokioExecutor>,
    /// For the others. Not the auto builder: its version check reads 24 bytes and hands them
    /// back to hyper as a read of their own, which doubles hyper's read buffer to 16 KiB.
    http1: hyper::server::conn::http1::Builder,
    config: HttpConfig,
}

impl<P: ProxyHttp> HttpProxy<P> {
    pub fn new(proxy: ProxyService<P>, config: HttpConfig) -> Self {
        // hyper starts this timer whenever it waits for a request head, idle time included:
        // it is both the keep-alive timeout and the head's read timeout. No pipeline_flush:
        // with unparsed bytes still buffered it holds back hyper's automatic 400 for a
        // malformed request, which then never reaches the client.
        let head_timeout = config.keepalive_timeout.min(config.client_read_timeout);
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout(head_timeout);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            .header_read_timeout(head_timeout);
        // Bounded, as nginx's http2 defaults are: a client cannot hold more streams, header
        // bytes or unaccepted resets than this (hyper's own defaults, stated here so that
        // they cannot drift), and an idle connection closes (see serve_h2).
        auto.http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .max_header_list_size(H2_MAX_HEADER_LIST_SIZE)
            .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
            .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESETS);
        HttpProxy {
            proxy,
            auto,
            http1,
            config,
        }
    }

    /// hyper's service for one connection: each request through the proxy, its response
    /// counted in flight until sent, and closing the connection once shutdown has begun.
    fn handler(
        self: &Arc<Self>,
        downstream: &Arc<DownstreamDigest>,
        watch: &Arc<ConnectionWatch>,
        shutdown: &ShutdownSignal,
    ) -> impl hyper::service::Service<
        http::Request<Incoming>,
        Response = Response<P>,
        Error = Infallible,
        Future = Handling<P>,
    > + Unpin {
        let service = self.clone();
        let downstream = downstream.clone();
        let watch = watch.clone();
        let shutdown = shutdown.clone();
        service_fn(move |req: http::Request<Incoming>| -> Handling<P> {
            let service = service.clone();
            let downstream = downstream.clone();
            let in_flight = watch.request_started();
            let watch = watch.clone();
            let shutdown = shutdown.clone();
            // Boxed: hyper keeps a slot the size of this future while the connection lives,
            // and an HTTP/1 connection must be Unpin to hand its socket back. Made in its box
            // (3 KB with the Python layer's phases, copied in at every request otherwise).
            Box::into_pin(made_in_box(|| async move {
                let req = req.map(|body| {
                    ProxyBody::streamed(body, service.config.client_read_timeout, ErrorSide::Client)
                });
                let version = req.version();
                let mut response = service.proxy.handle(req, downstream).await;
                let closing = shutdown.is_shutting_down() || watch.take_close_next();
                if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                    let switched = response
                        .extensions_mut()
                        .remove::<crate::upgrade::UpstreamUpgrade>()
                        .and_then(|switched| switched.take());
                    match switched {
                        // A connection that closes after this response is no tunnel: the
                        // switch is refused, and the upstream's side dropped.
                        Some(_) if closing => crate::upgrade::refuse(&mut response),
                        // The socket becomes a tunnel once the 101 has gone (see serve_http1).
                        Some(switched) => watch.switch_after_response(switched),
                        None => {}
                    }
                }
                if closing {
                    crate::proxy::close_after(&mut response, version);
                }
                Ok(response.map(|body| Tracked::new(body, in_flight)))
            }))
        })
    }

    /// Serve an HTTP/1 connection; while it is idle, without hyper's buffers.
    async fn serve_http1(
        self: &Arc<Self>,
        io: Io,
        downstream: &Arc<DownstreamDigest>,
        shutdown: &mut ShutdownSignal,
    ) -> hyper::Result<()> {
        let watch = Arc::new(ConnectionWatch::default());
        // A TLS connection keeps hyper's buffers while idle: rustls may hold decrypted bytes
        // hyper has not read yet, which the socket's readiness would not show.
        let releasable = matches!(io.get_ref(), DownstreamStream::Tcp(_));
        let mut io = Watched::new(io, watch.clone()).scan_lengths();
        let idle_limit = self
            .config
            .keepalive_timeout
            .min(self.config.client_read_timeout);
        loop {
            // Boxed: released with the buffers, where inline it would weigh on this future,
            // which lives as long as the connection.
            let mut conn = Box::new(
                self.http1
                    .serve_connection(TokioIo::new(io), self.handler(downstream, &watch, shutdown)),
            );
            let mut asked_to_stop = false;
            let mut seen = watch.activity();
            let mut idle_from = Instant::now();
            loop {
                let shutting_down = shutdown.is_shutting_down();
                let period = if shutting_down {
                    QUIET_BEFORE_CLOSE
                } else {
                    RELEASE_IDLE_AFTER
                };
                let tick = tokio::time::sleep(period);
                tokio::pin!(tick);
                // A connection that keeps its buffers has no use for the tick until shutdown
                // begins: it waits for that instead, rather than waking every period for as
                // long as it stays open.
                let mut stopping = (!releasable && !shutting_down).then(|| {
                    let mut signal = shutdown.clone();
                    Box::pin(async move { signal.begun().await })
                });
                // The connection first, and the timer polled only once it has fired (or the
                // task's waker changed): this wakes for every read and write, and a timer's
                // poll costs more than the check. Shutdown is noticed at the next tick
                // (responses say `Connection: close` from its start: see `handler`).
                let mut tick_waker: Option<std::task::Waker> = None;
                let woke = std::future::poll_fn(|cx| {
                    if let Poll::Ready(served) = conn.poll_without_shutdown(cx) {
                        return Poll::Ready(Some(served));
                    }
                    if asked_to_stop {
                        return Poll::Pending;
                    }
                    if let Some(stopping) = stopping.as_mut() {
                        return stopping.as_mut().poll(cx).map(|()| None);
                    }
                    let registered = tick_waker.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
                    if registered && !tick.is_elapsed() {
                        return Poll::Pending;
                    }
                    // Out of budget, the poll would not reach the timer to register it.
                    if tokio::task::coop::has_budget_remaining() {
                        tick_waker = Some(cx.waker().clone());
                    }
                    tick.as_mut().poll(cx).map(|()| None)
                })
                .await;
                if let Some(served) = woke {
                    if let Err(error) = served {
                        // A keep-alive timeout or a bad request ends here: TLS still says so.
                        if !releasable {
                            let mut io = conn.into_parts().io.into_inner();
                            Box::pin(close_tls(&mut io)).await;
                        }
                        return Err(error);
                    }
                    break;
                }
                if (releasable || shutdown.is_shutting_down()) && watch.idle_since(seen) {
                    // Idle: hyper closes at once (or after what is in flight), and hands back
                    // the socket with any bytes it read ahead.
                    Pin::new(&mut *conn).graceful_shutdown();
                    asked_to_stop = true;
                } else {
                    seen = watch.activity();
                    idle_from = Instant::now();
                }
            }
            if let Some(switched) = watch.take_upgrade().filter(|_| !asked_to_stop) {
                // A 101 went out: hyper has handed the connection back, and it is a tunnel.
                let parts = conn.into_parts();
                let mut io = parts.io.into_inner();
                io.set_unread(parts.read_buf);
                io.stop_scanning();
                let idle = self.config.tunnel_idle_timeout;
                // Boxed, as the TLS close above and below: rare, and inline their futures
                // would weigh on every connection's, idle ones included, for its whole life.
                let tunnel = Box::pin(crate::upgrade::tunnel(&mut io, switched, &watch, idle));
                if let Err(error) = tunnel.await {
                    tracing::debug!(client = %downstream.client_addr, "tunnel ended: {error}");
                }
                // Its end said to the client (close_notify over TLS, a FIN over TCP), when
                // the upstream's end or the idle timeout ended it.
                Box::pin(close_tls(&mut io)).await;
                return Ok(());
            }
            if !asked_to_stop || shutdown.is_shutting_down() {
                // hyper ended it (the client closed or asked to), or it is idle at shutdown:
                // the socket closes here. TLS says so first (close_notify), so the client can
                // tell the end from a truncation; hyper, served without shutdown, leaves that
                // to us.
                if !releasable {
                    let mut io = conn.into_parts().io.into_inner();
                    Box::pin(close_tls(&mut io)).await;
                }
                return Ok(());
            }
            let parts = conn.into_parts();
            io = parts.io.into_inner();
            io.set_unread(parts.read_buf);
            if io.has_unread() {
                continue;
            }
            // Nothing buffered for this connection now but the socket.
            let deadline = idle_from + idle_limit;
            tokio::select! {
                // A request already on its way wins over shutdown: it is answered, and closes.
                biased;
                readable = io.get_ref().get_ref().tcp().readable() => readable.map_err(|_| ()).ok(),
                () = tokio::time::sleep_until(deadline) => return Ok(()),
                () = shutdown.begun() => return Ok(()),
            };
        }
    }

    /// Serve a connection that began like HTTP/2 (hyper-util tells for sure).
    async fn serve_h2(
        self: &Arc<Self>,
        io: Io,
        downstream: &Arc<DownstreamDigest>,
        shutdown: &mut ShutdownSignal,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let watch = Arc::new(ConnectionWatch::default());
        let io = crate::flood::FloodGuard::new(io, downstream.client_addr);
        // Scanned too: a client that sends its first byte alone lands here whatever it speaks.
        let io = Watched::new(io, watch.clone()).scan_lengths();
        // Boxed: inline, the auto builder's connection (HTTP/1 and HTTP/2 states) would size
        // every connection's future, HTTP/1 ones included.
        let mut conn = Box::pin(
            self.auto
                .serve_connection(TokioIo::new(io), self.handler(downstream, &watch, shutdown)),
        );
        // An HTTP/2 connection with nothing in flight closes after the keep-alive timeout,
        // as an idle HTTP/1.1 one does: otherwise a client could hold its memory forever.
        let idle_limit = self.config.keepalive_timeout;
        let mut seen = watch.activity();
        loop {
            tokio::select! {
                served = conn.as_mut() => return served,
                () = shutdown.begun() => break,
                () = tokio::time::sleep(idle_limit) => {
                    if watch.idle_since(seen) {
                        tracing::debug!(client = %downstream.client_addr, "closing an idle HTTP/2 connection");
                        break;
                    }
                    seen = watch.activity();
                }
            }
        }
        // GOAWAY at once: the client learns which streams were taken. hyper then waits for
        // the streams in flight, and for the client to acknowledge a PING: a client that does
        // not read would hold the connection to the end of the grace period, so once nothing
        // is in flight and nothing has moved for a while, it is closed.
        conn.as_mut().graceful_shutdown();
        let mut seen = watch.activity();
        loop {
            tokio::select! {
                served = conn.as_mut() => return served,
                () = tokio::time::sleep(QUIET_BEFORE_CLOSE) => {
                    if watch.idle_since(seen) {
                        return Ok(());
                    }
                    seen = watch.activity();
                }
            }
        }
    }
}

impl<P: ProxyHttp> Service for HttpProxy<P> {
    fn serve_connection(
        self: Arc<Self>,
        stream: DownstreamStream,
        downstream: Arc<DownstreamDigest>,
        mut shutdown: ShutdownSignal,
    ) -> BoxFuture {
        Box::pin(async move {
            let _ = stream.tcp().set_nodelay(true);
            let h2 = match &downstream.tls {
                // Over TLS, ALPN has settled it.
                Some(tls) => tls.alpn.as_deref() == Some(b"h2"),
                None => {
                    let head_timeout = self
                        .config
                        .keepalive_timeout
                        .min(self.config.client_read_timeout);
                    match first_bytes(stream.tcp(), &mut shutdown, head_timeout).await {
                        Some(h2) => h2,
                        None => return,
                    }
                }
            };
            // Only writes are timed on the socket (a client that stops reading its
            // response): hyper keeps a read pending for the whole life of a connection, so a
            // socket read timeout would cut long responses. Reads are timed per request head
            // and per body frame.
            let mut io = TimeoutStream::new(stream);
            io.set_write_timeout(Some(self.config.client_write_timeout));
            let served = if h2 {
                self.serve_h2(io, &downstream, &mut shutdown).await
            } else {
                self.serve_http1(io, &downstream, &mut shutdown)
                    .await
                    .map_err(Into::into)
            };
            if let Err(error) = served {
                let client = downstream.client_addr;
                tracing::debug!(%client, %error, "downstream connection ended");
            }
        })
    }

    fn background(&self) -> Vec<Box<dyn BackgroundService>> {
        vec![Box::new(PoolEvictor(self.proxy.pool().clone()))]
    }

    fn stopped(&self) {
        // Every request that ended in time has its line written before the stop is reported.
        if let Some(log) = &self.proxy.config().access_log {
            if !log.flush_within(crate::access_log::FLUSH_LIMIT) {
                tracing::warn!(
                    "access log lines still unwritten after {:?}; stopping anyway",
                    crate::access_log::FLUSH_LIMIT
                );
            }
        }
    }
}

/// `make()`'s value, made in place in a new box: `Box::new(value)` makes it first and copies
/// it in, which for a future of kilobytes costs more than the allocation.
#[inline(always)]
fn made_in_box<T>(make: impl FnOnce() -> T) -> Box<T> {
    let mut slot = Box::new_uninit();
    slot.write(make());
    // SAFETY: written in full just above (`Box::write` says so safely, from Rust 1.87).
    unsafe { slot.assume_init() }
}

/// Whether a new connection's first bytes may be the HTTP/2 preface (h2c with prior
/// knowledge): `None` if shutdown began and the client sent nothing soon after. Peeked, not
/// read, so an HTTP/1 connection reaches hyper untouched. True also on EOF or an error, which
/// the auto builder then reports as it always has.
async fn first_bytes(
    stream: &TcpStream,
    shutdown: &mut ShutdownSignal,
    within: Duration,
) -> Option<bool> {
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // Three bytes tell "PRI" from "POST", "PUT" and "PATCH".
    const DECIDES: usize = 3;
    let peek = async {
        let mut first = [0; H2_PREFACE.len()];
        loop {
            match stream.peek(&mut first).await {
                Ok(n) if n < DECIDES && n > 0 && H2_PREFACE.starts_with(&first[..n]) => {
                    // A first segment too short to tell (rare, or sent so on purpose): peek
                    // returns at once while bytes wait, so look again a little later.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(n) => return H2_PREFACE.starts_with(&first[..n]),
                Err(_) => return true,
            }
        }
    };
    // A client that connects and sends nothing is held no longer than one that stops
    // mid-head.
    let peek = tokio::time::timeout(within, peek);
    tokio::pin!(peek);
    tokio::select! {
        h2 = peek.as_mut() => return h2.ok(),
        () = shutdown.begun() => {}
    }
    // Accepted just before shutdown (or drained from the accept queue after it): a request
    // may be on its way.
    tokio::time::timeout(QUIET_BEFORE_CLOSE, peek)
        .await
        .ok()
        .and_then(Result::ok)
}

/// Closes expired idle upstream connections now and then, so an unused peer's connections
/// do not linger until the peer closes them.
struct PoolEvictor(Arc<ConnectionPool>);

/// How often the evictor looks.
const EVICT_EVERY: Duration = Duration::from_secs(5);

impl BackgroundService for PoolEvictor {
    fn name(&self) -> &'static str {
        "upstream pool evictor"
    }

    fn run(self: Box<Self>, mut shutdown: ShutdownSignal) -> BoxFuture {
        Box::pin(async move {
            let mut tick = tokio::time::interval(EVICT_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => self.0.evict_expired(),
                    () = shutdown.begun() => return,
                }
            }
        })
    }
}
