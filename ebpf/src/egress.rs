//! The tc egress program's part: replies leaving from an LB address are counted into the
//! address's `tx_*`. Headers are read with `bpf_skb_load_bytes`, which works whether or not
//! they are in the linear part of the buffer.

use aya_ebpf::programs::TcContext;

use crate::{
    counters::AddressCounters,
    lookup,
    parse::{ETH_8021AD, ETH_8021Q, ETH_IPV4, ETH_IPV6, ETH_LEN, MAX_VLAN_TAGS, VLAN_LEN},
};

/// Counts the frame if it leaves from an LB address.
#[inline(always)]
pub fn count(ctx: &TcContext) {
    if let Some(slot) = source_slot(ctx)
        && let Some(counters) = AddressCounters::of(slot)
    {
        counters.transmitted(u64::from(ctx.len()));
    }
}

/// The slot of the LB address the frame leaves from, if it does.
#[inline(always)]
fn source_slot(ctx: &TcContext) -> Option<u32> {
    let mut ether_type: u16 = ctx.load(12).ok()?;
    let mut offset = ETH_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_8021Q && ether_type != ETH_8021AD {
            break;
        }
        ether_type = ctx.load(offset + 2).ok()?;
        offset += VLAN_LEN;
    }
    // Loaded as words, so the stack copies are aligned: the verifier refuses a misaligned
    // stack access, and LLVM would otherwise merge byte reads into one.
    if ether_type == ETH_IPV4 {
        lookup::vip4_slot(ctx.load(offset + 12).ok()?)
    } else if ether_type == ETH_IPV6 {
        let [high, low]: [u64; 2] = ctx.load(offset + 8).ok()?;
        lookup::vip6_slot(high, low)
    } else {
        None
    }
}
