//! The HTTP proxy service: HTTP/1.1 and h2c (prior knowledge) on the same port, each request
//! run through a [`ProxyService`].

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_io_timeout::TimeoutStream;

use crate::body::ProxyBody;
use crate::digest::DownstreamDigest;
use crate::error::ErrorSide;
use crate::phase::ProxyHttp;
use crate::proxy::ProxyService;
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
}

pub struct HttpProxy<P: ProxyHttp> {
    proxy: ProxyService<P>,
    builder: auto::Builder<TokioExecutor>,
    config: HttpConfig,
}

impl<P: ProxyHttp> HttpProxy<P> {
    pub fn new(proxy: ProxyService<P>, config: HttpConfig) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .keep_alive(true)
            // hyper starts this timer whenever it waits for a request head, idle time
            // included: it is both the keep-alive timeout and the head's read timeout. No
            // pipeline_flush: with unparsed bytes still buffered it holds back hyper's
            // automatic 400 for a malformed request, which then never reaches the client.
            .header_read_timeout(config.keepalive_timeout.min(config.client_read_timeout));
        builder.http2().timer(TokioTimer::new());
        HttpProxy {
            proxy,
            builder,
            config,
        }
    }
}

impl<P: ProxyHttp> Service for HttpProxy<P> {
    fn serve_connection(
        self: Arc<Self>,
        stream: TcpStream,
        downstream: Arc<DownstreamDigest>,
        mut shutdown: ShutdownSignal,
    ) -> BoxFuture {
        Box::pin(async move {
            let _ = stream.set_nodelay(true);
            // Only writes are timed on the socket (a client that stops reading its
            // response): hyper keeps a read pending for the whole life of a connection, so a
            // socket read timeout would cut long responses. Reads are timed per request head
            // and per body frame.
            let mut io = TimeoutStream::new(stream);
            io.set_write_timeout(Some(self.config.client_write_timeout));
            let io = crate::flood::FloodGuard::new(io, downstream.client_addr);
            let watch = Arc::new(ConnectionWatch::default());
            let io = Watched {
                inner: Box::pin(io),
                watch: watch.clone(),
            };
            let client_addr = downstream.client_addr;
            let service = self.clone();
            let requests_watch = watch.clone();
            let handler = service_fn(move |req: http::Request<Incoming>| {
                let service = service.clone();
                let downstream = downstream.clone();
                let watch = requests_watch.clone();
                async move {
                    let version = req.version();
                    if version == http::Version::HTTP_2 {
                        watch.http2.store(true, Ordering::Relaxed);
                    }
                    let req = req.map(|body| {
                        ProxyBody::streamed(
                            body,
                            service.config.client_read_timeout,
                            ErrorSide::Client,
                        )
                    });
                    let mut response = service.proxy.handle(req, downstream).await;
                    if version != http::Version::HTTP_2 && watch.closing.load(Ordering::Relaxed) {
                        response
                            .headers_mut()
                            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let conn = self.builder.serve_connection(TokioIo::new(io), handler);
            tokio::pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                () = shutdown.begun() => {
                    // Lose no request. HTTP/2 gets GOAWAY at once (the client learns which
                    // streams were taken). HTTP/1 responses from now on say `Connection:
                    // close`, and hyper closes after them; hyper would also close a
                    // connection it thinks idle, a request whose head is still arriving
                    // included, so we ask it to only once the client's last bytes have been
                    // answered and nothing has moved for a while.
                    watch.closing.store(true, Ordering::Relaxed);
                    let mut idle = watch.http2.load(Ordering::Relaxed);
                    let mut served = None;
                    while !idle {
                        let seen = watch.io_events.load(Ordering::Relaxed);
                        tokio::select! {
                            done = conn.as_mut() => {
                                served = Some(done);
                                break;
                            }
                            () = tokio::time::sleep(QUIET_BEFORE_CLOSE) => {
                                idle = watch.io_events.load(Ordering::Relaxed) == seen
                                    && !watch.last_was_read.load(Ordering::Relaxed);
                            }
                        }
                    }
                    match served {
                        Some(served) => served,
                        None => {
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    }
                }
            };
            if let Err(error) = served {
                tracing::debug!(client = %client_addr, %error, "downstream connection ended");
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

/// How long a client connection whose last bytes were our answer must stay quiet, once
/// shutdown has begun, before it is closed as idle. A keep-alive client sends its next request
/// right after the last response: closing in that gap would lose the request.
const QUIET_BEFORE_CLOSE: Duration = Duration::from_millis(100);

/// What a client connection's requests and its shutdown share.
#[derive(Default)]
struct ConnectionWatch {
    /// Reads and writes that moved bytes: unchanged over a while means quiet.
    io_events: AtomicU64,
    /// The last bytes moved were the client's: a request is arriving or being answered.
    last_was_read: AtomicBool,
    /// Shutdown has begun: responses close the connection.
    closing: AtomicBool,
    http2: AtomicBool,
}

/// A client stream that counts its reads and writes into a [`ConnectionWatch`].
struct Watched<S> {
    inner: Pin<Box<S>>,
    watch: Arc<ConnectionWatch>,
}

impl<S> Watched<S> {
    fn moved(&self, bytes: usize, read: bool) {
        if bytes > 0 {
            self.watch.io_events.fetch_add(1, Ordering::Relaxed);
            self.watch.last_was_read.store(read, Ordering::Relaxed);
        }
    }
}

impl<S: AsyncRead> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = self.inner.as_mut().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.moved(buf.filled().len() - before, true);
        }
        polled
    }
}

impl<S: AsyncWrite> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = self.inner.as_mut().poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = polled {
            self.moved(n, false);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = self.inner.as_mut().poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            self.moved(n, false);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_shutdown(cx)
    }
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
