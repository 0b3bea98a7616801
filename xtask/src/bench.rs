//! `cargo xtask bench addresses`: lbagent putting 10,000 addresses on kube-lb0, against
//! `ip -batch` doing the same in the same run.
//!
//! The machines are shared and drift, so every figure is a median over rounds that alternate
//! baseline and lbagent, and the headline is their ratio.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

const V4: usize = 5_000;
const V6: usize = 5_000;
const ROUNDS: usize = 7;
/// Deleting a link with 10,000 addresses leaves the kernel busy for a while; the next
/// measurement must not pay for it.
const SETTLE: Duration = Duration::from_millis(700);
const RESYNCS: usize = 10;
/// The environment deploy/daemonset.yaml gives the agent's container, which the bench starts
/// the agent with: the figures are those of the agent as deployed.
const ARENA_MAX: &str = "glibc.malloc.arena_max=1";

pub fn addresses() -> Result<()> {
    cmd::require_root("bench addresses")?;
    cmd::cargo(&["build", "--quiet", "--release", "--package", "lbagent"])?;
    let lab = Lab::new()?;
    let dir = &lab.dir;
    // A copy of its own, evicted from the page cache before each start (see `cold_binary`).
    let lbagent = dir.join("lbagent");
    std::fs::copy(target_dir().join("release/lbagent"), &lbagent)
        .context("copying the release binary")?;

    let addresses: Vec<String> = (0..V4)
        .map(|i| format!("100.64.{}.{}/32", i / 250, i % 250 + 1))
        .chain((0..V6).map(|i| format!("2001:db8:1::{:x}/128", i + 1)))
        .collect();
    let mut batch = String::from("link add kube-lb0 type ifb\nlink set kube-lb0 up\n");
    for address in &addresses {
        let nodad = if address.contains(':') { " nodad" } else { "" };
        writeln!(batch, "address add {address} dev kube-lb0{nodad}")?;
    }
    std::fs::write(dir.join("batch"), batch)?;
    // 5,000 services, each with one IPv4 and one IPv6 address.
    let mut services = String::from("services:\n");
    for i in 0..V4 {
        let (v4, v6) = (&addresses[i], &addresses[V4 + i]);
        writeln!(
            services,
            "- {{name: svc-{i}, addresses: [{}, {}], ports: [{{port: 80}}]}}",
            v4.trim_end_matches("/32"),
            v6.trim_end_matches("/128")
        )?;
    }
    std::fs::write(dir.join("services.yaml"), services)?;
    std::fs::write(
        dir.join("lbagent.yaml"),
        format!(
            "node: {{name: bench}}\nsource: {{file: {{path: services.yaml}}}}\naddresses: {{resyncInterval: 1h}}\nstatus: {{path: {}}}\n",
            dir.join("status.json").display()
        ),
    )?;

    let mut baseline = Vec::new();
    let mut baseline_cpu = Vec::new();
    let mut cold = Vec::new();
    let mut cold_cpu = Vec::new();
    let mut resync_ms = Vec::new();
    let mut syscalls = None;
    let mut rss = Vec::new();
    for round in 0..ROUNDS {
        eprintln!("bench: round {}/{ROUNDS}", round + 1);
        // A B B A: whichever runs first in a round runs first half the time.
        let lbagent_first = round % 2 == 1;
        for step in 0..2 {
            if (step == 0) == lbagent_first {
                let log = dir.join(format!("agent-{round}.log"));
                cold_binary(&lbagent)?;
                let started = Instant::now();
                let mut agent = Agent::start(&lab.ns, &lbagent, &dir.join("lbagent.yaml"), &log)?;
                agent.wait_for_log(
                    &log,
                    &format!("\"added\":{}", addresses.len()),
                    Duration::from_secs(60),
                )?;
                cold.push(started.elapsed());
                cold_cpu.push(agent.cpu()?);
                lab.expect_count(addresses.len())?;
                // Every round resyncs at least once before its memory is read, so each
                // peak covers the same work.
                let status = dir.join("status.json");
                for _ in 0..if round == 0 { RESYNCS } else { 1 } {
                    resync_ms.push(agent.resync(&status)?);
                }
                if round == 0 {
                    syscalls = agent.syscalls_of_one_resync(&status).ok();
                }
                rss.push(agent.rss()?);
                agent.stop();
            } else {
                let cpu_before = children_cpu();
                let started = Instant::now();
                cmd::output(
                    Command::new("ip")
                        .args(["-n", &lab.ns, "-batch"])
                        .arg(dir.join("batch")),
                )?;
                baseline.push(started.elapsed());
                baseline_cpu.push(children_cpu().saturating_sub(cpu_before));
                lab.expect_count(addresses.len())?;
            }
            lab.delete_link()?;
            std::thread::sleep(SETTLE);
        }
    }

    let ratio = median_f64(
        baseline
            .iter()
            .zip(&cold)
            .map(|(b, l)| l.as_secs_f64() / b.as_secs_f64())
            .collect(),
    );
    let ms = |d: &[Duration]| median_f64(d.iter().map(|d| d.as_secs_f64() * 1e3).collect());
    let spread = |d: &[Duration]| {
        let v: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(0.0, f64::max);
        format!("{min:.0}-{max:.0}")
    };
    let resync = median_f64(resync_ms.clone());
    println!();
    println!(
        "addresses benchmark: {} addresses ({V4} IPv4 + {V6} IPv6, 5,000 services), {ROUNDS} rounds alternating baseline and lbagent",
        addresses.len()
    );
    println!("| measure | median | range | target |");
    println!("| --- | ---: | ---: | --- |");
    println!(
        "| `ip -batch`, cold kube-lb0 (baseline) | {:.0} ms | {} ms | |",
        ms(&baseline),
        spread(&baseline)
    );
    println!(
        "| `lbagent run`, cold: process start to all applied | {:.0} ms | {} ms | |",
        ms(&cold),
        spread(&cold)
    );
    println!("| ratio lbagent / ip -batch, wall time (per round) | {ratio:.2} | | <= 1.5 |");
    println!(
        "| CPU time (user + sys): ip -batch / lbagent | {:.0} / {:.0} ms | | |",
        ms(&baseline_cpu),
        ms(&cold_cpu)
    );
    println!(
        "| ratio lbagent / ip -batch, CPU time (per round) | {:.2} | | |",
        median_f64(
            baseline_cpu
                .iter()
                .zip(&cold_cpu)
                .map(|(b, l)| l.as_secs_f64() / b.as_secs_f64())
                .collect()
        )
    );
    println!("| steady-state resync of unchanged addresses | {resync:.1} ms | | <= 50 ms |");
    match syscalls {
        Some(n) => println!("| syscalls in one resync (strace -c -f) | {n} | | |"),
        None => println!("| syscalls in one resync (strace -c -f) | n/a (strace failed) | | |"),
    }
    let mb = |kb: Vec<u64>| median_f64(kb.into_iter().map(|kb| kb as f64 / 1024.0).collect());
    let peaks: Vec<u64> = rss.iter().map(|r| r.peak_kb).collect();
    println!(
        "| peak RSS of the agent holding them (VmHWM, per round) | {:.1} MB | {:.1}-{:.1} MB | <= 40 MB |",
        mb(peaks.clone()),
        mb(vec![peaks.iter().copied().min().unwrap_or(0)]),
        mb(vec![peaks.iter().copied().max().unwrap_or(0)]),
    );
    // The file-backed part is the binary's pages: how many of them a fault maps depends on
    // the page cache (folio sizes, fault-around), which is why the binary starts evicted.
    println!(
        "| of which, after the resyncs: anonymous / file-backed (the binary and libc) | {:.1} / {:.1} MB | | |",
        mb(rss.iter().map(|r| r.anon_kb).collect()),
        mb(rss.iter().map(|r| r.file_kb).collect())
    );
    println!(
        "| threads of the agent (malloc arenas: one, `GLIBC_TUNABLES={ARENA_MAX}` as deploy/daemonset.yaml sets) | {} | | |",
        rss.iter().map(|r| r.threads).max().unwrap_or(0)
    );
    Ok(())
}

/// Drops `binary` from the page cache, so that the agent maps it as read from disk, not as
/// the copy (or the linker) left it there: the file-backed part of its RSS then depends
/// neither on what ran before nor on how the binary got there.
fn cold_binary(binary: &Path) -> Result<()> {
    let file = std::fs::File::open(binary)?;
    file.sync_all()?;
    nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .with_context(|| format!("evicting {} from the page cache", binary.display()))?;
    Ok(())
}

fn median_f64(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::workspace().join("target"))
}

struct Agent {
    child: Child,
}

/// The agent's resident memory, from /proc/PID/status.
struct Rss {
    /// VmHWM: the peak of anonymous and file-backed pages together.
    peak_kb: u64,
    anon_kb: u64,
    /// Pages of the binary (and other mapped files).
    file_kb: u64,
    threads: u64,
}

impl Agent {
    fn start(ns: &str, lbagent: &Path, config: &Path, log: &Path) -> Result<Self> {
        let file = std::fs::File::create(log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .arg(lbagent)
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            // As the DaemonSet runs it (deploy/daemonset.yaml): one malloc arena.
            .env("GLIBC_TUNABLES", ARENA_MAX)
            .current_dir(config.parent().unwrap_or(Path::new(".")))
            .stderr(file)
            .stdout(Stdio::null())
            .spawn()
            .context("starting lbagent")?;
        Ok(Self { child })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_for_log(&mut self, log: &Path, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if std::fs::read_to_string(log).is_ok_and(|text| text.contains(needle)) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("lbagent exited ({status}); see {}", log.display());
            }
            if Instant::now() > deadline {
                bail!("{needle} not in {} after {timeout:?}", log.display());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Triggers a resync with SIGHUP and returns the reconcile's own duration.
    fn resync(&mut self, status: &Path) -> Result<f64> {
        let before = reconciles(status);
        let hup = || {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid() as i32),
                nix::sys::signal::Signal::SIGHUP,
            )
        };
        hup()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        // The status shows the last pass only: when another pass lands after the SIGHUP one
        // before it is seen (a loaded machine), ask again.
        let mut again = Instant::now() + Duration::from_secs(2);
        loop {
            let text = std::fs::read_to_string(status).unwrap_or_default();
            if let Ok(json) = serde_json::from_str::<serde_json::Value>(&text)
                && json["reconciles"].as_u64() > before
                && json["lastReconcile"]["trigger"] == "SIGHUP"
            {
                return json["lastReconcile"]["durationMs"]
                    .as_f64()
                    .context("durationMs in status");
            }
            if Instant::now() > deadline {
                bail!("no SIGHUP reconcile in {}", status.display());
            }
            if Instant::now() > again {
                hup()?;
                again = Instant::now() + Duration::from_secs(2);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Counts the syscalls of every thread of the agent across one resync.
    fn syscalls_of_one_resync(&mut self, status: &Path) -> Result<u64> {
        let strace = Command::new("strace")
            .args(["-c", "-f", "-p", &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting strace")?;
        std::thread::sleep(Duration::from_millis(300));
        let result = self.resync(status);
        std::thread::sleep(Duration::from_millis(100));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(strace.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )?;
        let output = strace.wait_with_output()?;
        result?;
        let summary = String::from_utf8_lossy(&output.stderr);
        let total = summary
            .lines()
            .find(|line| line.trim_end().ends_with("total"))
            .context("no total in strace's summary")?;
        // "100.00    0.001234          12       345        2 total": calls is the 4th column.
        total
            .split_whitespace()
            .nth(3)
            .and_then(|calls| calls.parse().ok())
            .context("cannot read strace's total")
    }

    /// User + system CPU time so far, from /proc (nsenter execs lbagent, so the pid is its).
    fn cpu(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("malformed /proc stat")?
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
        let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as u64;
        Ok(Duration::from_millis(ticks * 1000 / hz))
    }

    fn rss(&self) -> Result<Rss> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        let field = |name: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("no {name} in /proc/{}/status", self.pid()))
        };
        Ok(Rss {
            peak_kb: field("VmHWM:")?,
            anon_kb: field("RssAnon:")?,
            file_kb: field("RssFile:")?,
            threads: field("Threads:")?,
        })
    }

    fn stop(mut self) {
        let _ = cmd::terminate(&mut self.child);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time of every waited-for child so far.
fn children_cpu() -> Duration {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map(|usage| {
            let tv = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
            };
            tv(usage.user_time()) + tv(usage.system_time())
        })
        .unwrap_or_default()
}

fn reconciles(status: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(status).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["reconciles"].as_u64()
}

/// A namespace with an uplink-like interface; removed with everything in it on drop.
struct Lab {
    ns: String,
    dir: PathBuf,
}

impl Lab {
    fn new() -> Result<Self> {
        let id = std::process::id();
        let lab = Self {
            ns: format!("lbbench-{id}"),
            dir: std::env::temp_dir().join(format!("lbbench-{id}")),
        };
        std::fs::create_dir_all(&lab.dir)?;
        let ip = |args: &[&str]| cmd::output(Command::new("ip").args(args));
        ip(&["netns", "add", &lab.ns])?;
        ip(&["-n", &lab.ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", &lab.ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p",
        ])?;
        ip(&["-n", &lab.ns, "addr", "add", "10.99.0.1/24", "dev", "eth0"])?;
        ip(&["-n", &lab.ns, "link", "set", "eth0", "up"])?;
        Ok(lab)
    }

    fn expect_count(&self, expected: usize) -> Result<()> {
        let text = cmd::output(Command::new("ip").args([
            "-n", &self.ns, "-o", "addr", "show", "dev", "kube-lb0", "scope", "global",
        ]))?;
        let count = text.lines().count();
        if count != expected {
            bail!("kube-lb0 holds {count} addresses, expected {expected}");
        }
        Ok(())
    }

    fn delete_link(&self) -> Result<()> {
        cmd::output(Command::new("ip").args(["-n", &self.ns, "link", "del", "kube-lb0"]))?;
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
