//! The allocator's control loop while it leads: watch Services, AddressPools and Namespaces;
//! once all three are listed, rebuild the books from the addresses Services already hold, then
//! keep them and write what they say through the status subresources.
//!
//! Service status writes carry the resourceVersion the write was decided on, so a write over a
//! change it has not seen gets 409 Conflict; the Service is then read again and decided anew.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use futures::{
    FutureExt as _, StreamExt as _,
    future::BoxFuture,
    stream::{BoxStream, FuturesUnordered},
};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference};
use kube::{
    Api, Client, ResourceExt as _,
    api::{Patch, PatchParams},
    runtime::{
        events::{Event, EventType, Reporter},
        watcher,
    },
};
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::sources::kubernetes::{
    events::{EventQueue, Replace},
    watch_kind,
};

use super::{
    books::{Books, Conflict, Outcome, PoolInput, PoolReport},
    pool::{AddressPool, AddressPoolStatus, Family, FamilyUsage, PoolCondition},
    request::{self, Request, ServiceKey},
    service::Service,
};

/// Status writes in flight at once.
pub const WRITE_CONCURRENCY: usize = 16;
/// Watch events decided in one batch.
const BATCH: usize = 512;
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Events the controller lets wait in the queue; the rest wait as the keys of Services to
/// tell (a key is a fraction of a waiting Event) and are told from the books when fed.
const EVENTS_WAITING: usize = 128;
/// While status writes are to be made, Events are fed this often (they go to the same API
/// server, and an address matters before the Event that tells of it).
const TELL_WHILE_WRITING_EVERY: Duration = Duration::from_secs(1);
/// A pool's status is written at most this often: every assignment changes its use, and
/// three status writes after each handful of Services held up the Services' own.
const POOL_STATUS_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Settings {
    pub load_balancer_class: Option<String>,
    /// Reported as the Events' reporting instance.
    pub identity: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("the watch streams ended")]
    WatchEnded,
}

enum Change {
    Service(Box<watcher::Event<Service>>),
    Pool(Box<watcher::Event<AddressPool>>),
    Namespace(Box<watcher::Event<Namespace>>),
}

/// What the controller keeps of a Service: its ask if it is ours, not the whole object
/// (10,000 Services of which most are not load balancers must not cost their full size).
#[derive(Clone, Debug)]
struct SeenService {
    namespace: String,
    name: String,
    uid: Option<String>,
    version: String,
    /// `Some` for a Service of type LoadBalancer of the allocator's class. Boxed, so the
    /// cache's half-empty map nodes hold a pointer where the rest of the map has none.
    request: Option<Box<Request>>,
    /// The addresses its status shows.
    addresses: Vec<IpAddr>,
}

impl SeenService {
    fn new(service: &Service, class: Option<&str>) -> Self {
        Self {
            namespace: service.namespace().unwrap_or_default(),
            name: service.name_any(),
            uid: service.uid(),
            version: service.resource_version().unwrap_or_default(),
            request: request::is_ours(service, class).then(|| Box::new(request::read(service))),
            addresses: request::status_addresses(service),
        }
    }

    fn reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: self.uid.clone(),
            resource_version: Some(self.version.clone()),
            ..ObjectReference::default()
        }
    }
}

/// How a cached object is keyed and ordered.
trait Cached {
    fn key(&self) -> String;
    fn version(&self) -> Option<u64>;
}

impl Cached for SeenService {
    fn key(&self) -> String {
        cache_key(&self.namespace, &self.name)
    }

    fn version(&self) -> Option<u64> {
        self.version.parse().ok()
    }
}

impl Cached for AddressPool {
    fn key(&self) -> String {
        self.name_any()
    }

    fn version(&self) -> Option<u64> {
        self.resource_version().and_then(|v| v.parse().ok())
    }
}

impl Cached for Namespace {
    fn key(&self) -> String {
        self.name_any()
    }

    fn version(&self) -> Option<u64> {
        self.resource_version().and_then(|v| v.parse().ok())
    }
}

fn map_event<K, V>(event: watcher::Event<K>, f: impl Fn(K) -> V) -> watcher::Event<V> {
    match event {
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(object) => watcher::Event::InitApply(f(object)),
        watcher::Event::InitDone => watcher::Event::InitDone,
        watcher::Event::Apply(object) => watcher::Event::Apply(f(object)),
        watcher::Event::Delete(object) => watcher::Event::Delete(f(object)),
    }
}

/// One resource's objects by key: the last complete list plus the watch since.
struct Cache<K> {
    objects: BTreeMap<String, K>,
    relisting: Option<BTreeMap<String, K>>,
    listed: bool,
}

impl<K> Default for Cache<K> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            relisting: None,
            listed: false,
        }
    }
}

impl<K: Cached> Cache<K> {
    /// Applies a watch event; returns the keys it touched, or `None` for a completed relist
    /// (everything may have changed).
    fn apply(&mut self, event: watcher::Event<K>) -> Option<Vec<String>> {
        match event {
            watcher::Event::Init => {
                self.relisting = Some(BTreeMap::new());
                Some(Vec::new())
            }
            watcher::Event::InitApply(object) => {
                if let Some(relisting) = &mut self.relisting {
                    relisting.insert(object.key(), object);
                }
                Some(Vec::new())
            }
            watcher::Event::InitDone => {
                if let Some(relisted) = self.relisting.take() {
                    self.objects = relisted;
                }
                self.listed = true;
                None
            }
            watcher::Event::Apply(object) => {
                let key = object.key();
                self.insert_newer(object);
                Some(vec![key])
            }
            watcher::Event::Delete(object) => {
                let key = object.key();
                self.objects.remove(&key);
                Some(vec![key])
            }
        }
    }

    /// Stores `object` unless the cache holds a newer version (a status write's answer can
    /// arrive before the watch delivers older versions).
    fn insert_newer(&mut self, object: K) {
        let key = object.key();
        if let (Some(held), Some(new)) = (
            self.objects.get(&key).and_then(Cached::version),
            object.version(),
        ) && held > new
        {
            return;
        }
        self.objects.insert(key, object);
    }

    /// Whether the cache holds `key` at `version` or newer.
    fn holds(&self, key: &str, version: Option<&str>) -> bool {
        let version = version.and_then(|v| v.parse::<u64>().ok());
        matches!(
            (self.objects.get(key).and_then(Cached::version), version),
            (Some(held), Some(new)) if held >= new
        )
    }
}

/// How the Service cache keys a Service.
fn cache_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn service_cache_key(key: &ServiceKey) -> String {
    cache_key(&key.namespace, &key.name)
}

fn changes(client: &Client) -> BoxStream<'static, Result<Change, watcher::Error>> {
    let all = watcher::Config::default;
    futures::stream::select_all([
        watch_kind(Api::<Service>::all(client.clone()), all(), Change::Service),
        watch_kind(Api::<AddressPool>::all(client.clone()), all(), Change::Pool),
        watch_kind(
            Api::<Namespace>::all(client.clone()),
            all(),
            Change::Namespace,
        ),
    ])
    .boxed()
}

pub struct Controller {
    client: Client,
    settings: Settings,
    services: Cache<SeenService>,
    pools: Cache<AddressPool>,
    namespaces: Cache<Namespace>,
    books: Option<Books>,
    /// What the books were last built from, to tell a pool's own status write from a change.
    pool_inputs: Vec<PoolInput>,
    namespace_labels: HashMap<String, BTreeMap<String, String>>,
    /// Services whose status may differ from what the books say.
    dirty: BTreeSet<ServiceKey>,
    /// Services that left the books while still existing: their addresses are cleared.
    released: BTreeSet<ServiceKey>,
    /// A digest of the last outcome told per Service, so each outcome is told once.
    told: HashMap<ServiceKey, u64>,
    /// Services whose status shows their outcome, to be told (an Event and a log line).
    untold: BTreeSet<ServiceKey>,
    /// When Events are next fed while status writes are to be made.
    tell_due: Option<Instant>,
    /// Services whose write failed, written again at `retry_at`.
    waiting: BTreeSet<ServiceKey>,
    /// Services with a status write under way.
    writing: HashSet<ServiceKey>,
    retry_at: Option<Instant>,
    /// When the pools' status was last written, and when it may be written next.
    pools_written: Option<Instant>,
    pools_due: Option<Instant>,
    events: EventQueue,
    /// Each namespace's Service API, made once: making one per write was a fiftieth of the
    /// allocator's time with 10,000 Services.
    service_apis: HashMap<String, Arc<Api<Service>>>,
}

impl Controller {
    pub fn new(client: Client, settings: Settings) -> Self {
        let events = EventQueue::start(
            client.clone(),
            Reporter {
                controller: super::CONTROLLER.into(),
                instance: Some(settings.identity.clone()),
            },
            Replace::SameReason,
        );
        Self {
            client,
            settings,
            services: Cache::default(),
            pools: Cache::default(),
            namespaces: Cache::default(),
            books: None,
            pool_inputs: Vec::new(),
            namespace_labels: HashMap::new(),
            dirty: BTreeSet::new(),
            released: BTreeSet::new(),
            told: HashMap::new(),
            untold: BTreeSet::new(),
            tell_due: None,
            waiting: BTreeSet::new(),
            writing: HashSet::new(),
            retry_at: None,
            pools_written: None,
            pools_due: None,
            events,
            service_apis: HashMap::new(),
        }
    }

    /// Runs until the watch streams end (they retry on their own while the API server is
    /// unreachable). Status writes run beside the watches, [`WRITE_CONCURRENCY`] at a time: a
    /// write that ends makes room for the next at once, and watch events are taken in
    /// meanwhile, so 10,000 new Services keep the writes as busy as a bare client keeps them.
    pub async fn run(mut self) -> Result<(), ControllerError> {
        let mut changes = changes(&self.client);
        let mut writes = FuturesUnordered::new();
        let mut failing = false;
        loop {
            let retry = self.retry_at;
            let pools_due = self.pools_due;
            let tell_due = self.tell_due;
            let writing = self.writes_pending(&writes);
            tokio::select! {
                change = changes.next() => {
                    let Some(first) = change else {
                        return Err(ControllerError::WatchEnded);
                    };
                    let mut batch = vec![first];
                    while batch.len() < BATCH {
                        match changes.next().now_or_never() {
                            Some(Some(change)) => batch.push(change),
                            _ => break,
                        }
                    }
                    self.take_changes(batch, &mut failing);
                }
                Some((key, written)) = writes.next(), if !writes.is_empty() => {
                    self.written(key, written);
                    while let Some(Some((key, written))) = writes.next().now_or_never() {
                        self.written(key, written);
                    }
                }
                () = sleep_until(retry), if retry.is_some() => {
                    self.retry_at = None;
                    let waited = std::mem::take(&mut self.waiting);
                    self.dirty.extend(waited);
                }
                () = sleep_until(pools_due), if pools_due.is_some() => {
                    self.pools_due = None;
                }
                () = self.events.sent(), if !writing && !self.untold.is_empty() => {}
                () = sleep_until(tell_due), if tell_due.is_some() => {
                    self.tell_due = None;
                    self.tell_some();
                }
            }
            self.start_writes(&mut writes);
            if !self.writes_pending(&writes) {
                self.tell_due = None;
                self.tell_some();
            } else if !self.untold.is_empty() && self.tell_due.is_none() {
                self.tell_due = Some(Instant::now() + TELL_WHILE_WRITING_EVERY);
            }
            // The pools' use is written once the Services' writes settle, and at most every
            // POOL_STATUS_EVERY.
            if writes.is_empty() {
                match self.pools_written {
                    Some(at) if at.elapsed() < POOL_STATUS_EVERY => {
                        self.pools_due = Some(at + POOL_STATUS_EVERY);
                    }
                    _ => {
                        if self.write_pools().await {
                            self.pools_written = Some(Instant::now());
                        }
                    }
                }
            }
        }
    }

    fn take_changes(&mut self, batch: Vec<Result<Change, watcher::Error>>, failing: &mut bool) {
        debug!(changes = batch.len(), "watch changes taken");
        let mut touched = BTreeSet::new();
        let mut relisted = false;
        for change in batch {
            match change {
                Err(err) => {
                    if !*failing {
                        warn!(%err, "watch failed; keeping the books and retrying");
                    }
                    *failing = true;
                }
                Ok(change) => {
                    if *failing {
                        info!("watches are back");
                        *failing = false;
                    }
                    match self.apply(change) {
                        Some(keys) => touched.extend(keys),
                        None => relisted = true,
                    }
                }
            }
        }
        self.decide(touched, relisted);
    }

    fn apply(&mut self, change: Change) -> Option<Vec<String>> {
        match change {
            Change::Service(event) => {
                // The echo of the allocator's own status write, already taken from the write's
                // answer: 10,000 assignments come back as 10,000 watch events.
                if let watcher::Event::Apply(service) = event.as_ref()
                    && self.services.holds(
                        &cache_key(
                            service.metadata.namespace.as_deref().unwrap_or_default(),
                            service.metadata.name.as_deref().unwrap_or_default(),
                        ),
                        service.metadata.resource_version.as_deref(),
                    )
                {
                    return Some(Vec::new());
                }
                let class = self.settings.load_balancer_class.as_deref();
                self.services
                    .apply(map_event(*event, |s| SeenService::new(&s, class)))
            }
            Change::Pool(event) => self.pools.apply(*event).map(|_| Vec::new()),
            Change::Namespace(event) => {
                let applied = self.namespaces.apply(*event).map(|_| Vec::new());
                let namespaces = &self.namespaces.objects;
                self.service_apis
                    .retain(|name, _| namespaces.contains_key(name));
                applied
            }
        }
    }

    fn listed(&self) -> bool {
        self.services.listed && self.pools.listed && self.namespaces.listed
    }

    fn current_pool_inputs(&self) -> Vec<PoolInput> {
        self.pools
            .objects
            .values()
            .map(|pool| PoolInput {
                name: pool.name_any(),
                created: pool
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0.to_string())
                    .unwrap_or_default(),
                spec: pool.spec.clone(),
            })
            .collect()
    }

    fn current_namespace_labels(&self) -> HashMap<String, BTreeMap<String, String>> {
        self.namespaces
            .objects
            .values()
            .map(|ns| (ns.name_any(), ns.labels().clone()))
            .collect()
    }

    /// Brings the books up to date with the caches and marks the Services to write.
    fn decide(&mut self, touched: BTreeSet<String>, relisted: bool) {
        if !self.listed() {
            return;
        }
        let pool_inputs = self.current_pool_inputs();
        let namespace_labels = self.current_namespace_labels();
        let Some(books) = self.books.as_mut().filter(|_| !relisted) else {
            self.rebuild(pool_inputs, namespace_labels);
            return;
        };
        if pool_inputs != self.pool_inputs || namespace_labels != self.namespace_labels {
            info!(
                pools = pool_inputs.len(),
                "pools or namespace labels changed; placing every Service again"
            );
            self.dirty
                .extend(books.reconfigure(&pool_inputs, namespace_labels.clone()));
            self.pool_inputs = pool_inputs;
            self.namespace_labels = namespace_labels;
        }
        for cache_key in touched {
            let Some((namespace, name)) = cache_key.split_once('/') else {
                continue;
            };
            let key = ServiceKey::new(namespace, name);
            match self.services.objects.get(&cache_key) {
                Some(SeenService {
                    request: Some(request),
                    ..
                }) => {
                    self.released.remove(&key);
                    self.dirty.extend(books.upsert(Request::clone(request)));
                    self.dirty.insert(key);
                }
                still_there => {
                    if books.contains(&key) {
                        self.dirty.extend(books.remove(&key));
                        if still_there.is_some() {
                            self.released.insert(key.clone());
                            self.dirty.insert(key.clone());
                        }
                    }
                    if still_there.is_none() {
                        self.told.remove(&key);
                        self.released.remove(&key);
                    }
                }
            }
        }
        let conflicts = books.take_conflicts();
        self.tell_conflicts(conflicts);
    }

    /// New books from what the cluster holds; what Services already hold is not told again.
    fn rebuild(
        &mut self,
        pool_inputs: Vec<PoolInput>,
        namespace_labels: HashMap<String, BTreeMap<String, String>>,
    ) {
        let requests: Vec<_> = self
            .services
            .objects
            .values()
            .filter_map(|seen| seen.request.as_deref().cloned())
            .collect();
        let count = requests.len();
        let mut books = Books::rebuild(&pool_inputs, namespace_labels.clone(), requests);
        self.dirty.clear();
        for (key, outcome) in books.services() {
            let held = self
                .services
                .objects
                .get(&service_cache_key(key))
                .map(|seen| seen.addresses.clone())
                .unwrap_or_default();
            if matches!(outcome, Outcome::Assigned { .. }) && held == outcome.addresses() {
                self.told.insert(key.clone(), told_key(outcome));
            } else {
                self.dirty.insert(key.clone());
            }
        }
        let conflicts = books.take_conflicts();
        info!(
            services = count,
            pools = pool_inputs.len(),
            "books rebuilt from the cluster"
        );
        self.books = Some(books);
        self.pool_inputs = pool_inputs;
        self.namespace_labels = namespace_labels;
        self.tell_conflicts(conflicts);
    }

    fn tell_conflicts(&self, conflicts: Vec<Conflict>) {
        for conflict in conflicts {
            warn!(address = %conflict.address, kept_by = %conflict.kept_by, taken_from = %conflict.taken_from, "two Services held one address");
            let keeps = format!(
                "{} was also in the status of {}; this Service had it first and keeps it",
                conflict.address, conflict.taken_from
            );
            let loses = format!(
                "{} is held by {}, which had it first; this Service gets another address",
                conflict.address, conflict.kept_by
            );
            self.event(
                &conflict.kept_by,
                EventType::Warning,
                "AddressConflict",
                keeps,
            );
            self.event(
                &conflict.taken_from,
                EventType::Warning,
                "AddressConflict",
                loses,
            );
        }
    }

    fn event(&self, key: &ServiceKey, type_: EventType, reason: &str, note: String) {
        let Some(seen) = self.services.objects.get(&service_cache_key(key)) else {
            return;
        };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Allocate".into(),
            secondary: None,
        };
        self.events.push(seen.reference(), event);
    }

    /// Whether status writes are under way or to be made.
    fn writes_pending(&self, writes: &FuturesUnordered<StatusWrite>) -> bool {
        !writes.is_empty() || !self.dirty.is_empty()
    }

    /// Tells a Service's outcome once its status shows it, when Events are next fed.
    fn tell(&mut self, key: &ServiceKey) {
        self.untold.insert(key.clone());
    }

    /// Tells Services' outcomes while fewer than [`EVENTS_WAITING`] Events wait; one whose
    /// status is being written again is told when that write ends.
    fn tell_some(&mut self) {
        while self.events.waiting() < EVENTS_WAITING
            && let Some(key) = self.untold.pop_first()
        {
            if !self.dirty.contains(&key) && !self.writing.contains(&key) {
                self.tell_now(&key);
            }
        }
    }

    fn tell_now(&mut self, key: &ServiceKey) {
        let Some(outcome) = self.books.as_ref().and_then(|b| b.outcome(key)).cloned() else {
            if self.released.remove(key) {
                self.told.remove(key);
                let note = "no longer a LoadBalancer of this class; its addresses are released";
                self.event(key, EventType::Normal, "AddressReleased", note.into());
            }
            return;
        };
        let told = told_key(&outcome);
        if self.told.get(key) == Some(&told) {
            return;
        }
        self.told.insert(key.clone(), told);
        match outcome {
            Outcome::Assigned { addresses, note } => {
                let list: Vec<String> = addresses
                    .iter()
                    .map(|(ip, pool)| format!("{ip} from pool {pool}"))
                    .collect();
                let mut text = format!("Assigned {}", list.join(", "));
                if let Some(note) = note {
                    text.push_str(&format!(" (not every family: {note})"));
                }
                info!(service = %key, "{text}");
                self.event(key, EventType::Normal, "AddressAssigned", text);
            }
            Outcome::Failed(reason) => {
                warn!(service = %key, %reason, "no address");
                self.event(key, EventType::Warning, "AllocationFailed", reason);
            }
        }
    }

    /// Starts writing the dirty Services whose status differs from the books, while fewer
    /// than [`WRITE_CONCURRENCY`] writes are under way; one that already shows what the books
    /// say is told. A Service being written waits dirty for its write to end.
    fn start_writes(&mut self, writes: &mut FuturesUnordered<StatusWrite>) {
        let Some(books) = &self.books else {
            return;
        };
        let mut settled = Vec::new();
        while writes.len() < WRITE_CONCURRENCY {
            let Some(key) = self
                .dirty
                .iter()
                .find(|key| !self.writing.contains(*key))
                .cloned()
            else {
                break;
            };
            self.dirty.remove(&key);
            let Some(seen) = self.services.objects.get(&service_cache_key(&key)) else {
                continue;
            };
            let desired = match books.outcome(&key) {
                Some(outcome) => outcome.addresses(),
                None if self.released.contains(&key) => Vec::new(),
                None => continue,
            };
            if seen.addresses == desired {
                settled.push(key);
                continue;
            }
            let api = Arc::clone(
                self.service_apis
                    .entry(key.namespace.clone())
                    .or_insert_with(|| {
                        Arc::new(Api::namespaced(self.client.clone(), &key.namespace))
                    }),
            );
            let version = seen.version.clone();
            self.writing.insert(key.clone());
            writes.push(
                async move {
                    let written = write_service_status(&api, &key.name, &desired, &version).await;
                    (key, written)
                }
                .boxed(),
            );
        }
        for key in settled {
            self.tell(&key);
        }
    }

    /// Takes in how a status write ended.
    fn written(&mut self, key: ServiceKey, written: Written) {
        self.writing.remove(&key);
        let class = self.settings.load_balancer_class.clone();
        match written {
            Written::Done(service) => {
                let version = service.resource_version().unwrap_or_default();
                match self.services.objects.get_mut(&service_cache_key(&key)) {
                    // A write lands only on the version it was decided on, so the Service asks
                    // for what the cache says: only the version and the addresses moved.
                    Some(seen)
                        if seen.version().is_some_and(|held| {
                            version.parse::<u64>().is_ok_and(|new| held <= new)
                        }) =>
                    {
                        seen.addresses = request::status_addresses(&service);
                        seen.version = version;
                    }
                    _ => self
                        .services
                        .insert_newer(SeenService::new(&service, class.as_deref())),
                }
                // Decided anew while it was written: told once that write ends.
                if !self.dirty.contains(&key) {
                    self.tell(&key);
                }
            }
            Written::Conflict(Ok(service)) => {
                debug!(service = %key, "the Service changed under the write; read it again");
                match service {
                    Some(service) => self
                        .services
                        .insert_newer(SeenService::new(&service, class.as_deref())),
                    None => {
                        self.services.objects.remove(&service_cache_key(&key));
                    }
                }
                self.decide([service_cache_key(&key)].into(), false);
                self.dirty.insert(key);
            }
            Written::Conflict(Err(err)) => {
                warn!(service = %key, %err, "cannot read the Service again");
                self.retry(key);
            }
            Written::Gone => {}
            Written::Failed(err) => {
                warn!(service = %key, %err, "cannot write the Service's status; retrying");
                self.retry(key);
            }
        }
    }

    fn retry(&mut self, key: ServiceKey) {
        self.waiting.insert(key);
        self.retry_at
            .get_or_insert_with(|| Instant::now() + RETRY_AFTER);
    }

    /// Writes the pools' status where it differs from the books; returns whether it wrote.
    async fn write_pools(&mut self) -> bool {
        let Some(books) = &self.books else {
            return false;
        };
        let mut wrote = false;
        let api = Api::<AddressPool>::all(self.client.clone());
        for report in books.pool_reports() {
            let Some(pool) = self.pools.objects.get(&report.name) else {
                continue;
            };
            let observed = pool.status.clone().unwrap_or_default();
            let desired = pool_status(&report, &observed);
            if desired == observed {
                continue;
            }
            if let Some(err) = &report.error {
                warn!(pool = %report.name, %err, "pool refused");
            }
            wrote = true;
            let patch = json!({"status": {
                "ipv4": desired.ipv4,
                "ipv6": desired.ipv6,
                "conditions": desired.conditions,
            }});
            match api
                .patch_status(&report.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(pool) => self.pools.insert_newer(pool),
                Err(err) => {
                    warn!(pool = %report.name, %err, "cannot write the pool's status; retrying");
                    self.retry_at
                        .get_or_insert_with(|| Instant::now() + RETRY_AFTER);
                }
            }
        }
        wrote
    }
}

fn told_key(outcome: &Outcome) -> u64 {
    use std::hash::{DefaultHasher, Hash as _, Hasher as _};
    let mut hasher = DefaultHasher::new();
    format!("{outcome:?}").hash(&mut hasher);
    hasher.finish()
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// How a status write ended.
enum Written {
    /// The Service as written.
    Done(Service),
    /// 409: it changed under the write; the Service read again (`None`: it is gone).
    Conflict(Result<Option<Service>, kube::Error>),
    /// 404: it is gone.
    Gone,
    Failed(kube::Error),
}

type StatusWrite = BoxFuture<'static, (ServiceKey, Written)>;

async fn write_service_status(
    api: &Api<Service>,
    name: &str,
    addresses: &[IpAddr],
    version: &str,
) -> Written {
    let ingress: Value = if addresses.is_empty() {
        Value::Null
    } else {
        addresses
            .iter()
            .map(|ip| json!({"ip": ip.to_string(), "ipMode": "VIP"}))
            .collect()
    };
    let patch = json!({
        "metadata": {"resourceVersion": version},
        "status": {"loadBalancer": {"ingress": ingress}},
    });
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(service) => Written::Done(service),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            Written::Conflict(api.get_opt(name).await)
        }
        Err(kube::Error::Api(status)) if status.code == 404 => Written::Gone,
        Err(err) => Written::Failed(err),
    }
}

/// A pool's status from its report; a condition that did not change keeps its time.
pub fn pool_status(report: &PoolReport, observed: &AddressPoolStatus) -> AddressPoolStatus {
    let usage = |family: Family| {
        report
            .families
            .iter()
            .find(|(f, _, _)| *f == family)
            .map(|(_, total, used)| FamilyUsage {
                total: total.to_string(),
                in_use: *used,
            })
    };
    let (status, reason, message) = match &report.error {
        None => (
            "True",
            "Accepted",
            "the allocator hands out its addresses".to_owned(),
        ),
        Some(err) => ("False", err.reason, err.to_string()),
    };
    let mut condition = PoolCondition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: super::now(),
    };
    if let Some(old) = observed.conditions.iter().find(|c| c.type_ == "Ready")
        && old.status == condition.status
        && old.reason == condition.reason
        && old.message == condition.message
    {
        condition
            .last_transition_time
            .clone_from(&old.last_transition_time);
    }
    AddressPoolStatus {
        ipv4: usage(Family::V4),
        ipv6: usage(Family::V6),
        conditions: vec![condition],
    }
}
