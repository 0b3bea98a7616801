//! `cargo xtask demo`: lbagent counting real traffic between two network namespaces.
//!
//! Everything it creates (two namespaces, a veth pair, the pins) carries this process's id,
//! and a guard removes it all even when a step fails.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

const VIP4: &str = "203.0.113.10";
const VIP6: &str = "2001:db8:ff::10";
const NODE4: &str = "10.200.0.2";
const NODE6: &str = "fd00:200::2";

pub fn run() -> Result<()> {
    cmd::require_root("demo")?;
    cmd::cargo(&["build", "--quiet", "--package", "lbagent"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::workspace().join("target"));
    let lbagent = target.join("debug/lbagent");

    let lab = Lab::new()?;
    let client = &lab.client;
    let node = &lab.node;

    step(&format!(
        "Two network namespaces joined by a veth pair. {node} (10.200.0.2, fd00:200::2) holds \
         the load-balancer addresses {VIP4} and {VIP6}, as kube-lb0 will; {client} routes \
         them to it."
    ));
    show(Command::new("ip").args(["-n", node, "-br", "addr"]))?;

    step("lbagent attaches its XDP program to the node's eth0 (driver mode; generic if refused)");
    let pins = lab.pin_root.to_str().context("pin root is UTF-8")?;
    let agent = |args: &[&str]| {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{node}"))
            .arg("--")
            .arg(&lbagent)
            .args(["--pin-root", pins])
            .args(args);
        command
    };
    show(&mut agent(&["attach", "eth0"]))?;
    show(Command::new("ip").args(["-n", node, "link", "show", "eth0"]))?;

    step("lbagent adds the two addresses to the dataplane");
    show(&mut agent(&["vip", "add", VIP4, VIP6]))?;

    step(&format!(
        "Traffic from the client: 10 pings to {VIP4}, 5 to {VIP6}, and 4 to the node's own \
         address {NODE4}, which is not a load-balancer address and is not counted"
    ));
    for (target, count, flag) in [(VIP4, "10", "-4"), (VIP6, "5", "-6"), (NODE4, "4", "-4")] {
        show(
            Command::new("ip")
                .args(["netns", "exec", client, "ping", flag, "-c", count])
                .args(["-i", "0.05", "-q", target]),
        )?;
    }

    step("lbagent counters: frames and bytes per address, summed over CPUs");
    show(&mut agent(&["counters"]))?;
    show(&mut agent(&["counters", "-o", "json"]))?;

    let stats = lab
        .pin_root
        .join(format!("v{}", lbagent_common::PIN_LAYOUT_VERSION))
        .join(lbagent_common::maps::VIP_STATS);
    step(&format!(
        "bpftool map dump pinned {}: the same counters per CPU, with named fields from BTF",
        stats.display()
    ));
    show(
        Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(&stats),
    )?;

    step("lbagent detach: the program, the link and every pin go");
    show(&mut agent(&["detach", "eth0"]))?;
    show(Command::new("ip").args(["-n", node, "link", "show", "eth0"]))?;
    if lab.pin_root.exists() {
        bail!("{} still exists after detach", lab.pin_root.display());
    }
    println!("{} is gone", lab.pin_root.display());
    drop(lab);
    step("Done: the namespaces are deleted.");
    Ok(())
}

fn step(text: &str) {
    println!("\n== {text}");
}

/// Prints the command line and runs it; a failure stops the demo.
fn show(command: &mut Command) -> Result<()> {
    let line: Vec<String> = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect();
    println!("$ {}", line.join(" "));
    cmd::status(command)
}

/// Two namespaces and a pin root; all removed on drop.
struct Lab {
    client: String,
    node: String,
    pin_root: PathBuf,
}

impl Lab {
    fn new() -> Result<Self> {
        let id = std::process::id();
        let lab = Self {
            client: format!("lbdemo-client-{id}"),
            node: format!("lbdemo-node-{id}"),
            pin_root: Path::new("/sys/fs/bpf").join(format!("lbagent-demo-{id}")),
        };
        let ip = |args: &[&str]| cmd::output(Command::new("ip").args(args));
        let (client, node) = (lab.client.as_str(), lab.node.as_str());
        ip(&["netns", "add", client])?;
        ip(&["netns", "add", node])?;
        ip(&[
            "link", "add", "eth0", "netns", client, "type", "veth", "peer", "name", "eth0",
            "netns", node,
        ])?;
        for (ns, v4, v6) in [
            (client, "10.200.0.1/24", "fd00:200::1/64"),
            (node, "10.200.0.2/24", "fd00:200::2/64"),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "addr", "add", v4, "dev", "eth0"])?;
            ip(&["-n", ns, "addr", "add", v6, "dev", "eth0", "nodad"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("{VIP4}/32"),
            "dev",
            "lo",
        ])?;
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("{VIP6}/128"),
            "dev",
            "lo",
        ])?;
        ip(&[
            "-n",
            client,
            "route",
            "add",
            &format!("{VIP4}/32"),
            "via",
            NODE4,
        ])?;
        ip(&[
            "-n",
            client,
            "route",
            "add",
            &format!("{VIP6}/128"),
            "via",
            NODE6,
        ])?;
        Ok(lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.client, &self.node] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.pin_root);
    }
}
