//! `cargo xtask build-ebpf`: the agent's build script is the one place that builds the eBPF
//! objects (so the object it embeds is always this one); this runs it and checks the result.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use object::{Object as _, ObjectSection as _};

use crate::cmd;

/// The two objects the eBPF crate builds.
pub struct Objects {
    /// What the agent embeds: `lbagent_xdp` and `lbagent_egress`.
    pub production: PathBuf,
    /// The benchmarks' reference programs.
    pub bench: PathBuf,
}

pub fn run() -> Result<Objects> {
    cmd::cargo(&["check", "--package", "lbagent", "--quiet"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::workspace().join("target"))
        .join("bpf/bpfel-unknown-none/release");
    let objects = Objects {
        production: target.join("lbagent-ebpf"),
        bench: target.join("lbagent-ebpf-bench"),
    };
    for (path, sections) in [
        (
            &objects.production,
            &[".BTF", ".maps", "xdp", "classifier"][..],
        ),
        (&objects.bench, &[".BTF", ".maps", "xdp"]),
    ] {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let elf =
            object::File::parse(&*bytes).with_context(|| format!("parsing {}", path.display()))?;
        for section in sections {
            if elf.section_by_name(section).is_none() {
                bail!("{} has no {section} section", path.display());
            }
        }
        let btf = elf.section_by_name(".BTF").map_or(0, |s| s.size());
        println!(
            "{} ({} bytes, {btf} bytes of BTF)",
            path.display(),
            bytes.len()
        );
    }
    Ok(objects)
}
