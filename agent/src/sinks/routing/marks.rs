//! Per-Service BGP attributes, carried to BIRD through the kernel: each kube-lb0 address whose
//! Services set attributes gets a route in a table of its own (`routing.serviceAttributes.
//! kernelTable`, which no rule looks up, so nothing forwards by it), with the metric naming its
//! set of attributes. BIRD learns that table (`protocol kernel ... learn`) and prefers those
//! routes to the direct ones; the export filters map each metric to its attributes.
//!
//! So the BIRD config names attribute sets, never addresses: an address added to or removed
//! from a Service is a route in that table and reaches the router without a reload. Only a set
//! of attributes no filter knows yet changes the config, and a filter change re-exports the
//! routes without resetting a session.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::TryStreamExt as _;
use rtnetlink::{
    Handle,
    packet_route::{
        address::AddressAttribute,
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
    },
};

use crate::desired::{BgpAttributes, Desired};

/// The BIRD protocols that learn the marks table, one per family.
pub const MARKS4: &str = "lbagent_marks4";
pub const MARKS6: &str = "lbagent_marks6";
/// Above the direct protocol's 240: where a mark exists, BIRD exports it instead.
pub const PREFERENCE: u32 = 245;
/// The routing protocol number lbagent's marks carry (unassigned in iproute2's rt_protos):
/// lbagent reads and removes only these, whatever else someone puts in the table.
pub const PROTOCOL: u8 = 211;

/// Each set of attributes in use and its id, which is the metric of its addresses' routes.
pub type AttributeSets = BTreeMap<BgpAttributes, u32>;

/// The routes in the marks table: each address and the metrics it has there.
pub type Marks = BTreeMap<IpAddr, BTreeSet<u32>>;

/// What the marks table and the attribute sets become on this pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MarkPlan {
    /// The sets the BIRD config maps; unchanged unless a set it does not know is wanted.
    pub sets: AttributeSets,
    /// Every mark wanted: each address and its set's id.
    pub wanted: BTreeMap<IpAddr, u32>,
    pub add: Vec<(IpAddr, u32)>,
    pub remove: Vec<(IpAddr, u32)>,
}

/// The attributes each address on kube-lb0 carries: those of every Service that wants it
/// (their communities together, the longest prepend). Addresses not on kube-lb0 (local ones,
/// or not added yet) get no mark: a mark is a route BIRD would advertise.
pub fn wanted(
    desired: &Desired,
    on_interface: &BTreeSet<IpAddr>,
) -> BTreeMap<IpAddr, BgpAttributes> {
    let mut wanted = BTreeMap::new();
    for (address, intent) in &desired.addresses {
        if !on_interface.contains(address) {
            continue;
        }
        let mut attributes = BgpAttributes::default();
        for service in intent.keys() {
            if let Some(set) = desired.service_attributes.get(service) {
                attributes.merge(set);
            }
        }
        if !attributes.is_empty() {
            wanted.insert(*address, attributes);
        }
    }
    wanted
}

/// Pure: the ids and the route changes that give each wanted address its set's metric.
///
/// Ids stay put while their set is in use. Sets no longer used keep their ids (dropping them
/// would change the config, and an address removal must not reload BIRD) until a new set needs
/// a config change anyway; then they are dropped and the new set takes the lowest free id.
pub fn plan(
    wanted: &BTreeMap<IpAddr, BgpAttributes>,
    previous: &AttributeSets,
    observed: &Marks,
) -> MarkPlan {
    let in_use: BTreeSet<&BgpAttributes> = wanted.values().collect();
    let sets = if in_use.iter().all(|set| previous.contains_key(*set)) {
        previous.clone()
    } else {
        let mut sets: AttributeSets = previous
            .iter()
            .filter(|(set, _)| in_use.contains(set))
            .map(|(set, id)| (set.clone(), *id))
            .collect();
        let mut taken: BTreeSet<u32> = sets.values().copied().collect();
        for set in in_use {
            if !sets.contains_key(set) {
                let id = (1..).find(|id| !taken.contains(id)).unwrap_or(u32::MAX);
                taken.insert(id);
                sets.insert(set.clone(), id);
            }
        }
        sets
    };
    let mut plan = MarkPlan {
        sets,
        ..MarkPlan::default()
    };
    for (address, attributes) in wanted {
        let id = plan.sets[attributes];
        plan.wanted.insert(*address, id);
        let have = observed.get(address);
        if !have.is_some_and(|metrics| metrics.contains(&id)) {
            plan.add.push((*address, id));
        }
        for metric in have.into_iter().flatten().filter(|m| **m != id) {
            plan.remove.push((*address, *metric));
        }
    }
    for (address, metrics) in observed {
        if !wanted.contains_key(address) {
            plan.remove
                .extend(metrics.iter().map(|metric| (*address, *metric)));
        }
    }
    plan
}

/// Pure: splits `plan` into what can change now and what must wait until BIRD runs the config
/// that maps `plan.sets`. BIRD exports an address's lowest mark through the config it runs: a
/// new mark whose id means another set there (or none, for a set it does not know yet) would
/// go out with the wrong attributes, or without any. Such a mark waits, and so does the removal
/// of the same address's old mark, which keeps it exported as before meanwhile. `running`: the
/// sets of the config BIRD runs.
pub fn until_reloaded(plan: &MarkPlan, running: &AttributeSets) -> (MarkPlan, MarkPlan) {
    let waits = |id: u32| meaning(&plan.sets, id) != meaning(running, id);
    let held: BTreeSet<IpAddr> = plan
        .add
        .iter()
        .filter(|(_, id)| waits(*id))
        .map(|(address, _)| *address)
        .collect();
    let (later_add, now_add) = plan
        .add
        .iter()
        .partition(|(address, _)| held.contains(address));
    let (later_remove, now_remove) = plan
        .remove
        .iter()
        .partition(|(address, _)| held.contains(address));
    let now = MarkPlan {
        add: now_add,
        remove: now_remove,
        ..plan.clone()
    };
    let later = MarkPlan {
        add: later_add,
        remove: later_remove,
        ..plan.clone()
    };
    (now, later)
}

/// The set that `id` stands for in `sets`.
fn meaning(sets: &AttributeSets, id: u32) -> Option<&BgpAttributes> {
    sets.iter().find(|(_, i)| **i == id).map(|(set, _)| set)
}

/// lbagent's host routes in `table`, with their metrics.
pub async fn read(handle: &Handle, table: u32) -> Result<Marks, rtnetlink::Error> {
    let mut marks = Marks::new();
    // On a socket with strict checking the kernel sends only this table's routes of lbagent's
    // protocol, not the local routes of every address on kube-lb0; elsewhere it sends every
    // route, and the filter below keeps the same ones.
    for query in [
        rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(table)
            .protocol(RouteProtocol::Other(PROTOCOL))
            .build(),
        rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new()
            .table_id(table)
            .protocol(RouteProtocol::Other(PROTOCOL))
            .build(),
    ] {
        let routes: Vec<RouteMessage> = handle.route().get(query).execute().try_collect().await?;
        for route in routes {
            if table_of(&route) != table || route.header.protocol != RouteProtocol::Other(PROTOCOL)
            {
                continue;
            }
            let mut destination = None;
            let mut metric = 0;
            for attribute in &route.attributes {
                match attribute {
                    RouteAttribute::Destination(RouteAddress::Inet(v4)) => {
                        destination = Some(IpAddr::V4(*v4))
                    }
                    RouteAttribute::Destination(RouteAddress::Inet6(v6)) => {
                        destination = Some(IpAddr::V6(*v6))
                    }
                    RouteAttribute::Priority(priority) => metric = *priority,
                    _ => {}
                }
            }
            let host = match destination {
                Some(IpAddr::V4(_)) => 32,
                _ => 128,
            };
            if let Some(address) = destination
                && route.header.destination_prefix_length == host
            {
                marks.entry(address).or_default().insert(metric);
            }
        }
    }
    Ok(marks)
}

fn table_of(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(table) => Some(*table),
            _ => None,
        })
        .unwrap_or(route.header.table.into())
}

/// The addresses on the interface with index `index`.
pub async fn addresses_on(
    handle: &Handle,
    index: u32,
) -> Result<BTreeSet<IpAddr>, rtnetlink::Error> {
    let mut found = BTreeSet::new();
    let mut request = handle.address().get().set_link_index_filter(index);
    // Filtered by the kernel on a socket with strict checking; by the filter here elsewhere.
    request.message_mut().header.index = index;
    let mut dump = request.execute();
    loop {
        let message = match dump.try_next().await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            // Filtered by the kernel, a dump of an interface that has just gone fails: it
            // holds no addresses.
            Err(err) if crate::sinks::errno(&err) == Some(libc::ENODEV) => break,
            Err(err) => return Err(err),
        };
        if message.header.index != index {
            continue;
        }
        for attribute in &message.attributes {
            if let AddressAttribute::Address(address) = attribute {
                found.insert(*address);
            }
        }
    }
    Ok(found)
}

/// `None` only if the builder refused a host address with its own length, which it does not.
fn route(address: IpAddr, metric: u32, table: u32, index: u32) -> Option<RouteMessage> {
    let host = if address.is_ipv4() { 32 } else { 128 };
    Some(
        rtnetlink::RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(address, host)
            .ok()?
            .output_interface(index)
            .table_id(table)
            .priority(metric)
            .protocol(RouteProtocol::Other(PROTOCOL))
            .scope(RouteScope::Link)
            .build(),
    )
}

/// Makes the plan's route changes; returns what failed (the next pass retries it).
pub async fn apply(handle: &Handle, table: u32, index: u32, plan: &MarkPlan) -> Vec<String> {
    let mut errors = Vec::new();
    // New marks first: while an address moves to another set, BIRD keeps a mark to export.
    for (address, metric) in &plan.add {
        let Some(message) = route(*address, *metric, table, index) else {
            continue;
        };
        if let Err(err) = handle.route().add(message).replace().execute().await {
            errors.push(format!(
                "marking {address} (table {table}, metric {metric}): {err}"
            ));
        }
    }
    for (address, metric) in &plan.remove {
        let Some(message) = route(*address, *metric, table, index) else {
            continue;
        };
        if let Err(err) = handle.route().del(message).execute().await {
            errors.push(format!(
                "unmarking {address} (table {table}, metric {metric}): {err}"
            ));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(community: u16, prepend: u8) -> BgpAttributes {
        BgpAttributes {
            communities: [(64512, community)].into(),
            prepend,
            ..BgpAttributes::default()
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn each_set_gets_an_id_that_stays_while_it_is_used() {
        let a = set(1, 0);
        let b = set(2, 2);
        let wanted = BTreeMap::from([(ip("192.0.2.1"), a.clone()), (ip("192.0.2.2"), b.clone())]);
        let first = plan(&wanted, &AttributeSets::new(), &Marks::new());
        assert_eq!(
            first.sets,
            AttributeSets::from([(a.clone(), 1), (b.clone(), 2)])
        );
        assert_eq!(first.add, [(ip("192.0.2.1"), 1), (ip("192.0.2.2"), 2)]);
        assert!(first.remove.is_empty());

        // Nothing to do once the table holds it.
        let observed = Marks::from([(ip("192.0.2.1"), [1].into()), (ip("192.0.2.2"), [2].into())]);
        let again = plan(&wanted, &first.sets, &observed);
        assert_eq!((again.add.len(), again.remove.len()), (0, 0));
        assert_eq!(again.sets, first.sets);

        // An address of set b goes: its route goes, the ids (and so the config) stay.
        let fewer = BTreeMap::from([(ip("192.0.2.1"), a.clone())]);
        let removed = plan(&fewer, &first.sets, &observed);
        assert_eq!(removed.sets, first.sets);
        assert_eq!(removed.remove, [(ip("192.0.2.2"), 2)]);

        // A new address of a known set: a route, no new id.
        let more = BTreeMap::from([(ip("192.0.2.1"), a.clone()), (ip("192.0.2.3"), a.clone())]);
        assert_eq!(plan(&more, &first.sets, &observed).sets, first.sets);

        // A new set while b is unused: b's id is dropped and reused.
        let c = set(3, 0);
        let changed = BTreeMap::from([(ip("192.0.2.1"), a.clone()), (ip("192.0.2.2"), c.clone())]);
        let next = plan(&changed, &first.sets, &observed);
        assert_eq!(next.sets, AttributeSets::from([(a, 1), (c, 2)]));
        // Same metric, other meaning: the route stays, and the config maps 2 to c now.
        assert!(next.add.is_empty() && next.remove.is_empty(), "{next:?}");
    }

    #[test]
    fn an_address_moving_to_another_set_gets_the_new_mark_before_losing_the_old() {
        let a = set(1, 0);
        let b = set(2, 0);
        let previous = AttributeSets::from([(a.clone(), 1), (b.clone(), 2)]);
        let observed = Marks::from([(ip("2001:db8::1"), [1].into())]);
        let moved = plan(
            &BTreeMap::from([(ip("2001:db8::1"), b)]),
            &previous,
            &observed,
        );
        assert_eq!(moved.add, [(ip("2001:db8::1"), 2)]);
        assert_eq!(moved.remove, [(ip("2001:db8::1"), 1)]);
        // Unmarked: every route of the address goes.
        let gone = plan(&BTreeMap::new(), &previous, &observed);
        assert_eq!(gone.remove, [(ip("2001:db8::1"), 1)]);
    }

    #[test]
    fn a_mark_whose_id_bird_does_not_run_yet_waits_with_its_addresses_old_one() {
        let a = set(1, 0);
        let b = set(2, 0);
        let c = set(3, 0);
        let running = AttributeSets::from([(a.clone(), 1), (b.clone(), 2)]);
        // 192.0.2.1 moves from a to c (a new set: id 3), 192.0.2.2 from a to b (known),
        // 192.0.2.3 is new in b, 192.0.2.4 loses its attributes.
        let observed = Marks::from([
            (ip("192.0.2.1"), [1].into()),
            (ip("192.0.2.2"), [1].into()),
            (ip("192.0.2.4"), [2].into()),
        ]);
        let wanted = BTreeMap::from([
            (ip("192.0.2.1"), c.clone()),
            (ip("192.0.2.2"), b.clone()),
            (ip("192.0.2.3"), b.clone()),
            (ip("192.0.2.5"), a.clone()),
        ]);
        let moved = plan(&wanted, &running, &observed);
        assert_eq!(
            moved.sets,
            AttributeSets::from([(a.clone(), 1), (b.clone(), 2), (c.clone(), 3)])
        );
        let (now, later) = until_reloaded(&moved, &running);
        assert_eq!(
            now.add,
            [
                (ip("192.0.2.2"), 2),
                (ip("192.0.2.3"), 2),
                (ip("192.0.2.5"), 1)
            ]
        );
        assert_eq!(now.remove, [(ip("192.0.2.2"), 1), (ip("192.0.2.4"), 2)]);
        assert_eq!(later.add, [(ip("192.0.2.1"), 3)]);
        assert_eq!(
            later.remove,
            [(ip("192.0.2.1"), 1)],
            "keeps a till c is known"
        );
        assert_eq!(
            (now.sets.clone(), later.sets.clone()),
            (moved.sets.clone(), moved.sets.clone())
        );

        // Once BIRD runs the new config, nothing waits.
        let (now, later) = until_reloaded(&moved, &moved.sets);
        assert_eq!(
            (now.add, now.remove),
            (moved.add.clone(), moved.remove.clone())
        );
        assert!(later.add.is_empty() && later.remove.is_empty());

        // An id that BIRD's config gives another set waits too: b is dropped, c reuses id 2.
        let reused = plan(
            &BTreeMap::from([(ip("192.0.2.1"), a.clone()), (ip("192.0.2.2"), c.clone())]),
            &running,
            &Marks::from([(ip("192.0.2.1"), [1].into()), (ip("192.0.2.2"), [1].into())]),
        );
        assert_eq!(reused.sets, AttributeSets::from([(a, 1), (c, 2)]));
        let (now, later) = until_reloaded(&reused, &running);
        assert!(now.add.is_empty() && now.remove.is_empty(), "{now:?}");
        assert_eq!(
            (later.add, later.remove),
            (vec![(ip("192.0.2.2"), 2)], vec![(ip("192.0.2.2"), 1)])
        );
    }
}
