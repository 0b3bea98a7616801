//! Local (L2) addresses in network namespaces: the XDP responder against real `arping` and
//! `ndisc6`, its counters read with bpftool, and the announcements a client's kernel acts
//! on.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use lbagent::{Announcer, Members, NeighbourMaps, PinLayout, Role};
use lbagent_common::{PIN_LAYOUT_VERSION, maps};
use lbagent_tests::{
    NetNs, Pair, PinRoot, TempDir, apiserver::ApiServer, in_netns, lbagent, lbagent_bin, run_ok,
    wait_until,
};

/// Local addresses in the pair's subnets (10.200.0.0/24, fd00:200::/64).
const OWNED4: &str = "10.200.0.100";
const OWNED6: &str = "fd00:200::100";
/// Held by the node's kernel (on lo, as kube-proxy's IPVS mode puts every LB address on
/// kube-ipvs0), but owned by another node: the kernel would answer for it.
const ELSEWHERE4: &str = "10.200.0.101";
const ELSEWHERE6: &str = "fd00:200::101";

/// A veth in driver mode delivers what a program sends back (`XDP_TX`) only to a peer that
/// runs NAPI, which an XDP program there provides (a physical NIC transmits it itself; GRO
/// on the peer was tried and is not enough on this kernel). The peer gets lbagent's program
/// with empty maps, which passes everything: returned pins keep it attached.
fn napi(ns: &NetNs, iface: &str) -> PinRoot {
    let pins = PinRoot::new();
    lbagent(ns, &pins, &["attach", iface]).assert_ok();
    pins
}

/// An interface's index and MAC inside a namespace.
fn link(ns: &NetNs, iface: &str) -> (u32, [u8; 6]) {
    let json: serde_json::Value =
        serde_json::from_str(&ns.ip(&["-j", "link", "show", "dev", iface])).expect("ip -j");
    let index = json[0]["ifindex"].as_u64().expect("ifindex") as u32;
    (
        index,
        parse_mac(json[0]["address"].as_str().expect("address")),
    )
}

fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex"))
        .collect();
    bytes.try_into().expect("six bytes")
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The MACs that answered `count` ARP requests for `ip` sent out of `iface`.
fn arping(ns: &NetNs, iface: &str, ip: &str, count: u32) -> BTreeSet<String> {
    let out = ns.exec(
        "arping",
        &[
            "-c",
            &count.to_string(),
            "-W",
            "0.1",
            "-w",
            "2",
            "-i",
            iface,
            ip,
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .filter_map(|line| line.split(" bytes from ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_ascii_lowercase)
        .collect()
}

/// The MACs that answered a neighbour solicitation for `ip` sent out of `iface` (every
/// answer within the wait, not only the first).
fn ndisc6(ns: &NetNs, iface: &str, ip: &str) -> BTreeSet<String> {
    let out = ns.exec(
        "ndisc6",
        &["-m", "-q", "-n", "-r", "2", "-w", "500", ip, iface],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| line.trim().to_ascii_lowercase())
        .filter(|line| !line.is_empty())
        .collect()
}

/// A client and a node on one link, lbagent's program on the node's eth0, and its neighbour
/// map written as the sink would: this node answers for OWNED*, another node for ELSEWHERE*.
struct Responder {
    pair: Pair,
    pins: PinRoot,
    node_mac: [u8; 6],
    _client_pins: PinRoot,
}

impl Responder {
    fn new() -> Self {
        let pair = Pair::new(&[]);
        let client_pins = napi(&pair.client, "eth0");
        let pins = PinRoot::new();
        lbagent(&pair.node, &pins, &["attach", "eth0"]).assert_ok();
        let (ifindex, node_mac) = link(&pair.node, "eth0");
        for address in [ELSEWHERE4, ELSEWHERE6] {
            let prefix = if address.contains(':') { 128 } else { 32 };
            pair.node
                .ip(&["addr", "add", &format!("{address}/{prefix}"), "dev", "lo"]);
        }
        let mut maps = NeighbourMaps::open(&PinLayout::new(pins.path())).expect("pinned maps");
        for address in [OWNED4, OWNED6] {
            let role = Role::Answer {
                ifindex,
                mac: node_mac,
            };
            maps.set(address.parse().unwrap(), role).unwrap();
        }
        for address in [ELSEWHERE4, ELSEWHERE6] {
            maps.set(address.parse().unwrap(), Role::Silent).unwrap();
        }
        Self {
            pair,
            pins,
            node_mac,
            _client_pins: client_pins,
        }
    }

    fn maps(&self) -> NeighbourMaps {
        NeighbourMaps::open(&PinLayout::new(self.pins.path())).expect("pinned maps")
    }

    /// `bpftool -j map dump pinned LB_NEIGHBOUR_STATS`, as address -> field -> sum over CPUs,
    /// read from the BTF-named fields.
    fn bpftool_stats(&self) -> Vec<(IpAddr, serde_json::Value)> {
        let path = self
            .pins
            .path()
            .join(format!("v{PIN_LAYOUT_VERSION}"))
            .join(maps::NEIGHBOUR_STATS);
        let json = run_ok(
            "bpftool",
            &["-j", "map", "dump", "pinned", path.to_str().unwrap()],
        );
        let entries: serde_json::Value = serde_json::from_str(&json).expect("bpftool json");
        let mut out = Vec::new();
        for entry in entries.as_array().expect("entries") {
            let formatted = &entry["formatted"];
            let key = &formatted["key"];
            let addr: Vec<u8> = key["addr"]
                .as_array()
                .expect("named key field addr")
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect();
            let address: IpAddr = match key["family"].as_u64().expect("named field family") {
                4 => <[u8; 4]>::try_from(&addr[..4]).unwrap().into(),
                6 => <[u8; 16]>::try_from(&addr[..]).unwrap().into(),
                other => panic!("family {other}"),
            };
            let mut sums = serde_json::Map::new();
            for cpu in formatted["values"].as_array().expect("per-CPU values") {
                for field in ["answered", "silenced", "foreign"] {
                    let value = cpu["value"][field].as_u64().expect("named counter");
                    let sum = sums.get(field).and_then(|v| v.as_u64()).unwrap_or(0);
                    sums.insert(field.to_owned(), (sum + value).into());
                }
            }
            out.push((address, serde_json::Value::Object(sums)));
        }
        out
    }
}

#[test]
fn the_responder_answers_arping_and_ndisc6_from_the_owner_only() {
    let r = Responder::new();
    let client = &r.pair.client;
    let expected = BTreeSet::from([mac_text(r.node_mac)]);
    assert_eq!(arping(client, "eth0", OWNED4, 3), expected);
    assert_eq!(ndisc6(client, "eth0", OWNED6), expected);
    // The node's kernel holds these, and would answer: the program keeps it silent.
    assert_eq!(arping(client, "eth0", ELSEWHERE4, 2), BTreeSet::new());
    assert_eq!(ndisc6(client, "eth0", ELSEWHERE6), BTreeSet::new());
    // The client's own kernel resolves the address through the program's answer (the ping
    // itself goes unanswered: the node does not hold the address in this test).
    client.exec("ping", &["-c", "1", "-W", "1", OWNED4]);
    let neighbours = client.ip(&["neigh", "show", OWNED4, "dev", "eth0"]);
    assert!(
        neighbours.contains(&mac_text(r.node_mac)),
        "client's entry: {neighbours}"
    );

    let maps = r.maps();
    let owned4 = maps.counters(OWNED4.parse().unwrap()).unwrap().unwrap();
    // Three from arping, one for the client's kernel.
    assert_eq!(owned4.answered, 4, "{owned4:?}");
    let elsewhere4 = maps.counters(ELSEWHERE4.parse().unwrap()).unwrap().unwrap();
    assert!(elsewhere4.silenced >= 2, "{elsewhere4:?}");
    assert_eq!(elsewhere4.answered, 0);
    let elsewhere6 = maps.counters(ELSEWHERE6.parse().unwrap()).unwrap().unwrap();
    assert!(elsewhere6.silenced >= 1, "{elsewhere6:?}");

    // bpftool reads the same counters, by field name.
    let dumped = r.bpftool_stats();
    let find = |address: &str| {
        let address: IpAddr = address.parse().unwrap();
        dumped
            .iter()
            .find(|(a, _)| *a == address)
            .map(|(_, v)| v.clone())
            .expect("address in the bpftool dump")
    };
    assert_eq!(find(OWNED4)["answered"].as_u64(), Some(owned4.answered));
    assert_eq!(
        find(ELSEWHERE4)["silenced"].as_u64(),
        Some(elsewhere4.silenced)
    );
}

#[test]
fn announcements_move_a_clients_neighbour_entry() {
    let r = Responder::new();
    let client = &r.pair.client;
    let stale = "02:00:00:00:99:99";
    for address in [OWNED4, OWNED6] {
        client.ip(&[
            "neigh", "replace", address, "lladdr", stale, "dev", "eth0", "nud", "stale",
        ]);
    }
    let (ifindex, mac) = link(&r.pair.node, "eth0");
    in_netns(&r.pair.node, move || {
        let announcer = Announcer::new().expect("packet socket");
        for address in [OWNED4, OWNED6] {
            announcer
                .announce(address.parse().unwrap(), ifindex, mac)
                .expect("announce");
        }
    });
    for address in [OWNED4, OWNED6] {
        let moved = wait_until(Duration::from_secs(5), || {
            client
                .ip(&["neigh", "show", address, "dev", "eth0"])
                .contains(&mac_text(mac))
        });
        assert!(
            moved,
            "{address}: {}",
            client.ip(&["neigh", "show", address, "dev", "eth0"])
        );
    }
}

#[test]
fn older_pins_without_the_neighbour_maps_get_them_and_keep_the_rest() {
    let pair = Pair::new(&[]);
    let _client_pins = napi(&pair.client, "eth0");
    let pins = PinRoot::new();
    lbagent(&pair.node, &pins, &["attach", "eth0"]).assert_ok();
    let dir = pins.path().join(format!("v{PIN_LAYOUT_VERSION}"));
    let map_id = |name: &str| -> u64 {
        let json = run_ok(
            "bpftool",
            &[
                "-j",
                "map",
                "show",
                "pinned",
                dir.join(name).to_str().unwrap(),
            ],
        );
        serde_json::from_str::<serde_json::Value>(&json).unwrap()["id"]
            .as_u64()
            .expect("map id")
    };
    let config_before = map_id(maps::VIP_CONFIG);
    // What an agent from before the responder leaves: the same layout without these maps.
    for name in [
        maps::NEIGHBOURS,
        maps::NEIGHBOUR_STATS,
        maps::NEIGHBOUR_LEASE,
    ] {
        std::fs::remove_file(dir.join(name)).unwrap();
    }
    lbagent(&pair.node, &pins, &["attach", "eth0"]).assert_ok();
    assert_eq!(
        map_id(maps::VIP_CONFIG),
        config_before,
        "existing maps reused"
    );
    // The program in the link is the new one and uses the newly pinned map: it answers.
    let (ifindex, mac) = link(&pair.node, "eth0");
    let mut maps = NeighbourMaps::open(&PinLayout::new(pins.path())).expect("new pins");
    maps.set(OWNED4.parse().unwrap(), Role::Answer { ifindex, mac })
        .unwrap();
    assert_eq!(
        arping(&pair.client, "eth0", OWNED4, 2),
        BTreeSet::from([mac_text(mac)])
    );
}

/// One L2 segment: a bridge in a namespace of its own, and nodes each joined to it by a
/// veth (`eth0` in the node, 10.201.0.1N/24 and fd00:201::1N/64).
struct Segment {
    bridge: NetNs,
    nodes: Vec<NetNs>,
}

impl Segment {
    const MEMBERSHIP_PORT: u16 = 7946;

    fn new(nodes: usize) -> Self {
        let bridge = NetNs::new("lbt-l2seg");
        bridge.ip(&["link", "add", "br0", "type", "bridge"]);
        bridge.ip(&["link", "set", "br0", "up"]);
        let nodes = (0..nodes)
            .map(|i| {
                let node = NetNs::new(&format!("lbt-l2n{i}"));
                let port = format!("p{i}");
                lbagent_tests::veth((&node, "eth0"), (&bridge, &port));
                bridge.ip(&["link", "set", &port, "master", "br0", "up"]);
                node.exec("sysctl", &["-qw", "net.ipv6.conf.all.accept_dad=0"]);
                node.ip(&["addr", "add", &format!("10.201.0.1{i}/24"), "dev", "eth0"]);
                node.ip(&[
                    "addr",
                    "add",
                    &format!("fd00:201::1{i}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ]);
                node.ip(&["link", "set", "eth0", "up"]);
                node
            })
            .collect();
        Self { bridge, nodes }
    }

    /// A client on the segment: 10.201.0.2, fd00:201::2.
    fn client(&self) -> NetNs {
        let client = NetNs::new("lbt-l2cl");
        lbagent_tests::veth((&client, "eth0"), (&self.bridge, "pc"));
        self.bridge
            .ip(&["link", "set", "pc", "master", "br0", "up"]);
        client.exec("sysctl", &["-qw", "net.ipv6.conf.all.accept_dad=0"]);
        client.ip(&["addr", "add", "10.201.0.2/24", "dev", "eth0"]);
        client.ip(&["addr", "add", "fd00:201::2/64", "dev", "eth0", "nodad"]);
        client.ip(&["link", "set", "eth0", "up"]);
        client
    }

    fn membership_addr(i: usize) -> String {
        format!("10.201.0.1{i}:{}", Self::MEMBERSHIP_PORT)
    }

    fn name(i: usize) -> String {
        format!("node-{i}")
    }

    /// Starts `lbagent membership` on node `i`, seeded with every other node.
    fn membership(&self, i: usize, dir: &TempDir) -> Member {
        self.membership_with_pins(i, dir, None)
    }

    /// As `membership`, renewing the answering lease in `pins`.
    fn membership_with_pins(&self, i: usize, dir: &TempDir, pins: Option<&PinRoot>) -> Member {
        self.membership_from(i, dir, pins, None)
    }

    /// As `membership_with_pins`; with a kubeconfig, the seeds come from the Node objects
    /// (`--kubernetes`) instead of `--seed`.
    fn membership_from(
        &self,
        i: usize,
        dir: &TempDir,
        pins: Option<&PinRoot>,
        kubeconfig: Option<&std::path::Path>,
    ) -> Member {
        let file = dir.path().join(format!("members-{i}.json"));
        let log = dir.path().join(format!("membership-{i}.log"));
        let mut command = self.nodes[i].command(&lbagent_bin());
        if let Some(pins) = pins {
            command.arg("--pin-root").arg(pins.path());
        }
        command
            .args(["membership", "--name", &Self::name(i), "--bind"])
            .arg(Self::membership_addr(i))
            .arg("--members-file")
            .arg(&file);
        match kubeconfig {
            Some(kubeconfig) => {
                command
                    .arg("--kubernetes")
                    .arg("--kubeconfig")
                    .arg(kubeconfig);
            }
            None => {
                for j in (0..self.nodes.len()).filter(|j| *j != i) {
                    command.arg("--seed").arg(Self::membership_addr(j));
                }
            }
        }
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = command
            .stdout(log_file.try_clone().expect("log fd"))
            .stderr(log_file)
            .spawn()
            .expect("start lbagent membership");
        Member { child, file, log }
    }
}

/// A running `lbagent membership`; killed on drop.
struct Member {
    child: std::process::Child,
    file: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Member {
    fn alive(&self) -> BTreeSet<String> {
        Members::read(&self.file)
            .map(|members| members.names())
            .unwrap_or_default()
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn names(indexes: &[usize]) -> BTreeSet<String> {
    indexes.iter().map(|i| Segment::name(*i)).collect()
}

/// Polls until every member in `watchers` sees exactly `expected` alive.
fn wait_for_view(members: &[Member], watchers: &[usize], expected: &[usize]) {
    let expected = names(expected);
    let agreed = wait_until(Duration::from_secs(10), || {
        watchers.iter().all(|i| members[*i].alive() == expected)
    });
    assert!(
        agreed,
        "expected {expected:?} from {watchers:?}; got {:?}\n{}",
        watchers
            .iter()
            .map(|i| members[*i].alive())
            .collect::<Vec<_>>(),
        members
            .iter()
            .map(Member::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    );
}

#[test]
fn membership_sees_frozen_unlinked_and_leaving_nodes_go_and_come_back() {
    use nix::sys::signal::Signal;
    let segment = Segment::new(3);
    let dir = TempDir::new("lbt-l2-members");
    let members: Vec<Member> = (0..3).map(|i| segment.membership(i, &dir)).collect();
    wait_for_view(&members, &[0, 1, 2], &[0, 1, 2]);

    // Frozen: it cannot answer probes; the others declare it down. Thawed, it rejoins.
    members[0].signal(Signal::SIGSTOP);
    wait_for_view(&members, &[1, 2], &[1, 2]);
    members[0].signal(Signal::SIGCONT);
    wait_for_view(&members, &[0, 1, 2], &[0, 1, 2]);

    // Its link down: the same, from the other side of the segment.
    segment.nodes[1].ip(&["link", "set", "eth0", "down"]);
    wait_for_view(&members, &[0, 2], &[0, 2]);
    segment.nodes[1].ip(&["link", "set", "eth0", "up"]);
    wait_for_view(&members, &[0, 1, 2], &[0, 1, 2]);

    // A clean stop leaves the cluster: the others drop it without waiting for suspicion.
    members[2].signal(Signal::SIGTERM);
    wait_for_view(&members, &[0, 1], &[0, 1]);
    assert!(
        members[2].log().contains("left the cluster"),
        "{}",
        members[2].log()
    );
    let _ = &segment.bridge;
}

#[test]
fn a_node_whose_membership_is_frozen_stops_answering_and_resumes_when_thawed() {
    use nix::sys::signal::Signal;
    let r = Responder::new();
    let client = &r.pair.client;
    let dir = TempDir::new("lbt-l2-lease");
    let file = dir.path().join("members.json");
    let log = dir.path().join("membership.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let child = r
        .pair
        .node
        .command(&lbagent_bin())
        .arg("--pin-root")
        .arg(r.pins.path())
        .args(["membership", "--name", "node", "--bind"])
        .arg(format!("{}:7946", Pair::NODE_V4))
        .arg("--members-file")
        .arg(&file)
        .stdout(log_file.try_clone().expect("log fd"))
        .stderr(log_file)
        .spawn()
        .expect("start lbagent membership");
    let member = Member {
        child,
        file,
        log: log.clone(),
    };
    let answered = |expected: bool| {
        let reached = wait_until(Duration::from_secs(10), || {
            arping(client, "eth0", OWNED4, 1).is_empty() != expected
        });
        assert!(reached, "answering should be {expected}\n{}", member.log());
    };
    let renewing = wait_until(Duration::from_secs(10), || {
        member.log().contains("renewing the answering lease")
    });
    assert!(renewing, "{}", member.log());
    answered(true);
    member.signal(Signal::SIGSTOP);
    answered(false);
    let silenced = r
        .maps()
        .counters(OWNED4.parse().unwrap())
        .unwrap()
        .unwrap()
        .silenced;
    assert!(silenced >= 1, "the program dropped the requests itself");
    member.signal(Signal::SIGCONT);
    answered(true);
}

const L2_VIP4: &str = "10.201.0.100";
const L2_VIP6: &str = "fd00:201::100";

/// Three nodes on one segment, each running `lbagent membership` and `lbagent run` (file
/// source, XDP on eth0, the neighbours sink), serving one service with a local address of
/// each family, and a client on the same segment.
struct Cluster {
    segment: Segment,
    client: NetNs,
    pins: Vec<PinRoot>,
    members: Vec<Member>,
    agents: Vec<Option<lbagent_tests::Agent>>,
    macs: Vec<String>,
    /// With the Kubernetes source: the API server every node reaches (in the client's
    /// namespace, on the segment).
    server: Option<ApiServer>,
    /// Every node's eth0 refuses the program (see [`Cluster::refusing`]).
    refusing: bool,
    /// Last, so it is removed after the agents stop: an agent still running wrote its status
    /// file into it again, and the directory was left behind in /tmp.
    dir: TempDir,
}

/// The segment's nodes `alive`, as the election sees them.
fn view(alive: &[usize]) -> Vec<lbagent::election::NodeView> {
    alive
        .iter()
        .map(|i| lbagent::election::NodeView {
            name: Segment::name(*i),
            subnets: vec![
                "10.201.0.0/24".parse().unwrap(),
                "fd00:201::/64".parse().unwrap(),
            ],
            excluded: false,
            alive: true,
        })
        .collect()
}

impl Cluster {
    fn new() -> Self {
        Self::start(false)
    }

    /// `kubernetes`: Services, Nodes and Events through an API server on the segment, and the
    /// membership seeded from the Nodes; else the services file and `--seed`.
    fn start(kubernetes: bool) -> Self {
        Self::start_with(kubernetes, false)
    }

    /// Every node's eth0 refuses the XDP program: the agents ask for driver mode only, and a
    /// veth refuses driver-mode XDP while its peer's MTU is over what one page holds ("Peer
    /// MTU is too large to set XDP", `veth_xdp_set`). The bridge's ports get a 9000-byte MTU.
    fn refusing() -> Self {
        Self::start_with(false, true)
    }

    fn start_with(kubernetes: bool, refusing: bool) -> Self {
        let segment = Segment::new(3);
        if refusing {
            for i in 0..3 {
                segment
                    .bridge
                    .ip(&["link", "set", &format!("p{i}"), "mtu", "9000"]);
                // Not the default, so that its restoration shows.
                segment.nodes[i].exec("sysctl", &["-qw", "net.ipv4.conf.eth0.arp_announce=1"]);
            }
        }
        let client = segment.client();
        let dir = TempDir::new("lbt-l2-cluster");
        dir.write("services.yaml", &services(true));
        let server = kubernetes.then(|| {
            let server = ApiServer::start_in_at(&client, "10.201.0.2".parse().unwrap());
            server.write_kubeconfig(&dir.path().join("kubeconfig"));
            for i in 0..3 {
                server.apply(node_object(i, false));
            }
            server
        });
        let kubeconfig = dir.path().join("kubeconfig");
        let pins: Vec<PinRoot> = (0..3).map(|_| PinRoot::new()).collect();
        let macs = (0..3)
            .map(|i| mac_text(link(&segment.nodes[i], "eth0").1))
            .collect();
        let members = (0..3)
            .map(|i| {
                segment.membership_from(
                    i,
                    &dir,
                    Some(&pins[i]),
                    server.is_some().then_some(kubeconfig.as_path()),
                )
            })
            .collect();
        let mut cluster = Self {
            segment,
            client,
            dir,
            pins,
            members,
            agents: Vec::new(),
            macs,
            server,
            refusing,
        };
        cluster.agents = (0..3).map(|i| Some(cluster.start_agent(i))).collect();
        cluster
    }

    fn start_agent(&self, i: usize) -> lbagent_tests::Agent {
        let dir = self.dir.path();
        // Generic-mode XDP: on a veth, driver-mode XDP_TX needs NAPI on the bridge's end
        // (see `napi`); the program and its answers are the same.
        let config = self.dir.write(
            &format!("lbagent-{i}.yaml"),
            &format!(
                "node: {{name: {name}}}\n\
                 source: {source}\n\
                 addresses: {{interface: lbl2-{i}}}\n\
                 status: {{path: {dir}/status-{i}.json}}\n\
                 dataplane: {{interfaces: [eth0], mode: {mode}, pinRoot: {pins}}}\n\
                 neighbours: {{membersFile: {dir}/members-{i}.json}}\n\
                 http: {{address: \"10.201.0.1{i}:9658\"}}\n",
                name = Segment::name(i),
                source = if self.server.is_some() {
                    "{kubernetes: {kubeconfig: kubeconfig}}"
                } else {
                    "{file: {path: services.yaml}}"
                },
                dir = dir.display(),
                pins = self.pins[i].path().display(),
                mode = if self.refusing { "driver" } else { "generic" },
            ),
        );
        lbagent_tests::Agent::start(
            &self.segment.nodes[i],
            &config,
            dir.join(format!("agent-{i}-{}.log", std::process::id())),
        )
    }

    /// The node the election picks among `alive` for `address`, by index.
    fn owner(&self, address: &str, alive: &[usize]) -> usize {
        use lbagent::election::{Endpoints, owner};
        let name = owner(address.parse().unwrap(), &view(alive), Endpoints::Anywhere)
            .expect("an owner")
            .name
            .clone();
        (0..3).find(|i| Segment::name(*i) == name).expect("index")
    }

    /// The election's candidates among `alive` for `address`, in order.
    fn candidates(&self, address: &str, alive: &[usize]) -> Vec<String> {
        use lbagent::election::{Endpoints, candidates};
        candidates(address.parse().unwrap(), &view(alive), Endpoints::Anywhere)
            .iter()
            .map(|n| n.name.clone())
            .collect()
    }

    /// `lbagent status -o FORMAT` on node `i`.
    fn status(&self, i: usize, format: &str) -> String {
        let status_file = self.dir.path().join(format!("status-{i}.json"));
        let out = self.segment.nodes[i]
            .command(&lbagent_bin())
            .arg("--pin-root")
            .arg(self.pins[i].path())
            .args(["status", "--status-file"])
            .arg(&status_file)
            .args(["-o", format])
            .output()
            .expect("lbagent status");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Polls until the client sees exactly the owner the election picks among `alive`
    /// answer, for each address.
    fn wait_owners(&self, alive: &[usize]) {
        let expected = (
            BTreeSet::from([self.macs[self.owner(L2_VIP4, alive)].clone()]),
            BTreeSet::from([self.macs[self.owner(L2_VIP6, alive)].clone()]),
        );
        let owner4 = self.owner(L2_VIP4, alive);
        let answered = || {
            NeighbourMaps::open(&PinLayout::new(self.pins[owner4].path()))
                .ok()
                .and_then(|maps| maps.counters(L2_VIP4.parse().unwrap()).ok().flatten())
                .map_or(0, |c| c.answered)
        };
        let mut last = (BTreeSet::new(), BTreeSet::new());
        let reached = wait_until(Duration::from_secs(15), || {
            let before = answered();
            last = (
                arping(&self.client, "eth0", L2_VIP4, 2),
                ndisc6(&self.client, "eth0", L2_VIP6),
            );
            // The owner's program answered, not some kernel holding the address.
            last == expected && answered() > before
        });
        assert!(
            reached,
            "alive {alive:?}: expected {expected:?}, got {last:?} (macs {:?})\n{}",
            self.macs,
            self.logs()
        );
    }

    /// Puts both local addresses on an interface of node `i` of their own, as kube-proxy in
    /// IPVS mode does on kube-ipvs0 (an `ifb`: these kernels have no `dummy`): the node's
    /// kernel would answer ARP for them on any interface.
    fn ipvs_like(&self, i: usize) {
        let node = &self.segment.nodes[i];
        node.ip(&["link", "add", "kube-ipvs0", "type", "ifb"]);
        node.ip(&["addr", "add", &format!("{L2_VIP4}/32"), "dev", "kube-ipvs0"]);
        node.ip(&[
            "addr",
            "add",
            &format!("{L2_VIP6}/128"),
            "dev",
            "kube-ipvs0",
            "nodad",
        ]);
        node.ip(&["link", "set", "kube-ipvs0", "up"]);
    }

    /// An IPv4 sysctl of node `i`'s eth0.
    fn sysctl(&self, i: usize, name: &str) -> String {
        let out =
            self.segment.nodes[i].exec("sysctl", &["-n", &format!("net.ipv4.conf.eth0.{name}")]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Polls until the client sees exactly node `v4`'s MAC answer for the IPv4 address and
    /// node `v6`'s for the IPv6 one, whoever answers (the program or a kernel).
    fn wait_answered_by(&self, v4: usize, v6: usize) {
        let expected = (
            BTreeSet::from([self.macs[v4].clone()]),
            BTreeSet::from([self.macs[v6].clone()]),
        );
        let mut last = (BTreeSet::new(), BTreeSet::new());
        let reached = wait_until(Duration::from_secs(15), || {
            last = (
                arping(&self.client, "eth0", L2_VIP4, 2),
                ndisc6(&self.client, "eth0", L2_VIP6),
            );
            last == expected
        });
        assert!(
            reached,
            "expected {expected:?}, got {last:?} (macs {:?})\n{}",
            self.macs,
            self.logs()
        );
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for (i, agent) in self.agents.iter().enumerate() {
            if let Some(agent) = agent {
                text.push_str(&format!("--- agent {i}\n{}", agent.log()));
            }
        }
        for (i, member) in self.members.iter().enumerate() {
            text.push_str(&format!("--- membership {i}\n{}", member.log()));
        }
        text
    }

    /// Freezes (or thaws) every lbagent process of node `i`, as a node whose processes
    /// hang would be.
    fn freeze(&self, i: usize, frozen: bool) {
        use nix::sys::signal::Signal;
        let signal = if frozen {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        self.members[i].signal(signal);
        if let Some(agent) = &self.agents[i] {
            let pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
            nix::sys::signal::kill(pid, signal).expect("signal agent");
        }
    }
}

/// Node `i` as the API server holds it: its InternalIP on the segment, and the exclusion
/// label if `excluded`.
fn node_object(i: usize, excluded: bool) -> serde_json::Value {
    let labels = if excluded {
        serde_json::json!({"node.kubernetes.io/exclude-from-external-load-balancers": ""})
    } else {
        serde_json::json!({})
    };
    serde_json::json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": Segment::name(i), "labels": labels},
        "status": {"addresses": [
            {"type": "InternalIP", "address": format!("10.201.0.1{i}")},
            {"type": "Hostname", "address": Segment::name(i)},
        ]},
    })
}

/// A LoadBalancer Service holding `addresses`, as an allocator would have left it.
fn service_object(name: &str, addresses: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "type": "LoadBalancer",
            "externalTrafficPolicy": "Cluster",
            "ipFamilies": addresses
                .iter()
                .map(|ip| if ip.contains(':') { "IPv6" } else { "IPv4" })
                .collect::<Vec<_>>(),
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
        "status": {"loadBalancer": {"ingress": addresses
            .iter()
            .map(|ip| serde_json::json!({"ip": ip, "ipMode": "VIP"}))
            .collect::<Vec<_>>()}},
    })
}

fn services(with_vips: bool) -> String {
    if with_vips {
        format!(
            "services:\n  - name: web\n    addresses: [{L2_VIP4}, \"{L2_VIP6}\"]\n    ports: [{{port: 80, protocol: TCP}}]\n"
        )
    } else {
        "services: []\n".to_owned()
    }
}

#[test]
fn one_node_answers_and_a_survivor_takes_over_when_the_owner_goes_down_or_freezes() {
    let cluster = Cluster::new();
    let all = [0, 1, 2];
    cluster.wait_owners(&all);
    let owner = cluster.owner(L2_VIP4, &all);
    let others: Vec<usize> = all.into_iter().filter(|i| *i != owner).collect();
    // /metrics on the owner and on another node say who answers, and what was answered.
    let scrape = |i: usize| {
        let addr = format!("10.201.0.1{i}:9658").parse().unwrap();
        lbagent_tests::http_get(&cluster.segment.nodes[i], addr, "/metrics")
            .expect("metrics served")
            .1
    };
    let sample = |name: &str| format!("lbagent_{name}{{address=\"{L2_VIP4}\"}}");
    let text = scrape(owner);
    assert_eq!(
        lbagent_tests::metric(&text, &sample("neighbour_owner")),
        Some(1.0),
        "{text}"
    );
    assert!(
        lbagent_tests::metric(&text, &sample("neighbour_answered_total")).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    let text = scrape(others[0]);
    assert_eq!(
        lbagent_tests::metric(&text, &sample("neighbour_owner")),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        lbagent_tests::metric(&text, &sample("neighbour_candidates")),
        Some(3.0),
        "{text}"
    );
    // Every node is ready, and `lbagent status` on any node names the owner and the
    // candidates in the election's order.
    for i in all {
        let addr = format!("10.201.0.1{i}:9658").parse().unwrap();
        let ready = lbagent_tests::http_get(&cluster.segment.nodes[i], addr, "/readyz");
        assert_eq!(ready.map(|r| r.0), Some(200), "node {i}");
    }
    let expected = cluster.candidates(L2_VIP4, &all);
    let status = cluster.status(others[1], "json");
    let status: serde_json::Value = serde_json::from_str(&status).expect("status json");
    let entry = status["neighbours"]["addresses"]
        .as_array()
        .expect("neighbours.addresses")
        .iter()
        .find(|e| e["address"] == L2_VIP4)
        .expect("the IPv4 local address")
        .clone();
    assert_eq!(entry["owner"], Segment::name(owner));
    assert_eq!(entry["candidates"], serde_json::json!(expected));
    assert_eq!(entry["answering"], false);
    let table = cluster.status(owner, "table");
    let row = table
        .lines()
        .find(|line| line.starts_with(&format!("{L2_VIP4} ")) && line.contains("(this node)"))
        .unwrap_or_else(|| panic!("no owner row for {L2_VIP4}:\n{table}"));
    assert!(row.ends_with(&expected.join(",")), "{row}");

    // The owner's link goes down: the next candidate answers.
    cluster.segment.nodes[owner].ip(&["link", "set", "eth0", "down"]);
    cluster.wait_owners(&others);
    // Back up, it rejoins and takes its addresses back.
    cluster.segment.nodes[owner].ip(&["link", "set", "eth0", "up"]);
    cluster.wait_owners(&all);

    // The owner's processes freeze: its program stops answering when the lease lapses,
    // and the survivor takes over.
    cluster.freeze(owner, true);
    cluster.wait_owners(&others);
    cluster.freeze(owner, false);
    cluster.wait_owners(&all);
}

#[test]
fn an_agent_killed_alone_changes_no_owner_and_a_removed_service_is_answered_by_nobody() {
    let mut cluster = Cluster::new();
    let owner = cluster.owner(L2_VIP4, &[0, 1, 2]);
    cluster.wait_owners(&[0, 1, 2]);
    // SIGKILL the owner's agent while the client keeps asking: every request is answered,
    // always by the owner.
    let agent = cluster.agents[owner].take().expect("agent");
    let client = cluster.client.name().to_owned();
    let asking = std::thread::spawn(move || {
        std::process::Command::new("ip")
            .args([
                "netns", "exec", &client, "arping", "-c", "30", "-W", "0.05", "-i", "eth0", L2_VIP4,
            ])
            .output()
            .expect("arping")
    });
    std::thread::sleep(Duration::from_millis(300));
    drop(agent);
    let out = asking.join().expect("arping thread");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("30 packets transmitted, 30 packets received"),
        "{text}"
    );
    let answerers: BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.split(" bytes from ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_ascii_lowercase)
        .collect();
    assert_eq!(answerers, BTreeSet::from([cluster.macs[owner].clone()]));
    // The restarted agent adopts the maps: still the same owner.
    cluster.agents[owner] = Some(cluster.start_agent(owner));
    cluster.wait_owners(&[0, 1, 2]);

    // The service goes: no node answers any more.
    cluster.dir.write("services.yaml", &services(false));
    let silent = wait_until(Duration::from_secs(15), || {
        arping(&cluster.client, "eth0", L2_VIP4, 1).is_empty()
            && ndisc6(&cluster.client, "eth0", L2_VIP6).is_empty()
    });
    assert!(silent, "{}", cluster.logs());
}

/// Drops (or lets through again) the membership protocol to and from node `i`: a partition
/// that leaves the data path up.
fn partition(node: &NetNs, cut: bool) {
    if cut {
        let script = format!(
            "table inet lbt_partition {{\n\
             chain input {{ type filter hook input priority 0; udp dport {port} drop; }}\n\
             chain output {{ type filter hook output priority 0; udp dport {port} drop; }}\n\
             }}\n",
            port = Segment::MEMBERSHIP_PORT
        );
        let path = std::env::temp_dir().join(format!("{}.nft", node.name()));
        std::fs::write(&path, script).expect("nft script");
        let out = node.exec("nft", &["-f", path.to_str().unwrap()]);
        assert!(out.status.success(), "nft: {out:?}");
    } else {
        node.exec("nft", &["delete", "table", "inet", "lbt_partition"]);
    }
}

#[test]
fn a_partition_makes_two_owners_which_see_each_other_and_one_remains_when_it_heals() {
    let cluster = Cluster::new();
    let all = [0, 1, 2];
    cluster.wait_owners(&all);
    // Cut off a node that does not own the IPv4 address: it believes itself alone and
    // answers for everything, while the others keep their owner.
    let owner = cluster.owner(L2_VIP4, &all);
    let cut = (0..3).find(|i| *i != owner).expect("another node");
    partition(&cluster.segment.nodes[cut], true);
    let expected = BTreeSet::from([cluster.macs[owner].clone(), cluster.macs[cut].clone()]);
    let both = wait_until(Duration::from_secs(15), || {
        arping(&cluster.client, "eth0", L2_VIP4, 2) == expected
    });
    assert!(both, "two owners during the partition\n{}", cluster.logs());
    // Each sees the other's answers: counted, logged as split brain.
    let logged = wait_until(Duration::from_secs(10), || {
        [owner, cut].iter().all(|i| {
            cluster.agents[*i]
                .as_ref()
                .is_some_and(|a| a.log().contains("split brain"))
        })
    });
    assert!(logged, "{}", cluster.logs());
    let foreign = NeighbourMaps::open(&PinLayout::new(cluster.pins[owner].path()))
        .unwrap()
        .counters(L2_VIP4.parse().unwrap())
        .unwrap()
        .unwrap();
    assert!(foreign.foreign >= 1, "{foreign:?}");
    assert_eq!(
        foreign.foreign_mac.map(mac_text),
        Some(cluster.macs[cut].clone())
    );
    // Healed: the views agree again, and only the elected owner answers.
    partition(&cluster.segment.nodes[cut], false);
    cluster.wait_owners(&all);
}

/// Notes of the Events on `service` with `reason`, with the node that recorded each.
fn events(server: &ApiServer, service: &str, reason: &str) -> Vec<(String, String)> {
    server
        .events()
        .into_iter()
        .filter(|e| e["regarding"]["name"] == service && e["reason"] == reason)
        .map(|e| {
            (
                e["reportingInstance"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                e["note"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn with_kubernetes_the_nodes_seed_the_membership_the_owner_records_itself_and_an_excluded_node_is_skipped()
 {
    let cluster = Cluster::start(true);
    let server = cluster.server.as_ref().expect("API server");
    // Every node's kernel holds the local addresses too, as with kube-proxy's IPVS mode: only
    // the programs' silence keeps the others from answering.
    for i in 0..3 {
        cluster.ipvs_like(i);
    }
    // A local address, and one no node has a subnet for (and nothing routes).
    server.apply(service_object("web", &[L2_VIP4, L2_VIP6]));
    server.apply(service_object("nowhere", &["203.0.113.77"]));
    let all = [0, 1, 2];
    // No --seed: the members found each other through the Nodes' InternalIPs.
    cluster.wait_owners(&all);
    let owner = cluster.owner(L2_VIP4, &all);
    let candidates = cluster.candidates(L2_VIP4, &all);

    // The owner, and only it, records that it answers, naming the candidates in order.
    let about_v4 = |events: Vec<(String, String)>| -> Vec<(String, String)> {
        events
            .into_iter()
            .filter(|(_, note)| note.starts_with(&format!("{L2_VIP4}: ")))
            .collect()
    };
    let recorded = wait_until(Duration::from_secs(10), || {
        !about_v4(events(server, "web", "LocalAddressOwner")).is_empty()
    });
    assert!(recorded, "{}", cluster.logs());
    let owners = about_v4(events(server, "web", "LocalAddressOwner"));
    assert!(
        owners
            .iter()
            .all(|(node, note)| *node == Segment::name(owner)
                && note.contains(&format!("node {} answers", Segment::name(owner)))
                && note.contains(&candidates.join(", "))),
        "{owners:?}"
    );
    // The address no subnet holds: one node says so.
    let said = wait_until(Duration::from_secs(10), || {
        events(server, "nowhere", "NotAnnounced")
            .iter()
            .any(|(_, note)| {
                note.contains("203.0.113.77: no live node has an interface in its subnet")
            })
    });
    assert!(said, "{:?}\n{}", server.events(), cluster.logs());
    let reporters: BTreeSet<String> = events(server, "nowhere", "NotAnnounced")
        .into_iter()
        .filter(|(_, note)| note.contains("no live node has an interface"))
        .map(|(node, _)| node)
        .collect();
    assert_eq!(reporters.len(), 1, "one node reports it: {reporters:?}");

    // The owner's Node gets the exclusion label: every member publishes it, and the next
    // candidate answers, which records itself in turn.
    server.apply(node_object(owner, true));
    let others: Vec<usize> = all.into_iter().filter(|i| *i != owner).collect();
    let published = wait_until(Duration::from_secs(10), || {
        cluster.members.iter().all(|m| {
            Members::read(&m.file).is_ok_and(|list| list.excluded.contains(&Segment::name(owner)))
        })
    });
    assert!(published, "{}", cluster.logs());
    cluster.wait_owners(&others);
    let next = cluster.owner(L2_VIP4, &others);
    // The excluded node serves nothing, yet keeps the addresses silent: its kernel, which
    // holds them on kube-ipvs0, never answers.
    for _ in 0..3 {
        assert_eq!(
            arping(&cluster.client, "eth0", L2_VIP4, 3),
            BTreeSet::from([cluster.macs[next].clone()]),
            "{}",
            cluster.logs()
        );
    }
    let silenced = NeighbourMaps::open(&PinLayout::new(cluster.pins[owner].path()))
        .unwrap()
        .counters(L2_VIP4.parse().unwrap())
        .unwrap()
        .expect("the excluded node keeps an entry");
    assert!(silenced.silenced >= 1, "{silenced:?}");
    let recorded = wait_until(Duration::from_secs(10), || {
        about_v4(events(server, "web", "LocalAddressOwner"))
            .iter()
            .any(|(node, _)| *node == Segment::name(next))
    });
    assert!(recorded, "{:?}", events(server, "web", "LocalAddressOwner"));

    // Every call the agents and the memberships made is one the ClusterRole grants.
    for request in server.request_log() {
        let (group, resource, verb) = request
            .rbac()
            .unwrap_or_else(|| panic!("not an API call: {request:?}"));
        assert!(
            lbagent::API_ACCESS
                .iter()
                .any(|a| a.group == group && a.resource == resource && a.verbs.contains(&verb)),
            "{verb} {group}/{resource} is not in API_ACCESS: {request:?}"
        );
    }
    // The memberships list every Node (the agents only their own).
    let node_lists = server
        .request_log()
        .into_iter()
        .filter(|r| r.param("fieldSelector").is_none())
        .filter_map(|r| r.rbac())
        .filter(|(_, resource, verb)| resource == "nodes" && *verb == "list")
        .count();
    assert!(node_lists >= 3, "{node_lists} lists of all the Nodes");
}

/// The EndpointSlice of `service` with one ready endpoint on each of `nodes`.
fn slice_object(service: &str, nodes: &[usize]) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{service}-slice"),
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": nodes
            .iter()
            .map(|i| serde_json::json!({
                "addresses": [format!("10.244.{i}.5")],
                "nodeName": Segment::name(*i),
                "conditions": {"ready": true},
            }))
            .collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

#[test]
fn external_traffic_policy_local_moves_the_owner_to_a_node_with_an_endpoint() {
    let cluster = Cluster::start(true);
    let server = cluster.server.as_ref().expect("API server");
    let all = [0, 1, 2];
    // The endpoint on a node the election would not pick without it.
    let first = (0..3)
        .find(|i| *i != cluster.owner(L2_VIP4, &all))
        .expect("another node");
    let mut web = service_object("web", &[L2_VIP4, L2_VIP6]);
    web["spec"]["externalTrafficPolicy"] = "Local".into();
    server.apply(slice_object("web", &[first]));
    server.apply(web);
    // Only the node with the endpoint answers, for both families.
    cluster.wait_owners(&[first]);
    let status = cluster.status(first, "json");
    let status: serde_json::Value = serde_json::from_str(&status).expect("status json");
    let entry = status["neighbours"]["addresses"]
        .as_array()
        .expect("neighbours.addresses")
        .iter()
        .find(|e| e["address"] == L2_VIP4)
        .expect("the local address")
        .clone();
    assert_eq!(
        entry["candidates"],
        serde_json::json!([Segment::name(first)])
    );
    // The endpoint moves: so does the owner.
    let second = (0..3).find(|i| *i != first).expect("another node");
    server.apply(slice_object("web", &[second]));
    cluster.wait_owners(&[second]);
    // Endpoints on two nodes: the election among those two.
    let third = (0..3)
        .find(|i| *i != first && *i != second)
        .expect("a third");
    server.apply(slice_object("web", &[second, third]));
    cluster.wait_owners(&[second, third]);
}

/// `arping` from the client: `count` requests 10 ms apart; the output.
fn arping_run(cluster: &Cluster, count: u32) -> std::thread::JoinHandle<std::process::Output> {
    let client = cluster.client.name().to_owned();
    std::thread::spawn(move || {
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &client,
                "arping",
                "-c",
                &count.to_string(),
                "-W",
                "0.01",
                "-i",
                "eth0",
                L2_VIP4,
            ])
            .output()
            .expect("arping")
    })
}

/// The hardware addresses that answered in `arping`'s output.
fn answerers(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.split(" bytes from ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_ascii_lowercase)
        .collect()
}

#[test]
fn a_withdrawal_hands_the_address_over_before_the_old_owner_falls_silent() {
    let cluster = Cluster::start(true);
    let server = cluster.server.as_ref().expect("API server");
    let first = cluster.owner(L2_VIP4, &[0, 1, 2]);
    let second = (0..3).find(|i| *i != first).expect("another node");
    let mut web = service_object("web", &[L2_VIP4, L2_VIP6]);
    web["spec"]["externalTrafficPolicy"] = "Local".into();
    server.apply(slice_object("web", &[first]));
    server.apply(web);
    cluster.wait_owners(&[first]);
    // The endpoint moves while the client asks every 10 ms: the old owner answers until
    // the new one claims the address, so no request goes unanswered. (Both nodes learn of
    // the move from the API server; when the new owner learns first, both answer until the
    // old one learns too, a few milliseconds: a few extra answers, never a missing one.)
    let asking = arping_run(&cluster, 100);
    std::thread::sleep(Duration::from_millis(300));
    server.apply(slice_object("web", &[second]));
    let out = asking.join().expect("arping thread");
    let text = String::from_utf8_lossy(&out.stdout);
    let extra: u32 = text
        .split('(')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        text.contains("100 packets transmitted, 10")
            && text.contains(" 0% unanswered")
            && extra <= 5,
        "{text}\n{}",
        cluster.logs()
    );
    assert_eq!(
        answerers(&text),
        BTreeSet::from([cluster.macs[first].clone(), cluster.macs[second].clone()]),
        "{text}"
    );
    cluster.wait_owners(&[second]);
    // The old owner's entry fell silent on the claim (or the handover lapsed).
    let roles = NeighbourMaps::open(&PinLayout::new(cluster.pins[first].path()))
        .unwrap()
        .roles();
    assert_eq!(
        roles[&L2_VIP4.parse::<IpAddr>().unwrap()],
        Role::Silent,
        "{roles:?}"
    );
}

#[test]
fn on_interfaces_that_refuse_the_program_the_kernel_answers_for_the_owner_alone_and_ownership_still_moves()
 {
    let mut cluster = Cluster::refusing();
    let all = [0, 1, 2];
    // Every node's kernel holds both addresses elsewhere, as with kube-proxy's IPVS mode.
    for i in all {
        cluster.ipvs_like(i);
    }
    // Each agent names the interface and why the program was refused, and sets the kernel
    // so that only an address on eth0 itself is answered there.
    for i in all {
        let named = wait_until(Duration::from_secs(15), || {
            cluster.agents[i].as_ref().is_some_and(|agent| {
                agent.log().lines().any(|line| {
                    line.contains("the XDP program was refused on this interface")
                        && line.contains("iface=eth0")
                        && line.contains("driver-mode XDP refused on eth0")
                })
            })
        });
        assert!(named, "node {i}\n{}", cluster.logs());
        assert_eq!(
            lbagent_tests::xdp_on(&cluster.segment.nodes[i], "eth0"),
            None
        );
    }
    let owner4 = cluster.owner(L2_VIP4, &all);
    let owner6 = cluster.owner(L2_VIP6, &all);
    cluster.wait_answered_by(owner4, owner6);
    for i in all {
        assert_eq!(
            (
                cluster.sysctl(i, "arp_ignore"),
                cluster.sysctl(i, "arp_announce")
            ),
            ("1".to_owned(), "2".to_owned()),
            "node {i}"
        );
    }
    // Steady: every request answered, by the owner alone.
    for _ in 0..3 {
        assert_eq!(
            arping(&cluster.client, "eth0", L2_VIP4, 3),
            BTreeSet::from([cluster.macs[owner4].clone()])
        );
    }
    // The status names the interface, why, and what this node holds there.
    let status: serde_json::Value =
        serde_json::from_str(&cluster.status(owner4, "json")).expect("status json");
    let fallback = &status["neighbours"]["kernelResponder"][0];
    assert_eq!(fallback["interface"], "eth0", "{status}");
    assert!(
        fallback["reason"]
            .as_str()
            .is_some_and(|r| r.contains("driver-mode XDP refused on eth0")),
        "{status}"
    );
    assert!(
        fallback["owned"]
            .as_array()
            .is_some_and(|owned| owned.contains(&serde_json::json!(L2_VIP4))),
        "{status}"
    );

    // The owner's link goes down: a survivor's kernel answers, alone.
    let others: Vec<usize> = all.into_iter().filter(|i| *i != owner4).collect();
    cluster.segment.nodes[owner4].ip(&["link", "set", "eth0", "down"]);
    cluster.wait_answered_by(
        cluster.owner(L2_VIP4, &others),
        cluster.owner(L2_VIP6, if owner6 == owner4 { &others } else { &all }),
    );
    // Back, it takes its addresses back and the interim owner lets them go.
    cluster.segment.nodes[owner4].ip(&["link", "set", "eth0", "up"]);
    cluster.wait_answered_by(owner4, owner6);

    // Stopped and cleaned up, the node gets its sysctls back and holds no local address on
    // eth0 any more.
    let agent = cluster.agents[owner4].take().expect("agent");
    agent.stop();
    let config = cluster.dir.path().join(format!("lbagent-{owner4}.yaml"));
    let out = lbagent_tests::lbagent_cleanup(&cluster.segment.nodes[owner4], &config);
    assert!(out.contains("kernel responder: sysctls restored"), "{out}");
    assert_eq!(
        (
            cluster.sysctl(owner4, "arp_ignore"),
            cluster.sysctl(owner4, "arp_announce")
        ),
        ("0".to_owned(), "1".to_owned())
    );
    let held = lbagent_tests::addresses_on(&cluster.segment.nodes[owner4], "eth0");
    assert!(
        !held
            .iter()
            .any(|a| a.starts_with(L2_VIP4) || a.starts_with(L2_VIP6)),
        "{held:?}"
    );
}

#[test]
fn a_clean_stop_hands_each_address_over_before_the_owner_falls_silent() {
    use nix::sys::signal::Signal;
    let mut cluster = Cluster::new();
    let all = [0, 1, 2];
    cluster.wait_owners(&all);
    let owner = cluster.owner(L2_VIP4, &all);
    let others: Vec<usize> = all.into_iter().filter(|i| *i != owner).collect();
    let successor = cluster.owner(L2_VIP4, &others);
    // A request every 10 ms across the owner's clean stop (its membership and its agent get
    // SIGTERM, as when the node shuts down).
    let asking = arping_run(&cluster, 100);
    std::thread::sleep(Duration::from_millis(300));
    cluster.members[owner].signal(Signal::SIGTERM);
    let agent = cluster.agents[owner].take().expect("agent");
    agent.stop();
    let out = asking.join().expect("arping thread");
    let text = String::from_utf8_lossy(&out.stdout);
    // Every request answered, none twice: the successor answered before the owner fell
    // silent, and the owner fell silent as soon as it heard the successor.
    assert!(
        text.contains("100 packets transmitted, 100 packets received")
            && text.contains("(0 extra)"),
        "{text}\n{}",
        cluster.logs()
    );
    assert_eq!(
        answerers(&text),
        BTreeSet::from([cluster.macs[owner].clone(), cluster.macs[successor].clone()]),
        "{text}"
    );
    let log = cluster.members[owner].log();
    assert!(log.contains("every local address handed over"), "{log}");
    assert!(log.contains("left the cluster"), "{log}");
    // Its view says it holds nothing, and the program stays silent.
    let roles = NeighbourMaps::open(&PinLayout::new(cluster.pins[owner].path()))
        .unwrap()
        .roles();
    assert!(
        roles.values().all(|role| *role == Role::Silent),
        "{roles:?}"
    );
    cluster.wait_answered_by(successor, cluster.owner(L2_VIP6, &others));
}
