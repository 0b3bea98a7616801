//! Watch streams: JSON lines replayed from the history, bookmarks, 410 Gone.

use std::{
    collections::HashMap,
    convert::Infallible,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    http::header,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    RESOURCES, Shared,
    http::{Status, parse_version},
    selector::Filter,
    store::{ChangeType, Store},
};

/// How often an open watch that allows bookmarks gets one.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// What the real API server picks (at random, from 1800 s up) when a watch names no timeout.
const DEFAULT_WATCH_TIMEOUT: u64 = 1800;

/// What an open watch was asked for.
struct WatchRequest {
    filter: Filter,
    /// `None` starts with the current state as ADDED events.
    from: Option<u64>,
    bookmarks: bool,
    /// sendInitialEvents: end the initial events with a bookmark saying so.
    initial_events_end: bool,
    timeout: Duration,
}

pub(super) fn start_watch(
    shared: &Arc<Shared>,
    filter: Filter,
    params: &HashMap<String, String>,
) -> Result<Response, Status> {
    let flag = |name: &str| params.get(name).is_some_and(|v| v == "true" || v == "1");
    let send_initial_events = flag("sendInitialEvents");
    let from = match params.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(_) if send_initial_events => None,
        Some(version) => Some(parse_version(version)?),
    };
    let timeout = match params.get("timeoutSeconds") {
        Some(t) => t
            .parse()
            .map_err(|_| Status::bad_request(format!("timeoutSeconds: not a number: {t:?}")))?,
        None => DEFAULT_WATCH_TIMEOUT,
    };
    let request = WatchRequest {
        filter,
        from,
        bookmarks: flag("allowWatchBookmarks"),
        initial_events_end: send_initial_events,
        timeout: Duration::from_secs(timeout),
    };
    shared.watches_started.fetch_add(1, Ordering::SeqCst);
    let (lines, body) = mpsc::channel::<Bytes>(64);
    tokio::spawn(stream_watch(shared.clone(), request, lines));
    let body = futures::stream::unfold(body, |mut body| async move {
        let line = body.recv().await?;
        Some((Ok::<_, Infallible>(line), body))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response())
}

/// Counts a watch as open for as long as its stream task lives.
struct OpenWatch(Arc<Shared>);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.watches_open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = Vec::new();
    push_event_line(&mut line, kind, object);
    Bytes::from(line)
}

/// Appends one watch event line to `out`, without copying `object` into a new `Value`.
fn push_event_line(out: &mut Vec<u8>, kind: &str, object: &Value) {
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    // Writing a `Value` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, object);
    out.extend_from_slice(b"}\n");
}

/// Lines are sent in chunks of about this many bytes: one write per chunk, as a real server
/// buffers, rather than one per event.
const CHUNK: usize = 64 * 1024;

fn bookmark_line(filter: &Filter, revision: u64, initial_events_end: bool) -> Bytes {
    let spec = &RESOURCES[filter.resource];
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let object = json!({"kind": spec.kind, "apiVersion": spec.api_version, "metadata": metadata});
    event_line("BOOKMARK", &object)
}

/// The lines a watch at `sent` sends next, in chunks: the changes it has not seen that match
/// it, or a 410 ERROR if history no longer reaches back to it. Returns the version it reached.
fn pending_lines(store: &Store, filter: &Filter, sent: u64) -> Result<(Vec<Bytes>, u64), Bytes> {
    if sent < store.compacted {
        let status = Status::expired(format!(
            "too old resource version: {sent} ({})",
            store.compacted
        ));
        return Err(event_line("ERROR", &status.to_json()));
    }
    // History is in revision order: skip what the watch has seen without reading it.
    let unseen = store
        .history
        .partition_point(|change| change.revision <= sent);
    let mut chunks = Chunks::default();
    let changes = store
        .history
        .range(unseen..)
        .filter(|change| change.resource == filter.resource)
        .filter_map(|change| {
            let now = filter.matches(&change.object);
            let before = change.previous.as_ref().is_some_and(|p| filter.matches(p));
            let kind = match (change.kind, before, now) {
                (ChangeType::Deleted, _, true) => "DELETED",
                (ChangeType::Deleted, _, false) => return None,
                (_, true, true) => "MODIFIED",
                (_, false, true) => "ADDED",
                (_, true, false) => "DELETED",
                (_, false, false) => return None,
            };
            Some((kind, &change.object))
        });
    for (kind, object) in changes {
        chunks.push(kind, object);
    }
    Ok((chunks.done(), store.revision))
}

/// Watch event lines gathered into chunks of about [`CHUNK`] bytes.
#[derive(Default)]
struct Chunks {
    done: Vec<Bytes>,
    open: Vec<u8>,
}

impl Chunks {
    fn push(&mut self, kind: &str, object: &Value) {
        push_event_line(&mut self.open, kind, object);
        if self.open.len() >= CHUNK {
            self.done.push(Bytes::from(std::mem::take(&mut self.open)));
        }
    }

    fn done(mut self) -> Vec<Bytes> {
        if !self.open.is_empty() {
            self.done.push(Bytes::from(self.open));
        }
        self.done
    }
}

async fn stream_watch(shared: Arc<Shared>, request: WatchRequest, lines: mpsc::Sender<Bytes>) {
    shared.watches_open.fetch_add(1, Ordering::SeqCst);
    let _open = OpenWatch(shared.clone());
    let mut changes = shared.revision.subscribe();
    let mut drops = shared.drops.subscribe();
    let mut bookmarks = shared.bookmarks.subscribe();
    let deadline = tokio::time::sleep(request.timeout);
    tokio::pin!(deadline);
    let mut ticks = tokio::time::interval(BOOKMARK_INTERVAL);
    ticks.reset();

    let mut sent = match request.from {
        Some(version) => version,
        None => {
            let (objects, revision) = {
                let store = shared.store();
                (store.matching(&request.filter), store.revision)
            };
            let mut chunks = Chunks::default();
            for object in &objects {
                chunks.push("ADDED", object);
            }
            for chunk in chunks.done() {
                if lines.send(chunk).await.is_err() {
                    return;
                }
            }
            if request.initial_events_end {
                let _ = lines
                    .send(bookmark_line(&request.filter, revision, true))
                    .await;
            }
            revision
        }
    };
    loop {
        changes.borrow_and_update();
        let pending = pending_lines(&shared.store(), &request.filter, sent);
        match pending {
            Ok((pending, reached)) => {
                for line in pending {
                    if lines.send(line).await.is_err() {
                        return;
                    }
                }
                // A watch from a version still to come waits for it.
                sent = sent.max(reached);
            }
            Err(gone) => {
                let _ = lines.send(gone).await;
                return;
            }
        }
        let bookmark = tokio::select! {
            _ = changes.changed() => false,
            _ = bookmarks.changed() => true,
            _ = ticks.tick() => true,
            _ = drops.changed() => return,
            _ = &mut deadline => return,
            _ = lines.closed() => return,
        };
        if bookmark && request.bookmarks {
            let _ = lines
                .send(bookmark_line(&request.filter, sent, false))
                .await;
        }
    }
}
