//! `cargo xtask bench routing`: how fast an address change reaches an upstream router's
//! kernel through lbagent and its BIRD; a bulk add against `ip -batch` onto a kube-lb0 served
//! by a hand-written BIRD config; and how fast a Service's BGP attribute change reaches the
//! router, against the same change made by hand to a hand-written BIRD config and `birdc
//! configure`. lbagent runs on one node, the hand-written BIRD on another, both peering with
//! the same FRR router, so that every comparison alternates between them in the same run.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

const SEQUENTIAL: usize = 100;
const BULK_V4: usize = 5_000;
const BULK_V6: usize = 5_000;
/// Bulk adds on each side: one is at the mercy of where BIRD's device scan (2 s) falls.
const BULK_ROUNDS: usize = 5;
/// Services in the attribute round, and how many of them carry a community; each of those
/// gets one change, so there are as many changes on each side.
const SERVICES: usize = 1_000;
const ATTRIBUTED: usize = 100;
/// lbagent's allow-list for the attribute round.
const ATTRIBUTES: &str = "  serviceAttributes: {communities: [\"64512:*\"]}\n";
/// The router gives a route whose community is one of the changed ones (64512:1000 and up)
/// this next hop (an inbound route-map), so the change shows in its kernel table, where `ip
/// monitor` times it, instead of in bgpd's, which only polling would see.
const CHANGED_VIA: &str = "10.0.0.99";
const FRR_CHANGED: &str = "bgp community-list expanded CHANGED seq 5 permit 64512:1[0-9][0-9][0-9]
route-map CHANGED permit 10
 match community CHANGED
 set ip next-hop 10.0.0.99
route-map CHANGED permit 20
";
const NODE_V4: &str = "10.0.0.11";
const BASE_V4: &str = "10.0.0.12";

pub fn run() -> Result<()> {
    cmd::require_root("bench routing")?;
    cmd::cargo(&["build", "--quiet", "--release", "--package", "lbagent"])?;
    let lbagent = crate::bench::target_dir().join("release/lbagent");
    let load_before = load_average();
    let lab = Lab::new()?;
    let frr = lab.start_frr()?;
    let monitor = RouteMonitor::start(&lab.router)?;

    let mut agent = lab.start_agent(&lbagent)?;
    let mut plain = PlainBird::start(&lab)?;
    lab.wait_established(4)?;

    // --- one address at a time, through lbagent ---
    let mut adds = Vec::new();
    let mut current: Vec<String> = Vec::new();
    for i in 0..SEQUENTIAL {
        let address = format!("203.0.113.{}", i + 1);
        current.push(address.clone());
        let started = lab.write_services(&current)?;
        adds.push(monitor.wait_for(&address, true, started, Duration::from_secs(10))?);
    }
    let mut removes = Vec::new();
    while let Some(address) = current.pop() {
        let started = lab.write_services(&current)?;
        removes.push(monitor.wait_for(&address, false, started, Duration::from_secs(10))?);
    }

    // --- 10,000 at once: lbagent and ip -batch under a hand-written BIRD, alternating ---
    let bulk: Vec<String> = (0..BULK_V4)
        .map(|i| format!("100.64.{}.{}", i / 250, i % 250 + 1))
        .chain((0..BULK_V6).map(|i| format!("2001:db8:1::{:x}", i + 1)))
        .collect();
    let wanted: BTreeSet<String> = bulk.iter().cloned().collect();
    let mut batch = String::new();
    for address in &bulk {
        let (len, nodad) = if address.contains(':') {
            (128, " nodad")
        } else {
            (32, "")
        };
        writeln!(batch, "address add {address}/{len} dev kube-lb0{nodad}")?;
    }
    let batch_file = lab.dir.join("batch");
    std::fs::write(&batch_file, batch)?;
    let (mut lbagent_bulk, mut baseline_bulk) = (Vec::new(), Vec::new());
    for _ in 0..BULK_ROUNDS {
        monitor.clear();
        let started = lab.write_services(&bulk)?;
        lbagent_bulk.push(monitor.wait_for_all(&wanted, started, Duration::from_secs(120))?);
        lab.write_services(&[])?;
        lab.wait_no_bgp_routes("lbagent's bulk")?;

        monitor.clear();
        let started = Instant::now();
        cmd::output(
            Command::new("ip")
                .args(["-n", &lab.base, "-batch"])
                .arg(&batch_file),
        )?;
        baseline_bulk.push(monitor.wait_for_all(&wanted, started, Duration::from_secs(120))?);
        cmd::output(
            Command::new("ip").args(["-n", &lab.base, "addr", "flush", "dev", "kube-lb0"]),
        )?;
        lab.wait_no_bgp_routes("the plain BIRD's bulk")?;
    }
    let reloads = agent.reloads()?;

    // --- a Service's attribute change: lbagent and a hand-written BIRD config, alternating ---
    let mut changed = BTreeMap::new();
    monitor.clear();
    let started = lab.write_services_text(&attributed_services(&changed))?;
    let lbagent_set: BTreeSet<String> = (0..SERVICES).map(service_address).collect();
    monitor.wait_for_all(&lbagent_set, started, Duration::from_secs(120))?;
    lab.wait_community(&service_address(0), 1, Duration::from_secs(30))?;
    plain.serve_attributed(&lab, &monitor)?;
    let reloads_before = agent.reloads()?;
    let (mut lbagent_changes, mut baseline_changes) = (Vec::new(), Vec::new());
    // When each lbagent change was written (seconds of the day, UTC, as its log says), and
    // how long each `birdc configure` took.
    let (mut written, mut configures) = (Vec::new(), Vec::new());
    for i in 0..ATTRIBUTED {
        let community = 1_000 + i as u32;
        changed.insert(i, community);
        let started = lab.write_services_text(&attributed_services(&changed))?;
        // When the file was renamed into place: lbagent may log its reading of it before
        // this line runs.
        written.push(seconds_of_day(
            std::time::SystemTime::now() - started.elapsed(),
        ));
        lbagent_changes.push(monitor.wait_for_via(
            &service_address(i),
            CHANGED_VIA,
            started,
            Duration::from_secs(30),
        )?);
        let started = Instant::now();
        plain.configure(&attributed_config(&changed))?;
        configures.push(started.elapsed());
        baseline_changes.push(monitor.wait_for_via(
            &base_address(i),
            CHANGED_VIA,
            started,
            Duration::from_secs(30),
        )?);
    }
    let attribute_reloads = agent.reloads()? - reloads_before;
    let steps = agent.reload_steps(&written, &lbagent_changes)?;

    agent.stop();
    lab.cleanup(&lbagent)?;
    drop(plain);
    drop(frr);
    let load_after = load_average();

    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    let ratio = |a: Duration, b: Duration| format!("{:.2}", a.as_secs_f64() / b.as_secs_f64());
    println!();
    println!(
        "routing benchmark: lbagent with its managed BIRD on one node, a hand-written BIRD config on another, an FRR router (bgpd + zebra); times until the router's kernel has (or no longer has) the route; load average {load_before} before, {load_after} after"
    );
    let sequential = |what: &str, times: &[Duration]| {
        [
            format!("{what} one address ({SEQUENTIAL} in sequence)"),
            ms(percentile(times, 50)),
            ms(percentile(times, 99)),
            "p50 <= 150 ms, p99 <= 500 ms".to_owned(),
        ]
    };
    print_table(
        &["measure", "p50", "p99", "target"],
        &[sequential("add", &adds), sequential("remove", &removes)],
    );
    let median = |times: &[Duration]| percentile(times, 50);
    let range = |times: &[Duration]| {
        format!(
            "{}-{}",
            ms(*times.iter().min().unwrap_or(&Duration::ZERO)),
            ms(*times.iter().max().unwrap_or(&Duration::ZERO))
        )
    };
    print_table(
        &[
            &format!(
                "bulk: {} addresses at once ({BULK_V4} IPv4 + {BULK_V6} IPv6), all at the router, {BULK_ROUNDS} rounds each, alternating",
                bulk.len()
            ),
            "median",
            "range",
            "target",
        ],
        &[
            [
                "`ip -batch` onto kube-lb0, hand-written BIRD config (baseline)".to_owned(),
                ms(median(&baseline_bulk)),
                range(&baseline_bulk),
                String::new(),
            ],
            [
                "lbagent (services file to kube-lb0, its BIRD)".to_owned(),
                ms(median(&lbagent_bulk)),
                range(&lbagent_bulk),
                String::new(),
            ],
            [
                "ratio of the medians, lbagent / baseline".to_owned(),
                ratio(median(&lbagent_bulk), median(&baseline_bulk)),
                String::new(),
                "<= 1.2".to_owned(),
            ],
            [
                "BIRD reloads caused by address changes".to_owned(),
                reloads.to_string(),
                String::new(),
                "0".to_owned(),
            ],
        ],
    );
    let p = |times: &[Duration], n| percentile(times, n);
    print_table(
        &[
            &format!(
                "attribute change: each of {ATTRIBUTED} attributed Services (of {SERVICES}) gets a community no Service had, until the router shows it; alternating"
            ),
            "p50",
            "p99",
            "target",
        ],
        &[
            [
                "hand-written BIRD config (prefix sets), rewritten + `birdc configure` (baseline)"
                    .to_owned(),
                ms(p(&baseline_changes, 50)),
                ms(p(&baseline_changes, 99)),
                String::new(),
            ],
            [
                "lbagent (services file to its BIRD)".to_owned(),
                ms(p(&lbagent_changes, 50)),
                ms(p(&lbagent_changes, 99)),
                String::new(),
            ],
            [
                "ratio lbagent / baseline".to_owned(),
                ratio(p(&lbagent_changes, 50), p(&baseline_changes, 50)),
                ratio(p(&lbagent_changes, 99), p(&baseline_changes, 99)),
                "<= 1.2".to_owned(),
            ],
            [
                format!("BIRD reloads during the {ATTRIBUTED} attribute changes (lbagent)"),
                attribute_reloads.to_string(),
                String::new(),
                ATTRIBUTED.to_string(),
            ],
        ],
    );
    let tail: Vec<Duration> = baseline_changes
        .iter()
        .zip(&configures)
        .map(|(total, configure)| total.saturating_sub(*configure))
        .collect();
    let step =
        |what: &str, times: &[Duration]| [what.to_owned(), ms(p(times, 50)), ms(p(times, 99))];
    let sub_ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let sub = |what: &str, times: &[Duration]| {
        [
            format!(
                "  of which {what} ({} of {ATTRIBUTED} changes)",
                times.len()
            ),
            sub_ms(p(times, 50)),
            sub_ms(p(times, 99)),
        ]
    };
    let mut rows = vec![
        step(
            "lbagent: services file written until the config is handed to BIRD (file source, reconcile pass, render)",
            &steps.pass,
        ),
        sub(
            "written until read by the file source (inotify, settling, read)",
            &steps.read,
        ),
        sub(
            "parsing 1,000 Services into the desired state",
            &steps.parse,
        ),
        sub("parsed until the reconcile pass starts", &steps.queued),
    ];
    for (slot, times) in &steps.sinks {
        let what = if slot == "Routing" {
            "the routing sink's observe and plan (render)".to_owned()
        } else {
            format!("the {} sink's pass", slot.to_lowercase())
        };
        rows.push(sub(&what, times));
    }
    rows.extend([
        step(
            "lbagent: config handed until BIRD reconfigured (write, `configure`)",
            &steps.reload,
        ),
        step(
            "lbagent: BIRD reconfigured until the router's kernel has it (marks, BIRD's export, BGP, FRR, zebra)",
            &steps.after,
        ),
        step("baseline: config written + `birdc configure`", &configures),
        step(
            "baseline: `birdc configure` returned until the router's kernel has it",
            &tail,
        ),
    ]);
    print_table(
        &["where an attribute change's time goes", "p50", "p99"],
        &rows,
    );
    Ok(())
}

/// Seconds since midnight UTC.
fn seconds_of_day(time: std::time::SystemTime) -> f64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64() % 86_400.0)
}

/// Seconds since midnight of an RFC 3339 UTC timestamp (`2026-12-01T15:25:00.123456Z`).
fn stamp_of_day(stamp: &str) -> Option<f64> {
    let time = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.splitn(3, ':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    Some(hours * 3600.0 + minutes * 60.0 + seconds)
}

/// An attribute change through lbagent, in three steps, the first split at its debug lines.
#[derive(Default)]
struct ReloadSteps {
    pass: Vec<Duration>,
    reload: Vec<Duration>,
    after: Vec<Duration>,
    /// Written until the file source has read the new text (inotify, settling, reading).
    read: Vec<Duration>,
    /// Parsing it (and building the desired state).
    parse: Vec<Duration>,
    /// Parsed until the reconciler's pass starts.
    queued: Vec<Duration>,
    /// Each sink's pass, by its slot (the routing sink's until the config is handed).
    sinks: BTreeMap<String, Vec<Duration>>,
}

/// A Markdown table: a header row, then the rows; every column but the first right-aligned.
fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    println!();
    println!("| {} |", header.join(" | "));
    let align: Vec<&str> = (0..N)
        .map(|i| if i == 0 || i == N - 1 { "---" } else { "---:" })
        .collect();
    println!("| {} |", align.join(" | "));
    for row in rows {
        println!("| {} |", row.join(" | "));
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Service `i`'s address on lbagent's node.
fn service_address(i: usize) -> String {
    format!("100.65.{}.{}", i / 250, i % 250 + 1)
}

/// The same Service's address on the hand-written BIRD's node.
fn base_address(i: usize) -> String {
    format!("100.66.{}.{}", i / 250, i % 250 + 1)
}

/// The community of Service `i`, if it has one: the first [`ATTRIBUTED`] have 64512:1 until
/// a change gives one of them its own.
fn community_of(i: usize, changed: &BTreeMap<usize, u32>) -> Option<u32> {
    changed.get(&i).copied().or((i < ATTRIBUTED).then_some(1))
}

fn attributed_services(changed: &BTreeMap<usize, u32>) -> String {
    let mut text = String::from("services:\n");
    for i in 0..SERVICES {
        let bgp = community_of(i, changed).map_or_else(String::new, |c| {
            format!(", bgp: {{communities: [\"64512:{c}\"]}}")
        });
        let _ = writeln!(
            text,
            "- {{name: s{i}, addresses: [{}]{bgp}}}",
            service_address(i)
        );
    }
    text
}

/// The operator's way: the attributed addresses listed in the export filter by community.
fn attributed_config(changed: &BTreeMap<usize, u32>) -> String {
    let mut by_community: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for i in 0..SERVICES {
        if let Some(c) = community_of(i, changed) {
            by_community
                .entry(c)
                .or_default()
                .push(format!("{}/32", base_address(i)));
        }
    }
    let mut filter = String::new();
    for (c, nets) in &by_community {
        let _ = writeln!(
            filter,
            "  if net ~ [ {} ] then bgp_community.add((64512, {c}));",
            nets.join(", ")
        );
    }
    plain_config(&filter)
}

/// A hand-written BIRD config for the baseline node: `filter` goes into its export filter.
fn plain_config(filter: &str) -> String {
    format!(
        "router id {BASE_V4};
protocol device {{ scan time 2; }}
protocol direct {{ ipv4; ipv6; interface \"kube-lb0\"; }}
filter vips {{
  if source != RTS_DEVICE then reject;
{filter}  accept;
}}
protocol bgp up4 {{ local as 64512; neighbor 10.0.0.1 as 64500; hold time 9; keepalive time 1; connect retry time 1;
  ipv4 {{ import none; export filter vips; }}; }}
protocol bgp up6 {{ local as 64512; neighbor fd00::1 as 64500; hold time 9; keepalive time 1; connect retry time 1;
  ipv6 {{ import none; export filter vips; }}; }}
"
    )
}

fn percentile(values: &[Duration], p: usize) -> Duration {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() * p).div_ceil(100)).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// One line of `ip monitor route`: when it arrived, whether the route was added (or
/// replaced) rather than deleted, its prefix and its gateway.
struct RouteEvent {
    at: Instant,
    added: bool,
    prefix: String,
    via: Option<String>,
}

/// `ip monitor route` in the router namespace: each BGP route line, timestamped on arrival.
struct RouteMonitor {
    _child: Killed,
    events: mpsc::Receiver<RouteEvent>,
}

impl RouteMonitor {
    fn start(ns: &str) -> Result<Self> {
        let mut child = Command::new("ip")
            .args(["-n", ns, "monitor", "route"])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting ip monitor")?;
        let stdout = child.stdout.take().context("monitor stdout")?;
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if !line.contains("proto bgp") {
                    continue;
                }
                let (added, rest) = match line.strip_prefix("Deleted ") {
                    Some(rest) => (false, rest),
                    None => (true, line.strip_prefix("Replaced ").unwrap_or(&line)),
                };
                let mut words = rest.split_whitespace();
                let prefix = words.next().unwrap_or_default().to_owned();
                let via = words
                    .skip_while(|word| *word != "via")
                    .nth(1)
                    .map(str::to_owned);
                let event = RouteEvent {
                    at: Instant::now(),
                    added,
                    prefix,
                    via,
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        Ok(Self {
            _child: Killed(child),
            events,
        })
    }

    fn clear(&self) {
        while self.events.try_recv().is_ok() {}
    }

    /// Time from `started` until the first event for `address` that `matches`.
    fn wait_until(
        &self,
        address: &str,
        what: &str,
        started: Instant,
        timeout: Duration,
        matches: impl Fn(&RouteEvent) -> bool,
    ) -> Result<Duration> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .events
                .recv_timeout(left)
                .with_context(|| format!("{address} never {what} at the router"))?;
            if event.prefix == address && matches(&event) {
                return Ok(event.at.saturating_duration_since(started));
            }
        }
    }

    /// Time from `started` until `address` was added (or removed) at the router.
    fn wait_for(
        &self,
        address: &str,
        added: bool,
        started: Instant,
        timeout: Duration,
    ) -> Result<Duration> {
        let what = if added { "arrived" } else { "left" };
        self.wait_until(address, what, started, timeout, |event| {
            event.added == added
        })
    }

    /// Time from `started` until the router routes `address` through `via`.
    fn wait_for_via(
        &self,
        address: &str,
        via: &str,
        started: Instant,
        timeout: Duration,
    ) -> Result<Duration> {
        let what = format!("went through {via}");
        self.wait_until(address, &what, started, timeout, |event| {
            event.added && event.via.as_deref() == Some(via)
        })
    }

    /// Time from `started` until every address in `wanted` was added at the router.
    fn wait_for_all(
        &self,
        wanted: &BTreeSet<String>,
        started: Instant,
        timeout: Duration,
    ) -> Result<Duration> {
        let mut missing = wanted.clone();
        let deadline = Instant::now() + timeout;
        let mut last = started;
        while !missing.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(event) = self.events.recv_timeout(left) else {
                bail!(
                    "{} of {} addresses never reached the router",
                    missing.len(),
                    wanted.len()
                );
            };
            if event.added && missing.remove(&event.prefix) {
                last = event.at;
            }
        }
        Ok(last.saturating_duration_since(started))
    }
}

struct Agent {
    child: Killed,
    log: PathBuf,
}

impl Agent {
    /// Splits each change (written at `written[n]`, seen at the router `totals[n]` later) at
    /// lbagent's log lines: the file read and parsed, the reconciler's pass and each sink's,
    /// the config handed to BIRD, and BIRD reconfigured.
    fn reload_steps(&self, written: &[f64], totals: &[Duration]) -> Result<ReloadSteps> {
        let log = std::fs::read_to_string(&self.log)?;
        let lines: Vec<(f64, serde_json::Value)> = log
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter_map(|line| Some((stamp_of_day(line["timestamp"].as_str()?)?, line)))
            .collect();
        let message = |line: &serde_json::Value| {
            line["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        let at = |needle: &str| -> Vec<f64> {
            lines
                .iter()
                .filter(|(_, line)| message(line).contains(needle))
                .map(|(t, _)| *t)
                .collect()
        };
        let (handed, reconfigured) = (at("reconfiguring BIRD"), at("BIRD reconfigured"));
        let (read, parsed) = (at("services file changed"), at("services file parsed"));
        let after = |times: &[f64], from: f64| times.iter().copied().find(|t| *t >= from);
        let span = |from: f64, to: f64| Duration::from_secs_f64((to - from).max(0.0));
        let field_ms = |line: &serde_json::Value, field: &str| {
            line["fields"][field].as_f64().unwrap_or_default()
        };
        let mut steps = ReloadSteps::default();
        for (n, (start, total)) in written.iter().zip(totals).enumerate() {
            let next = written.get(n + 1).copied().unwrap_or(f64::MAX);
            let (Some(hand), seen) = (after(&handed, *start), start + total.as_secs_f64()) else {
                bail!("no \"reconfiguring BIRD\" in lbagent's log after a change");
            };
            let Some(done) = after(&reconfigured, hand) else {
                bail!("no \"BIRD reconfigured\" in lbagent's log after a change");
            };
            steps.pass.push(span(*start, hand));
            steps.reload.push(span(hand, done));
            steps.after.push(span(done, seen));
            // The finer split needs lbagent's debug lines (LBAGENT_LOG): without them, none.
            let (Some(read_at), Some(parsed_at)) = (after(&read, *start), after(&parsed, *start))
            else {
                continue;
            };
            steps.read.push(span(*start, read_at));
            steps.parse.push(span(read_at, parsed_at));
            let mut first_sink: Option<f64> = None;
            // The pass for this change is each sink's first after the parse; a pass that
            // follows (a drift noticed) is not the change's.
            let mut passed = BTreeSet::new();
            for (t, line) in lines.iter().filter(|(t, _)| *t >= parsed_at && *t < next) {
                if message(line) != "sink pass" {
                    continue;
                }
                let slot = line["span"]["slot"].as_str().unwrap_or("?").to_owned();
                if !passed.insert(slot.clone()) {
                    continue;
                }
                let observe = field_ms(line, "observe_ms");
                let plan = field_ms(line, "plan_ms");
                let apply = field_ms(line, "apply_ms");
                let ms = if slot == "Routing" {
                    observe + plan
                } else {
                    observe + plan + apply
                };
                let began = t - (observe + plan + apply) / 1e3;
                first_sink = Some(first_sink.map_or(began, |first| first.min(began)));
                steps
                    .sinks
                    .entry(slot)
                    .or_default()
                    .push(Duration::from_secs_f64(ms / 1e3));
            }
            steps
                .queued
                .push(span(parsed_at, first_sink.unwrap_or(parsed_at)));
        }
        Ok(steps)
    }

    /// How often lbagent has reconfigured its BIRD so far.
    fn reloads(&self) -> Result<usize> {
        Ok(std::fs::read_to_string(&self.log)?
            .matches("reconfiguring BIRD")
            .count())
    }

    fn stop(&mut self) {
        let _ = cmd::terminate(&mut self.child.0);
    }
}

/// BIRD with a config written by hand (not by lbagent), as an operator would run it, on the
/// baseline node.
struct PlainBird {
    _child: Killed,
    conf: PathBuf,
    socket: PathBuf,
}

impl PlainBird {
    fn start(lab: &Lab) -> Result<Self> {
        let conf = lab.dir.join("plain-bird.conf");
        std::fs::write(&conf, plain_config(""))?;
        let socket = lab.dir.join("plain-bird.ctl");
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.base, "bird", "-f", "-c"])
            .arg(&conf)
            .arg("-s")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        wait(Duration::from_secs(10), || socket.exists()).context("plain BIRD did not start")?;
        Ok(Self {
            _child: Killed(child),
            conf,
            socket,
        })
    }

    /// Rewrites the config and `birdc configure`, as an operator would.
    fn configure(&self, text: &str) -> Result<()> {
        std::fs::write(&self.conf, text)?;
        cmd::output(
            Command::new("birdc")
                .arg("-s")
                .arg(&self.socket)
                .arg("configure"),
        )?;
        Ok(())
    }

    /// The attribute round's start: the config with the communities, the 1,000 addresses.
    fn serve_attributed(&mut self, lab: &Lab, monitor: &RouteMonitor) -> Result<()> {
        self.configure(&attributed_config(&BTreeMap::new()))?;
        let mut batch = String::new();
        for i in 0..SERVICES {
            writeln!(batch, "address add {}/32 dev kube-lb0", base_address(i))?;
        }
        let file = lab.dir.join("batch-attributed");
        std::fs::write(&file, batch)?;
        monitor.clear();
        let started = Instant::now();
        cmd::output(
            Command::new("ip")
                .args(["-n", &lab.base, "-batch"])
                .arg(&file),
        )?;
        let wanted: BTreeSet<String> = (0..SERVICES).map(base_address).collect();
        monitor.wait_for_all(&wanted, started, Duration::from_secs(120))?;
        lab.wait_community(&base_address(0), 1, Duration::from_secs(30))
    }
}

/// A process of the benchmark's, killed when it goes out of scope.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Frr {
    children: Vec<Child>,
}

impl Drop for Frr {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = cmd::terminate(child);
        }
    }
}

/// A router namespace with a bridge; lbagent's node and the baseline's node on it; removed
/// on drop.
struct Lab {
    router: String,
    node: String,
    base: String,
    dir: PathBuf,
}

impl Lab {
    fn new() -> Result<Self> {
        let id = std::process::id();
        let lab = Self {
            router: format!("lbbr-rtr-{id}"),
            node: format!("lbbr-node-{id}"),
            base: format!("lbbr-base-{id}"),
            dir: std::env::temp_dir().join(format!("lbbr-{id}")),
        };
        std::fs::create_dir_all(lab.dir.join("frr"))?;
        let ip = |args: &[&str]| cmd::output(Command::new("ip").args(args));
        let sysctl = |ns: &str, setting: &str| {
            cmd::output(Command::new("ip").args(["netns", "exec", ns, "sysctl", "-qw", setting]))
        };
        let router = lab.router.as_str();
        ip(&["netns", "add", router])?;
        ip(&["-n", router, "link", "set", "lo", "up"])?;
        for setting in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv6.conf.all.accept_dad=0",
        ] {
            sysctl(router, setting)?;
        }
        ip(&["-n", router, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", router, "link", "set", "br0", "up"])?;
        ip(&["-n", router, "addr", "add", "10.0.0.1/24", "dev", "br0"])?;
        ip(&[
            "-n",
            router,
            "addr",
            "add",
            "fd00::1/64",
            "dev",
            "br0",
            "nodad",
        ])?;
        for (k, (ns, v4)) in [(&lab.node, NODE_V4), (&lab.base, BASE_V4)]
            .into_iter()
            .enumerate()
        {
            let port = format!("v{}", k + 1);
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            sysctl(ns, "net.ipv6.conf.all.accept_dad=0")?;
            ip(&[
                "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port, "netns",
                router,
            ])?;
            ip(&["-n", router, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
            let v6 = format!("fd00::{}/64", 11 + k);
            ip(&["-n", ns, "addr", "add", &v6, "dev", "eth0", "nodad"])?;
        }
        let base = lab.base.as_str();
        ip(&["-n", base, "link", "add", "kube-lb0", "type", "ifb"])?;
        ip(&["-n", base, "link", "set", "kube-lb0", "up"])?;
        Ok(lab)
    }

    fn start_frr(&self) -> Result<Frr> {
        let dir = self.dir.join("frr");
        std::fs::write(dir.join("zebra.conf"), "hostname router\n")?;
        let fixture =
            std::fs::read_to_string(cmd::workspace().join("tests/fixtures/frr-router-bgpd.conf"))?;
        let activate = "  neighbor NODES4 activate\n";
        if !fixture.contains(activate) {
            bail!("tests/fixtures/frr-router-bgpd.conf no longer has {activate:?}");
        }
        let bgpd = fixture.replacen(
            activate,
            &format!("{activate}  neighbor NODES4 route-map CHANGED in\n"),
            1,
        ) + FRR_CHANGED;
        std::fs::write(dir.join("bgpd.conf"), bgpd)?;
        cmd::output(Command::new("chown").arg("frr:frr").arg(&dir))?;
        let path = |name: &str| dir.join(name).display().to_string();
        let mut children = Vec::new();
        for name in ["zebra", "bgpd"] {
            children.push(
                Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &self.router,
                        &format!("/usr/lib/frr/{name}"),
                    ])
                    .args([
                        "-f",
                        &path(&format!("{name}.conf")),
                        "-i",
                        &path(&format!("{name}.pid")),
                    ])
                    .args([
                        "-z",
                        &path("zserv.api"),
                        "--vty_socket",
                        &path(""),
                        "-P",
                        "0",
                    ])
                    .args(["--log", &format!("file:{}", path(&format!("{name}.log")))])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            );
            let ready = if name == "zebra" {
                "zserv.api"
            } else {
                "bgpd.vty"
            };
            wait(Duration::from_secs(10), || dir.join(ready).exists())
                .with_context(|| format!("{name} did not start"))?;
        }
        Ok(Frr { children })
    }

    fn write_services(&self, addresses: &[String]) -> Result<Instant> {
        self.write_services_text(&format!(
            "services:\n- {{name: bench, addresses: [{}]}}\n",
            addresses.join(", ")
        ))
    }

    /// Writes the services file whole (a rename), and returns when it appeared.
    fn write_services_text(&self, text: &str) -> Result<Instant> {
        let tmp = self.dir.join("services.yaml.tmp");
        std::fs::write(&tmp, text)?;
        let started = Instant::now();
        std::fs::rename(&tmp, self.dir.join("services.yaml"))?;
        Ok(started)
    }

    fn config(&self) -> PathBuf {
        self.dir.join("lbagent.yaml")
    }

    /// lbagent with no Services yet, allowing the attribute round's communities.
    fn start_agent(&self, lbagent: &Path) -> Result<Agent> {
        self.write_services(&[])?;
        std::fs::write(
            self.config(),
            format!(
                "node: {{name: bench}}\nlog: {{format: json}}\nsource: {{file: {{path: services.yaml}}}}\nstatus: {{path: {dir}/status.json}}\nrouting:\n  stateDir: {dir}/bird\n{ATTRIBUTES}  bgp:\n    - {{name: up4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, holdTime: 9s, keepaliveTime: 1s, connectRetryTime: 1s}}\n    - {{name: up6, neighbor: \"fd00::1\", asn: 64500, localAsn: 64512, holdTime: 9s, keepaliveTime: 1s, connectRetryTime: 1s}}\n",
                dir = self.dir.display()
            ),
        )?;
        let log = self.dir.join("agent.log");
        let file = std::fs::File::create(&log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node))
            .arg("--")
            .arg(lbagent)
            .args(["run", "--config"])
            .arg(self.config())
            // Its debug lines time each step of a pass (file read, parse, each sink).
            .env("LBAGENT_LOG", "info,lbagent=debug")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()?;
        Ok(Agent {
            child: Killed(child),
            log,
        })
    }

    fn cleanup(&self, lbagent: &Path) -> Result<()> {
        cmd::output(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", self.node))
                .arg("--")
                .arg(lbagent)
                .args([
                    "--pin-root",
                    "/sys/fs/bpf/lbagent-bench-none",
                    "cleanup",
                    "--config",
                ])
                .arg(self.config()),
        )?;
        Ok(())
    }

    fn bgp_routes(&self) -> usize {
        ["-4", "-6"]
            .iter()
            .map(|family| {
                cmd::output(Command::new("ip").args([
                    "-n",
                    &self.router,
                    family,
                    "route",
                    "show",
                    "proto",
                    "bgp",
                ]))
                .map_or(usize::MAX, |table| {
                    table
                        .lines()
                        .filter(|l| !l.starts_with(char::is_whitespace))
                        .count()
                })
            })
            .sum()
    }

    /// Waits on the router's table (a route can go without a notification of its own when
    /// its next-hop group does) until it has no BGP route left.
    fn wait_no_bgp_routes(&self, whose: &str) -> Result<()> {
        wait(Duration::from_secs(60), || self.bgp_routes() == 0)
            .with_context(|| format!("the router kept {whose} routes"))
    }

    /// Waits until the router's bgpd shows community 64512:`community` on `address`.
    fn wait_community(&self, address: &str, community: u32, timeout: Duration) -> Result<()> {
        let needle = format!("\"64512:{community}\"");
        wait(timeout, || {
            self.vtysh(&format!("show bgp ipv4 unicast {address}/32 json"))
                .is_ok_and(|json| json.contains(&needle))
        })
        .with_context(|| format!("the router never showed 64512:{community} on {address}"))
    }

    /// Waits until the router's bgpd has `sessions` sessions up.
    fn wait_established(&self, sessions: usize) -> Result<()> {
        wait(Duration::from_secs(30), || {
            self.vtysh("show bgp summary json")
                .is_ok_and(|json| json.matches("\"state\":\"Established\"").count() >= sessions)
        })
        .context("BGP sessions did not come up")
    }

    fn vtysh(&self, command: &str) -> Result<String> {
        cmd::output(
            Command::new("vtysh")
                .args(["-H", "/dev/null", "--vty_socket"])
                .arg(self.dir.join("frr"))
                .args(["-c", command]),
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.node, &self.base, &self.router] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait(timeout: Duration, mut condition: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
