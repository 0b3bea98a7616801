//! With `--kubernetes`, the Node objects say two things the membership needs: where the
//! other members are (each Node's InternalIP of the bind address's family, at the same port:
//! the seeds to join through) and which nodes carry the exclusion label (they stay members,
//! but no local address is elected onto them). One list and one watch of the Nodes per node;
//! nothing is written to the API server.
//!
//! The API server being unreachable changes nothing here: the last facts stay in force, and
//! SWIM keeps detecting failures without it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::sources::kubernetes::{ApiAccess, translate::EXCLUDE_LABEL};

/// The calls `lbagent membership --kubernetes` makes; the DaemonSet's ClusterRole grants
/// them (they are among the agent's own, `crate::sources::kubernetes::API_ACCESS`).
pub const API_ACCESS: &[ApiAccess] = &[ApiAccess {
    group: "",
    resource: "nodes",
    verbs: &["list", "watch"],
}];

/// What the Node objects say, once they have been listed completely.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// The other nodes' membership addresses.
    pub seeds: Vec<SocketAddr>,
    /// Nodes with the exclusion label.
    pub excluded: BTreeSet<String>,
}

/// The facts from `nodes`: `this` node is left out of the seeds; a node without an
/// InternalIP of the family of `port`'s address has none.
pub fn facts<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    this: &str,
    bind: SocketAddr,
) -> NodeFacts {
    let mut facts = NodeFacts::default();
    for node in nodes {
        let Some(name) = node.metadata.name.as_deref() else {
            continue;
        };
        if node
            .metadata
            .labels
            .as_ref()
            .is_some_and(|labels| labels.contains_key(EXCLUDE_LABEL))
        {
            facts.excluded.insert(name.to_owned());
        }
        if name == this {
            continue;
        }
        let address = node
            .status
            .as_ref()
            .and_then(|status| status.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
            .find(|ip| ip.is_ipv4() == bind.is_ipv4());
        if let Some(ip) = address {
            facts.seeds.push(SocketAddr::new(ip, bind.port()));
        }
    }
    facts.seeds.sort();
    facts
}

/// Follows the Node objects and publishes their facts until `facts` has no receiver.
pub async fn follow(
    client: Client,
    this: String,
    bind: SocketAddr,
    published: watch::Sender<Option<NodeFacts>>,
) {
    let mut events = watcher(Api::<Node>::all(client), watcher::Config::default())
        .default_backoff()
        .boxed();
    // The objects of the list in progress, then of the last complete one with later changes.
    let mut listing: BTreeMap<String, Node> = BTreeMap::new();
    let mut nodes: Option<BTreeMap<String, Node>> = None;
    let mut failing = false;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            () = published.closed() => return,
        };
        let changed = match event {
            None => return,
            Some(Err(err)) => {
                if !failing {
                    warn!(%err, "membership: Kubernetes watch of the Nodes failed; keeping the last ones and retrying");
                }
                failing = true;
                continue;
            }
            Some(Ok(event)) => {
                failing = false;
                let key = |node: &Node| node.metadata.name.clone().unwrap_or_default();
                match event {
                    watcher::Event::Init => {
                        listing.clear();
                        false
                    }
                    watcher::Event::InitApply(node) => {
                        listing.insert(key(&node), node);
                        false
                    }
                    watcher::Event::InitDone => {
                        nodes = Some(std::mem::take(&mut listing));
                        true
                    }
                    watcher::Event::Apply(node) => {
                        nodes.get_or_insert_default().insert(key(&node), node);
                        true
                    }
                    watcher::Event::Delete(node) => {
                        nodes.get_or_insert_default().remove(&key(&node));
                        true
                    }
                }
            }
        };
        if let (true, Some(nodes)) = (changed, &nodes) {
            let next = facts(nodes.values(), &this, bind);
            published.send_if_modified(|current| {
                if current.as_ref() == Some(&next) {
                    return false;
                }
                info!(
                    seeds = ?next.seeds,
                    excluded = ?next.excluded,
                    "membership: the Nodes changed"
                );
                *current = Some(next);
                true
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node(name: &str, addresses: &[(&str, &str)], excluded: bool) -> Node {
        let labels = if excluded {
            json!({EXCLUDE_LABEL: ""})
        } else {
            json!({})
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "status": {"addresses": addresses
                .iter()
                .map(|(kind, address)| json!({"type": kind, "address": address}))
                .collect::<Vec<_>>()},
        }))
        .unwrap()
    }

    #[test]
    fn seeds_are_the_other_nodes_internal_addresses_of_the_bind_family() {
        let nodes = [
            node("a", &[("InternalIP", "10.0.0.1")], false),
            node(
                "b",
                &[
                    ("Hostname", "b"),
                    ("InternalIP", "fd00::2"),
                    ("InternalIP", "10.0.0.2"),
                ],
                true,
            ),
            node("c", &[("ExternalIP", "198.51.100.3")], false),
            node("d", &[("InternalIP", "fd00::4")], false),
        ];
        let facts4 = facts(&nodes, "a", "10.0.0.1:7946".parse().unwrap());
        assert_eq!(facts4.seeds, ["10.0.0.2:7946".parse().unwrap()]);
        assert_eq!(facts4.excluded, BTreeSet::from(["b".to_owned()]));
        let facts6 = facts(&nodes, "a", "[fd00::1]:7000".parse().unwrap());
        assert_eq!(
            facts6.seeds,
            [
                "[fd00::2]:7000".parse().unwrap(),
                "[fd00::4]:7000".parse().unwrap()
            ]
        );
        // This node's own label counts too: the others must leave it out of elections.
        let own = facts(&nodes, "b", "10.0.0.2:7946".parse().unwrap());
        assert_eq!(own.excluded, BTreeSet::from(["b".to_owned()]));
        assert_eq!(own.seeds, ["10.0.0.1:7946".parse().unwrap()]);
    }
}
