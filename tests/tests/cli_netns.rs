//! The real `lbagent` binary against the real kernel: a veth pair between two network
//! namespaces, real traffic, and counters read both by lbagent and by bpftool.

use std::{collections::BTreeMap, io::Write as _, net::IpAddr};

use lbagent_common::{PIN_LAYOUT_VERSION, maps};

use lbagent_tests::{LbagentRun, NetNs, Pair, PinRoot, lbagent, run_ok, unique_name, xdp_on};

const VIP4: &str = "203.0.113.10";
const VIP6: &str = "2001:db8:ff::10";
/// `ping` sends 56 data bytes: + ICMP 8 + IPv4 20 + Ethernet 14.
const PING4_FRAME: u64 = 98;
/// + ICMPv6 8 + IPv6 40 + Ethernet 14.
const PING6_FRAME: u64 = 118;

fn ping(from: &NetNs, to: &str, count: u32) {
    let count = count.to_string();
    let out = from.exec("ping", &["-c", &count, "-i", "0.05", "-W", "2", "-q", to]);
    assert!(
        out.status.success(),
        "ping {to} failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `lbagent counters -o json` as address -> (packets, bytes).
fn cli_counters(node: &NetNs, pins: &PinRoot) -> BTreeMap<IpAddr, (u64, u64)> {
    let run = lbagent(node, pins, &["counters", "-o", "json"]).assert_ok();
    let json: serde_json::Value = serde_json::from_str(&run.stdout).expect("counters json");
    json["vips"]
        .as_array()
        .expect("vips array")
        .iter()
        .map(|vip| {
            (
                vip["address"].as_str().unwrap().parse().unwrap(),
                (
                    vip["packets"].as_u64().unwrap(),
                    vip["bytes"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

/// `bpftool -j map dump pinned` of LB_VIP_CONFIG (slot -> address) and LB_VIP_STATS (slot ->
/// per-CPU counters), joined as address -> (packets, bytes), read from the BTF-formatted
/// (named) fields, summed over CPUs.
fn bpftool_counters(pins: &PinRoot) -> BTreeMap<IpAddr, (u64, u64)> {
    let dump = |map: &str| -> serde_json::Value {
        let path = pins.path().join(format!("v{PIN_LAYOUT_VERSION}")).join(map);
        let json = run_ok(
            "bpftool",
            &["-j", "map", "dump", "pinned", path.to_str().unwrap()],
        );
        serde_json::from_str(&json).expect("bpftool json")
    };
    let mut addresses = BTreeMap::new();
    for entry in dump(maps::VIP_CONFIG).as_array().expect("entries") {
        let formatted = &entry["formatted"];
        let config = &formatted["value"];
        let addr: Vec<u8> = config["addr"]
            .as_array()
            .expect("named field addr")
            .iter()
            .map(|b| b.as_u64().unwrap() as u8)
            .collect();
        let address: IpAddr = match config["family"].as_u64().expect("named field family") {
            0 => continue,
            4 => <[u8; 4]>::try_from(&addr[..4]).unwrap().into(),
            6 => <[u8; 16]>::try_from(&addr[..]).unwrap().into(),
            other => panic!("unexpected family {other}"),
        };
        addresses.insert(formatted["key"].as_u64().expect("slot"), address);
    }
    let mut counters = BTreeMap::new();
    for entry in dump(maps::VIP_STATS).as_array().expect("entries") {
        let formatted = &entry["formatted"];
        let Some(address) = addresses.get(&formatted["key"].as_u64().expect("slot")) else {
            continue;
        };
        let mut total = (0, 0);
        for per_cpu in formatted["values"].as_array().expect("per-cpu values") {
            total.0 += per_cpu["value"]["packets"]
                .as_u64()
                .expect("named field packets");
            total.1 += per_cpu["value"]["bytes"]
                .as_u64()
                .expect("named field bytes");
        }
        counters.insert(*address, total);
    }
    counters
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn traffic_to_vips_is_counted_by_lbagent_and_bpftool_and_detach_leaves_nothing() {
    let pair = Pair::new(&[VIP4, VIP6]);
    let pins = PinRoot::new();

    let attach = lbagent(&pair.node, &pins, &["attach", "eth0"]).assert_ok();
    assert!(
        attach.stdout.contains("in driver mode"),
        "{}",
        attach.stdout
    );
    let attached = xdp_on(&pair.node, "eth0").expect("attached");
    assert_eq!(
        (attached.name.as_str(), attached.mode.as_str()),
        ("lbagent_xdp", "driver")
    );
    lbagent(&pair.node, &pins, &["vip", "add", VIP4, VIP6]).assert_ok();

    ping(&pair.client, VIP4, 5);
    ping(&pair.client, VIP6, 3);
    // Traffic to the node's own address is not LB traffic.
    ping(&pair.client, Pair::NODE_V4, 4);

    let expected = BTreeMap::from([
        (ip(VIP4), (5, 5 * PING4_FRAME)),
        (ip(VIP6), (3, 3 * PING6_FRAME)),
    ]);
    assert_eq!(cli_counters(&pair.node, &pins), expected);
    assert_eq!(bpftool_counters(&pins), expected);
    // Every echo request got a reply, which left from the VIP through the tc egress counter.
    let json: serde_json::Value = serde_json::from_str(
        &lbagent(&pair.node, &pins, &["counters", "-o", "json"])
            .assert_ok()
            .stdout,
    )
    .unwrap();
    let v4 = json["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["address"] == VIP4)
        .unwrap();
    assert_eq!(
        (v4["tx_packets"].as_u64(), v4["tx_bytes"].as_u64()),
        (Some(5), Some(5 * PING4_FRAME))
    );

    let table = lbagent(&pair.node, &pins, &["counters"]).assert_ok().stdout;
    let row = table
        .lines()
        .find(|l| l.starts_with(VIP4))
        .expect("VIP4 row");
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        [VIP4, "5", &(5 * PING4_FRAME).to_string()]
    );

    // Removing an address removes its counters; the other keeps counting.
    lbagent(&pair.node, &pins, &["vip", "del", VIP4]).assert_ok();
    ping(&pair.client, VIP6, 1);
    assert_eq!(
        cli_counters(&pair.node, &pins),
        BTreeMap::from([(ip(VIP6), (4, 4 * PING6_FRAME))])
    );

    let detach = lbagent(&pair.node, &pins, &["detach", "eth0"]).assert_ok();
    assert!(detach.stdout.contains("maps removed"), "{}", detach.stdout);
    assert_eq!(xdp_on(&pair.node, "eth0"), None);
    pins.assert_removed();
    assert!(
        !bpftool_programs().contains(&attached.id),
        "program {} is still loaded",
        attached.id
    );
}

#[test]
fn attaching_again_swaps_the_program_and_keeps_counters() {
    let pair = Pair::new(&[VIP4]);
    let pins = PinRoot::new();
    lbagent(&pair.node, &pins, &["attach", "eth0"]).assert_ok();
    lbagent(&pair.node, &pins, &["vip", "add", VIP4]).assert_ok();
    ping(&pair.client, VIP4, 2);
    let first = xdp_on(&pair.node, "eth0").expect("attached");

    let again = lbagent(&pair.node, &pins, &["attach", "eth0"]).assert_ok();
    assert!(again.stdout.contains("replaced"), "{}", again.stdout);
    let second = xdp_on(&pair.node, "eth0").expect("still attached");
    assert_ne!(first.id, second.id, "a new program took the link");
    assert_eq!(second.mode, "driver");

    ping(&pair.client, VIP4, 3);
    assert_eq!(
        cli_counters(&pair.node, &pins),
        BTreeMap::from([(ip(VIP4), (5, 5 * PING4_FRAME))])
    );
}

#[test]
fn an_interface_without_native_xdp_falls_back_to_generic_mode_with_a_log_line() {
    let node = NetNs::new("lbt-ifb");
    node.ip(&["link", "add", "ifb0", "type", "ifb"]);
    node.ip(&["link", "set", "ifb0", "up"]);
    let pins = PinRoot::new();

    let run = lbagent(&node, &pins, &["attach", "ifb0"]).assert_ok();
    assert!(run.stdout.contains("in generic mode"), "{}", run.stdout);
    assert!(
        run.stderr.contains("falling back to generic mode") && run.stderr.contains("ifb0"),
        "no fallback log line: {:?}",
        run.stderr
    );
    assert_eq!(
        xdp_on(&node, "ifb0").map(|x| x.mode),
        Some("generic".to_owned())
    );

    let strict = lbagent(&node, &pins, &["detach", "ifb0"]).assert_ok();
    assert!(strict.stdout.contains("maps removed"));
    let refused = lbagent(&node, &pins, &["attach", "ifb0", "--mode", "driver"]);
    refused.assert_one_line_error("driver-mode XDP refused on ifb0");
    assert_eq!(xdp_on(&node, "ifb0"), None);
    pins.assert_removed();
}

/// Two namespaces share bpffs and, here, a pin root; their interfaces have the same ifindex.
/// Each must keep its own link.
#[test]
fn namespaces_with_equal_ifindexes_keep_separate_links() {
    let a = Pair::new(&[VIP4]);
    let b = Pair::new(&[VIP4]);
    let pins = PinRoot::new();
    lbagent(&a.node, &pins, &["attach", "eth0"]).assert_ok();
    let second = lbagent(&b.node, &pins, &["attach", "eth0"]).assert_ok();
    assert!(
        second.stdout.contains("attached to eth0"),
        "{}",
        second.stdout
    );
    assert!(xdp_on(&a.node, "eth0").is_some() && xdp_on(&b.node, "eth0").is_some());

    let detach_a = lbagent(&a.node, &pins, &["detach", "eth0"]).assert_ok();
    assert!(
        !detach_a.stdout.contains("maps removed"),
        "b still uses the maps"
    );
    assert_eq!(xdp_on(&a.node, "eth0"), None);
    assert!(xdp_on(&b.node, "eth0").is_some(), "b's program must stay");

    lbagent(&b.node, &pins, &["detach", "--all"]).assert_ok();
    assert_eq!(xdp_on(&b.node, "eth0"), None);
    pins.assert_removed();
}

#[test]
fn unknown_interface_is_one_error_line_and_changes_nothing() {
    let node = NetNs::new("lbt-bad");
    let pins = PinRoot::new();
    lbagent(&node, &pins, &["attach", "nope0"]).assert_one_line_error("\"nope0\" does not exist");
    lbagent(&node, &pins, &["detach", "nope0"]).assert_one_line_error("\"nope0\" does not exist");
    pins.assert_removed();
}

#[test]
fn malformed_addresses_are_one_error_line_and_change_nothing() {
    let pair = Pair::new(&[VIP4]);
    let pins = PinRoot::new();
    lbagent(&pair.node, &pins, &["attach", "eth0"]).assert_ok();
    lbagent(&pair.node, &pins, &["vip", "add", VIP4]).assert_ok();

    for (bad, needle) in [
        ("300.1.1.1", "\"300.1.1.1\": not an IPv4 or IPv6 address"),
        (
            "203.0.113.0/24",
            "\"203.0.113.0/24\": a load-balancer address is a single host",
        ),
        ("vip.example", "\"vip.example\""),
    ] {
        // The good address next to the bad one must not be applied either.
        lbagent(&pair.node, &pins, &["vip", "add", "198.51.100.7", bad])
            .assert_one_line_error(needle);
        lbagent(&pair.node, &pins, &["vip", "del", VIP4, bad]).assert_one_line_error(needle);
    }
    assert_eq!(
        cli_counters(&pair.node, &pins)
            .into_keys()
            .collect::<Vec<_>>(),
        [ip(VIP4)]
    );
}

#[test]
fn a_foreign_xdp_program_is_reported_and_left_alone() {
    let pair = Pair::new(&[VIP4]);
    let pins = PinRoot::new();
    // Any program lbagent did not attach through its pinned link is foreign, even one loaded
    // from lbagent's own object by `ip`.
    let object = std::env::temp_dir().join(format!("{}.o", unique_name("lbagent-foreign")));
    std::fs::File::create(&object)
        .and_then(|mut f| f.write_all(lbagent::object()))
        .expect("write object");
    let loaded = pair.node.exec(
        "ip",
        &[
            "link",
            "set",
            "dev",
            "eth0",
            "xdpgeneric",
            "obj",
            object.to_str().unwrap(),
            "sec",
            "xdp",
        ],
    );
    let _ = std::fs::remove_file(&object);
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );
    let foreign = xdp_on(&pair.node, "eth0").expect("foreign program attached");

    for mode in ["auto", "driver", "generic"] {
        lbagent(&pair.node, &pins, &["attach", "eth0", "--mode", mode])
            .assert_one_line_error("eth0 already has an XDP program that lbagent did not attach");
    }
    assert_eq!(
        xdp_on(&pair.node, "eth0"),
        Some(foreign),
        "the foreign program must stay"
    );
    pins.assert_removed();
}

#[test]
fn a_pin_root_outside_bpffs_is_one_error_line_and_creates_nothing() {
    let pair = Pair::new(&[VIP4]);
    let dir = std::env::temp_dir().join(unique_name("lbagent-nobpffs"));
    let root = dir.join("lbagent");
    let run = pair
        .node
        .command(&lbagent_tests::lbagent_bin())
        .arg("--pin-root")
        .arg(&root)
        .args(["attach", "eth0"])
        .output()
        .expect("run lbagent");
    let run = LbagentRun {
        status: run.status,
        stdout: String::from_utf8_lossy(&run.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&run.stderr).into_owned(),
    };
    run.assert_one_line_error("no bpf filesystem under");
    assert!(
        run.stderr.contains(root.to_str().unwrap()),
        "{}",
        run.stderr
    );
    assert!(!dir.exists(), "{} was created", dir.display());
    assert_eq!(xdp_on(&pair.node, "eth0"), None);
}

#[test]
fn commands_on_a_dataplane_that_is_not_loaded_say_what_to_do() {
    let pair = Pair::new(&[VIP4]);
    let pins = PinRoot::new();
    lbagent(&pair.node, &pins, &["vip", "add", VIP4])
        .assert_one_line_error("the dataplane is not loaded");
    lbagent(&pair.node, &pins, &["counters"]).assert_one_line_error("lbagent attach IFACE");
    lbagent(&pair.node, &pins, &["detach", "eth0"])
        .assert_one_line_error("no XDP program attached to eth0");
    assert!(!pins.path().exists());
}

fn bpftool_programs() -> Vec<u64> {
    let json = run_ok("bpftool", &["-j", "prog", "show"]);
    let progs: serde_json::Value = serde_json::from_str(&json).expect("bpftool json");
    progs
        .as_array()
        .expect("programs")
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect()
}
