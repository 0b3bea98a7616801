//! Sources of the desired state. A source knows nothing of the sinks: it publishes
//! [`SourceUpdate`](crate::desired::SourceUpdate)s and the reconciler takes it from there.

pub mod file;
pub mod kubernetes;
