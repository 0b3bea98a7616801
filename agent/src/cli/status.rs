//! `lbagent status`: what the running agent holds and why, what BIRD reports, which interfaces
//! have the programs, and the list of what needs attention.

use std::{io::Write, path::PathBuf};

use anyhow::{Context as _, Result};

use super::Output;
use crate::{
    config,
    dataplane::{self, PinLayout, inspect::Attachment},
    desired::AddressState,
    reconcile::Status,
    sinks::{neighbours::NeighbourReport, routing::RoutingStatus},
    status_file,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, default_value = config::DEFAULT_STATUS_PATH)]
    status_file: PathBuf,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// The agent's status file (with BIRD's protocols), the attached programs, and what needs
/// attention.
#[derive(Debug, serde::Serialize)]
struct StatusReport {
    #[serde(flatten)]
    agent: Status,
    dataplane: Vec<Attachment>,
    degraded: Vec<String>,
}

pub fn run(args: Args, pins: &PinLayout, out: &mut impl Write) -> Result<()> {
    let agent = status_file::read(&args.status_file).with_context(
        || "cannot read the agent's status (is `lbagent run` running with this status file?)",
    )?;
    // No pins (no dataplane section, or another pin root) is not an error here.
    let dataplane = if pins.check_bpffs().is_ok() {
        super::runtime()?.block_on(dataplane::inspect::attachments(pins))?
    } else {
        Vec::new()
    };
    let report = StatusReport {
        degraded: degraded(&agent, &dataplane),
        agent,
        dataplane,
    };
    match args.output {
        Output::Json => {
            serde_json::to_writer_pretty(&mut *out, &report)?;
            writeln!(out)?;
        }
        Output::Table => write_report(out, &report)?,
    }
    Ok(())
}

fn degraded(agent: &Status, dataplane: &[Attachment]) -> Vec<String> {
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
    if let Some(neighbours) = &agent.neighbours {
        degraded.extend(neighbours.no_interface.iter().map(|address| {
            format!(
                "{address}: this node owns the local address but has no interface in its subnet"
            )
        }));
        degraded.extend(neighbours.foreign.iter().map(|f| {
            format!(
                "{}: another host ({}) answers for this local address too (split brain, {} answers)",
                f.address, f.mac, f.answers
            )
        }));
        for election in &neighbours.addresses {
            if election.owner.is_none() {
                degraded.push(format!(
                    "{}: no live node may answer for it",
                    election.address
                ));
            }
        }
    }
    if let Some(routing) = &agent.routing {
        if routing.bird != "running" && routing.mode == "managed" {
            degraded.push(format!("BIRD: {}", routing.bird));
        }
        for p in &routing.protocols {
            if p.has_neighbours() && !p.is_up() {
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

fn write_report(out: &mut impl Write, report: &StatusReport) -> std::io::Result<()> {
    write_addresses(out, &report.agent)?;
    if let Some(neighbours) = &report.agent.neighbours {
        write_neighbours(out, neighbours)?;
    }
    if let Some(routing) = &report.agent.routing {
        write_routing(out, routing)?;
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

fn write_addresses(out: &mut impl Write, status: &Status) -> std::io::Result<()> {
    writeln!(
        out,
        "node {}  interface {}  reconciles {} (last: {}, {:.1} ms)",
        status.node,
        status.interface,
        status.reconciles,
        status.last_reconcile.trigger,
        status.last_reconcile.duration_ms
    )?;
    let addresses: Vec<String> = status
        .addresses
        .iter()
        .map(|a| a.address.to_string())
        .collect();
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
    let width = super::column_width("ADDRESS", addresses.iter().map(String::as_str));
    let state_width = super::column_width("STATE", states.iter().map(String::as_str));
    writeln!(
        out,
        "{:<width$}  {:<state_width$}  SERVICES",
        "ADDRESS", "STATE"
    )?;
    for ((status, address), state) in status.addresses.iter().zip(&addresses).zip(&states) {
        writeln!(
            out,
            "{address:<width$}  {state:<state_width$}  {}",
            status.services.join(",")
        )?;
    }
    Ok(())
}

fn write_neighbours(out: &mut impl Write, report: &NeighbourReport) -> std::io::Result<()> {
    match &report.members {
        Some(members) => writeln!(
            out,
            "\nlocal addresses: members {} (from {})",
            members.join(","),
            report.members_file.display()
        )?,
        None => writeln!(
            out,
            "\nlocal addresses: no member list yet (from {})",
            report.members_file.display()
        )?,
    }
    let addresses: Vec<String> = report
        .addresses
        .iter()
        .map(|e| e.address.to_string())
        .collect();
    let width = super::column_width("ADDRESS", addresses.iter().map(String::as_str));
    let owners: Vec<String> = report
        .addresses
        .iter()
        .map(|e| {
            let owner = e.owner.clone().unwrap_or_else(|| "-".to_owned());
            if e.answering {
                format!("{owner} (this node)")
            } else {
                owner
            }
        })
        .collect();
    let owner_width = super::column_width("OWNER", owners.iter().map(String::as_str));
    writeln!(
        out,
        "{:<width$}  {:<owner_width$}  CANDIDATES",
        "ADDRESS", "OWNER"
    )?;
    for ((election, address), owner) in report.addresses.iter().zip(&addresses).zip(&owners) {
        writeln!(
            out,
            "{address:<width$}  {owner:<owner_width$}  {}",
            election.candidates.join(",")
        )?;
    }
    Ok(())
}

fn write_routing(out: &mut impl Write, routing: &RoutingStatus) -> std::io::Result<()> {
    writeln!(
        out,
        "\nrouting: {} BIRD, {} (restarts: {})",
        routing.mode, routing.bird, routing.restarts
    )?;
    if let Some(reload) = &routing.last_reload {
        writeln!(out, "last reload: {reload}")?;
    }
    let width = super::column_width(
        "PROTOCOL",
        routing.protocols.iter().map(|p| p.name.as_str()),
    );
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
