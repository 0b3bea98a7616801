//! The test API server against the real kube-rs client: list, watch, pagination, selectors,
//! 410 Gone, a killed and restarted server, failing lists, bookmarks, the event Recorder, status
//! subresources with optimistic concurrency, a custom resource and Leases.
//! These need no root: everything is on 127.0.0.1 in this process.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    core::v1::{Event as CoreEvent, Node, ObjectReference, Service},
    discovery::v1::EndpointSlice,
    events::v1::Event as EventsEvent,
};
use kube::{
    Api, Client, Config, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams, VersionMatch, WatchEvent, WatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    core::ObjectMeta,
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
};
use lbagent_tests::{NetNs, TempDir, apiserver::ApiServer, in_netns};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::{sync::mpsc, task::JoinHandle, time::timeout};

const WAIT: Duration = Duration::from_secs(10);

/// A kube client built the way lbagent builds one: from the kubeconfig the server wrote.
async fn client(server: &ApiServer) -> Client {
    let dir = TempDir::new("apiserver-kubeconfig");
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path);
    let kubeconfig = Kubeconfig::read_from(&path).expect("read the kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube accepts the kubeconfig");
    assert_eq!(config.cluster_url.to_string(), format!("{}/", server.url()));
    Client::try_from(config).expect("kube client")
}

fn service(namespace: &str, name: &str, version: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": format!("203.0.113.{version}")}]}},
    })
}

fn versioned_service(namespace: &str, name: &str, version: &str) -> Value {
    service(namespace, name, version, json!({"v": version}))
}

fn endpoint_slice(namespace: &str, name: &str, version: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": "web", "v": version},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.5"], "nodeName": "node-a", "conditions": {"ready": ready}}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    })
}

fn node(name: &str, version: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"v": version}}})
}

/// Waits (without blocking the runtime the watchers run on) until `condition` holds.
async fn eventually(condition: impl Fn() -> bool) {
    let waited = timeout(WAIT, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    waited.await.expect("the condition held within 10 s");
}

/// A watcher event as a test compares it: the object as `namespace/name@label v`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Init,
    InitApply(String),
    InitDone,
    Apply(String),
    Delete(String),
    Error(String),
}

use Seen::*;

fn describe<K: Resource>(object: &K) -> String {
    let meta = object.meta();
    let version = meta
        .labels
        .as_ref()
        .and_then(|labels| labels.get("v"))
        .cloned()
        .unwrap_or_default();
    match &meta.namespace {
        Some(namespace) => format!("{namespace}/{}@{version}", object.name_any()),
        None => format!("{}@{version}", object.name_any()),
    }
}

fn describe_error(err: &watcher::Error) -> String {
    let status = |err: &kube::Error| match err {
        kube::Error::Api(status) => format!("{} {}", status.code, status.reason),
        other => format!("{other}"),
    };
    match err {
        watcher::Error::InitialListFailed(err) => format!("list {}", status(err)),
        watcher::Error::WatchStartFailed(err) => format!("watch start {}", status(err)),
        watcher::Error::WatchError(status) => format!("watch {} {}", status.code, status.reason),
        other => format!("{other}"),
    }
}

/// A kube-rs watcher running on its own task, its events collected in order.
struct Watching {
    events: mpsc::UnboundedReceiver<Seen>,
    task: JoinHandle<()>,
}

impl Watching {
    fn start<K>(api: Api<K>, config: watcher::Config, backoff: bool) -> Self
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    {
        let (sender, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let stream = watcher(api, config);
            let mut stream = if backoff {
                stream.default_backoff().boxed()
            } else {
                stream.boxed()
            };
            while let Some(event) = stream.next().await {
                let seen = match event {
                    Ok(watcher::Event::Init) => Init,
                    Ok(watcher::Event::InitApply(object)) => InitApply(describe(&object)),
                    Ok(watcher::Event::InitDone) => InitDone,
                    Ok(watcher::Event::Apply(object)) => Apply(describe(&object)),
                    Ok(watcher::Event::Delete(object)) => Delete(describe(&object)),
                    Err(err) => Error(describe_error(&err)),
                };
                if sender.send(seen).is_err() {
                    break;
                }
            }
        });
        Self { events, task }
    }

    async fn next(&mut self) -> Seen {
        timeout(WAIT, self.events.recv())
            .await
            .expect("a watcher event within 10 s")
            .expect("the watcher runs")
    }

    async fn next_n(&mut self, n: usize) -> Vec<Seen> {
        let mut seen = Vec::new();
        for _ in 0..n {
            seen.push(self.next().await);
        }
        seen
    }

    /// Every event up to and including the first one equal to `last`.
    async fn until(&mut self, last: &Seen) -> Vec<Seen> {
        let mut seen = Vec::new();
        loop {
            let event = self.next().await;
            seen.push(event.clone());
            if &event == last {
                return seen;
            }
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The objects of a complete initial list, from its last Init to InitDone.
fn relisted(seen: &[Seen]) -> Vec<String> {
    let start = seen.iter().rposition(|s| *s == Init).expect("an Init");
    assert_eq!(
        seen.last(),
        Some(&InitDone),
        "the relist completes: {seen:?}"
    );
    seen[start + 1..seen.len() - 1]
        .iter()
        .map(|s| match s {
            InitApply(object) => object.clone(),
            other => panic!("{other:?} inside an initial list: {seen:?}"),
        })
        .collect()
}

#[tokio::test]
async fn services_endpointslices_and_a_field_selected_node_are_listed_and_watched() {
    let server = ApiServer::start();
    server.apply(versioned_service("a", "web", "1"));
    server.apply(versioned_service("b", "dns", "1"));
    server.apply(endpoint_slice("a", "web-x1", "1", true));
    server.apply(endpoint_slice("b", "dns-x1", "1", true));
    server.apply(node("node-a", "1"));
    server.apply(node("node-b", "1"));
    let client = client(&server).await;
    let config = watcher::Config::default();
    let mut services = Watching::start(Api::<Service>::all(client.clone()), config.clone(), false);
    let mut slices = Watching::start(
        Api::<EndpointSlice>::namespaced(client.clone(), "a"),
        config.clone(),
        false,
    );
    let mut nodes = Watching::start(
        Api::<Node>::all(client.clone()),
        config.fields("metadata.name=node-a"),
        false,
    );

    assert_eq!(
        services.next_n(4).await,
        [
            Init,
            InitApply("a/web@1".into()),
            InitApply("b/dns@1".into()),
            InitDone
        ]
    );
    assert_eq!(
        slices.next_n(3).await,
        [Init, InitApply("a/web-x1@1".into()), InitDone]
    );
    assert_eq!(
        nodes.next_n(3).await,
        [Init, InitApply("node-a@1".into()), InitDone]
    );

    server.apply(versioned_service("a", "web", "2"));
    server.apply(versioned_service("c", "new", "1"));
    server.delete("v1", "Service", Some("b"), "dns");
    assert_eq!(
        services.next_n(3).await,
        [
            Apply("a/web@2".into()),
            Apply("c/new@1".into()),
            Delete("b/dns@1".into())
        ]
    );

    // Changes outside the namespace or the field selector must not arrive before the next
    // change inside it.
    server.apply(endpoint_slice("b", "dns-x1", "2", false));
    server.apply(endpoint_slice("a", "web-x1", "2", false));
    server.delete("discovery.k8s.io/v1", "EndpointSlice", Some("a"), "web-x1");
    assert_eq!(
        slices.next_n(2).await,
        [Apply("a/web-x1@2".into()), Delete("a/web-x1@2".into())]
    );
    server.apply(node("node-b", "2"));
    server.apply(node("node-a", "2"));
    server.delete("v1", "Node", None, "node-b");
    server.delete("v1", "Node", None, "node-a");
    assert_eq!(
        nodes.next_n(2).await,
        [Apply("node-a@2".into()), Delete("node-a@2".into())]
    );

    // The watchers listed once and watched from the list's version, cluster-wide or not.
    let log = server.request_log();
    let paths: Vec<_> = log
        .iter()
        .map(|r| (r.path.as_str(), r.is_watch()))
        .collect();
    for path in [
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/namespaces/a/endpointslices",
        "/api/v1/nodes",
    ] {
        assert_eq!(
            paths.iter().filter(|p| **p == (path, false)).count(),
            1,
            "{log:?}"
        );
        assert_eq!(
            paths.iter().filter(|p| **p == (path, true)).count(),
            1,
            "{log:?}"
        );
    }
    let rules: BTreeSet<_> = log.iter().filter_map(|r| r.rbac()).collect();
    let expected = [
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
    ]
    .map(|(group, resource, verb)| (group.to_owned(), resource.to_owned(), verb));
    assert_eq!(rules, expected.into_iter().collect());
    let node_watch = log
        .iter()
        .find(|r| r.path == "/api/v1/nodes" && r.is_watch());
    let node_watch = node_watch.expect("a node watch");
    assert_eq!(
        node_watch.param("fieldSelector").as_deref(),
        Some("metadata.name=node-a")
    );
    assert_eq!(node_watch.param("resourceVersion").as_deref(), Some("6"));
    assert_eq!(server.watch_count(), 3);
}

#[tokio::test]
async fn objects_get_server_metadata_and_unchanged_applies_are_no_change() {
    let server = ApiServer::start();
    let first = server.apply(versioned_service("a", "web", "1"));
    let second = server.apply(versioned_service("a", "other", "1"));
    assert_eq!(first["metadata"]["resourceVersion"], "1");
    assert_eq!(second["metadata"]["resourceVersion"], "2");
    assert_ne!(first["metadata"]["uid"], second["metadata"]["uid"]);
    let created = first["metadata"]["creationTimestamp"]
        .as_str()
        .expect("creationTimestamp");
    assert!(created.ends_with('Z') && created.len() == 20, "{created}");

    assert_eq!(server.apply(versioned_service("a", "web", "1")), first);
    assert_eq!(server.resource_version(), 2);
    let changed = server.apply(versioned_service("a", "web", "2"));
    assert_eq!(changed["metadata"]["resourceVersion"], "3");
    assert_eq!(changed["metadata"]["uid"], first["metadata"]["uid"]);

    let client = client(&server).await;
    let fetched = Api::<Service>::namespaced(client, "a")
        .get("web")
        .await
        .expect("get");
    assert_eq!(fetched.resource_version().as_deref(), Some("3"));
    assert_eq!(
        server.get("v1", "Service", Some("a"), "web"),
        Some(changed.clone())
    );
    let deleted = server
        .delete("v1", "Service", Some("a"), "web")
        .expect("deleted");
    assert_eq!(deleted["metadata"]["resourceVersion"], "4");
    assert_eq!(server.get("v1", "Service", Some("a"), "web"), None);
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists_and_watches() {
    let server = ApiServer::start();
    server.apply(service(
        "a",
        "web",
        "1",
        json!({"app": "web", "tier": "front"}),
    ));
    server.apply(service(
        "a",
        "db",
        "1",
        json!({"app": "db", "tier": "back"}),
    ));
    server.apply(service("b", "web", "1", json!({"app": "web"})));
    server.apply(service("b", "plain", "1", json!({})));
    let client = client(&server).await;
    let services = Api::<Service>::all(client.clone());
    let names = |list: kube::core::ObjectList<Service>| {
        list.items
            .iter()
            .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
            .collect::<Vec<_>>()
    };
    for (selector, expected) in [
        ("app=web", vec!["a/web", "b/web"]),
        ("app==web,tier=front", vec!["a/web"]),
        ("app!=web", vec!["a/db", "b/plain"]),
        ("tier", vec!["a/db", "a/web"]),
        ("!tier", vec!["b/plain", "b/web"]),
        ("app in (db, web),tier notin (front)", vec!["a/db", "b/web"]),
    ] {
        let list = services
            .list(&ListParams::default().labels(selector))
            .await
            .expect("list");
        assert_eq!(names(list), expected, "labelSelector {selector}");
    }
    for (selector, expected) in [
        ("metadata.name=web", vec!["a/web", "b/web"]),
        ("metadata.namespace=b,metadata.name!=web", vec!["b/plain"]),
    ] {
        let list = services
            .list(&ListParams::default().fields(selector))
            .await
            .expect("list");
        assert_eq!(names(list), expected, "fieldSelector {selector}");
    }

    // An object that starts or stops matching a watch's selector is ADDED or DELETED for it.
    let config = watcher::Config::default().labels("app=web");
    let mut watching = Watching::start(services, config, false);
    assert_eq!(
        watching.next_n(4).await,
        [
            Init,
            InitApply("a/web@".into()),
            InitApply("b/web@".into()),
            InitDone
        ]
    );
    server.apply(service("a", "web", "2", json!({"app": "web2", "v": "2"})));
    server.apply(service("a", "db", "2", json!({"app": "db", "v": "2"})));
    server.apply(service("b", "plain", "2", json!({"app": "web", "v": "2"})));
    assert_eq!(
        watching.next_n(2).await,
        [Delete("a/web@2".into()), Apply("b/plain@2".into())]
    );
}

#[tokio::test]
async fn lists_are_paginated_from_one_snapshot() {
    let server = ApiServer::start();
    for i in 0..7 {
        server.apply(versioned_service("a", &format!("s{i}"), "1"));
    }
    let client = client(&server).await;
    let services = Api::<Service>::namespaced(client, "a");
    let first = services
        .list(&ListParams::default().limit(3))
        .await
        .expect("first page");
    assert_eq!(first.items.len(), 3);
    assert_eq!(first.metadata.remaining_item_count, Some(4));
    assert_eq!(first.metadata.resource_version.as_deref(), Some("7"));
    let token = first.metadata.continue_.clone().expect("a continue token");

    // A change after the first page does not show in the pages of that list.
    server.apply(versioned_service("a", "s5", "2"));
    server.delete("v1", "Service", Some("a"), "s6");
    let second = services
        .list(&ListParams::default().limit(3).continue_token(&token))
        .await
        .expect("second page");
    let third = services
        .list(
            &ListParams::default()
                .limit(3)
                .continue_token(second.metadata.continue_.as_deref().expect("token")),
        )
        .await
        .expect("third page");
    assert_eq!(third.metadata.continue_, None);
    assert_eq!(third.metadata.resource_version.as_deref(), Some("7"));
    let all: Vec<_> = [first, second, third]
        .iter()
        .flat_map(|page| page.items.iter().map(describe))
        .collect();
    let expected: Vec<_> = (0..7).map(|i| format!("a/s{i}@1")).collect();
    assert_eq!(all, expected);

    // A continuation can be asked for again, until a compaction.
    let again = ListParams::default().limit(3).continue_token(&token);
    let page = services.list(&again).await.expect("the second page again");
    let items: Vec<_> = page.items.iter().map(describe).collect();
    assert_eq!(items, expected[3..6]);
    server.compact();
    match services.list(&again).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
        }
        other => panic!("expected 410 for a continuation across a compaction: {other:?}"),
    }

    // A new list sees the changes.
    let fresh = services.list(&ListParams::default()).await.expect("list");
    assert_eq!(fresh.items.len(), 6);
    assert_eq!(fresh.metadata.resource_version.as_deref(), Some("9"));
    assert_eq!(fresh.metadata.continue_, None);
}

#[tokio::test]
async fn the_watcher_lists_in_pages_of_its_page_size() {
    let server = ApiServer::start();
    for i in 0..5 {
        server.apply(versioned_service("a", &format!("s{i}"), "1"));
    }
    let client = client(&server).await;
    let config = watcher::Config::default().page_size(2);
    let mut watching = Watching::start(Api::<Service>::all(client), config, false);
    let seen = watching.until(&InitDone).await;
    let expected: Vec<_> = (0..5).map(|i| format!("a/s{i}@1")).collect();
    assert_eq!(relisted(&seen), expected);
    assert_eq!(seen.len(), 7, "{seen:?}");

    let lists: Vec<_> = server
        .request_log()
        .into_iter()
        .filter(|r| !r.is_watch())
        .collect();
    assert_eq!(lists.len(), 3, "{lists:?}");
    assert!(
        lists
            .iter()
            .all(|r| r.param("limit").as_deref() == Some("2"))
    );
    assert_eq!(lists[0].param("continue"), None);
    assert!(lists[1..].iter().all(|r| r.param("continue").is_some()));
}

#[tokio::test]
async fn compaction_gives_410_and_the_watcher_relists_into_the_new_state() {
    let server = ApiServer::start();
    server.apply(versioned_service("a", "web", "1"));
    server.apply(versioned_service("a", "dns", "1"));
    let client = client(&server).await;
    let services = Api::<Service>::all(client.clone());

    let mut watching = Watching::start(services.clone(), watcher::Config::default(), true);
    assert_eq!(watching.until(&InitDone).await.len(), 4);
    eventually(|| server.open_watches() == 1).await;

    // While the server is down its history moves on and is compacted: the watcher's version
    // is gone when it comes back.
    server.stop();
    server.apply(versioned_service("a", "web", "2"));
    server.delete("v1", "Service", Some("a"), "dns");
    server.apply(versioned_service("b", "new", "1"));
    server.compact();
    server.restart();

    let seen = watching.until(&InitDone).await;
    let gone = seen
        .iter()
        .position(|s| *s == Error("watch 410 Expired".into()));
    let gone = gone.unwrap_or_else(|| panic!("no 410 before the relist: {seen:?}"));
    assert!(
        seen[..gone]
            .iter()
            .all(|s| matches!(s, Error(e) if e.starts_with("watch start"))),
        "{seen:?}"
    );
    assert_eq!(seen[gone + 1], Init, "{seen:?}");
    assert_eq!(relisted(&seen), ["a/web@2", "b/new@1"]);

    // The same for a bare watch and an exact list at an old version.
    let mut stream = services
        .watch(&WatchParams::default(), "1")
        .await
        .expect("watch starts")
        .boxed();
    match timeout(WAIT, stream.try_next()).await.expect("an event") {
        Ok(Some(WatchEvent::Error(status))) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"));
            assert!(status.message.contains("too old resource version"));
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    let old_list = ListParams::default().at("1").matching(VersionMatch::Exact);
    match services.list(&old_list).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected 410 for an exact list at a compacted version: {other:?}"),
    }

    // A watch at the compaction point itself misses nothing, so it is not gone.
    let now = server.resource_version().to_string();
    let mut stream = services
        .watch(&WatchParams::default().disable_bookmarks(), &now)
        .await
        .expect("watch starts")
        .boxed();
    server.apply(versioned_service("a", "web", "3"));
    match timeout(WAIT, stream.try_next()).await.expect("an event") {
        Ok(Some(WatchEvent::Modified(service))) => assert_eq!(describe(&service), "a/web@3"),
        other => panic!("expected MODIFIED, got {other:?}"),
    }
}

#[tokio::test]
async fn a_killed_server_refuses_connections_and_the_watcher_resumes_after_restart() {
    let server = ApiServer::start();
    server.apply(versioned_service("a", "web", "1"));
    let client = client(&server).await;
    let mut watching = Watching::start(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        true,
    );
    assert_eq!(watching.until(&InitDone).await.len(), 3);
    eventually(|| server.open_watches() == 1).await;

    server.stop();
    assert_eq!(server.open_watches(), 0);
    let addr = server.url().trim_start_matches("http://").to_owned();
    let refused = std::net::TcpStream::connect(&addr).expect_err("the server is down");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let failed = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await;
    assert!(
        failed.is_err(),
        "a list while the server is down: {failed:?}"
    );

    server.apply(versioned_service("a", "web", "2"));
    server.apply(versioned_service("a", "late", "1"));
    // Long enough for the watcher to fail to reconnect at least once.
    let error = watching.next().await;
    assert!(
        matches!(&error, Error(e) if e.starts_with("watch start")),
        "{error:?}"
    );
    server.restart();

    // It resumes from its version: the changes made while down, and no relist.
    let seen = watching.until(&Apply("a/late@1".into())).await;
    let changes: Vec<_> = seen.iter().filter(|s| !matches!(s, Error(_))).collect();
    assert_eq!(
        changes,
        [&Apply("a/web@2".into()), &Apply("a/late@1".into())],
        "{seen:?}"
    );
    let lists = server
        .request_log()
        .iter()
        .filter(|r| !r.is_watch())
        .count();
    assert_eq!(lists, 1, "the watcher listed again");
}

#[tokio::test]
async fn dropped_watches_are_resumed_without_a_relist() {
    let server = ApiServer::start();
    server.apply(versioned_service("a", "web", "1"));
    let client = client(&server).await;
    let mut watching = Watching::start(
        Api::<Service>::all(client),
        watcher::Config::default(),
        false,
    );
    assert_eq!(watching.until(&InitDone).await.len(), 3);
    eventually(|| server.open_watches() == 1).await;
    assert_eq!(server.watch_count(), 1);

    server.drop_watches();
    eventually(|| server.watch_count() == 2).await;
    server.apply(versioned_service("a", "web", "2"));
    assert_eq!(watching.next().await, Apply("a/web@2".into()));
    let log = server.request_log();
    let watches: Vec<_> = log.iter().filter(|r| r.is_watch()).collect();
    assert_eq!(watches.len(), 2);
    assert_eq!(watches[1].param("resourceVersion").as_deref(), Some("1"));
    assert_eq!(log.iter().filter(|r| !r.is_watch()).count(), 1);
}

#[tokio::test]
async fn a_list_failing_half_way_never_completes_an_initial_list() {
    let server = ApiServer::start();
    for i in 0..5 {
        server.apply(versioned_service("a", &format!("s{i}"), "1"));
    }
    server.fail_list_after_pages(1);
    let client = client(&server).await;
    let config = watcher::Config::default().page_size(2);
    let mut watching = Watching::start(Api::<Service>::all(client), config, false);

    let seen = watching.until(&InitDone).await;
    assert_eq!(
        seen[..4],
        [
            Init,
            InitApply("a/s0@1".into()),
            InitApply("a/s1@1".into()),
            Error("list 500 InternalError".into())
        ],
        "{seen:?}"
    );
    let expected: Vec<_> = (0..5).map(|i| format!("a/s{i}@1")).collect();
    assert_eq!(relisted(&seen), expected);
    assert_eq!(seen.iter().filter(|s| **s == InitDone).count(), 1);

    let statuses: Vec<_> = server
        .request_log()
        .iter()
        .filter(|r| !r.is_watch())
        .map(|r| (r.param("continue").is_some(), r.status))
        .collect();
    assert_eq!(
        statuses,
        [
            (false, 200),
            (true, 500),
            (false, 200),
            (true, 200),
            (true, 200)
        ]
    );
}

#[tokio::test]
async fn bookmarks_arrive_periodically_and_on_demand_only_when_allowed() {
    let server = ApiServer::start();
    server.apply(versioned_service("a", "web", "1"));
    let client = client(&server).await;
    let services = Api::<Service>::all(client);

    let mut stream = services
        .watch(&WatchParams::default(), "1")
        .await
        .expect("watch")
        .boxed();
    let bookmark = |event| match event {
        Ok(Some(WatchEvent::Bookmark(bookmark))) => bookmark,
        other => panic!("expected a BOOKMARK, got {other:?}"),
    };
    let periodic = bookmark(timeout(WAIT, stream.try_next()).await.expect("a bookmark"));
    assert_eq!(periodic.metadata.resource_version, "1");
    assert_eq!(periodic.types.kind, "Service");

    server.apply(versioned_service("a", "web", "2"));
    let modified = timeout(WAIT, stream.try_next()).await.expect("an event");
    assert!(
        matches!(modified, Ok(Some(WatchEvent::Modified(_)))),
        "{modified:?}"
    );
    let asked = std::time::Instant::now();
    server.bookmark();
    let on_demand = bookmark(timeout(WAIT, stream.try_next()).await.expect("a bookmark"));
    assert_eq!(on_demand.metadata.resource_version, "2");
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "the bookmark waited for the periodic one: {:?}",
        asked.elapsed()
    );

    // Without allowWatchBookmarks, neither a requested nor a periodic one is sent.
    let mut quiet = services
        .watch(&WatchParams::default().disable_bookmarks(), "2")
        .await
        .expect("watch")
        .boxed();
    server.bookmark();
    // Past the server's 1 s bookmark timer: had it sent one on this watch, a BOOKMARK would
    // come before the change below.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    server.apply(versioned_service("a", "web", "3"));
    let first = timeout(WAIT, quiet.try_next()).await.expect("an event");
    assert!(
        matches!(first, Ok(Some(WatchEvent::Modified(_)))),
        "{first:?}"
    );
}

#[tokio::test]
async fn watches_end_at_their_timeout() {
    let server = ApiServer::start();
    let client = client(&server).await;
    let services = Api::<Service>::all(client);
    let started = std::time::Instant::now();
    let events: Vec<_> = services
        .watch(&WatchParams::default().timeout(1).disable_bookmarks(), "0")
        .await
        .expect("watch")
        .collect()
        .await;
    assert!(events.is_empty(), "{events:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn streaming_lists_end_with_the_initial_events_bookmark() {
    let server = ApiServer::start();
    server.apply(versioned_service("a", "web", "1"));
    server.apply(versioned_service("b", "dns", "1"));
    let client = client(&server).await;
    let config = watcher::Config::default().streaming_lists();
    let mut watching = Watching::start(Api::<Service>::all(client), config, false);
    assert_eq!(
        watching.next_n(4).await,
        [
            Init,
            InitApply("a/web@1".into()),
            InitApply("b/dns@1".into()),
            InitDone
        ]
    );
    server.apply(versioned_service("a", "web", "2"));
    assert_eq!(watching.next().await, Apply("a/web@2".into()));
    let log = server.request_log();
    assert!(log.iter().all(|r| r.is_watch()), "{log:?}");
}

#[tokio::test]
async fn the_recorders_events_are_created_then_patched_as_a_series() {
    let server = ApiServer::start();
    server.apply(versioned_service("a", "web", "1"));
    let client = client(&server).await;
    let service = Api::<Service>::namespaced(client.clone(), "a")
        .get("web")
        .await
        .expect("get");
    let reporter = Reporter {
        controller: "lbagent".into(),
        instance: Some("node-a".into()),
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let reference = service.object_ref(&());
    let announced = Event {
        type_: EventType::Normal,
        reason: "Announced".into(),
        note: Some("203.0.113.1 announced".into()),
        action: "Announce".into(),
        secondary: None,
    };
    let rejected = Event {
        type_: EventType::Warning,
        reason: "InvalidAddress".into(),
        note: Some("status.loadBalancer.ingress[0].ip: \"x\" is not an IP address".into()),
        action: "Announce".into(),
        secondary: None,
    };
    recorder
        .publish(&announced, &reference)
        .await
        .expect("publish");
    recorder
        .publish(&announced, &reference)
        .await
        .expect("publish again");
    recorder
        .publish(&rejected, &reference)
        .await
        .expect("publish");

    let events = server.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    let (first, second) = (&events[0], &events[1]);
    for event in [first, second] {
        assert_eq!(event["apiVersion"], "events.k8s.io/v1");
        assert_eq!(event["metadata"]["namespace"], "a");
        assert_eq!(event["regarding"]["kind"], "Service");
        assert_eq!(event["regarding"]["namespace"], "a");
        assert_eq!(event["regarding"]["name"], "web");
        assert_eq!(event["regarding"]["uid"], json!(service.uid()));
        assert_eq!(event["reportingController"], "lbagent");
        assert_eq!(event["reportingInstance"], "node-a");
    }
    assert_eq!(first["reason"], "Announced");
    assert_eq!(first["type"], "Normal");
    assert_eq!(first["note"], "203.0.113.1 announced");
    assert_eq!(first["series"]["count"], 2);
    assert_eq!(second["reason"], "InvalidAddress");
    assert_eq!(second["type"], "Warning");
    assert_eq!(second["series"], Value::Null);

    let writes: Vec<_> = server
        .request_log()
        .into_iter()
        .filter(|r| r.method != "GET")
        .map(|r| (r.method, r.path, r.status))
        .collect();
    let events_path = "/apis/events.k8s.io/v1/namespaces/a/events";
    let first_name = first["metadata"]["name"].as_str().expect("name");
    assert_eq!(
        writes,
        [
            ("POST".into(), events_path.into(), 201),
            ("PATCH".into(), format!("{events_path}/{first_name}"), 200),
            ("POST".into(), events_path.into(), 201),
        ]
    );

    // What RBAC must allow for all that (the ClusterRole test compares the same way).
    let rules: BTreeSet<_> = server
        .request_log()
        .iter()
        .map(|r| r.rbac().expect("a served resource"))
        .collect();
    let expected = [
        ("", "services", "get"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
    ]
    .map(|(group, resource, verb)| (group.to_owned(), resource.to_owned(), verb));
    assert_eq!(rules, expected.into_iter().collect());

    // And they can be read back through the API.
    let listed = Api::<EventsEvent>::namespaced(client, "a")
        .list(&ListParams::default())
        .await
        .expect("list events");
    let reasons: Vec<_> = listed.items.iter().map(|e| e.reason.clone()).collect();
    assert_eq!(
        reasons,
        [Some("Announced".into()), Some("InvalidAddress".into())]
    );
}

#[tokio::test]
async fn core_v1_events_are_stored_too() {
    let server = ApiServer::start();
    let client = client(&server).await;
    let event = CoreEvent {
        metadata: ObjectMeta {
            generate_name: Some("web.".into()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some("a".into()),
            name: Some("web".into()),
            ..Default::default()
        },
        reason: Some("Announced".into()),
        type_: Some("Normal".into()),
        ..Default::default()
    };
    let created = Api::<CoreEvent>::namespaced(client, "a")
        .create(&PostParams::default(), &event)
        .await
        .expect("create");
    assert!(
        created.name_any().starts_with("web."),
        "{}",
        created.name_any()
    );
    let events = server.events();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["apiVersion"], "v1");
    assert_eq!(events[0]["involvedObject"]["name"], "web");
    assert_eq!(events[0]["reason"], "Announced");
}

#[tokio::test]
async fn errors_are_status_objects_with_the_real_codes() {
    let server = ApiServer::start();
    server.apply(versioned_service("a", "web", "1"));
    let client = client(&server).await;
    let status_of = |result: Result<Value, kube::Error>| match result {
        Err(kube::Error::Api(status)) => {
            (status.code, status.reason.clone(), status.message.clone())
        }
        other => panic!("expected an API error, got {other:?}"),
    };
    let get = |path: &str| {
        axum::http::Request::get(path)
            .body(Vec::new())
            .expect("request")
    };
    for path in [
        "/api/v1/pods",
        "/api/v1/namespaces/a/nodes",
        "/api/v1/services/web",
        "/apis/discovery.k8s.io/v2/endpointslices",
        "/api/v1/namespaces/a/services/web/scale",
        "/apis/discovery.k8s.io/v1/namespaces/a/endpointslices/x/status",
    ] {
        let (code, reason, _) = status_of(client.request::<Value>(get(path)).await);
        assert_eq!((code, reason.as_str()), (404, "NotFound"), "{path}");
    }
    for query in [
        "labelSelector=app%20in%20web",
        "labelSelector=a%20b",
        "fieldSelector=spec.type%3DLoadBalancer",
        "watch=true&resourceVersion=abc",
        "limit=-1",
        "limit=1&continue=garbage",
    ] {
        let path = format!("/api/v1/services?{query}");
        let (code, reason, _) = status_of(client.request::<Value>(get(&path)).await);
        assert_eq!((code, reason.as_str()), (400, "BadRequest"), "{query}");
    }

    let services = Api::<Service>::namespaced(client.clone(), "a");
    let missing = services.get("missing").await.map(|_| Value::Null);
    assert_eq!(
        status_of(missing),
        (
            404,
            "NotFound".into(),
            "services \"missing\" not found".into()
        )
    );
    let existing: Service =
        serde_json::from_value(versioned_service("a", "web", "9")).expect("service");
    let duplicate = services.create(&PostParams::default(), &existing).await;
    assert_eq!(status_of(duplicate.map(|_| Value::Null)).0, 409);
    let mut stale = existing.clone();
    stale.metadata.resource_version = Some("0".into());
    let conflict = services
        .replace("web", &PostParams::default(), &stale)
        .await;
    assert_eq!(status_of(conflict.map(|_| Value::Null)).1, "Conflict");
    let strategic = services
        .patch("web", &PatchParams::default(), &Patch::Strategic(json!({})))
        .await;
    assert_eq!(status_of(strategic.map(|_| Value::Null)).0, 415);
    let wrong_namespace: Service =
        serde_json::from_value(versioned_service("b", "x", "1")).expect("service");
    let created = services
        .create(&PostParams::default(), &wrong_namespace)
        .await;
    assert_eq!(status_of(created.map(|_| Value::Null)).0, 400);
    let merge = services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"v": "5", "extra": "yes"}}})),
        )
        .await
        .expect("merge patch");
    assert_eq!(describe(&merge), "a/web@5");
    assert_eq!(merge.labels().get("extra").map(String::as_str), Some("yes"));
    let ports = merge.spec.and_then(|spec| spec.ports).unwrap_or_default();
    assert_eq!(ports.len(), 1, "a merge patch keeps what it does not name");

    let version = client.apiserver_version().await.expect("version");
    assert_eq!(version.minor, "33");
    // Every one of those requests was logged with its answer.
    let log = server.request_log();
    assert!(log.iter().any(|r| r.status == 415 && r.method == "PATCH"));
    assert_eq!(log.iter().filter(|r| r.status == 404).count(), 7);
}

/// The server's state outlives any one client: a second one sees what the first did.
#[tokio::test]
async fn state_is_kept_across_restarts() {
    let server = ApiServer::start();
    server.apply(versioned_service("a", "web", "1"));
    server.restart();
    let client = client(&server).await;
    let listed = Api::<Service>::all(client)
        .list(&ListParams::default())
        .await
        .expect("list");
    let by_name: BTreeMap<_, _> = listed
        .items
        .iter()
        .map(|s| (s.name_any(), describe(s)))
        .collect();
    assert_eq!(by_name.get("web").map(String::as_str), Some("a/web@1"));
    assert_eq!(listed.metadata.resource_version.as_deref(), Some("1"));
}

/// lbagent runs in a network namespace of its own in the tests: a server started there is
/// what it reaches at 127.0.0.1, before and after a restart.
#[test]
fn a_server_in_a_namespace_serves_clients_inside_it() {
    let ns = NetNs::new("lbt-api");
    let server = ApiServer::start_in(&ns);
    server.apply(versioned_service("a", "web", "1"));
    let dir = TempDir::new("apiserver-kubeconfig");
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig(&path);
    let list_inside = || {
        let path = path.clone();
        in_netns(&ns, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let kubeconfig = Kubeconfig::read_from(&path).expect("kubeconfig");
                let options = KubeConfigOptions::default();
                let config = Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .expect("config");
                let client = Client::try_from(config).expect("client");
                let listed = Api::<Service>::all(client)
                    .list(&ListParams::default())
                    .await;
                listed
                    .expect("list from inside the namespace")
                    .items
                    .iter()
                    .map(describe)
                    .collect::<Vec<_>>()
            })
        })
    };
    assert_eq!(list_inside(), ["a/web@1"]);
    server.stop();
    server.apply(versioned_service("a", "web", "2"));
    server.restart();
    assert_eq!(list_inside(), ["a/web@2"]);
    assert_eq!(server.request_log().len(), 2);
}

/// Status is a subresource, as on the real server: `/status` writes change only the status,
/// object writes and creates never do, and every write names the version it read.
#[tokio::test]
async fn status_is_written_only_through_its_subresource() {
    let server = ApiServer::start();
    server.apply(versioned_service("a", "web", "1"));
    let client = client(&server).await;
    let services = Api::<Service>::namespaced(client.clone(), "a");
    let ingress = |service: &Service| -> Vec<String> {
        service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.clone())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|i| i.ip)
            .collect()
    };
    // An object patch that names a status keeps the stored one, but its labels land.
    let patched = services
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}},
                "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.99"}]}}})),
        )
        .await
        .expect("patch");
    assert_eq!(ingress(&patched), ["203.0.113.1"]);
    assert_eq!(patched.labels().get("x").map(String::as_str), Some("1"));
    // A status patch changes the status only.
    let version = patched.resource_version().expect("version");
    let patched = services
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"x": "2"}, "resourceVersion": version},
                "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.7"}]}}}),
            ),
        )
        .await
        .expect("status patch");
    assert_eq!(ingress(&patched), ["192.0.2.7"]);
    assert_eq!(patched.labels().get("x").map(String::as_str), Some("1"));
    assert_eq!(
        ingress(&services.get_status("web").await.expect("get status")),
        ["192.0.2.7"]
    );
    // The same version again is stale now: 409, and nothing changes.
    let stale = services
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"resourceVersion": version},
                "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.8"}]}}})),
        )
        .await;
    match stale {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 409),
        other => panic!("expected 409, got {other:?}"),
    }
    assert_eq!(
        ingress(&services.get("web").await.expect("get")),
        ["192.0.2.7"]
    );
    // Another client's write landing first makes a write from the version read a real 409.
    let read = services.get("web").await.expect("get");
    server.change_before_next_write(
        "v1",
        "Service",
        Some("a"),
        "web",
        json!({"metadata": {"labels": {"other": "writer"}}}),
    );
    let raced = services
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"resourceVersion": read.resource_version()},
                "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.9"}]}}}),
            ),
        )
        .await;
    assert!(
        matches!(&raced, Err(kube::Error::Api(s)) if s.code == 409),
        "{raced:?}"
    );
    let now = services.get("web").await.expect("get");
    assert_eq!(
        now.labels().get("other").map(String::as_str),
        Some("writer")
    );
    assert_eq!(ingress(&now), ["192.0.2.7"]);
    // A create drops the status and sets its own creationTimestamp.
    let mut new: Service =
        serde_json::from_value(versioned_service("a", "new", "5")).expect("service");
    new.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        "2001-01-01T00:00:00Z".parse().expect("time"),
    ));
    let created = services
        .create(&PostParams::default(), &new)
        .await
        .expect("create");
    assert!(ingress(&created).is_empty());
    assert_ne!(
        created.metadata.creation_timestamp,
        new.metadata.creation_timestamp
    );
    // Status writes are their own resource for RBAC.
    let rbac: BTreeSet<_> = server
        .request_log()
        .iter()
        .filter_map(|r| r.rbac())
        .map(|(group, resource, verb)| format!("{group}/{resource}:{verb}"))
        .collect();
    assert!(rbac.contains("/services/status:patch"), "{rbac:?}");
    assert!(rbac.contains("/services/status:get"), "{rbac:?}");
    assert!(rbac.contains("/services:patch"), "{rbac:?}");
}

/// A custom resource (lbagent.io AddressPool, cluster-scoped, with status) and
/// coordination.k8s.io Leases, through kube's typed clients; the token a client sends is logged.
#[tokio::test]
async fn custom_resources_and_leases_are_served() {
    use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
    use lbagent::allocator::{AddressPool, AddressPoolSpec};

    let server = ApiServer::start();
    let dir = TempDir::new("apiserver-kubeconfig");
    let path = dir.path().join("kubeconfig");
    server.write_kubeconfig_as(&path, Some("tester"));
    let kubeconfig = Kubeconfig::read_from(&path).expect("read the kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    let client = Client::try_from(config).expect("client");

    let pools = Api::<AddressPool>::all(client.clone());
    let pool = AddressPool::new(
        "blue",
        AddressPoolSpec {
            addresses: vec!["192.0.2.0/24".into()],
            auto_assign: true,
            avoid_buggy_ips: false,
            priority: 0,
            namespace_selector: None,
            service_selector: None,
        },
    );
    let created = pools
        .create(&PostParams::default(), &pool)
        .await
        .expect("create pool");
    assert_eq!(created.spec, pool.spec);
    let mut seen = watcher(pools.clone(), watcher::Config::default())
        .applied_objects()
        .boxed();
    let first = timeout(WAIT, seen.try_next())
        .await
        .expect("in time")
        .expect("watch")
        .expect("an object");
    assert_eq!(first.name_any(), "blue");
    let status = pools
        .patch_status(
            "blue",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"ipv4": {"total": "256", "inUse": 3}},
                "spec": {"addresses": []}})),
        )
        .await
        .expect("status patch");
    assert_eq!(status.spec.addresses, ["192.0.2.0/24"], "spec untouched");
    assert_eq!(
        status.status.and_then(|s| s.ipv4).map(|u| u.in_use),
        Some(3)
    );
    let next = timeout(WAIT, seen.try_next())
        .await
        .expect("in time")
        .expect("watch")
        .expect("an object");
    assert_eq!(
        next.status.and_then(|s| s.ipv4).map(|u| u.total).as_deref(),
        Some("256")
    );

    let leases = Api::<Lease>::namespaced(client.clone(), "lbagent");
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("lock".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some("one".into()),
            ..LeaseSpec::default()
        }),
    };
    let held = leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("create lease");
    let mut taken = held.clone();
    taken.spec.as_mut().expect("spec").holder_identity = Some("two".into());
    leases
        .replace("lock", &PostParams::default(), &taken)
        .await
        .expect("replace from the version read");
    let mut late = held.clone();
    late.spec.as_mut().expect("spec").holder_identity = Some("three".into());
    let conflict = leases.replace("lock", &PostParams::default(), &late).await;
    assert!(
        matches!(&conflict, Err(kube::Error::Api(s)) if s.code == 409),
        "{conflict:?}"
    );
    let now = leases.get("lock").await.expect("get");
    assert_eq!(
        now.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("two")
    );
    let log = server.request_log();
    assert!(log.iter().all(|r| r.user == "tester"), "{log:?}");
    let rbac: BTreeSet<_> = log.iter().filter_map(|r| r.rbac()).collect();
    for expected in [
        ("lbagent.io", "addresspools", "create"),
        ("lbagent.io", "addresspools", "watch"),
        ("lbagent.io", "addresspools/status", "patch"),
        ("coordination.k8s.io", "leases", "update"),
    ] {
        let expected = (expected.0.to_owned(), expected.1.to_owned(), expected.2);
        assert!(rbac.contains(&expected), "{expected:?} not in {rbac:?}");
    }
}
