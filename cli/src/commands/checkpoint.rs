//! `hop checkpoint` and `hop restore`: CRIU dumps and restores of a process tree, with CRIU's
//! statistics. The building blocks of `hop migrate`, usable on their own.

use super::Output;
use crate::checkpoint::criu::{Criu, DumpOptions};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

/// The application a checkpoint or migration is about: a process tree or a runc container.
#[derive(Args, Debug, Clone)]
pub struct AppArgs {
    /// Root PID of the process tree.
    #[arg(long, conflicts_with = "runc")]
    pub pid: Option<u32>,
    /// Container id (runc). `hop migrate` takes it more than once: a group of containers moved
    /// together, restored in the order given.
    #[arg(long, value_name = "ID")]
    pub runc: Vec<String>,
    /// runc's state directory (runc --root).
    #[arg(long, value_name = "DIR")]
    pub runc_root: Option<PathBuf>,
}

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

/// Checkpoint a running process tree (CRIU) or OCI container (runc, which drives CRIU): a
/// full memory dump.
///
/// With --leave-running it keeps running (a pre-copy round); without it, it is stopped and gone
/// after a successful dump. If the dump fails, it keeps running and the error quotes CRIU's log.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  hop checkpoint --pid 4242 --dir /var/tmp/app.1 --leave-running
  hop checkpoint --pid 4242 --dir /var/tmp/app.2 --tcp-established --json
  hop checkpoint --runc web --dir /var/tmp/web.1")]
pub struct CheckpointArgs {
    #[command(flatten)]
    pub app: AppArgs,
    /// Keep the process running after the dump.
    #[arg(long)]
    pub leave_running: bool,
    /// Network lock for --tcp-established: nftables (default here), iptables or skip.
    #[arg(long, value_name = "METHOD", default_value = "nftables")]
    pub network_lock: String,
    #[command(flatten)]
    pub criu: CriuArgs,
}

/// Restore a process tree (CRIU) or container (runc) from its images, detached; prints its PID.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  hop restore --dir /var/tmp/app.2 --tcp-established
  hop restore --runc web --bundle /srv/bundles/web --dir /var/tmp/web.1")]
pub struct RestoreArgs {
    /// Restore as this container id (runc).
    #[arg(long, value_name = "ID", requires = "bundle")]
    pub runc: Option<String>,
    /// The container's OCI bundle (with --runc).
    #[arg(long, value_name = "DIR")]
    pub bundle: Option<PathBuf>,
    /// runc's state directory (runc --root).
    #[arg(long, value_name = "DIR")]
    pub runc_root: Option<PathBuf>,
    /// Start the process at once and bring its memory in afterwards (post-copy from the images
    /// through userfaultfd; raises fs.pipe-max-size to 4 MiB if needed).
    #[arg(long)]
    pub lazy_pages: bool,
    #[command(flatten)]
    pub criu: CriuArgs,
}

fn options(c: &CriuArgs) -> DumpOptions {
    DumpOptions {
        leave_running: false,
        tcp_established: c.tcp_established,
        shell_job: c.shell_job,
        network_lock: None,
        tcp_close: false,
        lazy_pages: false,
    }
}

/// Run `hop checkpoint`.
pub fn run_checkpoint(a: CheckpointArgs, out: Output) -> Result<ExitCode> {
    if a.app.runc.len() > 1 {
        anyhow::bail!("hop checkpoint takes one --runc container");
    }
    if let Some(id) = a.app.runc.first() {
        let runc = crate::checkpoint::runc::Runc::find(a.app.runc_root.clone())?;
        Criu::find()?;
        let t = runc.checkpoint(id, &a.criu.dir, a.leave_running, a.criu.tcp_established)?;
        if a.criu.json {
            println!("{}", serde_json::to_string(&t)?);
        } else if !out.quiet {
            println!(
                "checkpointed container {id} into {} in {:.1} ms{}",
                a.criu.dir.display(),
                t.wall_ms,
                if a.leave_running {
                    "; still running"
                } else {
                    ""
                }
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(pid) = a.app.pid else {
        anyhow::bail!("say what to checkpoint: --pid PID or --runc ID");
    };
    let criu = Criu::find()?;
    let mut o = options(&a.criu);
    o.leave_running = a.leave_running;
    if a.criu.tcp_established {
        o.network_lock = Some(a.network_lock.clone());
    }
    let s = criu.dump(pid, &a.criu.dir, &o)?;
    if !a.leave_running
        && !crate::checkpoint::criu::wait_gone(pid, std::time::Duration::from_secs(5))
    {
        tracing::warn!("PID {pid} still runs after its final dump");
    }
    if a.criu.json {
        println!("{}", serde_json::to_string(&s)?);
    } else if !out.quiet {
        println!(
            "dumped PID {} into {}: {} pages written, frozen {:.1} ms (memory dump {:.1} ms, write {:.1} ms), {:.1} ms in all{}",
            pid,
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

/// Lazy restores need large pipes.
fn lazy_ok() -> Result<bool> {
    if !crate::checkpoint::criu::allow_lazy_pipes() {
        anyhow::bail!(
            "--lazy-pages needs fs.pipe-max-size >= 4194304 and it could not be raised: run `sysctl -w fs.pipe-max-size=4194304` as root"
        );
    }
    Ok(true)
}

/// Run `hop restore`.
pub fn run_restore(a: RestoreArgs, out: Output) -> Result<ExitCode> {
    if let (Some(id), Some(bundle)) = (&a.runc, &a.bundle) {
        let runc = crate::checkpoint::runc::Runc::find(a.runc_root.clone())?;
        Criu::find()?;
        let criu = Criu::find()?;
        let lazy = (a.lazy_pages && lazy_ok()?).then_some(&criu);
        let t = runc.restore(
            id,
            bundle,
            &a.criu.dir,
            &a.criu.dir,
            a.criu.tcp_established,
            lazy,
        )?;
        if a.criu.json {
            println!("{}", serde_json::to_string(&t)?);
        } else if out.quiet {
            println!("{}", t.pid);
        } else {
            println!(
                "restored container {id} (init PID {}) from {} in {:.1} ms",
                t.pid,
                a.criu.dir.display(),
                t.wall_ms
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let criu = Criu::find()?;
    let mut o = options(&a.criu);
    o.lazy_pages = a.lazy_pages && lazy_ok()?;
    let s = criu.restore(&a.criu.dir, &o)?;
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
