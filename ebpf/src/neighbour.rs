//! The ARP and IPv6 neighbour-discovery responder for local addresses.
//!
//! A local address lies inside a subnet of the node's interfaces, so the hosts on that
//! segment find it by asking (ARP request, neighbour solicitation), and exactly one node must
//! answer. Userspace elects that node and writes each local address into `LB_NEIGHBOURS`:
//! on the owner with role ANSWER (the program answers itself with `XDP_TX`, from the
//! interface's MAC), on every other node with role SILENT (the request is dropped, so the
//! kernel cannot answer either, even for an address kube-proxy put on kube-ipvs0).
//!
//! Replies and advertisements from another hardware address for an address this node
//! answers for are counted as `foreign`: two nodes answer (split brain). They pass on to the
//! kernel untouched.
//!
//! Frames that are neither ARP nor ICMPv6 cost two compares of values already loaded: the
//! map is only looked into for ARP and neighbour-discovery messages. A neighbour-discovery
//! message about an address that is not in the map goes on to the rest of the program, which
//! judges it like any ICMPv6 (the reference model of `tests/src/model.rs` says the same).
//!
//! Not checked: the ICMPv6 checksum of a solicitation (the kernel would drop a damaged one;
//! an answer to it costs one frame and tells nothing false).

use aya_ebpf::{
    EbpfContext as _,
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    btf_maps::{Array, HashMap, PerCpuHashMap},
    helpers::generated::{bpf_ktime_get_ns, bpf_xdp_adjust_tail},
    macros::btf_map,
    programs::XdpContext,
};
use lbagent_common::{
    NEIGHBOUR_ANSWER, NEIGHBOUR_HANDOVER, NEIGHBOUR_SILENT, NeighbourEntry, NeighbourKey,
    NeighbourStats,
    maps::{MAX_NEIGHBOURS, NEIGHBOUR_LEASE_LEAVING},
    proto,
};

use crate::parse::{ETH_IPV6, ETH_LEN, IPV6_LEN, LinkLayer, ptr_at};

#[btf_map]
pub static LB_NEIGHBOURS: HashMap<NeighbourKey, NeighbourEntry, { MAX_NEIGHBOURS as usize }> =
    HashMap::new();

#[btf_map]
pub static LB_NEIGHBOUR_STATS: PerCpuHashMap<
    NeighbourKey,
    NeighbourStats,
    { MAX_NEIGHBOURS as usize },
> = PerCpuHashMap::new();

/// Until when this node may answer (`CLOCK_MONOTONIC` ns); 0: always. See
/// `lbagent_common::maps::NEIGHBOUR_LEASE`.
#[btf_map]
pub static LB_NEIGHBOUR_LEASE: Array<u64, 1> = Array::new();

/// The ARP EtherType as loaded (see [`crate::parse::ETH_IPV4`]).
pub const ETH_ARP: u16 = 0x0806u16.to_be();

const ARP_LEN: usize = 28;
/// A neighbour advertisement with one option (the target's link-layer address).
const NA_LEN: usize = 32;
/// A solicitation without options.
const NS_MIN_LEN: u16 = 24;

const ARP_REQUEST: u8 = 1;
const ARP_REPLY: u8 = 2;
const ND_SOLICIT: u8 = 135;
const ND_ADVERT: u8 = 136;
const ND_OPT_TARGET_LL: u8 = 2;
/// NA flags: solicited, override.
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;
/// Hop limit every neighbour-discovery message carries (RFC 4861 section 7.1).
const ND_HOP_LIMIT: u8 = 255;

/// The verdict for a neighbour-discovery frame, or `None` when the frame is something else
/// (and the rest of the program judges it).
#[inline(always)]
pub fn respond(ctx: &XdpContext, link: LinkLayer) -> Option<u32> {
    let LinkLayer { ether_type, l3 } = link;
    if ether_type == ETH_ARP {
        Some(arp(ctx, l3))
    } else if ether_type == ETH_IPV6 {
        let ip = ptr_at::<[u8; IPV6_LEN]>(ctx, l3)?;
        // SAFETY: bounds checked by ptr_at.
        if unsafe { (*ip)[6] } != proto::ICMPV6 {
            return None;
        }
        ndp(ctx, l3)
    } else {
        None
    }
}

#[inline(always)]
fn arp(ctx: &XdpContext, l3: usize) -> u32 {
    let Some(packet) = ptr_at_mut::<[u8; ARP_LEN]>(ctx, l3) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at_mut; the program is the frame's only user.
    let packet = unsafe { &mut *packet };
    // Ethernet hardware, IPv4 protocol, 6- and 4-byte addresses.
    if packet[..6] != [0, 1, 8, 0, 6, 4] || packet[6] != 0 {
        return XDP_PASS;
    }
    let operation = packet[7];
    let sender_mac = [
        packet[8], packet[9], packet[10], packet[11], packet[12], packet[13],
    ];
    let sender = [packet[14], packet[15], packet[16], packet[17]];
    let target = [packet[24], packet[25], packet[26], packet[27]];
    if operation == ARP_REPLY || (operation == ARP_REQUEST && sender == target) {
        // An answer, or a gratuitous announcement: someone claims `sender`.
        note_claim(NeighbourKey::v4(sender), sender_mac);
        return XDP_PASS;
    }
    if operation != ARP_REQUEST {
        return XDP_PASS;
    }
    let key = NeighbourKey::v4(target);
    let Some(entry) = decide(ctx, &key) else {
        return XDP_PASS;
    };
    if entry.role == NEIGHBOUR_SILENT {
        return XDP_DROP;
    }
    let Some(eth) = ptr_at_mut::<[u8; 12]>(ctx, 0) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at_mut.
    let eth = unsafe { &mut *eth };
    // To the asker, from us; the ARP payload says the same.
    eth.copy_within(6..12, 0);
    eth[6..12].copy_from_slice(&entry.mac);
    packet[7] = ARP_REPLY;
    packet[18..24].copy_from_slice(&sender_mac);
    packet[24..28].copy_from_slice(&sender);
    packet[8..14].copy_from_slice(&entry.mac);
    packet[14..18].copy_from_slice(&target);
    count(&key, |stats| stats.answered += 1);
    XDP_TX
}

#[inline(always)]
fn ndp(ctx: &XdpContext, l3: usize) -> Option<u32> {
    let ip = ptr_at::<[u8; IPV6_LEN + NS_MIN_LEN as usize]>(ctx, l3)?;
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let kind = ip[IPV6_LEN];
    if kind != ND_SOLICIT && kind != ND_ADVERT {
        return None;
    }
    let mut target = [0u8; 16];
    target.copy_from_slice(&ip[IPV6_LEN + 8..IPV6_LEN + 24]);
    let key = NeighbourKey::v6(target);
    // About an address that is not a local LB address: the rest of the program judges it
    // as any ICMPv6 message.
    LB_NEIGHBOURS.get_ptr(key)?;
    // Extension headers are not walked: neighbour discovery never carries them.
    if ip[7] != ND_HOP_LIMIT || ip[IPV6_LEN + 1] != 0 {
        return Some(XDP_PASS);
    }
    let eth = ptr_at::<[u8; ETH_LEN]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let asker_mac = unsafe {
        let eth = &*eth;
        [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]]
    };
    if kind == ND_ADVERT {
        note_claim(key, asker_mac);
        return Some(XDP_PASS);
    }
    if target[0] == 0xff || u16::from_be_bytes([ip[4], ip[5]]) < NS_MIN_LEN {
        return Some(XDP_PASS);
    }
    let mut asker = [0u8; 16];
    asker.copy_from_slice(&ip[8..24]);
    let entry = decide(ctx, &key)?;
    if entry.role == NEIGHBOUR_SILENT {
        return Some(XDP_DROP);
    }
    // From the unspecified address (duplicate address detection) the asker has no address
    // yet: the answer goes to all nodes, unsolicited (RFC 4861 section 7.2.4).
    let dad = asker == [0; 16];
    let (destination, destination_mac, flags) = if dad {
        let mut all_nodes = [0u8; 16];
        all_nodes[0] = 0xff;
        all_nodes[1] = 0x02;
        all_nodes[15] = 1;
        (all_nodes, [0x33, 0x33, 0, 0, 0, 1], NA_OVERRIDE)
    } else {
        (asker, asker_mac, NA_SOLICITED | NA_OVERRIDE)
    };

    let mut reply = [0u8; IPV6_LEN + NA_LEN];
    reply[0] = 0x60;
    reply[5] = NA_LEN as u8;
    reply[6] = proto::ICMPV6;
    reply[7] = ND_HOP_LIMIT;
    reply[8..24].copy_from_slice(&target);
    reply[24..40].copy_from_slice(&destination);
    reply[IPV6_LEN] = ND_ADVERT;
    reply[IPV6_LEN + 4] = flags;
    reply[IPV6_LEN + 8..IPV6_LEN + 24].copy_from_slice(&target);
    reply[IPV6_LEN + 24] = ND_OPT_TARGET_LL;
    reply[IPV6_LEN + 25] = 1;
    reply[IPV6_LEN + 26..IPV6_LEN + 32].copy_from_slice(&entry.mac);
    let checksum = icmpv6_checksum(&reply).to_be_bytes();
    reply[IPV6_LEN + 2] = checksum[0];
    reply[IPV6_LEN + 3] = checksum[1];

    // The solicitation may be shorter (no option) or longer (a nonce, padding) than the
    // advertisement: make the frame exactly as long as the answer.
    let wanted = (l3 + IPV6_LEN + NA_LEN) as i64;
    let delta = wanted - (ctx.data_end() - ctx.data()) as i64;
    if delta != 0 {
        // SAFETY: a helper call on this program's own context.
        if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr().cast(), delta as i32) } != 0 {
            return Some(XDP_PASS);
        }
    }
    let eth = ptr_at_mut::<[u8; 12]>(ctx, 0)?;
    let packet = ptr_at_mut::<[u8; IPV6_LEN + NA_LEN]>(ctx, l3)?;
    // SAFETY: bounds checked by ptr_at_mut, after the resize.
    unsafe {
        let eth = &mut *eth;
        eth[..6].copy_from_slice(&destination_mac);
        eth[6..].copy_from_slice(&entry.mac);
        *packet = reply;
    }
    count(&key, |stats| stats.answered += 1);
    Some(XDP_TX)
}

/// The entry for an address asked about, with the decision taken for the request: `None`
/// when the address is not a local LB address (the kernel handles it). An answering entry
/// whose request came in on another interface is returned as silent.
#[inline(always)]
fn decide(ctx: &XdpContext, key: &NeighbourKey) -> Option<NeighbourEntry> {
    // SAFETY: a map value, read once by copy; userspace replaces entries whole.
    let mut entry = unsafe { *LB_NEIGHBOURS.get_ptr(key)? };
    let elsewhere = entry.ifindex != 0 && entry.ifindex as usize != ctx.ingress_ifindex();
    if !answers(entry.role) || elsewhere || lapsed() {
        entry.role = NEIGHBOUR_SILENT;
        count(key, |stats| stats.silenced += 1);
    }
    Some(entry)
}

/// Whether an entry in `role` answers requests: its owner's, or its old owner's until the
/// successor claims it.
#[inline(always)]
fn answers(role: u8) -> bool {
    role == NEIGHBOUR_ANSWER || role == NEIGHBOUR_HANDOVER
}

/// Whether the membership's lease on answering has run out (its process is frozen or
/// gone, so the other nodes are about to take the addresses over).
#[inline(always)]
fn lapsed() -> bool {
    let until = lease();
    // SAFETY: a helper without arguments.
    until != 0 && unsafe { bpf_ktime_get_ns() } > until
}

/// Whether the membership is leaving the cluster: each address is handed over when another
/// node claims it.
#[inline(always)]
fn leaving() -> bool {
    lease() & NEIGHBOUR_LEASE_LEAVING != 0
}

#[inline(always)]
fn lease() -> u64 {
    let Some(until) = LB_NEIGHBOUR_LEASE.get_ptr(0) else {
        return 0;
    };
    // SAFETY: an array value, read once; userspace writes it as one aligned 8-byte store.
    unsafe { core::ptr::read_volatile(until) }
}

/// Someone with hardware address `mac` claims the address `key`: counted when this node
/// answers for it from another address. While this node leaves, or hands this address over,
/// that claim is its successor taking over: this node falls silent for the address right
/// then.
#[inline(always)]
fn note_claim(key: NeighbourKey, mac: [u8; 6]) {
    let Some(pointer) = LB_NEIGHBOURS.get_ptr_mut(key) else {
        return;
    };
    // SAFETY: a map value, read by copy.
    let entry = unsafe { *pointer };
    if !answers(entry.role) || entry.mac == mac {
        return;
    }
    if entry.role == NEIGHBOUR_HANDOVER {
        // The successor's claim, expected: not split brain.
        // SAFETY: a map value; one byte stored, which readers take whole.
        unsafe { (*pointer).role = NEIGHBOUR_SILENT };
        return;
    }
    count(&key, |stats| {
        stats.foreign += 1;
        stats.foreign_mac = mac;
    });
    if leaving() {
        // SAFETY: a map value; one byte stored, which readers take whole.
        unsafe { (*pointer).role = NEIGHBOUR_SILENT };
    }
}

#[inline(always)]
fn count(key: &NeighbourKey, update: impl FnOnce(&mut NeighbourStats)) {
    if let Some(stats) = LB_NEIGHBOUR_STATS.get_ptr_mut(key) {
        // SAFETY: per-CPU value, so this CPU is its only writer while the program runs.
        update(unsafe { &mut *stats });
    }
}

/// The ICMPv6 checksum of an IPv6 packet whose checksum field is zero: the one's-complement
/// sum over the pseudo-header (source, destination, upper-layer length, next header) and
/// the message.
#[inline(always)]
fn icmpv6_checksum(packet: &[u8; IPV6_LEN + NA_LEN]) -> u16 {
    let mut sum: u32 = NA_LEN as u32 + u32::from(proto::ICMPV6);
    let mut i = 8;
    while i < IPV6_LEN + NA_LEN {
        sum += u32::from(u16::from_be_bytes([packet[i], packet[i + 1]]));
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// [`ptr_at`], writable: the responder rewrites the request into its answer.
#[inline(always)]
fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}
