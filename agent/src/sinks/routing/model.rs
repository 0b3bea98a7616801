//! The routing part of lbagent's config, validated into types that can only hold values BIRD
//! reads as meant. BIRD strings have no escapes, so a value with a quote, a newline or a
//! control character is rejected, never escaped.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

use super::selector::{NodeSelector, RawSelector};

/// A validation failure: the field (as a path in the config), the value, and what is allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {value} is not allowed ({allowed})")]
pub struct FieldError {
    pub field: String,
    pub value: String,
    pub allowed: &'static str,
}

impl FieldError {
    pub(crate) fn new(
        field: impl Into<String>,
        value: impl fmt::Display,
        allowed: &'static str,
    ) -> Self {
        Self {
            field: field.into(),
            value: value.to_string(),
            allowed,
        }
    }
}

/// A BIRD symbol (protocol names): a letter or `_`, then letters, digits and `_`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Symbol(String);

impl Symbol {
    pub fn new(text: &str, field: &str) -> Result<Self, FieldError> {
        let mut chars = text.chars();
        let ok = text.len() <= 64
            && chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(FieldError::new(
                field,
                format!("{text:?}"),
                "a name of letters, digits and '_', starting with a letter, at most 64",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An interface name as it goes into a BIRD `interface "..."` pattern: no characters BIRD
/// would read as a pattern (`*`, `?`, `[`, a leading `-`) or as the end of the string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfaceName(String);

impl IfaceName {
    pub fn new(text: &str, field: &str) -> Result<Self, FieldError> {
        let ok = crate::sinks::is_interface_name(text)
            && !text.starts_with('-')
            && !text
                .chars()
                .any(|c| matches!(c, '"' | '\\' | '*' | '?' | '[' | ']') || !c.is_ascii_graphic());
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(FieldError::new(
                field,
                format!("{text:?}"),
                "an interface name: 1-15 printable characters, none of \" \\ * ? [ ] / :, not starting with -",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A BGP password: printable, no quote (BIRD strings cannot escape one), at most 80 bytes
/// (the kernel's TCP-MD5 key limit).
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(text: &str, field: &str) -> Result<Self, FieldError> {
        let ok = !text.is_empty()
            && text.len() <= 80
            && !text.chars().any(|c| c == '"' || c.is_control());
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            // The value itself is a secret: name its length, not its content.
            Err(FieldError::new(
                field,
                format!("<{} bytes>", text.len()),
                "1-80 printable characters without '\"'",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(address: &IpAddr) -> Self {
        if address.is_ipv4() {
            Self::Ipv4
        } else {
            Self::Ipv6
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// lbagent runs BIRD as its child.
    Managed { binary: PathBuf, state_dir: PathBuf },
    /// BIRD is the operator's; lbagent writes an include file and reloads over the socket.
    External { include: PathBuf, socket: PathBuf },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutingConfig {
    pub mode: Mode,
    /// `None`: the node's first global IPv4 address, found at start.
    pub router_id: Option<Ipv4Addr>,
    pub export: Export,
    pub bgp: Vec<BgpNeighbor>,
    pub ospf: Vec<Ospf>,
    pub rip: Vec<Rip>,
}

/// What is advertised: kube-lb0's host routes, optionally only inside some prefixes, and
/// with BGP communities attached.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Export {
    pub prefixes: Vec<IpNet>,
    pub communities: Vec<(u16, u16)>,
    /// The most routes one channel (a session's family) advertises; BIRD blocks the rest.
    pub max_routes: Option<u32>,
}

/// Whom a BGP entry peers with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    Address(IpAddr),
    /// The next hops of the node's default route, per family in `families`: one session each.
    Gateway,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpNeighbor {
    pub name: Symbol,
    pub peer: Peer,
    /// The interface a link-local neighbour is reached through (a gateway's, found at run time).
    pub interface: Option<IfaceName>,
    /// `None`: every node runs it.
    pub node_selector: Option<NodeSelector>,
    pub port: u16,
    pub asn: u32,
    pub local_asn: u32,
    pub source_address: Option<IpAddr>,
    pub password: Option<Password>,
    pub multihop: Option<u8>,
    pub hold_time: Duration,
    pub keepalive_time: Option<Duration>,
    pub connect_retry_time: Option<Duration>,
    /// BIRD waits this long (default 5 s) before its first connection attempt.
    pub connect_delay_time: Option<Duration>,
    pub bfd: bool,
    pub graceful_restart: bool,
    pub families: Vec<Family>,
    /// MED on every route to this neighbour.
    pub med: Option<u32>,
    /// Local preference on every route to this neighbour (iBGP carries it; eBGP drops it).
    pub local_pref: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OspfType {
    Broadcast,
    PointToPoint,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OspfInterface {
    pub name: IfaceName,
    pub cost: Option<u16>,
    pub kind: Option<OspfType>,
    pub hello: Option<u16>,
    pub dead: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ospf {
    pub name: Symbol,
    pub node_selector: Option<NodeSelector>,
    /// IPv4 runs OSPFv2, IPv6 OSPFv3.
    pub family: Family,
    pub area: Ipv4Addr,
    pub interfaces: Vec<OspfInterface>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rip {
    pub name: Symbol,
    pub node_selector: Option<NodeSelector>,
    /// IPv4 runs RIP, IPv6 RIPng.
    pub family: Family,
    pub interfaces: Vec<IfaceName>,
    pub update_time: Option<u16>,
}

// ---- raw YAML ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRouting {
    mode: Option<String>,
    bird: Option<String>,
    state_dir: Option<PathBuf>,
    include: Option<PathBuf>,
    socket: Option<PathBuf>,
    router_id: Option<String>,
    #[serde(default)]
    export: RawExport,
    #[serde(default)]
    bgp: Vec<RawBgp>,
    #[serde(default)]
    ospf: Vec<RawOspf>,
    #[serde(default)]
    rip: Vec<RawRip>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawExport {
    #[serde(default)]
    prefixes: Vec<String>,
    #[serde(default)]
    communities: Vec<String>,
    max_routes: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBgp {
    name: Option<String>,
    node_selector: Option<RawSelector>,
    neighbor: String,
    port: Option<i64>,
    asn: i64,
    local_asn: i64,
    source_address: Option<String>,
    password: Option<String>,
    multihop: Option<i64>,
    hold_time: Option<String>,
    keepalive_time: Option<String>,
    connect_retry_time: Option<String>,
    connect_delay_time: Option<String>,
    #[serde(default)]
    bfd: bool,
    graceful_restart: Option<bool>,
    families: Option<Vec<String>>,
    med: Option<i64>,
    local_pref: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOspf {
    name: Option<String>,
    node_selector: Option<RawSelector>,
    family: String,
    area: serde_json::Value,
    interfaces: Vec<RawOspfInterface>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawOspfInterface {
    name: String,
    cost: Option<i64>,
    #[serde(rename = "type")]
    kind: Option<String>,
    hello: Option<i64>,
    dead: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRip {
    name: Option<String>,
    node_selector: Option<RawSelector>,
    family: String,
    interfaces: Vec<String>,
    update_time: Option<i64>,
}

pub const DEFAULT_STATE_DIR: &str = "/run/lbagent/bird";
/// Room for `_` and an IPv6 address in a BIRD symbol of at most 64 characters.
const GATEWAY_NAME_MAX: usize = 20;

impl RawRouting {
    pub fn validate(self) -> Result<RoutingConfig, FieldError> {
        let mode = match self.mode.as_deref().unwrap_or("managed") {
            "managed" => Mode::Managed {
                binary: PathBuf::from(self.bird.unwrap_or_else(|| "bird".to_owned())),
                state_dir: self
                    .state_dir
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            },
            "external" => Mode::External {
                include: self.include.ok_or_else(|| {
                    FieldError::new(
                        "routing.include",
                        "(missing)",
                        "the include file BIRD's config includes",
                    )
                })?,
                socket: self.socket.ok_or_else(|| {
                    FieldError::new(
                        "routing.socket",
                        "(missing)",
                        "the path of BIRD's control socket",
                    )
                })?,
            },
            other => {
                return Err(FieldError::new(
                    "routing.mode",
                    format!("{other:?}"),
                    "managed or external",
                ));
            }
        };
        if let Mode::Managed { state_dir, .. } = &mode {
            // The control socket lives there, and sun_path holds 108 bytes.
            if state_dir.join("bird.ctl").as_os_str().len() > 100 {
                return Err(FieldError::new(
                    "routing.stateDir",
                    state_dir.display(),
                    "a path short enough for a unix socket inside it (at most 90 bytes)",
                ));
            }
        }
        let router_id = self
            .router_id
            .map(|text| {
                text.parse::<Ipv4Addr>().map_err(|_| {
                    FieldError::new("routing.routerId", format!("{text:?}"), "an IPv4 address")
                })
            })
            .transpose()?;

        let mut export = Export::default();
        for (i, text) in self.export.prefixes.iter().enumerate() {
            let prefix: IpNet = text.parse().map_err(|_| {
                FieldError::new(
                    format!("routing.export.prefixes[{i}]"),
                    format!("{text:?}"),
                    "a CIDR prefix such as 203.0.113.0/24",
                )
            })?;
            export.prefixes.push(prefix.trunc());
        }
        for (i, text) in self.export.communities.iter().enumerate() {
            let community = text
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
                .ok_or_else(|| {
                    FieldError::new(
                        format!("routing.export.communities[{i}]"),
                        format!("{text:?}"),
                        "a community ASN:VALUE, each 0-65535",
                    )
                })?;
            export.communities.push(community);
        }
        export.max_routes = self
            .export
            .max_routes
            .map(|n| {
                number(
                    n,
                    1,
                    u32::MAX.into(),
                    "routing.export.maxRoutes",
                    "a route count, 1-4294967295",
                )
            })
            .transpose()?;

        let mut names = std::collections::BTreeSet::new();
        let mut unique = |name: &Symbol, field: &str| {
            if names.insert(name.clone()) {
                Ok(())
            } else {
                Err(FieldError::new(
                    field,
                    name.as_str(),
                    "a name no other routing protocol uses",
                ))
            }
        };

        let mut bgp = Vec::new();
        for (i, raw) in self.bgp.into_iter().enumerate() {
            let at = |f: &str| format!("routing.bgp[{i}].{f}");
            let peer = if raw.neighbor == "gateway" {
                Peer::Gateway
            } else {
                Peer::Address(raw.neighbor.parse().map_err(|_| {
                    FieldError::new(
                        at("neighbor"),
                        format!("{:?}", raw.neighbor),
                        "an IPv4 or IPv6 address, or gateway",
                    )
                })?)
            };
            let name = Symbol::new(
                raw.name.as_deref().unwrap_or(&format!("bgp{i}")),
                &at("name"),
            )?;
            // A gateway's sessions are named after the entry and the next hop's address.
            if peer == Peer::Gateway && name.as_str().len() > GATEWAY_NAME_MAX {
                return Err(FieldError::new(
                    at("name"),
                    format!("{:?}", name.as_str()),
                    "at most 20 characters for a gateway neighbour",
                ));
            }
            unique(&name, &at("name"))?;
            let families = match raw.families {
                None => vec![match &peer {
                    Peer::Address(address) => Family::of(address),
                    Peer::Gateway => Family::Ipv4,
                }],
                Some(list) if list.is_empty() => {
                    return Err(FieldError::new(
                        at("families"),
                        "[]",
                        "one or both of ipv4, ipv6",
                    ));
                }
                Some(list) => list
                    .iter()
                    .enumerate()
                    .map(|(j, f)| family(f, &at(&format!("families[{j}]"))))
                    .collect::<Result<_, _>>()?,
            };
            let neighbor = BgpNeighbor {
                name,
                peer,
                interface: None,
                node_selector: raw
                    .node_selector
                    .map(|s| s.validate(&at("nodeSelector")))
                    .transpose()?,
                port: number(
                    raw.port.unwrap_or(179),
                    1,
                    65535,
                    &at("port"),
                    "a TCP port, 1-65535",
                )?,
                asn: number(
                    raw.asn,
                    1,
                    u32::MAX.into(),
                    &at("asn"),
                    "an AS number, 1-4294967295",
                )?,
                local_asn: number(
                    raw.local_asn,
                    1,
                    u32::MAX.into(),
                    &at("localAsn"),
                    "an AS number, 1-4294967295",
                )?,
                source_address: raw
                    .source_address
                    .map(|text| {
                        text.parse().map_err(|_| {
                            FieldError::new(
                                at("sourceAddress"),
                                format!("{text:?}"),
                                "an IPv4 or IPv6 address",
                            )
                        })
                    })
                    .transpose()?,
                password: raw
                    .password
                    .map(|p| Password::new(&p, &at("password")))
                    .transpose()?,
                multihop: raw
                    .multihop
                    .map(|hops| number(hops, 1, 255, &at("multihop"), "a hop count, 1-255"))
                    .transpose()?,
                hold_time: seconds(
                    raw.hold_time.as_deref(),
                    Duration::from_secs(90),
                    3,
                    65535,
                    &at("holdTime"),
                )?,
                keepalive_time: raw
                    .keepalive_time
                    .as_deref()
                    .map(|t| seconds(Some(t), Duration::ZERO, 1, 65535, &at("keepaliveTime")))
                    .transpose()?,
                connect_retry_time: raw
                    .connect_retry_time
                    .as_deref()
                    .map(|t| seconds(Some(t), Duration::ZERO, 1, 65535, &at("connectRetryTime")))
                    .transpose()?,
                connect_delay_time: raw
                    .connect_delay_time
                    .as_deref()
                    .map(|t| seconds(Some(t), Duration::ZERO, 1, 65535, &at("connectDelayTime")))
                    .transpose()?,
                bfd: raw.bfd,
                graceful_restart: raw.graceful_restart.unwrap_or(true),
                families,
                med: raw
                    .med
                    .map(|m| number(m, 0, u32::MAX.into(), &at("med"), "a MED, 0-4294967295"))
                    .transpose()?,
                local_pref: raw
                    .local_pref
                    .map(|l| {
                        number(
                            l,
                            0,
                            u32::MAX.into(),
                            &at("localPref"),
                            "a local preference, 0-4294967295",
                        )
                    })
                    .transpose()?,
            };
            if let Some(keepalive) = neighbor.keepalive_time
                && keepalive > neighbor.hold_time
            {
                return Err(FieldError::new(
                    at("keepaliveTime"),
                    format!("\"{}s\"", keepalive.as_secs()),
                    "at most holdTime",
                ));
            }
            bgp.push(neighbor);
        }

        let mut ospf = Vec::new();
        for (i, raw) in self.ospf.into_iter().enumerate() {
            let at = |f: &str| format!("routing.ospf[{i}].{f}");
            let family = family(&raw.family, &at("family"))?;
            let name = Symbol::new(
                raw.name.as_deref().unwrap_or(&format!("ospf{i}")),
                &at("name"),
            )?;
            unique(&name, &at("name"))?;
            let area = match &raw.area {
                serde_json::Value::Number(n) => n
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .map(Ipv4Addr::from),
                serde_json::Value::String(s) => s
                    .parse::<Ipv4Addr>()
                    .ok()
                    .or_else(|| s.parse::<u32>().ok().map(Ipv4Addr::from)),
                _ => None,
            }
            .ok_or_else(|| {
                FieldError::new(
                    at("area"),
                    match &raw.area {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    },
                    "a number (0-4294967295) or a dotted quad such as 0.0.0.1",
                )
            })?;
            if raw.interfaces.is_empty() {
                return Err(FieldError::new(
                    at("interfaces"),
                    "[]",
                    "at least one interface",
                ));
            }
            let mut interfaces = Vec::new();
            for (j, iface) in raw.interfaces.into_iter().enumerate() {
                let at = |f: &str| format!("routing.ospf[{i}].interfaces[{j}].{f}");
                interfaces.push(OspfInterface {
                    name: IfaceName::new(&iface.name, &at("name"))?,
                    cost: iface
                        .cost
                        .map(|c| number(c, 1, 65535, &at("cost"), "a cost, 1-65535"))
                        .transpose()?,
                    kind: match iface.kind.as_deref() {
                        None => None,
                        Some("broadcast") => Some(OspfType::Broadcast),
                        Some("ptp" | "pointopoint") => Some(OspfType::PointToPoint),
                        Some(other) => {
                            return Err(FieldError::new(
                                at("type"),
                                format!("{other:?}"),
                                "broadcast or ptp",
                            ));
                        }
                    },
                    hello: iface
                        .hello
                        .map(|h| number(h, 1, 65535, &at("hello"), "seconds, 1-65535"))
                        .transpose()?,
                    dead: iface
                        .dead
                        .map(|d| number(d, 1, 65535, &at("dead"), "seconds, 1-65535"))
                        .transpose()?,
                });
            }
            ospf.push(Ospf {
                name,
                node_selector: raw
                    .node_selector
                    .map(|s| s.validate(&at("nodeSelector")))
                    .transpose()?,
                family,
                area,
                interfaces,
            });
        }

        let mut rip = Vec::new();
        for (i, raw) in self.rip.into_iter().enumerate() {
            let at = |f: &str| format!("routing.rip[{i}].{f}");
            let family = family(&raw.family, &at("family"))?;
            let name = Symbol::new(
                raw.name.as_deref().unwrap_or(&format!("rip{i}")),
                &at("name"),
            )?;
            unique(&name, &at("name"))?;
            if raw.interfaces.is_empty() {
                return Err(FieldError::new(
                    at("interfaces"),
                    "[]",
                    "at least one interface",
                ));
            }
            rip.push(Rip {
                name,
                node_selector: raw
                    .node_selector
                    .map(|s| s.validate(&at("nodeSelector")))
                    .transpose()?,
                family,
                interfaces: raw
                    .interfaces
                    .iter()
                    .enumerate()
                    .map(|(j, n)| IfaceName::new(n, &at(&format!("interfaces[{j}]"))))
                    .collect::<Result<_, _>>()?,
                update_time: raw
                    .update_time
                    .map(|t| number(t, 1, 65535, &at("updateTime"), "seconds, 1-65535"))
                    .transpose()?,
            });
        }

        Ok(RoutingConfig {
            mode,
            router_id,
            export,
            bgp,
            ospf,
            rip,
        })
    }
}

fn family(text: &str, field: &str) -> Result<Family, FieldError> {
    match text {
        "ipv4" => Ok(Family::Ipv4),
        "ipv6" => Ok(Family::Ipv6),
        other => Err(FieldError::new(field, format!("{other:?}"), "ipv4 or ipv6")),
    }
}

fn number<T: TryFrom<i64>>(
    value: i64,
    min: i64,
    max: i64,
    field: &str,
    allowed: &'static str,
) -> Result<T, FieldError> {
    if (min..=max).contains(&value) {
        T::try_from(value).map_err(|_| FieldError::new(field, value, allowed))
    } else {
        Err(FieldError::new(field, value, allowed))
    }
}

/// BIRD's timers are whole seconds.
fn seconds(
    text: Option<&str>,
    default: Duration,
    min: u64,
    max: u64,
    field: &str,
) -> Result<Duration, FieldError> {
    let Some(text) = text else { return Ok(default) };
    match humantime::parse_duration(text) {
        Ok(d) if d.subsec_nanos() == 0 && (min..=max).contains(&d.as_secs()) => Ok(d),
        _ => Err(FieldError::new(
            field,
            format!("{text:?}"),
            "whole seconds within BIRD's range, such as 9s or 3m",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(yaml: &str) -> Result<RoutingConfig, FieldError> {
        crate::yaml::from_str::<RawRouting>(yaml, crate::config::LIMITS)
            .unwrap()
            .validate()
    }

    #[test]
    fn a_neighbour_gets_defaults() {
        let config = validate("bgp: [{neighbor: 10.0.0.1, asn: 64500, localAsn: 64512}]").unwrap();
        let n = &config.bgp[0];
        assert_eq!(n.name.as_str(), "bgp0");
        assert_eq!(n.port, 179);
        assert_eq!(n.hold_time, Duration::from_secs(90));
        assert!(n.graceful_restart);
        assert_eq!(n.families, [Family::Ipv4]);
        assert!(matches!(config.mode, Mode::Managed { .. }));
    }

    #[test]
    fn bad_values_name_the_field() {
        for (yaml, field, value) in [
            (
                "bgp: [{neighbor: 10.0.0.256, asn: 1, localAsn: 2}]",
                "routing.bgp[0].neighbor",
                "\"10.0.0.256\"",
            ),
            (
                "bgp: [{neighbor: 10.0.0.1, asn: 0, localAsn: 2}]",
                "routing.bgp[0].asn",
                "0",
            ),
            (
                "bgp: [{neighbor: 10.0.0.1, asn: 4294967296, localAsn: 2}]",
                "routing.bgp[0].asn",
                "4294967296",
            ),
            (
                "bgp: [{neighbor: 10.0.0.1, asn: 1, localAsn: -5}]",
                "routing.bgp[0].localAsn",
                "-5",
            ),
            (
                "bgp: [{neighbor: 10.0.0.1, asn: 1, localAsn: 2, holdTime: 2s}]",
                "routing.bgp[0].holdTime",
                "\"2s\"",
            ),
            (
                "bgp: [{neighbor: 10.0.0.1, asn: 1, localAsn: 2, holdTime: 9s, keepaliveTime: 20s}]",
                "routing.bgp[0].keepaliveTime",
                "\"20s\"",
            ),
            (
                "bgp: [{neighbor: 10.0.0.1, asn: 1, localAsn: 2, name: \"x; protocol\"}]",
                "routing.bgp[0].name",
                "\"x; protocol\"",
            ),
            (
                "ospf: [{family: ipv4, area: backbone, interfaces: [{name: eth0}]}]",
                "routing.ospf[0].area",
                "backbone",
            ),
            (
                "ospf: [{family: ipv4, area: 1.2.3, interfaces: [{name: eth0}]}]",
                "routing.ospf[0].area",
                "1.2.3",
            ),
            (
                "ospf: [{family: ipv4, area: 0, interfaces: [{name: \"eth*\"}]}]",
                "routing.ospf[0].interfaces[0].name",
                "\"eth*\"",
            ),
            (
                "ospf: [{family: ipv4, area: 0, interfaces: [{name: \"-eth0\"}]}]",
                "routing.ospf[0].interfaces[0].name",
                "\"-eth0\"",
            ),
            (
                "rip: [{family: ipv4, interfaces: [\"eth0\\\"; }\"]}]",
                "routing.rip[0].interfaces[0]",
                "\"eth0\\\"; }\"",
            ),
            (
                "rip: [{family: ipx, interfaces: [eth0]}]",
                "routing.rip[0].family",
                "\"ipx\"",
            ),
            (
                "export: {communities: [\"64512:70000\"]}",
                "routing.export.communities[0]",
                "\"64512:70000\"",
            ),
            (
                "routerId: 2001:db8::1",
                "routing.routerId",
                "\"2001:db8::1\"",
            ),
            ("mode: embedded", "routing.mode", "\"embedded\""),
        ] {
            let err = validate(yaml).unwrap_err();
            assert_eq!(
                (err.field.as_str(), err.value.as_str()),
                (field, value),
                "{yaml}"
            );
        }
    }

    #[test]
    fn injection_through_a_password_is_rejected_without_echoing_it() {
        let err = validate("bgp: [{neighbor: 10.0.0.1, asn: 1, localAsn: 2, password: \"x\\\"; }; protocol static {\"}]").unwrap_err();
        assert_eq!(err.field, "routing.bgp[0].password");
        assert!(!err.value.contains("protocol"), "{err:?}");
        let err = validate("bgp: [{neighbor: 10.0.0.1, asn: 1, localAsn: 2, password: \"a\\nb\"}]")
            .unwrap_err();
        assert_eq!(err.field, "routing.bgp[0].password");
    }

    #[test]
    fn areas_take_numbers_and_dotted_quads() {
        let config = validate("ospf: [{family: ipv4, area: 1, interfaces: [{name: eth0}]}, {family: ipv6, area: \"0.0.0.2\", interfaces: [{name: eth0}]}]").unwrap();
        assert_eq!(config.ospf[0].area, Ipv4Addr::new(0, 0, 0, 1));
        assert_eq!(config.ospf[1].area, Ipv4Addr::new(0, 0, 0, 2));
    }

    #[test]
    fn protocol_names_are_unique() {
        let err = validate("bgp: [{name: up, neighbor: 10.0.0.1, asn: 1, localAsn: 2}]\nrip: [{name: up, family: ipv4, interfaces: [eth0]}]").unwrap_err();
        assert_eq!(err.field, "routing.rip[0].name");
    }
}
