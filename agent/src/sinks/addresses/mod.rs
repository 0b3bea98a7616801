//! The address sink: the load-balancer interface (kube-lb0) and the addresses on it, through
//! rtnetlink. The only code that changes them.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
};

use futures::{StreamExt as _, TryStreamExt as _, stream};
use ipnet::IpNet;
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        address::{AddressAttribute, AddressMessage},
        link::{InfoKind, LinkAttribute, LinkFlags, LinkMessage},
    },
};
use tokio::sync::mpsc;
use tracing::warn;

pub mod netlink;
mod pass;
pub mod plan;

pub use self::pass::AddressReport;
use self::{
    netlink::{add_address, remove_address},
    pass::Expected,
    plan::{LinkState, Observed, Plan, RenamedLink},
};
use super::{errno, link_name, node_has_ipv6};

/// How many address requests are in flight at once: enough to keep the kernel busy, few
/// enough to stay well inside the socket's receive buffer for the acks.
const IN_FLIGHT: usize = 128;
/// Address changes applied between two looks for a newer desired state. The kernel takes
/// time linear in the addresses a link holds for each add (70-200 a second at 100,000), so a
/// batch lasts a few seconds at worst, and a newer state waits no longer than that.
const BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("listing {what}: {source}")]
    Dump {
        what: &'static str,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("creating {interface}: {source}")]
    CreateLink {
        interface: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("{interface} vanished while it was being set up")]
    LinkVanished { interface: String },
    #[error("bringing {interface} up: {source}")]
    SetUp {
        interface: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("{verb} {prefix} on {interface}: {source}")]
    Address {
        verb: &'static str,
        prefix: IpNet,
        interface: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("marking {interface} as lbagent's (its alias): {source}")]
    Mark {
        interface: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("deleting {interface}: {source}")]
    DeleteLink {
        interface: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
}

/// What an apply did, for logs and status.
#[derive(Debug, Default)]
struct Applied {
    pub created_link: Option<&'static str>,
    /// The interface the addresses went to.
    pub link_index: u32,
    pub added: usize,
    pub removed: usize,
    /// Changes that failed; the next reconcile tries them again.
    pub errors: Vec<AddressError>,
    /// Changes not tried because a newer desired state arrived: (whether an add, address).
    pub skipped: Vec<(bool, IpNet)>,
}

pub struct AddressSink {
    handle: Handle,
    interface: String,
    /// The alias lbagent gives its interface: it stays when the interface is renamed, so
    /// the renamed interface is still known as lbagent's.
    mark: String,
    /// Set once the kernel refused `dummy`, so the fallback is warned about once.
    no_dummy: AtomicBool,
    /// Wakes when netlink reports a change that could matter, once [`Self::notice_changes`]
    /// subscribed.
    kernel_changes: Option<mpsc::Receiver<()>>,
    /// What the last pass left in the kernel: anything different found later was changed by
    /// someone else, and putting it back is a repair.
    expected: Option<Expected>,
    /// The desired addresses its last pass applied in full, until it notices a change.
    settled: Option<std::collections::BTreeMap<std::net::IpAddr, crate::desired::AddressIntent>>,
    report: AddressReport,
}

impl AddressSink {
    /// Opens a netlink connection; must run inside a tokio runtime.
    pub fn connect(interface: &str) -> Result<Self, AddressError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(AddressError::Socket)?;
        tokio::spawn(connection);
        Ok(Self {
            handle,
            interface: interface.to_owned(),
            mark: format!("lbagent:{interface}"),
            no_dummy: AtomicBool::new(false),
            kernel_changes: None,
            expected: None,
            settled: None,
            report: AddressReport {
                interface: interface.to_owned(),
                ..AddressReport::default()
            },
        })
    }

    /// Subscribes to link and address changes: each message that could matter to the plan
    /// (any address change, or a change to the interface) makes the sink notice a drift.
    pub fn notice_changes(&mut self) -> Result<(), AddressError> {
        let (connection, _, mut messages) = rtnetlink::new_multicast_connection(&[
            MulticastGroup::Link,
            MulticastGroup::Ipv4Ifaddr,
            MulticastGroup::Ipv6Ifaddr,
        ])
        .map_err(AddressError::Socket)?;
        tokio::spawn(connection);
        let (tx, rx) = mpsc::channel(1);
        let (interface, mark) = (self.interface.clone(), self.mark.clone());
        tokio::spawn(async move {
            while let Some((message, _)) = messages.next().await {
                let relevant = match message.payload {
                    NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewAddress(_) | RouteNetlinkMessage::DelAddress(_),
                    ) => true,
                    NetlinkPayload::InnerMessage(
                        RouteNetlinkMessage::NewLink(link) | RouteNetlinkMessage::DelLink(link),
                    ) => {
                        link_name(&link) == Some(interface.as_str())
                            || link_alias(&link) == Some(mark.as_str())
                    }
                    _ => false,
                };
                // A full channel already holds a wake-up: nothing is lost by dropping this one.
                if relevant && tx.try_send(()).is_err() && tx.is_closed() {
                    return;
                }
            }
        });
        self.kernel_changes = Some(rx);
        Ok(())
    }

    pub async fn observe(&self) -> Result<Observed, AddressError> {
        let links: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(dump_failed("links"))?;
        let mut observed = Observed {
            ipv6: node_has_ipv6(),
            ..Observed::default()
        };
        // Interfaces whose subnets make an address local.
        let mut up = std::collections::BTreeSet::new();
        for link in &links {
            let index = link.header.index;
            let name = link_name(link);
            let is_up = link.header.flags.contains(LinkFlags::Up);
            if name == Some(self.interface.as_str()) {
                observed.link = Some(LinkState {
                    index,
                    up: is_up,
                    marked: link_alias(link) == Some(self.mark.as_str()),
                });
            } else if link_alias(link) == Some(self.mark.as_str()) {
                observed.renamed.push(RenamedLink {
                    index,
                    name: name.unwrap_or_default().to_owned(),
                });
            } else if is_up {
                up.insert(index);
            }
        }
        let link = observed.link;
        let mut addresses = self.handle.address().get().execute();
        while let Some(message) = addresses
            .try_next()
            .await
            .map_err(dump_failed("addresses"))?
        {
            let Some(net) = address_of(&message) else {
                continue;
            };
            if Some(message.header.index) == link.map(|l| l.index) {
                if !is_ipv6_link_local(&net.addr()) {
                    observed.addresses.insert(net);
                }
            } else if up.contains(&message.header.index)
                && net.prefix_len() < net.max_prefix_len()
                && !is_ipv6_link_local(&net.addr())
            {
                observed.node_prefixes.push(net.trunc());
            }
        }
        observed.node_prefixes.sort_unstable();
        observed.node_prefixes.dedup();
        Ok(observed)
    }

    /// The node's first global IPv4 address outside the load-balancer interface and `lo`, by
    /// interface index: the default BIRD router id.
    pub async fn node_ipv4(&self) -> Result<Option<std::net::Ipv4Addr>, AddressError> {
        let lb = self.link().await?.map(|l| l.header.index);
        let messages: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(dump_failed("addresses"))?;
        let mut candidates: Vec<(u32, std::net::Ipv4Addr)> = messages
            .iter()
            .filter(|m| Some(m.header.index) != lb)
            .filter_map(|m| match address_of(m)?.addr() {
                IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_link_local() => {
                    Some((m.header.index, v4))
                }
                _ => None,
            })
            .collect();
        candidates.sort_unstable();
        Ok(candidates.first().map(|(_, v4)| *v4))
    }

    /// Applies `plan`. Address changes are independent: one that fails is reported and the
    /// rest still go in. Failing to create the interface stops the apply.
    async fn apply_plan(
        &self,
        plan: &Plan,
        observed: &Observed,
        superseded: &dyn Fn() -> bool,
    ) -> Result<Applied, AddressError> {
        let mut applied = Applied::default();
        applied.link_index = if plan.create_link {
            let kind = self.create_link().await?;
            applied.created_link = Some(kind);
            self.link_index().await?
        } else {
            let link = observed.link.ok_or_else(|| AddressError::LinkVanished {
                interface: self.interface.clone(),
            })?;
            if plan.set_up {
                self.handle
                    .link()
                    .set(LinkUnspec::new_with_index(link.index).up().build())
                    .execute()
                    .await
                    .map_err(|source| AddressError::SetUp {
                        interface: self.interface.clone(),
                        source: Box::new(source),
                    })?;
            }
            link.index
        };
        let index = applied.link_index;
        // The kernel takes no alias when it creates a link: it is set right after.
        if (plan.create_link || plan.mark_link)
            && let Err(err) = self.mark(index).await
        {
            applied.errors.push(err);
        }

        let changes: Vec<(bool, IpNet)> = (plan.remove.iter().map(|net| (false, *net)))
            .chain(plan.add.iter().map(|net| (true, *net)))
            .collect();
        for (n, batch) in changes.chunks(BATCH).enumerate() {
            if n > 0 && superseded() {
                applied.skipped = changes[n * BATCH..].to_vec();
                break;
            }
            let results: Vec<_> = stream::iter(batch.iter().map(|(add, net)| async move {
                if *add {
                    self.add(index, *net).await
                } else {
                    self.remove(index, *net).await
                }
            }))
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
            for result in results {
                match result {
                    Ok(Change::Added) => applied.added += 1,
                    Ok(Change::Removed) => applied.removed += 1,
                    Err(err) => applied.errors.push(err),
                }
            }
        }
        // Only now that the addresses are back where they belong: until then the renamed
        // interface may still be what answers for them.
        for renamed in &plan.delete_renamed {
            if let Err(source) = self.handle.link().del(renamed.index).execute().await
                && errno(&source) != Some(libc::ENODEV)
            {
                applied.errors.push(AddressError::DeleteLink {
                    interface: renamed.name.clone(),
                    source: Box::new(source),
                });
            }
        }
        Ok(applied)
    }

    /// Gives the interface lbagent's mark.
    async fn mark(&self, index: u32) -> Result<(), AddressError> {
        let mut message = LinkUnspec::new_with_index(index).build();
        message
            .attributes
            .push(LinkAttribute::IfAlias(self.mark.clone()));
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|source| AddressError::Mark {
                interface: self.interface.clone(),
                source: Box::new(source),
            })
    }

    /// Deletes the interface and with it every address on it. `false` if it did not exist.
    pub async fn delete_link(&self) -> Result<bool, AddressError> {
        let observed = self.observe().await?;
        let Some(link) = observed.link else {
            return Ok(false);
        };
        self.handle
            .link()
            .del(link.index)
            .execute()
            .await
            .map_err(|source| AddressError::DeleteLink {
                interface: self.interface.clone(),
                source: Box::new(source),
            })?;
        Ok(true)
    }

    /// Creates the interface, up. Prefers `dummy`; a kernel built without it gets `ifb`,
    /// which routes the same way (NOARP, no IPv6 DAD, up with carrier).
    async fn create_link(&self) -> Result<&'static str, AddressError> {
        let build = |kind| {
            LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(kind)
                .name(self.interface.clone())
                .up()
                .build()
        };
        if !self.no_dummy.load(Ordering::Relaxed) {
            match self
                .handle
                .link()
                .add(build(InfoKind::Dummy))
                .execute()
                .await
            {
                Ok(()) => return Ok("dummy"),
                Err(err) if errno(&err) == Some(libc::EOPNOTSUPP) => {
                    self.no_dummy.store(true, Ordering::Relaxed);
                    warn!(
                        interface = %self.interface,
                        "this kernel has no dummy interfaces (CONFIG_DUMMY); using ifb, which routes the same"
                    );
                }
                Err(source) => {
                    return Err(AddressError::CreateLink {
                        interface: self.interface.clone(),
                        source: Box::new(source),
                    });
                }
            }
        }
        self.handle
            .link()
            .add(build(InfoKind::Ifb))
            .execute()
            .await
            .map_err(|source| AddressError::CreateLink {
                interface: self.interface.clone(),
                source: Box::new(source),
            })?;
        Ok("ifb")
    }

    async fn link_index(&self) -> Result<u32, AddressError> {
        match self.link().await? {
            Some(link) => Ok(link.header.index),
            None => Err(AddressError::LinkVanished {
                interface: self.interface.clone(),
            }),
        }
    }

    /// The interface, asked for by name: cheaper than listing every link on a busy node.
    async fn link(&self) -> Result<Option<LinkMessage>, AddressError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(self.interface.clone())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link),
            Err(err) if errno(&err) == Some(libc::ENODEV) => Ok(None),
            Err(source) => Err(dump_failed("links")(source)),
        }
    }

    async fn add(&self, index: u32, net: IpNet) -> Result<Change, AddressError> {
        add_address(&self.handle, index, net)
            .await
            .map(|()| Change::Added)
            .map_err(|source| self.address_error("adding", net, source))
    }

    async fn remove(&self, index: u32, net: IpNet) -> Result<Change, AddressError> {
        remove_address(&self.handle, index, net)
            .await
            .map(|()| Change::Removed)
            .map_err(|source| self.address_error("removing", net, source))
    }

    fn address_error(
        &self,
        verb: &'static str,
        prefix: IpNet,
        source: rtnetlink::Error,
    ) -> AddressError {
        AddressError::Address {
            verb,
            prefix,
            interface: self.interface.clone(),
            source: Box::new(source),
        }
    }
}

enum Change {
    Added,
    Removed,
}

fn dump_failed(what: &'static str) -> impl FnOnce(rtnetlink::Error) -> AddressError {
    move |source| AddressError::Dump {
        what,
        source: Box::new(source),
    }
}

fn link_alias(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|attr| match attr {
        LinkAttribute::IfAlias(alias) => Some(alias.as_str()),
        _ => None,
    })
}
/// The interface's own address with its prefix length. For IPv4, IFA_LOCAL is the local
/// address (IFA_ADDRESS is the peer on point-to-point links).
fn address_of(message: &AddressMessage) -> Option<IpNet> {
    let local = message.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    let address = message.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    });
    IpNet::new(local.or(address)?, message.header.prefix_len).ok()
}

fn is_ipv6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
}
