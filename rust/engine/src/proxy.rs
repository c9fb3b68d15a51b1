//! Runs one request through the phases of a [`ProxyHttp`] and streams the answer back.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::body::ProxyBody;
use crate::error::{Error, ErrorKind, Result};
use crate::forward;
use crate::phase::ProxyHttp;
use crate::response::Response;
use crate::session::Session;
use crate::upstream::{PooledConnection, UpstreamClient};

pub struct ProxyService<P: ProxyHttp> {
    proxy: Arc<P>,
    upstream: UpstreamClient,
    access_log: bool,
}

/// What happens once the response is over: the access log line and the `logging` phase.
type Finish = Box<dyn FnOnce(u64, Option<Error>) + Send>;

impl<P: ProxyHttp> ProxyService<P> {
    pub fn new(proxy: Arc<P>, upstream: UpstreamClient, access_log: bool) -> Self {
        ProxyService {
            proxy,
            upstream,
            access_log,
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
        let mut session = Session::new(req, client_addr);
        let mut ctx = self.proxy.new_ctx();
        let (response, upstream_body, error) = match self.proxy_phases(&mut session, &mut ctx).await
        {
            Ok(Proxied::Upstream(head, body, conn)) => (
                http::Response::from_parts(head, ProxyBody::Streamed(body)),
                Some(conn),
                None,
            ),
            Ok(Proxied::Local(response)) => (response.into_http(), None, None),
            Err(error) => {
                if error.kind != ErrorKind::HookError {
                    tracing::warn!(client = %client_addr, "{error}");
                }
                let page = match self
                    .proxy
                    .fail_to_proxy(&mut session, &error, &mut ctx)
                    .await
                {
                    Some(page) => page,
                    None => Response::error_page(&error),
                };
                (page.into_http(), None, Some(error))
            }
        };
        let status = response.status().as_u16();
        let finish = self.finish(session, ctx, status, error);
        response.map(|body| {
            ResponseBody::new(
                body,
                upstream_body.map(|c| (c, self.upstream.pool().clone())),
                finish,
            )
        })
    }

    async fn proxy_phases(&self, session: &mut Session, ctx: &mut P::Ctx) -> Result<Proxied> {
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
        let body = session
            .take_body()
            .map_or_else(ProxyBody::empty, ProxyBody::Streamed);
        let request = http::Request::from_parts(head, body);
        let (mut response, body, conn) = self.upstream.send(&peer, request).await?;
        forward::strip_hop_by_hop(&mut response.headers);
        self.proxy
            .response_filter(session, &mut response, ctx)
            .await?;
        Ok(Proxied::Upstream(response, body, conn))
    }

    fn finish(
        &self,
        mut session: Session,
        mut ctx: P::Ctx,
        status: u16,
        error: Option<Error>,
    ) -> Finish {
        let proxy = self.proxy.clone();
        let access_log = self.access_log;
        Box::new(move |bytes, body_error| {
            let mut error = error.or(body_error);
            if let Some(error) = error.as_mut().filter(|e| e.peer.is_none()) {
                error.peer = session.upstream.clone();
            }
            if access_log {
                log_access(&session, status, bytes, error.as_ref());
            }
            proxy.logging(&mut session, error.as_ref(), &mut ctx);
        })
    }
}

enum Proxied {
    Upstream(http::response::Parts, Incoming, PooledConnection),
    Local(Response),
}

fn log_access(session: &Session, status: u16, bytes: u64, error: Option<&Error>) {
    let req = &session.req;
    let upstream = session.upstream.as_ref().map_or("-", |p| p.addr());
    let path = req.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let elapsed = session.started.elapsed();
    let outcome = error.map_or("", |e| e.kind.as_str());
    tracing::info!(
        target: "ferroxy.access",
        "{} \"{} {} {:?}\" {} {} {} {:.3}ms {}",
        session.client_addr,
        req.method,
        path,
        req.version,
        status,
        bytes,
        upstream,
        elapsed.as_secs_f64() * 1000.0,
        outcome
    );
}

/// The body sent to the client. Counts bytes, hands the upstream connection back to the pool
/// when the upstream body was read to its end (and closes it otherwise), and runs the finish
/// step exactly once, when hyper drops the body.
pub struct ResponseBody {
    inner: ProxyBody,
    upstream: Option<(PooledConnection, Arc<crate::upstream::ConnectionPool>)>,
    finish: Option<Finish>,
    bytes: u64,
    error: Option<Error>,
    ended: bool,
}

impl ResponseBody {
    fn new(
        inner: ProxyBody,
        upstream: Option<(PooledConnection, Arc<crate::upstream::ConnectionPool>)>,
        finish: Finish,
    ) -> Self {
        ResponseBody {
            inner,
            upstream,
            finish: Some(finish),
            bytes: 0,
            error: None,
            ended: false,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(e))) => {
                let mut error = Error::from_upstream(e);
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
        if let Some((conn, pool)) = self.upstream.take() {
            if complete {
                pool.put_back(conn);
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
