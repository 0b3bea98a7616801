//! The neighbours sink: local addresses (inside a subnet of the node's interfaces) are
//! reached through ARP and IPv6 neighbour discovery, and exactly one node must answer for
//! each. This sink elects that node from the live members (`lbagent membership`), keeps the
//! XDP responder's map (`LB_NEIGHBOURS`) as the election says, announces the addresses it
//! takes, and watches the responder's counters for another host answering too.
//!
//! A new member list is noticed between passes ([`Noticed::Membership`]) and runs a pass at
//! once, so a member going down reaches the map within milliseconds of the membership
//! process declaring it.

pub mod announce;
pub mod election;
pub mod kernel;
pub mod plan;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    ops::ControlFlow,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use self::{
    announce::Announcements,
    election::NodeView,
    kernel::KernelResponder,
    plan::{Election, KernelInterface, Link, Observed, Plan},
};
use super::{Noticed, Report, Sink, Wanted, dataplane::Refused, node_has_ipv6};
use crate::{
    dataplane::{DataplaneError, NeighbourMaps, PinLayout, Role},
    desired::NeighbourOutcome,
    membership::Members,
};

/// Largest member list read (thousands of nodes fit).
const MAX_MEMBERS_BYTES: u64 = 4 << 20;
/// How often the responder's counters are read for foreign answers, and handovers looked at.
const SPLIT_BRAIN_CHECK: Duration = Duration::from_secs(1);
/// How long an address handed over is answered while the new owner's claim is awaited. The
/// new owner announces as soon as it writes its entry, so the claim normally comes within
/// milliseconds; this bounds the two-answerer window if it is lost.
const HANDOVER_LIMIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    #[error("neighbour maps: {0}")]
    Maps(#[from] DataplaneError),
    #[error("announcements: {0}")]
    Announce(#[from] announce::AnnounceError),
    #[error("kernel responder: {0}")]
    Kernel(#[from] kernel::KernelError),
}

/// The config's `neighbours:` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeighboursConfig {
    /// The live members, as `lbagent membership` publishes them.
    pub members_file: PathBuf,
}

/// What the sink reports: the member list it elects from and, per local address, the
/// owner and the candidates in order.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NeighbourReport {
    /// Where `lbagent membership` publishes the live members.
    pub members_file: PathBuf,
    /// The live members by name; `None` until the first list arrived.
    pub members: Option<Vec<String>>,
    pub addresses: Vec<Election>,
    /// Local addresses this node won without an interface in their subnet (it stays silent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_interface: Vec<IpAddr>,
    /// Addresses inside this node's subnets not decided yet: no member list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<IpAddr>,
    /// Addresses no live member has a subnet for, with no routing to advertise them: nobody
    /// answers. Only the node that reports them lists them ([`plan::Plan::no_subnet`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub no_subnet: Vec<IpAddr>,
    /// Local addresses this node answers for that another hardware address answered for too
    /// (split brain), with that address, since the agent started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign: Vec<ForeignAnswer>,
    /// Interfaces that refused the XDP program, where the kernel answers instead, with why
    /// and the addresses this node holds there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel_responder: Vec<KernelInterface>,
}

impl NeighbourReport {
    /// What became of `address`, for the published status (and the Events made from it).
    pub fn outcome(&self, address: IpAddr) -> Option<NeighbourOutcome> {
        if self.no_subnet.contains(&address) {
            return Some(NeighbourOutcome::NoSubnet);
        }
        let election = self.addresses.iter().find(|e| e.address == address)?;
        match &election.owner {
            _ if election.answering => Some(NeighbourOutcome::Answering {
                candidates: election.candidates.clone(),
            }),
            Some(owner) => Some(NeighbourOutcome::AnsweredBy {
                owner: owner.clone(),
            }),
            None => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ForeignAnswer {
    pub address: IpAddr,
    /// The other host's hardware address.
    pub mac: String,
    /// Its answers counted so far.
    pub answers: u64,
}

pub struct NeighbourSink {
    node: String,
    maps: NeighbourMaps,
    announcements: Announcements,
    members: watch::Receiver<Option<Members>>,
    /// The interfaces that refused the program (from the dataplane's follower).
    refused: Option<watch::Receiver<Refused>>,
    kernel: KernelResponder,
    /// Foreign answers counted so far, per address this node answers for.
    foreign_seen: BTreeMap<IpAddr, (u64, [u8; 6])>,
    /// When each address being handed over ([`Role::HandOver`]) was, by this agent.
    handovers: BTreeMap<IpAddr, Instant>,
    check: tokio::time::Interval,
    report: NeighbourReport,
}

impl NeighbourSink {
    /// Opens the responder's pinned maps and follows the member list in `members_file`.
    /// Must run inside a tokio runtime.
    pub fn start(
        node: String,
        pins: &PinLayout,
        members_file: PathBuf,
        refused: Option<watch::Receiver<Refused>>,
    ) -> Result<Self, NeighbourError> {
        let maps = NeighbourMaps::open(pins)?;
        let announcements = Announcements::start()?;
        let kernel = KernelResponder::start(kernel::state_path(&members_file))?;
        let members = follow_members(members_file.clone());
        let mut check = tokio::time::interval(SPLIT_BRAIN_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(members = %members_file.display(), "answering for local addresses as the membership elects");
        Ok(Self {
            node,
            maps,
            announcements,
            members,
            refused,
            kernel,
            foreign_seen: BTreeMap::new(),
            handovers: BTreeMap::new(),
            check,
            report: NeighbourReport {
                members_file,
                ..NeighbourReport::default()
            },
        })
    }

    /// Writes the plan into the map; returns the addresses whose entry failed, with why.
    fn write(&mut self, plan: &Plan) -> BTreeMap<IpAddr, DataplaneError> {
        let mut failed = BTreeMap::new();
        for (address, role) in &plan.set {
            // Ready before the entry is written, sent right after it.
            let first = match role {
                Role::Answer { ifindex, mac } if plan.taken.contains(address) => {
                    announce::Prepared::new(*address, *ifindex, *mac)
                        .map_err(|err| warn!(%address, %err, "announcement not prepared"))
                        .ok()
                }
                _ => None,
            };
            if let Err(err) = self.maps.set(*address, *role) {
                failed.insert(*address, err);
                continue;
            }
            if matches!(role, Role::HandOver { .. }) {
                self.handovers.entry(*address).or_insert_with(Instant::now);
            } else {
                self.handovers.remove(address);
            }
            if let Some(first) = first
                && let Err(err) = self.announcements.first(&first)
            {
                warn!(%address, %err, "announcement not sent");
            }
        }
        for address in &plan.remove {
            match self.maps.remove(*address) {
                Ok(_) => {
                    self.foreign_seen.remove(address);
                    self.handovers.remove(address);
                }
                Err(err) => {
                    failed.insert(*address, err);
                }
            }
        }
        failed
    }

    /// Logs every address this node answers for that another hardware address also answered
    /// for since the last look, and announces it again: the rightful owner reclaims clients
    /// at once, and a node that is not the owner by the common view stops by itself once the
    /// views agree. Returns whether anything new was seen.
    fn check_split_brain(&mut self) -> bool {
        let mut seen_new = false;
        for (address, role) in self.maps.roles() {
            let Role::Answer { ifindex, mac } = role else {
                continue;
            };
            let Ok(Some(counters)) = self.maps.counters(address) else {
                continue;
            };
            let seen = self.foreign_seen.entry(address).or_insert((0, [0; 6]));
            if counters.foreign > seen.0 {
                let other = counters.foreign_mac.unwrap_or_default();
                warn!(
                    %address,
                    other = mac_text(other),
                    answers = counters.foreign - seen.0,
                    "split brain: another host answers for a local address this node owns"
                );
                self.announcements.again(address, ifindex, mac);
                *seen = (counters.foreign, other);
                seen_new = true;
            }
        }
        if seen_new {
            self.report.foreign = self.foreign_answers();
        }
        seen_new
    }

    /// The addresses this node answers for whose foreign count grew since the last split
    /// brain check.
    fn claimed(&self, roles: &BTreeMap<IpAddr, Role>) -> BTreeSet<IpAddr> {
        roles
            .iter()
            .filter(|(_, role)| matches!(role, Role::Answer { .. }))
            .filter(|(address, _)| {
                let seen = self.foreign_seen.get(address).map_or(0, |seen| seen.0);
                matches!(self.maps.counters(**address), Ok(Some(c)) if c.foreign > seen)
            })
            .map(|(address, _)| *address)
            .collect()
    }

    fn handovers_lapsed(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.handovers
            .iter()
            .filter(|(_, since)| since.elapsed() >= HANDOVER_LIMIT)
            .map(|(address, _)| *address)
    }

    fn foreign_answers(&self) -> Vec<ForeignAnswer> {
        self.foreign_seen
            .iter()
            .filter(|(_, (answers, _))| *answers > 0)
            .map(|(address, (answers, mac))| ForeignAnswer {
                address: *address,
                mac: mac_text(*mac),
                answers: *answers,
            })
            .collect()
    }
}

impl Sink for NeighbourSink {
    type Observed = Observed;
    type Plan = Plan;
    type Error = NeighbourError;

    async fn observe(&mut self) -> Result<Observed, NeighbourError> {
        let members = self.members.borrow_and_update().as_ref().map(view);
        let refused = self
            .refused
            .as_mut()
            .map(|refused| refused.borrow_and_update().clone())
            .unwrap_or_default();
        let roles = self.maps.roles();
        // A handover the program ended (the claim came) needs no clock any more; one an
        // agent before this one began (adopted pins) gets its full time from now.
        self.handovers
            .retain(|address, _| matches!(roles.get(address), Some(Role::HandOver { .. })));
        for (address, role) in &roles {
            if matches!(role, Role::HandOver { .. }) {
                self.handovers.entry(*address).or_insert_with(Instant::now);
            }
        }
        Ok(Observed {
            handovers_lapsed: self.handovers_lapsed().collect(),
            claimed: self.claimed(&roles),
            roles,
            links: links(),
            members,
            ipv6: node_has_ipv6(),
            refused,
        })
    }

    fn plan(&self, wanted: &Wanted<'_>, observed: &Observed) -> Plan {
        plan::plan(
            &self.node,
            wanted.desired,
            wanted.routing.is_some(),
            observed,
        )
    }

    async fn apply(&mut self, plan: Plan, observed: Observed, _: &Wanted<'_>) -> Vec<String> {
        if !plan.changes_nothing() {
            info!(
                set = plan.set.len(),
                removed = plan.remove.len(),
                "updating the neighbour responder's map"
            );
        }
        let failed = self.write(&plan);
        let kernel_failed = self.kernel.apply(&plan.kernel, &observed.links).await;
        for address in &plan.taken {
            let Some(Role::Answer { ifindex, mac }) = plan.set.get(address) else {
                continue;
            };
            if failed.contains_key(address) {
                continue;
            }
            let candidates = plan
                .elections
                .iter()
                .find(|e| e.address == *address)
                .map(|e| e.candidates.join(","))
                .unwrap_or_default();
            info!(%address, ifindex, candidates, "answering for a local address");
            self.announcements.taken(*address, *ifindex, *mac);
        }
        for address in &plan.released {
            info!(%address, "another node answers for this local address now");
            self.announcements.released(*address);
        }
        for address in &plan.no_interface {
            warn!(
                %address,
                "this node won the local address but has no interface in its subnet; staying silent"
            );
        }
        let mut failed: Vec<String> = failed
            .into_iter()
            .map(|(address, err)| format!("local address {address}: {err}"))
            .chain(kernel_failed)
            .collect();
        if !plan.waiting.is_empty() {
            failed.push(format!(
                "no member list in {} yet (is `lbagent membership` running?): local addresses {} are not answered for",
                self.report.members_file.display(),
                plan.waiting
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        self.report = NeighbourReport {
            members_file: self.report.members_file.clone(),
            members: observed
                .members
                .map(|view| view.into_iter().map(|node| node.name).collect()),
            addresses: plan.elections,
            no_interface: plan.no_interface,
            waiting: plan.waiting,
            no_subnet: plan.no_subnet,
            foreign: self.foreign_answers(),
            kernel_responder: plan.kernel.into_values().collect(),
        };
        failed
    }

    fn report(&self) -> Report {
        Report::Neighbours(self.report.clone())
    }

    async fn noticed(&mut self) -> Noticed {
        loop {
            tokio::select! {
                changed = self.members.changed() => {
                    if changed.is_err() {
                        // The follower is gone (it logged why): nothing more to notice there.
                        std::future::pending::<()>().await;
                    }
                    return Noticed::Membership;
                }
                _ = self.check.tick() => {
                    if self.handovers_lapsed().next().is_some() {
                        return Noticed::Drift;
                    }
                    if self.check_split_brain() {
                        return Noticed::Report;
                    }
                },
                changed = async {
                    match self.refused.as_mut() {
                        Some(refused) => refused.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if changed.is_err() {
                        // The follower is gone: the last refusals stay in force.
                        self.refused = None;
                    }
                    return Noticed::Drift;
                }
            }
        }
    }
}

/// The sink for the agent's list, or `None` (logged) when the responder's maps cannot be
/// opened: local addresses are then only reported.
pub fn start(
    node: &str,
    config: &NeighboursConfig,
    dataplane: &super::dataplane::DataplaneConfig,
    refused: Option<watch::Receiver<Refused>>,
) -> Option<Box<dyn super::Driven>> {
    let pins = PinLayout::new(&dataplane.pin_root);
    match NeighbourSink::start(node.to_owned(), &pins, config.members_file.clone(), refused) {
        Ok(sink) => Some(Box::new(sink)),
        Err(err) => {
            tracing::error!(%err, "local addresses are not answered for");
            None
        }
    }
}

/// Follows the member list `lbagent membership` publishes; the receiver holds the last list
/// that parsed.
fn follow_members(path: PathBuf) -> watch::Receiver<Option<Members>> {
    let (members_tx, members) = watch::channel::<Option<Members>>(None);
    tokio::spawn(async move {
        // Nothing asks for a re-read: the membership process rewrites the file on a change.
        let (_reread_tx, reread) = watch::channel(0);
        let followed = crate::watch::follow(&path, MAX_MEMBERS_BYTES, reread, |event| {
            match event {
                crate::watch::FileEvent::Changed(text) => match serde_json::from_str(&text) {
                    Ok(list) => {
                        members_tx.send_replace(Some(list));
                    }
                    Err(err) => warn!(path = %path.display(), %err, "member list does not parse; keeping the last one"),
                },
                crate::watch::FileEvent::Unreadable(err) => {
                    warn!(path = %path.display(), %err, "member list unreadable; keeping the last one (is `lbagent membership` running?)")
                }
            }
            ControlFlow::Continue(())
        })
        .await;
        if let Err(err) = followed {
            warn!(%err, "not following the member list");
        }
    });
    members
}

/// The live members as the election sees them.
fn view(members: &Members) -> Vec<NodeView> {
    members
        .alive
        .iter()
        .map(|(name, info)| NodeView {
            name: name.clone(),
            subnets: info.subnets.clone(),
            excluded: members.excluded.contains(name),
            alive: true,
        })
        .collect()
}

/// This node's interfaces with a hardware address, with their subnets (host prefixes, such
/// as LB addresses on kube-lb0, left out: nobody asks for an address on those).
fn links() -> Vec<Link> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut by_name: BTreeMap<String, Vec<ipnet::IpNet>> = BTreeMap::new();
    let mut hosts: BTreeMap<String, std::collections::BTreeSet<IpAddr>> = BTreeMap::new();
    for entry in addresses {
        let (Some(address), Some(netmask)) = (entry.address, entry.netmask) else {
            continue;
        };
        let pair: Option<(IpAddr, IpAddr)> = if let (Some(a), Some(m)) =
            (address.as_sockaddr_in(), netmask.as_sockaddr_in())
        {
            Some((a.ip().into(), m.ip().into()))
        } else if let (Some(a), Some(m)) = (address.as_sockaddr_in6(), netmask.as_sockaddr_in6()) {
            Some((a.ip().into(), m.ip().into()))
        } else {
            None
        };
        if let Some((ip, mask)) = pair
            && let Ok(prefix) = ipnet::ip_mask_to_prefix(mask)
            && let Ok(net) = ipnet::IpNet::new(ip, prefix)
        {
            if net.prefix_len() < net.max_prefix_len() {
                by_name
                    .entry(entry.interface_name.clone())
                    .or_default()
                    .push(net.trunc());
            } else {
                hosts
                    .entry(entry.interface_name.clone())
                    .or_default()
                    .insert(ip);
            }
        }
    }
    by_name
        .into_iter()
        .filter_map(|(name, prefixes)| {
            let ifindex = nix::net::if_::if_nametoindex(name.as_str()).ok()?;
            let mac = announce::hardware_address(ifindex)?;
            (mac != [0; 6]).then(|| Link {
                hosts: hosts.get(&name).cloned().unwrap_or_default(),
                name,
                ifindex,
                mac,
                prefixes,
            })
        })
        .collect()
}

pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
