//! The migration target: `hop serve`'s agent. It checks what a restore needs, restores the
//! application from the images the source pushed, keeps it provisional until the source
//! commits, and kills it if the connection ends before that (so the source can take the
//! application back without two copies running).

use super::calls::{
    bundle_dir, images_dir, migration_dir, valid_id, Call, Checked, Kind, Restored, Tcp,
};
use crate::checkpoint::criu::{is_running, signal, Criu, DumpOptions};
use crate::checkpoint::runc::Runc;
use hop_engine::net::server::confine;
use hop_engine::net::{Agent, CallContext};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

/// A restored application waiting for its commit.
#[derive(Debug, Clone)]
enum Provisional {
    Process(u32),
    Container(String),
}

/// A migration under way on a connection.
#[derive(Debug, Default)]
struct Open {
    /// Keep its images if it is abandoned.
    keep_images: bool,
    /// Restored, waiting for the commit.
    restored: Option<Provisional>,
    /// The server's root.
    root: PathBuf,
}

/// The target's agent.
pub struct MigrationAgent {
    /// runc's state directory for restored containers (runc's default when `None`).
    runc_root: Option<PathBuf>,
    /// Per connection: migrations begun and not committed.
    open: Mutex<HashMap<u64, HashMap<String, Open>>>,
}

extern "C" {
    fn geteuid() -> u32;
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { geteuid() == 0 }
}

/// Bytes available under `path` (0 if unknown).
fn free_bytes(path: &std::path::Path) -> u64 {
    std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .and_then(|l| l.trim().parse().ok())
        })
        .unwrap_or(0)
}

impl MigrationAgent {
    /// An agent restoring containers under `runc_root`.
    pub fn new(runc_root: Option<PathBuf>) -> MigrationAgent {
        MigrationAgent {
            runc_root,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn check(&self, ctx: &CallContext) -> Checked {
        // The clock is read as the question arrives, before the slow checks.
        let unix_ms = super::calls::unix_ms();
        let (criu, criu_problem) = match Criu::find().and_then(|c| {
            c.check()?;
            Ok(c)
        }) {
            Ok(c) => (
                Some(format!("{}.{}.{}", c.version.0, c.version.1, c.version.2)),
                None,
            ),
            Err(e) => (None, Some(format!("{e:#}"))),
        };
        Checked {
            criu,
            criu_problem,
            root: is_root(),
            runc: Runc::find(self.runc_root.clone()).is_ok(),
            free_bytes: free_bytes(&ctx.root),
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            boot_id: super::calls::boot_id(),
            unix_ms,
        }
    }

    fn restore(
        &self,
        ctx: &CallContext,
        id: &str,
        kind: &Kind,
        tcp: Tcp,
        lazy: bool,
    ) -> Result<Restored, String> {
        if !is_root() {
            return Err("restoring needs root: run `hop serve` as root on the target".into());
        }
        let dir = confine(&ctx.root, &images_dir(id)).map_err(|e| e.to_string())?;
        if !dir.is_dir() {
            return Err(format!("no images at {}", dir.display()));
        }
        let t0 = Instant::now();
        let criu = Criu::find().map_err(|e| format!("{e:#}"))?;
        let lazy = lazy && crate::checkpoint::criu::allow_lazy_pipes();
        let (pid, provisional) = match kind {
            Kind::Process { shell_job } => {
                let mut o = DumpOptions {
                    leave_running: false,
                    tcp_established: tcp.established,
                    shell_job: *shell_job,
                    network_lock: None,
                    tcp_close: tcp.close,
                    lazy_pages: lazy,
                };
                let s = match criu.restore(&dir, &o) {
                    Err(e) if lazy => {
                        // A failed restore leaves nothing behind: try once more, plainly.
                        tracing::warn!(
                            "migration {id}: lazy restore failed ({e:#}); restoring fully"
                        );
                        o.lazy_pages = false;
                        criu.restore(&dir, &o)
                    }
                    r => r,
                };
                let s = match s {
                    Err(e) if restorer_failed(&e) => {
                        tracing::warn!(
                            "migration {id}: CRIU's restorer failed ({e:#}); restoring once more"
                        );
                        o.lazy_pages = false;
                        criu.restore(&dir, &o)
                    }
                    r => r,
                }
                .map_err(|e| format!("{e:#}"))?;
                if !is_running(s.pid) {
                    return Err(format!("the restored process {} is not running", s.pid));
                }
                (s.pid, Provisional::Process(s.pid))
            }
            Kind::Runc { container } => {
                if !valid_id(container) {
                    return Err(format!("bad container id {container:?}"));
                }
                let bundle =
                    confine(&ctx.root, &bundle_dir(container)).map_err(|e| e.to_string())?;
                if !bundle.join("config.json").is_file() {
                    return Err(format!("no bundle at {}", bundle.display()));
                }
                let runc = Runc::find(self.runc_root.clone()).map_err(|e| format!("{e:#}"))?;
                let config: serde_json::Value = std::fs::read(bundle.join("config.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default();
                let lazy = match crate::checkpoint::criu::lazy_refused_for(&config) {
                    Some(why) if lazy => {
                        tracing::info!("migration {id}: {why}");
                        false
                    }
                    _ => lazy,
                };
                // runc's working files and the container's output outlive the images.
                let work = confine(&ctx.root, &format!("containers/.{container}.run"))
                    .map_err(|e| e.to_string())?;
                let t = match runc.restore(
                    container,
                    &bundle,
                    &dir,
                    &work,
                    tcp.established,
                    lazy.then_some(&criu),
                ) {
                    Err(e) if lazy => {
                        tracing::warn!(
                            "migration {id}: lazy restore failed ({e:#}); restoring fully"
                        );
                        runc.restore(container, &bundle, &dir, &work, tcp.established, None)
                    }
                    r => r,
                };
                let t = match t {
                    // See restorer_failed. The failed attempt left no container behind.
                    Err(e) if restorer_failed(&e) => {
                        tracing::warn!(
                            "migration {id}: CRIU's restorer failed ({e:#}); restoring once more"
                        );
                        runc.restore(container, &bundle, &dir, &work, tcp.established, None)
                    }
                    r => r,
                }
                .map_err(|e| format!("{e:#}"))?;
                (t.pid, Provisional::Container(container.clone()))
            }
        };
        let restore_ms = t0.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            "migration {id}: restored, PID {pid}, {restore_ms:.0} ms; waiting for the commit"
        );
        self.lock()
            .entry(ctx.conn)
            .or_default()
            .entry(id.to_string())
            .or_insert_with(|| Open {
                root: ctx.root.clone(),
                ..Open::default()
            })
            .restored = Some(provisional);
        Ok(Restored { pid, restore_ms })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, HashMap<String, Open>>> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn kill(&self, p: &Provisional) {
        match p {
            Provisional::Process(pid) => {
                signal(*pid, 9);
            }
            Provisional::Container(id) => {
                if let Ok(r) = Runc::find(self.runc_root.clone()) {
                    r.destroy(id);
                }
            }
        }
    }
}

/// Whether a restore failed in CRIU's restorer blob, which can fail on how the fresh address
/// space happened to be laid out (its vDSO parked where a restored mapping lands: "vdso: Invalid
/// ELF magic", criu PR #3012): the same images restore on a second try.
fn restorer_failed(e: &anyhow::Error) -> bool {
    format!("{e:#}").contains("Restorer fail")
}

impl Agent for MigrationAgent {
    fn call(&self, ctx: &CallContext, body: &str) -> Result<String, String> {
        let call: Call =
            serde_json::from_str(body).map_err(|e| format!("not a migration command: {e}"))?;
        if let Call::Begin { id, .. }
        | Call::Restore { id, .. }
        | Call::Commit { id }
        | Call::Cleanup { id } = &call
        {
            if !valid_id(id) {
                return Err(format!("bad migration id {id:?}"));
            }
        }
        match call {
            Call::VpnUp {
                iface,
                addr,
                port,
                peer_public,
                peer_endpoint,
                peer_allowed,
                backend,
                psk,
            } => {
                if !is_root() {
                    return Err("setting up a tunnel needs root: run `hop serve` as root".into());
                }
                let endpoint: std::net::SocketAddr = peer_endpoint
                    .parse()
                    .map_err(|_| format!("bad endpoint {peer_endpoint:?}"))?;
                let e = |e: anyhow::Error| format!("{e:#}");
                if backend == super::calls::VpnBackend::Ipsec {
                    let ip = |s: &str| super::vpn::parse_cidr(s).map(|(ip, _)| ip).map_err(e);
                    let end = super::ipsec::End {
                        name: iface.clone(),
                        remote: endpoint.ip(),
                        inner: ip(&addr)?,
                        peer_inner: ip(&peer_allowed)?,
                        psk: psk.ok_or("an IPsec tunnel needs its pre-shared key")?,
                        initiate: false,
                    };
                    super::ipsec::up(&end).map_err(e)?;
                    tracing::info!("IPsec tunnel {iface} up: {addr}, peer {}", endpoint.ip());
                    return json(&super::calls::VpnEnd {
                        public: String::new(),
                    });
                }
                let (private, public) = super::vpn::keypair().map_err(e)?;
                super::vpn::up(&iface, &private, port, &addr).map_err(e)?;
                if let Err(err) =
                    super::vpn::add_peer(&iface, &peer_public, endpoint, &peer_allowed)
                {
                    let _ = super::vpn::down(&iface);
                    return Err(e(err));
                }
                tracing::info!("tunnel {iface} up: {addr}, peer {peer_endpoint}");
                json(&super::calls::VpnEnd { public })
            }
            Call::VpnDown { iface } => {
                if !is_root() {
                    return Err("taking a tunnel down needs root".into());
                }
                if super::ipsec::exists(&iface) {
                    super::ipsec::down(&iface)
                } else {
                    super::vpn::down(&iface)
                }
                .map_err(|e| format!("{e:#}"))?;
                Ok("{}".into())
            }
            Call::Check => json(&self.check(ctx)),
            Call::Begin { id, keep_images } => {
                self.lock().entry(ctx.conn).or_default().insert(
                    id,
                    Open {
                        keep_images,
                        restored: None,
                        root: ctx.root.clone(),
                    },
                );
                json(&self.check(ctx))
            }
            Call::Restore {
                id,
                kind,
                tcp,
                lazy,
            } => json(&self.restore(ctx, &id, &kind, tcp, lazy)?),
            Call::Commit { id } => {
                let mut map = self.lock();
                let open = map.entry(ctx.conn).or_default();
                match open.get(&id) {
                    Some(Open {
                        restored: Some(_), ..
                    }) => {
                        open.remove(&id);
                        tracing::info!("migration {id}: committed");
                        Ok("{}".into())
                    }
                    _ => Err(format!("migration {id}: nothing restored to commit")),
                }
            }
            Call::Cleanup { id } => {
                let dir = confine(&ctx.root, &migration_dir(&id)).map_err(|e| e.to_string())?;
                // A lazy restore's daemon may still be bringing memory in from these images.
                wait_for_lazy_pages(&dir, std::time::Duration::from_secs(60));
                remove_tree(&dir).map(|()| "{}".into())
            }
        }
    }

    fn closed(&self, conn: u64) {
        let left = self.lock().remove(&conn).unwrap_or_default();
        for (id, open) in left {
            tracing::warn!("migration {id}: the source went away before committing; abandoning it");
            if let Some(p) = &open.restored {
                tracing::warn!("migration {id}: stopping the restored copy ({p:?})");
                self.kill(p);
            }
            if !open.keep_images {
                if let Ok(dir) = confine(&open.root, &migration_dir(&id)) {
                    let _ = remove_tree(&dir);
                }
            }
        }
    }
}

/// Wait (at most `limit`) until no `criu lazy-pages` daemon serves images under `dir`.
fn wait_for_lazy_pages(dir: &std::path::Path, limit: std::time::Duration) {
    let needle = dir.to_string_lossy().into_owned();
    let t0 = Instant::now();
    let busy = || {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| {
                std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                    // argv: criu lazy-pages -D DIR ...
                    let args: Vec<String> = c
                        .split(|&b| b == 0)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect();
                    args.get(1).is_some_and(|a| a == "lazy-pages")
                        && args.iter().any(|a| a.starts_with(needle.as_str()))
                })
            })
    };
    while busy() && t0.elapsed() < limit {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Remove a tree; a restore that just finished may hold it briefly, so retry for a moment.
fn remove_tree(dir: &std::path::Path) -> Result<(), String> {
    let mut tries = 0;
    loop {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if tries < 20 => {
                tracing::debug!("removing {}: {e}; retrying", dir.display());
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => return Err(format!("cannot remove {}: {e}", dir.display())),
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, String> {
    serde_json::to_string(v).map_err(|e| e.to_string())
}
