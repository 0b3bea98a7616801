//! Types and constants shared by lbagent's eBPF programs and its userspace.
//!
//! Everything here crosses the kernel boundary as raw bytes, so every type is `#[repr(C)]`
//! with its padding spelled out as named fields (a hash map hashes every byte of its key:
//! implicit padding would make equal keys differ). Multi-byte addresses are kept in network
//! byte order, exactly as they appear in the packet, so neither side swaps bytes.
#![no_std]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Version of the layout of the pinned maps. Pins live in `<pin root>/v<N>/`, so a new layout
/// never opens a map written by an older program. Bump it whenever a key or value changes.
pub const PIN_LAYOUT_VERSION: u32 = 2;

/// Name of the XDP ingress program (the kernel keeps the first 15 bytes).
pub const XDP_PROGRAM: &str = "lbagent_xdp";

/// Name of the tc egress program, which counts what leaves from LB addresses.
pub const TC_EGRESS_PROGRAM: &str = "lbagent_egress";

/// Map names, as the eBPF object declares them and as they are pinned.
pub mod maps {
    /// `VipKey -> VipConfig`: the load-balancer addresses the dataplane handles.
    pub const VIPS: &str = "LB_VIPS";
    /// `VipKey -> VipStats`, per CPU: traffic seen for each address, and drops by reason.
    pub const VIP_STATS: &str = "LB_VIP_STATS";
    /// `PortKey -> PortPolicy`: the ports and protocols each address serves.
    pub const PORTS: &str = "LB_PORTS";
    /// `PortKey -> PortStats`, per CPU: traffic to each served port.
    pub const PORT_STATS: &str = "LB_PORT_STATS";
    /// LPM trie `RangeKeyV4 -> u8`: the source ranges of each range set, IPv4.
    pub const RANGES_V4: &str = "LB_RANGES_V4";
    /// LPM trie `RangeKeyV6 -> u8`: the source ranges of each range set, IPv6.
    pub const RANGES_V6: &str = "LB_RANGES_V6";
    /// Capacity of the address maps.
    pub const MAX_VIPS: u32 = 16_384;
    /// Capacity of the port maps.
    pub const MAX_PORTS: u32 = 65_536;
    /// Capacity of each range trie.
    pub const MAX_RANGES: u32 = 65_536;
}

/// `VipConfig::flags`: only the ports and protocols in `LB_PORTS` pass (plus ICMP echo and the
/// ICMP errors path-MTU discovery needs); everything else to the address is dropped.
pub const VIP_ENFORCE: u32 = 1;

/// IP protocol numbers the program knows.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// Address family tag of a [`VipKey`].
pub const FAMILY_V4: u8 = 4;
/// Address family tag of a [`VipKey`].
pub const FAMILY_V6: u8 = 6;

/// A load-balancer address as a map key.
///
/// `addr` is in network byte order. An IPv4 address fills `addr[..4]` and leaves the rest zero;
/// `family` keeps it distinct from any IPv6 address with the same leading bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

impl VipKey {
    pub const fn v4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[0] = octets[0];
        addr[1] = octets[1];
        addr[2] = octets[2];
        addr[3] = octets[3];
        Self {
            family: FAMILY_V4,
            _pad: [0; 3],
            addr,
        }
    }

    pub const fn v6(octets: [u8; 16]) -> Self {
        Self {
            family: FAMILY_V6,
            _pad: [0; 3],
            addr: octets,
        }
    }

    /// The address this key stands for, or `None` for a key no valid writer produces.
    pub fn ip(&self) -> Option<IpAddr> {
        match self.family {
            FAMILY_V4 => {
                let [a, b, c, d, ..] = self.addr;
                Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
            }
            FAMILY_V6 => Some(IpAddr::V6(Ipv6Addr::from(self.addr))),
            _ => None,
        }
    }
}

impl From<IpAddr> for VipKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::v4(v4.octets()),
            IpAddr::V6(v6) => Self::v6(v6.octets()),
        }
    }
}

/// What the dataplane knows about one address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipConfig {
    /// [`VIP_ENFORCE`], or 0: count only, pass everything.
    pub flags: u32,
    /// Range set that the source of a non-first IP fragment (which carries no ports) must be
    /// in; 0: any source. Userspace sets the union of the address's services' ranges.
    pub fragment_ranges: u32,
}

/// Traffic seen for one address on one CPU. Bytes count whole frames, link header included.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipStats {
    /// Frames received for the address (XDP), dropped ones included.
    pub packets: u64,
    pub bytes: u64,
    /// Frames sent from the address (tc egress).
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Drops by reason: a port or protocol the address does not serve...
    pub drop_port: u64,
    /// ...a source outside the service's `loadBalancerSourceRanges`...
    pub drop_source: u64,
    /// ...an IP protocol other than TCP, UDP, SCTP and ICMP...
    pub drop_protocol: u64,
    /// ...an ICMP type other than echo and the path-MTU errors...
    pub drop_icmp: u64,
    /// ...or transport headers cut short, which cannot be judged.
    pub drop_malformed: u64,
}

/// An (address, protocol, port) as a map key. `port` is in host byte order (the program
/// swaps it once when it parses the header); `addr` in network byte order as in [`VipKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub family: u8,
    pub protocol: u8,
    pub port: u16,
    pub addr: [u8; 16],
}

impl PortKey {
    pub fn new(vip: VipKey, protocol: u8, port: u16) -> Self {
        Self {
            family: vip.family,
            protocol,
            port,
            addr: vip.addr,
        }
    }
}

/// What one served port asks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortPolicy {
    /// Range set the source must be in; 0: any source.
    pub ranges: u32,
}

/// Traffic to one served port on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    pub packets: u64,
    pub bytes: u64,
}

/// Data of an IPv4 source-range trie key: the range set, then the address. The set comes
/// first and in network byte order so that the trie matches it as the first 32 bits: a key
/// for prefix `p` of set `s` has prefix length `32 + p`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeKeyV4 {
    pub set: [u8; 4],
    pub addr: [u8; 4],
}

/// As [`RangeKeyV4`], for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeKeyV6 {
    pub set: [u8; 4],
    pub addr: [u8; 16],
}

const _: () = {
    assert!(core::mem::size_of::<VipKey>() == 20);
    assert!(core::mem::align_of::<VipKey>() == 1);
    assert!(core::mem::size_of::<VipConfig>() == 8);
    assert!(core::mem::size_of::<VipStats>() == 72);
    assert!(core::mem::size_of::<PortKey>() == 20);
    assert!(core::mem::size_of::<PortPolicy>() == 4);
    assert!(core::mem::size_of::<PortStats>() == 16);
    assert!(core::mem::size_of::<RangeKeyV4>() == 8);
    assert!(core::mem::size_of::<RangeKeyV6>() == 20);
};

#[cfg(feature = "user")]
mod pod {
    use super::{
        PortKey, PortPolicy, PortStats, RangeKeyV4, RangeKeyV6, VipConfig, VipKey, VipStats,
    };

    // SAFETY: repr(C), built only from integers and byte arrays, no implicit padding (the
    // size assertions above pin the layout), so every bit pattern is a valid value.
    unsafe impl aya::Pod for VipKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VipConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VipStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortPolicy {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RangeKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RangeKeyV6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_key_round_trips_and_zero_fills() {
        let ip: IpAddr = Ipv4Addr::new(203, 0, 113, 10).into();
        let key = VipKey::from(ip);
        assert_eq!(key.family, FAMILY_V4);
        assert_eq!(&key.addr[..4], &[203, 0, 113, 10]);
        assert!(key.addr[4..].iter().all(|b| *b == 0));
        assert_eq!(key.ip(), Some(ip));
    }

    #[test]
    fn v6_key_round_trips() {
        let ip: IpAddr = "2001:db8:ff::10".parse::<Ipv6Addr>().unwrap().into();
        let key = VipKey::from(ip);
        assert_eq!(key.family, FAMILY_V6);
        assert_eq!(key.ip(), Some(ip));
    }

    #[test]
    fn v4_and_v6_with_same_leading_bytes_differ() {
        let v4 = VipKey::v4([32, 1, 13, 184]);
        let mut v6_bytes = [0u8; 16];
        v6_bytes[..4].copy_from_slice(&[32, 1, 13, 184]);
        assert_ne!(v4, VipKey::v6(v6_bytes));
    }

    #[test]
    fn unknown_family_has_no_address() {
        let key = VipKey {
            family: 0,
            _pad: [0; 3],
            addr: [0; 16],
        };
        assert_eq!(key.ip(), None);
    }
}
