//! The per-CPU counters, by address slot and by port slot. Userspace zeroes a slot's
//! counters when it takes the slot and when it frees it, so a removed address's counters
//! are gone and a new one starts from zero.

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use lbagent_common::{
    PortStats, VipStats,
    maps::{MAX_PORTS, MAX_VIPS},
};

#[btf_map]
pub static LB_VIP_STATS: PerCpuArray<VipStats, { MAX_VIPS as usize }> = PerCpuArray::new();

#[btf_map]
pub static LB_PORT_STATS: PerCpuArray<PortStats, { MAX_PORTS as usize }> = PerCpuArray::new();

/// Why a frame to an LB address was dropped; each has its counter in [`VipStats`].
#[derive(Clone, Copy)]
pub enum DropReason {
    Port,
    Source,
    Protocol,
    Icmp,
    Malformed,
}

/// This CPU's counters of one address.
pub struct AddressCounters(*mut VipStats);

impl AddressCounters {
    #[inline(always)]
    pub fn of(slot: u32) -> Option<Self> {
        LB_VIP_STATS.get_ptr_mut(slot).map(Self)
    }

    /// A frame of `len` bytes arrived for the address.
    #[inline(always)]
    pub fn received(&self, len: u64) {
        // SAFETY: per-CPU value, so this CPU is its only writer while the program runs.
        unsafe {
            (*self.0).packets += 1;
            (*self.0).bytes += len;
        }
    }

    /// A frame of `len` bytes left from the address.
    #[inline(always)]
    pub fn transmitted(&self, len: u64) {
        // SAFETY: as in `received`.
        unsafe {
            (*self.0).tx_packets += 1;
            (*self.0).tx_bytes += len;
        }
    }

    #[inline(always)]
    pub fn dropped(&self, reason: DropReason) {
        // SAFETY: as in `received`.
        unsafe {
            match reason {
                DropReason::Port => (*self.0).drop_port += 1,
                DropReason::Source => (*self.0).drop_source += 1,
                DropReason::Protocol => (*self.0).drop_protocol += 1,
                DropReason::Icmp => (*self.0).drop_icmp += 1,
                DropReason::Malformed => (*self.0).drop_malformed += 1,
            }
        }
    }
}

/// A frame of `len` bytes passed to the served port in `slot`.
#[inline(always)]
pub fn port_received(slot: u32, len: u64) {
    if let Some(stats) = LB_PORT_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value, this CPU is its only writer.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += len;
        }
    }
}
