//! lbagent's configuration file (YAML), validated on load. Every error names the field, the
//! value, and what is allowed.
//!
//! ```yaml
//! node:
//!   name: node-a                 # default: --node-name, $NODE_NAME, then the host name
//!   labels: {rack: a}            # the file source's node labels (routing nodeSelectors)
//! source:                       # exactly one of file and kubernetes
//!   file:
//!     path: services.yaml        # relative to this file
//!   # kubernetes:
//!   #   loadBalancerClass: purelb.io/purelb  # default: Services without a class
//!   #   kubeconfig: /path        # default: $KUBECONFIG, ~/.kube/config, then in-cluster
//! addresses:
//!   interface: kube-lb0
//!   resyncInterval: 30s
//! status:
//!   path: /run/lbagent/status.json
//! log:
//!   format: human                # or json
//! http:
//!   address: 0.0.0.0:9658        # /metrics, /healthz, /readyz; default: not served
//! neighbours:                    # answer ARP/NDP for local addresses (needs dataplane:)
//!   membersFile: /run/lbagent/members.json  # what `lbagent membership` publishes
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    desired::NodeLabels,
    logging::LogFormat,
    sinks::{
        dataplane::DataplaneConfig,
        is_interface_name,
        neighbours::NeighboursConfig,
        routing::{
            model::{FieldError, RawRouting, RoutingConfig},
            selector,
        },
    },
    sources::kubernetes::KubernetesSource,
};

/// The largest config file read.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// The config file's YAML. Anchors and aliases are allowed (a shared BGP setting), their
/// expansion bounded by the parser.
pub const LIMITS: crate::yaml::Limits = crate::yaml::Limits {
    depth: 32,
    nodes: 100_000,
    aliases: true,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub node_name: String,
    /// With the file source, the labels routing `nodeSelector`s match (the Kubernetes source
    /// takes the Node's own).
    pub node_labels: NodeLabels,
    pub source: Source,
    pub addresses: AddressesConfig,
    pub status_path: PathBuf,
    pub log_format: Option<LogFormat>,
    /// `None`: lbagent advertises nothing itself (no `routing:` section).
    pub routing: Option<RoutingConfig>,
    /// `None`: no eBPF dataplane (no `dataplane:` section).
    pub dataplane: Option<DataplaneConfig>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: not served.
    pub http_address: Option<SocketAddr>,
    /// `None`: local addresses are reported, not answered for (no `neighbours:` section).
    pub neighbours: Option<NeighboursConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File { path: PathBuf },
    Kubernetes(KubernetesSource),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressesConfig {
    pub interface: String,
    pub resync_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: crate::yaml::YamlError,
    },
    #[error("{}: {field}: {value:?} is not allowed ({allowed})", path.display())]
    Invalid {
        path: PathBuf,
        field: &'static str,
        value: String,
        allowed: &'static str,
    },
    /// A field deep in a list, named by its path (`routing.bgp[1].asn`); the value is already
    /// quoted where it was text.
    #[error("{}: {field}: {value} is not allowed ({allowed})", path.display())]
    InvalidAt {
        path: PathBuf,
        field: String,
        value: String,
        allowed: &'static str,
    },
}

pub const DEFAULT_INTERFACE: &str = "kube-lb0";
pub const DEFAULT_STATUS_PATH: &str = "/run/lbagent/status.json";
pub const DEFAULT_MEMBERS_FILE: &str = "/run/lbagent/members.json";
const MIN_RESYNC: Duration = Duration::from_secs(1);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    node: RawNode,
    source: RawSource,
    #[serde(default)]
    addresses: RawAddresses,
    #[serde(default)]
    status: RawStatus,
    #[serde(default)]
    log: RawLog,
    routing: Option<RawRouting>,
    dataplane: Option<RawDataplane>,
    http: Option<RawHttp>,
    neighbours: Option<RawNeighbours>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNeighbours {
    members_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHttp {
    address: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDataplane {
    #[serde(default)]
    interfaces: Vec<String>,
    mode: Option<String>,
    pin_root: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawNode {
    name: Option<String>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSource {
    file: Option<RawFileSource>,
    kubernetes: Option<RawKubernetesSource>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawKubernetesSource {
    load_balancer_class: Option<String>,
    kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFileSource {
    path: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawAddresses {
    interface: Option<String>,
    resync_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawStatus {
    path: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLog {
    format: Option<String>,
}

impl Config {
    /// Loads and validates `path`; `node_name` (from a flag or the environment) overrides the
    /// file's.
    pub fn load(path: &Path, node_name: Option<&str>) -> Result<Self, ConfigError> {
        let text = crate::watch::read_limited(path, MAX_FILE_BYTES).map_err(|source| {
            ConfigError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
        Self::parse(&text, path, node_name)
    }

    pub fn parse(text: &str, path: &Path, node_name: Option<&str>) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            crate::yaml::from_str(text, LIMITS).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
        let invalid = |field, value: &str, allowed| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            value: value.to_owned(),
            allowed,
        };

        let node_name = match node_name.map(str::to_owned).or(raw.node.name) {
            Some(name) if is_dns_label_ish(&name) => name,
            Some(name) => {
                return Err(invalid(
                    "node.name",
                    &name,
                    "1-253 characters: lowercase letters, digits, '-' and '.'",
                ));
            }
            None => hostname(),
        };

        let invalid_at = |err: FieldError| ConfigError::InvalidAt {
            path: path.to_owned(),
            field: err.field,
            value: err.value,
            allowed: err.allowed,
        };
        for (key, value) in &raw.node.labels {
            selector::label_key(key, "node.labels").map_err(invalid_at)?;
            selector::label_value(value, &format!("node.labels.{key}")).map_err(invalid_at)?;
        }
        let node_labels = raw.node.labels;

        let base = path.parent().unwrap_or(Path::new("."));
        let source = match (raw.source.file, raw.source.kubernetes) {
            (Some(file), None) if file.path.as_os_str().is_empty() => {
                return Err(invalid(
                    "source.file.path",
                    "",
                    "a path to the services file",
                ));
            }
            (Some(file), None) => Source::File {
                path: base.join(file.path),
            },
            (None, Some(kube)) => {
                if let Some(class) = &kube.load_balancer_class
                    && !is_qualified_name(class)
                {
                    return Err(invalid(
                        "source.kubernetes.loadBalancerClass",
                        class,
                        "a label-style name such as example.com/lb: at most 316 characters of \
                         letters, digits, '-', '_', '.' and one '/'",
                    ));
                }
                Source::Kubernetes(KubernetesSource {
                    load_balancer_class: kube.load_balancer_class,
                    kubeconfig: kube.kubeconfig.map(|path| base.join(path)),
                })
            }
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "source",
                    "file and kubernetes",
                    "exactly one source: file or kubernetes",
                ));
            }
            (None, None) => {
                return Err(invalid(
                    "source",
                    "{}",
                    "exactly one source: file or kubernetes",
                ));
            }
        };

        let http_address = match raw.http {
            None => None,
            Some(http) => match http.address.parse::<SocketAddr>() {
                Ok(address) => Some(address),
                Err(_) => {
                    return Err(invalid(
                        "http.address",
                        &http.address,
                        "an address and port such as 0.0.0.0:9658 or [::]:9658",
                    ));
                }
            },
        };

        let interface = raw
            .addresses
            .interface
            .unwrap_or_else(|| DEFAULT_INTERFACE.to_owned());
        if !is_interface_name(&interface) {
            return Err(invalid(
                "addresses.interface",
                &interface,
                "1-15 characters, none of them '/', ':' or whitespace",
            ));
        }
        let resync_interval = match raw.addresses.resync_interval {
            None => Duration::from_secs(30),
            Some(text) => match humantime::parse_duration(&text) {
                Ok(interval) if interval >= MIN_RESYNC => interval,
                _ => {
                    return Err(invalid(
                        "addresses.resyncInterval",
                        &text,
                        "a duration of 1s or more, such as 30s or 5m",
                    ));
                }
            },
        };

        let log_format = match raw.log.format.as_deref() {
            None => None,
            Some("human") => Some(LogFormat::Human),
            Some("json") => Some(LogFormat::Json),
            Some(other) => return Err(invalid("log.format", other, "human or json")),
        };

        let routing = raw
            .routing
            .map(RawRouting::validate)
            .transpose()
            .map_err(invalid_at)?;

        let dataplane = match raw.dataplane {
            None => None,
            Some(raw) => {
                for name in &raw.interfaces {
                    if !is_interface_name(name) {
                        return Err(invalid(
                            "dataplane.interfaces",
                            name,
                            "interface names: 1-15 characters, none of them '/', ':' or whitespace",
                        ));
                    }
                }
                let mode = match raw.mode.as_deref() {
                    None | Some("auto") => crate::dataplane::AttachMode::Auto,
                    Some("driver") => crate::dataplane::AttachMode::Driver,
                    Some("generic") => crate::dataplane::AttachMode::Generic,
                    Some(other) => {
                        return Err(invalid("dataplane.mode", other, "auto, driver or generic"));
                    }
                };
                Some(DataplaneConfig {
                    interfaces: raw.interfaces,
                    mode,
                    pin_root: raw.pin_root.unwrap_or_else(|| {
                        PathBuf::from(crate::dataplane::PinLayout::DEFAULT_ROOT)
                    }),
                })
            }
        };

        let neighbours = match raw.neighbours {
            None => None,
            Some(_) if dataplane.is_none() => {
                return Err(invalid(
                    "neighbours",
                    "without dataplane",
                    "a dataplane: section too: the answers come from its XDP program",
                ));
            }
            Some(raw) => Some(NeighboursConfig {
                members_file: raw
                    .members_file
                    .map(|file| base.join(file))
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_MEMBERS_FILE)),
            }),
        };

        Ok(Self {
            dataplane,
            neighbours,
            http_address,
            routing,
            node_name,
            node_labels,
            source,
            addresses: AddressesConfig {
                interface,
                resync_interval,
            },
            status_path: raw
                .status
                .path
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATUS_PATH)),
            log_format,
        })
    }
}

/// A Kubernetes qualified name with an optional prefix, as `loadBalancerClass` takes.
fn is_qualified_name(name: &str) -> bool {
    let (prefix, local) = name.rsplit_once('/').unwrap_or(("", name));
    let local_ok = (1..=63).contains(&local.len())
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && local.starts_with(|c: char| c.is_ascii_alphanumeric())
        && local.ends_with(|c: char| c.is_ascii_alphanumeric());
    local_ok && (prefix.is_empty() || (prefix.len() <= 253 && is_dns_label_ish(prefix)))
}

fn is_dns_label_ish(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/lbagent/lbagent.yaml"), None)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config =
            parse("node: {name: node-a}\nsource: {file: {path: services.yaml}}\n").unwrap();
        assert_eq!(config.node_name, "node-a");
        assert_eq!(
            config.source,
            Source::File {
                path: "/etc/lbagent/services.yaml".into()
            }
        );
        assert_eq!(config.addresses.interface, "kube-lb0");
        assert_eq!(config.addresses.resync_interval, Duration::from_secs(30));
        assert_eq!(config.status_path, Path::new(DEFAULT_STATUS_PATH));
        assert_eq!(config.log_format, None);
    }

    #[test]
    fn flag_overrides_node_name() {
        let config = Config::parse(
            "node: {name: from-file}\nsource: {file: {path: /s.yaml}}\n",
            Path::new("c.yaml"),
            Some("from-flag"),
        )
        .unwrap();
        assert_eq!(config.node_name, "from-flag");
    }

    #[test]
    fn invalid_values_name_field_value_and_what_is_allowed() {
        for (text, expected) in [
            (
                "source: {file: {path: s}}\naddresses: {interface: kube lb0}",
                r#"addresses.interface: "kube lb0" is not allowed (1-15 characters"#,
            ),
            (
                "source: {file: {path: s}}\naddresses: {interface: a-name-far-too-long}",
                r#"addresses.interface: "a-name-far-too-long""#,
            ),
            (
                "source: {file: {path: s}}\naddresses: {resyncInterval: 10ms}",
                r#"addresses.resyncInterval: "10ms" is not allowed (a duration of 1s or more"#,
            ),
            (
                "source: {file: {path: s}}\naddresses: {resyncInterval: soon}",
                r#"addresses.resyncInterval: "soon""#,
            ),
            (
                "source: {file: {path: s}}\nlog: {format: xml}",
                r#"log.format: "xml" is not allowed (human or json)"#,
            ),
            (
                "source: {file: {path: s}}\nnode: {name: Node_A}",
                r#"node.name: "Node_A" is not allowed"#,
            ),
            (
                "source: {}",
                r#"source: "{}" is not allowed (exactly one source: file or kubernetes)"#,
            ),
            (
                "source: {file: {path: s}, kubernetes: {}}",
                r#"source: "file and kubernetes" is not allowed"#,
            ),
            (
                "source: {kubernetes: {loadBalancerClass: \"a b\"}}",
                r#"source.kubernetes.loadBalancerClass: "a b" is not allowed"#,
            ),
            (
                "source: {file: {path: s}}\nhttp: {address: 9658}",
                r#"http.address: "9658" is not allowed (an address and port"#,
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(err.starts_with("/etc/lbagent/lbagent.yaml: "), "{err}");
        }
    }

    #[test]
    fn unknown_fields_are_named_with_the_allowed_ones() {
        let err = parse("source: {file: {path: s}}\naddresses: {resync: 5s}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `resync`"), "{err}");
        assert!(err.contains("resyncInterval"), "{err}");
    }

    #[test]
    fn routing_errors_name_the_field_path() {
        let err = parse("source: {file: {path: s}}\nrouting: {bgp: [{neighbor: 10.0.0.1, asn: 70000000000, localAsn: 1}]}")
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with(
                "routing.bgp[0].asn: 70000000000 is not allowed (an AS number, 1-4294967295)"
            ),
            "{err}"
        );
    }

    #[test]
    fn kubernetes_source_and_http_address() {
        let config = parse(
            "source: {kubernetes: {loadBalancerClass: purelb.io/purelb, kubeconfig: kc}}\n\
             http: {address: \"[::]:9658\"}",
        )
        .unwrap();
        assert_eq!(
            config.source,
            Source::Kubernetes(KubernetesSource {
                load_balancer_class: Some("purelb.io/purelb".into()),
                kubeconfig: Some("/etc/lbagent/kc".into()),
            })
        );
        assert_eq!(config.http_address, Some("[::]:9658".parse().unwrap()));
        assert!(is_qualified_name("lb"));
        assert!(!is_qualified_name("-lb"));
        assert!(!is_qualified_name("Example.com/lb"));
    }

    #[test]
    fn dataplane_settings_are_validated() {
        let config =
            parse("source: {file: {path: s}}\ndataplane: {interfaces: [eth0], mode: generic}")
                .unwrap();
        let dataplane = config.dataplane.unwrap();
        assert_eq!(dataplane.interfaces, ["eth0"]);
        assert_eq!(dataplane.mode, crate::dataplane::AttachMode::Generic);
        for (text, expected) in [
            (
                "dataplane: {interfaces: [\"eth 0\"]}",
                "dataplane.interfaces: \"eth 0\" is not allowed",
            ),
            (
                "dataplane: {interfaces: [eth0], mode: fast}",
                "dataplane.mode: \"fast\" is not allowed (auto, driver or generic)",
            ),
        ] {
            let err = parse(&format!("source: {{file: {{path: s}}}}\n{text}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn node_labels_are_label_shaped() {
        let config = parse(
            "node: {labels: {rack: a, topology.kubernetes.io/zone: z1}}\nsource: {file: {path: s}}",
        )
        .unwrap();
        assert_eq!(config.node_labels["rack"], "a");
        for (text, expected) in [
            (
                "node: {labels: {\"rack a\": x}}",
                "node.labels: \"rack a\" is not allowed",
            ),
            (
                "node: {labels: {rack: \"a/b\"}}",
                "node.labels.rack: \"a/b\" is not allowed",
            ),
        ] {
            let err = parse(&format!("{text}\nsource: {{file: {{path: s}}}}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{text}: {err}");
        }
    }

    #[test]
    fn neighbours_need_the_dataplane_and_default_their_member_list() {
        let config =
            parse("source: {file: {path: s}}\ndataplane: {interfaces: [eth0]}\nneighbours: {}\n")
                .unwrap();
        assert_eq!(
            config.neighbours.unwrap().members_file,
            PathBuf::from(DEFAULT_MEMBERS_FILE)
        );
        let config =
            parse("source: {file: {path: s}}\ndataplane: {}\nneighbours: {membersFile: m.json}\n")
                .unwrap();
        assert_eq!(
            config.neighbours.unwrap().members_file,
            PathBuf::from("/etc/lbagent/m.json")
        );
        assert!(
            parse("source: {file: {path: s}}\n")
                .unwrap()
                .neighbours
                .is_none()
        );
        let err = parse("source: {file: {path: s}}\nneighbours: {}\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("neighbours: \"without dataplane\" is not allowed"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_source_is_named() {
        let err = parse("node: {name: a}").unwrap_err().to_string();
        assert!(err.contains("missing field `source`"), "{err}");
    }
}
