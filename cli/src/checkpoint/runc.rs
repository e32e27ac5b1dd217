//! runc: checkpoint and restore of OCI containers (runc drives CRIU, found on PATH).
//!
//! Facts from this machine (`../shared/notes/criu-on-this-kernel.md`): pre-dumps fail
//! ("CRIU is missing features"), full checkpoints with and without `--leave-running` work, and a
//! container can only be checkpointed if its stdio are pipes (not host files). A restored
//! container therefore gets pipes too.

use super::criu::log_errors;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// A runc binary and its state directory.
#[derive(Debug, Clone)]
pub struct Runc {
    /// `--root` (runc's state directory), `None` for runc's default.
    pub root: Option<PathBuf>,
}

/// What runc reports about a container.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct State {
    /// `running`, `paused`, `stopped`, ...
    pub status: String,
    /// PID of the container's init.
    pub pid: u32,
    /// The container's bundle directory.
    #[serde(default)]
    pub bundle: PathBuf,
}

/// Wall times of a checkpoint or restore.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timing {
    /// Container init PID after a restore (0 after a checkpoint).
    pub pid: u32,
    /// Wall time of the runc command.
    pub wall_ms: f64,
}

impl Runc {
    /// A runc with state under `root` (runc's default when `None`), checked to run.
    pub fn find(root: Option<PathBuf>) -> Result<Runc> {
        let ok = Command::new("runc")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            bail!("runc not found: install it (apt-get install runc)");
        }
        Ok(Runc { root })
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("runc");
        if let Some(r) = &self.root {
            c.arg("--root").arg(r);
        }
        c
    }

    /// The container's state.
    pub fn state(&self, id: &str) -> Result<State> {
        let out = self.cmd().args(["state", id]).output()?;
        if !out.status.success() {
            bail!(
                "no container {id}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).context("cannot parse `runc state`")
    }

    /// Drop the record of container `id` if it is no longer running (after a final checkpoint
    /// runc may keep it as `stopped`, which blocks a restore under the same id).
    pub fn forget(&self, id: &str) {
        if self.state(id).is_ok_and(|s| s.status != "running") {
            let _ = self.cmd().args(["delete", "-f", id]).output();
        }
    }

    /// Stop and remove container `id`, whatever its state, and wait (up to 10 s) until runc no
    /// longer knows it and its state directory is gone, so that a restore under the same name
    /// right after this does not meet "container with given ID already exists".
    pub fn destroy(&self, id: &str) {
        let t0 = Instant::now();
        loop {
            let _ = self.cmd().args(["delete", "-f", id]).output();
            if self.state(id).is_err() || t0.elapsed().as_secs() >= 10 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        self.remove_leftover(id);
    }

    /// runc's state directory for `id`.
    fn state_dir(&self, id: &str) -> PathBuf {
        self.root
            .clone()
            .unwrap_or_else(|| PathBuf::from("/run/runc"))
            .join(id)
    }

    /// Remove runc's directory for `id` when it is left without a readable state: a restore
    /// that died early, or a deletion that did not finish, leaves one behind, and `runc restore`
    /// refuses the name while it is there. A directory whose state is being removed right now
    /// is given a second to go on its own first.
    fn remove_leftover(&self, id: &str) {
        if !crate::migrate::calls::valid_id(id) {
            return;
        }
        let left = self.state_dir(id);
        let t0 = Instant::now();
        while left.is_dir() && self.state(id).is_err() {
            if t0.elapsed().as_millis() >= 1000 {
                tracing::debug!(
                    "removing runc's leftover state directory {}",
                    left.display()
                );
                let _ = std::fs::remove_dir_all(&left);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Checkpoint container `id` into `dir` (CRIU's log in `dir/dump.log`).
    pub fn checkpoint(
        &self,
        id: &str,
        dir: &Path,
        leave_running: bool,
        tcp_established: bool,
    ) -> Result<Timing> {
        self.state(id)?;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create image directory {}", dir.display()))?;
        let mut c = self.cmd();
        c.arg("checkpoint")
            .arg("--image-path")
            .arg(dir)
            .arg("--work-path")
            .arg(dir);
        if leave_running {
            c.arg("--leave-running");
        }
        if tcp_established {
            c.arg("--tcp-established");
        }
        c.arg(id);
        let t0 = Instant::now();
        let out = c.output().context("cannot run runc checkpoint")?;
        let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            let why = log_errors(&dir.join("dump.log"), 6);
            let running = self
                .state(id)
                .map(|s| format!("; the container is still {}", s.status))
                .unwrap_or_default();
            let hint = if why
                .iter()
                .any(|l| l.contains("/ns/") && l.contains("Permission denied"))
            {
                "\n  hint: a task CRIU restored into a user namespace keeps the restorer's memory \
                 owner; if it is not dumpable (a daemon that changed its user), it cannot be \
                 checkpointed again. Make it dumpable: MariaDB --core-file, Apache \
                 CoreDumpDirectory, or prctl(PR_SET_DUMPABLE, 1)"
            } else {
                ""
            };
            bail!(
                "runc checkpoint of container {id} failed{running}:\n  {}\n  {}{hint}",
                String::from_utf8_lossy(&out.stderr).trim(),
                why.join("\n  ")
            );
        }
        Ok(Timing { pid: 0, wall_ms })
    }

    /// Restore container `id` from `dir` with `bundle`, detached. Its stdio are pipes (stdin at
    /// end of file, output appended to `work/container.out` by a detached `cat`), so that it can
    /// be checkpointed again later. `work` (created) gets runc's and CRIU's working files and
    /// logs; keep it apart from `dir` when `dir` is to be removed while the container runs.
    pub fn restore(
        &self,
        id: &str,
        bundle: &Path,
        dir: &Path,
        work: &Path,
        tcp_established: bool,
        lazy: Option<&super::criu::Criu>,
    ) -> Result<Timing> {
        // Its state is how a restore is seen to have worked: an existing container of that name
        // would pass for it.
        if let Ok(s) = self.state(id) {
            bail!(
                "a container named {id} already exists here ({}); remove it or restore under another name",
                s.status
            );
        }
        self.remove_leftover(id);
        std::fs::create_dir_all(work)
            .with_context(|| format!("cannot create {}", work.display()))?;
        let daemon = lazy.map(|c| c.lazy_pages(dir, work)).transpose()?;
        let root = self
            .root
            .as_ref()
            .map(|r| format!("--root '{}' ", r.display()))
            .unwrap_or_default();
        // runc's own exit status goes to a file: the restore is done when runc has returned,
        // not merely when the container shows as running. CRIU still finishes its restore after
        // that (with lazy pages, its last stage), and a container killed in between (a rollback
        // dropping it at once) leaves CRIU waiting forever, with runc's mounts of the rootfs
        // and cgroups behind it and the name taken.
        let rc_file = work.join("restore.rc");
        let _ = std::fs::remove_file(&rc_file);
        let script = format!(
            "true | {{ runc {root}restore -d {tcp}{lazy}--image-path '{img}' --work-path '{work}' --bundle '{bundle}' '{id}'; echo $? > '{rc}'; }} 2>&1 | cat >> '{work}/container.out'",
            work = work.display(),
            tcp = if tcp_established { "--tcp-established " } else { "" },
            lazy = if daemon.is_some() { "--lazy-pages " } else { "" },
            img = dir.display(),
            bundle = bundle.display(),
            rc = rc_file.display(),
        );
        let t0 = Instant::now();
        let mut helper = Command::new("setsid")
            .args(["sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot run runc restore")?;
        // The pipeline lives as long as the container holds its pipes: if it ends before the
        // container runs, the restore failed.
        let mut running_ms = None;
        loop {
            let ended = helper.try_wait().ok().flatten().is_some();
            let rc = std::fs::read_to_string(&rc_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if rc == Some(0) || running_ms.is_none() {
                if let Ok(s) = self.state(id) {
                    if s.status == "running" && running_ms.is_none() {
                        running_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                    if s.status == "running" && rc == Some(0) {
                        if let Some(d) = daemon {
                            d.detach();
                        }
                        tracing::info!(
                            "runc restore of {id}: running after {:.0} ms, runc done after {:.0} ms",
                            running_ms.unwrap_or_default(),
                            t0.elapsed().as_secs_f64() * 1000.0
                        );
                        return Ok(Timing {
                            pid: s.pid,
                            wall_ms: t0.elapsed().as_secs_f64() * 1000.0,
                        });
                    }
                }
            }
            if rc.is_some_and(|c| c != 0) || ended || t0.elapsed().as_secs() > 30 {
                let why = log_errors(&work.join("restore.log"), 6);
                let out = std::fs::read_to_string(work.join("container.out")).unwrap_or_default();
                // Nothing of a failed attempt stays (no container of this name existed before
                // it), so that the next attempt does not meet "container with given ID already
                // exists". An attempt that died early can also leave runc's directory for the id
                // without a readable state: it is this attempt's, so destroy removes it too.
                // A runc still at work after the time limit is ended first, by its process group
                // (setsid made the helper its leader).
                if rc.is_none() && !ended {
                    signal_group(helper.id(), 9);
                    let _ = helper.wait();
                }
                self.destroy(id);
                bail!(
                    "runc restore of container {id} from {} did not start it{}:\n  {}\n  {}",
                    dir.display(),
                    match rc {
                        Some(c) => format!(" (runc exited with {c})"),
                        None if ended => String::new(),
                        None => " within 30 s".to_string(),
                    },
                    out.trim(),
                    why.join("\n  ")
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Send `sig` to process group `pgid` (one this process started as a session leader).
fn signal_group(pgid: u32, sig: i32) {
    if pgid > 1 {
        // A negative PID names the process group.
        super::criu::signal_raw(-(pgid as i32), sig);
    }
}
