//! Builds the eBPF objects: the production one, which the agent embeds, and the benchmarks' one
//! (`lbagent-ebpf-bench`), which `cargo xtask bench dataplane` loads.
//!
//! The eBPF crate needs nightly (`-Z build-std=core`) and bpf-linker, which stable cargo cannot
//! express as a dependency, so this script runs a nested nightly cargo (the way aya-template's
//! aya-build does). It writes to `target/bpf`, a directory of its own: sharing the outer build's
//! directory would deadlock on cargo's lock. `cargo xtask build-ebpf` runs this same script, so
//! there is exactly one build of each object, and neither is ever stale: cargo reruns this script whenever the
//! eBPF or common sources, the lock file or bpf-linker change.

use std::{
    env,
    ffi::OsString,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio, exit},
};

const TOOLCHAIN: &str = "nightly";
const TARGET: &str = "bpfel-unknown-none";
const EBPF_PACKAGE: &str = "lbagent-ebpf";
const SETUP_HINT: &str = "run `cargo xtask setup` as root (it installs what the eBPF build needs)";

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir
        .parent()
        .expect("agent/ lives in the workspace");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));

    for input in [
        "ebpf/src",
        "ebpf/Cargo.toml",
        "common",
        "Cargo.lock",
        "Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", workspace.join(input).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    let linker = preflight();
    println!("cargo:rerun-if-changed={}", linker.display());

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("bpf");

    let mut cargo = Command::new("rustup");
    cargo
        .current_dir(workspace)
        .args([
            "run",
            TOOLCHAIN,
            "cargo",
            "build",
            "--package",
            EBPF_PACKAGE,
        ])
        .args([
            // Both objects: the production one and the benchmarks' (see ebpf/Cargo.toml).
            "--bins",
            "--release",
            "--target",
            TARGET,
            "-Z",
            "build-std=core",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // BTF is what lets bpftool print map keys and values as named fields. Misaligned
        // loads let LLVM read a header field as one load instead of byte by byte and shifts
        // (an IPv6 address: 2 loads instead of 16 and 30 ALU instructions); the kernel allows
        // them on packet data where the CPU does (x86-64, arm64), and the verifier still
        // refuses a misaligned stack access.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\x1f-Clink-arg=--btf\x1f-Ctarget-feature=+allows-misaligned-mem-access",
        )
        // The outer (stable) build's settings must not leak into the nightly one.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        // Cargo reads build-script stdout as directives; the nested build talks on stderr only.
        .stdout(Stdio::null());
    match cargo.status() {
        Ok(status) if status.success() => {}
        Ok(status) => fail(&format!(
            "building the eBPF object failed ({status}); the nested build's errors are above"
        )),
        Err(err) => fail(&format!("cannot run rustup: {err}; {SETUP_HINT}")),
    }

    let object = target_dir.join(TARGET).join("release").join(EBPF_PACKAGE);
    let embedded = out_dir.join("lbagent-ebpf.o");
    if let Err(err) = fs::copy(&object, &embedded) {
        fail(&format!(
            "cannot copy {} to {}: {err}",
            object.display(),
            embedded.display()
        ));
    }
}

/// Checks every tool the nested build needs, so a missing one is named instead of surfacing
/// as a linker error three layers down. Returns the bpf-linker path.
fn preflight() -> PathBuf {
    let rustc = run_ok("rustup", &["run", TOOLCHAIN, "rustc", "--print", "sysroot"]);
    let Some(sysroot) = rustc else {
        fail(&format!(
            "the {TOOLCHAIN} toolchain is not available through rustup; {SETUP_HINT}"
        ));
    };
    let rust_src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if !rust_src.is_dir() {
        fail(&format!(
            "rust-src is not installed for {TOOLCHAIN} (needed by -Z build-std); {SETUP_HINT}"
        ));
    }
    let Some(linker) = which("bpf-linker") else {
        fail(&format!("bpf-linker is not on PATH; {SETUP_HINT}"));
    };
    if run_ok(linker.as_os_str(), &["--version"]).is_none() {
        fail(&format!(
            "{} does not run (usually its libLLVM moved); {SETUP_HINT}",
            linker.display()
        ));
    }
    linker
}

fn run_ok(program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Option<String> {
    let output = Command::new(program)
        .args(args)
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn which(name: &str) -> Option<PathBuf> {
    let path: OsString = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    exit(1);
}
