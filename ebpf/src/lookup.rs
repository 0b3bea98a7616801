//! Finding an address's or a served port's slot: a bucket table maps a key to a slot, and
//! the slot's configuration repeats the key, which is checked before the slot is trusted.
//! Before the tables, a filter of counters settles most non-LB frames with one lookup.
//! Every map here is an array, which the verifier turns into inline code (no call).

use aya_ebpf::{btf_maps::Array, macros::btf_map, programs::XdpContext};
use lbagent_common::{
    BUCKET_WAYS, Bucket, FAMILY_V4, FAMILY_V6, PortConfig, VipConfig, buckets_of, filter_index,
    maps::{MAX_PORTS, MAX_VIPS, MMAPABLE, PORT_BUCKETS, VIP_BUCKETS, VIP_FILTER_ENTRIES},
    port_key, vip6_key_of_halves,
};

use crate::parse::{
    ETH_IPV4, ETH_IPV6, IPV4_LEN, IPV6_LEN, IpLayout, LinkLayer, bytes_at, ipv4_layout, ipv6_layout,
};

pub type Table<const N: usize> = Array<Bucket, N, { MMAPABLE as usize }>;

#[btf_map]
pub static LB_VIPS_V4: Table<{ VIP_BUCKETS as usize }> = Array::new();

#[btf_map]
pub static LB_VIPS_V6: Table<{ VIP_BUCKETS as usize }> = Array::new();

#[btf_map]
pub static LB_VIP_CONFIG: Array<VipConfig, { MAX_VIPS as usize }, { MMAPABLE as usize }> =
    Array::new();

/// How many configured addresses share each filter index: 0 is a sure miss, found with one
/// array lookup (most frames on an interface are not for an LB address).
#[btf_map]
pub static LB_VIP_FILTER: Array<u64, { VIP_FILTER_ENTRIES as usize }, { MMAPABLE as usize }> =
    Array::new();

#[btf_map]
pub static LB_PORTS: Table<{ PORT_BUCKETS as usize }> = Array::new();

#[btf_map]
pub static LB_PORT_CONFIG: Array<PortConfig, { MAX_PORTS as usize }, { MMAPABLE as usize }> =
    Array::new();

/// A frame to an LB address: the address's slot, and where the frame's IP parts are.
#[derive(Clone, Copy)]
pub struct Packet {
    pub slot: u32,
    pub ip: IpLayout,
}

/// The LB address a frame is for, or `None` for everything else: other destinations, other
/// EtherTypes, and frames too short for their IP header.
#[inline(always)]
pub fn destination(ctx: &XdpContext, link: LinkLayer) -> Option<Packet> {
    if link.ether_type == ETH_IPV4 {
        destination_v4(ctx, link.l3)
    } else if link.ether_type == ETH_IPV6 {
        destination_v6(bytes_at::<IPV6_LEN>(ctx, link.l3)?, link.l3)
    } else {
        None
    }
}

/// [`destination`] of an IPv4 frame whose IP header starts at `l3`.
#[inline(always)]
pub fn destination_v4(ctx: &XdpContext, l3: usize) -> Option<Packet> {
    let ip = bytes_at::<IPV4_LEN>(ctx, l3)?;
    let slot = vip4_slot(u32::from_le_bytes([ip[16], ip[17], ip[18], ip[19]]))?;
    Some(Packet {
        slot,
        ip: ipv4_layout(ip, l3),
    })
}

/// [`destination`] of an IPv6 frame whose fixed header, already bounds-checked, is `ip`,
/// at `l3`. The filter looks at the address's last four bytes (one load) before the two
/// halves are read, so a non-LB frame reads no more of the address than an IPv4 one.
#[inline(always)]
pub fn destination_v6(ip: &[u8; IPV6_LEN], l3: usize) -> Option<Packet> {
    if !may_be_vip(u32::from_le_bytes([ip[36], ip[37], ip[38], ip[39]])) {
        return None;
    }
    let slot = vip6_slot_filtered(word_at(ip, 24), word_at(ip, 32))?;
    Some(Packet {
        slot,
        ip: ipv6_layout(ip, l3),
    })
}

/// The eight bytes of `ip` at `offset` as one little-endian word (one load).
#[inline(always)]
fn word_at(ip: &[u8; IPV6_LEN], offset: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&ip[offset..offset + 8]);
    u64::from_le_bytes(word)
}

/// Whether an LB address may end in `tail` (its last four bytes, loaded little-endian):
/// `false` is sure. Userspace counts an address in before its table entry exists, and out
/// after the entry is gone.
#[inline(always)]
fn may_be_vip(tail: u32) -> bool {
    // SAFETY: an array value in bounds; userspace writes it as one aligned store.
    LB_VIP_FILTER
        .get_ptr(filter_index(tail))
        .is_some_and(|count| unsafe { core::ptr::read_volatile(count) } != 0)
}

/// The slot of IPv4 LB address `address` (its four bytes loaded little-endian).
#[inline(always)]
pub fn vip4_slot(address: u32) -> Option<u32> {
    if !may_be_vip(address) {
        return None;
    }
    let key = u64::from(address);
    let slot = find(&LB_VIPS_V4, VIP_BUCKETS, key);
    if slot == 0 {
        return None;
    }
    let config = LB_VIP_CONFIG.get_ptr(slot)?;
    // SAFETY: an array value; its first four bytes are the IPv4 address (VipConfig is
    // 8-aligned, and userspace writes the address before it publishes the slot).
    let (held, family) = unsafe { (*(config as *const u32), (*config).family) };
    (held == address && family == FAMILY_V4).then_some(slot)
}

/// The slot of an IPv6 LB address given as its two halves, loaded little-endian.
#[inline(always)]
pub fn vip6_slot(high: u64, low: u64) -> Option<u32> {
    if !may_be_vip((low >> 32) as u32) {
        return None;
    }
    vip6_slot_filtered(high, low)
}

/// [`vip6_slot`] once the filter has said the address may be an LB one.
#[inline(always)]
fn vip6_slot_filtered(high: u64, low: u64) -> Option<u32> {
    let slot = find(&LB_VIPS_V6, VIP_BUCKETS, vip6_key_of_halves(high, low));
    if slot == 0 {
        return None;
    }
    let config = LB_VIP_CONFIG.get_ptr(slot)?;
    // SAFETY: an array value; its first sixteen bytes are the address, as two words.
    let (first, second, family) = unsafe {
        let words = config as *const u64;
        (*words, *words.add(1), (*config).family)
    };
    (first == high && second == low && family == FAMILY_V6).then_some(slot)
}

/// The policy of the address in `slot`: its flags and the range set for later fragments.
#[inline(always)]
pub fn vip_policy(slot: u32) -> Option<(u8, u32)> {
    let config = LB_VIP_CONFIG.get_ptr(slot)?;
    // SAFETY: an array value; flags and fragment_ranges are each read once.
    Some(unsafe {
        (
            core::ptr::read_volatile(&(*config).flags),
            core::ptr::read_volatile(&(*config).fragment_ranges),
        )
    })
}

/// The slot and range set of the port `protocol`/`port` served on the address in `vip_slot`,
/// or `None` when the address does not serve it.
#[inline(always)]
pub fn served_port(vip_slot: u32, protocol: u8, port: u16) -> Option<(u32, u32)> {
    let key = port_key(vip_slot, protocol, port);
    let slot = find(&LB_PORTS, PORT_BUCKETS, key);
    let config = LB_PORT_CONFIG.get_ptr(slot)?;
    // SAFETY: an array value; its first word is the slot's port key.
    let (served, ranges) = unsafe {
        (
            *(config as *const u64),
            core::ptr::read_volatile(&(*config).ranges),
        )
    };
    (slot != 0 && served == key).then_some((slot, ranges))
}

/// The slot `key` names in `table`, or 0. Each of the two candidate buckets is one cache
/// line; the loops unroll into straight compares.
#[inline(always)]
pub fn find<const N: usize>(table: &Table<N>, buckets: u32, key: u64) -> u32 {
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
