//! The HTTP proxy service: HTTP/1.1 and h2c (prior knowledge) on the same port, each request
//! run through a [`ProxyService`].

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
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
    /// `builder` for connections whose first bytes are not the HTTP/2 preface: it skips
    /// the auto builder's version read, whose 24 bytes, handed back to hyper as a read of
    /// their own, grow hyper's 8 KiB read buffer to 16 KiB on every connection.
    http1: auto::Builder<TokioExecutor>,
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
            http1: builder.clone().http1_only(),
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
            let builder = tokio::select! {
                h2 = may_be_h2(&stream) => if h2 { &self.builder } else { &self.http1 },
                () = shutdown.begun() => return,
            };
            // Only writes are timed on the socket (a client that stops reading its
            // response): hyper keeps a read pending for the whole life of a connection, so a
            // socket read timeout would cut long responses. Reads are timed per request head
            // and per body frame.
            let mut io = TimeoutStream::new(stream);
            io.set_write_timeout(Some(self.config.client_write_timeout));
            let client_addr = downstream.client_addr;
            let service = self.clone();
            let handler = service_fn(move |req: http::Request<Incoming>| {
                let service = service.clone();
                let downstream = downstream.clone();
                // Boxed: hyper keeps a slot the size of this future for the whole life of
                // a connection, idle or not (2.6 KB unboxed).
                let handling: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
                    let req = req.map(|body| {
                        ProxyBody::streamed(
                            body,
                            service.config.client_read_timeout,
                            ErrorSide::Client,
                        )
                    });
                    Ok::<_, Infallible>(service.proxy.handle(req, downstream).await)
                });
                handling
            });
            let conn = builder.serve_connection(TokioIo::new(Box::pin(io)), handler);
            tokio::pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                () = shutdown.begun() => {
                    // Finish the request in flight, take no more.
                    conn.as_mut().graceful_shutdown();
                    conn.await
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

/// Whether a new connection's first bytes may be the HTTP/2 preface (h2c with prior
/// knowledge): peeked, not read, so an HTTP/1 connection reaches hyper untouched. True also
/// on EOF or an error, which the auto builder then reports as it always has.
async fn may_be_h2(stream: &TcpStream) -> bool {
    const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let mut first = [0; H2_PREFACE.len()];
    match stream.peek(&mut first).await {
        Ok(n) => H2_PREFACE.starts_with(&first[..n]),
        Err(_) => true,
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
