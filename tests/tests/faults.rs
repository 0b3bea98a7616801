//! What an unlucky or hostile operator does to a running agent: kube-lb0 renamed, addresses
//! on interfaces that make nothing local, the services file's directory removed or replaced,
//! a file changed where inotify cannot see it. The agent must keep serving what the file says.

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use lbagent_tests::{Agent, NetNs, TempDir, addresses_on, wait_until};

const V4: &str = "203.0.113.10";
const V6: &str = "2001:db8:ff::10";
/// Far above what a heal or a file change takes (milliseconds).
const PROMPTLY: Duration = Duration::from_secs(5);

/// A node namespace with an eth0 on 10.77.0.0/24 and the services file at `services_path`
/// (relative to the config's directory).
struct Node {
    ns: NetNs,
    dir: TempDir,
}

impl Node {
    fn new(services_path: &str) -> Self {
        let ns = NetNs::with_eth0("lbt-fault", "10.77.0.1/24");
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.accept_dad=0"]);
        let dir = TempDir::new("lbt-fault");
        dir.write(
            "lbagent.yaml",
            &format!(
                "node: {{name: test-node}}\nsource: {{file: {{path: {services_path}}}}}\naddresses: {{resyncInterval: 1h}}\nstatus: {{path: {}}}\n",
                dir.path().join("status.json").display()
            ),
        );
        Self { ns, dir }
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    fn start(&self) -> Agent {
        Agent::start(
            &self.ns,
            &self.path("lbagent.yaml"),
            self.path(&lbagent_tests::unique_name("agent.log")),
        )
    }

    /// Waits for kube-lb0 to hold exactly `expected`.
    fn expect(&self, expected: &[&str], agent: &Agent, what: &str) {
        let expected: BTreeSet<String> = expected.iter().map(|s| (*s).to_owned()).collect();
        assert!(
            wait_until(PROMPTLY, || addresses_on(&self.ns, "kube-lb0") == expected),
            "{what}: kube-lb0 holds {:?}, expected {expected:?}\nlog:\n{}",
            addresses_on(&self.ns, "kube-lb0"),
            agent.log()
        );
    }

    /// Each address's state in the status file.
    fn states(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(self.path("status.json")).unwrap_or_default();
        let status: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        status["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                (
                    a["address"].as_str().unwrap_or_default().to_owned(),
                    a["state"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    fn link_exists(&self, name: &str) -> bool {
        self.ns
            .exec("ip", &["link", "show", "dev", name])
            .status
            .success()
    }
}

/// Writes `path` as tools that update files safely do: a complete file renamed over it.
fn write(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

fn services(addresses: &[&str]) -> String {
    format!(
        "services:\n- {{name: web, addresses: [{}], ports: [{{port: 80}}]}}\n",
        addresses.join(", ")
    )
}

fn host(address: &str) -> String {
    if address.contains(':') {
        format!("{address}/128")
    } else {
        format!("{address}/32")
    }
}

#[test]
fn renaming_kube_lb0_withdraws_nothing_and_the_renamed_interface_is_cleaned_up() {
    let node = Node::new("services.yaml");
    // Two addresses that used to count as local: one a host address on eth0 (a host route
    // is not a subnet), one inside the subnet of an interface that is down (an address on a
    // down interface makes nothing local).
    node.ns
        .ip(&["addr", "add", "203.0.113.12/32", "dev", "eth0"]);
    node.ns.ip(&[
        "link", "add", "eth1", "type", "veth", "peer", "name", "eth1peer",
    ]);
    node.ns.ip(&["addr", "add", "10.88.0.1/24", "dev", "eth1"]);
    let wanted = [V4, V6, "203.0.113.12", "10.88.0.50"];
    node.dir.write("services.yaml", &services(&wanted));
    let hosts: Vec<String> = wanted.iter().map(|a| host(a)).collect();
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let agent = node.start();
    node.expect(&hosts, &agent, "at start");

    node.ns.ip(&["link", "set", "kube-lb0", "down"]);
    node.ns.ip(&["link", "set", "kube-lb0", "name", "kube-old"]);
    node.expect(&hosts, &agent, "after kube-lb0 was renamed kube-old");
    assert!(
        wait_until(PROMPTLY, || !node.link_exists("kube-old")),
        "the renamed interface is still there\n{}",
        agent.log()
    );
    assert!(
        wait_until(PROMPTLY, || {
            let states = node.states();
            states.len() == wanted.len() && states.iter().all(|(_, state)| state == "virtual")
        }),
        "every address is virtual: {:?}\n{}",
        node.states(),
        agent.log()
    );
    // Renamed while up, too.
    node.ns
        .ip(&["link", "set", "kube-lb0", "name", "kube-old2"]);
    node.expect(&hosts, &agent, "after kube-lb0 was renamed kube-old2");
    assert!(
        wait_until(PROMPTLY, || !node.link_exists("kube-old2")),
        "{}",
        agent.log()
    );
}

#[test]
fn the_services_file_is_followed_when_its_directory_is_removed_or_replaced() {
    let node = Node::new("svc/services.yaml");
    let svc = node.path("svc");
    std::fs::create_dir(&svc).unwrap();
    write(&node.path("svc/services.yaml"), &services(&["203.0.113.1"]));
    let agent = node.start();
    node.expect(&["203.0.113.1/32"], &agent, "at start");

    // rm -rf svc; mkdir svc; a new services.yaml.
    std::fs::remove_dir_all(&svc).unwrap();
    std::fs::create_dir(&svc).unwrap();
    write(&node.path("svc/services.yaml"), &services(&["203.0.113.2"]));
    node.expect(&["203.0.113.2/32"], &agent, "after rm -rf and mkdir");

    // mv svc svc.old; mkdir svc; a new services.yaml.
    std::fs::rename(&svc, node.path("svc.old")).unwrap();
    std::fs::create_dir(&svc).unwrap();
    write(&node.path("svc/services.yaml"), &services(&["203.0.113.3"]));
    node.expect(&["203.0.113.3/32"], &agent, "after mv and mkdir");

    // The file in the directory moved away is no longer the services file; the new one is.
    write(
        &node.path("svc.old/services.yaml"),
        &services(&["203.0.113.9"]),
    );
    write(&node.path("svc/services.yaml"), &services(&["203.0.113.4"]));
    node.expect(&["203.0.113.4/32"], &agent, "after writing both");

    // The whole tree above it goes and comes back: rm -rf svc; (nothing for a while); mkdir.
    std::fs::remove_dir_all(&svc).unwrap();
    std::fs::create_dir(&svc).unwrap();
    write(&node.path("svc/services.yaml"), &services(&["203.0.113.5"]));
    node.expect(&["203.0.113.5/32"], &agent, "after a second rm -rf");
}

#[test]
fn sighup_rereads_the_services_file() {
    // In a directory of its own: the agent's status file, written beside it, would wake its
    // watch.
    let node = Node::new("svc/services.yaml");
    std::fs::create_dir(node.path("svc")).unwrap();
    // The services file is a second name of a file elsewhere: a write through that other
    // name tells no watch on the services file's directory.
    let elsewhere = TempDir::new("lbt-fault-elsewhere");
    let original = elsewhere.write("services.yaml", &services(&["203.0.113.1"]));
    std::fs::hard_link(&original, node.path("svc/services.yaml")).unwrap();
    let agent = node.start();
    node.expect(&["203.0.113.1/32"], &agent, "at start");

    // Rewritten in place (same inode), through the other name.
    std::fs::write(&original, services(&["203.0.113.2"])).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    node.expect(&["203.0.113.2/32"], &agent, "after SIGHUP");
}
