//! The reconciler: compares the desired state with what the kernel holds and drives the
//! sinks until they match. It runs when the desired state changes, when netlink reports a
//! change that could matter, on a periodic resync, and on SIGHUP.
//!
//! It never acts before the source has delivered a first complete state: an agent that has
//! just started must not withdraw addresses it simply has not heard about yet.

pub mod plan;

use std::{
    collections::BTreeSet,
    fmt,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::{
    desired::SourceUpdate,
    metrics::{ReconcileMetrics, TriggerLabel},
    sinks::{
        addresses::{AddressError, AddressSink},
        dataplane::DataplaneSink,
    },
    status::{AddressState, AddressStatus, LastReconcile, Status, StatusWriter},
};

/// How long netlink events are left to settle before reconciling: one change made by a tool
/// arrives as several messages, and lbagent's own changes echo back.
const SETTLE: Duration = Duration::from_millis(20);
/// First retry after a failed apply; doubles up to the resync interval.
const FIRST_RETRY: Duration = Duration::from_millis(500);
/// Longest list of addresses logged one by one; longer ones are summarised.
const LOG_EACH: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Desired,
    Kernel,
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
            Self::Resync => "periodic resync",
            Self::Signal => "SIGHUP",
            Self::Retry => "retry",
        })
    }
}

/// What lbagent left in the kernel after its last apply: anything different found later was
/// changed by someone else, and putting it back is a repair.
struct Expected {
    link_index: u32,
    addresses: BTreeSet<IpNet>,
}

pub struct Reconciler {
    sink: AddressSink,
    /// The policy maps, when the eBPF dataplane is on.
    dataplane: Option<DataplaneSink>,
    status: StatusWriter,
    node: String,
    expected: Option<Expected>,
    reconciles: u64,
    /// Every status written also goes here, for those who act on what was applied.
    applied: watch::Sender<Option<Status>>,
    metrics: ReconcileMetrics,
}

pub struct Inputs {
    pub updates: watch::Receiver<Option<SourceUpdate>>,
    pub kernel_changes: mpsc::Receiver<()>,
    pub resync_interval: Duration,
    pub resync_now: mpsc::Receiver<()>,
}

impl Reconciler {
    pub fn new(sink: AddressSink, status: StatusWriter, node: String) -> Self {
        Self {
            sink,
            dataplane: None,
            status,
            node,
            expected: None,
            reconciles: 0,
            applied: watch::Sender::new(None),
            metrics: ReconcileMetrics::default(),
        }
    }

    /// Counts every run into `metrics` (shared with the registry that exports them).
    pub fn with_metrics(mut self, metrics: ReconcileMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// What each reconcile applied, as the status file says it.
    pub fn applied(&self) -> watch::Receiver<Option<Status>> {
        self.applied.subscribe()
    }

    /// Keeps the dataplane's policy maps as the desired state says, after the addresses.
    pub fn with_dataplane(mut self, dataplane: DataplaneSink) -> Self {
        self.dataplane = Some(dataplane);
        self
    }

    /// Runs until every input is gone.
    pub async fn run(mut self, mut inputs: Inputs) {
        let mut resync = tokio::time::interval(inputs.resync_interval);
        resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        resync.reset();
        let mut retry: Option<(tokio::time::Instant, Duration)> = None;
        loop {
            let trigger = tokio::select! {
                changed = inputs.updates.changed() => match changed {
                    Ok(()) => Trigger::Desired,
                    Err(_) => return,
                },
                Some(()) = inputs.kernel_changes.recv() => {
                    tokio::time::sleep(SETTLE).await;
                    while inputs.kernel_changes.try_recv().is_ok() {}
                    Trigger::Kernel
                }
                Some(()) = inputs.resync_now.recv() => Trigger::Signal,
                _ = resync.tick() => Trigger::Resync,
                _ = async { tokio::time::sleep_until(retry.map_or_else(tokio::time::Instant::now, |r| r.0)).await }, if retry.is_some() => Trigger::Retry,
            };
            let Some(update) = inputs.updates.borrow_and_update().clone() else {
                continue;
            };
            let failed = self.reconcile(&update, trigger).await;
            retry = if failed {
                let delay = retry.map_or(FIRST_RETRY, |(_, d)| (d * 2).min(inputs.resync_interval));
                Some((tokio::time::Instant::now() + delay, delay))
            } else {
                None
            };
        }
    }

    /// One pass: observe, plan, apply, report. Returns whether anything failed.
    pub async fn reconcile(&mut self, update: &SourceUpdate, trigger: Trigger) -> bool {
        let started = Instant::now();
        self.reconciles += 1;
        let interface = self.sink.interface().to_owned();
        let observed = match self.sink.observe().await {
            Ok(observed) => observed,
            Err(err) => {
                error!(%err, "cannot observe the kernel; will retry");
                return true;
            }
        };
        let plan = plan::plan(&update.desired, &observed);
        let repairs = self.log_plan(&plan, &observed, update, trigger);

        let mut errors = Vec::new();
        let mut link_index = observed.link.map(|l| l.index);
        let mut virtual_addresses: BTreeSet<IpNet> =
            plan.virtual_addresses(&observed).copied().collect();
        let (mut added, mut removed) = (0, 0);
        if !plan.changes_nothing() {
            match self.sink.apply(&plan, &observed).await {
                Ok(applied) => {
                    if let Some(kind) = applied.created_link {
                        info!(%interface, kind, "created the load-balancer interface");
                    }
                    added = applied.added;
                    removed = applied.removed;
                    link_index = Some(applied.link_index);
                    for err in &applied.errors {
                        // What failed is not what lbagent left: the retry is not a repair.
                        if let AddressError::Address { verb, prefix, .. } = err {
                            if *verb == "adding" {
                                virtual_addresses.remove(prefix);
                            } else {
                                virtual_addresses.insert(*prefix);
                            }
                        }
                        errors.push(err.to_string());
                    }
                }
                Err(err) => {
                    link_index = None;
                    errors.push(err.to_string());
                }
            }
        }
        if let Some(dataplane) = &mut self.dataplane {
            let result = dataplane.observe().and_then(|observed| {
                let wanted = crate::sinks::dataplane::entries(
                    &update.desired,
                    |address| !plan.unsupported.contains(address),
                    &observed,
                );
                let changes = crate::sinks::dataplane::diff(&wanted, &observed);
                if !changes.is_empty() {
                    info!(
                        vips = changes.set_vips.len(),
                        ports = changes.set_ports.len(),
                        removed_ports = changes.remove_ports.len(),
                        removed_vips = changes.remove_vips.len(),
                        ranges = changes.add_ranges.len(),
                        "updating the dataplane's policy maps"
                    );
                    dataplane.apply(&changes)?;
                }
                Ok(())
            });
            if let Err(err) = result {
                errors.push(err.to_string());
            }
        }
        for err in &errors {
            error!(%interface, %err, "reconcile step failed; will retry");
        }
        self.expected = link_index.map(|link_index| Expected {
            link_index,
            addresses: virtual_addresses.clone(),
        });
        let elapsed = started.elapsed();
        if added + removed > 0 || repairs > 0 {
            info!(
                %interface,
                %trigger,
                added,
                removed,
                repairs,
                held = virtual_addresses.len(),
                took_ms = elapsed.as_secs_f64() * 1e3,
                "reconciled"
            );
        }

        let mut addresses: Vec<AddressStatus> = Vec::new();
        for (address, intent) in &update.desired.addresses {
            let services = intent.keys().cloned().collect();
            let (state, prefix) =
                if let Some(local) = plan.local.iter().find(|l| l.address == *address) {
                    (AddressState::Local, Some(local.prefix))
                } else if plan.unsupported.contains(address) {
                    (AddressState::Unsupported, None)
                } else {
                    (AddressState::Virtual, None)
                };
            addresses.push(AddressStatus {
                address: *address,
                state,
                prefix,
                services,
            });
        }
        let status = Status {
            node: self.node.clone(),
            interface,
            reconciles: self.reconciles,
            last_reconcile: LastReconcile {
                trigger: trigger.to_string(),
                duration_ms: elapsed.as_secs_f64() * 1e3,
                added,
                removed,
                repairs,
            },
            addresses,
            rejected: update.rejected.clone(),
            errors,
        };
        let failed = !status.errors.is_empty();
        self.metrics
            .runs
            .get_or_create(&TriggerLabel {
                trigger: trigger.label().to_owned(),
            })
            .inc();
        self.metrics.duration.observe(elapsed.as_secs_f64());
        if failed {
            self.metrics.failures.inc();
        }
        if let Err(err) = self.status.write(&status) {
            warn!(%err, "cannot write the status file");
        }
        self.applied.send_replace(Some(status));
        failed
    }

    /// Logs what the plan will do; changes that undo someone else's are repairs. Returns
    /// how many repairs there are.
    fn log_plan(
        &self,
        plan: &plan::Plan,
        observed: &plan::Observed,
        update: &SourceUpdate,
        trigger: Trigger,
    ) -> usize {
        let interface = self.sink.interface();
        let mut repairs = 0;
        let expected = self.expected.as_ref();
        if plan.create_link && expected.is_some() {
            repairs += 1;
            warn!(%interface, "repairing: {interface} was deleted outside lbagent; re-creating it");
        }
        if plan.set_up && expected.is_some() {
            repairs += 1;
            warn!(%interface, "repairing: {interface} was set down outside lbagent; setting it up");
        }
        for renamed in &plan.delete_renamed {
            repairs += 1;
            warn!(%interface, renamed = %renamed.name, "repairing: {} is {interface} renamed outside lbagent; its addresses go back on {interface} and it is deleted", renamed.name);
        }
        let link_same =
            expected.is_some_and(|e| Some(e.link_index) == observed.link.map(|l| l.index));
        let (mut readded, mut stray, mut adds, mut removes) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for net in &plan.add {
            match expected {
                Some(e) if link_same && e.addresses.contains(net) => readded.push(net),
                _ => adds.push(net),
            }
        }
        for net in &plan.remove {
            match expected {
                Some(e) if !e.addresses.contains(net) => stray.push(net),
                _ => removes.push(net),
            }
        }
        repairs += readded.len() + stray.len();
        log_each(
            &readded,
            |net| warn!(%interface, address = %net, "repairing: {net} was removed from {interface} outside lbagent; re-adding it"),
        );
        log_each(
            &stray,
            |net| warn!(%interface, address = %net, "repairing: {net} was added to {interface} outside lbagent; removing it"),
        );
        log_each(
            &adds,
            |net| info!(%interface, address = %net, services = %update.desired.services_of(&net.addr()), %trigger, "adding"),
        );
        log_each(
            &removes,
            |net| info!(%interface, address = %net, %trigger, "removing (no service asks for it)"),
        );
        for local in &plan.local {
            if self.expected.is_none() || trigger == Trigger::Desired {
                info!(
                    address = %local.address,
                    prefix = %local.prefix,
                    services = %update.desired.services_of(&local.address),
                    "local address: inside a subnet of this node, so not put on {interface}"
                );
            }
        }
        for address in &plan.unsupported {
            if self.expected.is_none() || trigger == Trigger::Desired {
                warn!(
                    %address,
                    services = %update.desired.services_of(address),
                    "IPv6 address skipped: this node has no IPv6"
                );
            }
        }
        repairs
    }
}

fn log_each<T>(items: &[T], log: impl Fn(&T)) {
    for item in items.iter().take(LOG_EACH) {
        log(item);
    }
    if items.len() > LOG_EACH {
        info!("... and {} more like the above", items.len() - LOG_EACH);
    }
}
