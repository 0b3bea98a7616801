//! `lbagent run`: wires the source, the reconciler and the sinks together, and follows the
//! config file so that routing changes apply without a restart.

use std::{ops::ControlFlow, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use crate::{
    config::{Config, Source},
    dataplane,
    reconcile::{Inputs, Reconciler},
    sinks::{
        addresses::AddressSink,
        routing::{
            self, BirdPaths, Stop,
            model::{IfaceName, Mode, RoutingConfig},
            render::render_for_mode,
        },
    },
    sources,
    status::StatusWriter,
    watch::FileEvent,
};

pub async fn run(config_path: PathBuf, node_name: Option<String>, config: Config) -> Result<()> {
    let interface = config.addresses.interface.clone();
    let sink = AddressSink::connect(&interface)?;
    let kernel_changes = sink.changes()?;

    let (updates_tx, updates) = watch::channel(None);
    let source_name = match &config.source {
        Source::File { path } => path.display().to_string(),
        Source::Kubernetes(_) => "kubernetes".to_owned(),
    };
    info!(
        node = %config.node_name,
        %interface,
        source = %source_name,
        resync = %humantime::format_duration(config.addresses.resync_interval),
        routing = config.routing.as_ref().map_or("none", |r| match r.mode {
            Mode::Managed { .. } => "managed BIRD",
            Mode::External { .. } => "external BIRD",
        }),
        "lbagent starting"
    );

    let (stop_tx, stop_rx) = watch::channel(Stop::No);
    let routing = match &config.routing {
        Some(routing_config) => {
            Some(start_routing(&sink, routing_config, &interface, &config, stop_rx).await?)
        }
        None => None,
    };
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
    tokio::spawn(follow_config(
        config_path,
        node_name,
        config.clone(),
        routing.as_ref().map(|r| r.renderer.clone()),
        reread.clone(),
    ));
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let mut reconciler = Reconciler::new(
        sink,
        StatusWriter::new(&config.status_path),
        config.node_name.clone(),
    );
    if let Some(dataplane) = &config.dataplane
        && let Some(maps) = dataplane::start(dataplane, &interface).await
    {
        reconciler = reconciler.with_dataplane(maps);
    }
    if let (Some(neighbours), Some(dataplane)) = (&config.neighbours, &config.dataplane) {
        start_neighbours(
            &config.node_name,
            neighbours,
            dataplane,
            reconciler.applied(),
        );
    }
    if let Some(address) = config.http_address {
        let metrics = crate::metrics::ReconcileMetrics::default();
        reconciler = reconciler.with_metrics(metrics.clone());
        let registry = crate::metrics::registry(
            &metrics,
            crate::metrics::Sources {
                status: reconciler.applied(),
                pins: config.dataplane.as_ref().map(|d| d.pin_root.clone()),
                routing_status: config
                    .routing
                    .as_ref()
                    .map(|_| routing::status_path(&config.status_path)),
            },
        );
        crate::http::serve(address, registry, reconciler.applied()).await?;
    }
    let mut source = match &config.source {
        Source::File { path } => {
            let watching = sources::file::watch(path.clone(), updates_tx, reread);
            tokio::spawn(async move { watching.await.map_err(anyhow::Error::new) })
        }
        Source::Kubernetes(kubernetes) => {
            let watching = sources::kubernetes::watch(
                kubernetes.clone(),
                config.node_name.clone(),
                updates_tx,
                reconciler.applied(),
            );
            tokio::spawn(async move { watching.await.map_err(anyhow::Error::new) })
        }
    };
    let inputs = Inputs {
        updates,
        kernel_changes,
        resync_interval: config.addresses.resync_interval,
        resync_now,
    };
    let result = tokio::select! {
        () = reconciler.run(inputs) => Ok(()),
        result = &mut source => {
            let err = match result {
                Ok(Ok(())) => anyhow::anyhow!("ended"),
                Ok(Err(err)) => err,
                Err(join) => anyhow::Error::new(join),
            };
            error!(%err, "the services source stopped");
            Err(err.context("the services source stopped"))
        }
        _ = term.recv() => stopping("SIGTERM"),
        _ = int.recv() => stopping("SIGINT"),
    };
    if let Some(routing) = routing {
        // A planned stop: BIRD restarts gracefully, so peers keep the routes meanwhile.
        let _ = stop_tx.send(Stop::Graceful);
        if tokio::time::timeout(Duration::from_secs(15), routing.task)
            .await
            .is_err()
        {
            warn!("BIRD did not stop within 15 s");
        }
    }
    result
}

/// Addresses stay: a restart must not withdraw routes. `lbagent cleanup` removes them.
fn stopping(signal: &str) -> Result<()> {
    info!("{signal}: stopping; addresses stay in place (`lbagent cleanup` removes them)");
    Ok(())
}

/// Renders routing configs for one interface and router id, and hands them to BIRD.
#[derive(Clone)]
struct Renderer {
    router_id_default: Option<std::net::Ipv4Addr>,
    interface: IfaceName,
    configs: watch::Sender<String>,
}

impl Renderer {
    fn render(&self, config: &RoutingConfig) -> Option<String> {
        let router_id = config.router_id.or(self.router_id_default)?;
        Some(render_for_mode(config, router_id, &self.interface))
    }
}

struct Routing {
    renderer: Renderer,
    task: tokio::task::JoinHandle<()>,
}

async fn start_routing(
    sink: &AddressSink,
    routing_config: &RoutingConfig,
    interface: &str,
    config: &Config,
    stop: watch::Receiver<Stop>,
) -> Result<Routing> {
    // In a cluster the downward API gives HOST_IP: the address the routers know the node by.
    let router_id_default = match std::env::var("HOST_IP").ok().map(|ip| (ip.parse(), ip)) {
        Some((Ok(ip), _)) => Some(ip),
        Some((Err(_), text)) => {
            if text.parse::<std::net::Ipv6Addr>().is_err() {
                warn!(host_ip = %text, "HOST_IP is not an IP address; ignoring it");
            }
            sink.node_ipv4().await?
        }
        None => sink.node_ipv4().await?,
    };
    if routing_config.router_id.is_none() && router_id_default.is_none() {
        anyhow::bail!("routing.routerId: this node has no IPv4 address to default to; set one");
    }
    let interface = IfaceName::new(interface, "addresses.interface")?;
    let (tx, rx) = watch::channel(String::new());
    let renderer = Renderer {
        router_id_default,
        interface,
        configs: tx,
    };
    let text = renderer
        .render(routing_config)
        .context("routing.routerId")?;
    renderer.configs.send_replace(text);
    let status_file = routing::status_path(&config.status_path);
    let task = match routing_config.mode.clone() {
        Mode::Managed { binary, state_dir } => {
            if let Err(err) = routing::check_installed(&binary) {
                return Err(err.into());
            }
            tokio::spawn(async move {
                if let Err(err) =
                    routing::run_managed(binary, BirdPaths::new(&state_dir), rx, stop, status_file)
                        .await
                {
                    error!(%err, "routing stopped");
                }
            })
        }
        Mode::External { include, socket } => {
            tokio::spawn(routing::run_external(include, socket, rx, status_file))
        }
    };
    Ok(Routing { renderer, task })
}

/// Starts the neighbours sink beside the reconciler; without it, local addresses are only
/// reported, and the log says so.
fn start_neighbours(
    node: &str,
    neighbours: &crate::config::NeighboursConfig,
    dataplane: &crate::config::DataplaneConfig,
    applied: watch::Receiver<Option<crate::status::Status>>,
) {
    let pins = crate::dataplane::PinLayout::new(&dataplane.pin_root);
    match crate::sinks::neighbours::NeighbourSink::new(node.to_owned(), &pins) {
        Ok(sink) => {
            tokio::spawn(crate::sinks::neighbours::run(
                sink,
                neighbours.members_file.clone(),
                applied,
            ));
        }
        Err(err) => warn!(%err, "local addresses are not answered for"),
    }
}

/// Follows lbagent's own config file. A routing change is rendered and applied to BIRD at
/// once; a file that fails validation changes nothing and says so; changes that need a
/// restart are named.
async fn follow_config(
    path: PathBuf,
    node_name: Option<String>,
    mut current: Config,
    renderer: Option<Renderer>,
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
        let next = match Config::parse(&text, &path, node_name.as_deref()) {
            Ok(next) => next,
            Err(err) => {
                error!("{err}; keeping the running config");
                return ControlFlow::Continue(());
            }
        };
        if next == current {
            return ControlFlow::Continue(());
        }
        match (&renderer, &next.routing) {
            (Some(renderer), Some(routing)) if Some(routing) != current.routing.as_ref() => {
                let same_mode = current
                    .routing
                    .as_ref()
                    .is_some_and(|r| r.mode == routing.mode);
                if !same_mode {
                    warn!("routing.mode, its BIRD binary or paths changed: restart lbagent to apply it");
                } else if let Some(text) = renderer.render(routing) {
                    info!("routing config changed; reconfiguring BIRD");
                    renderer.configs.send_replace(text);
                }
            }
            (None, Some(_)) | (Some(_), None) => warn!("a routing section was added or removed: restart lbagent to apply it"),
            _ => {}
        }
        let mut rest_now = next.clone();
        rest_now.routing = current.routing.clone();
        if rest_now != current {
            warn!("config changes outside `routing` take effect when lbagent restarts");
        }
        current = next;
        ControlFlow::Continue(())
    })
    .await;
    if let Err(err) = result {
        error!(%err, "no longer following the config file");
    }
}
