//! The `rill` binary: the server (`rill serve`) and the command-line client. Arguments are
//! defined in `rill_server::cli`.

use std::process::ExitCode;

use clap::Parser;
use rill_server::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => rill_server::cli::serve(args),
        command => rill_server::cli::run(cli.addr, command),
    }
}
