//! The objects, the global resourceVersion and the change history watches replay.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde_json::Value;

use super::{RESOURCES, http::Status, selector::Filter};

/// How many changes watches can replay by default; older resourceVersions get 410 Gone.
pub(super) const HISTORY: usize = 1000;

pub(super) type Key = (usize, String, String);

pub(super) struct Stored {
    pub(super) object: Value,
    /// The resourceVersion it was created at, to list objects in creation order.
    pub(super) created: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

pub(super) struct Change {
    pub(super) revision: u64,
    pub(super) resource: usize,
    pub(super) kind: ChangeType,
    pub(super) object: Value,
    /// The state before a modification, so label-selected watches see objects enter and leave.
    pub(super) previous: Option<Value>,
}

/// A paginated list: later pages come from the state of the first, as long as the real API
/// server's continue tokens last (until compaction).
pub(super) struct Snapshot {
    pub(super) revision: u64,
    pub(super) items: Vec<Value>,
    pub(super) pages_served: usize,
    pub(super) fail_after_pages: Option<usize>,
}

#[derive(Default)]
pub(super) struct Store {
    pub(super) revision: u64,
    /// History holds every change after this resourceVersion.
    pub(super) compacted: u64,
    pub(super) objects: BTreeMap<Key, Stored>,
    pub(super) history: VecDeque<Change>,
    pub(super) snapshots: HashMap<u64, Snapshot>,
    pub(super) next_snapshot: u64,
    pub(super) fail_list_after_pages: Option<usize>,
    /// How many changes the history keeps; 0 stands for [`HISTORY`].
    pub(super) history_limit: usize,
    /// Changes to apply just before the next client write to an object.
    pub(super) interleave: HashMap<Key, Value>,
}

impl Store {
    /// Creates or replaces the object at `key`. With `expected_version`, replaces only that
    /// version (a client's optimistic concurrency). Server-owned metadata is set here.
    pub(super) fn put(
        &mut self,
        key: Key,
        mut object: Value,
        expected_version: Option<&str>,
    ) -> Result<Value, Status> {
        let (resource, namespace, name) = &key;
        let spec = &RESOURCES[*resource];
        let revision = self.revision + 1;
        // Borrowed, not copied: the stored object moves into the history only if this
        // write changes it.
        let existing = self.objects.get(&key);
        let created = existing.map_or(revision, |stored| stored.created);
        let previous = existing.map(|stored| &stored.object);
        if let (Some(expected), Some(current)) = (expected_version, previous)
            && current["metadata"]["resourceVersion"] != expected
        {
            return Err(Status::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been \
                     modified; please apply your changes to the latest version and try again",
                    spec.plural
                ),
            ));
        }
        if !object.is_object() || !(object["metadata"].is_object() || object["metadata"].is_null())
        {
            return Err(Status::bad_request(
                "the object or its metadata is not a JSON object",
            ));
        }
        object["apiVersion"] = spec.api_version.into();
        object["kind"] = spec.kind.into();
        object["metadata"]["name"] = name.as_str().into();
        if spec.namespaced {
            object["metadata"]["namespace"] = namespace.as_str().into();
        }
        let (uid, created_at, version) = match previous {
            Some(old) => {
                let old = &old["metadata"];
                let field = |name: &str| old[name].clone();
                (
                    field("uid"),
                    field("creationTimestamp"),
                    field("resourceVersion"),
                )
            }
            None => (
                format!("00000000-0000-4000-8000-{revision:012x}").into(),
                match &object["metadata"]["creationTimestamp"] {
                    Value::String(given) => given.clone().into(),
                    _ => now().into(),
                },
                Value::Null,
            ),
        };
        let metadata = &mut object["metadata"];
        metadata["uid"] = uid;
        metadata["creationTimestamp"] = created_at;
        metadata["resourceVersion"] = version;
        if previous == Some(&object) {
            // An unchanged update is no change: no new version, no watch event.
            return Ok(object);
        }
        object["metadata"]["resourceVersion"] = revision.to_string().into();
        self.revision = revision;
        let previous = self
            .objects
            .insert(
                key.clone(),
                Stored {
                    object: object.clone(),
                    created,
                },
            )
            .map(|stored| stored.object);
        let kind = if previous.is_some() {
            ChangeType::Modified
        } else {
            ChangeType::Added
        };
        self.record(*resource, kind, object.clone(), previous);
        Ok(object)
    }

    /// Applies the change queued to land just before a client write to `key`.
    pub(super) fn interleave_write(&mut self, key: &Key) -> Result<(), Status> {
        let Some(change) = self.interleave.remove(key) else {
            return Ok(());
        };
        let Some(stored) = self.objects.get(key) else {
            return Ok(());
        };
        let mut object = stored.object.clone();
        super::http::merge_patch(&mut object, &change);
        self.put(key.clone(), object, None).map(|_| ())
    }

    /// Removes an object; its last state, at the deletion's resourceVersion, is returned.
    pub(super) fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?.object;
        self.revision += 1;
        object["metadata"]["resourceVersion"] = self.revision.to_string().into();
        self.record(key.0, ChangeType::Deleted, object.clone(), None);
        Some(object)
    }

    fn record(
        &mut self,
        resource: usize,
        kind: ChangeType,
        object: Value,
        previous: Option<Value>,
    ) {
        let limit = if self.history_limit == 0 {
            HISTORY
        } else {
            self.history_limit
        };
        while self.history.len() >= limit
            && let Some(oldest) = self.history.pop_front()
        {
            self.compacted = oldest.revision;
        }
        self.history.push_back(Change {
            revision: self.revision,
            resource,
            kind,
            object,
            previous,
        });
    }

    pub(super) fn matching(&self, filter: &Filter) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((resource, _, _), stored)| {
                *resource == filter.resource && filter.matches(&stored.object)
            })
            .map(|(_, stored)| stored.object.clone())
            .collect()
    }
}

pub(super) fn now() -> String {
    use k8s_openapi::jiff::{Timestamp, Unit};
    Timestamp::now()
        .round(Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
