//! lbagent: makes Kubernetes LoadBalancer addresses reachable and fast on every node.
//!
//! Data flows one way: sources produce the desired state, a reconciler diffs it against what
//! the kernel holds, and sinks apply it:
//!
//! ```text
//! sources::file ─► desired::SourceUpdate ─► reconcile (plan: a pure diff) ─► sinks::addresses
//! ```
//!
//! `dataplane` holds the eBPF side, driven from the command line until it joins the sinks.

pub mod address;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod desired;
pub mod http;
pub mod membership;
pub mod metrics;
pub mod rates;
pub mod reconcile;
pub mod sinks;
pub mod sources;
pub mod status;
pub mod watch;
pub mod yaml;
