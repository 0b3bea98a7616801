//! The diff: given what the Services ask and what the kernel holds, what must change. A pure
//! function, so tests drive it directly.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;
use serde::Serialize;

use crate::desired::Desired;

/// The load-balancer interface as the kernel has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    pub index: u32,
    pub up: bool,
    /// Whether it carries lbagent's mark (its alias), by which it is found when renamed.
    pub marked: bool,
}

/// An interface lbagent made for its addresses, that someone renamed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenamedLink {
    pub index: u32,
    pub name: String,
}

/// What the address sink observed in the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The load-balancer interface, if it exists.
    pub link: Option<LinkState>,
    /// Every address on it except IPv6 link-local ones (the kernel owns those).
    pub addresses: BTreeSet<IpNet>,
    /// Subnets of the node's other interfaces that are up. An address inside one of them is
    /// reachable without the load-balancer interface: it is local, not virtual. Host
    /// prefixes (/32, /128) are not subnets, and a down interface makes nothing local.
    pub node_prefixes: Vec<IpNet>,
    /// lbagent's interfaces under another name: their addresses count for nothing.
    pub renamed: Vec<RenamedLink>,
    /// Whether the node has IPv6 at all.
    pub ipv6: bool,
}

/// An address the node reaches on one of its own subnets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct LocalAddress {
    pub address: IpAddr,
    pub prefix: IpNet,
}

/// The changes that make the kernel match the desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub create_link: bool,
    pub set_up: bool,
    /// Mark the interface: one an older lbagent made, or whose alias someone changed.
    pub mark_link: bool,
    /// Host prefixes (/32, /128) to add to the interface.
    pub add: Vec<IpNet>,
    /// Prefixes on the interface that nothing asks for.
    pub remove: Vec<IpNet>,
    /// Desired addresses that are not put on the interface because they are local.
    pub local: Vec<LocalAddress>,
    /// Desired IPv6 addresses on a node without IPv6.
    pub unsupported: Vec<IpAddr>,
    /// Renamed interfaces of lbagent's to delete, once their addresses are back in place.
    pub delete_renamed: Vec<RenamedLink>,
}

impl Plan {
    /// Whether the kernel already matches.
    pub fn changes_nothing(&self) -> bool {
        !self.create_link
            && !self.set_up
            && !self.mark_link
            && self.add.is_empty()
            && self.remove.is_empty()
            && self.delete_renamed.is_empty()
    }

    /// The host prefixes the interface holds once this plan is applied.
    pub fn virtual_addresses<'a>(
        &'a self,
        observed: &'a Observed,
    ) -> impl Iterator<Item = &'a IpNet> + 'a {
        observed
            .addresses
            .iter()
            .filter(|net| !self.remove.contains(net))
            .chain(self.add.iter())
    }
}

pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    let mut plan = Plan {
        create_link: observed.link.is_none(),
        set_up: observed.link.is_some_and(|link| !link.up),
        mark_link: observed.link.is_some_and(|link| !link.marked),
        delete_renamed: observed.renamed.clone(),
        ..Plan::default()
    };
    let mut wanted = BTreeSet::new();
    for address in desired.addresses.keys() {
        if address.is_ipv6() && !observed.ipv6 {
            plan.unsupported.push(*address);
        } else if let Some(prefix) = observed
            .node_prefixes
            .iter()
            .find(|prefix| prefix.contains(address))
        {
            plan.local.push(LocalAddress {
                address: *address,
                prefix: *prefix,
            });
        } else {
            wanted.insert(IpNet::from(*address));
        }
    }
    plan.add = wanted.difference(&observed.addresses).copied().collect();
    plan.remove = observed.addresses.difference(&wanted).copied().collect();
    plan
}

#[cfg(test)]
mod tests {
    use crate::desired::AddressIntent;

    use proptest::prelude::*;

    use super::*;

    fn desired(addresses: &[&str]) -> Desired {
        Desired {
            addresses: addresses
                .iter()
                .map(|a| {
                    (
                        a.parse().unwrap(),
                        AddressIntent::from_iter([("svc".to_owned(), Default::default())]),
                    )
                })
                .collect(),
            ..Desired::default()
        }
    }

    fn nets(list: &[&str]) -> BTreeSet<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn node() -> Observed {
        Observed {
            link: Some(LinkState {
                index: 7,
                up: true,
                marked: true,
            }),
            addresses: BTreeSet::new(),
            renamed: Vec::new(),
            node_prefixes: vec!["10.0.0.0/24".parse().unwrap(), "fd00::/64".parse().unwrap()],
            ipv6: true,
        }
    }

    #[test]
    fn adds_missing_and_removes_unwanted_host_prefixes() {
        let observed = Observed {
            addresses: nets(&["203.0.113.9/32", "203.0.113.10/32", "198.51.100.0/24"]),
            ..node()
        };
        let plan = plan(&desired(&["203.0.113.10", "2001:db8::10"]), &observed);
        assert_eq!(plan.add, ["2001:db8::10/128".parse::<IpNet>().unwrap()]);
        assert_eq!(
            plan.remove,
            Vec::from_iter(nets(&["198.51.100.0/24", "203.0.113.9/32"]))
        );
        assert!(!plan.create_link && !plan.set_up);
    }

    #[test]
    fn addresses_in_node_subnets_are_local() {
        let plan = plan(
            &desired(&["10.0.0.50", "fd00::50", "203.0.113.10"]),
            &node(),
        );
        assert_eq!(plan.add, Vec::from_iter(nets(&["203.0.113.10/32"])));
        assert_eq!(
            plan.local,
            [
                LocalAddress {
                    address: "10.0.0.50".parse().unwrap(),
                    prefix: "10.0.0.0/24".parse().unwrap()
                },
                LocalAddress {
                    address: "fd00::50".parse().unwrap(),
                    prefix: "fd00::/64".parse().unwrap()
                },
            ]
        );
    }

    #[test]
    fn a_local_address_already_on_the_interface_is_removed_from_it() {
        let observed = Observed {
            addresses: nets(&["10.0.0.50/32"]),
            ..node()
        };
        let plan = plan(&desired(&["10.0.0.50"]), &observed);
        assert_eq!(plan.remove, Vec::from_iter(nets(&["10.0.0.50/32"])));
        assert!(plan.add.is_empty());
    }

    #[test]
    fn ipv6_on_a_node_without_ipv6_is_unsupported() {
        let observed = Observed {
            ipv6: false,
            ..node()
        };
        let plan = plan(&desired(&["2001:db8::10", "203.0.113.10"]), &observed);
        assert_eq!(
            plan.unsupported,
            ["2001:db8::10".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(plan.add, Vec::from_iter(nets(&["203.0.113.10/32"])));
    }

    #[test]
    fn an_unmarked_link_is_marked_and_renamed_links_are_deleted() {
        let unmarked = Observed {
            link: Some(LinkState {
                index: 7,
                up: true,
                marked: false,
            }),
            ..node()
        };
        let plan = plan(&Desired::default(), &unmarked);
        assert!(plan.mark_link && !plan.changes_nothing());
        let renamed = RenamedLink {
            index: 9,
            name: "kube-old".to_owned(),
        };
        let observed = Observed {
            renamed: vec![renamed.clone()],
            ..node()
        };
        let plan = super::plan(&desired(&["203.0.113.10"]), &observed);
        assert_eq!(plan.delete_renamed, [renamed]);
        assert_eq!(plan.add, Vec::from_iter(nets(&["203.0.113.10/32"])));
    }

    #[test]
    fn missing_or_down_link_is_created_or_brought_up() {
        let missing = Observed {
            link: None,
            ..node()
        };
        assert!(plan(&Desired::default(), &missing).create_link);
        let down = Observed {
            link: Some(LinkState {
                index: 7,
                up: false,
                marked: true,
            }),
            ..node()
        };
        let plan = plan(&Desired::default(), &down);
        assert!(plan.set_up && !plan.create_link && !plan.changes_nothing());
    }

    /// The kernel as far as the plan is concerned: the interface and its addresses.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Kernel {
        link: Option<bool>,
        addresses: BTreeSet<IpNet>,
    }

    impl Kernel {
        fn observe(&self, ipv6: bool) -> Observed {
            Observed {
                link: self.link.map(|up| LinkState {
                    index: 7,
                    up,
                    marked: true,
                }),
                addresses: self.addresses.clone(),
                ipv6,
                ..node()
            }
        }

        fn apply(&mut self, plan: &Plan) {
            if plan.create_link {
                self.link = Some(true);
                self.addresses.clear();
            }
            if plan.set_up {
                self.link = Some(true);
            }
            for net in &plan.remove {
                assert!(
                    self.addresses.remove(net),
                    "removed {net}, which was not there"
                );
            }
            for net in &plan.add {
                assert!(self.addresses.insert(*net), "added {net}, which was there");
            }
        }
    }

    /// Addresses drawn from a small pool, so that states overlap: virtual v4 and v6, and
    /// some inside the node's subnets.
    fn address() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u8..8).prop_map(|i| IpAddr::from([203, 0, 113, i])),
            (0u16..8).prop_map(|i| IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, i])),
            (0u8..3).prop_map(|i| IpAddr::from([10, 0, 0, i])),
        ]
    }

    fn desired_state() -> impl Strategy<Value = Desired> {
        proptest::collection::btree_set(address(), 0..10).prop_map(|addresses| Desired {
            addresses: addresses
                .into_iter()
                .map(|a| {
                    (
                        a,
                        AddressIntent::from_iter([("svc".to_owned(), Default::default())]),
                    )
                })
                .collect(),
            ..Desired::default()
        })
    }

    fn kernel() -> impl Strategy<Value = Kernel> {
        (
            prop_oneof![Just(None), Just(Some(true)), Just(Some(false))],
            proptest::collection::btree_set(
                prop_oneof![
                    address().prop_map(IpNet::from),
                    Just("198.51.100.0/24".parse().unwrap()),
                ],
                0..6,
            ),
        )
            .prop_map(|(link, addresses)| Kernel {
                addresses: if link.is_some() {
                    addresses
                } else {
                    BTreeSet::new()
                },
                link,
            })
    }

    proptest! {
        /// Any sequence of desired states ends where applying only the last one ends.
        #[test]
        fn a_sequence_converges_like_its_last_state(
            start in kernel(),
            states in proptest::collection::vec(desired_state(), 1..8),
            ipv6 in any::<bool>(),
        ) {
            let mut stepwise = start.clone();
            for state in &states {
                let step = plan(state, &stepwise.observe(ipv6));
                stepwise.apply(&step);
            }
            let last = states.last().unwrap();
            let mut direct = start;
            direct.apply(&plan(last, &direct.observe(ipv6)));
            prop_assert_eq!(&stepwise, &direct);

            // And that state is exactly the virtual addresses asked for, on an interface
            // that is up: one plan converges, a second finds nothing to do.
            let expected: BTreeSet<IpNet> = last
                .addresses
                .keys()
                .filter(|a| ipv6 || a.is_ipv4())
                .filter(|a| !matches!(a, IpAddr::V4(v4) if v4.octets()[0] == 10))
                .map(|a| IpNet::from(*a))
                .collect();
            prop_assert_eq!(&direct.addresses, &expected);
            prop_assert_eq!(direct.link, Some(true));
            prop_assert!(plan(last, &direct.observe(ipv6)).changes_nothing());
        }
    }
}
