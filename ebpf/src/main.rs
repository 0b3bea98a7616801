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
use lbagent_ebpf::{egress, lookup, neighbour, parse, policy};

#[xdp]
pub fn lbagent_xdp(ctx: XdpContext) -> u32 {
    let Some(link) = parse::link_layer(&ctx) else {
        return XDP_PASS;
    };
    if let Some(verdict) = neighbour::respond(&ctx, link) {
        return verdict;
    }
    let Some(packet) = lookup::destination(&ctx, link) else {
        return XDP_PASS;
    };
    policy::enforce(&ctx, packet)
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
