//! Reading headers: every read is bounds-checked against the frame by [`ptr_at`], which is
//! what the verifier needs to see before it allows a packet access.
//!
//! IP fragments: the first one carries the transport header and is read like any packet;
//! later ones carry no ports ([`LATER_FRAGMENT`]). A transport header cut short is
//! [`TRUNCATED`]; a frame too short to read an IP header is not an IP frame at all.

use aya_ebpf::programs::XdpContext;
use lbagent_common::proto;

pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
/// EtherTypes as the program loads them: big-endian on the wire, read little-endian.
pub const ETH_IPV4: u16 = 0x0800u16.to_be();
pub const ETH_IPV6: u16 = 0x86ddu16.to_be();
pub const ETH_8021Q: u16 = 0x8100u16.to_be();
pub const ETH_8021AD: u16 = 0x88a8u16.to_be();
/// 802.1Q and 802.1ad tags; two cover the tagged and the QinQ cases.
pub const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers walked before giving up on finding the transport header.
pub const MAX_EXTENSION_HEADERS: usize = 4;

const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;

/// What [`link_layer`] found: the EtherType past the VLAN tags (as loaded, see
/// [`ETH_IPV4`]) and the offset of the header it announces.
#[derive(Clone, Copy)]
pub struct LinkLayer {
    pub ether_type: u16,
    pub l3: usize,
}

/// Where an IP packet's parts are, and what its IP header already decides.
#[derive(Clone, Copy)]
pub struct IpLayout {
    /// Where the IP header starts.
    pub l3: usize,
    pub v6: bool,
    /// Where the transport header is (IPv6: where the extension headers start).
    pub l4: usize,
    /// IPv4: the protocol; IPv6: the first next-header.
    pub protocol: u8,
    /// [`LATER_FRAGMENT`] or [`TRUNCATED`] when the IPv4 header already decides; else 0.
    pub decided: u8,
}

/// What the transport header says, as plain integers. (An enum with payloads here let LLVM
/// merge a pointer and a scalar into one register, which the verifier refuses; a small
/// change elsewhere was enough to trigger it.)
#[derive(Clone, Copy)]
pub struct Transport {
    pub class: u8,
    pub protocol: u8,
    /// Destination port, host byte order (`class == PORTS`).
    pub port: u16,
    /// ICMP type and code (`class == ICMP`).
    pub kind: u8,
    pub code: u8,
}

/// TCP, UDP or SCTP, with a destination port.
pub const PORTS: u8 = 1;
pub const ICMP: u8 = 2;
/// A fragment after the first: no transport header.
pub const LATER_FRAGMENT: u8 = 3;
/// Another IP protocol.
pub const OTHER: u8 = 4;
/// The transport header is cut short.
pub const TRUNCATED: u8 = 5;

impl Transport {
    #[inline(always)]
    pub const fn only(class: u8) -> Self {
        Self {
            class,
            protocol: 0,
            port: 0,
            kind: 0,
            code: 0,
        }
    }
}

/// The one bounds check every header read goes through.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const T)
}

/// `N` bytes of the frame at `offset`, if the frame has them.
#[inline(always)]
pub fn bytes_at<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<&[u8; N]> {
    let bytes = ptr_at::<[u8; N]>(ctx, offset)?;
    // SAFETY: ptr_at checked that the bytes lie inside the frame, which outlives `ctx`.
    Some(unsafe { &*bytes })
}

/// The EtherType and the offset of the header it announces, past up to two VLAN tags.
#[inline(always)]
pub fn link_layer(ctx: &XdpContext) -> Option<LinkLayer> {
    let eth = bytes_at::<ETH_LEN>(ctx, 0)?;
    let mut ether_type = u16::from_le_bytes([eth[12], eth[13]]);
    let mut offset = ETH_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_8021Q && ether_type != ETH_8021AD {
            break;
        }
        let tag = bytes_at::<VLAN_LEN>(ctx, offset)?;
        ether_type = u16::from_le_bytes([tag[2], tag[3]]);
        offset += VLAN_LEN;
    }
    Some(LinkLayer {
        ether_type,
        l3: offset,
    })
}

/// The layout of the IPv4 packet whose fixed header `ip` starts at `l3`: the header length
/// says where the transport header is, and the fragment offset whether there is one.
#[inline(always)]
pub fn ipv4_layout(ip: &[u8; IPV4_LEN], l3: usize) -> IpLayout {
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let fragment_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    let decided = if header_len < IPV4_LEN {
        TRUNCATED
    } else if fragment_offset != 0 {
        LATER_FRAGMENT
    } else {
        0
    };
    IpLayout {
        l3,
        v6: false,
        l4: l3 + header_len,
        protocol: ip[9],
        decided,
    }
}

/// The layout of the IPv6 packet whose fixed header `ip` starts at `l3`; the extension
/// headers are walked later, by [`transport`], and only for LB packets.
#[inline(always)]
pub fn ipv6_layout(ip: &[u8; IPV6_LEN], l3: usize) -> IpLayout {
    IpLayout {
        l3,
        v6: true,
        l4: l3 + IPV6_LEN,
        protocol: ip[6],
        decided: 0,
    }
}

/// The transport of an IP packet: IPv4 reads it at once; IPv6 walks the extension headers
/// first.
#[inline(always)]
pub fn transport(ctx: &XdpContext, ip: &IpLayout) -> Transport {
    if ip.decided != 0 {
        return Transport::only(ip.decided);
    }
    if !ip.v6 {
        return transport_header(ctx, ip.l4, ip.protocol, proto::ICMP);
    }
    let mut next = ip.protocol;
    let mut offset = ip.l4;
    for _ in 0..MAX_EXTENSION_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AUTH => {
                let current = next;
                let Some(&[following, len]) = bytes_at::<2>(ctx, offset) else {
                    return Transport::only(TRUNCATED);
                };
                next = following;
                offset += if current == IPV6_AUTH {
                    (usize::from(len) + 2) * 4
                } else {
                    (usize::from(len) + 1) * 8
                };
            }
            IPV6_FRAGMENT => {
                let Some(&header) = bytes_at::<8>(ctx, offset) else {
                    return Transport::only(TRUNCATED);
                };
                next = header[0];
                offset += 8;
                if u16::from_be_bytes([header[2], header[3]]) >> 3 != 0 {
                    return Transport::only(LATER_FRAGMENT);
                }
            }
            _ => break,
        }
    }
    transport_header(ctx, offset, next, proto::ICMPV6)
}

/// The transport header at `offset`: ports for TCP, UDP and SCTP (all three keep the
/// destination port in bytes 2-3), type and code for ICMP.
#[inline(always)]
fn transport_header(ctx: &XdpContext, offset: usize, protocol: u8, icmp: u8) -> Transport {
    if protocol == proto::TCP || protocol == proto::UDP || protocol == proto::SCTP {
        match bytes_at::<4>(ctx, offset) {
            Some(ports) => Transport {
                class: PORTS,
                protocol,
                port: u16::from_be_bytes([ports[2], ports[3]]),
                kind: 0,
                code: 0,
            },
            None => Transport::only(TRUNCATED),
        }
    } else if protocol == icmp {
        match bytes_at::<2>(ctx, offset) {
            Some(&[kind, code]) => Transport {
                class: ICMP,
                protocol,
                port: 0,
                kind,
                code,
            },
            None => Transport::only(TRUNCATED),
        }
    } else {
        Transport::only(OTHER)
    }
}
