//! A response the proxy generates itself rather than forwarding (a filter's answer, an
//! error page).

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::body::ProxyBody;
use crate::error::Error;

#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    pub fn new(status: StatusCode, body: impl Into<Bytes>) -> Self {
        Response {
            status,
            headers: HeaderMap::new(),
            body: body.into(),
        }
    }

    /// The page a client gets when proxying fails and no hook supplied another.
    pub fn error_page(error: &Error) -> Self {
        Response::status_page(StatusCode::from_u16(error.status).unwrap_or(StatusCode::BAD_GATEWAY))
    }

    /// A plain-text page saying `status` and its reason: `403 Forbidden`.
    pub fn status_page(status: StatusCode) -> Self {
        let reason = status.canonical_reason().unwrap_or("Error");
        let mut response = Response::new(status, format!("{} {reason}\n", status.as_u16()));
        response.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }

    pub fn into_http(self) -> http::Response<ProxyBody> {
        let mut response = http::Response::new(ProxyBody::full(self.body));
        *response.status_mut() = self.status;
        *response.headers_mut() = self.headers;
        response
    }
}
