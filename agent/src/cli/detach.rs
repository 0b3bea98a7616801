//! `lbagent detach`: the XDP program off one interface, or off all.

use std::io::Write;

use anyhow::Result;

use crate::dataplane::{self, PinLayout};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Absent only with `--all`.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    iface: Option<String>,
    /// Detach from every interface, including ones that no longer exist.
    #[arg(long)]
    all: bool,
}

pub fn run(args: Args, pins: &PinLayout, out: &mut impl Write) -> Result<()> {
    let detached = match args.iface {
        Some(iface) => dataplane::detach(pins, &iface)?,
        None => dataplane::detach_all(pins)?,
    };
    writeln!(
        out,
        "detached from {} interface(s){}",
        detached.links.len(),
        if detached.maps_removed {
            "; maps removed"
        } else {
            ""
        }
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::Cli;

    #[test]
    fn detach_needs_an_interface_or_all() {
        assert!(Cli::try_parse_from(["lbagent", "detach"]).is_err());
        assert!(Cli::try_parse_from(["lbagent", "detach", "eth0", "--all"]).is_err());
        assert!(Cli::try_parse_from(["lbagent", "detach", "--all"]).is_ok());
    }
}
