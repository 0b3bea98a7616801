//! The README's first command, `cargo xtask demo`, run as the README says, and its output
//! checked: both nodes are ECMP next hops for every address, the client is served, the
//! counters add up to what was sent, the outsider's packets are dropped by source, and
//! nothing of the run is left behind.

use std::{
    collections::BTreeMap,
    io::BufRead as _,
    path::Path,
    process::{Command, Stdio},
};

/// One demo at a time: `cargo xtask setup`, which the demo runs first, is not safe to run
/// twice at once (it recreates its libLLVM links), and the runs would share two CPUs.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `cargo xtask demo`, from the workspace root.
fn demo() -> Command {
    lbagent_tests::require_root();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(workspace).args(["xtask", "demo"]);
    command
}

#[test]
fn the_readme_demo_shows_ecmp_service_drops_and_counters_and_leaves_nothing() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let output = demo().output().expect("run cargo xtask demo");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "cargo xtask demo failed ({}):\n{out}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );

    // The router's table, as first shown: two next hops for each address of each family.
    for (address, hops) in [
        ("203.0.113.10", ["10.0.0.11", "10.0.0.12"]),
        ("203.0.113.20", ["10.0.0.11", "10.0.0.12"]),
        ("2001:db8:ff::10", ["fd00::11", "fd00::12"]),
        ("2001:db8:ff::20", ["fd00::11", "fd00::12"]),
    ] {
        assert_eq!(next_hops(&out, address), hops, "{address}:\n{out}");
    }

    // Every request of the client is answered, and both nodes answer some.
    let client = section(&out, "== The client");
    let answers: Vec<&str> = client
        .lines()
        .skip(1)
        .filter(|l| l.starts_with("  "))
        .flat_map(|l| l.split('|'))
        .collect();
    assert_eq!(answers.len(), 16, "{client}");
    assert!(
        answers.iter().all(|a| a.contains("hello from node-")),
        "{client}"
    );
    for node in ["hello from node-1", "hello from node-2"] {
        assert!(answers.iter().any(|a| a.contains(node)), "{client}");
    }
    // None of the outsider's is.
    let outsider = section(&out, "== The outsider");
    assert!(!outsider.contains("hello"), "{outsider}");

    // The counters of the two nodes add up to what the clients' kernels sent; the UDP
    // requests are one datagram each, so their numbers are known in advance.
    let mut counted = BTreeMap::<String, u64>::new();
    for node in ["node-1", "node-2"] {
        for (address, packets) in counters_table(&out, node) {
            *counted.entry(address).or_default() += packets;
        }
    }
    let tally = tally(&out);
    // (address, what was sent at least, whether exactly that, the outsider's tries)
    for (address, at_least, exactly, outsider_tries) in [
        // TCP: a handshake, the request's end and the answer's acknowledgements; plus the
        // outsider's SYNs, which are dropped.
        ("203.0.113.10", 4 * 3 + 2, false, 2),
        ("2001:db8:ff::10", 4 * 3, false, 0),
        // UDP: one datagram a request.
        ("203.0.113.20", 4, true, 0),
        ("2001:db8:ff::20", 4 + 2, true, 2),
    ] {
        let (sent, drop_source, from_outsider) = tally[address];
        assert_eq!(counted[address], sent, "{address}:\n{out}");
        assert!(sent >= at_least, "{address}: sent {sent}\n{out}");
        if exactly {
            assert_eq!(sent, at_least, "{address}\n{out}");
        }
        assert!(from_outsider >= outsider_tries, "{address}:\n{out}");
        assert_eq!(drop_source, from_outsider, "{address}:\n{out}");
    }

    // bpftool shows the drop by its field's name; status shows the sessions; the removed
    // service's routes went.
    let bpftool = section(&out, "== The same counters from the kernel");
    let drop_source: u64 = bpftool
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("\"drop_source\": ")?
                .trim_end_matches(',')
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(drop_source >= 1, "{bpftool}");
    let status = section(&out, "== `lbagent status`");
    assert!(
        status.contains("203.0.113.10") && status.contains("Established"),
        "{status}"
    );
    let removed = section(&out, "== game is removed");
    assert!(
        removed.contains("203.0.113.10") && !removed.contains("203.0.113.20"),
        "{removed}"
    );

    assert_nothing_left(run_id(&out));
}

#[test]
fn ctrl_c_in_the_middle_of_the_demo_leaves_nothing() {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut child = demo()
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run cargo xtask demo");
    // Up to the traffic: the router, both agents, their BIRDs and the servers all run.
    let mut seen = String::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.starts_with("== The client") {
            break;
        }
    }
    assert!(
        seen.contains("== The client"),
        "the demo stopped early:\n{seen}"
    );
    // cargo execs xtask: this is the demo's own process.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status}\n{seen}");
    assert_nothing_left(run_id(&seen));
}

/// The process id in the run's namespace names.
fn run_id(out: &str) -> String {
    out.split("lbdemo-")
        .nth(1)
        .and_then(|rest| rest.split('-').next())
        .expect("the run's id in its namespace names")
        .to_owned()
}

/// No namespace, pin root, file or process of run `id` is left.
fn assert_nothing_left(id: String) {
    let prefix = format!("lbdemo-{id}-");
    let namespaces = lbagent_tests::run_ok("ip", &["netns", "list"]);
    assert!(!namespaces.contains(&prefix), "{namespaces}");
    let pins: Vec<_> = std::fs::read_dir(lbagent_tests::BPFFS)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(pins.is_empty(), "{pins:?}");
    assert!(!std::env::temp_dir().join(format!("lbdemo-{id}")).exists());
    let processes = lbagent_tests::run("pgrep", &["-af", &format!("lbdemo-{id}")]);
    assert!(
        processes.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&processes.stdout)
    );
}

/// From the header that starts with `header` to the next one.
fn section<'a>(out: &'a str, header: &str) -> &'a str {
    let start = out
        .find(header)
        .unwrap_or_else(|| panic!("no {header:?} in:\n{out}"));
    let rest = &out[start..];
    let end = rest[header.len()..]
        .find("\n==")
        .map_or(rest.len(), |i| i + header.len());
    &rest[..end]
}

/// The gateways listed under `address` where the router's table is first shown, sorted.
fn next_hops<'a>(out: &'a str, address: &str) -> Vec<&'a str> {
    let mut lines = out
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{address} ")))
        .skip(1);
    let mut hops: Vec<&str> = std::iter::from_fn(|| lines.next())
        .map_while(|l| l.trim_start().strip_prefix("nexthop via "))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    hops.sort_unstable();
    hops
}

/// `lbagent counters` on `node`, as the demo printed it: packets per address.
fn counters_table(out: &str, node: &str) -> Vec<(String, u64)> {
    let command = out
        .lines()
        .position(|l| l.contains(&format!("{node} --")) && l.ends_with(" counters"))
        .unwrap_or_else(|| panic!("no `lbagent counters` on {node}:\n{out}"));
    out.lines()
        .skip(command + 2)
        .map_while(|l| {
            let mut fields = l.split_whitespace();
            let address = fields.next()?;
            let packets = fields.next()?.parse().ok()?;
            Some((address.to_owned(), packets))
        })
        .collect()
}

/// The demo's tally: per address, (sent, drop_source counted, sent by the outsider).
fn tally(out: &str) -> BTreeMap<String, (u64, u64, u64)> {
    section(out, "== What the clients' kernels sent")
        .lines()
        .filter(|l| l.ends_with("adds up") || l.ends_with("DIFFERS"))
        .map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let number = |i: usize| fields[i].parse::<u64>().expect("a count");
            (fields[0].to_owned(), (number(1), number(5), number(4)))
        })
        .collect()
}
