//! `lbagent membership`: this node's member of the SWIM membership that decides who answers
//! for local addresses. It runs beside the agent, in its own process (in a pod: a second
//! container), so that it outlives the agent's restarts.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Result;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    config,
    dataplane::PinLayout,
    logging::{self, LogFormat},
    membership::{self, Settings},
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    name: String,
    /// Address and port to run the protocol on (UDP).
    #[arg(long, env = "LBAGENT_MEMBERSHIP_BIND")]
    bind: SocketAddr,
    /// Another node's membership address; repeat for each (any one alive is enough).
    #[arg(long = "seed")]
    seeds: Vec<SocketAddr>,
    /// Where the live members are published for the agent.
    #[arg(long, default_value = config::DEFAULT_MEMBERS_FILE)]
    members_file: PathBuf,
}

pub fn run(args: Args, pins: PinLayout, log_format: Option<LogFormat>) -> Result<()> {
    logging::init(log_format, "info");
    let settings = Settings {
        name: args.name,
        bind: args.bind,
        seeds: args.seeds,
        members_file: args.members_file,
        pins: Some(pins),
    };
    super::runtime()?.block_on(async {
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
