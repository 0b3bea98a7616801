//! What the neighbour map must hold: for each local address, whether this node answers
//! (and from which interface) or stays silent. A pure function of the local addresses, the
//! live members and what the map holds.

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use serde::Serialize;

use super::election::{self, Endpoints, NodeView};
use crate::dataplane::Role;

/// One of this node's interfaces, as far as answering goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub prefixes: Vec<IpNet>,
}

/// What the sink observed: the map's entries and the node's interfaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub roles: BTreeMap<IpAddr, Role>,
    pub links: Vec<Link>,
}

/// Who holds one local address: the live candidates in order, the owner first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Election {
    pub address: IpAddr,
    pub candidates: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Entries to write (new ones, or a changed role).
    pub set: BTreeMap<IpAddr, Role>,
    /// Entries of addresses that are no longer local LB addresses.
    pub remove: Vec<IpAddr>,
    /// Addresses this node starts answering for: announce them.
    pub taken: Vec<IpAddr>,
    /// Addresses this node stops answering for.
    pub released: Vec<IpAddr>,
    /// Every local address with its candidates.
    pub elections: Vec<Election>,
    /// Addresses this node won but has no interface in the subnet of (it stays silent).
    pub no_interface: Vec<IpAddr>,
}

impl Plan {
    pub fn changes_nothing(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// `addresses`: every LB address this node serves; `members`: the live nodes (this one
/// included). The addresses inside a member's subnet are local (L2) addresses. Each gets an
/// entry even when this node has no interface in its subnet (its link is down, say, and the
/// address went onto the LB interface): the kernel answers ARP for any address it holds, on
/// any interface, and only the program's silence keeps it from answering for another
/// node's address.
pub fn plan(node: &str, addresses: &[IpAddr], members: &[NodeView], observed: &Observed) -> Plan {
    let mut plan = Plan::default();
    let local: Vec<IpAddr> = addresses
        .iter()
        .filter(|address| {
            members
                .iter()
                .any(|m| m.subnets.iter().any(|s| s.contains(*address)))
        })
        .copied()
        .collect();
    for address in &local {
        let candidates = election::candidates(*address, members, Endpoints::Anywhere);
        let owner = candidates.first().map(|n| n.name.as_str());
        let role = if owner == Some(node) {
            match observed
                .links
                .iter()
                .find(|link| link.prefixes.iter().any(|p| p.contains(address)))
            {
                Some(link) => Role::Answer {
                    ifindex: link.ifindex,
                    mac: link.mac,
                },
                None => {
                    plan.no_interface.push(*address);
                    Role::Silent
                }
            }
        } else {
            Role::Silent
        };
        let before = observed.roles.get(address);
        if before != Some(&role) {
            plan.set.insert(*address, role);
            match (before, role) {
                (_, Role::Answer { .. }) => plan.taken.push(*address),
                (Some(Role::Answer { .. }), Role::Silent) => plan.released.push(*address),
                _ => {}
            }
        }
        plan.elections.push(Election {
            address: *address,
            candidates: candidates.iter().map(|n| n.name.clone()).collect(),
        });
    }
    plan.remove = observed
        .roles
        .keys()
        .filter(|address| !local.contains(address))
        .copied()
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBNET: &str = "10.0.0.0/24";

    fn members(names: &[&str]) -> Vec<NodeView> {
        names
            .iter()
            .map(|name| NodeView {
                name: (*name).to_owned(),
                subnets: vec![SUBNET.parse().unwrap(), "fd00::/64".parse().unwrap()],
                excluded: false,
                alive: true,
            })
            .collect()
    }

    fn observed(roles: BTreeMap<IpAddr, Role>) -> Observed {
        Observed {
            roles,
            links: vec![Link {
                ifindex: 2,
                mac: [2, 0, 0, 0, 0, 1],
                prefixes: vec![SUBNET.parse().unwrap(), "fd00::/64".parse().unwrap()],
            }],
        }
    }

    fn addresses(n: u8) -> Vec<IpAddr> {
        (1..=n)
            .map(|i| IpAddr::from([10, 0, 0, 100 + i]))
            .chain(std::iter::once("fd00::100".parse().unwrap()))
            .collect()
    }

    #[test]
    fn exactly_one_node_answers_for_each_address() {
        let names = ["node-a", "node-b", "node-c"];
        let view = members(&names);
        let local = addresses(30);
        let mut answering: BTreeMap<IpAddr, Vec<&str>> = BTreeMap::new();
        for node in names {
            let plan = plan(node, &local, &view, &observed(BTreeMap::new()));
            assert_eq!(plan.set.len(), local.len(), "every address gets an entry");
            for (address, role) in &plan.set {
                if matches!(role, Role::Answer { .. }) {
                    answering.entry(*address).or_default().push(node);
                }
            }
        }
        assert_eq!(answering.len(), local.len());
        assert!(
            answering.values().all(|nodes| nodes.len() == 1),
            "{answering:?}"
        );
        // Spread: no node got everything.
        for node in names {
            let owned = answering.values().filter(|n| n[0] == node).count();
            assert!(owned > 0 && owned < local.len(), "{node}: {owned}");
        }
    }

    #[test]
    fn an_unchanged_map_needs_nothing_and_a_dead_owner_moves_its_addresses() {
        let local = addresses(10);
        let view = members(&["node-a", "node-b"]);
        let first = plan("node-b", &local, &view, &observed(BTreeMap::new()));
        let applied = observed(first.set.clone());
        let again = plan("node-b", &local, &view, &applied);
        assert!(again.changes_nothing(), "{again:?}");
        assert!(again.taken.is_empty());
        // node-a dies: node-b takes exactly what node-a held, and announces it.
        let alone = members(&["node-b"]);
        let after = plan("node-b", &local, &alone, &applied);
        let held_by_a: Vec<IpAddr> = first
            .set
            .iter()
            .filter(|(_, role)| **role == Role::Silent)
            .map(|(address, _)| *address)
            .collect();
        assert!(!held_by_a.is_empty());
        assert_eq!(after.taken, held_by_a);
        assert!(after.released.is_empty());
        assert!(
            after
                .set
                .values()
                .all(|r| matches!(r, Role::Answer { ifindex: 2, .. }))
        );
    }

    #[test]
    fn a_returning_owner_is_handed_its_addresses_back() {
        let local = addresses(10);
        let alone = plan(
            "node-b",
            &local,
            &members(&["node-b"]),
            &observed(BTreeMap::new()),
        );
        let applied = observed(alone.set.clone());
        let back = plan("node-b", &local, &members(&["node-a", "node-b"]), &applied);
        assert!(!back.released.is_empty());
        assert!(back.taken.is_empty());
        assert!(back.released.iter().all(|a| back.set[a] == Role::Silent));
    }

    #[test]
    fn addresses_no_longer_local_are_removed() {
        let view = members(&["node-a"]);
        let all = addresses(3);
        let applied = observed(plan("node-a", &all, &view, &observed(BTreeMap::new())).set);
        let fewer = plan("node-a", &all[1..], &view, &applied);
        assert_eq!(fewer.remove, vec![all[0]]);
        assert!(fewer.set.is_empty());
    }

    #[test]
    fn addresses_outside_every_members_subnet_are_not_local() {
        let view = members(&["node-a"]);
        let virtual_address: IpAddr = "203.0.113.10".parse().unwrap();
        let local: IpAddr = "10.0.0.101".parse().unwrap();
        let plan = plan(
            "node-a",
            &[virtual_address, local],
            &view,
            &observed(BTreeMap::new()),
        );
        assert_eq!(plan.set.keys().collect::<Vec<_>>(), [&local]);
        assert_eq!(plan.elections.len(), 1);
    }

    #[test]
    fn a_winner_without_an_interface_in_the_subnet_stays_silent_and_says_so() {
        let view = members(&["node-a"]);
        let mut seen = observed(BTreeMap::new());
        seen.links.clear();
        let address: IpAddr = "10.0.0.101".parse().unwrap();
        let plan = plan("node-a", &[address], &view, &seen);
        assert_eq!(plan.no_interface, vec![address]);
        assert_eq!(plan.set[&address], Role::Silent);
    }

    #[test]
    fn without_this_node_in_the_view_nothing_is_answered() {
        let local = addresses(5);
        let plan = plan(
            "node-x",
            &local,
            &members(&["node-a"]),
            &observed(BTreeMap::new()),
        );
        assert!(plan.set.values().all(|r| *r == Role::Silent));
    }
}
