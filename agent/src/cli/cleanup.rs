//! `lbagent cleanup`: removes everything lbagent created on the node.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{
    config::{self, Config},
    dataplane::{self, PinLayout},
    sinks::{
        addresses::AddressSink,
        neighbours::kernel,
        routing::{self, BirdPaths, model::Mode},
    },
};

/// Without `--config`, the flags name what to remove (their defaults are the agent's); with
/// it, the config does. The pin root follows the rule of every subcommand: `--pin-root`,
/// else `$LBAGENT_PIN_ROOT`, else the config's `dataplane.pinRoot`, else the default.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Read the interface, the status file, BIRD's state directory and the pin root from this
    /// config file.
    #[arg(long, env = "LBAGENT_CONFIG")]
    config: Option<PathBuf>,
    /// The load-balancer interface, when there is no config file.
    #[arg(long, default_value = config::DEFAULT_INTERFACE, conflicts_with = "config")]
    interface: String,
    /// The agent's status file (`status.path`), when there is no config file.
    #[arg(long, default_value = config::DEFAULT_STATUS_PATH, conflicts_with = "config")]
    status_file: PathBuf,
    /// A managed BIRD's state directory (`routing.stateDir`), when there is no config file.
    #[arg(long, default_value = routing::model::DEFAULT_STATE_DIR, conflicts_with = "config")]
    state_dir: PathBuf,
}

/// What lbagent may have left on the node, as its config (or the defaults) names it.
struct Leftovers {
    interface: String,
    status_path: PathBuf,
    pins: PinLayout,
    /// A managed BIRD: its binary and state directory.
    bird: Option<(PathBuf, PathBuf)>,
    /// What the kernel responder changed on interfaces that refused the XDP program.
    kernel_state: PathBuf,
}

impl Leftovers {
    fn of(args: Args, pin_root: Option<PathBuf>) -> Result<Self> {
        let default_pins = || PathBuf::from(PinLayout::DEFAULT_ROOT);
        let Some(path) = args.config else {
            return Ok(Self {
                interface: args.interface,
                status_path: args.status_file,
                pins: PinLayout::new(pin_root.unwrap_or_else(default_pins)),
                bird: Some((PathBuf::from("bird"), args.state_dir)),
                kernel_state: kernel::state_path(Path::new(config::DEFAULT_MEMBERS_FILE)),
            });
        };
        let config = Config::load(&path, None)?;
        let members_file = config.neighbours.as_ref().map_or_else(
            || PathBuf::from(config::DEFAULT_MEMBERS_FILE),
            |neighbours| neighbours.members_file.clone(),
        );
        let pin_root = pin_root
            .or(config.dataplane.map(|dataplane| dataplane.pin_root))
            .unwrap_or_else(default_pins);
        Ok(Self {
            interface: config.addresses.interface,
            status_path: config.status_path,
            pins: PinLayout::new(pin_root),
            bird: match config.routing.map(|r| r.mode) {
                Some(Mode::Managed { binary, state_dir }) => Some((binary, state_dir)),
                _ => None,
            },
            kernel_state: kernel::state_path(&members_file),
        })
    }
}

pub fn run(args: Args, pin_root: Option<PathBuf>, out: &mut impl Write) -> Result<()> {
    cleanup(&Leftovers::of(args, pin_root)?, out)
}

/// BIRD first, so that peers withdraw the routes before the addresses go; then the interface,
/// BIRD's state, the dataplane's programs and pins, and the status file.
fn cleanup(leftovers: &Leftovers, out: &mut impl Write) -> Result<()> {
    let runtime = super::runtime()?;
    // `down`, not a graceful restart: peers must withdraw the routes now.
    let bird_was_running = match &leftovers.bird {
        Some((_, state_dir)) => {
            runtime.block_on(routing::down(&BirdPaths::new(state_dir).socket))?
        }
        None => false,
    };
    if bird_was_running {
        writeln!(out, "BIRD: shut down (peers withdraw the routes)")?;
    }
    let interface = &leftovers.interface;
    let deleted =
        runtime.block_on(async { AddressSink::connect(interface)?.delete_link().await })?;
    writeln!(
        out,
        "{interface}: {}",
        if deleted {
            "deleted, with its addresses"
        } else {
            "not present"
        }
    )?;
    if let Some((binary, state_dir)) = &leftovers.bird {
        let paths = BirdPaths::new(state_dir);
        if !bird_was_running && runtime.block_on(routing::withdraw_stale(binary, &paths))? {
            writeln!(
                out,
                "BIRD: restarted without graceful restart and shut down, so peers drop the routes they kept"
            )?;
        }
        match std::fs::remove_dir_all(state_dir) {
            Ok(()) => writeln!(out, "{}: removed", state_dir.display())?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(err).with_context(|| format!("removing {}", state_dir.display()));
            }
        }
    }
    let restored = runtime.block_on(kernel::undo_all(&leftovers.kernel_state))?;
    if !restored.is_empty() {
        writeln!(
            out,
            "kernel responder: sysctls restored and local addresses removed on {}",
            restored.join(", ")
        )?;
    }
    if leftovers.pins.check_bpffs().is_ok() {
        let detached = dataplane::detach_all(&leftovers.pins)?;
        writeln!(
            out,
            "dataplane: {} link(s) detached{}",
            detached.links.len(),
            if detached.maps_removed {
                ", maps removed"
            } else {
                ""
            }
        )?;
    }
    remove_status_file(&leftovers.status_path, out)
}

fn remove_status_file(path: &Path, out: &mut impl Write) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => writeln!(out, "{}: removed", path.display())?,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", path.display())),
    }
    Ok(())
}
