//! The Kubernetes translation: whatever Services, EndpointSlices and Node the API server
//! sends (any JSON the client would deserialize), the translation returns a desired state
//! and rejections with reasons, never a panic.
#![no_main]

use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use lbagent::fuzzing::{Selection, translate};
use libfuzzer_sys::fuzz_target;

/// What the watchers hold at one moment, as JSON (the seeds in fuzz/seeds/kubernetes).
#[derive(serde::Deserialize)]
struct Cluster {
    #[serde(default)]
    services: Vec<Service>,
    #[serde(default)]
    slices: Vec<EndpointSlice>,
    node: Option<Node>,
    #[serde(default)]
    class: Option<String>,
}

fuzz_target!(|data: &[u8]| {
    let Ok(cluster) = serde_json::from_slice::<Cluster>(data) else {
        return;
    };
    let selection = Selection {
        node_name: "node-a".to_owned(),
        load_balancer_class: cluster.class.clone(),
    };
    let slices: Vec<&EndpointSlice> = cluster.slices.iter().collect();
    let translation = translate(
        &cluster.services,
        &slices,
        cluster.node.as_ref(),
        &selection,
    );
    for rejected in &translation.update.rejected {
        assert!(!rejected.reason.is_empty(), "{rejected:?} has no reason");
    }
    if translation.excluded {
        // Its labels still choose its routing protocols; it holds no address.
        assert!(
            translation.update.desired.addresses.is_empty(),
            "an excluded node serves nothing: {:?}",
            translation.update.desired.addresses
        );
    }
    // The order the watchers list objects in does not matter.
    let reversed: Vec<Service> = cluster.services.iter().rev().cloned().collect();
    let again = translate(&reversed, &slices, cluster.node.as_ref(), &selection);
    assert_eq!(again.update.desired, translation.update.desired);
});
