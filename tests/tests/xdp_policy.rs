//! The XDP program's policy, through BPF_PROG_TEST_RUN: served ports and protocols, ICMP,
//! source ranges, IPv4 options, IPv6 extension headers, fragments, truncation at every
//! offset, and random frames. Every drop must be counted under its reason.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lbagent_common::proto;
use lbagent_tests::{
    frame::{ETHERTYPE_8021AD, ETHERTYPE_8021Q, Ext, Frame, Ipv4Options, icmp, sctp, tcp, udp},
    testrun::{Harness, XDP_DROP, XDP_PASS, drops},
};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const STRANGER4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
const VIP4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 7);
const STRANGER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x999, 0, 0, 0, 0, 9);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x10);
const GRE: u8 = 47;
/// Range set of the source-restricted port 443, and of later fragments.
const RANGES: u32 = 7;

/// Both VIPs enforce: TCP 80, UDP 53, SCTP 3868 from anywhere; TCP 443 only from RANGES.
fn harness() -> Harness {
    let mut h = Harness::new();
    for vip in [IpAddr::from(VIP4), IpAddr::from(VIP6)] {
        h.add_vip(vip, true, RANGES);
        h.add_port(vip, proto::TCP, 80, 0);
        h.add_port(vip, proto::UDP, 53, 0);
        h.add_port(vip, proto::SCTP, 3868, 0);
        h.add_port(vip, proto::TCP, 443, RANGES);
    }
    h.add_range(RANGES, "198.51.100.0".parse().unwrap(), 24);
    h.add_range(RANGES, "2001:db8:100::".parse().unwrap(), 48);
    // Another set's range must not open set RANGES.
    h.add_range(RANGES + 1, "192.0.2.0".parse().unwrap(), 24);
    h
}

fn v4(protocol: u8, l4: &[u8]) -> Frame {
    Frame::ipv4(CLIENT4, VIP4, protocol, l4, Ipv4Options::default())
}

fn v6(protocol: u8, l4: &[u8]) -> Frame {
    Frame::ipv6(CLIENT6, VIP6, &[], protocol, l4)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Pass,
    Port,
    Source,
    Protocol,
    Icmp,
    Malformed,
}

/// Runs `frame`, checks the verdict, that the frame was counted for `vip`, and that exactly
/// the expected drop counter moved.
fn check(h: &Harness, vip: IpAddr, frame: &Frame, expect: Expect) {
    check_bytes(h, vip, &frame.bytes(), expect);
}

fn check_bytes(h: &Harness, vip: IpAddr, bytes: &[u8], expect: Expect) {
    let before = h.stats(vip);
    let verdict = h.verdict(bytes);
    let after = h.stats(vip);
    let what = format!("{expect:?} for {bytes:02x?}");
    assert_eq!(after.packets, before.packets + 1, "not counted: {what}");
    let delta = |f: fn(&lbagent_common::VipStats) -> u64| f(&after) - f(&before);
    let moved = (
        delta(|s| s.drop_port),
        delta(|s| s.drop_source),
        delta(|s| s.drop_protocol),
        delta(|s| s.drop_icmp),
        delta(|s| s.drop_malformed),
    );
    let wanted = match expect {
        Expect::Pass => (0, 0, 0, 0, 0),
        Expect::Port => (1, 0, 0, 0, 0),
        Expect::Source => (0, 1, 0, 0, 0),
        Expect::Protocol => (0, 0, 1, 0, 0),
        Expect::Icmp => (0, 0, 0, 1, 0),
        Expect::Malformed => (0, 0, 0, 0, 1),
    };
    assert_eq!(
        verdict,
        if expect == Expect::Pass {
            XDP_PASS
        } else {
            XDP_DROP
        },
        "{what}"
    );
    assert_eq!(
        moved, wanted,
        "drop counters (port, source, protocol, icmp, malformed): {what}"
    );
}

#[test]
fn served_ports_and_protocols_pass_the_rest_is_dropped_by_reason() {
    let mut h = harness();
    let cases: Vec<(Frame, Frame, Expect)> = vec![
        (
            v4(proto::TCP, &tcp(80)),
            v6(proto::TCP, &tcp(80)),
            Expect::Pass,
        ),
        (
            v4(proto::TCP, &tcp(81)),
            v6(proto::TCP, &tcp(81)),
            Expect::Port,
        ),
        (
            v4(proto::UDP, &udp(53, 20)),
            v6(proto::UDP, &udp(53, 20)),
            Expect::Pass,
        ),
        (
            v4(proto::UDP, &udp(80, 20)),
            v6(proto::UDP, &udp(80, 20)),
            Expect::Port,
        ),
        (
            v4(proto::SCTP, &sctp(3868)),
            v6(proto::SCTP, &sctp(3868)),
            Expect::Pass,
        ),
        (
            v4(proto::SCTP, &sctp(80)),
            v6(proto::SCTP, &sctp(80)),
            Expect::Port,
        ),
        (v4(GRE, &[0; 8]), v6(GRE, &[0; 8]), Expect::Protocol),
    ];
    for (frame4, frame6, expect) in &cases {
        for tags in [
            &[][..],
            &[ETHERTYPE_8021Q][..],
            &[ETHERTYPE_8021AD, ETHERTYPE_8021Q][..],
        ] {
            let tag = |mut f: Frame| {
                for tpid in tags {
                    f = f.tagged(*tpid, 42);
                }
                f
            };
            check(&h, VIP4.into(), &tag(frame4.clone()), *expect);
            check(&h, VIP6.into(), &tag(frame6.clone()), *expect);
        }
    }
    // The served port's own counters saw exactly its frames: 3 tag variants each.
    assert_eq!(h.port_stats(VIP4.into(), proto::TCP, 80).0, 3);
    assert_eq!(h.port_stats(VIP6.into(), proto::UDP, 53).0, 3);
    // A port added later is served at once.
    h.add_port(VIP4.into(), proto::TCP, 81, 0);
    check(&h, VIP4.into(), &v4(proto::TCP, &tcp(81)), Expect::Pass);
}

#[test]
fn icmp_echo_and_path_mtu_errors_pass_other_icmp_is_dropped() {
    let h = harness();
    for (kind, code, expect) in [
        (8, 0, Expect::Pass),
        (0, 0, Expect::Pass),
        (3, 4, Expect::Pass),
        (3, 3, Expect::Icmp),
        (13, 0, Expect::Icmp),
        (5, 1, Expect::Icmp),
    ] {
        check(&h, VIP4.into(), &v4(proto::ICMP, &icmp(kind, code)), expect);
    }
    for (kind, expect) in [
        (128, Expect::Pass),
        (129, Expect::Pass),
        (2, Expect::Pass),
        (1, Expect::Icmp),
        (135, Expect::Icmp),
    ] {
        check(&h, VIP6.into(), &v6(proto::ICMPV6, &icmp(kind, 0)), expect);
    }
    // ICMPv6's number carried in IPv4 is not ICMP: an unknown protocol there.
    check(
        &h,
        VIP4.into(),
        &v4(proto::ICMPV6, &icmp(128, 0)),
        Expect::Protocol,
    );
}

#[test]
fn source_ranges_admit_only_their_sources() {
    let h = harness();
    let from4 = |src| Frame::ipv4(src, VIP4, proto::TCP, &tcp(443), Ipv4Options::default());
    let from6 = |src| Frame::ipv6(src, VIP6, &[], proto::TCP, &tcp(443));
    check(&h, VIP4.into(), &from4(CLIENT4), Expect::Pass);
    check(&h, VIP4.into(), &from4(STRANGER4), Expect::Source);
    check(&h, VIP6.into(), &from6(CLIENT6), Expect::Pass);
    check(&h, VIP6.into(), &from6(STRANGER6), Expect::Source);
    // Port 80 has no ranges: strangers are welcome there.
    check(
        &h,
        VIP4.into(),
        &Frame::ipv4(
            STRANGER4,
            VIP4,
            proto::TCP,
            &tcp(80),
            Ipv4Options::default(),
        ),
        Expect::Pass,
    );
}

#[test]
fn ipv4_options_and_ipv6_extension_headers_are_walked_to_the_port() {
    let h = harness();
    let opts = Ipv4Options {
        option_words: 3,
        ..Default::default()
    };
    check(
        &h,
        VIP4.into(),
        &Frame::ipv4(CLIENT4, VIP4, proto::TCP, &tcp(80), opts),
        Expect::Pass,
    );
    check(
        &h,
        VIP4.into(),
        &Frame::ipv4(CLIENT4, VIP4, proto::TCP, &tcp(81), opts),
        Expect::Port,
    );
    let chain = [Ext::HopByHop, Ext::DestOpts, Ext::Routing];
    check(
        &h,
        VIP6.into(),
        &Frame::ipv6(CLIENT6, VIP6, &chain, proto::TCP, &tcp(80)),
        Expect::Pass,
    );
    check(
        &h,
        VIP6.into(),
        &Frame::ipv6(CLIENT6, VIP6, &chain, proto::TCP, &tcp(81)),
        Expect::Port,
    );
    check(
        &h,
        VIP6.into(),
        &Frame::ipv6(CLIENT6, VIP6, &chain, proto::ICMPV6, &icmp(128, 0)),
        Expect::Pass,
    );
}

#[test]
fn first_fragments_are_judged_by_port_later_ones_by_source() {
    let h = harness();
    let first = Ipv4Options {
        more_fragments: true,
        ..Default::default()
    };
    let later = Ipv4Options {
        fragment_offset: 185,
        ..Default::default()
    };
    check(
        &h,
        VIP4.into(),
        &Frame::ipv4(CLIENT4, VIP4, proto::UDP, &udp(53, 100), first),
        Expect::Pass,
    );
    check(
        &h,
        VIP4.into(),
        &Frame::ipv4(CLIENT4, VIP4, proto::UDP, &udp(54, 100), first),
        Expect::Port,
    );
    // A later fragment has no ports: its bytes are data, even if they look like a port.
    check(
        &h,
        VIP4.into(),
        &Frame::ipv4(CLIENT4, VIP4, proto::UDP, &udp(54, 100), later),
        Expect::Pass,
    );
    check(
        &h,
        VIP4.into(),
        &Frame::ipv4(STRANGER4, VIP4, proto::UDP, &udp(54, 100), later),
        Expect::Source,
    );

    let frag = |offset, more| Ext::Fragment { offset, more };
    check(
        &h,
        VIP6.into(),
        &Frame::ipv6(CLIENT6, VIP6, &[frag(0, true)], proto::UDP, &udp(53, 100)),
        Expect::Pass,
    );
    check(
        &h,
        VIP6.into(),
        &Frame::ipv6(CLIENT6, VIP6, &[frag(0, true)], proto::UDP, &udp(54, 100)),
        Expect::Port,
    );
    check(
        &h,
        VIP6.into(),
        &Frame::ipv6(
            CLIENT6,
            VIP6,
            &[Ext::HopByHop, frag(185, false)],
            proto::UDP,
            &udp(54, 100),
        ),
        Expect::Pass,
    );
    check(
        &h,
        VIP6.into(),
        &Frame::ipv6(
            STRANGER6,
            VIP6,
            &[frag(185, false)],
            proto::UDP,
            &udp(54, 100),
        ),
        Expect::Source,
    );
}

#[test]
fn count_only_addresses_pass_everything_and_other_traffic_is_untouched() {
    let mut h = Harness::new();
    h.count_only(VIP4.into());
    for frame in [
        v4(proto::TCP, &tcp(81)),
        v4(GRE, &[0; 8]),
        v4(proto::ICMP, &icmp(13, 0)),
    ] {
        check(&h, VIP4.into(), &frame, Expect::Pass);
    }
    // Not an LB address: passes without a lookup of its ports or a counter.
    let other = Frame::ipv4(
        CLIENT4,
        Ipv4Addr::new(203, 0, 113, 99),
        proto::TCP,
        &tcp(81),
        Ipv4Options::default(),
    );
    assert_eq!(h.verdict(&other.bytes()), XDP_PASS);
}

/// Every prefix of every frame shape: the verdict is PASS with no drop counted, or DROP with
/// exactly one counted.
#[test]
fn truncated_headers_at_every_offset_pass_or_are_a_counted_drop() {
    let h = harness();
    let shapes = [
        (v4(proto::TCP, &tcp(81)), IpAddr::from(VIP4)),
        (
            Frame::ipv4(
                CLIENT4,
                VIP4,
                proto::TCP,
                &tcp(80),
                Ipv4Options {
                    option_words: 2,
                    ..Default::default()
                },
            ),
            VIP4.into(),
        ),
        (
            v4(proto::ICMP, &icmp(13, 0)).tagged(ETHERTYPE_8021Q, 1),
            VIP4.into(),
        ),
        (v6(proto::UDP, &udp(54, 4)), VIP6.into()),
        (
            Frame::ipv6(
                CLIENT6,
                VIP6,
                &[
                    Ext::HopByHop,
                    Ext::Fragment {
                        offset: 0,
                        more: true,
                    },
                ],
                proto::TCP,
                &tcp(443),
            ),
            VIP6.into(),
        ),
        (
            v6(proto::SCTP, &sctp(3868))
                .tagged(ETHERTYPE_8021AD, 1)
                .tagged(ETHERTYPE_8021Q, 2),
            VIP6.into(),
        ),
    ];
    let mut malformed = 0;
    for (frame, vip) in shapes {
        let full = frame.bytes();
        for len in 14..=full.len() {
            let before = h.stats(vip);
            let verdict = h.verdict(&full[..len]);
            let after = h.stats(vip);
            let dropped = drops(&after) - drops(&before);
            match verdict {
                XDP_PASS => assert_eq!(dropped, 0, "len {len}: passed but a drop was counted"),
                XDP_DROP => assert_eq!(dropped, 1, "len {len}: dropped without exactly one count"),
                other => panic!("len {len}: verdict {other}"),
            }
            malformed += after.drop_malformed - before.drop_malformed;
        }
    }
    assert!(
        malformed > 0,
        "a cut transport header must be a counted 'malformed' drop"
    );
    // And the precise case: a whole IPv4 header, half a TCP header.
    let cut = v4(proto::TCP, &tcp(80)).bytes();
    check_bytes(&h, VIP4.into(), &cut[..14 + 20 + 2], Expect::Malformed);
}

/// Thousands of random frames (random protocols, ports, extension chains, tails, lengths):
/// nothing but PASS or a counted DROP.
#[test]
fn random_frames_only_pass_or_are_counted_drops() {
    let h = harness();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..3000 {
        let r = next();
        let protocol = [
            proto::TCP,
            proto::UDP,
            proto::SCTP,
            proto::ICMP,
            proto::ICMPV6,
            GRE,
            (r >> 8) as u8,
        ][(r % 7) as usize];
        let mut l4: Vec<u8> = (0..(r >> 16) % 48).map(|_| next() as u8).collect();
        if l4.len() >= 4 && r & 1 == 0 {
            l4[2..4]
                .copy_from_slice(&[80u16, 53, 443, 3868][((r >> 20) % 4) as usize].to_be_bytes());
        }
        let (frame, vip) = if r & 2 == 0 {
            let options = Ipv4Options {
                option_words: ((r >> 24) % 3) as u8,
                fragment_offset: if r & 4 == 0 {
                    0
                } else {
                    ((r >> 28) % 300) as u16
                },
                more_fragments: r & 8 != 0,
            };
            let src = if r & 16 == 0 { CLIENT4 } else { STRANGER4 };
            (
                Frame::ipv4(src, VIP4, protocol, &l4, options),
                IpAddr::from(VIP4),
            )
        } else {
            let all = [
                Ext::HopByHop,
                Ext::DestOpts,
                Ext::Routing,
                Ext::Fragment {
                    offset: ((r >> 30) % 4) as u16,
                    more: r & 32 != 0,
                },
            ];
            let chain: Vec<Ext> = all.iter().copied().filter(|_| next() % 3 == 0).collect();
            let src = if r & 16 == 0 { CLIENT6 } else { STRANGER6 };
            (
                Frame::ipv6(src, VIP6, &chain, protocol, &l4),
                IpAddr::from(VIP6),
            )
        };
        let mut bytes = frame.bytes();
        if r & 64 != 0 {
            bytes.truncate(14 + (next() as usize % bytes.len().saturating_sub(13).max(1)));
        }
        if bytes.len() < 14 {
            continue;
        }
        let before = drops(&h.stats(vip));
        let verdict = h.verdict(&bytes);
        let dropped = drops(&h.stats(vip)) - before;
        assert!(
            (verdict == XDP_PASS && dropped == 0) || (verdict == XDP_DROP && dropped == 1),
            "round {round}: verdict {verdict}, {dropped} drops counted for {bytes:02x?}"
        );
    }
}

#[test]
fn ports_that_do_not_fit_leave_their_address_counted_but_unfiltered_and_the_rest_applies() {
    use lbagent::{Entries, PortId, VipPolicy, diff};
    let mut h = Harness::new();
    // Fill the port slots but two, with ports of an address that is not wanted.
    let filler: IpAddr = "198.18.0.1".parse().unwrap();
    h.add_vip(filler, false, 0);
    let free = 2;
    for port in 0..(lbagent_common::maps::MAX_PORTS - 1 - free) {
        h.add_port(filler, proto::TCP, port as u16, 0);
    }
    let (first, second): (IpAddr, IpAddr) = ("203.0.113.5".parse().unwrap(), VIP4.into());
    let port = |address, port| PortId {
        address,
        protocol: proto::TCP,
        port,
    };
    let enforce = VipPolicy {
        enforce: true,
        fragment_ranges: 0,
    };
    // `first` needs one port and gets it; `second` needs three and gets one.
    let wanted = Entries {
        vips: [(first, enforce), (second, enforce)].into(),
        ports: [
            (port(first, 80), 0),
            (port(second, 80), 0),
            (port(second, 81), 0),
            (port(second, 82), 0),
        ]
        .into(),
        ranges: Default::default(),
    };
    // The filler is still wanted too: a write frees the slots of what goes before it adds,
    // so only what stays can crowd the new ports out.
    let observed = h.sink().entries().unwrap();
    let mut crowded = observed.clone();
    crowded.vips.extend(wanted.vips.clone());
    crowded.ports.extend(wanted.ports.clone());
    let err = h
        .sink()
        .write(&diff(&crowded, &observed))
        .expect_err("two ports do not fit");
    assert!(
        err.to_string().starts_with("map LB_PORT_CONFIG is full"),
        "{err}"
    );
    let tcp4 = |to: IpAddr, port: u16| {
        let IpAddr::V4(to) = to else { unreachable!() };
        Frame::ipv4(CLIENT4, to, proto::TCP, &tcp(port), Ipv4Options::default())
    };
    // `first` filters as asked; `second` is counted and passes everything.
    check(&h, first, &tcp4(first, 80), Expect::Pass);
    check(&h, first, &tcp4(first, 8443), Expect::Port);
    check(&h, second, &tcp4(second, 8443), Expect::Pass);
    // Once the filler is no longer wanted, the next reconcile frees its slots first and
    // applies everything.
    let observed = h.sink().entries().unwrap();
    h.sink().write(&diff(&wanted, &observed)).unwrap();
    assert_eq!(h.sink().entries().unwrap(), wanted);
    check(&h, second, &tcp4(second, 82), Expect::Pass);
    check(&h, second, &tcp4(second, 8443), Expect::Port);
}

/// Two tenants' Services whose source ranges hash alike under the 32-bit FNV-1a that once
/// named range sets (both sets hash to 0x631d62bf): each must still admit only its own
/// sources, whichever of them came first, and a second plan over what the maps hold changes
/// nothing (a restart renumbers nothing).
#[test]
fn range_sets_that_hash_alike_keep_each_tenant_to_its_own_sources() {
    use lbagent::{Desired, PortSpec, Protocol, Service, TrafficPolicy, diff, entries};
    let vip_a = Ipv4Addr::new(203, 0, 113, 20);
    let vip_b = Ipv4Addr::new(203, 0, 113, 21);
    let tenant = |name: &str, vip: Ipv4Addr, ranges: [&str; 2]| Service {
        name: name.into(),
        addresses: vec![vip.into()],
        ports: vec![PortSpec {
            port: 443,
            protocol: Protocol::Tcp,
        }],
        source_ranges: ranges.iter().map(|r| r.parse().unwrap()).collect(),
        traffic_policy: TrafficPolicy::Cluster,
    };
    let a = tenant("tenant-a/web", vip_a, ["10.82.50.0/24", "10.174.132.0/24"]);
    let b = tenant("tenant-b/web", vip_b, ["10.40.101.0/24", "10.163.208.0/24"]);
    let (from_a, from_b) = (Ipv4Addr::new(10, 82, 50, 7), Ipv4Addr::new(10, 40, 101, 7));
    let to = |src: Ipv4Addr, vip: Ipv4Addr| {
        Frame::ipv4(src, vip, proto::TCP, &tcp(443), Ipv4Options::default())
    };
    let reconcile = |h: &mut Harness, services: &[&Service]| {
        let desired = Desired::from_services(services.iter().copied());
        let observed = h.sink().entries().unwrap();
        let wanted = entries(&desired, |_| true, &observed);
        h.sink().write(&diff(&wanted, &observed)).unwrap();
        let observed = h.sink().entries().unwrap();
        let again = entries(&desired, |_| true, &observed);
        assert!(
            diff(&again, &observed).is_empty(),
            "a plan over what the maps hold renumbers nothing"
        );
    };
    for order in [[&a, &b], [&b, &a]] {
        let mut h = Harness::new();
        // One tenant first, then both: the second's set must not take the first's id.
        reconcile(&mut h, &order[..1]);
        reconcile(&mut h, &order);
        check(&h, vip_a.into(), &to(from_a, vip_a), Expect::Pass);
        check(&h, vip_a.into(), &to(from_b, vip_a), Expect::Source);
        check(&h, vip_b.into(), &to(from_b, vip_b), Expect::Pass);
        check(&h, vip_b.into(), &to(from_a, vip_b), Expect::Source);
    }
}
