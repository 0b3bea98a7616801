//! The desired state: what the Services say this node should serve. Plain data, no handles,
//! so the reconciler's diff is a pure function of it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use ipnet::IpNet;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
        })
    }
}

impl Protocol {
    /// As Kubernetes writes it, case-insensitively; `None` (unset) is TCP.
    pub fn parse(text: Option<&str>) -> Option<Self> {
        match text.map(str::to_ascii_uppercase).as_deref() {
            None | Some("TCP") => Some(Self::Tcp),
            Some("UDP") => Some(Self::Udp),
            Some("SCTP") => Some(Self::Sctp),
            Some(_) => None,
        }
    }
}

/// A port number as sources carry it (signed and wide); 0 is not a port.
pub fn port_number(port: i64) -> Option<u16> {
    u16::try_from(port).ok().filter(|p| *p != 0)
}

/// A source range: a CIDR (host bits cleared, as Kubernetes does) or a single address.
pub fn source_range(text: &str) -> Option<IpNet> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .ok()
        .map(|range| range.trunc())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortSpec {
    pub port: u16,
    pub protocol: Protocol,
}

/// `externalTrafficPolicy`: with `Local`, a node holds the address only while it has a ready
/// endpoint; sources that know endpoints leave such a service out when it has none here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

/// A service a source could not use, and why (logged, and shown by `lbagent status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Rejected {
    pub service: String,
    pub reason: String,
}

/// What a source hands the reconciler each time its view changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourceUpdate {
    pub desired: Desired,
    pub rejected: Vec<Rejected>,
}

/// One load-balancer Service as a source reports it, already validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// `namespace/name` for Kubernetes, the entry's name for the file source.
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<PortSpec>,
    /// Empty means every source may connect.
    pub source_ranges: Vec<IpNet>,
    pub traffic_policy: TrafficPolicy,
}

/// What one service asks of one address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ServicePolicy {
    pub ports: BTreeSet<PortSpec>,
    pub source_ranges: BTreeSet<IpNet>,
    pub traffic_policy: TrafficPolicy,
    /// With `externalTrafficPolicy: Local`, the nodes with a ready endpoint, when the source
    /// knows them (Kubernetes): only those may answer ARP/NDP for a local address. `None`:
    /// not known (the file source), or not Local.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint_nodes: Option<BTreeSet<String>>,
}

/// Everything asked of one address, by service name. An address shared by several services
/// has several entries, and stays as long as any is left.
///
/// A vector kept sorted by name, not a map: almost every address has one service, and a
/// `BTreeMap` allocates a node for eleven (9 MB of the agent's heap with 10,000 addresses).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressIntent(Vec<(String, ServicePolicy)>);

impl AddressIntent {
    /// The policy of `service`, added empty if the address has none for it yet.
    fn policy_mut(&mut self, service: &str) -> &mut ServicePolicy {
        let at = match self
            .0
            .binary_search_by(|(name, _)| name.as_str().cmp(service))
        {
            Ok(at) => at,
            Err(at) => {
                self.0
                    .insert(at, (service.to_owned(), ServicePolicy::default()));
                at
            }
        };
        &mut self.0[at].1
    }

    pub fn get(&self, service: &str) -> Option<&ServicePolicy> {
        self.0
            .binary_search_by(|(name, _)| name.as_str().cmp(service))
            .ok()
            .map(|at| &self.0[at].1)
    }

    /// The services' names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(name, _)| name)
    }

    pub fn values(&self) -> impl Iterator<Item = &ServicePolicy> {
        self.0.iter().map(|(_, policy)| policy)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &ServicePolicy)> {
        self.0.iter().map(|(name, policy)| (name, policy))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, ServicePolicy)> for AddressIntent {
    /// A service named twice keeps its last policy.
    fn from_iter<I: IntoIterator<Item = (String, ServicePolicy)>>(entries: I) -> Self {
        let mut intent = Self::default();
        for (service, policy) in entries {
            *intent.policy_mut(&service) = policy;
        }
        intent
    }
}

/// What became of a desired address on this node: the address sink's answer, which the
/// published status shows and the Kubernetes source turns into Events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressStatus {
    pub address: IpAddr,
    pub state: AddressState,
    /// For a local address, the node's subnet it lies in.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub prefix: Option<IpNet>,
    pub services: Vec<String>,
    /// With the neighbours sink: who answers ARP/NDP for the address.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub neighbour: Option<NeighbourOutcome>,
}

/// What the neighbours sink made of a desired address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", tag = "role")]
pub enum NeighbourOutcome {
    /// This node answers for it; the candidates in order, this node first.
    Answering { candidates: Vec<String> },
    /// Another node does.
    AnsweredBy { owner: String },
    /// No live node has an interface in its subnet and nothing routes it, so nobody answers
    /// for it. Set on one node only (the one that reports it), so it is said once.
    NoSubnet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressState {
    /// On the load-balancer interface.
    Virtual,
    /// Inside one of the node's subnets: reachable without the interface.
    Local,
    /// IPv6 on a node without IPv6.
    Unsupported,
}

/// A node's labels: from its Node object, or the config's `node.labels` with the file source.
pub type NodeLabels = BTreeMap<String, String>;

/// The desired state of the node: every address with the services that want it, and the
/// node's labels, which choose the routing protocols it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    pub addresses: BTreeMap<IpAddr, AddressIntent>,
    pub node_labels: NodeLabels,
}

impl Desired {
    pub fn from_services<'a>(services: impl IntoIterator<Item = &'a Service>) -> Self {
        Self::with_endpoint_nodes(services, &BTreeMap::new())
    }

    /// As [`Desired::from_services`], with the nodes that have a ready endpoint of each
    /// `externalTrafficPolicy: Local` service, by service name.
    pub fn with_endpoint_nodes<'a>(
        services: impl IntoIterator<Item = &'a Service>,
        endpoint_nodes: &BTreeMap<String, BTreeSet<String>>,
    ) -> Self {
        let mut addresses: BTreeMap<IpAddr, AddressIntent> = BTreeMap::new();
        for service in services {
            for address in &service.addresses {
                let policy = addresses
                    .entry(*address)
                    .or_default()
                    .policy_mut(&service.name);
                policy.ports.extend(service.ports.iter().copied());
                policy
                    .source_ranges
                    .extend(service.source_ranges.iter().copied());
                policy.traffic_policy = service.traffic_policy;
                if service.traffic_policy == TrafficPolicy::Local {
                    policy.endpoint_nodes = endpoint_nodes.get(&service.name).cloned();
                }
            }
        }
        Self {
            addresses,
            node_labels: NodeLabels::new(),
        }
    }

    /// Names of the services that want `address`, comma-separated, for log lines.
    pub fn services_of(&self, address: &IpAddr) -> String {
        self.addresses
            .get(address)
            .map(|intent| intent.keys().cloned().collect::<Vec<_>>().join(","))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, addresses: &[&str], ports: &[u16]) -> Service {
        Service {
            name: name.to_owned(),
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            ports: ports
                .iter()
                .map(|port| PortSpec {
                    port: *port,
                    protocol: Protocol::Tcp,
                })
                .collect(),
            source_ranges: Vec::new(),
            traffic_policy: TrafficPolicy::Cluster,
        }
    }

    #[test]
    fn shared_address_keeps_every_service() {
        let desired = Desired::from_services(&[
            service("web", &["203.0.113.10"], &[80]),
            service("api", &["203.0.113.10", "2001:db8::10"], &[443]),
        ]);
        let shared = &desired.addresses[&"203.0.113.10".parse().unwrap()];
        assert_eq!(shared.keys().collect::<Vec<_>>(), ["api", "web"]);
        assert_eq!(
            shared.get("web").unwrap().ports.iter().next().unwrap().port,
            80
        );
        assert_eq!(desired.addresses.len(), 2);
        assert_eq!(
            desired.services_of(&"203.0.113.10".parse().unwrap()),
            "api,web"
        );
    }

    #[test]
    fn no_services_no_addresses() {
        assert!(Desired::from_services(&[]).addresses.is_empty());
    }
}
