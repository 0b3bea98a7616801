//! The pinned address and counter maps, as userspace sees them.

use std::net::IpAddr;

use super::{DataplaneError, Maps, PinLayout, VipPolicy, maps_pinned};

/// Totals for one address over all CPUs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VipCounters {
    pub address: IpAddr,
    /// The address's index in the slot-indexed maps (`LB_VIP_CONFIG`, `LB_VIP_STATS`), for
    /// reading them with bpftool.
    pub slot: u32,
    pub packets: u64,
    pub bytes: u64,
    /// Sent from the address (replies), counted by the tc egress program.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Drops by reason.
    pub drops: Drops,
}

/// Allowed traffic to one service port of an address, over all CPUs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PortCounters {
    pub address: IpAddr,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: &'static str,
    pub port: u16,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Drops {
    pub port: u64,
    pub source: u64,
    pub protocol: u64,
    pub icmp: u64,
    pub malformed: u64,
}

/// Handle on the pinned maps of a loaded dataplane, for the `vip` and `counters` commands.
pub struct VipTable {
    maps: Maps,
}

impl VipTable {
    pub fn open(pins: &PinLayout) -> Result<Self, DataplaneError> {
        pins.check_bpffs()?;
        if !maps_pinned(pins)? {
            return Err(DataplaneError::NotLoaded { dir: pins.dir() });
        }
        Ok(Self {
            maps: Maps::open(pins)?,
        })
    }

    /// Adds an address (counted, no policy); `false` if it was there already (its counters
    /// are kept).
    pub fn insert(&mut self, address: IpAddr) -> Result<bool, DataplaneError> {
        if self.maps.vip_slot(address).is_some() {
            return Ok(false);
        }
        self.maps.add_vip(address, VipPolicy::default())?;
        Ok(true)
    }

    /// Removes an address and its counters; `false` if it was not there.
    pub fn remove(&mut self, address: IpAddr) -> Result<bool, DataplaneError> {
        self.maps.remove_vip(address)
    }

    /// Counters of every service port, summed over CPUs, ordered by address, protocol, port.
    pub fn port_counters(&self) -> Result<Vec<PortCounters>, DataplaneError> {
        self.maps
            .ports()
            .into_iter()
            .map(|(id, entry)| {
                let stats = self.maps.port_stats(entry.slot)?;
                Ok(PortCounters {
                    address: id.address,
                    protocol: match id.protocol {
                        lbagent_common::proto::TCP => "TCP",
                        lbagent_common::proto::UDP => "UDP",
                        lbagent_common::proto::SCTP => "SCTP",
                        _ => "other",
                    },
                    port: id.port,
                    packets: stats.packets,
                    bytes: stats.bytes,
                })
            })
            .collect()
    }

    /// Counters of every address, summed over CPUs, ordered by address.
    pub fn counters(&self) -> Result<Vec<VipCounters>, DataplaneError> {
        self.maps
            .vips()
            .into_iter()
            .map(|(address, entry)| {
                let s = self.maps.vip_stats(entry.slot)?;
                Ok(VipCounters {
                    address,
                    slot: entry.slot,
                    packets: s.packets,
                    bytes: s.bytes,
                    tx_packets: s.tx_packets,
                    tx_bytes: s.tx_bytes,
                    drops: Drops {
                        port: s.drop_port,
                        source: s.drop_source,
                        protocol: s.drop_protocol,
                        icmp: s.drop_icmp,
                        malformed: s.drop_malformed,
                    },
                })
            })
            .collect()
    }
}
