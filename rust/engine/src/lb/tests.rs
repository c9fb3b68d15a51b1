use super::*;

fn balancer(strategy: Strategy, backends: &[(&str, u32)]) -> LoadBalancer {
    LoadBalancer::with_seed(strategy, backends.iter().copied(), 42).unwrap()
}

fn pick(lb: &LoadBalancer, key: Option<&[u8]>) -> String {
    lb.select(key).expect("a healthy backend").addr().to_owned()
}

fn picks(lb: &LoadBalancer, count: usize) -> Vec<String> {
    (0..count).map(|_| pick(lb, None)).collect()
}

const EVERY_STRATEGY: [Strategy; 5] = [
    Strategy::RoundRobin,
    Strategy::WeightedRoundRobin,
    Strategy::Random,
    Strategy::LeastConnections,
    Strategy::Consistent,
];

const A: &str = "10.0.0.1:80";
const B: &str = "10.0.0.2:80";
const C: &str = "10.0.0.3:80";

fn ten_backends() -> Vec<(String, u32)> {
    (1..=10).map(|i| (format!("10.0.0.{i}:8080"), 1)).collect()
}

#[test]
fn round_robin_rotates_exactly_over_healthy_backends() {
    let lb = balancer(Strategy::RoundRobin, &[(A, 1), (B, 5), (C, 1)]);
    assert_eq!(picks(&lb, 6), [A, B, C, A, B, C]);
    lb.backends()[1].set_healthy(false);
    assert_eq!(picks(&lb, 4), [A, C, A, C]);
}

#[test]
fn smooth_weighted_round_robin_matches_nginx() {
    let lb = balancer(Strategy::WeightedRoundRobin, &[(A, 5), (B, 1), (C, 1)]);
    let expected = [A, A, B, A, C, A, A];
    assert_eq!(picks(&lb, 7), expected);
    assert_eq!(picks(&lb, 7), expected, "the cycle repeats");
}

#[test]
fn weighted_random_follows_the_weights() {
    let lb = balancer(Strategy::Random, &[(A, 1), (B, 2), (C, 7)]);
    let draws = 100_000;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..draws {
        *counts.entry(pick(&lb, None)).or_default() += 1;
    }
    for (addr, share) in [(A, 0.1), (B, 0.2), (C, 0.7)] {
        let seen = counts[addr] as f64 / draws as f64;
        assert!(
            (seen - share).abs() < 0.02,
            "{addr}: {seen} of draws, want {share}"
        );
    }
}

#[test]
fn weighted_random_redraws_among_healthy_backends_by_weight() {
    let lb = balancer(Strategy::Random, &[(A, 1), (B, 8), (C, 3)]);
    lb.backends()[1].set_healthy(false);
    let draws = 100_000;
    let on_a = (0..draws).filter(|_| pick(&lb, None) == A).count();
    let seen = on_a as f64 / draws as f64;
    assert!(
        (seen - 0.25).abs() < 0.02,
        "A got {seen} of draws, want 0.25"
    );
}

#[test]
fn least_connections_avoids_a_busy_backend_and_rotates_ties() {
    let lb = balancer(Strategy::LeastConnections, &[(A, 1), (B, 1), (C, 1)]);
    let held: Vec<Selected> = (0..3).map(|_| lb.select(None).unwrap()).collect();
    assert!(held.iter().all(|selected| selected.in_flight() == 1));
    let busy_a = lb.select(None).unwrap();
    assert_eq!(busy_a.addr(), A, "ties go round robin");
    drop(held);
    for _ in 0..10 {
        let selected = lb.select(None).unwrap();
        assert_ne!(selected.addr(), A, "A still serves a request");
    }
    drop(busy_a);
    assert!(lb.backends().iter().all(|backend| backend.in_flight() == 0));
}

#[test]
fn consistent_hashing_keeps_keys_on_their_backend() {
    let lb = LoadBalancer::new(Strategy::Consistent, ten_backends()).unwrap();
    let key = b"user-1234".as_slice();
    let first = pick(&lb, Some(key));
    assert!((0..100).all(|_| pick(&lb, Some(key)) == first));
    let same_layout = LoadBalancer::new(Strategy::Consistent, ten_backends()).unwrap();
    assert_eq!(
        pick(&same_layout, Some(key)),
        first,
        "the ring depends on addresses only"
    );
}

#[test]
fn removing_one_of_ten_backends_moves_only_its_keys() {
    let all = ten_backends();
    let lb = LoadBalancer::new(Strategy::Consistent, all.clone()).unwrap();
    let keys: Vec<String> = (0..10_000).map(|i| format!("key-{i}")).collect();
    let before: Vec<String> = keys.iter().map(|k| pick(&lb, Some(k.as_bytes()))).collect();
    let removed = &all[3].0;
    lb.set_backends(all.iter().filter(|(addr, _)| addr != removed).cloned())
        .unwrap();
    let mut moved = 0;
    for (key, was) in keys.iter().zip(&before) {
        let now = pick(&lb, Some(key.as_bytes()));
        if now != *was {
            assert_eq!(was, removed, "{key} moved from {was}, which is still there");
            moved += 1;
        }
    }
    assert!(
        moved > 0 && moved <= 1_000 + 500,
        "{moved} of 10,000 keys moved"
    );
}

#[test]
fn consistent_hashing_spreads_keys_by_weight() {
    let lb = balancer(Strategy::Consistent, &[(A, 1), (B, 3)]);
    let on_b = (0..10_000)
        .filter(|i| pick(&lb, Some(format!("k{i}").as_bytes())) == B)
        .count();
    assert!(
        (6_500..=8_500).contains(&on_b),
        "B got {on_b} of 10,000 keys"
    );
}

#[test]
fn every_strategy_skips_unhealthy_backends() {
    for strategy in EVERY_STRATEGY {
        let lb = balancer(strategy, &[(A, 1), (B, 4), (C, 1)]);
        lb.backends()[1].set_healthy(false);
        for i in 0..200 {
            let key = format!("key-{i}");
            let selected = lb.select(Some(key.as_bytes())).unwrap();
            assert_ne!(
                selected.addr(),
                B,
                "{strategy:?} picked an unhealthy backend"
            );
        }
        for backend in lb.backends().iter() {
            backend.set_healthy(false);
        }
        assert!(
            lb.select(Some(b"k")).is_none(),
            "{strategy:?} with none healthy"
        );
        assert!(lb.select(None).is_none(), "{strategy:?} with none healthy");
        assert!(lb.backends()[0].set_healthy(true), "a change is reported");
        assert_eq!(pick(&lb, Some(b"k")), A, "{strategy:?} after recovery");
    }
}

#[test]
fn set_backends_keeps_unchanged_backends_and_their_state() {
    let lb = balancer(Strategy::RoundRobin, &[(A, 1), (B, 1)]);
    let held = lb.select(None).unwrap();
    lb.backends()[1].set_healthy(false);
    lb.set_backends([(A, 1), (B, 1), (C, 1)]).unwrap();
    let backends = lb.backends();
    assert!(Arc::ptr_eq(&backends[0], held.backend()));
    assert_eq!(backends[0].in_flight(), 1);
    assert!(!backends[1].is_healthy());
    assert!(backends[2].is_healthy());
    let error = lb.set_backends([(A, 0)]).unwrap_err();
    assert_eq!(error.field, "backends[0].weight");
    assert_eq!(lb.backends().len(), 3, "a bad list leaves the old one");
}

#[test]
fn bad_configs_name_the_field() {
    let error = LoadBalancer::new(Strategy::RoundRobin, Vec::<(&str, u32)>::new()).unwrap_err();
    assert_eq!(error.field, "backends");
    let error = LoadBalancer::new(Strategy::RoundRobin, [(A, 1), (B, 0)]).unwrap_err();
    assert_eq!(error.field, "backends[1].weight");
    assert!(
        error.to_string().starts_with("backends[1].weight: "),
        "{error}"
    );
    for bad in ["nohost", ":80", "host:0", "host:x"] {
        let error = LoadBalancer::new(Strategy::Random, [(A, 1), (bad, 1)]).unwrap_err();
        assert_eq!(error.field, "backends[1].address", "{bad}");
        assert!(error.message.contains(bad), "{error}");
    }
    let error = Strategy::parse("fastest").unwrap_err();
    assert_eq!(error.field, "strategy");
    assert!(error.message.contains("\"fastest\""), "{error}");
    assert_eq!(
        Strategy::parse("least_connections"),
        Ok(Strategy::LeastConnections)
    );
}

#[test]
fn consistent_hashing_maps_keys_as_nginx_does() {
    // Mappings nginx's `hash $uri consistent` gives over these two upstreams (pingora-ketama
    // checks the same sample).
    let lb = balancer(
        Strategy::Consistent,
        &[("127.0.0.1:7777", 1), ("127.0.0.1:7778", 1)],
    );
    for (uri, upstream) in [
        ("/some/path", "127.0.0.1:7778"),
        ("/some/longer/path", "127.0.0.1:7777"),
        ("/sad/zaidoon", "127.0.0.1:7778"),
        ("/g", "127.0.0.1:7777"),
        (
            "/pingora/team/is/cool/and/this/is/a/long/uri",
            "127.0.0.1:7778",
        ),
        ("/i/am/not/confident/in/this/code", "127.0.0.1:7777"),
    ] {
        assert_eq!(pick(&lb, Some(uri.as_bytes())), upstream, "{uri}");
    }
}

#[test]
fn a_retry_prefers_backends_not_tried_yet_under_every_strategy() {
    for strategy in EVERY_STRATEGY {
        let lb = balancer(strategy, &[(A, 1), (B, 2), (C, 1)]);
        for _ in 0..20 {
            let picked = lb.select_untried(Some(b"key"), &[A, B]).unwrap();
            assert_eq!(picked.addr(), C, "{strategy:?}");
        }
        // Every backend tried: any healthy one again (a fresh connection may work).
        assert!(lb.select_untried(Some(b"key"), &[A, B, C]).is_some());
        lb.backends()[2].set_healthy(false);
        let picked = lb.select_untried(Some(b"key"), &[A, B]).unwrap();
        assert_ne!(
            picked.addr(),
            C,
            "{strategy:?}: an unhealthy backend is never picked"
        );
    }
}
