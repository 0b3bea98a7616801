//! `lbagent attach`: the XDP program on one interface, by hand.

use std::io::Write;

use anyhow::Result;

use crate::dataplane::{self, AttachMode, PinLayout};

#[derive(Debug, clap::Args)]
pub struct Args {
    iface: String,
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    mode: AttachMode,
}

pub fn run(args: Args, pins: &PinLayout, out: &mut impl Write) -> Result<()> {
    let attached = dataplane::attach(pins, &args.iface, args.mode)?;
    match attached.mode {
        Some(mode) => writeln!(
            out,
            "attached to {} (ifindex {}) in {} mode",
            attached.iface,
            attached.ifindex,
            mode_name(mode)
        )?,
        None => writeln!(
            out,
            "replaced the program on {} (ifindex {})",
            attached.iface, attached.ifindex
        )?,
    }
    Ok(())
}

fn mode_name(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Auto => "auto",
        AttachMode::Driver => "driver",
        AttachMode::Generic => "generic",
    }
}
