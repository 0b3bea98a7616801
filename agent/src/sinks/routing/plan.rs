//! The routing sink's plan: the BIRD config the wanted routing section renders to on this node,
//! when it is not the one BIRD was last handed. Pure, so tests drive it directly.
//!
//! One config serves every node: each protocol's `nodeSelector` is matched against this node's
//! labels (from the desired state), and a `neighbor: gateway` entry becomes one session per
//! next hop of the node's default route (observed by the sink).

use std::net::Ipv4Addr;

use super::{
    gateway::Gateways,
    model::{BgpNeighbor, Family, IfaceName, Peer, RoutingConfig, Symbol},
    render::render_for_mode,
};
use crate::desired::NodeLabels;

/// What the sink does on a pass.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The config to hand BIRD; `None` when it already has it, or there is nothing to render
    /// (no routing section, or no router id).
    pub config: Option<String>,
    /// Entries this node cannot run as written, each naming the field and the value.
    pub warnings: Vec<String>,
}

pub fn plan(
    wanted: Option<&RoutingConfig>,
    labels: &NodeLabels,
    gateways: &Gateways,
    router_id_default: Option<Ipv4Addr>,
    interface: &IfaceName,
    handed: &str,
) -> Plan {
    let Some(config) = wanted else {
        return Plan::default();
    };
    let (node, warnings) = for_node(config, labels, gateways);
    let config = config
        .router_id
        .or(router_id_default)
        .map(|router_id| render_for_mode(&node, router_id, interface))
        .filter(|text| text != handed);
    Plan { config, warnings }
}

/// The protocols this node runs: those its labels select, with each gateway entry expanded
/// into one session per default next hop of each of its families.
pub fn for_node(
    config: &RoutingConfig,
    labels: &NodeLabels,
    gateways: &Gateways,
) -> (RoutingConfig, Vec<String>) {
    let selected = |selector: &Option<super::selector::NodeSelector>| {
        selector.as_ref().is_none_or(|s| s.matches(labels))
    };
    let mut warnings = Vec::new();
    let mut bgp = Vec::new();
    for (i, neighbor) in config.bgp.iter().enumerate() {
        if !selected(&neighbor.node_selector) {
            continue;
        }
        if neighbor.peer != Peer::Gateway {
            bgp.push(neighbor.clone());
            continue;
        }
        for family in &neighbor.families {
            let hops = gateways.get(family).filter(|hops| !hops.is_empty());
            let Some(hops) = hops else {
                warnings.push(format!(
                    "routing.bgp[{i}].neighbor: gateway: this node has no {} default route; no {} session for {}",
                    family_name(*family),
                    family_name(*family),
                    neighbor.name.as_str()
                ));
                continue;
            };
            for hop in hops {
                let interface = match &hop.interface {
                    None => None,
                    Some(name) => match IfaceName::new(name, "gateway interface") {
                        Ok(name) => Some(name),
                        Err(err) => {
                            warnings.push(format!("routing.bgp[{i}].neighbor: gateway: {err}"));
                            continue;
                        }
                    },
                };
                let name = format!(
                    "{}_{}",
                    neighbor.name.as_str(),
                    hop.address
                        .to_string()
                        .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
                );
                let Ok(name) = Symbol::new(&name, "gateway session") else {
                    continue;
                };
                bgp.push(BgpNeighbor {
                    name,
                    peer: Peer::Address(hop.address),
                    interface,
                    families: vec![*family],
                    source_address: neighbor
                        .source_address
                        .filter(|source| Family::of(source) == *family),
                    ..neighbor.clone()
                });
            }
        }
    }
    let node = RoutingConfig {
        bgp,
        ospf: config
            .ospf
            .iter()
            .filter(|o| selected(&o.node_selector))
            .cloned()
            .collect(),
        rip: config
            .rip
            .iter()
            .filter(|r| selected(&r.node_selector))
            .cloned()
            .collect(),
        ..config.clone()
    };
    (node, warnings)
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "IPv4",
        Family::Ipv6 => "IPv6",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::sinks::routing::{gateway::Gateway, model::RawRouting};

    fn config(yaml: &str) -> RoutingConfig {
        let raw: RawRouting = crate::yaml::from_str(yaml, crate::config::LIMITS).unwrap();
        raw.validate().unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> NodeLabels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn names(config: &RoutingConfig) -> Vec<&str> {
        config
            .bgp
            .iter()
            .map(|n| n.name.as_str())
            .chain(config.ospf.iter().map(|o| o.name.as_str()))
            .chain(config.rip.iter().map(|r| r.name.as_str()))
            .collect()
    }

    #[test]
    fn only_a_config_bird_does_not_have_is_handed_over() {
        let interface = IfaceName::new("kube-lb0", "interface").unwrap();
        let id = Some(Ipv4Addr::new(10, 0, 0, 1));
        let none = NodeLabels::new();
        let gw = Gateways::new();
        let one = config("bgp: [{neighbor: 10.0.0.2, asn: 64500, localAsn: 64512}]");
        let text = plan(Some(&one), &none, &gw, id, &interface, "")
            .config
            .expect("a first config");
        assert!(text.contains("64500"), "{text}");
        assert_eq!(
            plan(Some(&one), &none, &gw, id, &interface, &text).config,
            None
        );
        let two = config("bgp: [{neighbor: 10.0.0.2, asn: 64501, localAsn: 64512}]");
        assert!(
            plan(Some(&two), &none, &gw, id, &interface, &text)
                .config
                .is_some_and(|t| t.contains("64501"))
        );
        assert_eq!(
            plan(None, &none, &gw, id, &interface, &text),
            Plan::default()
        );
        assert_eq!(
            plan(Some(&one), &none, &gw, None, &interface, "").config,
            None,
            "no router id"
        );
    }

    #[test]
    fn each_node_runs_only_what_its_labels_select() {
        let racks = config(
            "
bgp:
  - {name: tor_a, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, nodeSelector: {matchLabels: {rack: a}}}
  - {name: tor_b, neighbor: 10.1.0.1, asn: 64501, localAsn: 64512, nodeSelector: {matchExpressions: [{key: rack, operator: In, values: [b]}]}}
  - {name: core, neighbor: 10.9.0.1, asn: 64509, localAsn: 64512}
ospf:
  - {name: o4, family: ipv4, area: 0, interfaces: [{name: eth0}], nodeSelector: {matchExpressions: [{key: ospf, operator: Exists}]}}
rip:
  - {name: r4, family: ipv4, interfaces: [eth0], nodeSelector: {matchExpressions: [{key: rack, operator: NotIn, values: [a]}]}}
",
        );
        let gw = Gateways::new();
        let on = |pairs: &[(&str, &str)]| for_node(&racks, &labels(pairs), &gw).0;
        assert_eq!(names(&on(&[("rack", "a")])), ["tor_a", "core"]);
        assert_eq!(
            names(&on(&[("rack", "b"), ("ospf", "")])),
            ["tor_b", "core", "o4", "r4"]
        );
        assert_eq!(names(&on(&[])), ["core", "r4"]);
    }

    #[test]
    fn a_gateway_entry_peers_with_every_default_next_hop_of_its_families() {
        let racks = config(
            "bgp: [{name: tor, neighbor: gateway, asn: 64500, localAsn: 64512, families: [ipv4, ipv6], sourceAddress: 10.0.0.11}]",
        );
        let mut gateways = Gateways::new();
        gateways.insert(
            Family::Ipv4,
            BTreeSet::from([
                Gateway {
                    address: "10.0.0.1".parse().unwrap(),
                    interface: None,
                },
                Gateway {
                    address: "10.0.1.1".parse().unwrap(),
                    interface: None,
                },
            ]),
        );
        let (node, warnings) = for_node(&racks, &NodeLabels::new(), &gateways);
        assert_eq!(names(&node), ["tor_10_0_0_1", "tor_10_0_1_1"]);
        assert_eq!(node.bgp[0].families, [Family::Ipv4]);
        assert_eq!(
            node.bgp[0].source_address,
            Some("10.0.0.11".parse().unwrap())
        );
        assert_eq!(
            warnings,
            [
                "routing.bgp[0].neighbor: gateway: this node has no IPv6 default route; no IPv6 session for tor"
            ]
        );

        gateways.insert(
            Family::Ipv6,
            BTreeSet::from([Gateway {
                address: "fe80::1".parse().unwrap(),
                interface: Some("eth0".into()),
            }]),
        );
        let (node, warnings) = for_node(&racks, &NodeLabels::new(), &gateways);
        assert!(warnings.is_empty(), "{warnings:?}");
        let v6 = &node.bgp[2];
        assert_eq!(v6.name.as_str(), "tor_fe80__1");
        assert_eq!(v6.interface.as_ref().map(IfaceName::as_str), Some("eth0"));
        assert_eq!(v6.source_address, None, "an IPv4 source does not fit");
    }
}
