//! lbagent's XDP ingress program.
//!
//! Frames not addressed to a load-balancer address pass after one hash lookup. Frames to one
//! are counted, then judged by the address's policy (filled by the reconciler): the served
//! ports and protocols pass, with their source ranges; ICMP echo and the ICMP errors that
//! path-MTU discovery needs pass; everything else is dropped and counted by reason.
//!
//! IP fragments: the first one carries the transport header and is judged by its port like
//! any packet; later ones carry no ports, so they are judged by address and source only
//! (against the union of the address's source ranges). A frame too short to read an IP
//! header is not ours to judge and passes.
// Host builds (`cargo test --workspace`) compile this crate too; only the bpf target gets
// the programs' no_std runtime.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    btf_maps::{HashMap, LpmTrie, PerCpuHashMap, lpm_trie::Key},
    macros::classifier,
    macros::{btf_map, xdp},
    programs::TcContext,
    programs::XdpContext,
};
use lbagent_common::{
    FAMILY_V4, PortKey, PortPolicy, PortStats, RangeKeyV4, RangeKeyV6, VIP_ENFORCE, VipConfig,
    VipKey, VipStats,
    maps::{MAX_PORTS, MAX_RANGES, MAX_VIPS},
    proto,
};
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

#[btf_map]
static LB_PORTS: HashMap<PortKey, PortPolicy, { MAX_PORTS as usize }> = HashMap::new();

/// Like `LB_VIP_STATS`, created and deleted by userspace with the port.
#[btf_map]
static LB_PORT_STATS: PerCpuHashMap<PortKey, PortStats, { MAX_PORTS as usize }> =
    PerCpuHashMap::new();

#[btf_map]
static LB_RANGES_V4: LpmTrie<RangeKeyV4, u8, { MAX_RANGES as usize }> = LpmTrie::new();

#[btf_map]
static LB_RANGES_V6: LpmTrie<RangeKeyV6, u8, { MAX_RANGES as usize }> = LpmTrie::new();

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

struct Packet {
    vip: VipKey,
    /// Source address, network byte order; IPv4 in the first four bytes.
    source: [u8; 16],
    /// Where the transport header is, read only once the address turns out to be an LB one:
    /// other traffic pays for the IP header and one lookup, nothing more.
    pending: Pending,
}

#[derive(Clone, Copy)]
struct Pending {
    offset: usize,
    /// IPv4: the protocol; IPv6: the first next-header.
    protocol: u8,
    /// `LATER_FRAGMENT` or `TRUNCATED` when the IPv4 header already decides; else 0.
    decided: u8,
    v6: bool,
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
    // An unreadable frame is passed: the kernel's own stack will judge it.
    try_lbagent_xdp(&ctx).unwrap_or(XDP_PASS)
}

#[inline(always)]
fn try_lbagent_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let Some(packet) = parse(ctx)? else {
        return Ok(XDP_PASS);
    };
    // SAFETY: the value is copied out at once; nothing holds the reference.
    let Some(config) = (unsafe { LB_VIPS.get(packet.vip) }).copied() else {
        return Ok(XDP_PASS);
    };
    let len = (ctx.data_end() - ctx.data()) as u64;
    let stats = LB_VIP_STATS.get_ptr_mut(packet.vip);
    if let Some(stats) = stats {
        // SAFETY: per-CPU value, so this CPU is its only writer while the program runs.
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += len;
        }
    }
    let transport = resolve(ctx, packet.pending);
    match judge(&packet, transport, &config, len) {
        Ok(()) => Ok(XDP_PASS),
        Err(reason) => {
            if let Some(stats) = stats {
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
            }
            Ok(XDP_DROP)
        }
    }
}

#[inline(always)]
fn judge(packet: &Packet, transport: Transport, config: &VipConfig, len: u64) -> Result<(), Drop> {
    let enforce = config.flags & VIP_ENFORCE != 0;
    match transport.class {
        PORTS => {
            let key = PortKey::new(packet.vip, transport.protocol, transport.port);
            // SAFETY: copied out at once.
            match (unsafe { LB_PORTS.get(key) }).copied() {
                Some(policy) => {
                    if policy.ranges != 0 && !in_ranges(policy.ranges, packet) {
                        return Err(Drop::Source);
                    }
                    if let Some(stats) = LB_PORT_STATS.get_ptr_mut(key) {
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
            if !enforce
                || icmp_allowed(
                    packet.vip.family == FAMILY_V4,
                    transport.kind,
                    transport.code,
                )
            {
                Ok(())
            } else {
                Err(Drop::Icmp)
            }
        }
        LATER_FRAGMENT => {
            if config.fragment_ranges != 0 && !in_ranges(config.fragment_ranges, packet) {
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

#[inline(always)]
fn in_ranges(set: u32, packet: &Packet) -> bool {
    let set = set.to_be_bytes();
    if packet.vip.family == FAMILY_V4 {
        let [a, b, c, d, ..] = packet.source;
        let key = Key::new(
            64,
            RangeKeyV4 {
                set,
                addr: [a, b, c, d],
            },
        );
        LB_RANGES_V4.get(&key).is_some()
    } else {
        let key = Key::new(
            160,
            RangeKeyV6 {
                set,
                addr: packet.source,
            },
        );
        LB_RANGES_V6.get(&key).is_some()
    }
}

/// The packet's addresses and transport, `None` for anything but IPv4 and IPv6 (behind up to
/// two VLAN tags), `Err` when the IP header itself is cut short.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Result<Option<Packet>, ()> {
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
        let (vihl, frags, protocol, source, destination) = unsafe {
            (
                (*ip).vihl,
                (*ip).frags,
                (*ip).proto,
                (*ip).src_addr,
                (*ip).dst_addr,
            )
        };
        let header_len = usize::from(vihl & 0x0f) * 4;
        let fragment_offset = u16::from_be_bytes(frags) & 0x1fff;
        let decided = if header_len < Ipv4Hdr::LEN {
            TRUNCATED
        } else if fragment_offset != 0 {
            LATER_FRAGMENT
        } else {
            0
        };
        let pending = Pending {
            offset: offset + header_len,
            protocol,
            decided,
            v6: false,
        };
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&source);
        Ok(Some(Packet {
            vip: VipKey::v4(destination),
            source: src,
            pending,
        }))
    } else if ether_type == EtherType::Ipv6 as u16 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, offset)?;
        // SAFETY: bounds checked by ptr_at.
        let (next, source, destination) =
            unsafe { ((*ip).next_hdr, (*ip).src_addr, (*ip).dst_addr) };
        let pending = Pending {
            offset: offset + Ipv6Hdr::LEN,
            protocol: next,
            decided: 0,
            v6: true,
        };
        Ok(Some(Packet {
            vip: VipKey::v6(destination),
            source,
            pending,
        }))
    } else {
        Ok(None)
    }
}

/// The transport of an LB packet: IPv4 reads it at once; IPv6 walks the extension headers
/// first.
#[inline(always)]
fn resolve(ctx: &XdpContext, pending: Pending) -> Transport {
    if pending.decided != 0 {
        return Transport::only(pending.decided);
    }
    if !pending.v6 {
        return transport(ctx, pending.offset, pending.protocol, proto::ICMP);
    }
    let mut next = pending.protocol;
    let mut offset = pending.offset;
    for _ in 0..MAX_EXTENSION_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH => {
                let current = next;
                let Ok(header) = ptr_at::<[u8; 2]>(ctx, offset) else {
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
                let Ok(header) = ptr_at::<[u8; 8]>(ctx, offset) else {
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
            // SAFETY: bounds checked by ptr_at.
            Ok(ports) => {
                let ports = unsafe { *ports };
                Transport {
                    class: PORTS,
                    protocol,
                    port: u16::from_be_bytes([ports[2], ports[3]]),
                    kind: 0,
                    code: 0,
                }
            }
            Err(()) => Transport::only(TRUNCATED),
        }
    } else if protocol == icmp {
        match ptr_at::<[u8; 2]>(ctx, offset) {
            // SAFETY: bounds checked by ptr_at.
            Ok(header) => {
                let [kind, code] = unsafe { *header };
                Transport {
                    class: ICMP,
                    protocol,
                    port: 0,
                    kind,
                    code,
                }
            }
            Err(()) => Transport::only(TRUNCATED),
        }
    } else {
        Transport::only(OTHER)
    }
}

/// The benchmarks' baseline: the cheapest program the same toolchain builds. The agent never
/// attaches it.
#[xdp]
pub fn lbagent_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
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
    let mut offset = EthHdr::LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != EtherType::Ieee8021q as u16 && ether_type != EtherType::Ieee8021ad as u16 {
            break;
        }
        ether_type = ctx.load(offset + 2).map_err(|_| ())?;
        offset += VlanHdr::LEN;
    }
    let source = if ether_type == EtherType::Ipv4 as u16 {
        VipKey::v4(ctx.load(offset + 12).map_err(|_| ())?)
    } else if ether_type == EtherType::Ipv6 as u16 {
        VipKey::v6(ctx.load(offset + 8).map_err(|_| ())?)
    } else {
        return Ok(());
    };
    if let Some(stats) = LB_VIP_STATS.get_ptr_mut(source) {
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
