//! lbagent's XDP ingress program.
//!
//! Every frame is passed on unchanged; frames addressed to a load-balancer address are also
//! counted. A frame the parser cannot read (truncated, not IP) is never dropped: it is not ours
//! to judge.
// Host builds (`cargo test --workspace`) compile this crate too; only the bpf target gets
// the programs' no_std runtime.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    btf_maps::{HashMap, PerCpuHashMap},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lbagent_common::{VipConfig, VipKey, VipStats, maps::MAX_VIPS};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    vlan::VlanHdr,
};

#[btf_map]
static LB_VIPS: HashMap<VipKey, VipConfig, { MAX_VIPS as usize }> = HashMap::new();

/// Entries are created (zeroed) by userspace together with the address, and deleted with it:
/// the program only ever updates existing entries, so a frame racing a removal cannot
/// resurrect the counters of an address that is gone.
#[btf_map]
static LB_VIP_STATS: PerCpuHashMap<VipKey, VipStats, { MAX_VIPS as usize }> = PerCpuHashMap::new();

/// 802.1Q and 802.1ad tags; two cover the tagged and the QinQ cases.
const MAX_VLAN_TAGS: usize = 2;

#[xdp]
pub fn lbagent_xdp(ctx: XdpContext) -> u32 {
    // An unreadable frame is passed: the kernel's own stack will judge it.
    try_lbagent_xdp(&ctx).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn try_lbagent_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let key = match destination(ctx)? {
        Some(key) => key,
        None => return Ok(XDP_PASS),
    };
    // SAFETY: the reference is only tested for presence and dropped at once; no entry is
    // written through it.
    if unsafe { LB_VIPS.get(key) }.is_none() {
        return Ok(XDP_PASS);
    }
    if let Some(stats) = LB_VIP_STATS.get_ptr_mut(key) {
        let len = (ctx.data_end() - ctx.data()) as u64;
        // SAFETY: per-CPU value, so this CPU is its only writer while the program runs.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += len;
        }
    }
    Ok(XDP_PASS)
}

/// The destination address of an IPv4 or IPv6 frame (behind up to two VLAN tags), `None` for
/// any other ethertype, `Err` when the headers are cut short.
#[inline(always)]
fn destination(ctx: &XdpContext) -> Result<Option<VipKey>, ()> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked the header lies inside the frame.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut offset = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != EtherType::Ieee8021q as u16 && ether_type != EtherType::Ieee8021ad as u16 {
            break;
        }
        let vlan: *const VlanHdr = ptr_at(ctx, offset)?;
        // SAFETY: bounds checked by ptr_at.
        ether_type = unsafe { (*vlan).ether_type };
        offset += VlanHdr::LEN;
    }
    if ether_type == EtherType::Ipv4 as u16 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, offset)?;
        // SAFETY: bounds checked by ptr_at.
        Ok(Some(VipKey::v4(unsafe { (*ip).dst_addr })))
    } else if ether_type == EtherType::Ipv6 as u16 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, offset)?;
        // SAFETY: bounds checked by ptr_at.
        Ok(Some(VipKey::v6(unsafe { (*ip).dst_addr })))
    } else {
        Ok(None)
    }
}

/// The one bounds check every header read goes through.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, ()> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return Err(());
    }
    Ok((start + offset) as *const T)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists to satisfy no_std.
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
