//! lbagent's production object: the XDP ingress program and the tc egress counter. Each is an
//! entry point over the crate's modules (see `lib.rs` for the layout).
//!
//! Frames not addressed to a load-balancer address pass after one look into a bucket table.
//! Frames to one are counted, then judged by the address's policy (filled by the reconciler):
//! the served ports and protocols pass, with their source ranges; ICMP echo and the ICMP
//! errors that path-MTU discovery needs pass; everything else is dropped and counted by
//! reason.
//!
//! Cost: every map on the way of an unfiltered packet is an array, which the kernel inlines
//! into a bounds check and an address computation. A hash map lookup is a call into the
//! kernel, and a call costs about 20 ns on a machine with return-thunk mitigations: more
//! than everything else the program does. Only source ranges (an LPM trie) need a call.
// Host builds (`cargo test --workspace`) compile this crate too; only the bpf target gets
// the programs' no_std runtime.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lbagent_common::proto;
use lbagent_ebpf::{
    egress, lookup, neighbour,
    parse::{self, ETH_IPV4, ETH_IPV6, IPV6_LEN},
    policy,
};

#[xdp]
pub fn lbagent_xdp(ctx: XdpContext) -> u32 {
    let Some(link) = parse::link_layer(&ctx) else {
        return XDP_PASS;
    };
    // The responder only ever answers ARP and ICMPv6: an IPv4 frame, or an IPv6 one with
    // another next header, goes straight to the lookup, and an IPv6 header is bounds-checked
    // once for both questions.
    let packet = if link.ether_type == ETH_IPV4 {
        lookup::destination_v4(&ctx, link.l3)
    } else if link.ether_type == ETH_IPV6 {
        let Some(ip) = parse::bytes_at::<IPV6_LEN>(&ctx, link.l3) else {
            return XDP_PASS;
        };
        if ip[6] == proto::ICMPV6 {
            if let Some(verdict) = neighbour::respond(&ctx, link) {
                return verdict;
            }
            // The responder may have moved the frame's end: read the header again.
            parse::bytes_at::<IPV6_LEN>(&ctx, link.l3)
                .and_then(|ip| lookup::destination_v6(ip, link.l3))
        } else {
            lookup::destination_v6(ip, link.l3)
        }
    } else {
        return neighbour::respond(&ctx, link).unwrap_or(XDP_PASS);
    };
    match packet {
        Some(packet) => policy::enforce(&ctx, packet),
        None => XDP_PASS,
    }
}

/// TC_ACT_UNSPEC: this program only counts; the next one (or the default) decides.
const TC_NEXT: i32 = -1;

/// Counts frames leaving from an LB address (the replies), into the address's `tx_*`.
#[classifier]
pub fn lbagent_egress(ctx: TcContext) -> i32 {
    egress::count(&ctx);
    TC_NEXT
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
