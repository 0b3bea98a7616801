use std::process::ExitCode;

use clap::Parser;
use lbagent::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut stdout = std::io::stdout().lock();
    match cli::run(cli, &mut stdout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, the whole cause chain: "context: cause: root cause".
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
