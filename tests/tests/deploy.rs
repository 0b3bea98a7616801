//! The manifests under deploy/, parsed into the Kubernetes API types, and their wiring: what
//! one object names, another must provide. The ConfigMap's config is loaded by lbagent itself,
//! the ClusterRole is compared with the API calls the code declares, and the agent is run with
//! exactly the capabilities the DaemonSet grants.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use clap::Parser as _;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ConfigMap, Container, Namespace, PodSpec, ServiceAccount, Volume},
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use lbagent::{API_ACCESS, Config, Mode, Source};
use lbagent_tests::{
    NetNs, PinRoot, TempDir, addresses_on, http_get, kubelet, lbagent_bin, wait_until, xdp_on,
};
use serde::{Serialize, de::DeserializeOwned};

const CAPABILITIES: [&str; 5] = ["NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE", "BPF", "PERFMON"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The objects of one kustomization, by kind.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    deployments: Vec<Deployment>,
    roles: Vec<Role>,
    role_bindings: Vec<RoleBinding>,
    /// CustomResourceDefinitions as written (the generated text is compared in full).
    crds: Vec<serde_json::Value>,
}

impl Objects {
    /// Every document of every file the kustomization in `dir` lists (a directory it lists
    /// is a kustomization of its own, loaded on its own).
    fn load(dir: &Path) -> Self {
        let mut objects = Self::default();
        for file in kustomization_resources(dir) {
            let path = dir.join(&file);
            if path.is_dir() {
                continue;
            }
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|err| panic!("{}: {err}", path.display()));
            let documents: Vec<serde_json::Value> =
                serde_saphyr::from_multiple(&text).unwrap_or_else(|err| panic!("{file}: {err}"));
            for (i, value) in documents.into_iter().enumerate() {
                if value.is_null() {
                    continue;
                }
                let origin = format!("{file} document {i}");
                match value["kind"].as_str() {
                    Some("Namespace") => objects.namespaces.push(exact(value, &origin)),
                    Some("ServiceAccount") => objects.service_accounts.push(exact(value, &origin)),
                    Some("ClusterRole") => objects.cluster_roles.push(exact(value, &origin)),
                    Some("ClusterRoleBinding") => objects.bindings.push(exact(value, &origin)),
                    Some("ConfigMap") => objects.config_maps.push(exact(value, &origin)),
                    Some("DaemonSet") => objects.daemon_sets.push(exact(value, &origin)),
                    Some("Deployment") => objects.deployments.push(exact(value, &origin)),
                    Some("Role") => objects.roles.push(exact(value, &origin)),
                    Some("RoleBinding") => objects.role_bindings.push(exact(value, &origin)),
                    Some("CustomResourceDefinition") => objects.crds.push(value),
                    other => panic!("{origin}: a kind this test does not check: {other:?}"),
                }
            }
        }
        objects
    }

    fn agent() -> Self {
        Self::load(&deploy_dir())
    }

    fn allocator() -> Self {
        Self::load(&deploy_dir().join("allocator"))
    }

    fn only<'a, T>(list: &'a [T], what: &str) -> &'a T {
        assert_eq!(list.len(), 1, "expected exactly one {what}");
        &list[0]
    }

    fn daemon_set(&self) -> &DaemonSet {
        Self::only(&self.daemon_sets, "DaemonSet")
    }

    fn config_map(&self) -> &ConfigMap {
        Self::only(&self.config_maps, "ConfigMap")
    }
}

/// Parses `value` as `T` and insists that nothing was lost on the way: k8s-openapi ignores
/// fields it does not know, so a misspelt field would otherwise pass silently.
fn exact<T: DeserializeOwned + Serialize>(written: serde_json::Value, origin: &str) -> T {
    let object: T = serde_json::from_value(written.clone())
        .unwrap_or_else(|err| panic!("{origin}: not a valid object of its kind: {err}"));
    let read = serde_json::to_value(&object).expect("object as JSON");
    if let Some(difference) = first_difference(&written, &read, "") {
        panic!("{origin}: {difference} (a misspelt or misplaced field?)");
    }
    object
}

fn first_difference(
    written: &serde_json::Value,
    read: &serde_json::Value,
    at: &str,
) -> Option<String> {
    use serde_json::Value;
    match (written, read) {
        (Value::Object(a), Value::Object(b)) => {
            a.iter().find_map(|(key, value)| match b.get(key) {
                Some(other) => first_difference(value, other, &format!("{at}.{key}")),
                None => Some(format!("{at}.{key} is not a field of the API type")),
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, &format!("{at}[{i}]"))),
        _ if written == read => None,
        _ => Some(format!("{at}: written {written}, read back {read}")),
    }
}

/// The `resources` a kustomization.yaml lists.
fn kustomization_resources(dir: &Path) -> Vec<String> {
    kustomization(dir)["resources"]
        .as_array()
        .expect("kustomization.yaml has a resources list")
        .iter()
        .map(|entry| entry.as_str().expect("resource paths are text").to_owned())
        .collect()
}

fn kustomization(dir: &Path) -> serde_json::Value {
    let path = dir.join("kustomization.yaml");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    serde_saphyr::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn pod_spec(daemon_set: &DaemonSet) -> &PodSpec {
    daemon_set
        .spec
        .as_ref()
        .and_then(|spec| spec.template.spec.as_ref())
        .expect("the DaemonSet has a pod template")
}

/// The DaemonSet's main container: lbagent (BIRD runs inside it), or the cleanup. The
/// agent's pod has one more, `membership`, checked by its own test.
fn container(daemon_set: &DaemonSet) -> &Container {
    let containers = &pod_spec(daemon_set).containers;
    let names: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
    assert!(
        matches!(names[..], [_] | [_, "membership"]),
        "the main container, and at most the membership beside it: {names:?}"
    );
    &containers[0]
}

fn membership_container(daemon_set: &DaemonSet) -> &Container {
    pod_spec(daemon_set)
        .containers
        .iter()
        .find(|c| c.name == "membership")
        .expect("a membership container")
}

fn volume<'a>(spec: &'a PodSpec, name: &str) -> &'a Volume {
    spec.volumes
        .iter()
        .flatten()
        .find(|volume| volume.name == name)
        .unwrap_or_else(|| panic!("no volume {name:?} in the pod"))
}

/// The value after `--config` in the container's args, else `$LBAGENT_CONFIG`.
/// Each environment variable of `container`, with the Pod field it comes from (downward API),
/// if any.
fn downward_fields(container: &Container) -> BTreeMap<&str, Option<&str>> {
    container
        .env
        .iter()
        .flatten()
        .map(|env| {
            let field = env
                .value_from
                .as_ref()
                .and_then(|from| from.field_ref.as_ref())
                .map(|field| field.field_path.as_str());
            (env.name.as_str(), field)
        })
        .collect()
}

fn config_path(container: &Container) -> PathBuf {
    let args = container.args.as_deref().unwrap_or_default();
    if let Some(i) = args.iter().position(|arg| arg == "--config") {
        return PathBuf::from(args.get(i + 1).expect("--config takes a path"));
    }
    container
        .env
        .iter()
        .flatten()
        .find(|env| env.name == "LBAGENT_CONFIG")
        .and_then(|env| env.value.as_deref())
        .map(PathBuf::from)
        .expect("the container names its config with --config or LBAGENT_CONFIG")
}

/// The ConfigMap's config file, written to a directory of its own, and loaded by lbagent.
struct LoadedConfig {
    _dir: TempDir,
    text: String,
    config: Config,
}

fn configmap_config(objects: &Objects) -> LoadedConfig {
    let container = container(objects.daemon_set());
    let key = config_path(container)
        .file_name()
        .and_then(|name| name.to_str())
        .expect("the config path names a file")
        .to_owned();
    let text = objects
        .config_map()
        .data
        .as_ref()
        .and_then(|data| data.get(&key))
        .unwrap_or_else(|| panic!("the ConfigMap has no key {key:?}"))
        .clone();
    let dir = TempDir::new("lbt-deploy");
    let path = dir.write(&key, &text);
    let config = Config::load(&path, Some("node-a"))
        .unwrap_or_else(|err| panic!("the ConfigMap's config does not load: {err}"));
    LoadedConfig {
        _dir: dir,
        text,
        config,
    }
}

/// The config with its commented `routing:` example uncommented.
fn with_routing_example(text: &str) -> String {
    let mut lines = Vec::new();
    let mut inside = false;
    let mut found = false;
    for line in text.lines() {
        if line == "# routing:" {
            inside = true;
            found = true;
        }
        if inside {
            if let Some(uncommented) = line.strip_prefix("# ") {
                lines.push(uncommented);
                continue;
            }
            inside = false;
        }
        lines.push(line);
    }
    assert!(found, "the config has a commented `# routing:` example");
    lines.join("\n") + "\n"
}

#[test]
fn kustomizations_list_every_manifest_beside_them() {
    for dir in [
        deploy_dir(),
        deploy_dir().join("cleanup"),
        deploy_dir().join("allocator"),
    ] {
        let listed: BTreeSet<String> = kustomization_resources(&dir)
            .into_iter()
            .filter(|file| !dir.join(file).is_dir())
            .collect();
        let present: BTreeSet<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
            .flatten()
            .filter_map(|entry| entry.file_name().into_string().ok())
            .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
            .filter(|name| name != "kustomization.yaml")
            .collect();
        assert_eq!(listed, present, "{}", dir.display());

        // `kubectl apply -k` rewrites an image only where its name matches an `images` entry.
        let images: Vec<String> = kustomization(&dir)["images"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|image| image["name"].as_str())
            .map(str::to_owned)
            .collect();
        for daemon_set in &Objects::load(&dir).daemon_sets {
            let image = container(daemon_set).image.as_deref().expect("an image");
            let name = image.rsplit_once(':').map_or(image, |(name, _)| name);
            assert!(
                images.iter().any(|listed| listed == name),
                "{}: image {image:?} has no entry in kustomization.yaml's images ({images:?})",
                dir.display()
            );
        }
    }
}

#[test]
fn the_configmap_config_loads_and_uses_the_kubernetes_source() {
    let loaded = configmap_config(&Objects::agent());
    assert!(
        matches!(loaded.config.source, Source::Kubernetes(_)),
        "{:?}",
        loaded.config.source
    );
    assert!(loaded.config.http_address.is_some(), "http.address is set");
    assert!(loaded.config.dataplane.is_some(), "the dataplane is on");
    assert_eq!(
        loaded.config.routing, None,
        "routing is an example, commented out"
    );
}

#[test]
fn the_commented_routing_example_loads_and_keeps_birds_state_on_the_host() {
    let objects = Objects::agent();
    let loaded = configmap_config(&objects);
    let dir = TempDir::new("lbt-deploy-routing");
    let path = dir.write("config.yaml", &with_routing_example(&loaded.text));
    let config = Config::load(&path, Some("node-a"))
        .unwrap_or_else(|err| panic!("the routing example does not load: {err}"));
    let routing = config.routing.expect("the example has a routing section");
    assert_eq!(routing.bgp.len(), 1, "one BGP neighbour, the ToR");
    assert!(routing.bgp[0].graceful_restart);

    // BIRD's marker for graceful restart, and the status files, must outlive the pod.
    let Mode::Managed { state_dir, .. } = &routing.mode else {
        panic!("the example runs BIRD in the pod: {:?}", routing.mode);
    };
    let host_dirs = host_path_mounts(objects.daemon_set());
    for needed in [state_dir.as_path(), config.status_path.as_path()] {
        assert!(
            host_dirs.iter().any(|dir| needed.starts_with(dir)),
            "{} is not on a hostPath mount ({host_dirs:?})",
            needed.display()
        );
    }
}

/// Mount paths in the container whose volume is a hostPath.
fn host_path_mounts(daemon_set: &DaemonSet) -> Vec<PathBuf> {
    let spec = pod_spec(daemon_set);
    container(daemon_set)
        .volume_mounts
        .iter()
        .flatten()
        .filter(|mount| volume(spec, &mount.name).host_path.is_some())
        .map(|mount| PathBuf::from(&mount.mount_path))
        .collect()
}

#[test]
fn the_probes_hit_the_port_and_paths_lbagent_serves() {
    let objects = Objects::agent();
    let address: SocketAddr = configmap_config(&objects)
        .config
        .http_address
        .expect("http.address is set");
    // The kubelet probes the pod's IP, which with hostNetwork is the node's.
    assert!(
        address.ip().is_unspecified(),
        "http.address {address} must listen on every address for the kubelet to reach it"
    );
    let container = container(objects.daemon_set());
    for (probe, path) in [
        (container.liveness_probe.as_ref(), "/healthz"),
        (container.readiness_probe.as_ref(), "/readyz"),
    ] {
        let get = probe
            .and_then(|probe| probe.http_get.as_ref())
            .unwrap_or_else(|| panic!("no httpGet probe for {path}"));
        assert_eq!(get.path.as_deref(), Some(path));
        assert!(matches!(get.scheme.as_deref(), None | Some("HTTP")));
        let port = kubelet::probe_port(container, get);
        assert_eq!(
            port,
            i32::from(address.port()),
            "{path} probes port {port}, lbagent serves {address}"
        );
    }
    for port in container.ports.iter().flatten() {
        assert!(port.host_port.is_none() || port.host_port == Some(port.container_port));
    }
}

#[test]
fn the_config_path_is_the_mounted_configmap_key() {
    let objects = Objects::agent();
    let daemon_set = objects.daemon_set();
    let path = config_path(container(daemon_set));
    let dir = path.parent().expect("the config path has a directory");
    let key = path
        .file_name()
        .and_then(|name| name.to_str())
        .expect("a file name");

    let mount = container(daemon_set)
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| Path::new(&mount.mount_path) == dir)
        .unwrap_or_else(|| panic!("nothing is mounted at {}", dir.display()));
    // A subPath mount would never see the ConfigMap's updates.
    assert_eq!(
        mount.sub_path, None,
        "the ConfigMap is mounted as a directory"
    );
    let source = volume(pod_spec(daemon_set), &mount.name)
        .config_map
        .as_ref()
        .expect("the config directory is a ConfigMap volume");
    assert_eq!(
        source.items, None,
        "every key is projected under its own name"
    );

    let config_map = objects.config_map();
    assert_eq!(Some(&source.name), config_map.metadata.name.as_ref());
    assert_eq!(config_map.metadata.namespace, daemon_set.metadata.namespace);
    assert!(
        config_map
            .data
            .as_ref()
            .is_some_and(|data| data.contains_key(key)),
        "the ConfigMap has no key {key:?}"
    );
}

#[test]
fn the_cluster_role_grants_exactly_the_api_calls_the_code_makes() {
    let objects = Objects::agent();
    let role = Objects::only(&objects.cluster_roles, "ClusterRole");
    assert_grants_exactly(role.rules.iter().flatten(), API_ACCESS);
}

fn assert_grants_exactly<'a>(
    rules: impl Iterator<Item = &'a PolicyRule>,
    api_access: &[lbagent::ApiAccess],
) {
    let mut granted = BTreeSet::new();
    for rule in rules {
        assert_eq!(rule.resource_names, None, "no rule is limited to names");
        assert_eq!(rule.non_resource_urls, None, "no non-resource URLs");
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    for text in [group, resource, verb] {
                        assert_ne!(text, "*", "no wildcards");
                    }
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let used: BTreeSet<(String, String, String)> = api_access
        .iter()
        .flat_map(|access| {
            access.verbs.iter().map(|verb| {
                (
                    access.group.to_owned(),
                    access.resource.to_owned(),
                    (*verb).to_owned(),
                )
            })
        })
        .collect();
    let missing: Vec<_> = used.difference(&granted).collect();
    let extra: Vec<_> = granted.difference(&used).collect();
    assert!(
        missing.is_empty(),
        "the code calls, the role denies: {missing:?}"
    );
    assert!(
        extra.is_empty(),
        "the role grants, the code never calls: {extra:?}"
    );
}

#[test]
fn the_binding_gives_the_role_to_the_daemonsets_service_account() {
    let objects = Objects::agent();
    let daemon_set = objects.daemon_set();
    let namespace = daemon_set
        .metadata
        .namespace
        .as_deref()
        .expect("a namespace");
    let account = pod_spec(daemon_set)
        .service_account_name
        .as_deref()
        .expect("the DaemonSet names its ServiceAccount");

    assert!(
        objects
            .namespaces
            .iter()
            .any(|ns| ns.metadata.name.as_deref() == Some(namespace)),
        "the Namespace {namespace} is part of the deployment"
    );
    assert!(
        objects.service_accounts.iter().any(|sa| {
            sa.metadata.name.as_deref() == Some(account)
                && sa.metadata.namespace.as_deref() == Some(namespace)
        }),
        "the ServiceAccount {namespace}/{account} is part of the deployment"
    );

    let role = Objects::only(&objects.cluster_roles, "ClusterRole");
    let binding = Objects::only(&objects.bindings, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    assert!(
        binding.subjects.iter().flatten().any(|subject| {
            subject.kind == "ServiceAccount"
                && subject.name == account
                && subject.namespace.as_deref() == Some(namespace)
        }),
        "the binding's subjects do not include {namespace}/{account}: {:?}",
        binding.subjects
    );
}

/// The security settings both DaemonSets (agent and cleanup) must have.
fn assert_least_privilege(daemon_set: &DaemonSet) {
    let name = daemon_set.metadata.name.as_deref().unwrap_or_default();
    let spec = pod_spec(daemon_set);
    assert_eq!(spec.host_network, Some(true), "{name}: hostNetwork");
    let security = container(daemon_set)
        .security_context
        .as_ref()
        .unwrap_or_else(|| panic!("{name}: no securityContext"));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(CAPABILITIES),
        "{name}: capabilities added"
    );
    assert_eq!(
        capabilities.drop.as_deref(),
        Some(&["ALL".to_owned()][..]),
        "{name}: every other capability dropped"
    );
    assert_ne!(security.privileged, Some(true), "{name}: not privileged");
    assert_eq!(
        security.allow_privilege_escalation,
        Some(false),
        "{name}: allowPrivilegeEscalation"
    );
    assert_eq!(
        security.read_only_root_filesystem,
        Some(true),
        "{name}: read-only root"
    );
    let seccomp = security
        .seccomp_profile
        .as_ref()
        .or(spec
            .security_context
            .as_ref()
            .and_then(|pod| pod.seccomp_profile.as_ref()))
        .unwrap_or_else(|| panic!("{name}: no seccompProfile"));
    assert_eq!(seccomp.type_, "RuntimeDefault", "{name}: seccomp");

    // bpffs from the host: pinned maps and links outlive the pod.
    let mount = container(daemon_set)
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| mount.mount_path == "/sys/fs/bpf")
        .unwrap_or_else(|| panic!("{name}: /sys/fs/bpf is not mounted"));
    let host = volume(spec, &mount.name)
        .host_path
        .as_ref()
        .unwrap_or_else(|| panic!("{name}: /sys/fs/bpf is not a hostPath"));
    assert_eq!(host.path, "/sys/fs/bpf", "{name}");
    assert_eq!(
        mount.mount_propagation.as_deref(),
        Some("HostToContainer"),
        "{name}: a bpffs mounted later must show up"
    );

    // Every node, whatever its taints.
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    for (key, effect) in [
        ("node-role.kubernetes.io/control-plane", "NoSchedule"),
        ("node.kubernetes.io/not-ready", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/network-unavailable", "NoSchedule"),
    ] {
        let tolerated = tolerations.iter().any(|toleration| {
            let key_matches = match toleration.key.as_deref() {
                None | Some("") => toleration.operator.as_deref() == Some("Exists"),
                Some(k) => k == key,
            };
            let effect_matches = matches!(toleration.effect.as_deref(), None | Some(""))
                || toleration.effect.as_deref() == Some(effect);
            key_matches && effect_matches && toleration.toleration_seconds.is_none()
        });
        assert!(
            tolerated,
            "{name}: the taint {key}:{effect} is not tolerated"
        );
    }
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical"),
        "{name}"
    );
}

#[test]
fn the_agent_runs_with_least_privilege_on_every_node() {
    let objects = Objects::agent();
    let daemon_set = objects.daemon_set();
    assert_least_privilege(daemon_set);
    let spec = pod_spec(daemon_set);
    assert_eq!(spec.dns_policy.as_deref(), Some("ClusterFirstWithHostNet"));

    let strategy = daemon_set
        .spec
        .as_ref()
        .and_then(|spec| spec.update_strategy.as_ref())
        .expect("an updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert_eq!(
        strategy
            .rolling_update
            .as_ref()
            .and_then(|rolling| rolling.max_unavailable.as_ref()),
        Some(&IntOrString::Int(1))
    );
    // On SIGTERM the agent waits up to 15 s for BIRD's graceful restart (daemon.rs).
    assert!(
        spec.termination_grace_period_seconds
            .is_some_and(|seconds| seconds > 15),
        "terminationGracePeriodSeconds: {:?}",
        spec.termination_grace_period_seconds
    );
    let resources = container(daemon_set).resources.as_ref().expect("resources");
    for (what, list) in [
        ("requests", &resources.requests),
        ("limits", &resources.limits),
    ] {
        assert!(
            list.as_ref()
                .is_some_and(|list| list.contains_key("memory")),
            "memory {what}"
        );
    }
}

#[test]
fn the_cleanup_daemonset_has_the_same_privileges() {
    let cleanup = Objects::load(&deploy_dir().join("cleanup"));
    for daemon_set in &cleanup.daemon_sets {
        assert_least_privilege(daemon_set);
        assert_eq!(
            pod_spec(daemon_set).automount_service_account_token,
            Some(false),
            "cleanup needs no API access"
        );
    }
    assert_eq!(cleanup.daemon_sets.len(), 1);
}

/// The ConfigMap is gone when the cleanup DaemonSet runs: its command must name every path
/// the shipped config (with its routing example on) makes lbagent use.
#[test]
fn the_cleanup_daemonset_passes_the_paths_the_configmap_uses() {
    let objects = Objects::agent();
    let loaded = configmap_config(&objects);
    let dir = TempDir::new("lbt-deploy-cleanup");
    let config = Config::load(
        &dir.write("config.yaml", &with_routing_example(&loaded.text)),
        Some("node-a"),
    )
    .expect("the routing example loads");
    let cleanup = Objects::load(&deploy_dir().join("cleanup"));
    let command = container(Objects::only(&cleanup.daemon_sets, "DaemonSet"))
        .command
        .clone()
        .unwrap_or_default();
    let script = command.last().expect("a shell command");
    let words: Vec<&str> = script
        .split("&&")
        .next()
        .expect("the cleanup comes first")
        .split_whitespace()
        .collect();
    // The real command line parses it.
    lbagent::Cli::try_parse_from(&words).unwrap_or_else(|err| panic!("{script:?}: {err}"));
    let flag = |name: &str| {
        words
            .iter()
            .position(|word| *word == name)
            .and_then(|i| words.get(i + 1))
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("{script:?} passes no {name}"))
    };
    let Some(Mode::Managed { state_dir, .. }) = config.routing.as_ref().map(|r| r.mode.clone())
    else {
        panic!("the routing example runs BIRD in the pod");
    };
    let pin_root = config
        .dataplane
        .as_ref()
        .map(|dataplane| dataplane.pin_root.clone())
        .expect("the config has a dataplane");
    assert_eq!(flag("--pin-root"), pin_root);
    assert_eq!(
        flag("--interface"),
        PathBuf::from(&config.addresses.interface)
    );
    assert_eq!(flag("--status-file"), config.status_path);
    assert_eq!(flag("--state-dir"), state_dir);
}

#[test]
fn node_name_and_host_ip_come_from_the_downward_api() {
    let objects = Objects::agent();
    let env = downward_fields(container(objects.daemon_set()));
    assert_eq!(env.get("NODE_NAME"), Some(&Some("spec.nodeName")));
    assert_eq!(env.get("HOST_IP"), Some(&Some("status.hostIP")));
}

#[test]
fn the_membership_runs_beside_the_agent_with_what_it_needs_and_no_more() {
    use clap::Parser as _;
    let objects = Objects::agent();
    let daemon_set = objects.daemon_set();
    let membership = membership_container(daemon_set);
    let agent = container(daemon_set);
    assert_eq!(membership.image, agent.image, "the same image");
    let args = membership.args.clone().unwrap_or_default();
    // NODE_NAME and HOST_IP (checked below to come from the downward API) fill `--name` and
    // `--address`: given here as the flags they stand for.
    let words: Vec<String> = std::iter::once("lbagent".to_owned())
        .chain(membership.command.clone().unwrap_or_default())
        .chain(args.clone())
        .chain(["--name", "node-a", "--address", "192.0.2.1"].map(str::to_owned))
        .collect();
    lbagent::Cli::try_parse_from(&words).unwrap_or_else(|err| panic!("{words:?}: {err}"));
    assert_eq!(args.first().map(String::as_str), Some("membership"));
    assert!(
        args.iter().any(|a| a == "--kubernetes"),
        "seeds and exclusions from the Nodes: {args:?}"
    );
    // It runs under the agent's ServiceAccount: its calls are among those the role grants.
    for access in lbagent::MEMBERSHIP_API_ACCESS {
        assert!(
            API_ACCESS
                .iter()
                .any(|granted| granted.group == access.group
                    && granted.resource == access.resource
                    && access.verbs.iter().all(|v| granted.verbs.contains(v))),
            "{access:?} is not granted"
        );
    }
    // Its name and address from the downward API, as the agent's.
    let env = downward_fields(membership);
    assert_eq!(env.get("NODE_NAME"), Some(&Some("spec.nodeName")));
    assert_eq!(env.get("HOST_IP"), Some(&Some("status.hostIP")));
    // It writes the member list where the agent's config reads it: the same volume.
    let loaded = configmap_config(&objects);
    let members_file = loaded
        .config
        .neighbours
        .as_ref()
        .expect("the ConfigMap answers for local addresses")
        .members_file
        .clone();
    let volume_of = |container: &Container, file: &Path| {
        container
            .volume_mounts
            .iter()
            .flatten()
            .filter(|m| file.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .map(|m| {
                (
                    m.name.clone(),
                    file.strip_prefix(&m.mount_path).unwrap().to_owned(),
                )
            })
            .unwrap_or_else(|| panic!("{}: {} is not on a volume", container.name, file.display()))
    };
    assert_eq!(
        volume_of(membership, &members_file),
        volume_of(agent, &members_file),
        "membersFile"
    );
    // The pinned lease on the host's bpffs, as the agent's maps.
    let bpffs = membership
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/sys/fs/bpf")
        .expect("bpffs mounted");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    let security = membership
        .security_context
        .as_ref()
        .expect("securityContext");
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.add.as_deref(), Some(&["BPF".to_owned()][..]));
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_ne!(security.privileged, Some(true));
    let resources = membership.resources.as_ref().expect("resources");
    assert!(
        resources
            .limits
            .as_ref()
            .is_some_and(|l| l.contains_key("memory"))
    );
}

/// A process killed (with what it started) on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A command for `ns` that runs a program as the DaemonSet's container would: root, with only
/// the container's capabilities (the bounding set limits what root gets at exec), no privilege
/// escalation, and, with readOnlyRootFilesystem, a read-only root in a mount namespace of its
/// own where only `writable` (standing in for the hostPath mounts) can be written.
fn like_the_container(ns: &NetNs, daemon_set: &DaemonSet, writable: &Path) -> Command {
    let security = container(daemon_set)
        .security_context
        .as_ref()
        .expect("securityContext");
    let added: Vec<String> = security
        .capabilities
        .as_ref()
        .and_then(|caps| caps.add.clone())
        .unwrap_or_default()
        .iter()
        .map(|cap| format!("+{}", cap.to_lowercase()))
        .collect();
    let read_only = if security.read_only_root_filesystem == Some(true) {
        "mount -o remount,bind,ro /"
    } else {
        "true"
    };
    let mut command = ns.command(Path::new("unshare"));
    command
        .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            "mount --bind \"$1\" \"$1\" && {read_only} && shift && exec setpriv \"$@\""
        ))
        .arg("sh")
        .arg(writable)
        .arg(format!("--bounding-set=-all,{}", added.join(",")))
        .arg("--inh-caps=-all");
    if security.allow_privilege_escalation == Some(false) {
        command.arg("--no-new-privs");
    }
    command.arg("--");
    command
}

/// The ConfigMap's config with the routing example on, run as the DaemonSet's container:
/// kube-lb0, XDP, the pinned maps, BIRD and the HTTP endpoint all work. The file source stands
/// in for the API server. Then `lbagent cleanup`, run as the cleanup DaemonSet's container,
/// removes it all.
#[test]
fn the_daemonsets_capabilities_are_enough_to_run_and_clean_up() {
    let objects = Objects::agent();
    let cleanup = Objects::load(&deploy_dir().join("cleanup"));
    let loaded = configmap_config(&objects);

    let ns = NetNs::with_eth0("lbt-deploy", "10.78.0.1/24");
    ns.ip(&["link", "set", "eth0peer", "up"]);
    ns.ip(&["route", "add", "default", "via", "10.78.0.2"]);
    let pins = PinRoot::new();
    let dir = TempDir::new("lbt-deploy-run");
    dir.write(
        "services.yaml",
        "services:\n  - {name: web, addresses: [203.0.113.10], ports: [{port: 80, protocol: TCP}]}\n",
    );

    // The ConfigMap's config, with what the test must move: the source, and every path on the
    // host (pins, status, BIRD's state) into directories of the test's own.
    let mut config: serde_json::Value =
        serde_saphyr::from_str(&with_routing_example(&loaded.text)).expect("config YAML");
    config["source"] = serde_json::json!({"file": {"path": "services.yaml"}});
    config["status"] = serde_json::json!({"path": dir.path().join("run/status.json")});
    config["dataplane"]["pinRoot"] = pins.path().display().to_string().into();
    let routing = &mut config["routing"];
    routing["stateDir"] = dir.path().join("run/bird").display().to_string().into();
    routing["routerId"] = "10.78.0.1".into();
    routing["bgp"][0]["neighbor"] = "10.78.0.2".into();
    let config_path = dir.write(
        "config.yaml",
        // JSON is YAML.
        &serde_json::to_string_pretty(&config).expect("config as JSON"),
    );
    let address = loaded.config.http_address.expect("http.address");

    let log = dir.path().join("agent.log");
    let log_file = std::fs::File::create(&log).expect("log file");
    let agent = Running(
        like_the_container(&ns, objects.daemon_set(), dir.path())
            .arg(lbagent_bin())
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("start lbagent as the container would run it"),
    );
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();

    let ready = wait_until(Duration::from_secs(20), || {
        http_get(
            &ns,
            SocketAddr::new([127, 0, 0, 1].into(), address.port()),
            "/readyz",
        )
        .is_some_and(|(code, _)| code == 200)
    });
    assert!(ready, "never ready:\n{}", agent_log());
    assert!(
        addresses_on(&ns, "kube-lb0").contains("203.0.113.10/32"),
        "kube-lb0: {:?}\n{}",
        addresses_on(&ns, "kube-lb0"),
        agent_log()
    );
    let xdp = xdp_on(&ns, "eth0").unwrap_or_else(|| panic!("no XDP on eth0:\n{}", agent_log()));
    assert_eq!(xdp.name, "lbagent_xdp");
    assert!(
        !pins.pinned_files().is_empty(),
        "no pins under {}",
        pins.path().display()
    );
    let status = dir.path().join("run/status.json");
    let bird_up = wait_until(Duration::from_secs(10), || {
        std::fs::read_to_string(&status).is_ok_and(|text| text.contains("\"tor\""))
    });
    assert!(
        bird_up,
        "BIRD never reported its protocols:\n{}",
        agent_log()
    );
    drop(agent);

    let cleaned = like_the_container(
        &ns,
        Objects::only(&cleanup.daemon_sets, "DaemonSet"),
        dir.path(),
    )
    .arg(lbagent_bin())
    .arg("cleanup")
    .arg("--config")
    .arg(&config_path)
    .output()
    .expect("run lbagent cleanup as the container would");
    assert!(
        cleaned.status.success(),
        "cleanup failed: {}",
        String::from_utf8_lossy(&cleaned.stderr)
    );
    assert!(addresses_on(&ns, "kube-lb0").is_empty(), "kube-lb0 is gone");
    assert_eq!(xdp_on(&ns, "eth0"), None, "XDP detached");
    assert_eq!(pins.pinned_files(), Vec::<PathBuf>::new(), "pins removed");
}

#[test]
fn setpriv_is_what_the_test_thinks() {
    // The capability test relies on setpriv dropping capabilities; a setpriv that ignored the
    // bounding set would let any manifest pass.
    let output = Command::new("setpriv")
        .args(["--bounding-set=-all,+net_admin", "--inh-caps=-all", "--"])
        .args(["grep", "CapEff", "/proc/self/status"])
        .output()
        .expect("run setpriv");
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(text.trim(), "CapEff:\t0000000000001000", "{text}");
}

/// The allocator's ClusterRole and its namespaced Role (the Lease) grant exactly what
/// `lbagent::allocator::API_ACCESS` declares, to the Deployment's ServiceAccount.
#[test]
fn the_allocators_roles_grant_exactly_its_api_calls_to_its_service_account() {
    let objects = Objects::allocator();
    let cluster_role = Objects::only(&objects.cluster_roles, "ClusterRole");
    let role = Objects::only(&objects.roles, "Role");
    assert_grants_exactly(
        cluster_role
            .rules
            .iter()
            .flatten()
            .chain(role.rules.iter().flatten()),
        lbagent::allocator::API_ACCESS,
    );
    let deployment = Objects::only(&objects.deployments, "Deployment");
    let namespace = deployment.metadata.namespace.as_deref().expect("namespace");
    let spec = deployment.spec.as_ref().expect("spec");
    assert_eq!(spec.replicas, Some(2), "two replicas, one leading");
    let pod = spec.template.spec.as_ref().expect("pod spec");
    let account = pod
        .service_account_name
        .as_deref()
        .expect("service account");
    assert!(objects.service_accounts.iter().any(|sa| {
        sa.metadata.name.as_deref() == Some(account)
            && sa.metadata.namespace.as_deref() == Some(namespace)
    }));
    assert_eq!(role.metadata.namespace.as_deref(), Some(namespace));
    let container = Objects::only(&pod.containers, "container");
    assert_eq!(
        container.args.as_deref(),
        Some(&["allocator".to_owned()][..])
    );
    // The Lease goes where the Role allows it: the pod's own namespace.
    let field = |name: &str| {
        container
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.as_ref())
            .and_then(|v| v.field_ref.as_ref())
            .map(|f| f.field_path.clone())
    };
    assert_eq!(
        field("POD_NAMESPACE").as_deref(),
        Some("metadata.namespace")
    );
    assert_eq!(field("POD_NAME").as_deref(), Some("metadata.name"));
    let binding = Objects::only(&objects.bindings, "ClusterRoleBinding");
    let role_binding = Objects::only(&objects.role_bindings, "RoleBinding");
    assert_eq!(
        Some(&binding.role_ref.name),
        cluster_role.metadata.name.as_ref()
    );
    assert_eq!(
        Some(&role_binding.role_ref.name),
        role.metadata.name.as_ref()
    );
    assert_eq!(role_binding.role_ref.kind, "Role");
    for subjects in [&binding.subjects, &role_binding.subjects] {
        assert!(
            subjects.iter().flatten().any(|s| s.kind == "ServiceAccount"
                && s.name == account
                && s.namespace.as_deref() == Some(namespace)),
            "{subjects:?}"
        );
    }
    // The top-level kustomization brings the allocator and the namespace it runs in.
    assert!(kustomization_resources(&deploy_dir()).contains(&"allocator".to_owned()));
    assert!(
        Objects::agent()
            .namespaces
            .iter()
            .any(|ns| ns.metadata.name.as_deref() == Some(namespace))
    );
}

/// `deploy/allocator/crds.yaml` is what `lbagent allocator crds` generates from the Rust types;
/// regenerate it with `lbagent allocator crds > deploy/allocator/crds.yaml`.
#[test]
fn the_checked_in_crds_are_what_the_types_generate() {
    let path = deploy_dir().join("allocator/crds.yaml");
    let written = std::fs::read_to_string(&path).expect("crds.yaml");
    let generated = lbagent::allocator::crds_yaml().expect("generate");
    assert!(
        written == generated,
        "{} differs from what the types generate; regenerate it with \
         `lbagent allocator crds > deploy/allocator/crds.yaml`",
        path.display()
    );
    let output = Command::new(lbagent_bin())
        .args(["allocator", "crds"])
        .output()
        .expect("lbagent allocator crds");
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout), generated);
    let crds = Objects::allocator().crds;
    assert_eq!(crds.len(), 1);
    assert_eq!(crds[0]["spec"]["group"].as_str(), Some("lbagent.io"));
    assert!(
        crds[0]["spec"]["versions"][0]["subresources"]["status"].is_object(),
        "the status subresource is declared"
    );
}

/// The example pool is a valid pool of the CRD's type.
#[test]
fn the_example_pool_is_a_valid_pool() {
    let path = deploy_dir().join("examples/addresspool.yaml");
    let text = std::fs::read_to_string(&path).expect("example pool");
    let pool: lbagent::allocator::AddressPool =
        serde_saphyr::from_str(&text).expect("an AddressPool");
    let parsed = lbagent::allocator::pool::Pool::parse("default", "", &pool.spec).expect("valid");
    assert_eq!(parsed.size(lbagent::allocator::pool::Family::V4), 254);
    assert_eq!(parsed.size(lbagent::allocator::pool::Family::V6), 256);
}
