//! Body filters: code that sees each chunk of a request or response body on its way and may
//! replace it (Pingora's `request_body_filter`/`response_body_filter`). A filter is asked for
//! at its phase (see [`crate::phase::ProxyHttp::request_body_filter`]) and then runs beside
//! the phases, chunk by chunk: the next chunk is read only once the filter has answered for
//! the last, so a slow filter or a slow receiver slows the sender and memory stays bounded.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};

use crate::body::{BoxError, ProxyBody};
use crate::error::Error;

/// What a filter answers for one chunk: `Some(bytes)` to send instead (empty to send
/// nothing), `None` to send the chunk as it came; an error ends the body. `Sync` as well:
/// it waits inside the request body, which the session holds across the phases' awaits.
pub type ChunkVerdict = Pin<Box<dyn Future<Output = Result<Option<Bytes>, Error>> + Send + Sync>>;

pub trait BodyFilter: Send + Sync + 'static {
    /// Called for each chunk in order, then once with `end_of_stream` set (with the last
    /// chunk, or with an empty one after it), so that a filter can add to the end.
    fn on_chunk(&self, chunk: Bytes, end_of_stream: bool) -> ChunkVerdict;
}

/// A body passed through a [`BodyFilter`]. Its length is unknown until it ends: whoever sends
/// it drops the Content-Length the body came with.
pub(crate) struct Filtered {
    inner: ProxyBody,
    filter: Arc<dyn BodyFilter>,
    /// The filter's answer being awaited, and the chunk it was given (sent if it answers
    /// `None`).
    pending: Option<(ChunkVerdict, Bytes)>,
    /// The filter has been given the end of the stream.
    ended: bool,
    /// The source's trailers, sent once the filter has seen the end.
    trailers: Option<http::HeaderMap>,
}

impl Filtered {
    pub(crate) fn new(inner: ProxyBody, filter: Arc<dyn BodyFilter>) -> Self {
        Filtered {
            inner,
            filter,
            pending: None,
            ended: false,
            trailers: None,
        }
    }

    fn ask(&mut self, chunk: Bytes, end_of_stream: bool) {
        self.ended |= end_of_stream;
        let verdict = self.filter.on_chunk(chunk.clone(), end_of_stream);
        self.pending = Some((verdict, chunk));
    }

    pub(crate) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some((verdict, _)) = &mut self.pending {
                let answer = match verdict.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(answer) => answer,
                };
                let (_, chunk) = self.pending.take().expect("awaited just now");
                match answer {
                    Err(error) => return Poll::Ready(Some(Err(Box::new(error)))),
                    Ok(replaced) => {
                        let out = replaced.unwrap_or(chunk);
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(out))));
                        }
                    }
                }
            }
            if self.ended {
                return Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let end = self.inner.is_end_stream();
                        // An empty chunk that is not the end says nothing to filter.
                        if !data.is_empty() || end {
                            self.ask(data, end);
                        }
                    }
                    Err(frame) => {
                        self.trailers = frame.into_trailers().ok();
                        self.ask(Bytes::new(), true);
                    }
                },
                Poll::Ready(None) => self.ask(Bytes::new(), true),
            }
        }
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.ended && self.pending.is_none() && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// Uppercases each chunk and says where the stream ended.
    struct Shout;

    impl BodyFilter for Shout {
        fn on_chunk(&self, chunk: Bytes, end_of_stream: bool) -> ChunkVerdict {
            Box::pin(async move {
                let mut out = chunk.to_ascii_uppercase();
                if end_of_stream {
                    out.extend_from_slice(b"<END>");
                }
                Ok(Some(Bytes::from(out)))
            })
        }
    }

    /// Keeps every chunk, then fails at the end.
    struct FailAtEnd;

    impl BodyFilter for FailAtEnd {
        fn on_chunk(&self, _chunk: Bytes, end_of_stream: bool) -> ChunkVerdict {
            Box::pin(async move {
                if end_of_stream {
                    return Err(Error::hook("response_body_filter", "boom"));
                }
                Ok(None)
            })
        }
    }

    #[tokio::test]
    async fn chunks_are_replaced_and_the_end_is_told_once() {
        let body = ProxyBody::full(Bytes::from_static(b"hello")).filtered(Arc::new(Shout));
        assert_eq!(body.size_hint().exact(), None);
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(&collected[..], b"HELLO<END>");
        // An empty body still tells the filter it ended.
        let empty = ProxyBody::empty().filtered(Arc::new(Shout));
        assert_eq!(&empty.collect().await.unwrap().to_bytes()[..], b"<END>");
    }

    #[tokio::test]
    async fn a_failing_filter_fails_the_body_with_its_error() {
        let body = ProxyBody::full(Bytes::from_static(b"data")).filtered(Arc::new(FailAtEnd));
        let error = body.collect().await.expect_err("the filter failed");
        let error = crate::error::Error::from_upstream(error);
        assert_eq!(error.kind, crate::error::ErrorKind::HookError);
        assert!(error.message.contains("boom"), "{}", error.message);
    }
}
