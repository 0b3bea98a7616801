//! Announcements: on taking a local address, the owner tells the segment at once, so that
//! clients and switches move their entries to its MAC without waiting for their caches to
//! expire. IPv4: gratuitous ARP (an ARP request for the address from the address, RFC 5227
//! section 2.3 "announcement"); IPv6: an unsolicited neighbour advertisement with the
//! override flag to all nodes (RFC 4861 section 7.2.6).
//!
//! Frames are built here (pure functions, tested below) and sent through an `AF_PACKET`
//! socket on the address's interface, by a task of their own ([`Announcements`]), so that
//! the later ones of a schedule go out on time whatever the reconciler is doing.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, OwnedFd},
    time::Duration,
};

use nix::sys::socket::{AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType, sendto, socket};
use tokio::{sync::mpsc, time::Instant};
use tracing::warn;

/// When the announcements for a newly taken address go out, from the moment it is taken:
/// the first at once (it is what moves the clients), the later ones for frames the segment
/// lost and for switches still learning.
pub const SCHEDULE: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(250),
    Duration::from_millis(1000),
];

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("interface {ifindex} has no hardware address to send from")]
    NoLinkAddress { ifindex: u32 },
    #[error("cannot open a packet socket: {0}")]
    Socket(nix::Error),
    #[error("cannot list the interfaces: {0}")]
    Interfaces(nix::Error),
    #[error("sending the announcement of {address} on interface {ifindex}: {source}")]
    Send {
        address: IpAddr,
        ifindex: u32,
        source: nix::Error,
    },
}

/// The frame that announces `address` as reachable at `mac`.
pub fn frame(address: IpAddr, mac: [u8; 6]) -> Vec<u8> {
    match address {
        IpAddr::V4(v4) => gratuitous_arp(v4, mac),
        IpAddr::V6(v6) => unsolicited_advertisement(v6, mac),
    }
}

fn gratuitous_arp(address: Ipv4Addr, mac: [u8; 6]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(60);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x06]);
    // Ethernet, IPv4, 6- and 4-byte addresses, request.
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&address.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&address.octets());
    frame.resize(60, 0);
    frame
}

fn unsolicited_advertisement(address: Ipv6Addr, mac: [u8; 6]) -> Vec<u8> {
    const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut message = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    message.extend_from_slice(&address.octets());
    message.extend_from_slice(&[2, 1]);
    message.extend_from_slice(&mac);
    let checksum = icmpv6_checksum(address, ALL_NODES, &message);
    message[2..4].copy_from_slice(&checksum.to_be_bytes());

    let mut frame = Vec::with_capacity(14 + 40 + message.len());
    frame.extend_from_slice(&[0x33, 0x33, 0, 0, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x86, 0xdd]);
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(message.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[58, 255]);
    frame.extend_from_slice(&address.octets());
    frame.extend_from_slice(&ALL_NODES.octets());
    frame.extend(message);
    frame
}

/// The ICMPv6 checksum of `message` (whose checksum field is zero) from `src` to `dst`.
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> u16 {
    let mut sum: u32 = 58 + message.len() as u32;
    for chunk in src
        .octets()
        .chunks(2)
        .chain(dst.octets().chunks(2))
        .chain(message.chunks(2))
    {
        sum += u32::from(u16::from_be_bytes([
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
        ]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends announcements out of interfaces. One raw packet socket serves every interface: each
/// frame is addressed to its interface by index.
pub struct Announcer {
    socket: OwnedFd,
}

impl Announcer {
    pub fn new() -> Result<Self, AnnounceError> {
        // Protocol 0: the socket sends only, and never receives a frame.
        let socket = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(AnnounceError::Socket)?;
        Ok(Self { socket })
    }

    /// Announces `address` at `mac` once, out of interface `ifindex`.
    pub fn announce(
        &self,
        address: IpAddr,
        ifindex: u32,
        mac: [u8; 6],
    ) -> Result<(), AnnounceError> {
        self.send(&Prepared::new(address, ifindex, mac)?)
    }

    /// Sends an announcement prepared beforehand.
    pub fn send(&self, prepared: &Prepared) -> Result<(), AnnounceError> {
        sendto(
            self.socket.as_raw_fd(),
            &prepared.frame,
            &prepared.link,
            MsgFlags::empty(),
        )
        .map(drop)
        .map_err(|source| AnnounceError::Send {
            address: prepared.address,
            ifindex: prepared.ifindex,
            source,
        })
    }
}

/// An announcement ready to go: sent right after the map entry that makes this node answer
/// is written, so that a node handing the address over (which stops answering when it hears
/// it) and this one answer together for no longer than the frame takes to arrive.
pub struct Prepared {
    address: IpAddr,
    ifindex: u32,
    link: LinkAddr,
    frame: Vec<u8>,
}

impl Prepared {
    pub fn new(address: IpAddr, ifindex: u32, mac: [u8; 6]) -> Result<Self, AnnounceError> {
        Ok(Self {
            address,
            ifindex,
            link: link_address(ifindex)?,
            frame: frame(address, mac),
        })
    }
}

/// What the sink asks of the announcing task.
enum Request {
    /// This node took `address`: announce it on [`SCHEDULE`].
    Taken {
        address: IpAddr,
        ifindex: u32,
        mac: [u8; 6],
    },
    /// Announce it once, now (another host answered for it too).
    Again {
        address: IpAddr,
        ifindex: u32,
        mac: [u8; 6],
    },
    /// This node no longer answers for `address`: drop what is still scheduled.
    Released { address: IpAddr },
}

/// The handle of the task that sends announcements; the task ends with it.
pub struct Announcements {
    requests: mpsc::UnboundedSender<Request>,
    /// For the first announcement of a taken address, sent by the sink itself.
    now: Announcer,
}

impl Announcements {
    /// Opens the packet socket and starts the task (inside a tokio runtime).
    pub fn start() -> Result<Self, AnnounceError> {
        let announcer = Announcer::new()?;
        let (requests, received) = mpsc::unbounded_channel();
        tokio::spawn(send_on_schedule(announcer, received));
        Ok(Self {
            requests,
            now: Announcer::new()?,
        })
    }

    /// Sends the first announcement of a taken address at once, from the caller.
    pub fn first(&self, prepared: &Prepared) -> Result<(), AnnounceError> {
        self.now.send(prepared)
    }

    /// This node took `address` and sent its first announcement ([`Self::first`]): the
    /// later ones follow on [`SCHEDULE`].
    pub fn taken(&self, address: IpAddr, ifindex: u32, mac: [u8; 6]) {
        let _ = self.requests.send(Request::Taken {
            address,
            ifindex,
            mac,
        });
    }

    pub fn again(&self, address: IpAddr, ifindex: u32, mac: [u8; 6]) {
        let _ = self.requests.send(Request::Again {
            address,
            ifindex,
            mac,
        });
    }

    pub fn released(&self, address: IpAddr) {
        let _ = self.requests.send(Request::Released { address });
    }
}

async fn send_on_schedule(announcer: Announcer, mut requests: mpsc::UnboundedReceiver<Request>) {
    // When, what, from where.
    let mut pending: Vec<(Instant, IpAddr, u32, [u8; 6])> = Vec::new();
    loop {
        let next = pending.iter().map(|p| p.0).min();
        tokio::select! {
            request = requests.recv() => match request {
                None => return,
                Some(Request::Taken { address, ifindex, mac }) => {
                    let now = Instant::now();
                    pending.retain(|p| p.1 != address);
                    pending.extend(
                        SCHEDULE[1..]
                            .iter()
                            .map(|delay| (now + *delay, address, ifindex, mac)),
                    );
                }
                Some(Request::Again { address, ifindex, mac }) => {
                    pending.push((Instant::now(), address, ifindex, mac));
                }
                Some(Request::Released { address }) => pending.retain(|p| p.1 != address),
            },
            () = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
        }
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = pending.drain(..).partition(|p| p.0 <= now);
        pending = later;
        for (_, address, ifindex, mac) in due {
            if let Err(err) = announcer.announce(address, ifindex, mac) {
                warn!(%err, "announcement not sent");
            }
        }
    }
}

/// The packet-socket address of interface `ifindex` (as the kernel lists it), which names
/// the interface a frame leaves by.
fn link_address(ifindex: u32) -> Result<LinkAddr, AnnounceError> {
    nix::ifaddrs::getifaddrs()
        .map_err(AnnounceError::Interfaces)?
        .filter_map(|entry| entry.address?.as_link_addr().copied())
        .find(|link| link.ifindex() == ifindex as usize)
        .ok_or(AnnounceError::NoLinkAddress { ifindex })
}

/// The hardware address of interface `ifindex`, if it has one.
pub fn hardware_address(ifindex: u32) -> Option<[u8; 6]> {
    link_address(ifindex).ok()?.addr()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x11];

    #[test]
    fn gratuitous_arp_claims_the_address_for_the_mac() {
        let frame = frame("10.0.0.100".parse().unwrap(), MAC);
        assert_eq!(frame.len(), 60, "padded to the Ethernet minimum");
        assert_eq!(&frame[..6], &[0xff; 6], "broadcast");
        assert_eq!(&frame[6..12], &MAC);
        assert_eq!(&frame[12..14], &[8, 6]);
        let arp = &frame[14..42];
        assert_eq!(&arp[..8], &[0, 1, 8, 0, 6, 4, 0, 1], "an ARP request");
        assert_eq!(&arp[8..14], &MAC, "sender hardware address");
        assert_eq!(&arp[14..18], &[10, 0, 0, 100], "sender protocol address");
        assert_eq!(
            &arp[24..28],
            &[10, 0, 0, 100],
            "target = sender: announcement"
        );
    }

    #[test]
    fn unsolicited_advertisement_overrides_for_all_nodes() {
        let address: Ipv6Addr = "fd00::100".parse().unwrap();
        let frame = frame(address.into(), MAC);
        assert_eq!(frame.len(), 14 + 40 + 32);
        assert_eq!(&frame[..6], &[0x33, 0x33, 0, 0, 0, 1]);
        let ip = &frame[14..];
        assert_eq!((ip[6], ip[7]), (58, 255));
        assert_eq!(&ip[8..24], &address.octets());
        assert_eq!(
            &ip[24..40],
            &"ff02::1".parse::<Ipv6Addr>().unwrap().octets()
        );
        let na = &ip[40..];
        assert_eq!(na[0], 136);
        assert_eq!(na[4], 0x20, "override, not solicited");
        assert_eq!(&na[8..24], &address.octets());
        assert_eq!(&na[24..32], &[2, 1, 0x02, 0xaa, 0, 0, 0, 0x11]);
        // Summing the pseudo-header and the message, checksum included, gives all ones.
        let mut sum: u32 = 58 + 32;
        for chunk in ip[8..40].chunks(2).chain(na.chunks(2)) {
            sum += u32::from(u16::from_be_bytes([chunk[0], chunk[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        assert_eq!(sum, 0xffff);
    }
}
