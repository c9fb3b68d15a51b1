//! What gRPC asks of a proxy (grpc/doc/PROTOCOL-HTTP2.md), beyond streaming HTTP/2 with its
//! trailers: the client's `grpc-timeout` kept to, and a failure the proxy answers itself given
//! as a gRPC status (a "trailers-only" response: HTTP 200 whose headers carry `grpc-status`)
//! rather than an HTTP error page, which a gRPC client can only report as a broken call.

use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use http::StatusCode;

use crate::error::{Error, ErrorKind};
use crate::response::Response;

static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// gRPC status codes the proxy gives (grpc/doc/statuscodes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    Unknown = 2,
    DeadlineExceeded = 4,
    PermissionDenied = 7,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

impl Code {
    /// The status a gRPC client gives an HTTP status in place of one (grpc's
    /// doc/http-grpc-status-mapping.md), so our answer reads as theirs would.
    pub fn for_http(status: u16) -> Code {
        match status {
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            429 | 502 | 503 | 504 => Code::Unavailable,
            _ => Code::Unknown,
        }
    }

    fn header_value(self) -> HeaderValue {
        HeaderValue::from(self as u16)
    }
}

/// Whether a request is a gRPC call (`application/grpc`, `application/grpc+proto`, ...; the
/// gRPC-Web variants too, whose clients read a trailers-only answer the same way).
pub fn is_call(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

/// The call's deadline from its `grpc-timeout` header: at most eight digits and a unit
/// (`H`ours, `M`inutes, `S`econds, `m`illis, `u`micros, `n`anos). A malformed one is ignored,
/// as gRPC servers ignore it.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    parse_timeout(headers.get(&GRPC_TIMEOUT)?.as_bytes())
}

fn parse_timeout(text: &[u8]) -> Option<Duration> {
    let (&unit, digits) = text.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let amount: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(amount * 3600),
        b'M' => Duration::from_secs(amount * 60),
        b'S' => Duration::from_secs(amount),
        b'm' => Duration::from_millis(amount),
        b'u' => Duration::from_micros(amount),
        b'n' => Duration::from_nanos(amount),
        _ => return None,
    })
}

/// The trailers-only answer to a call the proxy could not complete: `DEADLINE_EXCEEDED` when
/// the call's own deadline ran out (`deadline_passed`), otherwise the code for the error's
/// HTTP status (an unreachable upstream is `UNAVAILABLE`). The message says what kind of
/// failure it was (`Bad Gateway: connect_refused`) and no more: the details (the upstream's
/// address, the OS error) are for our log, not for any client. `request_type` is the call's
/// content type: a gRPC-Web client is answered in its own.
pub fn error_response(
    error: &Error,
    deadline_passed: bool,
    request_type: Option<&HeaderValue>,
) -> Response {
    let timed_out = matches!(
        error.kind,
        ErrorKind::ReadTimeout | ErrorKind::ConnectTimeout
    );
    let code = if deadline_passed && timed_out {
        Code::DeadlineExceeded
    } else {
        Code::for_http(error.status)
    };
    let mut response = Response::new(StatusCode::OK, bytes::Bytes::new());
    let headers = &mut response.headers;
    let content_type = match request_type.map(HeaderValue::as_bytes) {
        Some(t) if t.starts_with(b"application/grpc-web-text") => "application/grpc-web-text",
        Some(t) if t.starts_with(b"application/grpc-web") => "application/grpc-web",
        _ => "application/grpc",
    };
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(GRPC_STATUS.clone(), code.header_value());
    let message = if code == Code::DeadlineExceeded {
        "deadline exceeded".to_owned()
    } else {
        let status = StatusCode::from_u16(error.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let reason = status.canonical_reason().unwrap_or("Error");
        format!("{reason}: {}", error.kind.as_str())
    };
    if let Ok(message) = HeaderValue::from_str(&percent_encode(&message)) {
        headers.insert(GRPC_MESSAGE.clone(), message);
    }
    response
}

/// `grpc-message` is percent-encoded UTF-8: every byte outside printable ASCII, and `%`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for &byte in text.as_bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_in_every_unit() {
        let cases = [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("250m", Duration::from_millis(250)),
            ("99999999u", Duration::from_micros(99_999_999)),
            ("7n", Duration::from_nanos(7)),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_timeout(text.as_bytes()), Some(expected), "{text}");
        }
    }

    #[test]
    fn malformed_timeouts_are_ignored() {
        for text in ["", "S", "100", "123456789m", "1x", "-1S", "1.5S", " 1S"] {
            assert_eq!(parse_timeout(text.as_bytes()), None, "{text:?}");
        }
    }

    #[test]
    fn calls_are_told_by_content_type() {
        let mut headers = HeaderMap::new();
        assert!(!is_call(&headers));
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert!(!is_call(&headers));
        for grpc in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc-web",
        ] {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(grpc));
            assert!(is_call(&headers), "{grpc}");
        }
    }

    #[test]
    fn an_unreachable_upstream_is_unavailable() {
        let error = Error::new(
            ErrorKind::ConnectRefused,
            "connect to 10.0.0.7:50051 failed",
        );
        let response = error_response(&error, false, None);
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.headers["content-type"], "application/grpc");
        assert_eq!(response.headers["grpc-status"], "14");
        // What failed, without where: the address is for our log only.
        assert_eq!(
            response.headers["grpc-message"],
            "Bad Gateway: connect_refused"
        );
        assert!(response.body.is_empty());
        let web = HeaderValue::from_static("application/grpc-web+proto");
        let response = error_response(&error, false, Some(&web));
        assert_eq!(response.headers["content-type"], "application/grpc-web");
    }

    #[test]
    fn a_passed_deadline_is_deadline_exceeded() {
        let error = Error::new(ErrorKind::ReadTimeout, "the request's deadline passed");
        let passed = error_response(&error, true, None);
        assert_eq!(passed.headers["grpc-status"], "4");
        assert_eq!(passed.headers["grpc-message"], "deadline exceeded");
        // The same timeout with the call's deadline still ahead is the proxy's own limit.
        assert_eq!(
            error_response(&error, false, None).headers["grpc-status"],
            "14"
        );
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("50% off\né"), "50%25 off%0A%C3%A9");
    }
}
