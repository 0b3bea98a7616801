//! The ARP / neighbour-discovery responder run through BPF_PROG_TEST_RUN: the real program
//! and verifier, its maps written by the agent's own code, hand-built requests, and the
//! answers checked byte by byte (checksums recomputed here independently).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use lbagent::{NeighbourCounters, Role};
use lbagent_tests::testrun::{Harness, XDP_DROP, XDP_PASS};

const XDP_TX: u32 = 3;
/// BPF_PROG_TEST_RUN runs the program as if received on the loopback device.
const LOOPBACK: u32 = 1;

const OUR_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x11];
const ASKER_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x01];
const OTHER_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x22];
const ASKER4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const OWNED4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const SILENT4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
const UNKNOWN4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 102);
const ASKER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const OWNED6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const SILENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x101);
const UNKNOWN6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x102);

fn answer(ifindex: u32) -> Role {
    Role::Answer {
        ifindex,
        mac: OUR_MAC,
    }
}

/// A harness where this node answers for OWNED4/OWNED6 and another node for SILENT4/SILENT6.
fn harness() -> Harness {
    let mut h = Harness::new();
    let maps = h.neighbours();
    maps.set(OWNED4.into(), answer(LOOPBACK)).unwrap();
    maps.set(OWNED6.into(), answer(0)).unwrap();
    maps.set(SILENT4.into(), Role::Silent).unwrap();
    maps.set(SILENT6.into(), Role::Silent).unwrap();
    h
}

fn counters(h: &mut Harness, address: impl Into<IpAddr>) -> NeighbourCounters {
    h.neighbours()
        .counters(address.into())
        .unwrap()
        .expect("address in the map")
}

fn ethernet(dst: [u8; 6], src: [u8; 6], vlan: Option<u16>, ether_type: u16) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    if let Some(vlan) = vlan {
        frame.extend_from_slice(&0x8100u16.to_be_bytes());
        frame.extend_from_slice(&vlan.to_be_bytes());
    }
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame
}

fn arp(operation: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4];
    arp.extend_from_slice(&operation.to_be_bytes());
    arp.extend_from_slice(&sha);
    arp.extend_from_slice(&spa.octets());
    arp.extend_from_slice(&tha);
    arp.extend_from_slice(&tpa.octets());
    arp
}

fn arp_request(target: Ipv4Addr, vlan: Option<u16>) -> Vec<u8> {
    let mut frame = ethernet([0xff; 6], ASKER_MAC, vlan, 0x0806);
    frame.extend(arp(1, ASKER_MAC, ASKER4, [0; 6], target));
    // Padded to the Ethernet minimum, as on the wire.
    frame.resize(frame.len().max(60), 0);
    frame
}

/// One's-complement sum of 16-bit words, for the checks below.
fn sum16(bytes: &[u8]) -> u32 {
    bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum()
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// An IPv6 packet carrying ICMPv6 `message` (checksum filled in), hop limit `hops`.
fn icmpv6(src: Ipv6Addr, dst: Ipv6Addr, hops: u8, mut message: Vec<u8>) -> Vec<u8> {
    let len = message.len() as u16;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    message[2..4].copy_from_slice(&[0, 0]);
    let checksum = !fold(sum16(&pseudo) + sum16(&message));
    message[2..4].copy_from_slice(&checksum.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&len.to_be_bytes());
    ip.extend_from_slice(&[58, hops]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend(message);
    ip
}

/// Whether the ICMPv6 checksum of the IPv6 packet `ip` is right.
fn icmpv6_checksum_ok(ip: &[u8]) -> bool {
    let len = u16::from_be_bytes([ip[4], ip[5]]);
    let mut pseudo = ip[8..40].to_vec();
    pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    fold(sum16(&pseudo) + sum16(&ip[40..40 + usize::from(len)])) == 0xffff
}

fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
    let o = target.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15],
    ])
}

/// A neighbour solicitation for `target` from `src` (`::` for duplicate address detection,
/// which carries no source link-layer option), with `extra` option bytes after.
fn solicitation(src: Ipv6Addr, target: Ipv6Addr, hops: u8, extra: &[u8]) -> Vec<u8> {
    let mut message = vec![135, 0, 0, 0, 0, 0, 0, 0];
    message.extend_from_slice(&target.octets());
    if !src.is_unspecified() {
        message.extend_from_slice(&[1, 1]);
        message.extend_from_slice(&ASKER_MAC);
    }
    message.extend_from_slice(extra);
    let dst = solicited_node(target);
    let o = dst.octets();
    let mut frame = ethernet(
        [0x33, 0x33, o[12], o[13], o[14], o[15]],
        ASKER_MAC,
        None,
        0x86dd,
    );
    frame.extend(icmpv6(src, dst, hops, message));
    frame
}

fn advertisement(from_mac: [u8; 6], target: Ipv6Addr) -> Vec<u8> {
    let mut message = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    message.extend_from_slice(&target.octets());
    message.extend_from_slice(&[2, 1]);
    message.extend_from_slice(&from_mac);
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let mut frame = ethernet([0x33, 0x33, 0, 0, 0, 1], from_mac, None, 0x86dd);
    frame.extend(icmpv6(ASKER6, all_nodes, 255, message));
    frame
}

/// Runs the program; returns the verdict and the frame as it left.
fn run(h: &Harness, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 256];
    let result = h.try_run(frame, &mut out).expect("test run");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// Runs the program and checks the frame was not touched.
fn verdict_untouched(h: &Harness, frame: &[u8]) -> u32 {
    let (verdict, out) = run(h, frame);
    assert_eq!(out, frame, "the frame must be left as it came");
    verdict
}

#[test]
fn arp_request_for_an_owned_address_is_answered_in_place() {
    let mut h = harness();
    for vlan in [None, Some(42)] {
        let request = arp_request(OWNED4, vlan);
        let (verdict, reply) = run(&h, &request);
        assert_eq!(verdict, XDP_TX, "{vlan:?}");
        assert_eq!(reply.len(), request.len(), "same length, padding kept");
        let l3 = if vlan.is_some() { 18 } else { 14 };
        let mut expected = ethernet(ASKER_MAC, OUR_MAC, vlan, 0x0806);
        expected.extend(arp(2, OUR_MAC, OWNED4, ASKER_MAC, ASKER4));
        assert_eq!(&reply[..l3 + 28], &expected[..], "{vlan:?}: {reply:02x?}");
    }
    let counted = counters(&mut h, OWNED4);
    assert_eq!(
        (counted.answered, counted.silenced, counted.foreign),
        (2, 0, 0)
    );
}

#[test]
fn arp_probe_is_answered_to_defend_the_address() {
    let h = harness();
    let mut probe = ethernet([0xff; 6], ASKER_MAC, None, 0x0806);
    probe.extend(arp(1, ASKER_MAC, Ipv4Addr::UNSPECIFIED, [0; 6], OWNED4));
    let (verdict, reply) = run(&h, &probe);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(&reply[..6], &ASKER_MAC);
    assert_eq!(&reply[14 + 24..14 + 28], &[0, 0, 0, 0]);
}

#[test]
fn requests_for_another_nodes_address_are_dropped_and_unknown_ones_pass() {
    let mut h = harness();
    assert_eq!(verdict_untouched(&h, &arp_request(SILENT4, None)), XDP_DROP);
    assert_eq!(
        verdict_untouched(&h, &arp_request(UNKNOWN4, None)),
        XDP_PASS
    );
    let ns = solicitation(ASKER6, SILENT6, 255, &[]);
    assert_eq!(verdict_untouched(&h, &ns), XDP_DROP);
    let ns = solicitation(ASKER6, UNKNOWN6, 255, &[]);
    assert_eq!(verdict_untouched(&h, &ns), XDP_PASS);
    assert_eq!(counters(&mut h, SILENT4).silenced, 1);
    assert_eq!(counters(&mut h, SILENT6).silenced, 1);
    assert_eq!(counters(&mut h, SILENT4).answered, 0);
}

#[test]
fn an_owned_address_is_not_answered_on_another_interface() {
    let mut h = harness();
    h.neighbours().set(OWNED4.into(), answer(9999)).unwrap();
    assert_eq!(verdict_untouched(&h, &arp_request(OWNED4, None)), XDP_DROP);
    let counted = counters(&mut h, OWNED4);
    assert_eq!((counted.answered, counted.silenced), (0, 1));
    // Back on the right interface, the counters carried over.
    h.neighbours().set(OWNED4.into(), answer(LOOPBACK)).unwrap();
    assert_eq!(run(&h, &arp_request(OWNED4, None)).0, XDP_TX);
    let counted = counters(&mut h, OWNED4);
    assert_eq!((counted.answered, counted.silenced), (1, 1));
}

#[test]
fn foreign_arp_claims_for_an_owned_address_are_counted_and_passed() {
    let mut h = harness();
    // Another host replies for our address, then announces it (gratuitous ARP).
    let mut reply = ethernet(ASKER_MAC, OTHER_MAC, None, 0x0806);
    reply.extend(arp(2, OTHER_MAC, OWNED4, ASKER_MAC, ASKER4));
    assert_eq!(verdict_untouched(&h, &reply), XDP_PASS);
    let mut garp = ethernet([0xff; 6], OTHER_MAC, None, 0x0806);
    garp.extend(arp(1, OTHER_MAC, OWNED4, [0; 6], OWNED4));
    assert_eq!(verdict_untouched(&h, &garp), XDP_PASS);
    // Our own announcement, and claims for an address another node owns, are normal.
    let mut ours = ethernet([0xff; 6], OUR_MAC, None, 0x0806);
    ours.extend(arp(1, OUR_MAC, OWNED4, [0; 6], OWNED4));
    assert_eq!(verdict_untouched(&h, &ours), XDP_PASS);
    let mut owner = ethernet(ASKER_MAC, OTHER_MAC, None, 0x0806);
    owner.extend(arp(2, OTHER_MAC, SILENT4, ASKER_MAC, ASKER4));
    assert_eq!(verdict_untouched(&h, &owner), XDP_PASS);
    let counted = counters(&mut h, OWNED4);
    assert_eq!(counted.foreign, 2);
    assert_eq!(counted.foreign_mac, Some(OTHER_MAC));
    assert_eq!(counters(&mut h, SILENT4).foreign, 0);
}

fn check_advertisement(reply: &[u8], eth_dst: [u8; 6], ip_dst: Ipv6Addr, flags: u8) {
    assert_eq!(reply.len(), 14 + 40 + 32, "{reply:02x?}");
    assert_eq!(&reply[..6], &eth_dst);
    assert_eq!(&reply[6..12], &OUR_MAC);
    assert_eq!(&reply[12..14], &[0x86, 0xdd]);
    let ip = &reply[14..];
    assert_eq!(ip[0] >> 4, 6);
    assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 32, "payload length");
    assert_eq!((ip[6], ip[7]), (58, 255), "ICMPv6, hop limit 255");
    assert_eq!(&ip[8..24], &OWNED6.octets(), "from the target address");
    assert_eq!(&ip[24..40], &ip_dst.octets());
    let na = &ip[40..];
    assert_eq!((na[0], na[1]), (136, 0));
    assert_eq!(na[4], flags);
    assert_eq!(&na[5..8], &[0, 0, 0]);
    assert_eq!(&na[8..24], &OWNED6.octets());
    assert_eq!(&na[24..26], &[2, 1], "target link-layer address option");
    assert_eq!(&na[26..32], &OUR_MAC);
    assert!(
        icmpv6_checksum_ok(ip),
        "ICMPv6 checksum: {:02x?}",
        &na[2..4]
    );
}

#[test]
fn neighbour_solicitation_is_answered_with_a_valid_advertisement() {
    let mut h = harness();
    let request = solicitation(ASKER6, OWNED6, 255, &[]);
    assert!(icmpv6_checksum_ok(&request[14..]), "the test's own builder");
    let (verdict, reply) = run(&h, &request);
    assert_eq!(verdict, XDP_TX);
    check_advertisement(&reply, ASKER_MAC, ASKER6, 0x60);
    // Longer solicitations (a nonce option, padding) get the same answer, shortened.
    let nonce = [14, 1, 1, 2, 3, 4, 5, 6];
    let (verdict, reply) = run(&h, &solicitation(ASKER6, OWNED6, 255, &nonce));
    assert_eq!(verdict, XDP_TX);
    check_advertisement(&reply, ASKER_MAC, ASKER6, 0x60);
    assert_eq!(counters(&mut h, OWNED6).answered, 2);
}

#[test]
fn duplicate_address_detection_is_answered_to_all_nodes() {
    let h = harness();
    // From ::, no option: the frame is 8 bytes shorter than the answer, and grows.
    let request = solicitation(Ipv6Addr::UNSPECIFIED, OWNED6, 255, &[]);
    assert_eq!(request.len(), 14 + 40 + 24);
    let (verdict, reply) = run(&h, &request);
    assert_eq!(verdict, XDP_TX);
    check_advertisement(
        &reply,
        [0x33, 0x33, 0, 0, 0, 1],
        "ff02::1".parse().unwrap(),
        0x20,
    );
}

#[test]
fn malformed_solicitations_are_not_answered() {
    let mut h = harness();
    // Hop limit below 255: it crossed a router (RFC 4861 says drop; the kernel does).
    assert_eq!(
        verdict_untouched(&h, &solicitation(ASKER6, OWNED6, 64, &[])),
        XDP_PASS
    );
    // Cut short inside the target address.
    let short = solicitation(ASKER6, OWNED6, 255, &[]);
    for len in [14 + 40 + 4, 14 + 40 + 20] {
        assert_eq!(verdict_untouched(&h, &short[..len]), XDP_PASS, "{len}");
    }
    let arp = arp_request(OWNED4, None);
    assert_eq!(verdict_untouched(&h, &arp[..14 + 20]), XDP_PASS);
    assert_eq!(counters(&mut h, OWNED6).answered, 0);
    assert_eq!(counters(&mut h, OWNED4).answered, 0);
}

#[test]
fn foreign_advertisements_for_an_owned_address_are_counted() {
    let mut h = harness();
    assert_eq!(
        verdict_untouched(&h, &advertisement(OTHER_MAC, OWNED6)),
        XDP_PASS
    );
    assert_eq!(
        verdict_untouched(&h, &advertisement(OUR_MAC, OWNED6)),
        XDP_PASS
    );
    assert_eq!(
        verdict_untouched(&h, &advertisement(OTHER_MAC, SILENT6)),
        XDP_PASS
    );
    let counted = counters(&mut h, OWNED6);
    assert_eq!((counted.foreign, counted.foreign_mac), (1, Some(OTHER_MAC)));
}

#[test]
fn a_unicast_solicitation_to_an_enforced_lb_address_is_answered_not_dropped() {
    // Neighbour unreachability detection sends the solicitation to the address itself,
    // which the policy path would judge as ICMPv6 and drop.
    let mut h = harness();
    h.add_vip(OWNED6.into(), true, 0);
    let mut request = solicitation(ASKER6, OWNED6, 255, &[]);
    request[..6].copy_from_slice(&OUR_MAC);
    let message = request[14 + 40..].to_vec();
    request.truncate(14);
    request.extend(icmpv6(ASKER6, OWNED6, 255, message));
    let (verdict, reply) = run(&h, &request);
    assert_eq!(verdict, XDP_TX);
    check_advertisement(&reply, ASKER_MAC, ASKER6, 0x60);
    // Other ICMPv6 to the address still goes through the policy.
    let mut echo = ethernet(OUR_MAC, ASKER_MAC, None, 0x86dd);
    echo.extend(icmpv6(ASKER6, OWNED6, 64, vec![128, 0, 0, 0, 0, 1, 0, 1]));
    assert_eq!(verdict_untouched(&h, &echo), XDP_PASS);
    assert_eq!(h.counted(OWNED6.into()).0, 1);
}

#[test]
fn removing_an_address_stops_the_answers_and_its_counters() {
    let mut h = harness();
    assert_eq!(run(&h, &arp_request(OWNED4, None)).0, XDP_TX);
    assert!(h.neighbours().remove(OWNED4.into()).unwrap());
    assert!(!h.neighbours().remove(OWNED4.into()).unwrap());
    assert_eq!(verdict_untouched(&h, &arp_request(OWNED4, None)), XDP_PASS);
    assert_eq!(h.neighbours().counters(OWNED4.into()).unwrap(), None);
    let roles = h.neighbours().roles();
    assert_eq!(roles.len(), 3);
    assert_eq!(roles[&IpAddr::from(SILENT4)], Role::Silent);
    assert_eq!(roles[&IpAddr::from(OWNED6)], answer(0));
}

#[test]
fn a_lapsed_lease_silences_the_owner_and_a_renewed_one_restores_it() {
    let mut h = harness();
    h.lease().renew(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(run(&h, &arp_request(OWNED4, None)).0, XDP_TX);
    // Renewed "for zero": it has already run out when the frame comes.
    h.lease().renew(Some(Duration::ZERO)).unwrap();
    assert_eq!(verdict_untouched(&h, &arp_request(OWNED4, None)), XDP_DROP);
    let ns = solicitation(ASKER6, OWNED6, 255, &[]);
    assert_eq!(verdict_untouched(&h, &ns), XDP_DROP);
    // Foreign claims are still seen while silent.
    let mut reply = ethernet(ASKER_MAC, OTHER_MAC, None, 0x0806);
    reply.extend(arp(2, OTHER_MAC, OWNED4, ASKER_MAC, ASKER4));
    assert_eq!(verdict_untouched(&h, &reply), XDP_PASS);
    let counted = counters(&mut h, OWNED4);
    assert_eq!(
        (counted.answered, counted.silenced, counted.foreign),
        (1, 1, 1)
    );
    // No lease kept at all (no membership running): answer.
    h.lease().renew(None).unwrap();
    assert_eq!(run(&h, &arp_request(OWNED4, None)).0, XDP_TX);
}

#[test]
fn while_leaving_each_address_is_answered_until_another_node_claims_it() {
    let mut h = harness();
    h.lease().leave(Duration::from_secs(5)).unwrap();
    // Leaving, but nobody took over yet: still answered.
    assert_eq!(run(&h, &arp_request(OWNED4, None)).0, XDP_TX);
    let ns = solicitation(ASKER6, OWNED6, 255, &[]);
    assert_eq!(run(&h, &ns).0, XDP_TX);
    // The successor announces the IPv4 address: silent for it from then on, at once.
    let mut garp = ethernet([0xff; 6], OTHER_MAC, None, 0x0806);
    garp.extend(arp(1, OTHER_MAC, OWNED4, [0; 6], OWNED4));
    assert_eq!(verdict_untouched(&h, &garp), XDP_PASS);
    assert_eq!(verdict_untouched(&h, &arp_request(OWNED4, None)), XDP_DROP);
    assert_eq!(h.neighbours().roles()[&IpAddr::from(OWNED4)], Role::Silent);
    // The IPv6 address is still ours until its own successor advertises it.
    assert_eq!(run(&h, &ns).0, XDP_TX);
    assert_eq!(
        verdict_untouched(&h, &advertisement(OTHER_MAC, OWNED6)),
        XDP_PASS
    );
    assert_eq!(verdict_untouched(&h, &ns), XDP_DROP);
    // Our own announcement is no claim by another node.
    h.neighbours().set(OWNED4.into(), answer(LOOPBACK)).unwrap();
    let mut ours = ethernet([0xff; 6], OUR_MAC, None, 0x0806);
    ours.extend(arp(1, OUR_MAC, OWNED4, [0; 6], OWNED4));
    assert_eq!(verdict_untouched(&h, &ours), XDP_PASS);
    assert_eq!(run(&h, &arp_request(OWNED4, None)).0, XDP_TX);
    // Not leaving (a renewed lease), a foreign claim is split brain: counted, and this node
    // goes on answering until the election settles it.
    h.lease().renew(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(verdict_untouched(&h, &garp), XDP_PASS);
    assert_eq!(run(&h, &arp_request(OWNED4, None)).0, XDP_TX);
    assert_eq!(counters(&mut h, OWNED4).foreign, 2);
}

#[test]
fn an_address_handed_over_is_answered_until_its_new_owner_claims_it() {
    let mut h = harness();
    let handing = |ifindex| Role::HandOver {
        ifindex,
        mac: OUR_MAC,
    };
    h.neighbours()
        .set(OWNED4.into(), handing(LOOPBACK))
        .unwrap();
    h.neighbours().set(OWNED6.into(), handing(0)).unwrap();
    // Another node won them, but has not claimed them yet: still answered, as an owner would.
    let (verdict, reply) = run(&h, &arp_request(OWNED4, None));
    assert_eq!(verdict, XDP_TX);
    assert_eq!(&reply[6..12], &OUR_MAC);
    let ns = solicitation(ASKER6, OWNED6, 255, &[]);
    assert_eq!(run(&h, &ns).0, XDP_TX);
    // Our own announcement is no claim.
    let mut ours = ethernet([0xff; 6], OUR_MAC, None, 0x0806);
    ours.extend(arp(1, OUR_MAC, OWNED4, [0; 6], OWNED4));
    assert_eq!(verdict_untouched(&h, &ours), XDP_PASS);
    assert_eq!(run(&h, &arp_request(OWNED4, None)).0, XDP_TX);
    // The new owner announces the IPv4 address: silent for it at once, and that claim is
    // the expected one, not split brain.
    let mut garp = ethernet([0xff; 6], OTHER_MAC, None, 0x0806);
    garp.extend(arp(1, OTHER_MAC, OWNED4, [0; 6], OWNED4));
    assert_eq!(verdict_untouched(&h, &garp), XDP_PASS);
    assert_eq!(verdict_untouched(&h, &arp_request(OWNED4, None)), XDP_DROP);
    assert_eq!(h.neighbours().roles()[&IpAddr::from(OWNED4)], Role::Silent);
    assert_eq!(counters(&mut h, OWNED4).foreign, 0);
    // The IPv6 one stays answered until its own claim, an advertisement.
    assert_eq!(run(&h, &ns).0, XDP_TX);
    assert_eq!(
        verdict_untouched(&h, &advertisement(OTHER_MAC, OWNED6)),
        XDP_PASS
    );
    assert_eq!(verdict_untouched(&h, &ns), XDP_DROP);
    assert_eq!(h.neighbours().roles()[&IpAddr::from(OWNED6)], Role::Silent);
    assert_eq!(counters(&mut h, OWNED6).foreign, 0);
}
