//! DNS discovery: the merge of answers into backends, names resolved by the system resolver
//! (`localhost`, answered from /etc/hosts or as RFC 6761 says, and `.invalid`, which never
//! resolves: neither sends a query), and the refresh service on the paused clock with a
//! resolver whose answers the test sets.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use super::discovery::{expand, Lookup, Resolve, ResolverFactory};
use super::*;
use crate::service::ShutdownSignal;

fn specs(specs: &[(&str, u32)]) -> Vec<(String, u32)> {
    specs
        .iter()
        .map(|(addr, weight)| (addr.to_string(), *weight))
        .collect()
}

fn ips(addresses: &[&str]) -> Vec<IpAddr> {
    addresses.iter().map(|ip| ip.parse().unwrap()).collect()
}

fn listed(lb: &LoadBalancer) -> Vec<(String, u32)> {
    lb.backends()
        .iter()
        .map(|backend| (backend.addr().to_owned(), backend.weight()))
        .collect()
}

#[test]
fn each_address_of_a_name_becomes_a_backend_in_its_place() {
    let given = specs(&[
        ("10.0.0.1:80", 1),
        ("api.internal:8080", 3),
        ("[::1]:81", 1),
        ("db:5432", 2),
    ]);
    let answers = HashMap::from([
        (
            "api.internal",
            ips(&["10.0.0.6", "fd00::2", "10.0.0.5", "10.0.0.6"]),
        ),
        ("db", ips(&["10.0.0.9"])),
    ]);
    assert_eq!(
        expand(&given, &answers),
        specs(&[
            ("10.0.0.1:80", 1),
            ("10.0.0.5:8080", 3),
            ("10.0.0.6:8080", 3),
            ("[fd00::2]:8080", 3),
            ("[::1]:81", 1),
            ("10.0.0.9:5432", 2),
        ]),
        "sorted, deduplicated, with the spec's port and weight"
    );
}

#[test]
fn localhost_resolves_at_construction_and_an_unknown_name_is_named() {
    let lb = LoadBalancer::new(
        Strategy::RoundRobin,
        [("10.0.0.1:80", 1), ("localhost:9001", 2)],
    )
    .unwrap();
    let backends = listed(&lb);
    assert_eq!(backends[0], ("10.0.0.1:80".to_owned(), 1));
    // What /etc/hosts lists for localhost (here 127.0.0.1 alone), or RFC 6761's loopback
    // addresses where it does not list it.
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let mut expected: Vec<&str> = hosts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('#').next()?.split_whitespace();
            let ip = fields.next()?;
            fields.any(|name| name == "localhost").then_some(ip)
        })
        .collect();
    if expected.is_empty() {
        expected = vec!["127.0.0.1", "::1"];
    }
    let mut expected: Vec<(String, u32)> = expected
        .iter()
        .map(|ip| (SocketAddr::new(ip.parse().unwrap(), 9001).to_string(), 2))
        .collect();
    expected.sort();
    assert_eq!(backends[1..], expected[..]);
    assert_eq!(
        lb.specs().as_ref(),
        specs(&[("10.0.0.1:80", 1), ("localhost:9001", 2)])
    );

    let error = LoadBalancer::new(
        Strategy::RoundRobin,
        [("localhost:9001", 1), ("nothing.invalid:80", 1)],
    )
    .unwrap_err();
    assert_eq!(error.field, "backends[1]");
    assert!(error.message.contains("\"nothing.invalid\""), "{error}");
    let error = lb.set_backends([("nothing.invalid:80", 1)]).unwrap_err();
    assert_eq!(error.field, "backends[0]");
    assert!(
        listed(&lb).contains(&("127.0.0.1:9001".to_owned(), 2)),
        "unchanged"
    );
}

/// Answers set by the test, counting lookups.
#[derive(Default)]
struct FakeDns {
    answers: Mutex<HashMap<String, Result<Vec<IpAddr>, String>>>,
    lookups: AtomicUsize,
}

impl FakeDns {
    fn answer(&self, host: &str, answer: Result<&[&str], &str>) {
        let answer = answer.map(ips).map_err(str::to_owned);
        self.answers.lock().insert(host.to_owned(), answer);
    }

    fn lookups(&self) -> usize {
        self.lookups.load(Ordering::Relaxed)
    }

    /// Waits (on the paused clock) until `count` lookups were made: a lookup and what the
    /// refresh does with it happen in one poll, so the refresh is done too.
    async fn wait_for_lookups(&self, count: usize) {
        // On the paused clock a minute of waiting takes no time; past it, the refresh is
        // not coming.
        for _ in 0..600 {
            if self.lookups() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{} lookups, not {count}, within a minute", self.lookups());
    }
}

impl Resolve for FakeDns {
    fn lookup<'a>(&'a self, host: &'a str) -> Lookup<'a> {
        self.lookups.fetch_add(1, Ordering::Relaxed);
        let answer = self
            .answers
            .lock()
            .get(host)
            .cloned()
            .unwrap_or_else(|| Err("NXDOMAIN".into()));
        Box::pin(async move { answer })
    }
}

fn with_fake_dns(dns: &Arc<FakeDns>, given: &[(&str, u32)]) -> Arc<LoadBalancer> {
    let shared = dns.clone();
    let factory: ResolverFactory = Arc::new(move || Ok(shared.clone() as Arc<dyn Resolve>));
    let config = LoadBalancerConfig {
        dns_refresh: Duration::from_secs(30),
        ..LoadBalancerConfig::default()
    };
    let lb = LoadBalancer::with_resolver(Strategy::RoundRobin, given.to_vec(), config, factory);
    Arc::new(lb.unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_refresh_swaps_in_new_addresses_and_keeps_the_ones_that_stay() {
    let dns = Arc::new(FakeDns::default());
    dns.answer("api", Ok(&["10.0.0.1", "10.0.0.2"]));
    let lb = with_fake_dns(&dns, &[("api:80", 2), ("10.0.0.9:80", 1)]);
    assert_eq!(
        listed(&lb),
        specs(&[("10.0.0.1:80", 2), ("10.0.0.2:80", 2), ("10.0.0.9:80", 1)])
    );
    let staying = lb.backends()[1].clone();
    staying.set_healthy(false);
    let (shutdown, signal) = ShutdownSignal::new();
    let service = tokio::spawn(lb.discovery_service().run(signal));

    dns.answer("api", Ok(&["10.0.0.3", "10.0.0.2"]));
    tokio::time::sleep(Duration::from_millis(29_900)).await;
    assert_eq!(dns.lookups(), 1, "not before dns_refresh");
    dns.wait_for_lookups(2).await;
    assert_eq!(
        listed(&lb),
        specs(&[("10.0.0.2:80", 2), ("10.0.0.3:80", 2), ("10.0.0.9:80", 1)])
    );
    assert!(
        Arc::ptr_eq(&lb.backends()[0], &staying),
        "kept, health and all"
    );
    assert!(!lb.backends()[0].is_healthy());

    let before = lb.backends();
    dns.wait_for_lookups(3).await;
    assert!(
        Arc::ptr_eq(&before, &lb.backends()),
        "an unchanged answer changes nothing"
    );

    dns.answer("api", Err("SERVFAIL"));
    dns.wait_for_lookups(4).await;
    assert!(
        Arc::ptr_eq(&before, &lb.backends()),
        "a failed refresh keeps the last good list"
    );

    let _ = shutdown.send(true);
    service.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_refresh_never_undoes_set_backends_and_new_names_are_refreshed_too() {
    let dns = Arc::new(FakeDns::default());
    dns.answer("api", Ok(&["10.0.0.1"]));
    dns.answer("web", Ok(&["10.0.0.5"]));
    let lb = with_fake_dns(&dns, &[("api:80", 1)]);
    let resolved_for = lb.specs();
    lb.set_backends([("10.0.0.7:80", 1)]).unwrap();
    lb.apply_discovered(&resolved_for, specs(&[("10.0.0.2:80", 1)]));
    assert_eq!(
        listed(&lb),
        specs(&[("10.0.0.7:80", 1)]),
        "a stale refresh is dropped"
    );

    let (shutdown, signal) = ShutdownSignal::new();
    let service = tokio::spawn(lb.discovery_service().run(signal));
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(dns.lookups(), 1, "no names, no lookups");
    lb.set_backends([("web:8080", 1)]).unwrap();
    assert_eq!(listed(&lb), specs(&[("10.0.0.5:8080", 1)]));
    dns.answer("web", Ok(&["10.0.0.6"]));
    dns.wait_for_lookups(3).await;
    assert_eq!(listed(&lb), specs(&[("10.0.0.6:8080", 1)]));
    let _ = shutdown.send(true);
    service.await.unwrap();
}

#[test]
fn dns_refresh_must_be_positive() {
    let config = LoadBalancerConfig {
        dns_refresh: Duration::ZERO,
        ..LoadBalancerConfig::default()
    };
    let error =
        LoadBalancer::with_config(Strategy::RoundRobin, [("10.0.0.1:80", 1)], config).unwrap_err();
    assert_eq!(error.field, "dns_refresh");
}
