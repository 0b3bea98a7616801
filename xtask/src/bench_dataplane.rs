//! `cargo xtask bench dataplane`: the XDP program's per-packet cost through
//! BPF_PROG_TEST_RUN, as the median paired difference against a trivial XDP_PASS program
//! built by the same toolchain, measured in interleaved rounds in the same run (the method of
//! shared/notes/measuring.md), and the verifier's instruction counts.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions,
    maps::{Array, LpmTrie, MapData, lpm_trie::Key},
    programs::{SchedClassifier, Xdp},
};
use lbagent_common::{
    Bucket, PortConfig, RangeKeyV4, TC_EGRESS_PROGRAM, TableEntry, VIP_ENFORCE, VipConfig,
    XDP_PROGRAM, buckets_of, maps, port_key, proto, vip4_key, vip6_key,
};

use crate::{build_ebpf, cmd};

const BASELINE: &str = "lbagent_pass";
const WARMUP: u32 = 100_000;
const REPEAT: u32 = 200_000;
const ROUNDS: usize = 31;

pub fn run() -> Result<()> {
    cmd::require_root("bench dataplane")?;
    // The agent's build script builds the object; nothing else is needed.
    let object = build_ebpf::run()?;
    // One CPU, no bpf_stats: the kernel's own timing, with nothing else added per run.
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &{
        let mut set = nix::sched::CpuSet::new();
        set.set(0)?;
        set
    })?;
    let stats_before =
        std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0").context("turning bpf_stats off")?;
    let result = measure(&object);
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
    result
}

fn measure(object: &PathBuf) -> Result<()> {
    let bytes = std::fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    let mut ebpf = EbpfLoader::new().load(&bytes)?;
    for name in [XDP_PROGRAM, BASELINE] {
        let program: &mut Xdp = ebpf.program_mut(name).context("program")?.try_into()?;
        program.load()?;
    }
    let egress: &mut SchedClassifier = ebpf
        .program_mut(TC_EGRESS_PROGRAM)
        .context("program")?
        .try_into()?;
    egress.load()?;
    let vip4: IpAddr = "203.0.113.10".parse()?;
    let vip6: IpAddr = "2001:db8:ff::10".parse()?;
    serve(&mut ebpf, vip4, 1)?;
    serve(&mut ebpf, vip6, 2)?;

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "non-LB packet (UDP, IPv4)",
            frame4("203.0.113.99", proto::UDP, 80),
        ),
        (
            "allowed LB packet, TCP IPv4",
            frame4("203.0.113.10", proto::TCP, 80),
        ),
        (
            "allowed LB packet, UDP IPv4",
            frame4("203.0.113.10", proto::UDP, 53),
        ),
        ("allowed LB packet, TCP IPv6", frame6(proto::TCP, 80)),
        ("allowed LB packet, UDP IPv6", frame6(proto::UDP, 53)),
        (
            "LB packet checked against source ranges (TCP 443, IPv4)",
            frame4("203.0.113.10", proto::TCP, 443),
        ),
        (
            "denied LB packet (TCP port 81, IPv4)",
            frame4("203.0.113.10", proto::TCP, 81),
        ),
    ];
    let run = |ebpf: &Ebpf, name: &str, frame: &[u8], repeat: u32| -> Result<(u32, Duration)> {
        let program: &Xdp = ebpf.program(name).context("program")?.try_into()?;
        let result = program.test_run(TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..Default::default()
        })?;
        Ok((result.return_value, result.duration))
    };

    println!();
    println!(
        "BPF_PROG_TEST_RUN on CPU 0, bpf_stats off; {ROUNDS} interleaved rounds of {REPEAT} repeats; 60-92 byte frames"
    );
    println!(
        "| packet | verdict | trivial XDP_PASS | lbagent_xdp | median difference (quartiles) | ratio | target |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | --- |");
    for (label, frame) in &cases {
        run(&ebpf, BASELINE, frame, WARMUP)?;
        let (verdict, _) = run(&ebpf, XDP_PROGRAM, frame, WARMUP)?;
        let (mut base, mut ours, mut diffs, mut ratios) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let b = run(&ebpf, BASELINE, frame, REPEAT)?.1.as_secs_f64() * 1e9;
            let o = run(&ebpf, XDP_PROGRAM, frame, REPEAT)?.1.as_secs_f64() * 1e9;
            base.push(b);
            ours.push(o);
            diffs.push(o - b);
            ratios.push(o / b);
        }
        let limit = if label.starts_with("non-LB") {
            Some(12.0)
        } else if label.starts_with("allowed") {
            Some(45.0)
        } else {
            None
        };
        let difference = quantile(&mut diffs, 0.5);
        println!(
            "| {label} | {} | {:.0} ns | {:.0} ns | {:+.0} ns ({:+.0} to {:+.0}) | {:.2} | {} |",
            match verdict {
                1 => "drop",
                2 => "pass",
                _ => "other",
            },
            quantile(&mut base, 0.5),
            quantile(&mut ours, 0.5),
            difference,
            quantile(&mut diffs, 0.25),
            quantile(&mut diffs, 0.75),
            quantile(&mut ratios, 0.5),
            limit.map_or(String::new(), |limit| format!(
                "<= +{limit:.0} ns: {}",
                if difference <= limit {
                    "met"
                } else {
                    "NOT met"
                }
            )),
        );
    }

    println!();
    println!("| program | verified instructions | JIT-compiled bytes |");
    println!("| --- | ---: | ---: |");
    for name in [XDP_PROGRAM, TC_EGRESS_PROGRAM, BASELINE] {
        let info = match ebpf.program(name).context("program")? {
            aya::programs::Program::Xdp(program) => program.info()?,
            aya::programs::Program::SchedClassifier(program) => program.info()?,
            _ => anyhow::bail!("{name}: unexpected program type"),
        };
        println!(
            "| {name} | {} | {} |",
            info.verified_instruction_count()
                .map_or("n/a".into(), |n| n.to_string()),
            info.size_jitted()
        );
    }
    Ok(())
}

/// Enforcing address in `slot` with TCP 80 and UDP 53 served from anywhere, and TCP 443 from
/// 10.0.0.0/8 (range set 1). Written by hand into the tables, as lbagent writes them.
fn serve(ebpf: &mut Ebpf, vip: IpAddr, slot: u32) -> Result<()> {
    let mut configs: Array<_, VipConfig> =
        Array::try_from(ebpf.map_mut(maps::VIP_CONFIG).context("map")?)?;
    configs.set(slot, VipConfig::new(vip, VIP_ENFORCE, 0), 0)?;
    let (table, key) = match vip {
        IpAddr::V4(v4) => (maps::VIPS_V4, vip4_key(v4.octets())),
        IpAddr::V6(v6) => (maps::VIPS_V6, vip6_key(v6.octets())),
    };
    insert(ebpf, table, maps::VIP_BUCKETS, key, slot)?;
    for (i, (protocol, port, ranges)) in [
        (proto::TCP, 80, 0),
        (proto::UDP, 53, 0),
        (proto::TCP, 443, 1),
    ]
    .into_iter()
    .enumerate()
    {
        let port_slot = slot * 8 + i as u32;
        let mut ports: Array<_, PortConfig> =
            Array::try_from(ebpf.map_mut(maps::PORT_CONFIG).context("map")?)?;
        let config = PortConfig {
            vip: slot,
            port,
            protocol,
            ranges,
            ..Default::default()
        };
        ports.set(port_slot, config, 0)?;
        insert(
            ebpf,
            maps::PORTS,
            maps::PORT_BUCKETS,
            port_key(slot, protocol, port),
            port_slot,
        )?;
    }
    let mut ranges: LpmTrie<_, RangeKeyV4, u8> =
        LpmTrie::try_from(ebpf.map_mut(maps::RANGES_V4).context("map")?)?;
    let key = Key::new(
        32 + 8,
        RangeKeyV4 {
            set: 1u32.to_be_bytes(),
            addr: [10, 0, 0, 0],
        },
    );
    ranges.insert(&key, 1, 0)?;
    Ok(())
}

/// Puts `key -> slot` in the first free way of its first bucket.
fn insert(ebpf: &mut Ebpf, table: &str, buckets: u32, key: u64, slot: u32) -> Result<()> {
    let mut array: Array<&mut MapData, Bucket> =
        Array::try_from(ebpf.map_mut(table).context("map")?)?;
    let index = buckets_of(key, buckets).0;
    let mut bucket = array.get(&index, 0)?;
    let way = bucket
        .ways
        .iter_mut()
        .find(|way| way.slot == 0)
        .context("bucket full")?;
    *way = TableEntry { key, slot, _pad: 0 };
    array.set(index, bucket, 0)?;
    Ok(())
}

fn l4(protocol: u8, port: u16) -> Vec<u8> {
    let mut h = vec![0x9c, 0x40];
    h.extend_from_slice(&port.to_be_bytes());
    h.resize(if protocol == proto::TCP { 20 } else { 8 }, 0);
    if protocol == proto::TCP {
        h[12] = 0x50;
        h[13] = 0x02;
    } else {
        h[4..6].copy_from_slice(&8u16.to_be_bytes());
    }
    h.resize(h.len() + 18, 0xab);
    h
}

fn frame4(dst: &str, protocol: u8, port: u16) -> Vec<u8> {
    let dst: std::net::Ipv4Addr = dst.parse().expect("address");
    let l4 = l4(protocol, port);
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x40, 0, 64, protocol, 0, 0, 10, 0, 0, 1]);
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&l4);
    f
}

fn frame6(protocol: u8, port: u16) -> Vec<u8> {
    let l4 = l4(protocol, port);
    let mut f = vec![
        0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x86, 0xdd, 0x60, 0, 0, 0,
    ];
    f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    f.extend_from_slice(&[protocol, 64]);
    f.extend_from_slice(
        &"fd00::1"
            .parse::<std::net::Ipv6Addr>()
            .expect("address")
            .octets(),
    );
    f.extend_from_slice(
        &"2001:db8:ff::10"
            .parse::<std::net::Ipv6Addr>()
            .expect("address")
            .octets(),
    );
    f.extend_from_slice(&l4);
    f
}

/// The `q` quantile (0.5: the median) of `values`, nearest rank.
fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * q).round() as usize]
}
