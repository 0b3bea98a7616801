//! The dataplane sink: the eBPF maps that carry each address's policy (ports, protocols,
//! source ranges), filled from the desired state. The programs and their attachments belong
//! to `crate::dataplane`; this sink only keeps the map entries right.
//!
//! Changes are ordered so that no service that stays sees a moment without its entries:
//! new range entries, counters and policies go in first, changed policies are updated in
//! place, and only then does what is no longer wanted go.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::maps::{
    HashMap, LpmTrie, Map, MapData, MapError, PerCpuHashMap, PerCpuValues, lpm_trie::Key,
};
use ipnet::IpNet;
use lbagent_common::{
    PortKey, PortPolicy, PortStats, RangeKeyV4, RangeKeyV6, VIP_ENFORCE, VipConfig, VipKey,
    VipStats, maps, proto,
};

use crate::{
    dataplane::{DataplaneError, PinLayout},
    desired::{Desired, Protocol},
};

/// The map entries of a whole desired state (or of what the maps hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entries {
    pub vips: BTreeMap<VipKey, VipConfig>,
    pub ports: BTreeMap<PortKey, PortPolicy>,
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
        let vip = VipKey::from(*address);
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
                let key = PortKey::new(vip, protocol_number(port.protocol), port.port);
                // Two services on one address and port: the sources of either pass.
                let merged = match entries.ports.get(&key) {
                    Some(existing) if existing.ranges == 0 || set == 0 => 0,
                    Some(existing) if existing.ranges != set => {
                        let mut union: BTreeSet<IpNet> = entries
                            .ranges
                            .iter()
                            .filter(|(s, _)| *s == existing.ranges)
                            .map(|(_, r)| *r)
                            .collect();
                        union.extend(policy.source_ranges.iter().copied());
                        let merged = set_id(&union);
                        entries.ranges.extend(union.iter().map(|r| (merged, *r)));
                        merged
                    }
                    _ => set,
                };
                entries.ports.insert(key, PortPolicy { ranges: merged });
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
            vip,
            VipConfig {
                flags: if enforce { VIP_ENFORCE } else { 0 },
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
pub struct Changes {
    pub add_ranges: Vec<(u32, IpNet)>,
    /// New or changed addresses (new ones also get zeroed counters).
    pub set_vips: Vec<(VipKey, VipConfig, bool)>,
    pub set_ports: Vec<(PortKey, PortPolicy, bool)>,
    pub remove_ports: Vec<PortKey>,
    pub remove_vips: Vec<VipKey>,
    pub remove_ranges: Vec<(u32, IpNet)>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

pub fn diff(desired: &Entries, observed: &Entries) -> Changes {
    Changes {
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

/// The pinned policy maps.
pub struct DataplaneSink {
    vips: HashMap<MapData, VipKey, VipConfig>,
    vip_stats: PerCpuHashMap<MapData, VipKey, VipStats>,
    ports: HashMap<MapData, PortKey, PortPolicy>,
    port_stats: PerCpuHashMap<MapData, PortKey, PortStats>,
    ranges_v4: LpmTrie<MapData, RangeKeyV4, u8>,
    ranges_v6: LpmTrie<MapData, RangeKeyV6, u8>,
    cpus: usize,
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

impl DataplaneSink {
    /// Opens the maps pinned by an attach.
    pub fn open(pins: &PinLayout) -> Result<Self, DataplaneError> {
        let open = |name: &'static str| {
            MapData::from_pin(pins.map(name))
                .and_then(Map::from_map_data)
                .map_err(map_err(name))
        };
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DataplaneError::Io {
            path: "/sys/devices/system/cpu/possible".into(),
            source,
        })?;
        Ok(Self {
            vips: HashMap::try_from(open(maps::VIPS)?).map_err(map_err(maps::VIPS))?,
            vip_stats: PerCpuHashMap::try_from(open(maps::VIP_STATS)?)
                .map_err(map_err(maps::VIP_STATS))?,
            ports: HashMap::try_from(open(maps::PORTS)?).map_err(map_err(maps::PORTS))?,
            port_stats: PerCpuHashMap::try_from(open(maps::PORT_STATS)?)
                .map_err(map_err(maps::PORT_STATS))?,
            ranges_v4: LpmTrie::try_from(open(maps::RANGES_V4)?)
                .map_err(map_err(maps::RANGES_V4))?,
            ranges_v6: LpmTrie::try_from(open(maps::RANGES_V6)?)
                .map_err(map_err(maps::RANGES_V6))?,
            cpus,
        })
    }

    /// What the maps hold now.
    pub fn observe(&self) -> Result<Entries, DataplaneError> {
        let mut entries = Entries::default();
        for item in self.vips.iter() {
            let (k, v) = item.map_err(map_err(maps::VIPS))?;
            entries.vips.insert(k, v);
        }
        for item in self.ports.iter() {
            let (k, v) = item.map_err(map_err(maps::PORTS))?;
            entries.ports.insert(k, v);
        }
        for key in self.ranges_v4.keys() {
            let key = key.map_err(map_err(maps::RANGES_V4))?;
            let data = key.data();
            if let Ok(net) = IpNet::new(
                IpAddr::from(data.addr),
                (key.prefix_len().saturating_sub(32)) as u8,
            ) {
                entries.ranges.insert((u32::from_be_bytes(data.set), net));
            }
        }
        for key in self.ranges_v6.keys() {
            let key = key.map_err(map_err(maps::RANGES_V6))?;
            let data = key.data();
            if let Ok(net) = IpNet::new(
                IpAddr::from(data.addr),
                (key.prefix_len().saturating_sub(32)) as u8,
            ) {
                entries.ranges.insert((u32::from_be_bytes(data.set), net));
            }
        }
        Ok(entries)
    }

    /// Applies `changes` in their safe order.
    pub fn apply(&mut self, changes: &Changes) -> Result<(), DataplaneError> {
        for (set, range) in &changes.add_ranges {
            self.range(*set, *range, true)?;
        }
        for (key, config, new) in &changes.set_vips {
            if *new {
                let zero = PerCpuValues::try_from(vec![VipStats::default(); self.cpus]).map_err(
                    |source| DataplaneError::Io {
                        path: "per-cpu values".into(),
                        source,
                    },
                )?;
                self.vip_stats
                    .insert(*key, zero, 0)
                    .map_err(map_err(maps::VIP_STATS))?;
            }
            self.vips
                .insert(*key, *config, 0)
                .map_err(map_err(maps::VIPS))?;
        }
        for (key, policy, new) in &changes.set_ports {
            if *new {
                let zero = PerCpuValues::try_from(vec![PortStats::default(); self.cpus]).map_err(
                    |source| DataplaneError::Io {
                        path: "per-cpu values".into(),
                        source,
                    },
                )?;
                self.port_stats
                    .insert(*key, zero, 0)
                    .map_err(map_err(maps::PORT_STATS))?;
            }
            self.ports
                .insert(*key, *policy, 0)
                .map_err(map_err(maps::PORTS))?;
        }
        for key in &changes.remove_ports {
            ignore_missing(self.ports.remove(key)).map_err(map_err(maps::PORTS))?;
            ignore_missing(self.port_stats.remove(key)).map_err(map_err(maps::PORT_STATS))?;
        }
        for key in &changes.remove_vips {
            ignore_missing(self.vips.remove(key)).map_err(map_err(maps::VIPS))?;
            ignore_missing(self.vip_stats.remove(key)).map_err(map_err(maps::VIP_STATS))?;
        }
        for (set, range) in &changes.remove_ranges {
            self.range(*set, *range, false)?;
        }
        Ok(())
    }

    fn range(&mut self, set: u32, range: IpNet, add: bool) -> Result<(), DataplaneError> {
        let prefix = 32 + u32::from(range.prefix_len());
        let set = set.to_be_bytes();
        match range {
            IpNet::V4(net) => {
                let key = Key::new(
                    prefix,
                    RangeKeyV4 {
                        set,
                        addr: net.addr().octets(),
                    },
                );
                if add {
                    self.ranges_v4.insert(&key, 1, 0)
                } else {
                    ignore_missing(self.ranges_v4.remove(&key))
                }
                .map_err(map_err(maps::RANGES_V4))
            }
            IpNet::V6(net) => {
                let key = Key::new(
                    prefix,
                    RangeKeyV6 {
                        set,
                        addr: net.addr().octets(),
                    },
                );
                if add {
                    self.ranges_v6.insert(&key, 1, 0)
                } else {
                    ignore_missing(self.ranges_v6.remove(&key))
                }
                .map_err(map_err(maps::RANGES_V6))
            }
        }
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
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

    fn vip(a: &str) -> VipKey {
        VipKey::from(a.parse::<IpAddr>().unwrap())
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
            VipConfig {
                flags: VIP_ENFORCE,
                fragment_ranges: 0
            },
            "dns admits all"
        );
        assert_eq!(
            e.vips[&vip("203.0.113.11")],
            VipConfig {
                flags: 0,
                fragment_ranges: 0
            },
            "no ports: count only"
        );
        assert_eq!(
            e.ports[&PortKey::new(vip("203.0.113.10"), proto::TCP, 443)].ranges,
            web_set
        );
        assert_eq!(
            e.ports[&PortKey::new(vip("203.0.113.10"), proto::UDP, 53)].ranges,
            0
        );
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
