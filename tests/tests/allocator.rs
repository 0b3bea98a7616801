//! `lbagent allocator`, the real binary with the real kube-rs client, against the in-process
//! API server: assignment per family and policy, requested addresses, sharing, release and
//! reassignment, exhaustion, pool conditions, a restart that writes nothing, duplicates, a
//! 409 Conflict resolved, leader failover between two processes, and the API server killed
//! mid-allocation. These need no root: everything is on 127.0.0.1. The last test runs the
//! allocator with two agents, their BIRDs and an FRR router in network namespaces.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use lbagent::allocator::API_ACCESS;
use lbagent_tests::{
    Agent, TempDir, addresses_on,
    apiserver::{ApiServer, ingress, merge_patch},
    lbagent_bin, require_root,
    routers::{FRR_ROUTER, Fabric, Frr, next_hops},
    wait_until,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
const LEASE_DURATION: Duration = Duration::from_secs(3);
const RETRY_PERIOD: Duration = Duration::from_millis(250);
const LEASE: (&str, &str) = ("lbagent", "lbagent-allocator");

/// A running `lbagent allocator`, logging to a file; killed on drop.
struct Allocator {
    child: Child,
    log: PathBuf,
    identity: String,
}

impl Allocator {
    fn start(cluster: &Cluster, identity: &str) -> Self {
        Self::launch(
            Command::new(lbagent_bin()),
            &cluster.server,
            cluster.dir.path(),
            identity,
        )
    }

    /// `command` is lbagent, run where `server` is reachable.
    fn launch(mut command: Command, server: &ApiServer, dir: &Path, identity: &str) -> Self {
        let kubeconfig = dir.join(format!("{identity}.kubeconfig"));
        server.write_kubeconfig_as(&kubeconfig, Some(identity));
        let log = dir.join(format!("{identity}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let child = command
            .arg("allocator")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["--lease-namespace", LEASE.0, "--identity", identity])
            .args(["--lease-duration", "3s", "--renew-deadline", "2s"])
            .args(["--retry-period", "250ms"])
            .env("LBAGENT_LOG", "info")
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file)
            .spawn()
            .expect("start lbagent allocator");
        Self {
            child,
            log,
            identity: identity.to_owned(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the allocator");
    }

    /// SIGTERM: it gives up the Lease and exits.
    fn stop(mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "{status}\n{}", self.log());
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Cluster {
    server: ApiServer,
    dir: TempDir,
}

impl Cluster {
    fn new() -> Self {
        let server = ApiServer::start();
        for namespace in ["default", "lbagent"] {
            server.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": namespace}}));
        }
        Self {
            server,
            dir: TempDir::new("lbt-alloc"),
        }
    }

    fn pool(&self, name: &str, addresses: &[&str], extra: Value) {
        let mut pool = json!({
            "apiVersion": "lbagent.io/v1alpha1", "kind": "AddressPool",
            "metadata": {"name": name},
            "spec": {"addresses": addresses},
        });
        merge_patch(&mut pool, &extra);
        self.server.apply(pool);
    }

    fn service(&self, name: &str, extra: Value) {
        self.server.apply(service(name, extra));
    }

    fn addresses(&self, name: &str) -> Vec<String> {
        self.server
            .get("v1", "Service", Some("default"), name)
            .map(|s| ingress(&s))
            .unwrap_or_default()
    }

    fn wait_addresses(&self, name: &str, expected: &[&str], allocator: &Allocator) {
        assert!(
            wait_until(WAIT, || self.addresses(name) == expected),
            "{name}: want {expected:?}, have {:?}\n{}",
            self.addresses(name),
            allocator.log()
        );
    }

    /// The notes of the Events on `service` with `reason`.
    fn events(&self, service: &str, reason: &str) -> Vec<String> {
        self.server.event_notes(service, reason)
    }

    fn wait_event(&self, service: &str, reason: &str, note: &str, allocator: &Allocator) {
        assert!(
            wait_until(WAIT, || self
                .events(service, reason)
                .iter()
                .any(|n| n == note)),
            "{service}: no {reason} Event {note:?}; have {:?}\n{}",
            self.events(service, reason),
            allocator.log()
        );
    }

    fn pool_status(&self, name: &str) -> Value {
        self.server
            .get("lbagent.io/v1alpha1", "AddressPool", None, name)
            .map(|p| p["status"].clone())
            .unwrap_or_default()
    }

    fn wait_pool(&self, name: &str, check: impl Fn(&Value) -> bool, allocator: &Allocator) {
        assert!(
            wait_until(WAIT, || check(&self.pool_status(name))),
            "pool {name}: {}\n{}",
            self.pool_status(name),
            allocator.log()
        );
    }

    fn lease_holder(&self) -> Option<String> {
        let lease = self
            .server
            .get("coordination.k8s.io/v1", "Lease", Some(LEASE.0), LEASE.1)?;
        lease["spec"]["holderIdentity"].as_str().map(str::to_owned)
    }

    fn wait_leader(&self, allocator: &Allocator) {
        assert!(
            wait_until(WAIT, || self.lease_holder().as_deref()
                == Some(allocator.identity.as_str())),
            "{} does not lead; the Lease names {:?}\n{}",
            allocator.identity,
            self.lease_holder(),
            allocator.log()
        );
    }

    /// Every request so far was one the allocator's ClusterRole allows.
    fn assert_api_access(&self) {
        self.server.assert_requests_within(API_ACCESS);
    }
}

fn service(name: &str, extra: Value) -> Value {
    let mut service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]},
    });
    merge_patch(&mut service, &extra);
    service
}

#[test]
fn one_address_per_family_as_the_policy_asks_and_the_pools_show_their_use() {
    let cluster = Cluster::new();
    cluster.pool("dual", &["192.0.2.0/30", "2001:db8::/126"], json!({}));
    cluster.pool(
        "v4only",
        &["198.51.100.0/30"],
        json!({"spec": {"autoAssign": false}}),
    );
    cluster.service("a-single", json!({}));
    cluster.service("b-v6", json!({"spec": {"ipFamilies": ["IPv6"]}}));
    cluster.service(
        "c-dual",
        json!({"spec": {"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}}),
    );
    cluster.service(
        "other-class",
        json!({"spec": {"loadBalancerClass": "example.com/other"}}),
    );
    cluster.service("cluster-ip", json!({"spec": {"type": "ClusterIP"}}));
    let allocator = Allocator::start(&cluster, "alloc-a");
    cluster.wait_addresses("a-single", &["192.0.2.0"], &allocator);
    cluster.wait_addresses("b-v6", &["2001:db8::"], &allocator);
    cluster.wait_addresses("c-dual", &["192.0.2.1", "2001:db8::1"], &allocator);
    cluster.wait_event(
        "c-dual",
        "AddressAssigned",
        "Assigned 192.0.2.1 from pool dual, 2001:db8::1 from pool dual",
        &allocator,
    );

    // A pool without IPv6, asked for by name: PreferDualStack takes what there is,
    // RequireDualStack takes nothing.
    let v4only = json!({"lbagent.io/pool": "v4only"});
    cluster.service(
        "d-prefer",
        json!({"metadata": {"annotations": v4only},
            "spec": {"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack"}}),
    );
    cluster.service(
        "e-require",
        json!({"metadata": {"annotations": v4only},
            "spec": {"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}}),
    );
    cluster.wait_addresses("d-prefer", &["198.51.100.0"], &allocator);
    cluster.wait_event(
        "e-require",
        "AllocationFailed",
        "spec.ipFamilies: IPv6: pool \"v4only\" has no IPv6 addresses",
        &allocator,
    );
    assert!(cluster.addresses("e-require").is_empty());
    cluster.wait_pool(
        "dual",
        |s| {
            s["ipv4"] == json!({"total": "4", "inUse": 2})
                && s["ipv6"] == json!({"total": "4", "inUse": 2})
                && s["conditions"][0]["status"] == "True"
        },
        &allocator,
    );
    // A pool's use is written at most every second: v4only's may follow dual's.
    cluster.wait_pool(
        "v4only",
        |s| s["ipv4"] == json!({"total": "4", "inUse": 1}),
        &allocator,
    );
    assert!(cluster.addresses("other-class").is_empty());
    assert!(cluster.addresses("cluster-ip").is_empty());

    // `lbagent allocator pools` prints what the pools' status says.
    let kubeconfig = cluster.dir.path().join("alloc-a.kubeconfig");
    let output = Command::new(lbagent_bin())
        .args(["allocator", "pools", "--kubeconfig"])
        .arg(&kubeconfig)
        .output()
        .expect("lbagent allocator pools");
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    let line = |pool: &str| {
        table
            .lines()
            .find(|l| l.starts_with(pool))
            .unwrap_or_else(|| panic!("no {pool} in\n{table}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(line("dual"), ["dual", "yes", "0", "2/4", "2/4", "ready"]);
    assert_eq!(line("v4only"), ["v4only", "no", "0", "1/4", "-", "ready"]);
    cluster.assert_api_access();
}

#[test]
fn requested_addresses_are_honoured_and_garbage_is_refused_by_field_and_value() {
    let cluster = Cluster::new();
    cluster.pool("p", &["192.0.2.0/29", "2001:db8::/125"], json!({}));
    let allocator = Allocator::start(&cluster, "alloc-a");
    cluster.service("want", json!({"spec": {"loadBalancerIP": "192.0.2.5"}}));
    cluster.wait_addresses("want", &["192.0.2.5"], &allocator);
    cluster.service(
        "want-dual",
        json!({"metadata": {"annotations": {"lbagent.io/addresses": "2001:db8::3, 192.0.2.6"}},
            "spec": {"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}}),
    );
    cluster.service("banana", json!({"spec": {"loadBalancerIP": "banana"}}));
    cluster.service(
        "wrong-family",
        json!({"spec": {"loadBalancerIP": "2001:db8::1"}}),
    );
    cluster.service("outside", json!({"spec": {"loadBalancerIP": "10.1.1.1"}}));
    cluster.service("taken", json!({"spec": {"loadBalancerIP": "192.0.2.5"}}));
    cluster.service("plain", json!({}));
    cluster.wait_addresses("want-dual", &["192.0.2.6", "2001:db8::3"], &allocator);
    cluster.wait_addresses("plain", &["192.0.2.0"], &allocator);
    for (name, note) in [
        (
            "banana",
            "spec.loadBalancerIP: \"banana\" is not an IP address",
        ),
        (
            "wrong-family",
            "spec.loadBalancerIP: \"2001:db8::1\" is IPv6, a family the Service does not ask \
             for (spec.ipFamilies, spec.ipFamilyPolicy)",
        ),
        (
            "outside",
            "spec.loadBalancerIP: \"10.1.1.1\" is outside every pool the Service may use",
        ),
        (
            "taken",
            "spec.loadBalancerIP: \"192.0.2.5\" is already taken by default/want",
        ),
    ] {
        cluster.wait_event(name, "AllocationFailed", note, &allocator);
        assert!(cluster.addresses(name).is_empty(), "{name}");
    }
    // Mended, it is served.
    cluster.service("banana", json!({"spec": {"loadBalancerIP": "192.0.2.7"}}));
    cluster.wait_addresses("banana", &["192.0.2.7"], &allocator);
    assert_eq!(cluster.addresses("want"), ["192.0.2.5"]);
    cluster.assert_api_access();
}

#[test]
fn services_with_one_sharing_key_share_unless_ports_or_traffic_policy_clash() {
    let cluster = Cluster::new();
    cluster.pool("p", &["192.0.2.0/30"], json!({}));
    let allocator = Allocator::start(&cluster, "alloc-a");
    let key = |port: i32, policy: &str| {
        json!({"metadata": {"annotations": {"lbagent.io/sharing-key": "web"}},
            "spec": {"ports": [{"port": port, "protocol": "TCP"}],
                "externalTrafficPolicy": policy}})
    };
    cluster.service("a-http", key(80, "Cluster"));
    cluster.wait_addresses("a-http", &["192.0.2.0"], &allocator);
    cluster.service("b-https", key(443, "Cluster"));
    cluster.service("c-clash", key(80, "Cluster"));
    cluster.service("d-local", key(53, "Local"));
    cluster.service("e-alone", json!({}));
    cluster.wait_addresses("b-https", &["192.0.2.0"], &allocator);
    cluster.wait_addresses("e-alone", &["192.0.2.1"], &allocator);
    cluster.wait_event(
        "c-clash",
        "AllocationFailed",
        "metadata.annotations[\"lbagent.io/sharing-key\"]: \"web\": sharing refused: port \
         TCP/80 is also used by default/a-http",
        &allocator,
    );
    cluster.wait_event(
        "d-local",
        "AllocationFailed",
        "metadata.annotations[\"lbagent.io/sharing-key\"]: \"web\": sharing refused: \
         externalTrafficPolicy Local differs from default/a-http's Cluster",
        &allocator,
    );
    // The shared address is counted once.
    cluster.wait_pool("p", |s| s["ipv4"]["inUse"] == 2, &allocator);
    // The clash gone, the refused one joins.
    cluster
        .server
        .delete("v1", "Service", Some("default"), "a-http");
    cluster.wait_addresses("c-clash", &["192.0.2.0"], &allocator);
    assert_eq!(cluster.addresses("b-https"), ["192.0.2.0"]);
}

#[test]
fn addresses_are_released_reassigned_and_found_again_when_the_pool_grows() {
    let cluster = Cluster::new();
    cluster.pool("p", &["192.0.2.1-192.0.2.2"], json!({}));
    let allocator = Allocator::start(&cluster, "alloc-a");
    cluster.service("a", json!({}));
    cluster.wait_addresses("a", &["192.0.2.1"], &allocator);
    cluster.service("b", json!({}));
    cluster.wait_addresses("b", &["192.0.2.2"], &allocator);
    cluster.service("c", json!({}));
    let exhausted = "spec.ipFamilies: IPv4: every pool this Service may use is exhausted (p)";
    cluster.wait_event("c", "AllocationFailed", exhausted, &allocator);

    // Deleted: its address goes to the one waiting.
    cluster.server.delete("v1", "Service", Some("default"), "a");
    cluster.wait_addresses("c", &["192.0.2.1"], &allocator);

    // No longer a LoadBalancer: its status is cleared and the address freed.
    let mut b = cluster
        .server
        .get("v1", "Service", Some("default"), "b")
        .expect("b");
    b["spec"]["type"] = "ClusterIP".into();
    cluster.server.apply(b);
    cluster.wait_addresses("b", &[], &allocator);
    cluster.wait_event(
        "b",
        "AddressReleased",
        "no longer a LoadBalancer of this class; its addresses are released",
        &allocator,
    );
    cluster.service("d", json!({}));
    cluster.wait_addresses("d", &["192.0.2.2"], &allocator);
    cluster.service("e", json!({}));
    cluster.wait_event("e", "AllocationFailed", exhausted, &allocator);

    // The pool grows: the waiting one gets the new address, the others keep theirs.
    cluster.pool("p", &["192.0.2.1-192.0.2.3"], json!({}));
    cluster.wait_addresses("e", &["192.0.2.3"], &allocator);
    assert_eq!(cluster.addresses("c"), ["192.0.2.1"]);
    assert_eq!(cluster.addresses("d"), ["192.0.2.2"]);

    // The pool moves: nothing it no longer covers stays.
    cluster.pool("p", &["198.51.100.0/30"], json!({}));
    cluster.wait_addresses("c", &["198.51.100.0"], &allocator);
    cluster.wait_addresses("d", &["198.51.100.1"], &allocator);
    cluster.wait_addresses("e", &["198.51.100.2"], &allocator);
    cluster.wait_pool(
        "p",
        |s| s["ipv4"] == json!({"total": "4", "inUse": 3}),
        &allocator,
    );
    cluster.assert_api_access();
}

#[test]
fn bad_and_overlapping_pools_get_conditions_naming_field_and_value() {
    let cluster = Cluster::new();
    // Created in this order whatever their names say.
    cluster.pool(
        "zz-early",
        &["192.0.2.0/24"],
        json!({"metadata": {"creationTimestamp": "2026-01-01T00:00:00Z"}}),
    );
    cluster.pool(
        "aa-late",
        &["198.51.100.0/24", "192.0.2.128/25"],
        json!({"metadata": {"creationTimestamp": "2026-01-02T00:00:00Z"}}),
    );
    cluster.pool("reversed", &["10.0.0.9-10.0.0.1"], json!({}));
    cluster.pool("mixed", &["10.0.1.1-2001:db8::1"], json!({}));
    cluster.pool("networks", &["10.0.2.0/24-10.0.3.0/24"], json!({}));
    let allocator = Allocator::start(&cluster, "alloc-a");
    let refused = |pool: &str, reason: &str, message: &str| {
        cluster.wait_pool(
            pool,
            |s| {
                s["conditions"][0]["status"] == "False"
                    && s["conditions"][0]["reason"] == reason
                    && s["conditions"][0]["message"] == message
            },
            &allocator,
        );
    };
    refused(
        "aa-late",
        "Overlap",
        "spec.addresses[1]: \"192.0.2.128/25\": overlaps \"192.0.2.0/24\" of pool \"zz-early\", \
         which was there first",
    );
    refused(
        "reversed",
        "InvalidAddresses",
        "spec.addresses[0]: \"10.0.0.9-10.0.0.1\": reversed bounds: 10.0.0.9 is after 10.0.0.1",
    );
    refused(
        "mixed",
        "InvalidAddresses",
        "spec.addresses[0]: \"10.0.1.1-2001:db8::1\": a range mixes IPv4 and IPv6",
    );
    refused(
        "networks",
        "InvalidAddresses",
        "spec.addresses[0]: \"10.0.2.0/24-10.0.3.0/24\": a range's bounds are addresses, not \
         networks (\"10.0.2.0/24\")",
    );
    cluster.wait_pool(
        "zz-early",
        |s| s["conditions"][0]["status"] == "True",
        &allocator,
    );
    // The earlier pool serves; the refused one hands out nothing.
    cluster.service("plain", json!({}));
    cluster.service(
        "from-late",
        json!({"metadata": {"annotations": {"lbagent.io/pool": "aa-late"}}}),
    );
    cluster.wait_addresses("plain", &["192.0.2.0"], &allocator);
    cluster.wait_event(
        "from-late",
        "AllocationFailed",
        "metadata.annotations[\"lbagent.io/pool\"]: \"aa-late\": the pool is refused: \
         spec.addresses[1]: \"192.0.2.128/25\": overlaps \"192.0.2.0/24\" of pool \"zz-early\", \
         which was there first",
        &allocator,
    );
    // Mended, it serves.
    cluster.pool(
        "aa-late",
        &["198.51.100.0/24"],
        json!({"metadata": {"creationTimestamp": "2026-01-02T00:00:00Z"}}),
    );
    cluster.wait_addresses("from-late", &["198.51.100.0"], &allocator);
}

#[test]
fn a_restart_with_nothing_changed_writes_nothing() {
    let cluster = Cluster::new();
    cluster.pool("p", &["192.0.2.0/24"], json!({}));
    let first = Allocator::start(&cluster, "alloc-a");
    for i in 0..20 {
        cluster.service(&format!("s{i:02}"), json!({}));
    }
    assert!(
        wait_until(WAIT, || (0..20)
            .all(|i| cluster.addresses(&format!("s{i:02}")).len() == 1)),
        "{}",
        first.log()
    );
    let assigned: Vec<Vec<String>> = (0..20)
        .map(|i| cluster.addresses(&format!("s{i:02}")))
        .collect();
    cluster.wait_pool("p", |s| s["ipv4"]["inUse"] == 20, &first);
    first.stop();
    let before = cluster.server.request_log().len();
    let events_before = cluster.server.events().len();

    let started = Instant::now();
    let second = Allocator::start(&cluster, "alloc-b");
    cluster.wait_leader(&second);
    // The first gave the Lease up: no waiting for it to expire.
    assert!(
        started.elapsed() < LEASE_DURATION,
        "took {:?} to lead",
        started.elapsed()
    );
    // Once it assigns a new Service, it has rebuilt its books.
    cluster.service("trigger", json!({}));
    cluster.wait_addresses("trigger", &["192.0.2.20"], &second);
    let after = &cluster.server.request_log()[before..];
    let writes: Vec<_> = after
        .iter()
        .filter(|r| r.method != "GET" && !r.path.contains("/leases"))
        .filter(|r| !r.path.ends_with("/services/trigger/status"))
        .filter(|r| !r.path.ends_with("/addresspools/p/status"))
        .filter(|r| !r.path.contains("/events"))
        .collect();
    assert!(writes.is_empty(), "unexpected writes: {writes:?}");
    let events: Vec<Value> = cluster.server.events()[events_before..]
        .iter()
        .filter(|e| e["regarding"]["name"] != "trigger")
        .cloned()
        .collect();
    assert!(events.is_empty(), "unexpected Events: {events:?}");
    let again: Vec<Vec<String>> = (0..20)
        .map(|i| cluster.addresses(&format!("s{i:02}")))
        .collect();
    assert_eq!(again, assigned);
}

#[test]
fn of_two_services_holding_one_address_the_older_keeps_it() {
    let cluster = Cluster::new();
    cluster.pool("p", &["192.0.2.0/30"], json!({}));
    let holding = |created: &str| {
        json!({"metadata": {"creationTimestamp": created},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}})
    };
    // Written by hand (or by an older allocator): the younger sorts first by name.
    cluster.service("a-young", holding("2026-01-02T00:00:00Z"));
    cluster.service("b-old", holding("2026-01-01T00:00:00Z"));
    let allocator = Allocator::start(&cluster, "alloc-a");
    cluster.wait_addresses("a-young", &["192.0.2.0"], &allocator);
    assert_eq!(cluster.addresses("b-old"), ["192.0.2.1"]);
    cluster.wait_event(
        "b-old",
        "AddressConflict",
        "192.0.2.1 was also in the status of default/a-young; this Service had it first and \
         keeps it",
        &allocator,
    );
    cluster.wait_event(
        "a-young",
        "AddressConflict",
        "192.0.2.1 is held by default/b-old, which had it first; this Service gets another \
         address",
        &allocator,
    );
}

#[test]
fn a_write_over_a_change_it_has_not_seen_gets_409_and_is_decided_again() {
    let cluster = Cluster::new();
    cluster.pool("p", &["192.0.2.0/30"], json!({}));
    let allocator = Allocator::start(&cluster, "alloc-a");
    cluster.wait_leader(&allocator);
    cluster.server.change_before_next_write(
        "v1",
        "Service",
        Some("default"),
        "web",
        json!({"metadata": {"labels": {"changed": "meanwhile"}}}),
    );
    cluster.service("web", json!({}));
    cluster.wait_addresses("web", &["192.0.2.0"], &allocator);
    let status_path = "/api/v1/namespaces/default/services/web/status";
    let calls = || -> Vec<(String, String, u16)> {
        cluster
            .server
            .request_log()
            .into_iter()
            .filter(|r| {
                r.path
                    .starts_with("/api/v1/namespaces/default/services/web")
            })
            .map(|r| (r.method, r.path, r.status))
            .collect()
    };
    let expected = [
        ("PATCH".to_owned(), status_path.to_owned(), 409),
        (
            "GET".to_owned(),
            "/api/v1/namespaces/default/services/web".to_owned(),
            200,
        ),
        ("PATCH".to_owned(), status_path.to_owned(), 200),
    ];
    // The server logs a request once it has answered, after the write shows.
    wait_until(WAIT, || calls().len() >= expected.len());
    assert_eq!(calls(), expected, "{}", allocator.log());
    let web = cluster
        .server
        .get("v1", "Service", Some("default"), "web")
        .expect("web");
    assert_eq!(web["metadata"]["labels"]["changed"], "meanwhile");
}

#[test]
fn the_standby_writes_nothing_until_it_leads_and_takes_over_within_the_lease() {
    let cluster = Cluster::new();
    cluster.pool("p", &["192.0.2.0/24"], json!({}));
    let mut leader = Allocator::start(&cluster, "alloc-a");
    cluster.wait_leader(&leader);
    let standby = Allocator::start(&cluster, "alloc-b");
    cluster.service("s1", json!({}));
    cluster.wait_addresses("s1", &["192.0.2.0"], &leader);
    // Let the standby try the Lease a few times.
    let standby_lease_reads = || {
        cluster
            .server
            .request_log()
            .iter()
            .filter(|r| r.user == "alloc-b" && r.path.contains("/leases/"))
            .count()
    };
    assert!(
        wait_until(WAIT, || standby_lease_reads() >= 4),
        "{}",
        standby.log()
    );
    let by_standby = |log: &[lbagent_tests::apiserver::RequestRecord]| -> Vec<String> {
        log.iter()
            .filter(|r| r.user == "alloc-b" && !r.path.contains("/leases"))
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    };
    assert!(
        by_standby(&cluster.server.request_log()).is_empty(),
        "the standby called the API"
    );
    let lease_writes_by_standby = cluster
        .server
        .request_log()
        .iter()
        .filter(|r| r.user == "alloc-b" && r.method != "GET")
        .count();
    assert_eq!(lease_writes_by_standby, 0, "the standby wrote the Lease");

    // The leader dies without giving the Lease up.
    leader.signal(nix::sys::signal::Signal::SIGKILL);
    let died = Instant::now();
    let _ = leader.child.wait();
    cluster.service("s2", json!({}));
    cluster.wait_leader(&standby);
    let took_over = died.elapsed();
    cluster.wait_addresses("s2", &["192.0.2.1"], &standby);
    assert_eq!(cluster.addresses("s1"), ["192.0.2.0"]);
    println!("takeover after the leader died: {took_over:?}");
    assert!(
        took_over <= LEASE_DURATION + RETRY_PERIOD * 2 + Duration::from_millis(500),
        "took {took_over:?} with a {LEASE_DURATION:?} Lease"
    );
    assert!(!by_standby(&cluster.server.request_log()).is_empty());
    cluster.assert_api_access();
}

#[test]
fn the_api_server_killed_mid_allocation_gives_no_address_twice() {
    let cluster = Cluster::new();
    cluster.pool("p", &["10.0.0.0/23"], json!({}));
    let allocator = Allocator::start(&cluster, "alloc-a");
    cluster.wait_leader(&allocator);
    let names: Vec<String> = (0..300).map(|i| format!("s{i:03}")).collect();
    for name in &names[..250] {
        cluster.service(name, json!({}));
    }
    let assigned = || {
        names
            .iter()
            .filter(|n| !cluster.addresses(n).is_empty())
            .count()
    };
    assert!(wait_until(WAIT, || assigned() >= 10), "{}", allocator.log());
    cluster.server.stop();
    // Changes land while it is down (the store outlives the server).
    for name in &names[250..] {
        cluster.service(name, json!({}));
    }
    cluster
        .server
        .delete("v1", "Service", Some("default"), "s000");
    assert!(
        wait_until(WAIT, || allocator.log().contains("retrying")),
        "the allocator did not notice: {}",
        allocator.log()
    );
    cluster.server.restart();
    let live = &names[1..];
    assert!(
        wait_until(Duration::from_secs(60), || live
            .iter()
            .all(|n| cluster.addresses(n).len() == 1)),
        "{} of {} assigned\n{}",
        assigned(),
        live.len(),
        allocator.log()
    );
    let mut seen = BTreeSet::new();
    for name in live {
        let address: IpAddr = cluster.addresses(name)[0].parse().expect("an address");
        let ipnet: ipnet::IpNet = "10.0.0.0/23".parse().expect("net");
        assert!(ipnet.contains(&address), "{name}: {address}");
        assert!(seen.insert(address), "{address} given twice");
    }
    cluster.wait_pool("p", |s| s["ipv4"]["inUse"] == 299, &allocator);
}

const BGP: &str = "  bgp:
    - {name: up4, neighbor: 10.0.0.1, asn: 64500, localAsn: 64512, holdTime: 9s, keepaliveTime: 1s, connectRetryTime: 1s, connectDelayTime: 1s}
    - {name: up6, neighbor: \"fd00::1\", asn: 64500, localAsn: 64512, holdTime: 9s, keepaliveTime: 1s, connectRetryTime: 1s, connectDelayTime: 1s}
";

/// lbagent as a complete load balancer: a Service created through the API server gets its
/// addresses from the allocator, the agents on two nodes put them on kube-lb0 and their BIRDs
/// announce them to the FRR router; the Service deleted, the routes leave.
#[test]
fn a_service_gets_addresses_that_two_nodes_announce_and_deleted_they_leave() {
    require_root();
    let fabric = Fabric::new(2);
    let _frr = Frr::start(&fabric.router, FRR_ROUTER, true);
    // The cluster's API server, reachable from every node on the fabric.
    let server = ApiServer::start_in_at(&fabric.router, Fabric::ROUTER_V4.parse().expect("ip"));
    for namespace in ["default", "lbagent"] {
        server.apply(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": namespace}}));
    }
    server.apply(
        json!({"apiVersion": "lbagent.io/v1alpha1", "kind": "AddressPool",
        "metadata": {"name": "public"},
        "spec": {"addresses": ["203.0.113.0/28", "2001:db8:ff::/124"], "avoidBuggyIPs": true}}),
    );
    let dir = TempDir::new("lbt-alloc-e2e");
    let allocator = Allocator::launch(
        fabric.router.command(&lbagent_bin()),
        &server,
        dir.path(),
        "alloc-e2e",
    );
    let agents: Vec<Agent> = fabric
        .nodes
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let name = format!("node-{}", i + 1);
            server.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}));
            let node_dir = dir.path().join(&name);
            std::fs::create_dir_all(&node_dir).expect("node dir");
            server.write_kubeconfig(&node_dir.join("kubeconfig"));
            let config = node_dir.join("lbagent.yaml");
            std::fs::write(
                &config,
                format!(
                    "node: {{name: {name}}}\nsource: {{kubernetes: {{kubeconfig: kubeconfig}}}}\n\
                     status: {{path: {}}}\nhttp: {{address: \"127.0.0.1:9658\"}}\n\
                     routing:\n  stateDir: {}\n{BGP}",
                    node_dir.join("status.json").display(),
                    node_dir.join("bird").display()
                ),
            )
            .expect("config");
            Agent::start(ns, &config, node_dir.join("agent.log"))
        })
        .collect();
    let logs = || {
        let mut logs = allocator.log();
        for agent in &agents {
            logs.push_str("\n---\n");
            logs.push_str(&agent.log());
        }
        logs
    };

    server.apply(service(
        "web",
        json!({"spec": {"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
            "externalTrafficPolicy": "Cluster"}}),
    ));
    let assigned = || {
        server
            .get("v1", "Service", Some("default"), "web")
            .map(|s| ingress(&s))
            .unwrap_or_default()
    };
    // .0 is avoided.
    assert!(
        wait_until(WAIT, || assigned() == ["203.0.113.1", "2001:db8:ff::"]),
        "{:?}\n{}",
        assigned(),
        logs()
    );
    for ns in &fabric.nodes {
        let expected: BTreeSet<String> = ["203.0.113.1/32", "2001:db8:ff::/128"]
            .map(str::to_owned)
            .into();
        assert!(
            wait_until(WAIT, || addresses_on(ns, "kube-lb0") == expected),
            "{}: {:?}\n{}",
            ns.name(),
            addresses_on(ns, "kube-lb0"),
            logs()
        );
    }
    for prefix in ["203.0.113.1/32", "2001:db8:ff::/128"] {
        assert!(
            wait_until(Duration::from_secs(30), || next_hops(
                &fabric.router,
                prefix
            )
            .len()
                == 2),
            "router has {:?} for {prefix}\n{}",
            next_hops(&fabric.router, prefix),
            logs()
        );
    }
    assert_eq!(
        next_hops(&fabric.router, "203.0.113.1/32"),
        [Fabric::node_v4(1), Fabric::node_v4(2)]
    );
    // Every agent's and the allocator's Events are on the Service.
    assert!(
        server
            .events()
            .iter()
            .any(|e| e["reason"] == "AddressAssigned" && e["regarding"]["name"] == "web"),
        "{:#?}",
        server.events()
    );

    server.delete("v1", "Service", Some("default"), "web");
    for prefix in ["203.0.113.1/32", "2001:db8:ff::/128"] {
        assert!(
            wait_until(WAIT, || next_hops(&fabric.router, prefix).is_empty()),
            "router still has {:?} for {prefix}\n{}",
            next_hops(&fabric.router, prefix),
            logs()
        );
    }
    for ns in &fabric.nodes {
        assert!(
            wait_until(WAIT, || addresses_on(ns, "kube-lb0").is_empty()),
            "{}: {:?}",
            ns.name(),
            addresses_on(ns, "kube-lb0")
        );
    }
    let pool = server
        .get("lbagent.io/v1alpha1", "AddressPool", None, "public")
        .expect("pool");
    assert!(
        wait_until(WAIT, || server
            .get("lbagent.io/v1alpha1", "AddressPool", None, "public")
            .is_some_and(|p| p["status"]["ipv4"]["inUse"] == 0)),
        "{pool}"
    );
}

#[test]
fn a_sharing_member_its_groups_pool_excludes_is_refused_until_the_pool_admits_it() {
    let cluster = Cluster::new();
    cluster.pool(
        "team",
        &["192.0.2.0/30"],
        json!({"spec": {"serviceSelector": {"matchLabels": {"team": "a"}}}}),
    );
    cluster.pool(
        "general",
        &["198.51.100.0/30"],
        json!({"spec": {"priority": 10}}),
    );
    let allocator = Allocator::start(&cluster, "alloc-a");
    let member = |port: u16, labels: Value| {
        json!({"metadata": {"labels": labels,
                            "annotations": {"lbagent.io/sharing-key": "web"}},
               "spec": {"ports": [{"port": port, "protocol": "TCP"}]}})
    };
    cluster.service("a", member(80, json!({"team": "a"})));
    cluster.wait_addresses("a", &["192.0.2.0"], &allocator);
    cluster.service("b", member(443, json!({})));
    cluster.wait_event(
        "b",
        "AllocationFailed",
        "metadata.annotations[\"lbagent.io/sharing-key\"]: \"web\": sharing refused: 192.0.2.0 \
         (held by default/a) is from pool \"team\", which this Service may not use",
        &allocator,
    );
    assert!(cluster.addresses("b").is_empty(), "{}", allocator.log());
    cluster.wait_pool("general", |s| s["ipv4"]["inUse"] == 0, &allocator);
    // Labelled so that the pool admits it, it shares.
    cluster.service("b", member(443, json!({"team": "a"})));
    cluster.wait_addresses("b", &["192.0.2.0"], &allocator);
    cluster.wait_pool("team", |s| s["ipv4"]["inUse"] == 1, &allocator);
}

#[test]
fn more_events_at_once_than_a_thousand_are_all_recorded() {
    const SERVICES: usize = 1500;
    let cluster = Cluster::new();
    cluster.pool("p", &["10.0.0.0/20"], json!({}));
    for i in 0..SERVICES {
        cluster.service(&format!("s{i}"), json!({}));
    }
    // Started on them all: its first pass assigns 1,500 at once.
    let allocator = Allocator::start(&cluster, "alloc-a");
    let told = || -> BTreeSet<String> {
        cluster
            .server
            .events()
            .iter()
            .filter(|e| e["reason"] == "AddressAssigned")
            .filter_map(|e| e["regarding"]["name"].as_str().map(str::to_owned))
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(180), || told().len() == SERVICES),
        "{} of {SERVICES} Services got their AddressAssigned Event\n{}",
        told().len(),
        allocator.log()
    );
    cluster.wait_pool("p", |s| s["ipv4"]["inUse"] == SERVICES, &allocator);
    // The Events trail the addresses: while status writes are to be made, at most 128 are
    // fed each second.
    let log = cluster.server.request_log();
    let patches: Vec<_> = log
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.contains("/services/") && r.status == 200)
        .map(|r| r.at)
        .collect();
    let (Some(first), Some(last)) = (patches.iter().min(), patches.iter().max()) else {
        panic!("no status patch in the request log");
    };
    let early = log
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/events") && r.at < *last)
        .count();
    let allowed = 128 * (1 + (*last - *first).as_secs() as usize);
    assert!(
        early <= allowed,
        "{early} Events recorded before the last of the {} status patches, over {:?} \
         (at most {allowed})",
        patches.len(),
        *last - *first
    );
    cluster.assert_api_access();
}

/// Found by the soak: a Service that stopped asking for an address of a pool that assigns only
/// on request kept it, so another Service asking for it later was refused for as long as the
/// first one lived.
#[test]
fn an_address_of_a_request_only_pool_is_released_when_no_longer_asked_for() {
    let cluster = Cluster::new();
    cluster.pool("auto", &["192.0.2.0/30"], json!({}));
    cluster.pool(
        "on-request",
        &["198.51.100.0/30"],
        json!({"spec": {"autoAssign": false}}),
    );
    let allocator = Allocator::start(&cluster, "alloc-a");
    let asking = json!({"metadata": {"annotations": {"lbagent.io/addresses": "198.51.100.2"}}});
    cluster.service("first", asking.clone());
    cluster.wait_addresses("first", &["198.51.100.2"], &allocator);
    cluster.service("second", asking);
    cluster.wait_event(
        "second",
        "AllocationFailed",
        "metadata.annotations[\"lbagent.io/addresses\"]: \"198.51.100.2\" is already taken by \
         default/first",
        &allocator,
    );
    // The first stops asking (its status kept, as an object write keeps it): it gets an
    // address of the automatic pool, and the one waiting gets the address it asked for.
    let mut first = cluster
        .server
        .get("v1", "Service", Some("default"), "first")
        .expect("first");
    first["metadata"]["annotations"] = json!({});
    cluster.server.apply(first);
    cluster.wait_addresses("first", &["192.0.2.0"], &allocator);
    cluster.wait_addresses("second", &["198.51.100.2"], &allocator);
    // Naming the pool is asking for its addresses: such a Service keeps what it holds.
    let mut second = cluster
        .server
        .get("v1", "Service", Some("default"), "second")
        .expect("second");
    second["metadata"]["annotations"] = json!({"lbagent.io/pool": "on-request"});
    cluster.server.apply(second);
    // Services are decided in the order they change: once the next one is served, that
    // change was decided too.
    cluster.service("third", json!({}));
    cluster.wait_addresses("third", &["192.0.2.1"], &allocator);
    assert_eq!(cluster.addresses("second"), ["198.51.100.2"]);
    cluster.assert_api_access();
}
