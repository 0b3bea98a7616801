//! Where lbagent's files are, one rule for every subcommand: the pin root is `--pin-root`,
//! else `$LBAGENT_PIN_ROOT`, else the config's `dataplane.pinRoot`, else the default; and
//! `lbagent cleanup` removes what non-default paths name.

use std::{path::Path, process::Output, time::Duration};

use lbagent_tests::{
    NetNs, PinRoot, ServedNode, addresses_on, lbagent, lbagent_bin, wait_until, xdp_on,
};

const VIP4: &str = "203.0.113.10";

/// `lbagent ARGS` in `ns` with `$LBAGENT_PIN_ROOT` set to `root`, and no `--pin-root`.
fn with_variable(ns: &NetNs, root: &Path, args: &[&str]) -> Output {
    ns.command(&lbagent_bin())
        .env("LBAGENT_PIN_ROOT", root)
        .args(args)
        .output()
        .expect("run lbagent")
}

#[test]
fn with_the_variable_set_run_counters_and_status_use_the_same_pin_root() {
    let variable = PinRoot::new();
    let root = variable.path().display().to_string();
    let node = ServedNode::start_with_env(
        VIP4,
        &format!("services:\n- {{name: web, addresses: [{VIP4}], ports: [{{port: 80}}]}}\n"),
        "",
        "",
        &[("LBAGENT_PIN_ROOT", &root)],
        |_| {},
    );
    // The agent pinned under the variable's root, not the config's.
    assert!(
        wait_until(Duration::from_secs(10), || !variable
            .pinned_files()
            .is_empty()
            && xdp_on(&node.pair.node, "eth0").is_some()),
        "nothing pinned under {root}:\n{}",
        node.agent.log()
    );
    assert_eq!(node.pins.pinned_files(), Vec::<std::path::PathBuf>::new());

    // counters and status, with the same variable, find what the agent wrote.
    let counters = || {
        let run = with_variable(
            &node.pair.node,
            variable.path(),
            &["counters", "-o", "json"],
        );
        String::from_utf8_lossy(&run.stdout).into_owned()
    };
    assert!(
        wait_until(Duration::from_secs(10), || counters().contains(VIP4)),
        "{}\n{}",
        counters(),
        node.agent.log()
    );
    let status_file = node.status_file();
    let status = with_variable(
        &node.pair.node,
        variable.path(),
        &[
            "status",
            "--status-file",
            status_file.to_str().unwrap(),
            "-o",
            "json",
        ],
    );
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status as JSON");
    assert_eq!(status["dataplane"][0]["interface"], "eth0", "{status:#}");

    // The flag wins over the variable: the config's (empty) root has no maps.
    let flagged = node
        .pair
        .node
        .command(&lbagent_bin())
        .env("LBAGENT_PIN_ROOT", variable.path())
        .arg("--pin-root")
        .arg(node.pins.path())
        .args(["counters", "-o", "json"])
        .output()
        .expect("run lbagent");
    assert!(!flagged.status.success(), "{flagged:?}");
}

#[test]
fn cleanup_removes_what_its_flags_name_at_non_default_paths() {
    let node = ServedNode::start(
        VIP4,
        &format!("services:\n- {{name: web, addresses: [{VIP4}]}}\n"),
        "",
    );
    let status_file = node.status_file();
    assert!(
        wait_until(Duration::from_secs(10), || status_file.exists()
            && xdp_on(&node.pair.node, "eth0").is_some()),
        "{}",
        node.agent.log()
    );
    let ServedNode {
        pair,
        pins,
        dir,
        agent,
    } = node;
    assert!(agent.stop().success());
    // A managed BIRD's state directory somewhere else than /run/lbagent/bird.
    let state_dir = dir.path().join("state/bird");
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::write(state_dir.join("bird.conf"), "").unwrap();

    let run = lbagent(
        &pair.node,
        &pins,
        &[
            "cleanup",
            "--status-file",
            status_file.to_str().unwrap(),
            "--state-dir",
            state_dir.to_str().unwrap(),
        ],
    )
    .assert_ok();
    assert!(run.stdout.contains("kube-lb0: deleted"), "{}", run.stdout);
    assert!(
        run.stdout
            .contains(&format!("{}: removed", status_file.display())),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains(&format!("{}: removed", state_dir.display())),
        "{}",
        run.stdout
    );
    assert!(!status_file.exists());
    assert!(!state_dir.exists());
    assert!(addresses_on(&pair.node, "kube-lb0").is_empty());
    assert_eq!(xdp_on(&pair.node, "eth0"), None);
    assert_eq!(pins.pinned_files(), Vec::<std::path::PathBuf>::new());
}
