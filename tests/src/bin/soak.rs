//! The soak under faults that `cargo xtask soak --minutes N` runs (xtask/src/soak.rs builds
//! and starts it; it needs root): an FRR router, two nodes running `lbagent run` in Kubernetes
//! mode against the in-process API server (with the dataplane and BGP over IPv4 and IPv6),
//! `lbagent allocator` assigning the Services' addresses from an AddressPool per family, and a
//! client on the router probing both addresses of the dual-stack Services that exist
//! throughout (their addresses requested). Services of either family or both churn (created,
//! changed, deleted) while faults are injected at random intervals: agent SIGKILL, BIRD
//! SIGKILL, allocator SIGKILL, the API server killed and restarted, kube-lb0 and its addresses
//! tampered with, a node's uplink set down and up. After each fault the churn pauses and the invariants must hold again
//! within a deadline:
//!
//! - every LoadBalancer Service of the soak has one address per family it lists (those it
//!   requested, if it did), and no address is held by two Services;
//! - every node's kube-lb0 and dataplane map hold exactly the Services' addresses, IPv4 and
//!   IPv6;
//! - the router holds exactly those routes, each through both nodes' addresses of its family;
//! - each agent's RSS and open descriptors stay within bounds; one BIRD and one agent per
//!   node, one allocator; the pinned files are those of the first settled state;
//! - no agent or allocator log holds a panic;
//! - no probe of a Service that existed throughout failed outside a fault window.
//!
//! Usage: `soak --minutes N [--seed S]`. Prints operations, faults, checks passed and
//! violations; exits non-zero on any violation.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lbagent_tests::{
    Agent, NetNs, PinRoot, Servers, TempDir, addresses_on,
    apiserver::{ApiServer, ingress},
    in_netns, kill_child, lbagent, lbagent_bin, memory_kb,
    routers::{FRR_ROUTER, Fabric, Frr, gateways},
    wait_until,
};
use serde_json::{Value, json};

/// Services that exist throughout: the client probes these.
const STABLE: usize = 3;
/// Churned Services at most.
const CHURNED: usize = 20;
/// How long the invariants may take to hold again after a fault.
const SETTLE: Duration = Duration::from_secs(90);
/// A probe takes up to a second (its timeout); failures this close to a window are in it.
const PROBE_GRACE: Duration = Duration::from_secs(2);
const MAX_RSS_KB: u64 = 256 * 1024;
const MAX_FDS: usize = 256;
const PORT: u16 = 80;

const BGP: &str = "  bgp:
    - {name: up4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, holdTime: 3s, keepaliveTime: 1s, connectRetryTime: 1s, connectDelayTime: 1s}
    - {name: up6, neighbor: \"fd00::1\", asn: 64500, localAsn: 64512, holdTime: 3s, keepaliveTime: 1s, connectRetryTime: 1s, connectDelayTime: 1s}
";

/// The address families a Service asks for, as `spec.ipFamilies` lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Families {
    V4,
    V6,
    Dual,
}

impl Families {
    const ALL: [Families; 3] = [Families::V4, Families::V6, Families::Dual];

    fn ip_families(self) -> Value {
        match self {
            Families::V4 => json!(["IPv4"]),
            Families::V6 => json!(["IPv6"]),
            Families::Dual => json!(["IPv4", "IPv6"]),
        }
    }

    fn policy(self) -> &'static str {
        match self {
            Families::Dual => "RequireDualStack",
            _ => "SingleStack",
        }
    }

    fn v4(self) -> bool {
        self != Families::V6
    }

    fn v6(self) -> bool {
        self != Families::V4
    }
}

/// The pools the allocator assigns from on its own, one per family.
const AUTO_POOLS: [(&str, &str); 2] = [
    ("soak-v4", "203.0.113.0/25"),
    ("soak-v6", "2001:db8:ff::/121"),
];
/// The pools only Services asking for their addresses get them from (`autoAssign: false`), so
/// that a request never races the allocator's own choice for another Service.
const REQUESTED_POOLS: [(&str, &str); 2] = [
    ("soak-requested-v4", "203.0.113.128/25"),
    ("soak-requested-v6", "2001:db8:ff::80/121"),
];

/// A stable Service's addresses, requested: the client probes both.
fn stable_addresses(i: usize) -> [String; 2] {
    [
        format!("203.0.113.{}", 129 + i),
        format!("2001:db8:ff::{:x}", 0x81 + i),
    ]
}

/// `address` as kube-lb0 holds it: a host prefix of its family.
fn host_prefix(address: &str) -> String {
    if address.contains(':') {
        format!("{address}/128")
    } else {
        format!("{address}/32")
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut minutes = 1.0_f64;
    let mut seed = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--minutes" => minutes = args.next().context("--minutes N")?.parse()?,
            "--seed" => seed = Some(args.next().context("--seed S")?.parse()?),
            other => bail!("unknown argument {other:?}; usage: soak --minutes N [--seed S]"),
        }
    }
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1
    });
    println!("soak: {minutes} min, seed {seed}");
    let mut soak = Soak::start(seed)?;
    let report = soak.run(Duration::from_secs_f64(minutes * 60.0));
    report.print();
    if report.violations.is_empty() {
        Ok(())
    } else {
        bail!("{} violations", report.violations.len())
    }
}

/// xorshift64*: enough randomness for choosing faults, and a seed reruns a soak.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// From the high bits: the low bits of xorshift64* are its weakest (a 30-minute soak drew
    /// one fault kind of eight never when they chose it).
    fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 32) % n.max(1)
    }

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(low + self.below(high - low))
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    AgentKill,
    BirdKill,
    AllocatorKill,
    ApiServerRestart,
    Kubelb0AddressDeleted,
    Kubelb0StrayAddress,
    Kubelb0Deleted,
    UplinkDownUp,
}

const FAULTS: [Fault; 8] = [
    Fault::AgentKill,
    Fault::BirdKill,
    Fault::AllocatorKill,
    Fault::ApiServerRestart,
    Fault::Kubelb0AddressDeleted,
    Fault::Kubelb0StrayAddress,
    Fault::Kubelb0Deleted,
    Fault::UplinkDownUp,
];

struct Node {
    ns: NetNs,
    pins: PinRoot,
    config: PathBuf,
    dir: PathBuf,
    agent: Option<Agent>,
    incarnation: usize,
    _servers: Servers,
}

impl Node {
    fn log(&self, incarnation: usize) -> PathBuf {
        self.dir.join(format!("agent-{incarnation}.log"))
    }

    fn start_agent(&mut self) {
        self.incarnation += 1;
        self.agent = Some(Agent::start(
            &self.ns,
            &self.config,
            self.log(self.incarnation),
        ));
    }

    fn pid(&self) -> u32 {
        self.agent.as_ref().map_or(0, Agent::pid)
    }

    fn logs(&self) -> String {
        (1..=self.incarnation)
            .map(|i| std::fs::read_to_string(self.log(i)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Processes in the namespace by command name.
    fn processes(&self, comm: &str) -> Vec<i32> {
        let out = std::process::Command::new("ip")
            .args(["netns", "pids", self.ns.name()])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
            })
            .collect()
    }
}

/// `lbagent allocator` in the router's namespace, where the API server listens; each
/// incarnation logs to a file of its own.
struct Allocator {
    router: Arc<NetNs>,
    kubeconfig: PathBuf,
    dir: PathBuf,
    child: Option<std::process::Child>,
    incarnation: usize,
}

impl Allocator {
    const IDENTITY: &str = "soak-allocator";

    fn log(&self, incarnation: usize) -> PathBuf {
        self.dir.join(format!("allocator-{incarnation}.log"))
    }

    fn start(&mut self) -> Result<()> {
        self.incarnation += 1;
        let log = std::fs::File::create(self.log(self.incarnation))?;
        let child = self
            .router
            .command(&lbagent_bin())
            .arg("allocator")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--lease-namespace", "lbagent", "--identity", Self::IDENTITY])
            .args(["--lease-duration", "3s", "--renew-deadline", "2s"])
            .args(["--retry-period", "250ms"])
            .env("LBAGENT_LOG", "info")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start lbagent allocator")?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL (std's `Child::kill`), reaped.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child, "lbagent allocator");
        }
    }

    fn logs(&self) -> String {
        (1..=self.incarnation)
            .map(|i| std::fs::read_to_string(self.log(i)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Default)]
struct Report {
    operations: usize,
    faults: BTreeMap<String, usize>,
    checks: usize,
    violations: Vec<String>,
    /// What the allocator said of each Service that did not hold what it asked for.
    explanations: Vec<String>,
    probes: usize,
    probe_failures_in_windows: usize,
    /// The most any agent held when the invariants held.
    max_rss_kb: u64,
    max_fds: usize,
}

impl Report {
    fn print(&self) {
        println!("| measure | value |");
        println!("| --- | ---: |");
        println!(
            "| Service operations (create, change, delete) | {} |",
            self.operations
        );
        for (fault, count) in &self.faults {
            println!("| fault: {fault} | {count} |");
        }
        println!(
            "| faults injected | {} |",
            self.faults.values().sum::<usize>()
        );
        println!("| invariant checks passed | {} |", self.checks);
        println!("| max agent RSS at a check (kB) | {} |", self.max_rss_kb);
        println!(
            "| max agent open descriptors at a check | {} |",
            self.max_fds
        );
        println!("| client probes | {} |", self.probes);
        println!(
            "| probes failed inside fault windows | {} |",
            self.probe_failures_in_windows
        );
        println!("| violations | {} |", self.violations.len());
        for violation in &self.violations {
            println!("violation: {violation}");
        }
        for explanation in &self.explanations {
            println!("explained: {explanation}");
        }
    }
}

/// What the client saw: every failed probe of a stable Service, and the fault windows.
#[derive(Default)]
struct Probes {
    count: usize,
    /// When, to where, and why (connect or reply, and the error).
    failures: Vec<(Instant, SocketAddr, String)>,
    windows: Vec<(Instant, Option<Instant>)>,
}

/// A Service of the soak as it was last written; the allocator gives it its addresses.
struct Service {
    families: Families,
    port: u16,
    /// Asked for through `lbagent.io/addresses`, from the pools that assign only on request.
    requested: Vec<String>,
}

struct Soak {
    rng: Rng,
    server: Arc<ApiServer>,
    router: Arc<NetNs>,
    nodes: Vec<Node>,
    allocator: Allocator,
    services: BTreeMap<String, Service>,
    next_service: usize,
    probes: Arc<Mutex<Probes>>,
    probing: Arc<AtomicBool>,
    pinned: Option<Vec<BTreeSet<PathBuf>>>,
    _frr: Frr,
    _dir: TempDir,
}

impl Soak {
    fn start(seed: u64) -> Result<Self> {
        let fabric = Fabric::new(2);
        let frr = Frr::start(&fabric.router, FRR_ROUTER, true);
        let server = Arc::new(ApiServer::start_in_at(
            &fabric.router,
            Fabric::ROUTER_V4.parse()?,
        ));
        for namespace in ["default", "lbagent"] {
            server.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": namespace}}));
        }
        for (pools, auto_assign) in [(AUTO_POOLS, true), (REQUESTED_POOLS, false)] {
            for (name, range) in pools {
                server.apply(json!({
                    "apiVersion": "lbagent.io/v1alpha1", "kind": "AddressPool",
                    "metadata": {"name": name},
                    "spec": {"addresses": [range], "autoAssign": auto_assign,
                             "avoidBuggyIPs": true},
                }));
            }
        }
        let dir = TempDir::new("lb-soak");
        let router = Arc::new(fabric.router);
        let kubeconfig = dir.path().join("allocator.kubeconfig");
        server.write_kubeconfig_as(&kubeconfig, Some(Allocator::IDENTITY));
        let mut allocator = Allocator {
            router: router.clone(),
            kubeconfig,
            dir: dir.path().to_owned(),
            child: None,
            incarnation: 0,
        };
        allocator.start()?;
        let nodes = fabric.nodes;
        let mut soak_nodes = Vec::new();
        for (i, ns) in nodes.into_iter().enumerate() {
            let name = format!("node-{}", i + 1);
            server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}));
            let node_dir = dir.path().join(&name);
            std::fs::create_dir_all(&node_dir)?;
            server.write_kubeconfig(&node_dir.join("kubeconfig"));
            let pins = PinRoot::new();
            let config = node_dir.join("lbagent.yaml");
            std::fs::write(
                &config,
                format!(
                    "node: {{name: {name}}}\nsource: {{kubernetes: {{kubeconfig: kubeconfig}}}}\n\
                     status: {{path: {}}}\ndataplane: {{pinRoot: {}}}\n\
                     routing:\n  stateDir: {}\n{BGP}",
                    node_dir.join("status.json").display(),
                    pins.path().display(),
                    node_dir.join("bird").display()
                ),
            )?;
            // Any address kube-lb0 holds answers on the port, of either family.
            let servers = Servers::start(&ns, &[SocketAddr::from(([0u16; 8], PORT))], &[]);
            let mut node = Node {
                ns,
                pins,
                config,
                dir: node_dir,
                agent: None,
                incarnation: 0,
                _servers: servers,
            };
            node.start_agent();
            soak_nodes.push(node);
        }
        let mut soak = Self {
            rng: Rng(seed),
            server,
            router,
            nodes: soak_nodes,
            allocator,
            services: BTreeMap::new(),
            next_service: 0,
            probes: Arc::default(),
            probing: Arc::new(AtomicBool::new(true)),
            pinned: None,
            _frr: frr,
            _dir: dir,
        };
        for i in 0..STABLE {
            let service = Service {
                families: Families::Dual,
                port: PORT,
                requested: stable_addresses(i).into(),
            };
            soak.put_service(&format!("stable-{i}"), service);
        }
        Ok(soak)
    }

    /// Writes the Service's spec as a user would; its status is the allocator's.
    fn put_service(&mut self, name: &str, service: Service) {
        let annotations = if service.requested.is_empty() {
            json!({})
        } else {
            json!({"lbagent.io/addresses": service.requested.join(", ")})
        };
        let mut object = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "annotations": annotations},
            "spec": {"type": "LoadBalancer", "ipFamilies": service.families.ip_families(),
                     "ipFamilyPolicy": service.families.policy(),
                     "externalTrafficPolicy": "Cluster",
                     "ports": [{"port": service.port, "protocol": "TCP"}]},
        });
        // A change keeps the status the allocator wrote, as an object write does in a cluster.
        if let Some(status) = self
            .server
            .get("v1", "Service", Some("default"), name)
            .map(|s| s["status"].clone())
        {
            object["status"] = status;
        }
        self.server.apply(object);
        self.services.insert(name.to_owned(), service);
    }

    /// Addresses of `families` from the pools that assign only on request, that no Service
    /// of the soak asks for.
    fn free_requested(&mut self, families: Families) -> Vec<String> {
        let taken: BTreeSet<String> = self
            .services
            .values()
            .flat_map(|s| s.requested.iter().cloned())
            .collect();
        // .129 to .254, ::81 to ::fe: inside the pools, clear of the buggy .255.
        let mut pick = |format: fn(u64) -> String| loop {
            let candidate = format(0x81 + self.rng.below(0x7e));
            if !taken.contains(&candidate) {
                return candidate;
            }
        };
        let mut addresses = Vec::new();
        if families.v4() {
            addresses.push(pick(|n| format!("203.0.113.{n}")));
        }
        if families.v6() {
            addresses.push(pick(|n| format!("2001:db8:ff::{n:x}")));
        }
        addresses
    }

    /// One random change to the churned Services.
    fn churn(&mut self, report: &mut Report) {
        let churned: Vec<String> = self
            .services
            .keys()
            .filter(|n| n.starts_with("churn-"))
            .cloned()
            .collect();
        match self.rng.below(3) {
            0 if churned.len() < CHURNED => {
                let name = format!("churn-{}", self.next_service);
                self.next_service += 1;
                let families = Families::ALL[self.rng.below(3) as usize];
                let service = Service {
                    families,
                    port: PORT,
                    requested: Vec::new(),
                };
                self.put_service(&name, service);
            }
            1 if !churned.is_empty() => {
                // Another port, other families, or addresses asked for (or no longer).
                let name = churned[self.rng.below(churned.len() as u64) as usize].clone();
                let families = Families::ALL[self.rng.below(3) as usize];
                let requested = if self.rng.below(3) == 0 {
                    self.free_requested(families)
                } else {
                    Vec::new()
                };
                let port = [PORT, 8080, 443][self.rng.below(3) as usize];
                let service = Service {
                    families,
                    port,
                    requested,
                };
                self.put_service(&name, service);
            }
            _ if !churned.is_empty() => {
                let name = churned[self.rng.below(churned.len() as u64) as usize].clone();
                self.server.delete("v1", "Service", Some("default"), &name);
                self.services.remove(&name);
            }
            _ => return,
        }
        report.operations += 1;
    }

    fn start_probing(&self) -> std::thread::JoinHandle<()> {
        let targets: Vec<SocketAddr> = (0..STABLE)
            .flat_map(stable_addresses)
            .filter_map(|a| a.parse().ok())
            .map(|ip| SocketAddr::new(ip, PORT))
            .collect();
        let router = self.router.clone();
        let probes = self.probes.clone();
        let probing = self.probing.clone();
        std::thread::spawn(move || {
            let mut i = 0;
            while probing.load(Ordering::Relaxed) {
                let target = targets[i % targets.len()];
                i += 1;
                let started = Instant::now();
                let probed = probe(&router, target);
                let mut probes = probes.lock().expect("probes");
                probes.count += 1;
                if let Err(why) = probed {
                    let why = format!("{why}; load average {}", load_average());
                    probes.failures.push((started, target, why));
                }
                drop(probes);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    }

    fn run(&mut self, duration: Duration) -> Report {
        let mut report = Report::default();
        let started = Instant::now();
        // The first state, before any fault.
        self.settle(&mut report, "start");
        let prober = self.start_probing();
        while started.elapsed() < duration {
            let quiet_until = Instant::now() + self.rng.millis(3_000, 10_000);
            while Instant::now() < quiet_until {
                self.churn(&mut report);
                std::thread::sleep(self.rng.millis(100, 500));
            }
            let fault = FAULTS[self.rng.below(FAULTS.len() as u64) as usize];
            let window = self.open_window();
            let what = self.inject(fault, &mut report);
            *report.faults.entry(format!("{fault:?}")).or_default() += 1;
            self.settle(&mut report, &what);
            self.close_window(window);
        }
        self.probing.store(false, Ordering::Relaxed);
        let _ = prober.join();
        self.judge_probes(&mut report);
        report
    }

    fn open_window(&self) -> usize {
        let mut probes = self.probes.lock().expect("probes");
        probes.windows.push((Instant::now(), None));
        probes.windows.len() - 1
    }

    fn close_window(&self, window: usize) {
        self.probes.lock().expect("probes").windows[window].1 = Some(Instant::now());
    }

    fn judge_probes(&self, report: &mut Report) {
        let probes = self.probes.lock().expect("probes");
        report.probes = probes.count;
        for (at, target, why) in &probes.failures {
            let inside = probes.windows.iter().any(|(from, to)| {
                *at + PROBE_GRACE >= *from && to.is_none_or(|to| *at <= to + PROBE_GRACE)
            });
            if inside {
                report.probe_failures_in_windows += 1;
            } else {
                report.violations.push(format!(
                    "a probe of {target} failed outside every fault window, {:.1} s into the \
                     soak ({why})",
                    at.duration_since(probes.windows.first().map_or(*at, |w| w.0))
                        .as_secs_f64()
                ));
            }
        }
    }

    /// Injects `fault` and returns what it did.
    fn inject(&mut self, fault: Fault, report: &mut Report) -> String {
        let k = self.rng.below(self.nodes.len() as u64) as usize;
        let node = &mut self.nodes[k];
        let on = format!("node-{}", k + 1);
        match fault {
            Fault::AgentKill => {
                // Dropping it sends SIGKILL (std's `Child::kill`) and reaps it.
                drop(node.agent.take());
                std::thread::sleep(self.rng.millis(0, 2_000));
                self.nodes[k].start_agent();
                format!("agent SIGKILL on {on}")
            }
            Fault::BirdKill => {
                for pid in node.processes("bird") {
                    signal(pid, nix::sys::signal::Signal::SIGKILL);
                }
                format!("BIRD SIGKILL on {on}")
            }
            Fault::AllocatorKill => {
                self.allocator.kill();
                std::thread::sleep(self.rng.millis(0, 2_000));
                // It restarts as a Deployment's pod would; a failure to is a violation.
                if let Err(err) = self.allocator.start() {
                    report
                        .violations
                        .push(format!("the allocator did not restart: {err:#}"));
                }
                "allocator SIGKILL and restart".to_owned()
            }
            Fault::ApiServerRestart => {
                self.server.stop();
                // The cluster changes while the agents cannot see it.
                let down_until = Instant::now() + self.rng.millis(1_000, 5_000);
                while Instant::now() < down_until {
                    self.churn(report);
                    std::thread::sleep(Duration::from_millis(300));
                }
                self.server.restart();
                "API server killed and restarted".to_owned()
            }
            Fault::Kubelb0AddressDeleted => {
                let held: Vec<String> = addresses_on(&node.ns, "kube-lb0").into_iter().collect();
                if let Some(address) = held.get(self.rng.below(held.len() as u64) as usize) {
                    let _ = node
                        .ns
                        .exec("ip", &["addr", "del", address, "dev", "kube-lb0"]);
                }
                format!("an address deleted from kube-lb0 on {on}")
            }
            Fault::Kubelb0StrayAddress => {
                let stray = ["198.51.100.77/32", "2001:db8:77::77/128"][self.rng.below(2) as usize];
                let _ = node
                    .ns
                    .exec("ip", &["addr", "add", stray, "dev", "kube-lb0", "nodad"]);
                format!("a stray address put on kube-lb0 on {on}")
            }
            Fault::Kubelb0Deleted => {
                let _ = node.ns.exec("ip", &["link", "del", "kube-lb0"]);
                format!("kube-lb0 deleted on {on}")
            }
            Fault::UplinkDownUp => {
                node.ns.ip(&["link", "set", "eth0", "down"]);
                std::thread::sleep(self.rng.millis(500, 4_000));
                let ns = &self.nodes[k].ns;
                ns.ip(&["link", "set", "eth0", "up"]);
                // The kernel dropped the default routes with the link, and its IPv6 address;
                // as a node's network setup would, they come back (the dataplane follows the
                // default route's interface).
                ns.ip(&["route", "replace", "default", "via", Fabric::ROUTER_V4]);
                let v6 = format!("{}/64", Fabric::node_v6(k + 1));
                ns.ip(&["addr", "replace", &v6, "dev", "eth0", "nodad"]);
                ns.ip(&[
                    "-6",
                    "route",
                    "replace",
                    "default",
                    "via",
                    Fabric::ROUTER_V6,
                ]);
                format!("uplink down and up on {on}")
            }
        }
    }

    /// Waits until every invariant holds; a violation for each one that does not by the
    /// deadline.
    fn settle(&mut self, report: &mut Report, after: &str) {
        let mut failing = Vec::new();
        let held = wait_until(SETTLE, || {
            failing = self.check();
            failing.is_empty()
        });
        if held {
            report.checks += 1;
            for node in &self.nodes {
                let pid = node.pid();
                report.max_rss_kb = report.max_rss_kb.max(memory_kb(pid, "VmRSS"));
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
                report.max_fds = report.max_fds.max(fds);
            }
            if self.pinned.is_none() {
                self.pinned = Some(self.nodes.iter().map(pinned).collect());
            }
        } else {
            for failure in failing {
                report.violations.push(format!("after {after}: {failure}"));
            }
            for name in self.misplaced() {
                report.explanations.push(self.explain(&name));
            }
        }
    }

    /// What does not hold now, as sentences.
    fn check(&self) -> Vec<String> {
        let mut failing = Vec::new();
        let assigned = self.assigned(&mut failing);
        let wanted: BTreeSet<String> = assigned
            .values()
            .flatten()
            .map(|a| host_prefix(a))
            .collect();
        for (k, node) in self.nodes.iter().enumerate() {
            let on = format!("node-{}", k + 1);
            let held = addresses_on(&node.ns, "kube-lb0");
            if held != wanted {
                failing.push(format!("{on}: kube-lb0 holds {held:?}, want {wanted:?}"));
            }
            let mapped = dataplane_addresses(node);
            if mapped != wanted {
                failing.push(format!("{on}: the dataplane holds {mapped:?}"));
            }
            let pid = node.pid();
            let rss = memory_kb(pid, "VmRSS");
            if rss > MAX_RSS_KB {
                failing.push(format!("{on}: agent RSS {rss} kB > {MAX_RSS_KB} kB"));
            }
            let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
            if fds > MAX_FDS {
                failing.push(format!("{on}: agent has {fds} open descriptors"));
            }
            let birds = node.processes("bird").len();
            let agents = node.processes("lbagent").len();
            if birds != 1 || agents != 1 {
                failing.push(format!("{on}: {agents} agents and {birds} BIRDs running"));
            }
            if let Some(pinned_then) = self.pinned.as_ref().map(|p| &p[k]) {
                let now = pinned(node);
                if now != *pinned_then {
                    failing.push(format!("{on}: pinned {now:?}, first {pinned_then:?}"));
                }
            }
            let logs = node.logs();
            if let Some(line) = logs.lines().find(|l| l.contains("panicked")) {
                failing.push(format!("{on}: a panic: {line}"));
            }
        }
        if self.allocator.child.is_none() {
            failing.push("no allocator runs".to_owned());
        }
        let allocators = self.router.processes("lbagent").len();
        if allocators != 1 {
            failing.push(format!("{allocators} allocators running"));
        }
        if let Some(line) = self
            .allocator
            .logs()
            .lines()
            .find(|l| l.contains("panicked"))
        {
            failing.push(format!("the allocator: a panic: {line}"));
        }
        // FRR installs IPv6 routes through the nodes' link-local addresses: a next hop is
        // named by the node it is an address of.
        let mut node_of = BTreeMap::new();
        for (k, node) in self.nodes.iter().enumerate() {
            let on = format!("node-{}", k + 1);
            node_of.insert(Fabric::node_v4(k + 1), on.clone());
            node_of.insert(Fabric::node_v6(k + 1), on.clone());
            if let Some(link_local) = link_local(&node.ns, "eth0") {
                node_of.insert(link_local, on);
            }
        }
        let routes: BTreeMap<String, Vec<String>> = router_routes(&self.router)
            .into_iter()
            .map(|(prefix, hops)| {
                let mut nodes: Vec<String> = hops
                    .iter()
                    .map(|hop| node_of.get(hop).cloned().unwrap_or_else(|| hop.clone()))
                    .collect();
                nodes.sort();
                (prefix, nodes)
            })
            .collect();
        let want_routes: BTreeMap<String, Vec<String>> = wanted
            .iter()
            .map(|p| (p.clone(), vec!["node-1".to_owned(), "node-2".to_owned()]))
            .collect();
        if routes != want_routes {
            failing.push(format!("the router has {routes:?}"));
        }
        failing
    }
}

impl Soak {
    /// The addresses each Service of the soak holds, as the API server has them; what is
    /// wrong with them goes to `failing`: a Service without one address per family it lists
    /// (or without those it asked for), an address held by two Services.
    fn assigned(&self, failing: &mut Vec<String>) -> BTreeMap<String, Vec<String>> {
        let mut assigned = BTreeMap::new();
        let mut holders = BTreeMap::<String, Vec<String>>::new();
        for object in self.server.objects("v1", "Service") {
            let name = object["metadata"]["name"].as_str().unwrap_or_default();
            let ingress = ingress(&object);
            for address in &ingress {
                holders
                    .entry(address.clone())
                    .or_default()
                    .push(name.to_owned());
            }
            assigned.insert(name.to_owned(), ingress);
        }
        for (address, names) in &holders {
            if names.len() > 1 {
                failing.push(format!("{address} is held by {names:?}"));
            }
        }
        for (name, service) in &self.services {
            let held = assigned.get(name).cloned().unwrap_or_default();
            if !service.holds_what_it_asks(&held) {
                failing.push(format!(
                    "{name} ({:?}, asking for {:?}) holds {held:?}",
                    service.families, service.requested
                ));
            }
        }
        assigned.retain(|name, _| self.services.contains_key(name));
        assigned
    }

    /// The Services of the soak that do not hold what they ask for, now.
    fn misplaced(&self) -> Vec<String> {
        self.services
            .iter()
            .filter(|(name, service)| !service.holds_what_it_asks(&self.status_of(name)))
            .map(|(name, _)| name.clone())
            .collect()
    }

    fn status_of(&self, name: &str) -> Vec<String> {
        self.server
            .get("v1", "Service", Some("default"), name)
            .map(|s| ingress(&s))
            .unwrap_or_default()
    }

    /// What the allocator said of a Service that does not hold what it asks for: its Events
    /// and log lines, and who holds each address it asks for; so that such a violation
    /// explains itself.
    fn explain(&self, name: &str) -> String {
        let events: Vec<String> = self
            .server
            .events()
            .iter()
            .filter(|e| e["regarding"]["name"] == name)
            .map(|e| {
                format!(
                    "{} {}",
                    e["reason"].as_str().unwrap_or_default(),
                    e["note"].as_str().unwrap_or_default()
                )
            })
            .collect();
        let key = format!("default/{name}");
        let logs = self.allocator.logs();
        let lines: Vec<&str> = logs.lines().filter(|line| names(line, &key)).collect();
        let mut text = format!(
            "{name}: its Events {events:?}; the allocator's last log lines of it: {:?}",
            &lines[lines.len().saturating_sub(8)..]
        );
        let requested = self
            .services
            .get(name)
            .map(|s| s.requested.clone())
            .unwrap_or_default();
        for address in requested {
            for object in self.server.objects("v1", "Service") {
                let holder = object["metadata"]["name"].as_str().unwrap_or_default();
                if holder != name && ingress(&object).contains(&address) {
                    let asks = object["metadata"]["annotations"]["lbagent.io/addresses"]
                        .as_str()
                        .unwrap_or("nothing");
                    text.push_str(&format!(
                        "; {address} is held by {holder}, which asks for {asks}"
                    ));
                }
            }
        }
        text
    }
}

impl Service {
    /// One address per family it lists, those it asks for if it does.
    fn holds_what_it_asks(&self, held: &[String]) -> bool {
        let v4 = held.iter().filter(|a| !a.contains(':')).count();
        let v6 = held.len() - v4;
        let families_ok =
            v4 == usize::from(self.families.v4()) && v6 == usize::from(self.families.v6());
        let requested: BTreeSet<&String> = self.requested.iter().collect();
        let requests_ok = requested.is_empty() || held.iter().collect::<BTreeSet<_>>() == requested;
        families_ok && requests_ok
    }
}

/// Whether a log line names the Service `key` (namespace/name), not one whose name only
/// starts alike.
fn names(line: &str, key: &str) -> bool {
    line.match_indices(key).any(|(at, _)| {
        !line[at + key.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    })
}

/// As `tcp_ok` probes, saying which step failed: connect, or the server's "ok" within 1 s.
fn probe(router: &NetNs, target: SocketAddr) -> Result<(), String> {
    in_netns(router, move || {
        use std::io::Read as _;
        let started = Instant::now();
        let mut stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(1))
            .map_err(|err| format!("connect: {err}"))?;
        let connected = started.elapsed();
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 2];
        match stream.read_exact(&mut reply) {
            Ok(()) if &reply == b"ok" => Ok(()),
            Ok(()) => Err(format!("replied {reply:?}")),
            Err(err) => Err(format!(
                "connected in {} ms, then no reply: {err}",
                connected.as_millis()
            )),
        }
    })
}

/// The machine's load average now (it may be shared with builds).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    if pid > 0 {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

fn pinned(node: &Node) -> BTreeSet<PathBuf> {
    node.pins.pinned_files().into_iter().collect()
}

/// The addresses in the dataplane's map, as `lbagent counters` reads them.
fn dataplane_addresses(node: &Node) -> BTreeSet<String> {
    let run = lbagent(&node.ns, &node.pins, &["counters", "-o", "json"]);
    let json: Value = serde_json::from_str(&run.stdout).unwrap_or_default();
    json["vips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["address"].as_str().map(host_prefix))
        .collect()
}

/// The IPv6 link-local address of `iface` in `ns`, without its prefix length.
fn link_local(ns: &NetNs, iface: &str) -> Option<String> {
    let out = ns.ip(&["-6", "-j", "addr", "show", "dev", iface, "scope", "link"]);
    let links: Value = serde_json::from_str(&out).ok()?;
    links[0]["addr_info"]
        .as_array()?
        .iter()
        .find_map(|info| info["local"].as_str().map(str::to_owned))
}

/// The router's BGP routes of both families: prefix -> next hops, sorted.
fn router_routes(router: &NetNs) -> BTreeMap<String, Vec<String>> {
    let mut routes = BTreeMap::new();
    for family in ["-4", "-6"] {
        let out = router.ip(&[family, "-j", "route", "show", "proto", "bgp"]);
        let listed: Value = serde_json::from_str(&out).unwrap_or_default();
        for route in listed.as_array().into_iter().flatten() {
            let dst = route["dst"].as_str().unwrap_or_default();
            let prefix = if dst.contains('/') {
                dst.to_owned()
            } else {
                host_prefix(dst)
            };
            routes.insert(prefix, gateways(route));
        }
    }
    routes
}
