//! Why a request could not be proxied, whose fault it was, and which status the client gets.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::peer::Peer;

/// The class of a proxy failure. `as_str` is the stable short code shown to hooks and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The upstream refused the TCP connection.
    ConnectRefused,
    /// The TCP connect did not finish within the peer's connect timeout.
    ConnectTimeout,
    /// Any other failure to connect (DNS, unreachable, handshake).
    ConnectError,
    /// The TLS handshake with the upstream failed, its certificate included (wrong
    /// hostname, unknown CA, expired): the message says what.
    TlsHandshake,
    /// A load balancer had no healthy backend to pick.
    NoHealthyUpstream,
    /// The upstream sent nothing for longer than the peer's read timeout.
    ReadTimeout,
    /// Writing to the upstream stalled for longer than the peer's write timeout.
    WriteTimeout,
    /// The upstream closed or reset the connection before a complete response.
    UpstreamClosed,
    /// The upstream answered with something that is not valid HTTP.
    UpstreamProtocol,
    /// A phase hook failed (raised, or returned the wrong type).
    HookError,
    /// A phase hook was still running after the server's hook timeout, and was abandoned.
    HookTimeout,
    /// The downstream request cannot be forwarded as it is.
    InvalidRequest,
    /// The client stopped sending its request body for longer than client_read_timeout.
    ClientTimeout,
    /// The client's request body is longer than a `MaxBodySize` filter allows.
    BodyTooLarge,
    /// The client went away (or reset) before its request or response was complete.
    DownstreamClosed,
    /// A bug or an unexpected state inside the proxy.
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ConnectRefused => "connect_refused",
            ErrorKind::ConnectTimeout => "connect_timeout",
            ErrorKind::ConnectError => "connect_error",
            ErrorKind::TlsHandshake => "tls_handshake",
            ErrorKind::NoHealthyUpstream => "no_healthy_upstream",
            ErrorKind::ReadTimeout => "read_timeout",
            ErrorKind::WriteTimeout => "write_timeout",
            ErrorKind::UpstreamClosed => "upstream_closed",
            ErrorKind::UpstreamProtocol => "upstream_protocol",
            ErrorKind::HookError => "hook_error",
            ErrorKind::HookTimeout => "hook_timeout",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::ClientTimeout => "client_timeout",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::DownstreamClosed => "downstream_closed",
            ErrorKind::Internal => "internal",
        }
    }

    /// A failure to open a connection: nothing of the request was sent.
    pub fn is_connect_failure(self) -> bool {
        matches!(
            self,
            ErrorKind::ConnectRefused
                | ErrorKind::ConnectTimeout
                | ErrorKind::ConnectError
                | ErrorKind::TlsHandshake
        )
    }

    /// Whose fault a failure of this kind is.
    pub fn side(self) -> ErrorSide {
        match self {
            ErrorKind::ConnectRefused
            | ErrorKind::ConnectTimeout
            | ErrorKind::ConnectError
            | ErrorKind::TlsHandshake
            | ErrorKind::NoHealthyUpstream
            | ErrorKind::ReadTimeout
            | ErrorKind::WriteTimeout
            | ErrorKind::UpstreamClosed
            | ErrorKind::UpstreamProtocol => ErrorSide::Upstream,
            ErrorKind::InvalidRequest
            | ErrorKind::ClientTimeout
            | ErrorKind::BodyTooLarge
            | ErrorKind::DownstreamClosed => ErrorSide::Client,
            ErrorKind::HookError | ErrorKind::HookTimeout | ErrorKind::Internal => ErrorSide::Proxy,
        }
    }

    /// The status a client gets by default: 504 for timeouts, 502 for other upstream
    /// failures (as nginx does), 400 for requests we cannot forward, 500 for the rest.
    pub fn default_status(self) -> u16 {
        match self {
            ErrorKind::ConnectTimeout
            | ErrorKind::ReadTimeout
            | ErrorKind::WriteTimeout
            | ErrorKind::HookTimeout => 504,
            ErrorKind::ConnectRefused
            | ErrorKind::ConnectError
            | ErrorKind::TlsHandshake
            | ErrorKind::NoHealthyUpstream
            | ErrorKind::UpstreamClosed
            | ErrorKind::UpstreamProtocol => 502,
            ErrorKind::InvalidRequest => 400,
            ErrorKind::ClientTimeout => 408,
            ErrorKind::BodyTooLarge => 413,
            // nginx's code for "client closed request": only ever seen in logs.
            ErrorKind::DownstreamClosed => 499,
            ErrorKind::HookError | ErrorKind::Internal => 500,
        }
    }
}

/// Whose doing a failure was: the client's (downstream), the upstream's, or the proxy's own
/// (a hook, a bug). Logs and metrics blame by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSide {
    Client,
    Upstream,
    Proxy,
}

impl ErrorSide {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSide::Client => "client",
            ErrorSide::Upstream => "upstream",
            ErrorSide::Proxy => "proxy",
        }
    }
}

type Cause = Arc<dyn std::error::Error + Send + Sync>;

/// A proxy failure: its kind and side, a human message, the peer involved, the status to
/// send, and the error that caused it (reachable through `source()`).
#[derive(Debug, Clone)]
pub struct Error {
    pub kind: ErrorKind,
    pub side: ErrorSide,
    pub message: String,
    /// Boxed: an error travels in every `Result` of the request path, and a peer is big.
    pub peer: Option<Box<Peer>>,
    pub status: u16,
    /// Whether the proxy asks `upstream_peer` again after this failure: set by the proxy
    /// when the request's retry policy allows it, and `fail_to_connect` may change it.
    pub retry: bool,
    /// Every try of the request that failed, in order (the last is this error's own), when
    /// it was tried more than once or through a load balancer; empty otherwise.
    pub tries: Box<[FailedTry]>,
    cause: Option<Cause>,
}

/// One failed try of a request: where it went and how it failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedTry {
    pub peer: Arc<str>,
    pub kind: ErrorKind,
    pub message: String,
}

impl FailedTry {
    pub fn new(peer: &Peer, error: &Error) -> Self {
        FailedTry {
            peer: peer.addr().into(),
            kind: error.kind,
            message: error.message.clone(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            side: kind.side(),
            message: message.into(),
            peer: None,
            status: kind.default_status(),
            retry: false,
            tries: Box::default(),
            cause: None,
        }
    }

    /// A phase implementation failed (a hook raised, or returned the wrong type). Choosing
    /// the upstream failing is a 502, like the engine's own routing errors; any other phase
    /// failing is a 500. The one place that decides.
    pub fn hook(phase: &str, message: impl std::fmt::Display) -> Self {
        let status = if phase == "upstream_peer" { 502 } else { 500 };
        Error::new(ErrorKind::HookError, format!("{phase}: {message}")).with_status(status)
    }

    /// A phase hook was still running `after` its start and was abandoned: a 504, whatever
    /// the phase (the proxy, not the upstream, is the gateway that timed out).
    pub fn hook_timeout(phase: &str, after: Duration) -> Self {
        Error::new(
            ErrorKind::HookTimeout,
            format!("{phase}: still running after {:.3}s", after.as_secs_f64()),
        )
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    pub fn with_peer(mut self, peer: &Peer) -> Self {
        self.peer = Some(Box::new(peer.clone()));
        self
    }

    pub fn with_cause(
        mut self,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        self.cause = Some(Arc::from(cause.into()));
        self
    }

    /// Classify a failure seen while exchanging a request with an upstream: hyper's errors,
    /// socket errors, and body failures on either side. The first error in the cause chain
    /// that says whose it is decides: a client's body that failed mid-upload is the
    /// client's doing even though hyper reports it as a failed upstream request.
    pub fn from_upstream(err: Box<dyn std::error::Error + Send + Sync>) -> Self {
        Error::new(classify(err.as_ref()), chain_message(err.as_ref())).with_cause(err)
    }

    /// [`Error::from_upstream`] for an error that stays with its owner (hyper polls a body
    /// and keeps its error); the cause kept is its text.
    pub fn from_upstream_ref(err: &(dyn std::error::Error + 'static)) -> Self {
        let message = chain_message(err);
        Error::new(classify(err), message.clone()).with_cause(message)
    }

    /// Classify a failure to open a connection to a peer.
    pub fn from_connect(err: std::io::Error, peer: &Peer) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::ConnectionRefused => ErrorKind::ConnectRefused,
            std::io::ErrorKind::TimedOut => ErrorKind::ConnectTimeout,
            _ => ErrorKind::ConnectError,
        };
        Error::new(kind, format!("connect to {} failed: {err}", peer.addr()))
            .with_peer(peer)
            .with_cause(err)
    }
}

fn classify(err: &(dyn std::error::Error + 'static)) -> ErrorKind {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(body) = e.downcast_ref::<BodyError>() {
            return body.kind();
        }
        // Ours, passed through a body (a body filter that failed).
        if let Some(own) = e.downcast_ref::<Error>() {
            return own.kind;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io_kind(io);
        }
        current = e.source();
    }
    match err.downcast_ref::<hyper::Error>() {
        Some(h) if h.is_parse() || h.is_parse_status() => ErrorKind::UpstreamProtocol,
        _ => ErrorKind::UpstreamClosed,
    }
}

/// An I/O failure on an established upstream socket. Reads are timed per message, not on the
/// socket, so a socket timeout is a write that stalled.
fn io_kind(err: &std::io::Error) -> ErrorKind {
    match err.kind() {
        std::io::ErrorKind::TimedOut => ErrorKind::WriteTimeout,
        std::io::ErrorKind::ConnectionRefused => ErrorKind::ConnectRefused,
        _ => ErrorKind::UpstreamClosed,
    }
}

/// "outer: inner: innermost", skipping links that repeat the previous one's text.
fn chain_message(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut last = message.clone();
    let mut current = err.source();
    while let Some(e) = current {
        let text = e.to_string();
        if !last.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        last = text;
        current = e.source();
    }
    message
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)?;
        // A client's failure names no upstream: it would read as the upstream's.
        if let Some(peer) = self
            .peer
            .as_ref()
            .filter(|_| self.side != ErrorSide::Client)
        {
            write!(f, " (upstream {})", peer.addr())?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_deref()
            .map(|c| c as &(dyn std::error::Error + 'static))
    }
}

/// A streamed body failed: the side whose stream it was, and why. Bodies wrap every failure
/// in one, so that whoever sees the failure second hand (hyper, sending our request body
/// upstream) still knows whose it was.
#[derive(Debug)]
pub struct BodyError {
    pub side: ErrorSide,
    pub reason: BodyFailure,
}

#[derive(Debug)]
pub enum BodyFailure {
    /// Nothing arrived for this long.
    Idle(Duration),
    /// The stream itself failed (reset, malformed framing, ...).
    Stream(Box<dyn std::error::Error + Send + Sync>),
    /// More than this many bytes came (see [`crate::body::ProxyBody::limit`]).
    TooLarge(u64),
}

impl BodyError {
    pub fn kind(&self) -> ErrorKind {
        match (&self.side, &self.reason) {
            (_, BodyFailure::TooLarge(_)) => ErrorKind::BodyTooLarge,
            (ErrorSide::Client, BodyFailure::Idle(_)) => ErrorKind::ClientTimeout,
            (ErrorSide::Client, BodyFailure::Stream(e)) if is_malformed(e.as_ref()) => {
                ErrorKind::InvalidRequest
            }
            (ErrorSide::Client, BodyFailure::Stream(_)) => ErrorKind::DownstreamClosed,
            (_, BodyFailure::Idle(_)) => ErrorKind::ReadTimeout,
            (_, BodyFailure::Stream(e)) => match e.downcast_ref::<hyper::Error>() {
                Some(h) if h.is_parse() => ErrorKind::UpstreamProtocol,
                _ => ErrorKind::UpstreamClosed,
            },
        }
    }
}

/// Whether a stream failed on bytes that break its framing (a bad chunk size, an overflow, a
/// missing CRLF: hyper's decoder says InvalidData or InvalidInput) rather than on the sender
/// going away (reset, or closed mid-body: UnexpectedEof).
fn is_malformed(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            );
        }
        current = e.source();
    }
    false
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = match self.side {
            ErrorSide::Client => "client",
            _ => "upstream",
        };
        match &self.reason {
            BodyFailure::Idle(after) => write!(f, "the {who} sent nothing for {after:?}"),
            BodyFailure::Stream(e) => write!(f, "the {who}'s body failed: {e}"),
            BodyFailure::TooLarge(max) => write!(f, "the {who}'s body is longer than {max} bytes"),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.reason {
            BodyFailure::Stream(e) => Some(e.as_ref()),
            BodyFailure::Idle(_) | BodyFailure::TooLarge(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::ProxyBody;

    fn boxed(
        e: impl std::error::Error + Send + Sync + 'static,
    ) -> Box<dyn std::error::Error + Send + Sync> {
        Box::new(e)
    }

    #[test]
    fn a_client_body_failure_is_the_clients_fault() {
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let body = BodyError {
            side: ErrorSide::Client,
            reason: BodyFailure::Stream(boxed(reset)),
        };
        let error = Error::from_upstream(boxed(body));
        assert_eq!(error.kind, ErrorKind::DownstreamClosed);
        assert_eq!(error.side, ErrorSide::Client);
        assert!(error.message.contains("reset by peer"), "{}", error.message);
        assert!(std::error::Error::source(&error).is_some());
    }

    #[test]
    fn a_client_body_with_broken_framing_is_a_bad_request() {
        let framing = |kind, text| BodyError {
            side: ErrorSide::Client,
            reason: BodyFailure::Stream(boxed(std::io::Error::new(kind, text))),
        };
        for kind in [
            std::io::ErrorKind::InvalidData,
            std::io::ErrorKind::InvalidInput,
        ] {
            let error = Error::from_upstream(boxed(framing(kind, "invalid chunk size line")));
            assert_eq!(
                (error.kind, error.side, error.status),
                (ErrorKind::InvalidRequest, ErrorSide::Client, 400)
            );
        }
        // Cut off mid-body is the client leaving, not a malformed body.
        let cut = Error::from_upstream(boxed(framing(std::io::ErrorKind::UnexpectedEof, "eof")));
        assert_eq!(cut.kind, ErrorKind::DownstreamClosed);
    }

    #[test]
    fn idle_bodies_time_out_by_side() {
        let client = BodyError {
            side: ErrorSide::Client,
            reason: BodyFailure::Idle(Duration::from_secs(1)),
        };
        let upstream = BodyError {
            side: ErrorSide::Upstream,
            reason: BodyFailure::Idle(Duration::from_secs(1)),
        };
        let client = Error::from_upstream(boxed(client));
        assert_eq!(
            (client.kind, client.status),
            (ErrorKind::ClientTimeout, 408)
        );
        let upstream = Error::from_upstream(boxed(upstream));
        assert_eq!(
            (upstream.kind, upstream.status),
            (ErrorKind::ReadTimeout, 504)
        );
        assert_eq!(upstream.side, ErrorSide::Upstream);
    }

    #[test]
    fn socket_errors_on_the_upstream_are_classified() {
        let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "stalled");
        assert_eq!(
            Error::from_upstream(boxed(timed_out)).kind,
            ErrorKind::WriteTimeout
        );
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let error = Error::from_upstream(boxed(reset));
        assert_eq!(
            (error.kind, error.side, error.status),
            (ErrorKind::UpstreamClosed, ErrorSide::Upstream, 502)
        );
    }

    #[test]
    fn connect_failures_are_classified_once() {
        let peer = Peer::new("127.0.0.1:9").unwrap();
        let cases = [
            (
                std::io::ErrorKind::ConnectionRefused,
                ErrorKind::ConnectRefused,
                502,
            ),
            (std::io::ErrorKind::TimedOut, ErrorKind::ConnectTimeout, 504),
            (
                std::io::ErrorKind::AddrNotAvailable,
                ErrorKind::ConnectError,
                502,
            ),
        ];
        for (io, kind, status) in cases {
            let error = Error::from_connect(std::io::Error::new(io, "x"), &peer);
            assert_eq!((error.kind, error.status), (kind, status));
            assert_eq!(error.peer.as_deref().map(Peer::addr), Some("127.0.0.1:9"));
        }
    }

    #[test]
    fn a_failed_upstream_choice_is_a_bad_gateway() {
        assert_eq!(Error::hook("upstream_peer", "x").status, 502);
        let error = Error::hook("request_filter", "ValueError: boom");
        assert_eq!((error.status, error.side), (500, ErrorSide::Proxy));
        assert_eq!(error.message, "request_filter: ValueError: boom");
    }

    #[test]
    fn a_hook_that_overruns_is_a_gateway_timeout() {
        let error = Error::hook_timeout("request_filter", Duration::from_millis(250));
        assert_eq!(
            (error.kind.as_str(), error.status, error.side),
            ("hook_timeout", 504, ErrorSide::Proxy)
        );
        assert_eq!(error.message, "request_filter: still running after 0.250s");
    }

    #[test]
    fn kinds_have_a_side() {
        assert_eq!(ErrorKind::HookError.side(), ErrorSide::Proxy);
        assert_eq!(ErrorKind::InvalidRequest.side(), ErrorSide::Client);
        assert_eq!(ErrorKind::ReadTimeout.side(), ErrorSide::Upstream);
    }

    /// An error with a message and, optionally, the error under it.
    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl fmt::Display for Layer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    fn layers(texts: &[&'static str]) -> Layer {
        let (first, rest) = texts.split_first().expect("one layer at least");
        Layer(first, (!rest.is_empty()).then(|| Box::new(layers(rest))))
    }

    #[test]
    fn chain_messages_name_every_cause_once() {
        let chain = layers(&["proxy failed", "upstream failed", "connection reset"]);
        assert_eq!(
            chain_message(&chain),
            "proxy failed: upstream failed: connection reset"
        );
        // Wrappers that already quote their cause do not get it twice.
        let quoting = layers(&["read failed: connection reset", "connection reset"]);
        assert_eq!(chain_message(&quoting), "read failed: connection reset");
        let error = Error::from_upstream(Box::new(chain));
        assert_eq!(
            error.message,
            "proxy failed: upstream failed: connection reset"
        );
        assert_eq!(
            error.to_string(),
            format!("upstream_closed: {}", error.message)
        );
    }

    /// Each link of a chain message says something new.
    fn assert_no_repeats(message: &str) {
        let links: Vec<&str> = message.split(": ").collect();
        for (i, link) in links.iter().enumerate() {
            assert!(
                !links[..i].contains(link),
                "{link:?} repeated in {message:?}"
            );
        }
    }

    /// An upstream client for the echo upstream, and the peer to reach it.
    fn echo_upstream() -> (
        ferroxy_echo::EchoUpstream,
        Peer,
        crate::upstream::UpstreamClient,
    ) {
        let echo = ferroxy_echo::EchoUpstream::start("127.0.0.1:0").unwrap();
        let peer = Peer::new(&echo.addr().to_string()).unwrap();
        let pool = crate::upstream::ConnectionPool::new(Default::default());
        let client = crate::upstream::UpstreamClient::new(Arc::new(pool));
        (echo, peer, client)
    }

    #[tokio::test]
    async fn an_upload_the_client_cut_off_fails_the_exchange_as_the_clients() {
        let (_echo, peer, client) = echo_upstream();
        let conn = client.connect(&peer).await.unwrap();
        let (upload, wire) = crate::body::testing::chunked_body().await;
        let mut body = ProxyBody::streamed(upload, Duration::from_secs(60), ErrorSide::Client);
        let progress = body.progress();
        let request = http::Request::post("/upload")
            .header("host", "example.test")
            .body(body)
            .unwrap();
        wire.cut_off().await;
        let Err(error) = client.send(&peer, conn, request, &progress).await else {
            panic!("the upstream answered a request whose body failed");
        };
        assert_eq!(
            (error.kind, error.side, error.status),
            (ErrorKind::DownstreamClosed, ErrorSide::Client, 499)
        );
        // hyper reports it as its own failure, caused by our body, caused by the client.
        let hyper_error = std::error::Error::source(&error)
            .and_then(|e| e.downcast_ref::<hyper::Error>())
            .expect("hyper's error is the cause");
        assert!(hyper_error.is_user(), "{hyper_error:?}");
        assert!(
            error.message.contains("the client's body failed"),
            "{}",
            error.message
        );
        assert!(
            error.message.starts_with(&hyper_error.to_string()),
            "{}",
            error.message
        );
        assert_no_repeats(&error.message);
    }

    #[tokio::test]
    async fn an_upstream_that_aborts_mid_response_is_the_upstreams_failure() {
        let (_echo, peer, client) = echo_upstream();
        let conn = client.connect(&peer).await.unwrap();
        let mut body = ProxyBody::empty();
        let progress = body.progress();
        let request = http::Request::get("/close")
            .header("host", "example.test")
            .body(body)
            .unwrap();
        let Ok(exchange) = client.send(&peer, conn, request, &progress).await else {
            panic!("/close sends its head before it aborts");
        };
        assert_eq!(exchange.head.status, 200);
        let mut body = exchange.body;
        let mut received = 0;
        let failure = loop {
            match http_body_util::BodyExt::frame(&mut body).await {
                Some(Ok(frame)) => received += frame.into_data().map_or(0, |d| d.len()),
                Some(Err(failure)) => break failure,
                None => panic!("the body ended cleanly after {received} bytes"),
            }
        };
        assert!(received < 1_000_000);
        // As the response body reports it, and as a cause owned elsewhere.
        for error in [
            Error::from_upstream_ref(failure.as_ref()),
            Error::from_upstream(failure),
        ] {
            assert_eq!(
                (error.kind, error.side, error.status),
                (ErrorKind::UpstreamClosed, ErrorSide::Upstream, 502),
                "{error}"
            );
            assert!(
                error.message.contains("the upstream's body failed"),
                "{error}"
            );
            assert_no_repeats(&error.message);
        }
    }
}
