//! What the HTTP service knows of one client connection beyond hyper: whether bytes are still
//! moving and whose they were last, how many of its requests are still being answered, and
//! whether its writes wait on the client. Graceful shutdown and idle-buffer release decide by it.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use parking_lot::Mutex;

use crate::upgrade::Switch;
use crate::validate::RepeatedLengthScan;

/// Shared by a connection's stream, its requests and the loop that serves it.
#[derive(Default)]
pub(crate) struct ConnectionWatch {
    /// Reads and writes that moved bytes, shifted left once; the low bit is set when the
    /// last of them was a read (the client's bytes, not yet answered). One atomic: it is
    /// updated on every read and write.
    activity: AtomicU64,
    /// Requests whose response has not been sent to its end.
    in_flight: AtomicUsize,
    /// The last write could not go out (the client is not reading): bytes are still waiting
    /// in hyper's buffer, whatever the requests' count says.
    write_blocked: AtomicBool,
    /// A request head the client sent had two Content-Length lines (which hyper merges):
    /// the next response closes the connection.
    close_next: AtomicBool,
    /// The upstream side of a protocol switch whose 101 is on its way to the client: the
    /// connection becomes a tunnel once it has been sent (see [`crate::upgrade`]).
    upgrade: Mutex<Option<Switch>>,
}

/// A sample of [`ConnectionWatch`]'s activity, to compare with a later one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Activity(u64);

impl ConnectionWatch {
    fn moved(&self, read: bool) {
        let activity = self.activity.load(Ordering::Relaxed);
        // Only the connection's own task writes it: a load and a store, no read-modify-write.
        let next = ((activity >> 1) + 1) << 1 | u64::from(read);
        self.activity.store(next, Ordering::Relaxed);
    }

    pub(crate) fn activity(&self) -> Activity {
        Activity(self.activity.load(Ordering::Relaxed))
    }

    /// Nothing has moved since `before`, the client's last bytes have been answered, and no
    /// response is still being sent: the connection waits for a request that has not begun
    /// to arrive.
    pub(crate) fn idle_since(&self, before: Activity) -> bool {
        let now = self.activity();
        now == before
            && now.0 & 1 == 0
            && self.in_flight.load(Ordering::Acquire) == 0
            && !self.write_blocked.load(Ordering::Relaxed)
    }

    /// Nothing has moved either way since `before` (a tunnel's idle test: no request to
    /// answer there).
    pub(crate) fn quiet_since(&self, before: Activity) -> bool {
        self.activity() == before
    }

    /// Hand the connection, once the 101 now being sent has gone, the upstream's side of the
    /// switch.
    pub(crate) fn switch_after_response(&self, upstream: Switch) {
        *self.upgrade.lock() = Some(upstream);
    }

    /// The switch a 101 just sent asks for, if any.
    pub(crate) fn take_upgrade(&self) -> Option<Switch> {
        self.upgrade.lock().take()
    }

    /// After a write or a flush: blocked if it could not go out; activity if bytes went.
    fn wrote(&self, pending: bool, bytes: usize) {
        self.write_blocked.store(pending, Ordering::Relaxed);
        if bytes > 0 {
            self.moved(false);
        }
    }

    /// Whether the response being sent must close the connection because its request was
    /// one to take nothing after (see [`RepeatedLengthScan`]); asking clears it.
    pub(crate) fn take_close_next(&self) -> bool {
        self.close_next.swap(false, Ordering::Relaxed)
    }

    /// Count a request as in flight until the returned guard (kept by its response body) is
    /// dropped.
    pub(crate) fn request_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

/// A request being answered; see [`ConnectionWatch::request_started`].
pub(crate) struct InFlight(Arc<ConnectionWatch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until hyper drops it.
pub struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    pub(crate) fn new(body: B, in_flight: InFlight) -> Self {
        Tracked {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A client stream that reports its reads and writes to a [`ConnectionWatch`], and first
/// gives back bytes read ahead by an earlier hyper connection on it (`unread`).
pub(crate) struct Watched<S> {
    inner: Pin<Box<S>>,
    watch: Arc<ConnectionWatch>,
    unread: Bytes,
    /// HTTP/1 only: HTTP/2 carries no header lines to look at.
    lengths: Option<RepeatedLengthScan>,
}

impl<S> Watched<S> {
    pub(crate) fn new(inner: S, watch: Arc<ConnectionWatch>) -> Self {
        Watched {
            inner: Box::pin(inner),
            watch,
            unread: Bytes::new(),
            lengths: None,
        }
    }

    /// Watch the client's bytes for repeated Content-Length lines (HTTP/1).
    pub(crate) fn scan_lengths(mut self) -> Self {
        self.lengths = Some(RepeatedLengthScan::default());
        self
    }

    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes to read before the stream's own (what hyper had buffered but not parsed).
    /// Copied: hyper's are a view of its whole read buffer, which would stay allocated.
    pub(crate) fn set_unread(&mut self, unread: Bytes) {
        self.unread = if unread.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&unread)
        };
    }

    pub(crate) fn has_unread(&self) -> bool {
        !self.unread.is_empty()
    }

    /// The bytes are no longer HTTP (a tunnel's): no header lines to look for.
    pub(crate) fn stop_scanning(&mut self) {
        self.lengths = None;
    }
}

impl<S: AsyncRead> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.unread.is_empty() {
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread[..n]);
            self.unread.advance(n);
            // The client's bytes all the same: a request has begun to arrive.
            self.watch.moved(true);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = self.inner.as_mut().poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if buf.filled().len() > before {
                self.watch.moved(true);
                let this = &mut *self;
                if let Some(lengths) = &mut this.lengths {
                    if lengths.scan(&buf.filled()[before..]) {
                        this.watch.close_next.store(true, Ordering::Relaxed);
                    }
                }
            }
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
        let written = match polled {
            Poll::Ready(Ok(n)) => n,
            _ => 0,
        };
        self.watch.wrote(polled.is_pending(), written);
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = self.inner.as_mut().poll_write_vectored(cx, bufs);
        let written = match polled {
            Poll::Ready(Ok(n)) => n,
            _ => 0,
        };
        self.watch.wrote(polled.is_pending(), written);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = self.inner.as_mut().poll_flush(cx);
        self.watch.wrote(polled.is_pending(), 0);
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.inner.as_mut().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn idle_means_quiet_answered_and_nothing_in_flight() {
        let watch = Arc::new(ConnectionWatch::default());
        let (client, server) = tokio::io::duplex(64);
        let mut server = Watched::new(server, watch.clone());
        let mut client = client;
        let start = watch.activity();
        assert!(watch.idle_since(start), "a new connection is idle");

        client.write_all(b"GET / ").await.unwrap();
        let mut buf = [0; 16];
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / ");
        let after_read = watch.activity();
        assert!(!watch.idle_since(start), "bytes moved");
        assert!(
            !watch.idle_since(after_read),
            "a request has begun to arrive: not idle however quiet"
        );

        let request = watch.request_started();
        server.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        let after_write = watch.activity();
        assert!(
            !watch.idle_since(after_write),
            "a response is still being sent"
        );
        drop(request);
        assert!(watch.idle_since(after_write), "answered and quiet");
    }

    #[tokio::test]
    async fn bytes_read_ahead_come_first() {
        let watch = Arc::new(ConnectionWatch::default());
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = Watched::new(server, watch);
        server.set_unread(Bytes::from_static(b"GET /next"));
        client.write_all(b" HTTP/1.1").await.unwrap();
        drop(client);
        let mut all = Vec::new();
        server.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET /next HTTP/1.1");
    }
}
