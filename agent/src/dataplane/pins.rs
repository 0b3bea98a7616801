//! Where lbagent keeps its objects on bpffs.
//!
//! ```text
//! <root>/v<N>/LB_VIPS            maps, named as the eBPF object names them
//! <root>/v<N>/LB_VIP_STATS
//! <root>/v<N>/links/xdp_ns<netns inode>_if<ifindex>   one XDP link per interface
//! ```
//! `N` is [`PIN_LAYOUT_VERSION`]: a program with another map layout gets another directory
//! and never opens these maps.

use std::{
    io,
    path::{Path, PathBuf},
};

use lbagent_common::PIN_LAYOUT_VERSION;

use super::DataplaneError;

#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
    version: u32,
}

impl PinLayout {
    pub const DEFAULT_ROOT: &'static str = "/sys/fs/bpf/lbagent";

    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            version: PIN_LAYOUT_VERSION,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn dir(&self) -> PathBuf {
        self.root.join(format!("v{}", self.version))
    }

    /// The layouts of other versions under the same root: what an older (or newer) lbagent
    /// left there.
    pub fn other_versions(&self) -> Result<Vec<PinLayout>, DataplaneError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(DataplaneError::Io {
                    path: self.root.clone(),
                    source,
                });
            }
        };
        let mut others = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let version = name
                .to_str()
                .and_then(|n| n.strip_prefix('v'))
                .and_then(|n| n.parse::<u32>().ok());
            if let Some(version) = version
                && version != self.version
            {
                others.push(PinLayout {
                    root: self.root.clone(),
                    version,
                });
            }
        }
        others.sort_by_key(|layout| layout.version);
        Ok(others)
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.dir().join("links")
    }

    /// Named by ifindex, not name, since an interface can be renamed under a live link; and by
    /// network namespace, since ifindexes repeat across namespaces and bpffs is shared by all.
    pub fn xdp_link(&self, link: XdpLinkPin) -> PathBuf {
        self.links_dir()
            .join(format!("xdp_ns{}_if{}", link.netns, link.ifindex))
    }

    /// The tc egress link of the same interface.
    pub fn tc_link(&self, link: XdpLinkPin) -> PathBuf {
        self.links_dir()
            .join(format!("tc_ns{}_if{}", link.netns, link.ifindex))
    }

    /// The tc egress program of an interface served by a classic clsact filter (no TCX):
    /// a netlink filter cannot be pinned, so its program's pin marks it.
    pub fn tc_classic(&self, link: XdpLinkPin) -> PathBuf {
        self.links_dir()
            .join(format!("tcclassic_ns{}_if{}", link.netns, link.ifindex))
    }

    /// Every interface whose tc egress counter is a classic filter, in any network namespace.
    pub fn pinned_tc_classic(&self) -> Result<Vec<XdpLinkPin>, DataplaneError> {
        self.pinned_links("tcclassic_ns")
    }

    /// Every pinned XDP link, in any network namespace.
    pub fn pinned_xdp_links(&self) -> Result<Vec<XdpLinkPin>, DataplaneError> {
        self.pinned_links("xdp_ns")
    }

    /// Every pinned tc egress link, in any network namespace.
    pub fn pinned_tc_links(&self) -> Result<Vec<XdpLinkPin>, DataplaneError> {
        self.pinned_links("tc_ns")
    }

    fn pinned_links(&self, prefix: &str) -> Result<Vec<XdpLinkPin>, DataplaneError> {
        let dir = self.links_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(DataplaneError::Io { path: dir, source }),
        };
        let mut links = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| DataplaneError::Io {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            if let Some(link) = name.to_str().and_then(|n| XdpLinkPin::parse(n, prefix)) {
                links.push(link);
            }
        }
        links.sort_unstable();
        Ok(links)
    }

    /// Fails unless the pin root is (or would be created) on a bpf filesystem: pins anywhere
    /// else fail with an obscure EPERM, and a tmpfs would silently lose them.
    pub fn check_bpffs(&self) -> Result<(), DataplaneError> {
        let existing = self
            .root
            .ancestors()
            .find(|path| path.exists())
            .unwrap_or(Path::new("/"));
        let on_bpffs = nix::sys::statfs::statfs(existing)
            .map(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
            .unwrap_or(false);
        if on_bpffs {
            Ok(())
        } else {
            Err(DataplaneError::NoBpffs {
                pin_root: self.root.clone(),
                mount_point: existing.to_path_buf(),
            })
        }
    }
}

/// Identifies an interface across network namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct XdpLinkPin {
    /// Inode of the network namespace (as `/proc/self/ns/net` shows it).
    pub netns: u64,
    pub ifindex: u32,
}

impl XdpLinkPin {
    fn parse(name: &str, prefix: &str) -> Option<Self> {
        let (netns, ifindex) = name.strip_prefix(prefix)?.split_once("_if")?;
        Some(Self {
            netns: netns.parse().ok()?,
            ifindex: ifindex.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_versioned() {
        let pins = PinLayout::new("/sys/fs/bpf/lbagent");
        let version = format!("v{PIN_LAYOUT_VERSION}");
        assert_eq!(
            pins.map("LB_VIPS"),
            Path::new("/sys/fs/bpf/lbagent")
                .join(&version)
                .join("LB_VIPS")
        );
        let link = XdpLinkPin {
            netns: 4026531840,
            ifindex: 7,
        };
        let path = pins.xdp_link(link);
        assert_eq!(
            path,
            Path::new("/sys/fs/bpf/lbagent")
                .join(&version)
                .join("links/xdp_ns4026531840_if7")
        );
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(XdpLinkPin::parse(name, "xdp_ns"), Some(link));
        assert_eq!(XdpLinkPin::parse("xdp_7", "xdp_ns"), None);
        assert_eq!(
            pins.tc_link(link).file_name().unwrap(),
            "tc_ns4026531840_if7"
        );
    }

    #[test]
    fn a_plain_directory_is_not_bpffs() {
        let dir = std::env::temp_dir().join(format!("lbagent-pins-{}", std::process::id()));
        let err = PinLayout::new(dir.join("lbagent"))
            .check_bpffs()
            .expect_err("a temp dir is not bpffs");
        assert!(
            matches!(&err, DataplaneError::NoBpffs { pin_root, .. } if pin_root.ends_with("lbagent")),
            "{err}"
        );
    }

    #[test]
    fn no_links_directory_means_no_links() {
        let pins = PinLayout::new("/nonexistent/lbagent");
        assert_eq!(pins.pinned_xdp_links().unwrap(), Vec::new());
    }
}
