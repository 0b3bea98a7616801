//! A Service as the allocator reads it. The allocator decodes every Service twice per
//! assignment (the watch's event, then the echo of its own status write) and once more per
//! write answer; decoded into this, the fields it never reads (managedFields, clusterIPs,
//! selector, session affinity, port names and node ports...) are skipped without being
//! allocated.

use std::collections::BTreeMap;

use k8s_openapi::{
    NamespaceResourceScope,
    api::core::v1::Service as FullService,
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde::{Deserialize, Deserializer};

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Service {
    #[serde(default, deserialize_with = "metadata")]
    pub metadata: ObjectMeta,
    pub spec: Option<ServiceSpec>,
    pub status: Option<ServiceStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(rename = "type")]
    pub type_: Option<String>,
    pub load_balancer_class: Option<String>,
    #[serde(rename = "loadBalancerIP")]
    pub load_balancer_ip: Option<String>,
    pub ip_families: Option<Vec<String>>,
    pub ip_family_policy: Option<String>,
    pub ports: Option<Vec<ServicePort>>,
    pub external_traffic_policy: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct ServicePort {
    pub port: i32,
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    pub load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct LoadBalancerStatus {
    pub ingress: Option<Vec<LoadBalancerIngress>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct LoadBalancerIngress {
    pub ip: Option<String>,
}

/// The object metadata the allocator and kube's watcher read; the rest is skipped.
fn metadata<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Default, Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Read {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        creation_timestamp: Option<Time>,
        labels: Option<BTreeMap<String, String>>,
        annotations: Option<BTreeMap<String, String>>,
    }
    let read = Option::<Read>::deserialize(deserializer)?.unwrap_or_default();
    Ok(ObjectMeta {
        name: read.name,
        namespace: read.namespace,
        uid: read.uid,
        resource_version: read.resource_version,
        creation_timestamp: read.creation_timestamp,
        labels: read.labels,
        annotations: read.annotations,
        ..ObjectMeta::default()
    })
}

impl k8s_openapi::Resource for Service {
    const API_VERSION: &'static str = FullService::API_VERSION;
    const GROUP: &'static str = FullService::GROUP;
    const KIND: &'static str = FullService::KIND;
    const VERSION: &'static str = FullService::VERSION;
    const URL_PATH_SEGMENT: &'static str = FullService::URL_PATH_SEGMENT;
    type Scope = NamespaceResourceScope;
}

impl k8s_openapi::Metadata for Service {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use kube::ResourceExt as _;
    use serde_json::json;

    use super::*;

    /// A Service as a real API server sends it, fields the allocator skips included.
    #[test]
    fn a_full_service_reads_as_the_fields_the_allocator_uses() {
        let service: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": "web", "namespace": "shop", "uid": "u-1", "resourceVersion": "42",
                "creationTimestamp": "2026-12-01T10:00:00Z", "generation": 1,
                "labels": {"app": "web"},
                "annotations": {"lbagent.io/pool": "public"},
                "managedFields": [{"manager": "kubectl", "operation": "Update",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {"f:ports": {}}}}],
                "finalizers": ["service.kubernetes.io/load-balancer-cleanup"],
            },
            "spec": {
                "type": "LoadBalancer", "loadBalancerIP": "192.0.2.1",
                "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack",
                "externalTrafficPolicy": "Local", "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10"], "selector": {"app": "web"},
                "sessionAffinity": "None", "allocateLoadBalancerNodePorts": true,
                "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                    "targetPort": "http", "nodePort": 30080}],
            },
            "status": {"loadBalancer": {"ingress": [
                {"ip": "192.0.2.1", "ipMode": "VIP", "ports": [{"port": 80, "protocol": "TCP"}]}
            ]}},
        }))
        .expect("a Service");
        assert_eq!(service.name_any(), "web");
        assert_eq!(service.namespace().as_deref(), Some("shop"));
        assert_eq!(service.uid().as_deref(), Some("u-1"));
        assert_eq!(service.resource_version().as_deref(), Some("42"));
        assert_eq!(service.labels().get("app").map(String::as_str), Some("web"));
        assert!(service.metadata.managed_fields.is_none());
        let spec = service.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
        assert_eq!(spec.load_balancer_ip.as_deref(), Some("192.0.2.1"));
        assert_eq!(spec.ip_families.expect("families"), ["IPv4", "IPv6"]);
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Local"));
        let ports = spec.ports.expect("ports");
        assert_eq!(
            (ports[0].port, ports[0].protocol.as_deref()),
            (80, Some("TCP"))
        );
        let ingress = service.status.and_then(|s| s.load_balancer?.ingress);
        assert_eq!(
            ingress.expect("ingress")[0].ip.as_deref(),
            Some("192.0.2.1")
        );
    }

    /// Null where an object or a list may stand reads as absent, as the full type reads it.
    #[test]
    fn nulls_read_as_absent() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "labels": null},
            "spec": {"ports": null, "ipFamilies": null},
            "status": null,
        }))
        .expect("a Service");
        assert!(service.metadata.labels.is_none());
        assert!(service.spec.expect("spec").ports.is_none());
        assert!(service.status.is_none());
    }
}
