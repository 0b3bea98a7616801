//! Events recorded on Kubernetes objects, queued so that none is lost unsaid: an Event waits
//! beside the others of its object, and a newer one that says the same kind of thing replaces
//! the waiting one (it says what holds now). The queue is bounded by the objects and what can
//! be said of each, not by how fast they change: 10,000 Services created at once get their
//! 10,000 Events, a few at a time, without holding up the caller. What was replaced is counted
//! in the log.
//!
//! The node agent's Kubernetes source and the allocator both record through it.

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

/// Objects whose Events are recorded at once (one object's go in order).
const PUBLISH_CONCURRENCY: usize = 8;
/// Events taken from the queue per round, so a newer one can still replace a waiting one.
const PUBLISH_BATCH: usize = 64;
/// A backlog this long is logged (once per backlog).
const BACKLOG_NOTICE: usize = 1024;

/// Which waiting Event a newer one on the same object replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Replace {
    /// The one of the same reason: each reason states what holds now (the allocator's
    /// `AddressAssigned` names every address the Service has).
    SameReason,
    /// The one of the same reason and note: a note tells a change (the agent's `Announced`
    /// names the addresses it added), so another note is another change, kept.
    SameNote,
}

/// What waits for each object, objects in the order they first had something waiting.
struct Pending<T> {
    order: VecDeque<String>,
    /// Per object, its waiting items in the order they were said, each with what it replaces.
    waiting: HashMap<String, Vec<(String, T)>>,
    len: usize,
    /// Replaced before they were recorded, since the last report.
    superseded: u64,
    backlog_noticed: bool,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Self {
            order: VecDeque::new(),
            waiting: HashMap::new(),
            len: 0,
            superseded: 0,
            backlog_noticed: false,
        }
    }
}

impl<T> Pending<T> {
    /// Queues `item` for `object`: a waiting item of the same `topic` leaves, and `item` goes
    /// after the object's others. The object keeps its place, so a busy one is not starved.
    fn push(&mut self, object: String, topic: String, item: T) {
        match self.waiting.get_mut(&object) {
            Some(items) => {
                if let Some(at) = items.iter().position(|(t, _)| *t == topic) {
                    items.remove(at);
                    self.superseded += 1;
                    self.len -= 1;
                }
                items.push((topic, item));
            }
            None => {
                self.order.push_back(object.clone());
                self.waiting.insert(object, vec![(topic, item)]);
            }
        }
        self.len += 1;
    }

    /// The waiting items of the oldest objects, whole objects, about `most` items (at least
    /// one object if any waits).
    fn take(&mut self, most: usize) -> Vec<Vec<T>> {
        let mut taken = Vec::new();
        let mut count = 0;
        while count < most
            && let Some(object) = self.order.pop_front()
        {
            let items = self.waiting.remove(&object).unwrap_or_default();
            count += items.len();
            taken.push(items.into_iter().map(|(_, item)| item).collect());
        }
        self.len -= count;
        taken
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

/// Records Events in the background while it lives; dropped, it stops at once and what waits
/// is not recorded (an allocator that lost the lead writes nothing).
pub struct EventQueue {
    shared: Arc<Shared>,
    replace: Replace,
    publisher: JoinHandle<()>,
}

impl EventQueue {
    pub fn start(client: Client, reporter: Reporter, replace: Replace) -> Self {
        let shared = Arc::new(Shared::default());
        let publisher = tokio::spawn(publish(shared.clone(), client, reporter));
        Self {
            shared,
            replace,
            publisher,
        }
    }

    /// Queues `event` on the object `reference` names, in place of a waiting one it
    /// replaces.
    pub fn push(&self, reference: ObjectReference, event: Event) {
        let object = format!(
            "{}/{}",
            reference.namespace.as_deref().unwrap_or_default(),
            reference.name.as_deref().unwrap_or_default()
        );
        let topic = match self.replace {
            Replace::SameReason => event.reason.clone(),
            Replace::SameNote => format!(
                "{}\n{}",
                event.reason,
                event.note.as_deref().unwrap_or_default()
            ),
        };
        let mut pending = self.shared.lock();
        pending.push(object, topic, (reference, event));
        if pending.len >= BACKLOG_NOTICE && !pending.backlog_noticed {
            pending.backlog_noticed = true;
            info!(
                waiting = pending.len,
                "Events wait to be recorded; a newer one that says the same of an object \
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
        let batch = {
            let mut pending = shared.lock();
            let batch = pending.take(PUBLISH_BATCH);
            if pending.len == 0 {
                pending.backlog_noticed = false;
                if pending.superseded > 0 {
                    info!(
                        superseded = pending.superseded,
                        "Events were replaced by a newer one that says the same of their \
                         object before they were recorded"
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
        // cache only folds repeats into a series, and the queue already keeps one per topic.
        let recorder = Recorder::new(client.clone(), reporter.clone());
        futures::stream::iter(batch)
            .for_each_concurrent(PUBLISH_CONCURRENCY, |events| {
                let recorder = &recorder;
                async move {
                    for (reference, event) in events {
                        if let Err(err) = recorder.publish(&event, &reference).await {
                            warn!(
                                object = %format!(
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
                }
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_item_replaces_the_waiting_one_of_its_topic_and_its_object_keeps_its_place() {
        let mut pending = Pending::default();
        for i in 0..5000 {
            pending.push(format!("default/s{i}"), "AddressAssigned".into(), i);
        }
        pending.push("default/s0".into(), "AllocationFailed".into(), -1);
        pending.push("default/s0".into(), "AddressAssigned".into(), 10_000);
        assert_eq!(pending.len, 5001, "nothing dropped beyond the replaced one");
        assert_eq!(pending.superseded, 1);
        let first = pending.take(3);
        assert_eq!(
            first,
            [vec![-1, 10_000], vec![1]],
            "the busy object keeps its place; its items go in the order they were said, \
             the replacement last"
        );
        let rest = pending.take(usize::MAX);
        assert_eq!(rest.len(), 4998);
        assert_eq!(rest.last(), Some(&vec![4999]));
        assert_eq!(pending.len, 0);
        assert!(pending.waiting.is_empty());
    }
}
