//! The reconciler: drives every sink through its pass (observe, plan, apply) until what they
//! own matches the wanted state, and publishes what they report. A pass runs when the desired
//! state changes, when the config's routing section changes, when a sink notices a change
//! outside lbagent, on a periodic resync, on SIGHUP, and after a failure (with backoff).
//!
//! It never acts before the source has delivered a first complete state: an agent that has
//! just started must not withdraw addresses it simply has not heard about yet.
//!
//! Its sinks can change while it runs (a config edit adds, replaces or removes one): each
//! [`Change`] is taken between two passes, and a pass follows.

mod status;

use std::time::{Duration, Instant};

use futures::future::select_all;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument as _, debug, debug_span, error};

pub use self::status::{LastReconcile, Status};
use crate::{
    desired::{AddressStatus, Rejected, SourceUpdate},
    sinks::{Driven, Noticed, Report, Trigger, Wanted, routing::model::RoutingConfig},
};

/// First retry after a failed pass; doubles up to the resync interval.
const FIRST_RETRY: Duration = Duration::from_millis(500);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabel {
    pub trigger: String,
}

/// What the reconciler counts of its own passes, as `/metrics` exports them. Cheap to clone:
/// the metrics are shared.
#[derive(Clone, Debug)]
pub struct ReconcileMetrics {
    pub runs: Family<TriggerLabel, Counter>,
    pub failures: Counter,
    pub duration: Histogram,
}

impl Default for ReconcileMetrics {
    fn default() -> Self {
        Self {
            runs: Family::default(),
            failures: Counter::default(),
            // 0.5 ms to about 4 s: a resync of a few addresses to a cold start of 10,000.
            duration: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
        }
    }
}

/// What the last pass did, beyond what the sinks report.
struct LastPass {
    trigger: Trigger,
    duration: Duration,
    errors: Vec<String>,
    rejected: Vec<Rejected>,
    /// The sinks it skipped as settled: they changed nothing.
    skipped: Vec<Slot>,
}

/// Where a sink sits in the reconciler's order: addresses before the dataplane that serves
/// them, routing last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Slot {
    Addresses,
    Dataplane,
    /// Answers ARP and NDP through the dataplane's program: after it, and only with it.
    Neighbours,
    Routing,
}

/// A change to what the reconciler drives, sent by whoever follows the config.
pub enum Change {
    /// Puts a sink in its slot (replacing the one there), or empties the slot.
    Sink(Slot, Option<Box<dyn Driven>>),
    ResyncInterval(Duration),
    /// A configured part that is off, with why (`None`: on again). The status shows it and
    /// the agent is not ready meanwhile.
    Off(Slot, Option<String>),
    /// The last config edit lbagent refused, with why (`None`: the running config is the
    /// file's).
    ConfigRefused(Option<String>),
}

pub struct Reconciler {
    /// In slot order.
    sinks: Vec<(Slot, Box<dyn Driven>)>,
    off: std::collections::BTreeMap<Slot, String>,
    config_refused: Option<String>,
    node: String,
    reconciles: u64,
    last: Option<LastPass>,
    applied: watch::Sender<Option<Status>>,
    /// The addresses part alone, for the source: it tells its users what became of theirs.
    outcomes: watch::Sender<Option<Vec<AddressStatus>>>,
    metrics: ReconcileMetrics,
}

pub struct Inputs {
    pub updates: watch::Receiver<Option<SourceUpdate>>,
    /// The running config's routing section, as the config file follower sees it.
    pub routing: watch::Receiver<Option<RoutingConfig>>,
    pub resync_interval: Duration,
    pub resync_now: mpsc::Receiver<()>,
    pub changes: mpsc::UnboundedReceiver<Change>,
}

impl Reconciler {
    pub fn new(node: String, sinks: Vec<(Slot, Box<dyn Driven>)>) -> Self {
        let mut reconciler = Self {
            sinks: Vec::new(),
            off: Default::default(),
            config_refused: None,
            node,
            reconciles: 0,
            last: None,
            applied: watch::Sender::new(None),
            outcomes: watch::Sender::new(None),
            metrics: ReconcileMetrics::default(),
        };
        for (slot, sink) in sinks {
            reconciler.set(slot, Some(sink));
        }
        reconciler
    }

    fn set(&mut self, slot: Slot, sink: Option<Box<dyn Driven>>) {
        self.sinks.retain(|(held, _)| *held != slot);
        if let Some(sink) = sink {
            let at = self.sinks.partition_point(|(held, _)| *held < slot);
            self.sinks.insert(at, (slot, sink));
        }
    }

    /// Counts every pass into `metrics` (shared with the registry that exports them).
    pub fn with_metrics(mut self, metrics: ReconcileMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The published status: what the sinks hold after each pass.
    pub fn applied(&self) -> watch::Receiver<Option<Status>> {
        self.applied.subscribe()
    }

    /// What became of each desired address, after each pass that changed it.
    pub fn outcomes(&self) -> watch::Receiver<Option<Vec<AddressStatus>>> {
        self.outcomes.subscribe()
    }

    /// Runs until the source is gone.
    pub async fn run(&mut self, mut inputs: Inputs) {
        let mut resync_interval = inputs.resync_interval;
        let mut resync = tokio::time::interval(resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.reset();
        let mut retry: Option<(tokio::time::Instant, Duration)> = None;
        loop {
            let retry_at = retry.map_or_else(tokio::time::Instant::now, |(at, _)| at);
            let trigger = tokio::select! {
                changed = inputs.updates.changed() => match changed {
                    Ok(()) => Some(Trigger::Desired),
                    Err(_) => return,
                },
                Ok(()) = inputs.routing.changed() => Some(Trigger::Config),
                noticed = noticed(&mut self.sinks) => match noticed {
                    Noticed::Drift => Some(Trigger::Kernel),
                    Noticed::Membership => Some(Trigger::Membership),
                    Noticed::Report => None,
                },
                Some(()) = inputs.resync_now.recv() => Some(Trigger::Signal),
                Some(change) = inputs.changes.recv() => {
                    self.take(change, &mut resync_interval).then_some(Trigger::Config)
                }
                _ = resync.tick() => Some(Trigger::Resync),
                () = tokio::time::sleep_until(retry_at), if retry.is_some() => Some(Trigger::Retry),
            };
            // Every change sent so far, whatever woke this pass: no pass runs with a sink
            // the config has replaced.
            let mut changed = false;
            while let Ok(change) = inputs.changes.try_recv() {
                changed |= self.take(change, &mut resync_interval);
            }
            if resync.period() != resync_interval {
                resync = tokio::time::interval(resync_interval);
                resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                resync.reset();
            }
            // Only a pass for a new desired state alone may skip the sinks it leaves as
            // they are: anything else (a drift, a resync, a sink replaced) runs every sink.
            let for_desired = trigger == Some(Trigger::Desired) && !changed;
            let Some(trigger) = trigger.or(changed.then_some(Trigger::Config)) else {
                self.publish();
                continue;
            };
            // A desired state that arrived meanwhile is what this run applies.
            let trigger = match inputs.updates.has_changed() {
                Ok(true) => Trigger::Desired,
                _ => trigger,
            };
            let Some(update) = inputs.updates.borrow_and_update().clone() else {
                continue;
            };
            let routing = inputs.routing.borrow_and_update().clone();
            // A copy that has seen this update: it tells when a newer one arrives.
            let newer = inputs.updates.clone();
            let superseded = move || newer.has_changed().unwrap_or(false);
            let failed = self
                .reconcile(update, routing.as_ref(), trigger, for_desired, &superseded)
                .await;
            retry = failed.then(|| {
                let delay = retry.map_or(FIRST_RETRY, |(_, d)| (d * 2).min(resync_interval));
                (tokio::time::Instant::now() + delay, delay)
            });
        }
    }

    /// Takes one change; returns whether a pass must follow (a sink changed).
    fn take(&mut self, change: Change, resync_interval: &mut Duration) -> bool {
        match change {
            Change::Sink(slot, sink) => {
                self.set(slot, sink);
                true
            }
            Change::ResyncInterval(interval) => {
                *resync_interval = interval;
                false
            }
            Change::Off(slot, reason) => {
                match reason {
                    Some(reason) => self.off.insert(slot, reason),
                    None => self.off.remove(&slot),
                };
                false
            }
            Change::ConfigRefused(reason) => {
                self.config_refused = reason;
                false
            }
        }
    }

    /// One pass of every sink (with `skip_settled`, of every sink not settled for this
    /// wanted state), then the status published. Returns whether anything failed.
    pub async fn reconcile(
        &mut self,
        update: SourceUpdate,
        routing: Option<&RoutingConfig>,
        trigger: Trigger,
        skip_settled: bool,
        superseded: &dyn Fn() -> bool,
    ) -> bool {
        let started = Instant::now();
        self.reconciles += 1;
        let wanted = Wanted {
            desired: &update.desired,
            routing,
            trigger,
            superseded,
        };
        let mut errors = Vec::new();
        let mut skipped = Vec::new();
        for (slot, sink) in &mut self.sinks {
            if skip_settled && sink.settled(&wanted) {
                debug!(?slot, "sink settled for this desired state: pass skipped");
                skipped.push(*slot);
                continue;
            }
            let span = debug_span!("sink", slot = ?slot);
            errors.extend(sink.pass(&wanted).instrument(span).await);
        }
        // A failure that stays (a full map) is logged when it starts, not on every retry.
        let before = self.last.as_ref().map(|last| last.errors.as_slice());
        for err in &errors {
            if before.is_some_and(|before| before.contains(err)) {
                debug!(%err, "reconcile step still failing; will retry");
            } else {
                error!(%err, "reconcile step failed; will retry");
            }
        }
        let duration = started.elapsed();
        debug!(%trigger, ms = duration.as_secs_f64() * 1e3, "reconcile pass");
        let failed = !errors.is_empty();
        let label = TriggerLabel {
            trigger: trigger.label().to_owned(),
        };
        self.metrics.runs.get_or_create(&label).inc();
        self.metrics.duration.observe(duration.as_secs_f64());
        if failed {
            self.metrics.failures.inc();
        }
        self.last = Some(LastPass {
            trigger,
            duration,
            errors,
            rejected: update.rejected,
            skipped,
        });
        self.publish();
        failed
    }

    /// Publishes what the sinks report now; nothing before the first pass.
    pub fn publish(&self) {
        let Some(last) = &self.last else {
            return;
        };
        let mut status = Status {
            node: self.node.clone(),
            interface: String::new(),
            reconciles: self.reconciles,
            last_reconcile: LastReconcile {
                trigger: last.trigger.to_string(),
                duration_ms: last.duration.as_secs_f64() * 1e3,
                added: 0,
                removed: 0,
                repairs: 0,
            },
            addresses: Vec::new(),
            rejected: last.rejected.clone(),
            errors: last.errors.clone(),
            routing: None,
            neighbours: None,
            off: self.off.values().cloned().collect(),
            config_refused: self.config_refused.clone(),
        };
        for (slot, sink) in &self.sinks {
            match sink.report() {
                Report::Addresses(report) => {
                    status.interface = report.interface;
                    status.addresses = report.addresses;
                    // What its last pass changed; a skipped sink changed nothing.
                    if !last.skipped.contains(slot) {
                        status.last_reconcile.added = report.added;
                        status.last_reconcile.removed = report.removed;
                        status.last_reconcile.repairs = report.repairs;
                    }
                }
                Report::Dataplane => {}
                Report::Routing(report) => status.routing = Some(report),
                Report::Neighbours(report) => status.neighbours = Some(report),
            }
        }
        if let Some(neighbours) = &status.neighbours {
            for address in &mut status.addresses {
                address.neighbour = neighbours.outcome(address.address);
            }
        }
        self.outcomes.send_if_modified(|outcomes| {
            let changed = outcomes.as_ref() != Some(&status.addresses);
            if changed {
                *outcomes = Some(status.addresses.clone());
            }
            changed
        });
        self.applied.send_replace(Some(status));
    }
}

/// The first change any sink notices.
async fn noticed(sinks: &mut [(Slot, Box<dyn Driven>)]) -> Noticed {
    if sinks.is_empty() {
        return std::future::pending().await;
    }
    select_all(sinks.iter_mut().map(|(_, sink)| sink.noticed()))
        .await
        .0
}
