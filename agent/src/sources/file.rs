//! The `file` source: a YAML list of services, followed with inotify.
//!
//! ```yaml
//! services:
//!   - name: web
//!     addresses: [203.0.113.10, 2001:db8:ff::10]
//!     ports:
//!       - {port: 80, protocol: TCP}     # TCP (default), UDP or SCTP
//!     sourceRanges: [198.51.100.0/24]   # optional; empty allows every source
//!     externalTrafficPolicy: Cluster    # optional; Cluster or Local
//!     bgp:                              # optional; what routing.serviceAttributes allows
//!       communities: ["64512:100"]
//!       largeCommunities: ["64512:1:2"]
//!       asPathPrepend: 2
//! ```
//!
//! An entry that fails validation is rejected with a reason naming the service and the value;
//! the others are still served. A file that does not parse at all changes nothing: the last
//! good state stays in force.
//!
//! The file is bounded before it is parsed: at most [`MAX_FILE_BYTES`], [`MAX_SERVICES`]
//! services, [`LIMITS`] of YAML nesting and nodes, and no anchors or aliases (nothing in the
//! format needs them, and expanding them is how a small file asks for gigabytes). It is
//! parsed on a blocking thread, so that even a big file never holds up healing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    ops::ControlFlow,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Deserializer, de::Error as _};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::{
    address,
    desired::{
        self, AttributePolicy, AttributeRequest, Desired, NodeLabels, PortSpec, Protocol, Rejected,
        Service, SourceUpdate, TrafficPolicy,
    },
    watch::FileEvent,
    yaml::{self, Limits},
};

/// The largest services file read: 100,000 services of a few addresses and ports each fit.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// The most services one file may list.
pub const MAX_SERVICES: usize = 100_000;
/// The services file's YAML: an entry's ports are five levels deep, and a service of two
/// addresses and two ports is fifteen nodes.
pub const LIMITS: Limits = Limits {
    depth: 16,
    nodes: 4_000_000,
    aliases: false,
};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
}

/// The file with each entry as `E`: straight into [`RawService`] first, and through
/// `serde_json::Value` when that fails, so that one bad entry is rejected on its own.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[serde(bound = "E: Deserialize<'de>")]
struct RawFile<E> {
    #[serde(deserialize_with = "at_most_max_services")]
    services: Vec<E>,
}

/// The entries, refused as soon as there are more than [`MAX_SERVICES`].
fn at_most_max_services<'de, D: Deserializer<'de>, E: Deserialize<'de>>(
    deserializer: D,
) -> Result<Vec<E>, D::Error> {
    struct Entries<E>(std::marker::PhantomData<E>);
    impl<'de, E: Deserialize<'de>> serde::de::Visitor<'de> for Entries<E> {
        type Value = Vec<E>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of services")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::new();
            while let Some(entry) = seq.next_element()? {
                if entries.len() == MAX_SERVICES {
                    return Err(A::Error::custom(format!(
                        "services: more than the limit of {MAX_SERVICES} services"
                    )));
                }
                entries.push(entry);
            }
            Ok(entries)
        }
    }
    deserializer.deserialize_seq(Entries(std::marker::PhantomData))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawService {
    name: Text,
    #[serde(default)]
    addresses: Vec<Text>,
    #[serde(default)]
    ports: Vec<RawPort>,
    #[serde(default)]
    source_ranges: Vec<Text>,
    external_traffic_policy: Option<Text>,
    bgp: Option<RawBgpAttributes>,
}

/// A string, as `serde_json::Value` would have it: read straight from YAML, a plain `80` or
/// `true` would be taken as text, and the direct path must accept no entry that the path
/// through `Value` rejects.
#[derive(Clone, Default, PartialEq, Eq)]
struct Text(String);

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::ops::Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Text;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }

            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(v))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// An integer, as `serde_json::Value` would have it (a quoted `"80"` is text).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Integer(i64);

impl<'de> Deserialize<'de> for Integer {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Integer;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an integer")
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Integer, E> {
                Ok(Integer(v))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Integer, E> {
                i64::try_from(v)
                    .map(Integer)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// As written: the routing section's allow-list decides what is kept.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawBgpAttributes {
    #[serde(default)]
    communities: Vec<serde_json::Value>,
    #[serde(default)]
    large_communities: Vec<serde_json::Value>,
    as_path_prepend: Option<serde_json::Value>,
}

/// A scalar as text (`2` and `"2"` alike), anything else as its JSON.
fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    port: Integer,
    protocol: Option<Text>,
}

/// Parses a services file. `Err` only when the file as a whole is unusable.
pub fn parse(text: &str, path: &Path) -> Result<SourceUpdate, FileError> {
    let parse_error = |reason: String| FileError::Parse {
        path: path.to_owned(),
        reason,
    };
    if text.trim().is_empty() {
        // A half-written file must not withdraw every address.
        return Err(parse_error(
            "the file is empty (write `services: []` for no services)".to_owned(),
        ));
    }
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(parse_error(format!(
            "the file is {} bytes, over the limit of {MAX_FILE_BYTES} bytes",
            text.len()
        )));
    }
    // Most files have every entry well formed: read them straight into `RawService`. When
    // one is not, read the file again with each entry as a `serde_json::Value`, so that the
    // error names that entry and the others are still served. (YAML parsing is most of the
    // time either way; the detour through `Value` adds about a tenth.)
    let entries: Vec<(String, Result<RawService, String>)> =
        match yaml::from_str::<RawFile<RawService>>(text, LIMITS) {
            Ok(raw) => raw
                .services
                .into_iter()
                .map(|service| (service.name.0.clone(), Ok(service)))
                .collect(),
            Err(_) => {
                let raw: RawFile<serde_json::Value> =
                    yaml::from_str(text, LIMITS).map_err(|err| parse_error(err.to_string()))?;
                raw.services
                    .into_iter()
                    .enumerate()
                    .map(|(index, value)| {
                        let fallback_name = value
                            .get("name")
                            .and_then(serde_json::Value::as_str)
                            .map_or_else(|| format!("services[{index}]"), str::to_owned);
                        let result = serde_json::from_value::<RawService>(value)
                            .map_err(|err| format!("services[{index}]: {err}"));
                        (fallback_name, result)
                    })
                    .collect()
            }
        };

    let mut services = Vec::new();
    let mut rejected = Vec::new();
    let mut attribute_requests = BTreeMap::new();
    let mut names = BTreeSet::new();
    for (index, (fallback_name, raw)) in entries.into_iter().enumerate() {
        let result = raw.and_then(|raw| validate(raw, index));
        match result {
            Ok((service, _)) if !names.insert(service.name.clone()) => rejected.push(Rejected {
                service: service.name.clone(),
                reason: format!(
                    "services[{index}]: name {:?} is used by an earlier entry",
                    service.name
                ),
            }),
            Ok((service, request)) => {
                if request != AttributeRequest::default() {
                    attribute_requests.insert(service.name.clone(), request);
                }
                services.push(service);
            }
            Err(reason) => rejected.push(Rejected {
                service: fallback_name,
                reason,
            }),
        }
    }
    Ok(SourceUpdate {
        desired: Desired::from_services(&services),
        rejected,
        attribute_requests,
        refused_attributes: Vec::new(),
    })
}

fn validate(raw: RawService, index: usize) -> Result<(Service, AttributeRequest), String> {
    let name = raw.name.0;
    let at = |field: &str| format!("services[{index}] {name:?}: {field}");
    if name.trim().is_empty() || name.chars().any(char::is_control) {
        return Err(format!(
            "services[{index}]: name {name:?} must be a non-empty printable name"
        ));
    }
    let mut addresses: Vec<IpAddr> = Vec::new();
    for (i, text) in raw.addresses.iter().enumerate() {
        let address = address::parse_host(text)
            .map_err(|err| format!("{}: {err}", at(&format!("addresses[{i}]"))))?;
        if !addresses.contains(&address) {
            addresses.push(address);
        }
    }
    let mut ports = Vec::new();
    for (i, port) in raw.ports.iter().enumerate() {
        let field = at(&format!("ports[{i}]"));
        let number = desired::port_number(port.port.0)
            .ok_or_else(|| format!("{field}: port {} is not allowed (1-65535)", port.port.0))?;
        let protocol = Protocol::parse(port.protocol.as_deref()).ok_or_else(|| {
            format!(
                "{field}: protocol {:?} is not allowed (TCP, UDP or SCTP)",
                port.protocol.as_deref().unwrap_or_default()
            )
        })?;
        ports.push(PortSpec {
            port: number,
            protocol,
        });
    }
    let mut source_ranges = Vec::new();
    for (i, text) in raw.source_ranges.iter().enumerate() {
        let range = desired::source_range(text).ok_or_else(|| {
            format!(
                "{}: {text:?} is not a CIDR range such as 10.0.0.0/8",
                at(&format!("sourceRanges[{i}]"))
            )
        })?;
        source_ranges.push(range);
    }
    let traffic_policy = match raw.external_traffic_policy.as_deref() {
        None | Some("Cluster") => TrafficPolicy::Cluster,
        Some("Local") => TrafficPolicy::Local,
        Some(other) => {
            return Err(format!(
                "{}: {other:?} is not allowed (Cluster or Local)",
                at("externalTrafficPolicy")
            ));
        }
    };
    let mut request = AttributeRequest::default();
    if let Some(bgp) = &raw.bgp {
        let field = |f: &str| format!("services[{index}] {name:?}: bgp.{f}");
        for (i, value) in bgp.communities.iter().enumerate() {
            request
                .communities
                .push((field(&format!("communities[{i}]")), text(value)));
        }
        for (i, value) in bgp.large_communities.iter().enumerate() {
            request
                .large_communities
                .push((field(&format!("largeCommunities[{i}]")), text(value)));
        }
        request.prepend = bgp
            .as_path_prepend
            .as_ref()
            .map(|value| (field("asPathPrepend"), text(value)));
    }
    Ok((
        Service {
            name,
            addresses,
            ports,
            source_ranges,
            traffic_policy,
        },
        request,
    ))
}

/// Publishes the file's services, then follows every change to it, and re-reads it whenever
/// `reread` changes (SIGHUP), until the receiver goes.
pub async fn watch(
    path: PathBuf,
    updates: watch::Sender<Option<SourceUpdate>>,
    reread: watch::Receiver<u64>,
) -> Result<(), crate::watch::WatchError> {
    // The latest text not parsed yet: a file rewritten while a parse runs is parsed once more,
    // at its newest.
    let (texts_tx, mut texts) = watch::channel::<Option<Arc<str>>>(None);
    let following = crate::watch::follow(&path, MAX_FILE_BYTES, reread, |event| {
        match event {
            FileEvent::Changed(text) => {
                debug!(bytes = text.len(), "services file changed");
                texts_tx.send_replace(Some(text.into()));
            }
            FileEvent::Unreadable(err) => {
                error!(path = %path.display(), %err, "cannot read the services file; keeping the last good state");
            }
        }
        if updates.is_closed() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    let parsing = async {
        while texts.changed().await.is_ok() {
            let Some(text) = texts.borrow_and_update().clone() else {
                continue;
            };
            let file = path.clone();
            let started = std::time::Instant::now();
            match tokio::task::spawn_blocking(move || parse(&text, &file)).await {
                Ok(Ok(update)) => {
                    debug!(
                        parse_ms = started.elapsed().as_secs_f64() * 1e3,
                        "services file parsed"
                    );
                    for rejected in &update.rejected {
                        warn!(service = %rejected.service, reason = %rejected.reason, "service rejected");
                    }
                    info!(
                        path = %path.display(),
                        addresses = update.desired.addresses.len(),
                        rejected = update.rejected.len(),
                        "services file loaded"
                    );
                    updates.send_replace(Some(update));
                }
                Ok(Err(err)) => error!("{err}; keeping the last good state"),
                Err(err) => {
                    error!(%err, "parsing the services file failed; keeping the last good state")
                }
            }
        }
    };
    tokio::select! {
        result = following => result,
        () = parsing => Ok(()),
    }
}

/// Puts the node's labels (the config's `node.labels`, followed as the config changes) into
/// each update the services file gives, and the Services' BGP attributes that the routing
/// section's allow-list admits, until either side is gone.
pub async fn with_node_labels(
    mut services: watch::Receiver<Option<SourceUpdate>>,
    mut labels: watch::Receiver<NodeLabels>,
    mut policy: watch::Receiver<AttributePolicy>,
    updates: watch::Sender<Option<SourceUpdate>>,
) {
    let mut refused = Vec::new();
    loop {
        let combined = services.borrow_and_update().clone().map(|mut update| {
            update.desired.node_labels = labels.borrow_and_update().clone();
            policy.borrow_and_update().apply(&mut update);
            update
        });
        if let Some(update) = &combined {
            for refusal in &update.refused_attributes {
                if !refused.contains(refusal) {
                    warn!(service = %refusal.service, reason = %refusal.reason, "BGP attribute refused");
                }
            }
            refused.clone_from(&update.refused_attributes);
        }
        if combined.is_some() {
            updates.send_if_modified(|current| {
                let changed = *current != combined;
                if changed {
                    current.clone_from(&combined);
                }
                changed
            });
        }
        tokio::select! {
            changed = services.changed() => if changed.is_err() { return },
            changed = labels.changed() => if changed.is_err() { return },
            changed = policy.changed() => if changed.is_err() { return },
            () = updates.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn parse_ok(text: &str) -> SourceUpdate {
        parse(text, Path::new("services.yaml")).unwrap()
    }

    #[test]
    fn a_full_entry_parses() {
        let update = parse_ok(
            "services:\n- name: web\n  addresses: [203.0.113.10, 2001:db8::10/128]\n  ports: [{port: 80}, {port: 53, protocol: udp}]\n  sourceRanges: [198.51.100.7/24, 10.1.2.3]\n  externalTrafficPolicy: Local\n",
        );
        assert!(update.rejected.is_empty(), "{:?}", update.rejected);
        let web = &update.desired.addresses[&"203.0.113.10".parse().unwrap()]
            .get("web")
            .unwrap();
        assert_eq!(
            web.ports
                .iter()
                .map(|p| (p.port, p.protocol))
                .collect::<Vec<_>>(),
            [(53, Protocol::Udp), (80, Protocol::Tcp)]
        );
        assert_eq!(
            web.source_ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.1.2.3/32", "198.51.100.0/24"]
        );
        assert_eq!(web.traffic_policy, TrafficPolicy::Local);
        assert_eq!(update.desired.addresses.len(), 2);
    }

    #[test]
    fn a_bad_entry_is_rejected_naming_service_and_value_and_the_rest_is_served() {
        let update = parse_ok(
            "services:
- {name: good, addresses: [203.0.113.10]}
- {name: bad-address, addresses: [203.0.113.300]}
- {name: network, addresses: [203.0.113.0/24]}
- {name: good, addresses: [203.0.113.11]}
- {name: bad-port, addresses: [203.0.113.12], ports: [{port: 70000}]}
- {name: bad-proto, addresses: [203.0.113.13], ports: [{port: 80, protocol: ICMP}]}
- {name: bad-range, addresses: [203.0.113.14], sourceRanges: [10.0.0.0/33]}
- {name: bad-policy, addresses: [203.0.113.15], externalTrafficPolicy: Nearest}
- {name: typo, adresses: [203.0.113.16]}
- {addresses: [203.0.113.17]}
- {name: also-good, addresses: [203.0.113.18]}
",
        );
        assert_eq!(
            update
                .desired
                .addresses
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["203.0.113.10", "203.0.113.18"]
        );
        let reasons: Vec<(&str, &str)> = update
            .rejected
            .iter()
            .map(|r| (r.service.as_str(), r.reason.as_str()))
            .collect();
        let expect = [
            (
                "bad-address",
                "\"203.0.113.300\": not an IPv4 or IPv6 address",
            ),
            (
                "network",
                "\"203.0.113.0/24\": a load-balancer address is a single host",
            ),
            ("good", "name \"good\" is used by an earlier entry"),
            ("bad-port", "port 70000 is not allowed (1-65535)"),
            (
                "bad-proto",
                "protocol \"ICMP\" is not allowed (TCP, UDP or SCTP)",
            ),
            ("bad-range", "\"10.0.0.0/33\" is not a CIDR range"),
            (
                "bad-policy",
                "\"Nearest\" is not allowed (Cluster or Local)",
            ),
            ("typo", "unknown field `adresses`"),
            ("services[9]", "missing field `name`"),
        ];
        assert_eq!(reasons.len(), expect.len(), "{reasons:#?}");
        for ((service, reason), (want_service, want_reason)) in reasons.iter().zip(expect) {
            assert_eq!(*service, want_service);
            assert!(reason.contains(want_reason), "{service}: {reason}");
        }
        assert!(
            update.rejected[0]
                .reason
                .starts_with("services[1] \"bad-address\": addresses[0]: ")
        );
    }

    /// An entry read straight into `RawService` and one read through `serde_json::Value`,
    /// validated; `None` when the direct read fails (`parse` then takes the other path).
    type Validated = Result<(Service, AttributeRequest), String>;

    fn both_paths(entry: &str) -> (Option<Validated>, Validated) {
        let text = format!("services:\n- {entry}\n");
        let direct = yaml::from_str::<RawFile<RawService>>(&text, LIMITS)
            .ok()
            .map(|file| validate(file.services.into_iter().next().unwrap(), 0));
        let through_value = yaml::from_str::<RawFile<serde_json::Value>>(&text, LIMITS)
            .map_err(|err| err.to_string())
            .and_then(|file| {
                serde_json::from_value::<RawService>(file.services.into_iter().next().unwrap())
                    .map_err(|err| err.to_string())
            })
            .and_then(|raw| validate(raw, 0));
        (direct, through_value)
    }

    #[test]
    fn the_direct_read_accepts_only_what_the_read_through_value_accepts() {
        let accepted = [
            "{name: web, addresses: [203.0.113.1, \"2001:db8::1\"], ports: [{port: 80, protocol: UDP}, {port: 443}], sourceRanges: [10.0.0.0/8], externalTrafficPolicy: Local, bgp: {communities: [\"64512:1\", 64512], largeCommunities: [\"1:2:3\"], asPathPrepend: 2}}",
            "{name: \"123\", addresses: [], ports: [], bgp: {asPathPrepend: ~}}",
            "{name: a, externalTrafficPolicy: ~, bgp: ~, ports: [{port: 80, protocol: ~}]}",
            "{name: !!str 123}",
            "{name: a, ports: [{port: 0x50}]}",
        ];
        let refused_by_value = [
            "{name: 123}",
            "{name: true}",
            "{name: yes}",
            "{name: ~}",
            "{name: 1.5}",
            "{name: .inf}",
            "{name: [a]}",
            "{name: a, addresses: ~}",
            "{name: a, addresses: }",
            "{name: a, addresses: [~]}",
            "{name: a, addresses: [1]}",
            "{name: a, addresses: 203.0.113.1}",
            "{name: a, ports: [{port: \"80\"}]}",
            "{name: a, ports: [{port: 80.0}]}",
            "{name: a, ports: [{port: 99999999999999999999}]}",
            "{name: a, ports: [{port: -1}]}",
            "{name: a, ports: [{port: 80, protocol: 6}]}",
            "{name: a, ports: ~}",
            "{name: a, ports: [80]}",
            "{name: a, sourceRanges: [10.0.0.0/8, 8]}",
            "{name: a, externalTrafficPolicy: 1}",
            "{name: a, externalTrafficPolicy: true}",
            "{name: a, bgp: {communities: ~}}",
            "{name: a, bgp: 5}",
            "{name: a, unknown: 1}",
            "{name: a, name: b}",
            "a",
            "~",
            "[a]",
        ];
        for entry in accepted {
            let (direct, through_value) = both_paths(entry);
            assert!(through_value.is_ok(), "{entry}: {through_value:?}");
            assert_eq!(direct, Some(through_value), "{entry}");
        }
        for entry in refused_by_value {
            let (direct, through_value) = both_paths(entry);
            assert!(through_value.is_err(), "{entry}: {through_value:?}");
            // Refused directly, or (when only validation refuses it) for the same reason.
            if let Some(direct) = direct {
                assert_eq!(direct, through_value, "{entry}");
            }
        }
    }

    #[test]
    fn an_unparseable_or_empty_file_is_an_error() {
        for text in ["", "  \n", "services: [", "services: 5", "servics: []"] {
            assert!(parse(text, Path::new("s.yaml")).is_err(), "{text:?}");
        }
        assert!(parse_ok("services: []").desired.addresses.is_empty());
    }

    #[test]
    fn a_file_over_a_limit_is_an_error_naming_the_limit() {
        let err = |text: &str| parse(text, Path::new("s.yaml")).unwrap_err().to_string();
        let many = format!("services:\n{}", "- {}\n".repeat(MAX_SERVICES + 1));
        assert!(
            err(&many).contains("more than the limit of 100000 services"),
            "{}",
            err(&many)
        );
        let aliased = "services:\n- &a {name: a, addresses: [203.0.113.1]}\n- *a\n";
        assert!(
            err(aliased).contains("anchors and aliases (&name, *name) are not allowed"),
            "{}",
            err(aliased)
        );
        let deep = format!("services:\n- {}", "[".repeat(1_000));
        assert!(
            err(&deep).contains("nested deeper than the limit of 16 levels"),
            "{}",
            err(&deep)
        );
        let big = format!("services: []\n{}", "#".repeat(MAX_FILE_BYTES as usize));
        assert!(
            err(&big).contains("over the limit of 16777216 bytes"),
            "{}",
            err(&big)
        );
    }

    #[tokio::test]
    async fn follows_a_configmap_style_symlink_swap() {
        let dir = std::env::temp_dir().join(format!("lbagent-file-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("..v1")).unwrap();
        std::fs::create_dir_all(dir.join("..v2")).unwrap();
        std::fs::write(
            dir.join("..v1/services.yaml"),
            "services: [{name: a, addresses: [203.0.113.1]}]",
        )
        .unwrap();
        std::fs::write(
            dir.join("..v2/services.yaml"),
            "services: [{name: b, addresses: [203.0.113.2]}]",
        )
        .unwrap();
        std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/services.yaml", dir.join("services.yaml")).unwrap();

        let (tx, mut rx) = watch::channel(None);
        let (_reread_tx, reread) = watch::channel(0);
        let task = tokio::spawn(watch(dir.join("services.yaml"), tx, reread));
        let addresses = |rx: &watch::Receiver<Option<SourceUpdate>>| {
            rx.borrow().as_ref().map(|u| {
                u.desired
                    .addresses
                    .keys()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            })
        };
        tokio::time::timeout(Duration::from_secs(2), rx.wait_for(Option::is_some))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(addresses(&rx), Some(vec!["203.0.113.1".to_owned()]));

        // What the kubelet does: a new ..data symlink renamed over the old one.
        std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        let started = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(2), rx.changed())
            .await
            .unwrap()
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(addresses(&rx), Some(vec!["203.0.113.2".to_owned()]));

        // A broken file keeps the last good state.
        std::fs::write(dir.join("..v2/services.yaml"), "services: [").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(addresses(&rx), Some(vec!["203.0.113.2".to_owned()]));

        drop(rx);
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
