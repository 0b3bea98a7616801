//! The demo's network and processes. Every name carries this process's id, so two runs (or
//! a run and the tests) never meet; dropping the [`Lab`] kills what it started, deletes its
//! namespaces and removes its pins and files, whichever step failed.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// A namespace at the edge of the network: its address on its `eth0`, and the router's
/// address on the other side, which is its default gateway.
pub struct Host {
    pub name: &'static str,
    pub v4: &'static str,
    pub v6: &'static str,
    gateway4: &'static str,
    gateway6: &'static str,
    /// Whether the router's side is a port of its bridge: the nodes share one segment with
    /// it, as BGP peers on a rack's switch do.
    bridged: bool,
}

// The router's side of the nodes' segment is what the tests' FRR config listens on.
pub const NODES: [Host; 2] = [
    Host {
        name: "node-1",
        v4: "10.0.0.11",
        v6: "fd00::11",
        gateway4: "10.0.0.1",
        gateway6: "fd00::1",
        bridged: true,
    },
    Host {
        name: "node-2",
        v4: "10.0.0.12",
        v6: "fd00::12",
        gateway4: "10.0.0.1",
        gateway6: "fd00::1",
        bridged: true,
    },
];
pub const CLIENT: Host = Host {
    name: "client",
    v4: "198.51.100.10",
    v6: "2001:db8:c1::10",
    gateway4: "198.51.100.1",
    gateway6: "2001:db8:c1::1",
    bridged: false,
};
pub const OUTSIDER: Host = Host {
    name: "outsider",
    v4: "192.0.2.10",
    v6: "2001:db8:c2::10",
    gateway4: "192.0.2.1",
    gateway6: "2001:db8:c2::1",
    bridged: false,
};
pub const ROUTER: &str = "router";

/// The demo's namespaces, their processes and files.
pub struct Lab {
    id: u32,
    pub dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Lab {
    /// The namespaces (a router, the nodes and the two clients) with their links and
    /// addresses; nothing runs in them yet.
    pub fn build() -> Result<Self> {
        let id = std::process::id();
        let dir = dir(id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let lab = Self {
            id,
            dir,
            children: Vec::new(),
        };
        let no_dad = [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ];
        lab.add_namespace(
            ROUTER,
            &[
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
                // Spread flows over the ECMP next hops by ports too, not only by addresses.
                "net.ipv4.fib_multipath_hash_policy=1",
                "net.ipv6.fib_multipath_hash_policy=1",
                no_dad[0],
                no_dad[1],
            ],
        )?;
        let mut router = String::from(
            "link add br0 type bridge\nlink set br0 up\n\
             addr add 10.0.0.1/24 dev br0\naddr add fd00::1/64 dev br0 nodad\n",
        );
        for host in NODES.iter().chain([&CLIENT, &OUTSIDER]) {
            lab.add_namespace(host.name, &no_dad)?;
            let (ns, port) = (lab.ns(host.name), host.name);
            router.push_str(&format!(
                "link add {port} type veth peer name eth0 netns {ns}\n"
            ));
            if host.bridged {
                router.push_str(&format!("link set {port} master br0 up\n"));
            } else {
                router.push_str(&format!(
                    "link set {port} up\naddr add {}/24 dev {port}\naddr add {}/64 dev {port} nodad\n",
                    host.gateway4, host.gateway6
                ));
            }
        }
        lab.ip_batch(ROUTER, &router)?;
        for host in NODES.iter().chain([&CLIENT, &OUTSIDER]) {
            lab.ip_batch(
                host.name,
                &format!(
                    "link set eth0 up\naddr add {}/24 dev eth0\naddr add {}/64 dev eth0 nodad\n\
                     route add default via {}\nroute add ::/0 via {}\n",
                    host.v4, host.v6, host.gateway4, host.gateway6
                ),
            )?;
        }
        Ok(lab)
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// The full name of the namespace of `name` (a host's name, or [`ROUTER`]).
    pub fn ns(&self, name: &str) -> String {
        format!("{}{name}", prefix(self.id))
    }

    /// A pin root on bpffs for `name`'s dataplane, removed on drop whatever is in it.
    pub fn pin_root(&self, name: &str) -> PathBuf {
        Path::new(BPFFS).join(self.ns(name))
    }

    fn add_namespace(&self, name: &str, sysctls: &[&str]) -> Result<()> {
        let ns = self.ns(name);
        cmd::output(Command::new("ip").args(["netns", "add", &ns]))?;
        cmd::output(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]))?;
        cmd::output(
            Command::new("ip")
                .args(["netns", "exec", &ns, "sysctl", "-qw"])
                .args(sysctls),
        )?;
        Ok(())
    }

    /// Runs `ip` commands, one a line, in `name`'s namespace.
    fn ip_batch(&self, name: &str, commands: &str) -> Result<()> {
        let file = self.dir.join(format!("{name}.ip"));
        std::fs::write(&file, commands)?;
        cmd::output(
            Command::new("ip")
                .args(["-n", &self.ns(name), "-batch"])
                .arg(&file),
        )?;
        Ok(())
    }

    /// A command that runs in `name`'s network namespace. `nsenter --net` rather than
    /// `ip netns exec`, which remounts /sys and so would hide bpffs.
    pub fn in_ns(&self, name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command
            .current_dir(cmd::workspace())
            .arg(format!("--net=/run/netns/{}", self.ns(name)))
            .arg("--")
            .arg(program);
        command
    }

    /// Starts a long-running process, its output going to `<dir>/<label>.log`; it is
    /// killed on drop unless [`Lab::stop`] stopped it first.
    pub fn spawn(&mut self, label: &str, command: &mut Command) -> Result<u32> {
        let log = std::fs::File::create(self.log_path(label))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {command:?}"))?;
        let pid = child.id();
        self.children.push((label.to_owned(), child));
        Ok(pid)
    }

    /// SIGTERM to the process started as `label`, and its exit status.
    pub fn stop(&mut self, label: &str) -> Result<ExitStatus> {
        let index = self
            .children
            .iter()
            .position(|(l, _)| l == label)
            .with_context(|| format!("{label} is not running"))?;
        let (_, mut child) = self.children.remove(index);
        Ok(cmd::terminate(&mut child)?)
    }

    pub fn log_path(&self, label: &str) -> PathBuf {
        self.dir.join(format!("{label}.log"))
    }

    /// The last lines each process wrote, to explain a failed step.
    pub fn print_logs(&self) {
        for (label, _) in &self.children {
            let log = std::fs::read_to_string(self.log_path(label)).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- {label} (last lines of its log)");
            for line in &lines[lines.len().saturating_sub(15)..] {
                eprintln!("{line}");
            }
        }
    }

    /// zebra and bgpd in the router namespace, with `bgpd_conf`, every file in one
    /// directory of their own.
    pub fn start_frr(&mut self, bgpd_conf: &str) -> Result<()> {
        let dir = self.frr_dir();
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("zebra.conf"), "hostname router\n")?;
        std::fs::write(dir.join("bgpd.conf"), bgpd_conf)?;
        // The daemons drop to the frr user, and write their pid files and sockets here.
        cmd::output(Command::new("chown").arg("frr:frr").arg(&dir))?;
        let path = |name: &str| dir.join(name).display().to_string();
        for (daemon, ready) in [("zebra", "zserv.api"), ("bgpd", "bgpd.vty")] {
            let ns = self.ns(ROUTER);
            self.spawn(
                daemon,
                Command::new("ip")
                    .args(["netns", "exec", &ns, &format!("/usr/lib/frr/{daemon}")])
                    .args(["-f", &path(&format!("{daemon}.conf"))])
                    .args(["-i", &path(&format!("{daemon}.pid"))])
                    .args(["-z", &path("zserv.api"), "--vty_socket", &path("")])
                    .args(["-P", "0"]),
            )?;
            wait_until(Duration::from_secs(10), || dir.join(ready).exists())
                .with_context(|| format!("{daemon} did not start"))?;
        }
        Ok(())
    }

    fn frr_dir(&self) -> PathBuf {
        self.dir.join("frr")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // SIGKILL: lbagent's BIRD dies with it (PR_SET_PDEATHSIG), and nothing here needs
        // a graceful stop, since the namespaces go next.
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        remove_all(self.id);
    }
}

const BPFFS: &str = "/sys/fs/bpf";

/// What every name of run `id` starts with.
pub fn prefix(id: u32) -> String {
    format!("lbdemo-{id}-")
}

fn dir(id: u32) -> PathBuf {
    std::env::temp_dir().join(format!("lbdemo-{id}"))
}

/// Removes everything of run `id`, found by name: kills what still runs in its namespaces
/// and deletes them, then removes its pin roots and its files. Also what Ctrl-C runs, when
/// the [`Lab`] itself cannot be dropped.
pub fn remove_all(id: u32) {
    let prefix = prefix(id);
    let listed = cmd::output(Command::new("ip").args(["netns", "list"])).unwrap_or_default();
    for ns in listed
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&prefix))
    {
        let pids = cmd::output(Command::new("ip").args(["netns", "pids", ns])).unwrap_or_default();
        for pid in pids.split_whitespace().filter_map(|pid| pid.parse().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = Command::new("ip").args(["netns", "del", ns]).status();
    }
    for root in leftover_pin_roots(id) {
        let _ = std::fs::remove_dir_all(root);
    }
    let _ = std::fs::remove_dir_all(dir(id));
}

/// The pin roots of run `id` still on bpffs.
pub fn leftover_pin_roots(id: u32) -> Vec<PathBuf> {
    let prefix = prefix(id);
    std::fs::read_dir(BPFFS)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .map(|entry| entry.path())
        .collect()
}

/// Polls `condition` every 20 ms; how long it took, or an error after `timeout`.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> Result<Duration> {
    let started = Instant::now();
    while !condition() {
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(started.elapsed())
}
