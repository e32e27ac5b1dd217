//! `hop`: delta sync of directory trees and live migration of containers.
//!
//! Exit codes: 0 success; 1 usage or setup error (nothing was changed); 23 partial transfer
//! (some entries failed, the rest is correct at the destination), like rsync.

// The argument docs are `--help` text, where `HOST[:PORT]` means an optional port, not a link.
#![allow(rustdoc::broken_intra_doc_links)]

mod checkpoint;
mod commands;
mod config;
mod identity;
mod migrate;
mod progress;
mod units;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::process::ExitCode;

/// Live-migrate containers and sync directory trees, moving only the data the other side lacks.
#[derive(Parser)]
#[command(name = "hop", version, about, long_about = None)]
struct Cli {
    /// More output (-v: per-file changes, -vv: debug logs). HOP_LOG / RUST_LOG set log filters.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Sync(Box<commands::sync::SyncArgs>),
    Keygen(commands::keygen::KeygenArgs),
    Serve(commands::serve::ServeArgs),
    Checkpoint(commands::checkpoint::CheckpointArgs),
    Restore(commands::checkpoint::RestoreArgs),
    Migrate(Box<commands::migrate::MigrateArgs>),
    Vpn(commands::vpn::VpnArgs),
    Doctor(commands::doctor::DoctorArgs),
    Completions(commands::docs::CompletionsArgs),
    Man(commands::docs::ManArgs),
}

fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        (_, 0 | 1) => "warn",
        (_, 2) => "debug",
        _ => "trace",
    };
    let filter = std::env::var("HOP_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| default.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(cli.verbose, cli.quiet);
    let out = commands::Output {
        verbose: cli.verbose,
        quiet: cli.quiet,
    };
    let r = match cli.command {
        Command::Sync(a) => commands::sync::run(*a, matches.subcommand_matches("sync"), out),
        Command::Keygen(a) => commands::keygen::run(a, out),
        Command::Serve(a) => commands::serve::run(a, out),
        Command::Checkpoint(a) => commands::checkpoint::run_checkpoint(a, out),
        Command::Restore(a) => commands::checkpoint::run_restore(a, out),
        Command::Migrate(a) => commands::migrate::run(*a, out),
        Command::Vpn(a) => commands::vpn::run(a, out),
        Command::Doctor(a) => commands::doctor::run(a, out),
        Command::Completions(a) => commands::docs::completions(a, Cli::command()),
        Command::Man(a) => commands::docs::man(a, Cli::command()),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hop: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
