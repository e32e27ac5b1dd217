//! The application being migrated, at the source: dump it (leaving it running or not) and, if
//! the move fails after the final dump, put it back from its final images.

use super::calls::{Kind, Tcp};
use crate::checkpoint::criu::{is_running, wait_reaped, Criu, DumpOptions};
use crate::checkpoint::runc::Runc;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A process tree or a runc container.
#[derive(Debug, Clone)]
pub enum App {
    /// A process tree, by its root PID.
    Process {
        /// Root of the tree.
        pid: u32,
        /// Not a session leader (started from a shell).
        shell_job: bool,
    },
    /// A runc container.
    Container {
        /// Container id.
        id: String,
        /// runc and its state directory.
        runc: Runc,
        /// The container's bundle (config.json and rootfs).
        bundle: PathBuf,
    },
}

/// One dump's figures.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Dumped {
    /// Wall time of the dump command.
    pub dump_ms: f64,
    /// Time the application was frozen, as CRIU reports it (process dumps only; for runc the
    /// dump's wall time).
    pub frozen_ms: f64,
    /// Bytes of images written.
    pub bytes: u64,
}

/// Total size of the regular files under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

impl App {
    /// The application named on the command line, checked to be running.
    pub fn find(pid: Option<u32>, runc: Option<&str>, runc_root: Option<PathBuf>) -> Result<App> {
        match (pid, runc) {
            (Some(pid), None) => {
                if !is_running(pid) {
                    bail!("no running process with PID {pid}");
                }
                Ok(App::Process {
                    pid,
                    shell_job: !is_session_leader(pid),
                })
            }
            (None, Some(id)) => {
                let runc = Runc::find(runc_root)?;
                let st = runc.state(id)?;
                if st.status != "running" {
                    bail!("container {id} is {}, not running", st.status);
                }
                Ok(App::Container {
                    id: id.to_string(),
                    runc,
                    bundle: st.bundle,
                })
            }
            _ => bail!("give exactly one of --pid and --runc"),
        }
    }

    /// What the target restores.
    pub fn kind(&self) -> Kind {
        match self {
            App::Process { shell_job, .. } => Kind::Process {
                shell_job: *shell_job,
            },
            App::Container { id, .. } => Kind::Runc {
                container: id.clone(),
            },
        }
    }

    /// For messages: "process 4242" or "container web".
    pub fn describe(&self) -> String {
        match self {
            App::Process { pid, .. } => format!("process {pid}"),
            App::Container { id, .. } => format!("container {id}"),
        }
    }

    /// A short name for the migration id.
    pub fn name(&self) -> String {
        match self {
            App::Process { pid, .. } => format!("pid{pid}"),
            App::Container { id, .. } => id.clone(),
        }
    }

    /// Full dump into `dir`. With `leave_running` the application keeps running (a pre-copy
    /// round); without, it is gone after a successful dump. A failed dump leaves it running.
    pub fn dump(&self, criu: &Criu, dir: &Path, leave_running: bool, tcp: Tcp) -> Result<Dumped> {
        let (dump_ms, frozen_ms) = match self {
            App::Process { pid, shell_job } => {
                let s = criu.dump(
                    *pid,
                    dir,
                    &DumpOptions {
                        leave_running,
                        tcp_established: tcp.established,
                        shell_job: *shell_job,
                        network_lock: tcp.established.then(|| "nftables".to_string()),
                        tcp_close: tcp.close,
                        lazy_pages: false,
                    },
                )?;
                (s.wall_ms, s.frozen_ms)
            }
            App::Container { id, runc, .. } => {
                if tcp.close {
                    bail!(
                        "--tcp-close: runc has no such switch; put `tcp-close` in a CRIU \
                         configuration file named by the bundle's org.criu.config annotation"
                    );
                }
                let t = runc.checkpoint(id, dir, leave_running, tcp.established)?;
                (t.wall_ms, t.wall_ms)
            }
        };
        Ok(Dumped {
            dump_ms,
            frozen_ms,
            bytes: dir_bytes(dir),
        })
    }

    /// After a successful final dump: wait (at most `limit`) until the dumped application has
    /// let go of what a restore needs (its PID; the container's record).
    pub fn wait_released(&self, limit: Duration) {
        match self {
            App::Process { pid, .. } => {
                wait_reaped(*pid, limit);
            }
            App::Container { id, runc, .. } => {
                runc.forget(id);
            }
        }
    }

    /// Put the application back at the source from its final images in `dir`; returns where
    /// it runs now, for the user.
    pub fn rollback(&self, criu: &Criu, dir: &Path, tcp: Tcp) -> Result<String> {
        self.wait_released(Duration::from_secs(10));
        match self {
            App::Process { shell_job, .. } => {
                let s = criu
                    .restore(
                        dir,
                        &DumpOptions {
                            leave_running: false,
                            tcp_established: tcp.established,
                            shell_job: *shell_job,
                            network_lock: None,
                            tcp_close: tcp.close,
                            lazy_pages: false,
                        },
                    )
                    .context("rollback: restoring at the source failed")?;
                Ok(format!("restored at the source as PID {}", s.pid))
            }
            App::Container { id, runc, bundle } => {
                let t = runc
                    .restore(id, bundle, dir, dir, tcp.established, None)
                    .context("rollback: restoring the container at the source failed")?;
                Ok(format!(
                    "container {id} restored at the source (init PID {})",
                    t.pid
                ))
            }
        }
    }

    /// After the target committed: drop what is left of the application here.
    pub fn finish(&self) {
        if let App::Container { id, runc, .. } = self {
            runc.forget(id);
        }
    }
}

/// Whether `pid` leads its session (CRIU needs --shell-job otherwise).
fn is_session_leader(pid: u32) -> bool {
    // /proc/PID/stat: "pid (comm) state ppid pgrp session ..."; comm may hold spaces.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let session: u32 = rest.split(' ').nth(3)?.parse().ok()?;
            Some(session == pid)
        })
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_leaders_are_told_apart() {
        use std::process::Command;
        let mut leader = Command::new("setsid").args(["sleep", "5"]).spawn().unwrap();
        let mut member = Command::new("sleep").arg("5").spawn().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let (l, m) = (
            is_session_leader(leader.id()),
            is_session_leader(member.id()),
        );
        let _ = leader.kill();
        let _ = member.kill();
        let _ = leader.wait();
        let _ = member.wait();
        assert!(l, "setsid's child leads its session");
        assert!(!m, "a plain child does not");
    }

    #[test]
    fn dir_bytes_adds_up_regular_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), [0u8; 100]).unwrap();
        std::fs::create_dir(d.path().join("s")).unwrap();
        std::fs::write(d.path().join("s/b"), [0u8; 23]).unwrap();
        assert_eq!(dir_bytes(d.path()), 123);
    }
}
