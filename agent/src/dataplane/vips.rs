//! The pinned address and counter maps, as userspace sees them.

use std::net::IpAddr;

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuHashMap, PerCpuValues};
use lbagent_common::{VipConfig, VipKey, VipStats, maps};

use super::{DataplaneError, PinLayout, maps_pinned};

/// Totals for one address over all CPUs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VipCounters {
    pub address: IpAddr,
    pub packets: u64,
    pub bytes: u64,
    /// Sent from the address (replies), counted by the tc egress program.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Drops by reason.
    pub drops: Drops,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Drops {
    pub port: u64,
    pub source: u64,
    pub protocol: u64,
    pub icmp: u64,
    pub malformed: u64,
}

/// Handle on the pinned maps of a loaded dataplane.
pub struct VipTable {
    vips: HashMap<MapData, VipKey, VipConfig>,
    stats: PerCpuHashMap<MapData, VipKey, VipStats>,
}

impl VipTable {
    pub fn open(pins: &PinLayout) -> Result<Self, DataplaneError> {
        pins.check_bpffs()?;
        if !maps_pinned(pins)? {
            return Err(DataplaneError::NotLoaded { dir: pins.dir() });
        }
        let open = |name: &'static str| {
            MapData::from_pin(pins.map(name))
                .and_then(Map::from_map_data)
                .map_err(|source| DataplaneError::Map { name, source })
        };
        Ok(Self {
            vips: HashMap::try_from(open(maps::VIPS)?).map_err(map_err(maps::VIPS))?,
            stats: PerCpuHashMap::try_from(open(maps::VIP_STATS)?)
                .map_err(map_err(maps::VIP_STATS))?,
        })
    }

    /// Adds an address; `false` if it was there already (its counters are kept).
    pub fn insert(&mut self, address: IpAddr) -> Result<bool, DataplaneError> {
        let key = VipKey::from(address);
        if self.contains(&key)? {
            return Ok(false);
        }
        // Counters first: the program counts only into entries that exist, so once the
        // address is visible every packet to it is counted.
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DataplaneError::Io {
            path: "/sys/devices/system/cpu/possible".into(),
            source,
        })?;
        let zero = PerCpuValues::try_from(vec![VipStats::default(); cpus]).map_err(|source| {
            DataplaneError::Io {
                path: "/sys/devices/system/cpu/possible".into(),
                source,
            }
        })?;
        self.stats
            .insert(key, zero, 0)
            .map_err(full_or(address, maps::VIP_STATS))?;
        if let Err(err) = self.vips.insert(key, VipConfig::default(), 0) {
            let _ = self.stats.remove(&key);
            return Err(full_or(address, maps::VIPS)(err));
        }
        Ok(true)
    }

    /// Removes an address and its counters; `false` if it was not there.
    pub fn remove(&mut self, address: IpAddr) -> Result<bool, DataplaneError> {
        let key = VipKey::from(address);
        if !self.contains(&key)? {
            return Ok(false);
        }
        self.vips.remove(&key).map_err(map_err(maps::VIPS))?;
        match self.stats.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(true),
            Err(err) => Err(map_err(maps::VIP_STATS)(err)),
        }
    }

    /// Counters of every address, summed over CPUs, ordered by address.
    pub fn counters(&self) -> Result<Vec<VipCounters>, DataplaneError> {
        let mut counters = Vec::new();
        for key in self.vips.keys() {
            let key = key.map_err(map_err(maps::VIPS))?;
            let Some(address) = key.ip() else { continue };
            let mut total = VipCounters {
                address,
                packets: 0,
                bytes: 0,
                tx_packets: 0,
                tx_bytes: 0,
                drops: Drops::default(),
            };
            match self.stats.get(&key, 0) {
                Ok(per_cpu) => {
                    for s in per_cpu.iter() {
                        total.packets += s.packets;
                        total.bytes += s.bytes;
                        total.tx_packets += s.tx_packets;
                        total.tx_bytes += s.tx_bytes;
                        total.drops.port += s.drop_port;
                        total.drops.source += s.drop_source;
                        total.drops.protocol += s.drop_protocol;
                        total.drops.icmp += s.drop_icmp;
                        total.drops.malformed += s.drop_malformed;
                    }
                }
                Err(MapError::KeyNotFound) => {}
                Err(err) => return Err(map_err(maps::VIP_STATS)(err)),
            }
            counters.push(total);
        }
        counters.sort_by_key(|c| c.address);
        Ok(counters)
    }

    fn contains(&self, key: &VipKey) -> Result<bool, DataplaneError> {
        match self.vips.get(key, 0) {
            Ok(_) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(err) => Err(map_err(maps::VIPS)(err)),
        }
    }
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source }
}

/// E2BIG is how a full hash map refuses an insert.
fn full_or(address: IpAddr, name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| match &source {
        MapError::SyscallError(err) if err.io_error.raw_os_error() == Some(libc::E2BIG) => {
            DataplaneError::VipMapFull {
                address,
                capacity: maps::MAX_VIPS,
            }
        }
        _ => DataplaneError::Map { name, source },
    }
}
