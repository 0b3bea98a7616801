//! `cargo xtask bench allocator`: `lbagent allocator` with 10,000 Services and three pools
//! against the in-process API server, beside a floor a bare kube-rs client sets in the same
//! run. The measuring lives in tests/src/bin/allocator_bench.rs, beside the API server it
//! drives; this builds both in release mode and runs it.

use std::process::Command;

use anyhow::Result;

use crate::cmd;

pub fn run() -> Result<()> {
    cmd::cargo(&[
        "build",
        "--quiet",
        "--release",
        "--package",
        "lbagent",
        "--package",
        "lbagent-tests",
        "--bin",
        "lbagent",
        "--bin",
        "allocator_bench",
    ])?;
    let release = crate::bench::target_dir().join("release");
    cmd::status(Command::new(release.join("allocator_bench")).arg(release.join("lbagent")))
}
