//! Routing for real racks, with real BIRD and FRR in namespaces: one config for every node,
//! whose labels choose the rack router it peers with; a gateway neighbour that follows the
//! node's default route; the export ceiling.

use std::time::Duration;

use lbagent_tests::{
    Agent, NetNs, TempDir, http_get, metric,
    routers::{FRR_ROUTER, Fabric, Frr, Racks, frr_rack_router, next_hops},
    wait_until,
};

const V4: &str = "203.0.113.10";
const V6: &str = "2001:db8:ff::10";
/// Inside each node's namespace, so every node can use the same.
const METRICS: &str = "127.0.0.1:9658";
const TIMERS: &str = "holdTime: 9s, keepaliveTime: 1s, connectRetryTime: 1s, connectDelayTime: 1s";

/// `lbagent run` with the file source: its services, its `node.labels` and a `routing:` body.
struct Node {
    dir: TempDir,
    agent: Option<Agent>,
}

impl Node {
    fn start(ns: &NetNs, services: &str, labels: &str, routing: &str) -> Self {
        let dir = TempDir::new("lbt-rack");
        let mut node = Self { dir, agent: None };
        node.dir.write("services.yaml", services);
        node.write_config(labels, routing);
        node.agent = Some(Agent::start(
            ns,
            &node.dir.path().join("lbagent.yaml"),
            node.dir.path().join("agent.log"),
        ));
        node
    }

    fn write_config(&self, labels: &str, routing: &str) {
        self.dir.write(
            "lbagent.yaml",
            &format!(
                "node: {{labels: {labels}}}\nsource: {{file: {{path: services.yaml}}}}\n\
                 status: {{path: {}}}\nhttp: {{address: \"{METRICS}\"}}\n\
                 routing:\n  stateDir: {}\n{routing}",
                self.dir.path().join("status.json").display(),
                self.dir.path().join("bird").display()
            ),
        );
    }

    fn log(&self) -> String {
        self.agent.as_ref().map(Agent::log).unwrap_or_default()
    }

    fn routing(&self) -> serde_json::Value {
        std::fs::read_to_string(self.dir.path().join("status.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .map(|status| status["routing"].clone())
            .unwrap_or_default()
    }

    /// The names of the BGP protocols BIRD runs, as lbagent last read them.
    fn sessions(&self) -> Vec<String> {
        let mut names: Vec<String> = self.routing()["protocols"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|row| row["proto"] == "BGP")
            .filter_map(|row| row["name"].as_str().map(str::to_owned))
            .collect();
        names.sort();
        names
    }

    fn established(&self, name: &str) -> bool {
        self.routing()["protocols"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|row| row["name"] == name && row["info"] == "Established")
    }
}

fn services(addresses: &[&str]) -> String {
    format!(
        "services:\n- {{name: web, addresses: [{}]}}\n",
        addresses.join(", ")
    )
}

fn wait_hops(
    router: &NetNs,
    prefix: &str,
    expected: &[String],
    what: &str,
    logs: impl Fn() -> String,
) {
    assert!(
        wait_until(Duration::from_secs(25), || next_hops(router, prefix)
            == expected),
        "{what}: router has {:?} for {prefix}, expected {expected:?}\n{}",
        next_hops(router, prefix),
        logs()
    );
}

/// What FRR says of its session with `peer`: established transitions and when it was last
/// established (FRR derives that from the uptime, so it may move by a second). Both stay put
/// while the session does.
fn session(frr: &Frr, peer: &str) -> (u64, u64) {
    let out = frr.vtysh(&format!("show bgp neighbors {peer} json"));
    let value: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    (
        value[peer]["connectionsEstablished"].as_u64().unwrap_or(0),
        value[peer]["bgpTimerUpEstablishedEpoch"]
            .as_u64()
            .unwrap_or(0),
    )
}

fn assert_same_session(frr: &Frr, peer: &str, before: (u64, u64)) {
    let now = session(frr, peer);
    assert!(
        now.0 == before.0 && now.1.abs_diff(before.1) <= 1,
        "the session with {peer} was reset: {before:?} -> {now:?}"
    );
}

#[test]
fn each_node_peers_only_with_its_racks_router_and_a_label_change_moves_it() {
    let racks = Racks::new(2, 3);
    let frr = [
        Frr::start(&racks.routers[0], &frr_rack_router(1, 64500), true),
        Frr::start(&racks.routers[1], &frr_rack_router(2, 64501), true),
    ];
    let routing = format!(
        "  bgp:
    - {{name: rack_a, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, {TIMERS}, nodeSelector: {{matchLabels: {{rack: a}}}}}}
    - {{name: rack_b, neighbor: 10.0.0.2, asn: 64501, localAsn: 64512, {TIMERS}, nodeSelector: {{matchExpressions: [{{key: rack, operator: In, values: [b]}}]}}}}
"
    );
    let labels = ["{rack: a}", "{rack: a}", "{rack: b}"];
    let nodes: Vec<Node> = racks
        .nodes
        .iter()
        .zip(labels)
        .map(|(ns, labels)| Node::start(ns, &services(&[V4]), labels, &routing))
        .collect();
    let logs = || {
        nodes
            .iter()
            .map(Node::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let prefix = format!("{V4}/32");
    let hops = |ks: &[usize]| ks.iter().map(|k| Fabric::node_v4(*k)).collect::<Vec<_>>();
    wait_hops(&racks.routers[0], &prefix, &hops(&[1, 2]), "rack a", logs);
    wait_hops(&racks.routers[1], &prefix, &hops(&[3]), "rack b", logs);
    assert_eq!(nodes[0].sessions(), ["rack_a"], "{:#}", nodes[0].routing());
    assert_eq!(nodes[2].sessions(), ["rack_b"], "{:#}", nodes[2].routing());
    // The routers know only their own rack's nodes.
    assert_eq!(session(&frr[1], &Fabric::node_v4(1)).0, 0);
    assert_eq!(session(&frr[0], &Fabric::node_v4(3)).0, 0);

    let node2_at_a = session(&frr[0], &Fabric::node_v4(2));
    let node3_at_b = session(&frr[1], &Fabric::node_v4(3));
    assert_eq!(node2_at_a.0, 1, "node 2 established once");
    assert_eq!(node3_at_b.0, 1, "node 3 established once");

    // Node 1 moves to rack b: BIRD's reload drops one session and opens the other.
    nodes[0].write_config("{rack: b}", &routing);
    wait_hops(
        &racks.routers[1],
        &prefix,
        &hops(&[1, 3]),
        "node 1 in rack b",
        logs,
    );
    wait_hops(
        &racks.routers[0],
        &prefix,
        &hops(&[2]),
        "node 1 left rack a",
        logs,
    );
    assert!(
        wait_until(Duration::from_secs(10), || nodes[0].sessions()
            == ["rack_b"]
            && nodes[0].established("rack_b")),
        "{:#}",
        nodes[0].routing()
    );
    // Nobody else's session was touched.
    assert_same_session(&frr[0], &Fabric::node_v4(2), node2_at_a);
    assert_same_session(&frr[1], &Fabric::node_v4(3), node3_at_b);

    // A selector that does not parse: the config is refused, naming the field; the sessions stay.
    nodes[2].write_config(
        "{rack: b}",
        &routing.replace("operator: In", "operator: Inside"),
    );
    assert!(
        wait_until(Duration::from_secs(5), || nodes[2].log().contains(
            "routing.bgp[1].nodeSelector.matchExpressions[0].operator: \"Inside\" is not allowed"
        )),
        "{}",
        nodes[2].log()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_same_session(&frr[1], &Fabric::node_v4(3), node3_at_b);
    assert!(nodes[2].established("rack_b"));
}

#[test]
fn a_gateway_neighbour_follows_the_default_route() {
    let racks = Racks::new(2, 1);
    let frr = [
        Frr::start(&racks.routers[0], &frr_rack_router(1, 64500), true),
        Frr::start(&racks.routers[1], &frr_rack_router(2, 64500), true),
    ];
    let ns = &racks.nodes[0];
    ns.ip(&["route", "add", "default", "via", &Racks::router_v4(1)]);
    ns.ip(&["-6", "route", "add", "default", "via", &Racks::router_v6(1)]);
    let routing = format!(
        "  bgp:\n    - {{name: tor, neighbor: gateway, families: [ipv4, ipv6], asn: 64500, localAsn: 64512, {TIMERS}}}\n"
    );
    let node = Node::start(ns, &services(&[V4, V6]), "{}", &routing);
    let logs = || node.log();
    let (v4, v6) = (format!("{V4}/32"), format!("{V6}/128"));
    let me = vec![Fabric::node_v4(1)];
    wait_hops(&racks.routers[0], &v4, &me, "gateway 1", logs);
    assert!(
        wait_until(Duration::from_secs(20), || next_hops(
            &racks.routers[0],
            &v6
        )
        .len()
            == 1),
        "IPv6 over the IPv6 gateway\n{}",
        node.log()
    );
    assert_eq!(next_hops(&racks.routers[1], &v4), Vec::<String>::new());
    let v6_session = session(&frr[0], &Fabric::node_v6(1));
    assert_eq!(v6_session.0, 1);

    // The default route moves to router 2: so does the session.
    ns.ip(&["route", "replace", "default", "via", &Racks::router_v4(2)]);
    wait_hops(&racks.routers[1], &v4, &me, "gateway 2", logs);
    wait_hops(&racks.routers[0], &v4, &[], "gateway 1 left", logs);

    // Dual-homed (ECMP default): a session with each.
    ns.ip(&[
        "route",
        "replace",
        "default",
        "nexthop",
        "via",
        &Racks::router_v4(1),
        "nexthop",
        "via",
        &Racks::router_v4(2),
    ]);
    wait_hops(&racks.routers[0], &v4, &me, "ECMP, router 1", logs);
    wait_hops(&racks.routers[1], &v4, &me, "ECMP, router 2", logs);
    assert!(
        wait_until(Duration::from_secs(10), || node.sessions()
            == ["tor_10_0_0_1", "tor_10_0_0_2", "tor_fd00__1"]),
        "{:?}",
        node.sessions()
    );

    // No IPv4 default route: a log line naming the field; the IPv6 session is unaffected.
    ns.ip(&["route", "del", "default"]);
    assert!(
        wait_until(Duration::from_secs(10), || node.log().contains(
            "routing.bgp[0].neighbor: gateway: this node has no IPv4 default route"
        )),
        "{}",
        node.log()
    );
    wait_hops(
        &racks.routers[0],
        &v4,
        &[],
        "no IPv4 gateway, router 1",
        logs,
    );
    wait_hops(
        &racks.routers[1],
        &v4,
        &[],
        "no IPv4 gateway, router 2",
        logs,
    );
    assert_eq!(next_hops(&racks.routers[0], &v6).len(), 1);
    assert_same_session(&frr[0], &Fabric::node_v6(1), v6_session);
}

#[test]
fn the_export_ceiling_holds_and_is_reported_and_the_neighbours_med_is_set() {
    let fabric = Fabric::new(1);
    let frr = Frr::start(&fabric.router, FRR_ROUTER, true);
    let addresses = [
        "203.0.113.10",
        "203.0.113.11",
        "203.0.113.12",
        "203.0.113.13",
    ];
    let routing = format!(
        "  export: {{maxRoutes: 2}}\n  bgp:\n    - {{name: up4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, med: 50, {TIMERS}}}\n"
    );
    let node = Node::start(&fabric.nodes[0], &services(&addresses), "{}", &routing);
    let advertised = || {
        addresses
            .iter()
            .filter(|a| !next_hops(&fabric.router, &format!("{a}/32")).is_empty())
            .count()
    };
    let scrape = || {
        http_get(&fabric.nodes[0], METRICS.parse().unwrap(), "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    let hit = "lbagent_routing_export_limit_hit{name=\"up4\",protocol=\"BGP\"}";
    assert!(
        wait_until(Duration::from_secs(25), || advertised() == 2
            && metric(&scrape(), hit) == Some(1.0)),
        "advertised {}\n{}\n{}",
        advertised(),
        scrape(),
        node.log()
    );
    assert!(
        node.log().contains("export ceiling reached"),
        "{}",
        node.log()
    );
    // It holds: the other two never reach the router.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(advertised(), 2);
    // The neighbour's MED is on what it learns.
    let learned = addresses
        .iter()
        .find(|a| !next_hops(&fabric.router, &format!("{a}/32")).is_empty())
        .expect("an advertised address");
    let route = frr.vtysh(&format!("show bgp ipv4 unicast {learned}/32 json"));
    assert!(route.contains("\"metric\":50"), "{route}");
}
