//! Kubernetes objects to the desired state: a pure function of what the watches hold, so the
//! rules (which Services, which addresses, endpoints under `externalTrafficPolicy: Local`, the
//! node's exclusion label) are tested on real-shaped objects without an API server.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};

use crate::{
    address,
    desired::{
        self, AttributeRequest, Desired, PortSpec, Protocol, Rejected, SourceUpdate, TrafficPolicy,
    },
};

/// A Service with this annotation set to "true" is left alone by lbagent.
pub const IGNORE_ANNOTATION: &str = "lbagent.io/ignore";
/// The node label that takes a node out of every load balancer (a Kubernetes convention).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";
/// The label an EndpointSlice carries naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The older, annotation form of `spec.loadBalancerSourceRanges`, still honoured by kube-proxy.
pub const SOURCE_RANGES_ANNOTATION: &str = "service.beta.kubernetes.io/load-balancer-source-ranges";
/// BGP attributes on a Service's routes, each checked against `routing.serviceAttributes`:
/// standard communities (`64512:100,64512:200`), large communities (`64512:1:2`), and how many
/// times to prepend the local AS (`2`).
pub const COMMUNITIES_ANNOTATION: &str = "lbagent.io/bgp-communities";
pub const LARGE_COMMUNITIES_ANNOTATION: &str = "lbagent.io/bgp-large-communities";
pub const PREPEND_ANNOTATION: &str = "lbagent.io/bgp-as-path-prepend";

/// Which Services this node serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    pub node_name: String,
    pub load_balancer_class: Option<String>,
}

/// The desired state, and what else the source reports about it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    pub update: SourceUpdate,
    /// `externalTrafficPolicy: Local` services without a ready endpoint on this node.
    pub no_local_endpoint: Vec<String>,
    /// The node carries the exclusion label: nothing is served.
    pub excluded: bool,
}

/// Kubernetes' own cap on an object's annotations together (keys and values, in bytes): the
/// API server refuses more, so a Service over it is refused here too, and not kept.
pub const ANNOTATIONS_LIMIT: usize = 256 * 1024;
/// Stands for annotations over the limit, with their size; not a valid annotation key (it has
/// spaces), so no real object carries it.
const OVER_LIMIT: &str = "lbagent.io/annotations over the limit";

/// Whether lbagent may serve `service` at all: only these are kept (a cluster's other Services,
/// however many, cost nothing beyond reading them).
pub fn is_load_balancer(service: &Service) -> bool {
    service
        .spec
        .as_ref()
        .is_some_and(|spec| spec.type_.as_deref() == Some("LoadBalancer"))
}

/// A Service as kept: without what translating never reads (managed fields, the cluster IPs,
/// the selector), and annotations over [`ANNOTATIONS_LIMIT`] replaced by their size, so one
/// Service costs a bounded amount however large it arrived.
pub fn slim(service: &mut Service) {
    service.metadata.managed_fields = None;
    if let Some(spec) = &mut service.spec {
        spec.cluster_ip = None;
        spec.cluster_ips = None;
        spec.selector = None;
        spec.external_ips = None;
    }
    let Some(annotations) = &mut service.metadata.annotations else {
        return;
    };
    let bytes: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > ANNOTATIONS_LIMIT {
        let ignore = annotations.remove(IGNORE_ANNOTATION);
        annotations.clear();
        annotations.insert(OVER_LIMIT.into(), bytes.to_string());
        if let Some(ignore) = ignore {
            annotations.insert(IGNORE_ANNOTATION.into(), ignore);
        }
    }
}

enum Verdict {
    /// Not a Service for lbagent on this node (type, class, annotation, no address yet).
    NotOurs,
    Serve(desired::Service),
    /// With its addresses: another node serves them, this one keeps them silent.
    NoLocalEndpoint(Vec<IpAddr>),
    Reject(String),
}

pub fn translate<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    slices: &[&EndpointSlice],
    node: Option<&Node>,
    selection: &Selection,
) -> Translation {
    let excluded = node
        .and_then(|node| node.metadata.labels.as_ref())
        .is_some_and(|labels| labels.contains_key(EXCLUDE_LABEL));
    let mut served = Vec::new();
    let mut endpoint_nodes = BTreeMap::new();
    let mut no_endpoint_here = BTreeSet::new();
    let mut translation = Translation {
        excluded,
        ..Translation::default()
    };
    for service in services {
        let name = service_name(service);
        match verdict(service, slices, selection) {
            Verdict::NotOurs => {}
            Verdict::Serve(served_service) => {
                let request = attribute_request(service);
                if request != AttributeRequest::default() {
                    translation
                        .update
                        .attribute_requests
                        .insert(name.clone(), request);
                }
                if served_service.traffic_policy == TrafficPolicy::Local {
                    endpoint_nodes.insert(name, nodes_with_endpoints(service, slices));
                }
                served.push(served_service);
            }
            Verdict::NoLocalEndpoint(addresses) => {
                translation.no_local_endpoint.push(name);
                no_endpoint_here.extend(addresses);
            }
            Verdict::Reject(reason) => translation.update.rejected.push(Rejected {
                service: name,
                reason,
            }),
        }
    }
    let mut unserved: BTreeSet<IpAddr> = no_endpoint_here;
    if excluded {
        unserved.extend(
            std::mem::take(&mut served)
                .iter()
                .flat_map(|service| service.addresses.iter().copied()),
        );
    }
    translation.update.desired = Desired::with_endpoint_nodes(&served, &endpoint_nodes);
    translation.update.desired.unserved = unserved;
    translation.update.desired.node_labels = node
        .and_then(|node| node.metadata.labels.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    translation
}

/// The BGP attributes a Service's annotations ask for, each value with its annotation.
fn attribute_request(service: &Service) -> AttributeRequest {
    let mut request = AttributeRequest::default();
    let Some(annotations) = &service.metadata.annotations else {
        return request;
    };
    let list = |key: &str| -> Vec<(String, String)> {
        annotations
            .get(key)
            .map(|text| {
                text.split(',')
                    .map(str::trim)
                    .filter(|value| !value.is_empty())
                    .map(|value| (format!("metadata.annotations[{key}]"), value.to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    };
    request.communities = list(COMMUNITIES_ANNOTATION);
    request.large_communities = list(LARGE_COMMUNITIES_ANNOTATION);
    request.prepend = annotations.get(PREPEND_ANNOTATION).map(|value| {
        (
            format!("metadata.annotations[{PREPEND_ANNOTATION}]"),
            value.clone(),
        )
    });
    request
}

/// `namespace/name`, the name a Service has in lbagent's logs, status and desired state.
pub fn service_name(service: &Service) -> String {
    format!(
        "{}/{}",
        service.metadata.namespace.as_deref().unwrap_or("default"),
        service.metadata.name.as_deref().unwrap_or_default()
    )
}

fn verdict(service: &Service, slices: &[&EndpointSlice], selection: &Selection) -> Verdict {
    let Some(spec) = &service.spec else {
        return Verdict::NotOurs;
    };
    let ignored = service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(IGNORE_ANNOTATION))
        .is_some_and(|value| value.eq_ignore_ascii_case("true"));
    if spec.type_.as_deref() != Some("LoadBalancer")
        || spec.load_balancer_class != selection.load_balancer_class
        || ignored
    {
        return Verdict::NotOurs;
    }
    if let Some(bytes) = service
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(OVER_LIMIT))
    {
        return Verdict::Reject(format!(
            "metadata.annotations: {bytes} bytes, over the limit of {ANNOTATIONS_LIMIT} bytes \
             (keys and values together, as Kubernetes allows)"
        ));
    }
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default();

    let families: BTreeSet<&str> = spec
        .ip_families
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let mut addresses: Vec<IpAddr> = Vec::new();
    for (i, entry) in ingress.iter().enumerate() {
        let Some(text) = &entry.ip else {
            // A hostname is for a cloud load balancer, not an address to hold.
            continue;
        };
        let field = format!("status.loadBalancer.ingress[{i}].ip");
        let ip = match address::parse_host(text) {
            Ok(ip) => ip,
            Err(err) => return Verdict::Reject(format!("{field}: {err}")),
        };
        let family = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
        if !families.is_empty() && !families.contains(family) {
            return Verdict::Reject(format!(
                "{field}: {ip} is {family}, but spec.ipFamilies is {:?}",
                families.iter().collect::<Vec<_>>()
            ));
        }
        if !addresses.contains(&ip) {
            addresses.push(ip);
        }
    }
    if addresses.is_empty() {
        // Not allocated yet: the allocator will set the status, and the watch brings it.
        return Verdict::NotOurs;
    }

    let mut ports = Vec::new();
    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let Some(number) = desired::port_number(port.port.into()) else {
            return Verdict::Reject(format!(
                "{field}.port: {} is not allowed (1-65535)",
                port.port
            ));
        };
        let Some(protocol) = Protocol::parse(port.protocol.as_deref()) else {
            return Verdict::Reject(format!(
                "{field}.protocol: {:?} is not allowed (TCP, UDP or SCTP)",
                port.protocol.as_deref().unwrap_or_default()
            ));
        };
        ports.push(PortSpec {
            port: number,
            protocol,
        });
    }

    let annotated: Vec<String>;
    let (field, ranges) = match &spec.load_balancer_source_ranges {
        Some(ranges) if !ranges.is_empty() => ("spec.loadBalancerSourceRanges", ranges),
        _ => {
            annotated = service
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(SOURCE_RANGES_ANNOTATION))
                .map(|text| {
                    text.split(',')
                        .map(str::trim)
                        .filter(|t| !t.is_empty())
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            (SOURCE_RANGES_ANNOTATION, &annotated)
        }
    };
    let mut source_ranges = Vec::new();
    for (i, text) in ranges.iter().enumerate() {
        match desired::source_range(text) {
            Some(range) => source_ranges.push(range),
            None => {
                return Verdict::Reject(format!(
                    "{field}[{i}]: {text:?} is not a CIDR range such as 10.0.0.0/8"
                ));
            }
        }
    }

    let traffic_policy = match spec.external_traffic_policy.as_deref() {
        None | Some("Cluster") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            return Verdict::Reject(format!(
                "spec.externalTrafficPolicy: {other:?} is not allowed (Cluster or Local)"
            ));
        }
    };
    if traffic_policy == TrafficPolicy::Local
        && !nodes_with_endpoints(service, slices).contains(&selection.node_name)
    {
        return Verdict::NoLocalEndpoint(addresses);
    }

    Verdict::Serve(desired::Service {
        name: service_name(service),
        addresses,
        ports,
        source_ranges,
        traffic_policy,
    })
}

/// The nodes with an endpoint of `service` that can take new traffic: ready, or serving and
/// not terminating. Unset conditions mean what the EndpointSlice API says they mean: ready
/// unless told otherwise, serving as ready, not terminating.
fn nodes_with_endpoints(service: &Service, slices: &[&EndpointSlice]) -> BTreeSet<String> {
    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    let name = service.metadata.name.as_deref().unwrap_or_default();
    slices
        .iter()
        .filter(|slice| slice.metadata.namespace.as_deref().unwrap_or("default") == namespace)
        .filter(|slice| {
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|owner| owner == name)
        })
        .flat_map(|slice| &slice.endpoints)
        .filter(|endpoint| {
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            ready || (serving && !terminating)
        })
        .filter_map(|endpoint| endpoint.node_name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn selection() -> Selection {
        Selection {
            node_name: "node-a".into(),
            load_balancer_class: None,
        }
    }

    /// A Service as the API server returns it once an allocator has given it addresses.
    fn service(name: &str, patch: Value) -> Service {
        let mut object = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "shop", "uid": "1", "resourceVersion": "5"},
            "spec": {
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.10",
                "ipFamilies": ["IPv4", "IPv6"],
                "ipFamilyPolicy": "PreferDualStack",
                "externalTrafficPolicy": "Cluster",
                "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 31000}],
            },
            "status": {"loadBalancer": {"ingress": [
                {"ip": "203.0.113.10", "ipMode": "VIP"},
                {"ip": "2001:db8:ff::10", "ipMode": "VIP"},
            ]}},
        });
        merge(&mut object, patch);
        serde_json::from_value(object).unwrap()
    }

    fn merge(target: &mut Value, patch: Value) {
        match (target, patch) {
            (Value::Object(target), Value::Object(patch)) => {
                for (key, value) in patch {
                    if value.is_null() {
                        target.remove(&key);
                    } else {
                        merge(target.entry(key).or_insert(Value::Null), value);
                    }
                }
            }
            (target, patch) => *target = patch,
        }
    }

    fn slice(service: &str, endpoints: Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{service}-abcde"),
                "namespace": "shop",
                "labels": {"kubernetes.io/service-name": service, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
        .unwrap()
    }

    fn node(labels: Value) -> Node {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node-a", "labels": labels},
        }))
        .unwrap()
    }

    fn run(services: &[Service], slices: &[EndpointSlice], node: Option<&Node>) -> Translation {
        let slices: Vec<&EndpointSlice> = slices.iter().collect();
        translate(services, &slices, node, &selection())
    }

    fn addresses(translation: &Translation) -> Vec<String> {
        translation
            .update
            .desired
            .addresses
            .keys()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn annotations_over_the_limit_are_not_kept_and_refuse_the_service_naming_it() {
        let huge = "x".repeat(1024 * 1024);
        let mut big = service(
            "big",
            json!({"metadata": {"annotations": {"note": huge, "other": "y"}}}),
        );
        slim(&mut big);
        let kept: usize = big
            .metadata
            .annotations
            .iter()
            .flatten()
            .map(|(k, v)| k.len() + v.len())
            .sum();
        assert!(kept < 100, "{kept} bytes of annotations kept");
        let mut fine = service(
            "fine",
            json!({"metadata": {"annotations": {"note": "x".repeat(ANNOTATIONS_LIMIT - 4)}}}),
        );
        slim(&mut fine);
        let translation = run(&[big, fine], &[], None);
        assert_eq!(
            translation.update.rejected,
            [Rejected {
                service: "shop/big".into(),
                reason: "metadata.annotations: 1048586 bytes, over the limit of 262144 bytes \
                         (keys and values together, as Kubernetes allows)"
                    .into(),
            }]
        );
        assert_eq!(addresses(&translation).len(), 2, "the other is served");
    }

    #[test]
    fn a_dual_stack_service_gives_both_addresses_with_its_ports() {
        let web = service(
            "web",
            json!({"spec": {"loadBalancerSourceRanges": ["198.51.100.7/24"], "ports": [
                {"port": 80, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}, {"port": 9, "protocol": "SCTP"}, {"port": 443}
            ]}}),
        );
        let translation = run(&[web], &[], None);
        assert_eq!(addresses(&translation), ["203.0.113.10", "2001:db8:ff::10"]);
        let policy = &translation.update.desired.addresses[&"203.0.113.10".parse().unwrap()]
            .get("shop/web")
            .unwrap();
        let ports: Vec<_> = policy.ports.iter().map(|p| (p.port, p.protocol)).collect();
        assert_eq!(
            ports,
            [
                (9, Protocol::Sctp),
                (53, Protocol::Udp),
                (80, Protocol::Tcp),
                (443, Protocol::Tcp)
            ]
        );
        assert_eq!(
            policy
                .source_ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["198.51.100.0/24"]
        );
        assert!(translation.update.rejected.is_empty());
    }

    #[test]
    fn only_load_balancers_of_the_configured_class_with_an_address_are_served() {
        let services = [
            service(
                "cluster-ip",
                json!({"spec": {"type": "ClusterIP"}, "status": {"loadBalancer": {}}}),
            ),
            service(
                "pending",
                json!({"status": {"loadBalancer": {"ingress": null}}}),
            ),
            service(
                "hostname",
                json!({"status": {"loadBalancer": {"ingress": [{"hostname": "lb.example.com"}]}}}),
            ),
            service(
                "other-class",
                json!({"spec": {"loadBalancerClass": "example.com/other"}}),
            ),
            service(
                "ignored",
                json!({"metadata": {"annotations": {IGNORE_ANNOTATION: "true"}}}),
            ),
            service(
                "served",
                json!({"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.20"}]}}}),
            ),
        ];
        let translation = run(&services, &[], None);
        assert_eq!(addresses(&translation), ["203.0.113.20"]);
        assert!(translation.update.rejected.is_empty());

        let classed = Selection {
            load_balancer_class: Some("example.com/other".into()),
            ..selection()
        };
        let translation = translate(&services, &[], None, &classed);
        assert_eq!(
            translation
                .update
                .desired
                .services_of(&"203.0.113.10".parse().unwrap()),
            "shop/other-class"
        );
        assert_eq!(translation.update.desired.addresses.len(), 2);
    }

    #[test]
    fn the_annotation_form_of_source_ranges_is_honoured() {
        let web = service(
            "web",
            json!({"metadata": {"annotations": {SOURCE_RANGES_ANNOTATION: "10.0.0.0/8, 2001:db8::/32"}}}),
        );
        let translation = run(&[web], &[], None);
        let policy = &translation.update.desired.addresses[&"203.0.113.10".parse().unwrap()]
            .get("shop/web")
            .unwrap();
        assert_eq!(policy.source_ranges.len(), 2);
    }

    #[test]
    fn garbage_rejects_that_service_only_naming_field_and_value() {
        let cases = [
            (
                json!({"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.300"}]}}}),
                r#"status.loadBalancer.ingress[0].ip: invalid address "203.0.113.300""#,
            ),
            (
                json!({"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.0/24"}]}}}),
                r#"status.loadBalancer.ingress[0].ip: invalid address "203.0.113.0/24": a load-balancer address is a single host"#,
            ),
            (
                json!({"spec": {"ipFamilies": ["IPv4"]}}),
                r#"status.loadBalancer.ingress[1].ip: 2001:db8:ff::10 is IPv6, but spec.ipFamilies is ["IPv4"]"#,
            ),
            (
                json!({"spec": {"ports": [{"port": 70000, "protocol": "TCP"}]}}),
                "spec.ports[0].port: 70000 is not allowed (1-65535)",
            ),
            (
                json!({"spec": {"ports": [{"port": 80, "protocol": "ICMP"}]}}),
                r#"spec.ports[0].protocol: "ICMP" is not allowed (TCP, UDP or SCTP)"#,
            ),
            (
                json!({"spec": {"loadBalancerSourceRanges": ["10.0.0.0/8", "everywhere"]}}),
                r#"spec.loadBalancerSourceRanges[1]: "everywhere" is not a CIDR range"#,
            ),
            (
                json!({"spec": {"externalTrafficPolicy": "Nearest"}}),
                r#"spec.externalTrafficPolicy: "Nearest" is not allowed (Cluster or Local)"#,
            ),
        ];
        for (patch, expected) in cases {
            let bad = service("bad", patch.clone());
            let good = service(
                "good",
                json!({"status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.99"}]}}}),
            );
            let translation = run(&[bad, good], &[], None);
            assert_eq!(addresses(&translation), ["203.0.113.99"], "{patch}");
            let [rejected] = translation.update.rejected.as_slice() else {
                panic!("{patch}: {:?}", translation.update.rejected);
            };
            assert_eq!(rejected.service, "shop/bad");
            assert!(
                rejected.reason.starts_with(expected),
                "{patch}: {}",
                rejected.reason
            );
        }
    }

    #[test]
    fn local_traffic_policy_follows_this_nodes_endpoints() {
        let web = service("web", json!({"spec": {"externalTrafficPolicy": "Local"}}));
        let with =
            |endpoints: Value| run(std::slice::from_ref(&web), &[slice("web", endpoints)], None);

        let none = with(json!([]));
        assert!(none.update.desired.addresses.is_empty());
        assert_eq!(none.no_local_endpoint, ["shop/web"]);

        let elsewhere = with(
            json!([{"addresses": ["10.244.1.5"], "nodeName": "node-b", "conditions": {"ready": true}}]),
        );
        assert!(elsewhere.update.desired.addresses.is_empty());
        // Not served here, but kept silent here for the node that serves them.
        assert!(!elsewhere.update.desired.unserved.is_empty());
        assert_eq!(
            elsewhere.update.desired.unserved,
            none.update.desired.unserved
        );

        for (conditions, served) in [
            (
                json!({"ready": true, "serving": true, "terminating": false}),
                true,
            ),
            (json!({}), true),
            (
                json!({"ready": false, "serving": true, "terminating": false}),
                true,
            ),
            (
                json!({"ready": false, "serving": true, "terminating": true}),
                false,
            ),
            (json!({"ready": false, "serving": false}), false),
            (json!({"ready": false}), false),
        ] {
            let here = with(json!([
                {"addresses": ["10.244.0.5"], "nodeName": "node-a", "conditions": conditions.clone()},
                {"addresses": ["10.244.1.5"], "nodeName": "node-b", "conditions": {"ready": true}},
            ]));
            assert_eq!(
                !here.update.desired.addresses.is_empty(),
                served,
                "{conditions}"
            );
            assert_eq!(here.no_local_endpoint.is_empty(), served, "{conditions}");
        }

        // Every node with a usable endpoint is named, for the election of local addresses.
        let both = with(json!([
            {"addresses": ["10.244.0.5"], "nodeName": "node-a"},
            {"addresses": ["10.244.1.5"], "nodeName": "node-b", "conditions": {"ready": true}},
            {"addresses": ["10.244.2.5"], "nodeName": "node-c", "conditions": {"ready": false}},
        ]));
        let policies: Vec<_> = both.update.desired.addresses.values().collect();
        assert!(!policies.is_empty());
        for policy in policies {
            assert_eq!(
                policy.get("shop/web").unwrap().endpoint_nodes,
                Some(BTreeSet::from(["node-a".to_owned(), "node-b".to_owned()]))
            );
        }
        let cluster = service("api", json!({}));
        let translation = run(&[cluster], &[], None);
        assert!(
            translation
                .update
                .desired
                .addresses
                .values()
                .all(|intent| intent.get("shop/api").unwrap().endpoint_nodes.is_none())
        );

        // A slice of another service, or of a same-named service elsewhere, does not count.
        let other = run(
            std::slice::from_ref(&web),
            &[slice(
                "api",
                json!([{"addresses": ["10.244.0.9"], "nodeName": "node-a"}]),
            )],
            None,
        );
        assert!(other.update.desired.addresses.is_empty());
        let mut foreign = slice(
            "web",
            json!([{"addresses": ["10.244.0.9"], "nodeName": "node-a"}]),
        );
        foreign.metadata.namespace = Some("other".into());
        assert!(
            run(std::slice::from_ref(&web), &[foreign], None)
                .update
                .desired
                .addresses
                .is_empty()
        );

        // Cluster policy does not look at endpoints at all.
        let cluster = service("web", json!({}));
        assert_eq!(run(&[cluster], &[], None).update.desired.addresses.len(), 2);
    }

    #[test]
    fn the_exclusion_label_withdraws_everything() {
        let web = service("web", json!({}));
        let excluded = run(
            std::slice::from_ref(&web),
            &[],
            Some(&node(json!({EXCLUDE_LABEL: ""}))),
        );
        assert!(excluded.excluded);
        assert!(excluded.update.desired.addresses.is_empty());
        // Still known, so that the neighbours sink keeps them silent.
        assert!(!excluded.update.desired.unserved.is_empty());
        let labelled = run(
            &[web],
            &[],
            Some(&node(json!({"kubernetes.io/os": "linux"}))),
        );
        assert!(!labelled.excluded);
        assert_eq!(labelled.update.desired.addresses.len(), 2);
        // The routing sink selects protocols by them.
        assert_eq!(
            labelled.update.desired.node_labels,
            [("kubernetes.io/os".to_owned(), "linux".to_owned())].into()
        );
    }
}
