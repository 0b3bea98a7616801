//! The `lbagent` command line.

use std::{io::Write, net::IpAddr, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use crate::{
    address,
    config::{self, Config},
    dataplane::{self, AttachMode, PinLayout, VipCounters, VipTable, inspect::Attachment},
    rates::{self, SortBy},
    sinks::{
        addresses::AddressSink,
        routing::{
            self, BirdPaths, RoutingStatus,
            model::{IfaceName, Mode},
            render::render_for_mode,
        },
    },
    status::{self, AddressState},
};

#[derive(Debug, Parser)]
#[command(name = "lbagent", version, about)]
pub struct Cli {
    /// Directory on bpffs for lbagent's pinned maps and links.
    #[arg(long, global = true, env = "LBAGENT_PIN_ROOT", default_value = PinLayout::DEFAULT_ROOT)]
    pub pin_root: PathBuf,

    /// Log format (logs go to stderr); overrides the config file's `log.format`.
    #[arg(long, global = true, env = "LBAGENT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: keep the node's load-balancer addresses as the services say.
    Run {
        #[arg(
            long,
            env = "LBAGENT_CONFIG",
            default_value = "/etc/lbagent/lbagent.yaml"
        )]
        config: PathBuf,
        /// This node's name; overrides the config file's `node.name`.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
    },
    /// Run this node's member of the SWIM membership that decides who answers for local
    /// addresses. Runs beside the agent, in its own process, so that it outlives the agent's
    /// restarts.
    Membership {
        /// This node's name.
        #[arg(long, env = "NODE_NAME")]
        name: String,
        /// Address and port to run the protocol on (UDP).
        #[arg(long, env = "LBAGENT_MEMBERSHIP_BIND")]
        bind: std::net::SocketAddr,
        /// Another node's membership address; repeat for each (any one alive is enough).
        #[arg(long = "seed")]
        seeds: Vec<std::net::SocketAddr>,
        /// Where the live members are published for the agent.
        #[arg(long, default_value = "/run/lbagent/members.json")]
        members_file: PathBuf,
    },
    /// Remove everything lbagent created: the load-balancer interface with its addresses,
    /// and the dataplane's programs and pins.
    Cleanup {
        /// Read the interface and status file from this config file.
        #[arg(long, env = "LBAGENT_CONFIG")]
        config: Option<PathBuf>,
        /// The load-balancer interface, when there is no config file.
        #[arg(long, default_value = config::DEFAULT_INTERFACE, conflicts_with = "config")]
        interface: String,
    },
    /// BIRD as lbagent configures it.
    Bird {
        #[command(subcommand)]
        command: BirdCommand,
    },
    /// Show what the running agent holds and why (from its status file).
    Status {
        #[arg(long, default_value = config::DEFAULT_STATUS_PATH)]
        status_file: PathBuf,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Attach the XDP program to an interface (replacing lbagent's own program in place).
    Attach {
        iface: String,
        #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
        mode: AttachMode,
    },
    /// Detach the XDP program; with the last interface the maps go too.
    Detach {
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        iface: Option<String>,
        /// Detach from every interface, including ones that no longer exist.
        #[arg(long)]
        all: bool,
    },
    /// Add or remove load-balancer addresses in the dataplane.
    Vip {
        #[command(subcommand)]
        command: VipCommand,
    },
    /// Print packet and byte counters per address.
    Counters {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Refresh in place with rates, until interrupted (JSON: one line per refresh).
        #[arg(short, long)]
        watch: bool,
        /// Time between refreshes.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration, requires = "watch")]
        interval: std::time::Duration,
        #[arg(long, value_enum, default_value_t = SortBy::Rate, requires = "watch")]
        sort: SortBy,
        /// Stop after this many refreshes.
        #[arg(long, requires = "watch")]
        count: Option<u64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum BirdCommand {
    /// Print the BIRD config lbagent renders from its config file.
    Render {
        #[arg(
            long,
            env = "LBAGENT_CONFIG",
            default_value = "/etc/lbagent/lbagent.yaml"
        )]
        config: PathBuf,
        /// Router id to render with when the config sets none (default: the node's first
        /// global IPv4 address).
        #[arg(long)]
        router_id: Option<std::net::Ipv4Addr>,
    },
}

#[derive(Debug, Subcommand)]
pub enum VipCommand {
    /// Add addresses (IPv4 or IPv6, optionally as /32 or /128).
    Add {
        #[arg(required = true)]
        addresses: Vec<String>,
    },
    /// Remove addresses and their counters.
    Del {
        #[arg(required = true)]
        addresses: Vec<String>,
    },
}

pub fn run(cli: Cli, out: &mut impl Write) -> Result<()> {
    let pins = PinLayout::new(&cli.pin_root);
    // One-shot commands print their result on stdout; their logs only say what needs attention.
    let quiet = "warn";
    match cli.command {
        Command::Run { config, node_name } => {
            let loaded = Config::load(&config, node_name.as_deref())?;
            init_logging(cli.log_format.or(loaded.log_format), "info");
            runtime()?.block_on(crate::daemon::run(config, node_name, loaded))?;
        }
        Command::Membership {
            name,
            bind,
            seeds,
            members_file,
        } => {
            init_logging(cli.log_format, "info");
            let settings = crate::membership::Settings {
                name,
                bind,
                seeds,
                members_file,
                pins: Some(pins.clone()),
            };
            runtime()?.block_on(crate::membership::run(settings, async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                }
            }))?;
        }
        Command::Bird {
            command: BirdCommand::Render { config, router_id },
        } => {
            init_logging(cli.log_format, quiet);
            let loaded = Config::load(&config, None)?;
            let routing = loaded
                .routing
                .as_ref()
                .context("the config has no routing section")?;
            let interface = IfaceName::new(&loaded.addresses.interface, "addresses.interface")?;
            let router_id = match routing.router_id.or(router_id) {
                Some(id) => id,
                None => runtime()?
                    .block_on(async { AddressSink::connect(&loaded.addresses.interface)?.node_ipv4().await })?
                    .context("routing.routerId: this node has no IPv4 address to default to; set one or pass --router-id")?,
            };
            write!(out, "{}", render_for_mode(routing, router_id, &interface))?;
        }
        Command::Cleanup { config, interface } => {
            init_logging(cli.log_format, quiet);
            let mut pins = pins;
            let (interface, status_path, bird) = match config {
                Some(path) => {
                    let config = Config::load(&path, None)?;
                    // The config's pin root wins over the default of --pin-root.
                    if let Some(dataplane) = &config.dataplane {
                        pins = PinLayout::new(&dataplane.pin_root);
                    }
                    let bird = match config.routing.map(|r| r.mode) {
                        Some(Mode::Managed { binary, state_dir }) => Some((binary, state_dir)),
                        _ => None,
                    };
                    (config.addresses.interface, config.status_path, bird)
                }
                None => (
                    interface,
                    PathBuf::from(config::DEFAULT_STATUS_PATH),
                    Some((
                        PathBuf::from("bird"),
                        PathBuf::from(routing::model::DEFAULT_STATE_DIR),
                    )),
                ),
            };
            let runtime = runtime()?;
            // `down`, not a graceful restart: peers must withdraw the routes now.
            let bird_was_running = match &bird {
                Some((_, state_dir)) => {
                    runtime.block_on(routing::down(&BirdPaths::new(state_dir).socket))?
                }
                None => false,
            };
            if bird_was_running {
                writeln!(out, "BIRD: shut down (peers withdraw the routes)")?;
            }
            let deleted = runtime
                .block_on(async { AddressSink::connect(&interface)?.delete_link().await })?;
            writeln!(
                out,
                "{interface}: {}",
                if deleted {
                    "deleted, with its addresses"
                } else {
                    "not present"
                }
            )?;
            if let Some((binary, state_dir)) = bird {
                let paths = BirdPaths::new(&state_dir);
                if !bird_was_running
                    && runtime.block_on(routing::withdraw_stale(&binary, &paths))?
                {
                    writeln!(
                        out,
                        "BIRD: restarted without graceful restart and shut down, so peers drop the routes they kept"
                    )?;
                }
                match std::fs::remove_dir_all(&state_dir) {
                    Ok(()) => writeln!(out, "{}: removed", state_dir.display())?,
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => {
                        return Err(err)
                            .with_context(|| format!("removing {}", state_dir.display()));
                    }
                }
            }
            let _ = std::fs::remove_file(routing::status_path(&status_path));
            if pins.check_bpffs().is_ok() {
                let detached = dataplane::detach_all(&pins)?;
                writeln!(
                    out,
                    "dataplane: {} link(s) detached{}",
                    detached.links.len(),
                    if detached.maps_removed {
                        ", maps removed"
                    } else {
                        ""
                    }
                )?;
            }
            match std::fs::remove_file(&status_path) {
                Ok(()) => writeln!(out, "{}: removed", status_path.display())?,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    return Err(err).with_context(|| format!("removing {}", status_path.display()));
                }
            }
        }
        Command::Status {
            status_file,
            output,
        } => {
            init_logging(cli.log_format, quiet);
            let agent = status::read(&status_file).with_context(|| {
                "cannot read the agent's status (is `lbagent run` running with this status file?)"
            })?;
            let routing = std::fs::read(routing::status_path(&status_file))
                .ok()
                .and_then(|text| serde_json::from_slice::<RoutingStatus>(&text).ok());
            // No pins (no dataplane section, or another pin root) is not an error here.
            let dataplane = if pins.check_bpffs().is_ok() {
                runtime()?.block_on(dataplane::inspect::attachments(&pins))?
            } else {
                Vec::new()
            };
            let report = StatusReport {
                degraded: degraded(&agent, routing.as_ref(), &dataplane),
                agent,
                routing,
                dataplane,
            };
            match output {
                Output::Json => {
                    serde_json::to_writer_pretty(&mut *out, &report)?;
                    writeln!(out)?;
                }
                Output::Table => write_status_report(out, &report)?,
            }
        }
        command => {
            init_logging(cli.log_format, quiet);
            run_dataplane_command(command, &pins, out)?;
        }
    }
    Ok(())
}

fn run_dataplane_command(command: Command, pins: &PinLayout, out: &mut impl Write) -> Result<()> {
    let pins = pins.clone();
    match command {
        Command::Run { .. }
        | Command::Membership { .. }
        | Command::Cleanup { .. }
        | Command::Status { .. }
        | Command::Bird { .. } => {
            unreachable!("handled by run()")
        }
        Command::Attach { iface, mode } => {
            let attached = dataplane::attach(&pins, &iface, mode)?;
            match attached.mode {
                Some(mode) => writeln!(
                    out,
                    "attached to {} (ifindex {}) in {} mode",
                    attached.iface,
                    attached.ifindex,
                    mode_name(mode)
                )?,
                None => writeln!(
                    out,
                    "replaced the program on {} (ifindex {})",
                    attached.iface, attached.ifindex
                )?,
            }
        }
        Command::Detach { iface, all } => {
            let detached = match (iface, all) {
                (_, true) => dataplane::detach_all(&pins)?,
                (Some(iface), false) => dataplane::detach(&pins, &iface)?,
                (None, false) => unreachable!("clap requires an interface or --all"),
            };
            writeln!(
                out,
                "detached from {} interface(s){}",
                detached.links.len(),
                if detached.maps_removed {
                    "; maps removed"
                } else {
                    ""
                }
            )?;
        }
        Command::Vip { command } => {
            let (adding, texts) = match command {
                VipCommand::Add { addresses } => (true, addresses),
                VipCommand::Del { addresses } => (false, addresses),
            };
            // Every address is checked before any is applied: bad input changes nothing.
            let addresses = texts
                .iter()
                .map(|text| address::parse_host(text))
                .collect::<Result<Vec<IpAddr>, _>>()?;
            let mut table = VipTable::open(&pins)?;
            for address in addresses {
                let (changed, verb, unchanged) = if adding {
                    (table.insert(address)?, "added", "already present")
                } else {
                    (table.remove(address)?, "removed", "not present")
                };
                writeln!(out, "{address} {}", if changed { verb } else { unchanged })?;
            }
        }
        Command::Counters {
            output,
            watch: true,
            interval,
            sort,
            count,
        } => watch_counters(&pins, out, output, interval, sort, count)?,
        Command::Counters { output, .. } => {
            let counters = VipTable::open(&pins)?.counters()?;
            match output {
                Output::Table => write_counters_table(out, &counters)?,
                Output::Json => {
                    serde_json::to_writer_pretty(
                        &mut *out,
                        &serde_json::json!({ "vips": counters }),
                    )?;
                    writeln!(out)?;
                }
            }
        }
    }
    Ok(())
}

fn watch_counters(
    pins: &PinLayout,
    out: &mut impl Write,
    output: Output,
    interval: std::time::Duration,
    sort: SortBy,
    count: Option<u64>,
) -> Result<()> {
    let table = VipTable::open(pins)?;
    let in_place = std::io::IsTerminal::is_terminal(&std::io::stdout()) && output == Output::Table;
    let mut before: Option<(std::time::Instant, Vec<VipCounters>)> = None;
    let mut refreshes = 0;
    loop {
        let now = table.counters()?;
        let read_at = std::time::Instant::now();
        let rows = rates::rows(
            before.as_ref().map(|(_, counters)| counters.as_slice()),
            &now,
            before
                .as_ref()
                .map_or(std::time::Duration::ZERO, |(at, _)| read_at - *at),
            sort,
        );
        match output {
            Output::Json => {
                serde_json::to_writer(&mut *out, &serde_json::json!({ "vips": rows }))?;
                writeln!(out)?;
            }
            Output::Table => {
                if in_place {
                    // Home and clear: the table is redrawn where it was.
                    write!(out, "\x1b[H\x1b[2J")?;
                }
                writeln!(
                    out,
                    "every {}, sorted by {}; Ctrl-C to stop",
                    humantime::format_duration(interval),
                    format!("{sort:?}").to_lowercase()
                )?;
                rates::write_table(out, &rows)?;
                if !in_place {
                    writeln!(out)?;
                }
            }
        }
        out.flush()?;
        refreshes += 1;
        if count.is_some_and(|count| refreshes >= count) {
            return Ok(());
        }
        before = Some((read_at, now));
        std::thread::sleep(interval);
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // One thread: the agent waits on the kernel, it does not compute.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Logs go to stderr; `LBAGENT_LOG` (a tracing filter such as `debug`) overrides the level.
pub fn init_logging(format: Option<LogFormat>, default_level: &str) {
    // netlink-packet-route warns on every link message from a kernel newer than it knows
    // (IFLA_INET6_CONF grew); nothing an operator can act on.
    let filter = EnvFilter::try_from_env("LBAGENT_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},netlink_packet_route=error")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format.unwrap_or(LogFormat::Human) {
        LogFormat::Human => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// `lbagent status`: the agent's status file, BIRD's protocols, the attached programs, and
/// the list of what needs attention.
#[derive(Debug, serde::Serialize)]
struct StatusReport {
    #[serde(flatten)]
    agent: status::Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    routing: Option<RoutingStatus>,
    dataplane: Vec<Attachment>,
    degraded: Vec<String>,
}

fn degraded(
    agent: &status::Status,
    routing: Option<&RoutingStatus>,
    dataplane: &[Attachment],
) -> Vec<String> {
    let mut degraded: Vec<String> = agent
        .errors
        .iter()
        .map(|err| format!("reconcile: {err}"))
        .collect();
    degraded.extend(
        agent
            .rejected
            .iter()
            .map(|r| format!("service {} rejected: {}", r.service, r.reason)),
    );
    degraded.extend(
        agent
            .addresses
            .iter()
            .filter(|a| a.state == AddressState::Unsupported)
            .map(|a| format!("{}: not held, this node has no IPv6", a.address)),
    );
    if let Some(routing) = routing {
        if routing.bird != "running" && routing.mode == "managed" {
            degraded.push(format!("BIRD: {}", routing.bird));
        }
        for p in &routing.protocols {
            let down = match p.proto.as_str() {
                "BGP" => !p.info.starts_with("Established"),
                "OSPF" | "RIP" => p.state != "up",
                _ => false,
            };
            if down {
                degraded.push(format!("{} {}: {} {}", p.proto, p.name, p.state, p.info));
            }
        }
    }
    for attachment in dataplane {
        let name = attachment
            .interface
            .clone()
            .unwrap_or_else(|| format!("ifindex {} (gone)", attachment.ifindex));
        if attachment.xdp == "none" {
            degraded.push(format!("{name}: link pinned, but no XDP program attached"));
        } else if !attachment.egress {
            degraded.push(format!("{name}: no tc egress counter (tx counters stay 0)"));
        }
    }
    degraded
}

fn write_status_report(out: &mut impl Write, report: &StatusReport) -> std::io::Result<()> {
    write_status_table(out, &report.agent)?;
    if let Some(routing) = &report.routing {
        write_routing_table(out, routing)?;
    }
    if !report.dataplane.is_empty() {
        writeln!(out, "\ndataplane:")?;
        writeln!(
            out,
            "{:<16}  {:<8}  {:<8}  EGRESS",
            "INTERFACE", "IFINDEX", "XDP"
        )?;
        for a in &report.dataplane {
            writeln!(
                out,
                "{:<16}  {:<8}  {:<8}  {}",
                a.interface.as_deref().unwrap_or("(gone)"),
                a.ifindex,
                a.xdp,
                if a.egress { "tc" } else { "-" }
            )?;
        }
    }
    if report.degraded.is_empty() {
        writeln!(out, "\nnothing degraded")?;
    } else {
        writeln!(out, "\ndegraded:")?;
        for line in &report.degraded {
            writeln!(out, "  {line}")?;
        }
    }
    Ok(())
}

fn write_status_table(out: &mut impl Write, status: &status::Status) -> std::io::Result<()> {
    writeln!(
        out,
        "node {}  interface {}  reconciles {} (last: {}, {:.1} ms)",
        status.node,
        status.interface,
        status.reconciles,
        status.last_reconcile.trigger,
        status.last_reconcile.duration_ms
    )?;
    let width = status
        .addresses
        .iter()
        .map(|a| a.address.to_string().len())
        .chain(["ADDRESS".len()])
        .max()
        .unwrap_or(0);
    let states: Vec<String> = status
        .addresses
        .iter()
        .map(|address| match address.state {
            AddressState::Virtual => "virtual".to_owned(),
            AddressState::Local => format!(
                "local ({})",
                address.prefix.map(|p| p.to_string()).unwrap_or_default()
            ),
            AddressState::Unsupported => "unsupported (no IPv6)".to_owned(),
        })
        .collect();
    let state_width = states
        .iter()
        .map(String::len)
        .chain(["STATE".len()])
        .max()
        .unwrap_or(0);
    writeln!(
        out,
        "{:<width$}  {:<state_width$}  SERVICES",
        "ADDRESS", "STATE"
    )?;
    for (address, state) in status.addresses.iter().zip(&states) {
        writeln!(
            out,
            "{:<width$}  {state:<state_width$}  {}",
            address.address.to_string(),
            address.services.join(",")
        )?;
    }
    Ok(())
}

fn write_routing_table(out: &mut impl Write, routing: &RoutingStatus) -> std::io::Result<()> {
    writeln!(
        out,
        "\nrouting: {} BIRD, {} (restarts: {})",
        routing.mode, routing.bird, routing.restarts
    )?;
    if let Some(reload) = &routing.last_reload {
        writeln!(out, "last reload: {reload}")?;
    }
    let width = routing
        .protocols
        .iter()
        .map(|p| p.name.len())
        .chain(["PROTOCOL".len()])
        .max()
        .unwrap_or(0);
    writeln!(
        out,
        "{:<width$}  {:<8}  {:<6}  {:<13}  INFO",
        "PROTOCOL", "KIND", "STATE", "SINCE"
    )?;
    for p in &routing.protocols {
        writeln!(
            out,
            "{:<width$}  {:<8}  {:<6}  {:<13}  {}",
            p.name, p.proto, p.state, p.since, p.info
        )?;
    }
    Ok(())
}

fn mode_name(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Auto => "auto",
        AttachMode::Driver => "driver",
        AttachMode::Generic => "generic",
    }
}

fn write_counters_table(out: &mut impl Write, counters: &[VipCounters]) -> std::io::Result<()> {
    let width = counters
        .iter()
        .map(|c| c.address.to_string().len())
        .chain(["ADDRESS".len()])
        .max()
        .unwrap_or(0);
    writeln!(
        out,
        "{:<width$}  {:>14}  {:>16}",
        "ADDRESS", "PACKETS", "BYTES"
    )?;
    for c in counters {
        writeln!(
            out,
            "{:<width$}  {:>14}  {:>16}",
            c.address.to_string(),
            c.packets,
            c.bytes
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_table_aligns_columns() {
        let counters = [
            VipCounters {
                address: "203.0.113.10".parse().unwrap(),
                slot: 1,
                packets: 3,
                bytes: 294,
                tx_packets: 0,
                tx_bytes: 0,
                drops: Default::default(),
            },
            VipCounters {
                address: "2001:db8:ff::10".parse().unwrap(),
                slot: 1,
                packets: 12,
                bytes: 1_500,
                tx_packets: 0,
                tx_bytes: 0,
                drops: Default::default(),
            },
        ];
        let mut out = Vec::new();
        write_counters_table(&mut out, &counters).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ADDRESS"));
        assert!(lines[1].starts_with("203.0.113.10 ") && lines[1].ends_with(" 294"));
        assert!(lines[2].starts_with("2001:db8:ff::10 ") && lines[2].ends_with(" 1500"));
        assert!(lines.iter().all(|l| l.len() == lines[0].len()));
    }

    #[test]
    fn detach_needs_an_interface_or_all() {
        assert!(Cli::try_parse_from(["lbagent", "detach"]).is_err());
        assert!(Cli::try_parse_from(["lbagent", "detach", "eth0", "--all"]).is_err());
        assert!(Cli::try_parse_from(["lbagent", "detach", "--all"]).is_ok());
    }

    #[test]
    fn bad_address_is_rejected_before_any_change() {
        // The pin root does not exist: if parsing did not come first, the error would be
        // about bpffs instead of the address.
        let cli = Cli::try_parse_from([
            "lbagent",
            "--pin-root",
            "/nonexistent/lbagent",
            "vip",
            "add",
            "203.0.113.10",
            "300.0.0.1",
        ])
        .unwrap();
        let err = run(cli, &mut Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid address \"300.0.0.1\": not an IPv4 or IPv6 address"
        );
    }
}
