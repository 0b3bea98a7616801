//! `lbagent run`: wires the source, the reconciler, its sinks and the face (status file, HTTP)
//! together, and follows the config file so that routing changes apply without a restart.

use std::{
    net::Ipv4Addr,
    ops::ControlFlow,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info, warn};

use crate::{
    config::{Config, ConfigError, Source},
    metrics,
    reconcile::{Inputs, ReconcileMetrics, Reconciler},
    sinks::{
        Driven,
        addresses::AddressSink,
        dataplane, neighbours,
        routing::{
            RoutingSink,
            model::{Mode, RoutingConfig},
        },
    },
    sources, status_file,
    watch::FileEvent,
};

/// `Config::load`, with what to mount when the file is not there: in a pod, a missing
/// config is a missing volume, not a typo.
pub fn load_config(path: &Path, node_name: Option<&str>) -> Result<Config> {
    Config::load(path, node_name).map_err(|err| match &err {
        ConfigError::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            let dir = path.parent().unwrap_or(Path::new("/"));
            anyhow::Error::new(err).context(format!(
                "no config file: mount the config at {} (in a pod: the lbagent-config ConfigMap, as deploy/daemonset.yaml does) or pass --config",
                dir.display()
            ))
        }
        _ => err.into(),
    })
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

pub async fn run(config_path: PathBuf, node_name: Option<String>, config: Config) -> Result<()> {
    preflight(&config)?;
    let interface = config.addresses.interface.clone();
    let mut addresses = AddressSink::connect(&interface)?;
    addresses.notice_changes()?;

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

    let routing = match &config.routing {
        Some(routing) => {
            let router_id_default = router_id_default(&addresses).await?;
            Some(RoutingSink::start(routing, &interface, router_id_default)?)
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
    let (routing_tx, routing_config) = watch::channel(config.routing.clone());
    let (labels_tx, node_labels) = watch::channel(config.node_labels.clone());
    tokio::spawn(follow_config(
        config_path,
        node_name,
        config.clone(),
        routing_tx,
        labels_tx,
        reread.clone(),
    ));
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    // In the order the reconciler drives them: the dataplane serves the addresses.
    let mut sinks: Vec<Box<dyn Driven>> = vec![Box::new(addresses)];
    if let Some(dataplane) = &config.dataplane
        && let Some(sink) = dataplane::start(dataplane).await
    {
        sinks.push(Box::new(sink));
        if let Some(neighbours) = &config.neighbours {
            sinks.extend(neighbours::start(&config.node_name, neighbours, dataplane));
        }
    }
    let bird = routing.map(|(sink, bird)| {
        sinks.push(Box::new(sink));
        bird
    });
    let mut reconciler = Reconciler::new(config.node_name.clone(), sinks);
    tokio::spawn(status_file::write_each(
        config.status_path.clone(),
        reconciler.applied(),
    ));
    if let Some(address) = config.http_address {
        let counts = ReconcileMetrics::default();
        reconciler = reconciler.with_metrics(counts.clone());
        let registry = metrics::registry(
            &counts,
            metrics::Sources {
                status: reconciler.applied(),
                pins: config.dataplane.as_ref().map(|d| d.pin_root.clone()),
            },
        );
        crate::http::serve(address, registry, reconciler.applied()).await?;
    }
    let mut source = match &config.source {
        Source::File { path } => {
            let (file_tx, file_updates) = watch::channel(None);
            let watching = sources::file::watch(path.clone(), file_tx, reread);
            tokio::spawn(sources::file::with_node_labels(
                file_updates,
                node_labels,
                updates_tx,
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
                updates_tx,
                reconciler.outcomes(),
            );
            tokio::spawn(async move { watching.await.map_err(anyhow::Error::new) })
        }
    };
    let inputs = Inputs {
        updates,
        routing: routing_config,
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
    if let Some(bird) = bird {
        bird.stop().await;
        // A stopped BIRD has no sessions: the status file must not show the old ones as
        // current to whoever reads it before the next agent writes its own.
        reconciler.publish();
        if let Some(status) = reconciler.applied().borrow().as_ref()
            && let Err(err) = status_file::write(&config.status_path, status)
        {
            warn!(%err, "cannot write the status file");
        }
    }
    result
}

/// Addresses stay: a restart must not withdraw routes. `lbagent cleanup` removes them.
fn stopping(signal: &str) -> Result<()> {
    info!("{signal}: stopping; addresses stay in place (`lbagent cleanup` removes them)");
    Ok(())
}

/// The router id when the config sets none. In a cluster the downward API gives HOST_IP: the
/// address the routers know the node by; else the node's first global IPv4 address.
async fn router_id_default(addresses: &AddressSink) -> Result<Option<Ipv4Addr>> {
    match std::env::var("HOST_IP").ok().map(|ip| (ip.parse(), ip)) {
        Some((Ok(ip), _)) => return Ok(Some(ip)),
        Some((Err(_), text)) if text.parse::<std::net::Ipv6Addr>().is_err() => {
            warn!(host_ip = %text, "HOST_IP is not an IP address; ignoring it");
        }
        _ => {}
    }
    Ok(addresses.node_ipv4().await?)
}

/// Follows lbagent's own config file. A routing change goes to the reconciler, which hands
/// it to BIRD; a file that fails validation changes nothing and says so; changes that need a
/// restart are named.
async fn follow_config(
    path: PathBuf,
    node_name: Option<String>,
    mut current: Config,
    routing: watch::Sender<Option<RoutingConfig>>,
    labels: watch::Sender<crate::desired::NodeLabels>,
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
        match (&current.routing, &next.routing) {
            (Some(running), Some(wanted)) if running != wanted => {
                if running.mode == wanted.mode {
                    routing.send_replace(Some(wanted.clone()));
                } else {
                    warn!("routing.mode, its BIRD binary or paths changed: restart lbagent to apply it");
                }
            }
            (None, Some(_)) | (Some(_), None) => warn!("a routing section was added or removed: restart lbagent to apply it"),
            _ => {}
        }
        if next.node_labels != current.node_labels {
            info!(labels = ?next.node_labels, "node labels changed");
            labels.send_replace(next.node_labels.clone());
        }
        let mut outside_routing = next.clone();
        outside_routing.routing = current.routing.clone();
        outside_routing.node_labels = current.node_labels.clone();
        if outside_routing != current {
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
