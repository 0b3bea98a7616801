//! What the neighbour map must hold: for each local address, whether this node answers
//! (and from which interface) or stays silent. A pure function of the desired addresses, the
//! live members and what the map and the node's interfaces hold.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::election::{self, Endpoints, NodeView};
use crate::{
    dataplane::Role,
    desired::{AddressIntent, Desired, TrafficPolicy},
    sinks::dataplane::{Refusal, Refused},
};

/// One of this node's interfaces, as far as answering goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub prefixes: Vec<IpNet>,
    /// Its host addresses (/32, /128): where the kernel's responder is used, the local
    /// addresses this node owns are held there.
    pub hosts: BTreeSet<IpAddr>,
}

/// An interface in a local address's subnet that refused the XDP program: the kernel
/// answers there instead, for exactly the addresses this node owns, which it holds on that
/// interface (see `kernel.rs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KernelInterface {
    pub interface: String,
    pub ifindex: u32,
    /// Why the program was refused.
    pub reason: String,
    /// The local addresses this node owns there.
    pub owned: BTreeSet<IpAddr>,
}

/// What the sink observed: the map's entries, the node's interfaces and the live members.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub roles: BTreeMap<IpAddr, Role>,
    pub links: Vec<Link>,
    /// The live members as `lbagent membership` last published them; `None` before the
    /// first list arrived.
    pub members: Option<Vec<NodeView>>,
    /// Whether the node has IPv6 (an IPv6 address is not served without it).
    pub ipv6: bool,
    /// The interfaces that refused the XDP program.
    pub refused: Refused,
    /// Addresses handed over ([`Role::HandOver`]) for longer than the sink waits for the
    /// new owner's claim: silent now, whether or not the claim was heard.
    pub handovers_lapsed: BTreeSet<IpAddr>,
    /// Addresses this node answers for that another host has claimed since the sink last
    /// looked: when this node now yields one, the new owner already answers, so it falls
    /// silent at once instead of handing over.
    pub claimed: BTreeSet<IpAddr>,
}

/// Who holds one local address: the live candidates in order, the owner first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Election {
    pub address: IpAddr,
    /// The owner (the first candidate); `None` when no live node may hold it.
    pub owner: Option<String>,
    pub candidates: Vec<String>,
    /// Whether this node answers for it.
    pub answering: bool,
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
    /// Desired addresses inside one of this node's subnets while no member list has arrived:
    /// nothing is decided for them (answering without a view of the others could duplicate
    /// them).
    pub waiting: Vec<IpAddr>,
    /// Desired addresses that no live member has a subnet for, when nothing routes them
    /// (no routing section): nobody can answer for them. Only the member that scores highest
    /// for such an address over all members lists it, so one node reports it.
    pub no_subnet: Vec<IpAddr>,
    /// The interfaces where the kernel answers instead of the program, by name.
    pub kernel: BTreeMap<String, KernelInterface>,
}

impl Plan {
    pub fn changes_nothing(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// `node`: this node's name; `routed`: a routing section advertises the addresses that are
/// not local. The desired addresses inside a member's subnet are local (L2)
/// addresses. Each gets an entry even when this node has no interface in its subnet (its
/// link is down, say, and the address went onto the LB interface): the kernel answers ARP for
/// any address it holds, on any interface, and only the program's silence keeps it from
/// answering for another node's address.
pub fn plan(node: &str, desired: &Desired, routed: bool, observed: &Observed) -> Plan {
    let mut plan = Plan::default();
    let served: Vec<IpAddr> = desired
        .addresses
        .keys()
        .filter(|address| address.is_ipv4() || observed.ipv6)
        .copied()
        .collect();
    let unserved: Vec<IpAddr> = desired
        .unserved
        .iter()
        .filter(|address| address.is_ipv4() || observed.ipv6)
        .filter(|address| !desired.addresses.contains_key(address))
        .copied()
        .collect();
    let Some(members) = &observed.members else {
        plan.waiting = served
            .into_iter()
            .filter(|address| link_for(&observed.links, address).is_some())
            .collect();
        return plan;
    };
    let (local, elsewhere): (Vec<IpAddr>, Vec<IpAddr>) = served.into_iter().partition(|address| {
        members
            .iter()
            .any(|m| m.subnets.iter().any(|s| s.contains(address)))
    });
    if !routed {
        plan.no_subnet = elsewhere
            .into_iter()
            .filter(|address| {
                let reporter = members
                    .iter()
                    .max_by_key(|m| (election::score(*address, &m.name), &m.name));
                reporter.is_some_and(|m| m.name == node)
            })
            .collect();
    }
    for address in &local {
        let endpoint_nodes = desired.addresses.get(address).and_then(endpoint_nodes);
        let endpoints = match &endpoint_nodes {
            Some(nodes) => Endpoints::On(nodes),
            None => Endpoints::Anywhere,
        };
        let candidates = election::candidates(*address, members, endpoints);
        let owner = candidates.first().map(|n| n.name.clone());
        let link = link_for(&observed.links, address);
        let refusal = link.and_then(|link| {
            observed
                .refused
                .get(&link.name)
                .filter(|refusal| refusal.ifindex == link.ifindex)
                .map(|refusal| (link, refusal))
        });
        let kernel = refusal.map(|(link, refusal)| {
            plan.kernel
                .entry(link.name.clone())
                .or_insert_with(|| KernelInterface::on(link, refusal))
        });
        let role = if owner.as_deref() == Some(node) {
            if let Some(kernel) = kernel {
                kernel.owned.insert(*address);
            }
            match link {
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
            yielded(observed, address, owner.is_some())
        };
        let before = observed.roles.get(address);
        if before != Some(&role) {
            plan.set.insert(*address, role);
            match (before, role) {
                (_, Role::Answer { .. }) => plan.taken.push(*address),
                (Some(Role::Answer { .. }), Role::Silent | Role::HandOver { .. }) => {
                    plan.released.push(*address)
                }
                _ => {}
            }
        }
        plan.elections.push(Election {
            address: *address,
            owner,
            candidates: candidates.iter().map(|n| n.name.clone()).collect(),
            answering: matches!(role, Role::Answer { .. }),
        });
    }
    // Served nowhere here (this node is excluded), but local: silent, so that this node's
    // kernel cannot answer for the node that holds it.
    let silenced: Vec<IpAddr> = unserved
        .into_iter()
        .filter(|address| {
            members
                .iter()
                .any(|m| m.subnets.iter().any(|s| s.contains(address)))
        })
        .collect();
    for address in &silenced {
        let before = observed.roles.get(address);
        let role = yielded(observed, address, true);
        if before != Some(&role) {
            plan.set.insert(*address, role);
            if matches!(before, Some(Role::Answer { .. })) {
                plan.released.push(*address);
            }
        }
    }
    plan.remove = observed
        .roles
        .keys()
        .filter(|address| !local.contains(address) && !silenced.contains(address))
        .copied()
        .collect();
    plan
}

/// The role of an address this node does not own. One it answered for, now won by another
/// node (`to_other`), is handed over: it keeps answering until the new owner claims it (the
/// program then silences the entry itself), or until the handover has lapsed
/// ([`Observed::handovers_lapsed`]) or the new owner's claim was heard before this node
/// knew it lost the address ([`Observed::claimed`]). Anything else is silent.
fn yielded(observed: &Observed, address: &IpAddr, to_other: bool) -> Role {
    match observed.roles.get(address) {
        Some(Role::Answer { ifindex, mac } | Role::HandOver { ifindex, mac })
            if to_other
                && !observed.handovers_lapsed.contains(address)
                && !observed.claimed.contains(address) =>
        {
            Role::HandOver {
                ifindex: *ifindex,
                mac: *mac,
            }
        }
        _ => Role::Silent,
    }
}

/// The nodes that may hold an address under `externalTrafficPolicy: Local`: those with a
/// ready endpoint of any of its services, when every service wanting it is Local and the
/// source knows its endpoints; `None` (any node) otherwise.
fn endpoint_nodes(intent: &AddressIntent) -> Option<BTreeSet<String>> {
    let mut nodes = BTreeSet::new();
    for policy in intent.values() {
        match (&policy.traffic_policy, &policy.endpoint_nodes) {
            (TrafficPolicy::Local, Some(with_endpoints)) => nodes.extend(with_endpoints.clone()),
            _ => return None,
        }
    }
    (!intent.is_empty()).then_some(nodes)
}

impl KernelInterface {
    fn on(link: &Link, refusal: &Refusal) -> Self {
        Self {
            interface: link.name.clone(),
            ifindex: link.ifindex,
            reason: refusal.reason.clone(),
            owned: BTreeSet::new(),
        }
    }
}

/// The interface whose subnet holds `address`.
fn link_for<'a>(links: &'a [Link], address: &IpAddr) -> Option<&'a Link> {
    links
        .iter()
        .find(|link| link.prefixes.iter().any(|p| p.contains(address)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{AddressIntent, Desired};

    const SUBNET: &str = "10.0.0.0/24";

    /// The plan with a routing section (addresses outside every subnet are routed).
    fn plan(node: &str, desired: &Desired, observed: &Observed) -> Plan {
        super::plan(node, desired, true, observed)
    }

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

    fn observed(roles: BTreeMap<IpAddr, Role>, view: &[NodeView]) -> Observed {
        Observed {
            roles,
            links: vec![Link {
                name: "eth0".to_owned(),
                ifindex: 2,
                mac: [2, 0, 0, 0, 0, 1],
                prefixes: vec![SUBNET.parse().unwrap(), "fd00::/64".parse().unwrap()],
                hosts: BTreeSet::new(),
            }],
            members: Some(view.to_vec()),
            ipv6: true,
            refused: Refused::new(),
            handovers_lapsed: BTreeSet::new(),
            claimed: BTreeSet::new(),
        }
    }

    fn desired(addresses: &[IpAddr]) -> Desired {
        Desired {
            addresses: addresses
                .iter()
                .map(|a| (*a, AddressIntent::default()))
                .collect(),
            ..Desired::default()
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
            let plan = plan(node, &desired(&local), &observed(BTreeMap::new(), &view));
            assert_eq!(plan.set.len(), local.len(), "every address gets an entry");
            for (address, role) in &plan.set {
                if matches!(role, Role::Answer { .. }) {
                    answering.entry(*address).or_default().push(node);
                }
            }
            for election in &plan.elections {
                assert_eq!(election.candidates.len(), 3);
                assert_eq!(election.owner.as_deref(), Some(&*election.candidates[0]));
                assert_eq!(election.answering, election.owner.as_deref() == Some(node));
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
        let local = desired(&addresses(10));
        let view = members(&["node-a", "node-b"]);
        let first = plan("node-b", &local, &observed(BTreeMap::new(), &view));
        let applied = observed(first.set.clone(), &view);
        let again = plan("node-b", &local, &applied);
        assert!(again.changes_nothing(), "{again:?}");
        assert!(again.taken.is_empty());
        // node-a dies: node-b takes exactly what node-a held, and announces it.
        let alone = Observed {
            members: Some(members(&["node-b"])),
            ..applied
        };
        let after = plan("node-b", &local, &alone);
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
        let local = desired(&addresses(10));
        let alone = plan(
            "node-b",
            &local,
            &observed(BTreeMap::new(), &members(&["node-b"])),
        );
        let applied = observed(alone.set.clone(), &members(&["node-a", "node-b"]));
        let back = plan("node-b", &local, &applied);
        assert!(!back.released.is_empty());
        assert!(back.taken.is_empty());
        // Handed over, not dropped: answered until node-a claims them.
        assert!(
            back.released
                .iter()
                .all(|a| matches!(back.set[a], Role::HandOver { ifindex: 2, .. })),
            "{back:?}"
        );
        let mut roles = applied.roles.clone();
        roles.extend(back.set.clone());
        let handing = Observed {
            roles: roles.clone(),
            ..applied.clone()
        };
        assert!(plan("node-b", &local, &handing).changes_nothing());
        // The program silenced one on node-a's claim: nothing to write for it.
        let claimed = back.released[0];
        roles.insert(claimed, Role::Silent);
        let after_claim = Observed {
            roles,
            ..handing.clone()
        };
        assert!(plan("node-b", &local, &after_claim).changes_nothing());
        // No claim heard in time: silent anyway.
        let lapsed = Observed {
            handovers_lapsed: back.released.iter().copied().collect(),
            ..handing
        };
        let silenced = plan("node-b", &local, &lapsed);
        assert_eq!(
            silenced.set.keys().copied().collect::<Vec<_>>(),
            back.released
        );
        assert!(silenced.set.values().all(|r| *r == Role::Silent));
        assert!(silenced.released.is_empty());
        // node-a's claim heard before node-b learnt it lost them: silent at once.
        let claimed = Observed {
            claimed: back.released.iter().copied().collect(),
            ..applied
        };
        let at_once = plan("node-b", &local, &claimed);
        assert_eq!(at_once.released, back.released);
        assert!(at_once.set.values().all(|r| *r == Role::Silent));
    }

    #[test]
    fn addresses_no_longer_desired_are_removed() {
        let view = members(&["node-a"]);
        let all = addresses(3);
        let applied = observed(
            plan("node-a", &desired(&all), &observed(BTreeMap::new(), &view)).set,
            &view,
        );
        let fewer = plan("node-a", &desired(&all[1..]), &applied);
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
            &desired(&[virtual_address, local]),
            &observed(BTreeMap::new(), &view),
        );
        assert_eq!(plan.set.keys().collect::<Vec<_>>(), [&local]);
        assert_eq!(plan.elections.len(), 1);
    }

    #[test]
    fn on_an_interface_that_refused_the_program_the_kernel_holds_exactly_the_owned_addresses() {
        use crate::sinks::dataplane::Refusal;
        let names = ["node-a", "node-b", "node-c"];
        let view = members(&names);
        let local = addresses(20);
        let refused = |ifindex| {
            Refused::from([(
                "eth0".to_owned(),
                Refusal {
                    ifindex,
                    reason: "driver-mode XDP refused on eth0".to_owned(),
                },
            )])
        };
        let mut owned_somewhere = BTreeSet::new();
        for node in names {
            let mut seen = observed(BTreeMap::new(), &view);
            seen.refused = refused(2);
            let plan = plan(node, &desired(&local), &seen);
            // Every node with local addresses there keeps the interface in the fallback
            // (its sysctls keep a non-owner silent), holding what it answers for only.
            let kernel = &plan.kernel["eth0"];
            assert_eq!(
                (kernel.ifindex, kernel.reason.as_str()),
                (2, "driver-mode XDP refused on eth0")
            );
            let answering: BTreeSet<IpAddr> = plan
                .elections
                .iter()
                .filter(|e| e.answering)
                .map(|e| e.address)
                .collect();
            assert_eq!(kernel.owned, answering, "{node}");
            for address in &kernel.owned {
                assert!(owned_somewhere.insert(*address), "{address} owned twice");
            }
        }
        assert_eq!(owned_somewhere, local.iter().copied().collect());
        // A refusal of an interface since replaced (another index) is no refusal of this one.
        let mut seen = observed(BTreeMap::new(), &view);
        seen.refused = refused(7);
        assert!(plan("node-a", &desired(&local), &seen).kernel.is_empty());
        // No local address in its subnets: the interface needs no fallback.
        let mut seen = observed(BTreeMap::new(), &view);
        seen.refused = refused(2);
        let outside = desired(&["203.0.113.10".parse().unwrap()]);
        assert!(plan("node-a", &outside, &seen).kernel.is_empty());
    }

    #[test]
    fn an_excluded_node_keeps_the_addresses_it_does_not_serve_silent() {
        let mut view = members(&["node-a", "node-b"]);
        view[0].excluded = true;
        let local = addresses(5);
        let excluded = Desired {
            unserved: local.iter().copied().collect(),
            ..Desired::default()
        };
        let answered: BTreeMap<IpAddr, Role> = local
            .iter()
            .map(|a| {
                (
                    *a,
                    Role::Answer {
                        ifindex: 2,
                        mac: [2, 0, 0, 0, 0, 1],
                    },
                )
            })
            .collect();
        let plan = plan("node-a", &excluded, &observed(answered, &view));
        assert!(plan.remove.is_empty(), "{:?}", plan.remove);
        assert_eq!(plan.set.len(), local.len());
        // Handed over to node-b (answered until it claims them), then silent.
        assert!(
            plan.set
                .values()
                .all(|role| matches!(role, Role::HandOver { ifindex: 2, .. }))
        );
        assert_eq!(plan.released.len(), local.len());
        assert!(plan.taken.is_empty() && plan.elections.is_empty());
        let lapsed = Observed {
            handovers_lapsed: local.iter().copied().collect(),
            ..observed(plan.set.clone(), &view)
        };
        let plan = super::plan("node-a", &excluded, false, &lapsed);
        assert!(plan.set.values().all(|role| *role == Role::Silent));
        assert!(plan.released.is_empty());
        // Already silent: nothing to do; outside every subnet: no entry.
        let silent = observed(plan.set.clone(), &view);
        assert!(super::plan("node-a", &excluded, false, &silent).changes_nothing());
        let elsewhere = Desired {
            unserved: BTreeSet::from(["203.0.113.10".parse().unwrap()]),
            ..Desired::default()
        };
        let plan = super::plan(
            "node-a",
            &elsewhere,
            false,
            &observed(BTreeMap::new(), &view),
        );
        assert!(plan.set.is_empty() && plan.no_subnet.is_empty());
    }

    #[test]
    fn a_winner_without_an_interface_in_the_subnet_stays_silent_and_says_so() {
        let view = members(&["node-a"]);
        let mut seen = observed(BTreeMap::new(), &view);
        seen.links.clear();
        let address: IpAddr = "10.0.0.101".parse().unwrap();
        let plan = plan("node-a", &desired(&[address]), &seen);
        assert_eq!(plan.no_interface, vec![address]);
        assert_eq!(plan.set[&address], Role::Silent);
        assert!(!plan.elections[0].answering);
    }

    #[test]
    fn without_this_node_in_the_view_nothing_is_answered() {
        let plan = plan(
            "node-x",
            &desired(&addresses(5)),
            &observed(BTreeMap::new(), &members(&["node-a"])),
        );
        assert!(plan.set.values().all(|r| *r == Role::Silent));
    }

    #[test]
    fn without_a_member_list_nothing_is_decided_and_the_waiting_addresses_are_named() {
        let view = members(&["node-a"]);
        let mut seen = observed(BTreeMap::new(), &view);
        seen.members = None;
        let elsewhere: IpAddr = "203.0.113.10".parse().unwrap();
        let mut wanted = addresses(2);
        wanted.push(elsewhere);
        let plan = plan("node-a", &desired(&wanted), &seen);
        assert!(plan.changes_nothing());
        assert!(plan.elections.is_empty());
        assert_eq!(plan.waiting, addresses(2));
    }

    #[test]
    fn without_routing_an_address_outside_every_subnet_is_reported_by_one_node() {
        let names = ["node-a", "node-b", "node-c"];
        let view = members(&names);
        let nowhere: Vec<IpAddr> = (1..=20).map(|i| IpAddr::from([203, 0, 113, i])).collect();
        let mut wanted = nowhere.clone();
        wanted.push("10.0.0.101".parse().unwrap());
        let mut reported: Vec<IpAddr> = Vec::new();
        for node in names {
            let routed = super::plan(
                node,
                &desired(&wanted),
                true,
                &observed(BTreeMap::new(), &view),
            );
            assert!(routed.no_subnet.is_empty(), "routing advertises them");
            let plan = super::plan(
                node,
                &desired(&wanted),
                false,
                &observed(BTreeMap::new(), &view),
            );
            assert_eq!(plan.elections.len(), 1, "only the local address is elected");
            assert!(plan.no_subnet.len() < nowhere.len(), "{node}: spread");
            reported.extend(plan.no_subnet);
        }
        reported.sort();
        assert_eq!(reported, nowhere, "each reported exactly once");
    }

    #[test]
    fn with_local_traffic_only_nodes_with_an_endpoint_are_candidates() {
        use crate::desired::ServicePolicy;
        let names = ["node-a", "node-b", "node-c"];
        let view = members(&names);
        let address: IpAddr = "10.0.0.101".parse().unwrap();
        let local = |nodes: Option<&[&str]>| ServicePolicy {
            traffic_policy: TrafficPolicy::Local,
            endpoint_nodes: nodes.map(|n| n.iter().map(|s| (*s).to_owned()).collect()),
            ..ServicePolicy::default()
        };
        let with = |intent: AddressIntent| Desired {
            addresses: BTreeMap::from([(address, intent)]),
            ..Desired::default()
        };
        let candidates = |desired: &Desired| {
            plan("node-a", desired, &observed(BTreeMap::new(), &view)).elections[0]
                .candidates
                .clone()
        };
        let only_c = with(AddressIntent::from_iter([(
            "web".to_owned(),
            local(Some(&["node-c"])),
        )]));
        assert_eq!(candidates(&only_c), ["node-c"]);
        // The owner moves with the endpoint.
        let only_b = with(AddressIntent::from_iter([(
            "web".to_owned(),
            local(Some(&["node-b"])),
        )]));
        assert_eq!(candidates(&only_b), ["node-b"]);
        // Two Local services share it: either's nodes.
        let shared = with(AddressIntent::from_iter([
            ("web".to_owned(), local(Some(&["node-b"]))),
            ("api".to_owned(), local(Some(&["node-c"]))),
        ]));
        let mut both = candidates(&shared);
        both.sort();
        assert_eq!(both, ["node-b", "node-c"]);
        // A Cluster service shares it, or the source does not know the endpoints: any node.
        let mixed = with(AddressIntent::from_iter([
            ("web".to_owned(), local(Some(&["node-b"]))),
            ("api".to_owned(), ServicePolicy::default()),
        ]));
        assert_eq!(candidates(&mixed).len(), 3);
        let unknown = with(AddressIntent::from_iter([("web".to_owned(), local(None))]));
        assert_eq!(candidates(&unknown).len(), 3);
    }

    #[test]
    fn ipv6_addresses_wait_for_a_node_with_ipv6() {
        let view = members(&["node-a"]);
        let mut seen = observed(BTreeMap::new(), &view);
        seen.ipv6 = false;
        let plan = plan("node-a", &desired(&addresses(1)), &seen);
        assert_eq!(
            plan.set.keys().copied().collect::<Vec<_>>(),
            vec![IpAddr::from([10, 0, 0, 101])]
        );
    }
}
