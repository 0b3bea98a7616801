//! `lbagent vip`: load-balancer addresses in the dataplane, by hand.

use std::{io::Write, net::IpAddr};

use anyhow::Result;

use crate::{
    address,
    dataplane::{PinLayout, VipTable},
};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Add addresses (IPv4 or IPv6, optionally as /32 or /128).
    Add {
        #[arg(required = true)]
        addresses: Vec<String>,
    },
    /// Remove addresses and their counters.
    Del {
        #[arg(required = true)]
        addresses: Vec<String>,
    },
}

pub fn run(command: Command, pins: &PinLayout, out: &mut impl Write) -> Result<()> {
    let (adding, texts) = match command {
        Command::Add { addresses } => (true, addresses),
        Command::Del { addresses } => (false, addresses),
    };
    // Every address is checked before any is applied: bad input changes nothing.
    let addresses = texts
        .iter()
        .map(|text| address::parse_host(text))
        .collect::<Result<Vec<IpAddr>, _>>()?;
    let mut table = VipTable::open(pins)?;
    for address in addresses {
        let (changed, verb, unchanged) = if adding {
            (table.insert(address)?, "added", "already present")
        } else {
            (table.remove(address)?, "removed", "not present")
        };
        writeln!(out, "{address} {}", if changed { verb } else { unchanged })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use crate::cli::{Cli, run};

    #[test]
    fn bad_address_is_rejected_before_any_change() {
        // The pin root does not exist: if parsing did not come first, the error would be
        // about bpffs instead of the address.
        let cli = Cli::try_parse_from([
            "lbagent",
            "--pin-root",
            "/nonexistent/lbagent",
            "vip",
            "add",
            "203.0.113.10",
            "300.0.0.1",
        ])
        .unwrap();
        let err = run(cli, &mut Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid address \"300.0.0.1\": not an IPv4 or IPv6 address"
        );
    }
}
