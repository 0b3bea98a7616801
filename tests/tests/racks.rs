//! Routing for real racks, with real BIRD and FRR in namespaces: one config for every node,
//! whose labels choose the rack router it peers with; a gateway neighbour that follows the
//! node's default route; the export ceiling.

use std::time::Duration;

use lbagent_tests::{
    Agent, NetNs, TempDir, addresses_on,
    apiserver::ApiServer,
    http_get, metric,
    routers::{
        FRR_ROUTER, Fabric, Frr, Racks, RoutingNode, frr_rack_router, next_hops, web_services,
    },
    wait_until,
};
use serde_json::json;

const V4: &str = "203.0.113.10";
const V6: &str = "2001:db8:ff::10";
/// Inside each node's namespace, so every node can use the same.
const METRICS: &str = RoutingNode::METRICS;
const TIMERS: &str = "holdTime: 9s, keepaliveTime: 1s, connectRetryTime: 1s, connectDelayTime: 1s";

/// `lbagent run` with the file source: its services, its `node.labels` and a `routing:` body.
fn start(ns: &NetNs, services: &str, labels: &str, routing: &str) -> RoutingNode {
    RoutingNode::start(
        ns,
        "lbt-rack",
        services,
        &format!("{{labels: {labels}}}"),
        Some(routing),
    )
}

/// The names of the BGP protocols BIRD runs, as lbagent last read them.
fn sessions(node: &RoutingNode) -> Vec<String> {
    let mut names: Vec<String> = node.routing()["protocols"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|row| row["proto"] == "BGP")
        .filter_map(|row| row["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

fn established(node: &RoutingNode, name: &str) -> bool {
    node.protocol(name)["info"] == "Established"
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
    let nodes: Vec<RoutingNode> = racks
        .nodes
        .iter()
        .zip(labels)
        .map(|(ns, labels)| start(ns, &web_services(&[V4]), labels, &routing))
        .collect();
    let logs = || {
        nodes
            .iter()
            .map(RoutingNode::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let prefix = format!("{V4}/32");
    let hops = |ks: &[usize]| ks.iter().map(|k| Fabric::node_v4(*k)).collect::<Vec<_>>();
    wait_hops(&racks.routers[0], &prefix, &hops(&[1, 2]), "rack a", logs);
    wait_hops(&racks.routers[1], &prefix, &hops(&[3]), "rack b", logs);
    assert_eq!(sessions(&nodes[0]), ["rack_a"], "{:#}", nodes[0].routing());
    assert_eq!(sessions(&nodes[2]), ["rack_b"], "{:#}", nodes[2].routing());
    // The routers know only their own rack's nodes.
    assert_eq!(session(&frr[1], &Fabric::node_v4(1)).0, 0);
    assert_eq!(session(&frr[0], &Fabric::node_v4(3)).0, 0);

    let node2_at_a = session(&frr[0], &Fabric::node_v4(2));
    let node3_at_b = session(&frr[1], &Fabric::node_v4(3));
    assert_eq!(node2_at_a.0, 1, "node 2 established once");
    assert_eq!(node3_at_b.0, 1, "node 3 established once");

    // Node 1 moves to rack b: BIRD's reload drops one session and opens the other.
    nodes[0].write_config("{labels: {rack: b}}", Some(&routing));
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
        wait_until(Duration::from_secs(10), || sessions(&nodes[0])
            == ["rack_b"]
            && established(&nodes[0], "rack_b")),
        "{:#}",
        nodes[0].routing()
    );
    // Nobody else's session was touched.
    assert_same_session(&frr[0], &Fabric::node_v4(2), node2_at_a);
    assert_same_session(&frr[1], &Fabric::node_v4(3), node3_at_b);

    // A selector that does not parse: the config is refused, naming the field; the sessions stay.
    nodes[2].write_config(
        "{labels: {rack: b}}",
        Some(&routing.replace("operator: In", "operator: Inside")),
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
    assert!(established(&nodes[2], "rack_b"));
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
    let node = start(ns, &web_services(&[V4, V6]), "{}", &routing);
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
        wait_until(Duration::from_secs(10), || sessions(&node)
            == ["tor_10_0_0_1", "tor_10_0_0_2", "tor_fd00__1"]),
        "{:?}",
        sessions(&node)
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
    let node = start(&fabric.nodes[0], &web_services(&addresses), "{}", &routing);
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

/// What FRR holds for `prefix`: its AS path, standard and large communities (empty when none).
fn attributes_at(frr: &Frr, prefix: &str) -> Option<(String, String, String)> {
    let out = frr.vtysh(&format!("show bgp ipv4 unicast {prefix} json"));
    let value: serde_json::Value = serde_json::from_str(&out).ok()?;
    let path = value["paths"].get(0)?;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    Some((
        text(&path["aspath"]["string"]),
        text(&path["community"]["string"]),
        text(&path["largeCommunity"]["string"]),
    ))
}

fn attributed(web: &str, extra_web: &[&str]) -> String {
    let mut web_addresses = vec!["203.0.113.10"];
    web_addresses.extend_from_slice(extra_web);
    format!(
        "services:
- {{name: web, addresses: [{}], bgp: {web}}}
- {{name: plain, addresses: [203.0.113.11]}}
- {{name: bad, addresses: [203.0.113.12], bgp: {{communities: [\"64512:x\", \"64513:1\", \"64512:300\"], asPathPrepend: 5}}}}
",
        web_addresses.join(", ")
    )
}

#[test]
fn services_bgp_attributes_reach_the_router_and_a_change_resets_no_session() {
    let fabric = Fabric::new(1);
    let frr = Frr::start(&fabric.router, FRR_ROUTER, true);
    let routing = format!(
        "  serviceAttributes: {{communities: [\"64512:*\"], largeCommunities: [\"64512:*:*\"], maxPrepend: 2}}\n  bgp:\n    - {{name: up4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, {TIMERS}}}\n"
    );
    let web = "{communities: [\"64512:100\"], largeCommunities: [\"64512:1:2\"], asPathPrepend: 2}";
    let node = start(&fabric.nodes[0], &attributed(web, &[]), "{}", &routing);
    let seen = |prefix: &str, expected: (&str, &str, &str)| {
        let expected = (
            expected.0.to_owned(),
            expected.1.to_owned(),
            expected.2.to_owned(),
        );
        assert!(
            wait_until(Duration::from_secs(25), || attributes_at(&frr, prefix)
                .as_ref()
                == Some(&expected)),
            "{prefix}: the router has {:?}, expected {expected:?}\n{}",
            attributes_at(&frr, prefix),
            node.log()
        );
    };
    seen(
        "203.0.113.10/32",
        ("64512 64512 64512", "64512:100", "64512:1:2"),
    );
    seen("203.0.113.11/32", ("64512", "", ""));
    // The bad Service is served; only what it may not set is left out, each named in the log.
    seen("203.0.113.12/32", ("64512", "64512:300", ""));
    for refusal in [
        "bgp.communities[0]: \"64512:x\" is not allowed (a community is ASN:VALUE",
        "bgp.communities[1]: \"64513:1\" is not allowed (not in routing.serviceAttributes.communities)",
        "bgp.asPathPrepend: \"5\" is not allowed (at most routing.serviceAttributes.maxPrepend, 2)",
    ] {
        assert!(
            node.log().contains(refusal),
            "no {refusal:?} in\n{}",
            node.log()
        );
    }
    let before = session(&frr, &Fabric::node_v4(1));
    assert_eq!(before.0, 1, "established once");
    let reloads = |log: &str| log.matches("reconfiguring BIRD").count();
    let reloads_before = reloads(&node.log());

    // An attribute change: the router sees it, over the same session.
    node.dir.write(
        "services.yaml",
        &attributed("{communities: [\"64512:200\"], asPathPrepend: 1}", &[]),
    );
    seen("203.0.113.10/32", ("64512 64512", "64512:200", ""));
    assert_same_session(&frr, &Fabric::node_v4(1), before);
    assert!(
        reloads(&node.log()) > reloads_before,
        "a new attribute set reloads BIRD's config\n{}",
        node.log()
    );

    // An address added to an attributed Service, and one taken away: no reload.
    let reloads_before = reloads(&node.log());
    node.dir.write(
        "services.yaml",
        &attributed(
            "{communities: [\"64512:200\"], asPathPrepend: 1}",
            &["203.0.113.13"],
        ),
    );
    seen("203.0.113.13/32", ("64512 64512", "64512:200", ""));
    node.dir.write(
        "services.yaml",
        &attributed("{communities: [\"64512:200\"], asPathPrepend: 1}", &[]),
    );
    assert!(
        wait_until(Duration::from_secs(15), || next_hops(
            &fabric.router,
            "203.0.113.13/32"
        )
        .is_empty()),
        "203.0.113.13 withdrawn"
    );
    assert_eq!(
        reloads(&node.log()),
        reloads_before,
        "address changes reload nothing\n{}",
        node.log()
    );
    seen("203.0.113.10/32", ("64512 64512", "64512:200", ""));
    assert_same_session(&frr, &Fabric::node_v4(1), before);
}

/// With the Kubernetes source: the Node's labels choose the rack (a relabel moves the peering),
/// and a Service's annotations set its attributes; one over the allowed maximum is refused
/// with an Event naming the annotation and the value, and the rest still applies.
#[test]
fn kubernetes_node_labels_move_the_peering_and_annotations_set_attributes() {
    let racks = Racks::new(2, 1);
    let frr = [
        Frr::start(&racks.routers[0], &frr_rack_router(1, 64500), true),
        Frr::start(&racks.routers[1], &frr_rack_router(2, 64501), true),
    ];
    let ns = &racks.nodes[0];
    ns.ip(&["link", "set", "lo", "up"]);
    let server = ApiServer::start_in(ns);
    let node = |rack: &str| {
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "labels": {"rack": rack}},
        })
    };
    server.apply(node("a"));
    server.apply(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "annotations": {
            "lbagent.io/bgp-communities": "64512:100, 64512:101, 64512:x",
            "lbagent.io/bgp-large-communities": "64512:7:7",
            "lbagent.io/bgp-as-path-prepend": "3",
        }},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": V4}]}},
    }));
    let dir = TempDir::new("lbt-rack-kube");
    server.write_kubeconfig(&dir.path().join("kubeconfig"));
    dir.write(
        "lbagent.yaml",
        &format!(
            "node: {{name: node-a}}\nsource: {{kubernetes: {{kubeconfig: kubeconfig}}}}\n\
             status: {{path: {}}}\n\
             routing:\n  stateDir: {}\n\
             \x20 serviceAttributes: {{communities: [\"64512:*\"], largeCommunities: [\"64512:*:*\"], maxPrepend: 2}}\n\
             \x20 bgp:\n\
             \x20   - {{name: rack_a, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, {TIMERS}, nodeSelector: {{matchLabels: {{rack: a}}}}}}\n\
             \x20   - {{name: rack_b, neighbor: 10.0.0.2, asn: 64501, localAsn: 64512, {TIMERS}, nodeSelector: {{matchLabels: {{rack: b}}}}}}\n",
            dir.path().join("status.json").display(),
            dir.path().join("bird").display()
        ),
    );
    let agent = Agent::start(
        ns,
        &dir.path().join("lbagent.yaml"),
        dir.path().join("agent.log"),
    );
    let prefix = format!("{V4}/32");
    let expected = Some((
        "64512".to_owned(),
        "64512:100 64512:101".to_owned(),
        "64512:7:7".to_owned(),
    ));
    assert!(
        wait_until(Duration::from_secs(25), || attributes_at(&frr[0], &prefix)
            == expected),
        "rack a: {:?}\n{}",
        attributes_at(&frr[0], &prefix),
        agent.log()
    );
    assert_eq!(next_hops(&racks.routers[1], &prefix), Vec::<String>::new());
    for refused in [
        "metadata.annotations[lbagent.io/bgp-as-path-prepend]: \"3\" is not allowed (at most routing.serviceAttributes.maxPrepend, 2)",
        "metadata.annotations[lbagent.io/bgp-communities]: \"64512:x\" is not allowed (a community is ASN:VALUE, each 0-65535)",
    ] {
        assert!(
            wait_until(Duration::from_secs(10), || server.events().iter().any(
                |e| e["regarding"]["name"] == "web"
                    && e["reason"] == "AttributeRefused"
                    && e["note"].as_str().unwrap_or_default().contains(refused)
            )),
            "no AttributeRefused Event with {refused:?}: {:#?}\n{}",
            server.events(),
            agent.log()
        );
    }
    assert!(
        agent.log().contains("BGP attribute refused"),
        "{}",
        agent.log()
    );

    // The Node moves to rack b: the peering follows it, attributes and all.
    server.apply(node("b"));
    assert!(
        wait_until(Duration::from_secs(25), || attributes_at(&frr[1], &prefix)
            == expected),
        "rack b: {:?}\n{}",
        attributes_at(&frr[1], &prefix),
        agent.log()
    );
    assert!(
        wait_until(Duration::from_secs(15), || next_hops(
            &racks.routers[0],
            &prefix
        )
        .is_empty()),
        "rack a still routes {prefix}"
    );
}

/// The communities of each UPDATE bgpd received for `prefix`, in order (bgpd logs them under
/// `debug bgp updates in`): `None` for a withdrawal, `Some("")` for a route without any.
fn updates_for(log: &str, prefix: &str) -> Vec<Option<String>> {
    let mut attributes = String::new();
    let mut updates = Vec::new();
    for line in log.lines() {
        if let Some((_, attr)) = line.split_once("rcvd UPDATE w/ attr: ") {
            attributes = attr
                .split(", ")
                .find_map(|field| field.strip_prefix("community "))
                .unwrap_or_default()
                .to_owned();
        } else if line.contains(&format!("rcvd UPDATE about {prefix} "))
            && line.contains("withdrawn")
        {
            updates.push(None);
        } else if line.contains(&format!("rcvd {prefix} "))
            || line.ends_with(&format!("rcvd {prefix}"))
        {
            updates.push(Some(attributes.clone()));
        }
    }
    updates
}

/// The marks lbagent keeps in the node's table 200 (per-Service attributes): each address
/// and metric.
fn marks(ns: &NetNs) -> Vec<String> {
    let mut marks: Vec<String> = ns
        .ip(&["route", "show", "table", "200", "proto", "211"])
        .lines()
        .map(str::to_owned)
        .collect();
    marks.sort();
    marks
}

/// A Service moving to a set of attributes no Service had (so BIRD's config must learn it)
/// reaches the router with its old attributes, then its new ones: never without any, never
/// with another set's. BIRD is held still (SIGSTOP) while lbagent takes each change in, as a
/// slow reload would hold it, so a mark that went ahead of BIRD's config would be exported
/// before the config that maps it, every time. bgpd logs every UPDATE it receives, so a route
/// that went out wrong even for a moment is seen.
#[test]
fn a_brand_new_attribute_set_never_reaches_the_router_without_its_attributes() {
    use nix::{sys::signal, unistd::Pid};

    let fabric = Fabric::new(1);
    let frr = Frr::start(
        &fabric.router,
        &format!("debug bgp updates in\n{FRR_ROUTER}"),
        true,
    );
    let routing = format!(
        "  serviceAttributes: {{communities: [\"64512:*\"]}}\n  bgp:\n    - {{name: up4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, {TIMERS}}}\n"
    );
    // `twin` keeps the first set in use, so `web` moving away from it moves its mark.
    let services = |web: u32| {
        format!(
            "services:
- {{name: web, addresses: [{V4}], bgp: {{communities: [\"64512:{web}\"]}}}}
- {{name: twin, addresses: [203.0.113.11], bgp: {{communities: [\"64512:100\"]}}}}
"
        )
    };
    let node = start(&fabric.nodes[0], &services(100), "{}", &routing);
    let prefix = format!("{V4}/32");
    let community = |c: u32| format!("64512:{c}");
    let shows = |c: u32| {
        attributes_at(&frr, &prefix).is_some_and(|(_, communities, _)| communities == community(c))
    };
    assert!(
        wait_until(Duration::from_secs(25), || shows(100)),
        "{prefix}: the router has {:?}\n{}",
        attributes_at(&frr, &prefix),
        node.log()
    );
    let bird: i32 = std::fs::read_to_string(node.dir.path().join("bird/bird.pid"))
        .expect("BIRD's pid file")
        .trim()
        .parse()
        .expect("a pid");
    let waiting = |log: &str| log.matches("wait until BIRD runs the config").count();
    let mut from = 100;
    // Each round moves `web` to a set no Service had, then back to the one `twin` holds; the
    // second new set takes the id BIRD's config still gives the first.
    for to in [201, 100, 202, 100] {
        let logged = frr.log("bgpd").len();
        let (marks_before, waiting_before) = (marks(&fabric.nodes[0]), waiting(&node.log()));
        // Stopped for less than FRR's hold time (3 s), so the session stays.
        signal::kill(Pid::from_raw(bird), signal::Signal::SIGSTOP).expect("stop BIRD");
        node.dir.write("services.yaml", &services(to));
        let taken_in = wait_until(Duration::from_secs(2), || {
            marks(&fabric.nodes[0]) != marks_before || waiting(&node.log()) > waiting_before
        });
        signal::kill(Pid::from_raw(bird), signal::Signal::SIGCONT).expect("resume BIRD");
        assert!(
            taken_in,
            "lbagent neither moved the mark nor held it back\n{}",
            node.log()
        );
        let arrived = || {
            updates_for(&frr.log("bgpd")[logged..], &prefix)
                .last()
                .is_some_and(|last| last.as_deref() == Some(community(to).as_str()))
        };
        assert!(
            wait_until(Duration::from_secs(25), || shows(to) && arrived()),
            "{prefix}: the router has {:?}, expected {}\n{}",
            attributes_at(&frr, &prefix),
            community(to),
            node.log()
        );
        let updates = updates_for(&frr.log("bgpd")[logged..], &prefix);
        let allowed = [Some(community(from)), Some(community(to))];
        assert!(
            updates.iter().all(|update| allowed.contains(update)),
            "{} -> {}: the router received {updates:?} for {prefix} (None: withdrawn, \"\": no communities)\n{}",
            community(from),
            community(to),
            node.log()
        );
        from = to;
    }
    assert_eq!(
        session(&frr, &Fabric::node_v4(1)).0,
        1,
        "BIRD's session outlived every stop"
    );
}

/// A pass for a Service's attribute change skips the address sink when the desired addresses
/// are those it last applied; an address someone removes just before that change must still
/// be put back (the removal is noticed, so that sink is no longer settled), and the attributes
/// reach the router all the same.
#[test]
fn an_address_removed_as_attributes_change_is_still_put_back() {
    let fabric = Fabric::new(1);
    let frr = Frr::start(&fabric.router, FRR_ROUTER, true);
    let routing = format!(
        "  serviceAttributes: {{communities: [\"64512:*\"]}}\n  bgp:\n    - {{name: up4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, {TIMERS}}}\n"
    );
    let web = |community: u32| format!("{{communities: [\"64512:{community}\"]}}");
    let ns = &fabric.nodes[0];
    let node = start(ns, &attributed(&web(100), &[]), "{}", &routing);
    let community_at = |prefix: &str| attributes_at(&frr, prefix).map(|(_, c, _)| c);
    assert!(
        wait_until(Duration::from_secs(25), || community_at("203.0.113.10/32")
            .as_deref()
            == Some("64512:100")
            && addresses_on(ns, "kube-lb0").contains("203.0.113.11/32")),
        "the first state: the router has {:?}\n{}",
        community_at("203.0.113.10/32"),
        node.log()
    );
    for round in 1..=5 {
        let community = 100 + round;
        // Removed (as by someone else) right before the change: the netlink notice and the
        // new desired state reach lbagent a few milliseconds apart.
        ns.ip(&["addr", "del", "203.0.113.11/32", "dev", "kube-lb0"]);
        node.dir
            .write("services.yaml", &attributed(&web(community), &[]));
        let expected = format!("64512:{community}");
        assert!(
            wait_until(Duration::from_secs(15), || community_at("203.0.113.10/32")
                .as_deref()
                == Some(expected.as_str())),
            "round {round}: the router has {:?}, expected {expected}\n{}",
            community_at("203.0.113.10/32"),
            node.log()
        );
        // Well within the 30 s resync: the notice itself brings the repair.
        assert!(
            wait_until(Duration::from_secs(10), || addresses_on(ns, "kube-lb0")
                .contains("203.0.113.11/32")),
            "round {round}: 203.0.113.11 not put back on kube-lb0: {:?}\n{}",
            addresses_on(ns, "kube-lb0"),
            node.log()
        );
    }
    assert!(
        wait_until(Duration::from_secs(25), || next_hops(
            &fabric.router,
            "203.0.113.11/32"
        ) == [Fabric::node_v4(1)]),
        "the router lost 203.0.113.11: {:?}\n{}",
        next_hops(&fabric.router, "203.0.113.11/32"),
        node.log()
    );
    assert!(
        node.log()
            .contains("repairing: 203.0.113.11/32 was removed from kube-lb0 outside lbagent"),
        "{}",
        node.log()
    );
}
