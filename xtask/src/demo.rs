//! `cargo xtask demo`: an upstream router (FRR) and two nodes running `lbagent run` in
//! network namespaces. The router learns the services' addresses over BGP with both nodes as
//! next hops, a client's requests are served, an outsider's are dropped by XDP, the counters
//! add up, a service goes and so does its route, and `lbagent cleanup` leaves nothing.

mod lab;

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lab::{CLIENT, Host, Lab, NODES, OUTSIDER, ROUTER, wait_until};

use crate::cmd;

/// An address of a service, and how the demo talks to it.
struct Target {
    service: &'static str,
    address: &'static str,
    tcp: bool,
}

const WEB_PORT: u16 = 80;
const GAME_PORT: u16 = 7777;
const WEB4: Target = Target {
    service: "web",
    address: "203.0.113.10",
    tcp: true,
};
const WEB6: Target = Target {
    service: "web",
    address: "2001:db8:ff::10",
    tcp: true,
};
const GAME4: Target = Target {
    service: "game",
    address: "203.0.113.20",
    tcp: false,
};
const GAME6: Target = Target {
    service: "game",
    address: "2001:db8:ff::20",
    tcp: false,
};
const REQUESTS: usize = 4;
const OUTSIDER_TRIES: usize = 2;

const WEB: &str = "  - name: web
    addresses: [203.0.113.10, \"2001:db8:ff::10\"]
    ports: [{port: 80, protocol: TCP}]
    sourceRanges: [198.51.100.0/24, \"2001:db8:c1::/64\"]
";
const GAME: &str = "  - name: game
    addresses: [203.0.113.20, \"2001:db8:ff::20\"]
    ports: [{port: 7777, protocol: UDP}]
    sourceRanges: [198.51.100.0/24, \"2001:db8:c1::/64\"]
";

/// The routing tests' router, plus one change for readability: IPv6 routes through the
/// nodes' global addresses rather than their link-local ones.
const BGPD_CONF: &str = concat!(
    include_str!("../../tests/fixtures/frr-router-bgpd.conf"),
    "router bgp 64500
 address-family ipv6 unicast
  neighbor NODES6 route-map GLOBAL-NEXT-HOP in
 exit-address-family
route-map GLOBAL-NEXT-HOP permit 10
 set ipv6 next-hop prefer-global
"
);

pub fn run() -> Result<()> {
    cmd::require_root("demo")?;
    // The same build as `cargo xtask test`'s: run from the tests, the demo must not replace
    // the binary that other tests are running.
    cmd::cargo(&["build", "--quiet", "--workspace", "--bins"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::workspace().join("target"));
    let lbagent = target.join("debug/lbagent");
    // Shown in every command line: shorter from the workspace, where the commands run.
    let lbagent = lbagent
        .strip_prefix(cmd::workspace())
        .map_or(lbagent.clone(), Path::to_path_buf);

    let started = Instant::now();
    let mut lab = Lab::build()?;
    let result = story(&mut lab, &lbagent);
    if result.is_err() {
        lab.print_logs();
    }
    let id = lab.id();
    drop(lab);
    result?;
    leftovers(id)?;
    step(&format!(
        "Done in {:.0} s. Next: README.md (configuration, status, metrics) and `lbagent --help`.",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn story(lab: &mut Lab, lbagent: &Path) -> Result<()> {
    let router = lab.ns(ROUTER);
    let middle = " router: FRR (bgpd, zebra), AS 64500 ";
    let blank = " ".repeat(middle.chars().count() + 1);
    let agent = "lbagent run, its BIRD (AS 64512)";
    println!(
        "lbagent demo: a router, two nodes and two clients, each a network namespace lbdemo-{}-*\n",
        lab.id()
    );
    println!(
        "  client   {:<14}─┐{blank}┌─ node-1 {}  {agent}",
        CLIENT.v4, NODES[0].v4
    );
    println!("  {:<24}├─{middle}─┤", "");
    println!(
        "  outsider {:<14}─┘{blank}└─ node-2 {}  {agent}",
        OUTSIDER.v4, NODES[1].v4
    );

    step("The services file both nodes read (in Kubernetes, the Services would say this)");
    let services = lab.dir.join("services.yaml");
    write_services(&services, &[WEB, GAME])?;
    show(Command::new("cat").arg(&services))?;

    let mut configs = Vec::new();
    for node in &NODES {
        let dir = lab.dir.join(node.name);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("lbagent.yaml");
        let pins = lab.pin_root(node.name);
        std::fs::write(
            &config,
            format!(
                "node: {{name: {name}}}
source: {{file: {{path: {services}}}}}
status: {{path: {dir}/status.json}}
dataplane: {{interfaces: [eth0], pinRoot: {pins}}}
routing:
  stateDir: {dir}/bird
  bgp:
    - {{name: up4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, keepaliveTime: 1s, connectRetryTime: 1s}}
    - {{name: up6, neighbor: \"fd00::1\", asn: 64500, localAsn: 64512, keepaliveTime: 1s, connectRetryTime: 1s}}
",
                name = node.name,
                services = services.display(),
                dir = dir.display(),
                pins = pins.display()
            ),
        )?;
        configs.push((config, pins, dir));
    }
    step(
        "node-1's config: the file source, XDP on eth0, and a BGP session per family to the router",
    );
    show(Command::new("cat").arg(&configs[0].0))?;

    step("Start FRR on the router, then `lbagent run` on each node (in the node's namespace)");
    let mut pids = Vec::new();
    lab.start_frr(BGPD_CONF)?;
    for (node, (config, _, _)) in NODES.iter().zip(&configs) {
        let mut command = lab.in_ns(node.name, lbagent);
        command.args(["run", "--config"]).arg(config);
        println!("$ {}", command_line(&command));
        pids.push(lab.spawn(node.name, &mut command)?);
    }

    let prefixes = [WEB4, GAME4, WEB6, GAME6].map(|t| t.address);
    let took = wait_until(Duration::from_secs(60), || {
        prefixes.iter().all(|p| next_hops(&router, p).len() == 2)
    })
    .context("the router did not learn every address from both nodes")?;
    step(&format!(
        "The router learned each address from both nodes over BGP ({:.1} s): two next hops each, ECMP",
        took.as_secs_f64()
    ));
    show(Command::new("ip").args(["-n", &router, "-4", "route", "show", "proto", "bgp"]))?;
    show(Command::new("ip").args(["-n", &router, "-6", "route", "show", "proto", "bgp"]))?;

    step(&format!(
        "Each node serves web (TCP {WEB_PORT}) and game (UDP {GAME_PORT}) with socat, bound to the addresses lbagent put on kube-lb0"
    ));
    for node in &NODES {
        for target in [WEB4, WEB6, GAME4, GAME6] {
            let mut command = Command::new("ip");
            command
                .args(["netns", "exec", &lab.ns(node.name), "socat"])
                .arg(target.listen())
                .arg(target.answer(node.name));
            if node.name == NODES[0].name && target.address == WEB4.address {
                println!(
                    "$ {}   (and likewise for the others)",
                    command_line(&command)
                );
            }
            lab.spawn(&format!("{}-{}", node.name, target.address), &mut command)?;
        }
    }
    show(Command::new("ip").args([
        "-n",
        &lab.ns(NODES[0].name),
        "-br",
        "addr",
        "show",
        "kube-lb0",
    ]))?;
    for node in &NODES {
        wait_until(Duration::from_secs(10), || {
            cmd::output(Command::new("ip").args([
                "netns",
                "exec",
                &lab.ns(node.name),
                "ss",
                "-Hlntu",
            ]))
            .is_ok_and(|out| out.lines().count() >= 4)
        })
        .with_context(|| format!("the servers on {} did not start", node.name))?;
    }

    let mut sent = BTreeMap::<&str, u64>::new();
    let mut denied = BTreeMap::<&str, u64>::new();
    step(&format!(
        "The client ({}, {}) sends {REQUESTS} requests to each address; the answers name the node that served each",
        CLIENT.v4, CLIENT.v6
    ));
    println!(
        "$ {}   (and likewise for the others)",
        command_line(&WEB4.request(lab, &CLIENT))
    );
    for target in [WEB4, WEB6, GAME4, GAME6] {
        let (answers, frames) = target.requests(lab, &CLIENT, REQUESTS)?;
        println!("  {}  {}", target.describe(), answers.join(" | "));
        if answers.iter().any(|a| !a.starts_with("hello from node-")) {
            bail!("the client was not served by {}", target.describe());
        }
        *sent.entry(target.address).or_default() += frames;
    }

    step(&format!(
        "The outsider ({}, {}) is outside the services' sourceRanges: XDP drops its packets on the nodes (-: no answer)",
        OUTSIDER.v4, OUTSIDER.v6
    ));
    println!(
        "$ {}   (and likewise for game)",
        command_line(&WEB4.request(lab, &OUTSIDER))
    );
    for target in [WEB4, GAME6] {
        let (answers, frames) = target.requests(lab, &OUTSIDER, OUTSIDER_TRIES)?;
        println!("  {}  {}", target.describe(), answers.join(" | "));
        if answers.iter().any(|a| a.starts_with("hello")) {
            bail!("the outsider was served by {}", target.describe());
        }
        *sent.entry(target.address).or_default() += frames;
        *denied.entry(target.address).or_default() += frames;
    }

    step("`lbagent counters` on each node: frames and bytes per address, summed over CPUs");
    let mut counted = Vec::new();
    for (node, (_, pins, _)) in NODES.iter().zip(&configs) {
        let agent = |args: &[&str]| {
            let mut command = lab.in_ns(node.name, lbagent);
            command.arg("--pin-root").arg(pins).args(args);
            command
        };
        show(&mut agent(&["counters"]))?;
        counted.push(counters(&cmd::output(&mut agent(&[
            "counters", "-o", "json",
        ]))?)?);
    }

    step("What the clients' kernels sent (/proc/net/snmp) against what the two nodes counted");
    println!(
        "  {:<16} {:>5} {:>7} {:>7} {:>14} {:>12}",
        "ADDRESS", "SENT", "NODE-1", "NODE-2", "FROM OUTSIDER", "DROP_SOURCE"
    );
    let mut differs = false;
    for address in prefixes {
        let [one, two] = [0, 1].map(|i| counted[i].get(address).copied().unwrap_or_default());
        let sent = sent.get(address).copied().unwrap_or_default();
        let denied = denied.get(address).copied().unwrap_or_default();
        let same = one.0 + two.0 == sent && one.1 + two.1 == denied;
        differs |= !same;
        println!(
            "  {address:<16} {sent:>5} {:>7} {:>7} {denied:>14} {:>12}  {}",
            one.0,
            two.0,
            one.1 + two.1,
            if same { "adds up" } else { "DIFFERS" }
        );
    }
    if differs {
        bail!("the nodes' counters differ from what the clients sent");
    }

    // The node where the outsider's SYNs to web landed (ECMP chose), so drop_source shows.
    let (node, (_, pins, _)) = NODES
        .iter()
        .zip(&configs)
        .zip(&counted)
        .find(|(_, counted)| counted.get(WEB4.address).is_some_and(|c| c.1 > 0))
        .map(|(node, _)| node)
        .context("no node counted the outsider's packets")?;
    let stats = pins
        .join(format!("v{}", lbagent_common::PIN_LAYOUT_VERSION))
        .join(lbagent_common::maps::VIP_STATS);
    step(&format!(
        "The same counters from the kernel: bpftool reads {}'s pinned map (`map dump` lists every address), fields named by BTF, one value per CPU",
        node.name
    ));
    // The key is a VipKey: family 4, three bytes of padding, the address in 16 bytes.
    let key = format!(
        "4 0 0 0 {} 0 0 0 0 0 0 0 0 0 0 0 0",
        WEB4.address.replace('.', " ")
    );
    show(
        Command::new("bpftool")
            .args(["map", "lookup", "pinned"])
            .arg(&stats)
            .arg("key")
            .args(key.split(' ')),
    )?;

    step(
        "`lbagent status` on node-1: the addresses it holds, for which services, and its BGP sessions",
    );
    show(
        lab.in_ns(NODES[0].name, lbagent)
            .args(["status", "--status-file"])
            .arg(configs[0].2.join("status.json")),
    )?;

    step(
        "game is removed from the services file: both nodes withdraw its addresses, and the router forgets them",
    );
    let removed = Instant::now();
    write_services(&services, &[WEB])?;
    wait_until(Duration::from_secs(20), || {
        [GAME4, GAME6]
            .iter()
            .all(|t| next_hops(&router, t.address).is_empty())
    })
    .context("the router kept game's routes")?;
    println!(
        "(gone from the router {} ms after the file changed)",
        removed.elapsed().as_millis()
    );
    show(Command::new("ip").args(["-n", &router, "route", "show", "proto", "bgp"]))?;
    show(Command::new("ip").args(["-n", &router, "-6", "route", "show", "proto", "bgp"]))?;

    step(
        "Clean-up: stop each agent, then `lbagent cleanup` withdraws its routes and removes kube-lb0, BIRD's files and every pin",
    );
    for ((node, (config, pins, _)), pid) in NODES.iter().zip(&configs).zip(pids) {
        println!(
            "$ kill -TERM {pid}   # lbagent run on {}: BIRD restarts gracefully, the router keeps the routes",
            node.name
        );
        let status = lab.stop(node.name)?;
        if !status.success() {
            bail!("lbagent run on {} exited with {status}", node.name);
        }
        show(
            lab.in_ns(node.name, lbagent)
                .args(["cleanup", "--config"])
                .arg(config),
        )?;
        if pins.exists() {
            bail!("{} is still there after cleanup", pins.display());
        }
    }
    wait_until(Duration::from_secs(20), || {
        prefixes.iter().all(|p| next_hops(&router, p).is_empty())
    })
    .context("the router kept routes after cleanup")?;
    show(Command::new("ip").args(["-n", &router, "route", "show", "proto", "bgp"]))?;
    println!("(no BGP route left on the router)");
    Ok(())
}

impl Target {
    fn port(&self) -> u16 {
        if self.tcp { WEB_PORT } else { GAME_PORT }
    }

    /// The address and port as socat and people write them.
    fn socket(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port())
        } else {
            format!("{}:{}", self.address, self.port())
        }
    }

    fn describe(&self) -> String {
        let protocol = if self.tcp { "tcp" } else { "udp" };
        format!(
            "{:<5}{:<27}",
            self.service,
            format!("{}/{protocol}", self.socket())
        )
    }

    /// socat's listening address for a server of this target.
    fn listen(&self) -> String {
        let family = if self.address.contains(':') { "6" } else { "4" };
        let (kind, options) = if self.tcp {
            ("TCP", ",fork,reuseaddr")
        } else {
            ("UDP", ",fork")
        };
        let bind = self.socket();
        let bind = bind
            .rsplit_once(':')
            .map_or(bind.as_str(), |(host, _)| host);
        format!(
            "{kind}{family}-{}:{},bind={bind}{options}",
            if self.tcp { "LISTEN" } else { "RECVFROM" },
            self.port()
        )
    }

    /// What a server on `node` runs for each connection or datagram. Over UDP it reads the
    /// datagram first: socat hands it over, and must find someone to take it.
    fn answer(&self, node: &str) -> String {
        let read = if self.tcp { "" } else { "read -r line; " };
        format!("SYSTEM:{read}echo hello from {node}")
    }

    /// One request from `host`: socat sends a line (UDP) or nothing (TCP, where the server
    /// speaks first) and prints the answer, waiting at most a second for it.
    fn request(&self, lab: &Lab, host: &Host) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &lab.ns(host.name), "socat", "-t", "1", "-"])
            .arg(if self.tcp {
                format!("TCP:{},connect-timeout=0.5", self.socket())
            } else {
                format!("UDP:{}", self.socket())
            });
        command
    }

    /// `count` requests at once from `host`: each answer ("-" for none), and how many
    /// frames the host's kernel sent for them.
    fn requests(&self, lab: &Lab, host: &Host, count: usize) -> Result<(Vec<String>, u64)> {
        let before = Sent::read(lab, host)?;
        let mut children = Vec::new();
        for _ in 0..count {
            let mut child = self
                .request(lab, host)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot run socat (is it installed? `cargo xtask setup` installs it)")?;
            let mut stdin = child.stdin.take().context("socat's stdin")?;
            if !self.tcp {
                stdin.write_all(b"hello\n")?;
            }
            drop(stdin);
            children.push(child);
        }
        let mut answers = Vec::new();
        for child in children {
            let out = child.wait_with_output()?;
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            answers.push(if answer.is_empty() {
                "-".to_owned()
            } else {
                answer
            });
        }
        let after = Sent::read(lab, host)?;
        let frames = match (self.tcp, self.address.contains(':')) {
            (true, _) => after.tcp - before.tcp,
            (false, false) => after.udp4 - before.udp4,
            (false, true) => after.udp6 - before.udp6,
        };
        Ok((answers, frames))
    }
}

/// What a namespace's kernel has sent, from its SNMP counters. TCP's are shared by both
/// families, so the demo sends to one address at a time.
struct Sent {
    tcp: u64,
    udp4: u64,
    udp6: u64,
}

impl Sent {
    fn read(lab: &Lab, host: &Host) -> Result<Self> {
        let text = cmd::output(
            lab.in_ns(host.name, "cat")
                .args(["/proc/net/snmp", "/proc/net/snmp6"]),
        )?;
        // /proc/net/snmp: a line of names, then a line of values, per protocol.
        let table = |name: &str, field: &str| -> Option<u64> {
            let prefix = format!("{name}:");
            let mut rows = text.lines().filter(|l| l.starts_with(&prefix));
            let (names, values) = (rows.next()?, rows.next()?);
            names
                .split_whitespace()
                .zip(values.split_whitespace())
                .find(|(n, _)| *n == field)?
                .1
                .parse()
                .ok()
        };
        let snmp6 = |field: &str| -> Option<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(field)?.trim().parse().ok())
        };
        let missing = || anyhow::anyhow!("unexpected /proc/net/snmp in {}", host.name);
        Ok(Self {
            tcp: table("Tcp", "OutSegs").ok_or_else(missing)?
                + table("Tcp", "RetransSegs").ok_or_else(missing)?,
            udp4: table("Udp", "OutDatagrams").ok_or_else(missing)?,
            udp6: snmp6("Udp6OutDatagrams").ok_or_else(missing)?,
        })
    }
}

/// `lbagent counters -o json` as (packets, drop_source) per address.
fn counters(json: &str) -> Result<BTreeMap<String, (u64, u64)>> {
    let value: serde_json::Value =
        serde_json::from_str(json).context("lbagent counters -o json")?;
    let vips = value["vips"]
        .as_array()
        .context("no vips in lbagent counters")?;
    Ok(vips
        .iter()
        .filter_map(|vip| {
            Some((
                vip["address"].as_str()?.to_owned(),
                (vip["packets"].as_u64()?, vip["drops"]["source"].as_u64()?),
            ))
        })
        .collect())
}

/// The gateways of the route to `address` in `ns`'s kernel; empty if there is none.
fn next_hops(ns: &str, address: &str) -> Vec<String> {
    let family = if address.contains(':') { "-6" } else { "-4" };
    let Ok(json) =
        cmd::output(Command::new("ip").args(["-n", ns, family, "-j", "route", "show", address]))
    else {
        return Vec::new();
    };
    let routes: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
    let Some(route) = routes.as_array().and_then(|r| r.first()) else {
        return Vec::new();
    };
    match route["nexthops"].as_array() {
        Some(hops) => hops
            .iter()
            .filter_map(|h| Some(h["gateway"].as_str()?.to_owned()))
            .collect(),
        None => route["gateway"]
            .as_str()
            .map(str::to_owned)
            .into_iter()
            .collect(),
    }
}

/// Writes the services file whole, by renaming, as a careful tool would.
fn write_services(path: &Path, services: &[&str]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("services:\n{}", services.concat()))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// After the lab is dropped: no namespace, pin root, file or process of this run is left.
fn leftovers(id: u32) -> Result<()> {
    let prefix = format!("lbdemo-{id}-");
    let namespaces = cmd::output(Command::new("ip").args(["netns", "list"]))?;
    let left: Vec<&str> = namespaces
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .collect();
    let pins: Vec<_> = std::fs::read_dir("/sys/fs/bpf")?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .map(|e| e.path())
        .collect();
    step(&format!(
        "Namespaces deleted: `ip netns list` shows {} of this run's, /sys/fs/bpf holds {} of its pin roots",
        left.len(),
        pins.len()
    ));
    if !left.is_empty() || !pins.is_empty() {
        bail!("left behind: {left:?} {pins:?}");
    }
    Ok(())
}

fn step(text: &str) {
    println!("\n== {text}");
}

fn command_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prints the command line and runs it, output shown; a failure stops the demo.
fn show(command: &mut Command) -> Result<()> {
    println!("$ {}", command_line(command));
    std::io::stdout().flush()?;
    cmd::status(command)
}
