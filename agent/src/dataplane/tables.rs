//! The dataplane's maps as userspace keeps them.
//!
//! The packet path reads only arrays (see `lbagent_common::maps`): bucket tables that turn an
//! address or a served port into a slot, and per-slot configurations and counters. This
//! module allocates the slots and keeps the tables. Slots are stable: an address keeps its
//! slot (and counters) for as long as it is configured, and a freed slot is zeroed and
//! handed out again only after every other slot (round robin), long after any packet still
//! using it has finished.
//!
//! Writes go through a shared mapping of each table, one aligned 8-byte word at a time, in
//! an order that keeps every moment consistent for a packet: a slot's configuration is
//! written before a table entry names the slot, and the entry is cleared before the
//! configuration. The program checks the slot's configuration against the packet, so a
//! half-written entry can cost a match for an instant, never a wrong policy.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::IpAddr,
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::{
    Ebpf,
    maps::{LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues, lpm_trie::Key},
};
use ipnet::IpNet;
use lbagent_common::{
    BUCKET_WAYS, Bucket, PortConfig, PortStats, RangeKeyV4, RangeKeyV6, VIP_ENFORCE, VipConfig,
    VipStats, buckets_of, filter_index_of, halves, maps, port_key, vip4_key, vip6_key,
};
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use super::{DataplaneError, PinLayout};

// The object is built for bpfel: the words below are laid out as a little-endian kernel
// reads them.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "lbagent's eBPF object is bpfel"
);

/// An address's policy as the program applies it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipPolicy {
    /// Only the address's ports and protocols pass.
    pub enforce: bool,
    /// Range set the source of a later IP fragment must be in; 0: any.
    pub fragment_ranges: u32,
}

/// A served (address, protocol, port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortId {
    pub address: IpAddr,
    pub protocol: u8,
    /// Host byte order.
    pub port: u16,
}

/// An address as the maps hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipEntry {
    pub slot: u32,
    pub policy: VipPolicy,
}

/// A served port as the maps hold it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortEntry {
    pub slot: u32,
    /// Range set the source must be in; 0: any.
    pub ranges: u32,
}

/// Handle on the dataplane's maps.
pub struct Maps {
    vips_v4: Table,
    vips_v6: Table,
    vip_config: Shared,
    vip_filter: Shared,
    ports: Table,
    port_config: Shared,
    vip_stats: PerCpuArray<MapData, VipStats>,
    port_stats: PerCpuArray<MapData, PortStats>,
    ranges_v4: LpmTrie<MapData, RangeKeyV4, u8>,
    ranges_v6: LpmTrie<MapData, RangeKeyV6, u8>,
    cpus: usize,
    next_vip: u32,
    next_port: u32,
    /// Held while this handle may write: two writers would hand out the same slot.
    writer: Option<Flock<File>>,
    writing: bool,
    lock_path: Option<PathBuf>,
}

const VIP_CONFIG_WORDS: usize = size_of::<VipConfig>() / 8;
const PORT_CONFIG_WORDS: usize = size_of::<PortConfig>() / 8;
const ENTRY_WORDS: usize = 2;

impl Maps {
    /// Opens the pinned maps of a loaded dataplane.
    pub fn open(pins: &PinLayout) -> Result<Self, DataplaneError> {
        let mut maps = Self::from_maps(|name| {
            MapData::from_pin(pins.map(name)).map_err(|source| DataplaneError::Map { name, source })
        })?;
        maps.lock_path = Some(pins.dir());
        Ok(maps)
    }

    /// Takes the maps out of an object loaded in this process (tests and benchmarks).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Self::from_maps(|name| {
            let map = ebpf.take_map(name).ok_or(DataplaneError::Map {
                name,
                source: MapError::InvalidName {
                    name: name.to_owned(),
                },
            })?;
            match map {
                Map::Array(data) | Map::PerCpuArray(data) | Map::LpmTrie(data) => Ok(data),
                _ => Err(DataplaneError::Map {
                    name,
                    source: MapError::InvalidName {
                        name: name.to_owned(),
                    },
                }),
            }
        })
    }

    fn from_maps(
        mut open: impl FnMut(&'static str) -> Result<MapData, DataplaneError>,
    ) -> Result<Self, DataplaneError> {
        let cpus = aya::util::nr_cpus().map_err(|(path, source)| DataplaneError::Io {
            path: path.into(),
            source,
        })?;
        let table = |name: &'static str,
                     data: MapData,
                     buckets: u32,
                     slots: u32|
         -> Result<Table, DataplaneError> {
            Ok(Table {
                words: Shared::map(name, data, size_of::<Bucket>(), buckets)?,
                buckets,
                slots,
                name,
            })
        };
        let mut maps = Self {
            vips_v4: table(
                maps::VIPS_V4,
                open(maps::VIPS_V4)?,
                maps::VIP_BUCKETS,
                maps::MAX_VIPS,
            )?,
            vips_v6: table(
                maps::VIPS_V6,
                open(maps::VIPS_V6)?,
                maps::VIP_BUCKETS,
                maps::MAX_VIPS,
            )?,
            vip_config: Shared::map(
                maps::VIP_CONFIG,
                open(maps::VIP_CONFIG)?,
                size_of::<VipConfig>(),
                maps::MAX_VIPS,
            )?,
            vip_filter: Shared::map(
                maps::VIP_FILTER,
                open(maps::VIP_FILTER)?,
                size_of::<u64>(),
                maps::VIP_FILTER_ENTRIES,
            )?,
            ports: table(
                maps::PORTS,
                open(maps::PORTS)?,
                maps::PORT_BUCKETS,
                maps::MAX_PORTS,
            )?,
            port_config: Shared::map(
                maps::PORT_CONFIG,
                open(maps::PORT_CONFIG)?,
                size_of::<PortConfig>(),
                maps::MAX_PORTS,
            )?,
            vip_stats: typed(maps::VIP_STATS, open(maps::VIP_STATS)?)?,
            port_stats: typed(maps::PORT_STATS, open(maps::PORT_STATS)?)?,
            ranges_v4: typed(maps::RANGES_V4, open(maps::RANGES_V4)?)?,
            ranges_v6: typed(maps::RANGES_V6, open(maps::RANGES_V6)?)?,
            cpus,
            next_vip: 1,
            next_port: 1,
            writer: None,
            writing: false,
            lock_path: None,
        };
        // Continue after the highest slot in use, so a restart does not hand out at once
        // a slot freed just before it.
        maps.next_vip = maps.vips().values().map(|v| v.slot + 1).max().unwrap_or(1);
        maps.next_port = (1..maps::MAX_PORTS)
            .rev()
            .find(|slot| port_used(&maps.port_config, *slot))
            .map_or(1, |slot| slot + 1);
        Ok(maps)
    }

    /// Every address the maps hold (that the program can find), with its slot and policy.
    pub fn vips(&self) -> BTreeMap<IpAddr, VipEntry> {
        (1..maps::MAX_VIPS)
            .filter_map(|slot| {
                let config = self.vip_config(slot);
                let ip = config.ip()?;
                (self.vip_slot(ip) == Some(slot)).then_some({
                    (
                        ip,
                        VipEntry {
                            slot,
                            policy: VipPolicy {
                                enforce: config.flags & VIP_ENFORCE != 0,
                                fragment_ranges: config.fragment_ranges,
                            },
                        },
                    )
                })
            })
            .collect()
    }

    /// The slot of `address`, found the way the program finds it.
    pub fn vip_slot(&self, address: IpAddr) -> Option<u32> {
        let (table, key) = match address {
            IpAddr::V4(v4) => (&self.vips_v4, vip4_key(v4.octets())),
            IpAddr::V6(v6) => (&self.vips_v6, vip6_key(v6.octets())),
        };
        table
            .find(key)
            .map(|(_, slot)| slot)
            .filter(|slot| self.vip_config(*slot).ip() == Some(address))
    }

    /// Adds `address` with zeroed counters; returns its slot.
    pub fn add_vip(&mut self, address: IpAddr, policy: VipPolicy) -> Result<u32, DataplaneError> {
        self.take_writer_lock()?;
        if let Some(slot) = self.vip_slot(address) {
            return Ok(slot);
        }
        let (table, key) = match address {
            IpAddr::V4(v4) => (&self.vips_v4, vip4_key(v4.octets())),
            IpAddr::V6(v6) => (&self.vips_v6, vip6_key(v6.octets())),
        };
        if let Some((_, slot)) = table.find(key) {
            // Only a 2^-64 chance for IPv6 (see vip6_key), but never let one address shadow
            // another.
            let other = self.vip_config(slot).ip();
            return Err(DataplaneError::TableFull {
                map: table.name,
                what: format!("{address} (its key clashes with {other:?})"),
            });
        }
        let config = &self.vip_config;
        let slot = next_free(&mut self.next_vip, maps::MAX_VIPS, |slot| {
            config.load(slot as usize * VIP_CONFIG_WORDS + 2) & 0xff != 0
        })
        .ok_or(DataplaneError::MapFull {
            map: maps::VIP_CONFIG,
            what: address.to_string(),
            capacity: maps::MAX_VIPS - 1,
        })?;
        self.zero_vip_stats(slot)?;
        let words = vip_config_words(&VipConfig::new(
            address,
            flags(policy),
            policy.fragment_ranges,
        ));
        let base = slot as usize * VIP_CONFIG_WORDS;
        for (i, word) in words.iter().enumerate() {
            self.vip_config.store(base + i, *word);
        }
        // Counted in the filter before the entry exists, so the program never skips the
        // tables for an address they hold.
        self.count_in_filter(address, true);
        let table = if address.is_ipv4() {
            &self.vips_v4
        } else {
            &self.vips_v6
        };
        if let Err(err) = table.insert(key, slot, &address.to_string()) {
            for i in 0..VIP_CONFIG_WORDS {
                self.vip_config.store(base + i, 0);
            }
            self.count_in_filter(address, false);
            return Err(err);
        }
        Ok(slot)
    }

    /// Changes the policy of an address the maps hold, in one store.
    pub fn set_vip_policy(
        &mut self,
        address: IpAddr,
        policy: VipPolicy,
    ) -> Result<(), DataplaneError> {
        self.take_writer_lock()?;
        let slot = self.vip_slot(address).ok_or(DataplaneError::NotInMaps {
            what: address.to_string(),
        })?;
        let words = vip_config_words(&VipConfig::new(
            address,
            flags(policy),
            policy.fragment_ranges,
        ));
        self.vip_config
            .store(slot as usize * VIP_CONFIG_WORDS + 2, words[2]);
        Ok(())
    }

    /// Removes an address, its served ports and their counters; `false` if it was not there.
    pub fn remove_vip(&mut self, address: IpAddr) -> Result<bool, DataplaneError> {
        self.take_writer_lock()?;
        let Some(slot) = self.vip_slot(address) else {
            return Ok(false);
        };
        // Ports first: a port entry names the address slot, and must not outlive it.
        let orphans: Vec<(u32, u64)> = (1..maps::MAX_PORTS)
            .filter_map(|port_slot| {
                let key = self
                    .port_config
                    .load(port_slot as usize * PORT_CONFIG_WORDS);
                (key != 0 && key & 0xffff_ffff == u64::from(slot)).then_some((port_slot, key))
            })
            .collect();
        for (port_slot, key) in orphans {
            self.free_port(port_slot, key)?;
        }
        let (table, key) = match address {
            IpAddr::V4(v4) => (&self.vips_v4, vip4_key(v4.octets())),
            IpAddr::V6(v6) => (&self.vips_v6, vip6_key(v6.octets())),
        };
        table.remove(key, slot);
        let base = slot as usize * VIP_CONFIG_WORDS;
        for i in (0..VIP_CONFIG_WORDS).rev() {
            self.vip_config.store(base + i, 0);
        }
        self.count_in_filter(address, false);
        self.zero_vip_stats(slot)?;
        Ok(true)
    }

    /// Every served port the maps hold (of addresses they hold).
    pub fn ports(&self) -> BTreeMap<PortId, PortEntry> {
        let addresses: BTreeMap<u32, IpAddr> = self
            .vips()
            .into_iter()
            .map(|(ip, entry)| (entry.slot, ip))
            .collect();
        (1..maps::MAX_PORTS)
            .filter_map(|slot| {
                let base = slot as usize * PORT_CONFIG_WORDS;
                let key = self.port_config.load(base);
                let address = addresses.get(&((key & 0xffff_ffff) as u32))?;
                if self.ports.find(key).map(|(_, found)| found) != Some(slot) {
                    return None;
                }
                Some((
                    PortId {
                        address: *address,
                        port: (key >> 32) as u16,
                        protocol: (key >> 48) as u8,
                    },
                    PortEntry {
                        slot,
                        ranges: self.port_config.load(base + 1) as u32,
                    },
                ))
            })
            .collect()
    }

    /// The slot of a served port, found the way the program finds it.
    pub fn port_slot(&self, port: PortId) -> Option<u32> {
        let key = self.port_key(port)?;
        self.ports
            .find(key)
            .map(|(_, slot)| slot)
            .filter(|slot| self.port_config.load(*slot as usize * PORT_CONFIG_WORDS) == key)
    }

    /// Serves a port of an address the maps hold, with zeroed counters; returns its slot.
    pub fn add_port(&mut self, port: PortId, ranges: u32) -> Result<u32, DataplaneError> {
        self.take_writer_lock()?;
        let key = self.port_key(port).ok_or(DataplaneError::NotInMaps {
            what: port.address.to_string(),
        })?;
        if let Some(slot) = self.port_slot(port) {
            return Ok(slot);
        }
        let config = &self.port_config;
        let what = || format!("{} {}/{}", port.address, port.protocol, port.port);
        let slot = next_free(&mut self.next_port, maps::MAX_PORTS, |slot| {
            config.load(slot as usize * PORT_CONFIG_WORDS) != 0
        })
        .ok_or_else(|| DataplaneError::MapFull {
            map: maps::PORT_CONFIG,
            what: what(),
            capacity: maps::MAX_PORTS - 1,
        })?;
        self.zero_port_stats(slot)?;
        let base = slot as usize * PORT_CONFIG_WORDS;
        self.port_config.store(base + 1, u64::from(ranges));
        self.port_config.store(base, key);
        if let Err(err) = self.ports.insert(key, slot, &what()) {
            self.port_config.store(base, 0);
            self.port_config.store(base + 1, 0);
            return Err(err);
        }
        Ok(slot)
    }

    /// Changes the source ranges of a served port, in one store.
    pub fn set_port_ranges(&mut self, port: PortId, ranges: u32) -> Result<(), DataplaneError> {
        self.take_writer_lock()?;
        let slot = self.port_slot(port).ok_or(DataplaneError::NotInMaps {
            what: format!("{} {}/{}", port.address, port.protocol, port.port),
        })?;
        self.port_config
            .store(slot as usize * PORT_CONFIG_WORDS + 1, u64::from(ranges));
        Ok(())
    }

    /// Stops serving a port; `false` if it was not served.
    pub fn remove_port(&mut self, port: PortId) -> Result<bool, DataplaneError> {
        self.take_writer_lock()?;
        let (Some(slot), Some(key)) = (self.port_slot(port), self.port_key(port)) else {
            return Ok(false);
        };
        self.free_port(slot, key)?;
        Ok(true)
    }

    fn free_port(&mut self, slot: u32, key: u64) -> Result<(), DataplaneError> {
        self.ports.remove(key, slot);
        let base = slot as usize * PORT_CONFIG_WORDS;
        self.port_config.store(base, 0);
        self.port_config.store(base + 1, 0);
        self.zero_port_stats(slot)
    }

    fn port_key(&self, port: PortId) -> Option<u64> {
        let vip = self.vip_slot(port.address)?;
        Some(port_key(vip, port.protocol, port.port))
    }

    /// The source ranges of every range set: (set, range).
    pub fn ranges(&self) -> Result<BTreeSet<(u32, IpNet)>, DataplaneError> {
        let mut ranges = BTreeSet::new();
        for key in self.ranges_v4.keys() {
            let key = key.map_err(|source| DataplaneError::Map {
                name: maps::RANGES_V4,
                source,
            })?;
            let data = key.data();
            if let Ok(net) = IpNet::new(IpAddr::from(data.addr), range_prefix(key.prefix_len())) {
                ranges.insert((u32::from_be_bytes(data.set), net));
            }
        }
        for key in self.ranges_v6.keys() {
            let key = key.map_err(|source| DataplaneError::Map {
                name: maps::RANGES_V6,
                source,
            })?;
            let data = key.data();
            if let Ok(net) = IpNet::new(IpAddr::from(data.addr), range_prefix(key.prefix_len())) {
                ranges.insert((u32::from_be_bytes(data.set), net));
            }
        }
        Ok(ranges)
    }

    /// Adds (`add`) or removes a source range of range set `set`.
    pub fn set_range(&mut self, set: u32, range: IpNet, add: bool) -> Result<(), DataplaneError> {
        self.take_writer_lock()?;
        let prefix = 32 + u32::from(range.prefix_len());
        let set = set.to_be_bytes();
        let full = |name: &'static str| {
            move |source: MapError| match &source {
                MapError::SyscallError(err)
                    if err.io_error.raw_os_error() == Some(libc::ENOSPC) =>
                {
                    DataplaneError::MapFull {
                        map: name,
                        what: range.to_string(),
                        capacity: maps::MAX_RANGES,
                    }
                }
                _ => DataplaneError::Map { name, source },
            }
        };
        match range {
            IpNet::V4(net) => {
                let key = RangeKeyV4 {
                    set,
                    addr: net.addr().octets(),
                };
                add_or_remove(&mut self.ranges_v4, Key::new(prefix, key), add)
                    .map_err(full(maps::RANGES_V4))
            }
            IpNet::V6(net) => {
                let key = RangeKeyV6 {
                    set,
                    addr: net.addr().octets(),
                };
                add_or_remove(&mut self.ranges_v6, Key::new(prefix, key), add)
                    .map_err(full(maps::RANGES_V6))
            }
        }
    }

    /// An address slot's counters summed over CPUs.
    pub fn vip_stats(&self, slot: u32) -> Result<VipStats, DataplaneError> {
        let per_cpu = self
            .vip_stats
            .get(&slot, 0)
            .map_err(|source| DataplaneError::Map {
                name: maps::VIP_STATS,
                source,
            })?;
        Ok(per_cpu.iter().fold(VipStats::default(), |a, s| VipStats {
            packets: a.packets + s.packets,
            bytes: a.bytes + s.bytes,
            tx_packets: a.tx_packets + s.tx_packets,
            tx_bytes: a.tx_bytes + s.tx_bytes,
            drop_port: a.drop_port + s.drop_port,
            drop_source: a.drop_source + s.drop_source,
            drop_protocol: a.drop_protocol + s.drop_protocol,
            drop_icmp: a.drop_icmp + s.drop_icmp,
            drop_malformed: a.drop_malformed + s.drop_malformed,
        }))
    }

    /// A port slot's counters summed over CPUs.
    pub fn port_stats(&self, slot: u32) -> Result<PortStats, DataplaneError> {
        let per_cpu = self
            .port_stats
            .get(&slot, 0)
            .map_err(|source| DataplaneError::Map {
                name: maps::PORT_STATS,
                source,
            })?;
        Ok(per_cpu.iter().fold(PortStats::default(), |a, s| PortStats {
            packets: a.packets + s.packets,
            bytes: a.bytes + s.bytes,
        }))
    }

    fn vip_config(&self, slot: u32) -> VipConfig {
        vip_config_at(&self.vip_config, slot)
    }

    fn zero_vip_stats(&mut self, slot: u32) -> Result<(), DataplaneError> {
        zero_per_cpu(&mut self.vip_stats, maps::VIP_STATS, self.cpus, slot)
    }

    fn zero_port_stats(&mut self, slot: u32) -> Result<(), DataplaneError> {
        zero_per_cpu(&mut self.port_stats, maps::PORT_STATS, self.cpus, slot)
    }

    /// Takes the writer's lock again when the pin directory was replaced (removed from
    /// outside lbagent, and made again when the pins were restored): a lock on the removed
    /// one would keep no second writer out of the new one.
    /// Returns whether it did.
    pub fn relock_if_replaced(&mut self) -> Result<bool, DataplaneError> {
        use std::os::unix::fs::MetadataExt as _;
        let (Some(path), Some(writer)) = (&self.lock_path, &self.writer) else {
            return Ok(false);
        };
        let held = writer.metadata().map(|m| (m.dev(), m.ino())).ok();
        let now = std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
        if now.is_none() || held == now {
            return Ok(false);
        }
        self.writer = None;
        self.writing = false;
        self.take_writer_lock().map(|()| true)
    }

    /// Takes the writer's lock on the pin directory, once: a second writer (an `lbagent vip`
    /// command while the agent runs) is refused instead of handing out a slot twice. Every
    /// change takes it; the agent takes it at start.
    pub fn take_writer_lock(&mut self) -> Result<(), DataplaneError> {
        if self.writing {
            return Ok(());
        }
        if let Some(path) = &self.lock_path {
            let file = File::open(path).map_err(|source| DataplaneError::Io {
                path: path.clone(),
                source,
            })?;
            let locked = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(
                |(_, errno)| match errno {
                    Errno::EWOULDBLOCK => DataplaneError::Busy { dir: path.clone() },
                    other => DataplaneError::Io {
                        path: path.clone(),
                        source: other.into(),
                    },
                },
            )?;
            self.writer = Some(locked);
        }
        self.writing = true;
        self.repair()
    }

    /// Clears what a writer killed between two stores can leave: a table entry whose slot
    /// does not hold its key, and a slot's configuration that no entry reaches (with its
    /// counters). The program ignores both; this frees them.
    fn repair(&mut self) -> Result<(), DataplaneError> {
        for (table, v6) in [(&self.vips_v4, false), (&self.vips_v6, true)] {
            table.retain(|key, slot| {
                let config = vip_config_at(&self.vip_config, slot);
                let ip = config.ip().filter(|ip| ip.is_ipv6() == v6);
                ip.is_some_and(|ip| VipConfig::table_key(ip).1 == key)
            });
        }
        let port_config = &self.port_config;
        self.ports
            .retain(|key, slot| port_config.load(slot as usize * PORT_CONFIG_WORDS) == key);
        for slot in 1..maps::MAX_VIPS {
            let config = self.vip_config(slot);
            if config.family != 0 && config.ip().and_then(|ip| self.vip_slot(ip)) != Some(slot) {
                let base = slot as usize * VIP_CONFIG_WORDS;
                for i in 0..VIP_CONFIG_WORDS {
                    self.vip_config.store(base + i, 0);
                }
                self.zero_vip_stats(slot)?;
            }
        }
        let live: BTreeSet<u32> = self.vips().values().map(|entry| entry.slot).collect();
        for slot in 1..maps::MAX_PORTS {
            let key = self.port_config.load(slot as usize * PORT_CONFIG_WORDS);
            if key == 0 {
                continue;
            }
            let reachable = self.ports.find(key).map(|(_, found)| found) == Some(slot);
            if !reachable || !live.contains(&((key & 0xffff_ffff) as u32)) {
                self.free_port(slot, key)?;
            }
        }
        self.recount_filter();
        Ok(())
    }

    /// Counts `address` in (`true`) or out of the filter the program looks at first.
    fn count_in_filter(&self, address: IpAddr, add: bool) {
        let index = filter_index_of(address) as usize;
        let count = self.vip_filter.load(index);
        let count = if add {
            count + 1
        } else {
            count.saturating_sub(1)
        };
        self.vip_filter.store(index, count);
    }

    /// Sets every filter counter to the number of configured addresses at its index. A
    /// writer killed between two stores leaves counts too high (an address is counted in
    /// before its configuration is written, and out after it is cleared), never too low;
    /// each counter goes from its old value straight to the exact one, so at no moment is
    /// an address the tables hold counted out.
    fn recount_filter(&self) {
        let mut counts = vec![0u64; maps::VIP_FILTER_ENTRIES as usize];
        for slot in 1..maps::MAX_VIPS {
            if let Some(ip) = self.vip_config(slot).ip() {
                counts[filter_index_of(ip) as usize] += 1;
            }
        }
        for (index, count) in counts.into_iter().enumerate() {
            if self.vip_filter.load(index) != count {
                self.vip_filter.store(index, count);
            }
        }
    }
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    name: &'static str,
    data: MapData,
) -> Result<T, DataplaneError> {
    Map::from_map_data(data)
        .and_then(T::try_from)
        .map_err(|source| DataplaneError::Map { name, source })
}

fn flags(policy: VipPolicy) -> u8 {
    if policy.enforce { VIP_ENFORCE } else { 0 }
}

fn range_prefix(trie_prefix: u32) -> u8 {
    trie_prefix.saturating_sub(32) as u8
}

fn port_used(config: &Shared, slot: u32) -> bool {
    config.load(slot as usize * PORT_CONFIG_WORDS) != 0
}

fn vip_config_at(words: &impl Words, slot: u32) -> VipConfig {
    let base = slot as usize * VIP_CONFIG_WORDS;
    let policy = words.load(base + 2);
    let (first, second) = (words.load(base), words.load(base + 1));
    let mut addr = [0u8; 16];
    addr[..8].copy_from_slice(&first.to_le_bytes());
    addr[8..].copy_from_slice(&second.to_le_bytes());
    VipConfig {
        addr,
        family: policy as u8,
        flags: (policy >> 8) as u8,
        _pad: [0; 2],
        fragment_ranges: (policy >> 32) as u32,
    }
}

/// A VipConfig as the three words the program reads.
fn vip_config_words(config: &VipConfig) -> [u64; VIP_CONFIG_WORDS] {
    let (first, second) = halves(config.addr);
    let policy = u64::from(config.family)
        | u64::from(config.flags) << 8
        | u64::from(config.fragment_ranges) << 32;
    [first, second, policy]
}

/// The first free slot from `next` on, wrapping past the end (slot 0 is never used).
fn next_free(next: &mut u32, capacity: u32, used: impl Fn(u32) -> bool) -> Option<u32> {
    let start = (*next).clamp(1, capacity - 1);
    let slot = (start..capacity)
        .chain(1..start)
        .find(|slot| !used(*slot))?;
    *next = if slot + 1 >= capacity { 1 } else { slot + 1 };
    Some(slot)
}

/// Sets `slot` of the per-CPU array `name` to zero on each of the `cpus`.
fn zero_per_cpu<T: aya::Pod + Default>(
    array: &mut PerCpuArray<MapData, T>,
    name: &'static str,
    cpus: usize,
    slot: u32,
) -> Result<(), DataplaneError> {
    let zero = PerCpuValues::try_from((0..cpus).map(|_| T::default()).collect::<Vec<_>>())
        .map_err(|source| DataplaneError::Io {
            path: "per-CPU values".into(),
            source,
        })?;
    array
        .set(slot, zero, 0)
        .map_err(|source| DataplaneError::Map { name, source })
}

/// Puts `key` in a range trie (`add`) or takes it out (already out is fine).
fn add_or_remove<K: aya::Pod>(
    trie: &mut LpmTrie<MapData, K, u8>,
    key: Key<K>,
    add: bool,
) -> Result<(), MapError> {
    if add {
        trie.insert(&key, 1, 0)
    } else {
        ignore_missing(trie.remove(&key))
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}

/// A bucket table: a key in one of two candidate buckets, any way.
struct Table<W = Shared> {
    words: W,
    buckets: u32,
    /// Length of the slot arrays the ways point into. A way whose slot is 0 or past them is
    /// not live: the program's array lookup of that slot fails, and so must ours (the maps
    /// may hold anything an older or killed writer left).
    slots: u32,
    name: &'static str,
}

/// Aligned 8-byte words that the program reads as the userspace writes them.
trait Words {
    fn load(&self, index: usize) -> u64;
    fn store(&self, index: usize, value: u64);
}

const WAY_WORDS: usize = ENTRY_WORDS;
const BUCKET_WORDS: usize = BUCKET_WAYS * WAY_WORDS;

impl<W: Words> Table<W> {
    /// The slot way `entry` points to, if the way is live.
    fn live_slot(&self, entry: usize) -> Option<u32> {
        // The low half of the word, as the program reads `TableEntry::slot`.
        let slot = self.words.load(entry * WAY_WORDS + 1) as u32;
        (slot != 0 && slot < self.slots).then_some(slot)
    }

    /// (entry index, slot) of `key`.
    fn find(&self, key: u64) -> Option<(usize, u32)> {
        let (first, second) = buckets_of(key, self.buckets);
        [first, second].into_iter().find_map(|bucket| {
            (0..BUCKET_WAYS).find_map(|way| {
                let entry = bucket as usize * BUCKET_WAYS + way;
                let slot = self.live_slot(entry)?;
                (self.words.load(entry * WAY_WORDS) == key).then_some((entry, slot))
            })
        })
    }

    /// Puts `key -> slot` in the emptier of its buckets: the key first, then the slot that
    /// makes the way live.
    fn insert(&self, key: u64, slot: u32, what: &str) -> Result<(), DataplaneError> {
        let (first, second) = buckets_of(key, self.buckets);
        let free = |bucket: u32| -> Vec<usize> {
            (0..BUCKET_WAYS)
                .map(|way| bucket as usize * BUCKET_WAYS + way)
                .filter(|entry| self.live_slot(*entry).is_none())
                .collect()
        };
        let (a, b) = (free(first), free(second));
        let entry = if a.len() >= b.len() { a } else { b }
            .first()
            .copied()
            .ok_or_else(|| DataplaneError::TableFull {
                map: self.name,
                what: what.to_owned(),
            })?;
        self.words.store(entry * WAY_WORDS, key);
        self.words.store(entry * WAY_WORDS + 1, u64::from(slot));
        Ok(())
    }

    /// Clears every live way for which `keep(key, slot)` is false, and every way that is
    /// not live but not empty either (a slot past the arrays).
    fn retain(&self, keep: impl Fn(u64, u32) -> bool) {
        for entry in 0..self.buckets as usize * BUCKET_WAYS {
            let drop = match self.live_slot(entry) {
                Some(slot) => !keep(self.words.load(entry * WAY_WORDS), slot),
                None => self.words.load(entry * WAY_WORDS + 1) != 0,
            };
            if drop {
                self.words.store(entry * WAY_WORDS + 1, 0);
                self.words.store(entry * WAY_WORDS, 0);
            }
        }
    }

    /// Clears the way holding `key -> slot`: the slot first, so the way dies at once.
    fn remove(&self, key: u64, slot: u32) {
        if let Some((entry, found)) = self.find(key)
            && found == slot
        {
            self.words.store(entry * WAY_WORDS + 1, 0);
            self.words.store(entry * WAY_WORDS, 0);
        }
    }
}

const _: () = assert!(BUCKET_WORDS * 8 == size_of::<Bucket>());

/// A `BPF_F_MMAPABLE` array mapped into this process, as 8-byte words.
struct Shared {
    base: NonNull<AtomicU64>,
    words: usize,
    bytes: usize,
    /// Keeps the map's fd open for as long as the mapping is used.
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory, accessed only through atomics.
unsafe impl Send for Shared {}

impl Shared {
    fn map(
        name: &'static str,
        map: MapData,
        value_size: usize,
        entries: u32,
    ) -> Result<Self, DataplaneError> {
        let info = map
            .info()
            .map_err(|source| DataplaneError::Map { name, source })?;
        if info.map_flags() & maps::MMAPABLE == 0
            || info.value_size() as usize != value_size
            || info.max_entries() != entries
        {
            return Err(DataplaneError::IncompatibleMap {
                path: name.into(),
                detail: "not the shared array this lbagent expects".to_owned(),
            });
        }
        let words = entries as usize * value_size / 8;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as usize;
        let bytes = (words * 8).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's fd at offset 0 and the map's own size
        // (the kernel refuses more); nothing else in this process maps it.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(DataplaneError::Io {
                path: format!("mmap of {name}").into(),
                source: std::io::Error::last_os_error(),
            });
        }
        let base = NonNull::new(address.cast::<AtomicU64>()).ok_or_else(|| DataplaneError::Io {
            path: format!("mmap of {name}").into(),
            source: std::io::Error::other("null mapping"),
        })?;
        Ok(Self {
            base,
            words,
            bytes,
            _map: map,
        })
    }

    fn word(&self, index: usize) -> &AtomicU64 {
        assert!(index < self.words, "word {index} of {}", self.words);
        // SAFETY: in bounds (checked above) of a page-aligned mapping that lives as long as
        // self; the kernel and this process only ever access it as aligned words.
        unsafe { &*self.base.as_ptr().add(index) }
    }
}

impl Words for Shared {
    fn load(&self, index: usize) -> u64 {
        self.word(index).load(Ordering::Acquire)
    }

    /// One aligned 8-byte store: the program sees the old word or the new one.
    fn store(&self, index: usize, value: u64) {
        self.word(index).store(value, Ordering::Release);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, with its length; no reference outlives self.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Words for Vec<AtomicU64> {
        fn load(&self, index: usize) -> u64 {
            self[index].load(Ordering::Relaxed)
        }

        fn store(&self, index: usize, value: u64) {
            self[index].store(value, Ordering::Relaxed);
        }
    }

    fn table(buckets: u32) -> Table<Vec<AtomicU64>> {
        Table {
            words: (0..buckets as usize * BUCKET_WORDS)
                .map(|_| AtomicU64::new(0))
                .collect(),
            buckets,
            slots: 1000,
            name: "TEST",
        }
    }

    /// Found by the `pinned_maps` fuzz target: a pinned table way naming a slot past the
    /// slot arrays (garbage an older or killed writer can leave) made every reader index the
    /// configuration array out of bounds and panic, and the writer's repair too.
    #[test]
    fn a_way_with_a_slot_past_the_arrays_is_not_live_and_repair_clears_it() {
        let t = table(64);
        let (bucket, _) = buckets_of(42, t.buckets);
        let entry = bucket as usize * BUCKET_WAYS;
        t.words.store(entry * WAY_WORDS, 42);
        t.words.store(entry * WAY_WORDS + 1, 1000);
        assert_eq!(t.find(42), None);
        let mut asked = Vec::new();
        let asked_cell = std::cell::RefCell::new(&mut asked);
        t.retain(|key, slot| {
            asked_cell.borrow_mut().push((key, slot));
            true
        });
        assert!(asked.is_empty(), "retain offered a dead way: {asked:?}");
        assert_eq!(
            t.words.load(entry * WAY_WORDS + 1),
            0,
            "the garbage way stays"
        );
        // The way is free again, and a real entry takes it.
        t.insert(42, 7, "k").unwrap();
        assert_eq!(t.find(42), Some((entry, 7)));
    }

    #[test]
    fn keys_are_found_where_they_were_put_and_gone_once_removed() {
        let t = table(64);
        for key in 0..100u64 {
            t.insert(key * 7919, key as u32 + 1, "k").unwrap();
        }
        for key in 0..100u64 {
            assert_eq!(
                t.find(key * 7919).map(|(_, slot)| slot),
                Some(key as u32 + 1)
            );
        }
        t.remove(7919, 2);
        assert_eq!(t.find(7919), None);
        assert_eq!(t.find(2 * 7919).map(|(_, slot)| slot), Some(3));
        // Removing with a slot that is not the key's leaves the key.
        t.remove(2 * 7919, 99);
        assert!(t.find(2 * 7919).is_some());
    }

    #[test]
    fn a_table_refuses_a_key_when_both_buckets_are_full_and_names_it() {
        // Two buckets: every key's two candidates are among them; eight ways in all.
        let t = table(2);
        for key in 1..=8u64 {
            t.insert(key, key as u32, "k").unwrap();
        }
        let err = t.insert(9, 9, "203.0.113.9").unwrap_err();
        assert!(
            matches!(&err, DataplaneError::TableFull { map: "TEST", what } if what == "203.0.113.9"),
            "{err}"
        );
        t.remove(3, 3);
        t.insert(9, 9, "203.0.113.9").unwrap();
    }

    #[test]
    fn slots_go_round_and_skip_zero_and_used_ones() {
        let used = [false, false, true, false];
        let mut next = 1;
        let mut take = || next_free(&mut next, 4, |slot| used[slot as usize]);
        assert_eq!(take(), Some(1));
        assert_eq!(take(), Some(3), "2 is used");
        assert_eq!(take(), Some(1), "wraps past the end, never 0");
        let mut next = 1;
        assert_eq!(next_free(&mut next, 4, |_| true), None);
    }
}
