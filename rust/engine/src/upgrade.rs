//! HTTP/1.1 Upgrade (RFC 9110 section 7.8), WebSocket's handshake: a request that asks to
//! switch protocols goes to the upstream with its `Upgrade`, and only once the upstream
//! answers 101 does the connection become a tunnel, its bytes copied both ways until either
//! side closes or it has been idle too long.
//!
//! An upstream's 101 to a request that did not ask is refused (a backend that switches by
//! itself would otherwise turn the client's connection into something we no longer parse,
//! a smuggling route), and so is every `h2c` upgrade: the connection stays HTTP/1.1.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::client_conn::ConnectionWatch;
use crate::websocket::MessageFilter;

/// The upstream side of a switch: left in the 101 response's extensions by the upstream
/// client, taken by the downstream connection once the 101 has been sent. Shared, as
/// extensions must be `Clone`; it is taken once.
#[derive(Clone)]
pub struct UpstreamUpgrade(Arc<Mutex<Option<Switch>>>);

/// A tunnel about to begin: the upstream's side, and what sees its messages (if anything).
pub struct Switch {
    upstream: OnUpgrade,
    filter: Option<Arc<dyn MessageFilter>>,
}

impl UpstreamUpgrade {
    /// The connection is the upgrade's now: the client's side takes it from the head once its
    /// own 101 has gone. (hyper's `upgrade::on` is this removal, for whole messages.)
    #[cold]
    pub fn keep(head: &mut http::response::Parts) {
        if let Some(upgrade) = head.extensions.remove::<OnUpgrade>() {
            head.extensions.insert(UpstreamUpgrade::new(upgrade));
        }
    }

    pub fn new(upgrade: OnUpgrade) -> Self {
        let switch = Switch {
            upstream: upgrade,
            filter: None,
        };
        UpstreamUpgrade(Arc::new(Mutex::new(Some(switch))))
    }

    /// Have the tunnel's messages seen by `filter` (a tunnel without one copies bytes).
    pub fn set_filter(&self, filter: Option<Arc<dyn MessageFilter>>) {
        if let Some(switch) = self.0.lock().as_mut() {
            switch.filter = filter;
        }
    }

    pub fn take(&self) -> Option<Switch> {
        self.0.lock().take()
    }
}

/// The protocols an HTTP/1.1 request asks to switch to (its `Upgrade`, when its
/// `Connection` names it), unless it asks for HTTP/2, which no upstream is told of.
pub fn requested(req: &http::request::Parts) -> Option<&HeaderValue> {
    if req.version != http::Version::HTTP_11 {
        return None;
    }
    let protocols = req.headers.get(header::UPGRADE)?;
    let named = req
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let to_http2 = protocols.to_str().map_or(true, |text| {
        text.split(',').any(|p| {
            let name = p.trim().split('/').next().unwrap_or("");
            name.eq_ignore_ascii_case("h2c") || name.eq_ignore_ascii_case("h2")
        })
    });
    (named && !to_http2).then_some(protocols)
}

/// Whether the protocol an upstream switched to (`to`, its 101's `Upgrade`) is one the
/// client offered (`asked`, by name: `websocket` matches `WebSocket`).
pub fn offers(asked: &HeaderValue, to: &HeaderValue) -> bool {
    let (Ok(asked), Ok(to)) = (asked.to_str(), to.to_str()) else {
        return false;
    };
    let to = to.trim();
    !to.is_empty() && asked.split(',').any(|p| p.trim().eq_ignore_ascii_case(to))
}

/// Turn a 101 that must not take effect into a 503: the connection closes after it.
pub(crate) fn refuse<B>(response: &mut http::Response<B>) {
    *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
    let headers = response.headers_mut();
    headers.remove(header::UPGRADE);
    headers.remove(header::CONNECTION);
}

/// Put back on `headers` (which lost them as hop-by-hop) what asks the next hop to switch
/// to `protocols`.
pub fn ask(headers: &mut HeaderMap, protocols: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocols);
}

/// Copy bytes between the client and the upstream until either closes, or neither has sent
/// anything for `idle`. Bytes the client sent after its request and the upstream after its
/// 101 (each read already by hyper) go first.
pub(crate) async fn tunnel<D>(
    downstream: &mut D,
    switch: Switch,
    watch: &ConnectionWatch,
    idle: Duration,
) -> std::io::Result<()>
where
    D: AsyncRead + AsyncWrite + Unpin,
{
    let upgraded = switch
        .upstream
        .await
        .map_err(|e| std::io::Error::other(format!("upstream upgrade failed: {e}")))?;
    let mut upstream = TokioIo::new(upgraded);
    let copying = async {
        match switch.filter {
            Some(filter) => crate::websocket::relay_both(downstream, &mut upstream, filter).await,
            None => tokio::io::copy_bidirectional(downstream, &mut upstream)
                .await
                .map(|_| ()),
        }
    };
    tokio::pin!(copying);
    // Both directions go through the client's socket, whose watch sees every byte.
    let mut seen = watch.activity();
    loop {
        tokio::select! {
            copied = &mut copying => return copied,
            () = tokio::time::sleep(idle) => {
                if watch.quiet_since(seen) {
                    return Ok(());
                }
                seen = watch.activity();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> http::request::Parts {
        let mut builder = http::Request::builder().uri("/ws");
        for (k, v) in headers {
            builder = builder.header(*k, *v);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_websocket_handshake_asks_to_switch() {
        let req = request(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert_eq!(requested(&req).unwrap(), "websocket");
    }

    #[test]
    fn an_upgrade_that_connection_does_not_name_is_none() {
        assert!(requested(&request(&[("upgrade", "websocket")])).is_none());
    }

    #[test]
    fn upgrades_to_http2_are_never_asked() {
        for protocols in ["h2c", "websocket, h2c", "H2C", "h2"] {
            let req = request(&[("connection", "upgrade"), ("upgrade", protocols)]);
            assert!(requested(&req).is_none(), "{protocols}");
        }
    }

    #[test]
    fn the_switch_must_be_to_what_was_offered() {
        let offered = HeaderValue::from_static("websocket, foo/2");
        assert!(offers(&offered, &HeaderValue::from_static("WebSocket")));
        assert!(offers(&offered, &HeaderValue::from_static("foo/2")));
        assert!(!offers(&offered, &HeaderValue::from_static("h2c")));
        assert!(!offers(&offered, &HeaderValue::from_static("")));
    }

    #[test]
    fn http2_requests_do_not_upgrade() {
        let mut req = request(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        req.version = http::Version::HTTP_2;
        assert!(requested(&req).is_none());
    }
}
