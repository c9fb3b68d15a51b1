//! Which connections are served at all, decided on the client's address alone (Pingora's
//! `ConnectionFilter`). The server asks a listener's [`ConnectionFilter`] after the PROXY
//! protocol header, so it judges the client behind an L4 balancer, and before the TLS
//! handshake, so a refused client costs no handshake: a refused connection is closed at once,
//! nothing written, and never reaches the service. [`IpAccess`] is the declarative one:
//! nginx's `allow` / `deny`, run in Rust.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

use crate::cidr::Networks;
use crate::lb::ConfigError;

/// A filter's answer, to await: true serves the connection, false closes it.
pub type Verdict<'a> = Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// Decides, per accepted connection, whether to serve it. Boxed (one small allocation per
/// connection, nothing beside a TCP accept) so that a listener can hold any filter; a
/// listener without one pays nothing.
pub trait ConnectionFilter: fmt::Debug + Send + Sync + 'static {
    /// `client` is the connection's peer, or the source a PROXY protocol header named.
    fn should_accept(&self, client: SocketAddr) -> Verdict<'_>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Allow,
    Deny,
}

/// Ordered allow/deny rules over client networks: the first rule whose networks hold the
/// client decides, `otherwise` when none does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpAccess {
    rules: Vec<(Access, Networks)>,
    otherwise: Access,
}

impl IpAccess {
    pub fn new(rules: Vec<(Access, Networks)>, otherwise: Access) -> Self {
        IpAccess { rules, otherwise }
    }

    /// nginx's common form: the `deny` networks are refused, then the `allow` ones served
    /// (so a deny inside an allowed network wins); anyone else is refused when `allow`
    /// names networks (`allow` alone: only those), served when it names none (`deny`
    /// alone: all but those). Errors name the entry, as `allow[2]`.
    pub fn allow_deny(
        allow: &[impl AsRef<str>],
        deny: &[impl AsRef<str>],
    ) -> Result<Self, ConfigError> {
        let allow = Networks::parse("allow", allow)?;
        let deny = Networks::parse("deny", deny)?;
        let otherwise = if allow.is_empty() {
            Access::Allow
        } else {
            Access::Deny
        };
        Ok(IpAccess::new(
            vec![(Access::Deny, deny), (Access::Allow, allow)],
            otherwise,
        ))
    }

    pub fn decide(&self, client: IpAddr) -> Access {
        self.rules
            .iter()
            .find(|(_, networks)| networks.contains(client))
            .map_or(self.otherwise, |(access, _)| *access)
    }
}

impl ConnectionFilter for IpAccess {
    fn should_accept(&self, client: SocketAddr) -> Verdict<'_> {
        let accept = self.decide(client.ip()) == Access::Allow;
        Box::pin(std::future::ready(accept))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    const NONE: [&str; 0] = [];

    #[test]
    fn allow_alone_refuses_everyone_else() {
        let access = IpAccess::allow_deny(&["10.0.0.0/8", "::1"], &NONE).unwrap();
        assert_eq!(access.decide(ip("10.1.2.3")), Access::Allow);
        assert_eq!(access.decide(ip("::1")), Access::Allow);
        assert_eq!(access.decide(ip("127.0.0.1")), Access::Deny);
        assert_eq!(access.decide(ip("2001:db8::1")), Access::Deny);
    }

    #[test]
    fn deny_alone_serves_everyone_else() {
        let access = IpAccess::allow_deny(&NONE, &["192.0.2.0/24", "2001:db8::/32"]).unwrap();
        assert_eq!(access.decide(ip("192.0.2.9")), Access::Deny);
        assert_eq!(access.decide(ip("::ffff:192.0.2.9")), Access::Deny);
        assert_eq!(access.decide(ip("2001:db8::1")), Access::Deny);
        assert_eq!(access.decide(ip("198.51.100.1")), Access::Allow);
        assert_eq!(access.decide(ip("::1")), Access::Allow);
    }

    #[test]
    fn a_deny_inside_an_allowed_network_wins() {
        let access = IpAccess::allow_deny(&["10.0.0.0/8"], &["10.9.0.0/16"]).unwrap();
        assert_eq!(access.decide(ip("10.1.0.1")), Access::Allow);
        assert_eq!(access.decide(ip("10.9.0.1")), Access::Deny);
        assert_eq!(access.decide(ip("11.0.0.1")), Access::Deny);
    }

    #[test]
    fn ordered_rules_first_match_wins() {
        let nets = |list: &[&str]| Networks::parse("rules", list).unwrap();
        // nginx: allow 10.1.0.0/16; deny 10.0.0.0/8; (allow all)
        let access = IpAccess::new(
            vec![
                (Access::Allow, nets(&["10.1.0.0/16"])),
                (Access::Deny, nets(&["10.0.0.0/8"])),
            ],
            Access::Allow,
        );
        assert_eq!(access.decide(ip("10.1.2.3")), Access::Allow);
        assert_eq!(access.decide(ip("10.2.2.3")), Access::Deny);
        assert_eq!(access.decide(ip("8.8.8.8")), Access::Allow);
    }

    #[test]
    fn bad_entries_are_named() {
        let error = IpAccess::allow_deny(&["10.0.0.0/8"], &["::1", "nope"]).unwrap_err();
        assert_eq!(error.to_string(), "deny[1]: \"nope\" is not a CIDR");
    }

    #[tokio::test]
    async fn answers_as_a_connection_filter() {
        let access = IpAccess::allow_deny(&["127.0.0.0/8"], &NONE).unwrap();
        assert!(
            access
                .should_accept("127.0.0.1:5000".parse().unwrap())
                .await
        );
        assert!(!access.should_accept("[::1]:5000".parse().unwrap()).await);
    }
}
