//! What a kubelet resolves from a pod spec, for the tests that read the shipped manifests.

use k8s_openapi::{
    api::core::v1::{Container, HTTPGetAction},
    apimachinery::pkg::util::intstr::IntOrString,
};

/// The container port an HTTP probe calls: given as a number, or by the name of one of the
/// container's ports (a name the container lacks fails the test, as the kubelet refuses it).
pub fn probe_port(container: &Container, get: &HTTPGetAction) -> i32 {
    match &get.port {
        IntOrString::Int(port) => *port,
        IntOrString::String(name) => {
            container
                .ports
                .iter()
                .flatten()
                .find(|port| port.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("the probe names port {name:?}, the container has none"))
                .container_port
        }
    }
}
