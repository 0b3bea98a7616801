//! The neighbour responder's maps, as userspace sees them: which local addresses this node
//! answers ARP and neighbour solicitations for, which it keeps silent on, and what the
//! program counted for each.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuHashMap, PerCpuValues},
};
use lbagent_common::{
    NEIGHBOUR_ANSWER, NEIGHBOUR_HANDOVER, NEIGHBOUR_SILENT, NeighbourEntry, NeighbourKey,
    NeighbourStats, maps,
};
use serde::Serialize;

use super::{DataplaneError, PinLayout};

/// What this node does for one local address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase", tag = "role")]
pub enum Role {
    /// Answers on interface `ifindex` with hardware address `mac`.
    Answer { ifindex: u32, mac: [u8; 6] },
    /// Another node has just won the address: answers as [`Role::Answer`] until that node
    /// claims it, when the program makes the entry [`Role::Silent`] itself.
    HandOver { ifindex: u32, mac: [u8; 6] },
    /// Another node answers: requests are dropped here.
    Silent,
}

impl Role {
    /// Whether the program answers requests for the address.
    pub fn answers(self) -> bool {
        !matches!(self, Self::Silent)
    }

    fn entry(self) -> NeighbourEntry {
        match self {
            Self::Answer { ifindex, mac } => NeighbourEntry {
                ifindex,
                mac,
                role: NEIGHBOUR_ANSWER,
                _pad: 0,
            },
            Self::HandOver { ifindex, mac } => NeighbourEntry {
                ifindex,
                mac,
                role: NEIGHBOUR_HANDOVER,
                _pad: 0,
            },
            Self::Silent => NeighbourEntry {
                role: NEIGHBOUR_SILENT,
                ..NeighbourEntry::default()
            },
        }
    }

    fn from_entry(entry: &NeighbourEntry) -> Option<Self> {
        match entry.role {
            NEIGHBOUR_ANSWER => Some(Self::Answer {
                ifindex: entry.ifindex,
                mac: entry.mac,
            }),
            NEIGHBOUR_HANDOVER => Some(Self::HandOver {
                ifindex: entry.ifindex,
                mac: entry.mac,
            }),
            NEIGHBOUR_SILENT => Some(Self::Silent),
            _ => None,
        }
    }
}

/// The responder's counters for one address, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NeighbourCounters {
    pub answered: u64,
    pub silenced: u64,
    pub foreign: u64,
    /// Hardware address of the last foreign answer seen on any CPU, if any.
    pub foreign_mac: Option<[u8; 6]>,
}

pub struct NeighbourMaps {
    entries: HashMap<MapData, NeighbourKey, NeighbourEntry>,
    stats: PerCpuHashMap<MapData, NeighbourKey, NeighbourStats>,
}

impl NeighbourMaps {
    /// The pinned maps of a loaded dataplane.
    pub fn open(pins: &PinLayout) -> Result<Self, DataplaneError> {
        Self::from_maps(|name| {
            MapData::from_pin(pins.map(name)).map_err(|source| DataplaneError::Map { name, source })
        })
    }

    /// The maps of an object loaded in this process (tests, benchmarks).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let entries = ebpf
            .take_map(maps::NEIGHBOURS)
            .ok_or_else(|| invalid_name(maps::NEIGHBOURS))?;
        let stats = ebpf
            .take_map(maps::NEIGHBOUR_STATS)
            .ok_or_else(|| invalid_name(maps::NEIGHBOUR_STATS))?;
        Self::from_typed(entries, stats)
    }

    fn from_maps(
        mut open: impl FnMut(&'static str) -> Result<MapData, DataplaneError>,
    ) -> Result<Self, DataplaneError> {
        let typed = |name: &'static str, data: MapData| -> Result<Map, DataplaneError> {
            Map::from_map_data(data).map_err(|source| DataplaneError::Map { name, source })
        };
        let entries = typed(maps::NEIGHBOURS, open(maps::NEIGHBOURS)?)?;
        let stats = typed(maps::NEIGHBOUR_STATS, open(maps::NEIGHBOUR_STATS)?)?;
        Self::from_typed(entries, stats)
    }

    fn from_typed(entries: Map, stats: Map) -> Result<Self, DataplaneError> {
        Ok(Self {
            entries: HashMap::try_from(entries).map_err(|source| DataplaneError::Map {
                name: maps::NEIGHBOURS,
                source,
            })?,
            stats: PerCpuHashMap::try_from(stats).map_err(|source| DataplaneError::Map {
                name: maps::NEIGHBOUR_STATS,
                source,
            })?,
        })
    }

    /// Every address in the map with its role (entries of an unknown role are left out).
    pub fn roles(&self) -> BTreeMap<IpAddr, Role> {
        self.entries
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(key, entry)| Some((key.ip()?, Role::from_entry(&entry)?)))
            .collect()
    }

    /// Sets what this node does for `address`. The counters of an address already in the
    /// map are kept; a new one starts from zero.
    pub fn set(&mut self, address: IpAddr, role: Role) -> Result<(), DataplaneError> {
        let key = NeighbourKey::new(address);
        if self.counters(address)?.is_none() {
            let cpus = aya::util::nr_cpus().map_err(|(path, source)| DataplaneError::Io {
                path: path.into(),
                source,
            })?;
            let zeros = PerCpuValues::try_from(vec![NeighbourStats::default(); cpus]).map_err(
                |source| DataplaneError::Io {
                    path: maps::NEIGHBOUR_STATS.into(),
                    source,
                },
            )?;
            self.stats
                .insert(key, zeros, 0)
                .map_err(|source| full_or(source, maps::NEIGHBOUR_STATS, address))?;
        }
        self.entries
            .insert(key, role.entry(), 0)
            .map_err(|source| full_or(source, maps::NEIGHBOURS, address))
    }

    /// Forgets `address` and its counters; `false` if it was not there.
    pub fn remove(&mut self, address: IpAddr) -> Result<bool, DataplaneError> {
        let key = NeighbourKey::new(address);
        let removed = match self.entries.remove(&key) {
            Ok(()) => true,
            Err(err) if not_found(&err) => false,
            Err(source) => {
                return Err(DataplaneError::Map {
                    name: maps::NEIGHBOURS,
                    source,
                });
            }
        };
        match self.stats.remove(&key) {
            Ok(()) => Ok(removed),
            Err(err) if not_found(&err) => Ok(removed),
            Err(source) => Err(DataplaneError::Map {
                name: maps::NEIGHBOUR_STATS,
                source,
            }),
        }
    }

    /// The counters of `address` summed over CPUs, or `None` if it is not in the map.
    pub fn counters(&self, address: IpAddr) -> Result<Option<NeighbourCounters>, DataplaneError> {
        let per_cpu = match self.stats.get(&NeighbourKey::new(address), 0) {
            Ok(values) => values,
            Err(err) if not_found(&err) => return Ok(None),
            Err(source) => {
                return Err(DataplaneError::Map {
                    name: maps::NEIGHBOUR_STATS,
                    source,
                });
            }
        };
        let mut total = NeighbourCounters::default();
        for cpu in per_cpu.iter() {
            total.answered += cpu.answered;
            total.silenced += cpu.silenced;
            total.foreign += cpu.foreign;
            if cpu.foreign_mac != [0; 6] {
                total.foreign_mac = Some(cpu.foreign_mac);
            }
        }
        Ok(Some(total))
    }
}

/// A lookup or delete of a key the map does not hold (aya reports it either way).
fn not_found(err: &MapError) -> bool {
    match err {
        MapError::KeyNotFound => true,
        MapError::SyscallError(err) => err.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// The answering lease (`LB_NEIGHBOUR_LEASE`), which `lbagent membership` renews.
pub struct Lease {
    until: Array<MapData, u64>,
}

impl Lease {
    /// The pinned lease of a loaded dataplane.
    pub fn open(pins: &PinLayout) -> Result<Self, DataplaneError> {
        let name = maps::NEIGHBOUR_LEASE;
        let data = MapData::from_pin(pins.map(name))
            .map_err(|source| DataplaneError::Map { name, source })?;
        let map =
            Map::from_map_data(data).map_err(|source| DataplaneError::Map { name, source })?;
        Self::from_map(map)
    }

    /// The lease of an object loaded in this process (tests, benchmarks).
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let name = maps::NEIGHBOUR_LEASE;
        Self::from_map(ebpf.take_map(name).ok_or_else(|| invalid_name(name))?)
    }

    fn from_map(map: Map) -> Result<Self, DataplaneError> {
        let name = maps::NEIGHBOUR_LEASE;
        Ok(Self {
            until: Array::try_from(map).map_err(|source| DataplaneError::Map { name, source })?,
        })
    }

    /// Lets the node answer until `for_` from now; `None` lifts the lease (answer always).
    pub fn renew(&mut self, for_: Option<std::time::Duration>) -> Result<(), DataplaneError> {
        let until = match for_ {
            Some(duration) => deadline(duration)? & !maps::NEIGHBOUR_LEASE_LEAVING,
            None => 0,
        };
        self.write(until)
    }

    /// The node leaves: each address is answered until another node claims it, and none
    /// after `for_` from now (see `maps::NEIGHBOUR_LEASE_LEAVING`).
    pub fn leave(&mut self, for_: std::time::Duration) -> Result<(), DataplaneError> {
        self.write(deadline(for_)? | maps::NEIGHBOUR_LEASE_LEAVING)
    }

    fn write(&mut self, until: u64) -> Result<(), DataplaneError> {
        self.until
            .set(0, until, 0)
            .map_err(|source| DataplaneError::Map {
                name: maps::NEIGHBOUR_LEASE,
                source,
            })
    }
}

/// `CLOCK_MONOTONIC` `for_` from now, in ns, as the program's `bpf_ktime_get_ns` reads it.
fn deadline(for_: std::time::Duration) -> Result<u64, DataplaneError> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_err(|errno| {
        DataplaneError::Io {
            path: "CLOCK_MONOTONIC".into(),
            source: errno.into(),
        }
    })?;
    Ok(u64::try_from((Duration::from(now) + for_).as_nanos()).unwrap_or(u64::MAX))
}

fn invalid_name(name: &'static str) -> DataplaneError {
    DataplaneError::Map {
        name,
        source: MapError::InvalidName {
            name: name.to_owned(),
        },
    }
}

/// E2BIG from an update means the map is full: say so with the address.
fn full_or(source: MapError, map: &'static str, address: IpAddr) -> DataplaneError {
    let full = matches!(
        &source,
        MapError::SyscallError(err) if err.io_error.raw_os_error() == Some(libc::E2BIG)
    );
    if full {
        DataplaneError::MapFull {
            map,
            what: address.to_string(),
            capacity: maps::MAX_NEIGHBOURS,
        }
    } else {
        DataplaneError::Map { name: map, source }
    }
}
