//! Parsing of load-balancer addresses as users write them.

use std::net::IpAddr;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseHostError {
    #[error("invalid address {0:?}: not an IPv4 or IPv6 address")]
    Malformed(String),
    #[error("invalid address {0:?}: a load-balancer address is a single host (/32 or /128)")]
    NotAHost(String),
}

/// Parses `203.0.113.10`, `203.0.113.10/32`, `2001:db8::1` or `2001:db8::1/128`.
///
/// Goes through std's parser, which rejects leading-zero octets (`010.0.0.1` is ambiguous:
/// octal to some tools, decimal to others).
pub fn parse_host(text: &str) -> Result<IpAddr, ParseHostError> {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let ip: IpAddr = address
        .parse()
        .map_err(|_| ParseHostError::Malformed(text.to_owned()))?;
    let host_prefix = if ip.is_ipv4() { "32" } else { "128" };
    match prefix {
        None => Ok(ip),
        Some(prefix) if prefix == host_prefix => Ok(ip),
        Some(prefix) if prefix.parse::<u8>().is_ok() => {
            Err(ParseHostError::NotAHost(text.to_owned()))
        }
        Some(_) => Err(ParseHostError::Malformed(text.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_hosts_with_and_without_prefix() {
        for (text, expected) in [
            ("203.0.113.10", "203.0.113.10"),
            ("203.0.113.10/32", "203.0.113.10"),
            ("2001:db8::1", "2001:db8::1"),
            ("2001:db8::1/128", "2001:db8::1"),
        ] {
            assert_eq!(parse_host(text), Ok(expected.parse().unwrap()), "{text}");
        }
    }

    #[test]
    fn rejects_malformed_addresses_naming_them() {
        for text in [
            "300.1.1.1",
            "010.0.0.1",
            "",
            "vip",
            "1.2.3.4/x",
            "2001:db8::g",
        ] {
            let err = parse_host(text).unwrap_err();
            assert_eq!(err, ParseHostError::Malformed(text.to_owned()));
            assert!(err.to_string().contains(&format!("{text:?}")));
        }
    }

    #[test]
    fn rejects_networks() {
        for text in ["203.0.113.0/24", "2001:db8::/64", "1.2.3.4/128"] {
            assert_eq!(
                parse_host(text),
                Err(ParseHostError::NotAHost(text.to_owned()))
            );
        }
    }
}
