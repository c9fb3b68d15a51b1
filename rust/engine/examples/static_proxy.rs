//! The engine without Python: a reverse proxy to one upstream that tags every response.
//!
//!     cargo run --release --example static_proxy -- 127.0.0.1:8080 127.0.0.1:8081
//!
//! With no upstream given it starts the built-in echo upstream and proxies to that.

use ferroxy_echo::EchoUpstream;
use ferroxy_engine::error::Result;
use ferroxy_engine::{Peer, ProxyHttp, Server, ServerConfig, Session};

struct StaticProxy {
    upstream: Peer,
}

impl ProxyHttp for StaticProxy {
    type Ctx = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Peer> {
        Ok(self.upstream.clone())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut http::response::Parts,
        _ctx: &mut (),
    ) -> Result<()> {
        upstream_response.headers.insert(
            "x-served-by",
            http::HeaderValue::from_static("ferroxy-engine"),
        );
        Ok(())
    }
}

fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt().with_target(false).init();
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let (upstream, _echo) = match args.next() {
        Some(addr) => (addr, None),
        None => {
            let echo = EchoUpstream::start("127.0.0.1:0")?;
            (echo.addr().to_string(), Some(echo))
        }
    };
    let upstream = Peer::new(&upstream).map_err(std::io::Error::other)?;
    let config = ServerConfig {
        listeners: vec![listen.as_str().into()],
        ..ServerConfig::default()
    };
    let mut server = Server::proxy(config, StaticProxy { upstream }).start()?;
    println!("proxying http://{}", server.local_addr());
    server.wait()?;
    Ok(())
}
