//! The `lbagent` command line: one module per subcommand, each holding its arguments and what
//! it does. `run` starts the agent; the others are one-shot commands that print their result on
//! stdout and log only what needs attention.

mod allocator;
mod attach;
mod bird;
mod cleanup;
mod counters;
mod detach;
mod membership;
mod run;
mod status;
mod vip;

use std::{io::Write, path::PathBuf};

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    dataplane::PinLayout,
    logging::{self, LogFormat},
};

#[derive(Debug, Parser)]
#[command(name = "lbagent", version, about)]
pub struct Cli {
    /// Directory on bpffs for lbagent's pinned maps and links [default: the config's
    /// `dataplane.pinRoot` for `run` and `cleanup --config`, else /sys/fs/bpf/lbagent].
    /// One rule for every subcommand: this flag, else $LBAGENT_PIN_ROOT, else the config's,
    /// else the default.
    #[arg(long, global = true, env = "LBAGENT_PIN_ROOT")]
    pub pin_root: Option<PathBuf>,

    /// Log format (logs go to stderr); overrides the config file's `log.format`.
    #[arg(long, global = true, env = "LBAGENT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: keep the node's load-balancer addresses as the services say.
    Run(run::Args),
    /// Remove everything lbagent created: the load-balancer interface with its addresses,
    /// and the dataplane's programs and pins.
    Cleanup(cleanup::Args),
    /// BIRD as lbagent configures it.
    #[command(subcommand)]
    Bird(bird::Command),
    /// Show what the running agent holds and why (from its status file).
    Status(status::Args),
    /// Attach the XDP program to an interface (replacing lbagent's own program in place).
    Attach(attach::Args),
    /// Detach the XDP program; with the last interface the maps go too.
    Detach(detach::Args),
    /// Add or remove load-balancer addresses in the dataplane.
    #[command(subcommand)]
    Vip(vip::Command),
    /// Print packet and byte counters per address.
    Counters(counters::Args),
    /// Assign LoadBalancer addresses from AddressPools (its own leader-elected Deployment).
    Allocator(allocator::Args),
    /// Run this node's member of the SWIM membership that decides who answers for local
    /// addresses (beside the agent, in its own process, so that it outlives the agent).
    Membership(membership::Args),
}

const QUIET: &str = "warn";

pub fn run(cli: Cli, out: &mut impl Write) -> Result<()> {
    let pins = PinLayout::new(
        cli.pin_root
            .as_deref()
            .unwrap_or(std::path::Path::new(PinLayout::DEFAULT_ROOT)),
    );
    // The agent logs at info; the one-shot commands only what needs attention, as their
    // result is what they print.
    // The allocator sets its own level: info when it runs, warn for its one-shot commands.
    if !matches!(
        cli.command,
        Command::Run(_) | Command::Allocator(_) | Command::Membership(_)
    ) {
        logging::init(cli.log_format, QUIET);
    }
    match cli.command {
        Command::Run(args) => run::run(args, cli.pin_root, cli.log_format),
        Command::Allocator(args) => allocator::run(args, cli.log_format, out),
        Command::Cleanup(args) => cleanup::run(args, cli.pin_root, out),
        Command::Bird(command) => bird::run(command, out),
        Command::Status(args) => status::run(args, &pins, out),
        Command::Attach(args) => attach::run(args, &pins, out),
        Command::Detach(args) => detach::run(args, &pins, out),
        Command::Vip(command) => vip::run(command, &pins, out),
        Command::Counters(args) => counters::run(args, &pins, out),
        Command::Membership(args) => membership::run(args, pins, cli.log_format),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // One thread: the agent waits on the kernel, it does not compute.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// The width of a table column: its longest cell or its heading.
fn column_width<'a>(heading: &str, cells: impl IntoIterator<Item = &'a str>) -> usize {
    cells
        .into_iter()
        .map(str::len)
        .chain([heading.len()])
        .max()
        .unwrap_or(0)
}
