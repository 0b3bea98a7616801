//! Sinks: each owns one kind of kernel or daemon state and is the only code that changes it.
//!
//! Every sink keeps the same contract, [`Sink`]: it observes what it owns, plans from the
//! wanted state (a pure function in the sink's `plan.rs`, so tests drive it directly), applies
//! the plan, and reports what holds now. The reconciler drives every sink through it, in order,
//! one pass at a time. A new sink is a new module here, a [`Report`] variant, and one line where
//! the agent is wired (`daemon.rs`).

pub mod addresses;
pub mod dataplane;
pub mod neighbours;
pub mod routing;

use std::{fmt, future::Future, time::Instant};

use futures::future::LocalBoxFuture;
use tracing::debug;

use crate::desired::Desired;

/// Why a pass runs. Sinks say it in their logs; the metrics count passes by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// The source's desired state changed.
    Desired,
    /// What a sink owns changed outside lbagent (netlink said so).
    Kernel,
    /// lbagent's own config file changed (a section a sink plans from, or a sink itself).
    Config,
    /// The live members changed (`lbagent membership`): local addresses may change owner.
    Membership,
    Resync,
    Signal,
    Retry,
}

impl Trigger {
    /// The short name metrics use.
    pub fn label(self) -> &'static str {
        match self {
            Self::Desired => "desired",
            Self::Kernel => "kernel",
            Self::Config => "config",
            Self::Membership => "membership",
            Self::Resync => "resync",
            Self::Signal => "signal",
            Self::Retry => "retry",
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Desired => "desired state changed",
            Self::Kernel => "kernel changed",
            Self::Config => "config file changed",
            Self::Membership => "members changed",
            Self::Resync => "periodic resync",
            Self::Signal => "SIGHUP",
            Self::Retry => "retry",
        })
    }
}

/// What every sink plans from: the source's desired state, lbagent's own config for the sinks
/// that take one, and why this pass runs.
pub struct Wanted<'a> {
    pub desired: &'a Desired,
    /// The routing section of the running config (`None`: no routing).
    pub routing: Option<&'a routing::model::RoutingConfig>,
    pub trigger: Trigger,
    /// Whether a newer desired state has arrived since this pass began: a long apply stops
    /// between batches when it has, and the next pass plans from the newer state.
    pub superseded: &'a dyn Fn() -> bool,
}

/// What a sink holds now, as the published status shows it.
#[derive(Clone, Debug, PartialEq)]
pub enum Report {
    Addresses(addresses::AddressReport),
    /// The dataplane's state is in its pinned maps, which the status reads itself.
    Dataplane,
    Routing(routing::RoutingStatus),
    Neighbours(neighbours::NeighbourReport),
}

/// What a sink noticed between passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Noticed {
    /// What it owns changed outside lbagent: a pass puts it right.
    Drift,
    /// Only its report changed (BIRD's sessions moved): the status is published again.
    Report,
    /// The live members changed: a pass elects the owners of local addresses again.
    Membership,
}

/// The contract every sink keeps.
pub trait Sink {
    /// What the sink finds in the kernel or daemon it owns.
    type Observed;
    /// The changes that make that match the wanted state.
    type Plan;
    type Error: fmt::Display;

    fn observe(&mut self) -> impl Future<Output = Result<Self::Observed, Self::Error>>;

    /// Pure: the sink's `plan.rs` function of `wanted` and `observed`.
    fn plan(&self, wanted: &Wanted<'_>, observed: &Self::Observed) -> Self::Plan;

    /// Applies `plan` as far as it can. Returns what failed; the next pass tries it again.
    fn apply(
        &mut self,
        plan: Self::Plan,
        observed: Self::Observed,
        wanted: &Wanted<'_>,
    ) -> impl Future<Output = Vec<String>>;

    /// What holds now, after the last pass.
    fn report(&self) -> Report;

    /// Resolves when the sink notices a change between passes; never, for a sink that has
    /// nothing to watch.
    fn noticed(&mut self) -> impl Future<Output = Noticed> {
        std::future::pending()
    }

    /// Whether a pass for `wanted` would find nothing to do: the part of `wanted` the sink
    /// plans from is the one its last pass applied in full (no error, nothing left for a
    /// later pass), and it has noticed nothing since (so only a sink that notices changes to
    /// what it owns can be settled). A pass for a new desired state skips a settled sink;
    /// every other trigger (a noticed change, a resync, a retry, SIGHUP, a config edit) runs
    /// every sink. The default: never settled.
    fn settled(&self, _wanted: &Wanted<'_>) -> bool {
        false
    }
}

/// A sink as the reconciler holds it: any [`Sink`], driven the same way.
pub trait Driven {
    /// Observe, plan, apply. Returns what failed.
    fn pass<'a>(&'a mut self, wanted: &'a Wanted<'a>) -> LocalBoxFuture<'a, Vec<String>>;
    fn report(&self) -> Report;
    fn noticed(&mut self) -> LocalBoxFuture<'_, Noticed>;
    fn settled(&self, wanted: &Wanted<'_>) -> bool;
}

impl<S: Sink> Driven for S {
    fn pass<'a>(&'a mut self, wanted: &'a Wanted<'a>) -> LocalBoxFuture<'a, Vec<String>> {
        Box::pin(async move {
            let started = Instant::now();
            match self.observe().await {
                Ok(observed) => {
                    let observed_at = Instant::now();
                    let plan = Sink::plan(self, wanted, &observed);
                    let planned_at = Instant::now();
                    let errors = self.apply(plan, observed, wanted).await;
                    debug!(
                        observe_ms = (observed_at - started).as_secs_f64() * 1e3,
                        plan_ms = (planned_at - observed_at).as_secs_f64() * 1e3,
                        apply_ms = planned_at.elapsed().as_secs_f64() * 1e3,
                        "sink pass"
                    );
                    errors
                }
                Err(err) => vec![err.to_string()],
            }
        })
    }

    fn report(&self) -> Report {
        Sink::report(self)
    }

    fn noticed(&mut self) -> LocalBoxFuture<'_, Noticed> {
        Box::pin(Sink::noticed(self))
    }

    fn settled(&self, wanted: &Wanted<'_>) -> bool {
        Sink::settled(self, wanted)
    }
}

/// What the kernel accepts as an interface name (IFNAMSIZ, no separators).
pub fn is_interface_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
}

/// Whether this network namespace has IPv6: the module may be absent (`ipv6.disable=1`) or
/// switched off by sysctl. An IPv6 address on a node without it is neither held nor served.
pub fn node_has_ipv6() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/conf/all/disable_ipv6")
        .is_ok_and(|value| value.trim() == "0")
}

/// The errno of a netlink error reply, positive.
pub fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| -code.get()),
        _ => None,
    }
}

/// A link message's interface name.
pub fn link_name(link: &rtnetlink::packet_route::link::LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|attr| match attr {
        rtnetlink::packet_route::link::LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}
