//! The neighbours sink: local addresses (inside a subnet of the node's interfaces) are
//! reached through ARP and IPv6 neighbour discovery, and exactly one node must answer for
//! each. This sink elects that node from the live members (`lbagent membership`), keeps the
//! XDP responder's map as the election says, announces the addresses it takes, and watches
//! the responder's counters for another host answering too.
//!
//! It runs as a task of its own beside the reconciler: it follows what the reconciler
//! applied (the local addresses) and the member list, so a member going down reaches the map
//! within milliseconds of the membership process noticing, without a reconcile.

pub mod announce;
pub mod election;
pub mod plan;

use std::{collections::BTreeMap, net::IpAddr, ops::ControlFlow, path::PathBuf, time::Duration};

use tokio::{sync::watch, time::Instant};
use tracing::{info, warn};

use crate::{
    dataplane::{NeighbourMaps, PinLayout, Role},
    membership::Members,
    status::{AddressState, Status},
};
use announce::Announcer;
use election::NodeView;
use plan::{Link, Observed, Plan};

/// Largest member list read (thousands of nodes fit).
const MAX_MEMBERS_BYTES: u64 = 4 << 20;
/// How often the responder's counters are read for foreign answers.
const SPLIT_BRAIN_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum NeighbourError {
    #[error("neighbour maps: {0}")]
    Maps(#[from] crate::dataplane::DataplaneError),
    #[error("announcements: {0}")]
    Announce(#[from] announce::AnnounceError),
}

pub struct NeighbourSink {
    node: String,
    maps: NeighbourMaps,
    announcer: Announcer,
    /// Announcements still to send: when, what, from where.
    pending: Vec<(Instant, IpAddr, u32, [u8; 6])>,
    /// Foreign answers counted so far, per address this node answers for.
    foreign_seen: BTreeMap<IpAddr, u64>,
}

impl NeighbourSink {
    pub fn new(node: String, pins: &PinLayout) -> Result<Self, NeighbourError> {
        Ok(Self {
            node,
            maps: NeighbourMaps::open(pins)?,
            announcer: Announcer::new()?,
            pending: Vec::new(),
            foreign_seen: BTreeMap::new(),
        })
    }

    /// The map's entries and the node's interfaces.
    pub fn observe(&self) -> Observed {
        Observed {
            roles: self.maps.roles(),
            links: links(),
        }
    }

    /// Writes the plan into the map and schedules the announcements of what it takes.
    pub fn apply(&mut self, plan: &Plan) -> Result<(), NeighbourError> {
        for (address, role) in &plan.set {
            self.maps.set(*address, *role)?;
        }
        for address in &plan.remove {
            self.maps.remove(*address)?;
            self.foreign_seen.remove(address);
        }
        let now = Instant::now();
        for address in &plan.taken {
            let Some(Role::Answer { ifindex, mac }) = plan.set.get(address) else {
                continue;
            };
            let candidates = plan
                .elections
                .iter()
                .find(|e| e.address == *address)
                .map(|e| e.candidates.join(","))
                .unwrap_or_default();
            info!(%address, ifindex, candidates, "answering for a local address");
            self.pending.retain(|(_, a, _, _)| a != address);
            for delay in announce::SCHEDULE {
                self.pending.push((now + delay, *address, *ifindex, *mac));
            }
        }
        for address in &plan.released {
            info!(%address, "another node answers for this local address now");
            self.pending.retain(|(_, a, _, _)| a != address);
        }
        for address in &plan.no_interface {
            warn!(
                %address,
                "this node won the local address but has no interface in its subnet; staying silent"
            );
        }
        Ok(())
    }

    /// Sends the announcements that are due.
    fn announce_due(&mut self) {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|p| p.0 <= now);
        self.pending = later;
        for (_, address, ifindex, mac) in due {
            if let Err(err) = self.announcer.announce(address, ifindex, mac) {
                warn!(%err, "announcement not sent");
            }
        }
    }

    fn next_announcement(&self) -> Option<Instant> {
        self.pending.iter().map(|p| p.0).min()
    }

    /// Logs every address this node answers for that another hardware address also answered
    /// for since the last look, and announces it again: the rightful owner reclaims clients
    /// at once, and a node that is not the owner by the common view stops by itself.
    fn check_split_brain(&mut self) {
        for (address, role) in self.maps.roles() {
            let Role::Answer { ifindex, mac } = role else {
                continue;
            };
            let Ok(Some(counters)) = self.maps.counters(address) else {
                continue;
            };
            let seen = self.foreign_seen.entry(address).or_insert(0);
            if counters.foreign > *seen {
                let other = counters.foreign_mac.map(mac_text).unwrap_or_default();
                warn!(
                    %address,
                    other,
                    answers = counters.foreign - *seen,
                    "split brain: another host answers for a local address this node owns"
                );
                if let Err(err) = self.announcer.announce(address, ifindex, mac) {
                    warn!(%err, "announcement not sent");
                }
            }
            *seen = counters.foreign;
        }
    }
}

/// Every address the reconciler applied, local or not: an address becomes virtual (on the
/// LB interface) on a node whose interface in its subnet is down, and must stay silent there.
fn served_addresses(status: &Status) -> Vec<IpAddr> {
    status
        .addresses
        .iter()
        .filter(|a| a.state != AddressState::Unsupported)
        .map(|a| a.address)
        .collect()
}

/// The live members as the election sees them.
fn view(members: &Members) -> Vec<NodeView> {
    members
        .alive
        .iter()
        .map(|(name, info)| NodeView {
            name: name.clone(),
            subnets: info.subnets.clone(),
            excluded: false,
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
            && net.prefix_len() < net.max_prefix_len()
        {
            by_name
                .entry(entry.interface_name.clone())
                .or_default()
                .push(net.trunc());
        }
    }
    by_name
        .into_iter()
        .filter_map(|(name, prefixes)| {
            let ifindex = nix::net::if_::if_nametoindex(name.as_str()).ok()?;
            let mac = announce::hardware_address(ifindex)?;
            (mac != [0; 6]).then_some(Link {
                ifindex,
                mac,
                prefixes,
            })
        })
        .collect()
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Runs the sink until `applied` closes: follows the applied status and the member list.
pub async fn run(
    mut sink: NeighbourSink,
    members_file: PathBuf,
    mut applied: watch::Receiver<Option<Status>>,
) {
    let (members_tx, mut members) = watch::channel::<Option<Members>>(None);
    let path = members_file.clone();
    tokio::spawn(async move {
        // Nothing asks for a re-read: the membership process rewrites the file on a change.
        let (_reread_tx, reread) = watch::channel(0);
        let followed = crate::watch::follow(&path, MAX_MEMBERS_BYTES, reread, |event| {
            match event {
                crate::watch::FileEvent::Changed(text) => match serde_json::from_str(&text) {
                    Ok(list) => {
                        let _ = members_tx.send(Some(list));
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
    let mut check = tokio::time::interval(SPLIT_BRAIN_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(members = %members_file.display(), "answering for local addresses as the membership elects");
    loop {
        let next = sink.next_announcement();
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            changed = members.changed() => if changed.is_err() { return },
            // Also a resync: a failed write is tried again here.
            _ = check.tick() => sink.check_split_brain(),
            () = async { match next { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => {
                sink.announce_due();
                continue;
            }
        }
        let status = applied.borrow().clone();
        let list = members.borrow().clone();
        // Nothing is decided before both the first reconcile and the first member list:
        // with no view of the others, answering could duplicate them.
        let (Some(status), Some(list)) = (status, list) else {
            continue;
        };
        let served = served_addresses(&status);
        let observed = sink.observe();
        let plan = plan::plan(&sink.node, &served, &view(&list), &observed);
        if plan.changes_nothing() {
            continue;
        }
        if let Err(err) = sink.apply(&plan) {
            warn!(%err, "neighbour map not updated; trying again at the next change");
        }
        sink.announce_due();
    }
}
