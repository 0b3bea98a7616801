//! The address sink's pass: observe kube-lb0, plan, apply, and report which addresses the
//! node holds and how. Changes that undo someone else's are repairs, logged as such.

use std::{collections::BTreeSet, time::Duration};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{
    AddressError, AddressSink,
    plan::{self, Observed, Plan},
};
use crate::{
    desired::{AddressState, AddressStatus},
    sinks::{Noticed, Report, Sink, Trigger, Wanted},
};

/// How long netlink events are left to settle before a pass: one change made by a tool
/// arrives as several messages, and lbagent's own changes echo back.
const SETTLE: Duration = Duration::from_millis(20);
/// Longest list of addresses logged one by one; longer ones are summarised.
const LOG_EACH: usize = 8;

/// What lbagent left in the kernel after its last apply.
pub struct Expected {
    link_index: u32,
    addresses: BTreeSet<IpNet>,
}

/// The addresses the node holds, and what the last pass changed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AddressReport {
    pub interface: String,
    /// Every desired address, with what became of it.
    pub addresses: Vec<AddressStatus>,
    pub added: usize,
    pub removed: usize,
    pub repairs: usize,
}

impl Sink for AddressSink {
    type Observed = Observed;
    type Plan = Plan;
    type Error = AddressError;

    async fn observe(&mut self) -> Result<Observed, AddressError> {
        self.settled = None;
        AddressSink::observe(self).await
    }

    fn plan(&self, wanted: &Wanted<'_>, observed: &Observed) -> Plan {
        plan::plan(wanted.desired, observed)
    }

    async fn apply(&mut self, plan: Plan, observed: Observed, wanted: &Wanted<'_>) -> Vec<String> {
        let interface = self.interface.clone();
        let repairs = self.log_plan(&plan, &observed, wanted);
        let mut errors = Vec::new();
        let mut link_index = observed.link.map(|l| l.index);
        let mut held: BTreeSet<IpNet> = plan.virtual_addresses(&observed).copied().collect();
        let (mut added, mut removed) = (0, 0);
        let mut complete = true;
        if !plan.changes_nothing() {
            match self.apply_plan(&plan, &observed, wanted.superseded).await {
                Ok(applied) => {
                    if let Some(kind) = applied.created_link {
                        info!(%interface, kind, "created the load-balancer interface");
                    }
                    if !applied.skipped.is_empty() {
                        complete = false;
                        info!(
                            %interface,
                            done = applied.added + applied.removed + applied.errors.len(),
                            left = applied.skipped.len(),
                            "a newer desired state arrived: stopping this apply to plan from it"
                        );
                    }
                    // Not tried is not held: the next pass plans from what the kernel has.
                    for (add, net) in &applied.skipped {
                        if *add {
                            held.remove(net);
                        } else {
                            held.insert(*net);
                        }
                    }
                    added = applied.added;
                    removed = applied.removed;
                    link_index = Some(applied.link_index);
                    for err in &applied.errors {
                        // What failed is not what lbagent left: the retry is not a repair.
                        if let AddressError::Address { verb, prefix, .. } = err {
                            if *verb == "adding" {
                                held.remove(prefix);
                            } else {
                                held.insert(*prefix);
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
        if added + removed > 0 || repairs > 0 {
            info!(
                %interface,
                trigger = %wanted.trigger,
                added,
                removed,
                repairs,
                held = held.len(),
                "reconciled"
            );
        }
        self.expected = link_index.map(|link_index| Expected {
            link_index,
            addresses: held,
        });
        self.settled = (complete && errors.is_empty()).then(|| wanted.desired.addresses.clone());
        self.report = AddressReport {
            interface,
            addresses: statuses(wanted, &plan),
            added,
            removed,
            repairs,
        };
        errors
    }

    fn report(&self) -> Report {
        Report::Addresses(self.report.clone())
    }

    /// Its plan reads the desired addresses (and its report their Services); it notices any
    /// change to addresses or to its interface, so without one pending nothing else moved.
    fn settled(&self, wanted: &Wanted<'_>) -> bool {
        self.settled.as_ref() == Some(&wanted.desired.addresses)
            && self
                .kernel_changes
                .as_ref()
                .is_some_and(|changes| changes.is_empty())
    }

    async fn noticed(&mut self) -> Noticed {
        let Some(changes) = &mut self.kernel_changes else {
            return std::future::pending().await;
        };
        if changes.recv().await.is_none() {
            return std::future::pending().await;
        }
        // Before the wait: a pass that starts meanwhile must not count this sink settled.
        self.settled = None;
        tokio::time::sleep(SETTLE).await;
        while changes.try_recv().is_ok() {}
        Noticed::Drift
    }
}

/// Every desired address with what became of it.
fn statuses(wanted: &Wanted<'_>, plan: &Plan) -> Vec<AddressStatus> {
    wanted
        .desired
        .addresses
        .iter()
        .map(|(address, intent)| {
            let (state, prefix) =
                if let Some(local) = plan.local.iter().find(|l| l.address == *address) {
                    (AddressState::Local, Some(local.prefix))
                } else if plan.unsupported.contains(address) {
                    (AddressState::Unsupported, None)
                } else {
                    (AddressState::Virtual, None)
                };
            AddressStatus {
                address: *address,
                state,
                prefix,
                services: intent.keys().cloned().collect(),
                neighbour: None,
            }
        })
        .collect()
}

impl AddressSink {
    /// Logs what the plan will do; changes that undo someone else's are repairs. Returns
    /// how many repairs there are.
    fn log_plan(&self, plan: &Plan, observed: &Observed, wanted: &Wanted<'_>) -> usize {
        let interface = self.interface.as_str();
        let (desired, trigger) = (wanted.desired, wanted.trigger);
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
            |net| info!(%interface, address = %net, services = %desired.services_of(&net.addr()), %trigger, "adding"),
        );
        log_each(
            &removes,
            |net| info!(%interface, address = %net, %trigger, "removing (no service asks for it)"),
        );
        let first_or_new = expected.is_none() || trigger == Trigger::Desired;
        for local in &plan.local {
            if first_or_new {
                info!(
                    address = %local.address,
                    prefix = %local.prefix,
                    services = %desired.services_of(&local.address),
                    "local address: inside a subnet of this node, so not put on {interface}"
                );
            }
        }
        for address in &plan.unsupported {
            if first_or_new {
                warn!(
                    %address,
                    services = %desired.services_of(address),
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
