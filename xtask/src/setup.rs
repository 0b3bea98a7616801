//! `cargo xtask setup`: everything a fresh Debian machine needs to build and test lbagent.
//! Each step checks first and acts only when something is missing, so a second run is quick.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// What the build, the tests and the demo run, and why.
const APT_PACKAGES: &[&str] = &[
    "bird2",        // the routing daemon lbagent manages
    "frr",          // the upstream router in the routing tests
    "bpftool",      // reads the pinned maps in tests and the demo
    "iproute2",     // ip netns / link / addr in tests
    "nftables",     // the baseline in dataplane benchmarks
    "iputils-ping", // traffic in tests and the demo
    "socat",        // the demo's TCP and UDP servers and clients
    "ethtool",      // veth offload settings in dataplane benchmarks
    "util-linux",   // nsenter, mount
    "strace",       // syscall counts in benchmarks
    "g++",          // libFuzzer (C++), which the fuzz targets link
    "arping",       // ARP probes in the local-address (L2) tests
    "ndisc6",       // neighbour solicitations, the same for IPv6
    "keepalived",   // VRRPv3: the failover benchmark's baseline
    // The container image (`cargo xtask image`, tests/tests/image.rs). Installed without
    // recommends, so podman's runtime pieces are named: runc runs the containers (crun 1.8
    // refuses hosts with cgroup v1 and v2 mixed), conmon watches them, netavark is the network
    // backend podman 4 expects (the tests only use `--network ns:` and `host`); mmdebstrap
    // makes the Debian base where nothing is pulled.
    "podman",
    "buildah",
    "runc",
    "conmon",
    "netavark",
    "mmdebstrap",
];

const BPF_LINKER_VERSION: &str = "^0.13";

/// Cargo tools `cargo xtask test` and `cargo xtask fuzz` run, each pinned to a version that
/// builds with the stable toolchain (1.95) and installed from its lock file.
const CARGO_TOOLS: &[CargoTool] = &[
    // Checks deny.toml: duplicate crates, wildcard versions, licenses, sources.
    CargoTool {
        package: "cargo-deny",
        version: "0.20.2",
    },
    // Builds and runs the libFuzzer targets in fuzz/ (with the nightly toolchain).
    CargoTool {
        package: "cargo-fuzz",
        version: "0.13.2",
    },
];

struct CargoTool {
    package: &'static str,
    version: &'static str,
}

pub fn run() -> Result<()> {
    cmd::require_root("setup")?;
    apt_packages()?;
    let sysroot = nightly_with_rust_src()?;
    bpf_linker(&sysroot)?;
    for tool in CARGO_TOOLS {
        cargo_tool(tool)?;
    }
    bpffs()?;
    eprintln!("setup: everything is in place");
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
                .map(|status| status != "install ok installed")
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        eprintln!("setup: apt packages present");
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    let apt = |args: &[&str]| {
        cmd::status(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    apt(&["update", "-qq"]).context("apt-get update failed: check the network and apt sources")?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install).with_context(|| format!("installing {} failed", missing.join(" ")))?;
    Ok(())
}

/// The nightly sysroot, after making sure rust-src is there (`-Z build-std` needs it).
fn nightly_with_rust_src() -> Result<PathBuf> {
    let sysroot = cmd::output(
        Command::new("rustup")
            .args(["run", "nightly", "rustc", "--print", "sysroot"])
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
    .context(
        "the nightly toolchain is missing: install it with `rustup toolchain install nightly`",
    )?;
    let sysroot = PathBuf::from(sysroot.trim());
    if sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        eprintln!("setup: rust-src for nightly present");
    } else {
        eprintln!("setup: adding rust-src to nightly");
        cmd::status(
            Command::new("rustup")
                .args(["component", "add", "rust-src", "--toolchain", "nightly"])
                .env_remove("RUSTUP_TOOLCHAIN"),
        )?;
    }
    Ok(sysroot)
}

/// bpf-linker links against libLLVM; there is no system LLVM here, but nightly ships its
/// own. The binary's RUNPATH is the prefix's lib directory, which must hold the library
/// under its soname too, and must outlive the build (a /tmp prefix breaks on reboot).
fn bpf_linker(sysroot: &Path) -> Result<()> {
    let (library, major) = nightly_llvm(sysroot)?;
    let prefix = cargo_home()?.join("lbagent-llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let soname = library
        .file_name()
        .context("libLLVM path has a file name")?
        .to_owned();
    for name in [std::ffi::OsStr::new("libLLVM.so"), soname.as_os_str()] {
        let link = lib.join(name);
        // Left alone when right: two setups at once (parallel tests) must not race on it.
        if std::fs::read_link(&link).is_ok_and(|target| target == library) {
            continue;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&library, &link)
            .with_context(|| format!("linking {} to {}", link.display(), library.display()))?;
    }

    if cmd::succeeds(Command::new("bpf-linker").arg("--version")) {
        eprintln!("setup: bpf-linker present");
        return Ok(());
    }
    eprintln!("setup: building bpf-linker against nightly's libLLVM {major} (about a minute)");
    cmd::status(
        Command::new("rustup")
            .args([
                "run",
                "nightly",
                "cargo",
                "install",
                "bpf-linker",
                "--force",
            ])
            .args(["--version", BPF_LINKER_VERSION, "--no-default-features"])
            .args(["--features", &format!("llvm-{major}")])
            .env("LLVM_PREFIX", &prefix)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
    )
    .context("building bpf-linker failed")?;
    if !cmd::succeeds(Command::new("bpf-linker").arg("--version")) {
        bail!(
            "bpf-linker was installed but does not run: is {} on PATH?",
            cargo_home()?.join("bin").display()
        );
    }
    Ok(())
}

/// Nightly's libLLVM (the file named by its soname, `libLLVM.so.<major>.<minor>-rust-...`)
/// and its major version.
fn nightly_llvm(sysroot: &Path) -> Result<(PathBuf, String)> {
    let lib = sysroot.join("lib");
    let entries = std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(version) = name.to_str().and_then(|n| n.strip_prefix("libLLVM.so.")) else {
            continue;
        };
        let major = version.split('.').next().unwrap_or_default();
        if !major.is_empty() && major.chars().all(|c| c.is_ascii_digit()) {
            return Ok((entry.path(), major.to_owned()));
        }
    }
    bail!(
        "no libLLVM.so.<version> in {}: is this a rustup nightly?",
        lib.display()
    )
}

/// Installs `tool` unless that exact version already answers `--version`.
fn cargo_tool(tool: &CargoTool) -> Result<()> {
    let installed = cmd::output(Command::new(tool.package).arg("--version")).unwrap_or_default();
    // `cargo-deny 0.20.2`, `cargo-fuzz 0.13.2`: the name, then the version.
    if installed.split_whitespace().nth(1) == Some(tool.version) {
        eprintln!("setup: {} {} present", tool.package, tool.version);
        return Ok(());
    }
    cmd::step(
        &format!("setup: building {} {}", tool.package, tool.version),
        || {
            cmd::status(
                Command::new("cargo")
                    .args(["install", "--locked", "--force", tool.package])
                    .args(["--version", &format!("={}", tool.version)])
                    .env_remove("RUSTUP_TOOLCHAIN")
                    .env_remove("CARGO_TARGET_DIR"),
            )
        },
    )
    .with_context(|| format!("installing {} failed", tool.package))
}

fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

fn bpffs() -> Result<()> {
    let mounted = nix::sys::statfs::statfs("/sys/fs/bpf")
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC);
    if mounted {
        eprintln!("setup: bpffs mounted");
        return Ok(());
    }
    eprintln!("setup: mounting bpffs on /sys/fs/bpf");
    cmd::status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}
