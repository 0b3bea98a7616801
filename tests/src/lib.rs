//! Helpers for lbagent's integration tests: each is written once here and reused.
//!
//! Every helper that creates kernel state (namespaces, links, pins) is a guard that removes it
//! on drop, so a failing test leaves nothing behind; every name carries the process id and a
//! counter, so two runs (or two tests in one run) never collide.

pub mod apiserver;
pub mod frame;
pub mod kubelet;
pub mod model;
pub mod routers;
pub mod testrun;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

/// A name no other test, and no concurrent run, uses: `<prefix>-<pid>-<n>`.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A guard could not undo what it made: the test fails, naming what is left behind, unless
/// it is failing already (a panic while unwinding aborts and hides the first message; then
/// the leftover is only printed).
pub fn cleanup_failed(what: std::fmt::Arguments<'_>) {
    if std::thread::panicking() {
        eprintln!("cleanup failed too: {what}");
    } else {
        panic!("cleanup failed: {what}");
    }
}

/// Removes a directory tree a guard made; one already gone is fine (a test may remove it).
fn remove_tree(path: &Path) {
    // A process being killed by a guard that drops later may still write one last file
    // (a status file): a few retries tell that race from a real failure.
    for attempt in 0.. {
        match std::fs::remove_dir_all(path) {
            Ok(()) => return,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
            Err(err) if err.kind() == std::io::ErrorKind::DirectoryNotEmpty && attempt < 20 => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(err) => {
                return cleanup_failed(format_args!("removing {}: {err}", path.display()));
            }
        }
    }
}

/// Kills a child process a guard started and reaps it (one that already exited is fine).
pub fn kill_child(child: &mut std::process::Child, what: &str) {
    if let Err(err) = child.kill() {
        cleanup_failed(format_args!("killing {what} (pid {}): {err}", child.id()));
    }
    if let Err(err) = child.wait() {
        cleanup_failed(format_args!("reaping {what} (pid {}): {err}", child.id()));
    }
}

/// These tests drive the real kernel; without root they cannot run, and must not pretend to.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "lbagent's integration tests need root (network namespaces, XDP, bpffs); run them as root"
    );
}

/// Runs a command and returns its output, panicking with the command line and stderr if it
/// cannot be started.
pub fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program} {args:?}: {err}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace, deleted on drop (which also deletes its interfaces and, with them,
/// any XDP program attached to them).
pub struct NetNs {
    name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Self {
        require_root();
        let name = unique_name(prefix);
        run_ok("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A namespace whose one interface is `eth0` (a veth, its peer `eth0peer` left inside),
    /// up with `address`, as a node's uplink.
    pub fn with_eth0(prefix: &str, address: &str) -> Self {
        let ns = Self::new(prefix);
        ns.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer",
        ]);
        ns.ip(&["addr", "add", address, "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns
    }

    /// The pids of the processes named `comm` (as /proc shows it) that live in this namespace.
    pub fn processes(&self, comm: &str) -> Vec<u32> {
        use std::os::unix::fs::MetadataExt as _;
        let netns = std::fs::metadata(format!("/run/netns/{}", self.name))
            .expect("the namespace")
            .ino();
        std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm)
                    && std::fs::metadata(format!("/proc/{pid}/ns/net"))
                        .is_ok_and(|m| m.ino() == netns)
            })
            .collect()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> ARGS`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        run_ok("ip", &full)
    }

    /// `ip netns exec <ns> PROGRAM ARGS`.
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command that runs in this namespace's network stack but keeps the host's mount
    /// namespace. `ip netns exec` remounts /sys, which would hide bpffs and the pins.
    pub fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        command
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(output) if output.status.success() => {}
            Ok(output) => cleanup_failed(format_args!(
                "ip netns del {} ({}): {}",
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Err(err) => cleanup_failed(format_args!("ip netns del {}: {err}", self.name)),
        }
    }
}

/// Two namespaces joined by a veth pair: `client` (eth0, 10.x.0.1, fd00:x::1) and `node`
/// (eth0, 10.x.0.2, fd00:x::2). The node holds the given VIPs on `lo`, as it would on
/// kube-lb0, and the client routes them to the node.
/// A veth pair with one end, so named, in each namespace.
pub fn veth(a: (&NetNs, &str), b: (&NetNs, &str)) {
    run_ok(
        "ip",
        &[
            "link",
            "add",
            a.1,
            "netns",
            a.0.name(),
            "type",
            "veth",
            "peer",
            "name",
            b.1,
            "netns",
            b.0.name(),
        ],
    );
}

pub struct Pair {
    pub client: NetNs,
    pub node: NetNs,
}

impl Pair {
    pub const CLIENT_V4: &'static str = "10.200.0.1";
    pub const NODE_V4: &'static str = "10.200.0.2";
    pub const CLIENT_V6: &'static str = "fd00:200::1";
    pub const NODE_V6: &'static str = "fd00:200::2";

    pub fn new(vips: &[&str]) -> Self {
        let client = NetNs::new("lbt-client");
        let node = NetNs::new("lbt-node");
        veth((&client, "eth0"), (&node, "eth0"));
        for (ns, v4, v6) in [
            (&client, Self::CLIENT_V4, Self::CLIENT_V6),
            (&node, Self::NODE_V4, Self::NODE_V6),
        ] {
            ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.accept_dad=0"]);
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        for vip in vips {
            let (host, via) = if vip.contains(':') {
                (format!("{vip}/128"), Self::NODE_V6)
            } else {
                (format!("{vip}/32"), Self::NODE_V4)
            };
            node.ip(&["addr", "add", &host, "dev", "lo"]);
            client.ip(&["route", "add", &host, "via", via]);
        }
        Self { client, node }
    }
}

/// A pin root of its own on bpffs, removed with everything in it on drop. Removing a link's
/// pin detaches its program once nothing else holds it.
pub struct PinRoot {
    path: PathBuf,
}

impl PinRoot {
    pub fn new() -> Self {
        require_root();
        ensure_bpffs();
        Self {
            path: Path::new(BPFFS).join(unique_name("lbagent-test")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pinned_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else {
                return;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, found);
                } else {
                    found.push(path);
                }
            }
        }
        let mut found = Vec::new();
        walk(&self.path, &mut found);
        found
    }

    /// Fails, naming what is left, unless the root is gone (everything in it unpinned).
    #[track_caller]
    pub fn assert_removed(&self) {
        assert!(!self.path.exists(), "pins left: {:?}", self.pinned_files());
    }
}

impl Default for PinRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PinRoot {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

pub const BPFFS: &str = "/sys/fs/bpf";

/// Mounts bpffs at /sys/fs/bpf if nothing is mounted there (as `cargo xtask setup` does).
pub fn ensure_bpffs() {
    let is_bpffs = nix::sys::statfs::statfs(BPFFS)
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false);
    if !is_bpffs {
        run_ok("mount", &["-t", "bpf", "bpf", BPFFS]);
    }
}

/// The `lbagent` binary of this build: `$LBAGENT_BIN`, or the one next to the test binary's
/// directory (`target/<profile>/lbagent`).
pub fn lbagent_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("LBAGENT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps");
    let bin = profile_dir.join("lbagent");
    assert!(
        bin.is_file(),
        "{} is missing: build it first with `cargo build -p lbagent` (`cargo xtask test` does)",
        bin.display()
    );
    bin
}

/// Output of one `lbagent` run.
pub struct LbagentRun {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl LbagentRun {
    pub fn assert_ok(self) -> Self {
        assert!(
            self.status.success(),
            "lbagent failed ({}): {}",
            self.status,
            self.stderr
        );
        self
    }

    /// The run failed with exactly one line on stderr, which contains `needle`.
    pub fn assert_one_line_error(&self, needle: &str) {
        assert!(
            !self.status.success(),
            "expected failure, got {}",
            self.status
        );
        let lines: Vec<_> = self.stderr.lines().collect();
        assert_eq!(
            lines.len(),
            1,
            "expected one error line, got: {:?}",
            self.stderr
        );
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "error line {:?} does not mention {needle:?}",
            lines[0]
        );
    }
}

/// Runs `lbagent --pin-root PINS ARGS` inside `ns`.
pub fn lbagent(ns: &NetNs, pins: &PinRoot, args: &[&str]) -> LbagentRun {
    let output = ns
        .command(&lbagent_bin())
        .arg("--pin-root")
        .arg(pins.path())
        .args(args)
        .output()
        .expect("run lbagent");
    LbagentRun {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// An XDP program attached to an interface, as `ip -j link` reports it.
#[derive(Debug, PartialEq, Eq)]
pub struct XdpInfo {
    pub id: u64,
    pub name: String,
    /// "driver", "generic", "offload" or "multi".
    pub mode: String,
}

/// The XDP program attached to `iface` in `ns`, if any.
pub fn xdp_on(ns: &NetNs, iface: &str) -> Option<XdpInfo> {
    let json = ns.ip(&["-j", "-d", "link", "show", "dev", iface]);
    let links: serde_json::Value = serde_json::from_str(&json).expect("ip -j output");
    let xdp = &links[0]["xdp"];
    let mode = match xdp["mode"].as_u64()? {
        1 => "driver",
        2 => "generic",
        3 => "offload",
        _ => "multi",
    };
    Some(XdpInfo {
        id: xdp["prog"]["id"].as_u64().unwrap_or_default(),
        name: xdp["prog"]["name"].as_str().unwrap_or_default().to_owned(),
        mode: mode.to_owned(),
    })
}

/// A directory of its own under the system temp dir, removed on drop.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&path).expect("create temp dir");
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` by renaming a complete temporary file over it, as tools that update
    /// files safely do.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path.join(name);
        let tmp = self.path.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write temp file");
        std::fs::rename(&tmp, &path).expect("rename into place");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        remove_tree(&self.path);
    }
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: std::time::Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A field of `/proc/PID/status` in kB (`VmRSS`, `VmHWM`), 0 when unreadable.
pub fn memory_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A running `lbagent run`, inside a namespace, logging to a file. Killed on drop.
pub struct Agent {
    child: std::process::Child,
    log: PathBuf,
}

impl Agent {
    pub fn start(ns: &NetNs, config: &Path, log: PathBuf) -> Self {
        Self::start_with_env(ns, config, log, &[])
    }

    /// As `start`, with these environment variables set (as a DaemonSet's downward API does).
    pub fn start_with_env(ns: &NetNs, config: &Path, log: PathBuf, env: &[(&str, &str)]) -> Self {
        let file = std::fs::File::create(&log).expect("create log file");
        let child = ns
            .command(&lbagent_bin())
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .env("LBAGENT_LOG", "info")
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file)
            .spawn()
            .expect("start lbagent run");
        Self { child, log }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        self.child.wait().expect("wait for lbagent")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it has exited, with its status.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails, showing the log, unless `needle` appears in it within `timeout`.
    #[track_caller]
    pub fn expect_log(&self, needle: &str, timeout: std::time::Duration) {
        assert!(
            wait_until(timeout, || self.log().contains(needle)),
            "no {needle:?} in the log within {timeout:?}:\n{}",
            self.log()
        );
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        kill_child(&mut self.child, "lbagent run");
    }
}

/// The addresses on `iface` in `ns` as `addr/prefix`, IPv6 link-local excluded; empty if the
/// interface does not exist.
pub fn addresses_on(ns: &NetNs, iface: &str) -> std::collections::BTreeSet<String> {
    let output = run("ip", &["-n", ns.name(), "-j", "addr", "show", "dev", iface]);
    if !output.status.success() {
        return Default::default();
    }
    let links: serde_json::Value = serde_json::from_slice(&output.stdout).expect("ip -j addr");
    links[0]["addr_info"]
        .as_array()
        .map(|infos| {
            infos
                .iter()
                .filter(|info| info["scope"] != "link")
                .map(|info| format!("{}/{}", info["local"].as_str().unwrap(), info["prefixlen"]))
                .collect()
        })
        .unwrap_or_default()
}

/// `ip -oneline monitor address link` in a namespace, for asserting that nothing changed.
///
/// Its events are read as they come. `start` returns once the monitor is subscribed, and
/// `stop` once it has printed everything that happened before the call: each proves it by a
/// marker address of its own on `lo` that the monitor must print (netlink delivers a
/// namespace's events in order). The markers are left out of the events returned.
pub struct Monitor {
    ns: String,
    child: Option<std::process::Child>,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    pub fn start(ns: &NetNs) -> Self {
        let mut child = Command::new("ip")
            .args(["-n", ns.name(), "-oneline", "monitor", "address", "link"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start ip monitor");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let reader = {
            let lines = lines.clone();
            std::thread::spawn(move || {
                use std::io::BufRead as _;
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            })
        };
        let monitor = Self {
            ns: ns.name().to_owned(),
            child: Some(child),
            lines,
            reader: Some(reader),
        };
        monitor.sync();
        monitor
    }

    /// Adds and removes a marker address on `lo` until the monitor has printed both.
    fn sync(&self) {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let marker = format!("{}/32", Self::marker(n));
            let seen = |deleted: bool| {
                wait_until(std::time::Duration::from_millis(500), || {
                    self.lines
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .any(|l| l.contains(&marker) && l.starts_with("Deleted") == deleted)
                })
            };
            run_ok("ip", &["-n", &self.ns, "addr", "add", &marker, "dev", "lo"]);
            let added = seen(false);
            run_ok("ip", &["-n", &self.ns, "addr", "del", &marker, "dev", "lo"]);
            if added && seen(true) {
                return;
            }
            // Not subscribed yet when the marker came: try again with a new one.
            assert!(
                std::time::Instant::now() < deadline,
                "ip monitor in {} printed none of its markers",
                self.ns
            );
        }
    }

    /// Marker `n`: an address in 127.77.0.0/16, which nothing else in the tests uses.
    fn marker(n: u32) -> String {
        format!("127.77.{}.{}", (n >> 8) & 0xff, n & 0xff)
    }

    /// How many of the event lines printed so far match `predicate` (markers included).
    pub fn count(&self, predicate: impl Fn(&str) -> bool) -> usize {
        self.lines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|line| predicate(line))
            .count()
    }

    /// Stops the monitor and returns every event line it printed (markers left out).
    pub fn stop(mut self) -> Vec<String> {
        self.sync();
        let mut child = self.child.take().expect("running");
        kill_child(&mut child, "ip monitor");
        if let Some(reader) = self.reader.take() {
            reader.join().expect("monitor reader");
        }
        let lines = std::mem::take(&mut *self.lines.lock().unwrap_or_else(|p| p.into_inner()));
        lines
            .into_iter()
            .filter(|line| !line.contains(" inet 127.77."))
            .collect()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_child(&mut child, "ip monitor");
        }
    }
}

/// Runs `f` on a thread inside `ns`'s network stack and returns its result.
pub fn in_netns<T: Send + 'static>(ns: &NetNs, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// A TCP server and a UDP echo server on one address and port inside a namespace; each
/// connection or datagram is answered with "ok". Stopped on drop.
pub struct Servers {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Servers {
    pub fn start(ns: &NetNs, tcp: &[std::net::SocketAddr], udp: &[std::net::SocketAddr]) -> Self {
        use std::{io::Write as _, sync::atomic::Ordering};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let path = format!("/run/netns/{}", ns.name());
        for (addr, is_tcp) in tcp
            .iter()
            .map(|a| (*a, true))
            .chain(udp.iter().map(|a| (*a, false)))
        {
            let stop = stop.clone();
            let path = path.clone();
            let ready = ready_tx.clone();
            threads.push(std::thread::spawn(move || {
                let file = std::fs::File::open(&path).expect("open netns");
                nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                // The address may still be on its way onto kube-lb0.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                if is_tcp {
                    let listener = loop {
                        match std::net::TcpListener::bind(addr) {
                            Ok(l) => break l,
                            Err(_) if std::time::Instant::now() < deadline => {
                                std::thread::sleep(std::time::Duration::from_millis(20))
                            }
                            Err(err) => panic!("bind {addr}: {err}"),
                        }
                    };
                    listener.set_nonblocking(true).unwrap();
                    ready.send(()).unwrap();
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((mut stream, _)) => {
                                let _ = stream.write_all(b"ok");
                            }
                            Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                        }
                    }
                } else {
                    let socket = loop {
                        match std::net::UdpSocket::bind(addr) {
                            Ok(s) => break s,
                            Err(_) if std::time::Instant::now() < deadline => {
                                std::thread::sleep(std::time::Duration::from_millis(20))
                            }
                            Err(err) => panic!("bind {addr}: {err}"),
                        }
                    };
                    socket
                        .set_read_timeout(Some(std::time::Duration::from_millis(50)))
                        .unwrap();
                    ready.send(()).unwrap();
                    let mut buf = [0u8; 64];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((_, from)) = socket.recv_from(&mut buf) {
                            let _ = socket.send_to(b"ok", from);
                        }
                    }
                }
            }));
        }
        for _ in 0..threads.len() {
            ready_rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("servers did not start");
        }
        Self { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                cleanup_failed(format_args!("a test server thread panicked"));
            }
        }
    }
}

/// From inside `ns`: whether a TCP connection to `addr` gets the server's "ok" within 1 s.
pub fn tcp_ok(ns: &NetNs, addr: std::net::SocketAddr) -> bool {
    in_netns(ns, move || {
        use std::io::Read as _;
        let Ok(mut stream) =
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(1)));
        let mut reply = [0u8; 2];
        stream.read_exact(&mut reply).is_ok() && &reply == b"ok"
    })
}

/// From inside `ns`: whether a UDP datagram to `addr` is answered "ok" within 1 s.
pub fn udp_ok(ns: &NetNs, addr: std::net::SocketAddr) -> bool {
    in_netns(ns, move || {
        let bind = if addr.is_ipv4() {
            "0.0.0.0:0"
        } else {
            "[::]:0"
        };
        let socket = std::net::UdpSocket::bind(bind).expect("bind");
        socket
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let _ = socket.send_to(b"hi", addr);
        let mut reply = [0u8; 2];
        matches!(socket.recv_from(&mut reply), Ok((2, _))) && &reply == b"ok"
    })
}

/// `lbagent cleanup --config CONFIG` inside `ns`, which must succeed; returns its stdout.
/// Without a dataplane section the config names no pin root, so a test-only one is passed
/// (`--pin-root` wins over the config's, so it is passed only then): a test must never touch
/// the host's /sys/fs/bpf/lbagent.
pub fn lbagent_cleanup(ns: &NetNs, config: &Path) -> String {
    let has_pin_root = lbagent::Config::load(config, None)
        .expect("the config cleanup reads")
        .dataplane
        .is_some();
    let mut command = ns.command(&lbagent_bin());
    if !has_pin_root {
        command.args(["--pin-root", "/sys/fs/bpf/lbagent-test-none"]);
    }
    let out = command
        .args(["cleanup", "--config"])
        .arg(config)
        .output()
        .expect("run lbagent cleanup");
    assert!(
        out.status.success(),
        "lbagent cleanup failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// From inside `ns`: GET `path` from `addr` over HTTP/1.1; the status code and the body.
pub fn http_get(ns: &NetNs, addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    in_netns(ns, move || {
        use std::io::{Read as _, Write as _};
        let mut stream =
            std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)).ok()?;
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .ok()?;
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        let code = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, body.to_owned()))
    })
}

/// The value of the sample `name{labels}` (labels exactly as exposed) in Prometheus text;
/// `name` also finds `name{}`, which prometheus-client writes for a collected metric.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| {
            let rest = line.strip_prefix(sample)?;
            rest.strip_prefix(' ')
                .or_else(|| rest.strip_prefix("{} ").filter(|_| !sample.ends_with('}')))
        })
        .and_then(|value| value.trim().parse().ok())
}

/// A node running `lbagent run` from a services file with the dataplane on: the node's
/// default route (and so the dataplane) goes out eth0, and the client routes `vip` to it.
pub struct ServedNode {
    pub pair: Pair,
    pub pins: PinRoot,
    pub agent: Agent,
    /// After the agent, so it is removed once the agent has stopped writing into it.
    pub dir: TempDir,
}

impl ServedNode {
    /// `extra_config`: more top-level sections of lbagent.yaml, each line ending in `\n`.
    pub fn start(vip: &str, services: &str, extra_config: &str) -> Self {
        Self::start_with(vip, services, "", extra_config, |_| {})
    }

    /// As `start`, with more settings in the `dataplane` section (`, key: value`), and
    /// `before` run on the pin root before the agent starts.
    pub fn start_with(
        vip: &str,
        services: &str,
        dataplane: &str,
        extra_config: &str,
        before: impl FnOnce(&PinRoot),
    ) -> Self {
        Self::start_with_env(vip, services, dataplane, extra_config, &[], before)
    }

    /// As `start_with`, with the agent's environment extended by `env`.
    pub fn start_with_env(
        vip: &str,
        services: &str,
        dataplane: &str,
        extra_config: &str,
        env: &[(&str, &str)],
        before: impl FnOnce(&PinRoot),
    ) -> Self {
        let pair = Pair::new(&[]);
        pair.node
            .ip(&["route", "add", "default", "via", Pair::CLIENT_V4]);
        pair.client
            .ip(&["route", "add", &format!("{vip}/32"), "via", Pair::NODE_V4]);
        let pins = PinRoot::new();
        let dir = TempDir::new("lbt-served");
        dir.write("services.yaml", services);
        dir.write(
            "lbagent.yaml",
            &format!(
                "source: {{file: {{path: services.yaml}}}}\nstatus: {{path: {}}}\n\
                 dataplane: {{pinRoot: {}{dataplane}}}\n{extra_config}",
                dir.path().join("status.json").display(),
                pins.path().display()
            ),
        );
        before(&pins);
        let agent = Agent::start_with_env(
            &pair.node,
            &dir.path().join("lbagent.yaml"),
            dir.path().join("agent.log"),
            env,
        );
        Self {
            pair,
            pins,
            dir,
            agent,
        }
    }

    pub fn status_file(&self) -> PathBuf {
        self.dir.path().join("status.json")
    }
}
