//! Runs one request through the phases of a [`ProxyHttp`] and streams the answer back.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::access_log::{AccessLog, AccessRecord, Arrival};
use crate::body::{BoxError, ProxyBody};
use crate::error::{Error, ErrorKind, Result};
use crate::forward;
use crate::phase::ProxyHttp;
use crate::response::Response;
use crate::session::Session;
use crate::upstream::{ConnectionPool, PooledConnection, UpstreamClient};

pub struct ProxyService<P: ProxyHttp> {
    proxy: Arc<P>,
    upstream: UpstreamClient,
    access_log: Option<Arc<AccessLog>>,
    /// Longest the client may pause while sending its request body.
    client_read_timeout: Duration,
}

impl<P: ProxyHttp> ProxyService<P> {
    pub fn new(
        proxy: Arc<P>,
        upstream: UpstreamClient,
        access_log: Option<Arc<AccessLog>>,
        client_read_timeout: Duration,
    ) -> Self {
        ProxyService {
            proxy,
            upstream,
            access_log,
            client_read_timeout,
        }
    }

    pub fn upstream(&self) -> &UpstreamClient {
        &self.upstream
    }

    pub async fn handle(
        &self,
        req: http::Request<Incoming>,
        client_addr: SocketAddr,
    ) -> http::Response<ResponseBody> {
        let session = Session::new(req, client_addr);
        let access = self.access_log.as_ref().map(|log| Access {
            log: log.clone(),
            arrival: Arrival::new(&session.req),
            upstream_time: None,
        });
        // If the client goes away mid-phase, hyper drops this future; the guard still runs
        // the access log and the `logging` phase.
        let mut request = InFlight {
            state: Some((session, self.proxy.new_ctx())),
            access,
            service: self,
        };
        let (session, ctx) = request
            .state
            .as_mut()
            .expect("state is taken only at the end");
        let (response, upstream, error) = match self.proxy_phases(session, ctx).await {
            Ok(Proxied::Upstream {
                head,
                body,
                conn,
                request_finished,
                upstream_time,
            }) => {
                if let Some(access) = request.access.as_mut() {
                    access.upstream_time = Some(upstream_time);
                }
                let body = ProxyBody::streamed(
                    body,
                    session.upstream_read_timeout(),
                    ErrorKind::ReadTimeout,
                );
                let pooled = PoolReturn {
                    conn,
                    pool: self.upstream.pool().clone(),
                    request_finished,
                };
                (http::Response::from_parts(head, body), Some(pooled), None)
            }
            Ok(Proxied::Local(response)) => (response.into_http(), None, None),
            Err(error) => {
                if error.kind != ErrorKind::HookError {
                    tracing::warn!(client = %client_addr, "{error}");
                }
                let page = match self.proxy.fail_to_proxy(session, &error, ctx).await {
                    Some(page) => page,
                    None => Response::error_page(&error),
                };
                (page.into_http(), None, Some(error))
            }
        };
        let (session, ctx) = request.state.take().expect("state is still here");
        let status = response.status().as_u16();
        let finish = self.finish(session, ctx, status, error, request.access.take());
        response.map(|body| ResponseBody {
            inner: body,
            upstream,
            finish: Some(finish),
            bytes: 0,
            error: None,
            ended: false,
        })
    }

    async fn proxy_phases(&self, session: &mut Session, ctx: &mut P::Ctx) -> Result<Proxied> {
        if session.req.method == http::Method::CONNECT {
            return Err(Error::new(
                ErrorKind::InvalidRequest,
                "CONNECT is not supported by a reverse proxy",
            )
            .with_status(405));
        }
        if let Some(response) = self.proxy.request_filter(session, ctx).await? {
            return Ok(Proxied::Local(response));
        }
        let peer = self.proxy.upstream_peer(session, ctx).await?;
        session.upstream = Some(peer.clone());
        let mut head =
            forward::upstream_request(&session.req, session.client_addr.ip(), session.scheme);
        self.proxy
            .upstream_request_filter(session, &mut head, ctx)
            .await?;
        let mut body = match session.take_body() {
            Some(incoming) => {
                ProxyBody::streamed(incoming, self.client_read_timeout, ErrorKind::ClientTimeout)
            }
            None => ProxyBody::empty(),
        };
        let request_finished = body.finished_flag();
        let request = http::Request::from_parts(head, body);
        let sent = Instant::now();
        let (mut response, body, conn) = self
            .upstream
            .send(&peer, request, &request_finished)
            .await?;
        let upstream_time = sent.elapsed();
        forward::response_headers(&mut response.headers);
        self.proxy
            .response_filter(session, &mut response, ctx)
            .await?;
        Ok(Proxied::Upstream {
            head: response,
            body,
            conn,
            request_finished,
            upstream_time,
        })
    }

    fn finish(
        &self,
        mut session: Session,
        mut ctx: P::Ctx,
        status: u16,
        error: Option<Error>,
        access: Option<Access>,
    ) -> Finish {
        let proxy = self.proxy.clone();
        Box::new(move |bytes, body_error| {
            let mut error = error.or(body_error);
            if let Some(error) = error.as_mut().filter(|e| e.peer.is_none()) {
                error.peer = session.upstream.clone();
            }
            if let Some(access) = &access {
                access.log_line(&session, status, bytes, error.as_ref());
            }
            proxy.logging(&mut session, error.as_ref(), &mut ctx);
        })
    }
}

enum Proxied {
    Upstream {
        head: http::response::Parts,
        body: Incoming,
        conn: PooledConnection,
        request_finished: Arc<AtomicBool>,
        upstream_time: Duration,
    },
    Local(Response),
}

/// A request between its arrival and its response: if dropped before that (the client went
/// away), it still logs, as a 499.
struct InFlight<'a, P: ProxyHttp> {
    state: Option<(Session, P::Ctx)>,
    access: Option<Access>,
    service: &'a ProxyService<P>,
}

impl<P: ProxyHttp> Drop for InFlight<'_, P> {
    fn drop(&mut self) {
        if let Some((session, ctx)) = self.state.take() {
            let error = Error::new(
                ErrorKind::DownstreamClosed,
                "client went away before the response",
            );
            let status = error.status;
            let finish = self
                .service
                .finish(session, ctx, status, Some(error), self.access.take());
            finish(0, None);
        }
    }
}

/// What happens once the response is over: the access log line and the `logging` phase.
type Finish = Box<dyn FnOnce(u64, Option<Error>) + Send>;

/// What a request's access-log line needs beyond the session.
struct Access {
    log: Arc<AccessLog>,
    arrival: Arrival,
    /// From sending the request upstream to its response head.
    upstream_time: Option<Duration>,
}

impl Access {
    fn log_line(&self, session: &Session, status: u16, bytes: u64, error: Option<&Error>) {
        let arrival = &self.arrival;
        self.log.log(&AccessRecord {
            time: arrival.time,
            client: session.client_addr,
            method: &arrival.method,
            uri: &arrival.uri,
            protocol: arrival.protocol,
            status,
            bytes,
            upstream: session.upstream.as_ref().map(|peer| peer.addr()),
            upstream_time: self.upstream_time,
            duration: session.started.elapsed(),
            request_id: arrival.request_id.as_ref().map(|v| v.as_bytes()),
            user_agent: arrival.user_agent.as_ref().map(|v| v.as_bytes()),
            referer: arrival.referer.as_ref().map(|v| v.as_bytes()),
            error: error.map(|e| e.kind.as_str()),
        });
    }
}

/// The upstream connection behind a response, and what decides whether it can be reused.
struct PoolReturn {
    conn: PooledConnection,
    pool: Arc<ConnectionPool>,
    /// The request body was sent to its end (an upstream may answer before reading it all).
    request_finished: Arc<AtomicBool>,
}

/// The body sent to the client. Counts bytes, hands the upstream connection back to the pool
/// when both the request and the response were complete (and closes it otherwise), and runs
/// the finish step exactly once, when hyper drops the body.
pub struct ResponseBody {
    inner: ProxyBody,
    upstream: Option<PoolReturn>,
    finish: Option<Finish>,
    bytes: u64,
    error: Option<Error>,
    ended: bool,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let mut error = Error::from_upstream(e.as_ref());
                error.message = format!("{} (while streaming the response body)", error.message);
                this.error = Some(error);
            }
            Poll::Ready(None) => this.ended = true,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        let complete = self.error.is_none() && (self.ended || self.inner.is_end_stream());
        if let Some(upstream) = self.upstream.take() {
            if complete && upstream.request_finished.load(Ordering::Acquire) {
                upstream.pool.put_back(upstream.conn);
            }
        }
        if self.error.is_none() && !complete {
            self.error = Some(Error::new(
                ErrorKind::DownstreamClosed,
                "client went away before the response was complete",
            ));
        }
        if let Some(finish) = self.finish.take() {
            finish(self.bytes, self.error.take());
        }
    }
}
