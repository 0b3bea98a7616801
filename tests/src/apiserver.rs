//! An in-process Kubernetes API server for tests: the real list/watch wire protocol over plain
//! HTTP on 127.0.0.1, so the real kube-rs client (in a test or in a spawned lbagent) talks to it.
//!
//! It serves core v1 Services, Nodes and Events, discovery.k8s.io/v1 EndpointSlices and
//! events.k8s.io/v1 Events, stored as JSON. Every change takes the next value of one global
//! resourceVersion counter and enters a bounded history that watches replay from. Tests drive it
//! with [`ApiServer::apply`]/[`ApiServer::delete`] and inject faults: a killed server
//! ([`ApiServer::stop`]), expired history ([`ApiServer::compact`], so watches get 410 Gone),
//! closed watches and a paginated list that fails half way.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    convert::Infallible,
    net::{SocketAddr, TcpListener},
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot, watch};

/// How many changes watches can replay; older resourceVersions get 410 Gone.
const HISTORY: usize = 1000;
/// How often an open watch that allows bookmarks gets one.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// What the real API server picks (at random, from 1800 s up) when a watch names no timeout.
const DEFAULT_WATCH_TIMEOUT: u64 = 1800;

/// A resource this server serves: its API version, plural (the path segment) and kind.
struct Resource {
    api_version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
}

const RESOURCES: &[Resource] = &[
    Resource {
        api_version: "v1",
        plural: "services",
        kind: "Service",
        namespaced: true,
    },
    Resource {
        api_version: "v1",
        plural: "nodes",
        kind: "Node",
        namespaced: false,
    },
    Resource {
        api_version: "v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
    },
    Resource {
        api_version: "discovery.k8s.io/v1",
        plural: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
    },
    Resource {
        api_version: "events.k8s.io/v1",
        plural: "events",
        kind: "Event",
        namespaced: true,
    },
];

fn resource_index(api_version: &str, kind: &str) -> usize {
    RESOURCES
        .iter()
        .position(|r| r.api_version == api_version && r.kind == kind)
        .unwrap_or_else(|| panic!("the test API server does not serve {api_version} {kind}"))
}

/// One request the server received, for asserting reconnects and the calls RBAC must allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw query string, `""` if none.
    pub query: String,
    /// The status the server answered with (a watch's is known when its stream starts).
    pub status: u16,
}

impl RequestRecord {
    /// The decoded value of query parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<String> {
        let uri: Uri = format!("/?{}", self.query).parse().ok()?;
        let Query(params) = Query::<HashMap<String, String>>::try_from_uri(&uri).ok()?;
        params.get(name).cloned()
    }

    pub fn is_watch(&self) -> bool {
        self.param("watch").as_deref() == Some("true")
    }
}

/// The API server. Faults and state changes take `&self`, so one server can be shared.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    running: Mutex<Option<Running>>,
}

impl ApiServer {
    /// Starts serving on 127.0.0.1 at a port of its own, on a thread and runtime of its own.
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the test API server");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared::default());
        let running = Running::start(listener, shared.clone());
        Self {
            shared,
            addr,
            running: Mutex::new(Some(running)),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig whose current context reaches this server without authentication.
    pub fn write_kubeconfig(&self, path: &Path) {
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n\
             users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    \
             cluster: test\n    user: test\n    namespace: default\ncurrent-context: test\n",
            self.url()
        );
        std::fs::write(path, kubeconfig)
            .unwrap_or_else(|err| panic!("write kubeconfig {}: {err}", path.display()));
    }

    /// Creates or replaces an object (a namespaced one without a namespace goes to "default"),
    /// as `kubectl apply` would; watches see ADDED or MODIFIED. Returns the stored object.
    pub fn apply(&self, object: Value) -> Value {
        let api_version = object["apiVersion"]
            .as_str()
            .expect("object has apiVersion");
        let kind = object["kind"].as_str().expect("object has kind");
        let resource = resource_index(api_version, kind);
        let name = object["metadata"]["name"]
            .as_str()
            .expect("object has metadata.name")
            .to_owned();
        let namespace = if RESOURCES[resource].namespaced {
            object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        self.shared.mutate(|store| {
            store
                .put((resource, namespace, name), object, None)
                .expect("apply")
        })
    }

    /// Deletes an object; watches see DELETED with its last state. Returns that state.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let key = (
            resource_index(api_version, kind),
            namespace.unwrap_or_default().to_owned(),
            name.to_owned(),
        );
        self.shared.mutate(|store| store.remove(&key))
    }

    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let key = (
            resource_index(api_version, kind),
            namespace.unwrap_or_default().to_owned(),
            name.to_owned(),
        );
        self.shared
            .store()
            .objects
            .get(&key)
            .map(|s| s.object.clone())
    }

    /// Every stored object of a kind, in the order they were created.
    pub fn objects(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let resource = resource_index(api_version, kind);
        let store = self.shared.store();
        let mut found: Vec<_> = store
            .objects
            .iter()
            .filter(|((r, _, _), _)| *r == resource)
            .map(|(_, stored)| stored)
            .collect();
        found.sort_by_key(|stored| stored.created);
        found.into_iter().map(|s| s.object.clone()).collect()
    }

    /// Every Event recorded through either Event API (events.k8s.io/v1 first, then core v1).
    pub fn events(&self) -> Vec<Value> {
        let mut events = self.objects("events.k8s.io/v1", "Event");
        events.extend(self.objects("v1", "Event"));
        events
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().revision
    }

    /// Forgets the change history, as etcd compaction does: a watch or list that names an
    /// older resourceVersion then gets 410 Gone. Open watches that are caught up go on.
    pub fn compact(&self) {
        let mut store = self.shared.store();
        store.history.clear();
        store.compacted = store.revision;
        store.snapshots.clear();
    }

    /// Kills the server: the listener and every open connection close, so requests are
    /// refused. The stored state is kept for [`ApiServer::restart`].
    pub fn stop(&self) {
        let running = self.running.lock().expect("running lock").take();
        if let Some(running) = running {
            running.stop();
        }
    }

    /// Serves again on the same port, with the state it had.
    pub fn restart(&self) {
        self.stop();
        let listener = (0..100)
            .find_map(|_| {
                TcpListener::bind(self.addr)
                    .inspect_err(|_| std::thread::sleep(Duration::from_millis(20)))
                    .ok()
            })
            .unwrap_or_else(|| panic!("rebind the test API server on {}", self.addr));
        *self.running.lock().expect("running lock") =
            Some(Running::start(listener, self.shared.clone()));
    }

    /// Ends every open watch stream cleanly, as an API server does at a watch's timeout.
    pub fn drop_watches(&self) {
        self.shared.drops.send_modify(|generation| *generation += 1);
    }

    /// Sends a BOOKMARK now on every open watch that allows bookmarks.
    pub fn bookmark(&self) {
        self.shared
            .bookmarks
            .send_modify(|generation| *generation += 1);
    }

    /// The next list that needs more than one page serves `pages` pages, then answers the
    /// request for the one after with 500.
    pub fn fail_list_after_pages(&self, pages: usize) {
        self.shared.store().fail_list_after_pages = Some(pages);
    }

    /// How many watch requests were received.
    pub fn watch_count(&self) -> usize {
        self.shared.watches_started.load(Ordering::SeqCst)
    }

    /// How many watch streams are open now.
    pub fn open_watches(&self) -> usize {
        self.shared.watches_open.load(Ordering::SeqCst)
    }

    pub fn request_log(&self) -> Vec<RequestRecord> {
        self.shared.log.lock().expect("log lock").clone()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The serving thread: a current-thread runtime whose drop closes every connection at once.
struct Running {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl Running {
    fn start(listener: TcpListener, shared: Arc<Shared>) -> Self {
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("test API server runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
                let app = Router::new().fallback(handle).with_state(shared);
                tokio::select! {
                    result = axum::serve(listener, app) => result.expect("serve"),
                    _ = stopped => {}
                }
            });
        });
        Self { stop, thread }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        self.thread.join().expect("test API server thread");
    }
}

type Key = (usize, String, String);

struct Stored {
    object: Value,
    /// The resourceVersion it was created at, to list objects in creation order.
    created: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

struct Change {
    revision: u64,
    resource: usize,
    kind: ChangeType,
    object: Value,
    /// The state before a modification, so label-selected watches see objects enter and leave.
    previous: Option<Value>,
}

/// A paginated list in progress: later pages come from the state of the first.
struct Snapshot {
    revision: u64,
    items: Vec<Value>,
    pages_served: usize,
    fail_after_pages: Option<usize>,
}

#[derive(Default)]
struct Store {
    revision: u64,
    /// History holds every change after this resourceVersion.
    compacted: u64,
    objects: BTreeMap<Key, Stored>,
    history: VecDeque<Change>,
    snapshots: HashMap<u64, Snapshot>,
    next_snapshot: u64,
    fail_list_after_pages: Option<usize>,
}

impl Store {
    /// Creates or replaces the object at `key`. With `expected_version`, replaces only that
    /// version (a client's optimistic concurrency). Server-owned metadata is set here.
    fn put(
        &mut self,
        key: Key,
        mut object: Value,
        expected_version: Option<&str>,
    ) -> Result<Value, Status> {
        let (resource, namespace, name) = &key;
        let spec = &RESOURCES[*resource];
        let previous = self.objects.get(&key).map(|s| s.object.clone());
        if let (Some(expected), Some(current)) = (expected_version, &previous)
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
        let revision = self.revision + 1;
        let (uid, created_at, version) = match &previous {
            Some(old) => {
                let old = &old["metadata"];
                let fields = ["uid", "creationTimestamp", "resourceVersion"];
                fields.map(|field| old[field].clone()).into()
            }
            None => (
                format!("00000000-0000-4000-8000-{revision:012x}").into(),
                now().into(),
                Value::Null,
            ),
        };
        let metadata = &mut object["metadata"];
        metadata["uid"] = uid;
        metadata["creationTimestamp"] = created_at;
        metadata["resourceVersion"] = version;
        if previous.as_ref() == Some(&object) {
            // An unchanged update is no change: no new version, no watch event.
            return Ok(object);
        }
        object["metadata"]["resourceVersion"] = revision.to_string().into();
        self.revision = revision;
        let created = match self.objects.get(&key) {
            Some(stored) => stored.created,
            None => revision,
        };
        self.objects.insert(
            key.clone(),
            Stored {
                object: object.clone(),
                created,
            },
        );
        let kind = if previous.is_some() {
            ChangeType::Modified
        } else {
            ChangeType::Added
        };
        self.record(*resource, kind, object.clone(), previous);
        Ok(object)
    }

    /// Removes an object; its last state, at the deletion's resourceVersion, is returned.
    fn remove(&mut self, key: &Key) -> Option<Value> {
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
        if self.history.len() == HISTORY
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

    fn matching(&self, filter: &Filter) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((resource, _, _), stored)| {
                *resource == filter.resource && filter.matches(&stored.object)
            })
            .map(|(_, stored)| stored.object.clone())
            .collect()
    }
}

fn now() -> String {
    use k8s_openapi::jiff::{Timestamp, Unit};
    Timestamp::now()
        .round(Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

struct Shared {
    store: Mutex<Store>,
    /// The newest resourceVersion, so open watches wake up on changes.
    revision: watch::Sender<u64>,
    drops: watch::Sender<u64>,
    bookmarks: watch::Sender<u64>,
    log: Mutex<Vec<RequestRecord>>,
    watches_started: AtomicUsize,
    watches_open: AtomicUsize,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            store: Mutex::default(),
            revision: watch::Sender::new(0),
            drops: watch::Sender::new(0),
            bookmarks: watch::Sender::new(0),
            log: Mutex::default(),
            watches_started: AtomicUsize::new(0),
            watches_open: AtomicUsize::new(0),
        }
    }
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn mutate<T>(&self, change: impl FnOnce(&mut Store) -> T) -> T {
        let (result, revision) = {
            let mut store = self.store();
            let result = change(&mut store);
            (result, store.revision)
        };
        self.revision.send_replace(revision);
        result
    }
}

/// A metav1 Status, the body of every error the API server returns.
#[derive(Debug)]
struct Status {
    code: u16,
    reason: &'static str,
    message: String,
}

impl Status {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn not_found(plural: &str, name: &str) -> Self {
        Self::new(404, "NotFound", format!("{plural} \"{name}\" not found"))
    }

    fn expired(message: impl Into<String>) -> Self {
        Self::new(410, "Expired", message)
    }

    fn to_json(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

impl IntoResponse for Status {
    fn into_response(self) -> Response {
        let code = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        json_response(code, &self.to_json())
    }
}

fn json_response(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// What a request's path names: a collection, or one object in it.
struct Target {
    resource: usize,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
            (Some((*namespace).to_owned()), rest)
        }
        _ => (None, rest),
    };
    let (plural, name) = match rest {
        [plural] => (*plural, None),
        [plural, name] => (*plural, Some((*name).to_owned())),
        _ => return None,
    };
    let resource = RESOURCES
        .iter()
        .position(|r| r.api_version == api_version && r.plural == plural)?;
    let namespaced = RESOURCES[resource].namespaced;
    if (!namespaced && namespace.is_some()) || (namespaced && namespace.is_none() && name.is_some())
    {
        return None;
    }
    Some(Target {
        resource,
        namespace,
        name,
    })
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let response = route(&shared, &method, &uri, &headers, &body)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    shared.log.lock().expect("log lock").push(RequestRecord {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        status: response.status().as_u16(),
    });
    response
}

async fn route(
    shared: &Arc<Shared>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response, Status> {
    if uri.path() == "/version" {
        let version = json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-lbagent-test"});
        return Ok(json_response(StatusCode::OK, &version));
    }
    let Some(target) = parse_path(uri.path()) else {
        return Err(Status::new(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    let Query(params) = Query::<HashMap<String, String>>::try_from_uri(uri)
        .map_err(|err| Status::bad_request(format!("query: {err}")))?;
    let spec = &RESOURCES[target.resource];
    let namespace = target.namespace.clone().unwrap_or_default();
    match (method.clone(), target.name) {
        (Method::GET, None) => {
            let filter = Filter::new(target.resource, target.namespace, &params)?;
            if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
                start_watch(shared, filter, &params)
            } else {
                list(&mut shared.store(), filter, &params)
            }
        }
        (Method::GET, Some(name)) => {
            let key = (target.resource, namespace, name);
            match shared.store().objects.get(&key) {
                Some(stored) => Ok(json_response(StatusCode::OK, &stored.object)),
                None => Err(Status::not_found(spec.plural, &key.2)),
            }
        }
        (Method::POST, None) => {
            let object = parse_body(body, &namespace)?;
            let created = shared.mutate(|store| {
                let name = object_name(&object, store.revision + 1)?;
                let key = (target.resource, namespace, name);
                if store.objects.contains_key(&key) {
                    return Err(Status::new(
                        409,
                        "AlreadyExists",
                        format!("{} \"{}\" already exists", spec.plural, key.2),
                    ));
                }
                store.put(key, object, None)
            })?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        (Method::PUT, Some(name)) => {
            let object = parse_body(body, &namespace)?;
            let expected = object["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_owned);
            let key = (target.resource, namespace, name);
            let replaced = shared.mutate(|store| {
                if !store.objects.contains_key(&key) {
                    return Err(Status::not_found(spec.plural, &key.2));
                }
                store.put(key, object, expected.as_deref())
            })?;
            Ok(json_response(StatusCode::OK, &replaced))
        }
        (Method::PATCH, Some(name)) => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if content_type != "application/merge-patch+json" {
                return Err(Status::new(
                    415,
                    "UnsupportedMediaType",
                    format!("the test API server applies merge patches only, not {content_type:?}"),
                ));
            }
            let patch: Value = serde_json::from_slice(body)
                .map_err(|err| Status::bad_request(format!("patch body: {err}")))?;
            let expected = patch["metadata"]["resourceVersion"]
                .as_str()
                .map(str::to_owned);
            let key = (target.resource, namespace, name);
            let patched = shared.mutate(|store| {
                let Some(stored) = store.objects.get(&key) else {
                    return Err(Status::not_found(spec.plural, &key.2));
                };
                let mut object = stored.object.clone();
                merge_patch(&mut object, &patch);
                store.put(key, object, expected.as_deref())
            })?;
            Ok(json_response(StatusCode::OK, &patched))
        }
        (Method::DELETE, Some(name)) => {
            let key = (target.resource, namespace, name);
            match shared.mutate(|store| store.remove(&key)) {
                Some(object) => Ok(json_response(StatusCode::OK, &object)),
                None => Err(Status::not_found(spec.plural, &key.2)),
            }
        }
        _ => Err(Status::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on {}", uri.path()),
        )),
    }
}

/// A create or replace body: a JSON object whose namespace, if any, is the request's.
fn parse_body(body: &[u8], namespace: &str) -> Result<Value, Status> {
    let object: Value = serde_json::from_slice(body)
        .map_err(|err| Status::bad_request(format!("request body: {err}")))?;
    if !object.is_object() {
        return Err(Status::bad_request("the request body is not a JSON object"));
    }
    match object["metadata"]["namespace"].as_str() {
        Some(ns) if !ns.is_empty() && ns != namespace => Err(Status::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        )),
        _ => Ok(object),
    }
}

/// The name a created object gets: its own, or its generateName with a unique suffix.
fn object_name(object: &Value, revision: u64) -> Result<String, Status> {
    let metadata = &object["metadata"];
    match (metadata["name"].as_str(), metadata["generateName"].as_str()) {
        (Some(name), _) if !name.is_empty() => Ok(name.to_owned()),
        (_, Some(prefix)) if !prefix.is_empty() => Ok(format!("{prefix}{revision:05x}")),
        _ => Err(Status::new(
            422,
            "Invalid",
            "metadata.name: Required value: name or generateName is required",
        )),
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(fields) = target {
        for (key, value) in patch {
            if value.is_null() {
                fields.remove(key);
            } else {
                merge_patch(fields.entry(key.as_str()).or_insert(Value::Null), value);
            }
        }
    }
}

fn list(
    store: &mut Store,
    filter: Filter,
    params: &HashMap<String, String>,
) -> Result<Response, Status> {
    let limit = match params.get("limit") {
        Some(limit) => limit
            .parse::<usize>()
            .map_err(|_| Status::bad_request(format!("limit: not a number: {limit:?}")))?,
        None => 0,
    };
    let (id, offset) = match params.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => parse_continue(token)?,
        None => {
            check_list_version(store, params)?;
            let id = store.next_snapshot;
            store.next_snapshot += 1;
            let snapshot = Snapshot {
                revision: store.revision,
                items: store.matching(&filter),
                pages_served: 0,
                fail_after_pages: None,
            };
            store.snapshots.insert(id, snapshot);
            (id, 0)
        }
    };
    let pending_fault = store.fail_list_after_pages;
    let Some(snapshot) = store.snapshots.get_mut(&id) else {
        return Err(Status::expired(
            "The provided continue parameter is too old to display a consistent list result. \
             You can start a new list without the continue parameter.",
        ));
    };
    let end = if limit == 0 {
        snapshot.items.len()
    } else {
        (offset + limit).min(snapshot.items.len())
    };
    if snapshot.pages_served == 0 && end < snapshot.items.len() && pending_fault.is_some() {
        snapshot.fail_after_pages = pending_fault;
        store.fail_list_after_pages = None;
    }
    if snapshot.fail_after_pages == Some(snapshot.pages_served) {
        store.snapshots.remove(&id);
        return Err(Status::new(500, "InternalError", "injected list failure"));
    }
    snapshot.pages_served += 1;
    let items = snapshot.items.get(offset..end).unwrap_or_default().to_vec();
    let remaining = snapshot.items.len().saturating_sub(end);
    let mut metadata = json!({"resourceVersion": snapshot.revision.to_string()});
    if remaining > 0 {
        metadata["continue"] = format!("{id}.{end}").into();
        metadata["remainingItemCount"] = remaining.into();
    } else {
        store.snapshots.remove(&id);
    }
    let spec = &RESOURCES[filter.resource];
    let body = json!({
        "kind": format!("{}List", spec.kind),
        "apiVersion": spec.api_version,
        "metadata": metadata,
        "items": items,
    });
    Ok(json_response(StatusCode::OK, &body))
}

fn parse_continue(token: &str) -> Result<(u64, usize), Status> {
    token
        .split_once('.')
        .and_then(|(id, offset)| Some((id.parse().ok()?, offset.parse().ok()?)))
        .ok_or_else(|| Status::bad_request(format!("continue key is not valid: {token:?}")))
}

/// A list can only be served at the newest version: an older Exact one is gone, a newer one
/// does not exist yet.
fn check_list_version(store: &Store, params: &HashMap<String, String>) -> Result<(), Status> {
    let Some(version) = params.get("resourceVersion").filter(|v| !v.is_empty()) else {
        return Ok(());
    };
    let version = parse_version(version)?;
    let exact = params.get("resourceVersionMatch").map(String::as_str) == Some("Exact");
    if exact && version < store.revision {
        return Err(Status::expired(format!(
            "too old resource version: {version} ({})",
            store.revision
        )));
    }
    if version > store.revision {
        return Err(Status::new(
            504,
            "Timeout",
            format!(
                "Too large resource version: {version}, current: {}",
                store.revision
            ),
        ));
    }
    Ok(())
}

fn parse_version(version: &str) -> Result<u64, Status> {
    version
        .parse()
        .map_err(|_| Status::bad_request(format!("invalid resource version: {version:?}")))
}

/// Which objects a list or watch wants: a resource, maybe one namespace, and selectors.
struct Filter {
    resource: usize,
    namespace: Option<String>,
    labels: Vec<LabelRequirement>,
    fields: Vec<(String, bool, String)>,
}

enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Filter {
    fn new(
        resource: usize,
        namespace: Option<String>,
        params: &HashMap<String, String>,
    ) -> Result<Self, Status> {
        let labels = match params.get("labelSelector") {
            Some(selector) => parse_label_selector(selector)
                .map_err(|err| Status::bad_request(format!("labelSelector {selector:?}: {err}")))?,
            None => Vec::new(),
        };
        let fields = match params.get("fieldSelector") {
            Some(selector) => parse_field_selector(selector)?,
            None => Vec::new(),
        };
        Ok(Self {
            resource,
            namespace,
            labels,
            fields,
        })
    }

    fn matches(&self, object: &Value) -> bool {
        let metadata = &object["metadata"];
        if let Some(namespace) = &self.namespace
            && metadata["namespace"].as_str() != Some(namespace)
        {
            return false;
        }
        let fields_match = self.fields.iter().all(|(field, equal, value)| {
            let actual = match field.as_str() {
                "metadata.name" => metadata["name"].as_str(),
                _ => metadata["namespace"].as_str(),
            };
            (actual.unwrap_or_default() == value) == *equal
        });
        let label = |key: &str| metadata["labels"][key].as_str();
        fields_match
            && self.labels.iter().all(|requirement| match requirement {
                LabelRequirement::Equals(k, v) => label(k) == Some(v),
                LabelRequirement::NotEquals(k, v) => label(k) != Some(v),
                LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
                LabelRequirement::NotIn(k, vs) => {
                    !label(k).is_some_and(|l| vs.iter().any(|v| v == l))
                }
                LabelRequirement::Exists(k) => label(k).is_some(),
                LabelRequirement::NotExists(k) => label(k).is_none(),
            })
    }
}

/// `a=b`, `a==b`, `a!=b`, `a in (b,c)`, `a notin (b,c)`, `a`, `!a`, joined by commas.
fn parse_label_selector(selector: &str) -> Result<Vec<LabelRequirement>, String> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    let key = |k: &str| {
        let k = k.trim();
        if k.is_empty() || k.contains(char::is_whitespace) || k.contains(['=', '!', '(', ')']) {
            Err(format!("invalid label key {k:?}"))
        } else {
            Ok(k.to_owned())
        }
    };
    let values = |v: &str| {
        let v = v.trim();
        v.strip_prefix('(')
            .and_then(|v| v.strip_suffix(')'))
            .map(|v| v.split(',').map(|v| v.trim().to_owned()).collect())
            .ok_or_else(|| format!("expected a parenthesized list, got {v:?}"))
    };
    terms
        .into_iter()
        .map(str::trim)
        .filter(|term| !term.is_empty())
        .map(|term| {
            Ok(if let Some(k) = term.strip_prefix('!') {
                LabelRequirement::NotExists(key(k)?)
            } else if let Some((k, v)) = term.split_once(" notin ") {
                LabelRequirement::NotIn(key(k)?, values(v)?)
            } else if let Some((k, v)) = term.split_once(" in ") {
                LabelRequirement::In(key(k)?, values(v)?)
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelRequirement::NotEquals(key(k)?, v.trim().to_owned())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                LabelRequirement::Equals(key(k)?, v.trim().to_owned())
            } else {
                LabelRequirement::Exists(key(term)?)
            })
        })
        .collect()
}

/// `metadata.name` and `metadata.namespace` with `=`, `==` or `!=`, joined by commas.
fn parse_field_selector(selector: &str) -> Result<Vec<(String, bool, String)>, Status> {
    selector
        .split(',')
        .filter(|term| !term.trim().is_empty())
        .map(|term| {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                return Err(Status::bad_request(format!(
                    "invalid field selector term {term:?}"
                )));
            };
            let field = field.trim();
            if field != "metadata.name" && field != "metadata.namespace" {
                return Err(Status::bad_request(format!(
                    "field label not supported: {field}"
                )));
            }
            Ok((field.to_owned(), equal, value.trim().to_owned()))
        })
        .collect()
}

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

fn start_watch(
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
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark_line(filter: &Filter, revision: u64, initial_events_end: bool) -> Bytes {
    let spec = &RESOURCES[filter.resource];
    let mut metadata = json!({"resourceVersion": revision.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    let object = json!({"kind": spec.kind, "apiVersion": spec.api_version, "metadata": metadata});
    event_line("BOOKMARK", &object)
}

/// The lines a watch at `sent` sends next: the changes it has not seen that match it, or a
/// 410 ERROR if history no longer reaches back to it. Returns the version it reached.
fn pending_lines(store: &Store, filter: &Filter, sent: u64) -> Result<(Vec<Bytes>, u64), Bytes> {
    if sent < store.compacted {
        let status = Status::expired(format!(
            "too old resource version: {sent} ({})",
            store.compacted
        ));
        return Err(event_line("ERROR", &status.to_json()));
    }
    let lines = store
        .history
        .iter()
        .filter(|change| change.revision > sent && change.resource == filter.resource)
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
            Some(event_line(kind, &change.object))
        })
        .collect();
    Ok((lines, store.revision))
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
            for object in objects {
                if lines.send(event_line("ADDED", &object)).await.is_err() {
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
                sent = reached;
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
