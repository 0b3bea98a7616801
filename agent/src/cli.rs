//! The `lbagent` command line.

use std::{io::Write, net::IpAddr, path::PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    address,
    dataplane::{self, AttachMode, PinLayout, VipCounters, VipTable},
};

#[derive(Debug, Parser)]
#[command(name = "lbagent", version, about)]
pub struct Cli {
    /// Directory on bpffs for lbagent's pinned maps and links.
    #[arg(long, global = true, env = "LBAGENT_PIN_ROOT", default_value = PinLayout::DEFAULT_ROOT)]
    pub pin_root: PathBuf,

    /// Log format (logs go to stderr).
    #[arg(long, global = true, env = "LBAGENT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,

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
    match cli.command {
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
        Command::Counters { output } => {
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
                packets: 3,
                bytes: 294,
            },
            VipCounters {
                address: "2001:db8:ff::10".parse().unwrap(),
                packets: 12,
                bytes: 1_500,
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
