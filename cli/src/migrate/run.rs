//! The source's side of `hop migrate`: prepare, pre-copy rounds, stop-and-copy, restore at the
//! target, commit, clean up; rollback at the source when anything fails after the freeze.

use super::app::App;
use super::calls::{bundle_dir, images_dir, Call, Checked, Restored, Tcp};
use super::follow::Follow;
use super::group::Meeting;
use super::haproxy::Hold;
use super::plan::{self, Budget, Next, RoundFigures};
use super::timeline::{RoundRow, Timeline};
use crate::checkpoint::criu::Criu;
use crate::progress::Display;
use anyhow::{anyhow, bail, Context, Result};
use hop_engine::chunk::ChunkParams;
use hop_engine::net::control::SyncSettings;
use hop_engine::net::{ClientSettings, Link, RemotePath};
use hop_engine::report::Report;
use hop_engine::Progress;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What `hop migrate` was asked.
pub struct Options {
    /// The application.
    pub app: App,
    /// The target (`quic://HOST:PORT`; the path is not used).
    pub target: RemotePath,
    /// Identity, known hosts, transport.
    pub client: ClientSettings,
    /// Downtime budget.
    pub max_downtime: Duration,
    /// Most pre-copy rounds (0: stop and copy at once).
    pub rounds: usize,
    /// zstd level for chunk payloads.
    pub compress: Option<i32>,
    /// Where the source keeps its images (a fresh directory is made under it).
    pub images_dir: PathBuf,
    /// Keep the images on both sides.
    pub keep_images: bool,
    /// What happens to established TCP connections.
    pub tcp: Tcp,
    /// The target restores lazily (post-copy from its local images).
    pub lazy_restore: bool,
    /// Rounds after the first push what the target lacks without waiting for its want-lists.
    pub push: bool,
    /// HAProxy in front of the application: hold its clients during the move.
    pub hold: Option<Hold>,
    /// The application's address at the target, for HAProxy (`IP:PORT`); `None` keeps it.
    pub hold_addr: Option<String>,
    /// No progress lines.
    pub quiet: bool,
    /// A member of a group moved together: the group, and this member's place in the restore
    /// order.
    pub group: Option<(std::sync::Arc<super::group::Group>, usize)>,
}

/// Progress lines on standard error, stamped with the time since the start.
struct Say {
    t0: Instant,
    quiet: bool,
    /// The application's name, when several move at once.
    label: Option<String>,
}

impl Say {
    fn line(&self, msg: impl AsRef<str>) {
        if !self.quiet {
            let label = self
                .label
                .as_deref()
                .map(|l| format!("{l}: "))
                .unwrap_or_default();
            crate::progress::line(&format!(
                "[{:7.2}s] {label}{}",
                self.t0.elapsed().as_secs_f64(),
                msg.as_ref()
            ));
        }
    }

    /// A live view of a phase until the value is dropped (a bar for a transfer counting in
    /// `progress`, else a spinner).
    fn phase(&self, what: &str, progress: Option<Arc<Progress>>) -> Display {
        let label = match &self.label {
            Some(l) => format!("{l}: {what}"),
            None => what.to_string(),
        };
        Display::phase(label, progress, !self.quiet)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Chunk sizes of a migration's syncs: memory images are cut on every page.
fn params() -> ChunkParams {
    ChunkParams::default().with_pages(true)
}

/// How images and bundles are synced.
fn settings(o: &Options, delete: bool) -> SyncSettings {
    SyncSettings {
        params: params(),
        compress: o.compress,
        delete,
        dry_run: false,
        fsync: false,
        sparse: true,
        no_index_cache: false,
        streams: o.client.net.streams as u32,
        delta: true,
        rules: Vec::new(),
        // The target's images are scratch: updating them in place spares copying and hashing
        // the unchanged hundreds of MB each round.
        inplace: true,
        // From round 2 on the target holds the previous round: what it lacks goes at once.
        push: o.push,
    }
}

/// Where the migration stands, for the cleanup and the rollback.
struct State {
    id: String,
    local: PathBuf,
    /// The final dump succeeded: the application no longer runs at the source.
    frozen: bool,
    /// Keep the local images whatever happens (the operator needs them).
    keep_local: bool,
    /// HAProxy holds the application's clients (since this instant).
    held: Option<Instant>,
    /// Group meetings passed (see [`super::group`]).
    met: usize,
}

/// Migrate. The timeline is returned in both outcomes; the error says what failed and where the
/// application runs now.
pub fn migrate(o: &Options) -> (Timeline, Result<()>) {
    let t0 = Instant::now();
    let say = Say {
        t0,
        quiet: o.quiet,
        label: o.group.as_ref().map(|_| o.app.name()),
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let id = format!("{}-{stamp}-{}", o.app.name(), std::process::id());
    let mut tl = Timeline {
        id: id.clone(),
        app: o.app.describe(),
        target: o.target.host_port(),
        ..Default::default()
    };
    let mut st = State {
        id,
        local: o.images_dir.join(format!("hop-migrate-{}", tl.id)),
        frozen: false,
        keep_local: false,
        held: None,
        met: 0,
    };
    let mut link = None;
    let r = run(o, &say, &mut tl, &mut st, &mut link);
    if let (Err(_), Some((g, i))) = (&r, &o.group) {
        // Nobody in the group waits for this member any more.
        g.leave(*i, st.met);
    }
    tl.total_ms = ms(t0.elapsed());
    let r = match r {
        Ok(()) => {
            tl.outcome = "migrated".into();
            Ok(())
        }
        Err(e) if st.frozen => {
            // Close the connection first: the target stops any restored copy of its own
            // accord when the connection ends without a commit.
            if let Some(l) = link.take() {
                l.close();
            }
            say.line(format!("failed after the freeze: {e:#}"));
            say.line("rolling back: restoring the application at the source");
            let criu = Criu::find();
            let back = criu.and_then(|c| o.app.rollback(&c, &st.local.join("final"), o.tcp));
            match back {
                Ok(where_) => {
                    tl.outcome = "rolled back".into();
                    tl.result = where_.clone();
                    say.line(&where_);
                    Err(e.context(format!("migration failed; rolled back: {where_}")))
                }
                Err(b) => {
                    tl.outcome = "failed".into();
                    tl.result = format!("rollback failed; images kept in {}", st.local.display());
                    let kept = st.local.clone();
                    st.keep_local = true;
                    Err(e.context(format!(
                        "migration failed and the rollback failed too: {b:#}\nthe final images are in {} (`hop restore --dir {}/final`)",
                        kept.display(),
                        kept.display()
                    )))
                }
            }
        }
        Err(e) => {
            tl.outcome = "failed".into();
            tl.result = format!("{} still runs at the source", o.app.describe());
            Err(e.context(format!(
                "migration failed before the freeze; {} still runs at the source",
                o.app.describe()
            )))
        }
    };
    // Clients held at HAProxy go back to the source's address (where the application runs
    // again, or still).
    if let (Some(h), Some(since)) = (&o.hold, st.held) {
        match h.release(None) {
            Ok(()) => say.line(format!(
                "HAProxy: requests released to the source after {:.0} ms",
                ms(since.elapsed())
            )),
            Err(e) => say.line(format!(
                "HAProxy: could not release the held requests: {e:#}"
            )),
        }
        tl.hold_ms = ms(since.elapsed());
    }
    // Clean up: local images always (unless kept or needed), the target's best effort.
    if !o.keep_images && !st.keep_local {
        let _ = std::fs::remove_dir_all(&st.local);
    }
    if let Some(mut l) = link {
        if !o.keep_images {
            if let Err(e) = (Call::Cleanup { id: st.id.clone() }).send::<serde_json::Value>(&mut l)
            {
                tracing::warn!("could not remove the images at the target: {e:#}");
            }
        }
        l.close();
    }
    (tl, r)
}

fn run(
    o: &Options,
    say: &Say,
    tl: &mut Timeline,
    st: &mut State,
    link_slot: &mut Option<Link>,
) -> Result<()> {
    let t0 = Instant::now();
    let criu = Criu::find()?;
    criu.check()
        .context("CRIU cannot checkpoint on this host")?;
    std::fs::create_dir_all(&st.local)
        .with_context(|| format!("cannot create {}", st.local.display()))?;

    // Prepare: connect, check the target, bring the container's bundle.
    say.line(format!("connecting to {}", o.target.host_port()));
    let link = link_slot.insert(Link::connect(&o.target, &o.client)?);
    let checked: Checked = Call::Begin {
        id: st.id.clone(),
        keep_images: o.keep_images,
    }
    .send(link)?;
    match (&checked.criu, &checked.criu_problem) {
        (Some(v), _) => {
            let theirs: Vec<u32> = v.split('.').filter_map(|x| x.parse().ok()).collect();
            if theirs.first() != Some(&criu.version.0) {
                bail!(
                    "CRIU versions differ: {}.{}.{} here, {v} at the target; install the same major version on both",
                    criu.version.0, criu.version.1, criu.version.2
                );
            }
        }
        (None, p) => bail!(
            "the target cannot restore: {}",
            p.as_deref().unwrap_or("no CRIU")
        ),
    }
    let same_kernel = !checked.boot_id.is_empty() && checked.boot_id == super::calls::boot_id();
    if !checked.root {
        bail!("`hop serve` at the target does not run as root; restores need root");
    }
    if matches!(o.app, App::Container { .. }) && !checked.runc {
        bail!("the target has no runc (apt-get install runc)");
    }
    say.line(format!(
        "target {} ({}): CRIU {}, {:.1} GB free",
        o.target.host_port(),
        checked.host,
        checked.criu.as_deref().unwrap_or("?"),
        checked.free_bytes as f64 / 1e9
    ));
    if let Some(h) = &o.hold {
        let s = h.check()?;
        say.line(format!(
            "HAProxy: server {}/{} is {} at {}",
            h.backend, h.server, s.status, s.addr
        ));
    }
    if let App::Container { id, bundle, .. } = &o.app {
        say.line(format!("syncing bundle {}", bundle.display()));
        let progress = Arc::new(Progress::default());
        link.set_progress(progress.clone());
        let shown = say.phase("bundle", Some(progress));
        let r = link.push(bundle, &bundle_dir(id), settings(o, true), None, None)?;
        drop(shown);
        if !r.errors.is_empty() {
            // The container runs and writes its files meanwhile; whatever changed under the
            // copy is copied again after the freeze.
            say.line(format!(
                "{} files of the bundle changed while they were copied; they are copied again after the freeze",
                r.errors.len()
            ));
        }
        tl.bundle_bytes_wire = r.stats.bytes_wire;
    }
    tl.prepare_ms = ms(t0.elapsed());

    // Pre-copy rounds.
    let dest = images_dir(&st.id);
    let mut figures: Vec<RoundFigures> = Vec::new();
    let mut prev: Option<PathBuf> = None;
    let mut last_start: Option<Instant> = None;
    let restore_guess = 500.0;
    let budget = Budget {
        max_downtime_ms: ms(o.max_downtime),
        max_rounds: o.rounds,
        restore_ms: restore_guess,
    };
    loop {
        if let Next::Final(why) = plan::next(&figures, &budget) {
            say.line(format!("pre-copy done: {why}"));
            tl.stop_reason = why;
            break;
        }
        let n = figures.len() + 1;
        let dir = st.local.join(format!("round-{n}"));
        let start = Instant::now();
        let shown = say.phase(&format!("round {n}: dump"), None);
        // A pre-copy dump can fail on a passing state (a connection being set up); the
        // application keeps running, so try once more before giving up. The images are
        // chunked while CRIU writes them.
        let follow = Follow::start(&dir, prev.as_deref(), &chunk_cache(st), params());
        let (d, known) = match o.app.dump(&criu, &dir, true, o.tcp) {
            Ok(d) => (d, follow.finish(true)),
            Err(e) => {
                follow.finish(false);
                say.line(format!("round {n}: dump failed ({e:#}); trying once more"));
                let _ = std::fs::remove_dir_all(&dir);
                std::thread::sleep(Duration::from_millis(200));
                let follow = Follow::start(&dir, prev.as_deref(), &chunk_cache(st), params());
                let d = o.app.dump(&criu, &dir, true, o.tcp);
                let known = follow.finish(d.is_ok());
                (d.with_context(|| format!("round {n}: dump"))?, known)
            }
        };
        drop(shown);
        say.line(format!(
            "round {n}: dumped {:.1} MB in {:.0} ms (frozen {:.0} ms); syncing",
            d.bytes as f64 / 1e6,
            d.dump_ms,
            d.frozen_ms
        ));
        if n == 1 && checked.free_bytes > 0 && checked.free_bytes < d.bytes + d.bytes / 8 {
            bail!(
                "the target has {:.1} GB free under its root, the images need {:.1} GB (and a \
                 container its bundle): free space there or choose another --root",
                checked.free_bytes as f64 / 1e9,
                d.bytes as f64 / 1e9
            );
        }
        let (r, sync_ms) = push_images(
            link,
            o,
            say,
            &format!("round {n}: sync"),
            st,
            &dir,
            &dest,
            prev.as_deref(),
            known,
        )
        .with_context(|| format!("round {n}: sync"))?;
        let sent = r.stats.bytes_literal;
        say.line(format!(
            "round {n}: sent {:.1} MB ({:.1} MB on the wire) in {:.0} ms",
            sent as f64 / 1e6,
            r.stats.bytes_wire as f64 / 1e6,
            sync_ms
        ));
        figures.push(RoundFigures {
            dump_ms: d.dump_ms,
            bytes_sent: sent,
            sync_ms,
            interval_ms: last_start.map(|s| ms(start - s)).unwrap_or(0.0),
        });
        tl.rounds.push(row(n.to_string(), &d, &r, sync_ms));
        last_start = Some(start);
        if let Some(old) = prev.replace(dir) {
            let _ = std::fs::remove_dir_all(old);
        }
    }

    // Stop and copy.
    let dir = st.local.join("final");
    if let Some((g, _)) = &o.group {
        say.line("pre-copy done; waiting for the group");
        if !g.meet(Meeting::PreCopied, true) {
            st.met = 3;
            bail!("another container of the group failed before the freeze");
        }
        st.met = 1;
    }
    if let Some(h) = &o.hold {
        st.held = Some(Instant::now());
        let drained = h.hold(Duration::from_secs(5))?;
        tl.drain_ms = ms(drained);
        say.line(format!(
            "HAProxy: holding new requests; those in flight finished in {:.0} ms",
            tl.drain_ms
        ));
    }
    if let Some((g, _)) = &o.group {
        // Every member's clients are held and drained before anyone freezes.
        if !g.meet(Meeting::Held, true) {
            st.met = 3;
            bail!("another container of the group failed before the freeze");
        }
        st.met = 2;
    }
    let freeze = Instant::now();
    say.line("final dump: the application is frozen from here");
    let shown = say.phase("final dump", None);
    let follow = Follow::start(&dir, prev.as_deref(), &chunk_cache(st), params());
    let d = o.app.dump(&criu, &dir, false, o.tcp);
    let known = follow.finish(d.is_ok());
    let d = d.context("final dump (the application keeps running at the source)")?;
    drop(shown);
    st.frozen = true;
    let (r, sync_ms) = push_images(
        link,
        o,
        say,
        "final sync",
        st,
        &dir,
        &dest,
        prev.as_deref(),
        known,
    )
    .context("final sync")?;
    tl.rounds.push(row("final".into(), &d, &r, sync_ms));
    say.line(format!(
        "final: dumped {:.1} MB in {:.0} ms, sent {:.1} MB in {:.0} ms",
        d.bytes as f64 / 1e6,
        d.dump_ms,
        r.stats.bytes_literal as f64 / 1e6,
        sync_ms
    ));
    if let App::Container { id, bundle, .. } = &o.app {
        // Files the container changed since the bundle was synced.
        let t = Instant::now();
        let progress = Arc::new(Progress::default());
        link.set_progress(progress.clone());
        let shown = say.phase("container files", Some(progress));
        let r = link
            .push(bundle, &bundle_dir(id), settings(o, true), None, None)
            .context("final sync of the container's files")?;
        drop(shown);
        check_report(&r, "bundle")?;
        tl.final_fs_sync_ms = ms(t.elapsed());
    }
    // A target on the same kernel (namespaces on one machine) needs the PID back before the
    // restore can reuse it.
    if same_kernel {
        let t = Instant::now();
        o.app.wait_released(Duration::from_secs(5));
        tl.release_wait_ms = ms(t.elapsed());
    }
    if let Some((g, i)) = &o.group {
        // Restores go in the group's order.
        g.wait_turn(*i);
    }
    say.line("restoring at the target");
    let t = Instant::now();
    let shown = say.phase("restore", None);
    let restored: Result<Restored> = Call::Restore {
        id: st.id.clone(),
        kind: o.app.kind(),
        tcp: o.tcp,
        lazy: o.lazy_restore,
    }
    .send(link);
    drop(shown);
    if let Some((g, i)) = &o.group {
        g.finish_turn(*i);
        st.met = 3;
        let all = g.meet(Meeting::Restored, restored.is_ok());
        if restored.is_ok() && !all {
            bail!("another container of the group did not restore; the whole group goes back");
        }
    }
    let restored = restored.context("restore at the target")?;
    tl.restore_ms = ms(t.elapsed());
    tl.downtime_ms = ms(freeze.elapsed());
    if let (Some(h), Some(since)) = (&o.hold, st.held) {
        // The restored application runs: send the held requests (and all later ones) there.
        h.release(o.hold_addr.as_deref())
            .context("HAProxy: pointing the server at the target")?;
        st.held = None;
        tl.hold_ms = ms(since.elapsed());
        say.line(format!(
            "HAProxy: requests go to {} (held {:.0} ms)",
            o.hold_addr.as_deref().unwrap_or("the same address"),
            tl.hold_ms
        ));
    }
    say.line(format!(
        "running at the target as PID {} after {:.0} ms of downtime",
        restored.pid, tl.downtime_ms
    ));
    // The target keeps its copy once it hears this.
    let committed: Result<serde_json::Value> = Call::Commit { id: st.id.clone() }.send(link);
    if let Err(e) = committed {
        // We cannot know whether the commit arrived: do not start a second copy here.
        st.frozen = false;
        st.keep_local = true;
        return Err(anyhow!(
            "the target restored the application (PID {}) but the commit was not confirmed: {e:#}\n\
             if the commit never arrived the target stops its copy; check there before restoring \
             from the source's final images in {}",
            restored.pid,
            dir.display()
        ));
    }
    st.frozen = false;
    o.app.finish();
    tl.result = format!(
        "running at {} as PID {}",
        o.target.host_port(),
        restored.pid
    );
    Ok(())
}

/// Push one round's images (`prev`: the previous round, which the target holds) and time it.
#[allow(clippy::too_many_arguments)]
fn push_images(
    link: &mut Link,
    o: &Options,
    say: &Say,
    phase: &str,
    st: &State,
    dir: &Path,
    dest: &str,
    prev: Option<&Path>,
    known: Option<Arc<hop_engine::index::IndexCache>>,
) -> Result<(Report, f64)> {
    let t = Instant::now();
    let progress = Arc::new(Progress::default());
    link.set_progress(progress.clone());
    let _shown = say.phase(phase, Some(progress));
    let r = link.push_known(
        dir,
        dest,
        settings(o, true),
        Some(chunk_cache(st)),
        prev.map(Path::to_path_buf),
        known,
    )?;
    check_report(&r, "images")?;
    Ok((r, ms(t.elapsed())))
}

/// The timeline row of a round.
fn row(round: String, d: &super::app::Dumped, r: &Report, sync_ms: f64) -> RoundRow {
    RoundRow {
        round,
        dump_ms: d.dump_ms,
        frozen_ms: d.frozen_ms,
        bytes_dumped: d.bytes,
        bytes_sent: r.stats.bytes_literal,
        bytes_wire: r.stats.bytes_wire,
        sync_ms,
    }
}

/// The chunk cache of the source's images: each round's chunk lists, so that the next round's
/// sender finds those of its basis (the previous round) without reading it again.
fn chunk_cache(st: &State) -> PathBuf {
    st.local.join(".chunks.hopidx")
}

/// A sync that reported per-entry errors did not deliver everything.
fn check_report(r: &hop_engine::report::Report, what: &str) -> Result<()> {
    if let Some(e) = r.errors.first() {
        bail!("{what}: {} entries failed, first: {e}", r.errors.len());
    }
    Ok(())
}

/// The default place for the source's images: tmpfs (`/dev/shm`) when it exists.
pub fn default_images_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
