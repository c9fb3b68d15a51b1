//! Response compression: gzip, brotli or zstd, chosen by the client's `Accept-Encoding`
//! (q-values first, then our order of preference), for the content types and sizes the user
//! set, streamed frame by frame.
//!
//! Left alone: responses to HEAD, statuses without a body (1xx, 204, 304) and partial ones
//! (206), bodies already encoded, `Cache-Control: no-transform`, types not listed, and
//! bodies whose known length is below `min_length`. A compressed response loses its
//! Content-Length, says `Vary: Accept-Encoding`, and its ETag is weakened (`W/"..."`): the
//! bytes are no longer the upstream's, byte for byte (RFC 9110 section 8.8.1).

use std::collections::VecDeque;
use std::io::{BufRead, Read, Write};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};

/// A content coding we can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Gzip,
    Brotli,
    Zstd,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Brotli => "br",
            Encoding::Zstd => "zstd",
        }
    }

    pub fn parse(name: &str) -> Option<Encoding> {
        match name {
            "gzip" => Some(Encoding::Gzip),
            "br" => Some(Encoding::Brotli),
            "zstd" => Some(Encoding::Zstd),
            _ => None,
        }
    }

    /// A level that compresses well at a small cost per byte (nginx's gzip_comp_level is 1 by
    /// default; 6 is zlib's own default and still cheap; brotli and zstd at their fast
    /// settings, not their archival ones).
    pub fn default_level(self) -> u32 {
        match self {
            Encoding::Gzip => 6,
            Encoding::Brotli => 4,
            Encoding::Zstd => 3,
        }
    }
}

/// What to compress, and how.
#[derive(Debug, Clone)]
pub struct Compression {
    /// Our order of preference among the codings the client accepts equally.
    pub encodings: Vec<Encoding>,
    /// Media types to compress (`text/html`), or whole families (`text/*`), lowercase.
    pub types: Vec<String>,
    /// Bodies whose known length is below this stay as they are (no gain, and more bytes
    /// for headers and framing than saved). Bodies of unknown length are compressed.
    pub min_length: u64,
    /// Level per coding; `None` takes [`Encoding::default_level`].
    pub level: Option<u32>,
    /// Decode an upstream's gzip, brotli or zstd body for a client that does not accept it
    /// (and encode it again in a coding the client does take, when there is one).
    pub decompress: bool,
}

/// What to do to one response's body: decode the upstream's coding, encode in the client's,
/// or both (in that order).
#[derive(Default)]
pub struct Plan {
    pub decode: Option<Decoder>,
    pub encode: Option<Encoder>,
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            encodings: vec![Encoding::Zstd, Encoding::Brotli, Encoding::Gzip],
            types: [
                "text/*",
                "application/json",
                "application/javascript",
                "application/xml",
                "application/xhtml+xml",
                "application/rss+xml",
                "application/atom+xml",
                "application/wasm",
                "image/svg+xml",
            ]
            .map(str::to_owned)
            .to_vec(),
            min_length: 256,
            level: None,
            decompress: true,
        }
    }
}

impl Compression {
    /// What to do to this response's body, with its head changed to match; an empty plan
    /// leaves it as it is.
    pub fn start(
        &self,
        method: &Method,
        request_headers: &HeaderMap,
        response: &mut http::response::Parts,
        body_length: Option<u64>,
    ) -> Plan {
        let status = response.status;
        if !crate::body::response_has_body(method, status) || status == StatusCode::PARTIAL_CONTENT
        {
            return Plan::default();
        }
        let headers = &response.headers;
        if headers.contains_key(header::CONTENT_RANGE)
            || has_token(headers, header::CACHE_CONTROL, "no-transform")
        {
            return Plan::default();
        }
        let mut plan = Plan::default();
        let mut length = body_length;
        if let Some(coding) = headers.get(header::CONTENT_ENCODING) {
            // Decoded only when this client cannot take it, and we can read it.
            let Some(upstream) = coding.to_str().ok().and_then(decodable) else {
                return Plan::default();
            };
            if !self.decompress || acceptance(request_headers, upstream.as_str()) > 0 {
                return Plan::default();
            }
            plan.decode = Some(Decoder::new(upstream));
            length = None;
            let headers = &mut response.headers;
            headers.remove(header::CONTENT_ENCODING);
            headers.remove(header::CONTENT_LENGTH);
            weaken_etag(headers);
            add_vary(headers);
        }
        if length.is_some_and(|length| length < self.min_length)
            || !self.compresses(response.headers.get(header::CONTENT_TYPE))
        {
            return plan;
        }
        // Whatever the answer to this client, a cache must key it by Accept-Encoding.
        add_vary(&mut response.headers);
        let Some(encoding) = choose(request_headers, &self.encodings) else {
            return plan;
        };
        let headers = &mut response.headers;
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(encoding.as_str()),
        );
        weaken_etag(headers);
        let level = self.level.unwrap_or_else(|| encoding.default_level());
        plan.encode = Some(Encoder::new(encoding, level));
        plan
    }

    fn compresses(&self, content_type: Option<&HeaderValue>) -> bool {
        let Some(media) = content_type.and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let media = media.split(';').next().unwrap_or("").trim();
        self.types
            .iter()
            .any(|listed| match listed.strip_suffix("/*") {
                Some(family) => media
                    .split_once('/')
                    .is_some_and(|(f, _)| f.eq_ignore_ascii_case(family)),
                None => media.eq_ignore_ascii_case(listed),
            })
    }
}

/// The coding a `Content-Encoding` names, when it is one we decode (one coding only: a
/// stack of them is passed on as it is).
fn decodable(coding: &str) -> Option<Encoding> {
    match coding.trim().to_ascii_lowercase().as_str() {
        "gzip" | "x-gzip" => Some(Encoding::Gzip),
        "br" => Some(Encoding::Brotli),
        "zstd" => Some(Encoding::Zstd),
        _ => None,
    }
}

/// The coding the client prefers among `ours` (RFC 9110 section 12.5.3): the highest q-value
/// it gives one of them, by name or by `*`; ties go to our order; q=0 refuses.
pub fn choose(request_headers: &HeaderMap, ours: &[Encoding]) -> Option<Encoding> {
    let mut best: Option<(Encoding, u16)> = None;
    for &encoding in ours {
        let q = acceptance(request_headers, encoding.as_str());
        if q > 0 && best.is_none_or(|(_, best_q)| q > best_q) {
            best = Some((encoding, q));
        }
    }
    best.map(|(encoding, _)| encoding)
}

/// The q-value (in thousandths) the client's Accept-Encoding gives `coding`: its own entry,
/// else `*`'s, else 0.
fn acceptance(headers: &HeaderMap, coding: &str) -> u16 {
    let mut wildcard = None;
    for value in headers.get_all(header::ACCEPT_ENCODING) {
        let Ok(value) = value.to_str() else { continue };
        for entry in value.split(',') {
            let mut parts = entry.split(';');
            let name = parts.next().unwrap_or("").trim();
            let q = parts
                .find_map(|p| {
                    let (key, value) = p.split_once('=')?;
                    key.trim()
                        .eq_ignore_ascii_case("q")
                        .then(|| parse_q(value.trim()))
                })
                .unwrap_or(Some(1000));
            let Some(q) = q else { continue };
            if name.eq_ignore_ascii_case(coding) {
                return q;
            }
            if name == "*" {
                wildcard = Some(q);
            }
        }
    }
    wildcard.unwrap_or(0)
}

/// `0`, `0.5`, `1.000`: thousandths, or None when not a q-value.
fn parse_q(text: &str) -> Option<u16> {
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let fraction: u16 = format!("{fraction:0<3}").parse().ok()?;
    match whole {
        "0" => Some(fraction),
        "1" if fraction == 0 => Some(1000),
        _ => None,
    }
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn add_vary(headers: &mut HeaderMap) {
    if !has_token(headers, header::VARY, "accept-encoding")
        && !has_token(headers, header::VARY, "*")
    {
        headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
}

/// A strong ETag says byte for byte: a body changed on its way keeps only a weak one.
pub(crate) fn weaken_etag(headers: &mut HeaderMap) {
    let Some(etag) = headers.get(header::ETAG) else {
        return;
    };
    if etag.as_bytes().starts_with(b"W/") {
        return;
    }
    let mut weak = b"W/".to_vec();
    weak.extend_from_slice(etag.as_bytes());
    if let Ok(weak) = HeaderValue::from_bytes(&weak) {
        headers.insert(header::ETAG, weak);
    }
}

/// A streaming encoder: bytes in, compressed bytes out as they come.
pub struct Encoder {
    coder: Coder,
    /// Input written since the last flush, which a flush would push out.
    unflushed: bool,
}

enum Coder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
    Done,
}

/// What brotli works in: its default window (4 MiB), and a buffer of this many bytes.
const BROTLI_BUFFER: usize = 4096;
const BROTLI_WINDOW: u32 = 22;

impl Encoder {
    pub fn new(encoding: Encoding, level: u32) -> Self {
        let coder = match encoding {
            Encoding::Gzip => Coder::Gzip(flate2::write::GzEncoder::new(
                Vec::new(),
                flate2::Compression::new(level.min(9)),
            )),
            Encoding::Brotli => Coder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                BROTLI_BUFFER,
                level.min(11),
                BROTLI_WINDOW,
            ))),
            Encoding::Zstd => Coder::Zstd(
                zstd::stream::write::Encoder::new(Vec::new(), level.min(19) as i32)
                    .expect("zstd accepts levels 1 to 19"),
            ),
        };
        Encoder {
            coder,
            unflushed: false,
        }
    }

    /// Compress `input`; its output waits in the coder (see [`Encoder::ready`]).
    pub fn write(&mut self, input: &[u8]) -> std::io::Result<()> {
        self.unflushed |= !input.is_empty();
        match &mut self.coder {
            Coder::Gzip(c) => c.write_all(input),
            Coder::Brotli(c) => c.write_all(input),
            Coder::Zstd(c) => c.write_all(input),
            Coder::Done => Ok(()),
        }
    }

    /// Push out everything written so far, so that a client waiting on a slow stream gets
    /// what it has (a sync flush: the stream goes on after it).
    pub fn flush(&mut self) -> std::io::Result<()> {
        if !self.unflushed {
            return Ok(());
        }
        self.unflushed = false;
        match &mut self.coder {
            Coder::Gzip(c) => c.flush(),
            Coder::Brotli(c) => c.flush(),
            Coder::Zstd(c) => c.flush(),
            Coder::Done => Ok(()),
        }
    }

    /// Bytes of output ready to be taken.
    pub fn ready(&mut self) -> usize {
        self.output().map_or(0, |out| out.len())
    }

    /// The output so far.
    pub fn take(&mut self) -> Bytes {
        self.output()
            .map(|out| Bytes::from(std::mem::take(out)))
            .unwrap_or_default()
    }

    fn output(&mut self) -> Option<&mut Vec<u8>> {
        match &mut self.coder {
            Coder::Gzip(c) => Some(c.get_mut()),
            Coder::Brotli(c) => Some(c.get_mut()),
            Coder::Zstd(c) => Some(c.get_mut()),
            Coder::Done => None,
        }
    }

    /// End the stream: the output not yet taken and the coder's last bytes (its trailer:
    /// gzip's CRC and length).
    pub fn finish(&mut self) -> std::io::Result<Bytes> {
        let out = match std::mem::replace(&mut self.coder, Coder::Done) {
            Coder::Gzip(c) => c.finish()?,
            Coder::Brotli(mut c) => {
                c.flush()?;
                c.into_inner()
            }
            Coder::Zstd(c) => c.finish()?,
            Coder::Done => Vec::new(),
        };
        Ok(Bytes::from(out))
    }
}

/// A streaming decoder whose output comes in pieces of at most [`DECODED_PIECE`] bytes,
/// whatever the input: a small compressed body can stand for gigabytes, and those are
/// streamed to the client as it reads them, never held.
pub struct Decoder {
    reader: Reader,
    /// The coded stream has ended.
    done: bool,
    /// Bytes came after its end: not part of it, and a client would take them for content.
    trailing: bool,
}

/// The most decoded output held at once (and the size of the frames it goes out in).
pub const DECODED_PIECE: usize = 16 * 1024;

enum Reader {
    Gzip(flate2::bufread::GzDecoder<Feed>),
    Brotli(Box<brotli::Decompressor<Feed>>),
    Zstd(zstd::stream::read::Decoder<'static, Feed>),
}

/// What the decoder says after being asked for output.
pub enum Decoded {
    /// Output (at most [`DECODED_PIECE`] bytes).
    Bytes(Bytes),
    /// It needs more input first.
    Hungry,
    /// The coded stream has ended.
    Done,
}

impl Decoder {
    pub fn new(encoding: Encoding) -> Self {
        let feed = Feed::default();
        let reader = match encoding {
            Encoding::Gzip => Reader::Gzip(flate2::bufread::GzDecoder::new(feed)),
            Encoding::Brotli => Reader::Brotli(Box::new(brotli::Decompressor::new(feed, 4096))),
            Encoding::Zstd => Reader::Zstd(
                zstd::stream::read::Decoder::with_buffer(feed).expect("zstd makes a decoder"),
            ),
        };
        Decoder {
            reader,
            done: false,
            trailing: false,
        }
    }

    /// Give the decoder more of the coded body.
    pub fn feed(&mut self, input: Bytes) {
        if input.is_empty() {
            return;
        }
        if self.done {
            self.trailing = true;
            return;
        }
        self.feed_mut().chunks.push_back(input);
    }

    /// The coded body has ended: what is left must decode to the end of its stream.
    pub fn end(&mut self) {
        self.feed_mut().ended = true;
    }

    /// As much output as is ready, up to [`DECODED_PIECE`] bytes.
    pub fn output(&mut self) -> std::io::Result<Decoded> {
        if self.done {
            return self.finished();
        }
        let mut piece = vec![0; DECODED_PIECE];
        let mut filled = 0;
        while filled < piece.len() {
            let read = match &mut self.reader {
                Reader::Gzip(r) => r.read(&mut piece[filled..]),
                Reader::Brotli(r) => r.read(&mut piece[filled..]),
                Reader::Zstd(r) => r.read(&mut piece[filled..]),
            };
            match read {
                Ok(0) => {
                    self.done = true;
                    // Brotli reads ahead into a buffer of its own, and tells of bytes left in
                    // it only when asked again.
                    let swallowed = match &mut self.reader {
                        Reader::Brotli(r) => r.read(&mut [0; 1]).is_err(),
                        _ => false,
                    };
                    let feed = self.feed_mut();
                    self.trailing = swallowed || feed.chunks.iter().any(|chunk| !chunk.is_empty());
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if filled > 0 {
            piece.truncate(filled);
            return Ok(Decoded::Bytes(Bytes::from(piece)));
        }
        if self.done {
            return self.finished();
        }
        Ok(Decoded::Hungry)
    }

    fn finished(&self) -> std::io::Result<Decoded> {
        if self.trailing {
            return Err(std::io::Error::other(
                "data after the end of the coded body",
            ));
        }
        Ok(Decoded::Done)
    }

    fn feed_mut(&mut self) -> &mut Feed {
        match &mut self.reader {
            Reader::Gzip(r) => r.get_mut(),
            Reader::Brotli(r) => r.get_mut(),
            Reader::Zstd(r) => r.get_mut(),
        }
    }
}

/// The coded bytes received so far, read by a decoder: `WouldBlock` while more may come,
/// the end of input once the body has ended.
#[derive(Default)]
struct Feed {
    chunks: VecDeque<Bytes>,
    ended: bool,
}

impl Read for Feed {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(out.len());
        out[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Feed {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.chunks.front().is_some_and(Bytes::is_empty) {
            self.chunks.pop_front();
        }
        match self.chunks.front() {
            Some(chunk) => Ok(chunk),
            None if self.ended => Ok(&[]),
            None => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }

    fn consume(&mut self, n: usize) {
        if let Some(chunk) = self.chunks.front_mut() {
            bytes::Buf::advance(chunk, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn accept(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(value).unwrap(),
        );
        headers
    }

    const ALL: [Encoding; 3] = [Encoding::Zstd, Encoding::Brotli, Encoding::Gzip];

    #[test]
    fn the_client_s_q_values_come_first_then_our_order() {
        assert_eq!(choose(&accept("gzip, br"), &ALL), Some(Encoding::Brotli));
        assert_eq!(
            choose(&accept("gzip;q=1, br;q=0.5"), &ALL),
            Some(Encoding::Gzip)
        );
        assert_eq!(choose(&accept("*"), &ALL), Some(Encoding::Zstd));
        assert_eq!(
            choose(&accept("*;q=0.1, zstd;q=0"), &ALL),
            Some(Encoding::Brotli)
        );
        assert_eq!(choose(&accept("identity"), &ALL), None);
        assert_eq!(choose(&accept("gzip;q=0"), &ALL), None);
        assert_eq!(choose(&HeaderMap::new(), &ALL), None);
        assert_eq!(choose(&accept("GZIP;Q=0.8"), &ALL), Some(Encoding::Gzip));
        // A malformed q-value is skipped, not read as 1.
        assert_eq!(choose(&accept("br;q=2, gzip"), &ALL), Some(Encoding::Gzip));
    }

    fn response(content_type: &str) -> http::response::Parts {
        let mut parts = http::Response::new(()).into_parts().0;
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_str(content_type).unwrap(),
        );
        parts
            .headers
            .insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("10000"));
        parts
    }

    #[test]
    fn a_compressed_head_says_so() {
        let config = Compression::default();
        let mut head = response("text/html; charset=utf-8");
        let plan = config.start(&Method::GET, &accept("gzip"), &mut head, Some(10_000));
        assert!(plan.encode.is_some() && plan.decode.is_none());
        assert_eq!(head.headers["content-encoding"], "gzip");
        assert_eq!(head.headers["vary"], "Accept-Encoding");
        assert_eq!(head.headers["etag"], "W/\"v1\"");
        assert!(!head.headers.contains_key("content-length"));
    }

    #[test]
    fn what_is_left_alone() {
        let config = Compression::default();
        let gzip = accept("gzip");
        let none = |head: &mut http::response::Parts, method: Method, length: Option<u64>| {
            let plan = config.start(&method, &gzip, head, length);
            plan.encode.is_none() && plan.decode.is_none()
        };
        assert!(none(&mut response("image/png"), Method::GET, Some(10_000)));
        assert!(none(&mut response("text/plain"), Method::GET, Some(100)));
        assert!(none(
            &mut response("text/plain"),
            Method::HEAD,
            Some(10_000)
        ));
        // Already in a coding the client takes.
        let mut encoded = response("text/plain");
        encoded
            .headers
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        assert!(none(&mut encoded, Method::GET, Some(10_000)));
        let mut no_transform = response("text/plain");
        no_transform.headers.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, no-transform"),
        );
        assert!(none(&mut no_transform, Method::GET, Some(10_000)));
        let mut not_modified = response("text/plain");
        not_modified.status = StatusCode::NOT_MODIFIED;
        assert!(none(&mut not_modified, Method::GET, None));
        // A client that takes none still makes the response vary by what it sent.
        let mut refused = response("text/plain");
        assert!(config
            .start(
                &Method::GET,
                &accept("identity"),
                &mut refused,
                Some(10_000)
            )
            .encode
            .is_none());
        assert_eq!(refused.headers["vary"], "Accept-Encoding");
        assert_eq!(refused.headers["etag"], "\"v1\"");
    }

    #[test]
    fn a_coding_the_client_does_not_take_is_decoded_and_encoded_again() {
        let config = Compression::default();
        let mut head = response("text/plain");
        head.headers
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
        let plan = config.start(&Method::GET, &accept("gzip"), &mut head, Some(10_000));
        assert!(plan.decode.is_some() && plan.encode.is_some());
        assert_eq!(head.headers["content-encoding"], "gzip");
        // A client that takes no coding gets it plain.
        let mut head = response("text/plain");
        head.headers
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd"));
        let plan = config.start(&Method::GET, &HeaderMap::new(), &mut head, Some(10_000));
        assert!(plan.decode.is_some() && plan.encode.is_none());
        assert!(!head.headers.contains_key("content-encoding"));
        assert!(!head.headers.contains_key("content-length"));
        // One we cannot read is passed on as it is.
        let mut head = response("text/plain");
        head.headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static("gzip, br"),
        );
        let plan = config.start(&Method::GET, &HeaderMap::new(), &mut head, Some(10_000));
        assert!(plan.decode.is_none() && plan.encode.is_none());
    }

    /// `data` encoded whole in `encoding`.
    fn encoded(encoding: Encoding, data: &[u8]) -> Vec<u8> {
        let mut encoder = Encoder::new(encoding, encoding.default_level());
        encoder.write(data).unwrap();
        let mut out = encoder.take().to_vec();
        out.extend_from_slice(&encoder.finish().unwrap());
        out
    }

    /// Feed `coded` in `chunk`-byte pieces, draining as it goes; the output and its largest
    /// piece.
    fn decode_in_pieces(
        encoding: Encoding,
        coded: &[u8],
        chunk: usize,
    ) -> std::io::Result<(Vec<u8>, usize)> {
        let mut decoder = Decoder::new(encoding);
        let mut out = Vec::new();
        let mut largest = 0;
        let mut drain = |decoder: &mut Decoder, out: &mut Vec<u8>| -> std::io::Result<bool> {
            loop {
                match decoder.output()? {
                    Decoded::Bytes(bytes) => {
                        largest = largest.max(bytes.len());
                        out.extend_from_slice(&bytes);
                    }
                    Decoded::Hungry => return Ok(false),
                    Decoded::Done => return Ok(true),
                }
            }
        };
        for piece in coded.chunks(chunk) {
            decoder.feed(Bytes::copy_from_slice(piece));
            drain(&mut decoder, &mut out)?;
        }
        decoder.end();
        assert!(drain(&mut decoder, &mut out)?, "not done at the end");
        Ok((out, largest))
    }

    #[test]
    fn decoding_streams_in_bounded_pieces() {
        // 64 MiB of zeros: a few kilobytes coded; never more than a piece decoded at once.
        let zeros = vec![0u8; 64 << 20];
        for encoding in ALL {
            let coded = encoded(encoding, &zeros);
            assert!(coded.len() < 1 << 20, "{encoding:?}: {}", coded.len());
            let (out, largest) = decode_in_pieces(encoding, &coded, 1000)
                .unwrap_or_else(|e| panic!("{encoding:?}: {e}"));
            assert!(out.len() == zeros.len(), "{encoding:?}");
            assert!(largest <= DECODED_PIECE, "{encoding:?}: {largest}");
        }
    }

    #[test]
    fn truncated_or_trailing_input_is_an_error() {
        let text = b"some text that compresses ".repeat(1000);
        for encoding in ALL {
            let coded = encoded(encoding, &text);
            let (out, _) = decode_in_pieces(encoding, &coded, 7).unwrap();
            assert!(out == text, "{encoding:?}");
            let truncated = &coded[..coded.len() - 4];
            assert!(
                decode_in_pieces(encoding, truncated, 100).is_err(),
                "{encoding:?} truncated"
            );
            let mut trailing = coded.clone();
            trailing.extend_from_slice(b"junk after the end");
            assert!(
                decode_in_pieces(encoding, &trailing, 100).is_err(),
                "{encoding:?} trailing"
            );
        }
    }

    fn round_trip(encoding: Encoding) {
        let text: Vec<u8> = (0..200_000u32)
            .flat_map(|i| format!("line {i} of the body\n").into_bytes())
            .collect();
        let mut encoder = Encoder::new(encoding, encoding.default_level());
        let mut compressed = Vec::new();
        for chunk in text.chunks(7000) {
            encoder.write(chunk).unwrap();
            if chunk[0] % 3 == 0 {
                encoder.flush().unwrap();
            }
            compressed.extend_from_slice(&encoder.take());
        }
        compressed.extend_from_slice(&encoder.finish().unwrap());
        assert!(
            compressed.len() < text.len() / 4,
            "{encoding:?}: {}",
            compressed.len()
        );
        let mut decoded = Vec::new();
        match encoding {
            Encoding::Gzip => flate2::read::GzDecoder::new(&compressed[..])
                .read_to_end(&mut decoded)
                .unwrap(),
            Encoding::Brotli => brotli::Decompressor::new(&compressed[..], 4096)
                .read_to_end(&mut decoded)
                .unwrap(),
            Encoding::Zstd => zstd::stream::read::Decoder::new(&compressed[..])
                .unwrap()
                .read_to_end(&mut decoded)
                .unwrap(),
        };
        assert!(decoded == text, "{encoding:?} did not round-trip");
    }

    #[test]
    fn each_encoding_round_trips_with_flushes_between() {
        for encoding in ALL {
            round_trip(encoding);
        }
    }
}
