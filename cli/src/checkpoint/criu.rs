//! CRIU: full dumps (a pre-copy round with `--leave-running`, or the final one), restores, the
//! statistics CRIU reports, and errors named from CRIU's own log.
//!
//! On this kind of kernel (no soft-dirty tracking) every dump is a full memory dump; pre-dumps
//! and incremental dumps do not work (see `../shared/notes/criu-on-this-kernel.md`), so this
//! module offers none: the incremental part of a migration is hop's delta sync of successive
//! full dumps.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Oldest CRIU that works on kernels >= 6.16 without patches.
pub const MIN_VERSION: (u32, u32) = (4, 2);

/// Lines CRIU logs as errors on every run here that mean nothing (no CAP_SYS_RESOURCE).
const HARMLESS: &[&str] = &["rlimit: Can't setup RLIMIT_NOFILE"];

/// A CRIU binary.
#[derive(Debug, Clone)]
pub struct Criu {
    /// The executable.
    pub bin: PathBuf,
    /// Its version (major, minor, patch).
    pub version: (u32, u32, u32),
}

/// How to dump.
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    /// Keep the process running after the dump (a pre-copy round).
    pub leave_running: bool,
    /// Dump established TCP connections (they must be restored on the same address).
    pub tcp_established: bool,
    /// The process is not a session leader (started from a shell).
    pub shell_job: bool,
    /// Established TCP connections are not dumped and are restored closed (CRIU --tcp-close):
    /// for an application that changes address, whose clients reconnect.
    pub tcp_close: bool,
    /// Network lock method (`nftables`, `iptables`, `skip`); `None` for CRIU's default.
    pub network_lock: Option<String>,
    /// Restore: start the process at once and bring its memory in afterwards (post-copy from the
    /// local images, through userfaultfd and a `criu lazy-pages` daemon).
    pub lazy_pages: bool,
}

/// The smallest `fs.pipe-max-size` lazy restores work with here (CRIU wants ~3.2 MiB pipes and
/// cannot raise the limit itself without CAP_SYS_RESOURCE).
const LAZY_PIPE_MAX: u64 = 4 << 20;

/// Make sure pipes can be as large as lazy restores need; false if that cannot be arranged.
pub fn allow_lazy_pipes() -> bool {
    let path = "/proc/sys/fs/pipe-max-size";
    let now: u64 = std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    now >= LAZY_PIPE_MAX || std::fs::write(path, LAZY_PIPE_MAX.to_string()).is_ok()
}

/// Why a container whose OCI config is `config` cannot be restored lazily here, if it cannot:
/// its tasks live in a user namespace, where the kernel refuses them `userfaultfd()` unless
/// `vm.unprivileged_userfaultfd` is 1 (lazy pages need it; the restore would fail and cost the
/// failed attempt's clean-up, seconds of runc retrying cgroup removal, on the downtime path).
pub fn lazy_refused_for(config: &serde_json::Value) -> Option<String> {
    let userns = config
        .pointer("/linux/namespaces")
        .and_then(|n| n.as_array())
        .is_some_and(|n| n.iter().any(|x| x["type"] == "user"));
    let allowed = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
        .is_ok_and(|s| s.trim() == "1");
    (userns && !allowed).then(|| {
        "the container has a user namespace and vm.unprivileged_userfaultfd is 0: restoring fully"
            .to_string()
    })
}

/// A running `criu lazy-pages` daemon: it serves a restored tree's memory from the images until
/// all of it is in, then exits. Reaped in the background once left alone.
pub struct LazyPages {
    child: Option<std::process::Child>,
}

impl LazyPages {
    /// The restore succeeded: let the daemon finish on its own.
    pub fn detach(mut self) {
        if let Some(mut c) = self.child.take() {
            std::thread::spawn(move || c.wait());
        }
    }
}

impl Drop for LazyPages {
    fn drop(&mut self) {
        // Not detached: the restore failed, nothing needs the daemon.
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What CRIU reported about a dump, plus our own wall time.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DumpStats {
    /// Time to freeze the tree.
    pub freezing_ms: f64,
    /// Time the tree was frozen (the downtime of a final dump, before the transfer).
    pub frozen_ms: f64,
    /// Time to collect memory.
    pub memdump_ms: f64,
    /// Time to write memory images.
    pub memwrite_ms: f64,
    /// Pages scanned.
    pub pages_scanned: u64,
    /// Pages written to the images.
    pub pages_written: u64,
    /// Wall time of the `criu dump` command.
    pub wall_ms: f64,
}

/// What CRIU reported about a restore.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreStats {
    /// PID of the restored tree's root.
    pub pid: u32,
    /// Pages restored.
    pub pages_restored: u64,
    /// CRIU's own restore time.
    pub restore_ms: f64,
    /// Wall time of the `criu restore` command.
    pub wall_ms: f64,
}

fn parse_version(out: &str) -> Option<(u32, u32, u32)> {
    let v = out.lines().find_map(|l| l.strip_prefix("Version: "))?;
    let mut it = v.trim().split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// `Name: 1234 us` lines of `--display-stats`, in milliseconds, and `Name: N (0x..)` counts.
fn stat_ms(out: &str, name: &str) -> f64 {
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        .and_then(|v| v.strip_suffix(" us"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0.0, |us| us / 1000.0)
}

fn stat_count(out: &str, name: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The lines of a CRIU log that explain a failure: its errors, minus the harmless ones, at
/// most the last `n`.
pub fn log_errors(log: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<String> = text
        .lines()
        .filter(|l| l.contains("Error (") || l.contains("FAILED"))
        .filter(|l| !HARMLESS.iter().any(|h| l.contains(h)))
        .map(str::to_string)
        .collect();
    errors[errors.len().saturating_sub(n)..].to_vec()
}

/// Why a CRIU command failed: the errors of its log, else what it printed.
fn failure(log: &Path, stderr: &[u8]) -> String {
    let why = log_errors(log, 6);
    if why.is_empty() {
        String::from_utf8_lossy(stderr).trim().to_string()
    } else {
        why.join("\n  ")
    }
}

/// Whether process `pid` exists and is not stopped.
pub fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("State:").map(|v| v.trim().to_string()))
        })
        .is_some_and(|state| !state.starts_with('T') && !state.starts_with('Z'))
}

impl Criu {
    /// Find `criu` on PATH (as CRIU-using tools like runc do), else in /usr/local/sbin where
    /// `scripts/build-criu.sh` installs it, and check its version.
    pub fn find() -> Result<Criu> {
        match Self::at(Path::new("criu")) {
            Ok(c) => Ok(c),
            Err(e) => Self::at(Path::new("/usr/local/sbin/criu")).map_err(|_| e),
        }
    }

    fn at(bin: &Path) -> Result<Criu> {
        let out = Command::new(bin).arg("--version").output().map_err(|e| {
            anyhow::anyhow!(
                "cannot run criu ({e}): CRIU >= {}.{} is needed; install it with `bash scripts/build-criu.sh` (Debian bookworm's 3.17 does not work on this kernel)",
                MIN_VERSION.0,
                MIN_VERSION.1
            )
        })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let version = parse_version(&text)
            .with_context(|| format!("cannot read the version of criu from {text:?}"))?;
        if (version.0, version.1) < MIN_VERSION {
            bail!(
                "criu {}.{}.{} is too old: CRIU >= {}.{} is needed on kernels >= 6.16; install it with `bash scripts/build-criu.sh`",
                version.0,
                version.1,
                version.2,
                MIN_VERSION.0,
                MIN_VERSION.1
            );
        }
        Ok(Criu {
            bin: bin.to_path_buf(),
            version,
        })
    }

    /// `criu check`: `Ok(warnings)` when the basics work.
    pub fn check(&self) -> Result<Vec<String>> {
        let out = Command::new(&self.bin).arg("check").output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = text
            .lines()
            .filter(|l| l.starts_with("Warn") || l.starts_with("Error"))
            .map(str::to_string)
            .collect();
        if !out.status.success() {
            bail!("criu check failed: {}", text.trim());
        }
        Ok(lines)
    }

    /// Dump the process tree rooted at `pid` into `dir` (created). On failure the error names
    /// CRIU's own reasons, and the tree is left running: CRIU resumes it, and if it is still
    /// stopped afterwards it gets a SIGCONT.
    pub fn dump(&self, pid: u32, dir: &Path, o: &DumpOptions) -> Result<DumpStats> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create image directory {}", dir.display()))?;
        let mut c = Command::new(&self.bin);
        c.arg("dump")
            .arg("-t")
            .arg(pid.to_string())
            .arg("-D")
            .arg(dir)
            .args(["-o", "dump.log", "-v4", "--display-stats"]);
        if o.leave_running {
            c.arg("--leave-running");
        }
        if o.leave_running || o.tcp_close {
            // Connections still in a listener's queue: a pre-copy round leaves them to the
            // running process; a final dump that closes connections anyway lets them go.
            c.arg("--skip-in-flight");
        }
        shared_args(&mut c, o);
        if let Some(lock) = &o.network_lock {
            c.args(["--network-lock", lock]);
        }
        let t0 = Instant::now();
        let out = c.output().context("cannot run criu dump")?;
        let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            // CRIU resumes the tree after a failed dump; make sure nothing stays stopped.
            if std::fs::metadata(format!("/proc/{pid}")).is_ok() && !is_running(pid) {
                // SAFETY: kill(2) on the PID we were asked to dump, with SIGCONT.
                unsafe {
                    libc_kill(pid as i32, 18 /* SIGCONT */);
                }
            }
            let log = dir.join("dump.log");
            let why = failure(&log, &out.stderr);
            bail!(
                "criu dump of PID {pid} failed (exit {}){}:\n  {}\n(full log: {})",
                out.status.code().unwrap_or(-1),
                if is_running(pid) {
                    "; the process is still running"
                } else {
                    ""
                },
                why,
                log.display()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(DumpStats {
            freezing_ms: stat_ms(&text, "Freezing time"),
            frozen_ms: stat_ms(&text, "Frozen time"),
            memdump_ms: stat_ms(&text, "Memory dump time"),
            memwrite_ms: stat_ms(&text, "Memory write time"),
            pages_scanned: stat_count(&text, "Memory pages scanned"),
            pages_written: stat_count(&text, "Memory pages written"),
            wall_ms,
        })
    }

    /// Start a `criu lazy-pages` daemon for the images in `dir`, its socket in the work
    /// directory `work` (the restore must use the same), and wait until it listens.
    pub fn lazy_pages(&self, dir: &Path, work: &Path) -> Result<LazyPages> {
        let sock = work.join("lazy-pages.socket");
        let _ = std::fs::remove_file(&sock);
        let child = Command::new(&self.bin)
            .arg("lazy-pages")
            .arg("-D")
            .arg(dir)
            .arg("-W")
            .arg(work)
            .args(["-o", "lazy-pages.log", "-v4"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start criu lazy-pages")?;
        let daemon = LazyPages { child: Some(child) };
        let t0 = Instant::now();
        while !sock.exists() {
            if t0.elapsed() > Duration::from_secs(5) {
                bail!(
                    "criu lazy-pages did not start: {}",
                    log_errors(&work.join("lazy-pages.log"), 4).join("; ")
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(daemon)
    }

    /// Restore the tree dumped in `dir`, detached (`-d`); returns its root PID.
    pub fn restore(&self, dir: &Path, o: &DumpOptions) -> Result<RestoreStats> {
        let pidfile = dir.join("restore.pid");
        let _ = std::fs::remove_file(&pidfile);
        let t0 = Instant::now();
        let lazy = if o.lazy_pages {
            Some(self.lazy_pages(dir, dir)?)
        } else {
            None
        };
        let mut c = Command::new(&self.bin);
        c.arg("restore")
            .arg("-D")
            .arg(dir)
            .args(["-o", "restore.log", "-v4", "-d", "--display-stats"])
            .arg("--pidfile")
            .arg(&pidfile);
        shared_args(&mut c, o);
        if lazy.is_some() {
            c.arg("--lazy-pages");
        }
        let out = c.output().context("cannot run criu restore")?;
        let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            let log = dir.join("restore.log");
            let why = failure(&log, &out.stderr);
            bail!(
                "criu restore from {} failed (exit {}):\n  {}\n(full log: {})",
                dir.display(),
                out.status.code().unwrap_or(-1),
                why,
                log.display()
            );
        }
        let pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("criu restore wrote no PID to {}", pidfile.display()))?;
        if let Some(l) = lazy {
            l.detach();
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(RestoreStats {
            pid,
            pages_restored: stat_count(&text, "Pages restored"),
            restore_ms: stat_ms(&text, "Restore time"),
            wall_ms,
        })
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Wait until `pid` no longer runs (gone, or a zombie its parent has yet to reap) after a
/// killing dump, at most `limit`.
pub fn wait_gone(pid: u32, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        let state = std::fs::read_to_string(format!("/proc/{pid}/status")).ok();
        if state.is_none_or(|s| {
            s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        }) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The options a dump and its restore must agree on.
fn shared_args(c: &mut Command, o: &DumpOptions) {
    if o.tcp_established {
        c.arg("--tcp-established");
    }
    if o.shell_job {
        c.arg("--shell-job");
    }
    if o.tcp_close {
        c.arg("--tcp-close");
    }
}

/// Wait until `pid` is gone altogether (reaped, its PID free for a restore), at most `limit`.
pub fn wait_reaped(pid: u32, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if std::fs::metadata(format!("/proc/{pid}")).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Send `sig` to `pid`; false if it could not be sent.
pub fn signal(pid: u32, sig: i32) -> bool {
    signal_raw(pid as i32, sig)
}

/// kill(2) as it is: a negative `pid` names a process group.
pub fn signal_raw(pid: i32, sig: i32) -> bool {
    // SAFETY: kill(2) has no memory effects; the caller names a PID it is responsible for.
    unsafe { libc_kill(pid, sig) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_version_and_stats() {
        assert_eq!(parse_version("Version: 4.2.1\nGitID: x\n"), Some((4, 2, 1)));
        assert_eq!(parse_version("Version: 4.1\n"), Some((4, 1, 0)));
        assert_eq!(parse_version("nothing"), None);
        let out = "Displaying dump stats:\nFreezing time: 134 us\nFrozen time: 11242 us\n\
                   Memory pages scanned: 1826 (0x722)\nMemory pages written: 1727 (0x6bf)\n";
        assert_eq!(stat_ms(out, "Frozen time"), 11.242);
        assert_eq!(stat_count(out, "Memory pages written"), 1727);
        assert_eq!(stat_count(out, "Memory pages skipped"), 0);
    }

    #[test]
    fn log_errors_skip_the_harmless_ones() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("dump.log");
        std::fs::write(
            &log,
            "(00.1) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: x\n\
             Error (criu/cr-dump.c:2011): The root process 5 is not a session leader\n\
             (00.2) Dumping FAILED.\n",
        )
        .unwrap();
        let e = log_errors(&log, 5);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("session leader"));
    }
}
