//! The measuring side of `cargo xtask bench allocator` (xtask/src/bench_allocator.rs builds
//! and runs it): `lbagent allocator` against the in-process API server with 10,000 Services and
//! three pools, beside a floor measured in the same run by a bare kube-rs client.
//!
//! Usage: `allocator_bench LBAGENT_BINARY`. Prints a Markdown table.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Service;
use kube::{
    Api, Client, ResourceExt as _,
    api::{ListParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use lbagent::allocator::controller::WRITE_CONCURRENCY;
use lbagent_tests::{
    TempDir,
    apiserver::{ApiServer, RequestRecord},
    wait_until,
};
use serde_json::{Value, json};

const SERVICES: usize = 10_000;
const POOLS: [(&str, &str); 3] = [
    ("bench-a", "10.0.0.0/20"),
    ("bench-b", "10.0.16.0/20"),
    ("bench-c", "10.0.32.0/20"),
];
/// The watcher's page size: the floor lists as the allocator's watcher does.
const PAGE: u32 = 500;
const DEADLINE: Duration = Duration::from_secs(300);

/// Rounds of the allocator and the floor, alternating; the table gives the median round
/// (single rounds differ by half or more, and medians of five moved by a fifth between runs).
const ROUNDS: usize = 9;

/// The allocator's log filter unless `ALLOCATOR_BENCH_LOG` says otherwise: the Deployment's
/// (no `LBAGENT_LOG`, so the allocator's default, `info`: a line per assignment).
fn log_filter() -> String {
    std::env::var("ALLOCATOR_BENCH_LOG").unwrap_or_else(|_| "info".into())
}

fn main() -> Result<()> {
    let lbagent = PathBuf::from(
        std::env::args()
            .nth(1)
            .context("usage: allocator_bench LBAGENT_BINARY")?,
    );
    let dir = TempDir::new("lb-bench-alloc");
    let runtime = tokio::runtime::Runtime::new()?;
    let mut rounds = Vec::new();
    let mut restart = None;
    for round in 0..ROUNDS {
        let assigning = assign(&lbagent, dir.path(), round, restart.is_none())?;
        restart = restart.or(assigning.restart);
        let floor = runtime.block_on(floor(dir.path(), round))?;
        eprintln!(
            "round {}: allocator {:.2} s (CPU {:.2} s), floor {:.2} s, ratio {:.2}, peak RSS \
             {:.1} MB",
            round + 1,
            assigning.assigned.as_secs_f64(),
            assigning.cpu.as_secs_f64(),
            floor.assign.as_secs_f64(),
            assigning.assigned.as_secs_f64() / floor.assign.as_secs_f64(),
            assigning.peak_rss_kb as f64 / 1024.0
        );
        rounds.push((assigning, floor));
    }
    let Some(restart) = restart else {
        bail!("no round measured a restart");
    };
    let median = |values: Vec<f64>| -> (f64, f64, f64) {
        let mut values = values;
        values.sort_by(f64::total_cmp);
        (
            values[values.len() / 2],
            values[0],
            values[values.len() - 1],
        )
    };
    let shown = |(median, low, high): (f64, f64, f64), unit: &str| {
        format!("{median:.2}{unit} ({low:.2}-{high:.2})")
    };
    let of = |f: &dyn Fn(&(Assigning, Floor)) -> f64| median(rounds.iter().map(f).collect());
    let assigned = of(&|(a, _)| a.assigned.as_secs_f64());
    let floor_assign = of(&|(_, f)| f.assign.as_secs_f64());
    let ratio = of(&|(a, f)| a.assigned.as_secs_f64() / f.assign.as_secs_f64());
    let created = of(&|(a, _)| a.created.as_secs_f64());
    let cpu = of(&|(a, _)| a.cpu.as_secs_f64());
    let rss = of(&|(a, _)| a.peak_rss_kb as f64 / 1024.0);
    let floor_list = of(&|(_, f)| f.list.as_secs_f64());
    let (restart_ready, restart_writes) = restart;
    println!(
        "| measure (median of {ROUNDS} rounds, lowest-highest) | lbagent allocator | floor (bare kube-rs client) | ratio | target |\n\
         | --- | ---: | ---: | ---: | --- |\n\
         | {SERVICES} Services created at once, until every one has its address \
         (floor: the same {SERVICES} status patches, {WRITE_CONCURRENCY} in flight) | {} | {} | {} | <= 1.5 |\n\
         | of which creating the {SERVICES} in the API server (the bench's own work) | {} | | | |\n\
         | the allocator's CPU time meanwhile | {} | | | |\n\
         | peak RSS, {SERVICES} Services and 3 pools | {} | | | <= 60 MB |\n\
         | restart with {SERVICES} assigned: writes to them (first round) | {restart_writes} | | | 0 |\n\
         | restart: process start until it assigns a new Service (first round; floor: list \
         {SERVICES} Services in pages of {PAGE}, median) | {:.2} s | {} | {:.2} | |",
        shown(assigned, " s"),
        shown(floor_assign, " s"),
        shown(ratio, ""),
        shown(created, " s"),
        shown(cpu, " s"),
        shown(rss, " MB"),
        restart_ready.as_secs_f64(),
        shown(floor_list, " s"),
        restart_ready.as_secs_f64() / floor_list.0,
    );
    eprintln!("allocator's log filter: {}", log_filter());
    Ok(())
}

/// One round of the allocator: 10,000 Services created at once.
struct Assigning {
    assigned: Duration,
    created: Duration,
    /// The allocator's CPU time from the first creation until every Service had its address.
    cpu: Duration,
    peak_rss_kb: u64,
    /// When asked for: the time until a restarted allocator assigns, and its writes to the
    /// Services already assigned.
    restart: Option<(Duration, usize)>,
}

fn assign(lbagent: &Path, dir: &Path, round: usize, with_restart: bool) -> Result<Assigning> {
    let server = cluster();
    let kubeconfig = dir.join(format!("kubeconfig-{round}"));
    server.write_kubeconfig(&kubeconfig);
    let mut first = Allocator::start(lbagent, &kubeconfig, &format!("bench-{round}-a"), dir)?;
    let ready = wait_until(DEADLINE, || {
        POOLS.iter().all(|(name, _)| {
            server
                .get("lbagent.io/v1alpha1", "AddressPool", None, name)
                .is_some_and(|p| p["status"]["conditions"][0]["status"] == "True")
        })
    });
    if !ready {
        bail!("the allocator did not take up the pools:\n{}", first.log());
    }
    // For reading the allocator's log (ALLOCATOR_BENCH_LOG) against the breakdown.
    eprintln!(
        "round {}: creating the Services from {}",
        round + 1,
        k8s_openapi::jiff::Timestamp::now()
    );
    let cpu_before = first.cpu()?;
    let started = Instant::now();
    for i in 0..SERVICES {
        server.apply(service(&name(i)));
    }
    let created = started.elapsed();
    // Polled slowly, and only the requests since the last look: the poll must not take the
    // allocator's CPU (the floor is not polled).
    let mut writes = StatusWrites::default();
    let all_written = poll(DEADLINE, || writes.count(&server) >= SERVICES);
    let (true, Some(last_write)) = (all_written, writes.last_first_write) else {
        bail!(
            "only {} of {SERVICES} Services got an address:\n{}",
            writes.count(&server),
            first.log()
        );
    };
    // Timed by the server's answer, as the floor is timed by its last answer: the poll
    // only says when to look.
    let assigned = last_write.saturating_duration_since(started);
    check_distinct(&server)?;
    eprintln!(
        "{}",
        breakdown(&server.request_log(), started, created, assigned)
    );
    let peak_rss_kb = first.peak_rss_kb()?;
    let cpu = first.cpu()?.saturating_sub(cpu_before);
    first.stop();
    if !with_restart {
        return Ok(Assigning {
            assigned,
            created,
            cpu,
            peak_rss_kb,
            restart: None,
        });
    }

    // --- a restart with all of them assigned ---
    let before = server.request_log().len();
    let started = Instant::now();
    let second = Allocator::start(lbagent, &kubeconfig, &format!("bench-{round}-b"), dir)?;
    server.apply(service("trigger"));
    let trigger_written = || {
        // Only the requests since the restart: the poll must not copy the whole log.
        server
            .request_log_since(before)
            .into_iter()
            .find(|r| is_status_write(r) && r.path.contains("/services/trigger/"))
            .map(|r| r.at)
    };
    if !wait_until(DEADLINE, || trigger_written().is_some()) {
        bail!("the restarted allocator did not assign:\n{}", second.log());
    }
    let restart_ready = trigger_written()
        .map(|at| at.saturating_duration_since(started))
        .unwrap_or_default();
    let restart_writes = server.request_log()[before..]
        .iter()
        .filter(|r| r.method != "GET" && r.path.contains("/services/"))
        .filter(|r| !r.path.contains("/services/trigger"))
        .count();
    Ok(Assigning {
        assigned,
        created,
        cpu,
        peak_rss_kb,
        restart: Some((restart_ready, restart_writes)),
    })
}

/// One round of the floor: a bare kube-rs client, the same patches at the same concurrency.
struct Floor {
    assign: Duration,
    /// What a restarted allocator must at least do: list every Service, in pages.
    list: Duration,
}

async fn floor(dir: &Path, round: usize) -> Result<Floor> {
    let floor_server = cluster();
    let floor_kubeconfig = dir.join(format!("floor-{round}.kubeconfig"));
    floor_server.write_kubeconfig(&floor_kubeconfig);
    for i in 0..SERVICES {
        floor_server.apply(service(&name(i)));
    }
    let client = client(&floor_kubeconfig).await?;
    let api = Api::<Service>::namespaced(client.clone(), "default");
    let versions: Vec<(String, String)> = api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|s| (s.name_any(), s.resource_version().unwrap_or_default()))
        .collect();
    let started = Instant::now();
    futures::stream::iter(versions.into_iter().enumerate())
        .map(|(i, (name, version))| {
            let api = api.clone();
            async move {
                let patch = json!({
                    "metadata": {"resourceVersion": version},
                    "status": {"loadBalancer": {"ingress": [
                        {"ip": address(i), "ipMode": "VIP"}]}},
                });
                api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
            }
        })
        .buffer_unordered(WRITE_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    let assign = started.elapsed();
    let started = Instant::now();
    let mut listed = 0;
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = api.list(&params).await?;
        listed += page.items.len();
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    let list = started.elapsed();
    if listed < SERVICES {
        bail!("listed {listed} Services");
    }
    if StatusWrites::default().count(&floor_server) < SERVICES {
        bail!("the floor's patches did not all land");
    }
    Ok(Floor { assign, list })
}

/// Where the allocator's time went, from the API server's request log: when its Service
/// status writes, Event records and pool status writes were answered, relative to the first
/// creation. Printed to stderr beside the table, so a slow run can be read without a profiler.
fn breakdown(
    log: &[RequestRecord],
    started: Instant,
    created: Duration,
    assigned: Duration,
) -> String {
    let after = |r: &RequestRecord| r.at.saturating_duration_since(started).as_secs_f64();
    let span = |what: &str, rs: &[&RequestRecord]| match (rs.first(), rs.last()) {
        (Some(first), Some(last)) => format!(
            "  {what}: {} (first answered at {:.3} s, last at {:.3} s)",
            rs.len(),
            after(first),
            after(last)
        ),
        _ => format!("  {what}: 0"),
    };
    let log: Vec<&RequestRecord> = log.iter().filter(|r| r.at >= started).collect();
    let of = |f: &dyn Fn(&RequestRecord) -> bool| -> Vec<&RequestRecord> {
        log.iter().copied().filter(|r| f(r)).collect()
    };
    let patches = of(&|r| {
        r.method == "PATCH" && r.path.contains("/services/") && r.path.ends_with("/status")
    });
    let last_patch = patches.last().map_or(started, |r| r.at);
    let events = of(&|r| r.method == "POST" && r.path.ends_with("/events"));
    let events_before = events.iter().filter(|r| r.at <= last_patch).count();
    let pools = of(&|r| r.method == "PATCH" && r.path.contains("/addresspools/"));
    let rereads = of(&|r| r.method == "GET" && r.path.contains("/services/"));
    let conflicts = patches.iter().filter(|r| r.status == 409).count();
    [
        format!(
            "where the allocator's {:.2} s went (request log, from the first creation):",
            assigned.as_secs_f64()
        ),
        format!(
            "  creating the {SERVICES} in the API server: {:.3} s",
            created.as_secs_f64()
        ),
        span("Service status patches", &patches),
        format!("    of which 409 Conflict: {conflicts}"),
        span("Service re-reads", &rereads),
        span("Event records", &events),
        format!("    of which answered before the last status patch: {events_before}"),
        span("AddressPool status patches", &pools),
        format!("  requests answered in all: {}", log.len()),
    ]
    .join("\n")
}

fn poll(deadline: Duration, mut done: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + deadline;
    while Instant::now() < until {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    done()
}

fn cluster() -> ApiServer {
    let server = ApiServer::start();
    // A real server replays changes since its last compaction: minutes of them.
    server.keep_history(4 * SERVICES);
    for namespace in ["default", "lbagent"] {
        server.apply(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": namespace}}));
    }
    for (priority, (name, cidr)) in POOLS.iter().enumerate() {
        server.apply(
            json!({"apiVersion": "lbagent.io/v1alpha1", "kind": "AddressPool",
            "metadata": {"name": name},
            "spec": {"addresses": [cidr], "priority": priority}}),
        );
    }
    server
}

fn name(i: usize) -> String {
    format!("svc-{i:05}")
}

fn address(i: usize) -> String {
    format!("10.0.{}.{}", i / 256, i % 256)
}

fn service(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]}})
}

/// Successful status writes to distinct Services, counted from the requests not seen yet.
#[derive(Default)]
struct StatusWrites {
    seen: usize,
    services: BTreeSet<String>,
    /// When the server answered the write that gave the last of them its first address.
    last_first_write: Option<Instant>,
}

impl StatusWrites {
    fn count(&mut self, server: &ApiServer) -> usize {
        let new = server.request_log_since(self.seen);
        self.seen += new.len();
        for record in new {
            if is_status_write(&record) && self.services.insert(record.path) {
                self.last_first_write = Some(record.at);
            }
        }
        self.services.len()
    }
}

fn is_status_write(record: &RequestRecord) -> bool {
    record.method == "PATCH"
        && record.status == 200
        && record.path.contains("/services/")
        && record.path.ends_with("/status")
}

fn check_distinct(server: &ApiServer) -> Result<()> {
    let mut seen = BTreeSet::new();
    for service in server.objects("v1", "Service") {
        let ips = &service["status"]["loadBalancer"]["ingress"];
        let Some([ingress]) = ips.as_array().map(Vec::as_slice) else {
            bail!("{}: {ips}", service["metadata"]["name"]);
        };
        let ip = ingress["ip"].as_str().unwrap_or_default().to_owned();
        if !seen.insert(ip.clone()) {
            bail!("{ip} given twice");
        }
    }
    Ok(())
}

async fn client(kubeconfig: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

struct Allocator {
    child: Child,
    log: PathBuf,
}

impl Allocator {
    fn start(lbagent: &Path, kubeconfig: &Path, identity: &str, dir: &Path) -> Result<Self> {
        let log = dir.join(format!("{identity}.log"));
        let file = std::fs::File::create(&log)?;
        let child = Command::new(lbagent)
            .arg("allocator")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--lease-namespace", "lbagent", "--identity", identity])
            .env("LBAGENT_LOG", log_filter())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {}", lbagent.display()))?;
        Ok(Self { child, log })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The CPU time it has used (user and system).
    fn cpu(&self) -> Result<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // The fields after the command's closing parenthesis; utime and stime are the 12th
        // and 13th of them, in clock ticks.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        let (Some(user), Some(system)) = (ticks(11), ticks(12)) else {
            bail!("cannot read the CPU time from {stat}");
        };
        let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as u64;
        Ok(Duration::from_secs_f64(
            (user + system) as f64 / per_second as f64,
        ))
    }

    fn peak_rss_kb(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmHWM")
    }

    /// SIGTERM, so it gives up the Lease for the next one.
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
