//! `lbagent run`: wires the source, the reconciler and the sinks together.

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, watch},
};
use tracing::{error, info};

use crate::{
    config::{Config, Source},
    reconcile::{Inputs, Reconciler},
    sinks::addresses::AddressSink,
    sources,
    status::StatusWriter,
};

pub async fn run(config: Config) -> Result<()> {
    let interface = config.addresses.interface.clone();
    let sink = AddressSink::connect(&interface)?;
    let kernel_changes = sink.changes()?;

    let (updates_tx, updates) = watch::channel(None);
    let Source::File { path } = &config.source;
    info!(
        node = %config.node_name,
        %interface,
        source = %path.display(),
        resync = %humantime::format_duration(config.addresses.resync_interval),
        "lbagent starting"
    );
    let mut source = tokio::spawn(sources::file::watch(path.clone(), updates_tx));

    let (resync_tx, resync_now) = mpsc::channel(1);
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let _ = resync_tx.try_send(());
        }
    });
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let reconciler = Reconciler::new(
        sink,
        StatusWriter::new(&config.status_path),
        config.node_name.clone(),
    );
    let inputs = Inputs {
        updates,
        kernel_changes,
        resync_interval: config.addresses.resync_interval,
        resync_now,
    };
    tokio::select! {
        () = reconciler.run(inputs) => {}
        result = &mut source => {
            let err = match result {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(err)) => anyhow::Error::new(err),
                Err(join) => anyhow::Error::new(join),
            };
            error!(%err, "the services source stopped");
            return Err(err.context("the services source stopped"));
        }
        _ = term.recv() => stopping("SIGTERM"),
        _ = int.recv() => stopping("SIGINT"),
    }
    Ok(())
}

/// Addresses stay: a restart must not withdraw routes. `lbagent cleanup` removes them.
fn stopping(signal: &str) {
    info!("{signal}: stopping; addresses stay in place (`lbagent cleanup` removes them)");
}
