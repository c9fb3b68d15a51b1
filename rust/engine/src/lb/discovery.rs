//! DNS discovery. A backend given by name (`"api.internal:8080"`, any host that is not an IP
//! literal) stands for every address the name resolves to (A and AAAA), each a backend with
//! the spec's weight. Names are resolved when the list is set (a name that does not resolve is
//! a config error naming `backends[i]`) and again every `dns_refresh` (default 30 s) by a
//! background service ([`LoadBalancer::discovery_service`]). Answers are cached for their
//! TTL, so a changed record shows within `dns_refresh` of its TTL running out. A refresh that
//! fails keeps the last good list; addresses that stay keep their backend, with its health
//! and counts.
//!
//! hickory-resolver, because it is async on tokio (no thread per lookup, as getaddrinfo
//! needs), asks for A and AAAA together, keeps TTLs, and reads /etc/hosts and resolv.conf
//! as the system resolver does.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::LookupIpStrategy;
use hickory_resolver::proto::op::Query;
use hickory_resolver::proto::rr::{RData, RecordType};
use hickory_resolver::{Hosts, Name, TokioResolver};

use super::{ConfigError, LoadBalancer};
use crate::service::{BackgroundService, BoxFuture, ShutdownSignal};

/// Where discovery logs go: the `ferroxy.dns` logger on the Python side.
const LOG_TARGET: &str = "ferroxy.dns";

/// How often names are resolved again, unless configured.
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(30);

/// Backends as given: `(host:port, weight)`, hosts that are names included.
pub(super) type Specs = Arc<[(String, u32)]>;

pub(super) type Lookup<'a> = Pin<Box<dyn Future<Output = Result<Vec<IpAddr>, String>> + Send + 'a>>;

/// Resolves names to addresses, on the runtime it is used on.
pub(super) trait Resolve: Send + Sync {
    fn lookup<'a>(&'a self, host: &'a str) -> Lookup<'a>;
}

/// Makes a [`Resolve`] for the runtime it is called on (a resolver's connections belong to
/// one runtime).
pub(super) type ResolverFactory = Arc<dyn Fn() -> Result<Arc<dyn Resolve>, String> + Send + Sync>;

/// The system's DNS configuration (resolv.conf, /etc/hosts).
pub(super) fn system_resolver() -> ResolverFactory {
    Arc::new(|| {
        let mut builder = TokioResolver::builder_tokio()
            .map_err(|error| format!("cannot read the system's DNS configuration: {error}"))?;
        builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        Ok(Arc::new(SystemDns(builder.build())) as Arc<dyn Resolve>)
    })
}

struct SystemDns(TokioResolver);

impl Resolve for SystemDns {
    fn lookup<'a>(&'a self, host: &'a str) -> Lookup<'a> {
        Box::pin(async move {
            let listed = in_hosts_file(host);
            if !listed.is_empty() {
                return Ok(listed);
            }
            let answer = self
                .0
                .lookup_ip(host)
                .await
                .map_err(|error| error.to_string())?;
            Ok(answer.iter().collect())
        })
    }
}

/// The addresses /etc/hosts gives `host`, read afresh (it is small, and may change). A name
/// listed there is answered from it alone, as getaddrinfo does: hickory looks A and AAAA up
/// there separately, so `localhost` listed with 127.0.0.1 only would also get ::1 (RFC
/// 6761's answer), where nothing may listen.
fn in_hosts_file(host: &str) -> Vec<IpAddr> {
    let (Ok(hosts), Ok(name)) = (Hosts::from_system(), Name::from_str(host)) else {
        return Vec::new();
    };
    [RecordType::A, RecordType::AAAA]
        .into_iter()
        .filter_map(|record_type| {
            hosts.lookup_static_host(&Query::query(name.clone(), record_type))
        })
        .flat_map(|lookup| lookup.iter().filter_map(RData::ip_addr).collect::<Vec<_>>())
        .collect()
}

/// The host of a `host:port` spec when it is a name (not an IP literal), and its port.
fn name_of(addr: &str) -> Option<(&str, u16)> {
    if addr.parse::<SocketAddr>().is_ok() {
        return None;
    }
    let (host, port) = addr.rsplit_once(':')?;
    Some((host, port.parse().ok()?))
}

pub(super) fn has_names(specs: &[(String, u32)]) -> bool {
    specs.iter().any(|(addr, _)| name_of(addr).is_some())
}

/// Each spec as the backends it stands for, in order: an IP literal itself, a name one per
/// address it resolved to (sorted: DNS servers rotate their answers, and a list that only
/// changed order would rebuild the pool for nothing).
pub(super) fn expand(
    specs: &[(String, u32)],
    answers: &HashMap<&str, Vec<IpAddr>>,
) -> Vec<(String, u32)> {
    let mut backends = Vec::with_capacity(specs.len());
    for (addr, weight) in specs {
        let Some((host, port)) = name_of(addr) else {
            backends.push((addr.clone(), *weight));
            continue;
        };
        let mut addresses = answers.get(host).cloned().unwrap_or_default();
        addresses.sort_unstable();
        addresses.dedup();
        backends.extend(
            addresses
                .into_iter()
                .map(|ip| (SocketAddr::new(ip, port).to_string(), *weight)),
        );
    }
    backends
}

/// Resolves every name in `specs` (each once) and expands them. Errors name the first spec
/// whose name did not resolve (`backends[i]`).
pub(super) async fn resolve(
    resolver: &dyn Resolve,
    specs: &[(String, u32)],
) -> Result<Vec<(String, u32)>, ConfigError> {
    let mut answers: HashMap<&str, Vec<IpAddr>> = HashMap::new();
    for (index, (addr, _)) in specs.iter().enumerate() {
        let Some((host, _)) = name_of(addr) else {
            continue;
        };
        if answers.contains_key(host) {
            continue;
        }
        let addresses = resolver
            .lookup(host)
            .await
            .and_then(|addresses| {
                if addresses.is_empty() {
                    Err("no addresses".into())
                } else {
                    Ok(addresses)
                }
            })
            .map_err(|error| {
                ConfigError::new(
                    format!("backends[{index}]"),
                    format!("cannot resolve {host:?}: {error}"),
                )
            })?;
        answers.insert(host, addresses);
    }
    Ok(expand(specs, &answers))
}

/// [`resolve`] for a caller that is not async (building a balancer, `set_backends`): on a
/// thread of its own, so that it works from a runtime's thread too (blocking it meanwhile).
/// A list of IP literals is returned as it is, with no thread.
pub(super) fn resolve_blocking(
    factory: &ResolverFactory,
    specs: &[(String, u32)],
) -> Result<Vec<(String, u32)>, ConfigError> {
    if !has_names(specs) {
        return Ok(specs.to_vec());
    }
    let resolving = || -> Result<Vec<(String, u32)>, ConfigError> {
        let cannot = |error: String| ConfigError::new("backends", error);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|error| cannot(format!("cannot start a DNS lookup: {error}")))?;
        runtime.block_on(async {
            let resolver = factory().map_err(cannot)?;
            resolve(resolver.as_ref(), specs).await
        })
    };
    std::thread::scope(|scope| scope.spawn(resolving).join())
        .unwrap_or_else(|_| Err(ConfigError::new("backends", "the DNS lookup panicked")))
}

/// Re-resolves a balancer's names every `dns_refresh` while a server runs it. Of several
/// such services for one balancer, one refreshes at a time.
pub(super) struct DiscoveryService {
    pub(super) balancer: Arc<LoadBalancer>,
}

impl BackgroundService for DiscoveryService {
    fn name(&self) -> &'static str {
        "DNS discovery"
    }

    fn run(self: Box<Self>, mut shutdown: ShutdownSignal) -> BoxFuture {
        Box::pin(async move {
            let balancer = self.balancer;
            let _turn = tokio::select! {
                turn = balancer.discovering.clone().acquire_owned() => turn,
                () = shutdown.begun() => return,
            };
            // Made at the first name, on this runtime, and kept: its cache honours TTLs.
            let mut resolver: Option<Arc<dyn Resolve>> = None;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(balancer.dns_refresh) => {}
                    () = shutdown.begun() => return,
                }
                let specs = balancer.specs();
                if !has_names(&specs) {
                    continue;
                }
                let refreshed = async {
                    if resolver.is_none() {
                        resolver = Some((balancer.resolver_factory)()?);
                    }
                    let resolver = resolver.as_deref().expect("made above");
                    resolve(resolver, &specs)
                        .await
                        .map_err(|error| error.to_string())
                };
                // A lookup can take the resolver's timeouts: shutdown does not wait for it.
                let refreshed = tokio::select! {
                    refreshed = refreshed => refreshed,
                    () = shutdown.begun() => return,
                };
                match refreshed {
                    Ok(resolved) => balancer.apply_discovered(&specs, resolved),
                    Err(error) => tracing::warn!(
                        target: LOG_TARGET,
                        "DNS refresh failed, keeping the last good backends: {error}"
                    ),
                }
            }
        })
    }
}

impl LoadBalancer {
    /// A refresh's outcome for `specs`: applied unless the backends were set again
    /// meanwhile, or nothing changed.
    pub(super) fn apply_discovered(&self, specs: &Specs, resolved: Vec<(String, u32)>) {
        let current = self.specs.lock();
        if !Arc::ptr_eq(&current, specs) {
            return;
        }
        let before: Vec<(String, u32)> = self
            .backends()
            .iter()
            .map(|backend| (backend.addr().to_owned(), backend.weight()))
            .collect();
        if before == resolved {
            return;
        }
        log_change(&before, &resolved);
        if let Err(error) = self.replace(resolved) {
            tracing::warn!(target: LOG_TARGET, "DNS refresh gave an unusable list, keeping the last good one: {error}");
        }
    }
}

/// Logs what a refresh changed.
fn log_change(before: &[(String, u32)], after: &[(String, u32)]) {
    let added: Vec<&str> = after
        .iter()
        .filter(|backend| !before.contains(backend))
        .map(|(addr, _)| addr.as_str())
        .collect();
    let removed: Vec<&str> = before
        .iter()
        .filter(|backend| !after.contains(backend))
        .map(|(addr, _)| addr.as_str())
        .collect();
    tracing::info!(
        target: LOG_TARGET,
        "DNS refresh changed the backends: added {added:?}, removed {removed:?}"
    );
}
