//! `lbagent run` with the file source, in a network namespace: the real binary keeps
//! kube-lb0 as the services file says, heals tampering, and restarts without churn.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use lbagent_tests::{Agent, Monitor, NetNs, TempDir, addresses_on, run, run_ok, wait_until};

const V4: &str = "203.0.113.10";
const V6: &str = "2001:db8:ff::10";

/// A node namespace with an eth0 on 10.77.0.0/24, a config and a services file.
struct Node {
    ns: NetNs,
    dir: TempDir,
}

impl Node {
    fn new() -> Self {
        let ns = NetNs::with_eth0("lbt-addr", "10.77.0.1/24");
        let dir = TempDir::new("lbt-addr");
        let node = Self { ns, dir };
        node.write_config("services.yaml", "");
        node
    }

    fn write_config(&self, services_path: &str, extra: &str) -> PathBuf {
        self.dir.write(
            "lbagent.yaml",
            &format!(
                "node: {{name: test-node}}\nsource: {{file: {{path: {services_path}}}}}\naddresses: {{resyncInterval: 2s}}\nstatus: {{path: {}}}\n{extra}",
                self.status_path().display()
            ),
        )
    }

    fn status_path(&self) -> PathBuf {
        self.dir.path().join("status.json")
    }

    fn services(&self, yaml: &str) {
        self.dir.write("services.yaml", yaml);
    }

    fn start(&self) -> Agent {
        Agent::start(
            &self.ns,
            &self.dir.path().join("lbagent.yaml"),
            self.dir
                .path()
                .join(lbagent_tests::unique_name("agent.log")),
        )
    }

    fn kube_lb0(&self) -> BTreeSet<String> {
        addresses_on(&self.ns, "kube-lb0")
    }

    /// Waits (up to 2 s) for kube-lb0 to hold exactly `expected`.
    fn expect(&self, expected: &[&str], agent: &Agent) {
        let expected: BTreeSet<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        assert!(
            wait_until(Duration::from_secs(2), || self.kube_lb0() == expected),
            "kube-lb0 holds {:?}, expected {expected:?}\nlog:\n{}",
            self.kube_lb0(),
            agent.log()
        );
    }

    /// The status file, once written: the first reconcile writes it after its log lines.
    fn status(&self) -> serde_json::Value {
        let mut status = None;
        wait_until(Duration::from_secs(2), || {
            status = std::fs::read_to_string(self.status_path())
                .ok()
                .and_then(|text| serde_json::from_str(&text).ok());
            status.is_some()
        });
        status.expect("status file")
    }

    /// The services the status file names for `address` (empty if it names no such address).
    fn services_of(&self, address: &str) -> Vec<String> {
        let status = std::fs::read_to_string(self.status_path())
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .unwrap_or_default();
        status["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["address"] == address)
            .flat_map(|a| a["services"].as_array().cloned().unwrap_or_default())
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    }

    fn reconciles(&self) -> u64 {
        std::fs::read_to_string(self.status_path())
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|s| s["reconciles"].as_u64())
            .unwrap_or(0)
    }
}

#[test]
fn services_added_changed_and_removed_follow_the_file() {
    let node = Node::new();
    node.services(&format!(
        "services:\n- {{name: web, addresses: [{V4}, {V6}], ports: [{{port: 80}}]}}\n"
    ));
    let agent = node.start();
    node.expect(&[&format!("{V4}/32"), &format!("{V6}/128")], &agent);
    let kind = run_ok(
        "ip",
        &["-n", node.ns.name(), "-d", "-j", "link", "show", "kube-lb0"],
    );
    assert!(kind.contains("\"UP\""), "kube-lb0 is up: {kind}");
    // A VIP is a host: the kernel gets a local route for it and nothing else.
    let local_table = run_ok(
        "ip",
        &[
            "-n",
            node.ns.name(),
            "route",
            "show",
            "table",
            "local",
            "dev",
            "kube-lb0",
        ],
    );
    let vip_routes: Vec<&str> = local_table.lines().filter(|l| l.contains(V4)).collect();
    assert_eq!(vip_routes.len(), 1, "{local_table}");
    assert!(
        vip_routes[0].starts_with(&format!("local {V4} ")),
        "{local_table}"
    );

    // Change: the v6 address goes, a new v4 address comes.
    node.services("services:\n- {name: web, addresses: [203.0.113.10, 203.0.113.11]}\n");
    node.expect(&["203.0.113.10/32", "203.0.113.11/32"], &agent);

    // Remove every service: the addresses go, the interface stays.
    node.services("services: []\n");
    node.expect(&[], &agent);
    assert!(run_ok("ip", &["-n", node.ns.name(), "link", "show", "kube-lb0"]).contains("kube-lb0"));
    // Addresses that are not lbagent's, on other interfaces, are untouched.
    assert_eq!(
        addresses_on(&node.ns, "eth0"),
        BTreeSet::from(["10.77.0.1/24".to_owned()])
    );
}

#[test]
fn a_shared_address_stays_until_its_last_service_goes() {
    let node = Node::new();
    node.services(&format!(
        "services:\n- {{name: web, addresses: [{V4}]}}\n- {{name: api, addresses: [{V4}, {V6}]}}\n"
    ));
    let agent = node.start();
    node.expect(&[&format!("{V4}/32"), &format!("{V6}/128")], &agent);

    node.services(&format!(
        "services:\n- {{name: api, addresses: [{V4}, {V6}]}}\n"
    ));
    // Once the agent has applied the file without web, the shared address is still there.
    assert!(
        wait_until(Duration::from_secs(2), || node.services_of(V4) == ["api"]),
        "{}",
        agent.log()
    );
    assert_eq!(
        node.kube_lb0(),
        BTreeSet::from([format!("{V4}/32"), format!("{V6}/128")])
    );

    node.services(&format!("services:\n- {{name: web, addresses: [{V4}]}}\n"));
    node.expect(&[&format!("{V4}/32")], &agent);
    node.services("services: []\n");
    node.expect(&[], &agent);
}

#[test]
fn tampering_is_repaired_within_a_second_with_a_log_line() {
    let node = Node::new();
    node.services(&format!(
        "services:\n- {{name: web, addresses: [{V4}, {V6}]}}\n"
    ));
    let agent = node.start();
    let both = [format!("{V4}/32"), format!("{V6}/128")];
    let both: Vec<&str> = both.iter().map(String::as_str).collect();
    node.expect(&both, &agent);
    let ns = node.ns.name();
    let healed = |what: &str| {
        let expected: BTreeSet<String> = both.iter().map(|s| (*s).to_owned()).collect();
        assert!(
            wait_until(Duration::from_secs(1), || node.kube_lb0() == expected
                && run_ok("ip", &["-n", ns, "link", "show", "kube-lb0"])
                    .contains(",UP")),
            "not healed within 1 s after {what}: {:?}\n{}",
            node.kube_lb0(),
            agent.log()
        );
    };

    run_ok(
        "ip",
        &[
            "-n",
            ns,
            "addr",
            "del",
            &format!("{V4}/32"),
            "dev",
            "kube-lb0",
        ],
    );
    healed("deleting an address");
    run_ok(
        "ip",
        &[
            "-n",
            ns,
            "addr",
            "add",
            "198.51.100.1/32",
            "dev",
            "kube-lb0",
        ],
    );
    healed("adding a stray address");
    run_ok("ip", &["-n", ns, "link", "del", "kube-lb0"]);
    healed("deleting kube-lb0");
    run_ok("ip", &["-n", ns, "link", "set", "kube-lb0", "down"]);
    healed("setting kube-lb0 down");

    let log = agent.log();
    for line in [
        &format!("repairing: {V4}/32 was removed from kube-lb0 outside lbagent"),
        "repairing: 198.51.100.1/32 was added to kube-lb0 outside lbagent",
        "repairing: kube-lb0 was deleted outside lbagent",
        "repairing: kube-lb0 was set down outside lbagent",
    ] {
        assert!(log.contains(line), "no {line:?} in\n{log}");
    }
}

#[test]
fn a_configmap_symlink_swap_is_followed() {
    let node = Node::new();
    let dir = node.dir.path();
    std::fs::create_dir(dir.join("..v1")).unwrap();
    std::fs::create_dir(dir.join("..v2")).unwrap();
    std::fs::write(
        dir.join("..v1/services.yaml"),
        format!("services: [{{name: a, addresses: [{V4}]}}]"),
    )
    .unwrap();
    std::fs::write(
        dir.join("..v2/services.yaml"),
        format!("services: [{{name: a, addresses: [{V6}]}}]"),
    )
    .unwrap();
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/services.yaml", dir.join("projected.yaml")).unwrap();
    node.write_config("projected.yaml", "");
    let agent = node.start();
    node.expect(&[&format!("{V4}/32")], &agent);

    std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    node.expect(&[&format!("{V6}/128")], &agent);
}

#[test]
fn a_broken_services_file_keeps_the_last_good_state_and_bad_entries_are_skipped() {
    let node = Node::new();
    node.services(&format!("services:\n- {{name: web, addresses: [{V4}]}}\n"));
    let agent = node.start();
    node.expect(&[&format!("{V4}/32")], &agent);

    node.services("services: [ {name: web, addresses: [");
    agent.expect_log("keeping the last good state", Duration::from_secs(2));
    // Decided: the last good state stays.
    assert_eq!(node.kube_lb0(), BTreeSet::from([format!("{V4}/32")]));

    // One bad entry among good ones: it alone is skipped, named with its value.
    node.services(&format!(
        "services:\n- {{name: web, addresses: [{V4}]}}\n- {{name: typo, addresses: [203.0.113.999]}}\n- {{name: net, addresses: [203.0.113.0/24]}}\n- {{name: web, addresses: [203.0.113.12]}}\n- {{name: api, addresses: [{V6}]}}\n"
    ));
    node.expect(&[&format!("{V4}/32"), &format!("{V6}/128")], &agent);
    let log = agent.log();
    for needle in [
        "\"typo\": addresses[0]: invalid address \"203.0.113.999\"",
        "\"net\": addresses[0]: invalid address \"203.0.113.0/24\": a load-balancer address is a single host",
        "name \"web\" is used by an earlier entry",
    ] {
        assert!(log.contains(needle), "no {needle:?} in\n{log}");
    }
    assert!(wait_until(Duration::from_secs(1), || {
        node.status()["rejected"]
            .as_array()
            .is_some_and(|r| r.len() == 3)
    }));
}

#[test]
fn ipv6_on_a_node_without_ipv6_is_skipped_and_ipv4_still_served() {
    let node = Node::new();
    node.ns
        .exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    node.services(&format!(
        "services:\n- {{name: web, addresses: [{V4}, {V6}]}}\n"
    ));
    let agent = node.start();
    node.expect(&[&format!("{V4}/32")], &agent);
    agent.expect_log(
        "IPv6 address skipped: this node has no IPv6",
        Duration::from_secs(1),
    );
    let status = node.status();
    let v6 = status["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["address"] == V6)
        .expect("v6 in status");
    assert_eq!(v6["state"], "unsupported");
}

#[test]
fn addresses_in_a_node_subnet_are_local_and_reported_not_added() {
    let node = Node::new();
    node.services(&format!(
        "services:\n- {{name: web, addresses: [{V4}, 10.77.0.50]}}\n"
    ));
    let agent = node.start();
    node.expect(&[&format!("{V4}/32")], &agent);
    assert!(wait_until(Duration::from_secs(1), || agent
        .log()
        .contains("local address")));
    let status = run_ok(
        lbagent_tests::lbagent_bin().to_str().unwrap(),
        &[
            "status",
            "--status-file",
            node.status_path().to_str().unwrap(),
        ],
    );
    let line = status
        .lines()
        .find(|l| l.starts_with("10.77.0.50"))
        .expect("local row");
    assert!(
        line.contains("local (10.77.0.0/24)") && line.contains("web"),
        "{status}"
    );
}

#[test]
fn a_restart_with_the_same_config_changes_nothing_in_the_kernel() {
    let node = Node::new();
    let many: Vec<String> = (1..=50).map(|i| format!("203.0.113.{i}")).collect();
    node.services(&format!(
        "services:\n- {{name: web, addresses: [{}, {V6}]}}\n",
        many.join(", ")
    ));
    let agent = node.start();
    let mut expected: Vec<String> = many.iter().map(|a| format!("{a}/32")).collect();
    expected.push(format!("{V6}/128"));
    let expected_refs: Vec<&str> = expected.iter().map(String::as_str).collect();
    node.expect(&expected_refs, &agent);
    assert!(wait_until(Duration::from_secs(1), || node.reconciles() >= 1));

    let monitor = Monitor::start(&node.ns);
    let status = agent.stop();
    assert!(status.success(), "SIGTERM exit: {status}");
    // SIGTERM leaves the addresses in place.
    assert_eq!(node.kube_lb0().len(), 51);
    std::fs::remove_file(node.status_path()).unwrap();
    let agent = node.start();
    assert!(
        wait_until(Duration::from_secs(3), || node.reconciles() >= 1),
        "the new agent did not reconcile:\n{}",
        agent.log()
    );
    // Everything up to now: the monitor prints all it saw before it stops.
    let events = monitor.stop();
    assert!(
        events.is_empty(),
        "the restart changed the kernel: {events:#?}"
    );
    assert_eq!(node.kube_lb0().len(), 51);
}

#[test]
fn cleanup_removes_the_interface_and_the_status_file() {
    let node = Node::new();
    node.services(&format!("services:\n- {{name: web, addresses: [{V4}]}}\n"));
    let agent = node.start();
    node.expect(&[&format!("{V4}/32")], &agent);
    assert!(agent.stop().success());
    let config = node.dir.path().join("lbagent.yaml");
    assert!(lbagent_tests::lbagent_cleanup(&node.ns, &config).contains("kube-lb0: deleted"));
    assert!(
        !run("ip", &["-n", node.ns.name(), "link", "show", "kube-lb0"])
            .status
            .success()
    );
    assert!(!node.status_path().exists());
    assert_eq!(
        addresses_on(&node.ns, "eth0"),
        BTreeSet::from(["10.77.0.1/24".to_owned()])
    );
}

#[test]
fn a_bad_config_file_stops_the_start_with_one_line_naming_the_field() {
    let node = Node::new();
    node.write_config("services.yaml", "log: {format: xml}\n");
    let mut agent = node.start();
    assert!(wait_until(Duration::from_secs(3), || agent
        .exited()
        .is_some()));
    let status = agent.exited().unwrap();
    assert!(!status.success());
    let log = agent.log();
    assert_eq!(log.lines().count(), 1, "{log}");
    assert!(
        log.contains("log.format: \"xml\" is not allowed (human or json)"),
        "{log}"
    );
    assert!(
        !run("ip", &["-n", node.ns.name(), "link", "show", "kube-lb0"])
            .status
            .success()
    );
}
