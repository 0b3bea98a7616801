//! The XDP program's decision written once more, as plain Rust, from the README's description
//! ("What the program does"), to test the real program against (`tests/tests/xdp_model.rs`,
//! `cargo xtask fuzz-model`). It shares no code with the program: where the two disagree on
//! a frame, one of them is wrong.
//!
//! What the README leaves open is decided here and said in the README too: at most two VLAN
//! tags and four IPv6 extension headers are walked; the IP version nibble is not checked (the
//! EtherType says which IP it is); source ranges (a port's, and the fragment ranges) apply
//! whether or not the address enforces its ports.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

/// What the maps say, as the reconciler means it.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub addresses: BTreeMap<IpAddr, Address>,
    /// Range set id -> its ranges.
    pub ranges: BTreeMap<u32, Vec<IpNet>>,
}

#[derive(Clone, Debug, Default)]
pub struct Address {
    pub enforce: bool,
    /// Range set later fragments' sources must be in; 0: any.
    pub fragment_ranges: u32,
    /// (protocol, port) -> range set (0: any source).
    pub ports: BTreeMap<(u8, u16), u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropReason {
    Port,
    Source,
    Protocol,
    Icmp,
    Malformed,
}

/// What one frame does: its verdict, and which counters move by how much.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub pass: bool,
    /// The LB address the frame is counted for (packets +1, bytes +frame length).
    pub counted: Option<IpAddr>,
    pub dropped: Option<DropReason>,
    /// The served port whose counters move (packets +1, bytes +frame length).
    pub port: Option<(IpAddr, u8, u16)>,
}

impl Outcome {
    const NOT_OURS: Self = Self {
        pass: true,
        counted: None,
        dropped: None,
        port: None,
    };
}

/// What the transport header says.
enum Transport {
    Ports { protocol: u8, port: u16 },
    Icmp { kind: u8, code: u8 },
    LaterFragment,
    OtherProtocol,
    CutShort,
}

const MAX_VLAN_TAGS: usize = 2;
const MAX_EXTENSION_HEADERS: usize = 4;

impl Policy {
    /// The program's decision on `frame`, by the README.
    pub fn decide(&self, frame: &[u8]) -> Outcome {
        let Some((ether_type, l3)) = link_layer(frame) else {
            return Outcome::NOT_OURS;
        };
        let (destination, source, transport) = match ether_type {
            0x0800 => {
                let Some(ip) = frame.get(l3..l3 + 20) else {
                    return Outcome::NOT_OURS;
                };
                let destination = IpAddr::from(Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
                if !self.addresses.contains_key(&destination) {
                    return Outcome::NOT_OURS;
                }
                let source = IpAddr::from(Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]));
                (destination, source, ipv4_transport(frame, l3))
            }
            0x86dd => {
                let Some(ip) = frame.get(l3..l3 + 40) else {
                    return Outcome::NOT_OURS;
                };
                let address = |at: usize| {
                    let octets: [u8; 16] = ip[at..at + 16].try_into().expect("16 bytes");
                    IpAddr::from(Ipv6Addr::from(octets))
                };
                let destination = address(24);
                if !self.addresses.contains_key(&destination) {
                    return Outcome::NOT_OURS;
                }
                (destination, address(8), ipv6_transport(frame, l3))
            }
            _ => return Outcome::NOT_OURS,
        };
        let address = &self.addresses[&destination];
        let mut outcome = Outcome {
            pass: true,
            counted: Some(destination),
            dropped: None,
            port: None,
        };
        let in_set = |set: u32| {
            set == 0
                || self
                    .ranges
                    .get(&set)
                    .is_some_and(|ranges| ranges.iter().any(|range| range.contains(&source)))
        };
        let judged = match transport {
            Transport::Ports { protocol, port } => match address.ports.get(&(protocol, port)) {
                Some(set) if !in_set(*set) => Err(DropReason::Source),
                Some(_) => {
                    outcome.port = Some((destination, protocol, port));
                    Ok(())
                }
                None if address.enforce => Err(DropReason::Port),
                None => Ok(()),
            },
            Transport::Icmp { kind, code } => {
                let allowed = if destination.is_ipv4() {
                    // Echo reply, echo request, and "fragmentation needed".
                    matches!((kind, code), (0, _) | (8, _) | (3, 4))
                } else {
                    // Echo request, echo reply, and "packet too big".
                    matches!(kind, 128 | 129 | 2)
                };
                if allowed || !address.enforce {
                    Ok(())
                } else {
                    Err(DropReason::Icmp)
                }
            }
            Transport::LaterFragment if !in_set(address.fragment_ranges) => Err(DropReason::Source),
            Transport::LaterFragment => Ok(()),
            Transport::OtherProtocol if address.enforce => Err(DropReason::Protocol),
            Transport::CutShort if address.enforce => Err(DropReason::Malformed),
            Transport::OtherProtocol | Transport::CutShort => Ok(()),
        };
        if let Err(reason) = judged {
            outcome.pass = false;
            outcome.dropped = Some(reason);
        }
        outcome
    }

    /// Every (address, protocol, port) with counters.
    pub fn served_ports(&self) -> BTreeSet<(IpAddr, u8, u16)> {
        self.addresses
            .iter()
            .flat_map(|(ip, address)| {
                address
                    .ports
                    .keys()
                    .map(|(protocol, port)| (*ip, *protocol, *port))
            })
            .collect()
    }
}

/// The EtherType past up to two VLAN tags (802.1Q, 802.1ad), and where its header starts.
fn link_layer(frame: &[u8]) -> Option<(u16, usize)> {
    let word = |at: usize| Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]));
    if frame.len() < 14 {
        return None;
    }
    let mut ether_type = word(12)?;
    let mut offset = 14;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != 0x8100 && ether_type != 0x88a8 {
            break;
        }
        if frame.len() < offset + 4 {
            return None;
        }
        ether_type = word(offset + 2)?;
        offset += 4;
    }
    Some((ether_type, offset))
}

fn ipv4_transport(frame: &[u8], l3: usize) -> Transport {
    let header_len = usize::from(frame[l3] & 0x0f) * 4;
    let fragment_offset = u16::from_be_bytes([frame[l3 + 6], frame[l3 + 7]]) & 0x1fff;
    if header_len < 20 {
        Transport::CutShort
    } else if fragment_offset != 0 {
        Transport::LaterFragment
    } else {
        transport_header(frame, l3 + header_len, frame[l3 + 9], ICMP)
    }
}

fn ipv6_transport(frame: &[u8], l3: usize) -> Transport {
    let mut next = frame[l3 + 6];
    let mut offset = l3 + 40;
    for _ in 0..MAX_EXTENSION_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-byte units past the
            // first 8; authentication: in 4-byte units past the first 8.
            0 | 43 | 60 | 51 => {
                let Some(header) = frame.get(offset..offset + 2) else {
                    return Transport::CutShort;
                };
                let units = usize::from(header[1]);
                offset += if next == 51 {
                    (units + 2) * 4
                } else {
                    (units + 1) * 8
                };
                next = header[0];
            }
            44 => {
                let Some(header) = frame.get(offset..offset + 8) else {
                    return Transport::CutShort;
                };
                next = header[0];
                offset += 8;
                if u16::from_be_bytes([header[2], header[3]]) >> 3 != 0 {
                    return Transport::LaterFragment;
                }
            }
            _ => break,
        }
    }
    transport_header(frame, offset, next, ICMPV6)
}

fn transport_header(frame: &[u8], offset: usize, protocol: u8, icmp: u8) -> Transport {
    if protocol == TCP || protocol == UDP || protocol == SCTP {
        match frame.get(offset..offset + 4) {
            Some(ports) => Transport::Ports {
                protocol,
                port: u16::from_be_bytes([ports[2], ports[3]]),
            },
            None => Transport::CutShort,
        }
    } else if protocol == icmp {
        match frame.get(offset..offset + 2) {
            Some(header) => Transport::Icmp {
                kind: header[0],
                code: header[1],
            },
            None => Transport::CutShort,
        }
    } else {
        Transport::OtherProtocol
    }
}
