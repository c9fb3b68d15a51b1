//! Measures the hook bridge alone: phase round trips from a tokio thread to the Python
//! thread and back, with no sockets or HTTP in the way. Used by bench/bridge.py.

use std::sync::Arc;
use std::time::Instant;

use ferroxy_engine::{DownstreamDigest, ProxyHttp, Session};

use crate::proxy::PyProxy;

/// Run `trips` response-phase round trips, `in_flight` at a time, on a current-thread
/// runtime on the calling thread; returns the wall time in seconds. The Python thread must
/// be draining the bridge meanwhile.
pub fn run(proxy: Arc<PyProxy>, trips: usize, in_flight: usize) -> std::io::Result<f64> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let in_flight = in_flight.clamp(1, trips.max(1));
    let started = Instant::now();
    runtime.block_on(async move {
        let mut workers = tokio::task::JoinSet::new();
        for worker in 0..in_flight {
            let proxy = proxy.clone();
            let share = trips / in_flight + usize::from(worker < trips % in_flight);
            workers.spawn(async move {
                for _ in 0..share {
                    one_trip(&proxy).await;
                }
            });
        }
        while workers.join_next().await.is_some() {}
    });
    Ok(started.elapsed().as_secs_f64())
}

async fn one_trip(proxy: &PyProxy) {
    let req = http::Request::get("/bench")
        .header("host", "bench")
        .body(())
        .expect("static request")
        .into_parts()
        .0;
    let local = ([127, 0, 0, 1], 8080).into();
    let downstream = Arc::new(DownstreamDigest::tcp(([127, 0, 0, 1], 1).into(), local));
    let mut session = Session::from_parts(req, downstream);
    let mut ctx = proxy.new_ctx();
    let mut response = http::Response::new(()).into_parts().0;
    let _ = proxy
        .response_filter(&mut session, &mut response, &mut ctx)
        .await;
}
