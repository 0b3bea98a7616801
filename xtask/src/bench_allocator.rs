//! `cargo xtask bench allocator`: `lbagent allocator` with 10,000 Services and three pools
//! against the in-process API server, beside a floor a bare kube-rs client sets in the same
//! run, in nine alternating rounds. The measuring lives in tests/src/bin/allocator_bench.rs, beside the API server it
//! drives; this builds both in release mode and runs it.

use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::cmd;

pub fn run() -> Result<()> {
    let release = build_with_agent("allocator_bench", true)?;
    cmd::status(Command::new(release.join("allocator_bench")).arg(release.join("lbagent")))
}

/// Builds `lbagent` and the tests crate's binary `bin` (optimised or not); returns the
/// directory both are in.
pub fn build_with_agent(bin: &str, release: bool) -> Result<PathBuf> {
    let mut args = vec!["build"];
    if release {
        args.push("--release");
    }
    args.extend([
        "--package",
        "lbagent",
        "--package",
        "lbagent-tests",
        "--bin",
        "lbagent",
        "--bin",
        bin,
    ]);
    cmd::cargo(&args)?;
    Ok(crate::bench::target_dir().join(if release { "release" } else { "debug" }))
}
