//! Body types: what the proxy streams in each direction without buffering.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::error::{BodyError, BodyFailure, ErrorSide};
use std::future::Future;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A body the proxy sends: one streamed from the other side, or one it made itself.
pub struct ProxyBody {
    source: Source,
    /// Whose stream this is, for blaming its failures.
    side: ErrorSide,
    idle: Option<IdleTimer>,
    /// Set once the body has been read to its end.
    finished: Option<Arc<AtomicBool>>,
}

enum Source {
    Streamed(Incoming),
    Full(Option<Bytes>),
}

impl ProxyBody {
    pub fn full(bytes: Bytes) -> Self {
        let bytes = if bytes.is_empty() { None } else { Some(bytes) };
        ProxyBody {
            source: Source::Full(bytes),
            side: ErrorSide::Proxy,
            idle: None,
            finished: None,
        }
    }

    pub fn empty() -> Self {
        ProxyBody::full(Bytes::new())
    }

    /// Stream `incoming` from `side`, failing with a [`BodyError`] when the sender goes quiet
    /// for `idle` (nginx's client_body_timeout / proxy_read_timeout: between two reads, not
    /// overall) or its stream fails.
    pub fn streamed(incoming: Incoming, idle: Duration, side: ErrorSide) -> Self {
        let idle = (!idle.is_zero()).then(|| IdleTimer::new(idle));
        ProxyBody {
            source: Source::Streamed(incoming),
            side,
            idle,
            finished: None,
        }
    }

    /// Tells, later, whether this body has been read to its end. An empty body is finished
    /// already and needs no shared flag.
    pub fn progress(&mut self) -> BodyProgress {
        if self.is_end_stream() {
            return BodyProgress(None);
        }
        let flag = Arc::new(AtomicBool::new(false));
        self.finished = Some(flag.clone());
        BodyProgress(Some(flag))
    }

    fn mark_finished(&self) {
        if let Some(flag) = &self.finished {
            flag.store(true, Ordering::Release);
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let side = this.side;
        let polled = match &mut this.source {
            Source::Streamed(incoming) => Pin::new(incoming).poll_frame(cx).map_err(|e| {
                BoxError::from(BodyError {
                    side,
                    reason: BodyFailure::Stream(Box::new(e)),
                })
            }),
            Source::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        };
        match &polled {
            Poll::Pending => {
                if let Some(idle) = &mut this.idle {
                    if idle.poll_expired(cx) {
                        let timeout = BodyError {
                            side,
                            reason: BodyFailure::Idle(idle.timeout),
                        };
                        return Poll::Ready(Some(Err(Box::new(timeout))));
                    }
                }
            }
            Poll::Ready(Some(Ok(_))) => {
                if let Some(idle) = &mut this.idle {
                    idle.activity();
                }
                if this.is_end_stream() {
                    this.mark_finished();
                }
            }
            Poll::Ready(None) => this.mark_finished(),
            Poll::Ready(Some(Err(_))) => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Streamed(incoming) => incoming.is_end_stream(),
            Source::Full(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Streamed(incoming) => incoming.size_hint(),
            Source::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

/// Whether a body handed to hyper has been read to its end (a request body: the upstream
/// may answer before reading it all, and then its connection cannot be reused).
#[derive(Clone, Debug)]
pub struct BodyProgress(Option<Arc<AtomicBool>>);

impl BodyProgress {
    pub fn is_finished(&self) -> bool {
        self.0.as_ref().is_none_or(|f| f.load(Ordering::Acquire))
    }
}

/// Fires when no frame has arrived for `timeout`. Activity only moves a deadline; the timer
/// itself is re-armed lazily when it goes off early, so a busy stream costs no timer work.
struct IdleTimer {
    timeout: Duration,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    fn new(timeout: Duration) -> Self {
        IdleTimer {
            timeout,
            deadline: Instant::now() + timeout,
            sleep: None,
        }
    }

    fn activity(&mut self) {
        self.deadline = Instant::now() + self.timeout;
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = self.deadline;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.deadline <= Instant::now() {
                return true;
            }
            // Activity since the timer was set: wait out the rest of the new deadline.
            sleep.as_mut().reset(self.deadline);
        }
    }
}
