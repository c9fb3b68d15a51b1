//! The access log: one line per request, formatted on the worker that served the request
//! and written by a thread of its own, so a worker never does file I/O nor waits on a disk.
//!
//! Formats: nginx's `combined`, `json` (one object per line), or a template of field names
//! such as `{client} {method} {path} {status} {duration}`. Targets: stdout or a file, which
//! [`AccessLog::reopen`] reopens after a log rotation renamed it.
//!
//! Times are UTC (`+0000` in `combined`): the standard library cannot tell the local
//! offset, `localtime_r` is unsound while another thread may change the environment, and
//! parsing the TZ database ourselves is more than a log line is worth.

use std::cell::RefCell;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Method, Uri, Version};
use parking_lot::{Condvar, Mutex};

/// The writer writes a batch this long after its first line at the latest...
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// ... or as soon as this much is waiting.
const FLUSH_SIZE: usize = 64 * 1024;
/// Past this much waiting to be written (a stalled disk or pipe), lines are dropped and
/// counted rather than queued.
const MAX_BACKLOG: usize = 4 * 1024 * 1024;
/// A worker's line buffer is freed after a line longer than this (a huge header).
const LINE_CAPACITY_KEPT: usize = 16 * 1024;

/// Where access-log lines go. Default: stdout, as a program run in a terminal or under a
/// supervisor is expected to log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessLogTarget {
    Off,
    #[default]
    Stdout,
    File(PathBuf),
}

impl AccessLogTarget {
    /// `-` is stdout, `off` no access log, anything else a file path.
    pub fn parse(text: &str) -> Self {
        AccessLogTarget::from(PathBuf::from(text))
    }

    /// The text `parse` reads back: `-`, `off` or the path.
    pub fn spec(&self) -> std::borrow::Cow<'_, str> {
        match self {
            AccessLogTarget::Off => "off".into(),
            AccessLogTarget::Stdout => "-".into(),
            AccessLogTarget::File(path) => path.to_string_lossy(),
        }
    }
}

impl From<PathBuf> for AccessLogTarget {
    fn from(path: PathBuf) -> Self {
        match path.to_str() {
            Some("-") => AccessLogTarget::Stdout,
            Some("off") => AccessLogTarget::Off,
            _ => AccessLogTarget::File(path),
        }
    }
}

/// How an [`AccessRecord`] becomes a line. Default: nginx's `combined`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessLogFormat {
    /// nginx's `combined`, byte for byte: `$remote_addr - $remote_user [$time_local]
    /// "$request" $status $body_bytes_sent "$http_referer" "$http_user_agent"`.
    #[default]
    Combined,
    /// One JSON object per line, a key for every field (see [`AccessLogFormat::FIELDS`]).
    Json,
    /// Text with `{field}`s, each printed as its JSON value is, unquoted, `-` when missing,
    /// escaped as nginx escapes (`"`, `\` and bytes outside 0x20..=0x7e as `\xHH`).
    Template(Template),
}

impl AccessLogFormat {
    /// What `parse` reads as the default format.
    pub const DEFAULT_NAME: &'static str = "combined";

    /// The field names, in the order of the JSON keys.
    pub const FIELDS: [&'static str; 15] = [
        "time",
        "client",
        "method",
        "path",
        "query",
        "protocol",
        "status",
        "bytes",
        "upstream",
        "upstream_time",
        "duration",
        "request_id",
        "user_agent",
        "referer",
        "error",
    ];

    /// `combined`, `json`, or a template naming at least one field; `{{` and `}}` are
    /// literal braces. The error names what is wrong and lists the field names.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            AccessLogFormat::DEFAULT_NAME => Ok(AccessLogFormat::Combined),
            "json" => Ok(AccessLogFormat::Json),
            template => Template::parse(template).map(AccessLogFormat::Template),
        }
    }

    /// Append `record`'s line, newline included, to `out`.
    pub fn write_line(&self, record: &AccessRecord<'_>, out: &mut Vec<u8>) {
        match self {
            AccessLogFormat::Combined => write_combined(record, out),
            AccessLogFormat::Json => write_json(record, out),
            AccessLogFormat::Template(template) => template.write(record, out),
        }
        out.push(b'\n');
    }
}

/// A parsed template: literal text and fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Piece>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Field(Field),
}

impl Template {
    fn parse(text: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find(['{', '}']) {
            literal.push_str(&rest[..at]);
            let brace = &rest[at..=at];
            let after = &rest[at + 1..];
            if let Some(doubled) = after.strip_prefix(brace) {
                literal.push_str(brace);
                rest = doubled;
                continue;
            }
            if brace == "}" {
                return Err(format!(
                    "unmatched }} in access log format {text:?} (write }}}} for a literal brace)"
                ));
            }
            let end = after.find('}').ok_or_else(|| {
                format!(
                    "unclosed {{ in access log format {text:?} (write {{{{ for a literal brace)"
                )
            })?;
            let name = &after[..end];
            let field = Field::from_name(name).ok_or_else(|| {
                format!(
                    "unknown field {{{name}}} in access log format {text:?}; the fields are {}",
                    field_list()
                )
            })?;
            if !literal.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut literal)));
            }
            pieces.push(Piece::Field(field));
            rest = &after[end + 1..];
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        if !pieces.iter().any(|p| matches!(p, Piece::Field(_))) {
            return Err(format!(
                "access log format {text:?} is not combined, json, nor a template naming a \
                 field such as {{status}}; the fields are {}",
                field_list()
            ));
        }
        Ok(Template(pieces))
    }

    fn write(&self, record: &AccessRecord<'_>, out: &mut Vec<u8>) {
        for piece in &self.0 {
            match piece {
                Piece::Text(text) => out.extend_from_slice(text.as_bytes()),
                Piece::Field(field) => field.value(record).write_unquoted(out),
            }
        }
    }
}

fn field_list() -> String {
    AccessLogFormat::FIELDS.join(", ")
}

/// One request, as the access log reports it.
#[derive(Debug, Clone, Copy)]
pub struct AccessRecord<'a> {
    /// When the request arrived.
    pub time: SystemTime,
    pub client: SocketAddr,
    pub method: &'a Method,
    /// The request target as the client sent it (`combined` prints it as received; HTTP/2
    /// requests, which have no request line, as path and query, as nginx does).
    pub uri: &'a Uri,
    pub protocol: Version,
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes: u64,
    /// The upstream's `host:port`, once one was chosen.
    pub upstream: Option<&'a str>,
    /// From sending the request upstream (on a connection already open) to the response head.
    pub upstream_time: Option<Duration>,
    /// From the request's arrival to the end of its response.
    pub duration: Duration,
    pub request_id: Option<&'a [u8]>,
    pub user_agent: Option<&'a [u8]>,
    pub referer: Option<&'a [u8]>,
    /// Why the request failed: the error kind's short code.
    pub error: Option<&'a str>,
}

/// What the access log needs of a request as it arrived. Taken before the phases run:
/// hooks may rewrite the session's request (and the Python layer lends it out while a hook
/// runs), but the log reports what the client sent.
#[derive(Debug, Clone)]
pub struct Arrival {
    pub time: SystemTime,
    pub method: Method,
    pub uri: Uri,
    pub protocol: Version,
    /// The `x-request-id` request header.
    pub request_id: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    pub referer: Option<HeaderValue>,
}

impl Arrival {
    pub fn new(req: &http::request::Parts) -> Self {
        Arrival {
            time: SystemTime::now(),
            method: req.method.clone(),
            uri: req.uri.clone(),
            protocol: req.version,
            request_id: req.headers.get("x-request-id").cloned(),
            user_agent: req.headers.get(http::header::USER_AGENT).cloned(),
            referer: req.headers.get(http::header::REFERER).cloned(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Time,
    Client,
    Method,
    Path,
    Query,
    Protocol,
    Status,
    Bytes,
    Upstream,
    UpstreamTime,
    Duration,
    RequestId,
    UserAgent,
    Referer,
    Error,
}

impl Field {
    /// In the order of [`AccessLogFormat::FIELDS`].
    const ALL: [Field; 15] = [
        Field::Time,
        Field::Client,
        Field::Method,
        Field::Path,
        Field::Query,
        Field::Protocol,
        Field::Status,
        Field::Bytes,
        Field::Upstream,
        Field::UpstreamTime,
        Field::Duration,
        Field::RequestId,
        Field::UserAgent,
        Field::Referer,
        Field::Error,
    ];

    fn name(self) -> &'static str {
        AccessLogFormat::FIELDS[self as usize]
    }

    fn from_name(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|field| field.name() == name)
    }

    fn value<'a>(self, record: &AccessRecord<'a>) -> Value<'a> {
        let text = |text: Option<&'a [u8]>| text.map_or(Value::Missing, Value::Text);
        match self {
            Field::Time => Value::Seconds(since_epoch(record.time), 3),
            Field::Client => Value::Ip(record.client.ip().to_canonical()),
            Field::Method => Value::Text(record.method.as_str().as_bytes()),
            Field::Path => Value::Text(record.uri.path().as_bytes()),
            Field::Query => text(record.uri.query().map(str::as_bytes)),
            Field::Protocol => Value::Text(protocol_name(record.protocol).as_bytes()),
            Field::Status => Value::Number(record.status.into()),
            Field::Bytes => Value::Number(record.bytes),
            Field::Upstream => text(record.upstream.map(str::as_bytes)),
            Field::UpstreamTime => record
                .upstream_time
                .map_or(Value::Missing, |t| Value::Seconds(t, 6)),
            Field::Duration => Value::Seconds(record.duration, 6),
            Field::RequestId => text(record.request_id),
            Field::UserAgent => text(record.user_agent),
            Field::Referer => text(record.referer),
            Field::Error => text(record.error.map(str::as_bytes)),
        }
    }
}

enum Value<'a> {
    Missing,
    Text(&'a [u8]),
    Ip(IpAddr),
    Number(u64),
    /// Seconds with this many decimals.
    Seconds(Duration, usize),
}

impl Value<'_> {
    /// As a template prints it: `-` when missing, text escaped as nginx does.
    fn write_unquoted(&self, out: &mut Vec<u8>) {
        match *self {
            Value::Missing => out.push(b'-'),
            Value::Text(text) => push_nginx_escaped(out, text),
            Value::Ip(ip) => {
                let _ = write!(out, "{ip}");
            }
            Value::Number(n) => push_digits(out, n, 1),
            Value::Seconds(duration, decimals) => {
                push_digits(out, duration.as_secs(), 1);
                out.push(b'.');
                let fraction = u64::from(duration.subsec_nanos()) / 10u64.pow(9 - decimals as u32);
                push_digits(out, fraction, decimals);
            }
        }
    }
}

fn write_combined(record: &AccessRecord<'_>, out: &mut Vec<u8>) {
    Value::Ip(record.client.ip().to_canonical()).write_unquoted(out);
    out.extend_from_slice(b" - - [");
    push_time_local(out, record.time);
    out.extend_from_slice(b"] \"");
    push_nginx_escaped(out, record.method.as_str().as_bytes());
    out.push(b' ');
    match record.uri.path_and_query() {
        Some(origin) if record.protocol >= Version::HTTP_2 || record.uri.authority().is_none() => {
            push_nginx_escaped(out, origin.as_str().as_bytes());
        }
        // Absolute-form (or authority-form) as the client sent it.
        _ => push_nginx_escaped(out, record.uri.to_string().as_bytes()),
    }
    out.push(b' ');
    out.extend_from_slice(protocol_name(record.protocol).as_bytes());
    out.extend_from_slice(b"\" ");
    push_digits(out, record.status.into(), 1);
    out.push(b' ');
    push_digits(out, record.bytes, 1);
    for header in [record.referer, record.user_agent] {
        out.extend_from_slice(b" \"");
        match header {
            Some(value) => push_nginx_escaped(out, value),
            None => out.push(b'-'),
        }
        out.push(b'"');
    }
}

fn write_json(record: &AccessRecord<'_>, out: &mut Vec<u8>) {
    out.push(b'{');
    for (i, field) in Field::ALL.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(field.name().as_bytes());
        out.extend_from_slice(b"\":");
        match field.value(record) {
            Value::Missing => out.extend_from_slice(b"null"),
            Value::Text(text) => push_json_string(out, text),
            value @ Value::Ip(_) => {
                out.push(b'"');
                value.write_unquoted(out);
                out.push(b'"');
            }
            value => value.write_unquoted(out),
        }
    }
    out.push(b'}');
}

/// nginx's names: HTTP/2 is `HTTP/2.0`.
fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "-",
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// nginx's escaping of logged variables: `"`, `\` and bytes outside 0x20..=0x7e as `\xHH`.
fn push_nginx_escaped(out: &mut Vec<u8>, text: &[u8]) {
    let mut plain = 0;
    for (i, &byte) in text.iter().enumerate() {
        if !(0x20..=0x7e).contains(&byte) || byte == b'"' || byte == b'\\' {
            out.extend_from_slice(&text[plain..i]);
            out.extend_from_slice(&[
                b'\\',
                b'x',
                HEX_UPPER[usize::from(byte >> 4)],
                HEX_UPPER[usize::from(byte & 0xf)],
            ]);
            plain = i + 1;
        }
    }
    out.extend_from_slice(&text[plain..]);
}

/// A JSON string. Bytes that are not UTF-8 (possible in header values) become U+FFFD.
fn push_json_string(out: &mut Vec<u8>, text: &[u8]) {
    let text = String::from_utf8_lossy(text);
    let text = text.as_bytes();
    out.push(b'"');
    let mut plain = 0;
    for (i, &byte) in text.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..0x20 | 0x7f => b"",
            _ => continue,
        };
        out.extend_from_slice(&text[plain..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX_UPPER[usize::from(byte >> 4)]);
            out.push(HEX_UPPER[usize::from(byte & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        plain = i + 1;
    }
    out.extend_from_slice(&text[plain..]);
    out.push(b'"');
}

/// `n` in decimal, zero-padded to `min_width` digits (at most 20).
fn push_digits(out: &mut Vec<u8>, mut n: u64, min_width: usize) {
    let mut digits = [b'0'; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 && digits.len() - start >= min_width {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

fn since_epoch(time: SystemTime) -> Duration {
    time.duration_since(UNIX_EPOCH).unwrap_or_default()
}

thread_local! {
    /// The last second `$time_local` was formatted for on this thread, and its text: every
    /// line within that second reuses it.
    static TIME_LOCAL: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    /// Each worker formats its lines here before copying them to the shared backlog.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// nginx's `$time_local`, in UTC: `01/Dec/2026:21:45:34 +0000`.
fn push_time_local(out: &mut Vec<u8>, time: SystemTime) {
    let second = since_epoch(time).as_secs();
    let cached = TIME_LOCAL.try_with(|cache| {
        let (cached_second, text) = &mut *cache.borrow_mut();
        if *cached_second != second {
            text.clear();
            format_time_local(second, text);
            *cached_second = second;
        }
        out.extend_from_slice(text);
    });
    if cached.is_err() {
        // This thread's locals are being torn down.
        format_time_local(second, out);
    }
}

fn format_time_local(unix_seconds: u64, out: &mut Vec<u8>) {
    const MONTHS: [&[u8; 3]; 12] = [
        b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov",
        b"Dec",
    ];
    let (year, month, day) = civil_from_days(unix_seconds / 86_400);
    let of_day = unix_seconds % 86_400;
    push_digits(out, day, 2);
    out.push(b'/');
    out.extend_from_slice(MONTHS[(month - 1) as usize]);
    out.push(b'/');
    push_digits(out, year, 4);
    for part in [of_day / 3600, of_day / 60 % 60, of_day % 60] {
        out.push(b':');
        push_digits(out, part, 2);
    }
    out.extend_from_slice(b" +0000");
}

/// (year, month 1..=12, day 1..=31) of a day counted from 1970-01-01: Howard Hinnant's
/// `civil_from_days`, for days on or after the epoch.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let march_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * march_month + 2) / 5 + 1;
    let month = if march_month < 10 {
        march_month + 3
    } else {
        march_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// A running access log. Workers call [`AccessLog::log`]; a writer thread writes.
pub struct AccessLog {
    format: AccessLogFormat,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    target: String,
}

struct Shared {
    backlog: Mutex<Backlog>,
    /// The writer waits here for lines, or for a reopen, flush or close.
    wake: Condvar,
    /// `flush` waits here for the writer to catch up.
    written: Condvar,
}

struct Backlog {
    lines: Vec<u8>,
    /// Lines queued so far, and how many of those the writer is done with.
    queued: u64,
    written: u64,
    /// Lines dropped in all, and since the writer last reported them.
    dropped: u64,
    unreported_drops: u64,
    /// Where in `lines` a reopen was asked for: the lines before it go to the old file.
    reopen_at: Option<usize>,
    flush_wanted: bool,
    closing: bool,
    writer_alive: bool,
}

impl Backlog {
    fn needs_writer_now(&self) -> bool {
        self.reopen_at.is_some() || self.flush_wanted || self.closing
    }
}

impl AccessLog {
    /// Start an access log; `Ok(None)` for [`AccessLogTarget::Off`]. A file is opened here
    /// (appending, created if missing), and an error names its path.
    pub fn open(
        target: &AccessLogTarget,
        format: AccessLogFormat,
    ) -> io::Result<Option<Arc<AccessLog>>> {
        let output = match target {
            AccessLogTarget::Off => return Ok(None),
            AccessLogTarget::Stdout => Output::Stdout,
            AccessLogTarget::File(path) => {
                // A reopen finds the same file even if the working directory changed.
                let path = std::path::absolute(path).unwrap_or_else(|_| path.clone());
                Output::File {
                    file: open_append(&path)?,
                    path,
                }
            }
        };
        AccessLog::start(output, format).map(Some)
    }

    /// An access log written to `writer` (a pipe, a socket, a test's buffer); `reopen`
    /// does nothing to it.
    pub fn with_writer(
        writer: impl Write + Send + 'static,
        format: AccessLogFormat,
    ) -> io::Result<Arc<AccessLog>> {
        AccessLog::start(Output::Writer(Box::new(writer)), format)
    }

    fn start(output: Output, format: AccessLogFormat) -> io::Result<Arc<AccessLog>> {
        let shared = Arc::new(Shared {
            backlog: Mutex::new(Backlog {
                lines: Vec::with_capacity(FLUSH_SIZE),
                queued: 0,
                written: 0,
                dropped: 0,
                unreported_drops: 0,
                reopen_at: None,
                flush_wanted: false,
                closing: false,
                writer_alive: true,
            }),
            wake: Condvar::new(),
            written: Condvar::new(),
        });
        let target = output.to_string();
        let writer = std::thread::Builder::new()
            .name("ferroxy-access-log".into())
            .spawn({
                let shared = shared.clone();
                move || write_lines(&shared, output)
            })?;
        Ok(Arc::new(AccessLog {
            format,
            shared,
            writer: Some(writer),
            target,
        }))
    }

    /// Queue `record`'s line. Formats on the calling thread and holds a lock only to copy
    /// the line; never waits for the writer. Past the backlog cap the line is dropped (the
    /// writer reports how many).
    pub fn log(&self, record: &AccessRecord<'_>) {
        let queued = LINE.try_with(|line| self.queue(record, &mut line.borrow_mut()));
        if queued.is_err() {
            self.queue(record, &mut Vec::new());
        }
    }

    fn queue(&self, record: &AccessRecord<'_>, line: &mut Vec<u8>) {
        line.clear();
        self.format.write_line(record, line);
        let wake = {
            let mut backlog = self.shared.backlog.lock();
            let before = backlog.lines.len();
            if before + line.len() > MAX_BACKLOG {
                backlog.dropped += 1;
                backlog.unreported_drops += 1;
                false
            } else {
                backlog.lines.extend_from_slice(line);
                backlog.queued += 1;
                // The writer sleeps while there is nothing to write, and waits for a batch
                // to gather unless it is big already.
                before == 0 || (before < FLUSH_SIZE && backlog.lines.len() >= FLUSH_SIZE)
            }
        };
        if wake {
            self.shared.wake.notify_one();
        }
        if line.capacity() > LINE_CAPACITY_KEPT {
            *line = Vec::new();
        }
    }

    /// Reopen the file at the same path (for logrotate, on SIGUSR1): the lines logged
    /// before this call go to the old file, the ones after to the new. A file that cannot
    /// be reopened is reported and the old one kept. Returns at once.
    pub fn reopen(&self) {
        let mut backlog = self.shared.backlog.lock();
        backlog.reopen_at = Some(backlog.lines.len());
        drop(backlog);
        self.shared.wake.notify_one();
    }

    /// Block until every line logged before this call is written (or its write failed).
    pub fn flush(&self) {
        self.flush_within(Duration::MAX);
    }

    /// [`AccessLog::flush`], waiting at most `limit`; false if lines were still unwritten
    /// then (a disk or a stdout pipe that stopped taking them).
    pub fn flush_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now().checked_add(limit);
        let mut backlog = self.shared.backlog.lock();
        let target = backlog.queued;
        if backlog.written >= target {
            return true;
        }
        backlog.flush_wanted = true;
        self.shared.wake.notify_one();
        while backlog.written < target && backlog.writer_alive {
            match deadline {
                Some(deadline) => {
                    if self
                        .shared
                        .written
                        .wait_until(&mut backlog, deadline)
                        .timed_out()
                    {
                        return backlog.written >= target;
                    }
                }
                None => self.shared.written.wait(&mut backlog),
            }
        }
        backlog.written >= target
    }

    /// Lines dropped so far because the backlog was over its cap.
    pub fn dropped(&self) -> u64 {
        self.shared.backlog.lock().dropped
    }
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLog")
            .field("target", &self.target)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl Drop for AccessLog {
    /// Writes what is left and ends the writer; a writer stuck on its output for longer than
    /// [`FLUSH_LIMIT`] is left to end on its own rather than hang whoever dropped the log.
    fn drop(&mut self) {
        let flushed = self.flush_within(FLUSH_LIMIT);
        self.shared.backlog.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            if flushed {
                let _ = writer.join();
            }
        }
    }
}

/// Longest a stop waits for the access log's last lines to be written.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(5);

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open the access log {}: {e}", path.display()),
            )
        })
}

enum Output {
    Stdout,
    File { path: PathBuf, file: File },
    Writer(Box<dyn Write + Send>),
}

impl Output {
    fn write(&mut self, lines: &[u8]) -> io::Result<()> {
        match self {
            Output::Stdout => {
                let mut stdout = io::stdout().lock();
                stdout.write_all(lines)?;
                stdout.flush()
            }
            Output::File { file, .. } => file.write_all(lines),
            Output::Writer(writer) => {
                writer.write_all(lines)?;
                writer.flush()
            }
        }
    }

    fn reopen(&mut self) -> io::Result<()> {
        if let Output::File { path, file } = self {
            *file = open_append(path)?;
        }
        Ok(())
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Output::Stdout => f.write_str("stdout"),
            Output::File { path, .. } => write!(f, "{}", path.display()),
            Output::Writer(_) => f.write_str("its writer"),
        }
    }
}

/// The writer thread: waits for lines, lets a batch gather for up to FLUSH_INTERVAL (less
/// when it grows past FLUSH_SIZE or someone waits), writes it, and goes on until closed.
fn write_lines(shared: &Shared, mut output: Output) {
    struct Alive<'a>(&'a Shared);
    impl Drop for Alive<'_> {
        // Even if a write panics, `flush` must not wait for a writer that is gone.
        fn drop(&mut self) {
            self.0.backlog.lock().writer_alive = false;
            self.0.written.notify_all();
        }
    }
    let _alive = Alive(shared);
    let mut batch = Vec::with_capacity(FLUSH_SIZE);
    let mut failure = WriteFailure::default();
    loop {
        let mut backlog = shared.backlog.lock();
        while backlog.lines.is_empty() && !backlog.needs_writer_now() {
            shared.wake.wait(&mut backlog);
        }
        let deadline = Instant::now() + FLUSH_INTERVAL;
        while backlog.lines.len() < FLUSH_SIZE && !backlog.needs_writer_now() {
            if shared.wake.wait_until(&mut backlog, deadline).timed_out() {
                break;
            }
        }
        std::mem::swap(&mut backlog.lines, &mut batch);
        let upto = backlog.queued;
        let reopen_at = backlog.reopen_at.take();
        let drops = std::mem::take(&mut backlog.unreported_drops);
        let closing = backlog.closing;
        backlog.flush_wanted = false;
        drop(backlog);

        if drops > 0 {
            tracing::warn!(
                "access log: {drops} lines dropped: more than {} MiB were waiting to be \
                 written to {output}",
                MAX_BACKLOG >> 20
            );
        }
        let (before, after) =
            batch.split_at(reopen_at.map_or(batch.len(), |at| at.min(batch.len())));
        failure.deliver(&mut output, before);
        if reopen_at.is_some() {
            if let Err(error) = output.reopen() {
                tracing::warn!("{error}; still writing to the file opened before");
            }
        }
        failure.deliver(&mut output, after);
        batch.clear();
        if batch.capacity() > 2 * FLUSH_SIZE {
            batch = Vec::with_capacity(FLUSH_SIZE);
        }

        shared.backlog.lock().written = upto;
        shared.written.notify_all();
        if closing {
            return;
        }
    }
}

/// Failed writes are reported when they start and when they stop, with the lines lost.
#[derive(Default)]
struct WriteFailure {
    failing: bool,
    lost: u64,
}

impl WriteFailure {
    fn deliver(&mut self, output: &mut Output, lines: &[u8]) {
        if lines.is_empty() {
            return;
        }
        match output.write(lines) {
            Ok(()) if self.failing => {
                tracing::warn!(
                    "access log: writing to {output} works again; {} lines were lost",
                    self.lost
                );
                *self = WriteFailure::default();
            }
            Ok(()) => {}
            Err(error) => {
                if !self.failing {
                    tracing::warn!("access log: cannot write to {output}: {error}");
                }
                self.failing = true;
                self.lost += lines.iter().filter(|&&b| b == b'\n').count() as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;

    use super::*;

    fn record<'a>(method: &'a Method, uri: &'a Uri) -> AccessRecord<'a> {
        AccessRecord {
            // 01/Dec/2026:21:45:34 UTC
            time: UNIX_EPOCH + Duration::new(1_796_161_534, 123_456_789),
            client: "127.0.0.1:50123".parse().unwrap(),
            method,
            uri,
            protocol: Version::HTTP_11,
            status: 200,
            bytes: 612,
            upstream: Some("127.0.0.1:8081"),
            upstream_time: Some(Duration::from_micros(1500)),
            duration: Duration::new(0, 2_345_678),
            request_id: None,
            user_agent: Some(b"curl/8.5.0"),
            referer: None,
            error: None,
        }
    }

    fn line(format: &AccessLogFormat, record: &AccessRecord<'_>) -> String {
        let mut out = Vec::new();
        format.write_line(record, &mut out);
        String::from_utf8(out).expect("lines are UTF-8 here")
    }

    fn template(text: &str) -> AccessLogFormat {
        AccessLogFormat::parse(text).unwrap()
    }

    #[test]
    fn combined_is_nginx_combined() {
        let uri = Uri::from_static("/a?b=1");
        assert_eq!(
            line(&AccessLogFormat::Combined, &record(&Method::GET, &uri)),
            "127.0.0.1 - - [01/Dec/2026:21:45:34 +0000] \"GET /a?b=1 HTTP/1.1\" 200 612 \"-\" \"curl/8.5.0\"\n"
        );
    }

    #[test]
    fn combined_request_line_per_protocol_and_headers() {
        let full = Uri::from_static("http://example.test/p?q");
        let mut h2 = record(&Method::POST, &full);
        h2.protocol = Version::HTTP_2;
        h2.client = "[::1]:9".parse().unwrap();
        h2.referer = Some(b"http://example.test/");
        h2.user_agent = None;
        assert_eq!(
            line(&AccessLogFormat::Combined, &h2),
            "::1 - - [01/Dec/2026:21:45:34 +0000] \"POST /p?q HTTP/2.0\" 200 612 \"http://example.test/\" \"-\"\n"
        );
        // An HTTP/1 absolute-form target is printed as sent; a v4-mapped client as IPv4.
        let mut absolute = record(&Method::GET, &full);
        absolute.client = "[::ffff:10.1.2.3]:9".parse().unwrap();
        absolute.protocol = Version::HTTP_10;
        assert_eq!(
            line(&AccessLogFormat::Combined, &absolute),
            "10.1.2.3 - - [01/Dec/2026:21:45:34 +0000] \"GET http://example.test/p?q HTTP/1.0\" 200 612 \"-\" \"curl/8.5.0\"\n"
        );
    }

    #[test]
    fn combined_escapes_as_nginx() {
        let uri = Uri::from_static("/");
        let mut r = record(&Method::GET, &uri);
        r.user_agent = Some(b"a\"b\\c\x01\x7f\xff\xc3\xa9 ~");
        r.referer = Some(b"\t");
        assert_eq!(
            line(&AccessLogFormat::Combined, &r),
            "127.0.0.1 - - [01/Dec/2026:21:45:34 +0000] \"GET / HTTP/1.1\" 200 612 \"\\x09\" \"a\\x22b\\x5Cc\\x01\\x7F\\xFF\\xC3\\xA9 ~\"\n"
        );
    }

    #[test]
    fn time_local_dates() {
        let at = |seconds| {
            let mut out = Vec::new();
            push_time_local(&mut out, UNIX_EPOCH + Duration::from_secs(seconds));
            String::from_utf8(out).unwrap()
        };
        assert_eq!(at(0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(at(951_868_799), "29/Feb/2000:23:59:59 +0000");
        // The next second is not the cached one.
        assert_eq!(at(951_868_800), "01/Mar/2000:00:00:00 +0000");
        assert_eq!(at(1_796_161_534), "01/Dec/2026:21:45:34 +0000");
        assert_eq!(at(253_402_300_799), "31/Dec/9999:23:59:59 +0000");
    }

    #[test]
    fn json_has_every_key() {
        let uri = Uri::from_static("/a?b=1");
        assert_eq!(
            line(&AccessLogFormat::Json, &record(&Method::GET, &uri)),
            concat!(
                r#"{"time":1796161534.123,"client":"127.0.0.1","method":"GET","path":"/a","#,
                r#""query":"b=1","protocol":"HTTP/1.1","status":200,"bytes":612,"#,
                r#""upstream":"127.0.0.1:8081","upstream_time":0.001500,"duration":0.002345,"#,
                r#""request_id":null,"user_agent":"curl/8.5.0","referer":null,"error":null}"#,
                "\n"
            )
        );
    }

    #[test]
    fn json_nulls_and_escaping() {
        let uri = Uri::from_static("/down");
        let mut r = record(&Method::DELETE, &uri);
        r.status = 502;
        r.bytes = 0;
        r.upstream_time = None;
        r.duration = Duration::new(3, 7_000);
        r.error = Some("connect_refused");
        r.request_id = Some(b"req-1");
        r.user_agent = Some(b"q\"b\\s\n\r\t\x01\x7f\xc3\xa9\xff/");
        r.referer = Some(b"");
        assert_eq!(
            line(&AccessLogFormat::Json, &r),
            concat!(
                r#"{"time":1796161534.123,"client":"127.0.0.1","method":"DELETE","path":"/down","#,
                r#""query":null,"protocol":"HTTP/1.1","status":502,"bytes":0,"#,
                r#""upstream":"127.0.0.1:8081","upstream_time":null,"duration":3.000007,"#,
                r#""request_id":"req-1","user_agent":"q\"b\\s\n\r\t\u0001\u007Fé�/","#,
                r#""referer":"","error":"connect_refused"}"#,
                "\n"
            )
        );
    }

    #[test]
    fn template_prints_fields() {
        let uri = Uri::from_static("/a?b=1");
        let mut r = record(&Method::GET, &uri);
        assert_eq!(
            line(
                &template("{client} {method} {path} {status} {duration}"),
                &r
            ),
            "127.0.0.1 GET /a 200 0.002345\n"
        );
        r.user_agent = Some(b"say \"hi\"");
        assert_eq!(
            line(
                &template("{{{status}}} {query} {error} {user_agent} {time} }}{{"),
                &r
            ),
            "{200} b=1 - say \\x22hi\\x22 1796161534.123 }{\n"
        );
    }

    #[test]
    fn template_errors_name_the_problem() {
        let unknown = AccessLogFormat::parse("{client} {nope}").unwrap_err();
        assert!(unknown.contains("{nope}"), "{unknown}");
        assert!(
            unknown.contains(
                "time, client, method, path, query, protocol, status, bytes, upstream, \
                 upstream_time, duration, request_id, user_agent, referer, error"
            ),
            "{unknown}"
        );
        let unclosed = AccessLogFormat::parse("{status").unwrap_err();
        assert!(unclosed.contains("unclosed {"), "{unclosed}");
        let unmatched = AccessLogFormat::parse("status}").unwrap_err();
        assert!(unmatched.contains("unmatched }"), "{unmatched}");
        // A typo of a format name is not a template that prints itself on every line.
        for no_field in ["combind", "{{status}}", ""] {
            let error = AccessLogFormat::parse(no_field).unwrap_err();
            assert!(error.contains("not combined, json"), "{error}");
        }
    }

    #[test]
    fn field_names_follow_the_variants() {
        for (i, field) in Field::ALL.into_iter().enumerate() {
            assert_eq!(field as usize, i);
            assert_eq!(Field::from_name(AccessLogFormat::FIELDS[i]), Some(field));
        }
    }

    #[test]
    fn targets_parse() {
        assert_eq!(AccessLogTarget::parse("-"), AccessLogTarget::Stdout);
        assert_eq!(AccessLogTarget::parse("off"), AccessLogTarget::Off);
        assert_eq!(
            AccessLogTarget::parse("/var/log/x.log"),
            AccessLogTarget::File("/var/log/x.log".into())
        );
        assert!(
            AccessLog::open(&AccessLogTarget::Off, AccessLogFormat::Combined)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn arrival_keeps_what_the_client_sent() {
        let (req, ()) = http::Request::builder()
            .method("PUT")
            .uri("/x?y")
            .header("x-request-id", "abc")
            .header("user-agent", "ua/1")
            .header("referer", "http://r/")
            .body(())
            .unwrap()
            .into_parts();
        let arrival = Arrival::new(&req);
        assert_eq!(arrival.method, Method::PUT);
        assert_eq!(arrival.uri, "/x?y");
        assert_eq!(arrival.request_id.as_ref().unwrap(), "abc");
        assert_eq!(arrival.user_agent.as_ref().unwrap(), "ua/1");
        assert_eq!(arrival.referer.as_ref().unwrap(), "http://r/");
    }

    fn temp_dir() -> PathBuf {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferroxy-access-log-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn log_path(log: &AccessLog, path: &'static str) {
        let uri = Uri::from_static(path);
        log.log(&record(&Method::GET, &uri));
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn file_target_flushes_and_reopens() {
        let dir = temp_dir();
        let path = dir.join("access.log");
        let log = AccessLog::open(&AccessLogTarget::File(path.clone()), template("{path}"))
            .unwrap()
            .unwrap();
        log_path(&log, "/one");
        log.flush();
        assert_eq!(read(&path), "/one\n");
        // logrotate: rename, then signal. Until the reopen, lines follow the open file.
        let rotated = dir.join("access.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log_path(&log, "/two");
        log.reopen();
        log_path(&log, "/three");
        log.flush();
        assert_eq!(read(&rotated), "/one\n/two\n");
        assert_eq!(read(&path), "/three\n");
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn lines_are_written_without_a_flush() {
        let dir = temp_dir();
        let path = dir.join("access.log");
        let log = AccessLog::open(&AccessLogTarget::File(path.clone()), template("{path}"))
            .unwrap()
            .unwrap();
        log_path(&log, "/soon");
        let deadline = Instant::now() + Duration::from_secs(5);
        while read(&path).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(read(&path), "/soon\n");
        drop(log);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn drop_writes_what_is_left() {
        let dir = temp_dir();
        let path = dir.join("access.log");
        let log = AccessLog::open(&AccessLogTarget::File(path.clone()), template("{path}"))
            .unwrap()
            .unwrap();
        log_path(&log, "/a");
        log_path(&log, "/b");
        drop(log);
        assert_eq!(read(&path), "/a\n/b\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unopenable_file_names_its_path() {
        let dir = temp_dir();
        let path = dir.join("no-such-dir").join("access.log");
        let error = AccessLog::open(&AccessLogTarget::File(path.clone()), AccessLogFormat::Json)
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(
            error.to_string().contains(&path.display().to_string()),
            "{error}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A writer whose writes wait until the test opens the gate: a stalled disk.
    #[derive(Clone, Default)]
    struct Gated {
        open: Arc<(Mutex<bool>, Condvar)>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Gated {
        fn open(&self) {
            *self.open.0.lock() = true;
            self.open.1.notify_all();
        }
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut open = self.open.0.lock();
            while !*open {
                self.open.1.wait(&mut open);
            }
            self.written.lock().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// What `tracing` events say, from every thread (the writer warns from its own).
    fn captured_events() -> Arc<Mutex<Vec<u8>>> {
        static CAPTURED: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
        CAPTURED
            .get_or_init(|| {
                let captured = Arc::new(Mutex::new(Vec::new()));
                let sink = captured.clone();
                let subscriber = tracing_subscriber::fmt()
                    .with_ansi(false)
                    .with_writer(move || Captured(sink.clone()))
                    .finish();
                tracing::subscriber::set_global_default(subscriber)
                    .expect("no other test sets a global subscriber");
                captured
            })
            .clone()
    }

    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_writer_drops_and_counts_lines_and_never_blocks_a_worker() {
        let events = captured_events();
        let gated = Gated::default();
        let log = AccessLog::with_writer(gated.clone(), template("{path}")).unwrap();
        let path = format!("/{}", "x".repeat(1000));
        let uri = Uri::try_from(path.as_str()).unwrap();
        let mut logged = 0u64;
        // Every call returns although nothing can be written; the cap makes some drop.
        while log.dropped() < 10 {
            log.log(&record(&Method::GET, &uri));
            logged += 1;
            assert!(logged < 100_000, "the backlog never filled");
        }
        assert!(logged * 1001 > MAX_BACKLOG as u64, "dropped before the cap");
        gated.open();
        log.flush();
        let written = gated.written.lock().split(|&b| b == b'\n').count() as u64 - 1;
        assert_eq!(written, logged - log.dropped());
        let dropped = log.dropped();
        drop(log);
        let events = String::from_utf8(events.lock().clone()).unwrap();
        assert!(
            events.contains(&format!("access log: {dropped} lines dropped")),
            "no warning of the dropped lines in:\n{events}"
        );
    }

    #[test]
    fn lines_from_many_threads_arrive_whole() {
        let gated = Gated::default();
        gated.open();
        let log = AccessLog::with_writer(gated.clone(), AccessLogFormat::Combined).unwrap();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        log_path(&log, "/many");
                    }
                });
            }
        });
        log.flush();
        let expected = line(
            &AccessLogFormat::Combined,
            &record(&Method::GET, &Uri::from_static("/many")),
        );
        let written = String::from_utf8(gated.written.lock().clone()).unwrap();
        assert_eq!(written.lines().count(), 4000);
        assert!(written.split_inclusive('\n').all(|l| l == expected));
        // Nothing new: returns at once.
        log.flush();
    }
}
