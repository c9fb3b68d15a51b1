//! An upstream with no network behind it: it answers every request with one prepared
//! response and keeps what it received. The phases of a proxy run against it exactly as
//! against a real peer; hook tests use it (`ferroxy.testing.simulate`).

use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use http_body::Body;
use parking_lot::Mutex;

use crate::body::ProxyBody;
use crate::error::{Error, Result};
use crate::response::Response;

pub struct CannedUpstream {
    response: Response,
    received: Mutex<Option<Received>>,
}

/// The request the canned upstream was sent: its head and whole body.
pub struct Received {
    pub head: http::request::Parts,
    pub body: Bytes,
}

impl CannedUpstream {
    pub fn new(response: Response) -> Self {
        CannedUpstream {
            response,
            received: Mutex::new(None),
        }
    }

    /// The last request sent here, if any.
    pub fn take_received(&self) -> Option<Received> {
        self.received.lock().take()
    }

    /// Read `req` to its end, keep it, and answer with the prepared response.
    pub(super) async fn exchange(
        &self,
        req: http::Request<ProxyBody>,
    ) -> Result<(http::response::Parts, ProxyBody)> {
        let (head, mut body) = req.into_parts();
        let mut received = BytesMut::new();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let frame = frame.map_err(Error::from_upstream)?;
            if let Some(data) = frame.data_ref() {
                received.extend_from_slice(data);
            }
        }
        *self.received.lock() = Some(Received {
            head,
            body: received.freeze(),
        });
        let mut response = http::Response::new(());
        *response.status_mut() = self.response.status;
        *response.headers_mut() = self.response.headers.clone();
        let (parts, ()) = response.into_parts();
        Ok((parts, ProxyBody::full(self.response.body.clone())))
    }
}
