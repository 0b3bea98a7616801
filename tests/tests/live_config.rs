//! Every edit of lbagent's config applies under the running agent, part by part: the source,
//! the addresses section, the dataplane, the HTTP address, the routing section. An edit that
//! cannot apply live, or is invalid, is refused whole with one line naming the field, and the
//! running state stays as it was (and `lbagent status` shows the refusal).

use std::{collections::BTreeSet, net::SocketAddr, time::Duration};

use lbagent_tests::{
    Agent, NetNs, Pair, PinRoot, TempDir, addresses_on, http_get, lbagent,
    routers::{BirdRouter, FRR_ROUTER, Fabric, Frr, next_hops},
    wait_until, xdp_on,
};

const V4: &str = "203.0.113.10";
const V4B: &str = "203.0.113.20";

/// A node running `lbagent run` from a services file, whose config the test rewrites.
struct Node {
    ns: NetNs,
    dir: TempDir,
    agent: Option<Agent>,
}

impl Node {
    /// Waits until the dataplane pinned under `pins` counts [`V4`]: its policy maps hold it.
    fn wait_counted(&self, pins: &PinRoot) {
        assert!(
            wait_until(Duration::from_secs(5), || lbagent(
                &self.ns,
                pins,
                &["counters", "-o", "json"]
            )
            .stdout
            .contains(V4)),
            "{}",
            self.log()
        );
    }

    /// `sections`: the config after `node`, `source` and `status`, each line ending in `\n`.
    fn start(ns: NetNs, sections: &str) -> Self {
        let dir = TempDir::new("lbt-live");
        dir.write("services.yaml", &services(&[V4]));
        dir.write("other.yaml", &services(&[V4B]));
        let node = Self {
            ns,
            dir,
            agent: None,
        };
        node.config("live-a", "services.yaml", sections);
        let agent = Agent::start(
            &node.ns,
            &node.dir.path().join("lbagent.yaml"),
            node.dir.path().join("agent.log"),
        );
        let node = Self {
            agent: Some(agent),
            ..node
        };
        node.expect("kube-lb0", &[V4]);
        node
    }

    fn config(&self, name: &str, services: &str, sections: &str) {
        self.dir.write(
            "lbagent.yaml",
            &format!(
                "node: {{name: {name}}}\nsource: {{file: {{path: {services}}}}}\nstatus: {{path: {}}}\n{sections}",
                self.dir.path().join("status.json").display()
            ),
        );
    }

    fn log(&self) -> String {
        self.agent.as_ref().map(Agent::log).unwrap_or_default()
    }

    fn status(&self) -> serde_json::Value {
        std::fs::read_to_string(self.dir.path().join("status.json"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    /// Waits for `interface` to hold exactly the /32s of `addresses`.
    fn expect(&self, interface: &str, addresses: &[&str]) {
        let expected: BTreeSet<String> = addresses.iter().map(|a| format!("{a}/32")).collect();
        assert!(
            wait_until(Duration::from_secs(10), || addresses_on(
                &self.ns, interface
            ) == expected),
            "{interface} holds {:?}, expected {expected:?}\n{}",
            addresses_on(&self.ns, interface),
            self.log()
        );
    }

    /// The agent is the one started first: nothing restarted it.
    fn still_running(&mut self) {
        let agent = self.agent.as_mut().expect("started");
        assert_eq!(agent.exited(), None, "lbagent exited:\n{}", agent.log());
    }

    /// Waits until each interface holds the program in the mode named (`Some("")`: in any
    /// mode) or, for `None`, holds none.
    fn wait_xdp(&self, wanted: &[(&str, Option<&str>)]) {
        let holds = || {
            wanted.iter().all(
                |(interface, mode)| match (xdp_on(&self.ns, interface), mode) {
                    (None, None) => true,
                    (Some(xdp), Some(mode)) => mode.is_empty() || xdp.mode == *mode,
                    _ => false,
                },
            )
        };
        assert!(
            wait_until(Duration::from_secs(10), holds),
            "wanted {wanted:?}, have {:?}\n{}",
            wanted
                .iter()
                .map(|(interface, _)| xdp_on(&self.ns, interface))
                .collect::<Vec<_>>(),
            self.log()
        );
    }

    fn link_exists(&self, name: &str) -> bool {
        self.ns
            .exec("ip", &["link", "show", "dev", name])
            .status
            .success()
    }
}

fn services(addresses: &[&str]) -> String {
    format!(
        "services:\n- {{name: web, addresses: [{}]}}\n",
        addresses.join(", ")
    )
}

#[test]
fn the_source_moves_to_another_file_and_the_kernel_follows() {
    let mut node = Node::start(NetNs::new("lbt-live"), "");
    node.config("live-a", "other.yaml", "");
    node.expect("kube-lb0", &[V4B]);
    // The new file is the one followed now, the old one no longer.
    node.dir
        .write("other.yaml", &services(&[V4B, "203.0.113.21"]));
    node.expect("kube-lb0", &[V4B, "203.0.113.21"]);
    node.dir
        .write("services.yaml", &services(&["203.0.113.99"]));
    std::thread::sleep(Duration::from_millis(300));
    node.expect("kube-lb0", &[V4B, "203.0.113.21"]);
    assert!(node.log().contains("source changed"), "{}", node.log());
    node.still_running();
}

#[test]
fn the_addresses_move_to_a_new_interface_and_the_old_one_is_deleted() {
    let mut node = Node::start(NetNs::new("lbt-live"), "");
    node.config(
        "live-a",
        "services.yaml",
        "addresses: {interface: lbnew0, resyncInterval: 5s}\n",
    );
    node.expect("lbnew0", &[V4]);
    assert!(
        wait_until(Duration::from_secs(10), || !node.link_exists("kube-lb0")),
        "the old interface stays:\n{}",
        node.log()
    );
    assert!(
        wait_until(Duration::from_secs(5), || node.status()["interface"]
            == "lbnew0"),
        "{:#}",
        node.status()
    );
    // The new interface is the one healed now.
    node.ns
        .ip(&["addr", "del", &format!("{V4}/32"), "dev", "lbnew0"]);
    node.expect("lbnew0", &[V4]);
    assert!(
        node.log().contains("addresses.resyncInterval changed"),
        "{}",
        node.log()
    );
    node.still_running();
}

#[test]
fn http_moves_to_the_new_address_and_goes_with_its_section() {
    let first: SocketAddr = "127.0.0.1:9701".parse().unwrap();
    let second: SocketAddr = "127.0.0.1:9702".parse().unwrap();
    let mut node = Node::start(
        NetNs::new("lbt-live"),
        &format!("http: {{address: \"{first}\"}}\n"),
    );
    let ready = |address| http_get(&node.ns, address, "/readyz").map(|(code, _)| code);
    assert!(
        wait_until(Duration::from_secs(5), || ready(first) == Some(200)),
        "{}",
        node.log()
    );
    node.config(
        "live-a",
        "services.yaml",
        &format!("http: {{address: \"{second}\"}}\n"),
    );
    assert!(
        wait_until(Duration::from_secs(5), || ready(second) == Some(200)
            && ready(first).is_none()),
        "first {:?}, second {:?}\n{}",
        ready(first),
        ready(second),
        node.log()
    );
    let metrics = http_get(&node.ns, second, "/metrics").expect("metrics");
    assert!(metrics.1.contains("lbagent_build_info"), "{}", metrics.1);
    node.config("live-a", "services.yaml", "");
    assert!(
        wait_until(Duration::from_secs(5), || ready(second).is_none()),
        "{}",
        node.log()
    );
    node.still_running();
}

#[test]
fn the_dataplane_is_attached_changed_moved_and_detached_live() {
    let pair = Pair::new(&[]);
    pair.node
        .ip(&["route", "add", "default", "via", Pair::CLIENT_V4]);
    let Pair {
        client: _client,
        node: ns,
    } = pair;
    let mut node = Node::start(ns, "");
    assert_eq!(xdp_on(&node.ns, "eth0"), None);
    let pins = PinRoot::new();
    let moved = PinRoot::new();
    let dataplane = |pins: &PinRoot, mode: &str| {
        format!(
            "dataplane: {{interfaces: [eth0], mode: {mode}, pinRoot: {}}}\n",
            pins.path().display()
        )
    };

    node.config("live-a", "services.yaml", &dataplane(&pins, "driver"));
    node.wait_xdp(&[("eth0", Some("driver"))]);
    // The policy maps are filled: the address is in the dataplane.
    node.wait_counted(&pins);

    node.config("live-a", "services.yaml", &dataplane(&pins, "generic"));
    node.wait_xdp(&[("eth0", Some("generic"))]);

    // Another interface joins the list, then leaves it: the program follows the list.
    node.ns.ip(&[
        "link", "add", "lbx0", "type", "veth", "peer", "name", "lby0",
    ]);
    node.ns.ip(&["link", "set", "lbx0", "up"]);
    node.ns.ip(&["link", "set", "lby0", "up"]);
    node.config(
        "live-a",
        "services.yaml",
        &format!(
            "dataplane: {{interfaces: [eth0, lbx0], mode: generic, pinRoot: {}}}\n",
            pins.path().display()
        ),
    );
    node.wait_xdp(&[("lbx0", Some("")), ("eth0", Some(""))]);
    node.config("live-a", "services.yaml", &dataplane(&pins, "generic"));
    node.wait_xdp(&[("lbx0", None), ("eth0", Some(""))]);

    node.config("live-a", "services.yaml", &dataplane(&moved, "generic"));
    assert!(
        wait_until(Duration::from_secs(10), || pins.pinned_files().is_empty()
            && !moved.pinned_files().is_empty()
            && xdp_on(&node.ns, "eth0").is_some()),
        "old pins {:?}, new pins {:?}\n{}",
        pins.pinned_files(),
        moved.pinned_files(),
        node.log()
    );
    node.wait_counted(&moved);

    node.config("live-a", "services.yaml", "");
    assert!(
        wait_until(Duration::from_secs(10), || xdp_on(&node.ns, "eth0")
            .is_none()
            && moved.pinned_files().is_empty()),
        "{:?} {:?}\n{}",
        xdp_on(&node.ns, "eth0"),
        moved.pinned_files(),
        node.log()
    );
    node.expect("kube-lb0", &[V4]);
    node.still_running();
}

const BGP: &str = "  bgp:
    - {name: up4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, holdTime: 9s, keepaliveTime: 1s, connectRetryTime: 1s, connectDelayTime: 1s}
";

#[test]
fn routing_is_added_restarted_elsewhere_and_removed_live() {
    let fabric = Fabric::new(1);
    let _frr = Frr::start(&fabric.router, FRR_ROUTER, true);
    let Fabric { router, mut nodes } = fabric;
    let mut node = Node::start(nodes.remove(0), "");
    let prefix = format!("{V4}/32");
    let routing = |dir: &str| {
        format!(
            "routing:\n  stateDir: {}\n{BGP}",
            node.dir.path().join(dir).display()
        )
    };
    let hops = |expected: usize| {
        wait_until(Duration::from_secs(30), || {
            next_hops(&router, &prefix).len() == expected
        })
    };
    assert!(next_hops(&router, &prefix).is_empty());

    node.config("live-a", "services.yaml", &routing("bird"));
    assert!(
        hops(1),
        "the router never learned {prefix}:\n{}",
        node.log()
    );
    assert!(node.dir.path().join("bird/bird.pid").exists());

    // Its paths changed: the BIRD of the old directory stops, one in the new one starts.
    node.config("live-a", "services.yaml", &routing("bird2"));
    assert!(
        wait_until(
            Duration::from_secs(30),
            || node.status()["routing"]["protocols"]
                .as_array()
                .is_some_and(|rows| rows
                    .iter()
                    .any(|row| row["name"] == "up4" && row["info"] == "Established"))
                && node.dir.path().join("bird2/bird.ctl").exists()
        ),
        "{:#}\n{}",
        node.status(),
        node.log()
    );
    assert_eq!(node.ns.processes("bird").len(), 1, "{}", node.log());
    assert!(hops(1), "{}", node.log());

    // Gone from the config: BIRD shuts down, and the router withdraws the route at once.
    node.config("live-a", "services.yaml", "");
    assert!(hops(0), "the router kept {prefix}:\n{}", node.log());
    assert!(
        wait_until(Duration::from_secs(10), || node
            .ns
            .processes("bird")
            .is_empty()),
        "{}",
        node.log()
    );
    node.expect("kube-lb0", &[V4]);
    node.still_running();
}

/// `routing.mode` changed from managed to external: lbagent's own BIRD stops, and the
/// operator's BIRD takes the sessions from the file lbagent now writes for it.
#[test]
fn routing_moves_from_its_own_bird_to_the_operators_live() {
    let fabric = Fabric::new(1);
    let _frr = Frr::start(&fabric.router, FRR_ROUTER, true);
    let Fabric { router, mut nodes } = fabric;
    let mut node = Node::start(nodes.remove(0), "");
    let prefix = format!("{V4}/32");
    node.config(
        "live-a",
        "services.yaml",
        &format!(
            "routing:\n  stateDir: {}\n{BGP}",
            node.dir.path().join("bird").display()
        ),
    );
    assert!(
        wait_until(Duration::from_secs(30), || next_hops(&router, &prefix)
            .len()
            == 1),
        "the router never learned {prefix}:\n{}",
        node.log()
    );
    let own = node.ns.processes("bird");
    assert_eq!(own.len(), 1, "{}", node.log());

    // The operator's BIRD (as a CNI would run it), including the file lbagent is to write.
    let include = node.dir.path().join("operator-lbagent.conf");
    std::fs::write(&include, "").unwrap();
    let operator = BirdRouter::start(
        &node.ns,
        &format!(
            "log stderr all;\nrouter id {};\nprotocol device {{ scan time 2; }}\ninclude \"{}\";\n",
            Fabric::node_v4(1),
            include.display()
        ),
    );
    let socket = operator.socket().display().to_string();
    node.config(
        "live-a",
        "services.yaml",
        &format!(
            "routing:\n  mode: external\n  include: {}\n  socket: {socket}\n{BGP}",
            include.display()
        ),
    );
    let established = || {
        let output = node
            .ns
            .exec("birdc", &["-s", &socket, "show", "protocols", "up4"]);
        String::from_utf8_lossy(&output.stdout).contains("Established")
    };
    assert!(
        wait_until(Duration::from_secs(30), established),
        "the operator's BIRD never established up4:\n{}\n{}",
        node.log(),
        operator.log()
    );
    let written = std::fs::read_to_string(&include).unwrap();
    assert!(written.contains("protocol bgp up4"), "{written}");
    // lbagent's own BIRD is gone; the operator's is the only one left.
    assert!(
        wait_until(Duration::from_secs(10), || !node
            .ns
            .processes("bird")
            .iter()
            .any(|pid| own.contains(pid))),
        "{}",
        node.log()
    );
    assert!(
        wait_until(Duration::from_secs(30), || next_hops(&router, &prefix)
            .len()
            == 1),
        "{}\n{}",
        node.log(),
        operator.log()
    );
    node.still_running();
}

#[test]
fn an_edit_that_cannot_apply_live_is_refused_whole_and_shown_in_status() {
    let mut node = Node::start(NetNs::new("lbt-live"), "");
    let refused = |needle: &str| {
        wait_until(Duration::from_secs(5), || {
            node.status()["configRefused"]
                .as_str()
                .is_some_and(|why| why.contains(needle))
        })
    };

    // A new node name with a new source: the name cannot change live, so neither applies.
    node.config("live-b", "other.yaml", "");
    assert!(
        refused("node.name: \"live-b\""),
        "{:#}\n{}",
        node.status(),
        node.log()
    );
    let lines: Vec<String> = node
        .log()
        .lines()
        .filter(|line| line.contains("node.name"))
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].contains("restart lbagent to apply it; keeping the running config"),
        "{lines:?}"
    );
    node.expect("kube-lb0", &[V4]);
    assert_eq!(node.status()["node"], "live-a");

    // An invalid routing section, which lbagent's own check rejects: shown as well.
    node.config(
        "live-a",
        "other.yaml",
        "routing:\n  bgp:\n    - {neighbor: 10.0.0.1, asn: 0, localAsn: 64512}\n",
    );
    assert!(
        refused("routing.bgp[0].asn: 0 is not allowed"),
        "{:#}\n{}",
        node.status(),
        node.log()
    );
    node.expect("kube-lb0", &[V4]);
    let pins = PinRoot::new();
    let status_file = node.dir.path().join("status.json");
    let table = lbagent(
        &node.ns,
        &pins,
        &["status", "--status-file", status_file.to_str().unwrap()],
    )
    .assert_ok()
    .stdout;
    assert!(
        table.contains("config edit refused, the previous config runs: ")
            && table.contains("routing.bgp[0].asn"),
        "{table}"
    );

    // A valid edit applies, and the refusal is gone.
    node.config("live-a", "other.yaml", "");
    node.expect("kube-lb0", &[V4B]);
    assert!(
        wait_until(Duration::from_secs(5), || node.status()["configRefused"]
            .is_null()),
        "{:#}",
        node.status()
    );
    node.still_running();
}

#[test]
fn the_kubernetes_source_follows_a_new_load_balancer_class() {
    use serde_json::json;
    let ns = NetNs::new("lbt-live-kube");
    ns.ip(&["link", "set", "lo", "up"]);
    let server = lbagent_tests::apiserver::ApiServer::start_in(&ns);
    server.apply(json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "live-a", "labels": {}},
    }));
    let service = |name: &str, ip: &str, class: Option<&str>| {
        let mut spec = json!({
            "type": "LoadBalancer",
            "ipFamilies": ["IPv4"],
            "externalTrafficPolicy": "Cluster",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        });
        if let Some(class) = class {
            spec["loadBalancerClass"] = class.into();
        }
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": spec,
            "status": {"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]}},
        })
    };
    server.apply(service("plain", V4, None));
    server.apply(service("classed", V4B, Some("example.com/lb")));

    let dir = TempDir::new("lbt-live-kube");
    server.write_kubeconfig(&dir.path().join("kubeconfig"));
    let write = |source: &str| {
        dir.write(
            "lbagent.yaml",
            &format!(
                "node: {{name: live-a}}\nsource: {{kubernetes: {source}}}\nstatus: {{path: {}}}\n",
                dir.path().join("status.json").display()
            ),
        )
    };
    let config = write("{kubeconfig: kubeconfig}");
    let mut agent = Agent::start(&ns, &config, dir.path().join("agent.log"));
    let held = |expected: &[&str]| {
        let expected: BTreeSet<String> = expected.iter().map(|a| format!("{a}/32")).collect();
        wait_until(Duration::from_secs(10), || {
            addresses_on(&ns, "kube-lb0") == expected
        })
    };
    assert!(
        held(&[V4]),
        "{:?}\n{}",
        addresses_on(&ns, "kube-lb0"),
        agent.log()
    );

    write("{loadBalancerClass: example.com/lb, kubeconfig: kubeconfig}");
    assert!(
        held(&[V4B]),
        "{:?}\n{}",
        addresses_on(&ns, "kube-lb0"),
        agent.log()
    );
    // The new class is the one watched now.
    server.apply(service(
        "classed-too",
        "203.0.113.21",
        Some("example.com/lb"),
    ));
    server.apply(service("plain-too", "203.0.113.99", None));
    assert!(
        held(&[V4B, "203.0.113.21"]),
        "{:?}\n{}",
        addresses_on(&ns, "kube-lb0"),
        agent.log()
    );
    assert_eq!(agent.exited(), None, "{}", agent.log());
}
