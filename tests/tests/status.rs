//! `lbagent status` and `lbagent counters --watch` against a running agent: what they print
//! must be what the kernel holds and the traffic sent.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::Stdio,
    time::{Duration, SystemTime},
};

use lbagent_tests::{
    Pair, PinRoot, ServedNode, Servers, addresses_on, lbagent, lbagent_bin, udp_ok, wait_until,
    xdp_on,
};

const VIP4: &str = "203.0.113.10";

fn start(services: &str) -> ServedNode {
    ServedNode::start(VIP4, services, "")
}

fn status_json(node: &ServedNode) -> serde_json::Value {
    let status_file = node.status_file();
    let run = lbagent(
        &node.pair.node,
        &node.pins,
        &[
            "status",
            "--status-file",
            status_file.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    serde_json::from_str(&run.stdout).unwrap_or_default()
}

#[test]
fn status_shows_what_the_kernel_holds_and_what_is_degraded() {
    let node = start(&format!(
        "services:\n- name: web\n  addresses: [{VIP4}]\n  ports: [{{port: 80}}]\n"
    ));
    assert!(
        wait_until(Duration::from_secs(5), || status_json(&node)["dataplane"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
            && status_json(&node)["addresses"]
                .as_array()
                .is_some_and(|a| !a.is_empty())),
        "{:#}\n{}",
        status_json(&node),
        node.agent.log()
    );
    let status = status_json(&node);
    let shown: Vec<String> = status["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "virtual")
        .map(|a| format!("{}/32", a["address"].as_str().unwrap()))
        .collect();
    let held: Vec<String> = addresses_on(&node.pair.node, "kube-lb0")
        .into_iter()
        .collect();
    assert_eq!(shown, held);
    let eth0 = &status["dataplane"][0];
    assert_eq!(eth0["interface"], "eth0", "{status:#}");
    let kernel = xdp_on(&node.pair.node, "eth0").expect("XDP on eth0");
    assert_eq!(eth0["xdp"], kernel.mode.as_str(), "{status:#}");
    assert_eq!(eth0["egress"], true, "{status:#}");
    assert_eq!(status["degraded"], serde_json::json!([]), "{status:#}");

    // The table says the same, and that nothing is degraded.
    let status_file = node.dir.path().join("status.json");
    let table = lbagent(
        &node.pair.node,
        &node.pins,
        &["status", "--status-file", status_file.to_str().unwrap()],
    )
    .assert_ok()
    .stdout;
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("eth0 ") && l.contains(&kernel.mode) && l.ends_with("tc")),
        "{table}"
    );
    assert!(table.contains("nothing degraded"), "{table}");

    // A rejected service is degraded, named with its reason.
    node.dir.write(
        "services.yaml",
        &format!(
            "services:\n- name: web\n  addresses: [{VIP4}]\n  ports: [{{port: 80}}]\n- name: bad\n  addresses: [203.0.113.0/24]\n"
        ),
    );
    assert!(
        wait_until(Duration::from_secs(5), || status_json(&node)["degraded"]
            .as_array()
            .is_some_and(|d| d.iter().any(|line| line.as_str().is_some_and(
                |l| l.starts_with("service bad rejected: ") && l.contains("203.0.113.0/24")
            )))),
        "{:#}",
        status_json(&node)
    );
}

#[test]
fn status_without_an_agent_says_so() {
    let pair = Pair::new(&[]);
    let pins = PinRoot::new();
    lbagent(
        &pair.node,
        &pins,
        &[
            "status",
            "--status-file",
            "/nonexistent/lbagent/status.json",
        ],
    )
    .assert_one_line_error("is `lbagent run` running with this status file?");
}

#[test]
fn counters_watch_shows_rates_of_the_traffic_sent() {
    let node = start(&format!(
        "services:\n- name: dns\n  addresses: [{VIP4}]\n  ports: [{{port: 5353, protocol: UDP}}]\n"
    ));
    let target: SocketAddr = format!("{VIP4}:5353").parse().unwrap();
    // A generous deadline: on a loaded machine the agent took more than 5 s to serve it.
    assert!(
        wait_until(Duration::from_secs(30), || addresses_on(
            &node.pair.node,
            "kube-lb0"
        )
        .contains(&format!("{VIP4}/32"))),
        "{}",
        node.agent.log()
    );
    // The address sink puts the address on kube-lb0 before the dataplane sink counts it.
    let counted = || {
        let run = lbagent(&node.pair.node, &node.pins, &["counters", "-o", "json"]);
        serde_json::from_str::<serde_json::Value>(&run.stdout).is_ok_and(|counters| {
            counters["vips"]
                .as_array()
                .is_some_and(|vips| vips.iter().any(|vip| vip["address"] == VIP4))
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), counted),
        "{}",
        node.agent.log()
    );
    let _servers = Servers::start(&node.pair.node, &[], &[target]);
    let mut watch = node
        .pair
        .node
        .command(&lbagent_bin())
        .arg("--pin-root")
        .arg(node.pins.path())
        .args([
            "counters",
            "--watch",
            "--interval",
            "2s",
            "--count",
            "2",
            "-o",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run lbagent counters --watch");
    let mut lines = BufReader::new(watch.stdout.take().unwrap()).lines();
    let first_line = lines.next().expect("a first frame").unwrap();
    // Traffic after the first read (its frame has been printed), not after a guessed delay:
    // a loaded machine starts the command late.
    let answered = (0..20)
        .filter(|_| udp_ok(&node.pair.client, target))
        .count() as u64;
    let answered_by = SystemTime::now();
    assert!(answered > 0, "no datagram answered");
    let second_line = lines.next().expect("a second frame").unwrap();
    assert!(lines.next().is_none(), "two frames for --count 2");
    let run = watch.wait_with_output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let frames: Vec<serde_json::Value> = [&first_line, &second_line]
        .iter()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let output = format!("{first_line}\n{second_line}");
    let first = &frames[0]["vips"][0];
    assert_eq!(first["address"], VIP4, "{output}");
    assert!(
        first["rx_pps"].is_null() && frames[0]["elapsed_s"].is_null(),
        "no rate on the first read: {output}"
    );
    let second = &frames[1]["vips"][0];
    let sent = second["packets"].as_u64().unwrap() - first["packets"].as_u64().unwrap();
    let rate = second["rx_pps"].as_f64().unwrap();
    let elapsed = frames[1]["elapsed_s"].as_f64().unwrap();
    // A loaded machine stretches the time between reads: the frame says what it was, and
    // the rate is what arrived between the reads over exactly that time.
    assert!(
        elapsed >= 2.0,
        "reads at least the interval apart: {output}"
    );
    assert!(
        (rate * elapsed - sent as f64).abs() <= 1e-9 * sent as f64,
        "rate {rate}/s over {elapsed} s for {sent} packets: {output}"
    );
    let read_at = |frame: &serde_json::Value| {
        humantime::parse_rfc3339(frame["read_at"].as_str().unwrap()).unwrap()
    };
    assert!(read_at(&frames[0]) < read_at(&frames[1]), "{output}");
    // A datagram is counted before its answer comes back: all those answered before the
    // second read are in it (one that went unanswered may be too).
    assert!(sent <= 20, "{output}");
    if answered_by < read_at(&frames[1]) {
        assert!(sent >= answered, "{answered} answered: {output}");
    }

    let bad = lbagent(
        &node.pair.node,
        &node.pins,
        &["counters", "--interval", "1s"],
    );
    assert!(!bad.status.success());
    assert!(bad.stderr.contains("--watch"), "{}", bad.stderr);
}
