//! `cargo xtask bench failover`: local (L2) addresses.
//!
//! Failover: three nodes and a client on one bridge, in namespaces. The client sends an ARP
//! request for the address every 10 ms; a fault hits the node answering (its link set down,
//! or its processes frozen with SIGSTOP); the time is from the fault to the first answer
//! from another node. lbagent (membership, agent, XDP responder, generic mode on the veths)
//! and keepalived (VRRPv3, 100 ms adverts, the classic L2 failover) run on the same topology
//! in the same run, one after the other, `ROUNDS` faults of each kind each.
//!
//! Then what the XDP neighbour responder adds to every other frame, through
//! BPF_PROG_TEST_RUN: `lbagent_xdp` against `lbagent_xdp_no_l2` (the same program without
//! the responder's hook, in the eBPF crate's bench object), both with the same addresses
//! served, median paired difference over interleaved rounds on one CPU with bpf_stats off
//! (shared/notes/measuring.md, section 1).

mod failover;

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap, PerCpuHashMap, PerCpuValues};
use lbagent_common::{
    NEIGHBOUR_ANSWER, NEIGHBOUR_SILENT, NeighbourEntry, NeighbourKey, NeighbourStats, XDP_PROGRAM,
    maps, proto,
};

use crate::{
    bench_dataplane::{self, frame6, load_serving, quantile},
    build_ebpf::{self, Objects},
    cmd,
};

const WITHOUT_RESPONDER: &str = "lbagent_xdp_no_l2";
const WARMUP: u32 = 100_000;
const REPEAT: u32 = 200_000;
const ROUNDS: usize = 31;
/// Target for what the responder may add to a frame that is not ARP or neighbour discovery.
const LIMIT_NS: f64 = 2.0;

pub fn run() -> Result<()> {
    cmd::require_root("bench failover")?;
    cmd::cargo(&["build", "--quiet", "--release", "--package", "lbagent"])?;
    failover::run(&crate::bench::target_dir().join("release/lbagent"))?;
    let objects = build_ebpf::run()?;
    bench_dataplane::quiet_test_runs(|| responder_cost(&objects))
}

fn responder_cost(objects: &Objects) -> Result<()> {
    let without = load_serving(&objects.bench, WITHOUT_RESPONDER)?;
    let mut ebpf = load_serving(&objects.production, XDP_PROGRAM)?;
    // A populated neighbour map, as on a node: some addresses owned, more silenced.
    let cpus = aya::util::nr_cpus().map_err(|(_, err)| err)?;
    for i in 0..64u8 {
        let role = if i % 4 == 0 {
            NEIGHBOUR_ANSWER
        } else {
            NEIGHBOUR_SILENT
        };
        let entry = NeighbourEntry {
            ifindex: 1,
            mac: [2, 0, 0, 0, 0, 1],
            role,
            _pad: 0,
        };
        for address in [
            IpAddr::from([10, 0, 1, i]),
            IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 1, u16::from(i)]),
        ] {
            let key = NeighbourKey::new(address);
            let mut entries: HashMap<_, NeighbourKey, NeighbourEntry> =
                HashMap::try_from(ebpf.map_mut(maps::NEIGHBOURS).context("map")?)?;
            entries.insert(key, entry, 0)?;
            let mut stats: PerCpuHashMap<_, NeighbourKey, NeighbourStats> =
                PerCpuHashMap::try_from(ebpf.map_mut(maps::NEIGHBOUR_STATS).context("map")?)?;
            stats.insert(
                key,
                PerCpuValues::try_from(vec![NeighbourStats::default(); cpus])?,
                0,
            )?;
        }
    }

    // The frames the responder must not slow down (the non-LB and allowed ones of
    // `bench dataplane`, QinQ and UDP to an LB address aside), then two it looks into.
    let mut cases: Vec<(&str, Vec<u8>, bool)> = bench_dataplane::cases()
        .into_iter()
        .filter(|(label, _)| {
            label.starts_with("non-LB packet (UDP, IPv") && !label.contains("QinQ")
                || label.starts_with("allowed LB packet, TCP")
        })
        .map(|(label, frame)| (label, frame, true))
        .collect();
    cases.push(("ICMPv6 echo to a non-LB address", echo6(), false));
    cases.push((
        "ARP request for an address not in the map",
        arp_request([10, 0, 9, 9]),
        false,
    ));
    let run = bench_dataplane::test_run;

    println!();
    println!(
        "What the neighbour responder adds: BPF_PROG_TEST_RUN on CPU 0, bpf_stats off; {ROUNDS} interleaved rounds of {REPEAT} repeats"
    );
    println!(
        "| frame | {WITHOUT_RESPONDER} | lbagent_xdp | median difference (quartiles) | target |"
    );
    println!("| --- | ---: | ---: | ---: | --- |");
    for (label, frame, targeted) in &cases {
        run(&without, WITHOUT_RESPONDER, frame, WARMUP)?;
        run(&ebpf, XDP_PROGRAM, frame, WARMUP)?;
        let (mut base, mut ours, mut diffs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let b = run(&without, WITHOUT_RESPONDER, frame, REPEAT)?
                .1
                .as_secs_f64()
                * 1e9;
            let o = run(&ebpf, XDP_PROGRAM, frame, REPEAT)?.1.as_secs_f64() * 1e9;
            base.push(b);
            ours.push(o);
            diffs.push(o - b);
        }
        let difference = quantile(&mut diffs, 0.5);
        println!(
            "| {label} | {:.0} ns | {:.0} ns | {:+.1} ns ({:+.0} to {:+.0}) | {} |",
            quantile(&mut base, 0.5),
            quantile(&mut ours, 0.5),
            difference,
            quantile(&mut diffs, 0.25),
            quantile(&mut diffs, 0.75),
            if *targeted {
                format!(
                    "<= +{LIMIT_NS:.0} ns: {}",
                    if difference <= LIMIT_NS {
                        "met"
                    } else {
                        "NOT met"
                    }
                )
            } else {
                String::new()
            }
        );
    }
    Ok(())
}

fn echo6() -> Vec<u8> {
    let mut frame = frame6("2001:db8:ff::99", proto::ICMPV6, 0);
    // frame6 wrote a UDP-shaped header: make it an echo request (type 128).
    frame[54] = 128;
    frame[55] = 0;
    frame
}

fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&[2, 0, 0, 0, 0, 9, 10, 0, 9, 1]);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&target);
    frame.resize(60, 0);
    frame
}
