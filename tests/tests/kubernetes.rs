//! `lbagent run` with the Kubernetes source: the real kube-rs client in the real binary,
//! against the in-process API server (real list/watch protocol), on a real kube-lb0 in a
//! network namespace. The API server listens inside the node's namespace, as a cluster's
//! would be reachable from the node.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use lbagent::{API_ACCESS, MAX_LOAD_BALANCERS};
use lbagent_tests::{
    Agent, Monitor, NetNs, TempDir, addresses_on,
    apiserver::{ApiServer, merge_patch},
    memory_kb, wait_until,
};
use serde_json::{Value, json};

const NODE: &str = "node-a";

/// Fields drop in order: the agent stops before its directory goes (it writes there).
struct Cluster {
    agent: Agent,
    ns: NetNs,
    server: Arc<ApiServer>,
    _dir: TempDir,
}

impl Cluster {
    /// A cluster with Service `name` on `ip`, once the node holds it.
    fn holding(name: &str, ip: &str) -> Self {
        let cluster = Self::start();
        cluster.apply_service(name, &[ip], json!({}));
        cluster.wait_held(&[ip]);
        cluster
    }

    /// Makes every open watch end and the version it stood at too old, so the agent's
    /// watcher gets 410 Gone and lists again. A write the agent does not watch comes first: a
    /// watch from the newest version is not too old, and a full run once compacted before
    /// the agent's first Event moved the revision on, so nothing relisted. The server is
    /// down meanwhile, or a bookmark (one a second) could carry the new version to the agent
    /// before the compaction.
    fn expire_watches(&self) {
        self.server.stop();
        self.server
            .apply(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "unwatched"}}));
        self.server.compact();
        self.server.restart();
    }

    /// How many lists of Services (not watches) the server has answered.
    fn service_lists(&self) -> usize {
        self.server
            .request_log()
            .iter()
            .filter(|r| r.path.ends_with("/services") && !r.is_watch())
            .count()
    }

    /// Creates or replaces Service `name` in namespace `shop` (see [`service`]).
    fn apply_service(&self, name: &str, ips: &[&str], patch: Value) {
        self.server.apply(service(name, ips, patch));
    }

    fn start() -> Self {
        let ns = NetNs::new("lbt-kube");
        ns.ip(&["link", "set", "lo", "up"]);
        let server = Arc::new(ApiServer::start_in(&ns));
        server.apply(node(json!({})));
        let dir = TempDir::new("lbt-kube");
        server.write_kubeconfig(&dir.path().join("kubeconfig"));
        dir.write(
            "lbagent.yaml",
            &format!(
                "node: {{name: {NODE}}}\nsource: {{kubernetes: {{kubeconfig: kubeconfig}}}}\n\
                 status: {{path: {}}}\n",
                dir.path().join("status.json").display()
            ),
        );
        let agent = Agent::start(
            &ns,
            &dir.path().join("lbagent.yaml"),
            dir.path().join("agent.log"),
        );
        Self {
            ns,
            server,
            _dir: dir,
            agent,
        }
    }

    fn held(&self) -> BTreeSet<String> {
        addresses_on(&self.ns, "kube-lb0")
    }

    /// Waits until kube-lb0 holds `address` (among others).
    fn wait_holding(&self, address: &str, within: Duration) {
        assert!(
            wait_until(within, || self.held().contains(address)),
            "want {address} among {:?}\n{}",
            self.held(),
            self.agent.log()
        );
    }

    fn wait_held(&self, expected: &[&str]) {
        let expected: BTreeSet<String> = expected.iter().map(|a| format!("{a}/32")).collect();
        assert!(
            wait_until(Duration::from_secs(10), || self.held() == expected),
            "want {expected:?}, have {:?}\n{}",
            self.held(),
            self.agent.log()
        );
    }

    fn wait_event(&self, service: &str, reason: &str, needle: &str) {
        assert!(
            wait_until(Duration::from_secs(10), || self
                .server
                .event_notes(service, reason)
                .iter()
                .any(|note| note.contains(needle))),
            "no {reason} Event on {service} with {needle:?}: {:#?}\n{}",
            self.server.events(),
            self.agent.log()
        );
    }
}

fn node(labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": labels},
    })
}

fn service(name: &str, ips: &[&str], patch: Value) -> Value {
    let mut object = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "type": "LoadBalancer",
            "ipFamilies": ["IPv4"],
            "externalTrafficPolicy": "Cluster",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
        "status": {"loadBalancer": {"ingress": ips.iter().map(|ip| json!({"ip": ip, "ipMode": "VIP"})).collect::<Vec<_>>()}},
    });
    merge_patch(&mut object, &patch);
    object
}

fn slice(service: &str, node_name: &str, conditions: Value) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-x1"), "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.244.0.5"], "nodeName": node_name, "conditions": conditions}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

#[test]
fn services_appear_change_and_go_with_events() {
    let cluster = Cluster::start();
    cluster.apply_service("web", &["203.0.113.10"], json!({}));
    cluster.apply_service(
        "internal",
        &["10.96.5.5"],
        json!({"spec": {"type": "ClusterIP"}}),
    );
    cluster.wait_held(&["203.0.113.10"]);
    cluster.wait_event(
        "web",
        "Announced",
        &format!("203.0.113.10 held by node {NODE}"),
    );

    cluster.apply_service("web", &["203.0.113.11"], json!({}));
    cluster.wait_held(&["203.0.113.11"]);
    cluster.wait_event("web", "Withdrawn", "203.0.113.10 no longer held");

    cluster.apply_service("api", &["203.0.113.20"], json!({}));
    cluster.wait_held(&["203.0.113.11", "203.0.113.20"]);
    cluster.server.delete("v1", "Service", Some("shop"), "web");
    cluster.wait_held(&["203.0.113.20"]);

    // Every call the agent made is in API_ACCESS, which the deployment's ClusterRole grants.
    cluster.server.assert_requests_within(API_ACCESS);
}

#[test]
fn more_events_than_a_queue_of_1024_are_all_recorded() {
    // The agent once queued 256 Events and dropped the rest: past 1,024 at once, every one
    // must still reach the API server.
    const SERVICES: usize = 1_500;
    let cluster = Cluster::start();
    let address = |i: usize| format!("10.77.{}.{}", i / 250, 1 + i % 250);
    for i in 0..SERVICES {
        cluster
            .server
            .apply(service(&format!("svc-{i}"), &[&address(i)], json!({})));
    }
    assert!(
        wait_until(Duration::from_secs(120), || cluster.held().len()
            == SERVICES),
        "{} of {SERVICES} addresses held\n{}",
        cluster.held().len(),
        cluster.agent.log()
    );
    let announced = || {
        cluster
            .server
            .events()
            .iter()
            .filter(|e| e["reason"] == "Announced")
            .filter_map(|e| {
                Some((
                    e["regarding"]["name"].as_str()?.to_owned(),
                    e["note"].clone(),
                ))
            })
            .collect::<BTreeMap<String, Value>>()
    };
    assert!(
        wait_until(Duration::from_secs(120), || announced().len() == SERVICES),
        "Announced Events on {} of {SERVICES} Services\n{}",
        announced().len(),
        cluster.agent.log()
    );
    let announced = announced();
    for i in 0..SERVICES {
        let name = format!("svc-{i}");
        assert_eq!(
            announced.get(&name),
            Some(&json!(format!("{} held by node {NODE}", address(i)))),
            "{name}"
        );
    }
}

#[test]
fn garbage_in_a_service_skips_it_with_an_event() {
    let cluster = Cluster::start();
    cluster.apply_service("bad", &["203.0.113.300"], json!({}));
    cluster.apply_service(
        "bad-port",
        &["203.0.113.31"],
        json!({"spec": {"ports": [{"port": 80, "protocol": "ICMP"}]}}),
    );
    cluster.apply_service("good", &["203.0.113.30"], json!({}));
    cluster.wait_held(&["203.0.113.30"]);
    cluster.wait_event(
        "bad",
        "NotAnnounced",
        "status.loadBalancer.ingress[0].ip: invalid address \"203.0.113.300\"",
    );
    cluster.wait_event(
        "bad-port",
        "NotAnnounced",
        "spec.ports[0].protocol: \"ICMP\" is not allowed",
    );
    assert!(cluster.agent.log().contains("Service skipped"));
    // Fixed, it is served.
    cluster.apply_service("bad", &["203.0.113.32"], json!({}));
    cluster.wait_held(&["203.0.113.30", "203.0.113.32"]);
}

#[test]
fn local_traffic_policy_follows_endpoints_on_this_node() {
    let cluster = Cluster::start();
    let local = json!({"spec": {"externalTrafficPolicy": "Local"}});
    cluster.apply_service("web", &["203.0.113.40"], local.clone());
    cluster.apply_service("other", &["203.0.113.41"], json!({}));
    cluster.apply_service("probe", &["203.0.113.42"], local.clone());
    cluster.wait_held(&["203.0.113.41"]);

    cluster
        .server
        .apply(slice("web", "node-b", json!({"ready": true})));
    // A later slice on the same watch: once its Service is held, the agent has seen web's.
    cluster
        .server
        .apply(slice("probe", NODE, json!({"ready": true})));
    assert!(
        wait_until(Duration::from_secs(10), || cluster
            .held()
            .contains("203.0.113.42/32")),
        "{}",
        cluster.agent.log()
    );
    assert!(
        !cluster.held().contains("203.0.113.40/32"),
        "an endpoint elsewhere does not count"
    );
    cluster
        .server
        .delete("v1", "Service", Some("shop"), "probe");
    cluster.wait_held(&["203.0.113.41"]);

    cluster.server.apply(slice(
        "web",
        NODE,
        json!({"ready": true, "serving": true, "terminating": false}),
    ));
    cluster.wait_held(&["203.0.113.40", "203.0.113.41"]);

    // Terminating: serving but not ready; no new traffic should come here.
    cluster.server.apply(slice(
        "web",
        NODE,
        json!({"ready": false, "serving": true, "terminating": true}),
    ));
    cluster.wait_held(&["203.0.113.41"]);
    cluster.wait_event(
        "web",
        "Withdrawn",
        &format!("no ready endpoint on node {NODE}"),
    );
}

#[test]
fn the_exclusion_label_withdraws_everything_and_back() {
    let cluster = Cluster::holding("web", "203.0.113.50");
    cluster.server.apply(node(
        json!({"node.kubernetes.io/exclude-from-external-load-balancers": "true"}),
    ));
    cluster.wait_held(&[]);
    assert!(cluster.agent.log().contains("excluded from load balancers"));
    cluster.server.apply(node(json!({})));
    cluster.wait_held(&["203.0.113.50"]);
}

#[test]
fn state_holds_while_the_api_server_is_gone_and_relists_converge() {
    let cluster = Cluster::holding("web", "203.0.113.60");

    // Killed: nothing changes on the node, and the agent keeps running.
    let monitor = Monitor::start(&cluster.ns);
    cluster.server.stop();
    assert!(
        wait_until(Duration::from_secs(10), || cluster
            .agent
            .log()
            .contains("Kubernetes watch failed")),
        "{}",
        cluster.agent.log()
    );
    assert_eq!(cluster.held().len(), 1);
    // Changed while the agent could not see it: picked up after the restart.
    cluster.apply_service("api", &["203.0.113.61"], json!({}));
    cluster.server.restart();
    cluster.wait_held(&["203.0.113.60", "203.0.113.61"]);
    let events = monitor.stop();
    assert!(
        !events.iter().any(|e| e.starts_with("Deleted")),
        "an address was withdrawn while the API server was away: {events:?}"
    );

    // 410 Gone: deleted while the agent is cut off, and history compacted past the
    // delete, so only a relist can show it (a live watch would have carried it).
    let lists = cluster.service_lists();
    cluster.server.stop();
    cluster.server.delete("v1", "Service", Some("shop"), "api");
    cluster.server.compact();
    cluster.server.restart();
    cluster.wait_held(&["203.0.113.60"]);
    assert!(cluster.service_lists() > lists, "{}", cluster.agent.log());
}

#[test]
fn a_relist_that_fails_half_way_withdraws_nothing() {
    let cluster = Cluster::start();
    // More Services than kube's list page (500), so a list takes two pages.
    for i in 0..520 {
        cluster.apply_service(
            &format!("svc-{i:03}"),
            &[&format!("203.0.{}.{}", 114 + i / 250, 1 + i % 250)],
            json!({}),
        );
    }
    assert!(
        wait_until(Duration::from_secs(20), || cluster.held().len() == 520),
        "{} held\n{}",
        cluster.held().len(),
        cluster.agent.log()
    );
    let monitor = Monitor::start(&cluster.ns);
    let before = cluster.service_lists();
    cluster.server.fail_list_after_pages(1);
    cluster.expire_watches();
    // The watcher relists: page one, a failed page two, then a whole list again.
    assert!(
        wait_until(Duration::from_secs(20), || cluster.service_lists()
            >= before + 3),
        "{:#?}",
        cluster.server.request_log()
    );
    // A Service added after the relist: once it is held, the relist has been applied.
    cluster.apply_service("after", &["203.0.117.1"], json!({}));
    assert!(
        wait_until(Duration::from_secs(10), || cluster
            .held()
            .contains("203.0.117.1/32")),
        "{}",
        cluster.agent.log()
    );
    assert_eq!(cluster.held().len(), 521);
    let events = monitor.stop();
    assert!(
        !events.iter().any(|e| e.starts_with("Deleted")),
        "a partial relist withdrew addresses: {:?}",
        &events[..events.len().min(10)]
    );
}

#[test]
fn an_address_of_a_family_the_node_lacks_gets_a_warning_event() {
    let cluster = Cluster::start();
    cluster
        .ns
        .exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    cluster.apply_service(
        "dual",
        &["203.0.113.70", "2001:db8:ff::70"],
        json!({"spec": {"ipFamilies": ["IPv4", "IPv6"]}}),
    );
    cluster.wait_held(&["203.0.113.70"]);
    cluster.wait_event("dual", "Announced", "203.0.113.70 held by node");
    cluster.wait_event(
        "dual",
        "NotAnnounced",
        &format!("2001:db8:ff::70: node {NODE} has no IPv6"),
    );
}

#[test]
fn two_hundred_thousand_services_and_a_megabyte_annotation_keep_memory_bounded() {
    let cluster = Cluster::holding("web", "203.0.113.50");
    // Over Kubernetes' 256 KiB for all annotations: refused naming the limit, and not kept.
    let huge = "x".repeat(1 << 20);
    cluster.apply_service(
        "big",
        &["203.0.113.51"],
        json!({"metadata": {"annotations": {"note": huge}}}),
    );
    cluster.wait_event(
        "big",
        "NotAnnounced",
        "metadata.annotations: 1048580 bytes, over the limit of 262144 bytes",
    );
    let pid = cluster.agent.pid();
    let before = memory_kb(pid, "VmRSS");

    // A cluster's worth of other Services: read, and not kept.
    const SERVICES: usize = 200_000;
    for i in 0..SERVICES {
        cluster.server.apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("internal-{i}"), "namespace": "shop",
                         "annotations": {"note": "x".repeat(200)}},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
        }));
    }
    cluster.apply_service("late", &["203.0.113.52"], json!({}));
    let expected: BTreeSet<String> = ["203.0.113.50/32", "203.0.113.52/32"]
        .map(str::to_owned)
        .into();
    assert!(
        wait_until(Duration::from_secs(600), || cluster.held() == expected),
        "{:?}\n{}",
        cluster.held(),
        cluster.agent.log()
    );
    // And once more from a full list of them all, after a 410 Gone.
    let listed = cluster.service_lists();
    cluster.expire_watches();
    cluster.apply_service("relisted", &["203.0.113.53"], json!({}));
    cluster.wait_holding("203.0.113.53/32", Duration::from_secs(600));
    assert!(
        cluster.service_lists() > listed,
        "the agent did not list the Services again"
    );
    let peak = memory_kb(pid, "VmHWM");
    assert!(
        peak < before + 64 * 1024,
        "peak RSS {peak} kB with {SERVICES} other Services, {before} kB before them"
    );
}

/// Past the limit of LoadBalancer Services the agent keeps the last state and says so naming
/// the limit, and keeps no more than the limit's worth of them: of the rest only a hash of the
/// key each, to count them, and past twice the limit not even that. Back within the limit it
/// lists them again and serves what holds.
#[test]
fn past_the_load_balancer_limit_the_last_state_stays_and_memory_stops_growing() {
    let cluster = Cluster::start();
    cluster
        .server
        .apply(service("web", &["203.0.113.50"], json!({})));
    cluster.wait_held(&["203.0.113.50"]);
    let pid = cluster.agent.pid();
    let before = memory_kb(pid, "VmRSS");
    let log_has = |needle: &str| {
        wait_until(Duration::from_secs(600), || {
            cluster.agent.log().contains(needle)
        })
    };
    // LoadBalancer Services without an address yet: counted and kept, not served.
    let filler = |i: usize| {
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("lb-{i}"), "namespace": "fill",
                         "annotations": {"note": "x".repeat(200)}},
            "spec": {"type": "LoadBalancer", "ipFamilies": ["IPv4"],
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
        })
    };
    // The limit exactly, the last of them served: all were read. They come in one list (the
    // history compacted while the API server was away), as an agent starting in a full cluster
    // reads them.
    cluster.server.stop();
    for i in 0..MAX_LOAD_BALANCERS - 2 {
        cluster.server.apply(filler(i));
    }
    cluster
        .server
        .apply(service("late", &["203.0.113.52"], json!({})));
    cluster.server.compact();
    cluster.server.restart();
    assert!(
        wait_until(Duration::from_secs(600), || cluster.held().len() == 2),
        "{:?}\n{}",
        cluster.held(),
        cluster.agent.log()
    );
    let at_limit = memory_kb(pid, "VmRSS");
    // One more: refused, naming the limit; the last state stays.
    cluster.server.apply(filler(MAX_LOAD_BALANCERS));
    assert!(
        log_has("100001 LoadBalancer Services, over the limit of 100000: keeping the last state"),
        "{}",
        cluster.agent.log()
    );
    // As many again: the last one is past what is counted, and said so.
    for i in MAX_LOAD_BALANCERS + 1..2 * MAX_LOAD_BALANCERS + 1 {
        cluster.server.apply(filler(i));
    }
    assert!(
        log_has("more than 200000 LoadBalancer Services, over the limit of 100000"),
        "{}",
        cluster.agent.log()
    );
    let past_twice = memory_kb(pid, "VmRSS");
    let expected: BTreeSet<String> = ["203.0.113.50/32", "203.0.113.52/32"]
        .map(str::to_owned)
        .into();
    assert_eq!(cluster.held(), expected, "the last state stays");
    println!(
        "RSS {before} kB with one Service, {at_limit} kB with {MAX_LOAD_BALANCERS}, \
         {past_twice} kB with {} LoadBalancer Services",
        2 * MAX_LOAD_BALANCERS + 1
    );
    // What the agent keeps is bounded by the unit tests in sources/kubernetes/ (the limit's
    // worth of Services, as many key hashes); RSS here also holds a relist's buffer and what
    // the allocator does not give back, so it is printed, not held to a ratio.
    assert!(
        past_twice < 2 * at_limit + 64 * 1024,
        "{past_twice} kB with {} LoadBalancer Services, {at_limit} kB with the limit's worth",
        2 * MAX_LOAD_BALANCERS + 1
    );

    // Back within the limit: listed again, and what holds is served.
    // The kept fillers and four past them: one fewer than the limit are left.
    for i in (0..MAX_LOAD_BALANCERS - 2).chain(MAX_LOAD_BALANCERS..MAX_LOAD_BALANCERS + 4) {
        cluster
            .server
            .delete("v1", "Service", Some("fill"), &format!("lb-{i}"));
    }
    cluster
        .server
        .apply(service("again", &["203.0.113.53"], json!({})));
    cluster.wait_holding("203.0.113.53/32", Duration::from_secs(600));
    // A relist it starts itself ("listing them again"), or one the API server's compacted
    // history forces: either way it counts them anew.
    assert!(log_has("LoadBalancer Services are within the limit again"));
    println!("peak RSS {} kB", memory_kb(pid, "VmHWM"));
}
