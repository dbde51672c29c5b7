//! The `dfs` binary: parse the command line, start tracing, run.

use clap::Parser;

fn main() -> std::process::ExitCode {
    dfs_server::init_tracing();
    let cli = dfs_fuse::cli::Cli::parse();
    match dfs_fuse::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dfs: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
