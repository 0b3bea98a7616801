//! The node's default gateways, read from the kernel (main table) through rtnetlink and
//! followed as they change: the peers of a `neighbor: gateway` entry.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    Handle, MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol},
    },
};
use tokio::sync::mpsc;

use super::model::Family;
use crate::sinks::link_name;

const MAIN_TABLE: u8 = 254;

/// One next hop of a default route: its address, and the interface it is reached through
/// (BIRD needs that for an IPv6 link-local neighbour).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Gateway {
    pub address: IpAddr,
    pub interface: Option<String>,
}

/// Every default route's next hops, by family; a family without a default route is absent.
pub type Gateways = BTreeMap<Family, BTreeSet<Gateway>>;

/// Reads the main table's default routes, both families.
pub async fn read(handle: &Handle) -> Result<Gateways, rtnetlink::Error> {
    let mut found: BTreeMap<Family, BTreeSet<(IpAddr, u32)>> = BTreeMap::new();
    // On a socket with strict checking the kernel sends only the main table's unicast routes
    // (of any protocol), not the local routes of every address on kube-lb0.
    for (family, query) in [
        (
            Family::Ipv4,
            rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
                .protocol(RouteProtocol::Unspec)
                .build(),
        ),
        (
            Family::Ipv6,
            rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new()
                .protocol(RouteProtocol::Unspec)
                .build(),
        ),
    ] {
        let routes: Vec<RouteMessage> = handle.route().get(query).execute().try_collect().await?;
        for route in routes {
            if route.header.destination_prefix_length != 0 || route.header.table != MAIN_TABLE {
                continue;
            }
            let mut oif = 0;
            let mut gateway = None;
            for attribute in &route.attributes {
                match attribute {
                    RouteAttribute::Oif(index) => oif = *index,
                    RouteAttribute::Gateway(address) => gateway = ip(address),
                    RouteAttribute::MultiPath(hops) => {
                        for hop in hops {
                            if let Some(address) = hop.attributes.iter().find_map(|a| match a {
                                RouteAttribute::Gateway(address) => ip(address),
                                _ => None,
                            }) {
                                found
                                    .entry(family)
                                    .or_default()
                                    .insert((address, hop.interface_index));
                            }
                        }
                    }
                    _ => {}
                }
            }
            if let Some(address) = gateway {
                found.entry(family).or_default().insert((address, oif));
            }
        }
    }
    let mut gateways = Gateways::new();
    for (family, hops) in found {
        for (address, index) in hops {
            // Only a link-local next hop needs its interface named.
            let interface = match address {
                IpAddr::V6(v6) if v6.is_unicast_link_local() => name_of(handle, index).await,
                _ => None,
            };
            gateways
                .entry(family)
                .or_default()
                .insert(Gateway { address, interface });
        }
    }
    Ok(gateways)
}

fn ip(address: &RouteAddress) -> Option<IpAddr> {
    match address {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

async fn name_of(handle: &Handle, index: u32) -> Option<String> {
    let mut links = handle.link().get().match_index(index).execute();
    match links.try_next().await {
        Ok(Some(link)) => link_name(&link).map(str::to_owned),
        _ => None,
    }
}

/// Subscribes to route changes: each change to a default route wakes the receiver.
pub fn follow() -> std::io::Result<mpsc::Receiver<()>> {
    let (connection, _, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv6Route,
    ])?;
    tokio::spawn(connection);
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            let relevant = matches!(
                &message.payload,
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewRoute(route) | RouteNetlinkMessage::DelRoute(route),
                ) if route.header.destination_prefix_length == 0
            );
            // A full channel already holds a wake-up: nothing is lost by dropping this one.
            if relevant && tx.try_send(()).is_err() && tx.is_closed() {
                return;
            }
        }
    });
    Ok(rx)
}

/// The index of the interface named `name`, if there is one.
pub async fn index_of(handle: &Handle, name: &str) -> Result<Option<u32>, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link.map(|link| link.header.index)),
        Err(err) if crate::sinks::errno(&err) == Some(libc::ENODEV) => Ok(None),
        Err(err) => Err(err),
    }
}
