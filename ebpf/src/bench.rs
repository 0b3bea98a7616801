//! The benchmarks' reference programs (`cargo xtask bench dataplane`), in an object of their
//! own: the agent never loads them, so its object does not carry them.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    btf_maps::Array,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lbagent_ebpf::{
    lookup,
    parse::{self, ETH_IPV4, ETH_IPV6, IPV4_LEN, IPV6_LEN},
    policy,
};

/// Entries of the floor's table, as many as an address table has buckets (an array lookup costs
/// the same at any size).
const FLOOR_ENTRIES: u32 = 16_384;

#[btf_map]
static LB_FLOOR: Array<u32, { FLOOR_ENTRIES as usize }> = Array::new();

/// The cheapest program the same toolchain builds: the harness's own cost.
#[xdp]
pub fn lbagent_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// The cheapest drop, on the receiving side of the live-frames benchmark.
#[xdp]
pub fn lbagent_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}

/// The live-frames traffic generator: run through BPF_PROG_TEST_RUN in live-frames mode on
/// one end of a veth pair, it sends each test frame out of that end, into the peer's receive
/// path.
#[xdp]
pub fn lbagent_tx(_ctx: XdpContext) -> u32 {
    XDP_TX
}

/// The least any program deciding on a destination address must do: parse Ethernet, the
/// VLAN tags and the IP header (with `lbagent_xdp`'s own parser), then one array lookup by
/// the destination, and nothing else. It does not move between machines the way a trivial
/// program does, so `lbagent_xdp`'s cost for a non-LB packet is reported as a ratio to it.
#[xdp]
pub fn lbagent_floor(ctx: XdpContext) -> u32 {
    let Some(link) = parse::link_layer(&ctx) else {
        return XDP_PASS;
    };
    let index = if link.ether_type == ETH_IPV4 {
        let Some(ip) = parse::bytes_at::<IPV4_LEN>(&ctx, link.l3) else {
            return XDP_PASS;
        };
        u32::from_le_bytes([ip[16], ip[17], ip[18], ip[19]])
    } else if link.ether_type == ETH_IPV6 {
        let Some(ip) = parse::bytes_at::<IPV6_LEN>(&ctx, link.l3) else {
            return XDP_PASS;
        };
        u32::from_le_bytes([ip[36], ip[37], ip[38], ip[39]])
    } else {
        return XDP_PASS;
    };
    match LB_FLOOR.get(index % FLOOR_ENTRIES) {
        Some(&verdict) if verdict != 0 => XDP_DROP,
        _ => XDP_PASS,
    }
}

/// `lbagent_xdp` without the neighbour responder's hook: the baseline of what the responder
/// adds to frames that are not ARP or neighbour discovery (`cargo xtask bench failover`).
#[xdp]
pub fn lbagent_xdp_no_l2(ctx: XdpContext) -> u32 {
    let Some(link) = parse::link_layer(&ctx) else {
        return XDP_PASS;
    };
    let Some(packet) = lookup::destination(&ctx, link) else {
        return XDP_PASS;
    };
    policy::enforce(&ctx, packet)
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
