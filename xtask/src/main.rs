//! lbagent's developer tasks. `cargo xtask --help` lists them.

mod bench;
mod bench_dataplane;
mod bench_failover;
mod bench_routing;
mod build_ebpf;
mod cmd;
mod demo;
mod setup;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "lbagent's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build and the tests need (as root; a second run is a no-op).
    Setup,
    /// Build the eBPF object (with BTF) that the agent embeds, and check it.
    BuildEbpf,
    /// Set up, then run formatting and lint checks, unit, TestRun and namespace tests (as root).
    Test,
    /// Set up, then show lbagent counting real traffic between two network namespaces (as root).
    Demo,
    /// Measure against a baseline run alongside, and print a table (as root).
    Bench {
        #[arg(value_enum)]
        what: Bench,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Bench {
    /// 10,000 addresses onto kube-lb0 against `ip -batch`; resync time, syscalls, RSS.
    Addresses,
    /// Address changes reaching an FRR router through BIRD; a bulk add against `ip -batch`.
    Routing,
    /// The XDP program's per-packet cost against a trivial XDP_PASS program; verifier counts.
    Dataplane,
    /// Local (L2) addresses: what the ARP/NDP responder adds to other frames.
    Failover,
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build_ebpf::run().map(|_| ()),
        Task::Test => {
            setup::run()?;
            test()
        }
        Task::Demo => {
            setup::run()?;
            demo::run()
        }
        Task::Bench { what } => {
            setup::run()?;
            match what {
                Bench::Addresses => bench::addresses(),
                Bench::Routing => bench_routing::run(),
                Bench::Dataplane => bench_dataplane::run(),
                Bench::Failover => bench_failover::run(),
            }
        }
    }
}

fn test() -> Result<()> {
    cmd::cargo(&["fmt", "--all", "--check"])?;
    // The namespace tests drive the real binary, which `cargo test` does not build for
    // another package.
    cmd::cargo(&["build", "--workspace", "--bins"])?;
    cmd::cargo(&["test", "--workspace"])?;
    cmd::cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    eprintln!("xtask test: all passed");
    Ok(())
}
