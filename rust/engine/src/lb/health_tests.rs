//! Health checks: passive ejection on the paused tokio clock (exact cool-downs), active checks
//! against real listeners on loopback.

use std::sync::atomic::{AtomicU16, AtomicUsize};
use std::time::Duration;

use http::uri::PathAndQuery;
use http::HeaderValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::service::ShutdownSignal;

const A: &str = "10.0.0.1:80";
const B: &str = "10.0.0.2:80";

type Changes = Arc<Mutex<Vec<(String, bool, String)>>>;

/// A health config whose listener records every change.
fn recorded(active: Option<HealthCheck>, passive: PassiveCheck) -> (HealthConfig, Changes) {
    let changes: Changes = Arc::default();
    let seen = changes.clone();
    let listener: HealthListener = Arc::new(move |backend: &Backend, change: &HealthChange| {
        seen.lock().push((
            backend.addr().to_owned(),
            change.healthy,
            change.reason.clone(),
        ));
    });
    let config = HealthConfig {
        active,
        passive,
        listener: Some(listener),
    };
    (config, changes)
}

fn balancer(backends: &[&str], health: HealthConfig) -> Arc<LoadBalancer> {
    let backends = backends.iter().map(|addr| (*addr, 1));
    Arc::new(LoadBalancer::with_config(Strategy::RoundRobin, backends, checked_by(health)).unwrap())
}

fn checked_by(health: HealthConfig) -> LoadBalancerConfig {
    LoadBalancerConfig {
        health,
        seed: Some(7),
        ..LoadBalancerConfig::default()
    }
}

fn picked(lb: &LoadBalancer, count: usize) -> Vec<String> {
    (0..count)
        .map(|_| lb.select(None).expect("a backend").addr().to_owned())
        .collect()
}

fn passive(max_fails: u32, fail_timeout: u64, max_fail_timeout: u64) -> PassiveCheck {
    PassiveCheck {
        max_fails,
        fail_timeout: Duration::from_secs(fail_timeout),
        max_fail_timeout: Duration::from_secs(max_fail_timeout),
    }
}

async fn advance(seconds: f64) {
    tokio::time::advance(Duration::from_secs_f64(seconds)).await;
}

#[tokio::test(start_paused = true)]
async fn failures_in_a_row_eject_for_a_cool_down_that_doubles_while_it_keeps_failing() {
    let (health, changes) = recorded(None, passive(2, 10, 25));
    let lb = balancer(&[A, B], health);
    let a = lb.backends()[0].clone();

    a.observe(Observation::ConnectFailed);
    a.observe(Observation::Status(200));
    a.observe(Observation::ConnectFailed);
    assert!(a.is_healthy(), "a success in between resets the count");
    a.observe(Observation::Status(404));
    a.observe(Observation::Status(503));
    assert!(a.is_healthy(), "a 4xx is a success");
    a.observe(Observation::Status(502));
    assert!(!a.is_healthy() && a.is_ejected(), "two 5xx in a row");
    assert_eq!(picked(&lb, 4), [B, B, B, B]);

    advance(9.9).await;
    a.observe(Observation::ConnectFailed);
    assert!(!a.is_healthy(), "late failures do not matter while ejected");
    advance(0.1).await;
    assert!(a.is_healthy(), "back after 10 s");
    assert_eq!(picked(&lb, 2), [A, B]);

    a.observe(Observation::ExchangeFailed);
    assert!(
        !a.is_healthy(),
        "one failure after a cool-down ejects it again"
    );
    advance(19.9).await;
    assert!(!a.is_healthy(), "for 20 s");
    advance(0.1).await;
    assert!(a.is_healthy());

    a.observe(Observation::ConnectFailed);
    advance(24.9).await;
    assert!(!a.is_healthy(), "capped at 25 s, not 40");
    advance(0.1).await;
    assert!(a.is_healthy());

    a.observe(Observation::Status(200));
    a.observe(Observation::ConnectFailed);
    assert!(a.is_healthy(), "a success after the cool-down resets it");
    a.observe(Observation::ConnectFailed);
    advance(9.9).await;
    assert!(!a.is_healthy());
    advance(0.1).await;
    assert!(a.is_healthy(), "and the cool-down starts again at 10 s");

    assert_eq!(a.failures(), 9);
    assert_eq!(a.requests(), 1);
    assert_eq!(lb.backends()[1].requests(), 5);
    let changes = changes.lock();
    let seen: Vec<(&str, bool)> = changes
        .iter()
        .map(|(addr, healthy, _)| (addr.as_str(), *healthy))
        .collect();
    assert_eq!(
        seen,
        [
            (A, false),
            (A, true),
            (A, false),
            (A, true),
            (A, false),
            (A, true),
            (A, false),
            (A, true)
        ]
    );
    assert_eq!(
        changes[0].2,
        "ejected for 10s: 2 failures in a row (last: answered 502)"
    );
    assert_eq!(
        changes[2].2,
        "ejected for 20s: exchange failed after its cool-down"
    );
}

#[tokio::test(start_paused = true)]
async fn with_every_backend_ejected_passively_they_are_still_picked() {
    let (health, _) = recorded(None, passive(1, 10, 10));
    let lb = balancer(&[A, B], health);
    for backend in lb.backends().iter() {
        backend.observe(Observation::ConnectFailed);
        assert!(!backend.is_healthy());
    }
    assert_eq!(picked(&lb, 4), [A, B, A, B], "nginx's fallback");
    lb.backends()[0].set_healthy(false);
    assert_eq!(
        picked(&lb, 3),
        [B, B, B],
        "never one that fails active checks"
    );
    lb.backends()[1].set_healthy(false);
    assert!(lb.select(None).is_none());
}

#[test]
fn max_fails_zero_turns_passive_checks_off() {
    let lb = balancer(
        &[A],
        HealthConfig {
            passive: passive(0, 10, 10),
            ..HealthConfig::default()
        },
    );
    let a = &lb.backends()[0];
    for _ in 0..100 {
        a.observe(Observation::ConnectFailed);
    }
    assert!(a.is_healthy());
    assert_eq!(a.failures(), 100, "still counted");
}

#[test]
fn set_backends_keeps_an_ejection_and_new_backends_are_checked_the_same_way() {
    let lb = balancer(
        &[A],
        HealthConfig {
            passive: passive(1, 10, 10),
            ..HealthConfig::default()
        },
    );
    lb.backends()[0].observe(Observation::ConnectFailed);
    lb.set_backends([(A, 1), (B, 1)]).unwrap();
    assert!(lb.backends()[0].is_ejected());
    lb.backends()[1].observe(Observation::Status(500));
    assert!(lb.backends()[1].is_ejected(), "max_fails 1 for B too");
}

#[test]
fn bad_health_configs_name_the_field() {
    let field = |health: HealthConfig| {
        LoadBalancer::with_config(Strategy::RoundRobin, [(A, 1)], checked_by(health))
            .unwrap_err()
            .field
    };
    let active = |change: fn(&mut HealthCheck)| {
        let mut check = HealthCheck::tcp();
        change(&mut check);
        HealthConfig {
            active: Some(check),
            ..HealthConfig::default()
        }
    };
    assert_eq!(
        field(active(|c| c.interval = Duration::ZERO)),
        "health_check.interval"
    );
    assert_eq!(
        field(active(|c| c.timeout = Duration::ZERO)),
        "health_check.timeout"
    );
    assert_eq!(field(active(|c| c.healthy = 0)), "health_check.healthy");
    assert_eq!(field(active(|c| c.unhealthy = 0)), "health_check.unhealthy");
    let with_passive = |passive| HealthConfig {
        passive,
        ..HealthConfig::default()
    };
    assert_eq!(field(with_passive(passive(1, 0, 10))), "fail_timeout");
    assert_eq!(field(with_passive(passive(1, 10, 5))), "max_fail_timeout");
    assert_eq!(HealthCheck::http("health").unwrap_err().field, "path");
    assert_eq!(HealthCheck::http("/a b").unwrap_err().field, "path");
    assert_eq!(ExpectStatus::new([]).unwrap_err().field, "expect_status");
    let error = ExpectStatus::new([200, 600]).unwrap_err();
    assert!(error.message.contains("600"), "{error}");
}

#[test]
fn expected_statuses_are_a_set() {
    let expect = ExpectStatus::default();
    assert!(expect.contains(200) && expect.contains(399));
    assert!(!expect.contains(199) && !expect.contains(400) && !expect.contains(639));
    let expect = ExpectStatus::new([204, 599]).unwrap();
    assert!(expect.contains(204) && expect.contains(599) && !expect.contains(200));
    assert_eq!(format!("{expect:?}"), "[204, 599]");
}

/// A listener on loopback that counts connections and answers any request with `status`.
struct TestBackend {
    addr: String,
    connections: Arc<AtomicUsize>,
    status: Arc<AtomicU16>,
    heads: Arc<Mutex<Vec<String>>>,
}

impl TestBackend {
    async fn start(addr: &str) -> TestBackend {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let backend = TestBackend {
            addr: listener.local_addr().unwrap().to_string(),
            connections: Arc::default(),
            status: Arc::new(AtomicU16::new(200)),
            heads: Arc::default(),
        };
        let (connections, status, heads) = (
            backend.connections.clone(),
            backend.status.clone(),
            backend.heads.clone(),
        );
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::Relaxed);
                let (status, heads) = (status.clone(), heads.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0; 1024];
                    while !head.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    heads
                        .lock()
                        .push(String::from_utf8_lossy(&head).into_owned());
                    let status = status.load(Ordering::Relaxed);
                    let reply = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
                    let _ = stream.write_all(reply.as_bytes()).await;
                });
            }
        });
        backend
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

/// An address on loopback that refuses connections (until something binds it).
fn refusing_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

async fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn quick(probe: Probe) -> HealthCheck {
    HealthCheck {
        probe,
        interval: Duration::from_millis(20),
        timeout: Duration::from_millis(500),
        healthy: 2,
        unhealthy: 2,
    }
}

struct Running {
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(lb: &Arc<LoadBalancer>) -> Running {
        let (shutdown, signal) = ShutdownSignal::new();
        let service = lb.health_service().expect("active checks configured");
        Running {
            shutdown,
            task: tokio::spawn(service.run(signal)),
        }
    }

    async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.task.await.unwrap();
    }
}

#[tokio::test]
async fn tcp_checks_mark_a_dead_backend_down_and_bring_it_back_when_it_listens() {
    let up = TestBackend::start("127.0.0.1:0").await;
    let down = refusing_addr();
    let (health, changes) = recorded(Some(quick(Probe::Tcp)), PassiveCheck::default());
    let lb = balancer(&[&up.addr, &down], health);
    let running = Running::start(&lb);
    let backends = lb.backends();
    eventually("the refusing backend is down", || !backends[1].is_healthy()).await;
    assert_eq!(picked(&lb, 3), [up.addr.as_str(); 3]);
    let restarted = TestBackend::start(&down).await;
    eventually("it is back", || backends[1].is_healthy()).await;
    assert!(backends[0].is_healthy());
    assert!(up.connections() >= 2 && restarted.connections() >= 2);
    let changes = changes.lock().clone();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(
        (changes[0].0.as_str(), changes[0].1),
        (down.as_str(), false)
    );
    assert!(
        changes[0]
            .2
            .starts_with("2 health checks failed (last: connect failed"),
        "{}",
        changes[0].2
    );
    assert_eq!(
        (changes[1].0.as_str(), changes[1].1, changes[1].2.as_str()),
        (down.as_str(), true, "2 health checks passed")
    );
    running.stop().await;
}

#[tokio::test]
async fn coming_back_by_active_checks_ends_a_passive_ejection() {
    let down = refusing_addr();
    let (health, _changes) = recorded(Some(quick(Probe::Tcp)), passive(1, 3600, 3600));
    let lb = balancer(&[&down], health);
    let backend = lb.backends()[0].clone();
    // Requests failed while it was down: passively out for an hour.
    backend.observe(Observation::ConnectFailed);
    assert!(backend.is_ejected());
    let running = Running::start(&lb);
    eventually("active checks see it down", || {
        !backend.passes_active_checks()
    })
    .await;
    let restarted = TestBackend::start(&down).await;
    eventually("it is back at once, not in an hour", || {
        backend.is_healthy()
    })
    .await;
    assert!(!backend.is_ejected());
    assert!(restarted.connections() >= 2);
    running.stop().await;
}

#[tokio::test]
async fn http_checks_get_the_path_and_expect_the_statuses() {
    let backend = TestBackend::start("127.0.0.1:0").await;
    let probe = Probe::Http {
        path: PathAndQuery::from_static("/health?full=1"),
        host: None,
        expect_status: ExpectStatus::new([200, 204]).unwrap(),
    };
    let (health, changes) = recorded(Some(quick(probe)), PassiveCheck::default());
    let lb = balancer(&[&backend.addr], health);
    let running = Running::start(&lb);
    let checked = lb.backends()[0].clone();
    eventually("a probe arrived", || !backend.heads.lock().is_empty()).await;
    let head = backend.heads.lock()[0].to_lowercase();
    assert!(
        head.starts_with("get /health?full=1 http/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("\r\nhost: {}\r\n", backend.addr)),
        "{head}"
    );
    backend.status.store(302, Ordering::Relaxed);
    eventually("302 is not expected", || !checked.is_healthy()).await;
    assert!(
        changes.lock()[0]
            .2
            .ends_with("(last: GET /health?full=1 answered 302)"),
        "{:?}",
        changes.lock()
    );
    backend.status.store(204, Ordering::Relaxed);
    eventually("204 is", || checked.is_healthy()).await;
    running.stop().await;
}

#[tokio::test]
async fn an_http_check_sends_the_host_it_is_given() {
    let backend = TestBackend::start("127.0.0.1:0").await;
    let probe = Probe::Http {
        path: PathAndQuery::from_static("/"),
        host: Some(HeaderValue::from_static("app.internal")),
        expect_status: ExpectStatus::default(),
    };
    let lb = balancer(
        &[&backend.addr],
        HealthConfig {
            active: Some(quick(probe)),
            ..HealthConfig::default()
        },
    );
    let running = Running::start(&lb);
    eventually("a probe arrived", || !backend.heads.lock().is_empty()).await;
    let head = backend.heads.lock()[0].to_lowercase();
    assert!(head.contains("\r\nhost: app.internal\r\n"), "{head}");
    running.stop().await;
}

#[tokio::test]
async fn checks_follow_set_backends_and_one_service_checks_at_a_time() {
    let first = TestBackend::start("127.0.0.1:0").await;
    let second = TestBackend::start("127.0.0.1:0").await;
    let lb = balancer(
        &[&first.addr],
        HealthConfig {
            active: Some(quick(Probe::Tcp)),
            ..HealthConfig::default()
        },
    );
    let running = Running::start(&lb);
    let standby = Running::start(&lb);
    eventually("the first backend is probed", || first.connections() >= 2).await;
    lb.set_backends([(second.addr.as_str(), 1)]).unwrap();
    eventually("the new backend is probed", || second.connections() >= 1).await;
    let first_probes = first.connections();
    let probes = second.connections();
    eventually("more probes of the new backend", || {
        second.connections() >= probes + 3
    })
    .await;
    assert!(
        first.connections() <= first_probes + 1,
        "the removed backend is no longer checked"
    );
    running.stop().await;
    let probes = second.connections();
    eventually("the standby service takes over", || {
        second.connections() >= probes + 3
    })
    .await;
    standby.stop().await;
}

#[test]
fn no_health_service_without_active_checks() {
    let lb = balancer(&[A], HealthConfig::default());
    assert!(lb.health_service().is_none());
}
