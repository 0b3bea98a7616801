//! `cargo xtask bench dataplane`: the XDP program's per-packet cost through
//! BPF_PROG_TEST_RUN, as the median paired difference against a trivial XDP_PASS program
//! built by the same toolchain, measured in interleaved rounds in the same run (the method of
//! shared/notes/measuring.md), and as a ratio to the floor (a program that parses and does
//! one array lookup), which holds where nanoseconds move between machines; the verifier's
//! instruction counts; and the drop of filtered traffic on a real receive path.
//!
//! The reference programs come from the eBPF crate's bench object, `lbagent_xdp` from the
//! production object the agent embeds.

use std::{
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader, TestRun as _, TestRunAttrs, TestRunOptions,
    maps::{Array, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{SchedClassifier, Xdp, XdpMode},
};
use lbagent_common::{
    Bucket, PortConfig, RangeKeyV4, TC_EGRESS_PROGRAM, TableEntry, VIP_ENFORCE, VipConfig,
    VipStats, XDP_PROGRAM, buckets_of, filter_index_of, maps, port_key, proto, vip4_key, vip6_key,
};

use crate::{
    build_ebpf::{self, Objects},
    cmd,
};

const BASELINE: &str = "lbagent_pass";
const FLOOR: &str = "lbagent_floor";
const WARMUP: u32 = 100_000;
const REPEAT: u32 = 500_000;
const ROUNDS: usize = 101;
/// `lbagent_xdp`'s cost for a non-LB packet over the floor's (both over the trivial program).
const FLOOR_RATIO_GOAL: f64 = 1.2;

/// `compare`: another production object whose `lbagent_xdp` is measured alongside (say, the
/// previous commit's), so that a change is judged within one run.
pub fn run(compare: Option<PathBuf>) -> Result<()> {
    cmd::require_root("bench dataplane")?;
    // The agent's build script builds both objects; nothing else is needed.
    let objects = build_ebpf::run()?;
    quiet_test_runs(|| measure(&objects, compare.as_deref()))
}

/// Runs `measure` on CPU 0 with bpf_stats off, so BPF_PROG_TEST_RUN times the kernel's own
/// run with nothing else added per repeat; bpf_stats is put back as it was after.
pub fn quiet_test_runs(measure: impl FnOnce() -> Result<()>) -> Result<()> {
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &{
        let mut set = nix::sched::CpuSet::new();
        set.set(0)?;
        set
    })?;
    let stats_before =
        std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0").context("turning bpf_stats off")?;
    let result = measure();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
    result
}

fn load(path: &Path) -> Result<Ebpf> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    EbpfLoader::new()
        .load(&bytes)
        .with_context(|| format!("loading {}", path.display()))
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?;
    Ok(program.try_into()?)
}

/// The object at `path` with its XDP program `program` loaded and its maps serving
/// [`VIP4`] in slot 1 and [`VIP6`] in slot 2, as `serve` says.
pub(crate) fn load_serving(path: &Path, program: &str) -> Result<Ebpf> {
    let mut ebpf = load(path)?;
    xdp(&mut ebpf, program)?.load()?;
    serve(&mut ebpf, VIP4.parse()?, 1)?;
    serve(&mut ebpf, VIP6.parse()?, 2)?;
    Ok(ebpf)
}

/// A production object with its programs loaded and its maps filled as `serve` says.
fn production(path: &Path) -> Result<Ebpf> {
    let mut ebpf = load_serving(path, XDP_PROGRAM)?;
    let egress: &mut SchedClassifier = ebpf
        .program_mut(TC_EGRESS_PROGRAM)
        .context("program")?
        .try_into()?;
    egress.load()?;
    Ok(ebpf)
}

/// One BPF_PROG_TEST_RUN of `name` in `ebpf` over `frame`, `repeat` times: the verdict and
/// the kernel's time per run.
pub(crate) fn test_run(
    ebpf: &Ebpf,
    name: &str,
    frame: &[u8],
    repeat: u32,
) -> Result<(u32, Duration)> {
    let program: &Xdp = ebpf.program(name).context("program")?.try_into()?;
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    })?;
    Ok((result.return_value, result.duration))
}

/// The served addresses (see `serve`) and an address next to them that is not one.
pub(crate) const VIP4: &str = "203.0.113.10";
pub(crate) const VIP6: &str = "2001:db8:ff::10";
const OTHER4: &str = "203.0.113.99";
const OTHER6: &str = "2001:db8:ff::99";

/// A frame to `dst` (IPv4 or IPv6 by its form) of `protocol` to `port`.
fn frame(dst: &str, protocol: u8, port: u16) -> Vec<u8> {
    if dst.contains(':') {
        frame6(dst, protocol, port)
    } else {
        frame4(dst, protocol, port)
    }
}

/// The frames the TestRun benchmarks time, with their labels: those of a non-LB address,
/// then those an LB address serves, then those it judges further.
pub(crate) fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let (tcp, udp) = (proto::TCP, proto::UDP);
    vec![
        ("non-LB packet (UDP, IPv4)", frame(OTHER4, udp, 80)),
        ("non-LB packet (UDP, IPv6)", frame(OTHER6, udp, 80)),
        (
            "non-LB packet (UDP, IPv4, QinQ)",
            qinq(frame(OTHER4, udp, 80)),
        ),
        ("allowed LB packet, TCP IPv4", frame(VIP4, tcp, 80)),
        ("allowed LB packet, UDP IPv4", frame(VIP4, udp, 53)),
        ("allowed LB packet, TCP IPv6", frame(VIP6, tcp, 80)),
        ("allowed LB packet, UDP IPv6", frame(VIP6, udp, 53)),
        (
            "LB packet checked against source ranges (TCP 443, IPv4)",
            frame(VIP4, tcp, 443),
        ),
        ("denied LB packet (TCP port 81, IPv4)", frame(VIP4, tcp, 81)),
    ]
}

fn measure(objects: &Objects, compare: Option<&Path>) -> Result<()> {
    let mut ebpf = production(&objects.production)?;
    let mut refs = load(&objects.bench)?;
    for name in [BASELINE, FLOOR] {
        xdp(&mut refs, name)?.load()?;
    }
    let other = compare.map(production).transpose()?;

    let cases = cases();
    let run = |ebpf: &Ebpf, name: &str, frame: &[u8], repeat: u32| -> Result<(u32, f64)> {
        let (verdict, time) = test_run(ebpf, name, frame, repeat)?;
        Ok((verdict, time.as_secs_f64() * 1e9))
    };

    println!();
    println!(
        "BPF_PROG_TEST_RUN on CPU 0, bpf_stats off; {ROUNDS} interleaved rounds of {REPEAT} repeats; 60-100 byte frames"
    );
    println!(
        "Costs are over the trivial XDP_PASS program, measured alongside; the floor parses Ethernet/VLAN/IP and does one array lookup; cost ratios are of interquartile means."
    );
    let compared = if other.is_some() {
        " other object's lbagent_xdp | other / this |"
    } else {
        ""
    };
    println!(
        "| packet | verdict | trivial | floor | lbagent_xdp | lbagent_xdp cost: median (quartiles) | target | cost / floor's cost |{compared}"
    );
    println!(
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |{}",
        if other.is_some() {
            " ---: | ---: |"
        } else {
            ""
        }
    );
    for (label, frame) in &cases {
        run(&refs, BASELINE, frame, WARMUP)?;
        run(&refs, FLOOR, frame, WARMUP)?;
        let (verdict, _) = run(&ebpf, XDP_PROGRAM, frame, WARMUP)?;
        if let Some(other) = &other {
            let (other_verdict, _) = run(other, XDP_PROGRAM, frame, WARMUP)?;
            if other_verdict != verdict {
                bail!("{label}: the other object says {other_verdict}, this one {verdict}");
            }
        }
        let mut times: [Vec<f64>; 4] = Default::default();
        for _ in 0..ROUNDS {
            times[0].push(run(&refs, BASELINE, frame, REPEAT)?.1);
            times[1].push(run(&refs, FLOOR, frame, REPEAT)?.1);
            times[2].push(run(&ebpf, XDP_PROGRAM, frame, REPEAT)?.1);
            if let Some(other) = &other {
                times[3].push(run(other, XDP_PROGRAM, frame, REPEAT)?.1);
            }
        }
        let cost = |i: usize| paired_differences(&times[i], &times[0]);
        let (floor, mut ours) = (cost(1), cost(2));
        let non_lb = label.starts_with("non-LB");
        let limit = if non_lb {
            Some(12.0)
        } else if label.starts_with("allowed") {
            Some(45.0)
        } else {
            None
        };
        let difference = quantile(&mut ours, 0.5);
        let floor_ratio = interquartile_mean(&ours) / interquartile_mean(&floor);
        let mut line = format!(
            "| {label} | {} | {:.0} ns | {:.0} ns | {:.0} ns | {:+.0} ns ({:+.0} to {:+.0}) | {} | {floor_ratio:.2}{} |",
            match verdict {
                1 => "drop",
                2 => "pass",
                _ => "other",
            },
            quantile(&mut times[0].clone(), 0.5),
            quantile(&mut times[1].clone(), 0.5),
            quantile(&mut times[2].clone(), 0.5),
            difference,
            quantile(&mut ours, 0.25),
            quantile(&mut ours, 0.75),
            limit.map_or(String::new(), |limit| format!(
                "<= +{limit:.0} ns: {}",
                if difference <= limit {
                    "met"
                } else {
                    "NOT met"
                }
            )),
            if non_lb {
                format!(
                    " (goal <= {FLOOR_RATIO_GOAL}: {})",
                    if floor_ratio <= FLOOR_RATIO_GOAL {
                        "met"
                    } else {
                        "NOT met"
                    }
                )
            } else {
                String::new()
            },
        );
        if other.is_some() {
            let theirs = cost(3);
            line.push_str(&format!(
                " {:+.0} ns | {:.2} |",
                quantile(&mut theirs.clone(), 0.5),
                interquartile_mean(&theirs) / interquartile_mean(&ours),
            ));
        }
        println!("{line}");
    }

    println!();
    println!("| program | verified instructions | JIT-compiled bytes |");
    println!("| --- | ---: | ---: |");
    let mut programs = vec![
        ("", &ebpf, XDP_PROGRAM),
        ("", &ebpf, TC_EGRESS_PROGRAM),
        ("", &refs, FLOOR),
        ("", &refs, BASELINE),
    ];
    if let Some(other) = &other {
        programs.push((" (other object)", other, XDP_PROGRAM));
        programs.push((" (other object)", other, TC_EGRESS_PROGRAM));
    }
    for (suffix, ebpf, name) in programs {
        let info = match ebpf.program(name).context("program")? {
            aya::programs::Program::Xdp(program) => program.info()?,
            aya::programs::Program::SchedClassifier(program) => program.info()?,
            _ => anyhow::bail!("{name}: unexpected program type"),
        };
        println!(
            "| {name}{suffix} | {} | {} |",
            info.verified_instruction_count()
                .map_or("n/a".into(), |n| n.to_string()),
            info.size_jitted()
        );
    }
    drop(other);
    live_frames(&mut ebpf, &mut refs)
}

const LIVE_FRAMES: u32 = 500_000;
const LIVE_ROUNDS: usize = 11;
const GENERATOR: &str = "lbagent_tx";
const TRIVIAL_DROP: &str = "lbagent_drop";
const NFT_TABLE: &str = "lbagent_bench";

/// What receives the generator's frames on `rx0`.
#[derive(Clone, Copy, PartialEq)]
enum Receiver {
    /// The generator alone: it drops its own frames, nothing is sent.
    None,
    TrivialDrop,
    Lbagent,
    /// nftables, with GRO giving rx0 its NAPI path.
    Nftables,
    /// nftables, GRO off, a trivial XDP_PASS program giving rx0 its NAPI path instead.
    NftablesXdpPass,
}

/// The filtered-traffic drop on a real receive path (shared/notes/measuring.md, section 2):
/// a generator program run in live-frames mode sends each frame out of one end of a veth
/// pair; the peer's native XDP path (or, without XDP, its NAPI/GRO path into the nftables
/// netdev ingress hook) receives it in softirq on the same CPU, inside the generator's timed
/// loop. Receiver cost = generator with receiver - generator alone.
fn live_frames(ebpf: &mut Ebpf, refs: &mut Ebpf) -> Result<()> {
    for name in [GENERATOR, TRIVIAL_DROP] {
        xdp(refs, name)?.load()?;
    }
    let lab = VethLab::new()?;
    let _inside = lab.enter()?;
    let gen_ifindex = nix::net::if_::if_nametoindex("gen0")?;
    let rx_ifindex = nix::net::if_::if_nametoindex("rx0")?;
    // TCP SYN to a port the address does not serve: the policy drops it.
    let frame = frame4("203.0.113.10", proto::TCP, 81);
    let mut ctx = Vec::new();
    for word in [0, frame.len() as u32, 0, gen_ifindex, 0, 0] {
        ctx.extend_from_slice(&word.to_ne_bytes());
    }
    let generate = |ebpf: &Ebpf, program: &str| -> Result<f64> {
        let program: &Xdp = ebpf.program(program).context("program")?.try_into()?;
        let result = program.test_run(TestRunOptions {
            data_in: Some(&frame),
            ctx_in: Some(&ctx),
            repeat: LIVE_FRAMES,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..Default::default()
        })?;
        Ok(result.duration.as_secs_f64() * 1e9)
    };
    let receivers = [
        Receiver::None,
        Receiver::TrivialDrop,
        Receiver::Lbagent,
        Receiver::Nftables,
        Receiver::NftablesXdpPass,
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); receivers.len()];
    for round in 0..=LIVE_ROUNDS {
        for (i, receiver) in receivers.iter().enumerate() {
            let attached = match receiver {
                Receiver::TrivialDrop | Receiver::Lbagent | Receiver::NftablesXdpPass => {
                    let (object, name) = match receiver {
                        Receiver::Lbagent => (&mut *ebpf, XDP_PROGRAM),
                        Receiver::TrivialDrop => (&mut *refs, TRIVIAL_DROP),
                        _ => {
                            nft(&nft_policy())?;
                            gro(false)?;
                            (&mut *refs, BASELINE)
                        }
                    };
                    Some((
                        name,
                        xdp(object, name)?.attach_to_if_index(rx_ifindex, XdpMode::Driver)?,
                    ))
                }
                Receiver::Nftables => {
                    nft(&nft_policy())?;
                    None
                }
                Receiver::None => None,
            };
            let before = (receiver_count(ebpf, *receiver)?, veth_errors()?);
            let generator = if *receiver == Receiver::None {
                TRIVIAL_DROP
            } else {
                GENERATOR
            };
            let ns = generate(refs, generator)?;
            let after = (receiver_count(ebpf, *receiver)?, veth_errors()?);
            if let Some((name, link)) = attached {
                let object = if name == XDP_PROGRAM {
                    &mut *ebpf
                } else {
                    &mut *refs
                };
                xdp(object, name)?.detach(link)?;
            }
            if matches!(receiver, Receiver::Nftables | Receiver::NftablesXdpPass) {
                nft(&format!("delete table netdev {NFT_TABLE}"))?;
                gro(true)?;
            }
            if *receiver != Receiver::None && after.0 - before.0 != u64::from(LIVE_FRAMES) {
                bail!(
                    "round {round}: the receiver dropped {} of {LIVE_FRAMES} frames",
                    after.0 - before.0
                );
            }
            if after.1 != before.1 {
                bail!("round {round}: veth transmit errors or ring drops: {before:?} -> {after:?}");
            }
            // Round 0 warms up.
            if round > 0 {
                times[i].push(ns);
            }
        }
    }
    let generator = quantile(&mut times[0].clone(), 0.5);
    let receiver = |i: usize| paired_differences(&times[i], &times[0]);
    let (mut trivial, mut ours, mut nftables, mut nft_xdp_pass) =
        (receiver(1), receiver(2), receiver(3), receiver(4));
    let ratio = |nft: &[f64]| -> f64 {
        let mut ratios: Vec<f64> = nft.iter().zip(&ours).map(|(n, o)| n / o).collect();
        quantile(&mut ratios, 0.5)
    };
    let ratios = [ratio(&nftables), ratio(&nft_xdp_pass)];
    println!();
    println!(
        "Live frames through a veth pair, generator and receiver on CPU 0: {LIVE_ROUNDS} interleaved rounds of {LIVE_FRAMES} 72-byte TCP SYNs to an unserved port; generator alone {generator:.0} ns/frame; every frame counted dropped by the receiver, no veth errors"
    );
    println!("| receiver on rx0 | ns/frame (receive path, generator subtracted) | quartiles |");
    println!("| --- | ---: | ---: |");
    for (label, values) in [
        ("trivial XDP_DROP (native XDP)", &mut trivial),
        ("lbagent_xdp, policy drop (native XDP)", &mut ours),
        (
            "nftables netdev ingress, same policy (GRO on)",
            &mut nftables,
        ),
        (
            "nftables netdev ingress, same policy (GRO off, NAPI from an XDP_PASS program)",
            &mut nft_xdp_pass,
        ),
    ] {
        println!(
            "| {label} | {:.0} | {:.0} to {:.0} |",
            quantile(values, 0.5),
            quantile(values, 0.25),
            quantile(values, 0.75)
        );
    }
    let lower = ratios[0].min(ratios[1]);
    println!(
        "nftables / lbagent_xdp, median of paired rounds: {:.1}x with GRO, {:.1}x with XDP_PASS (target >= 4x: {})",
        ratios[0],
        ratios[1],
        if lower >= 4.0 { "met" } else { "NOT met" }
    );
    Ok(())
}

/// The benchmark's policy (TCP 80 and UDP 53 served on 203.0.113.10; everything else to it
/// dropped) as nftables rules in rx0's netdev ingress hook, with sets, as one would write it
/// for many services.
fn nft_policy() -> String {
    format!(
        r#"table netdev {NFT_TABLE} {{
    set vips {{ type ipv4_addr; elements = {{ 203.0.113.10 }} }}
    set served {{ type ipv4_addr . inet_proto . inet_service; elements = {{ 203.0.113.10 . tcp . 80, 203.0.113.10 . udp . 53 }} }}
    counter dropped {{ }}
    chain ingress {{
        type filter hook ingress device "rx0" priority -500; policy accept;
        ip daddr . meta l4proto . th dport @served accept
        ip daddr @vips icmp type {{ echo-request, echo-reply }} accept
        ip daddr @vips counter name "dropped" drop
    }}
}}
"#
    )
}

fn gro(on: bool) -> Result<()> {
    cmd::output(Command::new("ethtool").args(["-K", "rx0", "gro", if on { "on" } else { "off" }]))?;
    Ok(())
}

fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .context("running nft")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(script.as_bytes())?;
    let status = child.wait()?;
    if !status.success() {
        bail!("nft -f failed ({status}) on:\n{script}");
    }
    Ok(())
}

/// Frames the receiver has counted as dropped so far.
fn receiver_count(ebpf: &Ebpf, receiver: Receiver) -> Result<u64> {
    match receiver {
        Receiver::None => Ok(0),
        Receiver::TrivialDrop => ethtool_stat("rx0", "rx_queue_0_xdp_drops"),
        Receiver::Lbagent => {
            let stats: PerCpuArray<_, VipStats> =
                PerCpuArray::try_from(ebpf.map(maps::VIP_STATS).context("map")?)?;
            Ok(stats.get(&1, 0)?.iter().map(|s| s.drop_port).sum())
        }
        Receiver::Nftables | Receiver::NftablesXdpPass => {
            let json = cmd::output(
                Command::new("nft").args(["-j", "list", "counter", "netdev", NFT_TABLE, "dropped"]),
            )?;
            let value: serde_json::Value = serde_json::from_str(&json)?;
            value["nftables"]
                .as_array()
                .and_then(|items| {
                    items
                        .iter()
                        .find_map(|item| item["counter"]["packets"].as_u64())
                })
                .context("nft counter")
        }
    }
}

/// The veth pair's transmit errors and ring drops, which must stay 0.
fn veth_errors() -> Result<u64> {
    let mut total = 0;
    for iface in ["gen0", "rx0"] {
        let text = cmd::output(Command::new("ethtool").args(["-S", iface]))?;
        for line in text.lines() {
            if let Some((name, value)) = line.trim().split_once(':')
                && (name.ends_with("errors") || name == "rx_queue_0_drops")
            {
                total += value.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    Ok(total)
}

fn ethtool_stat(iface: &str, stat: &str) -> Result<u64> {
    let text = cmd::output(Command::new("ethtool").args(["-S", iface]))?;
    text.lines()
        .find_map(|line| {
            let (name, value) = line.trim().split_once(':')?;
            (name == stat).then(|| value.trim().parse().ok())?
        })
        .with_context(|| format!("ethtool -S {iface}: no {stat}"))
}

/// A network namespace with a veth pair `gen0` - `rx0`, both up, GRO on at `rx0` (so that
/// its NAPI path runs without an XDP program too). Deleted on drop.
struct VethLab {
    name: String,
}

impl VethLab {
    fn new() -> Result<Self> {
        let lab = Self {
            name: format!("lbagent-bench-{}", std::process::id()),
        };
        cmd::output(Command::new("ip").args(["netns", "add", &lab.name]))?;
        // No IPv6: its router solicitations and MLD reports would reach the receiver too.
        cmd::output(Command::new("ip").args(["netns", "exec", &lab.name]).args([
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]))?;
        for args in [
            &["link", "add", "gen0", "type", "veth", "peer", "name", "rx0"][..],
            &["link", "set", "gen0", "up"],
            &["link", "set", "rx0", "up"],
        ] {
            cmd::output(Command::new("ip").arg("-n").arg(&lab.name).args(args))?;
        }
        cmd::output(
            Command::new("ip")
                .args(["netns", "exec", &lab.name])
                .args(["ethtool", "-K", "rx0", "gro", "on"]),
        )?;
        Ok(lab)
    }

    /// Moves this thread (and the commands it starts) into the namespace until the guard
    /// drops.
    fn enter(&self) -> Result<NetnsGuard> {
        let home = std::fs::File::open("/proc/self/ns/net")?;
        let lab = std::fs::File::open(format!("/run/netns/{}", self.name))?;
        nix::sched::setns(&lab, nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(NetnsGuard { home })
    }
}

impl Drop for VethLab {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

struct NetnsGuard {
    home: std::fs::File,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = nix::sched::setns(&self.home, nix::sched::CloneFlags::CLONE_NEWNET);
    }
}

/// Enforcing address in `slot` with TCP 80 and UDP 53 served from anywhere, and TCP 443 from
/// 10.0.0.0/8 (range set 1). Written by hand into the tables, as lbagent writes them.
pub(crate) fn serve(ebpf: &mut Ebpf, vip: IpAddr, slot: u32) -> Result<()> {
    let mut configs: Array<_, VipConfig> =
        Array::try_from(ebpf.map_mut(maps::VIP_CONFIG).context("map")?)?;
    configs.set(slot, VipConfig::new(vip, VIP_ENFORCE, 0), 0)?;
    let (table, key) = match vip {
        IpAddr::V4(v4) => (maps::VIPS_V4, vip4_key(v4.octets())),
        IpAddr::V6(v6) => (maps::VIPS_V6, vip6_key(v6.octets())),
    };
    // Counted in the address filter (an object from before the filter has none).
    if ebpf.map(maps::VIP_FILTER).is_some() {
        let mut filter: Array<_, u64> =
            Array::try_from(ebpf.map_mut(maps::VIP_FILTER).context("map")?)?;
        let index = filter_index_of(vip);
        let count = filter.get(&index, 0)?;
        filter.set(index, count + 1, 0)?;
    }
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

pub(crate) fn frame4(dst: &str, protocol: u8, port: u16) -> Vec<u8> {
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

pub(crate) fn frame6(dst: &str, protocol: u8, port: u16) -> Vec<u8> {
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
    f.extend_from_slice(&dst.parse::<std::net::Ipv6Addr>().expect("address").octets());
    f.extend_from_slice(&l4);
    f
}

/// An Ethernet frame with two VLAN tags (802.1ad outside, 802.1Q inside) added.
fn qinq(frame: Vec<u8>) -> Vec<u8> {
    let mut tagged = frame[..12].to_vec();
    tagged.extend_from_slice(&[0x88, 0xa8, 0, 100, 0x81, 0x00, 0, 200]);
    tagged.extend_from_slice(&frame[12..]);
    tagged
}

/// The mean of the values between the first and third quartiles: finer than the median of
/// whole nanoseconds (what the kernel reports), and as deaf to the odd disturbed round.
fn interquartile_mean(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let (low, high) = (sorted.len() / 4, sorted.len() - sorted.len() / 4);
    let middle = &sorted[low..high.max(low + 1)];
    middle.iter().sum::<f64>() / middle.len() as f64
}

/// The `q` quantile (0.5: the median) of `values`, nearest rank.
pub(crate) fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * q).round() as usize]
}

/// Each round's figure less the baseline's of the same round.
fn paired_differences(times: &[f64], baseline: &[f64]) -> Vec<f64> {
    times
        .iter()
        .zip(baseline)
        .map(|(with, alone)| with - alone)
        .collect()
}
