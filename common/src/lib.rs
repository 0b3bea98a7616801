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
/// A new map does not bump it: the agent creates and pins the maps an older agent's pins
/// lack (see [`maps::ADDED`]), and reuses the rest.
pub const PIN_LAYOUT_VERSION: u32 = 4;

/// Name of the XDP ingress program (the kernel keeps the first 15 bytes).
pub const XDP_PROGRAM: &str = "lbagent_xdp";

/// Name of the tc egress program, which counts what leaves from LB addresses.
pub const TC_EGRESS_PROGRAM: &str = "lbagent_egress";

/// Map names, as the eBPF object declares them and as they are pinned.
///
/// Every map the packet path reads is an array: the kernel turns an array lookup into a few
/// inline instructions, where a hash map lookup is a call, and calls are what a packet pays
/// for most. Addresses and ports are found through bucket tables ([`Bucket`]) that
/// userspace keeps; each names a slot, and the slot indexes the configuration and the
/// per-CPU counters.
pub mod maps {
    /// `Bucket` array: IPv4 address key ([`super::vip4_key`]) -> address slot.
    pub const VIPS_V4: &str = "LB_VIPS_V4";
    /// `Bucket` array: IPv6 address key ([`super::vip6_key`]) -> address slot.
    pub const VIPS_V6: &str = "LB_VIPS_V6";
    /// `VipConfig` array, by address slot: the address and its policy.
    pub const VIP_CONFIG: &str = "LB_VIP_CONFIG";
    /// `VipStats` per-CPU array, by address slot: traffic seen, drops by reason.
    pub const VIP_STATS: &str = "LB_VIP_STATS";
    /// `Bucket` array: port key ([`super::port_key`]) -> port slot.
    pub const PORTS: &str = "LB_PORTS";
    /// `PortConfig` array, by port slot: the served (address, protocol, port) and its policy.
    pub const PORT_CONFIG: &str = "LB_PORT_CONFIG";
    /// `PortStats` per-CPU array, by port slot: traffic to each served port.
    pub const PORT_STATS: &str = "LB_PORT_STATS";
    /// LPM trie `RangeKeyV4 -> u8`: the source ranges of each range set, IPv4.
    pub const RANGES_V4: &str = "LB_RANGES_V4";
    /// LPM trie `RangeKeyV6 -> u8`: the source ranges of each range set, IPv6.
    pub const RANGES_V6: &str = "LB_RANGES_V6";
    /// `u64` array, by [`super::filter_index`]: how many configured addresses (both
    /// families) have that index. A frame whose destination's index holds 0 is not for an
    /// LB address, and passes after this one lookup, without the bucket tables.
    pub const VIP_FILTER: &str = "LB_VIP_FILTER";
    /// Hash `NeighbourKey -> NeighbourEntry`: local addresses and what this node does with
    /// ARP requests and neighbour solicitations for each (answer, or stay silent).
    pub const NEIGHBOURS: &str = "LB_NEIGHBOURS";
    /// Per-CPU hash `NeighbourKey -> NeighbourStats`: what the responder did per address.
    /// Userspace creates each entry (zeroed) with the address; the program only counts.
    pub const NEIGHBOUR_STATS: &str = "LB_NEIGHBOUR_STATS";
    /// `u64` array of one entry: until when (`CLOCK_MONOTONIC`, ns) this node may answer
    /// for the addresses it owns. `lbagent membership` renews it while it runs; a node whose
    /// processes are frozen stops answering once it lapses, before the others (which no
    /// longer hear it) take its addresses over. 0: no lease kept, answer regardless. Bit 0
    /// ([`NEIGHBOUR_LEASE_LEAVING`]) set: the node is leaving.
    pub const NEIGHBOUR_LEASE: &str = "LB_NEIGHBOUR_LEASE";
    /// Set in the lease while `lbagent membership` leaves the cluster (a clean stop): the
    /// program answers for each address until another node claims it (its announcement or
    /// answer), then stops at once, so the successor answers before this node falls silent
    /// and never beside it for longer than the claim takes to arrive.
    pub const NEIGHBOUR_LEASE_LEAVING: u64 = 1;
    /// Maps added after layout version 4 was first released: an agent of that version may
    /// have left pins without them. They are created and pinned beside the reused ones.
    pub const ADDED: [&str; 3] = [NEIGHBOURS, NEIGHBOUR_STATS, NEIGHBOUR_LEASE];
    /// Every map the object declares.
    pub const ALL: [&str; 13] = [
        VIPS_V4,
        VIPS_V6,
        VIP_CONFIG,
        VIP_STATS,
        PORTS,
        PORT_CONFIG,
        PORT_STATS,
        RANGES_V4,
        RANGES_V6,
        VIP_FILTER,
        NEIGHBOURS,
        NEIGHBOUR_STATS,
        NEIGHBOUR_LEASE,
    ];
    /// Capacity of the neighbour maps: local addresses a node can answer for or silence.
    pub const MAX_NEIGHBOURS: u32 = 8_192;
    /// Address slots; slot 0 is never used, so this many minus one addresses fit.
    pub const MAX_VIPS: u32 = 16_384;
    /// Buckets of each address table: four ways each, so a full table is a quarter used.
    pub const VIP_BUCKETS: u32 = 16_384;
    /// Port slots; slot 0 is never used.
    pub const MAX_PORTS: u32 = 65_536;
    /// Buckets of the port table.
    pub const PORT_BUCKETS: u32 = 65_536;
    /// Counters of the address filter: four per address slot, so a full set of addresses
    /// leaves at least three quarters of them at 0.
    pub const VIP_FILTER_ENTRIES: u32 = 65_536;
    /// Capacity of each range trie.
    pub const MAX_RANGES: u32 = 65_536;
    /// `BPF_F_MMAPABLE`: userspace writes the tables and configurations through a shared
    /// mapping, one aligned 8-byte word at a time, so the program never reads a half-written
    /// word (a map update syscall copies bytes, with no such promise).
    pub const MMAPABLE: u32 = 1 << 10;
}

/// `VipConfig::flags`: only the ports and protocols in `LB_PORTS` pass (plus ICMP echo and the
/// ICMP errors path-MTU discovery needs); everything else to the address is dropped.
pub const VIP_ENFORCE: u8 = 1;

/// IP protocol numbers the program knows.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
}

/// Address family tag of a [`VipConfig`].
pub const FAMILY_V4: u8 = 4;
/// Address family tag of a [`VipConfig`].
pub const FAMILY_V6: u8 = 6;

/// One way of a [`Bucket`]: `key` names `slot`. Slot 0 marks a free way.
///
/// An entry is only a pointer: the program checks the slot's configuration, which repeats
/// the key, before using it. So a way caught half-rewritten can only lose a packet's match
/// for the instant of the write, never give it another address's policy.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableEntry {
    pub key: u64,
    pub slot: u32,
    pub _pad: u32,
}

/// Ways per bucket: four 16-byte entries fill one 64-byte cache line.
pub const BUCKET_WAYS: usize = 4;

/// A bucket of an address or port table. A key lives in one of its two candidate buckets
/// ([`buckets_of`]), in any way.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub ways: [TableEntry; BUCKET_WAYS],
}

/// The two candidate buckets of `key` in a table of `buckets` buckets (a power of two):
/// multiply-shift hashing with two odd constants. Two choices keep the fullest bucket short
/// at the tables' load.
#[inline(always)]
pub const fn buckets_of(key: u64, buckets: u32) -> (u32, u32) {
    let shift = 64 - buckets.trailing_zeros();
    let first = key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> shift;
    let second = (key ^ 0x5851_f42d_4c95_7f2d).wrapping_mul(0xc2b2_ae3d_27d4_eb4f) >> shift;
    (first as u32, second as u32)
}

/// The table key of an IPv4 address (its bytes in network order): the four bytes as one
/// little-endian word, which is how the program loads them. Distinct addresses, distinct keys.
#[inline(always)]
pub const fn vip4_key(octets: [u8; 4]) -> u64 {
    u32::from_le_bytes(octets) as u64
}

/// The table key of an IPv6 address: its two 64-bit halves mixed. Within one /64 distinct
/// addresses get distinct keys (each half is multiplied by an odd constant, a bijection);
/// across prefixes a clash is a 2^-64 chance, and userspace refuses it rather than let one
/// address shadow another.
#[inline(always)]
pub const fn vip6_key(octets: [u8; 16]) -> u64 {
    let (high, low) = halves(octets);
    vip6_key_of_halves(high, low)
}

/// [`vip6_key`] of an address given as its [`halves`], as the program loads them.
#[inline(always)]
pub const fn vip6_key_of_halves(high: u64, low: u64) -> u64 {
    high.wrapping_mul(0xff51_afd7_ed55_8ccd) ^ low.wrapping_mul(0xc4ce_b9fe_1a85_ec53)
}

/// The address filter's counter for an address whose last four bytes (all of an IPv4
/// address) are `tail`, loaded as a little-endian word: multiply-shift hashing. Only the
/// tail, so that a non-LB IPv6 frame costs one 4-byte load, like an IPv4 one.
#[inline(always)]
pub const fn filter_index(tail: u32) -> u32 {
    tail.wrapping_mul(0x9e37_79b1) >> (32 - maps::VIP_FILTER_ENTRIES.trailing_zeros())
}

/// [`filter_index`] of an address.
pub const fn filter_index_of(ip: IpAddr) -> u32 {
    let tail = match ip {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(v6) => {
            let [.., a, b, c, d] = v6.octets();
            [a, b, c, d]
        }
    };
    filter_index(u32::from_le_bytes(tail))
}

/// An IPv6 address as the two little-endian words the program compares.
#[inline(always)]
pub const fn halves(octets: [u8; 16]) -> (u64, u64) {
    let [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p] = octets;
    (
        u64::from_le_bytes([a, b, c, d, e, f, g, h]),
        u64::from_le_bytes([i, j, k, l, m, n, o, p]),
    )
}

/// The table key of a served port: the address slot, the port (host byte order) and the
/// protocol, packed as [`PortConfig`]'s first word. Never 0, since slot 0 is never used.
#[inline(always)]
pub const fn port_key(vip_slot: u32, protocol: u8, port: u16) -> u64 {
    vip_slot as u64 | (port as u64) << 32 | (protocol as u64) << 48
}

/// What the dataplane knows about the address in one slot.
///
/// `addr` is in network byte order (IPv4 in the first four bytes, the rest zero). The
/// program matches a frame's destination against it, so a table entry can never send a
/// frame to the wrong slot. The last eight bytes (`family` to `fragment_ranges`) are one
/// word: userspace changes a policy with a single 8-byte store.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipConfig {
    pub addr: [u8; 16],
    /// [`FAMILY_V4`], [`FAMILY_V6`], or 0 for a free slot.
    pub family: u8,
    /// [`VIP_ENFORCE`], or 0: count only, pass everything.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Range set that the source of a non-first IP fragment (which carries no ports) must be
    /// in; 0: any source. Userspace sets the union of the address's services' ranges.
    pub fragment_ranges: u32,
}

impl VipConfig {
    /// The address this slot holds, or `None` for a free slot.
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

    /// The table key of this slot's address, with the table it belongs in.
    pub fn table_key(ip: IpAddr) -> (&'static str, u64) {
        match ip {
            IpAddr::V4(v4) => (maps::VIPS_V4, vip4_key(v4.octets())),
            IpAddr::V6(v6) => (maps::VIPS_V6, vip6_key(v6.octets())),
        }
    }

    pub fn new(ip: IpAddr, flags: u8, fragment_ranges: u32) -> Self {
        let (family, addr) = match ip {
            IpAddr::V4(v4) => {
                let mut addr = [0; 16];
                addr[..4].copy_from_slice(&v4.octets());
                (FAMILY_V4, addr)
            }
            IpAddr::V6(v6) => (FAMILY_V6, v6.octets()),
        };
        Self {
            addr,
            family,
            flags,
            _pad: [0; 2],
            fragment_ranges,
        }
    }
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

/// One served (address, protocol, port), in its port slot. The first eight bytes are the
/// slot's [`port_key`]; the program checks them before using the slot.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortConfig {
    /// Address slot; 0 for a free port slot.
    pub vip: u32,
    /// Host byte order.
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
    /// Range set the source must be in; 0: any source.
    pub ranges: u32,
    pub _pad2: u32,
}

impl PortConfig {
    pub const fn key(&self) -> u64 {
        port_key(self.vip, self.protocol, self.port)
    }
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

/// `NeighbourEntry::role`: this node owns the address and answers for it.
pub const NEIGHBOUR_ANSWER: u8 = 1;
/// `NeighbourEntry::role`: another node owns the address; requests for it are dropped, so
/// that neither this program nor the kernel (which answers for any address it holds, e.g. on
/// kube-ipvs0) answers too.
pub const NEIGHBOUR_SILENT: u8 = 2;
/// `NeighbourEntry::role`: another node has just won the address; this node answers for it
/// until that node claims it (an ARP reply, gratuitous ARP or neighbour advertisement from
/// another hardware address), then the program makes the entry [`NEIGHBOUR_SILENT`] itself.
/// The old owner's side of an ordered handover: no moment without an answerer, and two
/// answerers only for as long as the claim takes to arrive.
pub const NEIGHBOUR_HANDOVER: u8 = 3;

/// Key of the neighbour maps: a local address. `family` is [`FAMILY_V4`] or [`FAMILY_V6`];
/// `addr` is in network byte order, an IPv4 address in its first four bytes and zeros after.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NeighbourKey {
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

impl NeighbourKey {
    pub const fn v4(octets: [u8; 4]) -> Self {
        let [a, b, c, d] = octets;
        Self {
            family: FAMILY_V4,
            _pad: [0; 3],
            addr: [a, b, c, d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }

    pub const fn v6(octets: [u8; 16]) -> Self {
        Self {
            family: FAMILY_V6,
            _pad: [0; 3],
            addr: octets,
        }
    }

    pub fn new(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Self::v4(v4.octets()),
            IpAddr::V6(v6) => Self::v6(v6.octets()),
        }
    }

    /// The address, or `None` for an unknown family.
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

/// What this node does with requests for one local address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NeighbourEntry {
    /// Interface the answers go out of (host byte order); requests arriving on any other
    /// interface are dropped. 0: any interface.
    pub ifindex: u32,
    /// Hardware address the answers carry: the interface's own, as on the wire.
    pub mac: [u8; 6],
    /// [`NEIGHBOUR_ANSWER`], [`NEIGHBOUR_SILENT`] or [`NEIGHBOUR_HANDOVER`].
    pub role: u8,
    pub _pad: u8,
}

/// What the responder did for one local address on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NeighbourStats {
    /// ARP replies and neighbour advertisements sent (`XDP_TX`).
    pub answered: u64,
    /// Requests dropped: another node owns the address, they came in on an interface other
    /// than the owner's, or the answering lease lapsed.
    pub silenced: u64,
    /// ARP replies, gratuitous ARPs or neighbour advertisements for an address this node
    /// answers for, from another hardware address: someone else answers too (split brain).
    pub foreign: u64,
    /// The sender of the last of those, as it appears in the frame.
    pub foreign_mac: [u8; 6],
    pub _pad: [u8; 2],
}

const _: () = {
    assert!(core::mem::size_of::<NeighbourKey>() == 20);
    assert!(core::mem::size_of::<NeighbourEntry>() == 12);
    assert!(core::mem::size_of::<NeighbourStats>() == 32);
    assert!(core::mem::size_of::<TableEntry>() == 16);
    assert!(core::mem::size_of::<Bucket>() == 64);
    assert!(core::mem::size_of::<VipConfig>() == 24);
    assert!(core::mem::align_of::<VipConfig>() == 8);
    assert!(core::mem::size_of::<VipStats>() == 72);
    assert!(core::mem::size_of::<PortConfig>() == 16);
    assert!(core::mem::size_of::<PortStats>() == 16);
    assert!(core::mem::size_of::<RangeKeyV4>() == 8);
    assert!(core::mem::size_of::<RangeKeyV6>() == 20);
    assert!(maps::VIP_BUCKETS.is_power_of_two() && maps::PORT_BUCKETS.is_power_of_two());
    assert!(maps::VIP_FILTER_ENTRIES.is_power_of_two() && maps::VIP_FILTER_ENTRIES <= 1 << 31);
};

#[cfg(feature = "user")]
mod pod {
    use super::{
        Bucket, NeighbourEntry, NeighbourKey, NeighbourStats, PortConfig, PortStats, RangeKeyV4,
        RangeKeyV6, TableEntry, VipConfig, VipStats,
    };

    // SAFETY: repr(C), built only from integers and byte arrays, no implicit padding (the
    // size assertions above pin the layout), so every bit pattern is a valid value.
    unsafe impl aya::Pod for TableEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Bucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VipConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VipStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PortStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RangeKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RangeKeyV6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NeighbourKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NeighbourEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NeighbourStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_config_round_trips_and_zero_fills() {
        let ip: IpAddr = Ipv4Addr::new(203, 0, 113, 10).into();
        let config = VipConfig::new(ip, VIP_ENFORCE, 7);
        assert_eq!(config.family, FAMILY_V4);
        assert_eq!(&config.addr[..4], &[203, 0, 113, 10]);
        assert!(config.addr[4..].iter().all(|b| *b == 0));
        assert_eq!(config.ip(), Some(ip));
        assert_eq!(
            VipConfig::default().ip(),
            None,
            "a free slot has no address"
        );
    }

    #[test]
    fn v6_config_round_trips() {
        let ip: IpAddr = "2001:db8:ff::10".parse::<Ipv6Addr>().unwrap().into();
        assert_eq!(VipConfig::new(ip, 0, 0).ip(), Some(ip));
    }

    #[test]
    fn keys_are_what_the_program_loads() {
        // The program reads the four address bytes as one little-endian word.
        assert_eq!(vip4_key([203, 0, 113, 10]), 0x0a71_00cb);
        let (high, low) = halves([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
        assert_eq!(high, 0x0807_0605_0403_0201);
        assert_eq!(low, 0x100f_0e0d_0c0b_0a09);
        // PortConfig's first word, as the program loads it, is the port key.
        let config = PortConfig {
            vip: 9,
            port: 443,
            protocol: proto::TCP,
            ..Default::default()
        };
        let mut word = [0u8; 8];
        word[..4].copy_from_slice(&config.vip.to_le_bytes());
        word[4..6].copy_from_slice(&config.port.to_le_bytes());
        word[6] = config.protocol;
        assert_eq!(u64::from_le_bytes(word), config.key());
    }

    #[test]
    fn filter_indexes_are_in_range_and_spread_over_consecutive_addresses() {
        let mut seen = [0u8; maps::VIP_FILTER_ENTRIES as usize];
        for i in 0..4096u32 {
            let v4 = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let v6 = IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i)));
            for ip in [v4, v6] {
                let index = filter_index_of(ip);
                assert!(index < maps::VIP_FILTER_ENTRIES);
                seen[index as usize] = seen[index as usize].saturating_add(1);
            }
            // The program's view: the last four bytes as loaded, little-endian.
            assert_eq!(
                filter_index_of(v4),
                filter_index(u32::from_le_bytes((0x0a00_0000 + i).to_be_bytes()))
            );
        }
        // Equal tails share an index; otherwise 4096 tails land on distinct counters.
        assert!(seen.iter().all(|count| *count <= 2));
    }

    #[test]
    fn neighbour_keys_round_trip_and_zero_fill() {
        let v4: IpAddr = Ipv4Addr::new(10, 0, 0, 10).into();
        let key = NeighbourKey::new(v4);
        assert_eq!(key.family, FAMILY_V4);
        assert_eq!(&key.addr[..4], &[10, 0, 0, 10]);
        assert!(key.addr[4..].iter().all(|b| *b == 0));
        assert_eq!(key.ip(), Some(v4));
        let v6: IpAddr = "fd00::10".parse::<Ipv6Addr>().unwrap().into();
        assert_eq!(NeighbourKey::new(v6).ip(), Some(v6));
        assert_eq!(NeighbourKey::default().ip(), None);
    }

    #[test]
    fn v6_keys_differ_within_a_prefix() {
        let base = u128::from("2001:db8::".parse::<Ipv6Addr>().unwrap());
        let mut keys: [u64; 4096] = [0; 4096];
        for (i, key) in keys.iter_mut().enumerate() {
            *key = vip6_key((base + i as u128).to_be_bytes());
        }
        keys.sort_unstable();
        assert!(keys.windows(2).all(|w| w[0] != w[1]));
    }

    #[test]
    fn buckets_are_in_range_and_spread() {
        let mut load = [0u32; 1024];
        for i in 0..4096u32 {
            let (a, b) = buckets_of(vip4_key((0x0a00_0000 + i).to_be_bytes()), 1024);
            assert!(a < 1024 && b < 1024);
            load[a as usize] += 1;
        }
        // 4 per bucket on average from one /20: no bucket anywhere near a pile-up.
        assert!(load.iter().all(|n| *n <= 16), "{:?}", load.iter().max());
    }
}
