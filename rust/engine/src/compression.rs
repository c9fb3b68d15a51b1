//! Response compression: gzip, brotli or zstd, chosen by the client's `Accept-Encoding`
//! (q-values first, then our order of preference), for the content types and sizes the user
//! set, streamed frame by frame.
//!
//! Left alone: responses to HEAD, statuses without a body (1xx, 204, 304) and partial ones
//! (206), bodies already encoded, `Cache-Control: no-transform`, types not listed, and
//! bodies whose known length is below `min_length`. A compressed response loses its
//! Content-Length, says `Vary: Accept-Encoding`, and its ETag is weakened (`W/"..."`): the
//! bytes are no longer the upstream's, byte for byte (RFC 9110 section 8.8.1).

use std::io::Write;

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
        }
    }
}

impl Compression {
    /// The encoder for this response, with its head changed to match; None to leave it as it
    /// is.
    pub fn start(
        &self,
        method: &Method,
        request_headers: &HeaderMap,
        response: &mut http::response::Parts,
        body_length: Option<u64>,
    ) -> Option<Encoder> {
        let status = response.status;
        if *method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status == StatusCode::PARTIAL_CONTENT
        {
            return None;
        }
        let headers = &response.headers;
        if headers.contains_key(header::CONTENT_ENCODING)
            || headers.contains_key(header::CONTENT_RANGE)
            || has_token(headers, header::CACHE_CONTROL, "no-transform")
            || body_length.is_some_and(|length| length < self.min_length)
            || !self.compresses(headers.get(header::CONTENT_TYPE))
        {
            return None;
        }
        // Whatever the answer to this client, a cache must key it by Accept-Encoding.
        add_vary(&mut response.headers);
        let encoding = choose(request_headers, &self.encodings)?;
        let headers = &mut response.headers;
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(
            header::CONTENT_ENCODING,
            HeaderValue::from_static(encoding.as_str()),
        );
        weaken_etag(headers);
        let level = self.level.unwrap_or_else(|| encoding.default_level());
        Some(Encoder::new(encoding, level))
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

fn weaken_etag(headers: &mut HeaderMap) {
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
        let encoder = config.start(&Method::GET, &accept("gzip"), &mut head, Some(10_000));
        assert!(encoder.is_some());
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
            config.start(&method, &gzip, head, length).is_none()
        };
        assert!(none(&mut response("image/png"), Method::GET, Some(10_000)));
        assert!(none(&mut response("text/plain"), Method::GET, Some(100)));
        assert!(none(
            &mut response("text/plain"),
            Method::HEAD,
            Some(10_000)
        ));
        let mut encoded = response("text/plain");
        encoded
            .headers
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("br"));
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
            .is_none());
        assert_eq!(refused.headers["vary"], "Accept-Encoding");
        assert_eq!(refused.headers["etag"], "\"v1\"");
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
