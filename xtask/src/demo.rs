//! `cargo xtask demo`: an upstream router (FRR) and two nodes running `lbagent run` in
//! network namespaces. The router learns the services' addresses over BGP with both nodes as
//! next hops, a client's requests are served, an outsider's are dropped by XDP, the counters
//! add up, a service goes and so does its route, and `lbagent cleanup` leaves nothing.

mod lab;
mod traffic;

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lab::{CLIENT, Host, Lab, NODES, OUTSIDER, ROUTER, wait_until};
use nix::sys::signal::{SigSet, Signal};
use traffic::{GAME, Target, WEB, write_services};

use crate::cmd;

const REQUESTS: usize = 4;
const OUTSIDER_TRIES: usize = 2;

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
    cmd::cargo(&["build", "--workspace", "--bins"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::workspace().join("target"));
    let lbagent = target.join("debug/lbagent");
    // Shown in every command line: shorter from the workspace, where the commands run.
    let lbagent = lbagent
        .strip_prefix(cmd::workspace())
        .map_or(lbagent.clone(), Path::to_path_buf);

    let started = Instant::now();
    let id = std::process::id();
    remove_on_ctrl_c(id)?;
    let mut lab = Lab::build()?;
    let result = Demo::new(&mut lab, lbagent).and_then(Demo::run);
    if result.is_err() {
        if INTERRUPTED.load(Ordering::SeqCst) {
            // The step failed because Ctrl-C took the lab away: that thread exits.
            loop {
                std::thread::park();
            }
        }
        lab.print_logs();
    }
    drop(lab);
    result?;
    leftovers(id)?;
    step(&format!(
        "Done in {:.0} s. Next: README.md (configuration, status, metrics) and `lbagent --help`.",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Ctrl-C signals the whole process group. Blocked from here on, in this process and so in
/// every child it starts (which inherit the mask), it reaches only a thread that removes
/// the run's namespaces, pins and files by name, then exits.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn remove_on_ctrl_c(id: u32) -> Result<()> {
    let mut sigint = SigSet::empty();
    sigint.add(Signal::SIGINT);
    sigint.thread_block()?;
    std::thread::spawn(move || {
        if sigint.wait().is_ok() {
            INTERRUPTED.store(true, Ordering::SeqCst);
            eprintln!("\ninterrupted: removing the demo's namespaces, pins and files");
            lab::remove_all(id);
            std::process::exit(130);
        }
    });
    Ok(())
}

/// The story, step by step, on a lab whose namespaces exist.
struct Demo<'a> {
    lab: &'a mut Lab,
    lbagent: PathBuf,
    router: String,
    services: PathBuf,
    nodes: Vec<Node>,
}

/// A node's files, and its agent's process id once it runs.
struct Node {
    host: &'static Host,
    config: PathBuf,
    pins: PathBuf,
    status: PathBuf,
    pid: u32,
}

/// What the clients' kernels sent to each address, all of it and the outsider's part.
#[derive(Default)]
struct Sent {
    all: BTreeMap<&'static str, u64>,
    outsider: BTreeMap<&'static str, u64>,
}

impl<'a> Demo<'a> {
    /// Writes the services file and each node's config.
    fn new(lab: &'a mut Lab, lbagent: PathBuf) -> Result<Self> {
        let services = lab.dir.join("services.yaml");
        write_services(&services, &[&WEB, &GAME])?;
        let mut nodes = Vec::new();
        for host in &NODES {
            let dir = lab.dir.join(host.name);
            std::fs::create_dir_all(&dir)?;
            let node = Node {
                host,
                config: dir.join("lbagent.yaml"),
                pins: lab.pin_root(host.name),
                status: dir.join("status.json"),
                pid: 0,
            };
            std::fs::write(
                &node.config,
                format!(
                    "node: {{name: {name}}}
source: {{file: {{path: {services}}}}}
status: {{path: {status}}}
dataplane: {{interfaces: [eth0], pinRoot: {pins}}}
routing:
  stateDir: {bird}
  bgp:
    - {{name: up4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, keepaliveTime: 1s, connectRetryTime: 1s, connectDelayTime: 1s}}
    - {{name: up6, neighbor: \"fd00::1\", asn: 64500, localAsn: 64512, keepaliveTime: 1s, connectRetryTime: 1s, connectDelayTime: 1s}}
",
                    name = host.name,
                    services = services.display(),
                    status = node.status.display(),
                    pins = node.pins.display(),
                    bird = dir.join("bird").display(),
                ),
            )?;
            nodes.push(node);
        }
        Ok(Self {
            router: lab.ns(ROUTER),
            lab,
            lbagent,
            services,
            nodes,
        })
    }

    fn run(mut self) -> Result<()> {
        self.introduce()?;
        self.start()?;
        self.serve()?;
        let sent = self.traffic()?;
        self.counters(&sent)?;
        self.status()?;
        self.withdraw()?;
        self.cleanup()
    }

    /// `lbagent ...` in `node`'s namespace.
    fn lbagent(&self, node: &Node) -> Command {
        self.lab.in_ns(node.host.name, &self.lbagent)
    }

    fn introduce(&self) -> Result<()> {
        let middle = " router: FRR (bgpd, zebra), AS 64500 ";
        let blank = " ".repeat(middle.chars().count() + 1);
        let agent = "lbagent run, its BIRD (AS 64512)";
        println!(
            "lbagent demo: a router, two nodes and two clients, each a network namespace lbdemo-{}-*\n",
            self.lab.id()
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
        show(Command::new("cat").arg(&self.services))?;
        step(
            "node-1's config: the file source, XDP on eth0, and a BGP session per family to the router",
        );
        show(Command::new("cat").arg(&self.nodes[0].config))
    }

    fn start(&mut self) -> Result<()> {
        step("Start FRR on the router, then `lbagent run` on each node (in the node's namespace)");
        self.lab.start_frr(BGPD_CONF)?;
        for i in 0..self.nodes.len() {
            let node = &self.nodes[i];
            let mut command = self.lbagent(node);
            command.args(["run", "--config"]).arg(&node.config);
            println!("$ {}", command_line(&command));
            let name = node.host.name;
            self.nodes[i].pid = self.lab.spawn(name, &mut command)?;
        }
        let took = wait_until(Duration::from_secs(60), || {
            addresses().all(|address| next_hops(&self.router, address).len() == 2)
        })
        .context("the router did not learn every address from both nodes")?;
        step(&format!(
            "The router learned each address from both nodes over BGP ({:.1} s): two next hops each, ECMP",
            took.as_secs_f64()
        ));
        self.show_routes()
    }

    fn show_routes(&self) -> Result<()> {
        for family in ["-4", "-6"] {
            let args = format!("-n {} {family} route show proto bgp", self.router);
            show(Command::new("ip").args(args.split(' ')))?;
        }
        Ok(())
    }

    fn serve(&mut self) -> Result<()> {
        step(&format!(
            "Each node serves web (TCP {}) and game (UDP {}) with socat, bound to the addresses lbagent put on kube-lb0",
            WEB.port, GAME.port
        ));
        for node in &NODES {
            for target in targets() {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", &self.lab.ns(node.name), "socat"])
                    .arg(target.listen())
                    .arg(target.answer(node.name));
                if node.name == NODES[0].name && target.address == WEB.addresses[0] {
                    println!(
                        "$ {}   (and likewise for the others)",
                        command_line(&command)
                    );
                }
                self.lab
                    .spawn(&format!("{}-{}", node.name, target.address), &mut command)?;
            }
        }
        show(Command::new("ip").args([
            "-n",
            &self.lab.ns(NODES[0].name),
            "-br",
            "addr",
            "show",
            "kube-lb0",
        ]))?;
        for node in &NODES {
            wait_until(Duration::from_secs(10), || {
                cmd::output(self.lab.in_ns(node.name, "ss").arg("-Hlntu"))
                    .is_ok_and(|out| out.lines().count() >= targets().len())
            })
            .with_context(|| format!("the servers on {} did not start", node.name))?;
        }
        Ok(())
    }

    fn traffic(&self) -> Result<Sent> {
        let mut sent = Sent::default();
        step(&format!(
            "The client ({}, {}) sends {REQUESTS} requests to each address; the answers name the node that served each",
            CLIENT.v4, CLIENT.v6
        ));
        println!(
            "$ {}   (and likewise for the others)",
            command_line(&WEB.v4().request(self.lab, &CLIENT))
        );
        for target in targets() {
            let (answers, frames) = target.requests(self.lab, &CLIENT, REQUESTS)?;
            println!("  {}  {}", target.describe(), answers.join(" | "));
            if answers.iter().any(|a| !a.starts_with("hello from node-")) {
                bail!("the client was not served by {}", target.describe());
            }
            *sent.all.entry(target.address).or_default() += frames;
        }

        step(&format!(
            "The outsider ({}, {}) is outside the services' sourceRanges: XDP drops its packets on the nodes (-: no answer)",
            OUTSIDER.v4, OUTSIDER.v6
        ));
        println!(
            "$ {}   (and likewise for game)",
            command_line(&WEB.v4().request(self.lab, &OUTSIDER))
        );
        for target in [WEB.v4(), GAME.v6()] {
            let (answers, frames) = target.requests(self.lab, &OUTSIDER, OUTSIDER_TRIES)?;
            println!("  {}  {}", target.describe(), answers.join(" | "));
            if answers.iter().any(|a| a.starts_with("hello")) {
                bail!("the outsider was served by {}", target.describe());
            }
            *sent.all.entry(target.address).or_default() += frames;
            *sent.outsider.entry(target.address).or_default() += frames;
        }
        Ok(sent)
    }

    fn counters(&self, sent: &Sent) -> Result<()> {
        step("`lbagent counters` on each node: frames and bytes per address, summed over CPUs");
        let mut counted = Vec::new();
        for node in &self.nodes {
            let agent = |args: &[&str]| {
                let mut command = self.lbagent(node);
                command.arg("--pin-root").arg(&node.pins).args(args);
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
        for address in addresses() {
            let [one, two] = [0, 1].map(|i| counted[i].get(address).copied().unwrap_or_default());
            let all = sent.all.get(address).copied().unwrap_or_default();
            let outsider = sent.outsider.get(address).copied().unwrap_or_default();
            let same = one.0 + two.0 == all && one.1 + two.1 == outsider;
            differs |= !same;
            println!(
                "  {address:<16} {all:>5} {:>7} {:>7} {outsider:>14} {:>12}  {}",
                one.0,
                two.0,
                one.1 + two.1,
                if same { "adds up" } else { "DIFFERS" }
            );
        }
        if differs {
            bail!("the nodes' counters differ from what the clients sent");
        }

        // The node where ECMP sent the outsider's SYNs to web, so that drop_source shows.
        let (node, slot) = self
            .nodes
            .iter()
            .zip(&counted)
            .find_map(|(node, counted)| {
                let web = counted.get(WEB.addresses[0]).filter(|c| c.1 > 0)?;
                Some((node, web.2))
            })
            .context("no node counted the outsider's packets")?;
        step(&format!(
            "The same counters from the kernel: bpftool reads web's IPv4 slot in {}'s pinned maps, fields named by BTF, counters one value per CPU",
            node.host.name
        ));
        let dir = node
            .pins
            .join(format!("v{}", lbagent_common::PIN_LAYOUT_VERSION));
        // Both maps are arrays indexed by the address's slot (a u32, little-endian here), which
        // `lbagent counters -o json` names; the config entry repeats the address.
        let key: Vec<String> = slot.to_le_bytes().iter().map(u8::to_string).collect();
        for map in [
            lbagent_common::maps::VIP_CONFIG,
            lbagent_common::maps::VIP_STATS,
        ] {
            show(
                Command::new("bpftool")
                    .args(["map", "lookup", "pinned"])
                    .arg(dir.join(map))
                    .arg("key")
                    .args(&key),
            )?;
        }
        Ok(())
    }

    fn status(&self) -> Result<()> {
        step(
            "`lbagent status` on node-1: the addresses it holds, for which services, and its BGP sessions",
        );
        let node = &self.nodes[0];
        show(
            self.lbagent(node)
                .args(["status", "--status-file"])
                .arg(&node.status),
        )
    }

    fn withdraw(&self) -> Result<()> {
        step(
            "game is removed from the services file: both nodes withdraw its addresses, and the router forgets them",
        );
        let removed = Instant::now();
        write_services(&self.services, &[&WEB])?;
        wait_until(Duration::from_secs(20), || {
            GAME.addresses
                .iter()
                .all(|address| next_hops(&self.router, address).is_empty())
        })
        .context("the router kept game's routes")?;
        println!(
            "(gone from the router {} ms after the file changed)",
            removed.elapsed().as_millis()
        );
        self.show_routes()
    }

    fn cleanup(self) -> Result<()> {
        step(
            "Clean-up: stop each agent, then `lbagent cleanup` withdraws its routes and removes kube-lb0, BIRD's files and every pin",
        );
        for node in &self.nodes {
            println!(
                "$ kill -TERM {}   # lbagent run on {}: BIRD restarts gracefully, the router keeps the routes",
                node.pid, node.host.name
            );
            let status = self.lab.stop(node.host.name)?;
            if !status.success() {
                bail!("lbagent run on {} exited with {status}", node.host.name);
            }
            show(
                self.lbagent(node)
                    .args(["cleanup", "--config"])
                    .arg(&node.config),
            )?;
            if node.pins.exists() {
                bail!("{} is still there after cleanup", node.pins.display());
            }
        }
        wait_until(Duration::from_secs(20), || {
            addresses().all(|address| next_hops(&self.router, address).is_empty())
        })
        .context("the router kept routes after cleanup")?;
        self.show_routes()?;
        println!("(no BGP route left on the router)");
        Ok(())
    }
}

fn targets() -> [Target; 4] {
    [WEB.v4(), WEB.v6(), GAME.v4(), GAME.v6()]
}

fn addresses() -> impl Iterator<Item = &'static str> {
    targets().into_iter().map(|t| t.address)
}

/// `lbagent counters -o json` as (packets, drop_source, slot) per address.
fn counters(json: &str) -> Result<BTreeMap<String, (u64, u64, u32)>> {
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
                (
                    vip["packets"].as_u64()?,
                    vip["drops"]["source"].as_u64()?,
                    u32::try_from(vip["slot"].as_u64()?).ok()?,
                ),
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

/// After the lab is dropped: no namespace or pin root of this run is left.
fn leftovers(id: u32) -> Result<()> {
    let namespaces = cmd::output(Command::new("ip").args(["netns", "list"]))?;
    let left: Vec<&str> = namespaces
        .lines()
        .filter(|l| l.starts_with(&lab::prefix(id)))
        .collect();
    let pins = lab::leftover_pin_roots(id);
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
