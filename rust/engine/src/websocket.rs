//! WebSocket messages (RFC 6455) in a tunnel whose app looks at them: frames are read from
//! each side, data frames gathered into whole messages and handed to a [`MessageFilter`],
//! which forwards, replaces or drops each one. Control frames (ping, pong, close) go on at
//! once, in their place. Without a filter a tunnel copies bytes and parses nothing (see
//! [`crate::upgrade`]).
//!
//! What the filter is not shown: a message with reserved bits set (an extension it could not
//! read; the handshake is sent without `Sec-WebSocket-Extensions`, so none is negotiated) or
//! text that is not UTF-8 go on as they came, for the endpoints to judge; a frame we cannot
//! parse, or a message over [`MAX_MESSAGE`], ends the tunnel.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// One whole message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary(Bytes),
}

/// What to do with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Send it on as it came (its own frames, fragmentation kept).
    Forward,
    /// Send this instead, as one frame.
    Replace(Message),
    /// Send nothing.
    Drop,
}

/// Sees each message of one tunnel, in order per direction.
pub trait MessageFilter: Send + Sync + 'static {
    fn on_message(
        &self,
        message: Message,
        from_client: bool,
    ) -> Pin<Box<dyn Future<Output = Verdict> + Send + 'static>>;
}

/// The largest message gathered for the filter (frames are read whole, a message in full).
pub const MAX_MESSAGE: usize = 64 << 20;

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;

/// One frame's head, and its payload unmasked.
struct Frame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: Bytes,
    /// The frame's bytes as they came.
    raw: Bytes,
}

/// Parse one frame from the front of `buf`; `None` until it is all there.
fn parse(buf: &mut BytesMut) -> std::io::Result<Option<Frame>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let masked = b1 & 0x80 != 0;
    let (length, mut at) = match b1 & 0x7f {
        126 if buf.len() >= 4 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
        127 if buf.len() >= 10 => {
            let mut eight = [0u8; 8];
            eight.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(eight), 10)
        }
        126 | 127 => return Ok(None),
        n => (u64::from(n), 2),
    };
    if length > MAX_MESSAGE as u64 {
        return Err(std::io::Error::other(
            "a WebSocket frame over the message limit",
        ));
    }
    let key = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let key = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(key)
    } else {
        None
    };
    let total = at + length as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let raw = buf.split_to(total).freeze();
    let mut payload = raw.slice(at..).to_vec();
    if let Some(key) = key {
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= key[i % 4];
        }
    }
    Ok(Some(Frame {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0x0f,
        payload: payload.into(),
        raw,
    }))
}

/// `message` as one frame, masked with a fresh key when it goes to the upstream (a client's
/// frames must be, RFC 6455 section 5.3).
fn encode(message: &Message, masked: bool) -> Bytes {
    let (opcode, payload): (u8, &[u8]) = match message {
        Message::Text(text) => (TEXT, text.as_bytes()),
        Message::Binary(bytes) => (BINARY, bytes),
    };
    let mut out = BytesMut::with_capacity(payload.len() + 14);
    out.put_u8(0x80 | opcode);
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.put_u8(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(mask_bit | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(mask_bit | 127);
            out.put_u64(n as u64);
        }
    }
    if masked {
        let key: [u8; 4] = rand_key();
        out.put_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.put_slice(payload);
    }
    out.freeze()
}

/// A masking key: it need not be secret from anyone but a cache between us and the
/// upstream, and varies per frame (a counter mixed with the clock).
fn rand_key() -> [u8; 4] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let n = COUNTER.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed) ^ u64::from(nanos);
    let mixed = (n ^ (n >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (mixed as u32).to_be_bytes()
}

/// A message being gathered from its frames.
#[derive(Default)]
struct Gathering {
    opcode: u8,
    payload: BytesMut,
    raw: Vec<Bytes>,
    /// A frame with reserved bits: the message goes on unseen.
    opaque: bool,
}

/// Relay one direction: frames read from `from`, written to `to`. Returns at the end of
/// `from` (after passing the end on) or on an error.
pub async fn relay<R, W>(
    from: &mut R,
    to: &mut W,
    filter: &Arc<dyn MessageFilter>,
    from_client: bool,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(16 * 1024);
    let mut gathering: Option<Gathering> = None;
    loop {
        while let Some(frame) = parse(&mut buf)? {
            match frame.opcode {
                // Control frames: on at once, whatever is being gathered.
                op if op >= 0x8 => to.write_all(&frame.raw).await?,
                TEXT | BINARY if gathering.is_none() => {
                    let mut message = Gathering {
                        opcode: frame.opcode,
                        opaque: frame.rsv != 0,
                        ..Gathering::default()
                    };
                    message.payload.extend_from_slice(&frame.payload);
                    message.raw.push(frame.raw);
                    if frame.fin {
                        deliver(message, to, filter, from_client).await?;
                    } else {
                        gathering = Some(message);
                    }
                }
                CONTINUATION if gathering.is_some() => {
                    let message = gathering.as_mut().expect("checked");
                    if message.payload.len() + frame.payload.len() > MAX_MESSAGE {
                        return Err(std::io::Error::other("a WebSocket message over the limit"));
                    }
                    message.opaque |= frame.rsv != 0;
                    message.payload.extend_from_slice(&frame.payload);
                    message.raw.push(frame.raw);
                    if frame.fin {
                        let message = gathering.take().expect("checked");
                        deliver(message, to, filter, from_client).await?;
                    }
                }
                // Out of order (a new message before the last one ended, a continuation of
                // none), or an unknown opcode: the endpoint judges it, and fails the
                // connection as RFC 6455 says it must. What was being gathered goes first,
                // so that it sees the frames in the order they came.
                _ => {
                    if let Some(message) = gathering.take() {
                        forward(to, message.raw).await?;
                    }
                    to.write_all(&frame.raw).await?
                }
            }
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 * 1024);
        }
        if from.read_buf(&mut buf).await? == 0 {
            to.shutdown().await?;
            return Ok(());
        }
    }
}

async fn deliver<W: AsyncWrite + Unpin>(
    message: Gathering,
    to: &mut W,
    filter: &Arc<dyn MessageFilter>,
    from_client: bool,
) -> std::io::Result<()> {
    let payload = message.payload.freeze();
    let seen = match message.opcode {
        _ if message.opaque => None,
        TEXT => String::from_utf8(payload.to_vec()).ok().map(Message::Text),
        _ => Some(Message::Binary(payload)),
    };
    let Some(seen) = seen else {
        return forward(to, message.raw).await;
    };
    match filter.on_message(seen, from_client).await {
        Verdict::Forward => forward(to, message.raw).await,
        Verdict::Replace(replacement) => to.write_all(&encode(&replacement, from_client)).await,
        Verdict::Drop => Ok(()),
    }
}

/// A message's frames as they came.
async fn forward<W: AsyncWrite + Unpin>(to: &mut W, raw: Vec<Bytes>) -> std::io::Result<()> {
    for frame in raw {
        to.write_all(&frame).await?;
    }
    Ok(())
}

/// Both directions, until both have ended.
pub async fn relay_both<D, U>(
    downstream: &mut D,
    upstream: &mut U,
    filter: Arc<dyn MessageFilter>,
) -> std::io::Result<()>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut down_read, mut down_write) = tokio::io::split(downstream);
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let to_upstream = relay(&mut down_read, &mut up_write, &filter, true);
    let to_client = relay(&mut up_read, &mut down_write, &filter, false);
    // Each direction ends at its own end (passed on as a shutdown of the other side's
    // writing), as copy_bidirectional's do; the first error ends both.
    tokio::try_join!(to_upstream, to_client).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Shout;

    impl MessageFilter for Shout {
        fn on_message(
            &self,
            message: Message,
            _from_client: bool,
        ) -> Pin<Box<dyn Future<Output = Verdict> + Send + 'static>> {
            Box::pin(async move {
                match message {
                    Message::Text(text) if text == "drop me" => Verdict::Drop,
                    Message::Text(text) if text == "as is" => Verdict::Forward,
                    Message::Text(text) => Verdict::Replace(Message::Text(text.to_uppercase())),
                    Message::Binary(bytes) => Verdict::Replace(Message::Binary(bytes.slice(1..))),
                }
            })
        }
    }

    fn frame(fin: bool, opcode: u8, payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        let mask = if key.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(mask | n as u8),
            n if n <= 65535 => {
                out.push(mask | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(mask | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        match key {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => out.extend_from_slice(payload),
        }
        out
    }

    /// Everything written to the far side, parsed back into (opcode, fin, unmasked payload).
    async fn through(input: Vec<u8>, from_client: bool) -> Vec<(u8, bool, Vec<u8>)> {
        let filter: Arc<dyn MessageFilter> = Arc::new(Shout);
        let mut from = &input[..];
        let mut out = Vec::new();
        relay(&mut from, &mut out, &filter, from_client)
            .await
            .unwrap();
        let mut buf = BytesMut::from(&out[..]);
        let mut frames = Vec::new();
        while let Some(f) = parse(&mut buf).unwrap() {
            frames.push((f.opcode, f.fin, f.payload.to_vec()));
        }
        assert!(buf.is_empty());
        frames
    }

    #[tokio::test]
    async fn messages_are_replaced_dropped_or_forwarded() {
        let key = Some([1, 2, 3, 4]);
        let mut input = frame(true, TEXT, b"hello", key);
        input.extend(frame(true, TEXT, b"drop me", key));
        input.extend(frame(true, BINARY, b"\x00\x01\x02", key));
        input.extend(frame(true, TEXT, b"as is", key));
        let frames = through(input, true).await;
        assert_eq!(
            frames,
            vec![
                (TEXT, true, b"HELLO".to_vec()),
                (BINARY, true, b"\x01\x02".to_vec()),
                (TEXT, true, b"as is".to_vec()),
            ]
        );
    }

    #[tokio::test]
    async fn fragments_are_gathered_and_control_frames_go_between() {
        let mut input = frame(false, TEXT, b"frag", None);
        input.extend(frame(true, 0x9, b"ping!", None));
        input.extend(frame(false, CONTINUATION, b"men", None));
        input.extend(frame(true, CONTINUATION, b"ts", None));
        input.extend(frame(true, 0x8, &[0x03, 0xe8], None));
        let frames = through(input, false).await;
        assert_eq!(
            frames,
            vec![
                (0x9, true, b"ping!".to_vec()),
                (TEXT, true, b"FRAGMENTS".to_vec()),
                (0x8, true, vec![0x03, 0xe8]),
            ]
        );
    }

    #[tokio::test]
    async fn a_large_message_survives_and_forwarded_frames_keep_their_bytes() {
        let big = vec![b'x'; 200_000];
        let input = frame(true, TEXT, &big, Some([9, 8, 7, 6]));
        let frames = through(input, true).await;
        assert_eq!(frames, vec![(TEXT, true, vec![b'X'; 200_000])]);
        // Forwarded: byte for byte, mask and all.
        let original = frame(true, TEXT, b"as is", Some([5, 5, 5, 5]));
        let filter: Arc<dyn MessageFilter> = Arc::new(Shout);
        let mut out = Vec::new();
        relay(&mut &original[..], &mut out, &filter, true)
            .await
            .unwrap();
        assert_eq!(out, original);
    }

    #[test]
    fn replaced_frames_to_the_upstream_are_masked() {
        let frame = encode(&Message::Text("abc".into()), true);
        assert_eq!(frame[1] & 0x80, 0x80);
        let mut buf = BytesMut::from(&frame[..]);
        let parsed = parse(&mut buf).unwrap().unwrap();
        assert_eq!(&parsed.payload[..], b"abc");
        let to_client = encode(&Message::Text("abc".into()), false);
        assert_eq!(to_client[1] & 0x80, 0);
    }

    #[test]
    fn a_frame_over_the_limit_is_refused() {
        let mut head = BytesMut::from(&[0x82u8, 127][..]);
        head.put_u64(MAX_MESSAGE as u64 + 1);
        assert!(parse(&mut head).is_err());
    }
}
