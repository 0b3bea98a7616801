//! The dataplane of `lbagent run`: its maps, and its program on the interfaces the config
//! asks for, followed through netlink as they come and go.
//!
//! The interfaces are the config's list, or else those of the node's default routes. A
//! listed interface that is absent gets the program when it appears; one that vanishes
//! has its link pins removed (the kernel detached the program with it). With default
//! routes, an interface that gains one gets the program; one that loses it keeps the
//! program until it vanishes or lbagent restarts, so a flapping route never leaves LB
//! traffic unfiltered. At start, lbagent's links to interfaces that are no longer wanted
//! are removed.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    Handle, MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        route::{RouteAttribute, RouteMessage},
    },
};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::DataplaneSink;
use crate::{
    dataplane::{
        AttachMode, DataplaneError, HeldLinks, PinLayout, PinnedMaps, XdpLinkPin, attach,
        detach_all, forget, local_link, prepare,
    },
    sinks::link_name,
};

type Events = futures::channel::mpsc::UnboundedReceiver<(
    rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>,
    rtnetlink::sys::SocketAddr,
)>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// Interfaces the XDP program is attached to: those that carry the LB traffic, attached
    /// when they appear. Empty: the interfaces of the node's default routes, followed as
    /// routes change.
    pub interfaces: Vec<String>,
    pub mode: AttachMode,
    pub pin_root: PathBuf,
}

/// RT_TABLE_MAIN.
const MAIN_TABLE: u8 = 254;

/// Netlink events come in bursts (an interface appears, comes up, gets addresses and
/// routes); one look after the burst is enough.
const SETTLE: Duration = Duration::from_millis(100);

/// How long a start waits for another process's writer's lock on the maps.
const BUSY_WAIT: Duration = Duration::from_secs(10);

/// A started dataplane: the maps' sink for the reconciler, and the task that follows the
/// interfaces (aborted when the config changes the dataplane).
pub struct Started {
    pub sink: DataplaneSink,
    pub follower: Option<tokio::task::JoinHandle<()>>,
    /// The interfaces that refused the program, as the follower last saw them.
    pub refused: watch::Receiver<Refused>,
}

/// Interfaces that refused the XDP program, by name: the neighbours sink has the kernel
/// answer there instead (see `sinks::neighbours::kernel`).
pub type Refused = BTreeMap<String, Refusal>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The interface that refused (a re-created interface of the same name is tried again).
    pub ifindex: u32,
    /// Why, as the attach failed.
    pub reason: String,
}

/// How often the pins are looked at: one `stat` per pin. Anyone with root can remove them
/// (`rm -rf` of the pin directory); then the next agent would start a dataplane of its own
/// beside the one still attached.
pub(super) const PIN_CHECK: Duration = Duration::from_secs(1);

/// Prepares the maps, attaches to the wanted interfaces that exist, and keeps following
/// them in a task of its own. Returns the maps' sink for the reconciler, or why there can
/// be no dataplane at all (the caller says so and tries again later); the rest of the agent
/// runs either way.
pub async fn start(config: &DataplaneConfig) -> Result<Started, DataplaneError> {
    let pins = PinLayout::new(&config.pin_root);
    let mut prepared = prepare(&pins);
    if let Err(DataplaneError::IncompatibleMap { path, detail }) = &prepared {
        // Never reuse a map this program would misread: start the dataplane afresh. Its
        // counters are lost; the reconciler refills the policy.
        warn!(path = %path.display(), %detail, "pinned map has another layout; replacing the dataplane's pins");
        if let Err(err) = detach_all(&pins) {
            error!(%err, "cannot remove the incompatible pins");
        }
        prepared = prepare(&pins);
    }
    let mut sink = prepared.and_then(|()| DataplaneSink::open(&pins));
    // The writer's lock of an agent that is still exiting (a restart right after a kill)
    // is gone within moments; one that stays is another running agent.
    let mut delay = Duration::from_millis(20);
    let waited_since = tokio::time::Instant::now();
    while let Err(DataplaneError::Busy { .. }) = &sink
        && waited_since.elapsed() < BUSY_WAIT
    {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
        sink = DataplaneSink::open(&pins);
    }
    let sink = sink?;
    let (connection, routes) = match rtnetlink::new_connection() {
        Ok((connection, routes, _)) => (connection, routes),
        Err(err) => {
            error!(%err, "dataplane: no netlink connection; no interface gets the XDP program");
            let (_, refused) = watch::channel(Refused::new());
            return Ok(Started {
                sink,
                follower: None,
                refused,
            });
        }
    };
    // The follower's connections live in its task, so that aborting it closes them.
    let routes_connection = tokio::spawn(connection);
    // Held for the life of the agent: the same maps can be pinned again if their pins go.
    let maps = match PinnedMaps::open(&pins) {
        Ok(maps) => Some(maps),
        Err(err) => {
            error!(%err, "dataplane: cannot hold the pinned maps; pins removed from outside lbagent will not be restored");
            None
        }
    };
    let (refusals, refused) = watch::channel(Refused::new());
    let mut follower = Follower {
        pins,
        maps,
        held: HeldLinks::default(),
        mode: config.mode,
        listed: config.interfaces.clone(),
        routes,
        attached: BTreeMap::new(),
        refused: BTreeMap::new(),
        refusals,
    };
    follower.first_pass().await;
    let follower = match rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ]) {
        Ok((connection, _, messages)) => Some(tokio::spawn(async move {
            let _routes = AbortOnDrop(routes_connection);
            tokio::select! {
                () = connection => {}
                () = follower.follow(messages) => {}
            }
        })),
        Err(err) => {
            error!(%err, "dataplane: cannot follow interfaces through netlink; new ones will not get the XDP program");
            routes_connection.abort();
            None
        }
    };
    Ok(Started {
        sink,
        follower,
        refused,
    })
}

/// Aborts a task when dropped: a connection that serves only its owner's task.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether interfaces are attached to at start or as they appear later.
#[derive(Clone, Copy, PartialEq, Eq)]
enum When {
    Starting,
    Following,
}

struct Follower {
    pins: PinLayout,
    maps: Option<PinnedMaps>,
    /// The links of the interfaces in `attached`.
    held: HeldLinks,
    mode: AttachMode,
    /// The config's interfaces; empty: those of the default routes.
    listed: Vec<String>,
    /// For the default routes.
    routes: Handle,
    /// Interfaces with the program, by name.
    attached: BTreeMap<String, XdpLinkPin>,
    /// Interfaces that refused it, not tried again until they are replaced.
    refused: BTreeMap<String, XdpLinkPin>,
    /// The refusals with why, for the neighbours sink.
    refusals: watch::Sender<Refused>,
}

impl Follower {
    async fn wanted(&self) -> Vec<String> {
        if !self.listed.is_empty() {
            return self.listed.clone();
        }
        match default_route_interfaces(&self.routes).await {
            Ok(names) => names,
            Err(err) => {
                error!(%err, "dataplane: cannot find the default routes' interfaces");
                Vec::new()
            }
        }
    }

    async fn first_pass(&mut self) {
        let wanted = self.wanted().await;
        if self.listed.is_empty() {
            if wanted.is_empty() {
                warn!(
                    "dataplane: no interface named in the config and no default route yet; the interfaces of default routes get the XDP program as they appear"
                );
            } else {
                info!(interfaces = ?wanted, "dataplane: using the interfaces of the default routes");
            }
        }
        self.remove_unwanted_links(&wanted);
        for name in &wanted {
            if local_link(name).is_err() {
                warn!(iface = %name, "dataplane: interface not present; it gets the XDP program when it appears");
            }
        }
        self.converge(&wanted, When::Starting);
        if self.attached.is_empty() {
            warn!("no interface has the XDP program yet; the maps are kept ready for one");
        }
    }

    /// Removes lbagent's links in this namespace, in this layout's directory or another
    /// version's, to interfaces that are gone or no longer wanted.
    fn remove_unwanted_links(&self, wanted: &[String]) {
        let here = local_link("lo").map(|lo| lo.netns).ok();
        let others = self.pins.other_versions().unwrap_or_default();
        for layout in std::iter::once(self.pins.clone()).chain(others) {
            let links = match layout.pinned_xdp_links() {
                Ok(links) => links,
                Err(err) => {
                    error!(%err, "cannot list lbagent's XDP links");
                    continue;
                }
            };
            for link in links.into_iter().filter(|l| Some(l.netns) == here) {
                let name = nix::net::if_::if_indextoname(link.ifindex)
                    .ok()
                    .and_then(|n| n.into_string().ok());
                let reason = match &name {
                    None => "its interface is gone",
                    Some(name) if !wanted.contains(name) => "its interface is no longer wanted",
                    Some(_) => continue,
                };
                match forget(&layout, link) {
                    Ok(()) => {
                        info!(ifindex = link.ifindex, iface = ?name, "removed lbagent's XDP link: {reason}")
                    }
                    Err(err) => {
                        error!(ifindex = link.ifindex, %err, "cannot remove a stale XDP link")
                    }
                }
            }
        }
    }

    async fn follow(mut self, mut messages: Events) {
        let mut check = tokio::time::interval(PIN_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some((message, _)) = message else {
                        break;
                    };
                    if !relevant(&message.payload) {
                        continue;
                    }
                    // Let the burst finish, then look once.
                    let _ = tokio::time::timeout(SETTLE, async {
                        while messages.next().await.is_some() {}
                    })
                    .await;
                    let mut wanted = self.wanted().await;
                    if self.listed.is_empty() {
                        // Default routes: add, never take away while running (see the module doc).
                        wanted.extend(self.attached.keys().cloned());
                    }
                    self.converge(&wanted, When::Following);
                }
                _ = check.tick() => self.restore_pins(),
            }
        }
        error!("dataplane: the netlink event stream ended; interfaces are no longer followed");
    }

    /// Puts back the pins someone removed: the same maps first (the programs and the agent
    /// still use them; the next agent must find them, counters and all), then each link.
    fn restore_pins(&mut self) {
        if let Some(maps) = &self.maps {
            match maps.repin(&self.pins) {
                Ok(names) if names.is_empty() => {}
                Ok(names) => {
                    warn!(dir = %self.pins.dir().display(), maps = ?names, "the dataplane's map pins were removed from outside lbagent; pinned the same maps again")
                }
                Err(err) => {
                    error!(%err, "the dataplane's map pins were removed and cannot be restored")
                }
            }
        }
        let lost: Vec<(String, XdpLinkPin)> = self
            .attached
            .iter()
            .filter(|(_, link)| {
                !self.pins.xdp_link(**link).exists() || !self.pins.tc_link(**link).exists()
            })
            .map(|(name, link)| (name.clone(), *link))
            .collect();
        let mut reattach = Vec::new();
        for (name, link) in lost {
            if !self.held.holds(&self.pins, link) {
                if !self.pins.xdp_link(link).exists() {
                    warn!(iface = %name, "lbagent's XDP link pin was removed from outside lbagent; attaching the program again");
                    self.attached.remove(&name);
                    reattach.push(name);
                }
                continue;
            }
            match self.held.repin(&self.pins, link) {
                Ok(0) => {}
                Ok(_) => {
                    warn!(iface = %name, "lbagent's link pins were removed from outside lbagent; pinned the same links again (the program never left the interface)")
                }
                Err(err) => {
                    error!(iface = %name, %err, "lbagent's link pins were removed from outside lbagent and cannot be restored; attaching the program again");
                    self.held.release(&self.pins, link);
                    self.attached.remove(&name);
                    reattach.push(name);
                }
            }
        }
        if !reattach.is_empty() {
            self.converge(&reattach, When::Following);
        }
    }

    /// Drops what vanished, attaches what is wanted and present.
    fn converge(&mut self, wanted: &[String], when: When) {
        let current = |name: &str| local_link(name).ok();
        let gone: Vec<(String, XdpLinkPin)> = self
            .attached
            .iter()
            .filter(|(name, link)| current(name) != Some(**link))
            .map(|(name, link)| (name.clone(), *link))
            .collect();
        for (name, link) in gone {
            self.attached.remove(&name);
            self.held.release(&self.pins, link);
            match forget(&self.pins, link) {
                Ok(()) => {
                    info!(iface = %name, ifindex = link.ifindex, "interface vanished: its XDP link pins are removed")
                }
                Err(err) => {
                    error!(iface = %name, %err, "interface vanished, but its XDP link pins cannot be removed")
                }
            }
        }
        for name in wanted {
            let Some(link) = current(name) else {
                continue;
            };
            if self.attached.get(name) == Some(&link) || self.refused.get(name) == Some(&link) {
                continue;
            }
            match attach(&self.pins, name, self.mode) {
                Ok(done) => {
                    self.refused.remove(name);
                    self.refusals
                        .send_if_modified(|refused| refused.remove(name).is_some());
                    self.attached.insert(name.clone(), link);
                    self.held.hold(&self.pins, link);
                    if when == When::Following {
                        info!(iface = %name, mode = ?done.mode, "interface appeared: XDP program attached");
                    } else {
                        info!(iface = %name, mode = ?done.mode, replaced = done.replaced, "XDP program attached");
                    }
                }
                Err(err) => {
                    self.refused.insert(name.clone(), link);
                    let refusal = Refusal {
                        ifindex: link.ifindex,
                        reason: err.to_string(),
                    };
                    self.refusals.send_if_modified(|refused| {
                        refused.insert(name.clone(), refusal.clone()) != Some(refusal)
                    });
                    error!(iface = %name, %err, "XDP program not attached to this interface; continuing without it");
                }
            }
        }
    }
}

/// A link appearing, changing or going, or a default route changing.
fn relevant(payload: &NetlinkPayload<RouteNetlinkMessage>) -> bool {
    match payload {
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewLink(_) | RouteNetlinkMessage::DelLink(_),
        ) => true,
        NetlinkPayload::InnerMessage(
            RouteNetlinkMessage::NewRoute(route) | RouteNetlinkMessage::DelRoute(route),
        ) => is_default(route),
        _ => false,
    }
}

fn is_default(route: &RouteMessage) -> bool {
    route.header.destination_prefix_length == 0
}

/// The interfaces that carry the node's default routes (IPv4 and IPv6, main table): the ones
/// LB traffic arrives on when the config names none.
async fn default_route_interfaces(handle: &Handle) -> Result<Vec<String>, rtnetlink::Error> {
    let mut indexes = std::collections::BTreeSet::new();
    for query in [
        rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
        rtnetlink::RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
    ] {
        let routes: Vec<RouteMessage> = handle.route().get(query).execute().try_collect().await?;
        for route in routes {
            if route.header.destination_prefix_length != 0 || route.header.table != MAIN_TABLE {
                continue;
            }
            for attribute in &route.attributes {
                match attribute {
                    RouteAttribute::Oif(index) => {
                        indexes.insert(*index);
                    }
                    RouteAttribute::MultiPath(hops) => {
                        indexes.extend(hops.iter().map(|hop| hop.interface_index));
                    }
                    _ => {}
                }
            }
        }
    }
    let mut names = Vec::new();
    for index in indexes {
        let mut links = handle.link().get().match_index(index).execute();
        if let Ok(Some(link)) = links.try_next().await
            && let Some(name) = link_name(&link)
        {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}
