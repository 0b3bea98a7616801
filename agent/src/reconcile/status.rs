//! The published status: what the reconciler publishes after every pass (and whenever a sink's
//! report changes between passes). The face reads it: the status file, `/readyz`, `/metrics`.

use serde::{Deserialize, Serialize};

use crate::{
    desired::{AddressStatus, Rejected},
    sinks::{neighbours::NeighbourReport, routing::RoutingStatus},
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node: String,
    pub interface: String,
    pub reconciles: u64,
    pub last_reconcile: LastReconcile,
    pub addresses: Vec<AddressStatus>,
    pub rejected: Vec<Rejected>,
    /// Errors of the last reconcile; empty when everything applied.
    pub errors: Vec<String>,
    /// BIRD and its protocols, when lbagent runs or feeds one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<RoutingStatus>,
    /// Local addresses: who answers for each, when the neighbours sink runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub neighbours: Option<NeighbourReport>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LastReconcile {
    pub trigger: String,
    pub duration_ms: f64,
    pub added: usize,
    pub removed: usize,
    pub repairs: usize,
}
