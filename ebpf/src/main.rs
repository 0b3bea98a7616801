//! lbagent's XDP ingress program.
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
//!
//! IP fragments: the first one carries the transport header and is judged by its port like
//! any packet; later ones carry no ports, so they are judged by address and source only
//! (against the union of the address's source ranges). A frame too short to read an IP
//! header is not ours to judge and passes.
//!
//! Nothing here logs: aya-log would put a ring-buffer write (a call) and a few hundred
//! verifier instructions on the packet path. The counters say what happened.
// Host builds (`cargo test --workspace`) compile this crate too; only the bpf target gets
// the programs' no_std runtime.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

mod neighbour;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    btf_maps::{Array, LpmTrie, PerCpuArray, lpm_trie::Key},
    macros::classifier,
    macros::{btf_map, xdp},
    programs::TcContext,
    programs::XdpContext,
};
use lbagent_common::{
    BUCKET_WAYS, Bucket, FAMILY_V4, FAMILY_V6, PortConfig, PortStats, RangeKeyV4, RangeKeyV6,
    VIP_ENFORCE, VipConfig, VipStats, buckets_of, halves,
    maps::{MAX_PORTS, MAX_RANGES, MAX_VIPS, MMAPABLE, PORT_BUCKETS, VIP_BUCKETS},
    port_key, proto, vip4_key, vip6_key,
};

type Table<const N: usize> = Array<Bucket, N, { MMAPABLE as usize }>;

#[btf_map]
static LB_VIPS_V4: Table<{ VIP_BUCKETS as usize }> = Array::new();

#[btf_map]
static LB_VIPS_V6: Table<{ VIP_BUCKETS as usize }> = Array::new();

#[btf_map]
static LB_VIP_CONFIG: Array<VipConfig, { MAX_VIPS as usize }, { MMAPABLE as usize }> = Array::new();

/// Zeroed by userspace when a slot is taken and when it is freed, so the counters of a
/// removed address are gone, and a new address starts from zero.
#[btf_map]
static LB_VIP_STATS: PerCpuArray<VipStats, { MAX_VIPS as usize }> = PerCpuArray::new();

#[btf_map]
static LB_PORTS: Table<{ PORT_BUCKETS as usize }> = Array::new();

#[btf_map]
static LB_PORT_CONFIG: Array<PortConfig, { MAX_PORTS as usize }, { MMAPABLE as usize }> =
    Array::new();

/// Like `LB_VIP_STATS`, zeroed by userspace with the port slot.
#[btf_map]
static LB_PORT_STATS: PerCpuArray<PortStats, { MAX_PORTS as usize }> = PerCpuArray::new();

#[btf_map]
static LB_RANGES_V4: LpmTrie<RangeKeyV4, u8, { MAX_RANGES as usize }> = LpmTrie::new();

#[btf_map]
static LB_RANGES_V6: LpmTrie<RangeKeyV6, u8, { MAX_RANGES as usize }> = LpmTrie::new();

const ETH_LEN: usize = 14;
const VLAN_LEN: usize = 4;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
/// EtherTypes as the program loads them: big-endian on the wire, read little-endian.
const ETH_IPV4: u16 = 0x0800u16.to_be();
const ETH_IPV6: u16 = 0x86ddu16.to_be();
const ETH_8021Q: u16 = 0x8100u16.to_be();
const ETH_8021AD: u16 = 0x88a8u16.to_be();
/// 802.1Q and 802.1ad tags; two cover the tagged and the QinQ cases.
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up on finding the transport header.
const MAX_EXTENSION_HEADERS: usize = 4;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

/// What the transport header says, as plain integers. (An enum with payloads here let LLVM
/// merge a pointer and a scalar into one register, which the verifier refuses; a small
/// change elsewhere was enough to trigger it.)
#[derive(Clone, Copy)]
struct Transport {
    class: u8,
    protocol: u8,
    /// Destination port, host byte order (`class == PORTS`).
    port: u16,
    /// ICMP type and code (`class == ICMP`).
    kind: u8,
    code: u8,
}

/// TCP, UDP or SCTP, with a destination port.
const PORTS: u8 = 1;
const ICMP: u8 = 2;
/// A fragment after the first: no transport header.
const LATER_FRAGMENT: u8 = 3;
/// Another IP protocol.
const OTHER: u8 = 4;
/// The transport header is cut short.
const TRUNCATED: u8 = 5;

impl Transport {
    #[inline(always)]
    const fn only(class: u8) -> Self {
        Self {
            class,
            protocol: 0,
            port: 0,
            kind: 0,
            code: 0,
        }
    }
}

/// A frame to an LB address, as far as the IP header.
#[derive(Clone, Copy)]
struct Packet {
    slot: u32,
    /// Where the IP header starts.
    l3: usize,
    v6: bool,
    /// Where the transport header is (IPv6: where the extension headers start).
    l4: usize,
    /// IPv4: the protocol; IPv6: the first next-header.
    protocol: u8,
    /// `LATER_FRAGMENT` or `TRUNCATED` when the IPv4 header already decides; else 0.
    decided: u8,
}

#[derive(Clone, Copy)]
enum Drop {
    Port,
    Source,
    Protocol,
    Icmp,
    Malformed,
}

#[xdp]
pub fn lbagent_xdp(ctx: XdpContext) -> u32 {
    let Some((ether_type, l3)) = link_layer(&ctx) else {
        return XDP_PASS;
    };
    if let Some(verdict) = neighbour::respond(&ctx, ether_type, l3) {
        return verdict;
    }
    let Some(packet) = classify(&ctx, ether_type, l3) else {
        return XDP_PASS;
    };
    handle(&ctx, packet)
}

/// The LB address a frame is for, or `None` for everything else: other destinations, other
/// EtherTypes, and frames too short for their IP header.
#[inline(always)]
fn classify(ctx: &XdpContext, ether_type: u16, l3: usize) -> Option<Packet> {
    if ether_type == ETH_IPV4 {
        let ip = ptr_at::<[u8; IPV4_LEN]>(ctx, l3)?;
        // SAFETY: ptr_at checked that the header lies inside the frame.
        let ip = unsafe { &*ip };
        let destination = [ip[16], ip[17], ip[18], ip[19]];
        let key = vip4_key(destination);
        let slot = find(&LB_VIPS_V4, VIP_BUCKETS, key);
        if slot == 0 {
            return None;
        }
        let config = LB_VIP_CONFIG.get_ptr(slot)?;
        // SAFETY: an array value; its first four bytes are the IPv4 address (VipConfig is
        // 8-aligned, and userspace writes the address before it publishes the slot).
        let (address, family) = unsafe { (*(config as *const u32), (*config).family) };
        if u64::from(address) != key || family != FAMILY_V4 {
            return None;
        }
        let header_len = usize::from(ip[0] & 0x0f) * 4;
        let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
        let decided = if header_len < IPV4_LEN {
            TRUNCATED
        } else if fragment_offset != 0 {
            LATER_FRAGMENT
        } else {
            0
        };
        Some(Packet {
            slot,
            l3,
            v6: false,
            l4: l3 + header_len,
            protocol: ip[9],
            decided,
        })
    } else if ether_type == ETH_IPV6 {
        let ip = ptr_at::<[u8; IPV6_LEN]>(ctx, l3)?;
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let mut destination = [0u8; 16];
        destination.copy_from_slice(&ip[24..40]);
        let key = vip6_key(destination);
        let slot = find(&LB_VIPS_V6, VIP_BUCKETS, key);
        if slot == 0 {
            return None;
        }
        let config = LB_VIP_CONFIG.get_ptr(slot)?;
        let (high, low) = halves(destination);
        // SAFETY: an array value; its first sixteen bytes are the address, as two words.
        let (first, second, family) = unsafe {
            let words = config as *const u64;
            (*words, *words.add(1), (*config).family)
        };
        if first != high || second != low || family != FAMILY_V6 {
            return None;
        }
        Some(Packet {
            slot,
            l3,
            v6: true,
            l4: l3 + IPV6_LEN,
            protocol: ip[6],
            decided: 0,
        })
    } else {
        None
    }
}

/// The EtherType (as loaded, see `ETH_IPV4`) and the offset of the IP header, past up to
/// two VLAN tags.
#[inline(always)]
fn link_layer(ctx: &XdpContext) -> Option<(u16, usize)> {
    let eth = ptr_at::<[u8; ETH_LEN]>(ctx, 0)?;
    // SAFETY: bounds checked by ptr_at.
    let mut ether_type = unsafe { u16::from_le_bytes([(*eth)[12], (*eth)[13]]) };
    let mut offset = ETH_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_8021Q && ether_type != ETH_8021AD {
            break;
        }
        let tag = ptr_at::<[u8; VLAN_LEN]>(ctx, offset)?;
        // SAFETY: bounds checked by ptr_at.
        ether_type = unsafe { u16::from_le_bytes([(*tag)[2], (*tag)[3]]) };
        offset += VLAN_LEN;
    }
    Some((ether_type, offset))
}

/// The slot `key` names in `table`, or 0. Each of the two candidate buckets is one cache
/// line; the loops unroll into straight compares.
#[inline(always)]
fn find<const N: usize>(table: &Table<N>, buckets: u32, key: u64) -> u32 {
    let (first, second) = buckets_of(key, buckets);
    for index in [first, second] {
        let Some(bucket) = table.get_ptr(index) else {
            continue;
        };
        for way in 0..BUCKET_WAYS {
            // SAFETY: an array value in bounds; userspace writes each field as one aligned
            // store, and the caller checks the slot's configuration before trusting it.
            let (entry_key, slot) = unsafe {
                let entry = &(*bucket).ways[way];
                (
                    core::ptr::read_volatile(&entry.key),
                    core::ptr::read_volatile(&entry.slot),
                )
            };
            if entry_key == key && slot != 0 {
                return slot;
            }
        }
    }
    0
}

#[inline(always)]
fn handle(ctx: &XdpContext, packet: Packet) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let Some(stats) = LB_VIP_STATS.get_ptr_mut(packet.slot) else {
        return XDP_PASS;
    };
    // SAFETY: per-CPU value, so this CPU is its only writer while the program runs.
    unsafe {
        (*stats).packets += 1;
        (*stats).bytes += len;
    }
    let Some(config) = LB_VIP_CONFIG.get_ptr(packet.slot) else {
        return XDP_PASS;
    };
    // SAFETY: an array value; flags and fragment_ranges are each read once.
    let (flags, fragment_ranges) = unsafe {
        (
            core::ptr::read_volatile(&(*config).flags),
            core::ptr::read_volatile(&(*config).fragment_ranges),
        )
    };
    let transport = resolve(ctx, &packet);
    match judge(ctx, &packet, transport, flags, fragment_ranges, len) {
        Ok(()) => XDP_PASS,
        Err(reason) => {
            // SAFETY: as above.
            unsafe {
                match reason {
                    Drop::Port => (*stats).drop_port += 1,
                    Drop::Source => (*stats).drop_source += 1,
                    Drop::Protocol => (*stats).drop_protocol += 1,
                    Drop::Icmp => (*stats).drop_icmp += 1,
                    Drop::Malformed => (*stats).drop_malformed += 1,
                }
            }
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
) -> Result<(), Drop> {
    let enforce = flags & VIP_ENFORCE != 0;
    match transport.class {
        PORTS => {
            let key = port_key(packet.slot, transport.protocol, transport.port);
            let slot = find(&LB_PORTS, PORT_BUCKETS, key);
            let ranges = LB_PORT_CONFIG.get_ptr(slot).and_then(|config| {
                // SAFETY: an array value; its first word is the slot's port key.
                let (served, ranges) = unsafe {
                    (
                        *(config as *const u64),
                        core::ptr::read_volatile(&(*config).ranges),
                    )
                };
                (slot != 0 && served == key).then_some(ranges)
            });
            match ranges {
                Some(ranges) => {
                    if ranges != 0 && !in_ranges(ctx, ranges, packet) {
                        return Err(Drop::Source);
                    }
                    if let Some(stats) = LB_PORT_STATS.get_ptr_mut(slot) {
                        // SAFETY: per-CPU value, this CPU is its only writer.
                        unsafe {
                            (*stats).packets += 1;
                            (*stats).bytes += len;
                        }
                    }
                    Ok(())
                }
                None if enforce => Err(Drop::Port),
                None => Ok(()),
            }
        }
        ICMP => {
            if !enforce || icmp_allowed(!packet.v6, transport.kind, transport.code) {
                Ok(())
            } else {
                Err(Drop::Icmp)
            }
        }
        LATER_FRAGMENT => {
            if fragment_ranges != 0 && !in_ranges(ctx, fragment_ranges, packet) {
                Err(Drop::Source)
            } else {
                Ok(())
            }
        }
        OTHER if enforce => Err(Drop::Protocol),
        TRUNCATED if enforce => Err(Drop::Malformed),
        _ => Ok(()),
    }
}

/// Echo, and what path-MTU discovery needs: IPv4 "fragmentation needed" (3/4), IPv6
/// "packet too big" (2).
#[inline(always)]
fn icmp_allowed(v4: bool, kind: u8, code: u8) -> bool {
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
    if packet.v6 {
        let Some(ip) = ptr_at::<[u8; IPV6_LEN]>(ctx, packet.l3) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        let ip = unsafe { &*ip };
        let mut addr = [0u8; 16];
        addr.copy_from_slice(&ip[8..24]);
        LB_RANGES_V6
            .get(&Key::new(160, RangeKeyV6 { set, addr }))
            .is_some()
    } else {
        let Some(ip) = ptr_at::<[u8; IPV4_LEN]>(ctx, packet.l3) else {
            return false;
        };
        // SAFETY: bounds checked by ptr_at.
        let addr = unsafe { [(*ip)[12], (*ip)[13], (*ip)[14], (*ip)[15]] };
        LB_RANGES_V4
            .get(&Key::new(64, RangeKeyV4 { set, addr }))
            .is_some()
    }
}

/// The transport of an LB packet: IPv4 reads it at once; IPv6 walks the extension headers
/// first.
#[inline(always)]
fn resolve(ctx: &XdpContext, packet: &Packet) -> Transport {
    if packet.decided != 0 {
        return Transport::only(packet.decided);
    }
    if !packet.v6 {
        return transport(ctx, packet.l4, packet.protocol, proto::ICMP);
    }
    let mut next = packet.protocol;
    let mut offset = packet.l4;
    for _ in 0..MAX_EXTENSION_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH => {
                let current = next;
                let Some(header) = ptr_at::<[u8; 2]>(ctx, offset) else {
                    return Transport::only(TRUNCATED);
                };
                // SAFETY: bounds checked by ptr_at.
                let [following, len] = unsafe { *header };
                next = following;
                offset += if current == IPV6_AUTH {
                    (usize::from(len) + 2) * 4
                } else {
                    (usize::from(len) + 1) * 8
                };
            }
            IPV6_FRAGMENT => {
                let Some(header) = ptr_at::<[u8; 8]>(ctx, offset) else {
                    return Transport::only(TRUNCATED);
                };
                // SAFETY: bounds checked by ptr_at.
                let header = unsafe { *header };
                next = header[0];
                offset += 8;
                if u16::from_be_bytes([header[2], header[3]]) >> 3 != 0 {
                    return Transport::only(LATER_FRAGMENT);
                }
            }
            _ => break,
        }
    }
    transport(ctx, offset, next, proto::ICMPV6)
}

/// The transport header at `offset`: ports for TCP, UDP and SCTP (all three keep the
/// destination port in bytes 2-3), type and code for ICMP.
#[inline(always)]
fn transport(ctx: &XdpContext, offset: usize, protocol: u8, icmp: u8) -> Transport {
    if protocol == proto::TCP || protocol == proto::UDP || protocol == proto::SCTP {
        match ptr_at::<[u8; 4]>(ctx, offset) {
            Some(ports) => {
                // SAFETY: bounds checked by ptr_at.
                let ports = unsafe { *ports };
                Transport {
                    class: PORTS,
                    protocol,
                    port: u16::from_be_bytes([ports[2], ports[3]]),
                    kind: 0,
                    code: 0,
                }
            }
            None => Transport::only(TRUNCATED),
        }
    } else if protocol == icmp {
        match ptr_at::<[u8; 2]>(ctx, offset) {
            Some(header) => {
                // SAFETY: bounds checked by ptr_at.
                let [kind, code] = unsafe { *header };
                Transport {
                    class: ICMP,
                    protocol,
                    port: 0,
                    kind,
                    code,
                }
            }
            None => Transport::only(TRUNCATED),
        }
    } else {
        Transport::only(OTHER)
    }
}

/// The benchmarks' baseline for what the neighbour responder adds: `lbagent_xdp` without it.
#[xdp]
pub fn lbagent_xdp_no_l2(ctx: XdpContext) -> u32 {
    let Some((ether_type, l3)) = link_layer(&ctx) else {
        return XDP_PASS;
    };
    let Some(packet) = classify(&ctx, ether_type, l3) else {
        return XDP_PASS;
    };
    handle(&ctx, packet)
}

/// The benchmarks' baseline: the cheapest program the same toolchain builds. The agent never
/// loads it (nor the two below).
#[xdp]
pub fn lbagent_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// The benchmarks' cheapest drop, on the receiving side.
#[xdp]
pub fn lbagent_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}

/// The benchmarks' traffic generator: run through BPF_PROG_TEST_RUN in live-frames mode on
/// one end of a veth pair, it sends each test frame out of that end, into the peer's receive
/// path.
#[xdp]
pub fn lbagent_tx(_ctx: XdpContext) -> u32 {
    XDP_TX
}

/// TC_ACT_UNSPEC: this program only counts; the next one (or the default) decides.
const TC_NEXT: i32 = -1;

/// Counts frames leaving from an LB address (the replies), into the address's `tx_*`.
#[classifier]
pub fn lbagent_egress(ctx: TcContext) -> i32 {
    let _ = count_egress(&ctx);
    TC_NEXT
}

#[inline(always)]
fn count_egress(ctx: &TcContext) -> Result<(), ()> {
    // bpf_skb_load_bytes: works whether or not the headers are in the linear part.
    let mut ether_type: u16 = ctx.load(12).map_err(|_| ())?;
    let mut offset = ETH_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_8021Q && ether_type != ETH_8021AD {
            break;
        }
        ether_type = ctx.load(offset + 2).map_err(|_| ())?;
        offset += VLAN_LEN;
    }
    let slot = if ether_type == ETH_IPV4 {
        let source: [u8; 4] = ctx.load(offset + 12).map_err(|_| ())?;
        let key = vip4_key(source);
        let slot = find(&LB_VIPS_V4, VIP_BUCKETS, key);
        let config = LB_VIP_CONFIG.get_ptr(slot).ok_or(())?;
        // SAFETY: as in `classify`.
        let (address, family) = unsafe { (*(config as *const u32), (*config).family) };
        if u64::from(address) != key || family != FAMILY_V4 {
            return Ok(());
        }
        slot
    } else if ether_type == ETH_IPV6 {
        let source: [u8; 16] = ctx.load(offset + 8).map_err(|_| ())?;
        let slot = find(&LB_VIPS_V6, VIP_BUCKETS, vip6_key(source));
        let config = LB_VIP_CONFIG.get_ptr(slot).ok_or(())?;
        let (high, low) = halves(source);
        // SAFETY: as in `classify`.
        let (first, second, family) = unsafe {
            let words = config as *const u64;
            (*words, *words.add(1), (*config).family)
        };
        if first != high || second != low || family != FAMILY_V6 {
            return Ok(());
        }
        slot
    } else {
        return Ok(());
    };
    if slot == 0 {
        return Ok(());
    }
    if let Some(stats) = LB_VIP_STATS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value, so this CPU is its only writer while the program runs.
        unsafe {
            (*stats).tx_packets += 1;
            (*stats).tx_bytes += u64::from(ctx.len());
        }
    }
    Ok(())
}

/// The one bounds check every header read goes through.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
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
