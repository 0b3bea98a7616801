//! `lbagent run` with the dataplane on: the services file's ports and source ranges become
//! XDP policy, and real TCP and UDP traffic between namespaces shows it.

use std::{net::SocketAddr, time::Duration};

use lbagent_tests::{Agent, Pair, PinRoot, Servers, TempDir, lbagent, tcp_ok, udp_ok, wait_until};

const VIP4: &str = "203.0.113.10";

fn addr(port: u16) -> SocketAddr {
    format!("{VIP4}:{port}").parse().unwrap()
}

struct Node {
    pair: Pair,
    pins: PinRoot,
    dir: TempDir,
    agent: Agent,
}

impl Node {
    fn start(services: &str) -> Self {
        Self::start_with(services, |_| {})
    }

    /// As `start`, with `before` run on the pin root before the agent starts.
    fn start_with(services: &str, before: impl FnOnce(&PinRoot)) -> Self {
        // The node's VIP is not on lo here: lbagent puts it on kube-lb0.
        let pair = Pair::new(&[]);
        // No interface in the config: the dataplane takes the default route's, eth0.
        pair.node
            .ip(&["route", "add", "default", "via", Pair::CLIENT_V4]);
        pair.client
            .ip(&["route", "add", &format!("{VIP4}/32"), "via", Pair::NODE_V4]);
        let pins = PinRoot::new();
        let dir = TempDir::new("lbt-dp");
        dir.write("services.yaml", services);
        dir.write(
            "lbagent.yaml",
            &format!(
                "source: {{file: {{path: services.yaml}}}}\nstatus: {{path: {}}}\ndataplane: {{pinRoot: {}}}\n",
                dir.path().join("status.json").display(),
                pins.path().display()
            ),
        );
        before(&pins);
        let agent = Agent::start(
            &pair.node,
            &dir.path().join("lbagent.yaml"),
            dir.path().join("agent.log"),
        );
        Self {
            pair,
            pins,
            dir,
            agent,
        }
    }

    /// Waits for the first reconcile to fill the policy maps.
    fn wait_policy(&self) {
        assert!(
            wait_until(Duration::from_secs(5), || self
                .agent
                .log()
                .contains("updating the dataplane's policy maps")),
            "{}",
            self.agent.log()
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
    let Node {
        pair,
        pins,
        dir,
        agent,
    } = node;
    assert!(agent.stop().success());
    assert!(
        lbagent_tests::xdp_on(&pair.node, "eth0").is_some(),
        "SIGTERM must leave the program attached"
    );
    lbagent_tests::lbagent_cleanup(&pair.node, &dir.path().join("lbagent.yaml"));
    assert_eq!(lbagent_tests::xdp_on(&pair.node, "eth0"), None);
    assert!(
        !pins.path().exists(),
        "pins left: {:?}",
        pins.pinned_files()
    );
}

#[test]
fn a_killed_agent_leaves_the_dataplane_counting_and_a_new_one_adopts_it_without_loss() {
    let mut node = Node::start(&format!(
        "services:\n- {{name: web, addresses: [{VIP4}], ports: [{{port: 8080}}]}}\n"
    ));
    node.wait_policy();
    let program = lbagent_tests::xdp_on(&node.pair.node, "eth0").expect("attached");

    // 300 pings at 10 ms while the agent is SIGKILLed and a new one starts.
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
    // SIGKILL, as a crash or an OOM kill would; then, a moment later, a new agent.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(node.agent.pid() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let dead = std::mem::replace(
        &mut node.agent,
        Agent::start(
            &node.pair.node,
            &node.dir.path().join("lbagent.yaml"),
            node.dir.path().join("agent2.log"),
        ),
    );
    drop(dead);
    let output = pings.join().unwrap();
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(
        summary.contains("300 packets transmitted, 300 received"),
        "{summary}"
    );
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
    let node = Node::start_with(
        &format!("services:\n- {{name: web, addresses: [{VIP4}], ports: [{{port: 8080}}]}}\n"),
        |pins| {
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
        },
    );
    let _servers = Servers::start(&node.pair.node, &[addr(8080), addr(9090)], &[]);
    assert!(
        wait_until(Duration::from_secs(5), || node.agent.log().contains(
            "pinned map has another layout; replacing the dataplane's pins"
        )),
        "{}",
        node.agent.log()
    );
    assert!(
        wait_until(Duration::from_secs(5), || tcp_ok(
            &node.pair.client,
            addr(8080)
        )),
        "{}",
        node.agent.log()
    );
    assert!(
        !tcp_ok(&node.pair.client, addr(9090)),
        "the policy is enforced by the new maps"
    );
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
