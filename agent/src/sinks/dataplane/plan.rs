//! The dataplane sink's plan: the map entries a desired state needs, and the changes that turn
//! what the maps hold into them. Pure functions, so tests drive them directly.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use lbagent_common::proto;

use crate::{
    dataplane::{PortId, VipPolicy},
    desired::{Desired, Protocol},
};

/// The map entries of a whole desired state (or of what the maps hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entries {
    pub vips: BTreeMap<IpAddr, VipPolicy>,
    /// The served ports, with the range set their sources must be in (0: any).
    pub ports: BTreeMap<PortId, u32>,
    /// (set, range): a source range of a range set.
    pub ranges: BTreeSet<(u32, IpNet)>,
}

/// The entries that serve `desired`, for the addresses in `served` (an IPv6 address on a node
/// without IPv6 is not served).
pub fn entries(desired: &Desired, served: impl Fn(&IpAddr) -> bool) -> Entries {
    let mut entries = Entries::default();
    for (address, intent) in &desired.addresses {
        if !served(address) {
            continue;
        }
        let mut enforce = false;
        // Later fragments carry no port: they may come from any source any of the
        // address's services admits. One service open to all opens them to all.
        let mut fragment_ranges = Some(BTreeSet::new());
        for policy in intent.values() {
            enforce |= !policy.ports.is_empty();
            match (&mut fragment_ranges, policy.source_ranges.is_empty()) {
                (_, true) => fragment_ranges = None,
                (Some(union), false) => union.extend(policy.source_ranges.iter().copied()),
                (None, false) => {}
            }
            let set = set_id(&policy.source_ranges);
            for range in &policy.source_ranges {
                entries.ranges.insert((set, *range));
            }
            for port in &policy.ports {
                let key = PortId {
                    address: *address,
                    protocol: protocol_number(port.protocol),
                    port: port.port,
                };
                // Two services on one address and port: the sources of either pass.
                let merged = match entries.ports.get(&key) {
                    Some(existing) if *existing == 0 || set == 0 => 0,
                    Some(existing) if *existing != set => {
                        let mut union: BTreeSet<IpNet> = entries
                            .ranges
                            .iter()
                            .filter(|(s, _)| s == existing)
                            .map(|(_, r)| *r)
                            .collect();
                        union.extend(policy.source_ranges.iter().copied());
                        let merged = set_id(&union);
                        entries.ranges.extend(union.iter().map(|r| (merged, *r)));
                        merged
                    }
                    _ => set,
                };
                entries.ports.insert(key, merged);
            }
        }
        let fragment_ranges = match fragment_ranges {
            Some(union) if enforce && !union.is_empty() => {
                let set = set_id(&union);
                entries.ranges.extend(union.iter().map(|r| (set, *r)));
                set
            }
            _ => 0,
        };
        entries.vips.insert(
            *address,
            VipPolicy {
                enforce,
                fragment_ranges,
            },
        );
    }
    entries
}

/// A range set's id: a hash of its ranges, so the same set gets the same id in every run
/// (a restart renumbers nothing). Never 0, which means "any source".
pub fn set_id(ranges: &BTreeSet<IpNet>) -> u32 {
    if ranges.is_empty() {
        return 0;
    }
    // FNV-1a over the ranges' bytes.
    let mut hash: u32 = 0x811c_9dc5;
    for range in ranges {
        let bytes: Vec<u8> = match range {
            IpNet::V4(net) => net.addr().octets().to_vec(),
            IpNet::V6(net) => net.addr().octets().to_vec(),
        };
        for byte in bytes.iter().chain([&range.prefix_len()]) {
            hash ^= u32::from(*byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    hash.max(1)
}

fn protocol_number(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Tcp => proto::TCP,
        Protocol::Udp => proto::UDP,
        Protocol::Sctp => proto::SCTP,
    }
}

/// What to change, in the order it must be applied.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub add_ranges: Vec<(u32, IpNet)>,
    /// New or changed addresses (new ones also get zeroed counters).
    pub set_vips: Vec<(IpAddr, VipPolicy, bool)>,
    /// New or changed ports, with their range set.
    pub set_ports: Vec<(PortId, u32, bool)>,
    pub remove_ports: Vec<PortId>,
    pub remove_vips: Vec<IpAddr>,
    pub remove_ranges: Vec<(u32, IpNet)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// What the dataplane sink finds: the maps' entries, and whether the node has IPv6 at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub entries: Entries,
    pub ipv6: bool,
}

/// The changes that make the maps serve `desired`. An IPv6 address on a node without IPv6 is
/// not served, as the address sink does not hold it.
pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    diff(
        &entries(desired, |address| address.is_ipv4() || observed.ipv6),
        &observed.entries,
    )
}

pub fn diff(desired: &Entries, observed: &Entries) -> Plan {
    Plan {
        add_ranges: desired
            .ranges
            .difference(&observed.ranges)
            .copied()
            .collect(),
        set_vips: desired
            .vips
            .iter()
            .filter(|(k, v)| observed.vips.get(k) != Some(v))
            .map(|(k, v)| (*k, *v, !observed.vips.contains_key(k)))
            .collect(),
        set_ports: desired
            .ports
            .iter()
            .filter(|(k, v)| observed.ports.get(k) != Some(v))
            .map(|(k, v)| (*k, *v, !observed.ports.contains_key(k)))
            .collect(),
        remove_ports: observed
            .ports
            .keys()
            .filter(|k| !desired.ports.contains_key(k))
            .copied()
            .collect(),
        remove_vips: observed
            .vips
            .keys()
            .filter(|k| !desired.vips.contains_key(k))
            .copied()
            .collect(),
        remove_ranges: observed
            .ranges
            .difference(&desired.ranges)
            .copied()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{PortSpec, Service, TrafficPolicy};

    fn service(
        name: &str,
        addresses: &[&str],
        ports: &[(u16, Protocol)],
        ranges: &[&str],
    ) -> Service {
        Service {
            name: name.into(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            ports: ports
                .iter()
                .map(|(port, protocol)| PortSpec {
                    port: *port,
                    protocol: *protocol,
                })
                .collect(),
            source_ranges: ranges.iter().map(|r| r.parse().unwrap()).collect(),
            traffic_policy: TrafficPolicy::Cluster,
        }
    }

    fn vip(a: &str) -> IpAddr {
        a.parse().unwrap()
    }

    fn port(a: &str, protocol: u8, port: u16) -> PortId {
        PortId {
            address: vip(a),
            protocol,
            port,
        }
    }

    #[test]
    fn ports_and_ranges_become_entries() {
        let desired = Desired::from_services(&[
            service(
                "web",
                &["203.0.113.10"],
                &[(80, Protocol::Tcp), (443, Protocol::Tcp)],
                &["198.51.100.0/24"],
            ),
            service("dns", &["203.0.113.10"], &[(53, Protocol::Udp)], &[]),
            service("bare", &["203.0.113.11"], &[], &[]),
        ]);
        let e = entries(&desired, |_| true);
        let web_set = set_id(&BTreeSet::from(["198.51.100.0/24".parse().unwrap()]));
        assert_eq!(
            e.vips[&vip("203.0.113.10")],
            VipPolicy {
                enforce: true,
                fragment_ranges: 0
            },
            "dns admits all"
        );
        assert_eq!(
            e.vips[&vip("203.0.113.11")],
            VipPolicy {
                enforce: false,
                fragment_ranges: 0
            },
            "no ports: count only"
        );
        assert_eq!(e.ports[&port("203.0.113.10", proto::TCP, 443)], web_set);
        assert_eq!(e.ports[&port("203.0.113.10", proto::UDP, 53)], 0);
        assert_eq!(
            e.ranges,
            BTreeSet::from([(web_set, "198.51.100.0/24".parse().unwrap())])
        );
    }

    #[test]
    fn fragments_take_the_union_of_the_address_ranges() {
        let desired = Desired::from_services(&[
            service(
                "a",
                &["203.0.113.10"],
                &[(80, Protocol::Tcp)],
                &["198.51.100.0/24"],
            ),
            service(
                "b",
                &["203.0.113.10"],
                &[(81, Protocol::Tcp)],
                &["192.0.2.0/24"],
            ),
        ]);
        let e = entries(&desired, |_| true);
        let union = set_id(&BTreeSet::from([
            "198.51.100.0/24".parse().unwrap(),
            "192.0.2.0/24".parse().unwrap(),
        ]));
        assert_eq!(e.vips[&vip("203.0.113.10")].fragment_ranges, union);
        assert!(e.ranges.contains(&(union, "192.0.2.0/24".parse().unwrap())));
    }

    #[test]
    fn set_ids_are_stable_and_never_zero() {
        let a: BTreeSet<IpNet> = BTreeSet::from(["10.0.0.0/8".parse().unwrap()]);
        assert_eq!(set_id(&a), set_id(&a.clone()));
        assert_ne!(set_id(&a), 0);
        assert_ne!(
            set_id(&a),
            set_id(&BTreeSet::from(["10.0.0.0/9".parse().unwrap()]))
        );
        assert_eq!(set_id(&BTreeSet::new()), 0);
    }

    #[test]
    fn a_changed_port_is_added_before_the_old_one_goes_and_unchanged_entries_stay() {
        let before = entries(
            &Desired::from_services(&[service(
                "web",
                &["203.0.113.10"],
                &[(80, Protocol::Tcp), (443, Protocol::Tcp)],
                &[],
            )]),
            |_| true,
        );
        let after = entries(
            &Desired::from_services(&[service(
                "web",
                &["203.0.113.10"],
                &[(8080, Protocol::Tcp), (443, Protocol::Tcp)],
                &[],
            )]),
            |_| true,
        );
        let changes = diff(&after, &before);
        assert_eq!(changes.set_ports.len(), 1);
        assert_eq!(changes.set_ports[0].0.port, 8080);
        assert!(changes.set_ports[0].2, "new: gets zeroed counters");
        assert_eq!(
            changes
                .remove_ports
                .iter()
                .map(|k| k.port)
                .collect::<Vec<_>>(),
            [80]
        );
        assert!(changes.set_vips.is_empty() && changes.remove_vips.is_empty());
        assert!(diff(&after, &after).is_empty());
    }

    #[test]
    fn a_node_without_ipv6_serves_only_ipv4() {
        let desired = Desired::from_services(&[service(
            "web",
            &["203.0.113.10", "2001:db8::10"],
            &[(80, Protocol::Tcp)],
            &[],
        )]);
        let without = plan(&desired, &Observed::default());
        assert_eq!(
            without.set_vips.iter().map(|v| v.0).collect::<Vec<_>>(),
            [vip("203.0.113.10")]
        );
        let with = plan(
            &desired,
            &Observed {
                ipv6: true,
                ..Observed::default()
            },
        );
        assert_eq!(with.set_vips.len(), 2);
        assert!(
            plan(
                &desired,
                &Observed {
                    entries: entries(&desired, |_| true),
                    ipv6: true
                }
            )
            .is_empty()
        );
    }

    #[test]
    fn unserved_addresses_get_no_entries() {
        let desired = Desired::from_services(&[service(
            "web",
            &["203.0.113.10", "2001:db8::10"],
            &[(80, Protocol::Tcp)],
            &[],
        )]);
        let e = entries(&desired, |a| a.is_ipv4());
        assert_eq!(
            e.vips.keys().copied().collect::<Vec<_>>(),
            [vip("203.0.113.10")]
        );
    }
}
