//! `lbagent bird`: BIRD as lbagent configures it.

use std::{io::Write, path::PathBuf};

use anyhow::{Context as _, Result};

use crate::{
    config::Config,
    sinks::{
        addresses::AddressSink,
        routing::{model::IfaceName, render::render_for_mode},
    },
};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print the BIRD config lbagent renders from its config file.
    Render {
        #[arg(
            long,
            env = "LBAGENT_CONFIG",
            default_value = "/etc/lbagent/lbagent.yaml"
        )]
        config: PathBuf,
        /// Router id to render with when the config sets none (default: the node's first
        /// global IPv4 address).
        #[arg(long)]
        router_id: Option<std::net::Ipv4Addr>,
    },
}

pub fn run(command: Command, out: &mut impl Write) -> Result<()> {
    let Command::Render { config, router_id } = command;
    let loaded = Config::load(&config, None)?;
    let routing = loaded
        .routing
        .as_ref()
        .context("the config has no routing section")?;
    let interface = IfaceName::new(&loaded.addresses.interface, "addresses.interface")?;
    let router_id = match routing.router_id.or(router_id) {
        Some(id) => id,
        None => super::runtime()?
            .block_on(async { AddressSink::connect(&loaded.addresses.interface)?.node_ipv4().await })?
            .context("routing.routerId: this node has no IPv4 address to default to; set one or pass --router-id")?,
    };
    write!(out, "{}", render_for_mode(routing, router_id, &interface))?;
    Ok(())
}
