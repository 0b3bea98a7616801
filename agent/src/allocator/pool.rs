//! The `AddressPool` custom resource (group `lbagent.io`, version `v1alpha1`, cluster-scoped)
//! and its validation into ranges the allocator can hand out.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Addresses lbagent's allocator hands to Services of type LoadBalancer.
// Each printcolumn repeats `type_ = ...`: the derive's syntax, not a mistake.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "lbagent.io",
    version = "v1alpha1",
    kind = "AddressPool",
    status = "AddressPoolStatus",
    shortname = "lbpool",
    doc = "Addresses lbagent's allocator assigns to Services of type LoadBalancer",
    printcolumn(name = "Auto", type_ = "boolean", json_path = ".spec.autoAssign"),
    printcolumn(name = "Priority", type_ = "integer", json_path = ".spec.priority"),
    printcolumn(
        name = "IPv4 used",
        type_ = "integer",
        json_path = ".status.ipv4.inUse"
    ),
    printcolumn(
        name = "IPv4 total",
        type_ = "string",
        json_path = ".status.ipv4.total"
    ),
    printcolumn(
        name = "IPv6 used",
        type_ = "integer",
        json_path = ".status.ipv6.inUse"
    ),
    printcolumn(
        name = "IPv6 total",
        type_ = "string",
        json_path = ".status.ipv6.total"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AddressPoolSpec {
    /// CIDRs (`192.0.2.0/24`, `2001:db8::/120`), ranges (`192.0.2.10-192.0.2.20`) or single
    /// addresses, IPv4 and IPv6 mixed.
    pub addresses: Vec<String>,
    /// Whether Services get addresses from this pool without asking for it; if not, only
    /// Services that name it (annotation `lbagent.io/pool`) or request one of its addresses do.
    #[serde(default = "yes")]
    pub auto_assign: bool,
    /// Skip IPv4 addresses ending in `.0` and `.255`, which some clients treat as broadcast.
    #[serde(default, rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: bool,
    /// Order among automatic pools: lower first; equal priorities go by name.
    #[serde(default)]
    pub priority: i32,
    /// Only Services in namespaces with these labels draw from this pool (none: every one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<Selector>,
    /// Only Services with these labels draw from this pool (none: every one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<Selector>,
}

fn yes() -> bool {
    true
}

/// A Kubernetes label selector.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(key, value)| labels.get(key) == Some(value))
            && self.match_expressions.iter().all(|requirement| {
                let value = labels.get(&requirement.key);
                match requirement.operator {
                    SelectorOperator::In => value.is_some_and(|v| requirement.values.contains(v)),
                    SelectorOperator::NotIn => {
                        value.is_none_or(|v| !requirement.values.contains(v))
                    }
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                }
            })
    }
}

/// What the allocator reports on a pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AddressPoolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<FamilyUsage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<FamilyUsage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PoolCondition>,
}

/// How many addresses of one family a pool has and how many Services hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FamilyUsage {
    /// In decimal: an IPv6 pool easily holds more than an int64 counts.
    pub total: String,
    pub in_use: u64,
}

/// A condition in the shape of metav1.Condition.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// As `spec.ipFamilies` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An address as a number within its family, so ranges are integer intervals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Addr {
    pub family: Family,
    pub value: u128,
}

impl From<IpAddr> for Addr {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self {
                family: Family::V4,
                value: u32::from(v4).into(),
            },
            IpAddr::V6(v6) => Self {
                family: Family::V6,
                value: v6.into(),
            },
        }
    }
}

impl From<Addr> for IpAddr {
    fn from(addr: Addr) -> Self {
        match addr.family {
            // Only values made from an IPv4 address carry Family::V4.
            Family::V4 => IpAddr::V4((addr.value as u32).into()),
            Family::V6 => IpAddr::V6(addr.value.into()),
        }
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        IpAddr::from(*self).fmt(f)
    }
}

/// An inclusive interval of addresses of one family, as written in `spec.addresses[index]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    pub family: Family,
    pub first: u128,
    pub last: u128,
    pub index: usize,
    pub text: String,
}

impl Range {
    pub fn contains(&self, addr: Addr) -> bool {
        addr.family == self.family && self.first <= addr.value && addr.value <= self.last
    }

    pub fn overlaps(&self, other: &Range) -> bool {
        self.family == other.family && self.first <= other.last && other.first <= self.last
    }

    /// How many addresses it hands out (`avoid_buggy`: less the IPv4 `.0` and `.255`).
    pub fn size(&self, avoid_buggy: bool) -> u128 {
        let all = (self.last - self.first).saturating_add(1);
        if !(avoid_buggy && self.family == Family::V4) {
            return all;
        }
        // Addresses in [0, x] ending in .0 and in .255.
        let buggy_upto = |x: u128| x / 256 + 1 + (x + 1) / 256;
        let below = if self.first == 0 {
            0
        } else {
            buggy_upto(self.first - 1)
        };
        all - (buggy_upto(self.last) - below)
    }
}

/// Whether an IPv4 address ends in `.0` or `.255`.
pub fn is_buggy(addr: Addr) -> bool {
    addr.family == Family::V4 && matches!(addr.value & 0xff, 0 | 0xff)
}

/// What is wrong with a pool: the field, its value and the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {value:?}: {problem}")]
pub struct PoolError {
    pub field: String,
    pub value: String,
    pub problem: String,
    /// The condition reason it is reported under.
    pub reason: &'static str,
}

/// Parses one `spec.addresses` entry.
pub fn parse_range(index: usize, text: &str) -> Result<Range, PoolError> {
    let invalid = |problem: String| PoolError {
        field: format!("spec.addresses[{index}]"),
        value: text.to_owned(),
        problem,
        reason: "InvalidAddresses",
    };
    let trimmed = text.trim();
    let (first, last) = if let Some((start, end)) = trimmed.split_once('-') {
        let bound = |bound: &str| -> Result<IpAddr, PoolError> {
            let bound = bound.trim();
            if bound.contains('/') {
                return Err(invalid(format!(
                    "a range's bounds are addresses, not networks ({bound:?})"
                )));
            }
            bound
                .parse()
                .map_err(|_| invalid(format!("{bound:?} is not an IP address")))
        };
        let (start, end) = (bound(start)?, bound(end)?);
        if Family::of(start) != Family::of(end) {
            return Err(invalid("a range mixes IPv4 and IPv6".into()));
        }
        let (first, last) = (Addr::from(start), Addr::from(end));
        if first.value > last.value {
            return Err(invalid(format!("reversed bounds: {start} is after {end}")));
        }
        (first, last)
    } else if trimmed.contains('/') {
        let net: IpNet = trimmed
            .parse()
            .map_err(|_| invalid("not a CIDR, a range (a-b) or an address".into()))?;
        if net.network() != net.addr() {
            return Err(invalid(format!(
                "host bits are set: the network is {}",
                net.trunc()
            )));
        }
        (Addr::from(net.network()), Addr::from(net.broadcast()))
    } else {
        let ip: IpAddr = trimmed
            .parse()
            .map_err(|_| invalid("not a CIDR, a range (a-b) or an address".into()))?;
        (Addr::from(ip), Addr::from(ip))
    };
    Ok(Range {
        family: first.family,
        first: first.value,
        last: last.value,
        index,
        text: trimmed.to_owned(),
    })
}

/// A pool as the allocator uses it.
#[derive(Clone, Debug, PartialEq)]
pub struct Pool {
    pub name: String,
    /// When it was created (RFC 3339), so of two overlapping pools the older serves.
    pub created: String,
    pub auto_assign: bool,
    pub avoid_buggy_ips: bool,
    pub priority: i32,
    pub namespace_selector: Option<Selector>,
    pub service_selector: Option<Selector>,
    pub ranges: Vec<Range>,
}

impl Pool {
    /// The pool of a resource, or the first thing wrong with its addresses.
    pub fn parse(name: &str, created: &str, spec: &AddressPoolSpec) -> Result<Self, PoolError> {
        let ranges = spec
            .addresses
            .iter()
            .enumerate()
            .map(|(index, text)| parse_range(index, text))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, range) in ranges.iter().enumerate() {
            if let Some(other) = ranges[..i].iter().find(|other| other.overlaps(range)) {
                return Err(PoolError {
                    field: format!("spec.addresses[{i}]"),
                    value: range.text.clone(),
                    problem: format!(
                        "overlaps spec.addresses[{}] ({:?}) of the same pool",
                        other.index, other.text
                    ),
                    reason: "InvalidAddresses",
                });
            }
        }
        Ok(Self {
            name: name.to_owned(),
            created: created.to_owned(),
            auto_assign: spec.auto_assign,
            avoid_buggy_ips: spec.avoid_buggy_ips,
            priority: spec.priority,
            namespace_selector: spec.namespace_selector.clone(),
            service_selector: spec.service_selector.clone(),
            ranges,
        })
    }

    pub fn range_of(&self, addr: Addr) -> Option<usize> {
        self.ranges.iter().position(|range| range.contains(addr))
    }

    pub fn has_family(&self, family: Family) -> bool {
        self.ranges.iter().any(|range| range.family == family)
    }

    /// Addresses of `family` it hands out.
    pub fn size(&self, family: Family) -> u128 {
        self.ranges
            .iter()
            .filter(|range| range.family == family)
            .map(|range| range.size(self.avoid_buggy_ips))
            .fold(0u128, u128::saturating_add)
    }

    /// Whether a Service with these labels in a namespace with those may draw from it.
    pub fn admits(
        &self,
        service_labels: &BTreeMap<String, String>,
        namespace_labels: &BTreeMap<String, String>,
    ) -> bool {
        self.service_selector
            .as_ref()
            .is_none_or(|selector| selector.matches(service_labels))
            && self
                .namespace_selector
                .as_ref()
                .is_none_or(|selector| selector.matches(namespace_labels))
    }
}

/// The CustomResourceDefinitions the allocator needs, as YAML documents for `deploy/`.
pub fn crds_yaml() -> Result<String, serde_saphyr::ser::Error> {
    use kube::CustomResourceExt as _;
    let mut yaml = String::from(
        "# Generated by `lbagent allocator crds` from agent/src/allocator/pool.rs: do not edit.\n",
    );
    yaml.push_str(&serde_saphyr::to_string(&AddressPool::crd())?);
    Ok(yaml)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// An automatic pool of `addresses`, priority 0, for every Service.
    pub(in crate::allocator) fn spec(addresses: &[&str]) -> AddressPoolSpec {
        AddressPoolSpec {
            addresses: addresses.iter().map(|a| (*a).to_owned()).collect(),
            auto_assign: true,
            avoid_buggy_ips: false,
            priority: 0,
            namespace_selector: None,
            service_selector: None,
        }
    }

    fn error(addresses: &[&str]) -> String {
        match Pool::parse("p", "", &spec(addresses)) {
            Ok(pool) => panic!("{addresses:?} parsed into {pool:?}"),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn cidrs_ranges_and_addresses_of_both_families_parse() {
        let pool = Pool::parse(
            "p",
            "",
            &spec(&[
                "192.0.2.0/30",
                " 198.51.100.10 - 198.51.100.19",
                "2001:db8::/120",
                "203.0.113.7",
            ]),
        )
        .expect("valid");
        assert_eq!(pool.size(Family::V4), 4 + 10 + 1);
        assert_eq!(pool.size(Family::V6), 256);
        assert!(pool.range_of(Addr::from("198.51.100.19".parse::<IpAddr>().unwrap())) == Some(1));
        assert!(
            pool.range_of(Addr::from("198.51.100.20".parse::<IpAddr>().unwrap()))
                .is_none()
        );
    }

    #[test]
    fn bad_ranges_name_the_field_the_value_and_the_problem() {
        assert_eq!(
            error(&["192.0.2.0/24", "banana"]),
            "spec.addresses[1]: \"banana\": not a CIDR, a range (a-b) or an address"
        );
        assert_eq!(
            error(&["192.0.2.9-192.0.2.1"]),
            "spec.addresses[0]: \"192.0.2.9-192.0.2.1\": reversed bounds: 192.0.2.9 is after 192.0.2.1"
        );
        assert_eq!(
            error(&["192.0.2.0/24-192.0.3.0/24"]),
            "spec.addresses[0]: \"192.0.2.0/24-192.0.3.0/24\": a range's bounds are addresses, \
             not networks (\"192.0.2.0/24\")"
        );
        assert_eq!(
            error(&["192.0.2.1-2001:db8::1"]),
            "spec.addresses[0]: \"192.0.2.1-2001:db8::1\": a range mixes IPv4 and IPv6"
        );
        assert_eq!(
            error(&["192.0.2.5/24"]),
            "spec.addresses[0]: \"192.0.2.5/24\": host bits are set: the network is 192.0.2.0/24"
        );
        assert_eq!(
            error(&["192.0.2.0/24", "192.0.2.128/25"]),
            "spec.addresses[1]: \"192.0.2.128/25\": overlaps spec.addresses[0] (\"192.0.2.0/24\") \
             of the same pool"
        );
    }

    #[test]
    fn avoiding_buggy_addresses_shrinks_the_count_by_them() {
        let range = parse_range(0, "192.0.2.0/23").expect("valid");
        assert_eq!(range.size(false), 512);
        assert_eq!(range.size(true), 508);
        let range = parse_range(0, "192.0.2.1-192.0.2.254").expect("valid");
        assert_eq!(range.size(true), 254);
        let range = parse_range(0, "0.0.0.0-0.0.0.255").expect("valid");
        assert_eq!(range.size(true), 254);
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let labels: BTreeMap<String, String> = [("team".into(), "a".into())].into();
        let selector = |json: serde_json::Value| -> Selector {
            serde_json::from_value(json).expect("selector")
        };
        assert!(selector(serde_json::json!({"matchLabels": {"team": "a"}})).matches(&labels));
        assert!(!selector(serde_json::json!({"matchLabels": {"team": "b"}})).matches(&labels));
        let expr = |op: &str, values: &[&str]| {
            selector(serde_json::json!({"matchExpressions": [
                {"key": "team", "operator": op, "values": values}]}))
        };
        assert!(expr("In", &["a", "b"]).matches(&labels));
        assert!(!expr("NotIn", &["a"]).matches(&labels));
        assert!(expr("Exists", &[]).matches(&labels));
        assert!(!expr("DoesNotExist", &[]).matches(&labels));
        assert!(expr("DoesNotExist", &[]).matches(&BTreeMap::new()));
    }
}
