//! The `dfs-server` binary: parse the command line, start tracing, run.

use clap::Parser;

fn main() -> std::process::ExitCode {
    dfs_server::init_tracing();
    let cli = dfs_server::cli::Cli::parse();
    match dfs_server::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dfs-server: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
