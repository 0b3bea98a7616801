//! The Events the allocator records on Services, queued so that none is lost unsaid: at most
//! one waits per Service and reason, and a newer one replaces it (it says what holds now), so
//! the queue is bounded by the Services, not by how fast they change. 10,000 Services created
//! at once get their 10,000 `AddressAssigned` Events, a few at a time, without holding up the
//! status writes. What was replaced is counted in the log.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, PoisonError},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, Recorder, Reporter},
};
use tokio::{sync::Notify, task::JoinHandle};
use tracing::{info, warn};

/// Events recorded at once.
const PUBLISH_CONCURRENCY: usize = 4;
/// Taken from the queue per round, so a newer Event can still replace a waiting one.
const PUBLISH_BATCH: usize = 64;
/// A backlog this long is logged (once per backlog).
const BACKLOG_NOTICE: usize = 1024;

/// (namespace/name, reason).
type Slot = (String, String);

struct Pending<T> {
    order: VecDeque<Slot>,
    events: HashMap<Slot, T>,
    /// Replaced before they were recorded, since the last report.
    superseded: u64,
    backlog_noticed: bool,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Self {
            order: VecDeque::new(),
            events: HashMap::new(),
            superseded: 0,
            backlog_noticed: false,
        }
    }
}

impl<T> Pending<T> {
    /// Queues `item` in `slot`, in place of one that waits there.
    fn push(&mut self, slot: Slot, item: T) {
        match self.events.insert(slot.clone(), item) {
            Some(_) => self.superseded += 1,
            None => self.order.push_back(slot),
        }
    }

    /// Up to `most` items, oldest slot first.
    fn take(&mut self, most: usize) -> Vec<T> {
        let take = self.order.len().min(most);
        let slots: Vec<Slot> = self.order.drain(..take).collect();
        slots
            .iter()
            .filter_map(|slot| self.events.remove(slot))
            .collect()
    }
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending<(ObjectReference, Event)>>,
    ready: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending<(ObjectReference, Event)>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Records Events in the background while it lives; dropped (leadership lost), it stops at
/// once and what waits is not recorded: a standby writes nothing.
pub struct EventQueue {
    shared: Arc<Shared>,
    publisher: JoinHandle<()>,
}

impl EventQueue {
    pub fn start(client: Client, reporter: Reporter) -> Self {
        let shared = Arc::new(Shared::default());
        let publisher = tokio::spawn(publish(shared.clone(), client, reporter));
        Self { shared, publisher }
    }

    /// Queues `event` on the object `reference` names, replacing one of the same reason that
    /// still waits for that object.
    pub fn push(&self, reference: ObjectReference, event: Event) {
        let slot = (
            format!(
                "{}/{}",
                reference.namespace.as_deref().unwrap_or_default(),
                reference.name.as_deref().unwrap_or_default()
            ),
            event.reason.clone(),
        );
        let mut pending = self.shared.lock();
        pending.push(slot, (reference, event));
        if pending.order.len() >= BACKLOG_NOTICE && !pending.backlog_noticed {
            pending.backlog_noticed = true;
            info!(
                waiting = pending.order.len(),
                "Events wait to be recorded; a newer one for the same Service and reason \
                 replaces one that waits"
            );
        }
        drop(pending);
        self.shared.ready.notify_one();
    }
}

impl Drop for EventQueue {
    fn drop(&mut self) {
        self.publisher.abort();
    }
}

async fn publish(shared: Arc<Shared>, client: Client, reporter: Reporter) {
    loop {
        let batch: Vec<(ObjectReference, Event)> = {
            let mut pending = shared.lock();
            let batch = pending.take(PUBLISH_BATCH);
            if pending.order.is_empty() {
                pending.backlog_noticed = false;
                if pending.superseded > 0 {
                    info!(
                        superseded = pending.superseded,
                        "Events were replaced by a newer one for the same Service and reason \
                         before they were recorded"
                    );
                    pending.superseded = 0;
                }
            }
            batch
        };
        if batch.is_empty() {
            shared.ready.notified().await;
            continue;
        }
        // A recorder per batch: kube's keeps every Event it sent for minutes and walks them
        // all on each one it sends (10,000 Events made that most of the allocator's CPU). Its
        // cache only folds repeats into a series, and the controller tells each outcome once.
        let recorder = Recorder::new(client.clone(), reporter.clone());
        futures::stream::iter(batch)
            .for_each_concurrent(PUBLISH_CONCURRENCY, |(reference, event)| {
                let recorder = &recorder;
                async move {
                    if let Err(err) = recorder.publish(&event, &reference).await {
                        warn!(
                            service = %format!(
                                "{}/{}",
                                reference.namespace.unwrap_or_default(),
                                reference.name.unwrap_or_default()
                            ),
                            reason = %event.reason,
                            %err,
                            "cannot record an Event"
                        );
                    }
                }
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(service: &str, reason: &str) -> Slot {
        (service.into(), reason.into())
    }

    #[test]
    fn a_newer_event_replaces_the_waiting_one_of_its_service_and_reason_in_its_place() {
        let mut pending = Pending::default();
        for i in 0..5000 {
            pending.push(slot(&format!("default/s{i}"), "AddressAssigned"), i);
        }
        pending.push(slot("default/s0", "AllocationFailed"), -1);
        pending.push(slot("default/s0", "AddressAssigned"), 10_000);
        assert_eq!(
            pending.order.len(),
            5001,
            "nothing dropped beyond the replaced one"
        );
        assert_eq!(pending.superseded, 1);
        let first = pending.take(3);
        assert_eq!(
            first,
            [10_000, 1, 2],
            "the replacement keeps the place of what it replaced"
        );
        let rest = pending.take(usize::MAX);
        assert_eq!(rest.len(), 4998);
        assert_eq!(rest.last(), Some(&-1));
        assert!(pending.events.is_empty());
    }
}
