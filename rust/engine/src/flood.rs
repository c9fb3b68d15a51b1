//! HTTP/2 control-frame floods: a client that sends SETTINGS or PING frames faster than any
//! real client would, typically without reading our acknowledgements.
//!
//! The h2 crate answers each such frame and, once it cannot write its ACKs, simply stops
//! reading: the connection stays open and the flood costs CPU until the write timeout. It has
//! no limit for this (h2 0.4.20 and hyper 1.12 offer limits for reset streams, CONTINUATION
//! frames and header sizes, none for PING or SETTINGS), so [`FloodGuard`] watches the frames
//! on the socket itself, below hyper. Like grpc-go's ping policy, it counts the client's
//! non-ACK SETTINGS and PING frames since we last wrote a HEADERS or DATA frame: more than
//! [`MAX_CONTROL_FRAMES`] of them within [`FLOOD_WINDOW`] is a flood. It then writes a GOAWAY
//! with ENHANCE_YOUR_CALM straight to the socket when that lands between two of h2's frames
//! (best effort: a socket that is full already will not take it), logs one warning and fails
//! the stream both ways, so h2 and hyper end the connection and the socket closes.
//!
//! An HTTP/1 connection is recognised by its first bytes (anything but the HTTP/2 client
//! preface) and passes through untouched.

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What an HTTP/2 client sends first (RFC 9113 section 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The most non-ACK SETTINGS and PING frames a client may send within [`FLOOD_WINDOW`] while
/// we write no HEADERS or DATA. A real client sends its preface SETTINGS, perhaps a SETTINGS
/// change, and keepalive PINGs seconds apart: under ten a second. BDP PINGs (hyper, grpc)
/// can be hundreds a second, but they come as our DATA arrives, one outstanding at a time,
/// and each DATA frame we write starts the count again. A flood sends thousands a second, so
/// 100 leaves a tenfold margin and still ends a flood within milliseconds, before our ACKs
/// fill the socket's buffers and the GOAWAY could not follow.
pub const MAX_CONTROL_FRAMES: u32 = 100;

/// The span over which control frames are counted.
pub const FLOOD_WINDOW: Duration = Duration::from_secs(1);

const FRAME_HEADER_LEN: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const FLAG_ACK: u8 = 0x1;
const ENHANCE_YOUR_CALM: u32 = 0xb;
/// The top bit of a stream id is reserved.
const STREAM_ID_MASK: u32 = 0x7fff_ffff;

pin_project_lite::pin_project! {
    /// A client socket that ends an HTTP/2 connection whose client floods SETTINGS or PING
    /// frames (see the module documentation). Costs an HTTP/1 connection one branch per I/O
    /// call.
    pub struct FloodGuard<S> {
        #[pin]
        inner: S,
        mode: Mode,
        client_addr: SocketAddr,
    }
}

enum Mode {
    /// Comparing the client's first bytes with the HTTP/2 preface; holds how many matched.
    Sniffing(u8),
    /// Not HTTP/2 (or not trackable): every call goes straight to the socket.
    PassThrough,
    /// HTTP/2: frame boundaries are followed both ways. Boxed, so HTTP/1 connections do not
    /// carry the tracker.
    Http2(Box<FrameTracker>),
    /// A flood was found: every further read and write fails.
    Closed,
}

impl<S> FloodGuard<S> {
    pub fn new(inner: S, client_addr: SocketAddr) -> Self {
        FloodGuard {
            inner,
            mode: Mode::Sniffing(0),
            client_addr,
        }
    }
}

fn flood_error() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "HTTP/2 client flooded control frames",
    )
}

impl<S: AsyncRead + AsyncWrite> AsyncRead for FloodGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        match this.mode {
            Mode::PassThrough => return this.inner.poll_read(cx, buf),
            Mode::Closed => return Poll::Ready(Err(flood_error())),
            Mode::Sniffing(_) | Mode::Http2(_) => {}
        }
        let before = buf.filled().len();
        ready!(this.inner.as_mut().poll_read(cx, buf))?;
        let mut fresh = &buf.filled()[before..];
        if let Mode::Sniffing(matched) = this.mode {
            let matched_before = usize::from(*matched);
            let n = fresh.len().min(PREFACE.len() - matched_before);
            if fresh[..n] != PREFACE[matched_before..matched_before + n] {
                *this.mode = Mode::PassThrough;
                return Poll::Ready(Ok(()));
            }
            if matched_before + n < PREFACE.len() {
                *matched = (matched_before + n) as u8;
                return Poll::Ready(Ok(()));
            }
            *this.mode = Mode::Http2(Box::default());
            fresh = &fresh[n..];
        }
        let Mode::Http2(tracker) = this.mode else {
            return Poll::Ready(Ok(()));
        };
        let Some(flood) = tracker.read(fresh) else {
            return Poll::Ready(Ok(()));
        };
        // Only between two of h2's frames: inside one, the GOAWAY would corrupt it.
        let goaway = tracker.outbound.at_boundary().then(|| tracker.goaway());
        let sent_goaway = goaway.is_some_and(|frame| {
            matches!(this.inner.as_mut().poll_write(cx, &frame), Poll::Ready(Ok(n)) if n == frame.len())
        });
        tracing::warn!(
            client = %this.client_addr,
            "HTTP/2 client flooded {} ({} PING, {} SETTINGS within {:?}, while ferroxy sent no response); \
             closing the connection{}",
            flood.what(),
            flood.pings,
            flood.settings,
            FLOOD_WINDOW,
            if sent_goaway { " with GOAWAY ENHANCE_YOUR_CALM" } else { "" },
        );
        *this.mode = Mode::Closed;
        Poll::Ready(Err(flood_error()))
    }
}

impl<S: AsyncRead + AsyncWrite> AsyncWrite for FloodGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        match this.mode {
            Mode::PassThrough => this.inner.poll_write(cx, buf),
            Mode::Http2(tracker) => {
                let written = ready!(this.inner.poll_write(cx, buf))?;
                tracker.wrote(&buf[..written]);
                Poll::Ready(Ok(written))
            }
            Mode::Sniffing(_) => {
                // We speak first, so this is no HTTP/2 server connection whose frames we
                // could follow.
                *this.mode = Mode::PassThrough;
                this.inner.poll_write(cx, buf)
            }
            Mode::Closed => Poll::Ready(Err(flood_error())),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        match this.mode {
            Mode::PassThrough => this.inner.poll_write_vectored(cx, bufs),
            Mode::Http2(tracker) => {
                let written = ready!(this.inner.poll_write_vectored(cx, bufs))?;
                let mut left = written;
                for slice in bufs {
                    let n = left.min(slice.len());
                    tracker.wrote(&slice[..n]);
                    left -= n;
                    if left == 0 {
                        break;
                    }
                }
                Poll::Ready(Ok(written))
            }
            Mode::Sniffing(_) => {
                *this.mode = Mode::PassThrough;
                this.inner.poll_write_vectored(cx, bufs)
            }
            Mode::Closed => Poll::Ready(Err(flood_error())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if let Mode::Closed = this.mode {
            return Poll::Ready(Err(flood_error()));
        }
        this.inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// One frame's 9-byte header (RFC 9113 section 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHeader {
    length: u32,
    kind: u8,
    flags: u8,
    stream_id: u32,
}

impl FrameHeader {
    fn parse(bytes: &[u8; FRAME_HEADER_LEN]) -> Self {
        FrameHeader {
            length: u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]),
            kind: bytes[3],
            flags: bytes[4],
            stream_id: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]])
                & STREAM_ID_MASK,
        }
    }
}

/// Where one direction of the byte stream is in its frames, whatever the reads or writes
/// split.
#[derive(Debug, Default)]
struct FrameCursor {
    header: [u8; FRAME_HEADER_LEN],
    header_len: u8,
    payload_left: u32,
}

impl FrameCursor {
    /// Consumes `bytes` up to and including the next complete frame header, which it returns;
    /// `None` when `bytes` ran out first.
    fn next_header(&mut self, bytes: &mut &[u8]) -> Option<FrameHeader> {
        let skip = bytes.len().min(self.payload_left as usize);
        *bytes = &bytes[skip..];
        self.payload_left -= skip as u32;
        if self.payload_left > 0 || bytes.is_empty() {
            return None;
        }
        let have = usize::from(self.header_len);
        let take = bytes.len().min(FRAME_HEADER_LEN - have);
        self.header[have..have + take].copy_from_slice(&bytes[..take]);
        *bytes = &bytes[take..];
        if have + take < FRAME_HEADER_LEN {
            self.header_len = (have + take) as u8;
            return None;
        }
        self.header_len = 0;
        let header = FrameHeader::parse(&self.header);
        self.payload_left = header.length;
        Some(header)
    }

    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.payload_left == 0
    }
}

/// What a flooding client sent within the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flood {
    pings: u32,
    settings: u32,
}

impl Flood {
    /// The kind most of the flood was (the preface's SETTINGS counts too).
    fn what(self) -> &'static str {
        match self.pings.cmp(&self.settings) {
            std::cmp::Ordering::Greater => "PING frames",
            std::cmp::Ordering::Less => "SETTINGS frames",
            std::cmp::Ordering::Equal => "PING and SETTINGS frames",
        }
    }
}

/// Follows an HTTP/2 connection's frames both ways and counts the client's control frames.
#[derive(Debug, Default)]
struct FrameTracker {
    inbound: FrameCursor,
    outbound: FrameCursor,
    /// When the current count began; `None` after we wrote HEADERS or DATA.
    window_start: Option<Instant>,
    pings: u32,
    settings: u32,
    /// The highest stream the client opened: the GOAWAY's last-stream-id.
    last_client_stream: u32,
}

impl FrameTracker {
    /// Follows bytes the client sent; `Some` once they make a flood.
    fn read(&mut self, mut bytes: &[u8]) -> Option<Flood> {
        while let Some(header) = self.inbound.next_header(&mut bytes) {
            let control = matches!(header.kind, SETTINGS | PING) && header.flags & FLAG_ACK == 0;
            if header.kind == HEADERS {
                self.last_client_stream = self.last_client_stream.max(header.stream_id);
            } else if control && self.count_control(header.kind, Instant::now()) {
                return Some(Flood {
                    pings: self.pings,
                    settings: self.settings,
                });
            }
        }
        None
    }

    /// Counts one control frame received at `now`; true when that makes a flood.
    fn count_control(&mut self, kind: u8, now: Instant) -> bool {
        match self.window_start {
            Some(start) if now.duration_since(start) < FLOOD_WINDOW => {}
            _ => {
                self.window_start = Some(now);
                self.pings = 0;
                self.settings = 0;
            }
        }
        if kind == PING {
            self.pings += 1;
        } else {
            self.settings += 1;
        }
        self.pings + self.settings > MAX_CONTROL_FRAMES
    }

    /// Follows bytes we wrote: a response (HEADERS or DATA) starts the count again.
    fn wrote(&mut self, mut bytes: &[u8]) {
        while let Some(header) = self.outbound.next_header(&mut bytes) {
            if matches!(header.kind, HEADERS | DATA) {
                self.window_start = None;
            }
        }
    }

    fn goaway(&self) -> [u8; FRAME_HEADER_LEN + 8] {
        let mut frame = [0; FRAME_HEADER_LEN + 8];
        frame[..3].copy_from_slice(&8u32.to_be_bytes()[1..]);
        frame[3] = GOAWAY;
        frame[9..13].copy_from_slice(&self.last_client_stream.to_be_bytes());
        frame[13..].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream_id.to_be_bytes());
        out.extend(payload);
        out
    }

    fn ping() -> Vec<u8> {
        frame(PING, 0, 0, &[7; 8])
    }

    fn headers_of(bytes: &[u8], chunk: usize) -> Vec<FrameHeader> {
        let mut cursor = FrameCursor::default();
        let mut seen = Vec::new();
        for mut piece in bytes.chunks(chunk) {
            while let Some(header) = cursor.next_header(&mut piece) {
                seen.push(header);
            }
        }
        assert!(cursor.at_boundary());
        seen
    }

    #[test]
    fn frame_headers_are_found_however_the_bytes_are_split() {
        let mut bytes = frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]);
        bytes.extend(frame(HEADERS, 0x5, 0x8000_0003, b"hpack block"));
        bytes.extend(frame(SETTINGS, FLAG_ACK, 0, &[]));
        bytes.extend(frame(DATA, 0x1, 3, &[0; 40_000]));
        bytes.extend(ping());
        let expected = vec![
            FrameHeader {
                length: 6,
                kind: SETTINGS,
                flags: 0,
                stream_id: 0,
            },
            // The reserved bit is not part of the id.
            FrameHeader {
                length: 11,
                kind: HEADERS,
                flags: 0x5,
                stream_id: 3,
            },
            FrameHeader {
                length: 0,
                kind: SETTINGS,
                flags: FLAG_ACK,
                stream_id: 0,
            },
            FrameHeader {
                length: 40_000,
                kind: DATA,
                flags: 0x1,
                stream_id: 3,
            },
            FrameHeader {
                length: 8,
                kind: PING,
                flags: 0,
                stream_id: 0,
            },
        ];
        for chunk in [1, 2, 5, 9, 10, 17, 4096, bytes.len()] {
            assert_eq!(headers_of(&bytes, chunk), expected, "chunk {chunk}");
        }
    }

    #[test]
    fn a_cursor_inside_a_frame_is_not_at_a_boundary() {
        let bytes = ping();
        let mut cursor = FrameCursor::default();
        assert!(cursor.at_boundary());
        let mut piece = &bytes[..4];
        assert_eq!(cursor.next_header(&mut piece), None);
        assert!(!cursor.at_boundary(), "inside the header");
        let mut piece = &bytes[4..12];
        assert!(cursor.next_header(&mut piece).is_some());
        assert_eq!(cursor.next_header(&mut piece), None);
        assert!(piece.is_empty());
        assert!(!cursor.at_boundary(), "inside the payload");
        let mut piece = &bytes[12..];
        assert_eq!(cursor.next_header(&mut piece), None);
        assert!(cursor.at_boundary());
    }

    #[test]
    fn more_than_the_limit_of_pings_is_a_flood() {
        let mut tracker = FrameTracker::default();
        let pings: Vec<u8> = (0..MAX_CONTROL_FRAMES).flat_map(|_| ping()).collect();
        assert_eq!(tracker.read(&pings), None, "the limit itself is allowed");
        let flood = tracker.read(&ping()).expect("one more is a flood");
        assert_eq!(
            flood,
            Flood {
                pings: MAX_CONTROL_FRAMES + 1,
                settings: 0
            }
        );
        assert_eq!(flood.what(), "PING frames");
    }

    #[test]
    fn settings_and_pings_count_together_and_acks_not_at_all() {
        let mut tracker = FrameTracker::default();
        let ack = frame(PING, FLAG_ACK, 0, &[7; 8]);
        let settings_ack = frame(SETTINGS, FLAG_ACK, 0, &[]);
        for _ in 0..10 * MAX_CONTROL_FRAMES {
            assert_eq!(tracker.read(&ack), None);
            assert_eq!(tracker.read(&settings_ack), None);
        }
        let mut mixed = Vec::new();
        for _ in 0..MAX_CONTROL_FRAMES / 2 + 1 {
            mixed.extend(ping());
            mixed.extend(frame(SETTINGS, 0, 0, &[]));
        }
        let flood = tracker
            .read(&mixed)
            .expect("mixed control frames are a flood");
        assert_eq!(flood.pings + flood.settings, MAX_CONTROL_FRAMES + 1);
        assert_eq!(
            flood.what(),
            "PING frames",
            "the more numerous kind is named"
        );
        let even = Flood {
            pings: 3,
            settings: 3,
        };
        assert_eq!(even.what(), "PING and SETTINGS frames");
        assert_eq!(
            Flood {
                settings: 4,
                ..even
            }
            .what(),
            "SETTINGS frames"
        );
    }

    #[test]
    fn a_response_we_write_starts_the_count_again() {
        let mut tracker = FrameTracker::default();
        let pings: Vec<u8> = (0..MAX_CONTROL_FRAMES).flat_map(|_| ping()).collect();
        for stream in [1u32, 3] {
            assert_eq!(tracker.read(&pings), None);
            tracker.wrote(&frame(
                if stream == 1 { HEADERS } else { DATA },
                0,
                stream,
                b"x",
            ));
        }
        // Our own PING ACKs are no response.
        assert_eq!(tracker.read(&pings), None);
        tracker.wrote(&frame(PING, FLAG_ACK, 0, &[7; 8]));
        assert!(tracker.read(&ping()).is_some());
    }

    #[test]
    fn the_count_is_per_window() {
        let mut tracker = FrameTracker::default();
        let start = Instant::now();
        for i in 0..MAX_CONTROL_FRAMES {
            assert!(!tracker.count_control(PING, start + Duration::from_millis(u64::from(i))));
        }
        // A second later the earlier ones no longer count.
        assert!(!tracker.count_control(PING, start + FLOOD_WINDOW));
        assert_eq!(tracker.pings, 1);
    }

    fn client_addr() -> SocketAddr {
        "127.0.0.1:40000".parse().unwrap()
    }

    /// Reads from the guard until it fails or the client side closes; returns what it read
    /// and whether it failed.
    async fn read_all(guard: &mut FloodGuard<tokio::io::DuplexStream>) -> (Vec<u8>, bool) {
        use tokio::io::AsyncReadExt;
        let mut seen = Vec::new();
        // Small reads, so the preface and the frames arrive split.
        let mut buf = [0; 7];
        loop {
            match guard.read(&mut buf).await {
                Ok(0) => return (seen, false),
                Ok(n) => seen.extend(&buf[..n]),
                Err(error) => {
                    assert_eq!(error.kind(), io::ErrorKind::ConnectionAborted);
                    return (seen, true);
                }
            }
        }
    }

    #[tokio::test]
    async fn http1_passes_through_whatever_follows() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut guard = FloodGuard::new(server, client_addr());
        let mut sent = b"PRI / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        sent.extend((0..10 * MAX_CONTROL_FRAMES).flat_map(|_| ping()));
        client.write_all(&sent).await.unwrap();
        drop(client);
        assert_eq!(read_all(&mut guard).await, (sent, false));
        assert!(matches!(guard.mode, Mode::PassThrough));
    }

    #[tokio::test]
    async fn an_http2_flood_gets_a_goaway_and_fails_both_ways() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut guard = FloodGuard::new(server, client_addr());
        let mut sent = PREFACE.to_vec();
        sent.extend(frame(SETTINGS, 0, 0, &[]));
        sent.extend(frame(HEADERS, 0x5, 1, b"h"));
        sent.extend((0..2 * MAX_CONTROL_FRAMES).flat_map(|_| ping()));
        client.write_all(&sent).await.unwrap();
        let (read, failed) = read_all(&mut guard).await;
        assert!(failed, "the flood must fail the read");
        assert!(
            read.len() < sent.len(),
            "nothing after the flood is handed on"
        );
        assert!(guard.write_all(b"more").await.is_err(), "writes fail too");
        drop(guard);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        let goaway = FrameTracker {
            last_client_stream: 1,
            ..FrameTracker::default()
        }
        .goaway();
        assert_eq!(answer, goaway);
    }

    #[tokio::test]
    async fn no_goaway_inside_a_frame_we_are_writing() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut guard = FloodGuard::new(server, client_addr());
        client.write_all(PREFACE).await.unwrap();
        let mut preface = [0; PREFACE.len()];
        guard.read_exact(&mut preface).await.unwrap();
        // Half a DATA frame written: a GOAWAY now would land in its payload.
        let data = frame(DATA, 0, 1, &[1; 100]);
        guard.write_all(&data[..50]).await.unwrap();
        client
            .write_all(
                &(0..2 * MAX_CONTROL_FRAMES)
                    .flat_map(|_| ping())
                    .collect::<Vec<u8>>(),
            )
            .await
            .unwrap();
        let (_, failed) = read_all(&mut guard).await;
        assert!(failed);
        drop(guard);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, data[..50]);
    }

    #[test]
    fn the_goaway_names_the_last_client_stream_and_enhance_your_calm() {
        let mut tracker = FrameTracker::default();
        assert_eq!(tracker.read(&frame(HEADERS, 0x5, 5, b"h")), None);
        assert_eq!(tracker.read(&frame(HEADERS, 0x5, 3, b"h")), None);
        let goaway = tracker.goaway();
        assert_eq!(
            headers_of(&goaway, goaway.len()),
            vec![FrameHeader {
                length: 8,
                kind: GOAWAY,
                flags: 0,
                stream_id: 0
            }]
        );
        assert_eq!(goaway[9..13], 5u32.to_be_bytes());
        assert_eq!(goaway[13..], ENHANCE_YOUR_CALM.to_be_bytes());
    }
}
