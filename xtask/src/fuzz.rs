//! `cargo xtask fuzz`: every libFuzzer target in fuzz/ for a bounded time each, from the
//! checked-in seeds (fuzz/seeds/TARGET), with a memory limit; a table of what ran. A crash,
//! a panic, a timeout or the memory limit fails the task and names the input that did it.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// The targets, each a parser of outside input (fuzz/fuzz_targets/TARGET.rs says which).
pub const TARGETS: &[&str] = &[
    "config",
    "services_file",
    "kubernetes",
    "bird_replies",
    "pinned_maps",
];

/// Above this a run fails (libFuzzer's own RSS watch): the parsers must not grow unbounded.
const RSS_LIMIT_MB: u32 = 1024;
/// One input that takes longer than this is a failure (a hang).
const INPUT_TIMEOUT_S: u32 = 10;

struct Outcome {
    target: &'static str,
    runs: u64,
    peak_rss_mb: u64,
    corpus: usize,
    seconds: f64,
}

/// How the targets are compiled.
#[derive(Clone, Copy)]
pub enum Build {
    /// Optimised, as `cargo fuzz` builds by default: for long runs.
    Release,
    /// `cargo fuzz --dev`: quick to build, for the short run in `cargo xtask test`.
    Dev,
}

impl Build {
    fn flags(self) -> Vec<&'static str> {
        let mut flags = BUILD_FLAGS.to_vec();
        if matches!(self, Build::Dev) {
            flags.push("--dev");
        }
        flags
    }
}

pub fn run(seconds: u32, build: Build, only: &[String]) -> Result<()> {
    cmd::require_root("fuzz")?;
    let targets: Vec<&'static str> = if only.is_empty() {
        TARGETS.to_vec()
    } else {
        only.iter()
            .map(|name| {
                TARGETS
                    .iter()
                    .copied()
                    .find(|t| t == name)
                    .with_context(|| format!("no fuzz target {name:?}; there are {TARGETS:?}"))
            })
            .collect::<Result<_>>()?
    };
    let fuzz_dir = cmd::workspace().join("fuzz");
    cmd::step("cargo fuzz build (nightly, debug assertions on)", || {
        cmd::status(fuzz_command(&fuzz_dir).args(["build"]).args(build.flags()))
    })?;

    // The pinned-maps target pins real maps: here, and removed after, whatever happens.
    let pin_root = Path::new("/sys/fs/bpf").join(format!("lbagent-fuzz-{}", std::process::id()));
    let mut outcomes = Vec::new();
    let mut failure = None;
    for target in targets {
        let result = cmd::step(&format!("fuzz {target} for {seconds} s"), || {
            run_one(&fuzz_dir, target, build, seconds, &pin_root)
        });
        match result {
            Ok(outcome) => outcomes.push(outcome),
            Err(err) => {
                failure = Some(err);
                break;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&pin_root);

    println!(
        "\n{:<14} {:>8} {:>12} {:>10} {:>8}",
        "target", "seconds", "inputs run", "peak RSS", "corpus"
    );
    for o in &outcomes {
        println!(
            "{:<14} {:>8.0} {:>12} {:>7} MB {:>8}",
            o.target, o.seconds, o.runs, o.peak_rss_mb, o.corpus
        );
    }
    if let Some(err) = failure {
        return Err(err);
    }
    println!("no crash, panic, timeout or memory overrun (limit {RSS_LIMIT_MB} MB)");
    Ok(())
}

/// No sanitizer: the targets are safe Rust (the one mapping of shared memory checks every
/// index), and without one the build is half as long. Debug assertions turn overflow into
/// the panic it would be in a debug build.
const BUILD_FLAGS: &[&str] = &["--sanitizer", "none", "--debug-assertions"];

fn fuzz_command(fuzz_dir: &Path) -> Command {
    let mut command = Command::new("rustup");
    command
        .current_dir(fuzz_dir.parent().expect("fuzz/ is in the workspace"))
        .args(["run", "nightly", "cargo", "fuzz"])
        // The stable cargo that runs xtask must not leak into the nightly build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR");
    command
}

fn run_one(
    fuzz_dir: &Path,
    target: &'static str,
    build: Build,
    seconds: u32,
    pin_root: &Path,
) -> Result<Outcome> {
    // New inputs go to a scratch corpus; the checked-in seeds are only read.
    let corpus = fuzz_dir.join("target/corpus").join(target);
    let artifacts = fuzz_dir.join("artifacts").join(target);
    for dir in [&corpus, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let seeds = fuzz_dir.join("seeds").join(target);
    let started = Instant::now();
    let output = fuzz_command(fuzz_dir)
        .args(["run"])
        .args(build.flags())
        .arg(target)
        .arg(&corpus)
        .arg(&seeds)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg("-print_final_stats=1")
        .env("LBAGENT_FUZZ_PIN_ROOT", pin_root)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot run cargo fuzz run {target}"))?;
    let log = String::from_utf8_lossy(&output.stderr);
    let stat = |name: &str| -> u64 {
        log.lines()
            .find_map(|line| line.strip_prefix(&format!("stat::{name}:")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    };
    if !output.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target {target} failed ({}); the input is in {}; \
             reproduce with `cargo +nightly fuzz run {target} FILE`:\n{}",
            output.status,
            artifacts.display(),
            tail.join("\n")
        );
    }
    Ok(Outcome {
        target,
        runs: stat("number_of_executed_units"),
        peak_rss_mb: stat("peak_rss_mb"),
        corpus: std::fs::read_dir(&corpus).map_or(0, |dir| dir.count()),
        seconds: started.elapsed().as_secs_f64(),
    })
}
