//! What a Service asks the allocator for, read from its spec and annotations.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use super::{
    pool::Family,
    service::{Service, ServiceSpec},
};

/// Names the pool a Service draws from (automatic pools are skipped).
pub const POOL_ANNOTATION: &str = "lbagent.io/pool";
/// Requested addresses, comma-separated (one per family), instead of `spec.loadBalancerIP`.
pub const ADDRESSES_ANNOTATION: &str = "lbagent.io/addresses";
/// Services of one namespace with the same key share addresses.
pub const SHARING_ANNOTATION: &str = "lbagent.io/sharing-key";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FamilyPolicy {
    Single,
    PreferDual,
    RequireDual,
}

/// One Service of type LoadBalancer of the allocator's class.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub key: ServiceKey,
    /// creationTimestamp: of two Services holding one address, the older keeps it.
    pub created: String,
    pub labels: BTreeMap<String, String>,
    /// The families it wants, in its order; SingleStack keeps only the first.
    pub families: Vec<Family>,
    pub policy: FamilyPolicy,
    pub pool: Option<String>,
    /// Requested addresses with the field they were written in.
    pub requested: Vec<(IpAddr, String)>,
    pub sharing_key: Option<String>,
    /// (protocol, port) of every port, sorted, without repeats (a Vec: a set per Service
    /// cost half a kilobyte each, twice, for 10,000 Services).
    pub ports: Vec<(String, i32)>,
    pub local_traffic: bool,
    /// The addresses its status shows.
    pub current: Vec<IpAddr>,
    /// What is wrong with it, naming field and value: it then gets no address.
    pub invalid: Option<String>,
}

/// Whether the allocator serves `service`: type LoadBalancer and the configured class (none
/// configured: Services without a class), as the agent selects them.
pub fn is_ours(service: &Service, class: Option<&str>) -> bool {
    service.spec.as_ref().is_some_and(|spec| {
        spec.type_.as_deref() == Some("LoadBalancer")
            && spec.load_balancer_class.as_deref() == class
    })
}

pub fn key_of(service: &Service) -> ServiceKey {
    ServiceKey::new(
        service.metadata.namespace.as_deref().unwrap_or_default(),
        service.metadata.name.as_deref().unwrap_or_default(),
    )
}

/// The addresses in a Service's status.
pub fn status_addresses(service: &Service) -> Vec<IpAddr> {
    service
        .status
        .as_ref()
        .and_then(|status| status.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|ingress| ingress.ip.as_deref()?.parse().ok())
        .collect()
}

/// What `service` (one of ours) asks for.
pub fn read(service: &Service) -> Request {
    let no_spec = ServiceSpec::default();
    let spec = service.spec.as_ref().unwrap_or(&no_spec);
    let no_annotations = BTreeMap::new();
    let annotations = service
        .metadata
        .annotations
        .as_ref()
        .unwrap_or(&no_annotations);
    let mut invalid = None;
    let mut families = Vec::new();
    for (index, family) in spec.ip_families.iter().flatten().enumerate() {
        match family.as_str() {
            "IPv4" => families.push(Family::V4),
            "IPv6" => families.push(Family::V6),
            other => {
                invalid.get_or_insert(format!(
                    "spec.ipFamilies[{index}]: {other:?} is neither IPv4 nor IPv6"
                ));
            }
        }
    }
    if families.is_empty() {
        families.push(Family::V4);
    }
    let policy = match spec.ip_family_policy.as_deref() {
        None | Some("SingleStack") => FamilyPolicy::Single,
        Some("PreferDualStack") => FamilyPolicy::PreferDual,
        Some("RequireDualStack") => FamilyPolicy::RequireDual,
        Some(other) => {
            invalid.get_or_insert(format!(
                "spec.ipFamilyPolicy: {other:?} is not SingleStack, PreferDualStack or \
                 RequireDualStack"
            ));
            FamilyPolicy::Single
        }
    };
    if policy == FamilyPolicy::Single {
        families.truncate(1);
    }
    let mut requested = Vec::new();
    let mut request = |field: String, text: &str| {
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        match text.parse::<IpAddr>() {
            Ok(ip) if !families.contains(&Family::of(ip)) => {
                invalid.get_or_insert(format!(
                    "{field}: {text:?} is {}, a family the Service does not ask for \
                     (spec.ipFamilies, spec.ipFamilyPolicy)",
                    Family::of(ip)
                ));
            }
            Ok(ip)
                if requested
                    .iter()
                    .any(|(r, _)| Family::of(*r) == Family::of(ip)) =>
            {
                invalid.get_or_insert(format!(
                    "{field}: {text:?}: one address per family can be requested"
                ));
            }
            Ok(ip) => requested.push((ip, field)),
            Err(_) => {
                invalid.get_or_insert(format!("{field}: {text:?} is not an IP address"));
            }
        }
    };
    if let Some(ip) = &spec.load_balancer_ip {
        request("spec.loadBalancerIP".into(), ip);
    }
    if let Some(list) = annotations.get(ADDRESSES_ANNOTATION) {
        for text in list.split(',') {
            request(
                format!("metadata.annotations[\"{ADDRESSES_ANNOTATION}\"]"),
                text,
            );
        }
    }
    let mut ports = spec
        .ports
        .iter()
        .flatten()
        .map(|port| {
            (
                port.protocol.clone().unwrap_or_else(|| "TCP".into()),
                port.port,
            )
        })
        .collect::<Vec<_>>();
    ports.sort_unstable();
    ports.dedup();
    Request {
        key: key_of(service),
        created: service
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        labels: service.metadata.labels.clone().unwrap_or_default(),
        families,
        policy,
        pool: annotations
            .get(POOL_ANNOTATION)
            .filter(|p| !p.is_empty())
            .cloned(),
        requested,
        sharing_key: annotations
            .get(SHARING_ANNOTATION)
            .filter(|k| !k.is_empty())
            .cloned(),
        ports,
        local_traffic: spec.external_traffic_policy.as_deref() == Some("Local"),
        current: status_addresses(service),
        invalid,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn service(spec: Value, annotations: Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "a", "annotations": annotations},
            "spec": spec,
        }))
        .expect("service")
    }

    #[test]
    fn garbage_is_named_by_field_and_value() {
        let read = |spec, annotations| read(&service(spec, annotations)).invalid;
        assert_eq!(
            read(json!({"loadBalancerIP": "banana"}), json!({})).as_deref(),
            Some("spec.loadBalancerIP: \"banana\" is not an IP address")
        );
        assert_eq!(
            read(json!({"loadBalancerIP": "2001:db8::1"}), json!({})).as_deref(),
            Some(
                "spec.loadBalancerIP: \"2001:db8::1\" is IPv6, a family the Service does not \
                 ask for (spec.ipFamilies, spec.ipFamilyPolicy)"
            )
        );
        assert_eq!(
            read(
                json!({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}),
                json!({ADDRESSES_ANNOTATION: "192.0.2.1, 192.0.2.2"})
            )
            .as_deref(),
            Some(
                "metadata.annotations[\"lbagent.io/addresses\"]: \"192.0.2.2\": one address \
                 per family can be requested"
            )
        );
        assert_eq!(
            read(json!({"loadBalancerIP": "192.0.2.1"}), json!({})),
            None
        );
    }

    #[test]
    fn families_follow_the_policy() {
        let families = |spec| read(&service(spec, json!({}))).families;
        assert_eq!(families(json!({})), vec![Family::V4]);
        assert_eq!(
            families(json!({"ipFamilies": ["IPv6", "IPv4"]})),
            vec![Family::V6]
        );
        assert_eq!(
            families(json!({"ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "PreferDualStack"})),
            vec![Family::V6, Family::V4]
        );
    }
}
