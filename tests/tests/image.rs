//! The container image, run as deploy/daemonset.yaml runs it. `cargo xtask image` builds it
//! (once per test binary); podman runs it with the manifest's own settings, translated field
//! by field (a field this test does not know how to translate fails it): capabilities, no
//! privilege escalation, read-only root, seccomp, user, the node's network namespace (a lab
//! namespace stands in for it), the volumes and the downward-API environment. Host paths are
//! replaced by the test's own: the host's /sys/fs/bpf by a pin root of the test's, /run/lbagent
//! by a temporary directory, so nothing of the host's lbagent is touched.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, PodSpec, Probe},
};
use lbagent_tests::{
    NetNs, PinRoot, TempDir, addresses_on, http_get, kubelet,
    routers::{FRR_ROUTER, Fabric, Frr, next_hops},
    run, unique_name, wait_until, xdp_on,
};

const VIP: &str = "203.0.113.10";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the image once for this test binary, with the same command a user runs.
fn built_image() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        lbagent_tests::require_root();
        let started = Instant::now();
        let output = Command::new(env!("CARGO"))
            .args(["xtask", "image"])
            .current_dir(repo())
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .expect("run cargo xtask image");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "cargo xtask image failed ({}):\n{stderr}",
            output.status
        );
        for line in stderr.lines().filter(|l| l.starts_with("image: ")) {
            eprintln!("{line}");
        }
        eprintln!(
            "image test: cargo xtask image took {:.1} s",
            started.elapsed().as_secs_f64()
        );
    });
}

fn parse<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = repo().join("deploy").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // Through JSON, as tests/tests/deploy.rs reads the manifests.
    let value: serde_json::Value =
        serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The pod spec and its main container (the agent's pod also runs `membership`, for local
/// addresses, which the lab here has none of).
fn pod(file: &str) -> (PodSpec, Container) {
    let daemon_set: DaemonSet = parse(file);
    let spec = daemon_set
        .spec
        .and_then(|s| s.template.spec)
        .expect("a pod template");
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert!(
        matches!(names[..], [_] | [_, "membership"]),
        "{file}: the main container, and at most the membership: {names:?}"
    );
    let container = spec.containers[0].clone();
    (spec, container)
}

/// The ConfigMap's config.yaml, with the services from a file beside it instead of the API
/// server, and `routing` (absent from the shipped file) announcing to the lab's router.
fn lab_config() -> String {
    let config_map: ConfigMap = parse("configmap.yaml");
    let text = config_map
        .data
        .and_then(|d| d.get("config.yaml").cloned())
        .expect("configmap.yaml has config.yaml");
    let mut config: serde_json::Value = serde_saphyr::from_str(&text).expect("config.yaml");
    config["source"] = serde_json::json!({"file": {"path": "services.yaml"}});
    config["routing"] = serde_json::json!({
        "mode": "managed",
        "export": {"prefixes": ["203.0.113.0/24"]},
        "bgp": [{
            "name": "tor", "neighbor": "10.0.0.1", "asn": 64500, "localAsn": 64512,
            "holdTime": "9s", "keepaliveTime": "1s", "connectRetryTime": "1s",
            "connectDelayTime": "1s",
        }],
    });
    // JSON is YAML.
    serde_json::to_string_pretty(&config).unwrap()
}

/// The lab's stand-ins for what a node gives the pod.
struct Lab {
    netns: String,
    /// Host path in the manifest -> the test's own directory.
    host_paths: BTreeMap<String, PathBuf>,
    /// The directory a configMap volume shows.
    config_dir: PathBuf,
    /// Where emptyDir volumes live.
    scratch: TempDir,
    /// fieldRef path -> value (the downward API).
    fields: BTreeMap<String, String>,
    /// Volume mounts left out (the bad-input cases).
    without: Vec<String>,
    /// Volume mounts made read-only.
    read_only: Vec<String>,
}

/// The runtime's default seccomp profile, as a kubelet's RuntimeDefault gets it from
/// containerd (1.7, late 1.6) or Docker (23 on): podman's own default profile, with bpf(2)
/// allowed to CAP_BPF and perf_event_open(2) to CAP_PERFMON as those runtimes' profiles
/// allow them. Podman 4.3's profile (Debian bookworm) allows both only with CAP_SYS_ADMIN,
/// which the manifest rightly does not grant: under it the first map fails with EPERM
/// (deploy/README.md says so under "Container runtime").
fn runtime_default_seccomp() -> PathBuf {
    static PROFILE: OnceLock<PathBuf> = OnceLock::new();
    PROFILE
        .get_or_init(|| {
            let text = std::fs::read_to_string("/usr/share/containers/seccomp.json")
                .expect("podman's default seccomp profile");
            let mut profile: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            let rules = profile["syscalls"].as_array_mut().expect("syscalls");
            // The rule that answers EPERM to everyone without CAP_SYS_ADMIN would win over
            // the ones added below.
            for rule in rules.iter_mut() {
                let denies_without_admin = rule["action"] == "SCMP_ACT_ERRNO"
                    && rule["excludes"]["caps"]
                        .as_array()
                        .is_some_and(|caps| caps.iter().any(|c| c == "CAP_SYS_ADMIN"));
                if denies_without_admin {
                    let names = rule["names"].as_array_mut().expect("names");
                    names.retain(|n| n != "bpf" && n != "perf_event_open");
                }
            }
            for (name, cap) in [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")] {
                rules.push(serde_json::json!({
                    "names": [name],
                    "action": "SCMP_ACT_ALLOW",
                    "includes": {"caps": [cap]},
                    "excludes": {},
                }));
            }
            let path = std::env::temp_dir()
                .join(format!("lbagent-test-seccomp-{}.json", std::process::id()));
            std::fs::write(&path, serde_json::to_vec(&profile).unwrap()).unwrap();
            path
        })
        .clone()
}

/// Fails on any field of `value` outside `known`: a setting this translation would drop.
fn only_known(value: &impl serde::Serialize, known: &[&str], what: &str) {
    let json = serde_json::to_value(value).unwrap();
    for key in json.as_object().map(|o| o.keys()).into_iter().flatten() {
        assert!(
            known.contains(&key.as_str()),
            "{what}.{key}: this test does not know how to run it; teach it"
        );
    }
}

/// podman with runc, as `cargo xtask image` runs it (xtask/src/image.rs says why).
fn podman() -> Command {
    let mut command = Command::new("podman");
    command.args(["--runtime", "runc"]);
    command
}

fn podman_ok(args: &[&str]) -> String {
    let output = podman().args(args).output().expect("run podman");
    assert!(
        output.status.success(),
        "podman {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `podman run` arguments for `container` of `spec`, as a kubelet would start it.
fn podman_run_args(spec: &PodSpec, container: &Container, lab: &Lab, name: &str) -> Vec<String> {
    let mut args: Vec<String> = ["run", "--detach", "--name", name]
        .map(String::from)
        .to_vec();
    let mut arg = |a: &str| args.push(a.to_owned());

    // Within the runtime's own limits, as a pod gets containerd's; podman would otherwise ask
    // for more than this machine allows (xtask/src/image.rs says why).
    let (_, nofile) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let (_, nproc) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NPROC).unwrap();
    let nproc = nproc.min(32768);
    arg("--ulimit");
    arg(&format!("nofile={nofile}:{nofile}"));
    arg("--ulimit");
    arg(&format!("nproc={nproc}:{nproc}"));

    assert_eq!(
        spec.host_network,
        Some(true),
        "the pod uses the node's network"
    );
    arg("--network");
    arg(&format!("ns:/run/netns/{}", lab.netns));

    let context = container
        .security_context
        .as_ref()
        .expect("securityContext");
    only_known(
        context,
        &[
            "runAsUser",
            "privileged",
            "allowPrivilegeEscalation",
            "readOnlyRootFilesystem",
            "capabilities",
            "seccompProfile",
        ],
        "securityContext",
    );
    if let Some(user) = context.run_as_user {
        arg("--user");
        arg(&user.to_string());
    }
    assert_ne!(
        context.privileged,
        Some(true),
        "privileged is not translated"
    );
    if context.allow_privilege_escalation == Some(false) {
        arg("--security-opt");
        arg("no-new-privileges");
    }
    if context.read_only_root_filesystem == Some(true) {
        // A kubelet mounts nothing writable of its own: no tmpfs on /tmp or /run.
        arg("--read-only");
        arg("--read-only-tmpfs=false");
    }
    let capabilities = context.capabilities.as_ref().expect("capabilities");
    for cap in capabilities.drop.iter().flatten() {
        arg("--cap-drop");
        arg(&cap.to_lowercase());
    }
    for cap in capabilities.add.iter().flatten() {
        arg("--cap-add");
        arg(cap);
    }
    let seccomp = context.seccomp_profile.as_ref().expect("seccompProfile");
    assert_eq!(
        seccomp.type_, "RuntimeDefault",
        "only RuntimeDefault is translated"
    );
    arg("--security-opt");
    arg(&format!("seccomp={}", runtime_default_seccomp().display()));

    for env in container.env.iter().flatten() {
        let value = match (&env.value, &env.value_from) {
            (Some(value), None) => value.clone(),
            (None, Some(from)) => {
                let path = &from.field_ref.as_ref().expect("only fieldRef").field_path;
                lab.fields
                    .get(path)
                    .unwrap_or_else(|| panic!("no lab value for fieldRef {path}"))
                    .clone()
            }
            other => panic!("env {}: {other:?} not translated", env.name),
        };
        arg("--env");
        arg(&format!("{}={value}", env.name));
    }

    let volumes = spec.volumes.clone().unwrap_or_default();
    for mount in container.volume_mounts.iter().flatten() {
        if lab.without.contains(&mount.name) {
            continue;
        }
        let volume = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .unwrap_or_else(|| panic!("volume {} is not in the pod", mount.name));
        let source = if volume.config_map.is_some() {
            lab.config_dir.clone()
        } else if let Some(host_path) = &volume.host_path {
            let source = lab
                .host_paths
                .get(&host_path.path)
                .unwrap_or_else(|| panic!("no lab stand-in for hostPath {}", host_path.path))
                .clone();
            match host_path.type_.as_deref() {
                Some("Directory") => assert!(source.is_dir(), "{}", source.display()),
                Some("DirectoryOrCreate") => std::fs::create_dir_all(&source).unwrap(),
                other => panic!("hostPath type {other:?} not translated"),
            }
            source
        } else if volume.empty_dir.is_some() {
            let dir = lab.scratch.path().join(format!("{name}-{}", volume.name));
            std::fs::create_dir_all(&dir).unwrap();
            dir
        } else {
            panic!("volume {}: kind not translated", volume.name)
        };
        let mut option = format!(
            "type=bind,source={},destination={}",
            source.display(),
            mount.mount_path
        );
        if mount.read_only == Some(true) || lab.read_only.contains(&mount.name) {
            option.push_str(",ro=true");
        }
        match mount.mount_propagation.as_deref() {
            None | Some("None") => {}
            Some("HostToContainer") => option.push_str(",bind-propagation=rslave"),
            Some(other) => panic!("mountPropagation {other} not translated"),
        }
        arg("--mount");
        arg(&option);
    }

    match container.image_pull_policy.as_deref() {
        Some("IfNotPresent") => arg("--pull=missing"),
        other => panic!("imagePullPolicy {other:?} not translated"),
    }
    // command replaces the image's ENTRYPOINT, args its CMD.
    let command = container.command.clone().unwrap_or_default();
    if let Some(entrypoint) = command.first() {
        arg("--entrypoint");
        arg(entrypoint);
    }
    arg(container.image.as_deref().expect("image"));
    for word in command
        .iter()
        .skip(1)
        .chain(container.args.iter().flatten())
    {
        arg(word);
    }
    args
}

/// A container, removed on drop.
struct Pod {
    name: String,
}

impl Pod {
    fn start(spec: &PodSpec, container: &Container, lab: &Lab) -> Self {
        let name = unique_name("lbt-pod");
        let args = podman_run_args(spec, container, lab, &name);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        podman_ok(&refs);
        Self { name }
    }

    /// stdout and stderr of the container so far.
    fn logs(&self) -> String {
        let out = podman()
            .args(["logs", &self.name])
            .output()
            .expect("podman logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn exec(&self, command: &[&str]) -> std::process::Output {
        podman()
            .args(["exec", &self.name])
            .args(command)
            .output()
            .expect("podman exec")
    }

    fn running(&self) -> bool {
        podman_ok(&["inspect", "--format", "{{.State.Running}}", &self.name]).trim() == "true"
    }

    fn exit_code(&self) -> i64 {
        podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &self.name])
            .trim()
            .parse()
            .expect("exit code")
    }

    /// As a kubelet stops a pod: SIGTERM, then SIGKILL after the grace period.
    fn stop(&self, spec: &PodSpec) {
        let grace = spec.termination_grace_period_seconds.unwrap_or(30);
        podman_ok(&["stop", "--time", &grace.to_string(), &self.name]);
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time", "0", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// An HTTP probe as a kubelet runs it against a host-network pod: to the node's address,
/// the port resolved by name, success for 200-399 within the timeout.
fn probe_passes(node: &NetNs, host_ip: &str, container: &Container, probe: &Probe) -> bool {
    let get = probe.http_get.as_ref().expect("an httpGet probe");
    let port = kubelet::probe_port(container, get);
    let addr = SocketAddr::new(host_ip.parse().unwrap(), u16::try_from(port).unwrap());
    let path = get.path.as_deref().unwrap_or("/");
    let started = Instant::now();
    let reply = http_get(node, addr, path);
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1) as u64);
    matches!(reply, Some((200..=399, _))) && started.elapsed() <= timeout
}

/// A node of the lab running the DaemonSet's pod, announcing to FRR.
struct Node {
    fabric: Fabric,
    frr: Frr,
    pins: PinRoot,
    run_dir: TempDir,
    lab: Lab,
    spec: PodSpec,
    container: Container,
}

impl Node {
    fn new() -> Self {
        built_image();
        let fabric = Fabric::new(1);
        let frr = Frr::start(&fabric.router, FRR_ROUTER, true);
        let (spec, container) = pod("daemonset.yaml");
        let pins = PinRoot::new();
        std::fs::create_dir_all(pins.path()).unwrap();
        let run_dir = TempDir::new("lbt-image-run");
        let scratch = TempDir::new("lbt-image");
        let config_dir = scratch.path().join("config");
        std::fs::create_dir_all(&config_dir).unwrap();
        std::fs::write(config_dir.join("config.yaml"), lab_config()).unwrap();
        std::fs::write(
            config_dir.join("services.yaml"),
            format!("services:\n- {{name: web, addresses: [{VIP}]}}\n"),
        )
        .unwrap();
        let lab = Lab {
            netns: fabric.nodes[0].name().to_owned(),
            host_paths: BTreeMap::from([
                ("/sys/fs/bpf".to_owned(), pins.path().to_owned()),
                ("/run/lbagent".to_owned(), run_dir.path().to_owned()),
            ]),
            config_dir,
            scratch,
            fields: BTreeMap::from([
                ("spec.nodeName".to_owned(), "lab-node-1".to_owned()),
                ("status.hostIP".to_owned(), Fabric::node_v4(1)),
            ]),
            without: Vec::new(),
            read_only: Vec::new(),
        };
        Self {
            fabric,
            frr,
            pins,
            run_dir,
            lab,
            spec,
            container,
        }
    }

    fn node(&self) -> &NetNs {
        &self.fabric.nodes[0]
    }

    fn start(&self) -> Pod {
        Pod::start(&self.spec, &self.container, &self.lab)
    }

    fn route(&self) -> Vec<String> {
        next_hops(&self.fabric.router, &format!("{VIP}/32"))
    }

    fn probe(&self, which: &str) -> bool {
        let probe = match which {
            "liveness" => self.container.liveness_probe.as_ref(),
            _ => self.container.readiness_probe.as_ref(),
        }
        .expect("the manifest has the probe");
        probe_passes(self.node(), &Fabric::node_v4(1), &self.container, probe)
    }

    /// Waits until the pod is ready and its route is on the router.
    fn wait_serving(&self, pod: &Pod) {
        assert!(
            wait_until(Duration::from_secs(30), || self.probe("readiness")),
            "readiness probe never passed:\n{}",
            pod.logs()
        );
        assert!(
            wait_until(Duration::from_secs(30), || self.route()
                == [Fabric::node_v4(1)]),
            "router has {:?} for {VIP}:\n{}\nFRR: {}",
            self.route(),
            pod.logs(),
            self.frr.vtysh("show bgp summary")
        );
    }

    /// `lbagent counters -o json` inside the pod: packets for the VIP.
    fn counted(&self, pod: &Pod) -> u64 {
        let out = pod.exec(&["lbagent", "counters", "-o", "json"]);
        assert!(
            out.status.success(),
            "lbagent counters in the pod: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        json["vips"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["address"] == VIP)
            .and_then(|v| v["packets"].as_u64())
            .unwrap_or(0)
    }

    fn ping_vip(&self, count: u32) -> bool {
        self.fabric
            .router
            .exec(
                "ping",
                &["-c", &count.to_string(), "-i", "0.05", "-W", "1", VIP],
            )
            .status
            .success()
    }
}

/// The effective capability set of PID 1 in the pod, by name, and its NoNewPrivs and
/// Seccomp lines.
fn process_security(pod: &Pod) -> (BTreeSet<String>, String, String) {
    let out = pod.exec(&["cat", "/proc/1/status"]);
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim()
            .to_owned()
    };
    let bits = u64::from_str_radix(&field("CapEff:"), 16).expect("hex");
    let names: BTreeMap<u32, &str> = BTreeMap::from([
        (10, "NET_BIND_SERVICE"),
        (12, "NET_ADMIN"),
        (13, "NET_RAW"),
        (38, "PERFMON"),
        (39, "BPF"),
    ]);
    let caps = (0..64)
        .filter(|bit| bits & (1 << bit) != 0)
        .map(|bit| {
            names
                .get(&bit)
                .map_or(format!("bit {bit}"), |n| n.to_string())
        })
        .collect();
    (caps, field("NoNewPrivs:"), field("Seccomp:"))
}

#[test]
fn the_image_runs_as_the_daemonset_runs_it_announces_attaches_and_counts() {
    let node = Node::new();
    let pod = node.start();
    node.wait_serving(&pod);
    assert!(node.probe("liveness"), "liveness probe failed");

    // The settings really apply inside: exactly the manifest's capabilities, as root, no
    // privilege escalation, a seccomp filter, a root file system that cannot be written.
    let (caps, no_new_privs, seccomp) = process_security(&pod);
    let wanted: BTreeSet<String> = node
        .container
        .security_context
        .as_ref()
        .and_then(|c| c.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    assert_eq!(caps, wanted);
    assert_eq!(no_new_privs, "1");
    assert_eq!(seccomp, "2", "2: a seccomp filter");
    assert_eq!(
        String::from_utf8_lossy(&pod.exec(&["id", "-u"]).stdout).trim(),
        "0"
    );
    assert!(!pod.exec(&["touch", "/usr/local/bin/x"]).status.success());

    // XDP on the node's default-route interface, kube-lb0 with the VIP, BIRD announcing it
    // with the downward API's HOST_IP as router id.
    let xdp = xdp_on(node.node(), "eth0").expect("XDP on eth0");
    assert!(xdp.id > 0);
    assert!(addresses_on(node.node(), "kube-lb0").contains(&format!("{VIP}/32")));
    let bird_conf =
        std::fs::read_to_string(node.run_dir.path().join("bird/bird.conf")).unwrap_or_default();
    assert!(
        bird_conf.contains(&format!("router id {};", Fabric::node_v4(1))),
        "{bird_conf}"
    );
    let status: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(node.run_dir.path().join("status.json")).expect("status.json"),
    )
    .expect("status JSON");
    assert_eq!(status["node"], "lab-node-1", "NODE_NAME: {status}");

    // Traffic through the router reaches the node and is counted by the program the pod
    // loaded, read with the CLI inside the pod (and so through the pod's bpffs mount).
    let before = node.counted(&pod);
    assert!(node.ping_vip(5), "ping to {VIP} through the router failed");
    assert!(
        wait_until(Duration::from_secs(5), || node.counted(&pod) >= before + 5),
        "counters: {} before, {} after 5 pings",
        before,
        node.counted(&pod)
    );
    // bpftool in the image reads the pinned maps through the pod's /sys/fs/bpf, as an
    // operator's `kubectl exec` would.
    let pinned = node.pins.pinned_files();
    let readable = pinned.iter().filter(|path| {
        let inside = Path::new("/sys/fs/bpf").join(path.strip_prefix(node.pins.path()).unwrap());
        pod.exec(&["bpftool", "map", "show", "pinned", inside.to_str().unwrap()])
            .status
            .success()
    });
    assert!(readable.count() > 0, "bpftool read none of {pinned:?}");
}

#[test]
fn a_stopped_pod_keeps_routes_and_a_new_one_adopts_the_program_and_cleanup_removes_all() {
    let node = Node::new();
    let first = node.start();
    node.wait_serving(&first);
    assert!(
        wait_until(Duration::from_secs(10), || node
            .run_dir
            .path()
            .join("bird/announced")
            .exists()),
        "BIRD never marked its announcement:\n{}",
        first.logs()
    );
    let program = xdp_on(node.node(), "eth0").expect("XDP on eth0");
    let counted_before = node.counted(&first);

    // Pings every 10 ms for 30 s, across the whole restart; every one must be answered.
    let mut ping = Ping::start(&node.fabric.router, VIP, 3000);

    first.stop(&node.spec);
    assert_eq!(first.exit_code(), 0, "{}", first.logs());
    // The pod is gone; the router keeps the route (graceful restart), the program stays.
    for _ in 0..25 {
        assert_eq!(
            node.route(),
            [Fabric::node_v4(1)],
            "route lost while stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(xdp_on(node.node(), "eth0").map(|x| x.id), Some(program.id));

    let second = node.start();
    node.wait_serving(&second);
    assert!(
        wait_until(Duration::from_secs(10), || second
            .logs()
            .contains("recovering=true")),
        "the new pod's BIRD did not start with -R:\n{}",
        second.logs()
    );
    // It adopts the pinned link and maps, and swaps its own program into the link.
    assert!(
        wait_until(Duration::from_secs(10), || second
            .logs()
            .contains("replaced the XDP program")),
        "the new pod did not adopt the pinned link:\n{}",
        second.logs()
    );
    assert_ne!(xdp_on(node.node(), "eth0").map(|x| x.id), Some(program.id));
    assert!(
        ping.running(),
        "the restart took longer than the pings lasted"
    );
    let (sent, received) = ping.finish();
    assert_eq!(sent, 3000);
    assert_eq!(received, sent, "pings lost across the restart");
    // Every one counted, by the old program, the link alone, and the new one: the maps
    // outlived the pod.
    assert_eq!(node.counted(&second) - counted_before, sent);

    // Uninstall: the agent's pod goes (gracefully), then the cleanup DaemonSet's pod runs on
    // the same node with its own manifest, and turns ready once the node is clean.
    second.stop(&node.spec);
    let (cleanup_spec, cleanup_container) = pod("cleanup/daemonset.yaml");
    let cleanup = Pod::start(&cleanup_spec, &cleanup_container, &node.lab);
    let probe = cleanup_container
        .readiness_probe
        .as_ref()
        .and_then(|p| p.exec.as_ref())
        .and_then(|e| e.command.clone())
        .expect("an exec readiness probe");
    let probe: Vec<&str> = probe.iter().map(String::as_str).collect();
    assert!(
        wait_until(Duration::from_secs(30), || cleanup
            .exec(&probe)
            .status
            .success()),
        "cleanup pod never ready:\n{}",
        cleanup.logs()
    );
    assert!(
        wait_until(Duration::from_secs(5), || node.route().is_empty()),
        "router kept {:?} after cleanup:\n{}",
        node.route(),
        cleanup.logs()
    );
    assert_eq!(xdp_on(node.node(), "eth0"), None, "{}", cleanup.logs());
    assert!(addresses_on(node.node(), "kube-lb0").is_empty());
    assert_eq!(node.pins.pinned_files(), Vec::<PathBuf>::new());
    assert!(!node.run_dir.path().join("bird").exists());
    assert!(cleanup.running(), "the cleanup pod stays up once done");
}

/// `ping -c COUNT` from a namespace, read when it finishes, killed on drop. A count (rather
/// than an interrupt) makes ping wait for the last reply, so none is counted lost in flight.
struct Ping(Option<Child>);

impl Ping {
    fn start(ns: &NetNs, address: &str, count: u32) -> Self {
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "ping"])
            .args(["-i", "0.01", "-W", "1", "-c", &count.to_string(), address])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ping");
        Self(Some(child))
    }

    fn running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|child| child.try_wait().expect("try_wait").is_none())
    }

    /// Waits for the last reply; packets sent and answered.
    fn finish(mut self) -> (u64, u64) {
        let child = self.0.take().expect("running");
        let output = child.wait_with_output().expect("ping output");
        let summary = String::from_utf8_lossy(&output.stdout);
        let line = summary
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no ping summary: {summary}"));
        let numbers: Vec<u64> = line
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|w| w.parse().ok())
            .collect();
        eprintln!("ping across the restart: {line}");
        (numbers[0], numbers[1])
    }
}

impl Drop for Ping {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What a pod started without one of its mounts must leave: nothing.
fn assert_nothing_created(node: &Node, what: &str) {
    let link = run(
        "ip",
        &["-n", node.node().name(), "link", "show", "kube-lb0"],
    );
    assert!(!link.status.success(), "{what}: kube-lb0 was created");
    assert_eq!(xdp_on(node.node(), "eth0"), None, "{what}: XDP attached");
    assert_eq!(
        node.pins.pinned_files(),
        Vec::<PathBuf>::new(),
        "{what}: pins"
    );
    let left: Vec<_> = std::fs::read_dir(node.run_dir.path())
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert_eq!(left, Vec::<PathBuf>::new(), "{what}: files in /run/lbagent");
    assert!(node.route().is_empty(), "{what}: a route was announced");
}

#[test]
fn a_pod_missing_a_mount_exits_with_one_line_naming_it_and_creates_nothing() {
    let mut node = Node::new();
    for (what, without, read_only, needle) in [
        (
            "no config mount",
            "config",
            "",
            "mount the config at /etc/lbagent",
        ),
        (
            "read-only /run/lbagent",
            "",
            "run",
            "mount a writable directory at /run/lbagent",
        ),
        ("no /sys/fs/bpf", "bpffs", "", "/sys/fs/bpf"),
    ] {
        node.lab.without = [without]
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        node.lab.read_only = [read_only]
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let pod = node.start();
        assert!(
            wait_until(Duration::from_secs(20), || !pod.running()),
            "{what}: still running:\n{}",
            pod.logs()
        );
        assert_ne!(pod.exit_code(), 0, "{what}");
        let logs = pod.logs();
        let lines: Vec<&str> = logs.lines().collect();
        assert_eq!(lines.len(), 1, "{what}: expected one line, got {logs}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{what}: {:?} does not say {needle:?}",
            lines[0]
        );
        eprintln!("{what}: {}", lines[0]);
        assert_nothing_created(&node, what);
    }
}
