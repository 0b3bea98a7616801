//! Which nodes are alive, for the owners of local addresses: SWIM membership (the `foca`
//! crate) between the nodes, over UDP, in a process of its own (`lbagent membership`).
//!
//! Why a process of its own: liveness must follow the node, not the agent. An agent killed
//! alone (SIGKILL, an upgrade) leaves its XDP programs and maps answering, and must not cause
//! a failover; this process keeps running beside it and the restarted agent reads the same
//! view. A node whose processes are frozen or whose link is down stops answering probes,
//! and the others declare it down after the suspicion timeout.
//!
//! The view is published as a JSON file (written whole, then renamed into place), which the
//! agent follows with inotify. With `--kubernetes` the Node objects add the seeds and the
//! nodes carrying the exclusion label ([`kubernetes`]).

pub mod kubernetes;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    num::{NonZeroU32, NonZeroUsize},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use foca::{Config, Foca, Identity, OwnedNotification, PostcardCodec, Timer};
use ipnet::IpNet;
use rand::{SeedableRng as _, rngs::StdRng};
use serde::{Deserialize, Serialize};
use tokio::{
    net::UdpSocket,
    sync::{mpsc, watch},
};
use tracing::{debug, info, warn};

use self::kubernetes::NodeFacts;
use crate::{
    dataplane::{Lease, NeighbourMaps, PinLayout},
    files::{JsonFileError, read_json, write_json},
};

/// Probe timing. A dead member is first probed within about one period (each member probes
/// one other per period); unanswered directly within `PROBE_RTT` and indirectly by the end
/// of the period, it is suspected, and declared down `SUSPECT_TO_DOWN` later unless it
/// refutes. Down within about 0.2-0.45 s, well inside the one-second failover target.
pub const PROBE_PERIOD: Duration = Duration::from_millis(100);
pub const PROBE_RTT: Duration = Duration::from_millis(40);
pub const SUSPECT_TO_DOWN: Duration = Duration::from_millis(200);
/// How long the node may answer for its local addresses after the last renewal of its lease
/// (see `lbagent_common::maps::NEIGHBOUR_LEASE`), and how often it is renewed. A frozen node
/// stops answering within `LEASE`, before the others, which declare it down after
/// `SUSPECT_TO_DOWN` plus detection, start.
pub const LEASE: Duration = Duration::from_millis(300);
const LEASE_RENEWAL: Duration = Duration::from_millis(50);
/// On a clean stop, how long this node goes on answering for an address no other node has
/// claimed: the successors take over within milliseconds of hearing it leave, and an
/// address nobody else may hold is left unanswered after this.
pub const HANDOVER_LIMIT: Duration = Duration::from_secs(1);
/// How often the hand-over is looked at.
const HANDOVER_CHECK: Duration = Duration::from_millis(2);
/// Seeds that are not members yet (started later, or across a healed partition) are
/// announced to this often.
const REANNOUNCE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("cannot bind the membership socket to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("membership socket: {0}")]
    Socket(std::io::Error),
    #[error("the member list {0}")]
    File(#[from] JsonFileError),
    #[error("no member list at {}", .0.display())]
    Missing(PathBuf),
}

/// A member's identity: its node name and address, and a generation that a restarted (or
/// wrongly declared down) member raises, so that its new identity wins over the old one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeId {
    pub name: String,
    pub addr: SocketAddr,
    pub generation: u64,
    /// The subnets of the node's interfaces (read at start): which local addresses it can
    /// answer for.
    pub subnets: Vec<IpNet>,
}

impl Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            generation: self.generation + 1,
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// The published view: the live members by name (this node included).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// This node.
    pub node: String,
    pub alive: BTreeMap<String, MemberInfo>,
    /// Nodes whose Node carries `node.kubernetes.io/exclude-from-external-load-balancers`
    /// (with `--kubernetes`): members, but no local address is elected onto them.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub excluded: BTreeSet<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// Its membership address.
    pub addr: SocketAddr,
    pub subnets: Vec<IpNet>,
}

impl Members {
    pub fn names(&self) -> BTreeSet<String> {
        self.alive.keys().cloned().collect()
    }

    /// Reads a list `lbagent membership` wrote.
    pub fn read(path: &Path) -> Result<Self, MembershipError> {
        read_json(path)?.ok_or_else(|| MembershipError::Missing(path.to_owned()))
    }

    fn write(&self, path: &Path) -> Result<(), MembershipError> {
        Ok(write_json(path, self)?)
    }
}

/// What `lbagent membership` runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub name: String,
    pub bind: SocketAddr,
    /// Other nodes' membership addresses to join through (any one alive is enough).
    pub seeds: Vec<SocketAddr>,
    pub members_file: PathBuf,
    /// The dataplane's pins, whose answering lease this process renews (once they exist).
    pub pins: Option<PinLayout>,
    /// What the Node objects say (`--kubernetes`): more seeds, and the excluded nodes.
    pub nodes: Option<watch::Receiver<Option<NodeFacts>>>,
}

/// foca's settings with lbagent's timing (see [`PROBE_PERIOD`]).
pub fn foca_config(expected_nodes: usize) -> Config {
    let size = NonZeroU32::new(u32::try_from(expected_nodes.max(1)).unwrap_or(u32::MAX))
        .unwrap_or(NonZeroU32::MIN);
    let mut config = Config::new_lan(size);
    config.probe_period = PROBE_PERIOD;
    config.probe_rtt = PROBE_RTT;
    config.suspect_to_down_after = SUSPECT_TO_DOWN;
    config.periodic_gossip = Some(foca::PeriodicParams {
        frequency: Duration::from_millis(50),
        num_members: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
    });
    config
}

type Swim = Foca<NodeId, PostcardCodec, StdRng, foca::NoCustomBroadcast>;

/// Runs the member until `shutdown` resolves, then leaves the cluster (so the others act at
/// once rather than after the suspicion timeout).
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), MembershipError> {
    let socket = UdpSocket::bind(settings.bind)
        .await
        .map_err(|source| MembershipError::Bind {
            addr: settings.bind,
            source,
        })?;
    let generation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let identity = NodeId {
        name: settings.name.clone(),
        addr: settings.bind,
        generation,
        subnets: node_subnets(),
    };
    let subnets = identity.subnets.clone();
    let rng = StdRng::seed_from_u64(generation ^ u64::from(settings.bind.port()));
    let mut swim: Swim = Foca::new(
        identity,
        foca_config(settings.seeds.len() + 1),
        rng,
        PostcardCodec,
    );
    let (timers_tx, mut timers) = mpsc::unbounded_channel();
    let mut member = Member {
        socket,
        settings,
        subnets,
        timers: timers_tx,
        published: None,
        facts: NodeFacts::default(),
    };
    let mut runtime = foca::AccumulatingRuntime::new();
    member.announce_to_strangers(&mut swim, &mut runtime);
    member.flush(&swim, &mut runtime).await?;
    info!(
        node = member.settings.name,
        bind = %member.settings.bind,
        seeds = ?member.settings.seeds,
        "membership started"
    );

    let mut reannounce = tokio::time::interval(REANNOUNCE);
    reannounce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut renewal = tokio::time::interval(LEASE_RENEWAL);
    renewal.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lease: Option<Lease> = None;
    let mut buf = vec![0u8; 65_536];
    let mut nodes = member.settings.nodes.take();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            Some(changed) = async {
                match nodes.as_mut() {
                    Some(nodes) => Some(nodes.changed().await),
                    None => None,
                }
            } => match changed {
                Ok(()) => {
                    let facts = nodes.as_mut().and_then(|n| n.borrow_and_update().clone());
                    if let Some(facts) = facts {
                        member.facts = facts;
                        member.published = None;
                        member.announce_to_strangers(&mut swim, &mut runtime);
                    }
                }
                // The follower is gone: the last facts stay in force.
                Err(_) => nodes = None,
            },
            received = member.socket.recv_from(&mut buf) => {
                let (len, _) = received.map_err(MembershipError::Socket)?;
                if let Err(err) = swim.handle_data(&buf[..len], &mut runtime) {
                    warn!(%err, "membership: message ignored");
                }
            }
            Some(timer) = timers.recv() => {
                if let Err(err) = swim.handle_timer(timer, &mut runtime) {
                    warn!(%err, "membership: timer failed");
                }
            }
            _ = reannounce.tick() => member.announce_to_strangers(&mut swim, &mut runtime),
            _ = renewal.tick() => renew(&member.settings, &mut lease),
            () = &mut shutdown => {
                // Answer until each successor claims its address, never after the limit.
                if let Some(open) = lease.as_mut()
                    && let Err(err) = open.leave(HANDOVER_LIMIT)
                {
                    warn!(%err, "membership: cannot mark the answering lease as leaving");
                }
                if let Err(err) = swim.leave_cluster(&mut runtime) {
                    warn!(%err, "membership: leaving the cluster failed");
                }
                member.flush(&swim, &mut runtime).await?;
                member.hand_over().await;
                member.publish_left()?;
                if let Some(open) = lease.as_mut()
                    && let Err(err) = open.renew(Some(Duration::ZERO))
                {
                    warn!(%err, "membership: cannot end the answering lease");
                }
                info!("membership: left the cluster");
                return Ok(());
            }
        }
        member.flush(&swim, &mut runtime).await?;
    }
}

/// Renews the answering lease, opening the pinned map first if needed (the agent may not
/// have created it yet). A lease that cannot be renewed runs out: the node stops answering,
/// as it should when its membership cannot keep it.
fn renew(settings: &Settings, lease: &mut Option<Lease>) {
    let Some(pins) = &settings.pins else {
        return;
    };
    if lease.is_none() {
        match Lease::open(pins) {
            Ok(opened) => {
                info!(dir = %pins.dir().display(), "membership: renewing the answering lease");
                *lease = Some(opened);
            }
            Err(err) => {
                debug!(%err, "membership: no lease to renew yet");
                return;
            }
        }
    }
    if let Some(open) = lease
        && let Err(err) = open.renew(Some(LEASE))
    {
        warn!(%err, "membership: cannot renew the answering lease");
        *lease = None;
    }
}

struct Member {
    socket: UdpSocket,
    settings: Settings,
    subnets: Vec<IpNet>,
    timers: mpsc::UnboundedSender<Timer<NodeId>>,
    published: Option<Members>,
    facts: NodeFacts,
}

impl Member {
    /// Announces this member to every seed that is not a live member yet.
    fn announce_to_strangers(
        &self,
        swim: &mut Swim,
        runtime: &mut foca::AccumulatingRuntime<NodeId>,
    ) {
        let known: BTreeSet<SocketAddr> = swim.iter_members().map(|m| m.id().addr).collect();
        for seed in self.settings.seeds.iter().chain(&self.facts.seeds) {
            if *seed == self.settings.bind || known.contains(seed) {
                continue;
            }
            // Only the address matters to reach it; its answer carries its real identity.
            let placeholder = NodeId {
                name: String::new(),
                addr: *seed,
                generation: 0,
                subnets: Vec::new(),
            };
            if let Err(err) = swim.announce(placeholder, &mut *runtime) {
                warn!(%err, %seed, "membership: announce failed");
            }
        }
    }

    /// Waits until the program has handed every address it answered for over to the node
    /// that claimed it (see `maps::NEIGHBOUR_LEASE_LEAVING`), or [`HANDOVER_LIMIT`].
    async fn hand_over(&self) {
        let Some(maps) = self
            .settings
            .pins
            .as_ref()
            .and_then(|pins| NeighbourMaps::open(pins).ok())
        else {
            return;
        };
        let answering = || {
            maps.roles()
                .into_iter()
                .filter(|(_, role)| role.answers())
                .map(|(address, _)| address)
                .collect::<Vec<_>>()
        };
        let started = tokio::time::Instant::now();
        let mut left = answering();
        while !left.is_empty() && started.elapsed() < HANDOVER_LIMIT {
            tokio::time::sleep(HANDOVER_CHECK).await;
            left = answering();
        }
        if left.is_empty() {
            info!(after = ?started.elapsed(), "membership: every local address handed over");
        } else {
            warn!(addresses = ?left, "membership: no other node claimed these local addresses; they go unanswered");
        }
    }

    /// Publishes the view without this node, so that its agent agrees with the others that
    /// it holds nothing (and does not take back what the program handed over).
    fn publish_left(&mut self) -> Result<(), MembershipError> {
        let mut members = self.published.clone().unwrap_or_default();
        members.node = self.settings.name.clone();
        members.alive.remove(&self.settings.name);
        members.write(&self.settings.members_file)?;
        self.published = Some(members);
        Ok(())
    }

    /// Sends what foca queued, arms its timers, and republishes the view if it changed.
    async fn flush(
        &mut self,
        swim: &Swim,
        runtime: &mut foca::AccumulatingRuntime<NodeId>,
    ) -> Result<(), MembershipError> {
        while let Some((to, data)) = runtime.to_send() {
            if let Err(err) = self.socket.send_to(&data, to.addr).await {
                // An unreachable peer is what the protocol is for; not our failure.
                warn!(%err, to = %to.addr, "membership: send failed");
            }
        }
        while let Some((after, timer)) = runtime.to_schedule() {
            let timers = self.timers.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = timers.send(timer);
            });
        }
        let mut changed = self.published.is_none();
        while let Some(notification) = runtime.to_notify() {
            log(&notification);
            changed = true;
        }
        if changed {
            let info = |id: &NodeId| MemberInfo {
                addr: id.addr,
                subnets: id.subnets.clone(),
            };
            let mut alive: BTreeMap<String, MemberInfo> = swim
                .iter_members()
                .filter(|m| !m.id().name.is_empty())
                .map(|m| (m.id().name.clone(), info(m.id())))
                .collect();
            alive.insert(
                self.settings.name.clone(),
                MemberInfo {
                    addr: self.settings.bind,
                    subnets: self.subnets.clone(),
                },
            );
            let members = Members {
                node: self.settings.name.clone(),
                alive,
                excluded: self.facts.excluded.clone(),
            };
            if self.published.as_ref() != Some(&members) {
                members.write(&self.settings.members_file)?;
                self.published = Some(members);
            }
        }
        Ok(())
    }
}

/// The subnets of this node's interfaces: every address with its netmask, loopback, IPv6
/// link-local and host prefixes left out.
pub fn node_subnets() -> Vec<IpNet> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut subnets: Vec<IpNet> = addresses
        .filter_map(|entry| {
            let address = entry.address?;
            let netmask = entry.netmask?;
            let (ip, mask): (std::net::IpAddr, std::net::IpAddr) =
                if let (Some(a), Some(m)) = (address.as_sockaddr_in(), netmask.as_sockaddr_in()) {
                    (a.ip().into(), m.ip().into())
                } else if let (Some(a), Some(m)) =
                    (address.as_sockaddr_in6(), netmask.as_sockaddr_in6())
                {
                    (a.ip().into(), m.ip().into())
                } else {
                    return None;
                };
            let unusable = ip.is_loopback()
                || matches!(ip, std::net::IpAddr::V6(v6) if v6.is_unicast_link_local());
            if unusable {
                return None;
            }
            let prefix = ipnet::ip_mask_to_prefix(mask).ok()?;
            // A host prefix (an LB address on kube-lb0) is no segment anyone asks on.
            IpNet::new(ip, prefix)
                .ok()
                .filter(|net| net.prefix_len() < net.max_prefix_len())
                .map(|net| net.trunc())
        })
        .collect();
    subnets.sort();
    subnets.dedup();
    subnets
}

fn log(notification: &OwnedNotification<NodeId>) {
    match notification {
        OwnedNotification::MemberUp(id) => info!(member = id.name, addr = %id.addr, "member up"),
        OwnedNotification::MemberDown(id) => {
            warn!(member = id.name, addr = %id.addr, "member down")
        }
        OwnedNotification::Rename(old, new) => {
            info!(
                member = new.name,
                from = old.generation,
                to = new.generation,
                "member restarted"
            )
        }
        OwnedNotification::Defunct => warn!("this node was declared down; rejoining"),
        other => info!(?other, "membership"),
    }
}
