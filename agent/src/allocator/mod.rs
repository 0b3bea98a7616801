//! `lbagent allocator`: assigns LoadBalancer addresses from `AddressPool`s, so lbagent needs no
//! other load balancer. It runs as its own Deployment; replicas elect a leader through a Lease
//! ([`lease`]) and only the leader runs the [`controller`], which keeps the pure [`books`].

pub mod books;
pub mod controller;
pub mod lease;
pub mod pool;
pub mod request;

use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use kube::{Api, Client, ResourceExt as _, api::ListParams};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    cli::Output,
    logging::{self, LogFormat},
    sources::kubernetes::{ApiAccess, KubernetesSource, client},
};

pub use pool::{AddressPool, AddressPoolSpec, AddressPoolStatus, crds_yaml};

/// The name the allocator reports Events under.
pub const CONTROLLER: &str = "lbagent-allocator";

/// Every call the allocator makes; its ClusterRole grants exactly these (a test checks it).
pub const API_ACCESS: &[ApiAccess] = &[
    // A 409 on a status write is resolved by reading the Service again.
    ApiAccess {
        group: "",
        resource: "services",
        verbs: &["get", "list", "watch"],
    },
    ApiAccess {
        group: "",
        resource: "services/status",
        verbs: &["patch"],
    },
    ApiAccess {
        group: "",
        resource: "namespaces",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "lbagent.io",
        resource: "addresspools",
        verbs: &["list", "watch"],
    },
    ApiAccess {
        group: "lbagent.io",
        resource: "addresspools/status",
        verbs: &["patch"],
    },
    ApiAccess {
        group: "coordination.k8s.io",
        resource: "leases",
        verbs: &["create", "get", "update"],
    },
    ApiAccess {
        group: "events.k8s.io",
        resource: "events",
        verbs: &["create", "patch"],
    },
];

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<AllocatorCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum AllocatorCommand {
    /// Print the CustomResourceDefinitions (YAML) the allocator needs.
    Crds,
    /// Print the pools with their use, as the allocator reports them.
    Pools {
        /// `None`: `$KUBECONFIG`, `~/.kube/config`, then the in-cluster service account.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// `None`: `$KUBECONFIG`, `~/.kube/config`, then the in-cluster service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Serve Services of this `spec.loadBalancerClass` (none: Services without a class).
    #[arg(long, env = "LBAGENT_LOAD_BALANCER_CLASS")]
    pub load_balancer_class: Option<String>,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "lbagent")]
    pub lease_namespace: String,
    #[arg(long, default_value = "lbagent-allocator")]
    pub lease_name: String,
    /// This replica's name in the Lease (default: the host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long a leader's Lease lasts without renewal: a standby takes over after it.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// A leader that cannot renew for this long stops writing (less than the duration).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub renew_deadline: Duration,
    /// How often the Lease is renewed or tried.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub retry_period: Duration,
}

/// `lbagent allocator ...`.
pub fn run(args: Args, log_format: Option<LogFormat>, out: &mut impl Write) -> Result<()> {
    match args.command {
        Some(AllocatorCommand::Crds) => {
            out.write_all(crds_yaml()?.as_bytes())?;
            Ok(())
        }
        Some(AllocatorCommand::Pools { kubeconfig, output }) => {
            logging::init(log_format, "warn");
            let pools = runtime()?.block_on(async {
                let client = kube_client(kubeconfig).await?;
                let list = Api::<AddressPool>::all(client)
                    .list(&ListParams::default())
                    .await
                    .context("listing AddressPools")?;
                anyhow::Ok(list.items)
            })?;
            match output {
                Output::Json => {
                    serde_json::to_writer_pretty(&mut *out, &pools)?;
                    writeln!(out)?;
                }
                Output::Table => write_pools_table(out, &pools)?,
            }
            Ok(())
        }
        None => {
            logging::init(log_format, "info");
            let settings = args.run;
            if settings.renew_deadline >= settings.lease_duration {
                anyhow::bail!(
                    "--renew-deadline {:?} must be shorter than --lease-duration {:?}",
                    settings.renew_deadline,
                    settings.lease_duration
                );
            }
            runtime()?.block_on(serve(settings))
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn kube_client(kubeconfig: Option<PathBuf>) -> Result<Client> {
    let source = KubernetesSource {
        load_balancer_class: None,
        kubeconfig,
    };
    Ok(client(&source).await?)
}

async fn serve(args: RunArgs) -> Result<()> {
    let client = kube_client(args.kubeconfig.clone()).await?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "allocator".into());
        format!("{host}-{}", std::process::id())
    });
    let settings = controller::Settings {
        load_balancer_class: args.load_balancer_class.clone(),
        identity: identity.clone(),
    };
    info!(
        %identity,
        class = settings.load_balancer_class.as_deref().unwrap_or("(none)"),
        lease = %format!("{}/{}", args.lease_namespace, args.lease_name),
        "allocator starting"
    );
    let (leading_tx, mut leading) = watch::channel(false);
    let election = tokio::spawn(lease::elect(
        client.clone(),
        lease::LeaseConfig {
            namespace: args.lease_namespace,
            name: args.lease_name,
            identity,
            duration: args.lease_duration,
            renew_deadline: args.renew_deadline,
            retry_period: args.retry_period,
        },
        leading_tx,
    ));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        // Standing by: nothing is watched or written.
        tokio::select! {
            changed = leading.wait_for(|leads| *leads) => { changed?; }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
        // A new leader starts from a fresh list, never from what it saw as a standby.
        let controller = controller::Controller::new(client.clone(), settings.clone());
        tokio::select! {
            result = controller.run() => {
                result?;
            }
            changed = leading.wait_for(|leads| !*leads) => {
                changed?;
                warn!("no longer leading: stopped writing");
            }
            _ = terminate.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    info!("stopping");
    drop(leading);
    let _ = tokio::time::timeout(Duration::from_secs(5), election).await;
    Ok(())
}

fn write_pools_table(out: &mut impl Write, pools: &[AddressPool]) -> Result<()> {
    writeln!(
        out,
        "{:<20} {:<5} {:>8} {:>18} {:>18}  STATE",
        "POOL", "AUTO", "PRIORITY", "IPV4 USED/TOTAL", "IPV6 USED/TOTAL"
    )?;
    for pool in pools {
        let status = pool.status.clone().unwrap_or_default();
        let usage = |usage: &Option<pool::FamilyUsage>| match usage {
            Some(u) => format!("{}/{}", u.in_use, u.total),
            None => "-".into(),
        };
        let state = match status.conditions.iter().find(|c| c.type_ == "Ready") {
            Some(c) if c.status == "True" => "ready".to_owned(),
            Some(c) => format!("refused: {}", c.message),
            None => "not yet seen by the allocator".to_owned(),
        };
        writeln!(
            out,
            "{:<20} {:<5} {:>8} {:>18} {:>18}  {state}",
            pool.name_any(),
            if pool.spec.auto_assign { "yes" } else { "no" },
            pool.spec.priority,
            usage(&status.ipv4),
            usage(&status.ipv6),
        )?;
    }
    Ok(())
}

/// Now, as a condition's lastTransitionTime.
pub fn now() -> String {
    use k8s_openapi::jiff::{Timestamp, Unit};
    Timestamp::now()
        .round(Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}
