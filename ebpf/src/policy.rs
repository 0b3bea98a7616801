//! The decision for a frame to an LB address, when the address has `VIP_ENFORCE`: TCP, UDP
//! and SCTP pass to served ports (from the port's source ranges, when it has some); ICMP
//! echo and the errors path-MTU discovery needs pass; a later fragment passes from the
//! address's fragment ranges; everything else is dropped, counted by reason. An address
//! without `VIP_ENFORCE` is only counted.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    btf_maps::{LpmTrie, lpm_trie::Key},
    macros::btf_map,
    programs::XdpContext,
};
use lbagent_common::{RangeKeyV4, RangeKeyV6, VIP_ENFORCE, maps::MAX_RANGES};

use crate::{
    counters::{self, AddressCounters, DropReason},
    lookup::{self, Packet},
    parse::{self, ICMP, IPV4_LEN, IPV6_LEN, LATER_FRAGMENT, OTHER, PORTS, TRUNCATED, Transport},
};

#[btf_map]
pub static LB_RANGES_V4: LpmTrie<RangeKeyV4, u8, { MAX_RANGES as usize }> = LpmTrie::new();

#[btf_map]
pub static LB_RANGES_V6: LpmTrie<RangeKeyV6, u8, { MAX_RANGES as usize }> = LpmTrie::new();

/// Counts the frame for its address, judges it, counts a drop by its reason, and returns
/// the verdict.
#[inline(always)]
pub fn enforce(ctx: &XdpContext, packet: Packet) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let Some(counters) = AddressCounters::of(packet.slot) else {
        return XDP_PASS;
    };
    counters.received(len);
    let Some((flags, fragment_ranges)) = lookup::vip_policy(packet.slot) else {
        return XDP_PASS;
    };
    let transport = parse::transport(ctx, &packet.ip);
    match judge(ctx, &packet, transport, flags, fragment_ranges, len) {
        Ok(()) => XDP_PASS,
        Err(reason) => {
            counters.dropped(reason);
            XDP_DROP
        }
    }
}

#[inline(always)]
fn judge(
    ctx: &XdpContext,
    packet: &Packet,
    transport: Transport,
    flags: u8,
    fragment_ranges: u32,
    len: u64,
) -> Result<(), DropReason> {
    let enforce = flags & VIP_ENFORCE != 0;
    match transport.class {
        PORTS => match lookup::served_port(packet.slot, transport.protocol, transport.port) {
            Some((slot, ranges)) => {
                if ranges != 0 && !in_ranges(ctx, ranges, packet) {
                    return Err(DropReason::Source);
                }
                counters::port_received(slot, len);
                Ok(())
            }
            None if enforce => Err(DropReason::Port),
            None => Ok(()),
        },
        ICMP => {
            if !enforce || icmp_allowed(!packet.ip.v6, transport.kind, transport.code) {
                Ok(())
            } else {
                Err(DropReason::Icmp)
            }
        }
        LATER_FRAGMENT => {
            if fragment_ranges != 0 && !in_ranges(ctx, fragment_ranges, packet) {
                Err(DropReason::Source)
            } else {
                Ok(())
            }
        }
        OTHER if enforce => Err(DropReason::Protocol),
        TRUNCATED if enforce => Err(DropReason::Malformed),
        _ => Ok(()),
    }
}

/// Echo, and what path-MTU discovery needs: IPv4 "fragmentation needed" (3/4), IPv6
/// "packet too big" (2).
#[inline(always)]
pub fn icmp_allowed(v4: bool, kind: u8, code: u8) -> bool {
    if v4 {
        matches!((kind, code), (0, _) | (8, _) | (3, 4))
    } else {
        matches!(kind, 128 | 129 | 2)
    }
}

/// Whether the frame's source is in range set `set`. The source is read here, not earlier:
/// only packets to ports with ranges pay for it.
#[inline(always)]
fn in_ranges(ctx: &XdpContext, set: u32, packet: &Packet) -> bool {
    let set = set.to_be_bytes();
    if packet.ip.v6 {
        let Some(ip) = parse::bytes_at::<IPV6_LEN>(ctx, packet.ip.l3) else {
            return false;
        };
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&ip[8..24]);
        LB_RANGES_V6
            .get(&Key::new(160, RangeKeyV6 { set, addr }))
            .is_some()
    } else {
        let Some(ip) = parse::bytes_at::<IPV4_LEN>(ctx, packet.ip.l3) else {
            return false;
        };
        let addr = [ip[12], ip[13], ip[14], ip[15]];
        LB_RANGES_V4
            .get(&Key::new(64, RangeKeyV4 { set, addr }))
            .is_some()
    }
}
