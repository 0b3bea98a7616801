//! `cargo xtask bench routing`: how fast an address change reaches an upstream router's
//! kernel through lbagent and its BIRD, and a bulk add against `ip -batch` onto a kube-lb0
//! served by a hand-written BIRD config, in the same run; then how fast a Service's BGP
//! attribute change reaches the router, against the same change made by hand to a
//! hand-written BIRD config and `birdc configure`.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

const SEQUENTIAL: usize = 100;
const BULK_V4: usize = 5_000;
const BULK_V6: usize = 5_000;
/// Services in the attribute round, how many of them carry a community, and how many changes.
const SERVICES: usize = 1_000;
const ATTRIBUTED: usize = 100;
const CHANGES: usize = 20;
/// lbagent's allow-list for the attribute round.
const ATTRIBUTES: &str = "  serviceAttributes: {communities: [\"64512:*\"]}\n";

pub fn run() -> Result<()> {
    cmd::require_root("bench routing")?;
    cmd::cargo(&["build", "--quiet", "--release", "--package", "lbagent"])?;
    let lbagent = crate::bench::target_dir().join("release/lbagent");
    let lab = Lab::new()?;
    let frr = lab.start_frr()?;
    let monitor = RouteMonitor::start(&lab.router)?;

    // --- one address at a time, through lbagent ---
    let mut agent = lab.start_agent(&lbagent, &[], "")?;
    lab.wait_established()?;
    let mut adds = Vec::new();
    let mut current: Vec<String> = Vec::new();
    for i in 0..SEQUENTIAL {
        let address = format!("203.0.113.{}", i + 1);
        current.push(address.clone());
        let started = lab.write_services(&current)?;
        adds.push(monitor.wait_for(&address, true, started, Duration::from_secs(10))?);
    }
    let mut removes = Vec::new();
    while let Some(address) = current.pop() {
        let started = lab.write_services(&current)?;
        removes.push(monitor.wait_for(&address, false, started, Duration::from_secs(10))?);
    }
    let reloads = agent.log()?.matches("reconfiguring BIRD").count();

    // --- 10,000 at once: lbagent, then ip -batch under a hand-written BIRD ---
    let bulk: Vec<String> = (0..BULK_V4)
        .map(|i| format!("100.64.{}.{}", i / 250, i % 250 + 1))
        .chain((0..BULK_V6).map(|i| format!("2001:db8:1::{:x}", i + 1)))
        .collect();
    let wanted: BTreeSet<String> = bulk.iter().cloned().collect();
    monitor.clear();
    let started = lab.write_services(&bulk)?;
    let lbagent_bulk = monitor.wait_for_all(&wanted, started, Duration::from_secs(120))?;
    agent.stop();
    lab.cleanup(&lbagent)?;
    // The kernel drops routes that hang off a deleted nexthop group without a notification
    // per route, so this waits on the table, not on the monitor.
    wait(Duration::from_secs(60), || lab.bgp_routes() == 0)
        .context("the router kept lbagent's routes")?;

    let mut bird = lab.start_plain_bird()?;
    lab.wait_established()?;
    let mut batch = String::from("link add kube-lb0 type ifb\nlink set kube-lb0 up\n");
    for address in &bulk {
        let (len, nodad) = if address.contains(':') {
            (128, " nodad")
        } else {
            (32, "")
        };
        writeln!(batch, "address add {address}/{len} dev kube-lb0{nodad}")?;
    }
    std::fs::write(lab.dir.join("batch"), batch)?;
    monitor.clear();
    let started = Instant::now();
    cmd::output(
        Command::new("ip")
            .args(["-n", &lab.node, "-batch"])
            .arg(lab.dir.join("batch")),
    )?;
    let baseline_bulk = monitor.wait_for_all(&wanted, started, Duration::from_secs(120))?;
    let _ = bird.kill();
    let _ = bird.wait();
    cmd::output(Command::new("ip").args(["-n", &lab.node, "link", "del", "kube-lb0"]))?;
    wait(Duration::from_secs(60), || lab.bgp_routes() == 0)
        .context("the router kept the plain BIRD's routes")?;

    // --- a Service's attribute change: lbagent, then a hand-written BIRD config ---
    let (lbagent_changes, attribute_reloads) = lbagent_attribute_changes(&lab, &lbagent, &monitor)?;
    let baseline_changes = plain_attribute_changes(&lab, &monitor)?;
    drop(frr);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!();
    println!(
        "routing benchmark: a node running lbagent with a managed BIRD, an FRR router (bgpd + zebra); times until the router's kernel has (or no longer has) the route"
    );
    println!("| measure | p50 | p99 | target |");
    println!("| --- | ---: | ---: | --- |");
    println!(
        "| add one address ({SEQUENTIAL} in sequence) | {:.0} ms | {:.0} ms | p50 <= 150 ms, p99 <= 500 ms |",
        ms(percentile(&adds, 50)),
        ms(percentile(&adds, 99))
    );
    println!(
        "| remove one address ({SEQUENTIAL} in sequence) | {:.0} ms | {:.0} ms | p50 <= 150 ms, p99 <= 500 ms |",
        ms(percentile(&removes, 50)),
        ms(percentile(&removes, 99))
    );
    println!();
    println!(
        "| bulk: {} addresses at once ({BULK_V4} IPv4 + {BULK_V6} IPv6) | all at the router | target |",
        bulk.len()
    );
    println!("| --- | ---: | --- |");
    println!(
        "| `ip -batch` onto kube-lb0, hand-written BIRD config (baseline) | {:.0} ms | |",
        ms(baseline_bulk)
    );
    println!(
        "| lbagent (services file to kube-lb0, its BIRD) | {:.0} ms | |",
        ms(lbagent_bulk)
    );
    println!(
        "| ratio lbagent / baseline | {:.2} | <= 1.2 |",
        lbagent_bulk.as_secs_f64() / baseline_bulk.as_secs_f64()
    );
    println!("| BIRD reloads caused by address changes | {reloads} | 0 |");
    println!();
    println!(
        "| attribute change: one of {ATTRIBUTED} attributed Services (of {SERVICES}) gets a community no Service had, until the router shows it ({CHANGES} changes) | p50 | p99 | target |"
    );
    println!("| --- | ---: | ---: | --- |");
    println!(
        "| hand-written BIRD config (prefix sets), rewritten + `birdc configure` (baseline) | {:.0} ms | {:.0} ms | |",
        ms(percentile(&baseline_changes, 50)),
        ms(percentile(&baseline_changes, 99))
    );
    println!(
        "| lbagent (services file to its BIRD) | {:.0} ms | {:.0} ms | |",
        ms(percentile(&lbagent_changes, 50)),
        ms(percentile(&lbagent_changes, 99))
    );
    println!(
        "| ratio lbagent / baseline | {:.2} | {:.2} | <= 1.2 |",
        percentile(&lbagent_changes, 50).as_secs_f64()
            / percentile(&baseline_changes, 50).as_secs_f64(),
        percentile(&lbagent_changes, 99).as_secs_f64()
            / percentile(&baseline_changes, 99).as_secs_f64()
    );
    println!(
        "| BIRD reloads during the {CHANGES} attribute changes (lbagent) | {attribute_reloads} | {CHANGES} |"
    );
    Ok(())
}

fn service_address(i: usize) -> String {
    format!("100.65.{}.{}", i / 250, i % 250 + 1)
}

/// The community of Service `i`, if it has one: the first [`ATTRIBUTED`] have 64512:1 until
/// a change gives one of them its own.
fn community_of(i: usize, changed: &std::collections::BTreeMap<usize, u32>) -> Option<u32> {
    changed.get(&i).copied().or((i < ATTRIBUTED).then_some(1))
}

/// Which Service the `n`th change goes to, and the community no Service had before it.
fn change(n: usize) -> (usize, u32) {
    (n * 5 % ATTRIBUTED, 1_000 + n as u32)
}

fn lbagent_attribute_changes(
    lab: &Lab,
    lbagent: &Path,
    monitor: &RouteMonitor,
) -> Result<(Vec<Duration>, usize)> {
    let services = |changed: &std::collections::BTreeMap<usize, u32>| {
        let mut text = String::from("services:\n");
        for i in 0..SERVICES {
            let bgp = community_of(i, changed).map_or_else(String::new, |c| {
                format!(", bgp: {{communities: [\"64512:{c}\"]}}")
            });
            let _ = writeln!(
                text,
                "- {{name: s{i}, addresses: [{}]{bgp}}}",
                service_address(i)
            );
        }
        text
    };
    let mut changed = std::collections::BTreeMap::new();
    monitor.clear();
    lab.write_services_text(&services(&changed))?;
    let started = Instant::now();
    let mut agent = lab.start_agent_with(lbagent, ATTRIBUTES)?;
    let wanted: BTreeSet<String> = (0..SERVICES).map(service_address).collect();
    monitor.wait_for_all(&wanted, started, Duration::from_secs(120))?;
    lab.wait_community(&service_address(0), 1, Duration::from_secs(30))?;
    let before = agent.log()?.matches("reconfiguring BIRD").count();
    let mut times = Vec::new();
    for n in 0..CHANGES {
        let (i, community) = change(n);
        changed.insert(i, community);
        let started = lab.write_services_text(&services(&changed))?;
        lab.wait_community(&service_address(i), community, Duration::from_secs(30))?;
        times.push(started.elapsed());
    }
    let reloads = agent.log()?.matches("reconfiguring BIRD").count() - before;
    agent.stop();
    lab.cleanup(lbagent)?;
    wait(Duration::from_secs(60), || lab.bgp_routes() == 0)
        .context("the router kept lbagent's routes")?;
    Ok((times, reloads))
}

/// The operator's way: the attributed addresses listed in the export filter by community,
/// the changed one moved to its own, the file rewritten and `birdc configure`.
fn plain_attribute_changes(lab: &Lab, monitor: &RouteMonitor) -> Result<Vec<Duration>> {
    let conf = lab.dir.join("plain-bird.conf");
    let socket = lab.dir.join("plain-bird.ctl");
    let write_config = |changed: &std::collections::BTreeMap<usize, u32>| -> Result<()> {
        let mut by_community: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
        for i in 0..SERVICES {
            if let Some(c) = community_of(i, changed) {
                by_community
                    .entry(c)
                    .or_default()
                    .push(format!("{}/32", service_address(i)));
            }
        }
        let mut filter = String::new();
        for (c, nets) in &by_community {
            let _ = writeln!(
                filter,
                "  if net ~ [ {} ] then bgp_community.add((64512, {c}));",
                nets.join(", ")
            );
        }
        let text = format!(
            "router id 10.0.0.11;
protocol device {{ scan time 2; }}
protocol direct {{ ipv4; ipv6; interface \"kube-lb0\"; }}
filter vips {{
  if source != RTS_DEVICE then reject;
{filter}  accept;
}}
protocol bgp up4 {{ local as 64512; neighbor 10.0.0.1 as 64500; hold time 9; keepalive time 1; connect retry time 1;
  ipv4 {{ import none; export filter vips; }}; }}
protocol bgp up6 {{ local as 64512; neighbor fd00::1 as 64500; hold time 9; keepalive time 1; connect retry time 1;
  ipv6 {{ import none; export filter vips; }}; }}
"
        );
        std::fs::write(&conf, text)?;
        Ok(())
    };
    let mut changed = std::collections::BTreeMap::new();
    write_config(&changed)?;
    let mut bird = Command::new("ip")
        .args(["netns", "exec", &lab.node, "bird", "-f", "-c"])
        .arg(&conf)
        .arg("-s")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    wait(Duration::from_secs(10), || socket.exists()).context("plain BIRD did not start")?;
    lab.wait_established()?;
    let mut batch = String::from("link add kube-lb0 type ifb\nlink set kube-lb0 up\n");
    for i in 0..SERVICES {
        writeln!(batch, "address add {}/32 dev kube-lb0", service_address(i))?;
    }
    std::fs::write(lab.dir.join("batch"), batch)?;
    monitor.clear();
    let started = Instant::now();
    cmd::output(
        Command::new("ip")
            .args(["-n", &lab.node, "-batch"])
            .arg(lab.dir.join("batch")),
    )?;
    let wanted: BTreeSet<String> = (0..SERVICES).map(service_address).collect();
    monitor.wait_for_all(&wanted, started, Duration::from_secs(120))?;
    lab.wait_community(&service_address(0), 1, Duration::from_secs(30))?;
    let mut times = Vec::new();
    for n in 0..CHANGES {
        let (i, community) = change(n);
        changed.insert(i, community);
        let started = Instant::now();
        write_config(&changed)?;
        cmd::output(
            Command::new("birdc")
                .arg("-s")
                .arg(&socket)
                .arg("configure"),
        )?;
        lab.wait_community(&service_address(i), community, Duration::from_secs(30))?;
        times.push(started.elapsed());
    }
    let _ = bird.kill();
    let _ = bird.wait();
    Ok(times)
}

fn percentile(values: &[Duration], p: usize) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let index = ((sorted.len() * p).div_ceil(100)).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// `ip monitor route` in the router namespace: each route line, timestamped on arrival.
struct RouteMonitor {
    child: Child,
    events: mpsc::Receiver<(Instant, bool, String)>,
    seen: std::cell::RefCell<Vec<(Instant, bool, String)>>,
}

impl RouteMonitor {
    fn start(ns: &str) -> Result<Self> {
        let mut child = Command::new("ip")
            .args(["-n", ns, "monitor", "route"])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting ip monitor")?;
        let stdout = child.stdout.take().context("monitor stdout")?;
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if !line.contains("proto bgp") {
                    continue;
                }
                let (added, rest) = match line.strip_prefix("Deleted ") {
                    Some(rest) => (false, rest),
                    None => (true, line.as_str()),
                };
                let prefix = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                if tx.send((Instant::now(), added, prefix)).is_err() {
                    return;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        Ok(Self {
            child,
            events,
            seen: Default::default(),
        })
    }

    fn clear(&self) {
        while self.events.try_recv().is_ok() {}
        self.seen.borrow_mut().clear();
    }

    /// Time from `started` until `address` was added (or removed) at the router.
    fn wait_for(
        &self,
        address: &str,
        added: bool,
        started: Instant,
        timeout: Duration,
    ) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (at, was_added, prefix) = self.events.recv_timeout(left).with_context(|| {
                format!(
                    "{address} never {} at the router",
                    if added { "arrived" } else { "left" }
                )
            })?;
            if was_added == added && prefix == address {
                return Ok(at.saturating_duration_since(started));
            }
        }
    }

    /// Time from `started` until every address in `wanted` was added at the router.
    fn wait_for_all(
        &self,
        wanted: &BTreeSet<String>,
        started: Instant,
        timeout: Duration,
    ) -> Result<Duration> {
        let mut missing = wanted.clone();
        let deadline = Instant::now() + timeout;
        let mut last = started;
        while !missing.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok((at, added, prefix)) = self.events.recv_timeout(left) else {
                bail!(
                    "{} of {} addresses never reached the router",
                    missing.len(),
                    wanted.len()
                );
            };
            if added && missing.remove(&prefix) {
                last = at;
            }
        }
        Ok(last.saturating_duration_since(started))
    }
}

impl Drop for RouteMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn log(&self) -> Result<String> {
        Ok(std::fs::read_to_string(&self.log)?)
    }

    fn stop(&mut self) {
        let _ = cmd::terminate(&mut self.child);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Frr {
    children: Vec<Child>,
}

impl Drop for Frr {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = cmd::terminate(child);
        }
    }
}

/// A router namespace with a bridge, one node namespace on it; removed on drop.
struct Lab {
    router: String,
    node: String,
    dir: PathBuf,
}

impl Lab {
    fn new() -> Result<Self> {
        let id = std::process::id();
        let lab = Self {
            router: format!("lbbr-rtr-{id}"),
            node: format!("lbbr-node-{id}"),
            dir: std::env::temp_dir().join(format!("lbbr-{id}")),
        };
        std::fs::create_dir_all(lab.dir.join("frr"))?;
        let ip = |args: &[&str]| cmd::output(Command::new("ip").args(args));
        let (router, node) = (lab.router.as_str(), lab.node.as_str());
        ip(&["netns", "add", router])?;
        ip(&["netns", "add", node])?;
        for (ns, sysctls) in [
            (
                router,
                &[
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                    "net.ipv6.conf.all.accept_dad=0",
                ][..],
            ),
            (node, &["net.ipv6.conf.all.accept_dad=0"][..]),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            for sysctl in sysctls {
                cmd::output(
                    Command::new("ip").args(["netns", "exec", ns, "sysctl", "-qw", sysctl]),
                )?;
            }
        }
        ip(&["-n", router, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", router, "link", "set", "br0", "up"])?;
        ip(&["-n", router, "addr", "add", "10.0.0.1/24", "dev", "br0"])?;
        ip(&[
            "-n",
            router,
            "addr",
            "add",
            "fd00::1/64",
            "dev",
            "br0",
            "nodad",
        ])?;
        ip(&[
            "link", "add", "eth0", "netns", node, "type", "veth", "peer", "name", "v1", "netns",
            router,
        ])?;
        ip(&["-n", router, "link", "set", "v1", "master", "br0", "up"])?;
        ip(&["-n", node, "link", "set", "eth0", "up"])?;
        ip(&["-n", node, "addr", "add", "10.0.0.11/24", "dev", "eth0"])?;
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            "fd00::11/64",
            "dev",
            "eth0",
            "nodad",
        ])?;
        Ok(lab)
    }

    fn start_frr(&self) -> Result<Frr> {
        let dir = self.dir.join("frr");
        std::fs::write(dir.join("zebra.conf"), "hostname router\n")?;
        let bgpd =
            std::fs::read_to_string(cmd::workspace().join("tests/fixtures/frr-router-bgpd.conf"))?;
        std::fs::write(dir.join("bgpd.conf"), bgpd)?;
        cmd::output(Command::new("chown").arg("frr:frr").arg(&dir))?;
        let path = |name: &str| dir.join(name).display().to_string();
        let mut children = Vec::new();
        for name in ["zebra", "bgpd"] {
            children.push(
                Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &self.router,
                        &format!("/usr/lib/frr/{name}"),
                    ])
                    .args([
                        "-f",
                        &path(&format!("{name}.conf")),
                        "-i",
                        &path(&format!("{name}.pid")),
                    ])
                    .args([
                        "-z",
                        &path("zserv.api"),
                        "--vty_socket",
                        &path(""),
                        "-P",
                        "0",
                    ])
                    .args(["--log", &format!("file:{}", path(&format!("{name}.log")))])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            );
            let ready = if name == "zebra" {
                "zserv.api"
            } else {
                "bgpd.vty"
            };
            wait(Duration::from_secs(10), || dir.join(ready).exists())
                .with_context(|| format!("{name} did not start"))?;
        }
        Ok(Frr { children })
    }

    fn write_services(&self, addresses: &[String]) -> Result<Instant> {
        self.write_services_text(&format!(
            "services:\n- {{name: bench, addresses: [{}]}}\n",
            addresses.join(", ")
        ))
    }

    /// Writes the services file whole (a rename), and returns when it appeared.
    fn write_services_text(&self, text: &str) -> Result<Instant> {
        let tmp = self.dir.join("services.yaml.tmp");
        std::fs::write(&tmp, text)?;
        let started = Instant::now();
        std::fs::rename(&tmp, self.dir.join("services.yaml"))?;
        Ok(started)
    }

    fn config(&self) -> PathBuf {
        self.dir.join("lbagent.yaml")
    }

    fn start_agent(&self, lbagent: &Path, addresses: &[String], routing: &str) -> Result<Agent> {
        self.write_services(addresses)?;
        self.start_agent_with(lbagent, routing)
    }

    /// `routing`: more lines of the routing section, before its `bgp`.
    fn start_agent_with(&self, lbagent: &Path, routing: &str) -> Result<Agent> {
        std::fs::write(
            self.config(),
            format!(
                "node: {{name: bench}}\nsource: {{file: {{path: services.yaml}}}}\nstatus: {{path: {dir}/status.json}}\nrouting:\n  stateDir: {dir}/bird\n{routing}  bgp:\n    - {{name: up4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, holdTime: 9s, keepaliveTime: 1s, connectRetryTime: 1s}}\n    - {{name: up6, neighbor: \"fd00::1\", asn: 64500, localAsn: 64512, holdTime: 9s, keepaliveTime: 1s, connectRetryTime: 1s}}\n",
                dir = self.dir.display()
            ),
        )?;
        let log = self.dir.join("agent.log");
        let file = std::fs::File::create(&log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node))
            .arg("--")
            .arg(lbagent)
            .args(["run", "--config"])
            .arg(self.config())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()?;
        Ok(Agent { child, log })
    }

    fn cleanup(&self, lbagent: &Path) -> Result<()> {
        cmd::output(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.node))
                .arg("--")
                .arg(lbagent)
                .args([
                    "--pin-root",
                    "/sys/fs/bpf/lbagent-bench-none",
                    "cleanup",
                    "--config",
                ])
                .arg(self.config()),
        )?;
        Ok(())
    }

    /// BIRD with a config written by hand (not by lbagent), as an operator would run it.
    fn start_plain_bird(&self) -> Result<Child> {
        let conf = self.dir.join("plain-bird.conf");
        std::fs::write(
            &conf,
            "router id 10.0.0.11;
protocol device { scan time 2; }
protocol direct { ipv4; ipv6; interface \"kube-lb0\"; }
filter vips { if source != RTS_DEVICE then reject; accept; }
protocol bgp up4 { local as 64512; neighbor 10.0.0.1 as 64500; hold time 9; keepalive time 1; connect retry time 1;
  ipv4 { import none; export filter vips; }; }
protocol bgp up6 { local as 64512; neighbor fd00::1 as 64500; hold time 9; keepalive time 1; connect retry time 1;
  ipv6 { import none; export filter vips; }; }
",
        )?;
        let socket = self.dir.join("plain-bird.ctl");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.node, "bird", "-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        wait(Duration::from_secs(10), || socket.exists()).context("plain BIRD did not start")?;
        Ok(child)
    }

    fn bgp_routes(&self) -> usize {
        ["-4", "-6"]
            .iter()
            .map(|family| {
                cmd::output(Command::new("ip").args([
                    "-n",
                    &self.router,
                    family,
                    "route",
                    "show",
                    "proto",
                    "bgp",
                ]))
                .map_or(usize::MAX, |table| {
                    table
                        .lines()
                        .filter(|l| !l.starts_with(char::is_whitespace))
                        .count()
                })
            })
            .sum()
    }

    /// Waits until the router's bgpd shows community 64512:`community` on `address`.
    fn wait_community(&self, address: &str, community: u32, timeout: Duration) -> Result<()> {
        let vty = self.dir.join("frr");
        let needle = format!("\"64512:{community}\"");
        wait(timeout, || {
            cmd::output(
                Command::new("vtysh")
                    .args(["-H", "/dev/null", "--vty_socket"])
                    .arg(&vty)
                    .args(["-c", &format!("show bgp ipv4 unicast {address}/32 json")]),
            )
            .is_ok_and(|json| json.contains(&needle))
        })
        .with_context(|| format!("the router never showed 64512:{community} on {address}"))
    }

    /// Waits until the router's bgpd has both sessions up.
    fn wait_established(&self) -> Result<()> {
        let vty = self.dir.join("frr");
        wait(Duration::from_secs(30), || {
            cmd::output(
                Command::new("vtysh")
                    .args(["-H", "/dev/null", "--vty_socket"])
                    .arg(&vty)
                    .args(["-c", "show bgp summary json"]),
            )
            .is_ok_and(|json| json.matches("\"state\":\"Established\"").count() >= 2)
        })
        .context("BGP sessions did not come up")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.node, &self.router] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait(timeout: Duration, mut condition: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
