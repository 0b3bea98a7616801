//! lbagent's eBPF programs, one file per concern (the way Cilium's `bpf/lib` is laid out).
//! The programs themselves are thin entry points that read top to bottom as the packet's way
//! through these modules:
//!
//! - [`parse`]: the bounds-checked reads, Ethernet and VLAN tags, IPv4 and IPv6 headers,
//!   the IPv6 extension-header walk and the transport header (ports, ICMP type and code).
//! - [`lookup`]: the bucket tables and configurations that find an address's or a port's
//!   slot, and the check that the slot really holds what the frame names.
//! - [`policy`]: the decision for a frame to an LB address: served ports, source ranges,
//!   fragments, ICMP, and the drop reason.
//! - [`counters`]: the per-CPU counters by address slot and by port slot.
//! - [`egress`]: the tc program's part, counting replies that leave from an LB address.
//! - [`neighbour`]: the ARP and neighbour-discovery responder for local addresses.
//!
//! `src/main.rs` builds the production object that the agent embeds (`lbagent_xdp`,
//! `lbagent_egress`); `src/bench.rs` builds a second object with the benchmarks' reference
//! programs, so nothing the agent loads carries them.
//!
//! ARP is told apart by its EtherType right after [`parse::link_layer`]; neighbour
//! discovery by the IPv6 next header, read from the one bounds check of the IPv6 header that
//! the lookup uses too. Both go to [`neighbour::respond`]; IPv4 and other IPv6 frames go
//! straight to [`lookup`].
//!
//! Nothing here logs: aya-log would put a ring-buffer write (a call) and a few hundred
//! verifier instructions on the packet path. The counters say what happened.
#![no_std]

pub mod counters;
pub mod egress;
pub mod lookup;
pub mod neighbour;
pub mod parse;
pub mod policy;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach this; it exists to satisfy no_std.
    loop {}
}
