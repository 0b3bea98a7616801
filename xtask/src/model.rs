//! `cargo xtask fuzz-model`: the XDP program against its reference model on many generated
//! frames (tests/tests/xdp_model.rs, which `cargo xtask test` runs on a bounded sample).

use anyhow::Result;

use crate::cmd;

pub fn run(frames: u64, seed: Option<u64>) -> Result<()> {
    cmd::require_root("fuzz-model")?;
    let mut command =
        std::process::Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command
        .current_dir(cmd::workspace())
        .args([
            // The test build `cargo xtask test` already made: a million frames take minutes
            // there, less than a release build of the workspace would.
            "test",
            "--package",
            "lbagent-tests",
            "--test",
            "xdp_model",
            "--",
            "--nocapture",
            "the_program_agrees_with_the_model_on_generated_frames",
        ])
        .env("LBAGENT_MODEL_FRAMES", frames.to_string());
    if let Some(seed) = seed {
        command.env("LBAGENT_MODEL_SEED", seed.to_string());
    }
    cmd::status(&mut command)
}
