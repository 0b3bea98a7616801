//! `lbagent membership`: this node's member of the SWIM membership that decides who answers
//! for local addresses. It runs beside the agent, in its own process (in a pod: a second
//! container), so that it outlives the agent's restarts.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use crate::{
    config,
    dataplane::PinLayout,
    logging::{self, LogFormat},
    membership::{self, Settings},
    sources::kubernetes::{KubernetesSource, client},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    name: String,
    /// Address and port to run the protocol on (UDP).
    #[arg(
        long,
        env = "LBAGENT_MEMBERSHIP_BIND",
        required_unless_present = "address"
    )]
    bind: Option<SocketAddr>,
    /// The address to run the protocol on, with `--port` (in a pod: the node's, from the
    /// downward API's `status.hostIP`).
    #[arg(long, env = "HOST_IP", conflicts_with = "bind")]
    address: Option<IpAddr>,
    #[arg(long, default_value_t = 7946)]
    port: u16,
    /// Another node's membership address; repeat for each (any one alive is enough).
    #[arg(long = "seed")]
    seeds: Vec<SocketAddr>,
    /// Where the live members are published for the agent.
    #[arg(long, default_value = config::DEFAULT_MEMBERS_FILE)]
    members_file: PathBuf,
    /// Learn the seeds (each Node's InternalIP at `--port`) and the excluded nodes from the
    /// Node objects.
    #[arg(long)]
    kubernetes: bool,
    /// With `--kubernetes`; default: `$KUBECONFIG`, `~/.kube/config`, then in-cluster.
    #[arg(long, requires = "kubernetes")]
    kubeconfig: Option<PathBuf>,
}

pub fn run(args: Args, pins: PinLayout, log_format: Option<LogFormat>) -> Result<()> {
    logging::init(log_format, "info");
    let bind = match (args.bind, args.address) {
        (Some(bind), _) => bind,
        (None, Some(address)) => SocketAddr::new(address, args.port),
        (None, None) => anyhow::bail!("--bind or --address (or $HOST_IP) is needed"),
    };
    let mut settings = Settings {
        name: args.name,
        bind,
        seeds: args.seeds,
        members_file: args.members_file,
        pins: Some(pins),
        nodes: None,
    };
    super::runtime()?.block_on(async {
        if args.kubernetes {
            let source = KubernetesSource {
                load_balancer_class: None,
                kubeconfig: args.kubeconfig,
            };
            let client = client(&source).await.context("membership --kubernetes")?;
            let (facts, nodes) = watch::channel(None);
            tokio::spawn(membership::kubernetes::follow(
                client,
                settings.name.clone(),
                bind,
                facts,
            ));
            settings.nodes = Some(nodes);
        }
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        membership::run(settings, stop).await?;
        anyhow::Ok(())
    })
}
