//! `cargo xtask soak --minutes N`: lbagent on two nodes with an FRR router, in Kubernetes mode
//! against the in-process API server, under Service churn and injected faults, checking its
//! invariants after each fault. The soak itself is tests/src/bin/soak.rs, beside the API
//! server and the routers it drives; this builds it with the agent and runs it.

use std::process::Command;

use anyhow::Result;

use crate::cmd;

pub fn run(minutes: f64, seed: Option<u64>) -> Result<()> {
    let debug = crate::bench_allocator::build_with_agent("soak", false)?;
    let mut soak = Command::new(debug.join("soak"));
    soak.arg("--minutes")
        .arg(minutes.to_string())
        .env("LBAGENT_BIN", debug.join("lbagent"));
    if let Some(seed) = seed {
        soak.arg("--seed").arg(seed.to_string());
    }
    cmd::step(&format!("soak for {minutes} min"), || {
        cmd::status(&mut soak)
    })
}
