//! `hop checkpoint` and `hop restore`: CRIU dumps and restores of a process tree, with CRIU's
//! statistics. The building blocks of `hop migrate`, usable on their own.

use super::Output;
use crate::checkpoint::criu::{Criu, DumpOptions};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

/// Options shared by dump and restore.
#[derive(Args, Debug, Clone)]
pub struct CriuArgs {
    /// Image directory.
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Established TCP connections are part of the state (restore on the same address).
    #[arg(long)]
    pub tcp_established: bool,
    /// The process was started from a shell and is not a session leader.
    #[arg(long)]
    pub shell_job: bool,
    /// Print CRIU's statistics as one JSON object on standard output.
    #[arg(long)]
    pub json: bool,
}

/// Checkpoint a running process tree with CRIU (a full memory dump).
///
/// With --leave-running the process keeps running (a pre-copy round); without it, it is
/// stopped and gone after a successful dump. If the dump fails, the process keeps running and
/// the error quotes CRIU's log.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  hop checkpoint --pid 4242 --dir /var/tmp/app.1 --leave-running
  hop checkpoint --pid 4242 --dir /var/tmp/app.2 --tcp-established --json")]
pub struct CheckpointArgs {
    /// Root of the process tree.
    #[arg(long)]
    pub pid: u32,
    /// Keep the process running after the dump.
    #[arg(long)]
    pub leave_running: bool,
    /// Network lock for --tcp-established: nftables (default here), iptables or skip.
    #[arg(long, value_name = "METHOD", default_value = "nftables")]
    pub network_lock: String,
    #[command(flatten)]
    pub criu: CriuArgs,
}

/// Restore a process tree from CRIU images, detached; prints its PID.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  hop restore --dir /var/tmp/app.2 --tcp-established")]
pub struct RestoreArgs {
    #[command(flatten)]
    pub criu: CriuArgs,
}

fn options(c: &CriuArgs) -> DumpOptions {
    DumpOptions {
        leave_running: false,
        tcp_established: c.tcp_established,
        shell_job: c.shell_job,
        network_lock: None,
    }
}

/// Run `hop checkpoint`.
pub fn run_checkpoint(a: CheckpointArgs, out: Output) -> Result<ExitCode> {
    let criu = Criu::find()?;
    let mut o = options(&a.criu);
    o.leave_running = a.leave_running;
    if a.criu.tcp_established {
        o.network_lock = Some(a.network_lock.clone());
    }
    let s = criu.dump(a.pid, &a.criu.dir, &o)?;
    if !a.leave_running
        && !crate::checkpoint::criu::wait_gone(a.pid, std::time::Duration::from_secs(5))
    {
        tracing::warn!(
            "PID {} still exists after its dump (not reaped yet?)",
            a.pid
        );
    }
    if a.criu.json {
        println!("{}", serde_json::to_string(&s)?);
    } else if !out.quiet {
        println!(
            "dumped PID {} into {}: {} pages written, frozen {:.1} ms (memory dump {:.1} ms, write {:.1} ms), {:.1} ms in all{}",
            a.pid,
            a.criu.dir.display(),
            s.pages_written,
            s.frozen_ms,
            s.memdump_ms,
            s.memwrite_ms,
            s.wall_ms,
            if a.leave_running { "; still running" } else { "" }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Run `hop restore`.
pub fn run_restore(a: RestoreArgs, out: Output) -> Result<ExitCode> {
    let criu = Criu::find()?;
    let s = criu.restore(&a.criu.dir, &options(&a.criu))?;
    if a.criu.json {
        println!("{}", serde_json::to_string(&s)?);
    } else if out.quiet {
        println!("{}", s.pid);
    } else {
        println!(
            "restored PID {} from {}: {} pages, {:.1} ms in CRIU, {:.1} ms in all",
            s.pid,
            a.criu.dir.display(),
            s.pages_restored,
            s.restore_ms,
            s.wall_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}
