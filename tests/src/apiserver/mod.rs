//! An in-process Kubernetes API server for tests: the real list/watch wire protocol over plain
//! HTTP on 127.0.0.1 (of the test's network namespace, or of a given one), so the real kube-rs
//! client, in a test or in a spawned lbagent, talks to it.
//!
//! It serves core v1 Services, Nodes, Namespaces and Events, discovery.k8s.io/v1
//! EndpointSlices, events.k8s.io/v1 Events, coordination.k8s.io/v1 Leases and lbagent.io/v1alpha1
//! AddressPools (a custom resource), stored as JSON. Resources with a status subresource behave
//! as the real server's: `.../status` writes change only the status, writes to the object
//! itself keep the stored status, and a create drops it. A write that names a resourceVersion
//! other than the stored one gets 409 Conflict. Every change takes the next value of one global
//! resourceVersion counter and enters a bounded history that watches replay from. Tests drive it
//! with [`ApiServer::apply`]/[`ApiServer::delete`] and inject faults: a killed server
//! ([`ApiServer::stop`]), expired history ([`ApiServer::compact`], so watches get 410 Gone),
//! closed watches and a paginated list that fails half way.

mod http;
mod selector;
mod store;
mod watches;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::Instant,
};

use axum::{Router, extract::Query, http::Uri};
use serde_json::Value;
use tokio::{
    net::TcpSocket,
    sync::{oneshot, watch},
};

pub use self::http::merge_patch;

/// The addresses a Service's status gives it.
pub fn ingress(service: &Value) -> Vec<String> {
    service["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().map(str::to_owned))
        .collect()
}
use crate::NetNs;
use store::Store;

/// A resource this server serves: its API version, plural (the path segment) and kind.
struct Resource {
    api_version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    /// Whether `status` is written only through the `/status` subresource.
    status: bool,
}

const RESOURCES: &[Resource] = &[
    Resource::new("v1", "services", "Service", true).with_status(),
    Resource::new("v1", "nodes", "Node", false).with_status(),
    Resource::new("v1", "namespaces", "Namespace", false).with_status(),
    Resource::new("v1", "events", "Event", true),
    Resource::new(
        "discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSlice",
        true,
    ),
    Resource::new("events.k8s.io/v1", "events", "Event", true),
    Resource::new("coordination.k8s.io/v1", "leases", "Lease", true),
    Resource::new("lbagent.io/v1alpha1", "addresspools", "AddressPool", false).with_status(),
];

impl Resource {
    const fn new(
        api_version: &'static str,
        plural: &'static str,
        kind: &'static str,
        namespaced: bool,
    ) -> Self {
        Self {
            api_version,
            plural,
            kind,
            namespaced,
            status: false,
        }
    }

    const fn with_status(mut self) -> Self {
        self.status = true;
        self
    }
}

fn resource_index(api_version: &str, kind: &str) -> usize {
    RESOURCES
        .iter()
        .position(|r| r.api_version == api_version && r.kind == kind)
        .unwrap_or_else(|| panic!("the test API server does not serve {api_version} {kind}"))
}

fn key(api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> store::Key {
    let resource = resource_index(api_version, kind);
    (
        resource,
        namespace.unwrap_or_default().to_owned(),
        name.to_owned(),
    )
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
    /// Who asked: the bearer token the client sent (see [`ApiServer::write_kubeconfig_as`]),
    /// `""` if none. Nothing is refused for it; it tells clients apart.
    pub user: String,
    /// When it was answered (a watch: when its stream started), for timing what a client did.
    pub at: Instant,
}

impl RequestRecord {
    /// The decoded value of query parameter `name`, if present.
    pub fn param(&self, name: &str) -> Option<String> {
        let uri: Uri = format!("/?{}", self.query).parse().ok()?;
        let Query(params) = Query::<HashMap<String, String>>::try_from_uri(&uri).ok()?;
        params.get(name).cloned()
    }

    pub fn is_watch(&self) -> bool {
        matches!(self.param("watch").as_deref(), Some("true" | "1"))
    }

    /// What a ClusterRole must allow for this request: (API group, `""` for core; resource;
    /// verb). `None` for a path that names no resource this server serves.
    pub fn rbac(&self) -> Option<(String, String, &'static str)> {
        let target = http::parse_path(&self.path)?;
        let resource = &RESOURCES[target.resource];
        let verb = match (self.method.as_str(), target.name.is_some()) {
            ("GET", false) if self.is_watch() => "watch",
            ("GET", false) => "list",
            ("GET", true) => "get",
            ("POST", false) => "create",
            ("PUT", true) => "update",
            ("PATCH", true) => "patch",
            ("DELETE", true) => "delete",
            _ => return None,
        };
        let group = match resource.api_version.split_once('/') {
            Some((group, _)) => group,
            None => "",
        };
        let resource = match target.subresource {
            Some(subresource) => format!("{}/{subresource}", resource.plural),
            None => resource.plural.to_owned(),
        };
        Some((group.to_owned(), resource, verb))
    }
}

/// The API server. Faults and state changes take `&self`, so one server can be shared.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// The network namespace it listens in, if not the test's own.
    netns: Option<PathBuf>,
    /// Bound but not listening: while stopped, connections are refused and no other socket
    /// is given the port, so a restart gets it back.
    _port: TcpSocket,
    running: Mutex<Option<Running>>,
}

impl ApiServer {
    /// Starts serving on 127.0.0.1 at a port of its own, on a thread and runtime of its own.
    pub fn start() -> Self {
        Self::start_listening(None, Ipv4Addr::LOCALHOST)
    }

    /// Starts serving on 127.0.0.1 inside `ns`, for an lbagent run there (the test's own
    /// 127.0.0.1 is out of its reach). Only the control methods reach it from outside.
    pub fn start_in(ns: &NetNs) -> Self {
        Self::start_in_at(ns, Ipv4Addr::LOCALHOST)
    }

    /// Starts serving on `ip` (an address of `ns`), for clients in other namespaces that
    /// route to it, as nodes reach a cluster's API server.
    pub fn start_in_at(ns: &NetNs, ip: Ipv4Addr) -> Self {
        Self::start_listening(Some(Path::new("/run/netns").join(ns.name())), ip)
    }

    fn start_listening(netns: Option<PathBuf>, ip: Ipv4Addr) -> Self {
        let any_port = SocketAddr::from((ip, 0));
        let port = bound_socket(netns.as_deref(), any_port).expect("reserve a port");
        let addr = port.local_addr().expect("local address");
        let listener = bound_socket(netns.as_deref(), addr).expect("bind the test API server");
        let shared = Arc::new(Shared::default());
        let running = Running::start(listener, shared.clone());
        Self {
            shared,
            addr,
            netns,
            _port: port,
            running: Mutex::new(Some(running)),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig whose current context reaches this server without authentication.
    pub fn write_kubeconfig(&self, path: &Path) {
        self.write_kubeconfig_as(path, None);
    }

    /// As [`ApiServer::write_kubeconfig`], sending `token` as a bearer token, so the request
    /// log tells this client's requests from others' ([`RequestRecord::user`]).
    pub fn write_kubeconfig_as(&self, path: &Path, token: Option<&str>) {
        let user = match token {
            Some(token) => format!("{{token: {token}}}"),
            None => "{}".to_owned(),
        };
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {}\n\
             users:\n- name: test\n  user: {user}\ncontexts:\n- name: test\n  context:\n    \
             cluster: test\n    user: test\n    namespace: default\ncurrent-context: test\n",
            self.url()
        );
        std::fs::write(path, kubeconfig)
            .unwrap_or_else(|err| panic!("write kubeconfig {}: {err}", path.display()));
    }

    /// Creates or replaces an object (a namespaced one without a namespace goes to "default"),
    /// as `kubectl apply` would; watches see ADDED or MODIFIED. Returns the stored object.
    /// Unlike a client's create, it keeps a given status and creationTimestamp, as a restored
    /// cluster would hold them.
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
        let key = key(api_version, kind, namespace, name);
        self.shared.mutate(|store| store.remove(&key))
    }

    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let key = key(api_version, kind, namespace, name);
        let store = self.shared.store();
        store.objects.get(&key).map(|stored| stored.object.clone())
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

    /// The notes of the Events recorded on the object named `name` with `reason`.
    pub fn event_notes(&self, name: &str, reason: &str) -> Vec<String> {
        self.events()
            .into_iter()
            .filter(|e| e["regarding"]["name"] == name && e["reason"] == reason)
            .map(|e| e["note"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// Panics unless every request so far is one of `access` (what a ClusterRole grants).
    pub fn assert_requests_within(&self, access: &[lbagent::ApiAccess]) {
        for request in self.request_log() {
            let (group, resource, verb) = request
                .rbac()
                .unwrap_or_else(|| panic!("not an API call: {request:?}"));
            assert!(
                access
                    .iter()
                    .any(|a| a.group == group && a.resource == resource && a.verbs.contains(&verb)),
                "{verb} {group}/{resource} is not in the declared API access: {request:?}"
            );
        }
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

    /// Keeps the last `changes` changes for watches to replay (1000 unless set), as a real
    /// server keeps the changes since its last compaction (five minutes by default).
    pub fn keep_history(&self, changes: usize) {
        self.shared.store().history_limit = changes.max(1);
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
        let listener = bound_socket(self.netns.as_deref(), self.addr)
            .unwrap_or_else(|err| panic!("rebind the test API server on {}: {err}", self.addr));
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

    /// Before the next client write (PUT or PATCH) to this object is applied, `change` is
    /// merge-patched into it, as another client's write landing just before: a write that
    /// names the resourceVersion it read then gets a real 409 Conflict.
    pub fn change_before_next_write(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        change: Value,
    ) {
        let key = key(api_version, kind, namespace, name);
        self.shared.store().interleave.insert(key, change);
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

    /// The requests after the first `from` of the log, for a poll that must stay cheap while
    /// the log grows to tens of thousands.
    pub fn request_log_since(&self, from: usize) -> Vec<RequestRecord> {
        let log = self.shared.log.lock().expect("log lock");
        log.get(from..).map(<[_]>::to_vec).unwrap_or_default()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A socket bound to `addr` (in `netns` if given: a socket stays in the namespace it was created
/// in, whichever thread serves it later). SO_REUSEPORT lets the listener share the port with
/// the socket that keeps it reserved.
fn bound_socket(netns: Option<&Path>, addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let bind = move || {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.set_reuseport(true)?;
        socket.bind(addr)?;
        Ok(socket)
    };
    let Some(netns) = netns else {
        return bind();
    };
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&netns)?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        bind()
    })
    .join()
    .expect("bind thread")
}

/// The serving thread: a current-thread runtime whose drop closes every connection at once.
struct Running {
    stop: oneshot::Sender<()>,
    thread: JoinHandle<()>,
}

impl Running {
    fn start(socket: TcpSocket, shared: Arc<Shared>) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        // Named, so a profile of a test tells the server's work from the test's.
        let thread = std::thread::Builder::new()
            .name("test-apiserver".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("test API server runtime");
                runtime.block_on(async move {
                    let listener = socket.listen(1024).expect("listen");
                    let app = Router::new().fallback(http::handle).with_state(shared);
                    tokio::select! {
                        result = axum::serve(listener, app) => result.expect("serve"),
                        _ = stopped => {}
                    }
                });
            })
            .expect("spawn the test API server thread");
        Self { stop, thread }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        self.thread.join().expect("test API server thread");
    }
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
