//! Logging: lbagent's log lines go to stderr, human-readable or as JSON.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

/// Logs go to stderr; `LBAGENT_LOG` (a tracing filter such as `debug`) overrides the level.
pub fn init(format: Option<LogFormat>, default_level: &str) {
    // netlink-packet-route warns on every link message from a kernel newer than it knows
    // (IFLA_INET6_CONF grew); nothing an operator can act on.
    let filter = EnvFilter::try_from_env("LBAGENT_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},netlink_packet_route=error")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format.unwrap_or(LogFormat::Human) {
        LogFormat::Human => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
