//! The receiving half: index what the destination (and any basis directories) already hold,
//! plan, then apply the manifest: directories, files (in parallel, each built in a temporary file
//! and renamed into place once verified), symlinks, metadata, deletions. A new file whose chunk
//! list arrives in parts (the sender still reads it) is planned and written part by part.

use crate::assemble::{assemble, AssembleOptions, Fetched, FileTable};
use crate::beneath::Parent;
use crate::chunk::ChunkParams;
pub use crate::chunklist::Incoming;
use crate::error::{Error, IoContext, Result};
use crate::index::{cache_path_for, ChunkIndex, ChunksRef, EntryRef, IndexCache, StatKey};
use crate::manifest::{Entry, EntryKind, Meta};
use crate::meta::{self, Apply};
use crate::path::RelPath;
use crate::plan::{plan_file, Action, DestEntry, DestKind, Plan};
use crate::report::{Change, ChangeKind, Progress, Report};
use crate::scan::{scan, ScanKind};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

/// Receiver settings.
#[derive(Clone, Debug)]
pub struct ReceiverOptions {
    /// Chunk sizes (must match the sender's for local data to be found).
    pub params: ChunkParams,
    /// Delete destination entries that are not in the source.
    pub delete: bool,
    /// Extra directories whose files may supply chunks (like rsync's `--copy-dest`).
    pub basis: Vec<PathBuf>,
    /// Plan and report, change nothing.
    pub dry_run: bool,
    /// fsync each written file before renaming it into place.
    pub fsync: bool,
    /// Write runs of zero bytes as holes.
    pub sparse: bool,
    /// Where to keep the index cache; `None` for the default (`.NAME.hopidx` beside the
    /// destination).
    pub index_cache: Option<PathBuf>,
    /// Do not read or write an index cache.
    pub no_index_cache: bool,
    /// Ask for sub-chunk patches of chunks that look like edits of local data
    /// (see [`crate::delta`]).
    pub delta: bool,
    /// Include/exclude rules of the sync: excluded destination paths are never deleted.
    pub rules: Option<std::sync::Arc<crate::filter::Rules>>,
    /// Update changed files in place when little of them changes (see [`crate::inplace`]):
    /// faster for large files, but a failure part-way leaves a file half-updated.
    pub inplace: bool,
}

impl Default for ReceiverOptions {
    fn default() -> Self {
        ReceiverOptions {
            params: ChunkParams::default(),
            delete: false,
            basis: Vec::new(),
            dry_run: false,
            fsync: false,
            sparse: true,
            index_cache: None,
            no_index_cache: false,
            delta: true,
            rules: None,
            inplace: false,
        }
    }
}

/// Supplies the chunks a receiver asks for. Local syncs call the sender directly; remote ones
/// go through the transport.
///
/// Files are written by a few *lanes* at once; each lane writes its files one after another and
/// announces, before its first file, every fetch it is going to make, so a remote source can
/// request them all at once and keep the link busy.
pub trait ChunkSource: Sync {
    /// How many lanes write files at once.
    fn lanes(&self) -> usize {
        rayon::current_num_threads().max(1)
    }

    /// More requests lane `lane` will make, in order, after those announced before. A lane may
    /// still skip an announced request or make one it did not announce (a retry).
    fn announce(&self, _lane: usize, _requests: Vec<Request>) {}

    /// Manifest entry `entry` (a file) will fetch nothing: whatever the source holds for it
    /// unasked can go.
    fn unneeded(&self, _entry: u32) {}

    /// For an entry whose chunks the sender pushes without being asked (it believes it knows
    /// what this side holds): whether every chunk of `want` is among them (then no delta hints
    /// are worth computing). `None` when nothing of the entry is pushed.
    fn push_covers(&self, _entry: u32, _want: &[u32]) -> Option<bool> {
        None
    }

    /// Deliver the chunks of `req` apart from any lane (a file's writer repairing a few chunks
    /// while its lane's stream is busy with that file's other chunks).
    fn fetch_alone(
        &self,
        req: &Request,
        sink: &mut dyn FnMut(Fetched) -> Result<()>,
    ) -> Result<()> {
        self.fetch(0, req, sink)
    }

    /// The whole chunk list of manifest entry `entry` (a file whose list came as edits of a
    /// copy this side does not hold).
    fn chunk_list(&self, entry: u32) -> Result<Vec<crate::manifest::ChunkSpec>> {
        Err(Error::Protocol(format!(
            "entry {entry}: the chunk list came as edits of a copy this side does not hold"
        )))
    }

    /// Deliver the chunks of `req`, in order, through `sink`. If `sink` fails, the remaining
    /// chunks are discarded and its error returned.
    fn fetch(
        &self,
        lane: usize,
        req: &Request,
        sink: &mut dyn FnMut(Fetched) -> Result<()>,
    ) -> Result<()>;
}

/// The chunks one file needs from the sender.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Manifest entry number.
    pub entry: u32,
    /// Chunk numbers, in file order.
    pub want: Vec<u32>,
    /// Empty, or per wanted chunk the block hashes of its probable base (see [`crate::delta`]).
    pub hints: Vec<Vec<crate::delta::BlockHash>>,
    /// Ask the sender not to answer with references to chunks it believes the receiver holds
    /// (set on the retry after such a chunk turned out to be missing).
    pub no_refs: bool,
    /// The bytes the wanted chunks hold (what a source weighs when it spreads requests).
    pub bytes: u64,
}

/// The request for a file's fetches, with delta hints read from each chunk's base.
fn request(
    entry: u32,
    chunks: &[crate::manifest::ChunkSpec],
    fp: &crate::plan::FilePlan,
    table: &FileTable<'_>,
    delta: bool,
) -> Request {
    let mut hints = Vec::with_capacity(fp.fetch.len());
    let mut any = false;
    for (&n, base) in fp.fetch.iter().zip(&fp.bases).filter(|_| delta) {
        let h = base
            .and_then(|(f, off)| {
                crate::assemble::read_base(table, f, off, chunks[n as usize].len as usize).ok()
            })
            .map(|b| crate::delta::hint(&b))
            .unwrap_or_default();
        any |= !h.is_empty();
        hints.push(h);
    }
    if !any {
        hints.clear();
    }
    Request {
        entry,
        want: fp.fetch.clone(),
        hints,
        no_refs: false,
        bytes: fp.literal,
    }
}

/// The receiving half of a sync.
pub struct Receiver {
    dest: PathBuf,
    opts: ReceiverOptions,
    index: ChunkIndex,
    state: HashMap<RelPath, DestEntry>,
    /// Index file numbers of destination files, by path.
    dest_files: HashMap<RelPath, u32>,
    first_basis_file: u32,
    /// The index is the one its cache held, file for file (see [`Receiver::save_cache`]).
    index_as_cached: bool,
    errors: Vec<Error>,
    /// A reflink clone failed here once (the destination's file system has none): not tried
    /// again.
    no_clones: std::sync::atomic::AtomicBool,
    /// Handles of the destination's directories, reused from entry to entry.
    dirs: crate::beneath::Dirs,
    /// Held while this receiver exists: one sync at a time per destination.
    _lock: Option<std::fs::File>,
}

/// Take the destination's lock (`.NAME.hoplock` beside it, or beside its index cache), so that
/// two syncs into one destination never interleave: the second is refused with a clear error.
/// A dry run takes no lock, nor does a sync whose lock file cannot be created.
fn lock(dest: &Path, cache: &Path, dry: bool) -> Result<Option<std::fs::File>> {
    if dry {
        return Ok(None);
    }
    let path = cache.with_extension("hoplock");
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = std::fs::create_dir_all(dir);
    }
    let f = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(f) => f,
        // No place for a lock (a read-only or foreign parent directory): sync without one,
        // as rsync always does; the per-file guarantees do not depend on it.
        Err(e) => {
            tracing::debug!("no lock for {}: {e}", dest.display());
            return Ok(None);
        }
    };
    // SAFETY: flock on a descriptor we own.
    let r = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    if r != 0 {
        return Err(Error::Conflict {
            path: dest.into(),
            why: format!(
                "another hop sync is writing into it (lock {}); wait for it to finish (one whose \
                 sender was killed holds it until the receiver's --timeout passes, 15 s by default)",
                path.display()
            ),
        });
    }
    Ok(Some(f))
}

/// A file handed to a writer lane.
struct Job {
    i: usize,
    entry: Entry,
    fp: crate::plan::FilePlan,
    req: Option<Request>,
    /// For a file written while its chunk list arrives: the parts of its plan, as they come
    /// (`entry` then has no chunks yet, `fp` and `req` are unused).
    parts: Option<std::sync::mpsc::Receiver<PartMsg>>,
}

/// The writer lanes' queues, and what each was given so far.
struct Lanes {
    queues: Vec<std::sync::mpsc::Sender<Job>>,
    load: Vec<u64>,
}

impl Lanes {
    /// The least loaded lane, charged with a file of `size` bytes of which `literal` are
    /// fetched: bytes to fetch, a share of the size (local copies) and a fixed cost per file.
    fn pick(&mut self, literal: u64, size: u64) -> usize {
        let lane = (0..self.load.len())
            .min_by_key(|&k| self.load[k])
            .unwrap_or(0);
        if let Some(l) = self.load.get_mut(lane) {
            *l += literal + size / 16 + 4096;
        }
        lane
    }

    /// Hand `job` to lane `lane`.
    fn send(&self, lane: usize, job: Job) -> Result<()> {
        self.queues
            .get(lane)
            .ok_or_else(|| Error::Protocol("no writer lane".into()))?
            .send(job)
            .map_err(|_| Error::Protocol("a writer lane stopped".into()))
    }
}

/// What the manifest reader tells the writer of a file whose chunk list arrives in parts.
enum PartMsg {
    /// The next chunks of its list, their plan and the request for the chunks it fetches
    /// (announced already).
    Part {
        chunks: Vec<crate::manifest::ChunkSpec>,
        fp: crate::plan::FilePlan,
        req: Option<Request>,
    },
    /// The list is complete: the whole entry, to be checked and put in place.
    End(Entry),
    /// The sender could not read the file to its end: nothing is put in place.
    Abort,
}

/// A file of the manifest whose chunk list is still arriving (see [`Incoming::Begin`]).
struct Growing {
    i: usize,
    size: u64,
    /// Bytes of its list so far.
    listed: u64,
    how: GrowingHow,
}

/// How a file whose list arrives in parts is handled.
enum GrowingHow {
    /// Written as its list arrives by lane `lane`, which takes its parts from `parts`.
    Written {
        lane: usize,
        parts: std::sync::mpsc::Sender<PartMsg>,
        planner: crate::plan::PartPlanner,
    },
    /// Refused before it started (no room for it): the error is in the report.
    Refused,
    /// Planned and written once its whole list is here, like any file (the destination holds
    /// something at its path, or this is a dry run).
    Whole,
}

/// Files with at most this many literal bytes are fetched before assembly instead of streamed.
const INLINE_FETCH: u64 = 8 << 20;

impl Receiver {
    /// Scan and index the destination and basis directories.
    pub fn prepare(dest: &Path, opts: ReceiverOptions) -> Result<Receiver> {
        let t0 = std::time::Instant::now();
        let held = lock(dest, &Self::cache_path(dest, &opts), opts.dry_run)?;
        let s = scan(dest, None);
        let mut errors = s.errors;
        let mut state = HashMap::new();
        let mut file_paths = Vec::new();
        let mut file_keys = Vec::new();
        let mut file_rels = Vec::new();
        for e in s.entries {
            let kind = match e.kind {
                ScanKind::Dir => DestKind::Dir,
                ScanKind::File { .. } => {
                    file_paths.push(e.path.under(dest));
                    file_keys.push(e.key);
                    file_rels.push(e.path.clone());
                    DestKind::File(None)
                }
                ScanKind::Symlink { target } => DestKind::Symlink(target),
                ScanKind::Unreadable => DestKind::Other,
            };
            state.insert(e.path, DestEntry { kind, meta: e.meta });
        }
        for (p, _) in s.skipped {
            state.insert(
                p,
                DestEntry {
                    kind: DestKind::Other,
                    meta: Meta::default(),
                },
            );
        }
        let cache = if opts.no_index_cache {
            IndexCache::default()
        } else {
            IndexCache::load(&Self::cache_path(dest, &opts), opts.params)
        };
        tracing::debug!(
            "destination scanned ({} entries) and its index cache loaded ({} files) in {:?}",
            state.len(),
            cache.len(),
            t0.elapsed()
        );
        let mut index = ChunkIndex::default();
        let (ids, errs) = index.add_scanned(&file_paths, &file_keys, opts.params, &cache);
        errors.extend(errs);
        let mut dest_files = HashMap::new();
        for (rel, id) in file_rels.into_iter().zip(ids) {
            if let Some(id) = id {
                dest_files.insert(rel.clone(), id);
                if let Some(st) = state.get_mut(&rel) {
                    st.kind = DestKind::File(Some(id));
                }
            }
        }
        let first_basis_file = index.files.len() as u32;
        for b in &opts.basis {
            let bs = scan(b, None);
            errors.extend(bs.errors);
            let (paths, keys): (Vec<PathBuf>, Vec<_>) = bs
                .entries
                .iter()
                .filter(|e| matches!(e.kind, ScanKind::File { .. }))
                .map(|e| (e.path.under(b), e.key))
                .unzip();
            let (_, errs) = index.add_scanned(&paths, &keys, opts.params, &cache);
            errors.extend(errs);
        }
        tracing::debug!(
            "destination indexed: {} files, {} chunks, in {:?}",
            index.files.len(),
            index.len(),
            t0.elapsed()
        );
        // Every file known to the cache and the cache knows no other: saved again after a sync
        // that changed no file, it would be the same.
        let index_as_cached = index.cache_misses == 0 && index.files.len() == cache.len();
        Ok(Receiver {
            dest: dest.to_path_buf(),
            opts,
            index,
            state,
            dest_files,
            first_basis_file,
            index_as_cached,
            errors,
            no_clones: Default::default(),
            dirs: crate::beneath::Dirs::new(dest),
            _lock: held,
        })
    }

    fn cache_path(dest: &Path, opts: &ReceiverOptions) -> PathBuf {
        opts.index_cache
            .clone()
            .unwrap_or_else(|| cache_path_for(dest))
    }

    /// The chunk index built by [`Receiver::prepare`].
    pub fn index(&self) -> &ChunkIndex {
        &self.index
    }

    /// The change record for a file written (or to be written) with `sent` literal bytes.
    fn file_change(&self, path: &RelPath, sent: u64) -> Change {
        let kind = if self.state.contains_key(path) {
            ChangeKind::UpdatedFile(sent)
        } else {
            ChangeKind::NewFile(sent)
        };
        Change {
            path: path.clone(),
            kind,
        }
    }

    fn owner(&self) -> Apply {
        Apply {
            owner: meta::can_chown(),
        }
    }

    /// Remove what stands at `abs` when it is not of the wanted kind. Files in a removed
    /// directory are pinned first, so their chunks stay readable for the rest of the sync.
    fn make_way(
        &self,
        abs: &Path,
        rel: &RelPath,
        want_dir: bool,
        table: &FileTable<'_>,
    ) -> Result<()> {
        let Some(have) = self.state.get(rel) else {
            return Ok(());
        };
        match (&have.kind, want_dir) {
            (DestKind::Dir, true) => Ok(()),
            (DestKind::Dir, false) => {
                // Handles to it (or below it) must not be used again.
                self.dirs.forget_all();
                if std::fs::remove_dir(abs).is_ok() {
                    return Ok(());
                }
                if !self.opts.delete {
                    return Err(Error::Conflict {
                        path: abs.into(),
                        why: "a non-empty directory is in the way; use --delete to replace it"
                            .into(),
                    });
                }
                for (p, &n) in &self.dest_files {
                    if p.starts_with(rel) {
                        table.pin(n);
                    }
                }
                std::fs::remove_dir_all(abs).ctx("remove directory", abs)
            }
            (_, true) => {
                if let Some(&n) = self.dest_files.get(rel) {
                    table.pin(n);
                }
                std::fs::remove_file(abs).ctx("remove", abs)
            }
            (_, false) => Ok(()),
        }
    }

    /// Apply the manifest whose entries `next` yields one by one (`None` at its end), fetching
    /// missing chunks from `source`. Every entry is checked as it arrives; directories are made
    /// and files start being written (in lanes, see [`ChunkSource`]) while later entries are
    /// still on their way. Symlinks, metadata and deletions follow the end of the manifest.
    /// Per-entry failures are collected in the report, the rest of the tree is still synced; a
    /// malformed manifest or a failing `next` stops the run with that error.
    pub fn apply(
        mut self,
        next: &mut dyn FnMut() -> Result<Option<Incoming>>,
        source: &dyn ChunkSource,
        progress: &Progress,
    ) -> Result<Report> {
        let mut report = Report::default();
        report.errors.append(&mut self.errors);
        let owner = self.owner();
        let table = FileTable::new(&self.index);
        let dry = self.opts.dry_run;
        let mut validator = crate::manifest::Validator::new(self.opts.params.max_len());
        let mut manifest: Vec<Entry> = Vec::new();
        let mut actions: Vec<Action> = Vec::new();
        let mut failed_dirs: Vec<RelPath> = Vec::new();
        let under_failed =
            |p: &RelPath, failed: &[RelPath]| failed.iter().any(|f| p.starts_with(f) && p != f);
        let results: Mutex<Vec<(usize, Result<u64>)>> = Mutex::new(Vec::new());
        let mut literal = 0u64;
        // Files written as their lists arrived.
        let mut streamed: HashSet<usize> = HashSet::new();

        // 1. Directories as they arrive, 2. files dispatched to lanes as they arrive.
        let this = &self;
        let dispatched = std::thread::scope(|s| -> Result<()> {
            let count = if dry { 0 } else { source.lanes().max(1) };
            let mut queues = Vec::with_capacity(count);
            for k in 0..count {
                let (tx, rx) = std::sync::mpsc::channel::<Job>();
                queues.push(tx);
                let (results, table) = (&results, &table);
                s.spawn(move || {
                    for job in rx {
                        let r = match job.parts {
                            Some(parts) => match this.write_growing(
                                k,
                                job.i as u32,
                                &job.entry,
                                parts,
                                table,
                                source,
                                owner,
                                progress,
                            ) {
                                Ok(None) => continue,
                                Ok(Some(sent)) => Ok(sent),
                                Err(err) => Err(err),
                            },
                            None => this.write_file(
                                k,
                                job.i as u32,
                                &job.entry,
                                &job.fp,
                                job.req.as_ref(),
                                table,
                                source,
                                owner,
                                progress,
                            ),
                        };
                        results
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((job.i, r));
                    }
                });
            }
            let mut lanes = Lanes {
                load: vec![0u64; queues.len()],
                queues,
            };
            let mut planned = 0u64;
            // Entries whose chunk list came as edits of a copy that is not the one held here.
            let mut not_base: HashSet<usize> = HashSet::new();
            let mut growing: Option<Growing> = None;
            while let Some(item) = next()? {
                // A file whose list arrives in parts: its start and its parts.
                let item = match item {
                    Incoming::Begin { path, meta, size } => {
                        if growing.is_some() {
                            return Err(Error::Protocol("a file begun inside another".into()));
                        }
                        validator.admits(&path)?;
                        let i = manifest.len();
                        let how = if dry
                            || under_failed(&path, &failed_dirs)
                            || this.state.contains_key(&path)
                        {
                            GrowingHow::Whole
                        } else {
                            let e = Entry {
                                path,
                                kind: EntryKind::File {
                                    size,
                                    hash: crate::id::ChunkId::of(&[]),
                                    chunks: Vec::new(),
                                },
                                meta,
                            };
                            let whole = crate::plan::FilePlan {
                                literal: size,
                                ..Default::default()
                            };
                            match this.room_for(&e, &whole) {
                                Err(err) => {
                                    report.errors.push(err);
                                    GrowingHow::Refused
                                }
                                Ok(()) => {
                                    planned += size;
                                    progress.bytes_planned.store(planned, Ordering::Relaxed);
                                    if i == 0 {
                                        this.make_parent_of_root(&mut report);
                                    }
                                    let lane = lanes.pick(size, size);
                                    let (tx, rx) = std::sync::mpsc::channel();
                                    let job = Job {
                                        i,
                                        entry: e,
                                        fp: Default::default(),
                                        req: None,
                                        parts: Some(rx),
                                    };
                                    lanes.send(lane, job)?;
                                    GrowingHow::Written {
                                        lane,
                                        parts: tx,
                                        planner: Default::default(),
                                    }
                                }
                            }
                        };
                        growing = Some(Growing {
                            i,
                            size,
                            listed: 0,
                            how,
                        });
                        continue;
                    }
                    Incoming::Part(chunks) => {
                        let Some(g) = growing.as_mut() else {
                            return Err(Error::Protocol(
                                "a chunk list part without its file".into(),
                            ));
                        };
                        g.listed += chunks.iter().map(|c| c.len as u64).sum::<u64>();
                        validator.check_part(&chunks, g.listed, g.size)?;
                        if let GrowingHow::Written {
                            lane,
                            parts,
                            planner,
                        } = &mut g.how
                        {
                            this.plan_part(g.i as u32, *lane, chunks, planner, parts, source);
                        }
                        continue;
                    }
                    item => item,
                };
                // The whole entry of a file begun last, unless it is planned like any other.
                if let Some(g) = growing
                    .take()
                    .filter(|g| !matches!(g.how, GrowingHow::Whole))
                {
                    let Incoming::Entry(e) = item else {
                        return Err(Error::Protocol(
                            "a file sent while read came as edits".into(),
                        ));
                    };
                    validator.check(&e)?;
                    if let EntryKind::File { size, .. } = e.kind {
                        report.stats.files += 1;
                        report.stats.bytes_total += size;
                    }
                    let a = match (g.how, &e.kind) {
                        (
                            GrowingHow::Written {
                                lane,
                                parts,
                                mut planner,
                            },
                            EntryKind::File { chunks, .. },
                        ) => {
                            // Chunks in the list's last frame (a sender may put some there):
                            // one more part.
                            let rest = chunks
                                .get(planner.planned() as usize..)
                                .unwrap_or_default()
                                .to_vec();
                            if !rest.is_empty() {
                                this.plan_part(
                                    g.i as u32,
                                    lane,
                                    rest,
                                    &mut planner,
                                    &parts,
                                    source,
                                );
                            }
                            let _ = parts.send(PartMsg::End(e.clone()));
                            streamed.insert(g.i);
                            Action::Write(planner.total())
                        }
                        // Unreadable at the sender part-way: nothing is put in place.
                        (GrowingHow::Written { parts, .. }, _) => {
                            let _ = parts.send(PartMsg::Abort);
                            Action::Skip
                        }
                        // Refused for want of room (the error is reported).
                        _ => Action::Skip,
                    };
                    manifest.push(e);
                    actions.push(a);
                    continue;
                }
                let (e, was_base) = this.resolve(item, manifest.len() as u32, source)?;
                if !was_base {
                    not_base.insert(manifest.len());
                }
                tracing::trace!("manifest entry {}: {:?}", manifest.len(), e.path);
                validator.check(&e)?;
                let i = manifest.len();
                let a = crate::plan::action(&e, this.state.get(&e.path), &this.index);
                if let EntryKind::File { size, .. } = e.kind {
                    report.stats.files += 1;
                    report.stats.bytes_total += size;
                }
                let fetches = matches!(&a, Action::Write(fp) if !fp.fetch.is_empty() && !dry)
                    && !under_failed(&e.path, &failed_dirs);
                if !fetches && matches!(e.kind, EntryKind::File { .. }) {
                    source.unneeded(i as u32);
                }
                match &a {
                    Action::Dir => this.make_dir(&e, &table, dry, &mut report, &mut failed_dirs),
                    Action::Write(fp) if !under_failed(&e.path, &failed_dirs) => {
                        if !dry {
                            if let Err(err) = this.room_for(&e, fp) {
                                source.unneeded(i as u32);
                                report.errors.push(err);
                                manifest.push(e);
                                actions.push(Action::Keep);
                                continue;
                            }
                        }
                        planned += e.size();
                        progress.bytes_planned.store(planned, Ordering::Relaxed);
                        if i == 0 && !dry {
                            this.make_parent_of_root(&mut report);
                        }
                        if dry {
                            literal += fp.literal;
                            report.changes.push(this.file_change(&e.path, fp.literal));
                        } else if let EntryKind::File { chunks, .. } = &e.kind {
                            let covered = source.push_covers(i as u32, &fp.fetch);
                            let delta = this.opts.delta && covered != Some(true);
                            let mut req = (!fp.fetch.is_empty())
                                .then(|| request(i as u32, chunks, fp, &table, delta));
                            // The sender's idea of this copy is wrong (it is not the base of
                            // the edits, or holds less than the push assumed): chunks sent as
                            // references to what the sender thinks is here would not decode.
                            if let Some(r) = &mut req {
                                r.no_refs = covered == Some(false) || not_base.contains(&i);
                            }
                            tracing::debug!(
                                "{:?}: planned, {} of {} chunks to fetch",
                                e.path,
                                fp.fetch.len(),
                                chunks.len()
                            );
                            let lane = lanes.pick(fp.literal, e.size());
                            if let Some(r) = &req {
                                source.announce(lane, vec![r.clone()]);
                            }
                            let job = Job {
                                i,
                                entry: e.clone(),
                                fp: fp.clone(),
                                req,
                                parts: None,
                            };
                            lanes.send(lane, job)?;
                        }
                    }
                    _ => {}
                }
                manifest.push(e);
                actions.push(a);
            }
            if manifest.is_empty() {
                return Err(Error::Protocol("empty manifest".into()));
            }
            Ok(())
        });
        dispatched?;
        let t_written = std::time::Instant::now();
        let delete = if self.opts.delete {
            let mut d = crate::plan::deletions(&manifest, &self.state);
            if let Some(rules) = &self.opts.rules {
                d.retain(|p| {
                    let is_dir = matches!(self.state.get(p).map(|h| &h.kind), Some(DestKind::Dir));
                    !rules.excluded_or_under(p, is_dir)
                });
            }
            d
        } else {
            Vec::new()
        };
        let plan = Plan { actions, delete };
        let manifest = &manifest[..];
        let plan = &plan;

        let mut results = results.into_inner().unwrap_or_else(|p| p.into_inner());
        results.sort_by_key(|(i, _)| *i);
        let mut written: HashSet<usize> = HashSet::new();
        for (i, r) in results {
            let e = &manifest[i];
            match r {
                Ok(sent) => {
                    literal += sent;
                    written.insert(i);
                    report.stats.files_written += 1;
                    report.stats.files_streamed += u64::from(streamed.contains(&i));
                    report.changes.push(self.file_change(&e.path, sent));
                }
                Err(err) => report.errors.push(err),
            }
        }
        report.stats.bytes_literal = literal;

        // 3. Symlinks, 4. metadata of kept files and links (those whose metadata changes are
        // `touched`: their stat is not the one indexed any more).
        let mut touched: HashSet<&RelPath> = HashSet::new();
        for (e, a) in manifest.iter().zip(&plan.actions) {
            if under_failed(&e.path, &failed_dirs) {
                continue;
            }
            let have = self.state.get(&e.path).map(|h| h.meta);
            let r = match (a, &e.kind) {
                (Action::Symlink, EntryKind::Symlink { target }) => {
                    report.changes.push(Change {
                        path: e.path.clone(),
                        kind: ChangeKind::Symlink,
                    });
                    if dry {
                        Ok(())
                    } else {
                        through(&self.dirs, &e.path, |abs| {
                            self.write_link(abs, &e.path, target, &e.meta, owner, &table)
                        })
                    }
                }
                (Action::Keep, _) | (Action::KeepLink, _) => {
                    report.stats.files_unchanged += u64::from(*a == Action::Keep);
                    let differs = have.is_none_or(|h| {
                        let mode_differs = *a == Action::Keep && h.mode != e.meta.mode;
                        mode_differs
                            || h.mtime_sec != e.meta.mtime_sec
                            || h.mtime_nsec != e.meta.mtime_nsec
                            || (owner.owner && (h.uid != e.meta.uid || h.gid != e.meta.gid))
                    });
                    if differs {
                        report.changes.push(Change {
                            path: e.path.clone(),
                            kind: ChangeKind::Metadata,
                        });
                    }
                    if dry || !differs {
                        Ok(())
                    } else {
                        touched.insert(&e.path);
                        through(&self.dirs, &e.path, |abs| {
                            meta::apply(abs, &e.meta, have.as_ref(), *a == Action::KeepLink, owner)
                        })
                    }
                }
                _ => Ok(()),
            };
            if let Err(err) = r {
                report.errors.push(err);
            }
        }

        tracing::debug!(
            "kept entries' metadata and links set in {:?}",
            t_written.elapsed()
        );
        let t = std::time::Instant::now();
        // 5. Deletions, deepest first.
        if !plan.delete.is_empty() {
            // Never delete below a directory that failed: its contents were not replaced.
            for p in &plan.delete {
                report.changes.push(Change {
                    path: p.clone(),
                    kind: ChangeKind::Deleted,
                });
                if dry {
                    continue;
                }
                let r = through(&self.dirs, p, |abs| {
                    match self.state.get(p).map(|h| &h.kind) {
                        Some(DestKind::Dir) => {
                            self.dirs.forget_all();
                            std::fs::remove_dir(abs)
                                .or_else(|_| std::fs::remove_dir_all(abs))
                                .ctx("remove directory", abs)
                        }
                        _ => std::fs::remove_file(abs).ctx("remove", abs),
                    }
                });
                match r {
                    Ok(()) => report.stats.entries_deleted += 1,
                    // Already gone: it was inside a directory replaced by another kind of entry
                    // (which is never followed, see [`Parent::of`]).
                    Err(Error::Conflict { path, .. }) if path != p.under(&self.dest) => {
                        report.stats.entries_deleted += 1
                    }
                    Err(e)
                        if matches!(
                            e.io_kind(),
                            Some(std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory)
                        ) =>
                    {
                        report.stats.entries_deleted += 1
                    }
                    Err(e) => report.errors.push(e),
                }
            }
        }

        tracing::debug!("{} deletions in {:?}", plan.delete.len(), t.elapsed());
        let t = std::time::Instant::now();
        // 6. Directory metadata, deepest first (after their contents were written). A directory
        // whose entries were all left alone and whose metadata is already right keeps it (its
        // mtime moves only when an entry in it is created, replaced or removed).
        let mut changed_dirs: HashSet<RelPath> = plan.delete.iter().map(RelPath::parent).collect();
        for (e, a) in manifest.iter().zip(&plan.actions) {
            let changes_parent = match a {
                Action::Write(_) | Action::Symlink => true,
                Action::Dir => !matches!(
                    self.state.get(&e.path).map(|h| &h.kind),
                    Some(DestKind::Dir)
                ),
                _ => false,
            };
            if changes_parent && !e.path.is_root() {
                changed_dirs.insert(e.path.parent());
            }
        }
        for (e, a) in manifest.iter().zip(&plan.actions).rev() {
            if *a != Action::Dir || dry || failed_dirs.contains(&e.path) {
                continue;
            }
            let have = self
                .state
                .get(&e.path)
                .filter(|h| h.kind == DestKind::Dir)
                .map(|h| h.meta);
            if let Some(h) = have {
                if h != e.meta && !report.changes.iter().any(|c| c.path == e.path) {
                    report.changes.push(Change {
                        path: e.path.clone(),
                        kind: ChangeKind::Metadata,
                    });
                }
            }
            if have == Some(e.meta) && !changed_dirs.contains(&e.path) {
                continue;
            }
            if let Err(err) = through(&self.dirs, &e.path, |abs| {
                meta::apply(abs, &e.meta, None, false, owner)
            }) {
                report.errors.push(err);
            }
        }

        report.stats.bytes_reused = report
            .stats
            .bytes_total
            .saturating_sub(report.stats.bytes_literal);
        report.stats.errors = report.errors.len() as u64;
        tracing::debug!("directories' metadata set in {:?}", t.elapsed());
        let t = std::time::Instant::now();
        if !dry && !self.opts.no_index_cache {
            self.save_cache(manifest, plan, &written, &touched);
        }
        tracing::debug!("index saved in {:?}", t.elapsed());
        Ok(report)
    }

    /// The entry an item of the manifest describes: a file whose chunk list came as edits of
    /// the copy held here gets its list rebuilt from that copy's (if the copy is the one the
    /// edits were made against), or fetched whole from the source (if not).
    /// The flag is false when the sender's idea of the copy here was wrong.
    fn resolve(&self, item: Incoming, i: u32, source: &dyn ChunkSource) -> Result<(Entry, bool)> {
        let (mut entry, base, edits) = match item {
            Incoming::Entry(e) => return Ok((e, true)),
            Incoming::Edited { entry, base, edits } => (entry, base, edits),
            Incoming::Begin { .. } | Incoming::Part(_) => {
                return Err(Error::Protocol("a chunk list part out of place".into()))
            }
        };
        let held = self
            .dest_files
            .get(&entry.path)
            .map(|&n| &self.index.files[n as usize].chunks)
            .filter(|fc| fc.hash == base);
        let was_base = held.is_some();
        let list = match held {
            Some(fc) => crate::chunklist::apply(&fc.chunks, &edits)?,
            None => {
                tracing::debug!(
                    "{:?}: not the copy the sender's edits were made against; fetching its whole chunk list",
                    entry.path
                );
                source.chunk_list(i)?
            }
        };
        if let EntryKind::File { chunks, .. } = &mut entry.kind {
            *chunks = list;
        }
        Ok((entry, was_base))
    }

    /// Make the directory of manifest entry `e` (phase 1), unless it exists; a failure is
    /// recorded and fails everything below it.
    fn make_dir(
        &self,
        e: &Entry,
        table: &FileTable<'_>,
        dry: bool,
        report: &mut Report,
        failed_dirs: &mut Vec<RelPath>,
    ) {
        if failed_dirs
            .iter()
            .any(|f| e.path.starts_with(f) && e.path != *f)
        {
            failed_dirs.push(e.path.clone());
            return;
        }
        let exists = matches!(
            self.state.get(&e.path).map(|h| &h.kind),
            Some(DestKind::Dir)
        );
        if exists {
            return;
        }
        report.changes.push(Change {
            path: e.path.clone(),
            kind: ChangeKind::NewDir,
        });
        if dry {
            return;
        }
        let r = through(&self.dirs, &e.path, |abs| {
            self.make_way(abs, &e.path, true, table)?;
            if e.path.is_root() {
                std::fs::create_dir_all(abs).ctx("create directory", abs)
            } else {
                std::fs::create_dir(abs).ctx("create directory", abs)
            }
        });
        if let Err(err) = r {
            report.errors.push(err);
            failed_dirs.push(e.path.clone());
        }
    }

    /// Refuse a large file the destination's file system has no room for, before writing any
    /// of it (a full disk is still handled if it fills meanwhile: the old file stays). A file
    /// updated in place needs room for its new data only; one rebuilt beside the old needs its
    /// size.
    fn room_for(&self, e: &Entry, fp: &crate::plan::FilePlan) -> Result<()> {
        const CHECKED_FROM: u64 = 1 << 20;
        let need = if self.opts.inplace {
            fp.literal
        } else {
            e.size()
        };
        if need < CHECKED_FROM {
            return Ok(());
        }
        let Some(free) = free_bytes(&self.dest) else {
            return Ok(());
        };
        if need > free {
            return Err(Error::Limit(format!(
                "{}: needs {need} bytes, the file system holding {} has {free} free; nothing was written",
                e.path.under(&self.dest).display(),
                self.dest.display()
            )));
        }
        Ok(())
    }

    /// A single file synced to a path whose directory does not exist yet (`hop sync f dir/`).
    fn make_parent_of_root(&self, report: &mut Report) {
        if let Some(parent) = self.dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Err(err) = std::fs::create_dir_all(parent).ctx("create directory", parent) {
                report.errors.push(err);
            }
        }
    }

    /// Plan the next `chunks` of the list of file `i` (written by `lane` as its list arrives),
    /// announce the fetch of what it lacks, and hand both to the file's writer.
    fn plan_part(
        &self,
        i: u32,
        lane: usize,
        chunks: Vec<crate::manifest::ChunkSpec>,
        planner: &mut crate::plan::PartPlanner,
        parts: &std::sync::mpsc::Sender<PartMsg>,
        source: &dyn ChunkSource,
    ) {
        let fp = planner.part(&chunks, &self.index);
        let req = (!fp.fetch.is_empty()).then(|| Request {
            entry: i,
            want: fp.fetch.clone(),
            hints: Vec::new(),
            no_refs: false,
            bytes: fp.literal,
        });
        if let Some(r) = &req {
            source.announce(lane, vec![r.clone()]);
        }
        tracing::debug!(
            "entry {i}: list part planned, {} of {} chunks to fetch",
            fp.fetch.len(),
            chunks.len()
        );
        // A writer that stopped (its file failed) no longer reads its parts.
        let _ = parts.send(PartMsg::Part { chunks, fp, req });
    }

    /// Write file `i`, whose list arrives in `parts` (`e` has its path and metadata), into a
    /// staged file part by part; put it in place once the whole list is here and checked.
    /// `None` when the sender could not read it to its end (nothing is put in place).
    #[allow(clippy::too_many_arguments)]
    fn write_growing(
        &self,
        lane: usize,
        i: u32,
        e: &Entry,
        parts: std::sync::mpsc::Receiver<PartMsg>,
        table: &FileTable<'_>,
        source: &dyn ChunkSource,
        owner: Apply,
        progress: &Progress,
    ) -> Result<Option<u64>> {
        let at = self.dirs.parent_of(&e.path)?;
        self.write_growing_at(lane, i, parts, table, source, owner, progress, &at)
            .map_err(|err| at.explain(err))
    }

    #[allow(clippy::too_many_arguments)]
    fn write_growing_at(
        &self,
        lane: usize,
        i: u32,
        parts: std::sync::mpsc::Receiver<PartMsg>,
        table: &FileTable<'_>,
        source: &dyn ChunkSource,
        owner: Apply,
        progress: &Progress,
        at: &Parent,
    ) -> Result<Option<u64>> {
        let io = at.path();
        let opts = AssembleOptions {
            sparse: self.opts.sparse,
            fsync: self.opts.fsync,
        };
        let staged = crate::assemble::Staged::create(io)?;
        let mut builder = crate::assemble::Builder::new(io, &staged, opts);
        let mut chunks: Vec<crate::manifest::ChunkSpec> = Vec::new();
        let mut literal = 0u64;
        // Local data that was not what the index said: the file is fetched whole at the end.
        let mut mismatch = false;
        for msg in parts {
            let (fp, req) = match msg {
                PartMsg::Part { chunks: c, fp, req } => {
                    chunks.extend(c);
                    (fp, req)
                }
                PartMsg::Abort => return Ok(None),
                PartMsg::End(whole) => {
                    let EntryKind::File {
                        size,
                        hash,
                        chunks: all,
                    } = &whole.kind
                    else {
                        return Err(Error::Protocol("write of a non-file".into()));
                    };
                    if !mismatch {
                        crate::assemble::check_listed(io, *size, hash, all)?;
                        builder.finish(all, *size)?;
                        return self
                            .install(staged, io, &whole, owner, table, progress)
                            .map(|()| Some(literal));
                    }
                    drop(builder);
                    drop(staged);
                    tracing::warn!(
                        "{}: local data did not match, fetching the whole file",
                        whole.path.under(&self.dest).display()
                    );
                    // Planned and fetched whole, as any file whose local data did not match.
                    let full = plan_file(all, &ChunkIndex::default());
                    return self
                        .write_file_at(
                            lane, i, &whole, &full, None, table, source, owner, progress, at,
                        )
                        .map(Some);
                }
            };
            literal += fp.literal;
            if mismatch {
                continue;
            }
            let r = fetching(source, lane, i, &fp, req.as_ref(), progress, &mut |next| {
                builder.part(&chunks, &fp, table, next)
            });
            match r {
                Ok(()) => {}
                Err(Error::Integrity { .. }) => mismatch = true,
                Err(err) => return Err(err),
            }
        }
        Err(Error::Protocol(
            "the manifest ended inside a file's chunk list".into(),
        ))
    }

    /// Put staged file `tmp`, the new content of file entry `e`, in place (`io`: its path as
    /// the system calls name it), with its metadata.
    fn install(
        &self,
        tmp: crate::assemble::Staged,
        io: &Path,
        e: &Entry,
        owner: Apply,
        table: &FileTable<'_>,
        progress: &Progress,
    ) -> Result<()> {
        let abs = e.path.under(&self.dest);
        meta::apply_fd(tmp.file(), &abs, &e.meta, owner)?;
        if self.state.contains_key(&e.path) {
            self.make_way(io, &e.path, false, table)?;
            tmp.commit(io, &abs, table)?;
        } else {
            // Nothing was there: linked under its name at once.
            tmp.commit_new(io, &abs, table)?;
        }
        Progress::add(&progress.bytes_done, e.size());
        Progress::add(&progress.files_done, 1);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn write_file(
        &self,
        lane: usize,
        i: u32,
        e: &Entry,
        fp: &crate::plan::FilePlan,
        req: Option<&Request>,
        table: &FileTable<'_>,
        source: &dyn ChunkSource,
        owner: Apply,
        progress: &Progress,
    ) -> Result<u64> {
        // Every system call below names the file through its directory, opened without
        // following symlinks (see [`crate::beneath`]); `abs` is for the index and messages.
        let at = self.dirs.parent_of(&e.path)?;
        self.write_file_at(lane, i, e, fp, req, table, source, owner, progress, &at)
            .map_err(|err| at.explain(err))
    }

    #[allow(clippy::too_many_arguments)]
    fn write_file_at(
        &self,
        lane: usize,
        i: u32,
        e: &Entry,
        fp: &crate::plan::FilePlan,
        req: Option<&Request>,
        table: &FileTable<'_>,
        source: &dyn ChunkSource,
        owner: Apply,
        progress: &Progress,
        at: &Parent,
    ) -> Result<u64> {
        let EntryKind::File { size, hash, chunks } = &e.kind else {
            return Err(Error::Protocol("write of a non-file".into()));
        };
        let abs = e.path.under(&self.dest);
        let io = at.path();
        tracing::debug!(
            "{:?}: writing, {} chunks ({} bytes) to fetch",
            e.path,
            fp.fetch.len(),
            fp.literal
        );
        let opts = AssembleOptions {
            sparse: self.opts.sparse,
            fsync: self.opts.fsync,
        };
        let attempt = |fp: &crate::plan::FilePlan,
                       req: Option<&Request>|
         -> Result<crate::assemble::Staged> {
            fetching(source, lane, i, fp, req, progress, &mut |next| {
                assemble(io, *size, hash, chunks, fp, table, next, opts)
            })
        };
        // Update a file in place with the chunks of `fp`: a clone of this file reading old
        // content from `original`, or (`None`) this file itself, opened here (an error then
        // still ends the fetch of its chunks the way any failed update does).
        let update = |clone: Option<(&std::fs::File, &std::fs::File)>, named: &Path, me| {
            fetching(source, lane, i, fp, req, progress, &mut |next| {
                let mut refetch = |want: &[u32]| refetch(source, i, chunks, want, progress);
                let opened;
                let (file, original) = match clone {
                    Some((file, original)) => (file, Some(original)),
                    None => {
                        opened = crate::inplace::open_for_update(io)?;
                        (&opened, None)
                    }
                };
                crate::inplace::update_open(
                    file,
                    original,
                    named,
                    me,
                    *size,
                    hash,
                    chunks,
                    fp,
                    table,
                    next,
                    &mut refetch,
                    opts.sparse,
                )
            })
        };
        // A staged file that holds the new content: its metadata, then renamed into place.
        let install = |tmp: crate::assemble::Staged, sent: u64| -> Result<u64> {
            self.install(tmp, io, e, owner, table, progress)
                .map(|()| sent)
        };
        if self.opts.inplace {
            if let Some(me) = table.number_of(&abs) {
                if crate::inplace::suitable(me, *size, chunks, fp) {
                    let r = update(None, io, me);
                    match r {
                        Ok(crate::inplace::Outcome::Done) => {
                            let f = crate::assemble::open_nofollow(io)?;
                            meta::apply_fd(&f, &abs, &e.meta, owner)?;
                            if opts.fsync {
                                f.sync_all().ctx("fsync", &abs)?;
                            }
                            Progress::add(&progress.bytes_done, *size);
                            Progress::add(&progress.files_done, 1);
                            return Ok(fp.literal);
                        }
                        Ok(crate::inplace::Outcome::NotSuitable) => {}
                        Err(err) => tracing::warn!(
                            "{}: in-place update failed ({err}); rebuilding it whole",
                            abs.display()
                        ),
                    }
                    // Partly updated (or never started): rebuild it from what the sender has.
                    let full = plan_file(chunks, &ChunkIndex::default());
                    return install(attempt(&full, None)?, full.literal);
                }
            }
        }
        // Where the file system clones files, the staged copy starts as a clone of the old
        // version and is updated in place: only changed data is written, the replacement stays
        // atomic.
        // Only where little is rewritten: rewriting much of a clone (the shifted tail after an
        // insertion early in the file) costs XFS a copy-on-write of every extent written, more
        // than writing a new file (1 GiB tree on XFS, local, 1 % of pages rewritten: with 5
        // insertions 0.65-0.83 s cloning every file, 0.52-0.57 s with this limit, 0.51-0.56 s
        // never cloning; without insertions 0.43-0.52 s against 0.60-0.97 s never cloning). The
        // old content is read from the original, which is in the page cache; the clone is not.
        let clones = !self.no_clones.load(std::sync::atomic::Ordering::Relaxed);
        if let (Some(me), true) = (table.number_of(&abs), clones) {
            if crate::inplace::rewritten(me, chunks, fp) <= *size / CLONE_MAX_REWRITE_DIV
                && crate::inplace::suitable(me, *size, chunks, fp)
            {
                let clone = crate::assemble::Staged::clone_of(io);
                if clone.as_ref().err() == Some(&crate::assemble::NoClone::Unsupported) {
                    self.no_clones
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                if let Ok((tmp, original)) = clone {
                    let named = tmp.display_path();
                    let r = update(Some((tmp.file(), &original)), &named, me);
                    let sent = match r {
                        Ok(crate::inplace::Outcome::Done) => Some((tmp, fp.literal)),
                        Ok(crate::inplace::Outcome::NotSuitable) => None,
                        Err(err) => {
                            // Chunks may have been taken from the stream: fetch the file whole.
                            tracing::warn!(
                                "{}: update of a clone failed ({err}); rebuilding it whole",
                                abs.display()
                            );
                            drop(tmp);
                            let full = plan_file(chunks, &ChunkIndex::default());
                            Some((attempt(&full, None)?, full.literal))
                        }
                    };
                    if let Some((tmp, sent)) = sent {
                        if opts.fsync {
                            tmp.file().sync_all().ctx("fsync", &named)?;
                        }
                        return install(tmp, sent);
                    }
                }
            }
        }
        let (tmp, sent) = match attempt(fp, req) {
            Ok(t) => (t, fp.literal),
            Err(Error::Integrity { .. }) => {
                // Local data was not what the index said (changed behind our back), or a delta's
                // base was not what the sender thought: fetch it all, plainly, once.
                tracing::warn!(
                    "{}: local data or a delta base did not match, fetching the whole file",
                    abs.display()
                );
                let full = plan_file(chunks, &ChunkIndex::default());
                (attempt(&full, None)?, full.literal)
            }
            Err(err) => return Err(err),
        };
        install(tmp, sent)
    }

    #[allow(clippy::too_many_arguments)]
    fn write_link(
        &self,
        abs: &Path,
        rel: &RelPath,
        target: &[u8],
        m: &Meta,
        owner: Apply,
        table: &FileTable<'_>,
    ) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let tmp = crate::assemble::temp_sibling(abs);
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &tmp)
            .ctx("create symlink", &tmp)?;
        let r = meta::apply(&tmp, m, None, true, owner)
            .and_then(|_| self.make_way(abs, rel, false, table))
            .and_then(|_| std::fs::rename(&tmp, abs).ctx("rename into place", abs));
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r
    }

    /// Save the destination's index cache: the files written by this sync (stat'ed now), and
    /// the others under the stat they were indexed with (no stat each, unless this sync changed
    /// their metadata: a tree of 45,000 files took 0.4 s to stat twice over).
    fn save_cache(
        &self,
        manifest: &[Entry],
        plan: &Plan,
        written: &HashSet<usize>,
        touched: &HashSet<&RelPath>,
    ) {
        if self.index_as_cached
            && written.is_empty()
            && plan.delete.is_empty()
            && touched.is_empty()
        {
            // No file changed: the cache on disk already holds this index.
            return;
        }
        let path = Self::cache_path(&self.dest, &self.opts);
        // The stat key of a file as it is now, if it is still the file of `size` bytes listed.
        let stat_now = |p: &Path, size: u64| {
            std::fs::symlink_metadata(p)
                .ok()
                .filter(|md| md.is_file() && md.len() == size)
                .map(|md| StatKey::of(&md))
        };
        // Written files: their lists are the manifest's, their keys taken now.
        let written_now: Vec<(PathBuf, StatKey, usize)> = manifest
            .iter()
            .enumerate()
            .filter(|(i, _)| written.contains(i))
            .filter_map(|(i, e)| {
                let abs = e.path.under(&self.dest);
                let key = stat_now(&abs, e.size())?;
                Some((abs, key, i))
            })
            .collect();
        let replaced: HashSet<&RelPath> = written.iter().map(|&i| &manifest[i].path).collect();
        let deleted: HashSet<&RelPath> = plan.delete.iter().collect();
        // An indexed file under the key it was indexed with, or (metadata changed here) now.
        let keep = |f: &'_ crate::index::IndexedFile, stale: bool| -> Option<StatKey> {
            match f.stat {
                Some(key) if !stale => (key.size() == f.chunks.size).then_some(key),
                _ => stat_now(&f.path, f.chunks.size),
            }
        };
        let mut entries: Vec<EntryRef<'_>> = Vec::with_capacity(self.index.files.len() + 1);
        for f in &self.index.files[self.first_basis_file as usize..] {
            if let Some(key) = keep(f, false) {
                entries.push(EntryRef::new(&f.path, key, ChunksRef::of(&f.chunks)));
            }
        }
        for (abs, key, i) in &written_now {
            if let EntryKind::File { size, hash, chunks } = &manifest[*i].kind {
                let chunks = ChunksRef {
                    size: *size,
                    hash: *hash,
                    chunks,
                };
                entries.push(EntryRef::new(abs, *key, chunks));
            }
        }
        for (rel, &n) in &self.dest_files {
            if replaced.contains(rel) || deleted.contains(rel) {
                continue;
            }
            let f = &self.index.files[n as usize];
            if let Some(key) = keep(f, touched.contains(rel)) {
                entries.push(EntryRef::new(&f.path, key, ChunksRef::of(&f.chunks)));
            }
        }
        if let Err(e) = crate::index::save_entries(&path, self.opts.params, &entries) {
            tracing::warn!("could not save the index cache: {e}");
        }
    }
}

/// A file is rebuilt from a reflink clone of its old version only when at most this fraction
/// (1/N) of it is rewritten.
const CLONE_MAX_REWRITE_DIV: u64 = 4;

/// Bytes available to this process on the file system holding `path` (or its nearest existing
/// ancestor).
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path.ancestors().find(|p| p.exists())?;
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value for statvfs to fill; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Run `op` on the entry `rel` under the destination, named through its directory opened
/// without following symlinks (see [`crate::beneath`]); errors name the real path.
fn through<T>(
    dirs: &crate::beneath::Dirs,
    rel: &RelPath,
    op: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let at = dirs.parent_of(rel)?;
    op(at.path()).map_err(|err| at.explain(err))
}

/// Chunks `want` of entry `entry` fetched again, plainly and apart from the lanes, each checked
/// against its id (see [`crate::inplace::Refetch`]).
fn refetch(
    source: &dyn ChunkSource,
    entry: u32,
    chunks: &[crate::manifest::ChunkSpec],
    want: &[u32],
    progress: &Progress,
) -> Result<Vec<Vec<u8>>> {
    tracing::debug!(
        "entry {entry}: fetching {} chunks again, plainly",
        want.len()
    );
    let req = Request {
        entry,
        want: want.to_vec(),
        hints: Vec::new(),
        no_refs: true,
        bytes: want
            .iter()
            .filter_map(|&n| chunks.get(n as usize))
            .map(|c| c.len as u64)
            .sum(),
    };
    let mut out = Vec::with_capacity(want.len());
    source.fetch_alone(&req, &mut |(n, codec, bytes)| {
        Progress::add(&progress.bytes_literal, bytes.len() as u64);
        let spec = chunks
            .get(n as usize)
            .ok_or_else(|| Error::Protocol(format!("chunk {n} out of range")))?;
        let data = crate::sender::decode_payload(codec, bytes, spec.len as usize)?;
        let actual = crate::id::ChunkId::of(&data);
        if actual != spec.id {
            return Err(Error::Integrity {
                what: format!("chunk {n} of entry {entry}"),
                expected: spec.id.to_hex(),
                actual: actual.to_hex(),
            });
        }
        out.push(data);
        Ok(())
    })?;
    if out.len() != want.len() {
        return Err(Error::Protocol("the sender sent too few chunks".into()));
    }
    Ok(out)
}

/// Fetched chunks handed to a file's writer at once, at most (a batch also ends at
/// [`BATCH_BYTES`]).
const BATCH_CHUNKS: usize = 64;
/// Bytes of fetched payload handed to a file's writer at once, at most.
const BATCH_BYTES: usize = 1 << 20;

/// Builds a file from its fetched chunks, taken in order from the function it is given.
type Build<'b, T> = dyn FnMut(&mut dyn FnMut() -> Result<Fetched>) -> Result<T> + Send + 'b;

/// Fetch the chunks `fp` wants (as announced in `req`, or on a stream of their own when `req`
/// is `None`) and hand them, in order, to `build`. Little data is fetched first; much is
/// streamed through a bounded channel so the sender never runs far ahead of the writer.
fn fetching<T: Send>(
    source: &dyn ChunkSource,
    lane: usize,
    i: u32,
    fp: &crate::plan::FilePlan,
    req: Option<&Request>,
    progress: &Progress,
    build: &mut Build<'_, T>,
) -> Result<T> {
    let arrived = std::sync::atomic::AtomicU64::new(0);
    let r = fetch_and_build(source, lane, i, fp, req, progress, &arrived, build);
    Progress::add(&progress.bytes_literal_settled, arrived.into_inner());
    r
}

/// [`fetching`], counting the payload bytes that arrive in `arrived` as well as in `progress`.
#[allow(clippy::too_many_arguments)]
fn fetch_and_build<T: Send>(
    source: &dyn ChunkSource,
    lane: usize,
    i: u32,
    fp: &crate::plan::FilePlan,
    req: Option<&Request>,
    progress: &Progress,
    arrived: &std::sync::atomic::AtomicU64,
    build: &mut Build<'_, T>,
) -> Result<T> {
    let fallback;
    let req = match req {
        Some(r) => r,
        None => {
            fallback = Request {
                entry: i,
                want: fp.fetch.clone(),
                hints: Vec::new(),
                no_refs: true,
                bytes: fp.literal,
            };
            &fallback
        }
    };
    if fp.literal <= INLINE_FETCH {
        let mut got = std::collections::VecDeque::with_capacity(fp.fetch.len());
        if !fp.fetch.is_empty() {
            source.fetch(lane, req, &mut |f| {
                Progress::add(&progress.bytes_literal, f.2.len() as u64);
                Progress::add(arrived, f.2.len() as u64);
                got.push_back(f);
                Ok(())
            })?;
        }
        let mut next = || {
            got.pop_front()
                .ok_or_else(|| Error::Protocol("sender sent too few chunks".into()))
        };
        return build(&mut next);
    }
    // Chunks go to the writer in batches: one hand-over (and thread wake-up) per batch, not
    // per chunk, which mattered for thousands of 4 KiB pages.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Vec<Fetched>>>(8);
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut batch = Vec::with_capacity(BATCH_CHUNKS);
            let mut bytes = 0usize;
            let r = source.fetch(lane, req, &mut |f| {
                Progress::add(&progress.bytes_literal, f.2.len() as u64);
                Progress::add(arrived, f.2.len() as u64);
                bytes += f.2.len();
                batch.push(f);
                if batch.len() >= BATCH_CHUNKS || bytes >= BATCH_BYTES {
                    bytes = 0;
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_CHUNKS));
                    tx.send(Ok(full))
                        .map_err(|_| Error::Protocol("receiver gave up".into()))?;
                }
                Ok(())
            });
            if !batch.is_empty() {
                let _ = tx.send(Ok(batch));
            }
            if let Err(err) = r {
                let _ = tx.send(Err(err));
            }
        });
        let mut ready = std::collections::VecDeque::new();
        let mut next = || -> Result<Fetched> {
            if ready.is_empty() {
                ready.extend(
                    rx.recv()
                        .map_err(|_| Error::Protocol("sender ended early".into()))??,
                );
            }
            ready
                .pop_front()
                .ok_or_else(|| Error::Protocol("sender sent too few chunks".into()))
        };
        let r = build(&mut next);
        drop(rx);
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{chunk_bytes, tests_support::noise};
    use crate::manifest::ChunkSpec;

    /// Serves chunks of one file from its bytes, counting the chunks asked for.
    struct Bytes {
        data: Vec<u8>,
        offsets: Vec<u64>,
        chunks: Vec<ChunkSpec>,
        asked: std::sync::atomic::AtomicU64,
    }

    impl ChunkSource for Bytes {
        fn lanes(&self) -> usize {
            2
        }

        fn fetch(
            &self,
            _lane: usize,
            req: &Request,
            sink: &mut dyn FnMut(Fetched) -> Result<()>,
        ) -> Result<()> {
            for &n in &req.want {
                self.asked.fetch_add(1, Ordering::Relaxed);
                let o = self.offsets[n as usize] as usize;
                let len = self.chunks[n as usize].len as usize;
                sink((
                    n,
                    crate::protocol::Codec::Raw,
                    self.data[o..o + len].to_vec(),
                ))?;
            }
            Ok(())
        }
    }

    fn path(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes().to_vec()).unwrap()
    }

    fn root() -> Incoming {
        Incoming::Entry(Entry {
            path: RelPath::root(),
            kind: EntryKind::Dir,
            meta: Meta {
                mode: 0o755,
                ..Default::default()
            },
        })
    }

    /// The manifest of a tree holding file `f` with `data`, its list in parts of `part` chunks
    /// as a sender sends a file it is still reading; `unreadable`: the sender fails at the end.
    fn growing(data: &[u8], part: usize, unreadable: bool) -> (Vec<Incoming>, Bytes) {
        let fc = chunk_bytes(data, ChunkParams::default());
        let meta = Meta {
            mode: 0o640,
            mtime_sec: 1_700_000_000,
            ..Default::default()
        };
        let mut items = vec![
            root(),
            Incoming::Begin {
                path: path("f"),
                meta,
                size: fc.size,
            },
        ];
        items.extend(fc.chunks.chunks(part).map(|c| Incoming::Part(c.to_vec())));
        let kind = if unreadable {
            EntryKind::Unreadable
        } else {
            EntryKind::File {
                size: fc.size,
                hash: fc.hash,
                chunks: fc.chunks.clone(),
            }
        };
        items.push(Incoming::Entry(Entry {
            path: path("f"),
            kind,
            meta,
        }));
        let source = Bytes {
            data: data.to_vec(),
            offsets: crate::manifest::chunk_offsets(&fc.chunks),
            chunks: fc.chunks,
            asked: Default::default(),
        };
        (items, source)
    }

    fn apply(dest: &Path, items: Vec<Incoming>, source: &Bytes) -> Result<Report> {
        let opts = ReceiverOptions {
            no_index_cache: true,
            ..Default::default()
        };
        let mut items = items.into_iter();
        Receiver::prepare(dest, opts)?.apply(&mut || Ok(items.next()), source, &Progress::default())
    }

    /// A file whose list arrives in parts is written part by part: byte-identical, holes and
    /// repeats of chunks from earlier parts included (read back, not fetched again).
    #[test]
    fn a_file_is_written_while_its_list_arrives() {
        let block = noise(1, 1 << 20);
        let mut data = Vec::new();
        for k in 0..6u64 {
            data.extend_from_slice(&block);
            data.extend(noise(10 + k, 300_000));
            data.extend(vec![0u8; 200_000]);
        }
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("dst");
        let (items, source) = growing(&data, 40, false);
        let parts = items.len() - 3;
        assert!(parts >= 10, "{parts} parts");
        let r = apply(&dest, items, &source).unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(std::fs::read(dest.join("f")).unwrap(), data);
        assert_eq!(r.stats.files_streamed, 1, "{:?}", r.stats);
        assert_eq!(r.stats.files_written, 1);
        // The 1 MiB block crosses once, not six times.
        assert!(
            r.stats.bytes_literal < 4 << 20,
            "{} of {} bytes sent",
            r.stats.bytes_literal,
            data.len()
        );
        let asked = source.asked.load(Ordering::Relaxed);
        assert!(
            asked < source.chunks.len() as u64 / 2,
            "{asked} chunks asked for"
        );
        use std::os::unix::fs::PermissionsExt;
        let md = std::fs::metadata(dest.join("f")).unwrap();
        assert_eq!(md.permissions().mode() & 0o7777, 0o640);
        assert_eq!(
            std::fs::read_dir(&dest).unwrap().count(),
            1,
            "nothing left over"
        );
    }

    /// A file the sender could not read to its end leaves nothing behind; one whose list
    /// outgrows its announced size is refused as a malformed manifest, with nothing written.
    #[test]
    fn a_growing_file_that_fails_leaves_nothing() {
        let data = noise(2, 3 << 20);
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("dst");
        let (items, source) = growing(&data, 16, true);
        let r = apply(&dest, items, &source).unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(r.stats.files_written, 0);
        assert_eq!(
            std::fs::read_dir(&dest).unwrap().count(),
            0,
            "nothing written"
        );

        let (mut items, source) = growing(&data, 16, false);
        if let Incoming::Begin { size, .. } = &mut items[1] {
            *size -= 1;
        }
        let dest2 = d.path().join("dst2");
        let err = apply(&dest2, items, &source).unwrap_err();
        assert!(err.to_string().contains("exceed the file size"), "{err}");
        assert_eq!(
            std::fs::read_dir(&dest2).unwrap().count(),
            0,
            "nothing written"
        );
    }

    /// Where the destination holds something at the path, the file is planned whole once its
    /// list is complete (an update: reuse of the old copy, in-place and clone updates).
    #[test]
    fn a_growing_file_over_an_old_copy_is_planned_whole() {
        let old = noise(3, 2 << 20);
        let mut data = old.clone();
        data[1_000_000..1_004_096].copy_from_slice(&noise(4, 4096));
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("dst");
        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(dest.join("f"), &old).unwrap();
        let (items, source) = growing(&data, 16, false);
        let r = apply(&dest, items, &source).unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(std::fs::read(dest.join("f")).unwrap(), data);
        assert_eq!(r.stats.files_streamed, 0);
        assert!(r.stats.bytes_literal < 200_000, "{:?}", r.stats);
    }
}
