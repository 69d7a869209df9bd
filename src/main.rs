//! `sdpipe`: parses the command line and hands over to the library.

use std::io::IsTerminal;

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SDPIPE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: a log file or CI capture gets plain
        // `WARN`, and NO_COLOR (https://no-color.org) turns them off everywhere.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .without_time()
        .init();
    let cli = sdpipe::cli::Cli::parse();
    std::process::exit(sdpipe::cli::run(cli).code());
}
