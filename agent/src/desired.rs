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
    /// The BGP attributes each Service asks for, as written; [`AttributePolicy::apply`] turns
    /// them into `desired.service_attributes` and `refused_attributes`.
    pub attribute_requests: BTreeMap<String, AttributeRequest>,
    /// Attributes left out of a Service that is still served, and why.
    pub refused_attributes: Vec<Rejected>,
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
                // A first push would reserve room for four; almost every address keeps
                // one service, so room for one (3.4 MB of the heap with 10,000 addresses).
                if self.0.is_empty() {
                    self.0.reserve_exact(1);
                }
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
    /// The BGP attributes each Service's routes carry, by Service name (only those with any).
    pub service_attributes: BTreeMap<String, BgpAttributes>,
    /// LB addresses this node serves none of (it carries the exclusion label, or they are
    /// an `externalTrafficPolicy: Local` Service's with no endpoint here): no sink serves
    /// them, but the neighbours sink keeps them silent (handed over first, when this node
    /// answered for one), so that no kernel here (with kube-proxy's IPVS mode holding them
    /// on kube-ipvs0) answers for another node's address.
    pub unserved: BTreeSet<IpAddr>,
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
            ..Self::default()
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

/// BGP attributes on a Service's routes: standard and large communities, and how many extra
/// times the local AS is put on the path (`prepend`).
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BgpAttributes {
    pub communities: BTreeSet<(u16, u16)>,
    pub large_communities: BTreeSet<(u32, u32, u32)>,
    pub prepend: u8,
}

impl BgpAttributes {
    pub fn is_empty(&self) -> bool {
        self.communities.is_empty() && self.large_communities.is_empty() && self.prepend == 0
    }

    /// An address several Services share carries every community of each, and the longest
    /// prepend.
    pub fn merge(&mut self, other: &Self) {
        self.communities.extend(other.communities.iter().copied());
        self.large_communities
            .extend(other.large_communities.iter().copied());
        self.prepend = self.prepend.max(other.prepend);
    }
}

/// A standard community, `ASN:VALUE`, each 0-65535.
pub fn community(text: &str) -> Option<(u16, u16)> {
    let (asn, value) = text.trim().split_once(':')?;
    Some((decimal(asn)?, decimal(value)?))
}

/// A large community, `ASN:DATA1:DATA2`, each 0-4294967295.
pub fn large_community(text: &str) -> Option<(u32, u32, u32)> {
    let mut parts = text.trim().split(':');
    let large = (
        decimal(parts.next()?)?,
        decimal(parts.next()?)?,
        decimal(parts.next()?)?,
    );
    parts.next().is_none().then_some(large)
}

/// Digits only: no sign, no spaces, no `0x`.
fn decimal<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// What a Service asks for, as written, each value with the field it came from (an
/// annotation, or a key of the services file), so a refusal can name both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttributeRequest {
    pub communities: Vec<(String, String)>,
    pub large_communities: Vec<(String, String)>,
    pub prepend: Option<(String, String)>,
}

/// One part of an allowed community: a number, or `*` for any.
pub type Part = Option<u32>;

/// Which attributes Services may set (the config's `routing.serviceAttributes`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttributePolicy {
    pub communities: Vec<[Part; 2]>,
    pub large_communities: Vec<[Part; 3]>,
    pub max_prepend: u8,
}

fn fits(pattern: &[Part], value: &[u32]) -> bool {
    pattern.len() == value.len()
        && pattern
            .iter()
            .zip(value)
            .all(|(p, v)| p.is_none_or(|p| p == *v))
}

impl AttributePolicy {
    /// The attributes `request` may have under this policy, and a refusal naming the field and
    /// the value for each it may not (malformed, or not allowed). The Service is served either
    /// way; only the refused attribute is left out.
    pub fn admit(
        &self,
        service: &str,
        request: &AttributeRequest,
    ) -> (BgpAttributes, Vec<Rejected>) {
        let mut admitted = BgpAttributes::default();
        let mut refused = Vec::new();
        let mut refuse = |field: &str, value: &str, why: String| {
            refused.push(Rejected {
                service: service.to_owned(),
                reason: format!(
                    "{field}: {value:?} is not allowed ({why}); the Service is served without it"
                ),
            });
        };
        for (field, text) in &request.communities {
            match community(text) {
                None => refuse(field, text, "a community is ASN:VALUE, each 0-65535".into()),
                Some((asn, value))
                    if self
                        .communities
                        .iter()
                        .any(|p| fits(p, &[asn.into(), value.into()])) =>
                {
                    admitted.communities.insert((asn, value));
                }
                Some(_) => refuse(
                    field,
                    text,
                    "not in routing.serviceAttributes.communities".into(),
                ),
            }
        }
        for (field, text) in &request.large_communities {
            match large_community(text) {
                None => refuse(
                    field,
                    text,
                    "a large community is ASN:DATA1:DATA2, each 0-4294967295".into(),
                ),
                Some(large)
                    if self
                        .large_communities
                        .iter()
                        .any(|p| fits(p, &[large.0, large.1, large.2])) =>
                {
                    admitted.large_communities.insert(large);
                }
                Some(_) => refuse(
                    field,
                    text,
                    "not in routing.serviceAttributes.largeCommunities".into(),
                ),
            }
        }
        if let Some((field, text)) = &request.prepend {
            match decimal::<u8>(text.trim()) {
                Some(count) if count <= self.max_prepend => admitted.prepend = count,
                Some(_) => refuse(
                    field,
                    text,
                    format!(
                        "at most routing.serviceAttributes.maxPrepend, {}",
                        self.max_prepend
                    ),
                ),
                None => refuse(field, text, format!("a count, 0-{}", self.max_prepend)),
            }
        }
        (admitted, refused)
    }

    /// Fills the update's per-Service attributes from its requests, for the Services it serves,
    /// and lists what was refused.
    pub fn apply(&self, update: &mut SourceUpdate) {
        let served: BTreeSet<&String> = update
            .desired
            .addresses
            .values()
            .flat_map(AddressIntent::keys)
            .collect();
        let mut attributes = BTreeMap::new();
        let mut refused = Vec::new();
        for (service, request) in &update.attribute_requests {
            if !served.contains(service) {
                continue;
            }
            let (admitted, mut refusals) = self.admit(service, request);
            if !admitted.is_empty() {
                attributes.insert(service.clone(), admitted);
            }
            refused.append(&mut refusals);
        }
        update.desired.service_attributes = attributes;
        update.refused_attributes = refused;
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

    #[test]
    fn the_policy_admits_what_it_allows_and_names_the_rest() {
        let policy = AttributePolicy {
            communities: vec![[Some(64512), Some(100)], [Some(64513), None]],
            large_communities: vec![[Some(64512), None, Some(2)]],
            max_prepend: 2,
        };
        let field = |f: &str| (f.to_owned(), String::new());
        let request = AttributeRequest {
            communities: ["64512:100", "64513:7", "64512:101", "64512:x", "1:70000"]
                .iter()
                .map(|v| (field("c").0, (*v).to_owned()))
                .collect(),
            large_communities: vec![
                (field("l").0, "64512:9:2".into()),
                (field("l").0, "64512:9:3".into()),
            ],
            prepend: Some((field("p").0, "3".into())),
        };
        let (admitted, refused) = policy.admit("web", &request);
        assert_eq!(
            admitted,
            BgpAttributes {
                communities: [(64512, 100), (64513, 7)].into(),
                large_communities: [(64512, 9, 2)].into(),
                prepend: 0,
            }
        );
        let reasons: Vec<&str> = refused.iter().map(|r| r.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "c: \"64512:101\" is not allowed (not in routing.serviceAttributes.communities); the Service is served without it",
                "c: \"64512:x\" is not allowed (a community is ASN:VALUE, each 0-65535); the Service is served without it",
                "c: \"1:70000\" is not allowed (a community is ASN:VALUE, each 0-65535); the Service is served without it",
                "l: \"64512:9:3\" is not allowed (not in routing.serviceAttributes.largeCommunities); the Service is served without it",
                "p: \"3\" is not allowed (at most routing.serviceAttributes.maxPrepend, 2); the Service is served without it",
            ]
        );
        assert!(refused.iter().all(|r| r.service == "web"));
        let (admitted, refused) = policy.admit(
            "web",
            &AttributeRequest {
                prepend: Some(("p".into(), "2".into())),
                ..AttributeRequest::default()
            },
        );
        assert_eq!((admitted.prepend, refused.len()), (2, 0));
    }

    #[test]
    fn only_served_services_get_attributes() {
        let mut update = SourceUpdate {
            desired: Desired::from_services(&[service("web", &["203.0.113.10"], &[80])]),
            attribute_requests: BTreeMap::from([
                (
                    "web".to_owned(),
                    AttributeRequest {
                        communities: vec![("c".into(), "64512:100".into())],
                        ..AttributeRequest::default()
                    },
                ),
                (
                    "gone".to_owned(),
                    AttributeRequest {
                        communities: vec![("c".into(), "bad".into())],
                        ..AttributeRequest::default()
                    },
                ),
            ]),
            ..SourceUpdate::default()
        };
        AttributePolicy {
            communities: vec![[None, None]],
            ..AttributePolicy::default()
        }
        .apply(&mut update);
        assert_eq!(
            update.desired.service_attributes["web"].communities,
            [(64512, 100)].into()
        );
        assert_eq!(update.desired.service_attributes.len(), 1);
        assert!(update.refused_attributes.is_empty());
    }
}
