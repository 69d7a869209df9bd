//! `sdpipe`: parses the command line and hands over to the library.

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SDPIPE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    let cli = sdpipe::cli::Cli::parse();
    std::process::exit(sdpipe::cli::run(cli).code());
}
