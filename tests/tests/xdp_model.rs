//! The XDP program against its reference model (`tests/src/model.rs`): generated frames run
//! through BPF_PROG_TEST_RUN, and for every frame the verdict and every counter's change must
//! be what the model says. `cargo xtask test` runs a bounded sample; `cargo xtask fuzz-model`
//! runs a million frames or more (`LBAGENT_MODEL_FRAMES`, `LBAGENT_MODEL_SEED`).
//!
//! A disagreement is a bug in one of the two: fix it, and keep its frame as a case in
//! `decisions_the_readme_leaves_open` or a test of its own.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use ipnet::IpNet;
use lbagent_common::VipStats;
use lbagent_tests::{
    model::{Address, DropReason, ICMP, ICMPV6, Outcome, Policy, SCTP, TCP, UDP},
    testrun::{Harness, XDP_DROP, XDP_PASS},
};

/// Frames `cargo test` runs; `cargo xtask fuzz-model` asks for more.
const DEFAULT_FRAMES: u64 = 20_000;

const VIP4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const VIP4_COUNT_ONLY: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x10);
const VIP6_NO_PORTS: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x20);

/// Addresses of both kinds, served ports with and without source ranges, fragment ranges,
/// and a count-only address that still has a ranged port (what a port that did not fit
/// leaves behind).
fn policy() -> Policy {
    let net = |text: &str| -> IpNet { text.parse().expect("range") };
    let ranges = BTreeMap::from([
        (1, vec![net("10.0.0.0/8"), net("fd00::/8")]),
        (2, vec![net("10.0.0.0/8"), net("192.0.2.0/24")]),
        (3, vec![net("fd00::/8"), net("2001:db8:1::/48")]),
        (4, vec![net("192.0.2.128/25"), net("2001:db8:1:2::/64")]),
    ]);
    let address = |enforce, fragment_ranges, ports: &[(u8, u16, u32)]| Address {
        enforce,
        fragment_ranges,
        ports: ports
            .iter()
            .map(|(p, port, set)| ((*p, *port), *set))
            .collect(),
    };
    let addresses = BTreeMap::from([
        (
            IpAddr::from(VIP4),
            address(
                true,
                2,
                &[(TCP, 80, 0), (UDP, 53, 0), (TCP, 443, 1), (SCTP, 9000, 4)],
            ),
        ),
        (
            IpAddr::from(VIP4_COUNT_ONLY),
            address(false, 0, &[(TCP, 8080, 1)]),
        ),
        (
            IpAddr::from(VIP6),
            address(true, 3, &[(TCP, 80, 0), (UDP, 53, 3), (UDP, 443, 4)]),
        ),
        (IpAddr::from(VIP6_NO_PORTS), address(true, 0, &[])),
    ]);
    Policy { addresses, ranges }
}

/// The program with `policy` in its maps, written the way the agent writes them.
fn harness(policy: &Policy) -> Harness {
    let mut harness = Harness::new();
    for (set, ranges) in &policy.ranges {
        for range in ranges {
            harness.add_range(*set, range.addr(), range.prefix_len());
        }
    }
    for (ip, address) in &policy.addresses {
        harness.add_vip(*ip, address.enforce, address.fragment_ranges);
        for ((protocol, port), set) in &address.ports {
            harness.add_port(*ip, *protocol, *port, *set);
        }
    }
    harness
}

/// Every counter the program keeps for the policy's addresses and ports.
#[derive(Clone, PartialEq, Eq, Debug)]
struct Counters {
    addresses: BTreeMap<IpAddr, VipStats>,
    ports: BTreeMap<(IpAddr, u8, u16), (u64, u64)>,
}

fn counters(harness: &Harness, policy: &Policy) -> Counters {
    Counters {
        addresses: policy
            .addresses
            .keys()
            .map(|ip| (*ip, harness.stats(*ip)))
            .collect(),
        ports: policy
            .served_ports()
            .into_iter()
            .map(|(ip, protocol, port)| {
                ((ip, protocol, port), harness.port_stats(ip, protocol, port))
            })
            .collect(),
    }
}

/// The counters after `frame` has the outcome `outcome`.
fn expected(before: &Counters, outcome: &Outcome, len: u64) -> Counters {
    let mut after = before.clone();
    if let Some(ip) = outcome.counted {
        let stats = after.addresses.get_mut(&ip).expect("a policy address");
        stats.packets += 1;
        stats.bytes += len;
        match outcome.dropped {
            Some(DropReason::Port) => stats.drop_port += 1,
            Some(DropReason::Source) => stats.drop_source += 1,
            Some(DropReason::Protocol) => stats.drop_protocol += 1,
            Some(DropReason::Icmp) => stats.drop_icmp += 1,
            Some(DropReason::Malformed) => stats.drop_malformed += 1,
            None => {}
        }
    }
    if let Some(port) = outcome.port {
        let (packets, bytes) = after.ports.get_mut(&port).expect("a served port");
        *packets += 1;
        *bytes += len;
    }
    after
}

/// How often each kind of outcome came up: a run that never reaches a branch proves
/// nothing about it.
#[derive(Default, Debug)]
struct Tally {
    not_ours: u64,
    passed: u64,
    port_counted: u64,
    dropped: BTreeMap<DropReason, u64>,
}

impl Tally {
    fn add(&mut self, outcome: &Outcome) {
        match (outcome.counted, outcome.dropped) {
            (None, _) => self.not_ours += 1,
            (Some(_), None) => self.passed += 1,
            (Some(_), Some(reason)) => *self.dropped.entry(reason).or_default() += 1,
        }
        self.port_counted += u64::from(outcome.port.is_some());
    }

    fn assert_every_branch(&self) {
        assert!(
            self.not_ours > 0 && self.passed > 0 && self.port_counted > 0,
            "{self:?}"
        );
        for reason in [
            DropReason::Port,
            DropReason::Source,
            DropReason::Protocol,
            DropReason::Icmp,
            DropReason::Malformed,
        ] {
            assert!(
                self.dropped.contains_key(&reason),
                "no {reason:?} drop: {self:?}"
            );
        }
    }
}

/// Runs `frames` through the program and the model; returns the frames they disagree on
/// (at most `keep`), each with what the model and the program did.
fn disagreements(
    policy: &Policy,
    frames: impl Iterator<Item = Vec<u8>>,
    keep: usize,
    tally: &mut Tally,
) -> Vec<String> {
    let harness = harness(policy);
    let mut before = counters(&harness, policy);
    let mut found = Vec::new();
    for frame in frames {
        let outcome = policy.decide(&frame);
        tally.add(&outcome);
        let verdict = harness.verdict(&frame);
        let after = counters(&harness, policy);
        let want = expected(&before, &outcome, frame.len() as u64);
        let want_verdict = if outcome.pass { XDP_PASS } else { XDP_DROP };
        // The next frame starts from what the program did, so one disagreement does not
        // hide the next.
        if (verdict != want_verdict || after != want) && found.len() < keep {
            found.push(format!(
                "frame {}\n  model: {outcome:?}\n  program: verdict {verdict}, counters {}",
                hex(&frame),
                difference(&before, &after)
            ));
        }
        before = after;
    }
    found
}

/// What changed between two snapshots, for a report.
fn difference(before: &Counters, after: &Counters) -> String {
    let mut changes = Vec::new();
    for (ip, stats) in &after.addresses {
        if before.addresses[ip] != *stats {
            changes.push(format!("{ip}: {:?} -> {stats:?}", before.addresses[ip]));
        }
    }
    for (port, counts) in &after.ports {
        if before.ports[port] != *counts {
            changes.push(format!("{port:?}: {:?} -> {counts:?}", before.ports[port]));
        }
    }
    if changes.is_empty() {
        "unchanged".to_owned()
    } else {
        changes.join("; ")
    }
}

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

/// SplitMix64: a small, fast, seedable generator, so a run is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Frames that reach every branch: tags (none, 802.1Q, QinQ, one too many), IPv4 with any
/// header length and fragment fields, IPv6 with extension-header chains (fragments first and
/// later), TCP, UDP, SCTP, ICMP, ICMPv6 and odd protocols, addresses on and off the policy,
/// sources in and out of its ranges, served and unserved ports, then cut at any length or
/// with a byte changed.
struct Frames {
    rng: Rng,
}

impl Frames {
    fn v4_address(&mut self, destination: bool) -> Ipv4Addr {
        let rng = &mut self.rng;
        if destination {
            match rng.below(10) {
                0..=5 => VIP4,
                6..=7 => VIP4_COUNT_ONLY,
                8 => Ipv4Addr::new(203, 0, 113, rng.byte()),
                _ => Ipv4Addr::from(rng.next() as u32),
            }
        } else {
            match rng.below(6) {
                0 => Ipv4Addr::new(10, rng.byte(), rng.byte(), rng.byte()),
                1 => Ipv4Addr::new(192, 0, 2, rng.byte()),
                2 => Ipv4Addr::new(192, 0, 2, 128 | rng.byte()),
                3 => Ipv4Addr::new(11, 0, 0, 1),
                _ => Ipv4Addr::from(rng.next() as u32),
            }
        }
    }

    fn v6_address(&mut self, destination: bool) -> Ipv6Addr {
        let rng = &mut self.rng;
        if destination {
            match rng.below(10) {
                0..=4 => VIP6,
                5..=6 => VIP6_NO_PORTS,
                // The IPv4 addresses, mapped: not the same addresses.
                7 => VIP4.to_ipv6_mapped(),
                8 => Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, rng.next() as u16),
                _ => Ipv6Addr::from(u128::from(rng.next()) << 64 | u128::from(rng.next())),
            }
        } else {
            let low = rng.next();
            match rng.below(5) {
                0 => Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(low)),
                1 => Ipv6Addr::from(0x2001_0db8_0001_0002_u128 << 64 | u128::from(low)),
                2 => Ipv6Addr::from(0x2001_0db8_0001_0003_u128 << 64 | u128::from(low)),
                _ => Ipv6Addr::from(u128::from(rng.next()) << 64 | u128::from(low)),
            }
        }
    }

    fn protocol(&mut self, v6: bool) -> u8 {
        let rng = &mut self.rng;
        match rng.below(20) {
            0..=5 => TCP,
            6..=10 => UDP,
            11..=12 => SCTP,
            13..=15 => {
                if v6 {
                    ICMPV6
                } else {
                    ICMP
                }
            }
            16 => {
                if v6 {
                    ICMP
                } else {
                    ICMPV6
                }
            }
            _ => rng.byte(),
        }
    }

    fn transport(&mut self, protocol: u8) -> Vec<u8> {
        let rng = &mut self.rng;
        let mut header = match protocol {
            TCP | UDP | SCTP => {
                let port = match rng.below(4) {
                    0..=1 => rng.pick(&[80, 53, 443, 8080, 9000, 81]),
                    2 => rng.pick(&[0, 65535, 1]),
                    _ => rng.next() as u16,
                };
                let mut h = vec![rng.byte(), rng.byte()];
                h.extend_from_slice(&port.to_be_bytes());
                h.resize(if protocol == TCP { 20 } else { 12 }, 0);
                h
            }
            ICMP | ICMPV6 => {
                let (kind, code) = if rng.chance(70) {
                    rng.pick(&[
                        (0, 0),
                        (8, 0),
                        (3, 4),
                        (3, 3),
                        (11, 0),
                        (128, 0),
                        (129, 0),
                        (2, 0),
                        (1, 4),
                        (135, 0),
                        (8, 9),
                    ])
                } else {
                    (rng.byte(), rng.byte())
                };
                vec![kind, code, 0, 0, 0, 1, 0, 1]
            }
            _ => (0..8).map(|_| rng.byte()).collect(),
        };
        let payload = rng.below(24) as usize;
        header.extend((0..payload).map(|_| rng.byte()));
        header
    }

    fn ipv4(&mut self) -> Vec<u8> {
        let protocol = self.protocol(false);
        let source = self.v4_address(false);
        let destination = self.v4_address(true);
        let rng = &mut self.rng;
        let words: u8 = match rng.below(20) {
            0..=15 => 5,
            16..=18 => 6 + rng.below(10) as u8,
            _ => rng.below(5) as u8,
        };
        let fragment: u16 = match rng.below(10) {
            0..=6 => 0,
            7 => 0x2000,
            8 => rng.next() as u16 & 0x1fff,
            _ => rng.next() as u16,
        };
        let mut ip = vec![0x40 | words, 0, 0, 0, 0, 1];
        ip.extend_from_slice(&fragment.to_be_bytes());
        ip.extend_from_slice(&[64, protocol, 0, 0]);
        ip.extend_from_slice(&source.octets());
        ip.extend_from_slice(&destination.octets());
        if words > 5 {
            ip.extend((0..(usize::from(words) - 5) * 4).map(|_| rng.pick(&[1, 0, 7, 0x44])));
        }
        let l4 = self.transport(protocol);
        ip.extend_from_slice(&l4);
        let total = ip.len() as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip
    }

    fn ipv6(&mut self) -> Vec<u8> {
        let protocol = self.protocol(true);
        let source = self.v6_address(false);
        let destination = self.v6_address(true);
        let rng = &mut self.rng;
        let count = match rng.below(10) {
            0..=4 => 0,
            5..=6 => 1,
            7 => 2,
            8 => 3 + rng.below(2),
            _ => 5 + rng.below(2),
        };
        let kinds: Vec<u8> = (0..count)
            .map(|_| rng.pick(&[0, 43, 60, 51, 44, 44]))
            .collect();
        let mut chain = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            let next = kinds.get(i + 1).copied().unwrap_or(protocol);
            if *kind == 44 {
                let offset: u16 = if rng.chance(60) {
                    0
                } else {
                    rng.next() as u16 & 0x1fff
                };
                let field = (offset << 3) | u16::from(rng.chance(50));
                chain.extend_from_slice(&[next, 0]);
                chain.extend_from_slice(&field.to_be_bytes());
                chain.extend_from_slice(&[0, 0, 0, 7]);
            } else {
                let units = rng.below(3) as usize;
                let len = if *kind == 51 {
                    (units + 2) * 4
                } else {
                    (units + 1) * 8
                };
                chain.push(next);
                chain.push(units as u8);
                chain.extend((2..len).map(|_| rng.byte()));
            }
        }
        let first = kinds.first().copied().unwrap_or(protocol);
        let l4 = self.transport(protocol);
        let mut ip = vec![0x60, 0, 0, 0];
        ip.extend_from_slice(&((chain.len() + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[first, 64]);
        ip.extend_from_slice(&source.octets());
        ip.extend_from_slice(&destination.octets());
        ip.extend_from_slice(&chain);
        ip.extend_from_slice(&l4);
        ip
    }
}

impl Iterator for Frames {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        let mut frame = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01];
        let tags = match self.rng.below(20) {
            0..=11 => 0,
            12..=15 => 1,
            16..=18 => 2,
            _ => 3,
        };
        for _ in 0..tags {
            let tpid: u16 = self.rng.pick(&[0x8100, 0x88a8]);
            frame.extend_from_slice(&tpid.to_be_bytes());
            frame.extend_from_slice(&(self.rng.next() as u16 & 0x0fff).to_be_bytes());
        }
        let (ether_type, l3) = match self.rng.below(20) {
            0..=8 => (0x0800u16, self.ipv4()),
            9..=17 => (0x86dd, self.ipv6()),
            18 => (0x0806, (0..28).map(|_| self.rng.byte()).collect()),
            _ => (
                self.rng.next() as u16,
                (0..40).map(|_| self.rng.byte()).collect(),
            ),
        };
        frame.extend_from_slice(&ether_type.to_be_bytes());
        frame.extend_from_slice(&l3);
        if self.rng.chance(5) {
            let at = self.rng.below(frame.len() as u64) as usize;
            frame[at] ^= 1 << self.rng.below(8);
        }
        if self.rng.chance(30) {
            // BPF_PROG_TEST_RUN takes no frame shorter than an Ethernet header.
            let len = 14 + self.rng.below(frame.len() as u64 - 13) as usize;
            frame.truncate(len);
        }
        Some(frame)
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

#[test]
fn the_program_agrees_with_the_model_on_generated_frames() {
    let frames = env_number("LBAGENT_MODEL_FRAMES", DEFAULT_FRAMES);
    let seed = env_number("LBAGENT_MODEL_SEED", 0x1b_a6e7);
    let policy = policy();
    let started = Instant::now();
    let generated = Frames { rng: Rng(seed) }.take(frames as usize);
    let mut tally = Tally::default();
    let found = disagreements(&policy, generated, 20, &mut tally);
    eprintln!(
        "model: {frames} frames (seed {seed}) in {:.1} s, {} disagreements; {tally:?}",
        started.elapsed().as_secs_f64(),
        found.len()
    );
    tally.assert_every_branch();
    assert!(
        found.is_empty(),
        "the program and the model disagree (seed {seed}):\n{}",
        found.join("\n")
    );
}

#[test]
fn every_truncation_of_every_frame_shape_agrees_with_the_model() {
    let policy = policy();
    // A few frames of each shape, each cut at every length.
    let shapes: Vec<Vec<u8>> = Frames { rng: Rng(7) }
        .filter(|frame| frame.len() > 40)
        .take(200)
        .collect();
    let cut = shapes
        .iter()
        .flat_map(|frame| (14..=frame.len()).map(|len| frame[..len].to_vec()));
    let mut tally = Tally::default();
    let found = disagreements(&policy, cut, 20, &mut tally);
    assert!(found.is_empty(), "{}", found.join("\n"));
    tally.assert_every_branch();
}

/// What the README leaves open, decided in the model and said in the README: each frame
/// with the outcome both must give.
#[test]
fn decisions_the_readme_leaves_open() {
    use lbagent_tests::frame::{ETHERTYPE_8021Q, Ext, Frame, Ipv4Options, tcp};
    let policy = policy();
    let outsider = Ipv4Addr::new(11, 0, 0, 1);
    let client6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
    let counted = |ip: IpAddr, dropped: Option<DropReason>| Outcome {
        pass: dropped.is_none(),
        counted: Some(ip),
        dropped,
        port: None,
    };
    let mut version_six =
        Frame::ipv4(outsider, VIP4, TCP, &tcp(80), Ipv4Options::default()).bytes();
    version_six[14] = 0x65;
    let cases = [
        (
            "a ranged port of a count-only address still checks its sources",
            Frame::ipv4(
                outsider,
                VIP4_COUNT_ONLY,
                TCP,
                &tcp(8080),
                Ipv4Options::default(),
            )
            .bytes(),
            counted(VIP4_COUNT_ONLY.into(), Some(DropReason::Source)),
        ),
        (
            "past four extension headers, the next one is an unknown protocol",
            Frame::ipv6(client6, VIP6, &[Ext::HopByHop; 5], TCP, &tcp(80)).bytes(),
            counted(VIP6.into(), Some(DropReason::Protocol)),
        ),
        (
            "a third VLAN tag hides the IP header",
            Frame::ipv4(outsider, VIP4, TCP, &tcp(80), Ipv4Options::default())
                .tagged(ETHERTYPE_8021Q, 1)
                .tagged(ETHERTYPE_8021Q, 2)
                .tagged(ETHERTYPE_8021Q, 3)
                .bytes(),
            Outcome {
                pass: true,
                counted: None,
                dropped: None,
                port: None,
            },
        ),
        (
            "the EtherType, not the version nibble, says which IP it is",
            version_six,
            Outcome {
                port: Some((VIP4.into(), TCP, 80)),
                ..counted(VIP4.into(), None)
            },
        ),
    ];
    for (what, frame, outcome) in &cases {
        assert_eq!(policy.decide(frame), *outcome, "model: {what}");
    }
    let found = disagreements(
        &policy,
        cases.into_iter().map(|(_, frame, _)| frame),
        20,
        &mut Tally::default(),
    );
    assert!(found.is_empty(), "{}", found.join("\n"));
}
