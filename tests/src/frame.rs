//! Hand-built Ethernet frames for BPF_PROG_TEST_RUN cases.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_8021Q: u16 = 0x8100;
pub const ETHERTYPE_8021AD: u16 = 0x88a8;

const IPPROTO_UDP: u8 = 17;

/// A frame under construction: Ethernet, then optional VLAN tags, then the L3 payload.
#[derive(Clone, Debug)]
pub struct Frame {
    tags: Vec<(u16, u16)>,
    ether_type: u16,
    l3: Vec<u8>,
}

/// IPv4 header details beyond the addresses.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ipv4Options {
    /// 32-bit words of options (IHL = 5 + this).
    pub option_words: u8,
    /// Fragment offset in 8-byte units.
    pub fragment_offset: u16,
    pub more_fragments: bool,
}

/// An IPv6 extension header.
#[derive(Clone, Copy, Debug)]
pub enum Ext {
    HopByHop,
    Routing,
    DestOpts,
    /// Offset in 8-byte units.
    Fragment {
        offset: u16,
        more: bool,
    },
}

/// A TCP header (20 bytes, SYN) to `port`.
pub fn tcp(port: u16) -> Vec<u8> {
    let mut h = vec![0x9c, 0x40];
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    h
}

/// A UDP header to `port` with `payload` bytes of data.
pub fn udp(port: u16, payload: usize) -> Vec<u8> {
    let len = (8 + payload) as u16;
    let mut h = vec![0x9c, 0x40];
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.resize(len as usize, 0xab);
    h
}

/// An SCTP common header (12 bytes) to `port`.
pub fn sctp(port: u16) -> Vec<u8> {
    let mut h = vec![0x9c, 0x40];
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&[0; 8]);
    h
}

/// An ICMP or ICMPv6 header (8 bytes).
pub fn icmp(kind: u8, code: u8) -> Vec<u8> {
    vec![kind, code, 0, 0, 0, 1, 0, 1]
}

impl Frame {
    /// IPv4 + UDP to `dst` port 80, with `payload` bytes of data.
    pub fn udp4(src: Ipv4Addr, dst: Ipv4Addr, payload: usize) -> Self {
        Self::ipv4(
            src,
            dst,
            IPPROTO_UDP,
            &udp(80, payload),
            Ipv4Options::default(),
        )
    }

    /// IPv6 + UDP to `dst` port 80, with `payload` bytes of data.
    pub fn udp6(src: Ipv6Addr, dst: Ipv6Addr, payload: usize) -> Self {
        Self::ipv6(src, dst, &[], IPPROTO_UDP, &udp(80, payload))
    }

    /// IPv4 carrying `l4` as `protocol`.
    pub fn ipv4(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        protocol: u8,
        l4: &[u8],
        options: Ipv4Options,
    ) -> Self {
        let header_len = 20 + 4 * usize::from(options.option_words);
        let total = (header_len + l4.len()) as u16;
        let mut flags = options.fragment_offset & 0x1fff;
        if options.more_fragments {
            flags |= 0x2000;
        }
        let mut ip = vec![0x40 | (5 + options.option_words), 0];
        ip.extend_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&[0, 1]);
        ip.extend_from_slice(&flags.to_be_bytes());
        ip.extend_from_slice(&[64, protocol, 0, 0]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        // Options: NOPs.
        ip.resize(header_len, 1);
        let checksum = ipv4_checksum(&ip);
        ip[10..12].copy_from_slice(&checksum.to_be_bytes());
        ip.extend_from_slice(l4);
        Self {
            tags: Vec::new(),
            ether_type: ETHERTYPE_IPV4,
            l3: ip,
        }
    }

    /// IPv6 with extension headers `ext` in order, then `l4` as `protocol`.
    pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, ext: &[Ext], protocol: u8, l4: &[u8]) -> Self {
        let number = |e: &Ext| match e {
            Ext::HopByHop => 0u8,
            Ext::Routing => 43,
            Ext::DestOpts => 60,
            Ext::Fragment { .. } => 44,
        };
        let mut chain = Vec::new();
        for (i, e) in ext.iter().enumerate() {
            let next = ext.get(i + 1).map_or(protocol, number);
            match e {
                Ext::Fragment { offset, more } => {
                    let field = (offset << 3) | u16::from(*more);
                    chain.extend_from_slice(&[next, 0]);
                    chain.extend_from_slice(&field.to_be_bytes());
                    chain.extend_from_slice(&[0, 0, 0, 7]);
                }
                // 8 bytes: next header, length 0 (one unit), then padding options.
                _ => chain.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
            }
        }
        let first = ext.first().map_or(protocol, number);
        let payload_len = (chain.len() + l4.len()) as u16;
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&payload_len.to_be_bytes());
        ip.extend_from_slice(&[first, 64]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        ip.extend_from_slice(&chain);
        ip.extend_from_slice(l4);
        Self {
            tags: Vec::new(),
            ether_type: ETHERTYPE_IPV6,
            l3: ip,
        }
    }

    /// An ARP request: neither IPv4 nor IPv6.
    pub fn arp() -> Self {
        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
        arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 10, 0, 0, 1]);
        arp.extend_from_slice(&[0, 0, 0, 0, 0, 0, 10, 0, 0, 2]);
        Self {
            tags: Vec::new(),
            ether_type: ETHERTYPE_ARP,
            l3: arp,
        }
    }

    /// Adds a VLAN tag (outermost first) with the given TPID (0x8100 or 0x88a8).
    pub fn tagged(mut self, tpid: u16, vlan: u16) -> Self {
        self.tags.push((tpid, vlan));
        self
    }

    /// Offset of the L3 header in the finished frame.
    pub fn l3_offset(&self) -> usize {
        14 + 4 * self.tags.len()
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
        let mut next = self.tags.iter();
        match next.next() {
            Some((tpid, _)) => frame.extend_from_slice(&tpid.to_be_bytes()),
            None => frame.extend_from_slice(&self.ether_type.to_be_bytes()),
        }
        for (i, (_, vlan)) in self.tags.iter().enumerate() {
            frame.extend_from_slice(&(vlan & 0x0fff).to_be_bytes());
            let inner = self
                .tags
                .get(i + 1)
                .map_or(self.ether_type, |(tpid, _)| *tpid);
            frame.extend_from_slice(&inner.to_be_bytes());
        }
        frame.extend_from_slice(&self.l3);
        frame
    }
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untagged_ipv4_layout() {
        let frame = Frame::udp4(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(203, 0, 113, 10),
            10,
        );
        let bytes = frame.bytes();
        assert_eq!(bytes.len(), 14 + 20 + 8 + 10);
        assert_eq!(&bytes[12..14], &[0x08, 0x00]);
        assert_eq!(&bytes[30..34], &[203, 0, 113, 10]);
        assert_eq!(ipv4_checksum(&bytes[14..34]), 0, "header checksum verifies");
    }

    #[test]
    fn qinq_tags_chain_their_ethertypes() {
        let frame = Frame::udp6(Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, 0)
            .tagged(ETHERTYPE_8021AD, 100)
            .tagged(ETHERTYPE_8021Q, 200);
        let bytes = frame.bytes();
        assert_eq!(frame.l3_offset(), 22);
        assert_eq!(&bytes[12..14], &[0x88, 0xa8]);
        assert_eq!(&bytes[14..16], &100u16.to_be_bytes());
        assert_eq!(&bytes[16..18], &[0x81, 0x00]);
        assert_eq!(&bytes[18..20], &200u16.to_be_bytes());
        assert_eq!(&bytes[20..22], &[0x86, 0xdd]);
        assert_eq!(bytes[22] >> 4, 6);
    }
}
