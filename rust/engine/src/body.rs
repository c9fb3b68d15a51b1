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

/// Whether a response to `method` with `status` carries a body (RFC 9110 6.4.1): not one to
/// HEAD, nor a 1xx, 204 or 304.
pub fn response_has_body(method: &http::Method, status: http::StatusCode) -> bool {
    *method != http::Method::HEAD
        && !status.is_informational()
        && status != http::StatusCode::NO_CONTENT
        && status != http::StatusCode::NOT_MODIFIED
}

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
    /// Streamed with a limit (a `MaxBodySize` filter); boxed, as rare.
    Limited(Box<Limited>),
    Full(Option<Bytes>),
    /// Compressed on its way (a `Compression` setting); boxed, as rare.
    Coded(Box<Coded>),
    /// Through a body filter (see [`crate::body_filter`]); boxed, as rare.
    Filtered(Box<crate::body_filter::Filtered>),
}

/// A body passed through a decoder, an encoder, or both (see [`crate::compression::Plan`]).
/// Encoded output goes out once a frame's worth has gathered, when the source has nothing
/// more for now (flushed, so a slow stream is not held back), and at the end.
struct Coded {
    plain: Plain,
    /// None when not encoding, or once its last bytes have gone.
    encoder: Option<crate::compression::Encoder>,
    /// The coded stream has ended: only the trailers may be left.
    finished: bool,
}

/// The source as plain bytes: decoded when it came encoded.
struct Plain {
    inner: ProxyBody,
    decoder: Option<crate::compression::Decoder>,
    /// The source has sent its last frame.
    source_ended: bool,
    /// The source's trailers, sent after the coded body's last bytes.
    trailers: Option<http::HeaderMap>,
}

/// Encoded output gathered before it goes out as a frame of its own.
const CODED_FRAME: usize = 16 * 1024;

impl Plain {
    /// The next plain bytes; `None` at the end.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        use crate::compression::Decoded;
        loop {
            if let Some(decoder) = &mut self.decoder {
                match decoder.output()? {
                    Decoded::Bytes(bytes) => return Poll::Ready(Some(Ok(bytes))),
                    Decoded::Done if self.source_ended => return Poll::Ready(None),
                    // Until the source ends too: anything more from it is an error.
                    Decoded::Done => {}
                    Decoded::Hungry if self.source_ended => {
                        return Poll::Ready(Some(Err("the coded body is truncated".into())));
                    }
                    Decoded::Hungry => {}
                }
            } else if self.source_ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => match &mut self.decoder {
                        Some(decoder) => decoder.feed(data),
                        None => return Poll::Ready(Some(Ok(data))),
                    },
                    Err(frame) => {
                        self.trailers = frame.into_trailers().ok();
                        self.end_of_source();
                    }
                },
                Poll::Ready(None) => self.end_of_source(),
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn end_of_source(&mut self) {
        self.source_ended = true;
        if let Some(decoder) = &mut self.decoder {
            decoder.end();
        }
    }
}

impl Coded {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.finished {
            return Poll::Ready(self.plain.trailers.take().map(|t| Ok(Frame::trailers(t))));
        }
        let Some(encoder) = self.encoder.as_mut() else {
            return match self.plain.poll(cx) {
                Poll::Ready(Some(Ok(bytes))) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                Poll::Ready(None) => {
                    self.finished = true;
                    Poll::Ready(self.plain.trailers.take().map(|t| Ok(Frame::trailers(t))))
                }
                Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error))),
                Poll::Pending => Poll::Pending,
            };
        };
        loop {
            match self.plain.poll(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    encoder.write(&data)?;
                    if encoder.ready() >= CODED_FRAME {
                        return Poll::Ready(Some(Ok(Frame::data(encoder.take()))));
                    }
                }
                Poll::Ready(None) => {
                    self.finished = true;
                    let last = match self.encoder.take() {
                        Some(mut encoder) => encoder.finish()?,
                        None => Bytes::new(),
                    };
                    if !last.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(last))));
                    }
                    return Poll::Ready(self.plain.trailers.take().map(|t| Ok(Frame::trailers(t))));
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Pending => {
                    encoder.flush()?;
                    if encoder.ready() > 0 {
                        return Poll::Ready(Some(Ok(Frame::data(encoder.take()))));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

struct Limited {
    incoming: Incoming,
    max: u64,
    seen: u64,
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

    /// Allow at most `max` bytes: `false` when the body's known length is more already;
    /// otherwise a streamed body fails (a [`BodyFailure::TooLarge`]) once it crosses `max`.
    pub fn limit(&mut self, max: u64) -> bool {
        let hint = self.size_hint();
        if hint.lower() > max {
            return false;
        }
        if hint.upper().is_none_or(|upper| upper > max) {
            let placeholder = Source::Full(None);
            self.source = match std::mem::replace(&mut self.source, placeholder) {
                Source::Streamed(incoming) => Source::Limited(Box::new(Limited {
                    incoming,
                    max,
                    seen: 0,
                })),
                Source::Limited(mut limited) => {
                    limited.max = limited.max.min(max);
                    Source::Limited(limited)
                }
                // Made whole, or coded or filtered (a response, or past the limit's step).
                other @ (Source::Full(_) | Source::Coded(_) | Source::Filtered(_)) => other,
            };
        }
        true
    }

    /// This body, decoded and encoded on its way as `plan` says (as it is, for an empty one).
    pub fn coded(self, plan: crate::compression::Plan) -> Self {
        if plan.decode.is_none() && plan.encode.is_none() {
            return self;
        }
        ProxyBody {
            side: self.side,
            source: Source::Coded(Box::new(Coded {
                plain: Plain {
                    inner: self,
                    decoder: plan.decode,
                    source_ended: false,
                    trailers: None,
                },
                encoder: plan.encode,
                finished: false,
            })),
            idle: None,
            finished: None,
        }
    }

    /// This body through `filter`, chunk by chunk. Its length is unknown from here on.
    pub fn filtered(self, filter: std::sync::Arc<dyn crate::body_filter::BodyFilter>) -> Self {
        ProxyBody {
            side: self.side,
            source: Source::Filtered(Box::new(crate::body_filter::Filtered::new(self, filter))),
            idle: None,
            finished: None,
        }
    }

    /// The body's data frames, read to the end and joined; its trailers are dropped. For
    /// bodies kept whole: bounded by a length or a [`ProxyBody::limit`].
    pub async fn read_whole(mut self) -> crate::error::Result<Bytes> {
        let mut whole = bytes::BytesMut::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut self).poll_frame(cx)).await
        {
            let frame = frame.map_err(crate::error::Error::from_upstream)?;
            if let Ok(data) = frame.into_data() {
                whole.extend_from_slice(&data);
            }
        }
        Ok(whole.freeze())
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
        let stream_error = |e: hyper::Error| {
            BoxError::from(BodyError {
                side,
                reason: BodyFailure::Stream(Box::new(e)),
            })
        };
        let polled = match &mut this.source {
            Source::Streamed(incoming) => Pin::new(incoming).poll_frame(cx).map_err(stream_error),
            Source::Limited(limited) => {
                let polled = Pin::new(&mut limited.incoming).poll_frame(cx);
                if let Poll::Ready(Some(Ok(frame))) = &polled {
                    limited.seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if limited.seen > limited.max {
                        let too_large = BodyError {
                            side,
                            reason: BodyFailure::TooLarge(limited.max),
                        };
                        return Poll::Ready(Some(Err(Box::new(too_large))));
                    }
                }
                polled.map_err(stream_error)
            }
            Source::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Source::Coded(coded) => coded.poll_frame(cx),
            Source::Filtered(filtered) => filtered.poll_frame(cx),
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

    // Inline: asked per request (has it a body to filter?), and across crates.
    #[inline]
    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Streamed(incoming) => incoming.is_end_stream(),
            Source::Limited(limited) => limited.incoming.is_end_stream(),
            Source::Full(bytes) => bytes.is_none(),
            Source::Coded(coded) => coded.finished && coded.plain.trailers.is_none(),
            Source::Filtered(filtered) => filtered.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.source {
            Source::Streamed(incoming) => incoming.size_hint(),
            Source::Limited(limited) => limited.incoming.size_hint(),
            Source::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            // Unknown until it has been coded or filtered.
            Source::Coded(_) | Source::Filtered(_) => SizeHint::default(),
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
    /// Set when the body is first polled: time before that (hooks running, connecting
    /// upstream, a 100-continue not yet sent) is nobody's silence.
    deadline: Option<Instant>,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    fn new(timeout: Duration) -> Self {
        IdleTimer {
            timeout,
            deadline: None,
            sleep: None,
        }
    }

    fn activity(&mut self) {
        self.deadline = Some(Instant::now() + self.timeout);
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let timeout = self.timeout;
        let deadline = *self
            .deadline
            .get_or_insert_with(|| Instant::now() + timeout);
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let deadline = self.deadline.unwrap_or(deadline);
            if deadline <= Instant::now() {
                return true;
            }
            // Activity since the timer was set: wait out the rest of the new deadline.
            sleep.as_mut().reset(deadline);
        }
    }
}

/// Streamed bodies without a network: an HTTP/1.1 response read by hyper's client off an
/// in-memory pipe, the test writing the upstream's side of the wire.
#[cfg(test)]
pub(crate) mod testing {
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// The upstream's end of a connection whose response body is being streamed.
    pub(crate) struct Wire {
        stream: DuplexStream,
        // Kept so that hyper keeps the connection as it is.
        _sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    }

    impl Wire {
        pub(crate) async fn send_chunk(&mut self, data: &[u8]) {
            let chunk = [format!("{:x}\r\n", data.len()).as_bytes(), data, b"\r\n"].concat();
            self.stream.write_all(&chunk).await.unwrap();
        }

        /// Send the start of a chunk, then close the connection in its middle.
        pub(crate) async fn cut_off(mut self) {
            self.stream.write_all(b"a\r\nonly").await.unwrap();
        }
    }

    /// A chunked response body as hyper hands it over, still open, and its wire.
    pub(crate) async fn chunked_body() -> (Incoming, Wire) {
        let (near, mut stream) = tokio::io::duplex(64 * 1024);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(near))
            .await
            .unwrap();
        tokio::spawn(connection);
        let response = tokio::spawn(sender.send_request(http::Request::new(Empty::new())));
        // The response may only come once the request is on the wire.
        let mut request = Vec::new();
        while !request.ends_with(b"\r\n\r\n") {
            request.push(stream.read_u8().await.unwrap());
        }
        stream
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let incoming = response.await.unwrap().unwrap().into_body();
        let wire = Wire {
            stream,
            _sender: sender,
        };
        (incoming, wire)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::testing::chunked_body;
    use super::*;
    use crate::error::{Error, ErrorKind};

    const IDLE: Duration = Duration::from_secs(5);
    const MS: Duration = Duration::from_millis(1);

    /// The next frame, if one comes (or the body fails) within `wait`.
    async fn frame_within(
        body: &mut ProxyBody,
        wait: Duration,
    ) -> Option<Option<Result<Frame<Bytes>, BoxError>>> {
        tokio::time::timeout(wait, body.frame()).await.ok()
    }

    /// Waits out the idle timeout of a body that receives nothing, checking that it fails
    /// at its deadline and not before (paused time moves in whole milliseconds).
    async fn fails_when_idle_for(body: &mut ProxyBody, idle: Duration) -> BoxError {
        assert!(
            frame_within(body, idle - MS).await.is_none(),
            "failed before its idle timeout"
        );
        match frame_within(body, 2 * MS).await {
            Some(Some(Err(error))) => error,
            Some(Some(Ok(_))) => panic!("a frame out of nowhere"),
            Some(None) => panic!("the body ended instead of timing out"),
            None => panic!("no failure at its idle timeout"),
        }
    }

    fn idle_failure(error: &BoxError) -> (ErrorSide, Duration) {
        let body = error.downcast_ref::<BodyError>().expect("a BodyError");
        match body.reason {
            BodyFailure::Idle(after) => (body.side, after),
            ref other => panic!("not an idle failure: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_client_body_fails_at_its_idle_timeout() {
        let (upload, _wire) = chunked_body().await;
        let mut body = ProxyBody::streamed(upload, IDLE, ErrorSide::Client);
        let error = fails_when_idle_for(&mut body, IDLE).await;
        assert_eq!(idle_failure(&error), (ErrorSide::Client, IDLE));
        let error = Error::from_upstream(error);
        assert_eq!(
            (error.kind, error.side, error.status),
            (ErrorKind::ClientTimeout, ErrorSide::Client, 408)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_upstream_body_is_a_read_timeout() {
        let (response, _wire) = chunked_body().await;
        let mut body = ProxyBody::streamed(response, IDLE, ErrorSide::Upstream);
        let error = fails_when_idle_for(&mut body, IDLE).await;
        assert_eq!(idle_failure(&error), (ErrorSide::Upstream, IDLE));
        let error = Error::from_upstream(error);
        assert_eq!(
            (error.kind, error.side, error.status),
            (ErrorKind::ReadTimeout, ErrorSide::Upstream, 504)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn every_frame_pushes_the_idle_deadline() {
        let (response, mut wire) = chunked_body().await;
        let mut body = ProxyBody::streamed(response, IDLE, ErrorSide::Upstream);
        for _ in 0..3 {
            assert!(frame_within(&mut body, IDLE - MS).await.is_none());
            wire.send_chunk(b"hello").await;
            let frame = body.frame().await.unwrap().unwrap();
            assert_eq!(frame.into_data().unwrap(), "hello");
        }
        // Well past the first deadline: the timer armed for it re-arms for the last frame's.
        let error = fails_when_idle_for(&mut body, IDLE).await;
        assert_eq!(idle_failure(&error), (ErrorSide::Upstream, IDLE));
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_clock_starts_at_the_first_read() {
        // Hooks and the upstream connect run before anyone reads the request body (and
        // hyper sends a 100-continue only then): that wait is not the client's silence.
        let (upload, _wire) = chunked_body().await;
        let mut body = ProxyBody::streamed(upload, IDLE, ErrorSide::Client);
        tokio::time::advance(3 * IDLE).await;
        let error = fails_when_idle_for(&mut body, IDLE).await;
        assert_eq!(idle_failure(&error), (ErrorSide::Client, IDLE));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_idle_timeout_means_none() {
        let (upload, mut wire) = chunked_body().await;
        let mut body = ProxyBody::streamed(upload, Duration::ZERO, ErrorSide::Client);
        assert!(body.idle.is_none());
        assert!(frame_within(&mut body, Duration::from_secs(24 * 3600))
            .await
            .is_none());
        wire.send_chunk(b"late").await;
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "late");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_cut_off_fails_as_its_sides_stream() {
        let (response, wire) = chunked_body().await;
        let mut body = ProxyBody::streamed(response, IDLE, ErrorSide::Upstream);
        wire.cut_off().await;
        let error = loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                Some(Err(error)) => break error,
                None => panic!("a cut-off body ended cleanly"),
            }
        };
        let failure = error.downcast_ref::<BodyError>().expect("a BodyError");
        assert_eq!(failure.side, ErrorSide::Upstream);
        assert!(matches!(failure.reason, BodyFailure::Stream(_)));
    }
}
