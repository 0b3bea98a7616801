//! lbagent: makes Kubernetes LoadBalancer addresses reachable and fast on every node.
//!
//! Data flows one way: sources produce the desired state, a reconciler diffs it against what
//! the kernel holds, and sinks apply it. This crate grows into that shape; today it holds the
//! eBPF dataplane and the command line that drives it.

pub mod address;
pub mod cli;
pub mod dataplane;
