//! `cargo xtask bench dataplane`: the XDP program's per-packet cost through
//! BPF_PROG_TEST_RUN, as the median paired difference against a trivial XDP_PASS program
//! built by the same toolchain, measured in interleaved rounds in the same run (the method of
//! shared/notes/measuring.md), and the verifier's instruction counts.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunOptions,
    maps::{HashMap, PerCpuHashMap, PerCpuValues},
    programs::Xdp,
};
use lbagent_common::{
    PortKey, PortPolicy, PortStats, VIP_ENFORCE, VipConfig, VipKey, VipStats, XDP_PROGRAM, maps,
    proto,
};

use crate::cmd;

const BASELINE: &str = "lbagent_pass";
const WARMUP: u32 = 100_000;
const REPEAT: u32 = 200_000;
const ROUNDS: usize = 31;

pub fn run() -> Result<()> {
    cmd::require_root("bench dataplane")?;
    cmd::cargo(&["build", "--quiet", "--release", "--package", "lbagent"])?;
    let object = crate::bench::target_dir().join("bpf/bpfel-unknown-none/release/lbagent-ebpf");
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
    let vip4: IpAddr = "203.0.113.10".parse()?;
    let vip6: IpAddr = "2001:db8:ff::10".parse()?;
    for vip in [vip4, vip6] {
        serve(&mut ebpf, vip)?;
    }

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
        "dataplane benchmark: BPF_PROG_TEST_RUN on CPU 0, bpf_stats off; {ROUNDS} interleaved rounds of {REPEAT} repeats; 64-120 byte frames"
    );
    println!(
        "| packet | verdict | trivial XDP_PASS | lbagent_xdp | median difference | ratio | target |"
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
        let target = if label.starts_with("non-LB") {
            "<= +12 ns"
        } else if label.starts_with("allowed") {
            "<= +45 ns"
        } else {
            ""
        };
        println!(
            "| {label} | {} | {:.1} ns | {:.1} ns | {:+.1} ns | {:.2} | {target} |",
            match verdict {
                1 => "drop",
                2 => "pass",
                _ => "other",
            },
            median(base),
            median(ours),
            median(diffs),
            median(ratios)
        );
    }

    println!();
    println!("| program | verified instructions | translated bytes |");
    println!("| --- | ---: | ---: |");
    for name in [XDP_PROGRAM, BASELINE] {
        let program: &Xdp = ebpf.program(name).context("program")?.try_into()?;
        let info = program.info()?;
        println!(
            "| {name} | {} | {} |",
            info.verified_instruction_count()
                .map_or("n/a".into(), |n| n.to_string()),
            info.size_translated()
                .map_or("n/a".into(), |n| n.to_string())
        );
    }
    Ok(())
}

/// Enforcing address with TCP 80 and UDP 53 served, counters in place.
fn serve(ebpf: &mut Ebpf, vip: IpAddr) -> Result<()> {
    let key = VipKey::from(vip);
    let cpus = aya::util::nr_cpus().map_err(|(_, err)| err)?;
    let mut stats: PerCpuHashMap<_, VipKey, VipStats> =
        PerCpuHashMap::try_from(ebpf.map_mut(maps::VIP_STATS).context("map")?)?;
    stats.insert(
        key,
        PerCpuValues::try_from(vec![VipStats::default(); cpus])?,
        0,
    )?;
    let mut vips: HashMap<_, VipKey, VipConfig> =
        HashMap::try_from(ebpf.map_mut(maps::VIPS).context("map")?)?;
    vips.insert(
        key,
        VipConfig {
            flags: VIP_ENFORCE,
            fragment_ranges: 0,
        },
        0,
    )?;
    for (protocol, port) in [(proto::TCP, 80), (proto::UDP, 53)] {
        let port_key = PortKey::new(key, protocol, port);
        let mut port_stats: PerCpuHashMap<_, PortKey, PortStats> =
            PerCpuHashMap::try_from(ebpf.map_mut(maps::PORT_STATS).context("map")?)?;
        port_stats.insert(
            port_key,
            PerCpuValues::try_from(vec![PortStats::default(); cpus])?,
            0,
        )?;
        let mut ports: HashMap<_, PortKey, PortPolicy> =
            HashMap::try_from(ebpf.map_mut(maps::PORTS).context("map")?)?;
        ports.insert(port_key, PortPolicy { ranges: 0 }, 0)?;
    }
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

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
