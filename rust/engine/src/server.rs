//! The server: its own tokio runtime, the listeners and the services that serve them, the
//! background services, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::access_log::AccessLog;
use crate::digest::DownstreamDigest;
use crate::http_service::{HttpConfig, HttpProxy};
use crate::listener::{DownstreamStream, Endpoint, Listener};
use crate::phase::ProxyHttp;
use crate::proxy::{ProxyConfig, ProxyService};
use crate::proxy_protocol::ProxyHeader;
use crate::rules::RulesHandle;
use crate::service::{BackgroundService, Service, ShutdownSignal};
use crate::tls::server::TlsSettings;
use crate::upstream::{ConnectionPool, PoolConfig, UpstreamClient};

/// Everything a proxy server is configured by. `Default` is the one place the engine's
/// defaults are stated; the Python layer reads them from here.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to accept connections, and which of them speak TLS; at least one.
    pub listeners: Vec<Endpoint>,
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
    /// How long a tunnel (a WebSocket, after its 101) may go without a byte either way.
    pub tunnel_idle_timeout: Duration,
    pub pool: PoolConfig,
    /// Where a line per request goes; `None` for no access log. (Open one with
    /// [`AccessLog::open`]; the Python layer's default is stdout in nginx's combined format.)
    pub access_log: Option<Arc<AccessLog>>,
    /// The declarative filters and routes the proxy runs between the phases. Keep a clone
    /// to reload them while the server runs ([`RulesHandle::store`]).
    pub rules: RulesHandle,
    /// Compress upstream responses for clients that accept it (see [`crate::compression`]).
    pub compression: Option<crate::compression::Compression>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listeners: vec![Listener::Addr("127.0.0.1:8080".into()).into()],
            threads: 0,
            grace_period: Duration::from_secs(5),
            client_read_timeout: Duration::from_secs(60),
            client_write_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(75),
            // nginx's 60 s (proxy_read_timeout) cuts WebSockets whose clients ping less
            // often; HAProxy's advice for `timeout tunnel` is an hour.
            tunnel_idle_timeout: Duration::from_secs(300),
            pool: PoolConfig::default(),
            access_log: None,
            rules: RulesHandle::default(),
            compression: None,
        }
    }
}

pub struct Server {
    threads: usize,
    grace_period: Duration,
    services: Vec<(Vec<Endpoint>, Arc<dyn Service>)>,
    background: Vec<Box<dyn BackgroundService>>,
    on_stopped: Option<Box<dyn FnOnce() + Send>>,
}

/// A running server. Dropping it stops the runtime at once; call [`ServerHandle::shutdown`]
/// and [`ServerHandle::wait`] for a graceful stop.
pub struct ServerHandle {
    engine: Option<Engine>,
    addrs: Vec<SocketAddr>,
    grace_period: Duration,
    shutdown: watch::Sender<Option<Duration>>,
    stopped: watch::Receiver<bool>,
    /// For background services started while the server runs.
    background_signal: ShutdownSignal,
}

impl Server {
    /// A server with no services yet, on `threads` workers (0: one per CPU).
    pub fn new(threads: usize, grace_period: Duration) -> Self {
        Server {
            threads,
            grace_period,
            services: Vec::new(),
            background: Vec::new(),
            on_stopped: None,
        }
    }

    /// A server running `proxy` as configured: the HTTP proxy service on the configured
    /// listeners, with its upstream pool.
    pub fn proxy<P: ProxyHttp>(config: ServerConfig, proxy: P) -> Self {
        let pool = Arc::new(ConnectionPool::new(config.pool));
        let proxy = ProxyService::new(
            Arc::new(proxy),
            UpstreamClient::new(pool),
            ProxyConfig {
                access_log: config.access_log,
                rules: config.rules,
                compression: config.compression.map(Arc::new),
            },
        );
        let http = HttpProxy::new(
            proxy,
            HttpConfig {
                client_read_timeout: config.client_read_timeout,
                client_write_timeout: config.client_write_timeout,
                keepalive_timeout: config.keepalive_timeout,
                tunnel_idle_timeout: config.tunnel_idle_timeout,
            },
        );
        let mut server = Server::new(config.threads, config.grace_period);
        server.add_service(config.listeners, Arc::new(http));
        server
    }

    /// Serve `listeners` with `service`, and run its background work.
    pub fn add_service(&mut self, listeners: Vec<Endpoint>, service: Arc<dyn Service>) {
        self.background.extend(service.background());
        self.services.push((listeners, service));
    }

    pub fn add_background(&mut self, service: Box<dyn BackgroundService>) {
        self.background.push(service);
    }

    /// Called on a runtime thread once the server has fully stopped.
    pub fn on_stopped(mut self, callback: impl FnOnce() + Send + 'static) -> Self {
        self.on_stopped = Some(Box::new(callback));
        self
    }

    /// Open every listener and start serving on a new runtime. Errors name the listener.
    pub fn start(self) -> std::io::Result<ServerHandle> {
        let mut bound = Vec::new();
        for (listeners, service) in &self.services {
            if listeners.is_empty() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a service needs at least one listener",
                ));
            }
            for endpoint in listeners {
                bound.push((endpoint.listener.open()?, endpoint.clone(), service.clone()));
            }
        }
        let addrs = bound
            .iter()
            .map(|(l, _, _)| l.local_addr())
            .collect::<std::io::Result<Vec<_>>>()?;
        let threads = match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let engine = Engine::start(threads)?;
        let (shutdown_tx, shutdown_rx) = watch::channel(None);
        let (stopped_tx, stopped_rx) = watch::channel(false);
        let on_stopped = self.on_stopped;
        let background = self.background;
        let services = self.services;
        let (begin_shutdown, signal) = ShutdownSignal::new();
        let background_signal = signal.clone();
        engine.handle().spawn(async move {
            // Reports the stop however this task ends, panics included.
            let _stopped = StopReport {
                stopped: stopped_tx,
                callback: on_stopped,
            };
            let services: Vec<Arc<dyn Service>> = services.iter().map(|(_, s)| s.clone()).collect();
            run(bound, background, shutdown_rx, begin_shutdown, signal).await;
            for service in services {
                let _ = tokio::task::spawn_blocking(move || service.stopped()).await;
            }
        });
        tracing::debug!("ferroxy listening on {addrs:?} ({threads} threads)");
        Ok(ServerHandle {
            engine: Some(engine),
            addrs,
            grace_period: self.grace_period,
            shutdown: shutdown_tx,
            stopped: stopped_rx,
            background_signal,
        })
    }
}

/// An opened listener, what it expects before its service (TLS, PROXY protocol), and the service its connections go to.
type Bound = (std::net::TcpListener, Endpoint, Arc<dyn Service>);

/// Serve until shutdown is asked for, then give in-flight connections the grace period.
async fn run(
    bound: Vec<Bound>,
    background: Vec<Box<dyn BackgroundService>>,
    mut shutdown: watch::Receiver<Option<Duration>>,
    begin_shutdown: watch::Sender<bool>,
    signal: ShutdownSignal,
) {
    // Each task ends once shutdown has begun and its work is done: an accept loop when its
    // connections have finished, a background service when it has stopped.
    let mut tasks = tokio::task::JoinSet::new();
    for service in background {
        tracing::debug!("starting {}", service.name());
        tasks.spawn(service.run(signal.clone()));
    }
    for (listener, endpoint, service) in bound {
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%error, "cannot register a listener");
                return;
            }
        };
        tasks.spawn(accept_loop(listener, endpoint, service, signal.clone()));
    }
    let grace = loop {
        if let Some(grace) = *shutdown.borrow_and_update() {
            break grace;
        }
        if shutdown.changed().await.is_err() {
            // The handle is gone: stop at once.
            break Duration::ZERO;
        }
    };
    let _ = begin_shutdown.send(true);
    tracing::info!(
        "shutting down: waiting up to {:.1}s for in-flight requests",
        grace.as_secs_f64()
    );
    let finished = async { while tasks.join_next().await.is_some() {} };
    tokio::select! {
        () = finished => tracing::info!("all connections finished"),
        () = tokio::time::sleep(grace) => {
            tracing::warn!("grace period over; closing remaining connections");
            // An accept loop's connections are tasks of its own JoinSet: aborting the loop
            // drops the set, which aborts them, closing their sockets.
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }
}

/// Accept connections until shutdown begins, then wait for the ones being served. Dropping
/// this future aborts them.
async fn accept_loop(
    listener: TcpListener,
    endpoint: Endpoint,
    service: Arc<dyn Service>,
    mut shutdown: ShutdownSignal,
) {
    let Ok(local_addr) = listener.local_addr() else {
        return;
    };
    let mut connections = tokio::task::JoinSet::new();
    let connection_shutdown = shutdown.clone();
    let endpoint = Arc::new(endpoint);
    let serve = |connections: &mut tokio::task::JoinSet<()>, stream, client_addr| {
        let downstream = DownstreamDigest::tcp(client_addr, local_addr);
        let service = service.clone();
        let shutdown = connection_shutdown.clone();
        if endpoint.tls.is_none()
            && !endpoint.proxy_protocol
            && endpoint.connection_filter.is_none()
        {
            let stream = DownstreamStream::Tcp(stream);
            connections.spawn(service.serve_connection(stream, Arc::new(downstream), shutdown));
            return;
        }
        // What comes before HTTP runs on the connection's own task: a slow client holds up
        // no other.
        connections.spawn(prelude(
            endpoint.clone(),
            stream,
            downstream,
            service,
            shutdown,
        ));
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, client_addr)) => serve(&mut connections, stream, client_addr),
                Err(error) => {
                    // Typically EMFILE: back off instead of spinning on the error.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            // Reap finished connections as they end, so the set holds only live ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = shutdown.begun() => break,
        }
    }
    // Connections the kernel has already accepted for us may carry a request: closing the
    // listener would reset them. Take them all (they are served as closing, see the service),
    // asking the socket itself rather than tokio, whose readiness may not have seen the
    // latest; then close it, so that new ones fail at once instead of queueing.
    if let Ok(listener) = listener.into_std() {
        while let Ok((stream, client_addr)) = listener.accept() {
            let stream = stream
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(stream));
            if let Ok(stream) = stream {
                serve(&mut connections, stream, client_addr);
            }
        }
    }
    while connections.join_next().await.is_some() {}
}

/// A connection's steps before its service: the PROXY protocol header, the connection
/// filter, then the TLS handshake, each logged (at info, as nginx logs failed handshakes) and
/// closing the connection when it fails.
async fn prelude(
    endpoint: Arc<Endpoint>,
    stream: tokio::net::TcpStream,
    downstream: DownstreamDigest,
    service: Arc<dyn Service>,
    shutdown: ShutdownSignal,
) {
    // A client still in its handshake when shutdown begins (a balancer's TCP probe that
    // sends nothing) would otherwise hold the stop for the whole grace period.
    let mut stopping = shutdown.clone();
    // Boxed: the handshake's future (rustls's connection state among it) would otherwise be
    // part of this one, which lives as long as the connection, idle or not.
    let prepared = Box::pin(prepare(&endpoint, stream, downstream));
    tokio::select! {
        prepared = prepared => {
            if let Some((stream, downstream)) = prepared {
                service
                    .serve_connection(stream, Arc::new(downstream), shutdown)
                    .await;
            }
        }
        // A handshake already under way gets a moment to finish: its request is served as
        // closing, as a plain connection's would be.
        () = async {
            stopping.begun().await;
            tokio::time::sleep(HANDSHAKE_AFTER_SHUTDOWN).await;
        } => {}
    }
}

/// How long a connection still before its service when shutdown begins may take to get there.
const HANDSHAKE_AFTER_SHUTDOWN: Duration = Duration::from_secs(1);

/// The PROXY protocol header, the connection filter and the TLS handshake; None when one
/// failed or refused (logged).
async fn prepare(
    endpoint: &Endpoint,
    mut stream: tokio::net::TcpStream,
    mut downstream: DownstreamDigest,
) -> Option<(DownstreamStream, DownstreamDigest)> {
    // The steps before HTTP share the handshake's bound: a client (or a filter) that takes
    // longer is not served.
    let within = endpoint
        .tls
        .as_ref()
        .map_or(TlsSettings::DEFAULT_HANDSHAKE_TIMEOUT, |tls| {
            tls.settings().handshake_timeout
        });
    if endpoint.proxy_protocol {
        match crate::proxy_protocol::read_header(&mut stream, within).await {
            Ok(ProxyHeader::Proxied { source, .. }) => downstream.client_addr = source,
            Ok(ProxyHeader::Local) => {}
            Err(error) => {
                let client = downstream.client_addr;
                tracing::info!(%client, listener = %endpoint.listener, "{error}; connection closed");
                return None;
            }
        }
    }
    if let Some(filter) = &endpoint.connection_filter {
        // After the PROXY header: the filter judges the client, not the balancer.
        let client = downstream.client_addr;
        match tokio::time::timeout(within, filter.should_accept(client)).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::info!(%client, listener = %endpoint.listener, "connection refused by the connection filter");
                return None;
            }
            Err(_) => {
                tracing::warn!(%client, listener = %endpoint.listener, "the connection filter did not answer within {:.1}s; connection refused", within.as_secs_f64());
                return None;
            }
        }
    }
    let stream = match &endpoint.tls {
        None => DownstreamStream::Tcp(stream),
        Some(tls) => match tls.accept(stream).await {
            Ok((stream, digest)) => {
                downstream.scheme = crate::digest::Scheme::Https;
                downstream.tls = Some(digest);
                DownstreamStream::Tls(Box::new(stream))
            }
            Err(error) => {
                tracing::info!(client = %downstream.client_addr, "{error}");
                return None;
            }
        },
    };
    Some((stream, downstream))
}

/// Stops a background service started on a running server
/// ([`ServerHandle::add_background`]) when dropped: aborted at its next wait, which for a
/// health check or a DNS refresh loses nothing but the round in progress.
#[must_use = "dropping it stops the service"]
pub struct BackgroundStop(Option<tokio::task::AbortHandle>);

impl Drop for BackgroundStop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
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
    /// The first listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Every listener's address, in the order configured.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// Stop accepting now; in-flight requests get `grace` (the configured grace period when
    /// `None`) to finish. Safe to call from any thread, more than once: the first call wins.
    pub fn shutdown(&self, grace: Option<Duration>) {
        let grace = grace.unwrap_or(self.grace_period);
        self.shutdown.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(grace);
            true
        });
    }

    /// Start `service` on the running server (for a balancer that a reload of the routes
    /// brought in): it runs until shutdown begins, as those given before the start do, but
    /// the grace period does not wait for it; or until the returned handle is dropped (a
    /// later reload no longer uses the balancer).
    pub fn add_background(&self, service: Box<dyn BackgroundService>) -> BackgroundStop {
        let Some(engine) = &self.engine else {
            return BackgroundStop(None);
        };
        tracing::debug!("starting {}", service.name());
        let task = engine
            .handle()
            .spawn(service.run(self.background_signal.clone()));
        BackgroundStop(Some(task.abort_handle()))
    }

    pub fn is_stopped(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Block the calling (non-runtime) thread until the server has stopped.
    pub fn wait(&mut self) -> std::io::Result<()> {
        let mut stopped = self.stopped.clone();
        // A watch channel needs no driver: a bare current-thread runtime can wait on it.
        let waiter = tokio::runtime::Builder::new_current_thread().build()?;
        waiter.block_on(async move {
            let _ = stopped.wait_for(|s| *s).await;
        });
        Ok(())
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
