//! The downstream server: its own tokio runtime, one listener, HTTP/1.1 and h2c (prior
//! knowledge) on the same port, graceful shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_io_timeout::TimeoutStream;

use crate::access_log::AccessLog;
use crate::phase::ProxyHttp;
use crate::proxy::ProxyService;
use crate::upstream::{ConnectionPool, PoolConfig, UpstreamClient};

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: String,
    /// Runtime worker threads; 0 means one per CPU.
    pub threads: usize,
    /// How long in-flight requests may run on after shutdown begins.
    pub grace_period: Duration,
    /// Longest wait for a client to send its request head, or more of its request body.
    pub client_read_timeout: Duration,
    /// Longest a write to a client may stall.
    pub client_write_timeout: Duration,
    /// How long an idle HTTP/1.1 keep-alive connection waits for its next request (capped
    /// by client_read_timeout: hyper times the idle wait and the head together).
    pub keepalive_timeout: Duration,
    pub pool: PoolConfig,
    /// Where a line per request goes; `None` for no access log.
    pub access_log: Option<Arc<AccessLog>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            threads: 0,
            grace_period: Duration::from_secs(5),
            client_read_timeout: Duration::from_secs(60),
            client_write_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(75),
            pool: PoolConfig::default(),
            access_log: None,
        }
    }
}

pub struct Server<P: ProxyHttp> {
    config: ServerConfig,
    proxy: Arc<P>,
    on_stopped: Option<Box<dyn FnOnce() + Send>>,
}

/// A running server. Dropping it stops the runtime at once; call [`ServerHandle::shutdown`]
/// and [`ServerHandle::wait`] for a graceful stop.
pub struct ServerHandle {
    engine: Option<Engine>,
    addr: SocketAddr,
    shutdown: watch::Sender<Option<Duration>>,
    stopped: watch::Receiver<bool>,
}

impl<P: ProxyHttp> Server<P> {
    pub fn new(config: ServerConfig, proxy: P) -> Self {
        Server {
            config,
            proxy: Arc::new(proxy),
            on_stopped: None,
        }
    }

    /// Called on a runtime thread once the server has fully stopped.
    pub fn on_stopped(mut self, callback: impl FnOnce() + Send + 'static) -> Self {
        self.on_stopped = Some(Box::new(callback));
        self
    }

    /// Bind the listener and start serving on a new runtime. Bind errors name the address.
    pub fn start(self) -> std::io::Result<ServerHandle> {
        let config = self.config;
        let std_listener = std::net::TcpListener::bind(&config.listen).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen))
        })?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let threads = match config.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let engine = Engine::start(threads)?;
        let (shutdown_tx, shutdown_rx) = watch::channel(None);
        let (stopped_tx, stopped_rx) = watch::channel(false);
        let pool = Arc::new(ConnectionPool::new(config.pool));
        let service = Arc::new(ProxyService::new(
            self.proxy,
            UpstreamClient::new(pool.clone()),
            config.access_log.clone(),
            config.client_read_timeout,
        ));
        let on_stopped = self.on_stopped;
        engine.handle().spawn(async move {
            // Reports the stop however this task ends, panics included.
            let _stopped = StopReport {
                stopped: stopped_tx,
                callback: on_stopped,
            };
            let listener = match TcpListener::from_std(std_listener) {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::error!(%error, "cannot register the listener");
                    return;
                }
            };
            let evictor = tokio::spawn(evict_idle(pool));
            accept_loop(listener, service, &config, shutdown_rx).await;
            evictor.abort();
            if let Some(log) = config.access_log.clone() {
                // The lines of every request that ended in time are written before the stop
                // is reported.
                let _ = tokio::task::spawn_blocking(move || log.flush()).await;
            }
        });
        tracing::debug!("ferroxy listening on http://{addr} ({threads} threads)");
        Ok(ServerHandle {
            engine: Some(engine),
            addr,
            shutdown: shutdown_tx,
            stopped: stopped_rx,
        })
    }
}

struct StopReport {
    stopped: watch::Sender<bool>,
    callback: Option<Box<dyn FnOnce() + Send>>,
}

impl Drop for StopReport {
    fn drop(&mut self) {
        let _ = self.stopped.send(true);
        if let Some(callback) = self.callback.take() {
            callback();
        }
    }
}

impl ServerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting now; in-flight requests get `grace` (the configured grace period when
    /// `None`) to finish. Safe to call from any thread, more than once.
    pub fn shutdown(&self, grace: Option<Duration>) {
        let grace = grace.unwrap_or(Duration::MAX);
        self.shutdown.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(grace);
            true
        });
    }

    pub fn is_stopped(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Block the calling (non-runtime) thread until the server has stopped.
    pub fn wait(&mut self) {
        let mut stopped = self.stopped.clone();
        // A watch channel needs no driver: a bare current-thread runtime can wait on it.
        if let Ok(waiter) = tokio::runtime::Builder::new_current_thread().build() {
            waiter.block_on(async move {
                let _ = stopped.wait_for(|s| *s).await;
            });
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(engine) = self.engine.take() {
            engine.stop();
        }
    }
}

/// The runtime the server runs on. One worker gets a current-thread runtime on a thread of
/// its own: with nothing to steal work from, the multi-thread scheduler's stealing and
/// cross-thread wake-ups are pure cost. More workers get tokio's multi-thread runtime.
enum Engine {
    MultiThread(tokio::runtime::Runtime),
    CurrentThread {
        handle: tokio::runtime::Handle,
        stop: tokio::sync::oneshot::Sender<()>,
    },
}

impl Engine {
    fn start(threads: usize) -> std::io::Result<Self> {
        if threads > 1 {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("ferroxy-worker")
                .enable_all()
                .build()?;
            return Ok(Engine::MultiThread(runtime));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("ferroxy-worker".into())
            .spawn(move || {
                // Runs every task spawned through `handle` until told to stop; dropping the
                // runtime at the end drops what is left, closing its sockets.
                runtime.block_on(async move {
                    let _ = stopped.await;
                });
            })?;
        Ok(Engine::CurrentThread { handle, stop })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        match self {
            Engine::MultiThread(runtime) => runtime.handle(),
            Engine::CurrentThread { handle, .. } => handle,
        }
    }

    /// Stop at once without waiting for the tasks (they are dropped on the runtime's threads).
    fn stop(self) {
        match self {
            Engine::MultiThread(runtime) => runtime.shutdown_background(),
            Engine::CurrentThread { stop, .. } => {
                let _ = stop.send(());
            }
        }
    }
}

async fn accept_loop<P: ProxyHttp>(
    listener: TcpListener,
    service: Arc<ProxyService<P>>,
    config: &ServerConfig,
    mut shutdown: watch::Receiver<Option<Duration>>,
) {
    let builder = Arc::new(http_builder(config));
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client_addr)) => {
                    spawn_connection(stream, client_addr, service.clone(), builder.clone(), config, graceful.watcher());
                }
                Err(error) => {
                    // Typically EMFILE: back off instead of spinning on the error.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
    // Closing the listener makes new connections fail at once instead of queueing.
    drop(listener);
    let grace = shutdown.borrow().unwrap_or_default();
    let grace = if grace == Duration::MAX {
        config.grace_period
    } else {
        grace
    };
    tracing::info!(
        "shutting down: waiting up to {:.1}s for in-flight requests",
        grace.as_secs_f64()
    );
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections finished"),
        _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

fn http_builder(config: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        // hyper starts this timer whenever it waits for a request head, idle time included:
        // it is both the keep-alive timeout and the head's read timeout. (No pipeline_flush: with unparsed bytes still buffered
        // it holds back hyper's automatic 400 for a malformed request, which then never
        // reaches the client.)
        .header_read_timeout(config.keepalive_timeout.min(config.client_read_timeout));
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Serve one downstream connection on its own task, watched for graceful shutdown.
fn spawn_connection<P: ProxyHttp>(
    stream: TcpStream,
    client_addr: SocketAddr,
    service: Arc<ProxyService<P>>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    config: &ServerConfig,
    watcher: Watcher,
) {
    let _ = stream.set_nodelay(true);
    // Only writes are timed on the socket (a client that stops reading its response): hyper
    // keeps a read pending for the whole life of a connection, so a socket read timeout
    // would cut long responses. Reads are timed per request head and per body frame.
    let mut io = TimeoutStream::new(stream);
    io.set_write_timeout(Some(config.client_write_timeout));
    let handler = service_fn(move |req| {
        let service = service.clone();
        async move { Ok::<_, Infallible>(service.handle(req, client_addr).await) }
    });
    tokio::spawn(async move {
        let conn = builder.serve_connection(TokioIo::new(Box::pin(io)), handler);
        if let Err(error) = watcher.watch(conn).await {
            tracing::debug!(client = %client_addr, %error, "downstream connection ended");
        }
    });
}

/// Close expired idle upstream connections now and then, so an unused peer's connections
/// do not linger until the peer closes them.
async fn evict_idle(pool: Arc<ConnectionPool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        pool.evict_expired();
    }
}
