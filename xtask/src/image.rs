//! `cargo xtask image`: the lbagent container image, built with podman from the Containerfile.
//!
//! By default nothing is pulled: the binary is built on this (Debian bookworm) machine, and
//! the runtime base is made with mmdebstrap from Debian's own packages. The base is cached
//! under a key computed from everything that goes into it, both as a tarball in
//! `target/image/` (what CI caches) and as a local podman image, so a second build starts
//! from it at once. `--pull-bases` builds the way a user with registry access does: the
//! Containerfile's defaults, the binary compiled inside the build.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

const SUITE: &str = "bookworm";
/// minbase with the docs, man pages and translations left out: what debian:bookworm-slim is.
const VARIANT: &str = "minbase";
const DPKG_OPTIONS: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/info/*",
];
/// /bin -> usr/bin as Debian's own images have it, without the usrmerge package (which would
/// pull in perl).
const MERGED_USR: &str = "/usr/share/mmdebstrap/hooks/merged-usr";
const SOURCES: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];

/// The name the manifests use (`image: lbagent:<version>`); podman stores it under localhost/.
pub fn tag() -> String {
    format!("localhost/lbagent:{}", env!("CARGO_PKG_VERSION"))
}

/// What one build took, printed at the end and by the test that builds it.
struct Timings {
    binary: Duration,
    base: Duration,
    base_how: &'static str,
    image: Duration,
}

pub fn run(pull_bases: bool) -> Result<()> {
    cmd::require_root("image")?;
    let started = Instant::now();
    if pull_bases {
        podman_build(&cmd::workspace(), &[])?;
    } else {
        let timings = build_offline()?;
        eprintln!(
            "image: binary {:.1} s, base {:.1} s ({}), podman build {:.1} s",
            timings.binary.as_secs_f64(),
            timings.base.as_secs_f64(),
            timings.base_how,
            timings.image.as_secs_f64(),
        );
    }
    let size: u64 =
        cmd::output(podman().args(["image", "inspect", "--format", "{{.Size}}", &tag()]))?
            .trim()
            .parse()
            .context("podman image inspect: size is not a number")?;
    eprintln!(
        "image: {} built in {:.1} s, {:.1} MB uncompressed",
        tag(),
        started.elapsed().as_secs_f64(),
        size as f64 / 1e6
    );
    Ok(())
}

fn build_offline() -> Result<Timings> {
    let started = Instant::now();
    cmd::cargo(&[
        "build",
        "--release",
        "--locked",
        "--package",
        "lbagent",
        "--bin",
        "lbagent",
    ])?;
    let binary = started.elapsed();

    let started = Instant::now();
    let (base, base_how) = base_image()?;
    let base_time = started.elapsed();

    // The context holds the binary and nothing else: the prebuilt stage copies it.
    let context = target_dir().join("image/context");
    std::fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    let built = target_dir().join("release/lbagent");
    std::fs::copy(&built, context.join("lbagent"))
        .with_context(|| format!("copying {} into the build context", built.display()))?;

    let started = Instant::now();
    podman_build(
        &context,
        &[
            format!("RUNTIME_IMAGE={base}"),
            "BINARY_FROM=prebuilt".to_owned(),
        ],
    )?;
    Ok(Timings {
        binary,
        base: base_time,
        base_how,
        image: started.elapsed(),
    })
}

/// `podman build` of the Containerfile. The host's network (no bridge, no firewall rules on
/// this machine) lets the runtime stage's apt-get reach the same mirror the host uses.
fn podman_build(context: &Path, build_args: &[String]) -> Result<()> {
    let mut command = podman();
    command
        .args(["build", "--network", "host", "--tag", &tag(), "--file"])
        .arg(cmd::workspace().join("Containerfile"));
    command.args(ulimits()?);
    if !build_args.is_empty() {
        // Every base is local: asking a registry would only fail slowly.
        command.arg("--pull=never");
    }
    for arg in build_args {
        command.args(["--build-arg", arg]);
    }
    command.arg(context);
    cmd::status(&mut command).context("podman build failed")
}

/// The runtime base (the local stand-in for debian:bookworm-slim) and how it was found.
fn base_image() -> Result<(String, &'static str)> {
    let key = base_key()?;
    let name = format!("localhost/lbagent-base:{SUITE}-{key}");
    if cmd::succeeds(podman().args(["image", "exists", &name])) {
        eprintln!("image: base {name} present");
        return Ok((name, "present"));
    }
    let tarball = target_dir().join(format!("image/debian-{SUITE}-{key}.tar"));
    let how = if tarball.is_file() {
        eprintln!("image: base from the cached {}", tarball.display());
        "imported"
    } else {
        eprintln!("image: making the base with mmdebstrap ({SUITE}, {VARIANT})");
        mmdebstrap(&tarball)?;
        "made with mmdebstrap"
    };
    cmd::status(
        podman()
            .args(["import", "--quiet"])
            .arg(&tarball)
            .arg(&name),
    )
    .context("podman import of the base failed")?;
    Ok((name, how))
}

/// Everything the base is made from; a change in any of it makes a new base.
fn base_key() -> Result<String> {
    let version = cmd::output(Command::new("mmdebstrap").arg("--version"))
        .context("mmdebstrap is missing: run `cargo xtask setup`")?;
    let inputs = format!(
        "{}\n{SUITE}\n{VARIANT}\n{MERGED_USR}\n{}\n{}\n",
        version.trim(),
        DPKG_OPTIONS.join("\n"),
        SOURCES.join("\n")
    );
    let digest = sha256(inputs.as_bytes())?;
    Ok(digest[..12].to_owned())
}

fn sha256(bytes: &[u8]) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run sha256sum")?;
    child
        .stdin
        .take()
        .context("sha256sum's stdin")?
        .write_all(bytes)?;
    let output = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    match text.split_whitespace().next() {
        Some(digest) if output.status.success() && digest.len() == 64 => Ok(digest.to_owned()),
        _ => bail!("sha256sum failed ({})", output.status),
    }
}

/// Writes the tarball under a temporary name first, so an interrupted run leaves no
/// half-made base that a later run would take for a cached one.
fn mmdebstrap(tarball: &Path) -> Result<()> {
    let dir = tarball.parent().context("the tarball has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let partial = tarball.with_extension("tar.partial");
    let mut command = Command::new("mmdebstrap");
    command
        .args(["--quiet", "--variant", VARIANT, "--format", "tar"])
        .arg(format!("--hook-dir={MERGED_USR}"))
        .args(DPKG_OPTIONS.iter().map(|o| format!("--dpkgopt={o}")))
        .arg(SUITE)
        .arg(&partial)
        .args(SOURCES);
    cmd::status(&mut command).context("mmdebstrap failed")?;
    std::fs::rename(&partial, tarball)
        .with_context(|| format!("renaming {} into place", partial.display()))?;
    Ok(())
}

/// podman with runc: crun 1.8 (Debian bookworm's) refuses to start anything on a host with
/// cgroup v1 hierarchies beside a cgroup v2 one that has controllers ("cgroups in hybrid
/// mode not supported"), as this machine has; runc runs on both that and pure cgroup v2.
pub fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "runc"]);
    command
}

/// `--ulimit` arguments within this process's own open-file and process limits. podman
/// otherwise asks for more (1048576 open files), which needs CAP_SYS_RESOURCE: a machine or
/// CI sandbox without it (this one) cannot start a container at all. podman 4.3 runs its
/// OCI runtime with at most 32768 processes, and runc cannot raise that either.
pub fn ulimits() -> Result<Vec<String>> {
    use nix::sys::resource::{Resource, getrlimit};
    const PODMAN_NPROC: u64 = 32768;
    let (_, nofile) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit nofile")?;
    let (_, nproc) = getrlimit(Resource::RLIMIT_NPROC).context("getrlimit nproc")?;
    let nproc = nproc.min(PODMAN_NPROC);
    Ok(vec![
        "--ulimit".to_owned(),
        format!("nofile={nofile}:{nofile}"),
        "--ulimit".to_owned(),
        format!("nproc={nproc}:{nproc}"),
    ])
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::workspace().join("target"))
}
