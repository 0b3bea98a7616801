//! `/metrics`, `/healthz` and `/readyz` of a running agent, scraped while real traffic flows:
//! the figures must be the traffic sent, not merely present.

use std::{net::SocketAddr, time::Duration};

use lbagent_tests::{
    Agent, Pair, ServedNode, Servers, TempDir, http_get, in_netns, metric, udp_ok, wait_until,
};

const VIP4: &str = "203.0.113.10";
const HTTP: &str = "127.0.0.1:9658";

fn http() -> SocketAddr {
    HTTP.parse().unwrap()
}

fn start(services: &str) -> ServedNode {
    ServedNode::start(VIP4, services, &format!("http: {{address: \"{HTTP}\"}}\n"))
}

fn get(node: &ServedNode, path: &str) -> Option<(u16, String)> {
    http_get(&node.pair.node, http(), path)
}

fn scrape(node: &ServedNode) -> String {
    match get(node, "/metrics") {
        Some((200, body)) => body,
        other => panic!("/metrics: {other:?}\n{}", node.agent.log()),
    }
}

#[test]
fn metrics_count_the_traffic_sent_and_dropped() {
    let node = start(&format!(
        "services:\n- name: dns\n  addresses: [{VIP4}]\n  ports: [{{port: 5353, protocol: UDP}}]\n"
    ));
    assert!(
        wait_until(Duration::from_secs(5), || get(&node, "/readyz")
            .is_some_and(|(code, _)| code == 200)),
        "{}",
        node.agent.log()
    );
    assert_eq!(get(&node, "/healthz").map(|r| r.0), Some(200));

    let allowed: SocketAddr = format!("{VIP4}:5353").parse().unwrap();
    let _servers = Servers::start(&node.pair.node, &[], &[allowed]);
    for _ in 0..10 {
        assert!(udp_ok(&node.pair.client, allowed));
    }
    // Datagrams to a port the service does not have: dropped by XDP, counted by reason.
    let denied: SocketAddr = format!("{VIP4}:9999").parse().unwrap();
    in_netns(&node.pair.client, move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..4 {
            socket.send_to(b"no", denied).unwrap();
        }
    });

    let address = format!("{{address=\"{VIP4}\"}}");
    let text = scrape(&node);
    let value = |sample: &str| metric(&text, sample);
    // Every datagram is 2 bytes of payload in UDP/IPv4/Ethernet: 14 + 20 + 8 + 2 = 44.
    assert_eq!(
        value(&format!(
            "lbagent_dataplane_received_packets_total{address}"
        )),
        Some(14.0),
        "{text}"
    );
    assert_eq!(
        value(&format!("lbagent_dataplane_received_bytes_total{address}")),
        Some(14.0 * 44.0),
        "{text}"
    );
    assert_eq!(
        value(&format!("lbagent_dataplane_sent_packets_total{address}")),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        value(&format!(
            "lbagent_dataplane_dropped_packets_total{{address=\"{VIP4}\",reason=\"port\"}}"
        )),
        Some(4.0),
        "{text}"
    );
    assert_eq!(
        value(&format!(
            "lbagent_dataplane_dropped_packets_total{{address=\"{VIP4}\",reason=\"source\"}}"
        )),
        Some(0.0),
        "{text}"
    );
    // Per service port: the 10 allowed datagrams (the 4 to port 9999 have no port entry).
    let port = format!("{{address=\"{VIP4}\",protocol=\"UDP\",port=\"5353\"}}");
    assert_eq!(
        value(&format!(
            "lbagent_dataplane_port_received_packets_total{port}"
        )),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        value(&format!(
            "lbagent_dataplane_port_received_bytes_total{port}"
        )),
        Some(10.0 * 44.0),
        "{text}"
    );
    assert_eq!(
        value("lbagent_addresses{state=\"virtual\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(value("lbagent_services_rejected"), Some(0.0), "{text}");
    assert_eq!(
        value("lbagent_reconcile_failures_total"),
        Some(0.0),
        "{text}"
    );
    assert!(
        value("lbagent_reconciles_total{trigger=\"desired\"}").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(
        value("lbagent_reconcile_duration_seconds_count").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        value(&format!(
            "lbagent_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        )),
        Some(1.0),
        "{text}"
    );

    // A rejected service shows in the gauge at the next reconcile.
    node.dir.write(
        "services.yaml",
        &format!(
            "services:\n- name: dns\n  addresses: [{VIP4}]\n  ports: [{{port: 5353, protocol: UDP}}]\n\
             - name: bad\n  addresses: [not-an-address]\n"
        ),
    );
    assert!(
        wait_until(Duration::from_secs(5), || metric(
            &scrape(&node),
            "lbagent_services_rejected"
        ) == Some(1.0)),
        "{}",
        scrape(&node)
    );
}

#[test]
fn not_ready_until_the_source_gave_a_first_complete_state() {
    // An empty file is not a state (it could be half written): nothing is applied yet.
    let node = start("");
    assert!(
        wait_until(Duration::from_secs(5), || get(&node, "/healthz").is_some()),
        "{}",
        node.agent.log()
    );
    let (code, body) = get(&node, "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("waiting for the source"), "{body}");
    node.dir.write(
        "services.yaml",
        &format!("services:\n- name: web\n  addresses: [{VIP4}]\n  ports: [{{port: 80}}]\n"),
    );
    assert!(
        wait_until(Duration::from_secs(5), || get(&node, "/readyz")
            .is_some_and(|(code, _)| code == 200)),
        "{}",
        node.agent.log()
    );
}

#[test]
fn a_port_in_use_is_one_clear_error() {
    let pair = Pair::new(&[]);
    let busy = in_netns(&pair.node, || std::net::TcpListener::bind(HTTP).unwrap());
    let dir = TempDir::new("lbt-metrics");
    dir.write("services.yaml", "services: []\n");
    dir.write(
        "lbagent.yaml",
        &format!(
            "source: {{file: {{path: services.yaml}}}}\nstatus: {{path: {}}}\nhttp: {{address: \"{HTTP}\"}}\n",
            dir.path().join("status.json").display()
        ),
    );
    let mut agent = Agent::start(
        &pair.node,
        &dir.path().join("lbagent.yaml"),
        dir.path().join("agent.log"),
    );
    assert!(
        wait_until(Duration::from_secs(5), || agent.exited().is_some()),
        "{}",
        agent.log()
    );
    assert!(
        agent.log().contains(&format!(
            "cannot serve HTTP on {HTTP}: Address already in use"
        )),
        "{}",
        agent.log()
    );
    drop(busy);
}
