//! Events recorded on Kubernetes objects, queued so that none is lost unsaid: an Event waits
//! beside the others of its object, and a newer one that says the same kind of thing replaces
//! the waiting one (it says what holds now). The queue is bounded by the objects and what can
//! be said of each, not by how fast they change: 10,000 Services created at once get their
//! 10,000 Events, a few at a time, without holding up the caller. What was replaced is counted
//! in the log.
//!
//! The node agent's Kubernetes source and the allocator both record through it. The allocator
//! feeds it a few at a time ([`EventQueue::waiting`], [`EventQueue::sent`]) and keeps the rest
//! as the keys of what it has to tell.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt,
    hash::Hash,
    sync::{Arc, Mutex, PoisonError},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
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
struct Pending<O, T> {
    order: VecDeque<O>,
    /// Per object, its waiting items in the order they were said.
    waiting: HashMap<O, Vec<T>>,
    len: usize,
    /// Replaced before they were recorded, since the last report.
    superseded: u64,
    backlog_noticed: bool,
}

impl<O, T> Default for Pending<O, T> {
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

impl<O: Clone + Eq + Hash, T> Pending<O, T> {
    /// Queues `item` for `object`: a waiting item it `replaces` leaves, and `item` goes after
    /// the object's others. The object keeps its place, so a busy one is not starved.
    fn push(&mut self, object: O, item: T, replaces: impl Fn(&T, &T) -> bool) {
        match self.waiting.get_mut(&object) {
            Some(items) => {
                if let Some(at) = items.iter().position(|old| replaces(&item, old)) {
                    items.remove(at);
                    self.superseded += 1;
                    self.len -= 1;
                }
                items.push(item);
            }
            None => {
                self.order.push_back(object.clone());
                self.waiting.insert(object, vec![item]);
            }
        }
        self.len += 1;
    }

    /// The waiting items of the oldest objects, whole objects, about `most` items (at least
    /// one object if any waits).
    fn take(&mut self, most: usize) -> Vec<(O, Vec<T>)> {
        let mut taken = Vec::new();
        let mut count = 0;
        while count < most
            && let Some(object) = self.order.pop_front()
        {
            let items = self.waiting.remove(&object).unwrap_or_default();
            count += items.len();
            taken.push((object, items));
        }
        self.len -= count;
        taken
    }
}

/// The object an Event is about, as the queue keeps it: its Events share it, and the few
/// texts every object repeats (apiVersion, kind, namespace) are shared between objects.
/// 10,000 Events waiting as kube's `ObjectReference` and `Event` took about 9 MB.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Regarding {
    api_version: Option<Arc<str>>,
    kind: Option<Arc<str>>,
    namespace: Option<Arc<str>>,
    name: Option<Box<str>>,
    uid: Option<Box<str>>,
    field_path: Option<Box<str>>,
}

/// One waiting Event, without its object.
struct Waiting {
    type_: EventType,
    reason: Arc<str>,
    action: Arc<str>,
    note: Option<Box<str>>,
    /// The object's resourceVersion when it was said.
    version: Option<Box<str>>,
    secondary: Option<Box<ObjectReference>>,
}

/// The texts waiting Events repeat, each kept once.
#[derive(Default)]
struct Texts(HashSet<Arc<str>>);

impl Texts {
    fn get(&mut self, text: &str) -> Arc<str> {
        if let Some(known) = self.0.get(text) {
            return known.clone();
        }
        let text: Arc<str> = text.into();
        self.0.insert(text.clone());
        text
    }
}

impl Regarding {
    fn new(reference: ObjectReference, texts: &mut Texts) -> (Self, Option<Box<str>>) {
        let regarding = Self {
            api_version: reference.api_version.as_deref().map(|t| texts.get(t)),
            kind: reference.kind.as_deref().map(|t| texts.get(t)),
            namespace: reference.namespace.as_deref().map(|t| texts.get(t)),
            name: reference.name.map(String::into_boxed_str),
            uid: reference.uid.map(String::into_boxed_str),
            field_path: reference.field_path.map(String::into_boxed_str),
        };
        (
            regarding,
            reference.resource_version.map(String::into_boxed_str),
        )
    }

    fn reference(&self, version: Option<&str>) -> ObjectReference {
        ObjectReference {
            api_version: self.api_version.as_deref().map(Into::into),
            kind: self.kind.as_deref().map(Into::into),
            namespace: self.namespace.as_deref().map(Into::into),
            name: self.name.as_deref().map(Into::into),
            uid: self.uid.as_deref().map(Into::into),
            field_path: self.field_path.as_deref().map(Into::into),
            resource_version: version.map(Into::into),
        }
    }
}

impl fmt::Display for Regarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.namespace.as_deref().unwrap_or_default(),
            self.name.as_deref().unwrap_or_default()
        )
    }
}

impl Waiting {
    fn new(event: Event, version: Option<Box<str>>, texts: &mut Texts) -> Self {
        Self {
            type_: event.type_,
            reason: texts.get(&event.reason),
            action: texts.get(&event.action),
            note: event.note.map(String::into_boxed_str),
            version,
            secondary: event.secondary.map(Box::new),
        }
    }

    /// Whether a newer `self` replaces the waiting `other`.
    fn replaces(&self, other: &Self, replace: Replace) -> bool {
        self.reason == other.reason && (replace == Replace::SameReason || self.note == other.note)
    }

    fn event(&self) -> Event {
        Event {
            type_: self.type_,
            reason: self.reason.as_ref().into(),
            note: self.note.as_deref().map(Into::into),
            action: self.action.as_ref().into(),
            secondary: self.secondary.as_deref().cloned(),
        }
    }
}

#[derive(Default)]
struct Queue {
    pending: Pending<Arc<Regarding>, Waiting>,
    texts: Texts,
}

#[derive(Default)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Notify,
    /// A batch was recorded.
    sent: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
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

    /// How many Events wait to be recorded.
    pub fn waiting(&self) -> usize {
        self.shared.lock().pending.len
    }

    /// Resolves once a batch has been recorded since the last call (at once if one has).
    pub async fn sent(&self) {
        self.shared.sent.notified().await;
    }

    /// Queues `event` on the object `reference` names, in place of a waiting one it
    /// replaces.
    pub fn push(&self, reference: ObjectReference, event: Event) {
        let mut queue = self.shared.lock();
        let Queue { pending, texts } = &mut *queue;
        let (regarding, version) = Regarding::new(reference, texts);
        let waiting = Waiting::new(event, version, texts);
        let replace = self.replace;
        pending.push(Arc::new(regarding), waiting, |new, old| {
            new.replaces(old, replace)
        });
        if pending.len >= BACKLOG_NOTICE && !pending.backlog_noticed {
            pending.backlog_noticed = true;
            info!(
                waiting = pending.len,
                "Events wait to be recorded; a newer one that says the same of an object \
                 replaces one that waits"
            );
        }
        drop(queue);
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
        if shared.lock().pending.len == 0 {
            shared.ready.notified().await;
            continue;
        }
        let batch = {
            let mut queue = shared.lock();
            let Queue { pending, texts } = &mut *queue;
            let batch = pending.take(PUBLISH_BATCH);
            if pending.len == 0 {
                // Namespaces and reasons of objects long gone are not kept.
                *texts = Texts::default();
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
        // A recorder per batch: kube's keeps every Event it sent for minutes and walks them
        // all on each one it sends (10,000 Events made that most of the allocator's CPU). Its
        // cache only folds repeats into a series, and the queue already keeps one per topic.
        let recorder = Recorder::new(client.clone(), reporter.clone());
        futures::stream::iter(batch)
            .for_each_concurrent(PUBLISH_CONCURRENCY, |events| {
                let recorder = &recorder;
                async move {
                    let (regarding, events) = events;
                    for waiting in events {
                        let reference = regarding.reference(waiting.version.as_deref());
                        if let Err(err) = recorder.publish(&waiting.event(), &reference).await {
                            warn!(
                                object = %regarding,
                                reason = %waiting.reason,
                                %err,
                                "cannot record an Event"
                            );
                        }
                    }
                }
            })
            .await;
        shared.sent.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_item_replaces_the_waiting_one_of_its_topic_and_its_object_keeps_its_place() {
        let mut pending = Pending::default();
        let same_topic = |new: &(&str, i32), old: &(&str, i32)| new.0 == old.0;
        for i in 0..5000 {
            pending.push(format!("default/s{i}"), ("AddressAssigned", i), same_topic);
        }
        pending.push("default/s0".into(), ("AllocationFailed", -1), same_topic);
        pending.push("default/s0".into(), ("AddressAssigned", 10_000), same_topic);
        assert_eq!(pending.len, 5001, "nothing dropped beyond the replaced one");
        assert_eq!(pending.superseded, 1);
        let numbers = |taken: Vec<(String, Vec<(&str, i32)>)>| -> Vec<Vec<i32>> {
            taken
                .into_iter()
                .map(|(_, items)| items.into_iter().map(|(_, n)| n).collect())
                .collect()
        };
        let first = numbers(pending.take(3));
        assert_eq!(
            first,
            [vec![-1, 10_000], vec![1]],
            "the busy object keeps its place; its items go in the order they were said, \
             the replacement last"
        );
        let rest = numbers(pending.take(usize::MAX));
        assert_eq!(rest.len(), 4998);
        assert_eq!(rest.last(), Some(&vec![4999]));
        assert_eq!(pending.len, 0);
        assert!(pending.waiting.is_empty());
    }

    fn reference(name: &str, version: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some("default".into()),
            name: Some(name.into()),
            uid: Some(format!("uid-{name}")),
            resource_version: Some(version.into()),
            field_path: None,
        }
    }

    fn event(reason: &str, note: &str) -> Event {
        Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: Some(note.into()),
            action: "Allocate".into(),
            secondary: Some(reference("other", "7")),
        }
    }

    #[test]
    fn a_waiting_event_is_sent_as_it_was_said_and_shares_the_texts_it_repeats() {
        let mut texts = Texts::default();
        let note = "Assigned 192.0.2.1 from pool a";
        let (one, version) = Regarding::new(reference("one", "41"), &mut texts);
        let waiting = Waiting::new(event("AddressAssigned", note), version, &mut texts);
        assert_eq!(
            one.reference(waiting.version.as_deref()),
            reference("one", "41")
        );
        let sent = waiting.event();
        assert_eq!(sent.type_, EventType::Normal);
        assert_eq!(sent.reason, "AddressAssigned");
        assert_eq!(sent.note.as_deref(), Some(note));
        assert_eq!(sent.action, "Allocate");
        assert_eq!(sent.secondary, Some(reference("other", "7")));
        let (two, _) = Regarding::new(reference("two", "42"), &mut texts);
        assert!(
            Arc::ptr_eq(
                one.namespace.as_ref().unwrap(),
                two.namespace.as_ref().unwrap()
            ),
            "one namespace text for both objects"
        );
        assert_eq!(
            texts.0.len(),
            5,
            "v1, Service, default, the reason, the action"
        );
    }

    #[test]
    fn a_newer_event_replaces_by_reason_or_by_reason_and_note() {
        let mut texts = Texts::default();
        let mut waiting = |reason, note| Waiting::new(event(reason, note), None, &mut texts);
        let first = waiting("Announced", "added 192.0.2.1");
        let same = waiting("Announced", "added 192.0.2.1");
        let other_note = waiting("Announced", "added 192.0.2.2");
        let other_reason = waiting("Withdrawn", "added 192.0.2.1");
        assert!(other_note.replaces(&first, Replace::SameReason));
        assert!(!other_note.replaces(&first, Replace::SameNote));
        assert!(same.replaces(&first, Replace::SameNote));
        assert!(!other_reason.replaces(&first, Replace::SameReason));
    }
}
