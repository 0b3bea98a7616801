//! `lbagent run`: wires the source, the reconciler, its sinks and the face (status file, HTTP)
//! together, and follows the config file so that every change applies without a restart.
//!
//! A valid new config is compared with the running one part by part, and only the parts that
//! changed are rebuilt: the source task is replaced, the HTTP listener moved, the dataplane
//! re-attached or detached, the address and routing sinks replaced in the reconciler. An
//! edit that cannot apply live (the node's name, the log format) is refused whole, with one
//! line naming the field, the value and why, and the running config stays.

use std::{
    net::{Ipv4Addr, SocketAddr},
    ops::ControlFlow,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tracing::{debug, error, info, warn};

use crate::{
    config::{Config, ConfigError, Source},
    dataplane::PinLayout,
    desired::{AddressStatus, NodeLabels, SourceUpdate},
    logging::LogFormat,
    metrics,
    reconcile::{Change, Inputs, ReconcileMetrics, Reconciler, Slot, Status},
    sinks::{
        addresses::AddressSink,
        dataplane::{self, DataplaneConfig},
        neighbours,
        routing::{
            Bird, RoutingSink,
            model::{Mode, RoutingConfig},
        },
    },
    sources, status_file,
    watch::FileEvent,
};

/// What the command line sets over the config file, for the config at start and every
/// edit of it.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--node-name` or `$NODE_NAME`: wins over `node.name`.
    pub node_name: Option<String>,
    /// `--pin-root` or `$LBAGENT_PIN_ROOT`: wins over `dataplane.pinRoot`.
    pub pin_root: Option<PathBuf>,
    /// `--log-format` or `$LBAGENT_LOG_FORMAT`: wins over `log.format`.
    pub log_format: Option<LogFormat>,
}

impl Overrides {
    fn apply(&self, config: &mut Config) {
        if let (Some(root), Some(dataplane)) = (&self.pin_root, &mut config.dataplane) {
            dataplane.pin_root.clone_from(root);
        }
    }
}

/// `Config::load` with the overrides applied, and what to mount when the file is not there:
/// in a pod, a missing config is a missing volume, not a typo.
pub fn load_config(path: &Path, overrides: &Overrides) -> Result<Config> {
    let mut config = Config::load(path, overrides.node_name.as_deref()).map_err(|err| match &err {
        ConfigError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            let dir = path.parent().unwrap_or(Path::new("/"));
            anyhow::Error::new(err).context(format!(
                "no config file: mount the config at {} (in a pod: the lbagent-config ConfigMap, as deploy/daemonset.yaml does) or pass --config",
                dir.display()
            ))
        }
        _ => err.into(),
    })?;
    overrides.apply(&mut config);
    Ok(config)
}

/// What `run` needs from the file systems, checked before anything is created: a missing
/// mount stops the start with one line naming it, instead of a half-made node.
fn preflight(config: &Config) -> Result<()> {
    let mut writable = vec![("status.path", config.status_path.clone())];
    if let Some(RoutingConfig {
        mode: Mode::Managed { state_dir, .. },
        ..
    }) = &config.routing
    {
        writable.push(("routing.stateDir", state_dir.join("bird.conf")));
    }
    for (field, file) in writable {
        let dir = file.parent().unwrap_or(Path::new("/"));
        let existing = dir
            .ancestors()
            .find(|path| path.exists())
            .unwrap_or(Path::new("/"));
        if let Err(errno) = nix::unistd::access(existing, nix::unistd::AccessFlags::W_OK) {
            anyhow::bail!(
                "{field} {}: {} is not writable ({}): mount a writable directory at {} (in a pod: the hostPath volume deploy/daemonset.yaml mounts there)",
                file.display(),
                existing.display(),
                errno.desc(),
                dir.display()
            );
        }
    }
    if let Some(dataplane) = &config.dataplane {
        crate::dataplane::PinLayout::new(&dataplane.pin_root)
            .check_bpffs()
            .map_err(|err| {
                anyhow::anyhow!(
                    "dataplane.pinRoot: {err} (in a pod: the host's /sys/fs/bpf as a hostPath volume, as deploy/daemonset.yaml mounts it)"
                )
            })?;
    }
    Ok(())
}

pub async fn run(config_path: PathBuf, overrides: Overrides, config: Config) -> Result<()> {
    preflight(&config)?;
    let source_name = match &config.source {
        Source::File { path } => path.display().to_string(),
        Source::Kubernetes(_) => "kubernetes".to_owned(),
    };
    info!(
        node = %config.node_name,
        interface = %config.addresses.interface,
        source = %source_name,
        resync = %humantime::format_duration(config.addresses.resync_interval),
        routing = config.routing.as_ref().map_or("none", |r| match r.mode {
            Mode::Managed { .. } => "managed BIRD",
            Mode::External { .. } => "external BIRD",
        }),
        "lbagent starting"
    );

    // SIGHUP: a resync, and a re-read of the files, whatever their watches saw.
    let (resync_tx, resync_now) = mpsc::channel(1);
    let (reread_tx, reread) = watch::channel(0u64);
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let _ = resync_tx.try_send(());
            reread_tx.send_modify(|n| *n += 1);
        }
    });
    let (edits_tx, edits) = watch::channel(Ok(config.clone()));
    tokio::spawn(follow_config(
        config_path,
        overrides.clone(),
        edits_tx,
        reread.clone(),
    ));
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let (changes_tx, changes) = mpsc::unbounded_channel();
    let (updates_tx, updates) = watch::channel(None);
    let counts = ReconcileMetrics::default();
    let mut reconciler =
        Reconciler::new(config.node_name.clone(), Vec::new()).with_metrics(counts.clone());
    let (routing_tx, routing_config) = watch::channel(config.routing.clone());
    let mut parts = Parts {
        running: config.clone(),
        overrides,
        changes: changes_tx,
        routing_config: routing_tx,
        node_labels: watch::Sender::new(config.node_labels.clone()),
        updates: updates_tx,
        reread,
        outcomes: reconciler.outcomes(),
        applied: reconciler.applied(),
        counts,
        source: None,
        status_writer: None,
        http: None,
        follower: None,
        refused: None,
        dataplane_off: None,
        bird: None,
        routing_off: None,
        retiring: None,
        moved: reconciler.applied(),
        ran: reconciler.applied(),
    };
    parts.start().await?;
    let inputs = Inputs {
        updates,
        routing: routing_config,
        resync_interval: config.addresses.resync_interval,
        resync_now,
        changes,
    };
    let result = tokio::select! {
        () = reconciler.run(inputs) => Ok(()),
        result = parts.follow(edits) => result,
        _ = term.recv() => stopping("SIGTERM"),
        _ = int.recv() => stopping("SIGINT"),
    };
    if let Some(bird) = parts.bird.take() {
        bird.stop().await;
        // A stopped BIRD has no sessions: the status file must not show the old ones as
        // current to whoever reads it before the next agent writes its own.
        reconciler.publish();
        if let Some(status) = reconciler.applied().borrow().as_ref()
            && let Err(err) = status_file::write(&parts.running.status_path, status)
        {
            warn!(%err, "cannot write the status file");
        }
    }
    result
}

/// First retry of a configured part that is off; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

/// A configured part that is off: why, and when it is tried again.
struct Off {
    reason: String,
    at: Instant,
    delay: Duration,
}

impl Off {
    /// The next failure after `previous` (`None`: the first). Logs a reason once, not on
    /// every retry.
    fn after(previous: Option<Off>, reason: String) -> Self {
        let delay = previous
            .as_ref()
            .map_or(FIRST_RETRY, |off| (off.delay * 2).min(MAX_RETRY));
        if previous.as_ref().is_some_and(|off| off.reason == reason) {
            debug!(%reason, retry_in = ?delay, "still off");
        } else {
            error!(retry_in = ?delay, "{reason}");
        }
        Self {
            reason,
            at: Instant::now() + delay,
            delay,
        }
    }
}

/// The running parts of the agent, as the running config asks for them, and what rebuilds
/// them when it changes.
struct Parts {
    running: Config,
    overrides: Overrides,
    changes: mpsc::UnboundedSender<Change>,
    routing_config: watch::Sender<Option<RoutingConfig>>,
    /// The config's `node.labels`, which the file source puts into its desired state.
    node_labels: watch::Sender<NodeLabels>,
    updates: watch::Sender<Option<SourceUpdate>>,
    reread: watch::Receiver<u64>,
    outcomes: watch::Receiver<Option<Vec<AddressStatus>>>,
    applied: watch::Receiver<Option<Status>>,
    counts: ReconcileMetrics,
    source: Option<JoinHandle<Result<()>>>,
    status_writer: Option<JoinHandle<()>>,
    http: Option<JoinHandle<()>>,
    /// The task that follows the dataplane's interfaces.
    follower: Option<JoinHandle<()>>,
    /// The interfaces that refused the program, from the follower (for the neighbours sink).
    refused: Option<watch::Receiver<dataplane::Refused>>,
    dataplane_off: Option<Off>,
    bird: Option<Bird>,
    routing_off: Option<Off>,
    /// The interface of the previous `addresses.interface`, deleted once the published
    /// status comes from the new one (`moved`).
    retiring: Option<String>,
    moved: watch::Receiver<Option<Status>>,
    /// For routing that was off: whether its new task reports.
    ran: watch::Receiver<Option<Status>>,
}

impl Parts {
    /// Starts every part of the running config. At start a part that cannot run stops the
    /// agent with why (the dataplane excepted: it is retried).
    async fn start(&mut self) -> Result<()> {
        let config = self.running.clone();
        self.change(Change::Sink(
            Slot::Addresses,
            Some(Box::new(address_sink(&config.addresses.interface)?)),
        ));
        if let Some(routing) = &config.routing {
            let router_id_default = router_id_default(&config.addresses.interface).await?;
            let (sink, bird) =
                RoutingSink::start(routing, &config.addresses.interface, router_id_default)?;
            self.change(Change::Sink(Slot::Routing, Some(Box::new(sink))));
            self.bird = Some(bird);
        }
        if let Some(dataplane) = &config.dataplane {
            self.start_dataplane(dataplane).await;
        }
        self.write_status(&config.status_path);
        self.serve_http(config.http_address).await?;
        self.start_source(&config);
        Ok(())
    }

    fn change(&self, change: Change) {
        // The reconciler outlives the parts: a send fails only as the agent stops.
        let _ = self.changes.send(change);
    }

    /// Follows the config's edits, the source task, and the parts that are off, until the
    /// source stops.
    async fn follow(&mut self, mut edits: watch::Receiver<Result<Config, String>>) -> Result<()> {
        let mut following = true;
        loop {
            // Routing that started again is off until its task has made its directory and
            // said so (`routing_ran`); it is retried only once that task is gone.
            let routing_retry = self.routing_off.as_ref().filter(|_| self.bird.is_none());
            let retry_at = [self.dataplane_off.as_ref(), routing_retry]
                .into_iter()
                .flatten()
                .map(|off| off.at)
                .min();
            tokio::select! {
                changed = edits.changed(), if following => {
                    if changed.is_err() {
                        // The follower ended (and said why): the running config stays.
                        following = false;
                        continue;
                    }
                    let edit = edits.borrow_and_update().clone();
                    self.edit(edit).await;
                }
                result = ended(&mut self.source) => {
                    let err = match result {
                        Ok(Ok(())) => anyhow::anyhow!("ended"),
                        Ok(Err(err)) => err,
                        Err(join) => anyhow::Error::new(join),
                    };
                    error!(%err, "the services source stopped");
                    return Err(err.context("the services source stopped"));
                }
                () = moved_to(&mut self.moved, &self.running.addresses.interface), if self.retiring.is_some() => {
                    if let Some(old) = self.retiring.take() {
                        retire_interface(&old).await;
                    }
                }
                () = routing_ran(&mut self.ran), if self.routing_off.is_some() && self.bird.is_some() => {
                    info!("routing is on again");
                    self.routing_off = None;
                    self.change(Change::Off(Slot::Routing, None));
                }
                why = routing_failed(&mut self.bird) => {
                    self.bird = None;
                    self.change(Change::Sink(Slot::Routing, None));
                    self.routing_is_off(format!("routing stopped: {why}"));
                }
                () = sleep_until(retry_at) => {
                    let config = self.running.clone();
                    if self.dataplane_off.as_ref().is_some_and(|off| off.at <= Instant::now())
                        && let Some(dataplane) = &config.dataplane
                    {
                        self.start_dataplane(dataplane).await;
                    }
                    if self.bird.is_none()
                        && self.routing_off.as_ref().is_some_and(|off| off.at <= Instant::now())
                    {
                        self.start_routing(&config).await;
                    }
                }
            }
        }
    }

    /// One edit of the config file: applied part by part, or refused whole.
    async fn edit(&mut self, edit: Result<Config, String>) {
        let next = match edit {
            Ok(next) => next,
            Err(why) => {
                // Already logged by the follower, with the field and the value.
                self.change(Change::ConfigRefused(Some(why)));
                return;
            }
        };
        if next == self.running {
            self.change(Change::ConfigRefused(None));
            return;
        }
        if let Err(why) = self.refusal(&next) {
            error!("{why}; keeping the running config");
            self.change(Change::ConfigRefused(Some(why)));
            return;
        }
        self.apply(next).await;
        self.change(Change::ConfigRefused(None));
    }

    /// Why `next` cannot apply under the running agent, if it cannot: the field, the value,
    /// and why.
    fn refusal(&self, next: &Config) -> Result<(), String> {
        let running = &self.running;
        if next.node_name != running.node_name {
            return Err(format!(
                "node.name: {:?}: the node's name cannot change under a running agent (it names the node to the API server and in every status): restart lbagent to apply it",
                next.node_name
            ));
        }
        if self.overrides.log_format.is_none() && next.log_format != running.log_format {
            return Err(format!(
                "log.format: {:?}: the log format is set when lbagent starts: restart lbagent to apply it",
                next.log_format.map_or("human", |format| match format {
                    LogFormat::Human => "human",
                    LogFormat::Json => "json",
                })
            ));
        }
        if let Some(RoutingConfig {
            mode: Mode::Managed { binary, .. },
            ..
        }) = &next.routing
            && running.routing.as_ref().map(|r| &r.mode) != next.routing.as_ref().map(|r| &r.mode)
            && let Err(err) = crate::sinks::routing::which(binary)
        {
            return Err(format!(
                "routing.bird: {:?}: {err}",
                binary.display().to_string()
            ));
        }
        preflight(next).map_err(|err| err.to_string())
    }

    /// Rebuilds what changed between the running config and `next`.
    async fn apply(&mut self, next: Config) {
        let running = self.running.clone();
        if next.status_path != running.status_path {
            info!(from = %running.status_path.display(), to = %next.status_path.display(), "status.path changed: moving the status file");
            self.write_status(&next.status_path);
            let _ = std::fs::remove_file(&running.status_path);
        }

        let interface_changed = next.addresses.interface != running.addresses.interface;
        if interface_changed {
            match address_sink(&next.addresses.interface) {
                Ok(sink) => {
                    info!(from = %running.addresses.interface, to = %next.addresses.interface, "addresses.interface changed: the addresses move to the new interface");
                    self.change(Change::Sink(Slot::Addresses, Some(Box::new(sink))));
                    self.retiring = Some(running.addresses.interface.clone());
                }
                Err(err) => error!(%err, "addresses.interface: cannot follow the new interface"),
            }
        }
        if next.addresses.resync_interval != running.addresses.resync_interval {
            info!(resync = %humantime::format_duration(next.addresses.resync_interval), "addresses.resyncInterval changed");
            self.change(Change::ResyncInterval(next.addresses.resync_interval));
        }

        if next.node_labels != running.node_labels {
            info!(labels = ?next.node_labels, "node labels changed");
            self.node_labels.send_replace(next.node_labels.clone());
        }

        if next.source != running.source {
            info!(
                "source changed: following the new one; the addresses stay until it has delivered a complete state"
            );
            self.start_source(&next);
        }

        if next.dataplane != running.dataplane {
            self.restart_dataplane(running.dataplane.as_ref(), next.dataplane.as_ref())
                .await;
        }

        let restart_routing = match (&running.routing, &next.routing) {
            (None, None) => false,
            (Some(old), Some(new)) => old.mode != new.mode || interface_changed,
            _ => true,
        };
        if restart_routing {
            self.routing_off = None;
            self.change(Change::Off(Slot::Routing, None));
            self.change(Change::Sink(Slot::Routing, None));
            if let Some(bird) = self.bird.take() {
                if next.routing.is_none() {
                    info!(
                        "the routing section was removed: shutting BIRD down, so that its peers withdraw the routes"
                    );
                    bird.shut_down().await;
                } else {
                    info!("routing.mode, its BIRD binary or paths changed: restarting routing");
                    bird.stop().await;
                }
            }
            self.routing_config.send_replace(next.routing.clone());
            self.start_routing(&next).await;
        } else if next.routing != running.routing {
            self.routing_config.send_replace(next.routing.clone());
        }

        let mut next = next;
        let pins_changed = next.dataplane.as_ref().map(|d| &d.pin_root)
            != running.dataplane.as_ref().map(|d| &d.pin_root);
        if next.http_address != running.http_address || pins_changed {
            let pins = next.dataplane.as_ref().map(|d| d.pin_root.clone());
            if let Err(err) = self.serve_http_with(next.http_address, pins).await {
                error!(%err, "http.address: {:?}: cannot listen there; still serving on {:?}", next.http_address.map(|a| a.to_string()), running.http_address.map(|a| a.to_string()));
                let pins = next.dataplane.as_ref().map(|d| d.pin_root.clone());
                if let Err(err) = self.serve_http_with(running.http_address, pins).await {
                    error!(%err, "cannot serve HTTP on the previous address either");
                }
                next.http_address = running.http_address;
            } else if next.http_address != running.http_address {
                info!(address = ?next.http_address.map(|a| a.to_string()), "http.address changed");
            }
        }
        let neighbours_changed =
            next.neighbours != running.neighbours || next.dataplane != running.dataplane;
        self.running = next;
        if neighbours_changed {
            // Started with the dataplane above, but from the running config of then.
            let running = self.running.clone();
            self.start_neighbours(&running);
        }
    }

    fn write_status(&mut self, path: &Path) {
        if let Some(old) = self.status_writer.take() {
            old.abort();
        }
        self.status_writer = Some(tokio::spawn(status_file::write_each(
            path.to_owned(),
            self.applied.clone(),
        )));
    }

    async fn serve_http(&mut self, address: Option<SocketAddr>) -> Result<()> {
        let pins = self.running.dataplane.as_ref().map(|d| d.pin_root.clone());
        Ok(self.serve_http_with(address, pins).await?)
    }

    /// Stops serving where it did, and serves on `address` (if any).
    async fn serve_http_with(
        &mut self,
        address: Option<SocketAddr>,
        pins: Option<PathBuf>,
    ) -> Result<(), crate::http::HttpError> {
        if let Some(old) = self.http.take() {
            old.abort();
            // Its listener goes with it: the same port can be bound again.
            let _ = old.await;
        }
        let Some(address) = address else {
            return Ok(());
        };
        let registry = metrics::registry(
            &self.counts,
            metrics::Sources {
                status: self.applied.clone(),
                pins,
            },
        );
        self.http = Some(crate::http::serve(address, registry, self.applied.clone()).await?);
        Ok(())
    }

    /// Follows `config`'s source from now on; the previous one stops. Its last state stays
    /// the desired state until the new one delivers its first.
    fn start_source(&mut self, config: &Config) {
        let updates = self.updates.clone();
        let task = match &config.source {
            Source::File { path } => {
                let (file_tx, file_updates) = watch::channel(None);
                let watching = sources::file::watch(path.clone(), file_tx, self.reread.clone());
                // Ends with the file's watch, when this source is replaced.
                tokio::spawn(sources::file::with_node_labels(
                    file_updates,
                    self.node_labels.subscribe(),
                    attribute_policy(self.routing_config.subscribe()),
                    updates,
                ));
                tokio::spawn(async move { watching.await.map_err(anyhow::Error::new) })
            }
            Source::Kubernetes(kubernetes) => {
                if !config.node_labels.is_empty() {
                    warn!(
                        "node.labels is for the file source: with Kubernetes the Node's own labels select routing protocols"
                    );
                }
                let watching = sources::kubernetes::watch(
                    kubernetes.clone(),
                    config.node_name.clone(),
                    updates,
                    self.outcomes.clone(),
                    attribute_policy(self.routing_config.subscribe()),
                );
                tokio::spawn(async move { watching.await.map_err(anyhow::Error::new) })
            }
        };
        if let Some(old) = self.source.replace(task) {
            old.abort();
        }
    }

    /// Takes the old dataplane down as far as `next` needs, then starts `next`.
    async fn restart_dataplane(
        &mut self,
        running: Option<&DataplaneConfig>,
        next: Option<&DataplaneConfig>,
    ) {
        if let Some(follower) = self.follower.take() {
            follower.abort();
            // Gone, with the links and maps it holds, before anything is detached.
            let _ = follower.await;
        }
        self.dataplane_off = None;
        self.change(Change::Off(Slot::Dataplane, None));
        // Out of the reconciler, with its maps and its writer's lock; the neighbours sink
        // writes the same program's maps.
        self.change(Change::Sink(Slot::Neighbours, None));
        self.change(Change::Sink(Slot::Dataplane, None));
        if let Some(old) = running {
            let old_pins = PinLayout::new(&old.pin_root);
            if next.is_none_or(|next| next.pin_root != old.pin_root) {
                info!(pin_root = %old.pin_root.display(), "dataplane removed or moved: detaching its programs and removing its pins");
                if let Err(err) = crate::dataplane::detach_all(&old_pins) {
                    error!(%err, "cannot detach the previous dataplane");
                }
            } else if next.is_some_and(|next| next.mode != old.mode) {
                // An attached program keeps its mode: attach afresh.
                info!(mode = ?next.map(|n| n.mode), "dataplane.mode changed: attaching the program again in the new mode");
                let here = crate::dataplane::local_link("lo").map(|lo| lo.netns).ok();
                for link in old_pins.pinned_xdp_links().unwrap_or_default() {
                    if Some(link.netns) == here
                        && let Err(err) = crate::dataplane::forget(&old_pins, link)
                    {
                        error!(%err, ifindex = link.ifindex, "cannot detach the program");
                    }
                }
            } else {
                info!("dataplane.interfaces changed: following the new list");
            }
        }
        if let Some(next) = next {
            self.start_dataplane(next).await;
        }
    }

    async fn start_dataplane(&mut self, config: &DataplaneConfig) {
        match dataplane::start(config).await {
            Ok(started) => {
                self.change(Change::Sink(Slot::Dataplane, Some(Box::new(started.sink))));
                self.follower = started.follower;
                self.refused = Some(started.refused);
                let running = self.running.clone();
                self.start_neighbours(&running);
                if self.dataplane_off.take().is_some() {
                    info!("the dataplane is on again");
                    self.change(Change::Off(Slot::Dataplane, None));
                }
            }
            Err(err) => {
                let reason =
                    format!("the dataplane's maps are not available: the dataplane is off ({err})");
                let off = Off::after(self.dataplane_off.take(), reason);
                self.change(Change::Off(Slot::Dataplane, Some(off.reason.clone())));
                self.dataplane_off = Some(off);
            }
        }
    }

    /// Puts in the neighbours sink `config` asks for, or takes it out; it needs the dataplane's
    /// maps, so it starts only once the dataplane has.
    fn start_neighbours(&mut self, config: &Config) {
        let sink = match (&config.neighbours, &config.dataplane) {
            (Some(neighbours), Some(dataplane)) if self.dataplane_off.is_none() => {
                neighbours::start(
                    &config.node_name,
                    neighbours,
                    dataplane,
                    self.refused.clone(),
                )
            }
            _ => None,
        };
        self.change(Change::Sink(Slot::Neighbours, sink));
    }

    /// Starts routing as `config` asks, if it does; off (and retried) when it cannot start.
    async fn start_routing(&mut self, config: &Config) {
        let Some(routing) = &config.routing else {
            self.routing_off = None;
            return;
        };
        let interface = &config.addresses.interface;
        let started = match router_id_default(interface).await {
            Ok(router_id) => {
                RoutingSink::start(routing, interface, router_id).map_err(anyhow::Error::new)
            }
            Err(err) => Err(err),
        };
        match started {
            Ok((sink, bird)) => {
                // Off, if it was, until its task reports (`routing_ran`) or fails again.
                self.change(Change::Sink(Slot::Routing, Some(Box::new(sink))));
                self.bird = Some(bird);
            }
            Err(err) => self.routing_is_off(format!("routing is off: {err:#}")),
        }
    }

    fn routing_is_off(&mut self, reason: String) {
        let off = Off::after(self.routing_off.take(), reason);
        self.change(Change::Off(Slot::Routing, Some(off.reason.clone())));
        self.routing_off = Some(off);
    }
}

fn address_sink(interface: &str) -> Result<AddressSink> {
    let mut sink = AddressSink::connect(interface)?;
    sink.notice_changes()?;
    Ok(sink)
}

/// Resolves once a routing task reports what BIRD does: it made its state directory.
async fn routing_ran(applied: &mut watch::Receiver<Option<Status>>) {
    let ran = applied
        .wait_for(|status| {
            status
                .as_ref()
                .and_then(|s| s.routing.as_ref())
                .is_some_and(|routing| !routing.bird.is_empty())
        })
        .await
        .is_ok();
    if !ran {
        std::future::pending::<()>().await;
    }
}

/// Resolves once the published status comes from `interface`'s sink.
async fn moved_to(applied: &mut watch::Receiver<Option<Status>>, interface: &str) {
    let moved = applied
        .wait_for(|status| status.as_ref().is_some_and(|s| s.interface == interface))
        .await
        .is_ok();
    if !moved {
        std::future::pending::<()>().await;
    }
}

/// Deletes the interface lbagent used before `addresses.interface` changed, once the new one
/// holds the addresses: the old one must not keep them local, nor the routes to them.
async fn retire_interface(old: &str) {
    let deleted = match AddressSink::connect(old) {
        Ok(sink) => sink.delete_link().await,
        Err(err) => Err(err),
    };
    match deleted {
        Ok(true) => info!(interface = %old, "deleted the previous load-balancer interface"),
        Ok(false) => {}
        Err(err) => {
            error!(interface = %old, %err, "cannot delete the previous load-balancer interface")
        }
    }
}

async fn ended(
    task: &mut Option<JoinHandle<Result<()>>>,
) -> Result<Result<()>, tokio::task::JoinError> {
    match task {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

async fn routing_failed(bird: &mut Option<Bird>) -> String {
    match bird {
        Some(bird) => bird.failed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Addresses stay: a restart must not withdraw routes. `lbagent cleanup` removes them.
fn stopping(signal: &str) -> Result<()> {
    info!("{signal}: stopping; addresses stay in place (`lbagent cleanup` removes them)");
    Ok(())
}

/// The router id when the config sets none. In a cluster the downward API gives HOST_IP: the
/// address the routers know the node by; else the node's first global IPv4 address.
async fn router_id_default(interface: &str) -> Result<Option<Ipv4Addr>> {
    match std::env::var("HOST_IP").ok().map(|ip| (ip.parse(), ip)) {
        Some((Ok(ip), _)) => return Ok(Some(ip)),
        Some((Err(_), text)) if text.parse::<std::net::Ipv6Addr>().is_err() => {
            warn!(host_ip = %text, "HOST_IP is not an IP address; ignoring it");
        }
        _ => {}
    }
    Ok(AddressSink::connect(interface)?.node_ipv4().await?)
}

/// Follows lbagent's own config file: each valid version goes to the parts, which apply
/// what changed; a version that fails validation changes nothing and says so.
async fn follow_config(
    path: PathBuf,
    overrides: Overrides,
    edits: watch::Sender<Result<Config, String>>,
    reread: watch::Receiver<u64>,
) {
    let result = crate::watch::follow(&path, crate::config::MAX_FILE_BYTES, reread, |event| {
        let text = match event {
            FileEvent::Changed(text) => text,
            FileEvent::Unreadable(err) => {
                error!(path = %path.display(), %err, "cannot read the config file; keeping the running config");
                return ControlFlow::Continue(());
            }
        };
        match Config::parse(&text, &path, overrides.node_name.as_deref()) {
            Ok(mut next) => {
                overrides.apply(&mut next);
                let _previous = edits.send_replace(Ok(next));
            }
            Err(err) => {
                error!("{err}; keeping the running config");
                let _previous = edits.send_replace(Err(err.to_string()));
            }
        }
        ControlFlow::Continue(())
    })
    .await;
    if let Err(err) = result {
        error!(%err, "no longer following the config file");
    }
}

/// The routing section's allow-list of Services' BGP attributes, following the section as it
/// changes: the sources apply it.
fn attribute_policy(
    mut routing: watch::Receiver<Option<RoutingConfig>>,
) -> watch::Receiver<crate::desired::AttributePolicy> {
    fn policy_of(routing: &Option<RoutingConfig>) -> crate::desired::AttributePolicy {
        routing
            .as_ref()
            .and_then(|routing| routing.service_attributes.as_ref())
            .map(|attributes| attributes.policy.clone())
            .unwrap_or_default()
    }
    let (policy, following) = watch::channel(policy_of(&routing.borrow_and_update()));
    tokio::spawn(async move {
        while routing.changed().await.is_ok() {
            let next = policy_of(&routing.borrow_and_update());
            policy.send_if_modified(|current| {
                let changed = *current != next;
                if changed {
                    current.clone_from(&next);
                }
                changed
            });
            if policy.is_closed() {
                return;
            }
        }
    });
    following
}
