//! `lbagent bird`: BIRD as lbagent configures it.

use std::{io::Write, path::PathBuf};

use anyhow::{Context as _, Result};

use crate::{
    config::Config,
    sinks::{
        addresses::AddressSink,
        routing::{gateway, model::IfaceName, plan::for_node, render::render_for_mode},
    },
};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print the BIRD config lbagent renders from its config file for this node: the protocols
    /// its `node.labels` select, gateway neighbours at its current default routes.
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
    let gateways = super::runtime()?.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        anyhow::Ok(gateway::read(&handle).await?)
    })?;
    let (node, warnings) = for_node(routing, &loaded.node_labels, &gateways);
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    write!(out, "{}", render_for_mode(&node, router_id, &interface))?;
    Ok(())
}
