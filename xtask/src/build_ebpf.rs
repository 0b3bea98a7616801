//! `cargo xtask build-ebpf`: the agent's build script is the one place that builds the eBPF
//! object (so the object it embeds is always this one); this runs it and checks the result.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};
use object::{Object as _, ObjectSection as _};

use crate::cmd;

pub fn run() -> Result<PathBuf> {
    cmd::cargo(&["check", "--package", "lbagent", "--quiet"])?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cmd::workspace().join("target"));
    let path = target.join("bpf/bpfel-unknown-none/release/lbagent-ebpf");
    let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let elf =
        object::File::parse(&*bytes).with_context(|| format!("parsing {}", path.display()))?;
    for section in [".BTF", ".maps", "xdp"] {
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
    Ok(path)
}
