//! Who answers for a local address: rendezvous (highest random weight) hashing over the nodes
//! that may hold it.
//!
//! Every agent runs this on the same view (the nodes, their subnets, who is alive, where the
//! endpoints are) and so computes the same owner without talking to the others. Each node
//! scores each address with a hash of the pair; the highest score owns it, the next ones are
//! the successors in order. Scores do not depend on which other nodes exist, so a node that
//! joins takes only the addresses it now scores highest on, and a node that leaves hands only
//! its own addresses to their next candidate: nothing else moves.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use serde::Serialize;

/// One node as the election sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeView {
    pub name: String,
    /// Subnets of the node's interfaces: it can answer for addresses inside them.
    pub subnets: Vec<IpNet>,
    /// Carries `node.kubernetes.io/exclude-from-external-load-balancers`.
    pub excluded: bool,
    /// The failure detector counts it as a live member.
    pub alive: bool,
}

/// Which nodes may hold an address as far as its services are concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoints<'a> {
    /// `externalTrafficPolicy: Cluster`: any node.
    Anywhere,
    /// `externalTrafficPolicy: Local`: only these nodes, which have a ready endpoint.
    On(&'a BTreeSet<String>),
}

/// Why a node is not a candidate for an address (for `lbagent status` and the logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Ineligible {
    NoSubnet,
    Excluded,
    Dead,
    NoEndpoint,
}

/// The eligible nodes for `address`, best first: the first is the owner, the others take
/// over in this order. Empty when no node may hold it.
pub fn candidates<'a>(
    address: IpAddr,
    nodes: &'a [NodeView],
    endpoints: Endpoints<'_>,
) -> Vec<&'a NodeView> {
    let mut eligible: Vec<(u64, &NodeView)> = nodes
        .iter()
        .filter(|node| ineligible(address, node, &endpoints).is_none())
        .map(|node| (score(address, &node.name), node))
        .collect();
    // Highest score first; equal scores (a 2^-64 event) fall back to the name, so the
    // order never depends on the order of the input.
    eligible.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    eligible.dedup_by(|a, b| a.1.name == b.1.name);
    eligible.into_iter().map(|(_, node)| node).collect()
}

/// The node that answers for `address`, if any may.
pub fn owner<'a>(
    address: IpAddr,
    nodes: &'a [NodeView],
    endpoints: Endpoints<'_>,
) -> Option<&'a NodeView> {
    candidates(address, nodes, endpoints).into_iter().next()
}

/// The first reason `node` may not hold `address`, or `None` when it may.
pub fn ineligible(
    address: IpAddr,
    node: &NodeView,
    endpoints: &Endpoints<'_>,
) -> Option<Ineligible> {
    if !node.subnets.iter().any(|subnet| subnet.contains(&address)) {
        Some(Ineligible::NoSubnet)
    } else if node.excluded {
        Some(Ineligible::Excluded)
    } else if !node.alive {
        Some(Ineligible::Dead)
    } else if matches!(endpoints, Endpoints::On(nodes) if !nodes.contains(&node.name)) {
        Some(Ineligible::NoEndpoint)
    } else {
        None
    }
}

/// The rendezvous score of `node` for `address`: FNV-1a (64-bit) over the address's bytes in
/// network order, a zero byte and the node's name, then MurmurHash3's 64-bit finaliser so
/// that names differing in one byte still score independently. Spelled out rather than taken
/// from `std::hash`, whose output may change between Rust releases: agents of different
/// builds must agree.
pub fn score(address: IpAddr, node: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(PRIME);
        }
    };
    match address {
        IpAddr::V4(v4) => feed(&v4.octets()),
        IpAddr::V6(v6) => feed(&v6.octets()),
    }
    feed(&[0]);
    feed(node.as_bytes());
    fmix64(hash)
}

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;

    fn node(name: &str) -> NodeView {
        NodeView {
            name: name.to_owned(),
            subnets: vec!["10.0.0.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()],
            excluded: false,
            alive: true,
        }
    }

    fn nodes(count: usize) -> Vec<NodeView> {
        (0..count).map(|i| node(&format!("node-{i}"))).collect()
    }

    fn addr(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i % 250) + 1))
    }

    fn owner_name(address: IpAddr, nodes: &[NodeView]) -> Option<String> {
        owner(address, nodes, Endpoints::Anywhere).map(|n| n.name.clone())
    }

    #[test]
    fn scores_are_fixed_across_builds() {
        // Pinned value, computed independently (Python, from the definition in the doc
        // comment): if the hash changed, agents of two builds would disagree on owners.
        assert_eq!(
            score("10.0.0.10".parse().unwrap(), "node-a"),
            0x22d5_b4ab_9632_78c2
        );
    }

    #[test]
    fn only_eligible_nodes_are_candidates() {
        let mut view = nodes(5);
        view[0].subnets = vec!["192.168.0.0/24".parse().unwrap()];
        view[1].excluded = true;
        view[2].alive = false;
        let address: IpAddr = "10.0.0.10".parse().unwrap();
        let endpoints = BTreeSet::from(["node-3".to_owned(), "node-0".to_owned()]);
        let names = |endpoints| {
            candidates(address, &view, endpoints)
                .iter()
                .map(|n| n.name.clone())
                .collect::<Vec<_>>()
        };
        let mut anywhere = names(Endpoints::Anywhere);
        anywhere.sort();
        assert_eq!(anywhere, ["node-3", "node-4"]);
        assert_eq!(names(Endpoints::On(&endpoints)), ["node-3"]);
        let reasons: Vec<_> = view
            .iter()
            .map(|n| ineligible(address, n, &Endpoints::On(&endpoints)))
            .collect();
        assert_eq!(
            reasons,
            [
                Some(Ineligible::NoSubnet),
                Some(Ineligible::Excluded),
                Some(Ineligible::Dead),
                None,
                Some(Ineligible::NoEndpoint)
            ]
        );
        let v6: IpAddr = "fd00::10".parse().unwrap();
        assert!(owner(v6, &view, Endpoints::Anywhere).is_some());
        let outside: IpAddr = "172.16.0.1".parse().unwrap();
        assert!(owner(outside, &view, Endpoints::Anywhere).is_none());
        assert!(owner(address, &view, Endpoints::On(&BTreeSet::new())).is_none());
    }

    #[test]
    fn addresses_spread_over_the_nodes() {
        let view = nodes(3);
        let mut load = [0u32; 3];
        for i in 0..3000u32 {
            let address = IpAddr::V6(std::net::Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i)));
            let name = owner_name(address, &view).unwrap();
            let index: usize = name.trim_start_matches("node-").parse().unwrap();
            load[index] += 1;
        }
        // 1000 each on average; a fair hash stays well inside +-15%.
        assert!(load.iter().all(|n| (850..=1150).contains(n)), "{load:?}");
        let mut load = [0u32; 3];
        for i in 0..250 {
            let name = owner_name(addr(i), &view).unwrap();
            load[name.trim_start_matches("node-").parse::<usize>().unwrap()] += 1;
        }
        assert!(load.iter().all(|n| (50..=117).contains(n)), "{load:?}");
    }

    proptest! {
        #[test]
        fn the_order_of_the_view_does_not_matter(count in 1usize..8, rotate in 0usize..8, i in 0u32..250) {
            let view = nodes(count);
            let mut turned = view.clone();
            turned.rotate_left(rotate % count);
            turned.reverse();
            prop_assert_eq!(owner_name(addr(i), &view), owner_name(addr(i), &turned));
            let a: Vec<_> = candidates(addr(i), &view, Endpoints::Anywhere).iter().map(|n| &n.name).collect();
            let b: Vec<_> = candidates(addr(i), &turned, Endpoints::Anywhere).iter().map(|n| &n.name).collect();
            prop_assert_eq!(a, b);
        }

        #[test]
        fn a_leaving_node_moves_only_its_own_addresses(count in 2usize..8, leaving in 0usize..8) {
            let view = nodes(count);
            let leaving = leaving % count;
            let mut after = view.clone();
            after[leaving].alive = false;
            for i in 0..250 {
                let before = candidates(addr(i), &view, Endpoints::Anywhere);
                let now = owner_name(addr(i), &after);
                if before[0].name == view[leaving].name {
                    // The next candidate in the old order takes over.
                    prop_assert_eq!(now, Some(before[1].name.clone()));
                } else {
                    prop_assert_eq!(now, Some(before[0].name.clone()));
                }
            }
        }

        #[test]
        fn a_joining_node_takes_only_what_it_wins(count in 1usize..8) {
            let view = nodes(count);
            let mut after = view.clone();
            after.push(node("newcomer"));
            let mut taken = 0;
            for i in 0..250 {
                let before = owner_name(addr(i), &view);
                let now = owner_name(addr(i), &after);
                if now.as_deref() == Some("newcomer") {
                    taken += 1;
                } else {
                    prop_assert_eq!(now, before);
                }
            }
            // It wins some share: never nothing, never everything (with more than one node).
            prop_assert!(taken > 0);
            prop_assert!(count == 0 || taken < 250);
        }
    }
}
