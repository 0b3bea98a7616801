//! Routing with real daemons: nodes running `lbagent run` with a managed BIRD advertise
//! kube-lb0's addresses to an upstream router running FRR (BGP) or BIRD (OSPF, RIP), whose
//! kernel installs them.

use std::time::{Duration, Instant};

use lbagent_tests::{
    Agent, NetNs, TempDir, http_get, metric,
    routers::{BirdRouter, FRR_ROUTER, Fabric, Frr, RoutingNode, next_hops, web_services},
    run_ok, wait_until,
};

const V4: &str = "203.0.113.10";
/// Inside each node's namespace, so every node can use the same.
const METRICS: &str = RoutingNode::METRICS;
const V6: &str = "2001:db8:ff::10";

/// The FRR recipe of the README, as shipped in deploy/: the test runs it unchanged.
const FRR_NODE_RECIPE: &str = include_str!("../../deploy/frr/bgpd.conf");

const BGP: &str = "  bgp:
    - {name: up4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, holdTime: 9s, keepaliveTime: 1s, connectRetryTime: 1s, connectDelayTime: 1s}
    - {name: up6, neighbor: \"fd00::1\", asn: 64500, localAsn: 64512, holdTime: 9s, keepaliveTime: 1s, connectRetryTime: 1s, connectDelayTime: 1s}
";

/// `lbagent run` on one node of the fabric; `routing`: the body of its `routing:` section.
fn start(ns: &NetNs, services: &str, routing: Option<&str>) -> RoutingNode {
    RoutingNode::start(ns, "lbt-route", services, "", routing)
}

fn wait_established(node: &RoutingNode, names: &[&str]) {
    assert!(
        wait_until(Duration::from_secs(20), || names
            .iter()
            .all(|name| node.protocol(name)["info"] == "Established")),
        "sessions {names:?} not established: {:#}\n{}",
        node.routing(),
        node.log()
    );
}

/// The `since` of protocol `name` as BIRD tells it now through its control socket, not as
/// lbagent last polled it.
fn bird_since(node: &RoutingNode, name: &str) -> String {
    let socket = node.dir.path().join("bird/bird.ctl");
    let socket = socket.to_str().expect("UTF-8 path");
    let reply = run_ok("birdc", &["-s", socket, "show", "protocols", name]);
    reply
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&name))
        .and_then(|fields| fields.get(4).map(|since| (*since).to_owned()))
        .unwrap_or_else(|| panic!("no {name} in BIRD's reply:\n{reply}"))
}

/// Whether two `since` stamps BIRD printed name the same moment. BIRD keeps the moment on its
/// monotonic clock and prints it through the offset to wall time at the moment of asking, which
/// moves while the clock is slewed (NTP on a freshly booted machine) and by rounding: CI saw one
/// unchanged moment print 1 ms apart from one call to the next.
fn same_moment(a: &str, b: &str) -> bool {
    let millis = |stamp: &str| -> Option<i64> {
        let time = stamp.split_whitespace().last()?;
        let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
        let mut parts = hms.split(':').map(|part| part.parse::<i64>().ok());
        let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
        Some(((h * 60 + m) * 60 + s) * 1000 + fraction.parse::<i64>().ok()?)
    };
    matches!((millis(a), millis(b)), (Some(a), Some(b)) if (a - b).abs() <= 2)
}

fn wait_hops(router: &NetNs, prefix: &str, expected: usize, what: &str, logs: impl Fn() -> String) {
    assert!(
        wait_until(Duration::from_secs(20), || next_hops(router, prefix).len()
            == expected),
        "{what}: router has {:?} for {prefix}, expected {expected} next hops\n{}",
        next_hops(router, prefix),
        logs()
    );
}

#[test]
fn two_nodes_are_ecmp_next_hops_over_bgp_and_a_withdrawal_takes_one_away() {
    let fabric = Fabric::new(2);
    let _frr = Frr::start(&fabric.router, FRR_ROUTER, true);
    let nodes: Vec<RoutingNode> = fabric
        .nodes
        .iter()
        .map(|ns| start(ns, &web_services(&[V4, V6]), Some(BGP)))
        .collect();
    let logs = || {
        nodes
            .iter()
            .map(RoutingNode::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    wait_hops(&fabric.router, &format!("{V4}/32"), 2, "IPv4 ECMP", logs);
    wait_hops(&fabric.router, &format!("{V6}/128"), 2, "IPv6 ECMP", logs);
    assert_eq!(
        next_hops(&fabric.router, &format!("{V4}/32")),
        [Fabric::node_v4(1), Fabric::node_v4(2)]
    );
    // The router id defaulted to each node's address.
    assert!(nodes[0].dir.path().join("bird/bird.conf").exists());
    let conf = std::fs::read_to_string(nodes[0].dir.path().join("bird/bird.conf")).unwrap();
    assert!(
        conf.contains(&format!("router id {};", Fabric::node_v4(1))),
        "{conf}"
    );

    // Traffic from the router reaches the address on the nodes.
    for vip in [V4, V6] {
        let ping = fabric
            .router
            .exec("ping", &["-c", "2", "-i", "0.2", "-W", "2", vip]);
        assert!(
            ping.status.success(),
            "ping {vip}: {}",
            String::from_utf8_lossy(&ping.stdout)
        );
    }

    // Removing the service on node 1 takes only node 1's next hop away, within a second.
    nodes[0].dir.write("services.yaml", "services: []\n");
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(5), || next_hops(
            &fabric.router,
            &format!("{V4}/32")
        ) == [Fabric::node_v4(2)]),
        "{:?}",
        next_hops(&fabric.router, &format!("{V4}/32"))
    );
    let withdrawn = started.elapsed();
    assert!(
        withdrawn < Duration::from_secs(1),
        "withdrawal took {withdrawn:?}"
    );
    wait_hops(
        &fabric.router,
        &format!("{V6}/128"),
        1,
        "IPv6 withdrawal",
        logs,
    );
    // And BIRD was never reloaded for it: address changes reach BIRD through netlink.
    assert!(
        !nodes[0].log().contains("reconfiguring BIRD"),
        "{}",
        nodes[0].log()
    );
}

#[test]
fn a_filter_change_reloads_without_resetting_sessions_and_a_hold_time_change_restarts_one() {
    let fabric = Fabric::new(1);
    let frr = Frr::start(&fabric.router, FRR_ROUTER, true);
    let node = start(&fabric.nodes[0], &web_services(&[V4, V6]), Some(BGP));
    wait_established(&node, &["up4", "up6"]);
    wait_hops(&fabric.router, &format!("{V4}/32"), 1, "route", || {
        node.log()
    });
    let since = |name: &str| {
        node.protocol(name)["since"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let (up4, up6) = (since("up4"), since("up6"));
    let (live4, live6) = (bird_since(&node, "up4"), bird_since(&node, "up6"));

    // A community is a filter change: BIRD reloads the channels, the sessions stay.
    node.write_config(
        "",
        Some(&format!(
            "  export: {{communities: [\"64512:100\"]}}\n{BGP}"
        )),
    );
    assert!(
        wait_until(Duration::from_secs(5), || node.routing()["lastReload"]
            == "Reconfigured"),
        "{:#}\n{}",
        node.routing(),
        node.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || frr
            .vtysh(&format!("show bgp ipv4 unicast {V4}/32"))
            .contains("Community: 64512:100")),
        "{}",
        frr.vtysh(&format!("show bgp ipv4 unicast {V4}/32"))
    );
    // The router has the new attribute: a reset session would have been down before that.
    let now = (bird_since(&node, "up4"), bird_since(&node, "up6"));
    assert!(
        same_moment(&now.0, &live4) && same_moment(&now.1, &live6),
        "a session was reset: since {now:?}, was {:?}",
        (live4, live6)
    );

    // A hold time is a session parameter: only that session restarts.
    node.write_config(
        "",
        Some(&format!(
            "  export: {{communities: [\"64512:100\"]}}\n{}",
            BGP.replacen("holdTime: 9s", "holdTime: 12s", 1)
        )),
    );
    assert!(
        wait_until(Duration::from_secs(15), || !same_moment(
            &since("up4"),
            &up4
        ) && node.protocol("up4")["info"]
            == "Established"),
        "up4 did not restart: {:#}",
        node.routing()
    );
    assert!(
        same_moment(&since("up6"), &up6),
        "up6 must not restart: since {}, was {up6}",
        since("up6")
    );
}

#[test]
fn a_config_bird_rejects_leaves_the_running_one_in_place() {
    let fabric = Fabric::new(1);
    let _frr = Frr::start(&fabric.router, FRR_ROUTER, true);
    let node = start(&fabric.nodes[0], &web_services(&[V4]), Some(BGP));
    wait_established(&node, &["up4"]);
    let live = std::fs::read_to_string(node.dir.path().join("bird/bird.conf")).unwrap();
    let since = bird_since(&node, "up4");

    // lbagent accepts the name; BIRD does not (`ipv4` is one of its keywords).
    node.write_config("", Some(&BGP.replacen("name: up4", "name: ipv4", 1)));
    assert!(
        wait_until(Duration::from_secs(5), || node.routing()["lastReload"]
            .as_str()
            .is_some_and(|r| r.contains("syntax error"))),
        "{:#}\n{}",
        node.routing(),
        node.log()
    );
    assert!(
        node.log().contains("BIRD keeps running the previous one"),
        "{}",
        node.log()
    );
    assert_eq!(
        std::fs::read_to_string(node.dir.path().join("bird/bird.conf")).unwrap(),
        live
    );
    // BIRD refused the file, so nothing of it ever ran: the session is the same one.
    assert!(
        same_moment(&bird_since(&node, "up4"), &since),
        "the session was reset: since {}, was {since}",
        bird_since(&node, "up4")
    );
    assert_eq!(
        next_hops(&fabric.router, &format!("{V4}/32")),
        [Fabric::node_v4(1)]
    );

    // A value lbagent itself rejects never reaches BIRD: the field is named, nothing written.
    node.write_config("", Some(&BGP.replacen("asn: 64500", "asn: 0", 1)));
    assert!(
        wait_until(Duration::from_secs(5), || {
            node.log().contains(
            "routing.bgp[0].asn: 0 is not allowed (an AS number, 1-4294967295); keeping the running config"
        )
        }),
        "{}",
        node.log()
    );
    assert_eq!(
        std::fs::read_to_string(node.dir.path().join("bird/bird.conf")).unwrap(),
        live
    );
    assert!(!node.dir.path().join("bird/bird.conf.next").exists());
    assert!(
        same_moment(
            node.protocol("up4")["since"].as_str().unwrap_or_default(),
            &since
        ),
        "the session was reset: {:#}, was {since}",
        node.protocol("up4")
    );

    // A crash while the newest config is one BIRD rejects: the next BIRD runs the live one.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(node.bird_pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || node.routing()["restarts"] == 1
            && node.protocol("up4")["info"] == "Established"),
        "{:#}\n{}",
        node.routing(),
        node.log()
    );
    assert_eq!(
        std::fs::read_to_string(node.dir.path().join("bird/bird.conf")).unwrap(),
        live
    );
    assert!(
        node.log()
            .contains("new routing config not applied; BIRD restarts with the previous one"),
        "{}",
        node.log()
    );
}

#[test]
fn a_killed_bird_is_restarted_and_the_router_keeps_forwarding_meanwhile() {
    // Graceful restart needs the session to have been up once: lbagent marks it.
    let (fabric, _frr, node) = announced_node();

    let pid = node.bird_pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        assert_eq!(
            next_hops(&fabric.router, &format!("{V4}/32")),
            [Fabric::node_v4(1)],
            "the router lost the route while BIRD was down"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        wait_until(Duration::from_secs(15), || node.routing()["restarts"] == 1
            && node.protocol("up4")["info"] == "Established"),
        "{:#}\n{}",
        node.routing(),
        node.log()
    );
    assert_ne!(node.bird_pid(), pid);
    assert!(
        node.log().contains("recovering=true"),
        "restarted without -R:\n{}",
        node.log()
    );
}

#[test]
fn a_hung_bird_is_restarted_and_the_change_it_missed_is_applied() {
    let (_fabric, frr, node) = announced_node();
    let signal = |pid: i32, signal| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal BIRD")
    };
    let next = node.dir.path().join("bird/bird.conf.next");
    let community = |value: &str| {
        frr.vtysh(&format!("show bgp ipv4 unicast {V4}/32"))
            .contains(&format!("Community: {value}"))
    };

    // Stopped, and never continued: the change reaches BIRD only through a restart.
    let hung = node.bird_pid();
    signal(hung, nix::sys::signal::Signal::SIGSTOP);
    node.write_config(
        "",
        Some(&format!(
            "  export: {{communities: [\"64512:100\"]}}\n{BGP}"
        )),
    );
    assert!(
        wait_until(Duration::from_secs(10), || next.exists()),
        "lbagent never tried to hand the stopped BIRD the change\n{}",
        node.log()
    );
    assert!(
        wait_until(Duration::from_secs(60), || node.routing()["restarts"] == 1
            && node.protocol("up4")["info"] == "Established"
            && community("64512:100")),
        "{:#}\n{}\n{}",
        node.routing(),
        frr.vtysh(&format!("show bgp ipv4 unicast {V4}/32")),
        node.log()
    );
    assert_ne!(node.bird_pid(), hung);
    assert!(
        !std::path::Path::new(&format!("/proc/{hung}")).exists(),
        "the hung BIRD is still there"
    );
    assert!(!next.exists(), "bird.conf.next left behind");
    assert!(
        node.log()
            .contains("BIRD did not answer its control socket"),
        "{}",
        node.log()
    );
    assert!(
        node.log().contains("recovering=true"),
        "restarted without -R, so peers dropped the routes:\n{}",
        node.log()
    );

    // Stopped while a change is on its way, then continued: the change is applied.
    let stopped = node.bird_pid();
    signal(stopped, nix::sys::signal::Signal::SIGSTOP);
    node.write_config(
        "",
        Some(&format!(
            "  export: {{communities: [\"64512:200\"]}}\n{BGP}"
        )),
    );
    assert!(
        wait_until(Duration::from_secs(10), || next.exists()),
        "{}",
        node.log()
    );
    signal(stopped, nix::sys::signal::Signal::SIGCONT);
    assert!(
        wait_until(Duration::from_secs(30), || community("64512:200")),
        "{:#}\n{}",
        node.routing(),
        node.log()
    );
    assert!(
        wait_until(Duration::from_secs(5), || !next.exists()),
        "bird.conf.next left behind"
    );
    let live = std::fs::read_to_string(node.dir.path().join("bird/bird.conf")).unwrap();
    assert!(live.contains("64512, 200"), "{live}");
}

#[test]
fn frr_on_the_node_redistributes_kube_lb0_as_lbagent_keeps_it() {
    let fabric = Fabric::new(1);
    let _router = Frr::start(&fabric.router, FRR_ROUTER, true);
    // lbagent only keeps kube-lb0; the node's own FRR advertises it with the recipe the README
    // shows, as shipped: FRR's defaults, IPv4 and IPv6.
    let node = start(&fabric.nodes[0], &web_services(&[V4, V6]), None);
    let _node_frr = Frr::start(&fabric.nodes[0], FRR_NODE_RECIPE, false);
    wait_hops(
        &fabric.router,
        &format!("{V4}/32"),
        1,
        "FRR node IPv4",
        || node.log(),
    );
    wait_hops(
        &fabric.router,
        &format!("{V6}/128"),
        1,
        "FRR node IPv6",
        || node.log(),
    );
    // Only kube-lb0's host routes: not the node's own subnet.
    let table = run_ok(
        "ip",
        &["-n", fabric.router.name(), "route", "show", "proto", "bgp"],
    );
    assert_eq!(table.lines().count(), 1, "{table}");

    let table6 = run_ok(
        "ip",
        &[
            "-n",
            fabric.router.name(),
            "-6",
            "route",
            "show",
            "proto",
            "bgp",
        ],
    );
    assert_eq!(table6.lines().count(), 1, "{table6}");

    node.dir.write("services.yaml", "services: []\n");
    wait_hops(
        &fabric.router,
        &format!("{V4}/32"),
        0,
        "FRR node withdrawal",
        || node.log(),
    );
    wait_hops(
        &fabric.router,
        &format!("{V6}/128"),
        0,
        "FRR node IPv6 withdrawal",
        || node.log(),
    );
}

#[test]
fn a_missing_bird_stops_the_start_with_one_line() {
    let fabric = Fabric::new(1);
    let dir = TempDir::new("lbt-nobird");
    dir.write("services.yaml", &web_services(&[V4]));
    dir.write(
        "lbagent.yaml",
        &format!(
            "source: {{file: {{path: services.yaml}}}}\nstatus: {{path: {}}}\nrouting:\n  bird: /nonexistent/bird\n{BGP}",
            dir.path().join("status.json").display()
        ),
    );
    let mut agent = Agent::start(
        &fabric.nodes[0],
        &dir.path().join("lbagent.yaml"),
        dir.path().join("log"),
    );
    assert!(wait_until(Duration::from_secs(5), || agent
        .exited()
        .is_some()));
    assert!(!agent.exited().unwrap().success());
    let errors: Vec<String> = agent
        .log()
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_owned)
        .collect();
    assert_eq!(errors.len(), 1, "{}", agent.log());
    assert!(
        errors[0].contains("/nonexistent/bird is not installed or not on PATH"),
        "{errors:?}"
    );
}

const BIRD_ROUTER_OSPF: &str = "log stderr all;
router id 10.0.0.1;
protocol device { scan time 2; }
protocol kernel k4 { ipv4 { import none; export where source ~ [ RTS_OSPF_EXT2, RTS_OSPF ] && net ~ [ 203.0.113.0/24+ ]; }; }
protocol kernel k6 { ipv6 { import none; export where source ~ [ RTS_OSPF_EXT2, RTS_OSPF ] && net ~ [ 2001:db8:ff::/64+ ]; }; }
protocol ospf v2 o4 { ecmp yes; merge external yes; ipv4 { import all; export none; };
  area 0 { interface \"br0\" { type broadcast; hello 1; dead 4; wait 2; priority 10; }; }; }
protocol ospf v3 o6 { ecmp yes; merge external yes; ipv6 { import all; export none; };
  area 0 { interface \"br0\" { type broadcast; hello 1; dead 4; wait 2; priority 10; }; }; }
";

#[test]
fn a_bird_router_learns_the_addresses_over_ospf_v2_and_v3() {
    let fabric = Fabric::new(2);
    let router = BirdRouter::start(&fabric.router, BIRD_ROUTER_OSPF);
    let routing = "  ospf:
    - {name: o4, family: ipv4, area: 0, interfaces: [{name: eth0, type: broadcast, hello: 1, dead: 4}]}
    - {name: o6, family: ipv6, area: \"0.0.0.0\", interfaces: [{name: eth0, type: broadcast, hello: 1, dead: 4}]}
";
    let nodes: Vec<RoutingNode> = fabric
        .nodes
        .iter()
        .map(|ns| start(ns, &web_services(&[V4, V6]), Some(routing)))
        .collect();
    let logs = || {
        format!(
            "{}\n---\n{}",
            router.log(),
            nodes
                .iter()
                .map(RoutingNode::log)
                .collect::<Vec<_>>()
                .join("\n---\n")
        )
    };
    wait_hops(&fabric.router, &format!("{V4}/32"), 2, "OSPFv2 ECMP", logs);
    wait_hops(&fabric.router, &format!("{V6}/128"), 2, "OSPFv3 ECMP", logs);
}

#[test]
fn a_bird_router_learns_the_addresses_over_rip_and_ripng() {
    let fabric = Fabric::new(1);
    let router = BirdRouter::start(
        &fabric.router,
        "log stderr all;
router id 10.0.0.1;
protocol device { scan time 2; }
protocol kernel k4 { ipv4 { import none; export where source = RTS_RIP; }; }
protocol kernel k6 { ipv6 { import none; export where source = RTS_RIP; }; }
protocol rip r4 { ecmp yes; ipv4 { import all; export none; }; interface \"br0\" { update time 5; timeout time 15; }; }
protocol rip ng r6 { ecmp yes; ipv6 { import all; export none; }; interface \"br0\" { update time 5; timeout time 15; }; }
",
    );
    let node = start(
        &fabric.nodes[0],
        &web_services(&[V4, V6]),
        Some(
            "  rip:\n    - {name: r4, family: ipv4, interfaces: [eth0], updateTime: 5}\n    - {name: r6, family: ipv6, interfaces: [eth0], updateTime: 5}\n",
        ),
    );
    let logs = || format!("{}\n---\n{}", router.log(), node.log());
    wait_hops(&fabric.router, &format!("{V4}/32"), 1, "RIP", logs);
    wait_hops(&fabric.router, &format!("{V6}/128"), 1, "RIPng", logs);
    assert_eq!(
        next_hops(&fabric.router, &format!("{V4}/32")),
        [Fabric::node_v4(1)]
    );
}

/// One node whose BGP session to an FRR router is up, whose route the router has, and whose
/// BIRD is marked as having announced (so the next one starts with -R).
fn announced_node() -> (Fabric, Frr, RoutingNode) {
    let fabric = Fabric::new(1);
    let frr = Frr::start(&fabric.router, FRR_ROUTER, true);
    let node = start(&fabric.nodes[0], &web_services(&[V4]), Some(BGP));
    wait_established(&node, &["up4"]);
    wait_hops(&fabric.router, &format!("{V4}/32"), 1, "route", || {
        node.log()
    });
    assert!(wait_until(Duration::from_secs(5), || node
        .dir
        .path()
        .join("bird/announced")
        .exists()));
    (fabric, frr, node)
}

#[test]
fn restarting_lbagent_keeps_the_route_and_cleanup_withdraws_it() {
    let (fabric, _frr, mut node) = announced_node();

    // A planned restart: SIGTERM makes BIRD restart gracefully; the peer keeps the route.
    let old = node.agent.take().expect("running");
    let status = old.stop();
    assert!(status.success(), "{status}");
    for _ in 0..50 {
        assert_eq!(
            next_hops(&fabric.router, &format!("{V4}/32")),
            [Fabric::node_v4(1)],
            "route lost while lbagent was stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let agent = Agent::start(
        &fabric.nodes[0],
        &node.dir.path().join("lbagent.yaml"),
        node.dir.path().join("agent2.log"),
    );
    node.agent = Some(agent);
    assert!(
        wait_until(Duration::from_secs(10), || node
            .log()
            .contains("recovering=true")),
        "BIRD not restarted with -R:\n{}",
        node.log()
    );
    wait_established(&node, &["up4"]);
    assert_eq!(
        next_hops(&fabric.router, &format!("{V4}/32")),
        [Fabric::node_v4(1)]
    );

    assert_eq!(
        fabric.nodes[0].processes("bird").len(),
        1,
        "one BIRD runs on the node"
    );

    // Uninstall: cleanup shuts BIRD down (peers withdraw at once) and removes kube-lb0.
    let stdout =
        lbagent_tests::lbagent_cleanup(&fabric.nodes[0], &node.dir.path().join("lbagent.yaml"));
    assert!(stdout.contains("BIRD: shut down"), "{stdout}");
    let started = Instant::now();
    assert!(
        wait_until(Duration::from_secs(3), || next_hops(
            &fabric.router,
            &format!("{V4}/32")
        )
        .is_empty()),
        "the router kept the route after cleanup"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "withdrawal took {:?}",
        started.elapsed()
    );
    assert!(!node.dir.path().join("bird").exists());
    // The running agent does not bring BIRD back against the cleanup.
    assert!(
        wait_until(Duration::from_secs(3), || node
            .log()
            .contains("BIRD was shut down from outside lbagent")),
        "{}",
        node.log()
    );
    // Decided: no BIRD runs on the node, so nothing can announce the route again.
    assert_eq!(
        fabric.nodes[0].processes("bird"),
        Vec::<u32>::new(),
        "{}",
        node.log()
    );
    assert!(next_hops(&fabric.router, &format!("{V4}/32")).is_empty());
}

#[test]
fn external_mode_writes_an_include_and_reloads_the_operators_bird() {
    let fabric = Fabric::new(1);
    let _frr = Frr::start(&fabric.router, FRR_ROUTER, true);
    // The operator's BIRD (as a CNI would run it), including lbagent's file.
    let dir = TempDir::new("lbt-ext");
    let include = dir.path().join("lbagent.conf");
    std::fs::write(&include, "").unwrap();
    let operator = BirdRouter::start(
        &fabric.nodes[0],
        &format!(
            "log stderr all;\nrouter id 10.0.0.11;\nprotocol device {{ scan time 2; }}\ninclude \"{}\";\n",
            include.display()
        ),
    );
    let socket = operator_socket(&operator);
    let node = start(
        &fabric.nodes[0],
        &web_services(&[V4]),
        Some(&format!(
            "  mode: external\n  include: {}\n  socket: {}\n  bgp:\n    - {{name: up4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, holdTime: 9s, keepaliveTime: 1s, connectRetryTime: 1s}}\n",
            include.display(),
            socket
        )),
    );
    wait_hops(
        &fabric.router,
        &format!("{V4}/32"),
        1,
        "external BIRD",
        || format!("{}\n{}", node.log(), operator.log()),
    );
    let written = std::fs::read_to_string(&include).unwrap();
    assert!(
        written.contains("protocol bgp up4") && !written.contains("router id"),
        "{written}"
    );
}

fn operator_socket(router: &BirdRouter) -> String {
    router.socket().display().to_string()
}

#[test]
fn cleanup_after_a_graceful_stop_still_makes_the_router_withdraw() {
    let (fabric, frr, mut node) = announced_node();

    // The uninstall order of a DaemonSet: the pod stops (graceful restart: the router keeps
    // the route as stale), then cleanup runs with no BIRD left to send `down` to.
    let peer = Fabric::node_v4(1);
    let peer_state = || {
        let neighbors: serde_json::Value =
            serde_json::from_str(&frr.vtysh("show bgp neighbors json")).expect("vtysh JSON");
        neighbors[&peer]["bgpState"]
            .as_str()
            .unwrap_or("gone")
            .to_owned()
    };
    assert_eq!(peer_state(), "Established");
    assert!(node.agent.take().expect("running").stop().success());
    // The router has seen the session go, and keeps the route.
    assert!(
        wait_until(Duration::from_secs(10), || peer_state() != "Established"),
        "{}",
        frr.vtysh("show bgp neighbors")
    );
    assert_eq!(
        next_hops(&fabric.router, &format!("{V4}/32")),
        [Fabric::node_v4(1)]
    );
    let stdout =
        lbagent_tests::lbagent_cleanup(&fabric.nodes[0], &node.dir.path().join("lbagent.yaml"));
    assert!(
        stdout.contains("peers drop the routes they kept"),
        "{stdout}"
    );
    assert!(
        wait_until(Duration::from_secs(5), || next_hops(
            &fabric.router,
            &format!("{V4}/32")
        )
        .is_empty()),
        "the router still has the route well inside its 120 s restart time"
    );
    assert!(pgrep_bird_in(&node).is_empty(), "a BIRD was left running");
}

/// BIRD processes whose command line names this node's state directory.
fn pgrep_bird_in(node: &RoutingNode) -> String {
    let out = lbagent_tests::run(
        "pgrep",
        &["-f", &format!("bird -f -c {}", node.dir.path().display())],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn metrics_show_each_session_and_the_routes_it_exports() {
    let (fabric, frr, node) = announced_node();
    let scrape = || {
        http_get(&fabric.nodes[0], METRICS.parse().unwrap(), "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    };
    let up4 = |name: &str| format!("lbagent_routing_{name}{{name=\"up4\",protocol=\"BGP\"}}");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let text = scrape();
            metric(&text, &up4("session_up")) == Some(1.0)
                && metric(&text, &up4("routes_exported")) == Some(1.0)
        }),
        "{}\n{}",
        scrape(),
        node.log()
    );
    assert_eq!(metric(&scrape(), "lbagent_bird_restarts_total"), Some(0.0));
    assert_eq!(
        metric(&scrape(), "lbagent_addresses{state=\"virtual\"}"),
        Some(1.0)
    );

    // The router goes away: the session is down within BIRD's next look.
    drop(frr);
    assert!(
        wait_until(Duration::from_secs(15), || metric(
            &scrape(),
            &up4("session_up")
        ) == Some(0.0)),
        "{}",
        scrape()
    );
}

#[test]
fn host_ip_from_the_downward_api_is_the_default_router_id() {
    let fabric = Fabric::new(1);
    let node = RoutingNode::new("lbt-route", &web_services(&[V4]), "", Some(BGP));
    let agent = Agent::start_with_env(
        &fabric.nodes[0],
        &node.dir.path().join("lbagent.yaml"),
        node.dir.path().join("agent.log"),
        &[("HOST_IP", "192.0.2.77")],
    );
    let rendered =
        || std::fs::read_to_string(node.dir.path().join("bird/bird.conf")).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(10), || rendered()
            .contains("router id 192.0.2.77;")),
        "{}\n{}",
        rendered(),
        agent.log()
    );
}

#[test]
fn the_readme_shows_the_frr_recipe_the_test_runs() {
    let readme = include_str!("../../README.md");
    let shown = format!("```\n{FRR_NODE_RECIPE}```");
    assert!(
        readme.contains(&shown),
        "README.md must show deploy/frr/bgpd.conf verbatim in a code block"
    );
}
