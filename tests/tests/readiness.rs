//! `/readyz` tells the truth: a configured part that is off (the dataplane's maps held by
//! another agent, a directory where a map pin should be, a routing state directory that
//! cannot be made) makes the agent not ready, with the reason in the body, logged once and
//! retried with backoff until it recovers; then the agent is ready.

use std::{net::SocketAddr, time::Duration};

use lbagent_tests::{Agent, Pair, ServedNode, TempDir, http_get, wait_until, xdp_on};

const VIP4: &str = "203.0.113.10";
/// Inside each node's namespace, so every node can use the same.
const HTTP: &str = "127.0.0.1:9658";

fn services() -> String {
    format!("services:\n- {{name: web, addresses: [{VIP4}], ports: [{{port: 80}}]}}\n")
}

fn readyz(ns: &lbagent_tests::NetNs) -> Option<(u16, String)> {
    http_get(ns, HTTP.parse::<SocketAddr>().unwrap(), "/readyz")
}

/// Waits for `/readyz` to answer 503 with `reason` in its body.
fn wait_not_ready(ns: &lbagent_tests::NetNs, reason: &str, log: impl Fn() -> String) {
    assert!(
        wait_until(Duration::from_secs(30), || readyz(ns)
            .is_some_and(|(code, body)| code == 503 && body.contains(reason))),
        "/readyz: {:?}, expected 503 with {reason:?}\n{}",
        readyz(ns),
        log()
    );
}

fn wait_ready(ns: &lbagent_tests::NetNs, log: impl Fn() -> String) {
    assert!(
        wait_until(Duration::from_secs(40), || readyz(ns)
            .is_some_and(|(code, _)| code == 200)),
        "/readyz: {:?}\n{}",
        readyz(ns),
        log()
    );
}

/// The reason is logged once, however many retries failed meanwhile.
fn logged_once(log: &str, reason: &str) {
    let count = log.lines().filter(|line| line.contains(reason)).count();
    assert_eq!(count, 1, "{reason:?} logged {count} times:\n{log}");
}

#[test]
fn a_second_agent_on_the_same_pin_root_is_not_ready_until_the_first_is_gone() {
    let first = ServedNode::start(VIP4, &services(), "");
    assert!(
        wait_until(Duration::from_secs(10), || xdp_on(&first.pair.node, "eth0")
            .is_some()),
        "{}",
        first.agent.log()
    );
    let pair = Pair::new(&[]);
    let dir = TempDir::new("lbt-ready");
    dir.write("services.yaml", &services());
    let config = dir.write(
        "lbagent.yaml",
        &format!(
            "source: {{file: {{path: services.yaml}}}}\nstatus: {{path: {}}}\n\
             dataplane: {{interfaces: [eth0], pinRoot: {}}}\nhttp: {{address: \"{HTTP}\"}}\n",
            dir.path().join("status.json").display(),
            first.pins.path().display()
        ),
    );
    let second = Agent::start(&pair.node, &config, dir.path().join("agent.log"));
    wait_not_ready(&pair.node, "dataplane is off", || second.log());
    // A few retries fail meanwhile (1 s, then 2 s): said once.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(readyz(&pair.node).map(|(code, _)| code), Some(503));
    logged_once(&second.log(), "dataplane is off");

    // The first agent goes: the second takes the maps over and is ready.
    let ServedNode {
        pair: _first_pair,
        pins: _pins,
        dir: _first_dir,
        agent: first_agent,
    } = first;
    assert!(first_agent.stop().success());
    wait_ready(&pair.node, || second.log());
    assert!(
        second.log().contains("the dataplane is on again"),
        "{}",
        second.log()
    );
    assert!(
        wait_until(Duration::from_secs(10), || xdp_on(&pair.node, "eth0")
            .is_some()),
        "{}",
        second.log()
    );
}

#[test]
fn a_directory_where_a_map_pin_should_be_makes_the_agent_not_ready_until_it_goes() {
    let blocked = std::cell::RefCell::new(None);
    let node = ServedNode::start_with(
        VIP4,
        &services(),
        "",
        &format!("http: {{address: \"{HTTP}\"}}\n"),
        |pins| {
            let dir = pins.path().join("v4/LB_VIPS_V4");
            std::fs::create_dir_all(&dir).expect("a directory in the map's place");
            *blocked.borrow_mut() = Some(dir);
        },
    );
    let blocked = blocked.into_inner().expect("made");
    wait_not_ready(&node.pair.node, "dataplane is off", || node.agent.log());
    assert!(
        readyz(&node.pair.node).is_some_and(|(_, body)| body.contains("LB_VIPS_V4")),
        "{:?}",
        readyz(&node.pair.node)
    );
    std::thread::sleep(Duration::from_secs(4));
    logged_once(&node.agent.log(), "dataplane is off");

    std::fs::remove_dir(&blocked).expect("remove the directory");
    wait_ready(&node.pair.node, || node.agent.log());
    assert!(
        wait_until(Duration::from_secs(10), || xdp_on(&node.pair.node, "eth0")
            .is_some()),
        "{}",
        node.agent.log()
    );
}

#[test]
fn a_routing_state_directory_that_cannot_be_made_makes_the_agent_not_ready_until_it_can() {
    let pair = Pair::new(&[]);
    let dir = TempDir::new("lbt-ready");
    dir.write("services.yaml", &services());
    // A file where a directory of the state directory's path must be.
    let blocker = dir.write("blocker", "");
    let config = dir.write(
        "lbagent.yaml",
        &format!(
            "source: {{file: {{path: services.yaml}}}}\nstatus: {{path: {}}}\n\
             http: {{address: \"{HTTP}\"}}\n\
             routing:\n  stateDir: {}\n  routerId: 10.200.0.2\n  bgp:\n    - {{neighbor: 10.200.0.1, asn: 64500, localAsn: 64512}}\n",
            dir.path().join("status.json").display(),
            blocker.join("bird").display()
        ),
    );
    let agent = Agent::start(&pair.node, &config, dir.path().join("agent.log"));
    wait_not_ready(&pair.node, "routing stopped", || agent.log());
    std::thread::sleep(Duration::from_secs(4));
    logged_once(&agent.log(), "routing stopped");

    std::fs::remove_file(&blocker).expect("remove the file");
    wait_ready(&pair.node, || agent.log());
    let status = || -> serde_json::Value {
        std::fs::read_to_string(dir.path().join("status.json"))
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    };
    assert!(
        wait_until(Duration::from_secs(10), || status()["routing"]["bird"]
            == "running"),
        "{:#}\n{}",
        status(),
        agent.log()
    );
}
