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
/// without IPv6 is not served). Range sets the maps already hold (`observed`) keep their ids.
pub fn entries(desired: &Desired, served: impl Fn(&IpAddr) -> bool, observed: &Entries) -> Entries {
    // Policies by the content of their range sets first (None: any source), ids after, so
    // that no two different sets can ever share an id.
    let mut vips: BTreeMap<IpAddr, (bool, Option<BTreeSet<IpNet>>)> = BTreeMap::new();
    let mut ports: BTreeMap<PortId, Option<BTreeSet<IpNet>>> = BTreeMap::new();
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
            let sources = (!policy.source_ranges.is_empty()).then_some(&policy.source_ranges);
            match (&mut fragment_ranges, sources) {
                (_, None) => fragment_ranges = None,
                (Some(union), Some(ranges)) => union.extend(ranges.iter().copied()),
                (None, Some(_)) => {}
            }
            for port in &policy.ports {
                let key = PortId {
                    address: *address,
                    protocol: protocol_number(port.protocol),
                    port: port.port,
                };
                // Two services on one address and port: the sources of either pass.
                match (ports.get_mut(&key), sources) {
                    (None, _) => {
                        ports.insert(key, sources.cloned());
                    }
                    (Some(merged), None) => *merged = None,
                    (Some(Some(union)), Some(ranges)) => union.extend(ranges.iter().copied()),
                    (Some(None), Some(_)) => {}
                }
            }
        }
        let fragment_ranges = fragment_ranges.filter(|union| enforce && !union.is_empty());
        vips.insert(*address, (enforce, fragment_ranges));
    }

    let mut ids = RangeSetIds::adopting(&observed.ranges);
    let mut entries = Entries::default();
    for (address, (enforce, fragment_ranges)) in vips {
        let policy = VipPolicy {
            enforce,
            fragment_ranges: ids.id(fragment_ranges.as_ref(), &mut entries.ranges),
        };
        entries.vips.insert(address, policy);
    }
    for (port, sources) in ports {
        let set = ids.id(sources.as_ref(), &mut entries.ranges);
        entries.ports.insert(port, set);
    }
    entries
}

/// Gives each distinct range set its own id. Ids are allocated, not derived from the ranges:
/// a hash would let a tenant pick ranges whose set shares another tenant's id, and so admit
/// its sources there. A set the maps already hold keeps its id, so a restart renumbers
/// nothing; a new set never takes an id the maps still hold, so no set in use changes
/// under the traffic while a change is applied.
struct RangeSetIds {
    by_ranges: BTreeMap<BTreeSet<IpNet>, u32>,
    taken: BTreeSet<u32>,
    next: u32,
}

impl RangeSetIds {
    fn adopting(observed: &BTreeSet<(u32, IpNet)>) -> Self {
        let mut held: BTreeMap<u32, BTreeSet<IpNet>> = BTreeMap::new();
        for (set, range) in observed {
            held.entry(*set).or_default().insert(*range);
        }
        let taken = held.keys().copied().collect();
        let mut by_ranges = BTreeMap::new();
        for (set, ranges) in held {
            // 0 means "any source": ranges left under it are strays, never adopted.
            if set != 0 {
                by_ranges.entry(ranges).or_insert(set);
            }
        }
        Self {
            by_ranges,
            taken,
            next: 1,
        }
    }

    /// The id of `ranges` (None or empty: 0, any source), whose entries go to `out`.
    fn id(&mut self, ranges: Option<&BTreeSet<IpNet>>, out: &mut BTreeSet<(u32, IpNet)>) -> u32 {
        let Some(ranges) = ranges.filter(|r| !r.is_empty()) else {
            return 0;
        };
        let id = match self.by_ranges.get(ranges) {
            Some(id) => *id,
            None => {
                while self.taken.contains(&self.next) {
                    self.next += 1;
                }
                let id = self.next;
                self.taken.insert(id);
                self.by_ranges.insert(ranges.clone(), id);
                id
            }
        };
        out.extend(ranges.iter().map(|range| (id, *range)));
        id
    }
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
        &entries(
            desired,
            |address| address.is_ipv4() || observed.ipv6,
            &observed.entries,
        ),
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
        let e = entries(&desired, |_| true, &Entries::default());
        let web_set = e.ports[&port("203.0.113.10", proto::TCP, 80)];
        assert_ne!(web_set, 0);
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
        let e = entries(&desired, |_| true, &Entries::default());
        let union = e.vips[&vip("203.0.113.10")].fragment_ranges;
        let sets = [
            e.ports[&port("203.0.113.10", proto::TCP, 80)],
            e.ports[&port("203.0.113.10", proto::TCP, 81)],
            union,
        ];
        assert!(
            sets[0] != sets[1] && sets[1] != sets[2] && sets[0] != sets[2] && union != 0,
            "{sets:?}"
        );
        assert_eq!(ranges_of(&e, union), ["192.0.2.0/24", "198.51.100.0/24"]);
    }

    fn ranges_of(e: &Entries, set: u32) -> Vec<String> {
        e.ranges
            .iter()
            .filter(|(s, _)| *s == set)
            .map(|(_, r)| r.to_string())
            .collect()
    }

    fn tenant(name: &str, address: &str, ranges: &[&str]) -> Service {
        service(name, &[address], &[(443, Protocol::Tcp)], ranges)
    }

    #[test]
    fn every_distinct_range_set_gets_its_own_nonzero_id_and_equal_sets_share_one() {
        let desired = Desired::from_services(&[
            tenant("a", "203.0.113.1", &["10.0.0.0/8"]),
            tenant("b", "203.0.113.2", &["10.0.0.0/9"]),
            tenant("c", "203.0.113.3", &["10.0.0.0/8"]),
            tenant("open", "203.0.113.4", &[]),
        ]);
        let e = entries(&desired, |_| true, &Entries::default());
        let id = |a: &str| e.ports[&port(a, proto::TCP, 443)];
        assert_ne!(id("203.0.113.1"), 0);
        assert_ne!(id("203.0.113.1"), id("203.0.113.2"));
        assert_eq!(id("203.0.113.1"), id("203.0.113.3"));
        assert_eq!(id("203.0.113.4"), 0);
        assert_eq!(ranges_of(&e, id("203.0.113.2")), ["10.0.0.0/9"]);
    }

    #[test]
    fn sets_the_maps_hold_keep_their_ids_and_new_sets_take_none_of_the_held_ones() {
        let desired = Desired::from_services(&[
            tenant("a", "203.0.113.1", &["10.0.0.0/8"]),
            tenant("b", "203.0.113.2", &["192.0.2.0/24"]),
        ]);
        // The maps hold a's set as 7, and a set nobody wants any more as 1.
        let observed = Entries {
            ranges: BTreeSet::from([
                (7, "10.0.0.0/8".parse().unwrap()),
                (1, "172.16.0.0/12".parse().unwrap()),
            ]),
            ..Entries::default()
        };
        let e = entries(&desired, |_| true, &observed);
        assert_eq!(e.ports[&port("203.0.113.1", proto::TCP, 443)], 7);
        let b = e.ports[&port("203.0.113.2", proto::TCP, 443)];
        assert!(![0, 1, 7].contains(&b), "{b}");
        // Planned over what it planned, nothing changes.
        let again = entries(&desired, |_| true, &e);
        assert!(diff(&again, &e).is_empty());
    }

    #[test]
    fn a_set_that_two_policies_shared_is_split_into_ids_of_their_own() {
        // What a hashed id left behind when two tenants' sets hashed alike: one id, the
        // union of both.
        let desired = Desired::from_services(&[
            tenant("a", "203.0.113.1", &["10.0.0.0/8"]),
            tenant("b", "203.0.113.2", &["192.0.2.0/24"]),
        ]);
        let merged = Entries {
            ranges: BTreeSet::from([
                (9, "10.0.0.0/8".parse().unwrap()),
                (9, "192.0.2.0/24".parse().unwrap()),
            ]),
            ..Entries::default()
        };
        let e = entries(&desired, |_| true, &merged);
        let (a, b) = (
            e.ports[&port("203.0.113.1", proto::TCP, 443)],
            e.ports[&port("203.0.113.2", proto::TCP, 443)],
        );
        assert!(a != b && a != 9 && b != 9, "{a} {b}");
        assert_eq!(ranges_of(&e, a), ["10.0.0.0/8"]);
        assert_eq!(ranges_of(&e, b), ["192.0.2.0/24"]);
        let changes = diff(&e, &merged);
        assert_eq!(changes.remove_ranges.len(), 2, "the shared set goes last");
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
            &Entries::default(),
        );
        let after = entries(
            &Desired::from_services(&[service(
                "web",
                &["203.0.113.10"],
                &[(8080, Protocol::Tcp), (443, Protocol::Tcp)],
                &[],
            )]),
            |_| true,
            &Entries::default(),
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
                    entries: entries(&desired, |_| true, &Entries::default()),
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
        let e = entries(&desired, |a| a.is_ipv4(), &Entries::default());
        assert_eq!(
            e.vips.keys().copied().collect::<Vec<_>>(),
            [vip("203.0.113.10")]
        );
    }
}
