//! lbagent's developer tasks. `cargo xtask --help` lists them.

mod bench;
mod bench_allocator;
mod bench_dataplane;
mod bench_failover;
mod bench_routing;
mod build_ebpf;
mod cmd;
mod demo;
mod fuzz;
mod image;
mod model;
mod setup;
mod soak;

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
    /// Set up, then run formatting, lint and dependency checks, unit, TestRun and namespace
    /// tests, a one-minute soak under faults, and each fuzz target briefly (as root).
    Test,
    /// Set up, then show lbagent counting real traffic between two network namespaces (as root).
    Demo,
    /// Run the XDP program against its reference model on generated frames (as root).
    FuzzModel {
        /// How many frames.
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// The generator's seed (default: the test's own); a failure names its seed.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Build the container image with podman (as root): the binary built here and a Debian
    /// base made with mmdebstrap, or with --pull-bases the Containerfile's registry defaults.
    Image {
        /// Build as a user with registry access does: pull the bases, compile inside the build.
        #[arg(long)]
        pull_bases: bool,
    },
    /// Measure against a baseline run alongside, and print a table (as root).
    Bench {
        #[arg(value_enum)]
        what: Bench,
        /// dataplane only: another production eBPF object (e.g. a copy of
        /// target/bpf/bpfel-unknown-none/release/lbagent-ebpf from an earlier commit) whose
        /// lbagent_xdp is measured in the same rounds.
        #[arg(long, value_name = "OBJECT")]
        compare: Option<std::path::PathBuf>,
    },
    /// Set up, then run lbagent on two nodes and a router under Service churn and injected
    /// faults, checking its invariants after each (as root).
    Soak {
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// The fault generator's seed (default: from the clock); the soak prints it.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Set up, then run every libFuzzer target in fuzz/ for a while each (as root).
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Build without optimisation, as `cargo xtask test` does: a fraction of the build
        /// time, fewer inputs per second.
        #[arg(long)]
        dev: bool,
        /// Only these targets (default: all).
        targets: Vec<String>,
    },
}

/// How long `cargo xtask test` runs each fuzz target: long enough to replay the seeds and
/// explore around them, short enough that five targets add little to CI.
const CI_FUZZ_SECONDS: u32 = 15;

/// How long `cargo xtask test` soaks: a few faults of random kinds, each checked.
const CI_SOAK_MINUTES: f64 = 1.0;

#[derive(Clone, Copy, clap::ValueEnum)]
enum Bench {
    /// 10,000 addresses onto kube-lb0 against `ip -batch`; resync time, syscalls, RSS.
    Addresses,
    /// Address changes reaching an FRR router through BIRD; a bulk add against `ip -batch`.
    Routing,
    /// The XDP program's per-packet cost against a trivial XDP_PASS program; verifier counts.
    Dataplane,
    /// 10,000 Services assigned by `lbagent allocator` against the same status patches sent
    /// by a bare kube-rs client; peak RSS; a restart's writes and time to ready.
    Allocator,
    /// Local (L2) addresses: failover time against keepalived (VRRPv3) on the same bridge,
    /// and what the ARP/NDP responder adds to other frames.
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
        Task::Image { pull_bases } => {
            setup::run()?;
            image::run(pull_bases)
        }
        Task::FuzzModel { frames, seed } => {
            setup::run()?;
            model::run(frames, seed)
        }
        Task::Bench { what, compare } => {
            if compare.is_some() && !matches!(what, Bench::Dataplane) {
                anyhow::bail!("--compare applies to `bench dataplane` only");
            }
            setup::run()?;
            match what {
                Bench::Addresses => bench::addresses(),
                Bench::Routing => bench_routing::run(),
                Bench::Dataplane => bench_dataplane::run(compare),
                Bench::Allocator => bench_allocator::run(),
                Bench::Failover => bench_failover::run(),
            }
        }
        Task::Soak { minutes, seed } => {
            setup::run()?;
            soak::run(minutes, seed)
        }
        Task::Fuzz {
            seconds,
            dev,
            targets,
        } => {
            setup::run()?;
            let build = if dev {
                fuzz::Build::Dev
            } else {
                fuzz::Build::Release
            };
            fuzz::run(seconds, build, &targets)
        }
    }
}

fn test() -> Result<()> {
    let started = std::time::Instant::now();
    cmd::cargo(&["fmt", "--all", "--check"])?;
    cmd::cargo(&["fmt", "--manifest-path", "fuzz/Cargo.toml", "--check"])?;
    // The namespace tests drive the real binary, which `cargo test` does not build for
    // another package.
    cmd::cargo(&["build", "--workspace", "--bins"])?;
    cmd::cargo(&["test", "--workspace"])?;
    soak::run(CI_SOAK_MINUTES, None)?;
    cmd::cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The advisories check needs a network copy of the advisory database: run
    // `cargo deny check advisories` where there is one (see README, Dependencies).
    cmd::cargo(&["deny", "check", "bans", "licenses", "sources"])?;
    // Unoptimised: the release build of the targets alone took 15 CPU-minutes, more than
    // every other step together, for a smoke run of seconds.
    fuzz::run(CI_FUZZ_SECONDS, fuzz::Build::Dev, &[])?;
    eprintln!(
        "xtask test: all passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
