//! IP networks as configuration names them (CIDRs, or bare addresses), and whether a client's
//! address is in one: shared by the filters' client-IP condition and the connection filter's
//! allow/deny rules, so both read and match a list the same way.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::lb::ConfigError;

/// A list of networks, IPv4 and IPv6 together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Networks(Vec<IpNet>);

impl Networks {
    /// `list`'s CIDRs (a bare address is a /32 or /128; host bits are dropped, as nginx
    /// does); an error names the entry, as `field[1]`.
    pub fn parse(field: &str, list: &[impl AsRef<str>]) -> Result<Self, ConfigError> {
        list.iter()
            .enumerate()
            .map(|(i, text)| {
                let text = text.as_ref();
                text.parse::<IpNet>()
                    .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                    .map(|net| net.trunc())
                    .map_err(|_| {
                        ConfigError::new(format!("{field}[{i}]"), format!("{text:?} is not a CIDR"))
                    })
            })
            .collect::<Result<_, _>>()
            .map(Networks)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is in one of the networks. A v4 client on a dual-stack socket shows as
    /// `::ffff:a.b.c.d`: it matches the v4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn v4_v6_bare_addresses_and_mapped_clients() {
        let nets = Networks::parse(
            "allow",
            &["10.0.0.0/8", "2001:db8::/32", "192.0.2.7", "::1"],
        )
        .unwrap();
        assert!(nets.contains(ip("10.1.2.3")));
        assert!(nets.contains(ip("::ffff:10.1.2.3")));
        assert!(nets.contains(ip("2001:db8::1")));
        assert!(nets.contains(ip("192.0.2.7")));
        assert!(nets.contains(ip("::1")));
        assert!(!nets.contains(ip("192.0.2.8")));
        assert!(!nets.contains(ip("2001:db9::1")));
        assert!(!nets.contains(ip("127.0.0.1")));
    }

    #[test]
    fn host_bits_are_dropped() {
        let nets = Networks::parse("allow", &["10.1.2.3/8"]).unwrap();
        assert!(nets.contains(ip("10.200.0.1")));
    }

    #[test]
    fn errors_name_the_entry() {
        let error = Networks::parse("deny", &["10.0.0.0/8", "10.0.0.300/8"]).unwrap_err();
        assert_eq!(error.field, "deny[1]");
        assert!(error.message.contains("10.0.0.300/8"), "{error}");
        assert!(Networks::parse("deny", &["10.0.0.0/33"]).is_err());
        assert!(Networks::parse("deny", &[""]).is_err());
    }
}
