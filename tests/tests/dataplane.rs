//! `lbagent run` with the dataplane on: the services file's ports and source ranges become
//! XDP policy, and real TCP and UDP traffic between namespaces shows it.

use std::{net::SocketAddr, time::Duration};

use lbagent_tests::{
    Agent, Pair, PinRoot, ServedNode, Servers, TempDir, lbagent, tcp_ok, udp_ok, wait_until,
};

const VIP4: &str = "203.0.113.10";

fn addr(port: u16) -> SocketAddr {
    format!("{VIP4}:{port}").parse().unwrap()
}

/// A served node, with this file's helpers.
struct Node(ServedNode);

impl std::ops::Deref for Node {
    type Target = ServedNode;
    fn deref(&self) -> &ServedNode {
        &self.0
    }
}

impl std::ops::DerefMut for Node {
    fn deref_mut(&mut self) -> &mut ServedNode {
        &mut self.0
    }
}

/// The services file most tests here use: one service, `web`, on [`VIP4`] port 8080.
fn web_on_8080() -> String {
    format!("services:\n- {{name: web, addresses: [{VIP4}], ports: [{{port: 8080}}]}}\n")
}

impl Node {
    fn start(services: &str) -> Self {
        Self::start_with(services, "", |_| {})
    }

    /// As `start`, with more settings in the `dataplane` section (`, key: value`), and
    /// `before` run on the pin root before the agent starts.
    fn start_with(services: &str, dataplane: &str, before: impl FnOnce(&PinRoot)) -> Self {
        // The node's VIP is not on lo: lbagent puts it on kube-lb0. No interface in the
        // config: the dataplane takes the default route's, eth0.
        Self(ServedNode::start_with(
            VIP4, services, dataplane, "", before,
        ))
    }

    /// Listeners on the node for the served port (8080) and one the address does not
    /// serve (9090).
    fn servers(&self) -> Servers {
        Servers::start(&self.pair.node, &[addr(8080), addr(9090)], &[])
    }

    /// Waits for the first reconcile to fill the policy maps.
    fn wait_policy(&self) {
        self.agent.expect_log(
            "updating the dataplane's policy maps",
            Duration::from_secs(5),
        );
    }

    fn drops(&self) -> serde_json::Value {
        let run = lbagent(&self.pair.node, &self.pins, &["counters", "-o", "json"]);
        let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_default();
        json["vips"]
            .as_array()
            .and_then(|v| v.iter().find(|c| c["address"] == VIP4).cloned())
            .map(|c| c["drops"].clone())
            .unwrap_or_default()
    }
}

#[test]
fn served_ports_pass_others_are_dropped_and_source_ranges_follow_the_file() {
    let node = Node::start(&format!(
        "services:\n- {{name: web, addresses: [{VIP4}], ports: [{{port: 8080}}, {{port: 5353, protocol: UDP}}]}}\n"
    ));
    // Port 9090 has a listener too: only the dataplane can stop a connection to it.
    let _servers = Servers::start(
        &node.pair.node,
        &[addr(8080), addr(9090)],
        &[addr(5353), addr(5354)],
    );
    node.wait_policy();

    let log = node.agent.log();
    assert!(
        log.contains("using the interfaces of the default routes interfaces=[\"eth0\"]"),
        "{log}"
    );
    assert!(
        tcp_ok(&node.pair.client, addr(8080)),
        "served TCP port blocked\n{}",
        node.agent.log()
    );
    assert!(
        udp_ok(&node.pair.client, addr(5353)),
        "served UDP port blocked"
    );
    assert!(
        !tcp_ok(&node.pair.client, addr(9090)),
        "unserved TCP port passed"
    );
    assert!(
        !udp_ok(&node.pair.client, addr(5354)),
        "unserved UDP port passed"
    );
    let drops = node.drops();
    assert!(drops["port"].as_u64().unwrap_or(0) >= 2, "{drops}");
    assert_eq!(drops["source"], 0);

    // The agent owns the maps while it runs: a second writer is refused, not interleaved
    // (two writers would hand out the same slot).
    lbagent(&node.pair.node, &node.pins, &["vip", "add", "203.0.113.77"])
        .assert_one_line_error("another lbagent process is changing the maps");

    // Source ranges that leave the client out: its connection is dropped, by source.
    node.dir.write(
        "services.yaml",
        &format!("services:\n- {{name: web, addresses: [{VIP4}], ports: [{{port: 8080}}], sourceRanges: [192.0.2.0/24]}}\n"),
    );
    assert!(
        wait_until(Duration::from_secs(3), || !tcp_ok(
            &node.pair.client,
            addr(8080)
        )),
        "a client outside the ranges still connects"
    );
    assert!(
        node.drops()["source"].as_u64().unwrap_or(0) >= 1,
        "{}",
        node.drops()
    );

    // And ranges that include it: back in.
    node.dir.write(
        "services.yaml",
        &format!("services:\n- {{name: web, addresses: [{VIP4}], ports: [{{port: 8080}}], sourceRanges: [10.200.0.0/24]}}\n"),
    );
    assert!(
        wait_until(Duration::from_secs(3), || tcp_ok(
            &node.pair.client,
            addr(8080)
        )),
        "a client inside the ranges cannot connect"
    );

    // Cleanup with the config alone finds the dataplane's pins and removes everything.
    let Node(ServedNode {
        pair,
        pins,
        dir,
        agent,
    }) = node;
    assert!(agent.stop().success());
    assert!(
        lbagent_tests::xdp_on(&pair.node, "eth0").is_some(),
        "SIGTERM must leave the program attached"
    );
    lbagent_tests::lbagent_cleanup(&pair.node, &dir.path().join("lbagent.yaml"));
    assert_eq!(lbagent_tests::xdp_on(&pair.node, "eth0"), None);
    pins.assert_removed();
}

/// 300 pings at 10 ms while the agent is SIGKILLed, as a crash or an OOM kill would, and a
/// new one (with `env`) starts a moment later: every one is answered.
fn pings_answered_across_a_kill_and_restart(node: &mut Node, env: &[(&str, &str)]) {
    let client = node.pair.client.name().to_owned();
    let pings = std::thread::spawn(move || {
        lbagent_tests::run(
            "ip",
            &[
                "netns", "exec", &client, "ping", "-c", "300", "-i", "0.01", "-W", "1", "-q", VIP4,
            ],
        )
    });
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(node.agent.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let next = Agent::start_with_env(
        &node.pair.node,
        &node.dir.path().join("lbagent.yaml"),
        node.dir.path().join("agent2.log"),
        env,
    );
    drop(std::mem::replace(&mut node.agent, next));
    let output = pings.join().unwrap();
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(
        summary.contains("300 packets transmitted, 300 received"),
        "{summary}"
    );
}

#[test]
fn a_killed_agent_leaves_the_dataplane_counting_and_a_new_one_adopts_it_without_loss() {
    let mut node = Node::start(&web_on_8080());
    node.wait_policy();
    let program = lbagent_tests::xdp_on(&node.pair.node, "eth0").expect("attached");

    pings_answered_across_a_kill_and_restart(&mut node, &[]);
    assert!(
        wait_until(Duration::from_secs(5), || node
            .agent
            .log()
            .contains("replaced the XDP program")),
        "the new agent did not adopt the pinned program:\n{}",
        node.agent.log()
    );
    let adopted = lbagent_tests::xdp_on(&node.pair.node, "eth0").expect("still attached");
    assert_ne!(
        adopted.id, program.id,
        "the new agent swaps in its own program"
    );

    // Every request was counted in, every reply out, across the kill.
    let run = lbagent(&node.pair.node, &node.pins, &["counters", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let vip = &json["vips"][0];
    assert_eq!(vip["packets"], 300, "{json}");
    assert_eq!(vip["tx_packets"], 300, "{json}");
}

#[test]
fn a_pinned_map_with_another_layout_is_replaced_not_reused() {
    let node = Node::start_with(&web_on_8080(), "", |pins| {
        // A map under this layout's name with another shape: LB_VIP_CONFIG as a hash map
        // with 4-byte values, as layout v1's address map was; v3 wants a shared array.
        let dir = pins
            .path()
            .join(format!("v{}", lbagent_common::PIN_LAYOUT_VERSION));
        std::fs::create_dir_all(&dir).unwrap();
        lbagent_tests::run_ok(
            "bpftool",
            &[
                "map",
                "create",
                dir.join("LB_VIP_CONFIG").to_str().unwrap(),
                "type",
                "hash",
                "key",
                "20",
                "value",
                "4",
                "entries",
                "16",
                "name",
                "LB_VIP_CONFIG",
            ],
        );
    });
    let _servers = node.servers();
    node.agent.expect_log(
        "pinned map has another layout; replacing the dataplane's pins",
        Duration::from_secs(5),
    );
    assert!(
        wait_until(Duration::from_secs(5), || tcp_ok(
            &node.pair.client,
            addr(8080)
        )),
        "{}",
        node.agent.log()
    );
    // Port 8080 answers with or without the program; the policy shows on 9090, once the
    // reconciler has filled the new maps.
    node.wait_policy();
    assert!(
        wait_until(Duration::from_secs(10), || !tcp_ok(
            &node.pair.client,
            addr(9090)
        )),
        "the policy is enforced by the new maps\n{}",
        node.agent.log()
    );
    assert!(tcp_ok(&node.pair.client, addr(8080)));
    let info = lbagent_tests::run_ok(
        "bpftool",
        &[
            "-j",
            "map",
            "show",
            "pinned",
            node.pins
                .path()
                .join(format!(
                    "v{}/LB_VIP_CONFIG",
                    lbagent_common::PIN_LAYOUT_VERSION
                ))
                .to_str()
                .unwrap(),
        ],
    );
    assert!(info.contains("\"type\":\"array\""), "{info}");
    assert!(info.contains("\"bytes_value\":24"), "{info}");
}

/// A second veth pair between the two namespaces: `eth1`, 10.201.0.1 (client) and
/// 10.201.0.2 (node). Returns the node side's ifindex.
fn add_eth1(pair: &Pair) -> u32 {
    lbagent_tests::run_ok(
        "ip",
        &[
            "link",
            "add",
            "eth1",
            "netns",
            pair.client.name(),
            "type",
            "veth",
            "peer",
            "name",
            "eth1",
            "netns",
            pair.node.name(),
        ],
    );
    for (ns, address) in [
        (&pair.client, "10.201.0.1/24"),
        (&pair.node, "10.201.0.2/24"),
    ] {
        ns.ip(&["addr", "add", address, "dev", "eth1"]);
        ns.ip(&["link", "set", "eth1", "up"]);
    }
    let json = pair.node.ip(&["-j", "link", "show", "dev", "eth1"]);
    let links: serde_json::Value = serde_json::from_str(&json).unwrap();
    links[0]["ifindex"].as_u64().unwrap() as u32
}

#[test]
fn listed_interfaces_get_the_program_when_they_appear_and_lose_their_pins_when_they_vanish() {
    let node = Node::start_with(&web_on_8080(), ", interfaces: [eth0, eth1]", |_| {});
    let _servers = node.servers();
    node.wait_policy();
    node.agent.expect_log(
        "interface not present; it gets the XDP program when it appears iface=eth1",
        Duration::from_secs(5),
    );
    assert!(lbagent_tests::xdp_on(&node.pair.node, "eth0").is_some());

    // eth1 appears, and the client reaches the address through it.
    let ifindex = add_eth1(&node.pair);
    node.pair.client.ip(&[
        "route",
        "replace",
        &format!("{VIP4}/32"),
        "via",
        "10.201.0.2",
    ]);
    node.agent.expect_log(
        "interface appeared: XDP program attached iface=eth1",
        Duration::from_secs(5),
    );
    let program = lbagent_tests::xdp_on(&node.pair.node, "eth1").expect("attached to eth1");
    assert_eq!(program.name, "lbagent_xdp");
    assert!(
        tcp_ok(&node.pair.client, addr(8080)),
        "served port through eth1"
    );
    let port_drops = node.drops()["port"].as_u64().unwrap_or(0);
    assert!(
        !tcp_ok(&node.pair.client, addr(9090)),
        "the policy holds on eth1"
    );
    assert!(node.drops()["port"].as_u64().unwrap_or(0) > port_drops);
    let pin = |prefix: &str| {
        node.pins.pinned_files().into_iter().any(|path| {
            path.to_string_lossy().ends_with(&format!("_if{ifindex}"))
                && path.to_string_lossy().contains(prefix)
        })
    };
    assert!(
        pin("/xdp_ns") && pin("/tc_ns"),
        "{:?}",
        node.pins.pinned_files()
    );

    // eth1 vanishes: its pins go, eth0 keeps its program and the policy.
    node.pair.node.ip(&["link", "del", "eth1"]);
    node.agent.expect_log(
        "interface vanished: its XDP link pins are removed iface=eth1",
        Duration::from_secs(5),
    );
    assert!(
        !pin("/xdp_ns") && !pin("/tc_ns"),
        "{:?}",
        node.pins.pinned_files()
    );
    node.pair.client.ip(&[
        "route",
        "replace",
        &format!("{VIP4}/32"),
        "via",
        Pair::NODE_V4,
    ]);
    assert!(tcp_ok(&node.pair.client, addr(8080)));
    assert!(!tcp_ok(&node.pair.client, addr(9090)));
    assert!(lbagent_tests::xdp_on(&node.pair.node, "eth0").is_some());
}

#[test]
fn an_interface_that_gains_a_default_route_gets_the_program() {
    let node = Node::start(&web_on_8080());
    node.wait_policy();
    add_eth1(&node.pair);
    // A later interface with a default route: once the agent has attached to it, it has
    // seen eth1 too (netlink delivers in order), and left it alone: no default route yet.
    let ns = &node.pair.node;
    ns.ip(&[
        "link", "add", "eth2", "type", "veth", "peer", "name", "eth2p",
    ]);
    ns.ip(&["addr", "add", "10.202.0.2/24", "dev", "eth2"]);
    for iface in ["eth2", "eth2p"] {
        ns.ip(&["link", "set", iface, "up"]);
    }
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.202.0.1",
        "dev",
        "eth2",
        "metric",
        "300",
    ]);
    node.agent.expect_log(
        "interface appeared: XDP program attached iface=eth2",
        Duration::from_secs(5),
    );
    assert_eq!(lbagent_tests::xdp_on(&node.pair.node, "eth1"), None);

    node.pair.node.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.201.0.1",
        "dev",
        "eth1",
        "metric",
        "200",
    ]);
    node.agent.expect_log(
        "interface appeared: XDP program attached iface=eth1",
        Duration::from_secs(5),
    );
    assert!(lbagent_tests::xdp_on(&node.pair.node, "eth1").is_some());
    assert!(lbagent_tests::xdp_on(&node.pair.node, "eth0").is_some());
}

#[test]
fn bpftool_prints_named_fields_for_every_map() {
    const VIP6: &str = "2001:db8:ff::10";
    let node = Node::start(&format!(
        "services:\n- {{name: web, addresses: [{VIP4}, {VIP6}], ports: [{{port: 8080}}], sourceRanges: [10.200.0.0/24, fd00:200::/64]}}\n"
    ));
    let _servers = Servers::start(&node.pair.node, &[addr(8080)], &[]);
    node.wait_policy();
    assert!(tcp_ok(&node.pair.client, addr(8080)));

    let dump = |map: &str| -> Vec<serde_json::Value> {
        let path = node
            .pins
            .path()
            .join(format!("v{}", lbagent_common::PIN_LAYOUT_VERSION))
            .join(map);
        let json = lbagent_tests::run_ok(
            "bpftool",
            &["-j", "map", "dump", "pinned", path.to_str().unwrap()],
        );
        // Only the BTF-formatted half: the raw bytes beside it are most of the text.
        #[derive(serde::Deserialize)]
        struct Entry {
            formatted: serde_json::Value,
        }
        let entries: Vec<Entry> = serde_json::from_str(&json).expect("bpftool json");
        entries.into_iter().map(|entry| entry.formatted).collect()
    };
    let octets = |value: &serde_json::Value| -> Vec<u64> {
        value
            .as_array()
            .unwrap_or_else(|| panic!("an array of bytes: {value}"))
            .iter()
            .map(|b| b.as_u64().unwrap())
            .collect()
    };
    let mut seen = Vec::new();
    // The neighbour maps hold entries only with local addresses: tests/tests/l2.rs reads
    // them with bpftool where they have some.
    for map in lbagent_common::maps::ALL
        .into_iter()
        .filter(|map| !lbagent_common::maps::ADDED.contains(map))
    {
        let entries = dump(map);
        assert!(!entries.is_empty(), "{map}: no formatted entries");
        // Every map has at least one live entry, and it reads as named fields.
        let live = entries.iter().any(|e| match map {
            "LB_VIPS_V4" | "LB_VIPS_V6" | "LB_PORTS" => e["value"]["ways"]
                .as_array()
                .expect("named field ways")
                .iter()
                .any(|way| {
                    way["slot"].as_u64().expect("named field slot") != 0 && way["key"].is_u64()
                }),
            "LB_VIP_CONFIG" => {
                let v = &e["value"];
                let addr = octets(&v["addr"]);
                match v["family"].as_u64().expect("named field family") {
                    4 => addr[..4] == [203, 0, 113, 10] && v["flags"] == 1,
                    6 => addr[..2] == [0x20, 0x01] && v["fragment_ranges"].as_u64() > Some(0),
                    _ => false,
                }
            }
            "LB_PORT_CONFIG" => {
                let v = &e["value"];
                v["port"] == 8080
                    && v["protocol"] == 6
                    && v["vip"].as_u64() > Some(0)
                    && v["ranges"].as_u64() > Some(0)
            }
            "LB_VIP_STATS" | "LB_PORT_STATS" => e["values"]
                .as_array()
                .expect("per-CPU values")
                .iter()
                .any(|cpu| {
                    cpu["value"]["packets"]
                        .as_u64()
                        .expect("named field packets")
                        > 0
                        && cpu["value"]["bytes"].as_u64().expect("named field bytes") > 0
                }),
            "LB_RANGES_V4" | "LB_RANGES_V6" => {
                let key = &e["key"];
                let addr = octets(&key["data"]["addr"]);
                key["prefix_len"].as_u64().expect("named field prefix_len") > 32
                    && octets(&key["data"]["set"]).len() == 4
                    && (addr[..3] == [10, 200, 0] || addr[..2] == [0xfd, 0x00])
            }
            // Both addresses counted in the address filter.
            "LB_VIP_FILTER" => e["value"].as_u64().is_some_and(|count| count > 0),
            other => panic!("a map this test does not know: {other}"),
        });
        assert!(live, "{map}: no live entry with the expected named fields");
        seen.push(map);
    }
    assert_eq!(seen.len(), 10);
}

#[test]
fn an_interface_that_refuses_the_program_is_named_with_the_fallback_and_the_rest_works() {
    let node = Node::start_with(
        &web_on_8080(),
        // An ifb has no native XDP: driver mode alone is refused there.
        ", mode: driver, interfaces: [ifb9, eth0]",
        |_| {},
    );
    let _servers = node.servers();
    // ifb9 appears as the agent starts: whichever pass sees it first reports the refusal.
    node.pair.node.ip(&["link", "add", "ifb9", "type", "ifb"]);
    node.pair.node.ip(&["link", "set", "ifb9", "up"]);
    node.wait_policy();
    node.agent
        .expect_log("driver-mode XDP refused on ifb9", Duration::from_secs(5));
    let log = node.agent.log();
    let line = log
        .lines()
        .find(|line| line.contains("driver-mode XDP refused on ifb9"))
        .unwrap();
    assert!(
        line.contains("iface=ifb9") && line.contains("continuing without it"),
        "{line}"
    );
    assert_eq!(lbagent_tests::xdp_on(&node.pair.node, "ifb9"), None);
    // Everything else goes on: eth0 has the program in driver mode and filters.
    let eth0 = lbagent_tests::xdp_on(&node.pair.node, "eth0").expect("attached");
    assert_eq!(eth0.mode, "driver");
    assert!(tcp_ok(&node.pair.client, addr(8080)));
    assert!(!tcp_ok(&node.pair.client, addr(9090)));
    assert!(node.drops()["port"].as_u64().unwrap_or(0) >= 1);
}

#[test]
fn what_a_killed_writer_left_half_written_is_cleared_by_the_next_one() {
    use lbagent_common::{PIN_LAYOUT_VERSION, buckets_of, maps, vip4_key};
    let pair = Pair::new(&[]);
    let pins = PinRoot::new();
    lbagent(&pair.node, &pins, &["attach", "eth0"]).assert_ok();
    let map = |name: &str| {
        pins.path()
            .join(format!("v{PIN_LAYOUT_VERSION}"))
            .join(name)
            .to_string_lossy()
            .into_owned()
    };
    let bytes = |data: &[u8]| data.iter().map(|b| b.to_string()).collect::<Vec<_>>();
    let update = |name: &str, key: &[u8], value: &[u8]| {
        let mut args = vec![
            "map".to_owned(),
            "update".into(),
            "pinned".into(),
            map(name),
        ];
        args.push("key".into());
        args.extend(bytes(key));
        args.push("value".into());
        args.extend(bytes(value));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lbagent_tests::run_ok("bpftool", &args);
    };
    // A configuration no table entry reaches (killed before the entry was written)...
    let mut config = [0u8; 24];
    config[..4].copy_from_slice(&[192, 0, 2, 55]);
    config[16] = 4;
    update(maps::VIP_CONFIG, &500u32.to_le_bytes(), &config);
    // ...and a table entry naming a slot that holds another key (killed before clearing it).
    let key = vip4_key([192, 0, 2, 66]);
    let bucket = buckets_of(key, maps::VIP_BUCKETS).0;
    let mut value = [0u8; 64];
    value[..8].copy_from_slice(&key.to_le_bytes());
    value[8..12].copy_from_slice(&500u32.to_le_bytes());
    update(maps::VIPS_V4, &bucket.to_le_bytes(), &value);

    // The next writer repairs before it writes.
    lbagent(&pair.node, &pins, &["vip", "add", VIP4]).assert_ok();
    let lookup = |name: &str, key: u32| -> serde_json::Value {
        let mut args = vec![
            "-j".to_owned(),
            "map".into(),
            "lookup".into(),
            "pinned".into(),
        ];
        args.push(map(name));
        args.push("key".into());
        args.extend(bytes(&key.to_le_bytes()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let json = lbagent_tests::run_ok("bpftool", &args);
        serde_json::from_str::<serde_json::Value>(&json).unwrap()["formatted"]["value"].clone()
    };
    assert_eq!(
        lookup(maps::VIP_CONFIG, 500)["family"],
        0,
        "orphan slot freed"
    );
    assert!(
        lookup(maps::VIPS_V4, bucket)["ways"]
            .as_array()
            .unwrap()
            .iter()
            .all(|way| way["key"] != key),
        "stale entry cleared"
    );
    let counters = lbagent(&pair.node, &pins, &["counters", "-o", "json"]).assert_ok();
    let json: serde_json::Value = serde_json::from_str(&counters.stdout).unwrap();
    let listed: Vec<&str> = json["vips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["address"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [VIP4]);
}

#[test]
fn an_upgrade_adopts_the_links_of_the_older_layout_without_a_gap_and_retires_its_pins() {
    let version = lbagent_common::PIN_LAYOUT_VERSION;
    let (old, new) = (format!("v{}", version - 1), format!("v{version}"));
    // An older lbagent's attachment: its link (and maps) pinned under the previous
    // version's directory, holding eth0. (A current attach, moved there.)
    let pair = Pair::new(&[]);
    pair.node
        .ip(&["route", "add", "default", "via", Pair::CLIENT_V4]);
    let pins = PinRoot::new();
    lbagent(&pair.node, &pins, &["attach", "eth0"]).assert_ok();
    let before = lbagent_tests::xdp_on(&pair.node, "eth0").expect("attached");
    std::fs::rename(pins.path().join(&new), pins.path().join(&old)).unwrap();

    // Pings to the node throughout the upgrade: not one may be lost.
    let client = pair.client.name().to_owned();
    let pings = std::thread::spawn(move || {
        lbagent_tests::run(
            "ip",
            &[
                "netns",
                "exec",
                &client,
                "ping",
                "-c",
                "200",
                "-i",
                "0.01",
                "-W",
                "1",
                "-q",
                Pair::NODE_V4,
            ],
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let dir = TempDir::new("lbt-dp");
    dir.write("services.yaml", &web_on_8080());
    dir.write(
        "lbagent.yaml",
        &format!(
            "source: {{file: {{path: services.yaml}}}}\nstatus: {{path: {}}}\ndataplane: {{pinRoot: {}}}\n",
            dir.path().join("status.json").display(),
            pins.path().display()
        ),
    );
    let agent = Agent::start(
        &pair.node,
        &dir.path().join("lbagent.yaml"),
        dir.path().join("agent.log"),
    );
    agent.expect_log(
        "adopting lbagent's link from another map layout",
        Duration::from_secs(5),
    );
    let output = pings.join().unwrap();
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(
        summary.contains("200 packets transmitted, 200 received"),
        "{summary}"
    );
    let after = lbagent_tests::xdp_on(&pair.node, "eth0").expect("still attached");
    assert_ne!(
        after.id,
        before.id,
        "the new program runs in the adopted link\n{}",
        agent.log()
    );
    assert!(
        wait_until(Duration::from_secs(3), || !pins.path().join(&old).exists()),
        "the older layout's pins are retired: {:?}",
        pins.pinned_files()
    );
    assert!(pins.path().join(&new).join("links").exists());
}

/// The egress filters lbagent put on `iface`'s clsact egress hook, as `tc` lists them.
fn classic_filters(node: &ServedNode, iface: &str) -> Vec<String> {
    node.pair
        .node
        .exec("tc", &["filter", "show", "dev", iface, "egress"])
        .stdout
        .split(|b| *b == b'\n')
        .map(|line| String::from_utf8_lossy(line).into_owned())
        .filter(|line| line.contains("lbagent_egress"))
        .collect()
}

#[test]
fn without_tcx_the_egress_counter_is_a_classic_filter_that_a_restart_swaps_without_loss() {
    // Forced here; on a kernel without TCX (before 6.6) the agent takes this path by itself.
    const CLASSIC: &[(&str, &str)] = &[("LBAGENT_TC_ATTACH", "classic")];
    let mut node = Node(ServedNode::start_with_env(
        VIP4,
        &web_on_8080(),
        "",
        "",
        CLASSIC,
        |_| {},
    ));
    node.wait_policy();
    assert!(
        wait_until(Duration::from_secs(5), || classic_filters(&node, "eth0")
            .len()
            == 1),
        "no classic egress filter: {:?}\n{}",
        classic_filters(&node, "eth0"),
        node.agent.log()
    );
    let pinned = node.pins.pinned_files();
    assert!(
        pinned
            .iter()
            .any(|p| p.to_string_lossy().contains("tcclassic_ns"))
            && !pinned
                .iter()
                .any(|p| p.to_string_lossy().contains("/tc_ns")),
        "a classic marker and no TCX link: {pinned:?}"
    );
    let status = lbagent(&node.pair.node, &node.pins, &["status", "-o", "json"]);
    assert!(
        !status.stdout.contains("no tc egress counter"),
        "status reports the classic counter as missing: {}",
        status.stdout
    );

    pings_answered_across_a_kill_and_restart(&mut node, CLASSIC);
    assert!(
        wait_until(Duration::from_secs(5), || node
            .agent
            .log()
            .contains("tc egress counter attached")),
        "{}",
        node.agent.log()
    );
    assert!(
        node.agent.log().contains("replaced=true"),
        "the new agent replaced the filter in place: {}",
        node.agent.log()
    );
    assert_eq!(
        classic_filters(&node, "eth0").len(),
        1,
        "one filter, replaced in place"
    );

    // Every reply counted out, across the kill, by one filter or the other.
    let run = lbagent(&node.pair.node, &node.pins, &["counters", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(json["vips"][0]["packets"], 300, "{json}");
    assert_eq!(json["vips"][0]["tx_packets"], 300, "{json}");

    // Cleanup takes the filter too, and leaves no pin.
    let Node(ServedNode {
        pair,
        pins,
        dir,
        agent,
    }) = node;
    agent.stop();
    lbagent_tests::lbagent_cleanup(&pair.node, &dir.path().join("lbagent.yaml"));
    let left = pair
        .node
        .exec("tc", &["filter", "show", "dev", "eth0", "egress"]);
    assert_eq!(String::from_utf8_lossy(&left.stdout), "", "no filter left");
    assert_eq!(pins.pinned_files(), Vec::<std::path::PathBuf>::new());
}
