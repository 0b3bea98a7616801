//! The eBPF dataplane: loading the embedded object, attaching it to interfaces, and the pinned
//! maps it shares with userspace. This module is the only code that touches eBPF objects.
//!
//! Attachments outlive the process: each XDP link is pinned, so a restart (or a one-shot CLI
//! command) leaves traffic handled. New objects are pinned only once the attach has worked,
//! so a refused attach leaves nothing behind.

pub mod inspect;
mod neighbours;
mod pins;
mod tables;
mod vips;

use std::{io, os::unix::fs::MetadataExt as _, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapError, MapInfo, MapType},
    pin::PinError,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, Link as _, LinkError, PinnedLink},
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lbagent_common::{
    Bucket, NeighbourEntry, NeighbourKey, NeighbourStats, PortConfig, PortStats, RangeKeyV4,
    RangeKeyV6, TC_EGRESS_PROGRAM, VipConfig, VipStats, XDP_PROGRAM, maps,
};
use tracing::{info, warn};

pub use neighbours::{Lease, NeighbourCounters, NeighbourMaps, Role};
pub use pins::{PinLayout, XdpLinkPin};
pub use tables::{Maps, PortId, VipPolicy};
pub use vips::{PortCounters, VipCounters, VipTable};

/// The eBPF object built by `build.rs`, with BTF.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lbagent-ebpf.o"));

/// The embedded eBPF object, for tests and benchmarks that load it themselves.
pub fn object() -> &'static [u8] {
    EBPF_OBJECT
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "no bpf filesystem under {} (needed for pins in {}): mount one with `mount -t bpf bpf /sys/fs/bpf`",
        mount_point.display(),
        pin_root.display()
    )]
    NoBpffs {
        pin_root: PathBuf,
        mount_point: PathBuf,
    },
    #[error("interface {name:?} does not exist")]
    UnknownInterface { name: String },
    #[error(
        "interface {iface} already has an XDP program that lbagent did not attach; remove it first (`ip link set dev {iface} xdp off`)"
    )]
    ForeignXdpProgram { iface: String },
    // The kernel's reason is in the message, so it is not also a source: printed chains
    // would say it twice.
    #[error("driver-mode XDP refused on {iface}: {}", syscall_detail(error))]
    DriverModeRefused { iface: String, error: ProgramError },
    #[error("lbagent has no XDP program attached to {iface}")]
    NotAttached { iface: String },
    #[error(
        "the dataplane is not loaded (no pinned maps in {}): attach it to an interface first with `lbagent attach IFACE`",
        dir.display()
    )]
    NotLoaded { dir: PathBuf },
    #[error(
        "pinned map {} does not match this lbagent's layout ({detail}); remove it with `lbagent detach --all`",
        path.display()
    )]
    IncompatibleMap { path: PathBuf, detail: String },
    #[error("map {map} is full ({capacity} entries): {what} was not added")]
    MapFull {
        map: &'static str,
        what: String,
        capacity: u32,
    },
    #[error("map {map} has no free way in either bucket of {what}, which was not added")]
    TableFull { map: &'static str, what: String },
    #[error("{what} is not in the dataplane's maps")]
    NotInMaps { what: String },
    #[error(
        "another lbagent process is changing the maps in {} (the running agent?); stop it or let it do the change",
        dir.display()
    )]
    Busy { dir: PathBuf },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {XDP_PROGRAM}: {0}")]
    Program(#[from] ProgramError),
    #[error("eBPF link: {0}")]
    Link(#[from] LinkError),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("pinning {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    #[error("{name}: {value:?} is not allowed ({allowed})")]
    InvalidSetting {
        name: &'static str,
        value: String,
        allowed: &'static str,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How to attach to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Driver (native) mode, falling back to generic mode if the driver refuses.
    Auto,
    /// Driver (native) mode only.
    Driver,
    /// Generic (skb) mode, which every interface supports.
    Generic,
}

/// What an attach did.
#[derive(Debug, PartialEq, Eq, serde::Serialize)]
pub struct Attached {
    pub iface: String,
    pub ifindex: u32,
    /// `None` when an existing lbagent link had its program replaced in place (the mode of the
    /// original attach stays).
    pub mode: Option<AttachMode>,
    pub replaced: bool,
}

/// The maps the object declares, with the layout each must have.
struct MapSpec {
    name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
    flags: u32,
}

const fn array<T>(name: &'static str, max_entries: u32) -> MapSpec {
    MapSpec {
        name,
        map_type: MapType::Array,
        key_size: 4,
        value_size: size_of::<T>(),
        max_entries,
        flags: maps::MMAPABLE,
    }
}

const fn per_cpu_array<T>(name: &'static str, max_entries: u32) -> MapSpec {
    MapSpec {
        name,
        map_type: MapType::PerCpuArray,
        key_size: 4,
        value_size: size_of::<T>(),
        max_entries,
        flags: 0,
    }
}

const fn trie<K>(name: &'static str) -> MapSpec {
    MapSpec {
        name,
        map_type: MapType::LpmTrie,
        // The kernel's key is the 4-byte prefix length and the data.
        key_size: 4 + size_of::<K>(),
        value_size: 1,
        max_entries: maps::MAX_RANGES,
        // BPF_F_NO_PREALLOC, which the kernel requires of a trie.
        flags: 1,
    }
}

const fn hash<K, V>(name: &'static str, map_type: MapType) -> MapSpec {
    MapSpec {
        name,
        map_type,
        key_size: size_of::<K>(),
        value_size: size_of::<V>(),
        max_entries: maps::MAX_NEIGHBOURS,
        flags: 0,
    }
}

const MAP_SPECS: [MapSpec; 13] = [
    array::<Bucket>(maps::VIPS_V4, maps::VIP_BUCKETS),
    array::<Bucket>(maps::VIPS_V6, maps::VIP_BUCKETS),
    array::<VipConfig>(maps::VIP_CONFIG, maps::MAX_VIPS),
    per_cpu_array::<VipStats>(maps::VIP_STATS, maps::MAX_VIPS),
    array::<Bucket>(maps::PORTS, maps::PORT_BUCKETS),
    array::<PortConfig>(maps::PORT_CONFIG, maps::MAX_PORTS),
    per_cpu_array::<PortStats>(maps::PORT_STATS, maps::MAX_PORTS),
    trie::<RangeKeyV4>(maps::RANGES_V4),
    trie::<RangeKeyV6>(maps::RANGES_V6),
    array::<u64>(maps::VIP_FILTER, maps::VIP_FILTER_ENTRIES),
    hash::<NeighbourKey, NeighbourEntry>(maps::NEIGHBOURS, MapType::Hash),
    hash::<NeighbourKey, NeighbourStats>(maps::NEIGHBOUR_STATS, MapType::PerCpuHash),
    MapSpec {
        name: maps::NEIGHBOUR_LEASE,
        map_type: MapType::Array,
        key_size: 4,
        value_size: size_of::<u64>(),
        max_entries: 1,
        flags: 0,
    },
];

/// Attaches the XDP program to `iface`, reusing the pinned maps if there are any, and the tc
/// egress counter beside it. On an interface lbagent already serves, each program is
/// swapped atomically inside its existing link: no packet sees the interface without one.
pub fn attach(pins: &PinLayout, iface: &str, mode: AttachMode) -> Result<Attached, DataplaneError> {
    pins.check_bpffs()?;
    let link = local_link(iface)?;
    let ifindex = link.ifindex;
    let maps_pinned = maps_pinned(pins)?;
    let mut ebpf = load(pins, maps_pinned)?;
    let program = xdp_program(&mut ebpf)?;

    let link_pin = pins.xdp_link(link);
    if !link_pin.exists() {
        adopt_older_link(pins, link)?;
    }
    if link_pin.exists() {
        let existing = XdpLink::try_from(FdLink::from(PinnedLink::from_pin(&link_pin)?))?;
        program.attach_to_link(existing)?;
        // The new program uses maps an older agent's pins may lack: pin them now.
        let mut made = Rollback::default();
        pin_maps(&ebpf, pins, &mut made)?;
        made.commit();
        info!(
            iface,
            ifindex, "replaced the XDP program in lbagent's existing link"
        );
        attach_egress(&mut ebpf, pins, iface, link, &mut Rollback::default());
        retire_other_versions(pins);
        return Ok(Attached {
            iface: iface.to_owned(),
            ifindex,
            mode: None,
            replaced: true,
        });
    }

    let (link_id, mode) = attach_new(program, iface, ifindex, mode)?;
    let xdp_link = FdLink::try_from(program.take_link(link_id)?)?;

    // Pin the new objects; if any pin fails, remove the ones made so far. Dropping the
    // unpinned link then detaches the program, so a failure leaves the kernel as it was.
    let mut made = Rollback::default();
    create_dir(pins.links_dir(), &mut made)?;
    pin_maps(&ebpf, pins, &mut made)?;
    xdp_link
        .pin(&link_pin)
        .map_err(|source| DataplaneError::Pin {
            path: link_pin.clone(),
            source,
        })?;
    made.paths.push(link_pin.clone());
    attach_egress(&mut ebpf, pins, iface, link, &mut made);
    made.commit();
    info!(iface, ifindex, ?mode, "attached XDP program");
    Ok(Attached {
        iface: iface.to_owned(),
        ifindex,
        mode: Some(mode),
        replaced: false,
    })
}

/// Moves this interface's links from another layout version's directory into this one's,
/// so that the program is swapped inside them like after any restart: an upgrade leaves no
/// moment without a program (a new attach would be refused while the old link holds the
/// interface).
fn adopt_older_link(pins: &PinLayout, link: XdpLinkPin) -> Result<(), DataplaneError> {
    for old in pins.other_versions()? {
        let old_pin = old.xdp_link(link);
        if !old_pin.exists() {
            continue;
        }
        let links_dir = pins.links_dir();
        std::fs::create_dir_all(&links_dir).map_err(|source| DataplaneError::Io {
            path: links_dir,
            source,
        })?;
        for (from, to) in [
            (old_pin, pins.xdp_link(link)),
            (old.tc_link(link), pins.tc_link(link)),
        ] {
            if from.exists() {
                std::fs::rename(&from, &to)
                    .map_err(|source| DataplaneError::Io { path: from, source })?;
            }
        }
        info!(
            ifindex = link.ifindex,
            from = old.version(),
            to = pins.version(),
            "adopting lbagent's link from another map layout"
        );
        return Ok(());
    }
    Ok(())
}

/// Removes what other layout versions left once none of their XDP links is left: their
/// maps serve no program any more. Best effort: a failure is logged, nothing else.
fn retire_other_versions(pins: &PinLayout) {
    let others = match pins.other_versions() {
        Ok(others) => others,
        Err(err) => {
            warn!(%err, "cannot look for pins of other map layouts");
            return;
        }
    };
    for old in others {
        if !matches!(old.pinned_xdp_links(), Ok(links) if links.is_empty()) {
            continue;
        }
        match remove_everything(&old) {
            Ok(()) => info!(dir = %old.dir().display(), "removed the pins of an older map layout"),
            Err(err) => {
                warn!(dir = %old.dir().display(), %err, "cannot remove the pins of another map layout")
            }
        }
    }
}

/// Unpins every link and removes every pin and directory of one layout version.
fn remove_everything(layout: &PinLayout) -> Result<(), DataplaneError> {
    for link in layout.pinned_xdp_links()? {
        unpin_link(&layout.xdp_link(link))?;
    }
    for link in layout.pinned_tc_links()? {
        unpin_link(&layout.tc_link(link))?;
    }
    for dir in [layout.links_dir(), layout.dir()] {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(DataplaneError::Io { path: dir, source }),
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_file() {
                std::fs::remove_file(&path).map_err(|source| DataplaneError::Io {
                    path: path.clone(),
                    source,
                })?;
            }
        }
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(DataplaneError::Io { path: dir, source }),
        }
    }
    Ok(())
}

/// Creates and pins the maps unless they are pinned already, without attaching anything:
/// the agent's maps exist (and the reconciler can fill them) before any interface does.
pub fn prepare(pins: &PinLayout) -> Result<(), DataplaneError> {
    pins.check_bpffs()?;
    let pinned = maps_pinned(pins)?;
    if pinned && MAP_SPECS.iter().all(|spec| pins.map(spec.name).exists()) {
        return Ok(());
    }
    let ebpf = load(pins, pinned)?;
    let mut made = Rollback::default();
    create_dir(pins.dir(), &mut made)?;
    pin_maps(&ebpf, pins, &mut made)?;
    made.commit();
    Ok(())
}

/// Pins every map not pinned yet: all of them on a first load; after an upgrade, the ones an
/// older agent's pins lack ([`maps::ADDED`]).
fn pin_maps(ebpf: &Ebpf, pins: &PinLayout, made: &mut Rollback) -> Result<(), DataplaneError> {
    for spec in &MAP_SPECS {
        let path = pins.map(spec.name);
        if path.exists() {
            continue;
        }
        let map = ebpf.map(spec.name).ok_or(DataplaneError::Map {
            name: spec.name,
            source: MapError::InvalidName {
                name: spec.name.to_owned(),
            },
        })?;
        map.pin(&path).map_err(|source| DataplaneError::Pin {
            path: path.clone(),
            source,
        })?;
        made.paths.push(path);
    }
    Ok(())
}

/// A handle on every pinned map that outlives their pins: a pin removed from outside
/// lbagent (`rm -rf` of the pin directory) is put back from it, so the programs, the agent
/// and the next agent all keep the same maps, and their counters.
pub struct PinnedMaps {
    maps: Vec<(&'static str, aya::maps::MapData)>,
}

impl PinnedMaps {
    /// Opens the maps as pinned now.
    pub fn open(pins: &PinLayout) -> Result<Self, DataplaneError> {
        let maps = MAP_SPECS
            .iter()
            .map(|spec| {
                aya::maps::MapData::from_pin(pins.map(spec.name))
                    .map(|data| (spec.name, data))
                    .map_err(|source| DataplaneError::Map {
                        name: spec.name,
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { maps })
    }

    /// Pins again each map whose pin is gone; returns their names.
    pub fn repin(&self, pins: &PinLayout) -> Result<Vec<&'static str>, DataplaneError> {
        let mut repinned = Vec::new();
        for (name, data) in &self.maps {
            let path = pins.map(name);
            if path.exists() {
                continue;
            }
            std::fs::create_dir_all(pins.dir()).map_err(|source| DataplaneError::Io {
                path: pins.dir(),
                source,
            })?;
            data.pin(&path)
                .map_err(|source| DataplaneError::Pin { path, source })?;
            repinned.push(*name);
        }
        Ok(repinned)
    }
}

/// lbagent's own hold on its links, beside their pins: a link whose pin is removed from
/// outside lbagent stays attached, and is pinned again from here, so traffic never sees
/// the interface without its program.
#[derive(Default)]
pub struct HeldLinks {
    links: std::collections::BTreeMap<PathBuf, FdLink>,
}

impl HeldLinks {
    /// Holds the links of an interface as pinned now.
    pub fn hold(&mut self, pins: &PinLayout, link: XdpLinkPin) {
        for path in [pins.xdp_link(link), pins.tc_link(link)] {
            if let Ok(pinned) = PinnedLink::from_pin(&path) {
                self.links.insert(path, FdLink::from(pinned));
            }
        }
    }

    /// Lets go of the links of an interface (it is gone, or its pins were removed on purpose).
    pub fn release(&mut self, pins: &PinLayout, link: XdpLinkPin) {
        for path in [pins.xdp_link(link), pins.tc_link(link)] {
            self.links.remove(&path);
        }
    }

    /// Pins again each held link of the interface whose pin is gone. Returns how many were
    /// pinned again, or the error of one that could not be (its link is let go: nothing else
    /// may hold it, and the interface then needs a new attach).
    pub fn repin(&mut self, pins: &PinLayout, link: XdpLinkPin) -> Result<usize, DataplaneError> {
        let mut repinned = 0;
        for path in [pins.xdp_link(link), pins.tc_link(link)] {
            if path.exists() {
                continue;
            }
            let Some(held) = self.links.remove(&path) else {
                continue;
            };
            let dir = pins.links_dir();
            std::fs::create_dir_all(&dir)
                .map_err(|source| DataplaneError::Io { path: dir, source })?;
            let pinned = held.pin(&path).map_err(|source| DataplaneError::Pin {
                path: path.clone(),
                source,
            })?;
            self.links.insert(path, FdLink::from(pinned));
            repinned += 1;
        }
        Ok(repinned)
    }

    /// Whether an interface's XDP link is held.
    pub fn holds(&self, pins: &PinLayout, link: XdpLinkPin) -> bool {
        self.links.contains_key(&pins.xdp_link(link))
    }
}

/// Removes the link pins of an interface that is gone (the kernel detached its programs
/// when it went) or no longer wanted. The maps stay: they serve the other interfaces, and the next one.
pub fn forget(pins: &PinLayout, link: XdpLinkPin) -> Result<(), DataplaneError> {
    for path in [pins.xdp_link(link), pins.tc_link(link)] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(DataplaneError::Io { path, source }),
        }
    }
    // A classic filter is not a link: it stays on an interface that is still there.
    if pins.tc_classic(link).exists() {
        detach_classic(pins, link)?;
    }
    Ok(())
}

/// How the tc egress counter is attached. TCX (a bpf link, pinned like the XDP link) needs
/// Linux 6.6; older kernels get a classic `clsact` filter at a fixed priority and handle, which
/// a restarted agent replaces in place (`tc filter replace`), so neither loses a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EgressAttach {
    /// TCX where the kernel has it, else classic.
    Auto,
    Tcx,
    Classic,
}

impl EgressAttach {
    /// Forces one way for diagnosis and for the tests of the fallback on a kernel with TCX.
    pub const VARIABLE: &'static str = "LBAGENT_TC_ATTACH";

    fn from_env() -> Result<Self, DataplaneError> {
        match std::env::var(Self::VARIABLE).ok().as_deref() {
            None | Some("" | "auto") => Ok(Self::Auto),
            Some("tcx") => Ok(Self::Tcx),
            Some("classic") => Ok(Self::Classic),
            Some(other) => Err(DataplaneError::InvalidSetting {
                name: Self::VARIABLE,
                value: other.to_owned(),
                allowed: "auto, tcx or classic",
            }),
        }
    }
}

/// The classic filter's place on the egress hook: lbagent's own, so a restart finds it.
const CLASSIC_PRIORITY: u16 = 0x4c42;
const CLASSIC_HANDLE: u32 = 1;

fn classic_link(iface: &str) -> Result<SchedClassifierLink, DataplaneError> {
    SchedClassifierLink::attached(
        iface,
        TcAttachType::Egress,
        CLASSIC_PRIORITY,
        TcHandle::from(CLASSIC_HANDLE),
        None,
    )
    .map_err(|_| DataplaneError::UnknownInterface {
        name: iface.to_owned(),
    })
}

/// Attaches (or, after a restart, swaps in place) the tc egress counter next to the XDP
/// program. Best effort: an interface that refuses it keeps its XDP program, and the log
/// names the interface and what is lost (egress counters).
fn attach_egress(
    ebpf: &mut Ebpf,
    pins: &PinLayout,
    iface: &str,
    link: XdpLinkPin,
    made: &mut Rollback,
) {
    let mut attach = || -> Result<(&'static str, bool), DataplaneError> {
        let how = EgressAttach::from_env()?;
        let program: &mut SchedClassifier = ebpf
            .program_mut(TC_EGRESS_PROGRAM)
            .ok_or_else(|| ProgramError::InvalidName {
                name: TC_EGRESS_PROGRAM.to_owned(),
            })?
            .try_into()?;
        program.load()?;
        let pin = pins.tc_link(link);
        let marker = pins.tc_classic(link);
        if how != EgressAttach::Classic && pin.exists() {
            let existing =
                SchedClassifierLink::try_from(FdLink::from(PinnedLink::from_pin(&pin)?))?;
            program.attach_to_link(existing)?;
            return Ok(("tcx", true));
        }
        if how != EgressAttach::Classic && !marker.exists() {
            let tcx = program.attach_with_options(
                iface,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            );
            match tcx {
                Ok(id) => {
                    let tc_link = FdLink::try_from(program.take_link(id)?)?;
                    tc_link.pin(&pin).map_err(|source| DataplaneError::Pin {
                        path: pin.clone(),
                        source,
                    })?;
                    made.paths.push(pin);
                    return Ok(("tcx", false));
                }
                Err(err) if how == EgressAttach::Tcx => return Err(err.into()),
                Err(err) => info!(
                    iface,
                    %err,
                    "this kernel has no TCX (Linux 6.6): the tc egress counter uses a classic clsact filter"
                ),
            }
        }
        // A TCX link left by an earlier run in the other mode goes first: one counter only.
        if pin.exists() {
            unpin_link(&pin)?;
        }
        match aya::programs::tc::qdisc_add_clsact(iface) {
            Ok(()) => {}
            Err(aya::programs::tc::TcError::NetlinkError(err))
                if err.raw_os_error() == Some(libc::EEXIST) => {}
            Err(err) => return Err(ProgramError::from(err).into()),
        }
        // Replace first: the filter of a previous agent swaps its program with no gap.
        let (id, replaced) = match program.attach_to_link(classic_link(iface)?) {
            Ok(id) => (id, true),
            Err(_) => {
                let id = program.attach_with_options(
                    iface,
                    TcAttachType::Egress,
                    TcAttachOptions::Netlink(NlOptions {
                        priority: CLASSIC_PRIORITY,
                        handle: TcHandle::from(CLASSIC_HANDLE),
                        classid: None,
                    }),
                )?;
                (id, false)
            }
        };
        // The filter must outlive this process, and a netlink link detaches when dropped.
        std::mem::forget(program.take_link(id)?);
        // The program's pin marks the interface as served by a classic filter: status and
        // cleanup look for it, since a netlink filter cannot be pinned.
        if marker.exists() {
            std::fs::remove_file(&marker).map_err(|source| DataplaneError::Io {
                path: marker.clone(),
                source,
            })?;
        }
        program.pin(&marker).map_err(|source| DataplaneError::Pin {
            path: marker.clone(),
            source,
        })?;
        if !replaced {
            made.paths.push(marker);
        }
        Ok(("classic", replaced))
    };
    match attach() {
        Ok((how, replaced)) => info!(iface, how, replaced, "tc egress counter attached"),
        Err(err) => warn!(
            iface,
            %err,
            "tc egress counter not attached: replies from LB addresses go uncounted here"
        ),
    }
}

/// Removes the classic egress filter of an interface of this network namespace, and its
/// marker. An interface that is gone took its filter with it.
fn detach_classic(pins: &PinLayout, link: XdpLinkPin) -> Result<(), DataplaneError> {
    let marker = pins.tc_classic(link);
    if let Ok(here) = local_netns()
        && here == link.netns
        && let Ok(name) = nix::net::if_::if_indextoname(link.ifindex)
        && let Ok(iface) = name.into_string()
    {
        match classic_link(&iface)?.detach() {
            Ok(()) => {}
            Err(
                ProgramError::NetlinkError(err)
                | ProgramError::TcError(aya::programs::tc::TcError::NetlinkError(err)),
            ) if err.raw_os_error() == Some(libc::ENOENT) => {}
            Err(err) => return Err(err.into()),
        }
    }
    std::fs::remove_file(&marker).map_err(|source| DataplaneError::Io {
        path: marker,
        source,
    })
}

/// What a detach did.
#[derive(Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Detached {
    /// The links removed.
    pub links: Vec<XdpLinkPin>,
    /// Whether the maps went too (they go with the last link).
    pub maps_removed: bool,
}

/// Detaches lbagent's program from `iface`. When no interface is left, the maps and the pin
/// directory go too, so nothing of lbagent stays in the kernel.
pub fn detach(pins: &PinLayout, iface: &str) -> Result<Detached, DataplaneError> {
    pins.check_bpffs()?;
    let link = local_link(iface)?;
    let link_pin = pins.xdp_link(link);
    if !link_pin.exists() {
        return Err(DataplaneError::NotAttached {
            iface: iface.to_owned(),
        });
    }
    unpin_link(&link_pin)?;
    let tc_pin = pins.tc_link(link);
    if tc_pin.exists() {
        unpin_link(&tc_pin)?;
    }
    if pins.tc_classic(link).exists() {
        detach_classic(pins, link)?;
    }
    info!(iface, ifindex = link.ifindex, "detached XDP program");
    let maps_removed = pins.pinned_xdp_links()?.is_empty() && remove_maps(pins)?;
    Ok(Detached {
        links: vec![link],
        maps_removed,
    })
}

/// Detaches every lbagent link, including those of interfaces that no longer exist, and
/// removes the maps and the pin directories.
pub fn detach_all(pins: &PinLayout) -> Result<Detached, DataplaneError> {
    pins.check_bpffs()?;
    let links = pins.pinned_xdp_links()?;
    for link in &links {
        unpin_link(&pins.xdp_link(*link))?;
        info!(
            netns = link.netns,
            ifindex = link.ifindex,
            "detached XDP program"
        );
    }
    for link in pins.pinned_tc_links()? {
        unpin_link(&pins.tc_link(link))?;
    }
    for link in pins.pinned_tc_classic()? {
        detach_classic(pins, link)?;
    }
    let mut links = links;
    for old in pins.other_versions()? {
        links.extend(old.pinned_xdp_links()?);
        remove_everything(&old)?;
    }
    let maps_removed = remove_maps(pins)?;
    Ok(Detached {
        links,
        maps_removed,
    })
}

fn load(pins: &PinLayout, reuse_pinned_maps: bool) -> Result<Ebpf, DataplaneError> {
    let mut loader = EbpfLoader::new();
    let paths: Vec<_> = MAP_SPECS
        .iter()
        .map(|spec| (spec.name, pins.map(spec.name)))
        .collect();
    if reuse_pinned_maps {
        // A map an older agent did not pin is created new, and pinned after the load.
        for (name, path) in paths.iter().filter(|(_, path)| path.exists()) {
            loader.map_pin_path(name, path.as_path());
        }
    }
    Ok(loader.load(EBPF_OBJECT)?)
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    let program: &mut Xdp = ebpf
        .program_mut(XDP_PROGRAM)
        .ok_or_else(|| ProgramError::InvalidName {
            name: XDP_PROGRAM.to_owned(),
        })?
        .try_into()?;
    program.load()?;
    Ok(program)
}

fn attach_new(
    program: &mut Xdp,
    iface: &str,
    ifindex: u32,
    mode: AttachMode,
) -> Result<(XdpLinkId, AttachMode), DataplaneError> {
    let foreign = |err: ProgramError| {
        if is_busy(&err) {
            DataplaneError::ForeignXdpProgram {
                iface: iface.to_owned(),
            }
        } else {
            DataplaneError::Program(err)
        }
    };
    match mode {
        AttachMode::Generic => program
            .attach_to_if_index(ifindex, XdpMode::Skb)
            .map(|id| (id, AttachMode::Generic))
            .map_err(foreign),
        AttachMode::Driver => match program.attach_to_if_index(ifindex, XdpMode::Driver) {
            Ok(id) => Ok((id, AttachMode::Driver)),
            Err(err) if is_busy(&err) => Err(foreign(err)),
            Err(error) => Err(DataplaneError::DriverModeRefused {
                iface: iface.to_owned(),
                error,
            }),
        },
        AttachMode::Auto => match program.attach_to_if_index(ifindex, XdpMode::Driver) {
            Ok(id) => Ok((id, AttachMode::Driver)),
            Err(err) if is_busy(&err) => Err(foreign(err)),
            Err(err) => {
                warn!(
                    iface,
                    error = %syscall_detail(&err),
                    "driver-mode XDP refused; falling back to generic mode"
                );
                program
                    .attach_to_if_index(ifindex, XdpMode::Skb)
                    .map(|id| (id, AttachMode::Generic))
                    .map_err(foreign)
            }
        },
    }
}

/// A failed syscall with the kernel's reason (aya's message names only the call).
fn syscall_detail(err: &ProgramError) -> String {
    match err {
        ProgramError::SyscallError(err) => format!("{}: {}", err, err.io_error),
        other => other.to_string(),
    }
}

/// EBUSY: a program is attached in the same mode; EEXIST: one is attached in the other mode.
fn is_busy(err: &ProgramError) -> bool {
    let code = match err {
        ProgramError::SyscallError(err) => err.io_error.raw_os_error(),
        _ => None,
    };
    matches!(code, Some(libc::EBUSY) | Some(libc::EEXIST))
}

/// Whether the maps are pinned, after checking that each pinned one has the layout this
/// program expects (aya reuses a pinned map without looking at it).
fn maps_pinned(pins: &PinLayout) -> Result<bool, DataplaneError> {
    let mut pinned = 0;
    let mut added_missing = 0;
    for spec in &MAP_SPECS {
        let path = pins.map(spec.name);
        if !path.exists() {
            added_missing += usize::from(maps::ADDED.contains(&spec.name));
            continue;
        }
        pinned += 1;
        let info = MapInfo::from_pin(&path).map_err(|source| DataplaneError::Map {
            name: spec.name,
            source,
        })?;
        let found = (
            info.map_type().ok(),
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
            info.map_flags(),
        );
        let expected = (
            Some(spec.map_type),
            spec.key_size,
            spec.value_size,
            spec.max_entries,
            spec.flags,
        );
        if found != expected {
            return Err(DataplaneError::IncompatibleMap {
                path,
                detail: format!(
                    "type/key/value/entries/flags {:?}/{}/{}/{}/{:#x}, expected {:?}/{}/{}/{}/{:#x}",
                    found.0,
                    found.1,
                    found.2,
                    found.3,
                    found.4,
                    expected.0,
                    expected.1,
                    expected.2,
                    expected.3,
                    expected.4
                ),
            });
        }
    }
    match pinned {
        0 => Ok(false),
        n if n + added_missing == MAP_SPECS.len() => Ok(true),
        _ => Err(DataplaneError::IncompatibleMap {
            path: pins.dir(),
            detail: "only some of the maps are pinned".to_owned(),
        }),
    }
}

fn unpin_link(path: &std::path::Path) -> Result<(), DataplaneError> {
    // Closing the last reference after the unpin detaches the program.
    let link = PinnedLink::from_pin(path)?
        .unpin()
        .map_err(|source| DataplaneError::Io {
            path: path.to_owned(),
            source,
        })?;
    link.detach()?;
    Ok(())
}

/// Removes the map pins and every directory lbagent made, keeping any other layout version.
fn remove_maps(pins: &PinLayout) -> Result<bool, DataplaneError> {
    let mut removed = false;
    for spec in &MAP_SPECS {
        let path = pins.map(spec.name);
        match std::fs::remove_file(&path) {
            Ok(()) => removed = true,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(DataplaneError::Io { path, source }),
        }
    }
    for dir in [pins.links_dir(), pins.dir(), pins.root().to_path_buf()] {
        match std::fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::DirectoryNotEmpty
                ) => {}
            Err(source) => return Err(DataplaneError::Io { path: dir, source }),
        }
    }
    Ok(removed)
}

/// `iface` in this process's network namespace.
pub fn local_link(iface: &str) -> Result<XdpLinkPin, DataplaneError> {
    let ifindex =
        nix::net::if_::if_nametoindex(iface).map_err(|_| DataplaneError::UnknownInterface {
            name: iface.to_owned(),
        })?;
    Ok(XdpLinkPin {
        netns: local_netns()?,
        ifindex,
    })
}

fn local_netns() -> Result<u64, DataplaneError> {
    let ns_path = "/proc/self/ns/net";
    Ok(std::fs::metadata(ns_path)
        .map_err(|source| DataplaneError::Io {
            path: ns_path.into(),
            source,
        })?
        .ino())
}

fn create_dir(path: PathBuf, made: &mut Rollback) -> Result<(), DataplaneError> {
    let mut missing: Vec<PathBuf> = path
        .ancestors()
        .take_while(|dir| !dir.exists())
        .map(PathBuf::from)
        .collect();
    std::fs::create_dir_all(&path).map_err(|source| DataplaneError::Io { path, source })?;
    // Remove innermost first on rollback.
    missing.reverse();
    made.dirs.extend(missing);
    Ok(())
}

/// Pins and directories made by an attach in progress; removed unless committed.
#[derive(Default)]
struct Rollback {
    paths: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
}

impl Rollback {
    fn commit(&mut self) {
        self.paths.clear();
        self.dirs.clear();
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        for path in self.paths.drain(..) {
            if let Err(err) = std::fs::remove_file(&path) {
                warn!(path = %path.display(), %err, "rollback: cannot remove pin");
            }
        }
        for dir in self.dirs.drain(..).rev() {
            let _ = std::fs::remove_dir(&dir);
        }
    }
}
