//! `lbagent allocator`: run the address allocator, or print its CRDs or its pools.

use std::{io::Write, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};
use kube::{Api, ResourceExt as _, api::ListParams};

use super::Output;
use crate::{
    allocator::{self, AddressPool, Settings, crds_yaml, pool::FamilyUsage},
    logging::{self, LogFormat},
};

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
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
struct RunArgs {
    /// `None`: `$KUBECONFIG`, `~/.kube/config`, then the in-cluster service account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Serve Services of this `spec.loadBalancerClass` (none: Services without a class).
    #[arg(long, env = "LBAGENT_LOAD_BALANCER_CLASS")]
    load_balancer_class: Option<String>,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "lbagent")]
    lease_namespace: String,
    #[arg(long, default_value = "lbagent-allocator")]
    lease_name: String,
    /// This replica's name in the Lease (default: the host name and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long a leader's Lease lasts without renewal: a standby takes over after it.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// A leader that cannot renew for this long stops writing (less than the duration).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    renew_deadline: Duration,
    /// How often the Lease is renewed or tried.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    retry_period: Duration,
}

pub fn run(args: Args, log_format: Option<LogFormat>, out: &mut impl Write) -> Result<()> {
    match args.command {
        Some(Command::Crds) => {
            out.write_all(crds_yaml()?.as_bytes())?;
            Ok(())
        }
        Some(Command::Pools { kubeconfig, output }) => {
            logging::init(log_format, "warn");
            let pools = runtime()?.block_on(async {
                let client = allocator::client(kubeconfig).await?;
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
            let args = args.run;
            if args.renew_deadline >= args.lease_duration {
                anyhow::bail!(
                    "--renew-deadline {:?} must be shorter than --lease-duration {:?}",
                    args.renew_deadline,
                    args.lease_duration
                );
            }
            let settings = Settings {
                kubeconfig: args.kubeconfig,
                load_balancer_class: args.load_balancer_class,
                lease_namespace: args.lease_namespace,
                lease_name: args.lease_name,
                identity: args.identity,
                lease_duration: args.lease_duration,
                renew_deadline: args.renew_deadline,
                retry_period: args.retry_period,
            };
            runtime()?.block_on(allocator::serve(settings))
        }
    }
}

/// One thread: on two, the allocator's tasks woke each other across the two cores it shares
/// with the API server (`cargo xtask bench allocator`: 10,000 Services took about 1.6 times
/// as long as on one, beside the same API server).
fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn write_pools_table(out: &mut impl Write, pools: &[AddressPool]) -> Result<()> {
    writeln!(
        out,
        "{:<20} {:<5} {:>8} {:>18} {:>18}  STATE",
        "POOL", "AUTO", "PRIORITY", "IPV4 USED/TOTAL", "IPV6 USED/TOTAL"
    )?;
    for pool in pools {
        let status = pool.status.clone().unwrap_or_default();
        let usage = |usage: &Option<FamilyUsage>| match usage {
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
