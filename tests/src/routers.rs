//! Routers for the routing tests: a fabric of namespaces on one bridge, and real FRR and BIRD
//! daemons with explicit paths for every file, stopped by guards.

use std::{
    process::{Child, Command},
    time::Duration,
};

use crate::{Agent, NetNs, TempDir, run_ok, wait_until};

/// `lbagent run` on a node with the file source, its files in a directory of its own:
/// `services.yaml`, `lbagent.yaml`, the status file and BIRD's state directory (`bird/`).
pub struct RoutingNode {
    pub dir: TempDir,
    pub agent: Option<Agent>,
}

impl RoutingNode {
    /// The agent's HTTP address: inside each node's namespace, so every node can use the same.
    pub const METRICS: &'static str = "127.0.0.1:9658";

    /// Writes the node's files (see [`Self::write_config`]); no agent runs yet.
    pub fn new(prefix: &str, services: &str, node: &str, routing: Option<&str>) -> Self {
        let files = Self {
            dir: TempDir::new(prefix),
            agent: None,
        };
        files.dir.write("services.yaml", services);
        files.write_config(node, routing);
        files
    }

    /// Writes the node's files and runs lbagent on them in `ns`.
    pub fn start(
        ns: &NetNs,
        prefix: &str,
        services: &str,
        node: &str,
        routing: Option<&str>,
    ) -> Self {
        let mut started = Self::new(prefix, services, node, routing);
        started.agent = Some(Agent::start(
            ns,
            &started.config(),
            started.dir.path().join("agent.log"),
        ));
        started
    }

    pub fn config(&self) -> std::path::PathBuf {
        self.dir.path().join("lbagent.yaml")
    }

    /// `node`: the config's `node:` section (`{labels: {rack: a}}`), empty for none;
    /// `routing`: the body of its `routing:` section (the state directory is added), `None`
    /// for no routing.
    pub fn write_config(&self, node: &str, routing: Option<&str>) {
        let node = if node.is_empty() {
            String::new()
        } else {
            format!("node: {node}\n")
        };
        let routing = routing.map_or_else(String::new, |body| {
            format!(
                "routing:\n  stateDir: {}\n{body}",
                self.dir.path().join("bird").display()
            )
        });
        self.dir.write(
            "lbagent.yaml",
            &format!(
                "{node}source: {{file: {{path: services.yaml}}}}\nstatus: {{path: {}}}\n\
                 http: {{address: \"{}\"}}\n{routing}",
                self.dir.path().join("status.json").display(),
                Self::METRICS
            ),
        );
    }

    pub fn log(&self) -> String {
        self.agent.as_ref().map(Agent::log).unwrap_or_default()
    }

    /// The routing part of the agent's status file.
    pub fn routing(&self) -> serde_json::Value {
        std::fs::read_to_string(self.dir.path().join("status.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .map(|status| status["routing"].clone())
            .unwrap_or_default()
    }

    /// The `show protocols` row of `name`, as lbagent last read it.
    pub fn protocol(&self, name: &str) -> serde_json::Value {
        self.routing()["protocols"]
            .as_array()
            .and_then(|rows| rows.iter().find(|row| row["name"] == name).cloned())
            .unwrap_or_default()
    }

    /// The pid of the BIRD lbagent runs, from its pid file.
    pub fn bird_pid(&self) -> i32 {
        std::fs::read_to_string(self.dir.path().join("bird/bird.pid"))
            .expect("bird.pid")
            .trim()
            .parse()
            .expect("pid")
    }
}

/// A services file with one Service, `web`, on `addresses`.
pub fn web_services(addresses: &[&str]) -> String {
    format!(
        "services:\n- {{name: web, addresses: [{}]}}\n",
        addresses.join(", ")
    )
}

/// A router namespace with a bridge `br0` (10.0.0.1/24, fd00::1/64), and nodes whose `eth0`
/// (10.0.0.1N/24, fd00::1N/64) is a port of that bridge.
pub struct Fabric {
    pub router: NetNs,
    pub nodes: Vec<NetNs>,
}

impl Fabric {
    pub const ROUTER_V4: &'static str = "10.0.0.1";
    pub const ROUTER_V6: &'static str = "fd00::1";

    pub fn new(nodes: usize) -> Self {
        let router = NetNs::new("lbt-rtr");
        for sysctl in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv4.fib_multipath_hash_policy=1",
            "net.ipv6.fib_multipath_hash_policy=1",
        ] {
            router.exec("sysctl", &["-qw", sysctl]);
        }
        router.ip(&["link", "add", "br0", "type", "bridge"]);
        router.ip(&["link", "set", "br0", "up"]);
        router.ip(&["addr", "add", "10.0.0.1/24", "dev", "br0"]);
        router.ip(&["addr", "add", "fd00::1/64", "dev", "br0", "nodad"]);
        let mut fabric = Self {
            router,
            nodes: Vec::new(),
        };
        for _ in 0..nodes {
            fabric.add_node();
        }
        fabric
    }

    fn add_node(&mut self) {
        let k = self.nodes.len() + 1;
        let node = NetNs::new("lbt-node");
        node.exec("sysctl", &["-qw", "net.ipv6.conf.all.accept_dad=0"]);
        node.exec("sysctl", &["-qw", "net.ipv6.conf.default.accept_dad=0"]);
        let port = format!("v{k}");
        crate::veth((&node, "eth0"), (&self.router, &port));
        self.router
            .ip(&["link", "set", &port, "master", "br0", "up"]);
        node.ip(&["link", "set", "eth0", "up"]);
        node.ip(&[
            "addr",
            "add",
            &format!("{}/24", Self::node_v4(k)),
            "dev",
            "eth0",
        ]);
        node.ip(&[
            "addr",
            "add",
            &format!("{}/64", Self::node_v6(k)),
            "dev",
            "eth0",
            "nodad",
        ]);
        node.ip(&["route", "add", "default", "via", Self::ROUTER_V4]);
        node.ip(&["-6", "route", "add", "default", "via", Self::ROUTER_V6]);
        self.nodes.push(node);
    }

    /// The IPv4 address of node `k` (1-based).
    pub fn node_v4(k: usize) -> String {
        format!("10.0.0.{}", 10 + k)
    }

    pub fn node_v6(k: usize) -> String {
        format!("fd00::{}", 10 + k)
    }
}

/// The next hops the router's kernel has for `prefix`: gateways, in order; empty if no route.
pub fn next_hops(ns: &NetNs, prefix: &str) -> Vec<String> {
    let family = if prefix.contains(':') { "-6" } else { "-4" };
    let out = run_ok(
        "ip",
        &["-n", ns.name(), family, "-j", "route", "show", prefix],
    );
    let routes: serde_json::Value = serde_json::from_str(&out).expect("ip -j route");
    let Some(route) = routes.as_array().and_then(|r| r.first()) else {
        return Vec::new();
    };
    gateways(route)
}

/// The gateways of one route of `ip -j route`, sorted: its next hops' or its own.
pub fn gateways(route: &serde_json::Value) -> Vec<String> {
    let mut hops: Vec<String> = match route["nexthops"].as_array() {
        Some(hops) => hops
            .iter()
            .map(|h| h["gateway"].as_str().unwrap_or_default().to_owned())
            .collect(),
        None => vec![route["gateway"].as_str().unwrap_or_default().to_owned()],
    };
    hops.sort();
    hops
}

/// zebra and bgpd in a namespace, every path under a directory of their own.
pub struct Frr {
    dir: TempDir,
    zebra: Child,
    bgpd: Child,
}

impl Frr {
    /// Starts zebra, then bgpd with `bgpd_conf`. `listen`: whether bgpd accepts connections
    /// (a router does; a node that only dials out does not).
    pub fn start(ns: &NetNs, bgpd_conf: &str, listen: bool) -> Self {
        let dir = TempDir::new("lbt-frr");
        std::fs::write(
            dir.path().join("zebra.conf"),
            format!("hostname {}\n", ns.name()),
        )
        .unwrap();
        std::fs::write(dir.path().join("bgpd.conf"), bgpd_conf).unwrap();
        // The daemons drop to the frr user and write their pid files and sockets here.
        run_ok("chown", &["frr:frr", dir.path().to_str().unwrap()]);
        let path = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
        let daemon = |name: &str, extra: &[&str]| {
            let mut command = Command::new("ip");
            command
                .args(["netns", "exec", ns.name(), &format!("/usr/lib/frr/{name}")])
                .args(["-f", &path(&format!("{name}.conf"))])
                .args(["-i", &path(&format!("{name}.pid"))])
                .args(["-z", &path("zserv.api")])
                .args(["--vty_socket", &path("")])
                .args([
                    "-P",
                    "0",
                    "--log",
                    &format!("file:{}", path(&format!("{name}.log"))),
                ])
                .args(extra)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            command
                .spawn()
                .expect("start an FRR daemon (is frr installed?)")
        };
        let zebra = daemon("zebra", &[]);
        assert!(
            wait_until(Duration::from_secs(10), || dir
                .path()
                .join("zserv.api")
                .exists()),
            "zebra did not start"
        );
        let bgpd = daemon("bgpd", if listen { &[] } else { &["-p", "0"] });
        let frr = Self { dir, zebra, bgpd };
        assert!(
            wait_until(Duration::from_secs(10), || frr
                .dir
                .path()
                .join("bgpd.vty")
                .exists()),
            "bgpd did not start"
        );
        frr
    }

    /// What `daemon` (`zebra`, `bgpd`) has logged so far.
    pub fn log(&self, daemon: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{daemon}.log"))).unwrap_or_default()
    }

    /// Runs one vtysh command against this instance.
    pub fn vtysh(&self, command: &str) -> String {
        run_ok(
            "vtysh",
            &[
                "-H",
                "/dev/null",
                "--vty_socket",
                self.dir.path().to_str().unwrap(),
                "-c",
                command,
            ],
        )
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        for child in [&mut self.bgpd, &mut self.zebra] {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if !wait_until(Duration::from_secs(3), || {
                child.try_wait().ok().flatten().is_some()
            }) {
                crate::kill_child(child, "an FRR daemon");
            } else if let Err(err) = child.wait() {
                crate::cleanup_failed(format_args!("reaping an FRR daemon: {err}"));
            }
        }
    }
}

/// The upstream router's bgpd.conf: passive dynamic neighbours from the fabric, ECMP. Shared
/// with `cargo xtask bench routing`.
pub const FRR_ROUTER: &str = include_str!("../fixtures/frr-router-bgpd.conf");

/// A BIRD (not lbagent's) as a router, with its own config, socket and log.
pub struct BirdRouter {
    dir: TempDir,
    child: Child,
}

impl BirdRouter {
    pub fn start(ns: &NetNs, config: &str) -> Self {
        let dir = TempDir::new("lbt-bird");
        let conf = dir.path().join("bird.conf");
        std::fs::write(&conf, config).unwrap();
        let socket = dir.path().join("bird.ctl");
        let log = std::fs::File::create(dir.path().join("bird.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "bird", "-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start bird");
        assert!(
            wait_until(Duration::from_secs(10), || socket.exists()),
            "router BIRD did not start: {}",
            std::fs::read_to_string(dir.path().join("bird.log")).unwrap_or_default()
        );
        Self { dir, child }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bird.log")).unwrap_or_default()
    }

    pub fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("bird.ctl")
    }
}

impl Drop for BirdRouter {
    fn drop(&mut self) {
        crate::kill_child(&mut self.child, "BIRD (router)");
    }
}

/// Racks on one L2 segment: a switch namespace whose bridge joins routers (`eth0`
/// 10.0.0.R/24, fd00::R/64, R = 1, 2, ...) and nodes (`eth0` as in [`Fabric`]). Every router
/// is reachable from every node, so a node changes racks by its labels or its default route
/// alone. Nodes get no default route: each test sets the one it needs.
pub struct Racks {
    pub switch: NetNs,
    pub routers: Vec<NetNs>,
    pub nodes: Vec<NetNs>,
}

impl Racks {
    pub fn new(count: usize, nodes: usize) -> Self {
        let switch = NetNs::new("lbt-sw");
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let attach = |ns: &NetNs, port: &str| {
            ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.accept_dad=0"]);
            ns.exec("sysctl", &["-qw", "net.ipv6.conf.default.accept_dad=0"]);
            crate::veth((ns, "eth0"), (&switch, port));
            switch.ip(&["link", "set", port, "master", "br0", "up"]);
            ns.ip(&["link", "set", "eth0", "up"]);
        };
        let mut routers = Vec::new();
        for r in 1..=count {
            let router = NetNs::new("lbt-rtr");
            attach(&router, &format!("r{r}"));
            router.ip(&[
                "addr",
                "add",
                &format!("{}/24", Self::router_v4(r)),
                "dev",
                "eth0",
            ]);
            let v6 = format!("{}/64", Self::router_v6(r));
            router.ip(&["addr", "add", &v6, "dev", "eth0", "nodad"]);
            routers.push(router);
        }
        let mut node_namespaces = Vec::new();
        for k in 1..=nodes {
            let node = NetNs::new("lbt-node");
            attach(&node, &format!("n{k}"));
            let v4 = format!("{}/24", Fabric::node_v4(k));
            node.ip(&["addr", "add", &v4, "dev", "eth0"]);
            let v6 = format!("{}/64", Fabric::node_v6(k));
            node.ip(&["addr", "add", &v6, "dev", "eth0", "nodad"]);
            node_namespaces.push(node);
        }
        Self {
            switch,
            routers,
            nodes: node_namespaces,
        }
    }

    /// Router `r` (1-based).
    pub fn router_v4(r: usize) -> String {
        format!("10.0.0.{r}")
    }

    pub fn router_v6(r: usize) -> String {
        format!("fd00::{r}")
    }
}

/// [`FRR_ROUTER`] for router `r` of [`Racks`]: its own router id, and AS `asn`.
pub fn frr_rack_router(r: usize, asn: u32) -> String {
    FRR_ROUTER
        .replace("router bgp 64500", &format!("router bgp {asn}"))
        .replace(
            "bgp router-id 10.0.0.1",
            &format!("bgp router-id {}", Racks::router_v4(r)),
        )
}
