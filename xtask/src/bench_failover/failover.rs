//! The failover half of `cargo xtask bench failover` (see the parent module).

use std::{
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::{
    signal::{Signal, kill},
    socket::{
        AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, recv, sendto,
        setsockopt, socket, sockopt::ReceiveTimeout,
    },
    time::TimeVal,
};

use crate::{bench_dataplane::quantile, cmd};

const ROUNDS: usize = 20;
const NODES: usize = 3;
const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// A failover that takes longer than this counts as this long (and is reported).
const GIVE_UP: Duration = Duration::from_secs(5);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 100);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    LinkDown,
    Frozen,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Self::LinkDown => "owner's link down",
            Self::Frozen => "owner frozen (SIGSTOP)",
        }
    }
}

pub fn run(lbagent: &Path) -> Result<()> {
    let mut results = Vec::new();
    for system in [System::Keepalived, System::Lbagent] {
        let lab = Lab::new(system, lbagent)?;
        for fault in [Fault::LinkDown, Fault::Frozen] {
            let times = lab.failovers(fault)?;
            results.push((system, fault, times));
        }
    }
    println!();
    println!(
        "Failover of a local address: {ROUNDS} faults of each kind, ARP request every {} ms from a client on the segment; time from the fault to the first answer from another node",
        PROBE_INTERVAL.as_millis()
    );
    println!(
        "| fault | system | p50 | p99 (max of {ROUNDS}) | gave up | ratio p99 lbagent / keepalived | target |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | --- |");
    for fault in [Fault::LinkDown, Fault::Frozen] {
        let p99 = |system: System| {
            results
                .iter()
                .find(|(s, f, _)| *s == system && *f == fault)
                .map(|(_, _, t)| quantile(&mut t.clone(), 0.99))
                .unwrap_or(f64::NAN)
        };
        for (system, f, times) in results.iter().filter(|(_, f, _)| *f == fault) {
            let mut times = times.clone();
            let gave_up = times
                .iter()
                .filter(|t| **t >= GIVE_UP.as_secs_f64() * 1e3)
                .count();
            let is_lbagent = *system == System::Lbagent;
            let ratio = p99(System::Lbagent) / p99(System::Keepalived);
            println!(
                "| {} | {} | {:.0} ms | {:.0} ms | {gave_up} | {} | {} |",
                f.name(),
                system.name(),
                quantile(&mut times, 0.5),
                quantile(&mut times, 0.99),
                if is_lbagent {
                    format!("{ratio:.2}")
                } else {
                    String::new()
                },
                if is_lbagent {
                    let p = p99(System::Lbagent);
                    format!(
                        "p99 <= 1000 ms: {}; ratio <= 1.5: {}",
                        if p <= 1000.0 { "met" } else { "NOT met" },
                        if ratio <= 1.5 { "met" } else { "NOT met" }
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum System {
    Keepalived,
    Lbagent,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            Self::Keepalived => "keepalived VRRPv3, 100 ms adverts",
            Self::Lbagent => "lbagent (SWIM + XDP responder)",
        }
    }
}

/// The namespaces and processes of one system; everything removed on drop.
struct Lab {
    system: System,
    prefix: String,
    dir: PathBuf,
    nodes: Vec<String>,
    macs: Vec<[u8; 6]>,
    /// Per node: the processes a freeze stops (process groups).
    processes: Vec<Vec<Child>>,
    probe: Probe,
}

impl Lab {
    fn new(system: System, lbagent: &Path) -> Result<Self> {
        let prefix = format!("lbfo{}{}", std::process::id(), system as u8);
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir)?;
        let mut lab = Self {
            system,
            prefix: prefix.clone(),
            dir,
            nodes: Vec::new(),
            macs: Vec::new(),
            processes: Vec::new(),
            probe: Probe::default(),
        };
        let bridge = format!("{prefix}br");
        netns_add(&bridge)?;
        ip(&bridge, &["link", "add", "br0", "type", "bridge"])?;
        ip(&bridge, &["link", "set", "br0", "up"])?;
        let client = format!("{prefix}c");
        netns_add(&client)?;
        join(&client, &bridge, "pc", &format!("{CLIENT}/24"))?;
        for i in 0..NODES {
            let node = format!("{prefix}n{i}");
            netns_add(&node)?;
            join(
                &node,
                &bridge,
                &format!("p{i}"),
                &format!("10.202.0.1{i}/24"),
            )?;
            lab.macs.push(mac(&node)?);
            lab.nodes.push(node);
        }
        for i in 0..NODES {
            let processes = match system {
                System::Keepalived => vec![lab.keepalived(i)?],
                System::Lbagent => lab.lbagent(i, lbagent)?,
            };
            lab.processes.push(processes);
        }
        lab.probe = Probe::start(&client)?;
        // Settled: one node answers, steadily.
        lab.owner_within(Duration::from_secs(20))
            .context("no node answers for the address")?;
        Ok(lab)
    }

    fn keepalived(&self, i: usize) -> Result<Child> {
        let config = self.dir.join(format!("keepalived-{i}.conf"));
        std::fs::write(
            &config,
            format!(
                "global_defs {{\n  vrrp_version 3\n}}\n\
                 vrrp_instance lbfo {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n  \
                 priority {}\n  advert_int 0.1\n  virtual_ipaddress {{\n    {VIP}/24\n  }}\n}}\n",
                150 - 50 * i
            ),
        )?;
        let pid = |name: &str| self.dir.join(format!("{name}-{i}.pid"));
        spawn(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.nodes[i],
                    "keepalived",
                    "-n",
                    "-l",
                    "-P",
                    "-f",
                ])
                .arg(&config)
                .arg("-p")
                .arg(pid("keepalived"))
                .arg("-r")
                .arg(pid("vrrp"))
                .arg("-c")
                .arg(pid("checkers")),
            &self.dir.join(format!("keepalived-{i}.log")),
        )
    }

    fn lbagent(&self, i: usize, lbagent: &Path) -> Result<Vec<Child>> {
        let node = &self.nodes[i];
        let name = format!("node-{i}");
        let pins = PathBuf::from("/sys/fs/bpf").join(format!("{}-{i}", self.prefix));
        let dir = self.dir.display();
        std::fs::write(
            self.dir.join("services.yaml"),
            format!(
                "services:\n  - name: web\n    addresses: [{VIP}]\n    ports: [{{port: 80}}]\n"
            ),
        )?;
        let config = self.dir.join(format!("lbagent-{i}.yaml"));
        std::fs::write(
            &config,
            format!(
                "node: {{name: {name}}}\nsource: {{file: {{path: services.yaml}}}}\n\
                 addresses: {{interface: lbfo-{i}}}\nstatus: {{path: {dir}/status-{i}.json}}\n\
                 dataplane: {{interfaces: [eth0], mode: generic, pinRoot: {}}}\n\
                 neighbours: {{membersFile: {dir}/members-{i}.json}}\n",
                pins.display()
            ),
        )?;
        let mut membership = Command::new("nsenter");
        membership
            .arg(format!("--net=/run/netns/{node}"))
            .arg("--")
            .arg(lbagent)
            .arg("--pin-root")
            .arg(&pins)
            .args(["membership", "--name", &name, "--bind"])
            .arg(format!("10.202.0.1{i}:7946"))
            .arg("--members-file")
            .arg(self.dir.join(format!("members-{i}.json")));
        for j in (0..NODES).filter(|j| *j != i) {
            membership.arg("--seed").arg(format!("10.202.0.1{j}:7946"));
        }
        let membership = spawn(
            &mut membership,
            &self.dir.join(format!("membership-{i}.log")),
        )?;
        let agent = spawn(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{node}"))
                .arg("--")
                .arg(lbagent)
                .args(["run", "--config"])
                .arg(&config),
            &self.dir.join(format!("agent-{i}.log")),
        )?;
        Ok(vec![membership, agent])
    }

    /// The node answering now: the sender of the replies of the last 100 ms, if one node.
    fn owner_now(&self) -> Option<usize> {
        let since = Instant::now() - Duration::from_millis(100);
        let replies = self.probe.replies_since(since);
        let first = *replies.first()?;
        if replies.iter().any(|(_, mac)| *mac != first.1) {
            return None;
        }
        self.macs.iter().position(|m| *m == first.1)
    }

    /// Waits until one node has answered alone for half a second.
    fn owner_within(&self, limit: Duration) -> Result<usize> {
        let deadline = Instant::now() + limit;
        let mut stable: Option<(usize, Instant)> = None;
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            match (self.owner_now(), stable) {
                (Some(owner), Some((held, since))) if owner == held => {
                    if since.elapsed() >= Duration::from_millis(500) {
                        return Ok(owner);
                    }
                }
                (Some(owner), _) => stable = Some((owner, Instant::now())),
                (None, _) => stable = None,
            }
        }
        bail!("no single node answered steadily within {limit:?}")
    }

    /// `ROUNDS` faults of one kind on the node answering; the times in ms.
    fn failovers(&self, fault: Fault) -> Result<Vec<f64>> {
        let mut times = Vec::new();
        for round in 0..ROUNDS {
            let owner = self.owner_within(Duration::from_secs(20))?;
            let old = self.macs[owner];
            let start = Instant::now();
            self.inject(owner, fault, true)?;
            let mut taken = None;
            while start.elapsed() < GIVE_UP {
                std::thread::sleep(Duration::from_millis(2));
                if let Some((at, _)) = self
                    .probe
                    .replies_since(start)
                    .into_iter()
                    .find(|(_, mac)| *mac != old)
                {
                    taken = Some(at - start);
                    break;
                }
            }
            self.inject(owner, fault, false)?;
            let time = taken.unwrap_or(GIVE_UP);
            eprintln!(
                "bench failover: {} {} round {round}: {:.0} ms",
                self.system.name(),
                fault.name(),
                time.as_secs_f64() * 1e3
            );
            times.push(time.as_secs_f64() * 1e3);
            // Let the owner come back (both systems give it back) before the next round.
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(times)
    }

    fn inject(&self, node: usize, fault: Fault, on: bool) -> Result<()> {
        match fault {
            Fault::LinkDown => ip(
                &self.nodes[node],
                &["link", "set", "eth0", if on { "down" } else { "up" }],
            ),
            Fault::Frozen => {
                let signal = if on { Signal::SIGSTOP } else { Signal::SIGCONT };
                for child in &self.processes[node] {
                    // Each was started in a process group of its own: the whole group.
                    let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
                    kill(group, signal).context("signal")?;
                }
                Ok(())
            }
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.probe.stop();
        for children in &mut self.processes {
            for child in children {
                let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
                let _ = kill(group, Signal::SIGCONT);
                let _ = kill(group, Signal::SIGKILL);
                let _ = child.wait();
            }
        }
        for suffix in ["br", "c"]
            .iter()
            .map(|s| s.to_string())
            .chain((0..NODES).map(|i| format!("n{i}")))
        {
            let _ = Command::new("ip")
                .args(["netns", "del", &format!("{}{suffix}", self.prefix)])
                .status();
        }
        for i in 0..NODES {
            let _ = std::fs::remove_dir_all(
                PathBuf::from("/sys/fs/bpf").join(format!("{}-{i}", self.prefix)),
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn(command: &mut Command, log: &Path) -> Result<Child> {
    let file = std::fs::File::create(log)?;
    use std::os::unix::process::CommandExt as _;
    command
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))
}

fn netns_add(name: &str) -> Result<()> {
    cmd::output(Command::new("ip").args(["netns", "add", name]))?;
    ip(name, &["link", "set", "lo", "up"])
}

fn ip(ns: &str, args: &[&str]) -> Result<()> {
    cmd::output(Command::new("ip").arg("-n").arg(ns).args(args)).map(drop)
}

/// Joins `ns` to the bridge in `bridge` with a veth (`eth0` inside, `port` on the bridge).
fn join(ns: &str, bridge: &str, port: &str, address: &str) -> Result<()> {
    cmd::output(Command::new("ip").args([
        "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", bridge,
    ]))?;
    ip(bridge, &["link", "set", port, "master", "br0", "up"])?;
    ip(ns, &["addr", "add", address, "dev", "eth0"])?;
    ip(ns, &["link", "set", "eth0", "up"])
}

fn mac(ns: &str) -> Result<[u8; 6]> {
    let json =
        cmd::output(Command::new("ip").args(["-n", ns, "-j", "link", "show", "dev", "eth0"]))?;
    let links: serde_json::Value = serde_json::from_str(&json)?;
    let text = links[0]["address"].as_str().context("no address")?;
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    bytes.try_into().ok().context("not a MAC")
}

/// ARP replies as the client received them: when, and from which hardware address.
type Replies = Arc<Mutex<Vec<(Instant, [u8; 6])>>>;

/// The client's prober: an ARP request for the address every `PROBE_INTERVAL`, and every
/// reply recorded with its arrival time and sender.
#[derive(Default)]
struct Probe {
    replies: Replies,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Probe {
    fn start(netns: &str) -> Result<Self> {
        let replies: Replies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let path = format!("/run/netns/{netns}");
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let thread = {
            let (replies, stop) = (replies.clone(), stop.clone());
            std::thread::spawn(move || {
                let opened = (|| -> Result<(OwnedFd, LinkAddr)> {
                    let file = std::fs::File::open(&path)?;
                    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
                    let socket = socket(
                        AddressFamily::Packet,
                        SockType::Raw,
                        SockFlag::SOCK_CLOEXEC,
                        SockProtocol::EthAll,
                    )?;
                    setsockopt(&socket, ReceiveTimeout, &TimeVal::new(0, 1000))?;
                    let link = nix::ifaddrs::getifaddrs()?
                        .filter(|entry| entry.interface_name == "eth0")
                        .find_map(|entry| entry.address?.as_link_addr().copied())
                        .context("client eth0")?;
                    Ok((socket, link))
                })();
                let (socket, link) = match opened {
                    Ok(opened) => {
                        let _ = ready_tx.send(Ok(()));
                        opened
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                let request = arp_request(link.addr().unwrap_or_default());
                let mut buf = [0u8; 128];
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        let _ = sendto(socket.as_raw_fd(), &request, &link, MsgFlags::empty());
                        next += PROBE_INTERVAL;
                    }
                    if let Ok(len) = recv(socket.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                        let frame = &buf[..len];
                        let is_reply = len >= 42
                            && frame[12..14] == [0x08, 0x06]
                            && frame[20..22] == [0, 2]
                            && frame[28..32] == VIP.octets();
                        if is_reply {
                            let mut mac = [0u8; 6];
                            mac.copy_from_slice(&frame[22..28]);
                            if let Ok(mut replies) = replies.lock() {
                                replies.push((Instant::now(), mac));
                            }
                        }
                    }
                }
            })
        };
        ready.recv().context("prober thread")??;
        Ok(Self {
            replies,
            stop,
            thread: Some(thread),
        })
    }

    fn replies_since(&self, since: Instant) -> Vec<(Instant, [u8; 6])> {
        self.replies
            .lock()
            .map(|r| r.iter().filter(|(at, _)| *at >= since).copied().collect())
            .unwrap_or_default()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn arp_request(mac: [u8; 6]) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&CLIENT.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&VIP.octets());
    frame.resize(60, 0);
    frame
}
