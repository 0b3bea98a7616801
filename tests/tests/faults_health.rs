//! What an unlucky or hostile operator does to the parts a running agent owns besides
//! kube-lb0: its pins removed, a long apply overtaken by a newer services file, another
//! process on BIRD's control socket, a map filled to its last slot. The agent notices each and
//! puts it right, saying what happened once.

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use lbagent_tests::{
    Agent, Monitor, NetNs, Pair, PinRoot, ServedNode, TempDir, addresses_on, in_netns, lbagent,
    wait_until, xdp_on,
};

const VIP4: &str = "203.0.113.10";

/// A node namespace with an eth0 on 10.77.0.0/24 and a directory for the agent's files.
struct Node {
    ns: NetNs,
    dir: TempDir,
}

impl Node {
    /// `extra`: more top-level sections of lbagent.yaml, each line ending in `\n`.
    fn new(extra: &str) -> Self {
        let ns = NetNs::with_eth0("lbt-health", "10.77.0.1/24");
        let dir = TempDir::new("lbt-health");
        dir.write(
            "lbagent.yaml",
            &format!(
                "node: {{name: test-node}}\nsource: {{file: {{path: svc/services.yaml}}}}\naddresses: {{resyncInterval: 1h}}\nstatus: {{path: {}}}\n{extra}",
                dir.path().join("status.json").display()
            ),
        );
        std::fs::create_dir(dir.path().join("svc")).expect("services directory");
        Self { ns, dir }
    }

    fn start(&self) -> Agent {
        Agent::start(
            &self.ns,
            &self.dir.path().join("lbagent.yaml"),
            self.dir.path().join("agent.log"),
        )
    }

    /// Writes the services file as tools that update files safely do: a complete file
    /// renamed over it.
    fn services(&self, addresses: &[String]) {
        let text = format!(
            "services:\n- {{name: web, addresses: [{}]}}\n",
            addresses.join(", ")
        );
        let path = self.dir.path().join("svc/services.yaml");
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).expect("write temp file");
        std::fs::rename(&tmp, &path).expect("rename into place");
    }
}

/// The VIP's packet counter, as `lbagent counters` reads it from the pinned maps.
fn packets(node: &ServedNode) -> u64 {
    let run = lbagent(&node.pair.node, &node.pins, &["counters", "-o", "json"]);
    let json: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_default();
    json["vips"]
        .as_array()
        .and_then(|vips| vips.iter().find(|v| v["address"] == VIP4))
        .and_then(|v| v["packets"].as_u64())
        .unwrap_or_default()
}

fn ping(node: &ServedNode, count: u32) {
    let output = node.pair.client.exec(
        "ping",
        &[
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            "-W",
            "1",
            "-q",
            VIP4,
        ],
    );
    assert!(
        output.status.success(),
        "ping {VIP4}: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn pins_removed_under_a_running_agent_come_back_with_the_same_links_and_maps() {
    let node = ServedNode::start(
        VIP4,
        &format!("services:\n- {{name: web, addresses: [{VIP4}], ports: [{{port: 8080}}]}}\n"),
        "",
    );
    node.agent.expect_log(
        "updating the dataplane's policy maps",
        Duration::from_secs(10),
    );
    let program = xdp_on(&node.pair.node, "eth0").expect("attached");
    ping(&node, 5);
    assert_eq!(packets(&node), 5);
    let pinned: BTreeSet<_> = node.pins.pinned_files().into_iter().collect();

    std::fs::remove_dir_all(node.pins.path()).expect("rm -rf the pin root");
    assert!(
        wait_until(Duration::from_secs(10), || node
            .pins
            .pinned_files()
            .into_iter()
            .collect::<BTreeSet<_>>()
            == pinned),
        "pins not restored: {:?}, expected {pinned:?}\n{}",
        node.pins.pinned_files(),
        node.agent.log()
    );
    assert_eq!(
        xdp_on(&node.pair.node, "eth0"),
        Some(program),
        "the program left the interface"
    );
    let log = node.agent.log();
    assert!(log.contains("pinned the same maps again"), "{log}");
    assert!(log.contains("pinned the same links again"), "{log}");
    // The same maps: the count goes on from where it was.
    ping(&node, 3);
    assert_eq!(packets(&node), 8);
    // And the agent is their one writer again: a second is refused.
    node.agent.expect_log(
        "took the writer's lock on the new one",
        Duration::from_secs(5),
    );
    lbagent(&node.pair.node, &node.pins, &["vip", "add", "203.0.113.99"])
        .assert_one_line_error("another lbagent process is changing the maps");

    // A normal stop leaves the program and every pin in place for the next agent.
    let ServedNode {
        pair, pins, agent, ..
    } = node;
    let program = xdp_on(&pair.node, "eth0").expect("attached");
    assert!(agent.stop().success());
    assert_eq!(xdp_on(&pair.node, "eth0"), Some(program));
    assert_eq!(
        pins.pinned_files().into_iter().collect::<BTreeSet<_>>(),
        pinned
    );
}

/// Addresses in 100.64.0.0/10, the `i`th.
fn many(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| std::net::Ipv4Addr::from(0x6440_0000 + i as u32).to_string())
        .collect()
}

#[test]
fn a_newer_services_file_is_applied_before_a_long_apply_of_the_older_one_ends() {
    const OLD: usize = 10_000;
    let node = Node::new("");
    node.services(&many(OLD));
    let monitor = Monitor::start(&node.ns);
    let agent = node.start();
    let old_added = |line: &str| !line.starts_with("Deleted") && line.contains(" inet 100.");
    assert!(
        wait_until(Duration::from_secs(60), || monitor.count(old_added) > 0),
        "the first apply never began\n{}",
        agent.log()
    );
    let newer: Vec<String> = (1..=3).map(|i| format!("198.51.100.{i}")).collect();
    node.services(&newer);
    let expected: BTreeSet<String> = newer.iter().map(|a| format!("{a}/32")).collect();
    assert!(
        wait_until(Duration::from_secs(300), || addresses_on(
            &node.ns, "kube-lb0"
        ) == expected),
        "kube-lb0 never held just the newer file's addresses\n{}",
        agent.log()
    );
    let events = monitor.stop();
    let added = events.iter().filter(|line| old_added(line)).count();
    let first_newer = events
        .iter()
        .position(|line| line.contains(" inet 198.51.100."))
        .expect("the newer addresses were added");
    let last_older = events
        .iter()
        .rposition(|line| old_added(line))
        .expect("older addresses were added");
    assert!(
        added < OLD,
        "the older plan ran to its end ({added} of {OLD} added) before the newer file was applied\n{}",
        agent.log()
    );
    assert!(last_older < first_newer);
    assert!(
        agent
            .log()
            .contains("a newer desired state arrived: stopping this apply"),
        "{}",
        agent.log()
    );
}

#[test]
fn another_process_on_birds_control_socket_is_named_in_one_error() {
    let state = TempDir::new("lbt-health-bird");
    let node = Node::new(&format!(
        "routing:\n  stateDir: {}\n  bgp:\n    - {{neighbor: 10.77.0.2, asn: 64500, localAsn: 64512}}\n",
        state.path().display()
    ));
    node.services(&[VIP4.to_owned()]);
    // Bound inside the node's network namespace, as a process of the node would.
    let socket = state.path().join("bird.ctl");
    let listener = {
        let socket = socket.clone();
        in_netns(&node.ns, move || {
            std::os::unix::net::UnixListener::bind(socket).expect("bind bird.ctl")
        })
    };
    let agent = node.start();
    let holder_named = || {
        agent
            .log()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains(" holds BIRD's control socket"))
    };
    assert!(
        wait_until(Duration::from_secs(10), holder_named),
        "{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains(&format!("pid {}) holds", std::process::id())),
        "the holder (this test, pid {}) is not named:\n{log}",
        std::process::id()
    );
    assert!(!log.contains("BIRD started"), "{log}");

    // Once it lets go, BIRD starts; the error was said once.
    drop(listener);
    std::fs::remove_file(&socket).expect("remove the socket file");
    agent.expect_log("BIRD started", Duration::from_secs(60));
    let log = agent.log();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains(" holds BIRD's control socket"))
            .count(),
        1,
        "{log}"
    );
    assert!(!log.contains("found another BIRD"), "{log}");
}

#[test]
fn replacing_a_full_address_map_frees_slots_first_and_keeps_every_kept_slot() {
    use lbagent::Entries;
    use lbagent_tests::testrun::Harness;

    let mut h = Harness::new();
    let capacity = lbagent_common::maps::MAX_VIPS - 1;
    let address = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0x6440_0000 + i));
    let state = |range: std::ops::Range<u32>| Entries {
        vips: range.map(|i| (address(i), Default::default())).collect(),
        ..Entries::default()
    };
    let full = state(0..capacity);
    let plan = lbagent::diff(&full, &h.sink().entries().expect("entries"));
    h.sink().write(&plan).expect("a full map");
    let slots = |h: &mut Harness| -> Vec<(IpAddr, u32)> {
        h.maps()
            .vips()
            .into_iter()
            .map(|(address, entry)| (address, entry.slot))
            .collect()
    };
    let before = slots(&mut h);
    assert_eq!(before.len(), capacity as usize);

    // A hundred go, a hundred new ones come: one write, no failure.
    let replaced = state(100..capacity + 100);
    let plan = lbagent::diff(&replaced, &h.sink().entries().expect("entries"));
    h.sink()
        .write(&plan)
        .expect("the leaving addresses free their slots before the new ones need them");
    assert_eq!(h.sink().entries().expect("entries"), replaced);
    // Every kept address kept its slot: it was never removed and added again.
    let after: std::collections::BTreeMap<IpAddr, u32> = slots(&mut h).into_iter().collect();
    for (address, slot) in before.into_iter().skip(100) {
        assert_eq!(after.get(&address), Some(&slot), "{address}");
    }
}

#[test]
fn a_full_address_map_is_logged_once_while_its_retries_go_on() {
    let capacity = lbagent_common::maps::MAX_VIPS - 1;
    let pair = Pair::new(&[]);
    // Addresses in a subnet of the node's are local: the dataplane serves them, and none has
    // to be put on kube-lb0 first.
    pair.node
        .ip(&["addr", "add", "10.96.0.1/16", "dev", "eth0"]);
    pair.node
        .ip(&["route", "add", "default", "via", Pair::CLIENT_V4]);
    let pins = PinRoot::new();
    let dir = TempDir::new("lbt-health-full");
    let addresses: Vec<String> = (0..=capacity)
        .map(|i| std::net::Ipv4Addr::from(0x0a60_4000 + i).to_string())
        .collect();
    dir.write(
        "services.yaml",
        &format!(
            "services:\n- {{name: web, addresses: [{}]}}\n",
            addresses.join(", ")
        ),
    );
    let status_path = dir.path().join("status.json");
    dir.write(
        "lbagent.yaml",
        &format!(
            "source: {{file: {{path: services.yaml}}}}\nstatus: {{path: {}}}\n\
             dataplane: {{pinRoot: {}}}\n",
            status_path.display(),
            pins.path().display()
        ),
    );
    let agent = Agent::start(
        &pair.node,
        &dir.path().join("lbagent.yaml"),
        dir.path().join("agent.log"),
    );
    let status = || -> serde_json::Value {
        std::fs::read_to_string(&status_path)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    };
    let failing = || {
        let status = status();
        status["errors"]
            .as_array()
            .is_some_and(|e| !e.is_empty())
            .then(|| status["reconciles"].as_u64().unwrap_or_default())
    };
    assert!(
        wait_until(Duration::from_secs(120), || failing().is_some()),
        "the address beyond the capacity never failed: {:#}\n{}",
        status(),
        agent.log()
    );
    let first = failing().unwrap_or_default();
    // Three retries later, with the same failure each time.
    assert!(
        wait_until(Duration::from_secs(60), || failing()
            .is_some_and(|n| n >= first + 3)),
        "{:#}",
        status()
    );
    let last = &addresses[capacity as usize];
    let log = agent.log();
    let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    assert_eq!(
        lines(&format!("LB address {last} not in the dataplane")),
        1,
        "{log}"
    );
    assert_eq!(lines("reconcile step failed"), 1, "{log}");
    assert_eq!(lines("ERROR"), 2, "{log}");
}
