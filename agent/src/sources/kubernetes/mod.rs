//! The `kubernetes` source: Services of type LoadBalancer, their EndpointSlices and this node's
//! Node, through kube-rs watchers, translated into the desired state by [`translate`].
//!
//! Nothing is published until all three have been listed completely, and a relist (after a
//! 410 Gone or a reconnect) replaces a cache only once it is complete: a partial view must never
//! withdraw an address. While the API server is unreachable the last state stays in force and
//! the watchers reconnect with backoff.
//!
//! The source also records Events on Services: `Announced` once the reconciler holds their
//! addresses, `NotAnnounced` with the reason when it cannot, and `Withdrawn`. For a local
//! address answered through ARP/NDP (the neighbours sink), the node that takes it records
//! `LocalAddressOwner` naming itself and the candidates after it.

pub mod events;
pub mod translate;

use std::{
    collections::{BTreeMap, BTreeSet},
    hash::Hash,
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
};

use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        events::{Event, EventType, Reporter},
        reflector::{ObjectRef, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tracing::{error, info, warn};

use self::{
    events::{EventQueue, Replace},
    translate::{Selection, Translation},
};
use crate::desired::{
    AddressState, AddressStatus, AttributePolicy, NeighbourOutcome, Rejected, SourceUpdate,
};

/// One kind of call lbagent makes to the API server; the deployment's ClusterRole grants
/// exactly these (a test checks it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiAccess {
    /// `""` is the core group.
    pub group: &'static str,
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess {
        group: "",
        resource: "services",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "discovery.k8s.io",
        resource: "endpointslices",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "",
        resource: "nodes",
        verbs: &["list", "watch"],
    },
    // kube's Recorder creates an Event, and patches it into a series when it repeats one.
    ApiAccess {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
    },
];

/// The name lbagent reports Events under.
const CONTROLLER: &str = "lbagent";

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("cannot use the kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("cannot find a Kubernetes configuration (no kubeconfig, not in a cluster): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("cannot create the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
    #[error(
        "{count} LoadBalancer Services, over the limit of {MAX_LOAD_BALANCERS}: keeping the last \
         state until there are fewer"
    )]
    TooManyLoadBalancers { count: usize },
    #[error(
        "more than {count} LoadBalancer Services, over the limit of {MAX_LOAD_BALANCERS}: \
         keeping the last state until there are fewer, counting no more of them"
    )]
    TooManyLoadBalancersToCount { count: usize },
}

/// The most LoadBalancer Services lbagent takes in, as the services file's limit.
pub const MAX_LOAD_BALANCERS: usize = crate::sources::file::MAX_SERVICES;
/// Of the LoadBalancer Services past [`MAX_LOAD_BALANCERS`] only a hash of the key is kept, to
/// count them, and of at most this many: the watcher's memory is bounded however many exist.
const MAX_COUNTED_BEYOND: usize = MAX_LOAD_BALANCERS;

/// The `source.kubernetes` section of lbagent's config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubernetesSource {
    /// Serve only Services of this `spec.loadBalancerClass`; `None`: only those without one,
    /// as the cluster's default load-balancer implementation does.
    pub load_balancer_class: Option<String>,
    /// `None`: `$KUBECONFIG`, `~/.kube/config`, then the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
}

pub async fn client(config: &KubernetesSource) -> Result<Client, KubernetesError> {
    let config = match &config.kubeconfig {
        Some(path) => {
            let invalid = |source| KubernetesError::Kubeconfig {
                path: path.clone(),
                source,
            };
            let kubeconfig = Kubeconfig::read_from(path).map_err(invalid)?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(invalid)?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Follows the cluster and publishes the desired state until `updates` has no receiver.
/// `outcomes` is what became of each address after the reconciler's last pass, for the Events.
pub async fn watch(
    config: KubernetesSource,
    node_name: String,
    updates: watch::Sender<Option<SourceUpdate>>,
    mut outcomes: watch::Receiver<Option<Vec<AddressStatus>>>,
    mut policy: watch::Receiver<AttributePolicy>,
) -> Result<(), KubernetesError> {
    let client = client(&config).await?;
    let selection = Selection {
        node_name: node_name.clone(),
        load_balancer_class: config.load_balancer_class.clone(),
    };
    info!(
        node = %node_name,
        class = selection.load_balancer_class.as_deref().unwrap_or("(none)"),
        "watching Services, EndpointSlices and this node's Node"
    );
    let mut watched = watch_all(&client, &node_name);
    let relist_client = client.clone();
    // None is dropped: a Service's Events wait beside each other, and only one that says
    // exactly the same as a waiting one takes its place.
    let events = EventQueue::start(
        client,
        Reporter {
            controller: CONTROLLER.into(),
            instance: Some(node_name.clone()),
        },
        Replace::SameNote,
    );
    let mut cluster = Cluster::default();
    let mut announcer = Announcer::new(node_name, events);
    let mut failing = false;
    loop {
        tokio::select! {
            next = watched.next() => match next {
                None => return Ok(()),
                Some(Err(err)) => {
                    // The backoff paces these; the last state stays in force meanwhile.
                    warn!(%err, "Kubernetes watch failed; keeping the last state and retrying");
                    failing = true;
                }
                Some(Ok(event)) => {
                    if failing {
                        info!("Kubernetes watch is back");
                        failing = false;
                    }
                    if cluster.apply(event)
                        && let Some(translation) = cluster.translate(&selection, &policy.borrow())
                    {
                        announcer.source_changed(&cluster, &translation);
                        publish(&updates, translation.update);
                    }
                    if cluster.services.needs_relist() {
                        info!(
                            "LoadBalancer Services may be within the limit again; listing them \
                             again for those not kept"
                        );
                        cluster.services.relisting();
                        watched = watch_all(&relist_client, &selection.node_name);
                    }
                }
            },
            changed = policy.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let translation = cluster.translate(&selection, &policy.borrow_and_update());
                if let Some(translation) = translation {
                    announcer.source_changed(&cluster, &translation);
                    publish(&updates, translation.update);
                }
            }
            changed = outcomes.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let outcomes = outcomes.borrow_and_update().clone();
                if let Some(outcomes) = outcomes {
                    announcer.applied(&cluster, &outcomes);
                }
            }
            () = updates.closed() => return Ok(()),
        }
    }
}

fn publish(updates: &watch::Sender<Option<SourceUpdate>>, update: SourceUpdate) {
    updates.send_if_modified(|current| {
        if current.as_ref() == Some(&update) {
            return false;
        }
        info!(
            addresses = update.desired.addresses.len(),
            rejected = update.rejected.len(),
            "Kubernetes state changed"
        );
        *current = Some(update);
        true
    });
}

/// One event of one of the three watchers.
enum Watched {
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Node(Box<watcher::Event<Node>>),
}

fn watch_all(
    client: &Client,
    node_name: &str,
) -> BoxStream<'static, Result<Watched, watcher::Error>> {
    futures::stream::select_all([
        watch_kind(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            Watched::Service,
        ),
        // Only slices that belong to a Service matter for `externalTrafficPolicy: Local`.
        watch_kind(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(translate::SERVICE_NAME_LABEL),
            Watched::Slice,
        ),
        watch_kind(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().fields(&format!("metadata.name={node_name}")),
            Watched::Node,
        ),
    ])
    .boxed()
}

/// A watcher of `api` that reconnects with kube-runtime's default backoff, its events wrapped
/// by `wrap` so that watchers of several kinds merge into one stream (the allocator's too).
pub fn watch_kind<K, V>(
    api: Api<K>,
    config: watcher::Config,
    wrap: fn(Box<watcher::Event<K>>) -> V,
) -> BoxStream<'static, Result<V, watcher::Error>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    V: Send + 'static,
{
    watcher(api, config)
        .default_backoff()
        .map(move |event| event.map(|event| wrap(Box::new(event))))
        .boxed()
}

/// One resource's objects, in kube-runtime's reflector store. Its writer already does what a
/// partial view needs: a relist fills a buffer beside the store and replaces it only at
/// `InitDone`, so a list that breaks off half way withdraws nothing. On top, `listed` says
/// whether a first list has completed: lbagent translates only once all three have one.
///
/// A bounded cache keeps at most `limit` objects (and as many more in a relist's buffer);
/// of those past it, only a hash of the key, to count them (at most [`MAX_COUNTED_BEYOND`]).
struct Cache<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    writer: Writer<K>,
    store: Store<K>,
    listed: bool,
    limit: usize,
    beyond: Beyond,
    /// While a list is under way: how many objects it gave the writer, and those past them.
    relist: Option<(usize, Beyond)>,
    hasher: std::collections::hash_map::RandomState,
}

/// The objects past a cache's limit, not kept: hashes of their keys.
#[derive(Default)]
struct Beyond {
    keys: std::collections::HashSet<u64>,
    /// More than [`MAX_COUNTED_BEYOND`] were past the limit: some are not counted.
    uncounted: bool,
}

impl Beyond {
    fn insert(&mut self, key: u64) -> bool {
        if self.keys.len() < MAX_COUNTED_BEYOND {
            self.keys.insert(key)
        } else {
            let first = !self.uncounted;
            self.uncounted = true;
            first
        }
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty() && !self.uncounted
    }
}

impl<K> Default for Cache<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    fn default() -> Self {
        Self::bounded(usize::MAX)
    }
}

impl<K> Cache<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone + Default,
{
    fn bounded(limit: usize) -> Self {
        let writer = Writer::default();
        let store = writer.as_reader();
        Self {
            writer,
            store,
            listed: false,
            limit,
            beyond: Beyond::default(),
            relist: None,
            hasher: Default::default(),
        }
    }

    fn key(&self, object: &K) -> u64 {
        use std::hash::BuildHasher as _;
        self.hasher.hash_one(ObjectRef::from_obj(object))
    }

    /// Whether the objects in force, or how many there are, changed.
    fn apply(&mut self, event: watcher::Event<K>) -> bool {
        let changed = match &event {
            watcher::Event::Init => {
                self.relist = Some((0, Beyond::default()));
                false
            }
            watcher::Event::InitApply(object) => {
                let key = self.key(object);
                match &mut self.relist {
                    Some((kept, beyond)) if *kept >= self.limit => {
                        beyond.insert(key);
                        return false;
                    }
                    Some((kept, _)) => *kept += 1,
                    None => {}
                }
                false
            }
            watcher::Event::InitDone => {
                self.listed = true;
                if let Some((_, beyond)) = self.relist.take() {
                    self.beyond = beyond;
                }
                true
            }
            watcher::Event::Apply(object) => {
                if self.store.get(&ObjectRef::from_obj(object)).is_none()
                    && self.store.len() >= self.limit
                {
                    let key = self.key(object);
                    return !self.beyond.keys.contains(&key) && self.beyond.insert(key);
                }
                true
            }
            watcher::Event::Delete(object) => {
                if self.store.get(&ObjectRef::from_obj(object)).is_none() {
                    let key = self.key(object);
                    return self.beyond.keys.remove(&key);
                }
                true
            }
        };
        self.writer.apply_watcher_event(&event);
        changed
    }

    /// A new list is on its way (the watchers were started again).
    fn relisting(&mut self) {
        self.relist = Some((0, Beyond::default()));
    }

    /// How many objects there are, as far as counted; whether some were not.
    fn count(&self) -> (usize, bool) {
        (
            self.store.len() + self.beyond.keys.len(),
            self.beyond.uncounted,
        )
    }

    /// Some objects were not kept, yet so few are counted now that they may all fit: only a
    /// new list can tell, and give the ones not kept.
    fn needs_relist(&self) -> bool {
        self.listed
            && self.relist.is_none()
            && !self.beyond.is_empty()
            && self.count().0 <= self.limit
    }

    /// The objects in force, in the order of their keys, so that a translation of the same
    /// objects is always the same.
    fn objects(&self) -> Vec<Arc<K>> {
        let mut objects = self.store.state();
        objects.sort_by(|a, b| {
            let key = |o: &K| (o.meta().namespace.clone(), o.meta().name.clone());
            key(a).cmp(&key(b))
        });
        objects
    }
}

/// A namespaced object the API server sent without a namespace is in `default`, as the API
/// server itself would have put it. Applied to Services and EndpointSlices as they arrive, so
/// that the store's key and the name in the desired state, the status and the Events are made
/// from the same namespace: a Service cannot be keyed two ways.
fn in_default_namespace<K: Resource>(object: &mut K) {
    object
        .meta_mut()
        .namespace
        .get_or_insert_with(|| "default".to_owned());
}

struct Cluster {
    /// LoadBalancer Services: past [`MAX_LOAD_BALANCERS`] counted, not kept.
    services: Cache<Service>,
    slices: Cache<EndpointSlice>,
    nodes: Cache<Node>,
    warned_missing_node: bool,
    over_limit: bool,
    /// Over the limit by more than could be counted (and said so).
    over_uncounted: bool,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            services: Cache::bounded(MAX_LOAD_BALANCERS),
            slices: Cache::default(),
            nodes: Cache::default(),
            warned_missing_node: false,
            over_limit: false,
            over_uncounted: false,
        }
    }
}

impl Cluster {
    fn apply(&mut self, watched: Watched) -> bool {
        match watched {
            Watched::Service(event) => {
                // Only LoadBalancer Services are kept; one that stops being one leaves.
                let event = match *event {
                    watcher::Event::InitApply(service)
                        if !translate::is_load_balancer(&service) =>
                    {
                        return false;
                    }
                    watcher::Event::Apply(service) if !translate::is_load_balancer(&service) => {
                        watcher::Event::Delete(service)
                    }
                    event => event,
                };
                self.services.apply(event.modify(|service| {
                    in_default_namespace(service);
                    translate::slim(service);
                }))
            }
            Watched::Slice(event) => self.slices.apply((*event).modify(in_default_namespace)),
            Watched::Node(event) => self.nodes.apply(*event),
        }
    }

    /// The desired state, once every resource has been listed completely and the
    /// LoadBalancer Services are within [`MAX_LOAD_BALANCERS`] (over it, the last state stays;
    /// back within it, the Services not kept are listed again first), with the BGP attributes
    /// `policy` admits.
    fn translate(
        &mut self,
        selection: &Selection,
        policy: &AttributePolicy,
    ) -> Option<Translation> {
        if !(self.services.listed && self.slices.listed && self.nodes.listed) {
            return None;
        }
        let (load_balancers, uncounted) = self.services.count();
        let over = load_balancers > MAX_LOAD_BALANCERS;
        let uncounted = over && uncounted;
        if (over, uncounted) != (self.over_limit, self.over_uncounted) {
            if over && uncounted {
                error!(
                    "{}",
                    KubernetesError::TooManyLoadBalancersToCount {
                        count: load_balancers
                    }
                );
            } else if over {
                error!(
                    "{}",
                    KubernetesError::TooManyLoadBalancers {
                        count: load_balancers
                    }
                );
            } else {
                info!(
                    load_balancers,
                    "LoadBalancer Services are within the limit again"
                );
            }
            self.over_limit = over;
            self.over_uncounted = uncounted;
        }
        if over || self.services.needs_relist() {
            return None;
        }
        let node = self.nodes.objects().into_iter().next();
        if node.is_none() && !self.warned_missing_node {
            warn!(node = %selection.node_name, "no Node of this name; is --node-name right? Serving as if it had no labels");
        }
        self.warned_missing_node = node.is_none();
        let slices = self.slices.objects();
        let slices: Vec<&EndpointSlice> = slices.iter().map(AsRef::as_ref).collect();
        let services = self.services.objects();
        let mut translation = translate::translate(
            services.iter().map(AsRef::as_ref),
            &slices,
            node.as_deref(),
            selection,
        );
        policy.apply(&mut translation.update);
        Some(translation)
    }

    /// The Service a `namespace/name` of the desired state names.
    fn service(&self, name: &str) -> Option<Arc<Service>> {
        let (namespace, name) = name.split_once('/')?;
        self.services
            .store
            .get(&ObjectRef::new(name).within(namespace))
    }
}

/// Where a Service stands on this node as its Events last said: the addresses announced, or
/// why they are not. An Event goes out only when this changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Standing {
    announced: BTreeSet<IpAddr>,
    not_announced: Option<String>,
    /// Local addresses this node answers ARP/NDP for, with the candidates in order.
    answering: BTreeMap<IpAddr, Vec<String>>,
}

/// Turns the source's verdicts and the reconciler's results into Events and log lines.
struct Announcer {
    node: String,
    standings: BTreeMap<String, Standing>,
    /// The latest source verdicts: rejected services and why, Local services without endpoints.
    rejected: BTreeMap<String, String>,
    /// BGP attributes left out of served Services, and why.
    refused_attributes: Vec<Rejected>,
    withdrawn_reason: BTreeMap<String, String>,
    excluded: bool,
    events: EventQueue,
}

impl Announcer {
    fn new(node: String, events: EventQueue) -> Self {
        Self {
            node,
            standings: BTreeMap::new(),
            rejected: BTreeMap::new(),
            refused_attributes: Vec::new(),
            withdrawn_reason: BTreeMap::new(),
            excluded: false,
            events,
        }
    }

    fn source_changed(&mut self, cluster: &Cluster, translation: &Translation) {
        if translation.excluded != self.excluded {
            if translation.excluded {
                warn!(node = %self.node, label = translate::EXCLUDE_LABEL, "this node is excluded from load balancers: withdrawing every address");
            } else {
                info!(node = %self.node, "this node is no longer excluded from load balancers");
            }
            self.excluded = translation.excluded;
        }
        let rejected: BTreeMap<String, String> = translation
            .update
            .rejected
            .iter()
            .map(|r| (r.service.clone(), r.reason.clone()))
            .collect();
        for (service, reason) in &rejected {
            if self.rejected.get(service) != Some(reason) {
                warn!(%service, %reason, "Service skipped");
            }
            self.record(
                cluster,
                service,
                Standing {
                    not_announced: Some(reason.clone()),
                    ..Standing::default()
                },
            );
        }
        self.rejected = rejected;
        // One Event per Service with all its refusals: the recorder folds Events of one reason
        // on one object into a series, which would hide every note but the first.
        let mut by_service: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for refusal in &translation.update.refused_attributes {
            by_service
                .entry(&refusal.service)
                .or_default()
                .push(&refusal.reason);
            if !self.refused_attributes.contains(refusal) {
                warn!(service = %refusal.service, reason = %refusal.reason, "BGP attribute refused");
            }
        }
        for (service, reasons) in by_service {
            let before: Vec<&str> = self
                .refused_attributes
                .iter()
                .filter(|r| r.service == service)
                .map(|r| r.reason.as_str())
                .collect();
            if before == reasons {
                continue;
            }
            let event = Event {
                type_: EventType::Warning,
                reason: "AttributeRefused".into(),
                note: Some(at_most(reasons.join("; "), NOTE_MAX)),
                action: "Announce".into(),
                secondary: None,
            };
            if let Some(object) = cluster.service(service) {
                self.events.push(object.object_ref(&()), event);
            }
        }
        self.refused_attributes
            .clone_from(&translation.update.refused_attributes);
        let mut withdrawn_reason = BTreeMap::new();
        for service in &translation.no_local_endpoint {
            if !self.withdrawn_reason.contains_key(service) {
                info!(%service, node = %self.node, "externalTrafficPolicy: Local and no ready endpoint on this node: not holding its addresses");
            }
            withdrawn_reason.insert(
                service.clone(),
                format!("no ready endpoint on node {}", self.node),
            );
        }
        if translation.excluded {
            for standing in self.standings.keys() {
                withdrawn_reason.insert(
                    standing.clone(),
                    format!(
                        "node {} has the label {}",
                        self.node,
                        translate::EXCLUDE_LABEL
                    ),
                );
            }
        }
        self.withdrawn_reason = withdrawn_reason;
    }

    /// After a reconcile: which addresses this node now holds for which Service.
    fn applied(&mut self, cluster: &Cluster, outcomes: &[AddressStatus]) {
        let mut now: BTreeMap<String, Standing> = BTreeMap::new();
        for address in outcomes {
            for service in &address.services {
                let standing = now.entry(service.clone()).or_default();
                match address.state {
                    AddressState::Virtual | AddressState::Local => {
                        standing.announced.insert(address.address);
                    }
                    AddressState::Unsupported => {
                        standing.not_announced = Some(format!(
                            "{}: node {} has no IPv6",
                            address.address, self.node
                        ));
                    }
                }
                match &address.neighbour {
                    Some(NeighbourOutcome::Answering { candidates }) => {
                        standing
                            .answering
                            .insert(address.address, candidates.clone());
                    }
                    Some(NeighbourOutcome::NoSubnet) => {
                        standing.not_announced = Some(format!(
                            "{}: no live node has an interface in its subnet, and no routing advertises it: nobody answers for it",
                            address.address
                        ));
                    }
                    Some(NeighbourOutcome::AnsweredBy { .. }) | None => {}
                }
            }
        }
        let before: Vec<String> = self.standings.keys().cloned().collect();
        for service in before {
            if !now.contains_key(&service) && !self.rejected.contains_key(&service) {
                self.record(cluster, &service, Standing::default());
            }
        }
        for (service, standing) in now {
            self.record(cluster, &service, standing);
        }
    }

    fn record(&mut self, cluster: &Cluster, service: &str, standing: Standing) {
        let before = self.standings.get(service).cloned().unwrap_or_default();
        if before == standing {
            return;
        }
        let mut events = Vec::new();
        let new: Vec<String> = standing
            .announced
            .difference(&before.announced)
            .map(ToString::to_string)
            .collect();
        if !new.is_empty() {
            events.push(Event {
                type_: EventType::Normal,
                reason: "Announced".into(),
                note: Some(format!("{} held by node {}", new.join(", "), self.node)),
                action: "Announce".into(),
                secondary: None,
            });
        }
        let gone: Vec<String> = before
            .announced
            .difference(&standing.announced)
            .map(ToString::to_string)
            .collect();
        if !gone.is_empty() {
            let why = self
                .withdrawn_reason
                .get(service)
                .map_or_else(String::new, |reason| format!(": {reason}"));
            events.push(Event {
                type_: EventType::Normal,
                reason: "Withdrawn".into(),
                note: Some(format!(
                    "{} no longer held by node {}{why}",
                    gone.join(", "),
                    self.node
                )),
                action: "Withdraw".into(),
                secondary: None,
            });
        }
        for (address, candidates) in &standing.answering {
            if before.answering.get(address) != Some(candidates) {
                events.push(Event {
                    type_: EventType::Normal,
                    reason: "LocalAddressOwner".into(),
                    note: Some(format!(
                        "{address}: node {} answers ARP/NDP for it (candidates in order: {})",
                        self.node,
                        candidates.join(", ")
                    )),
                    action: "Answer".into(),
                    secondary: None,
                });
            }
        }
        if let Some(reason) = &standing.not_announced
            && before.not_announced.as_ref() != Some(reason)
        {
            events.push(Event {
                type_: EventType::Warning,
                reason: "NotAnnounced".into(),
                note: Some(reason.clone()),
                action: "Announce".into(),
                secondary: None,
            });
        }
        if standing == Standing::default() {
            self.standings.remove(service);
        } else {
            self.standings.insert(service.to_owned(), standing);
        }
        // A Service that is gone has nothing to attach an Event to.
        let Some(object) = cluster.service(service) else {
            return;
        };
        let reference = object.object_ref(&());
        for event in events {
            self.events.push(reference.clone(), event);
        }
    }
}

/// The API server refuses an Event whose note is longer than this.
const NOTE_MAX: usize = 1024;

/// `text` cut to at most `max` bytes, on a character boundary, marked when cut.
fn at_most(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    use super::*;

    fn service(name: &str, version: &str) -> Service {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": version},
            "spec": {"type": "LoadBalancer"},
        }))
        .unwrap()
    }

    fn listed_cluster(services: impl IntoIterator<Item = Service>) -> Cluster {
        let mut cluster = Cluster::default();
        cluster.apply(Watched::Service(Box::new(watcher::Event::Init)));
        for service in services {
            cluster.apply(Watched::Service(Box::new(watcher::Event::InitApply(
                service,
            ))));
        }
        cluster.apply(Watched::Service(Box::new(watcher::Event::InitDone)));
        cluster.apply(Watched::Slice(Box::new(watcher::Event::InitDone)));
        cluster.apply(Watched::Node(Box::new(watcher::Event::InitDone)));
        cluster
    }

    fn selection() -> Selection {
        Selection {
            node_name: "node-a".into(),
            load_balancer_class: None,
        }
    }

    #[test]
    fn only_load_balancers_are_kept_and_one_that_stops_being_one_leaves() {
        let mut internal = service("internal", "1");
        internal.spec = None;
        let mut cluster = listed_cluster([service("web", "2"), internal.clone()]);
        assert_eq!(cluster.services.store.len(), 1);
        let mut web = service("web", "3");
        web.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        assert!(cluster.apply(Watched::Service(Box::new(watcher::Event::Apply(web)))));
        assert!(cluster.services.store.is_empty());
        assert!(!cluster.apply(Watched::Service(Box::new(watcher::Event::Apply(internal)))));
    }

    #[test]
    fn more_load_balancers_than_the_limit_keep_the_last_state_naming_the_limit() {
        let services = |count: usize| (0..count).map(|i| service(&format!("s{i}"), "1"));
        let mut cluster = listed_cluster(services(MAX_LOAD_BALANCERS));
        assert!(
            cluster
                .translate(&selection(), &AttributePolicy::default())
                .is_some()
        );
        let mut cluster = listed_cluster(services(MAX_LOAD_BALANCERS + 1));
        assert!(
            cluster
                .translate(&selection(), &AttributePolicy::default())
                .is_none()
        );
        assert!(cluster.over_limit);
        assert_eq!(
            KubernetesError::TooManyLoadBalancers {
                count: MAX_LOAD_BALANCERS + 1
            }
            .to_string(),
            "100001 LoadBalancer Services, over the limit of 100000: keeping the last state \
             until there are fewer"
        );
        // One gone, it lists them again for the one it did not keep, then translates again.
        assert_eq!(cluster.services.store.len(), MAX_LOAD_BALANCERS);
        cluster.apply(Watched::Service(Box::new(watcher::Event::Delete(service(
            "s0", "2",
        )))));
        assert!(cluster.services.needs_relist());
        assert!(
            cluster
                .translate(&selection(), &AttributePolicy::default())
                .is_none()
        );
        cluster.services.relisting();
        assert!(!cluster.services.needs_relist());
        cluster.apply(Watched::Service(Box::new(watcher::Event::Init)));
        for service in services(MAX_LOAD_BALANCERS + 1).skip(1) {
            cluster.apply(Watched::Service(Box::new(watcher::Event::InitApply(
                service,
            ))));
        }
        cluster.apply(Watched::Service(Box::new(watcher::Event::InitDone)));
        assert!(!cluster.services.needs_relist());
        let translation = cluster.translate(&selection(), &AttributePolicy::default());
        assert!(translation.is_some());
        assert!(!cluster.over_limit);
        assert!(
            cluster
                .service(&format!("ns/s{MAX_LOAD_BALANCERS}"))
                .is_some()
        );
    }

    #[test]
    fn past_the_limit_services_are_counted_not_kept_and_past_twice_it_not_counted() {
        let services =
            |range: std::ops::Range<usize>| range.map(|i| service(&format!("s{i}"), "1"));
        let mut cluster = listed_cluster(services(0..MAX_LOAD_BALANCERS));
        let apply = |cluster: &mut Cluster, service: Service| {
            cluster.apply(Watched::Service(Box::new(watcher::Event::Apply(service))))
        };
        // Past the limit: counted by key, once however often it changes, and not kept.
        assert!(apply(&mut cluster, service("extra", "1")));
        assert!(!apply(&mut cluster, service("extra", "2")));
        assert_eq!(cluster.services.store.len(), MAX_LOAD_BALANCERS);
        assert_eq!(cluster.services.count(), (MAX_LOAD_BALANCERS + 1, false));
        assert!(cluster.service("ns/extra").is_none());
        // Gone again, it is no longer counted, and nothing is missing.
        assert!(
            cluster.apply(Watched::Service(Box::new(watcher::Event::Delete(service(
                "extra", "3"
            )))))
        );
        assert_eq!(cluster.services.count(), (MAX_LOAD_BALANCERS, false));
        assert!(!cluster.services.needs_relist());
        assert!(
            cluster
                .translate(&selection(), &AttributePolicy::default())
                .is_some()
        );
        // Past twice the limit the keys are not counted either: a relist of them all keeps
        // the limit's worth of Services and of keys.
        let mut cluster = listed_cluster(services(0..2 * MAX_LOAD_BALANCERS + 10));
        assert_eq!(cluster.services.store.len(), MAX_LOAD_BALANCERS);
        assert_eq!(cluster.services.count(), (2 * MAX_LOAD_BALANCERS, true));
        assert!(
            cluster
                .translate(&selection(), &AttributePolicy::default())
                .is_none()
        );
        assert_eq!(
            KubernetesError::TooManyLoadBalancersToCount {
                count: 2 * MAX_LOAD_BALANCERS
            }
            .to_string(),
            "more than 200000 LoadBalancer Services, over the limit of 100000: keeping the last \
             state until there are fewer, counting no more of them"
        );
        assert!(!cluster.services.needs_relist());
    }

    #[test]
    fn a_relist_replaces_the_cache_only_when_complete() {
        let mut cache = Cache::default();
        assert!(!cache.apply(watcher::Event::Init));
        assert!(!cache.apply(watcher::Event::InitApply(service("a", "1"))));
        assert!(!cache.listed);
        assert!(cache.apply(watcher::Event::InitDone));
        assert!(cache.apply(watcher::Event::Apply(service("b", "2"))));
        assert_eq!(cache.objects().len(), 2);

        // A relist that breaks off after its first page leaves what was in force...
        cache.apply(watcher::Event::Init);
        cache.apply(watcher::Event::InitApply(service("a", "3")));
        assert_eq!(cache.objects().len(), 2);
        // ...and the watcher's next attempt starts over; only its InitDone swaps.
        cache.apply(watcher::Event::Init);
        cache.apply(watcher::Event::InitApply(service("c", "4")));
        assert_eq!(cache.objects().len(), 2);
        assert!(cache.apply(watcher::Event::InitDone));
        let names: Vec<String> = cache
            .objects()
            .iter()
            .map(|s| translate::service_name(s))
            .collect();
        assert_eq!(names, ["ns/c"]);
        assert!(cache.apply(watcher::Event::Delete(service("c", "5"))));
        assert!(!cache.apply(watcher::Event::Delete(service("c", "5"))));
        assert!(cache.objects().is_empty());
    }

    #[test]
    fn a_service_without_a_namespace_is_named_and_found_in_default() {
        let mut cluster = Cluster::default();
        let mut web = service("web", "1");
        web.metadata.namespace = None;
        cluster.apply(Watched::Service(Box::new(watcher::Event::Apply(web))));
        let names: Vec<String> = cluster
            .services
            .objects()
            .iter()
            .map(|s| translate::service_name(s))
            .collect();
        assert_eq!(names, ["default/web"]);
        assert!(cluster.service("default/web").is_some());
        assert!(cluster.service("/web").is_none());
    }
}
