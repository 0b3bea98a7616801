//! lbagent: makes Kubernetes LoadBalancer addresses reachable and fast on every node.
//!
//! Data flows one way: sources produce the desired state, the reconciler drives the sinks
//! (observe, plan, apply, report), and the face reads what they report:
//!
//! ```text
//! sources ─► desired ─► reconcile ─► sinks (addresses, dataplane, routing)
//!                           │
//!                           └─► published status ─► status file, /metrics, /readyz, CLI
//! ```
//!
//! ARCHITECTURE.md says where each part lives and what it may import. The library exports
//! only what the binary and the integration tests use, so that the compiler finds the rest
//! unused if it is.

mod address;
pub mod allocator;
mod cli;
mod config;
mod daemon;
mod dataplane;
mod desired;
mod files;
mod http;
mod logging;
mod membership;
mod metrics;
mod rates;
mod reconcile;
mod sinks;
mod sources;
mod status_file;
mod watch;
mod yaml;

pub use crate::{
    // The binary.
    cli::{Cli, run},
    // The deployment and docs tests hold the shipped config, RBAC and the README's examples
    // against these.
    config::{Config, Source},
    // The TestRun tests load the object and drive its maps as the dataplane sink does.
    dataplane::{
        Lease, Maps, NeighbourCounters, NeighbourMaps, PinLayout, PortId, Role, VipPolicy, object,
    },
    desired::{Desired, PortSpec, Protocol, Service, TrafficPolicy},
    // The load tests hold the endpoint's limits against these.
    http::{HEADER_TIMEOUT, MAX_CONNECTIONS},
    // The L2 tests read the member list `lbagent membership` publishes.
    membership::{Members, kubernetes::API_ACCESS as MEMBERSHIP_API_ACCESS},
    sinks::{
        dataplane::{
            DataplaneSink,
            plan::{Entries, diff, entries},
        },
        neighbours::{announce::Announcer, election},
        routing::model::Mode,
    },
    sources::{
        file::parse as parse_services,
        // The Kubernetes tests fill a cluster past this.
        kubernetes::{API_ACCESS, ApiAccess, MAX_LOAD_BALANCERS},
    },
};

/// What the fuzz targets (fuzz/, a crate outside the workspace) feed besides the exports above:
/// the parsers of outside input that nothing else outside this crate calls.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::{
        dataplane::{PinLayout, prepare},
        sinks::routing::control::{Framed, Framer, parse_protocols},
        sources::kubernetes::translate::{Selection, translate},
    };
}
