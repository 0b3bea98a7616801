//! Running other programs, with their command line in every error.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ lives in the workspace")
        .to_path_buf()
}

/// Runs `cargo ARGS` in the workspace with the toolchain that runs xtask, output shown, as
/// one step (see `step`).
pub fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(workspace()).args(args);
    step(&format!("cargo {}", args.join(" ")), || {
        status(&mut command)
    })
}

/// Runs one step of a task between two lines, one saying what starts and one saying how it
/// ended and how long it took: on a fresh machine a build runs for minutes, and a user who
/// sees nothing happen cannot tell a slow step from a hung one.
pub fn step<T>(what: &str, run: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("xtask: {what} ...");
    let started = std::time::Instant::now();
    let result = run();
    let outcome = if result.is_ok() { "done" } else { "FAILED" };
    eprintln!(
        "xtask: {what}: {outcome} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    result
}

/// Runs a command with output shown; fails naming the command if it fails.
pub fn status(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly; returns its stdout, or fails with its stderr.
pub fn output(command: &mut Command) -> Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Whether a command runs and exits 0 (nothing printed).
pub fn succeeds(command: &mut Command) -> bool {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn require_root(task: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "`cargo xtask {task}` needs root (it installs packages and drives the kernel): run `sudo -E env PATH=\"$PATH\" cargo xtask {task}`"
        );
    }
    Ok(())
}

/// SIGTERM to `child` (the graceful stop lbagent and the routers handle), then its exit.
pub fn terminate(child: &mut std::process::Child) -> std::io::Result<std::process::ExitStatus> {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    child.wait()
}
