//! `lbagent run`: the agent itself.

use std::path::PathBuf;

use anyhow::Result;

use crate::logging::{self, LogFormat};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(
        long,
        env = "LBAGENT_CONFIG",
        default_value = "/etc/lbagent/lbagent.yaml"
    )]
    config: PathBuf,
    /// This node's name; overrides the config file's `node.name`.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
}

pub fn run(args: Args, log_format: Option<LogFormat>) -> Result<()> {
    let loaded = crate::daemon::load_config(&args.config, args.node_name.as_deref())?;
    logging::init(log_format.or(loaded.log_format), "info");
    super::runtime()?.block_on(crate::daemon::run(args.config, args.node_name, loaded))
}
