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

/// `pin_root`: `--pin-root` or `$LBAGENT_PIN_ROOT`, which win over the config's
/// `dataplane.pinRoot`.
pub fn run(args: Args, pin_root: Option<PathBuf>, log_format: Option<LogFormat>) -> Result<()> {
    let overrides = crate::daemon::Overrides {
        node_name: args.node_name,
        pin_root,
        log_format,
    };
    let loaded = crate::daemon::load_config(&args.config, &overrides)?;
    logging::init(log_format.or(loaded.log_format), "info");
    super::runtime()?.block_on(crate::daemon::run(args.config, overrides, loaded))
}
