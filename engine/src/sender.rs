//! The sending half: scan and chunk the source tree into a manifest, then supply the chunks the
//! receiver asks for (optionally zstd-compressed).

use crate::chunk::{chunk_file, ChunkParams, FileChunks, ListParts};
use crate::error::{Error, Result};
use crate::index::IndexCache;
use crate::manifest::{chunk_offsets, Entry, EntryKind};
use crate::path::RelPath;
use crate::protocol::{Codec, Frame};
use crate::report::Progress;
use crate::scan::{scan, Filter, ScanKind};
use rayon::prelude::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Sender settings.
#[derive(Clone, Debug, Default)]
pub struct SenderOptions {
    /// Chunk sizes.
    pub params: ChunkParams,
    /// zstd level for chunk payloads; `None` sends them raw. Chunks that do not shrink are sent
    /// raw either way.
    pub compress: Option<i32>,
    /// Where to keep the chunk lists of source files between runs, so that unchanged files
    /// (same size, mtime, ctime, inode) are not read again. `None`: no cache.
    pub cache: Option<PathBuf>,
    /// A tree the receiver is known to hold (e.g. the previous round of a migration): a wanted
    /// chunk is sent compressed against the chunk at the same offset of the same path there
    /// ([`crate::protocol::Codec::Ref`]) when that is smaller.
    pub basis: Option<PathBuf>,
    /// Include/exclude rules: excluded entries are not sent (nor descended into).
    pub rules: Option<std::sync::Arc<crate::filter::Rules>>,
    /// The receiver holds [`SenderOptions::basis`] at the destination (a migration's previous
    /// round): over the network, chunks it lacks are sent at once, without waiting for its
    /// want-lists (one round trip less; see [`Sender::pushable`]). Ignored without a basis.
    pub push: bool,
    /// Chunk lists the caller already has (a migration chunks memory images while CRIU is still
    /// writing them): looked up before the cache, under the same rules, and recorded in it.
    pub known: Option<std::sync::Arc<IndexCache>>,
}

/// At most this many bytes (of chunks, before encoding) are pushed in one sync, so that the
/// receiver's buffer of pushed chunks stays bounded; later entries go by want-lists.
pub const PUSH_BUDGET: u64 = 128 << 20;

/// What the sender keeps to serve one file's chunks: its list in segments (one for a file
/// listed whole; one per list part so far for a file on the wire while it is read, so that a
/// part is served as soon as it is sent, without copying the list before it).
struct Served {
    path: PathBuf,
    rel: RelPath,
    segments: Vec<std::sync::Arc<Segment>>,
}

/// Consecutive chunks of a served file's list.
struct Segment {
    /// The number of its first chunk in the file.
    first: u32,
    chunks: Vec<crate::manifest::ChunkSpec>,
    /// Where each chunk starts in the file.
    offsets: Vec<u64>,
}

impl Segment {
    /// The segment of `chunks`, numbered from `first`, the first starting at byte `start`.
    fn new(first: u32, start: u64, chunks: Vec<crate::manifest::ChunkSpec>) -> Segment {
        let offsets = chunk_offsets(&chunks)
            .into_iter()
            .map(|o| o + start)
            .collect();
        Segment {
            first,
            chunks,
            offsets,
        }
    }
}

impl Served {
    /// Chunks listed so far.
    fn len(&self) -> usize {
        self.segments
            .last()
            .map_or(0, |s| s.first as usize + s.chunks.len())
    }

    /// Chunk `n` and where it starts.
    fn get(&self, n: u32) -> Option<(&crate::manifest::ChunkSpec, u64)> {
        let k = self
            .segments
            .partition_point(|s| s.first <= n)
            .checked_sub(1)?;
        let s = &self.segments[k];
        let i = (n - s.first) as usize;
        Some((s.chunks.get(i)?, s.offsets[i]))
    }
}

/// The chunk list of a file the sender handed out (see [`Sender::chunks_of`]).
pub struct ServedChunks(std::sync::Arc<Served>);

impl ServedChunks {
    /// Chunks listed so far.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }

    /// Chunk `n`, if listed.
    pub fn get(&self, n: u32) -> Option<&crate::manifest::ChunkSpec> {
        self.0.get(n).map(|(c, _)| c)
    }
}

/// Entries of kinds that are not synced, and read errors met while scanning and chunking.
#[derive(Debug, Default)]
pub struct Notes {
    /// Skipped entries and their kind.
    pub skipped: Vec<(RelPath, &'static str)>,
    /// Read errors.
    pub errors: Vec<Error>,
}

/// A piece of the manifest as [`Sender::run_frames`] hands it out.
#[derive(Debug)]
pub struct ManifestOut {
    /// Frames to send, in order.
    pub frames: Vec<Frame>,
    /// The entry these frames complete; `None` while more frames of the same file follow.
    pub entry: Option<Entry>,
}

/// Files at least this large whose chunk list has to be made in this run go on the wire while
/// they are read (see [`Sender::run_frames`]).
pub const STREAM_MIN: u64 = 64 << 20;

/// Files chunked at once, at most (more only if they are small, see [`WINDOW_BYTES`]).
const WINDOW_FILES: usize = 64;
/// Bytes of files chunked at once, at most (a larger file is a window of its own, chunked on
/// all cores).
const WINDOW_BYTES: u64 = 64 << 20;

/// The sending half of a sync. [`Sender::run`] scans and chunks the tree, handing out manifest
/// entries one by one as they are ready; [`Sender::serve`] supplies the chunks of any entry
/// already handed out, from any thread, while the run goes on.
pub struct Sender {
    root: PathBuf,
    opts: SenderOptions,
    files: std::sync::RwLock<Vec<Option<std::sync::Arc<Served>>>>,
    basis: std::sync::Mutex<std::collections::HashMap<RelPath, Option<std::sync::Arc<Basis>>>>,
    /// The chunk cache, loaded on the first basis lookup: a basis tree that was itself sent
    /// earlier with the same cache (a migration's previous round) is not read again.
    /// The cache the basis tree has from being sent itself (if it is not the sender's own).
    basis_cache: std::sync::OnceLock<Option<IndexCache>>,
    /// The sender's own cache, loaded once.
    own: std::sync::OnceLock<std::sync::Arc<IndexCache>>,
    progress: std::sync::Arc<crate::report::Progress>,
    /// Chunk ids of the whole basis tree (what the receiver holds), built on first use.
    holds: std::sync::OnceLock<std::collections::HashSet<crate::id::ChunkId>>,
    /// Bytes of chunks promised to be pushed so far.
    pushed: std::sync::atomic::AtomicU64,
}

/// The counterpart of a source file in [`SenderOptions::basis`], chunked.
struct Basis {
    path: PathBuf,
    /// Its file hash (what the receiver's copy has, if it is this one).
    hash: crate::id::ChunkId,
    chunks: Vec<crate::manifest::ChunkSpec>,
    offsets: Vec<u64>,
}

impl Sender {
    /// A sender for the tree at `root`; nothing is read until [`Sender::run`].
    pub fn new(root: &Path, opts: SenderOptions) -> Sender {
        Sender {
            root: root.to_path_buf(),
            opts,
            files: Default::default(),
            basis: Default::default(),
            basis_cache: std::sync::OnceLock::new(),
            own: std::sync::OnceLock::new(),
            progress: Default::default(),
            holds: std::sync::OnceLock::new(),
            pushed: Default::default(),
        }
    }

    /// Whether this sender pushes chunks unasked (it has a basis the receiver holds).
    pub fn pushes(&self) -> bool {
        self.opts.push && self.opts.basis.is_some()
    }

    /// The chunks of `entry` (a file just handed out by [`Sender::run`]) that the receiver does
    /// not hold, if this sender pushes: every chunk whose id is nowhere in the basis tree, zero
    /// chunks and repeats within the file excepted, as long as the push budget lasts. Empty
    /// otherwise.
    pub fn pushable(&self, entry: &Entry) -> Vec<u32> {
        let EntryKind::File { chunks, .. } = &entry.kind else {
            return Vec::new();
        };
        if !self.pushes() {
            return Vec::new();
        }
        let holds = self.holds.get_or_init(|| self.basis_ids());
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let mut bytes = 0u64;
        for (n, c) in chunks.iter().enumerate() {
            if !c.zero && !holds.contains(&c.id) && seen.insert(c.id) {
                out.push(n as u32);
                bytes += c.len as u64;
            }
        }
        use std::sync::atomic::Ordering;
        let before = self.pushed.fetch_add(bytes, Ordering::Relaxed);
        if before + bytes > PUSH_BUDGET {
            self.pushed.fetch_sub(bytes, Ordering::Relaxed);
            return Vec::new();
        }
        out
    }

    /// Every chunk id of the basis tree, from the chunk cache where it knows a file.
    fn basis_ids(&self) -> std::collections::HashSet<crate::id::ChunkId> {
        let mut ids = std::collections::HashSet::new();
        let Some(root) = self.opts.basis.as_ref() else {
            return ids;
        };
        for e in scan(root, None).entries {
            if let ScanKind::File { .. } = e.kind {
                if let Some(b) = self.basis_of(&e.path) {
                    ids.extend(b.chunks.iter().filter(|c| !c.zero).map(|c| c.id));
                }
            }
        }
        ids
    }

    /// Count what is chunked, asked for and sent in `progress` (its sender fields) as it
    /// happens, for a progress display.
    pub fn with_progress(mut self, progress: std::sync::Arc<crate::report::Progress>) -> Sender {
        self.progress = progress;
        self
    }

    /// Scan the tree, then chunk its files in windows (files of a window in parallel, large
    /// files split across cores), passing each entry to `emit` in manifest order as soon as its
    /// window is done. Stops early if `emit` fails. Returns what could not be sent.
    pub fn run(
        &self,
        filter: Option<Filter<'_>>,
        emit: &mut dyn FnMut(Entry) -> Result<()>,
    ) -> Result<Notes> {
        self.run_inner(filter, &mut |e, _| emit(e), None)
    }

    /// [`Sender::run`] for a manifest on the wire: each entry as the frames that carry it (see
    /// [`Sender::frames_of`]). A large file that has to be read (not known from a cache, no
    /// basis counterpart to describe it against) goes while it is read: a `FileHead` without
    /// hash, `FileList` parts as the file is cut, the hash in the last part; its `ManifestOut`s
    /// before the last carry no entry.
    pub fn run_frames(
        &self,
        filter: Option<Filter<'_>>,
        out: &mut dyn FnMut(ManifestOut) -> Result<()>,
    ) -> Result<Notes> {
        let out = std::cell::RefCell::new(out);
        self.run_inner(
            filter,
            &mut |e, streamed| {
                let frames = if streamed {
                    let hash = match &e.kind {
                        EntryKind::File { hash, .. } => Some(*hash),
                        _ => None,
                    };
                    vec![Frame::FileList {
                        part: crate::chunklist::ListPart::Chunks(Vec::new()),
                        last: true,
                        hash,
                    }]
                } else {
                    self.frames_of(e.clone())
                };
                (out.borrow_mut())(ManifestOut {
                    frames,
                    entry: Some(e),
                })
            },
            Some(&mut |f| {
                (out.borrow_mut())(ManifestOut {
                    frames: vec![f],
                    entry: None,
                })
            }),
        )
    }

    /// [`Sender::run`], where `stream` (if given) takes the frames of large files read in this
    /// run as they are cut, and `emit` learns whether an entry went that way.
    fn run_inner(
        &self,
        filter: Option<Filter<'_>>,
        emit: &mut dyn FnMut(Entry, bool) -> Result<()>,
        mut stream: Option<&mut dyn FnMut(Frame) -> Result<()>>,
    ) -> Result<Notes> {
        let root = &self.root;
        let opts = &self.opts;
        let by_rules = |p: &RelPath, is_dir: bool| {
            opts.rules.as_ref().is_none_or(|r| !r.excluded(p, is_dir))
                && filter.is_none_or(|f| f(p, is_dir))
        };
        // The tree is walked while the chunk cache is read: two independent reads (together
        // about 0.2 s for a container root file system of 45,701 files).
        let t = std::time::Instant::now();
        let (s, cache) = std::thread::scope(|scope| {
            let cache = scope.spawn(|| self.own_cache());
            let s = scan(root, Some(&by_rules));
            (s, cache.join())
        });
        let cache = cache.unwrap_or_else(|_| self.own_cache());
        tracing::debug!(
            "source scanned ({} entries) and its chunk cache loaded ({} files) in {:?}",
            s.entries.len(),
            cache.len(),
            t.elapsed()
        );
        let mut notes = Notes {
            skipped: s.skipped,
            errors: s.errors,
        };
        let caches: Vec<&IndexCache> = opts.known.as_deref().into_iter().chain([&*cache]).collect();
        let fresh: Fresh = Default::default();
        let known = Known {
            caches: &caches,
            fresh: &fresh,
            fingerprints: opts.cache.is_some(),
        };
        // The files of this tree now: what the cache keeps when it is saved (if it is).
        let files_now: Option<std::collections::HashSet<std::ffi::OsString>> =
            opts.cache.as_ref().map(|_| {
                s.entries
                    .iter()
                    .filter(|e| matches!(e.kind, ScanKind::File { .. }))
                    .map(|e| e.path.under(root).into_os_string())
                    .collect()
            });
        let mut entries = s.entries.into_iter().peekable();
        let mut window = Vec::new();
        while entries.peek().is_some() {
            window.clear();
            let mut bytes = 0u64;
            while let Some(e) = entries.peek() {
                let size = match e.kind {
                    ScanKind::File { size } => size,
                    _ => 0,
                };
                if !window.is_empty()
                    && (window.len() >= WINDOW_FILES || bytes + size > WINDOW_BYTES)
                {
                    break;
                }
                bytes += size;
                window.extend(entries.next());
            }
            // A large file is a window of its own: with a stream to take it, its list goes
            // out as it is cut.
            let streamable = match (&stream, &window[..]) {
                (Some(_), [e]) => match e.kind {
                    ScanKind::File { size } => {
                        size >= STREAM_MIN && !self.pushes() && self.basis_of(&e.path).is_none()
                    }
                    _ => false,
                },
                _ => false,
            };
            if let (true, Some(sink)) = (streamable, stream.as_mut()) {
                let Some(e) = window.pop() else { continue };
                let ScanKind::File { size } = e.kind else {
                    continue;
                };
                let mut started = false;
                // Chunks and bytes listed so far.
                let (mut listed, mut at) = (0u32, 0u64);
                let mut part = |c: &[crate::manifest::ChunkSpec]| -> Result<()> {
                    if !started {
                        started = true;
                        // Its entry number is taken now: its parts are served as they go.
                        self.files
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(Some(std::sync::Arc::new(Served {
                                path: e.path.under(root),
                                rel: e.path.clone(),
                                segments: Vec::new(),
                            })));
                        sink(Frame::FileHead {
                            path: e.path.clone(),
                            meta: e.meta,
                            size,
                            hash: None,
                            base: None,
                        })?;
                    }
                    // Read so far: the progress shows a large file's scan as it goes.
                    let read: u64 = c.iter().map(|c| c.len as u64).sum();
                    Progress::add(&self.progress.bytes_scanned, read);
                    // Served before the receiver can ask: the part's chunks become servable.
                    self.serve_part(Segment::new(listed, at, c.to_vec()));
                    listed += c.len() as u32;
                    at += read;
                    sink(Frame::FileList {
                        part: crate::chunklist::ListPart::Chunks(c.to_vec()),
                        last: false,
                        hash: None,
                    })
                };
                let got = chunk_cached(
                    &e.path.under(root),
                    e.key,
                    opts.params,
                    &known,
                    None,
                    Some(&mut part),
                );
                // The transport failing under the stream ends the run.
                let got = match got {
                    Err(Error::Transport(t)) => return Err(Error::Transport(t)),
                    other => other,
                };
                let (kind, err) = match got {
                    Ok(fc) => (
                        EntryKind::File {
                            size: fc.size,
                            hash: fc.hash,
                            chunks: fc.chunks,
                        },
                        None,
                    ),
                    Err(err) => (EntryKind::Unreadable, Some(err)),
                };
                let entry = Entry {
                    path: e.path,
                    kind,
                    meta: e.meta,
                };
                self.hand_out(entry, err, started, &mut notes, emit)?;
                continue;
            }
            let chunked: Vec<(Entry, Option<Error>)> = std::mem::take(&mut window)
                .into_par_iter()
                .map(|e| {
                    let kind = match e.kind {
                        ScanKind::Dir => EntryKind::Dir,
                        ScanKind::Unreadable => EntryKind::Unreadable,
                        ScanKind::Symlink { target } => EntryKind::Symlink { target },
                        ScanKind::File { .. } => {
                            let like = if opts.params.pages
                                && crate::chunk::is_page_image(&e.path.under(root))
                            {
                                self.basis_of(&e.path)
                            } else {
                                None
                            };
                            match chunk_cached(
                                &e.path.under(root),
                                e.key,
                                opts.params,
                                &known,
                                like.as_deref(),
                                None,
                            ) {
                                Ok(fc) => EntryKind::File {
                                    size: fc.size,
                                    hash: fc.hash,
                                    chunks: fc.chunks,
                                },
                                Err(err) => {
                                    let entry = Entry {
                                        path: e.path,
                                        kind: EntryKind::Unreadable,
                                        meta: e.meta,
                                    };
                                    return (entry, Some(err));
                                }
                            }
                        }
                    };
                    let entry = Entry {
                        path: e.path,
                        kind,
                        meta: e.meta,
                    };
                    (entry, None)
                })
                .collect();
            for (e, err) in chunked {
                self.hand_out(e, err, false, &mut notes, emit)?;
            }
        }
        if let (Some(p), Some(files_now)) = (&opts.cache, &files_now) {
            // Files of this tree only (no stat of every cached file to find those still there),
            // the ones read in this run under the stat they were read with.
            let mut entries = cache.entries_of(files_now);
            let fresh = fresh.into_inner().unwrap_or_else(|e| e.into_inner());
            // Nothing read and nothing gone: the file on disk already says all this (a 14 MB
            // cache for a tree of 45,701 files is not written again for nothing).
            if !(fresh.is_empty() && entries.len() == cache.len()) {
                // A file read in this run is kept (instead of its cached entry) only if it is
                // still as it was when read.
                let still: Vec<_> = fresh
                    .iter()
                    .filter(|(path, before, fc, _)| before.still_as_read(path, fc.size))
                    .collect();
                let read: std::collections::HashSet<&std::ffi::OsStr> =
                    still.iter().map(|(path, ..)| path.as_os_str()).collect();
                entries.retain(|e| !read.contains(e.path()));
                entries.extend(still.iter().map(|(path, before, fc, fps)| {
                    crate::index::EntryRef::new(path, *before, crate::index::ChunksRef::of(fc))
                        .with_fps(fps)
                }));
                if let Err(e) = crate::index::save_entries(p, opts.params, &entries) {
                    tracing::warn!("could not save the source chunk cache: {e}");
                }
            }
        }
        Ok(notes)
    }

    /// Add `segment` to the list of the file being read and sent (the last entry registered).
    fn serve_part(&self, segment: Segment) {
        let mut files = self.files.write().unwrap_or_else(|p| p.into_inner());
        if let Some(Some(last)) = files.last_mut() {
            let mut segments = last.segments.clone();
            segments.push(std::sync::Arc::new(segment));
            *last = std::sync::Arc::new(Served {
                path: last.path.clone(),
                rel: last.rel.clone(),
                segments,
            });
        }
    }

    /// Record entry `e` (the next of the manifest) as served, and pass it to `emit`.
    fn hand_out(
        &self,
        e: Entry,
        err: Option<Error>,
        streamed: bool,
        notes: &mut Notes,
        emit: &mut dyn FnMut(Entry, bool) -> Result<()>,
    ) -> Result<()> {
        notes.errors.extend(err);
        // A streamed file's parts are served already (see `Sender::serve_part`): its whole list,
        // or, if it could not be read to the end, what was sent of it (the receiver may still
        // ask for those chunks; they are answered, or refused as changed).
        if !streamed {
            // (A streamed file's bytes were counted as they were cut.)
            let served = match &e.kind {
                EntryKind::File { chunks, size, .. } => {
                    Progress::add(&self.progress.bytes_scanned, *size);
                    Some(std::sync::Arc::new(Served {
                        path: e.path.under(&self.root),
                        rel: e.path.clone(),
                        segments: vec![std::sync::Arc::new(Segment::new(0, 0, chunks.clone()))],
                    }))
                }
                _ => None,
            };
            self.files
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .push(served);
        }
        tracing::debug!("manifest: {:?} ready", e.path);
        emit(e, streamed)
    }

    /// Scan and chunk the whole tree at once: the manifest and the notes.
    pub fn manifest_of(&self, filter: Option<Filter<'_>>) -> Result<(Vec<Entry>, Notes)> {
        let mut m = Vec::new();
        let notes = self.run(filter, &mut |e| {
            m.push(e);
            Ok(())
        })?;
        Ok((m, notes))
    }

    /// The frames that carry `entry` (just handed out by [`Sender::run`]) in the manifest: a
    /// file with a counterpart in the basis (which the receiver holds at the same path) goes
    /// as edits of that copy's chunk list, a file with a very long list in parts (see
    /// [`crate::chunklist`]).
    pub fn frames_of(&self, entry: Entry) -> Vec<Frame> {
        let basis = match &entry.kind {
            EntryKind::File { .. } => self.basis_of(&entry.path),
            _ => None,
        };
        crate::chunklist::frames_for(entry, basis.as_ref().map(|b| (b.hash, &b.chunks[..])))
    }

    /// The whole chunk list of entry `entry`, if it is a file already handed out.
    pub fn chunk_list(&self, entry: u32) -> Option<Vec<crate::manifest::ChunkSpec>> {
        self.served(entry).map(|s| {
            s.segments
                .iter()
                .flat_map(|g| g.chunks.iter().copied())
                .collect()
        })
    }

    /// The chunk list of entry `entry`, if it is a file already handed out, without a copy (a
    /// want-list comes in parts of 16 chunks; copying a 170,000-chunk list for each cost more
    /// than serving the part).
    pub fn chunks_of(&self, entry: u32) -> Option<ServedChunks> {
        self.served(entry).map(ServedChunks)
    }

    /// The bytes of chunks `want` of entry `entry` if they would go as pieces of a zstd stream
    /// (a file sent so far, not a memory page image, which goes in groups): `None` otherwise.
    pub fn streamed_bytes(&self, entry: u32, want: &[u32]) -> Option<u64> {
        let served = self.served(entry)?;
        if self.opts.params.pages && crate::chunk::is_page_image(&served.path) {
            return None;
        }
        Some(
            want.iter()
                .filter_map(|&n| served.get(n))
                .map(|(c, _)| u64::from(c.len))
                .sum(),
        )
    }

    /// The sender's chunk cache, loaded on first use (empty without one).
    fn own_cache(&self) -> std::sync::Arc<IndexCache> {
        self.own
            .get_or_init(|| {
                std::sync::Arc::new(match &self.opts.cache {
                    Some(p) => IndexCache::load(p, self.opts.params),
                    None => IndexCache::default(),
                })
            })
            .clone()
    }

    /// The basis counterpart of `rel`, chunked on first use.
    fn basis_of(&self, rel: &RelPath) -> Option<std::sync::Arc<Basis>> {
        let root = self.opts.basis.as_ref()?;
        let mut map = self.basis.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(rel.clone())
            .or_insert_with(|| {
                let path = rel.under(root);
                let theirs = self.basis_cache.get_or_init(|| {
                    let own = self.opts.cache.as_ref()?;
                    // Caching is on: the basis tree's own source cache may know it too (it was
                    // synced from there before).
                    crate::index::source_cache_path(root)
                        .filter(|t| t != own)
                        .map(|t| IndexCache::load(&t, self.opts.params))
                });
                let own = self.own_cache();
                let caches = self
                    .opts
                    .known
                    .as_deref()
                    .into_iter()
                    .chain([&*own])
                    .chain(theirs.as_ref());
                let md = std::fs::symlink_metadata(&path).ok()?;
                let fc = match caches.into_iter().find_map(|c| c.lookup(&path, &md)) {
                    Some(fc) => fc.clone(),
                    None => chunk_file(&path, self.opts.params).ok()?,
                };
                Some(std::sync::Arc::new(Basis {
                    path,
                    hash: fc.hash,
                    offsets: chunk_offsets(&fc.chunks),
                    chunks: fc.chunks,
                }))
            })
            .clone()
    }

    /// The zstd level chunks are compressed at, if they are.
    pub fn compress_level(&self) -> Option<i32> {
        self.opts.compress
    }

    fn served(&self, entry: u32) -> Option<std::sync::Arc<Served>> {
        self.files
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(entry as usize)
            .cloned()
            .flatten()
    }

    /// Supply chunks `want` of manifest entry `entry`, in that order, as `Data` frames passed to
    /// `emit`; where `hints` describes a base for a chunk and a patch against it is smaller, the
    /// patch is sent (see [`crate::delta`]). If the file can no longer be read as chunked, one
    /// `Failed` frame is emitted instead of the remaining data. `packing` says how whole chunks
    /// that are compressed travel (see [`Packing`]).
    pub fn serve(
        &self,
        entry: u32,
        want: &[u32],
        hints: &[Vec<crate::delta::BlockHash>],
        no_refs: bool,
        mut packing: Packing<'_>,
        emit: &mut dyn FnMut(Frame) -> Result<()>,
    ) -> Result<()> {
        let served = self
            .served(entry)
            .ok_or_else(|| Error::Protocol(format!("entry {entry} is not a file sent so far")))?;
        let wanted: u64 = want
            .iter()
            .filter_map(|&n| served.get(n))
            .map(|(c, _)| c.len as u64)
            .sum();
        Progress::add(&self.progress.bytes_wanted, wanted);
        let grouped = !matches!(packing, Packing::Alone);
        let path = served.path.clone();
        // Memory page images go in groups even to a stream: zstd's settings for small inputs
        // suit pages, and a 664 MB image took 49.4 MB in groups of 16 pages, 50.2 MB as one
        // stream, in 0.41 vs 0.71 CPU-s. Trees of files are the other way round (see
        // crate::zstd_ctx).
        if matches!(packing, Packing::Stream(_))
            && self.opts.params.pages
            && crate::chunk::is_page_image(&path)
        {
            packing = Packing::Groups;
        }
        let file = match crate::assemble::open_nofollow(&path) {
            Ok(f) => f,
            Err(err) => {
                return emit(Frame::Failed {
                    entry,
                    reason: err.to_string(),
                })
            }
        };
        let mut squeeze = Squeeze::default();
        let basis = if no_refs {
            None
        } else {
            self.basis_of(&served.rel)
        };
        let basis_file = basis
            .as_ref()
            .and_then(|b| crate::assemble::open_nofollow(&b.path).ok().map(|f| (b, f)));
        // Reading and difference-encoding run on all cores, a batch at a time; the choice of
        // encoding, compression and sending stay in order.
        let prepare = |k: usize, n: u32| -> Result<std::result::Result<Prepared, String>> {
            let (spec, at) = served
                .get(n)
                .ok_or_else(|| Error::Protocol(format!("entry {entry} has no chunk {n}")))?;
            let mut buf = vec![0u8; spec.len as usize];
            if let Err(err) = file.read_exact_at(&mut buf, at) {
                let reason = if err.kind() == std::io::ErrorKind::UnexpectedEof {
                    Error::SourceChanged { path: path.clone() }.to_string()
                } else {
                    err.to_string()
                };
                return Ok(Err(reason));
            }
            let reference = basis_file.as_ref().and_then(|(b, f)| {
                // The basis chunk covering the same offset, if it still holds what was chunked.
                let j = b.offsets.partition_point(|&o| o <= at).checked_sub(1)?;
                let spec = b.chunks[j];
                // Zero chunks are holes, not indexed by the receiver: no reference to them.
                if spec.zero {
                    return None;
                }
                let mut base = vec![0u8; spec.len as usize];
                f.read_exact_at(&mut base, b.offsets[j]).ok()?;
                if crate::id::ChunkId::of(&base) != spec.id {
                    return None;
                }
                let level = self.opts.compress.unwrap_or(1);
                crate::delta::encode_ref(&buf, &base, &spec.id, level, buf.len() * 3 / 4)
            });
            let patch = hints
                .get(k)
                .filter(|h| !h.is_empty())
                .and_then(|h| crate::delta::encode(&buf, h, buf.len() * 3 / 4));
            Ok(Ok(Prepared {
                n,
                buf,
                reference,
                patch,
            }))
        };
        // Whole chunks in a row waiting to be compressed together (grouped serving).
        let mut group = Group::default();
        // Handing a batch to the thread pool and waiting for it costs two thread wake-ups: worth
        // it for encoding against a basis or hints, or many chunks; not for reading a small
        // file's chunk or two from the page cache (most of a tree's files).
        let parallel = basis_file.is_some() || !hints.is_empty();
        for (g, batch) in want.chunks(SERVE_BATCH).enumerate() {
            let at = |(i, &n): (usize, &u32)| prepare(g * SERVE_BATCH + i, n);
            let prepared: Vec<_> = if parallel || batch.len() >= PARALLEL_BATCH {
                batch.par_iter().enumerate().map(at).collect()
            } else {
                batch.iter().enumerate().map(at).collect()
            };
            for p in prepared {
                let Prepared {
                    n,
                    buf,
                    reference,
                    patch,
                } = match p? {
                    Ok(p) => p,
                    Err(reason) => {
                        group.flush(entry, &mut squeeze, &mut packing, emit)?;
                        return emit(Frame::Failed { entry, reason });
                    }
                };
                Progress::add(&self.progress.bytes_sent, buf.len() as u64);
                // A reference to a held chunk wins when it is the smaller encoding.
                if let Some(r) =
                    reference.filter(|r| patch.as_ref().is_none_or(|p| r.len() < p.len()))
                {
                    group.flush(entry, &mut squeeze, &mut packing, emit)?;
                    emit(Frame::Data {
                        entry,
                        chunk: n,
                        codec: Codec::Ref,
                        bytes: r,
                    })?;
                    continue;
                }
                // Data that did not compress lately is not tried again for a while (like rsync's
                // skip-compress, but by measurement): incompressible files cost no zstd time.
                let level = self.opts.compress.filter(|_| squeeze.should_try());
                if let (true, Some(level), None) = (grouped, level, &patch) {
                    if !group.fits(buf.len()) {
                        group.flush(entry, &mut squeeze, &mut packing, emit)?;
                    }
                    // A chunk too large for a group goes alone: in a stream frame, or as below.
                    let streamed = matches!(packing, Packing::Stream(_));
                    if buf.len() < crate::protocol::GROUP_MAX || streamed {
                        group.add(n, buf, level);
                        if !group.fits(0) {
                            group.flush(entry, &mut squeeze, &mut packing, emit)?;
                        }
                        continue;
                    }
                }
                group.flush(entry, &mut squeeze, &mut packing, emit)?;
                let (codec, bytes) = match patch {
                    Some(p) => match encode_payload(p, level) {
                        (Codec::Zstd, z) => (Codec::PatchZstd, z),
                        (_, p) => (Codec::Patch, p),
                    },
                    None => encode_payload(buf, level),
                };
                if level.is_some() {
                    squeeze.record(matches!(codec, Codec::Zstd | Codec::PatchZstd));
                }
                emit(Frame::Data {
                    entry,
                    chunk: n,
                    codec,
                    bytes,
                })?;
            }
        }
        group.flush(entry, &mut squeeze, &mut packing, emit)
    }
}

/// How [`Sender::serve`] sends whole chunks it compresses.
pub enum Packing<'a> {
    /// Each in a `Data` frame of its own (the local receiver, pushes).
    Alone,
    /// Chunks in a row of one entry compressed together, one zstd frame per
    /// [`Frame::DataGroup`].
    Groups,
    /// Chunks in a row as pieces of the zstd stream of the chunk stream they travel on
    /// ([`Frame::DataStream`]): each piece refers back to everything the stream carried before.
    Stream(&'a mut crate::zstd_ctx::StreamCompressor),
}

/// Whole chunks in a row (wanted one after the other) to be compressed together as one
/// [`Frame::DataGroup`].
#[derive(Default)]
struct Group {
    numbers: Vec<u32>,
    lens: Vec<u32>,
    bytes: Vec<u8>,
    level: i32,
}

impl Group {
    /// Whether a chunk of `len` bytes still fits (an empty group takes any chunk).
    fn fits(&self, len: usize) -> bool {
        self.lens.is_empty()
            || (self.lens.len() < crate::protocol::GROUP_CHUNKS
                && self.bytes.len() + len <= crate::protocol::GROUP_MAX)
    }

    fn add(&mut self, n: u32, buf: Vec<u8>, level: i32) {
        if self.lens.is_empty() {
            self.level = level;
        }
        self.numbers.push(n);
        self.lens.push(buf.len() as u32);
        // A group's first chunk is its buffer (a small file's one chunk is not copied).
        if self.bytes.is_empty() {
            self.bytes = buf;
        } else {
            self.bytes.extend_from_slice(&buf);
        }
    }

    /// Send what is waiting: as the next piece of the stream; else one chunk as a `Data`
    /// frame, several compressed together, or each raw when that did not shrink them.
    fn flush(
        &mut self,
        entry: u32,
        squeeze: &mut Squeeze,
        packing: &mut Packing<'_>,
        emit: &mut dyn FnMut(Frame) -> Result<()>,
    ) -> Result<()> {
        let numbers = std::mem::take(&mut self.numbers);
        let lens = std::mem::take(&mut self.lens);
        let bytes = std::mem::take(&mut self.bytes);
        if let (Packing::Stream(stream), Some(&first)) = (packing, numbers.first()) {
            // Once given to the stream, the bytes are part of its history: they go compressed
            // even if that did not shrink them (zstd stores such blocks as they are).
            let z = stream
                .compress(&bytes)
                .ok_or_else(|| Error::Compression("zstd stream failed".into()))?;
            squeeze.record(z.len() < bytes.len());
            return emit(Frame::DataStream {
                entry,
                first,
                lens,
                bytes: z,
            });
        }
        match numbers[..] {
            [] => return Ok(()),
            [n] => {
                let (codec, bytes) = encode_payload(bytes, Some(self.level));
                squeeze.record(codec == Codec::Zstd);
                return emit(Frame::Data {
                    entry,
                    chunk: n,
                    codec,
                    bytes,
                });
            }
            _ => {}
        }
        if let Some(z) =
            crate::zstd_ctx::compress(&bytes, self.level).filter(|z| z.len() < bytes.len())
        {
            squeeze.record(true);
            return emit(Frame::DataGroup {
                entry,
                first: numbers[0],
                lens,
                bytes: z,
            });
        }
        squeeze.record(false);
        let mut at = 0usize;
        for (n, len) in numbers.iter().zip(&lens) {
            let end = at + *len as usize;
            emit(Frame::Data {
                entry,
                chunk: *n,
                codec: Codec::Raw,
                bytes: bytes[at..end].to_vec(),
            })?;
            at = end;
        }
        Ok(())
    }
}

/// Chunks read and encoded at once, in parallel, when serving a want-list.
const SERVE_BATCH: usize = 64;

/// Fewer chunks than this, with no basis and no hints, are read on the serving thread itself.
const PARALLEL_BATCH: usize = 8;

/// A wanted chunk read and difference-encoded, before the choice of encoding.
struct Prepared {
    n: u32,
    buf: Vec<u8>,
    reference: Option<Vec<u8>>,
    patch: Option<Vec<u8>>,
}

/// Whether compressing is worth trying: after 8 chunks in a row that did not shrink, only every
/// 32nd chunk is tried until one shrinks again.
#[derive(Default)]
struct Squeeze {
    misses: u32,
    skipped: u32,
}

impl Squeeze {
    fn should_try(&mut self) -> bool {
        if self.misses < 8 {
            return true;
        }
        self.skipped += 1;
        if self.skipped >= 32 {
            self.skipped = 0;
            return true;
        }
        false
    }

    fn record(&mut self, shrank: bool) {
        self.misses = if shrank { 0 } else { self.misses + 1 };
    }
}

/// Chunk lists of files chunked in this run, with the stat key they were read under and their
/// fingerprints (empty when not taken).
type Fresh = std::sync::Mutex<
    Vec<(
        PathBuf,
        crate::index::StatKey,
        FileChunks,
        Vec<crate::rechunk::Fingerprint>,
    )>,
>;

/// Where [`chunk_cached`] looks for what it knows, and where it notes what it learns.
struct Known<'a> {
    /// Caches to look in, the caller's first, the sender's own last.
    caches: &'a [&'a IndexCache],
    /// What this run chunked.
    fresh: &'a Fresh,
    /// Whether a cache is kept: then files are chunked with fingerprints, and a file changed
    /// since its cached list is chunked again from it ([`crate::rechunk`]).
    fingerprints: bool,
}

/// The chunks of `path`, from the cache when its stat is unchanged, else read (and remembered in
/// `fresh` for the next run). A file that is read, with `stream` given and no `like`, has its
/// list handed to `stream` piece by piece as it is cut (see
/// [`crate::chunk::chunk_file_streamed`]); from a cache, `stream` is not called.
fn chunk_cached(
    path: &Path,
    key: Option<crate::index::StatKey>,
    params: ChunkParams,
    known: &Known<'_>,
    like: Option<&Basis>,
    stream: Option<ListParts<'_>>,
) -> Result<FileChunks> {
    let remember = |fc: &FileChunks, md, fps| {
        known.fresh.lock().unwrap_or_else(|e| e.into_inner()).push((
            path.to_path_buf(),
            md,
            fc.clone(),
            fps,
        ));
    };
    // The scan's stat when there is one (taken before anything is read, as a stat here would).
    let md = crate::index::StatKey::known_or_stat(key, path)?;
    let caches = known.caches;
    if let Some((k, (fc, fps))) = caches
        .iter()
        .enumerate()
        .find_map(|(k, c)| c.lookup_fps(path, &md).map(|hit| (k, hit)))
    {
        if k + 1 < caches.len() {
            // Known from the caller, not from the cache yet: recorded for the next run.
            remember(fc, md, fps.to_vec());
        }
        return Ok(fc.clone());
    }
    if known.fingerprints && like.is_none() {
        let prior = caches.iter().find_map(|c| c.prior(path));
        let got = crate::rechunk::chunk_file_fp(path, params, prior, stream)?;
        if prior.is_some() {
            tracing::debug!(
                "{}: {} of {} bytes unchanged since the cached list",
                path.display(),
                got.reused,
                got.chunks.size
            );
        }
        remember(&got.chunks, md, got.fps);
        return Ok(got.chunks);
    }
    let fc = match (like, stream) {
        (Some(b), _) => crate::chunk::chunk_file_like(path, params, &b.path, &b.chunks)?,
        (None, Some(part)) => crate::chunk::chunk_file_streamed(path, params, part)?,
        (None, None) => chunk_file(path, params)?,
    };
    remember(&fc, md, Vec::new());
    Ok(fc)
}

/// Compress a chunk payload when that makes it smaller.
pub fn encode_payload(data: Vec<u8>, level: Option<i32>) -> (Codec, Vec<u8>) {
    if let Some(level) = level {
        if let Some(z) = crate::zstd_ctx::compress(&data, level) {
            if z.len() < data.len() {
                return (Codec::Zstd, z);
            }
        }
    }
    (Codec::Raw, data)
}

/// Decode a chunk payload of expected length `len`. Decompression never produces more than `len`
/// bytes, so a compression bomb costs nothing.
pub fn decode_payload(codec: Codec, bytes: Vec<u8>, len: usize) -> Result<Vec<u8>> {
    let out = match codec {
        Codec::Raw => bytes,
        Codec::Zstd => crate::zstd_ctx::decompress(&bytes, len).map_err(|e| {
            Error::Compression(format!("chunk does not decompress within {len} bytes: {e}"))
        })?,
        Codec::Patch | Codec::PatchZstd | Codec::Ref => {
            return Err(Error::Protocol(
                "a patch needs its base to be decoded".into(),
            ))
        }
    };
    if out.len() != len {
        return Err(Error::Protocol(format!(
            "chunk of {} bytes where {len} were expected",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large file read in this run goes on the wire while it is cut: a head without hash,
    /// parts, the hash in the last part; the receiver's assembler makes of those frames the
    /// entry `run` gives. Small files and files known from the cache go whole.
    #[test]
    fn a_large_file_goes_while_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let big: Vec<u8> = crate::chunk::tests_support::noise(9, (STREAM_MIN + 5000) as usize);
        std::fs::write(src.join("pages-1.img"), &big).unwrap();
        std::fs::write(src.join("small"), b"small").unwrap();
        let cache = dir.path().join("cache.hopidx");
        let opts = || SenderOptions {
            cache: Some(cache.clone()),
            ..SenderOptions::default()
        };
        let sender = Sender::new(&src, opts());
        let mut outs = Vec::new();
        sender
            .run_frames(None, &mut |o| {
                outs.push(o);
                Ok(())
            })
            .unwrap();
        let (whole, _) = Sender::new(&src, SenderOptions::default())
            .manifest_of(None)
            .unwrap();
        let big_at = whole
            .iter()
            .position(|e| e.path.as_bytes() == b"pages-1.img")
            .unwrap();
        let mut asm = crate::chunklist::Assembler::default();
        let mut got = Vec::new();
        let mut partial = 0;
        for o in outs {
            if o.entry.is_none() {
                partial += 1;
            }
            for f in o.frames {
                if let Some(crate::chunklist::Incoming::Entry(e)) = asm.feed(f).unwrap() {
                    got.push(e);
                }
            }
        }
        // A head and one part per 32 MiB window (three).
        assert_eq!(partial, 4);
        assert_eq!(got, whole);
        assert!(matches!(whole[big_at].kind, EntryKind::File { .. }));
        // Known from the cache now: no stream.
        let mut outs = Vec::new();
        Sender::new(&src, opts())
            .run_frames(None, &mut |o| {
                outs.push(o);
                Ok(())
            })
            .unwrap();
        assert!(outs.iter().all(|o| o.entry.is_some()));
    }

    /// With a cache, files are listed with fingerprints; a file changed since is listed again
    /// from its cached list (streamed when large) and the list is the one chunking it afresh
    /// gives, for a large file and a small one.
    #[test]
    fn a_changed_file_is_listed_again_from_its_cached_list() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let mut big = crate::chunk::tests_support::noise(21, (STREAM_MIN + 3000) as usize);
        std::fs::write(src.join("big.bin"), &big).unwrap();
        let mut small = crate::chunk::tests_support::noise(22, 300_000);
        std::fs::write(src.join("small.bin"), &small).unwrap();
        let cache = dir.path().join("cache.hopidx");
        let opts = || SenderOptions {
            cache: Some(cache.clone()),
            ..SenderOptions::default()
        };
        let entries = |sender: Sender| {
            let mut outs = Vec::new();
            sender
                .run_frames(None, &mut |o| {
                    outs.push(o);
                    Ok(())
                })
                .unwrap();
            let mut asm = crate::chunklist::Assembler::default();
            let mut got = Vec::new();
            for f in outs.into_iter().flat_map(|o| o.frames) {
                if let Some(crate::chunklist::Incoming::Entry(e)) = asm.feed(f).unwrap() {
                    got.push(e);
                }
            }
            got
        };
        entries(Sender::new(&src, opts()));
        let params = SenderOptions::default().params;
        let saved = IndexCache::load(&cache, params);
        for name in ["big.bin", "small.bin"] {
            assert!(
                saved.prior(&src.join(name)).is_some(),
                "{name}: no fingerprints"
            );
        }
        // Pages rewritten and bytes inserted in both.
        for data in [&mut big, &mut small] {
            for at in (4096..data.len() - 8192).step_by(200_000) {
                data[at..at + 4096].fill(7);
            }
            data.splice(10_000..10_000, *b"inserted");
        }
        std::fs::write(src.join("big.bin"), &big).unwrap();
        std::fs::write(src.join("small.bin"), &small).unwrap();
        let got = entries(Sender::new(&src, opts()));
        let (whole, _) = Sender::new(&src, SenderOptions::default())
            .manifest_of(None)
            .unwrap();
        assert_eq!(got, whole);
        for (name, data) in [("big.bin", &big), ("small.bin", &small)] {
            let e = got.iter().find(|e| e.path.as_bytes() == name.as_bytes());
            let Some(Entry {
                kind: EntryKind::File { chunks, .. },
                ..
            }) = e
            else {
                panic!("{name} not listed as a file");
            };
            assert_eq!(chunks, &crate::chunk::chunk_bytes(data, params).chunks);
        }
    }

    /// Compressed whole chunks in a row go in groups or as pieces of a stream to a receiver
    /// that reads them, each chunk alone to one that does not; incompressible chunks go raw
    /// (once compression backed off); the chunks come back byte for byte, in want order.
    #[test]
    fn compressible_chunks_go_in_groups_or_streams() {
        let dir = tempfile::tempdir().unwrap();
        let text: Vec<u8> = (0..40_000u32)
            .flat_map(|i| format!("key:{i:08} value {} ", i % 97).into_bytes())
            .collect();
        let noise = crate::chunk::tests_support::noise(5, text.len());
        std::fs::write(dir.path().join("a.txt"), &text).unwrap();
        std::fs::write(dir.path().join("b.bin"), &noise).unwrap();
        std::fs::write(dir.path().join("pages-1.img"), &text).unwrap();
        let sender = Sender::new(
            dir.path(),
            SenderOptions {
                compress: Some(1),
                ..SenderOptions::default()
            },
        );
        let (manifest, _) = sender.manifest_of(None).unwrap();
        // A memory page image goes in groups even to a stream.
        let mut stream = crate::zstd_ctx::StreamCompressor::new(1).unwrap();
        let mut kinds = Vec::new();
        sender
            .serve(
                3,
                &[0, 1, 2, 3],
                &[],
                false,
                Packing::Stream(&mut stream),
                &mut |f| {
                    kinds.push(matches!(f, Frame::DataGroup { .. }));
                    Ok(())
                },
            )
            .unwrap();
        assert_eq!(kinds, [true], "{:?}", manifest[3]);
        for (entry, data, compressible) in [(1u32, &text, true), (2u32, &noise, false)] {
            let EntryKind::File { chunks, .. } = &manifest[entry as usize].kind else {
                panic!("{:?}", manifest[entry as usize]);
            };
            // Every other chunk, so that wanted chunks do not have consecutive numbers.
            let want: Vec<u32> = (0..chunks.len() as u32).step_by(2).collect();
            let mut wire = Vec::new();
            for mode in 0..3 {
                let mut sent = 0usize;
                let mut frames = Vec::new();
                let mut emit = |f: Frame| {
                    frames.push(f);
                    Ok(())
                };
                let mut stream = crate::zstd_ctx::StreamCompressor::new(1).unwrap();
                let packing = match mode {
                    0 => Packing::Alone,
                    1 => Packing::Groups,
                    _ => Packing::Stream(&mut stream),
                };
                sender
                    .serve(entry, &want, &[], false, packing, &mut emit)
                    .unwrap();
                let count = |f: fn(&Frame) -> bool| frames.iter().filter(|x| f(x)).count();
                let groups = count(|f| matches!(f, Frame::DataGroup { .. }));
                let streamed = count(|f| matches!(f, Frame::DataStream { .. }));
                let raw = count(|f| {
                    matches!(
                        f,
                        Frame::Data {
                            codec: Codec::Raw,
                            ..
                        }
                    )
                });
                assert_eq!(groups > 0, mode == 1 && compressible, "{entry} {mode}");
                assert_eq!(streamed > 0, mode == 2, "{entry} {mode}");
                // Incompressible data goes raw once compression backed off (after 8 chunks,
                // or 8 groups or stream pieces: this file is too short for that in a stream).
                assert_eq!(
                    raw > 0,
                    !compressible && mode < 2,
                    "{entry} {mode}: backed off"
                );
                let mut unstream = crate::zstd_ctx::StreamDecompressor::default();
                let mut got: Vec<(u32, Vec<u8>)> = Vec::new();
                for f in frames {
                    let (first, pieces) = match f {
                        Frame::Data {
                            chunk,
                            codec,
                            bytes,
                            ..
                        } => {
                            sent += bytes.len();
                            let len = chunks[chunk as usize].len as usize;
                            got.push((chunk, decode_payload(codec, bytes, len).unwrap()));
                            continue;
                        }
                        Frame::DataGroup {
                            first, lens, bytes, ..
                        } => {
                            sent += bytes.len();
                            (first, crate::protocol::split_group(&lens, &bytes).unwrap())
                        }
                        Frame::DataStream {
                            first, lens, bytes, ..
                        } => {
                            sent += bytes.len();
                            let pieces =
                                crate::protocol::split_stream(&mut unstream, &lens, &bytes);
                            (first, pieces.unwrap())
                        }
                        other => panic!("{other:?}"),
                    };
                    let at = want.iter().position(|&n| n == first).unwrap();
                    got.extend(want[at..].iter().copied().zip(pieces));
                }
                wire.push(sent);
                let offsets = chunk_offsets(chunks);
                assert_eq!(got.len(), want.len());
                for ((n, bytes), &w) in got.iter().zip(&want) {
                    assert_eq!(*n, w);
                    let at = offsets[w as usize] as usize;
                    assert_eq!(&bytes[..], &data[at..at + bytes.len()]);
                }
            }
            if compressible {
                // Groups beat chunks alone, and the stream (which refers back across groups)
                // beats groups.
                assert!(wire[2] < wire[1] && wire[1] < wire[0], "{wire:?}");
            } else {
                // Noise through the stream costs a few bytes per block more than raw.
                let wanted: usize = want.iter().map(|&n| chunks[n as usize].len as usize).sum();
                assert!(wire[2] <= wanted + wanted / 100, "{wire:?} {wanted}");
            }
        }
    }

    #[test]
    fn compression_backs_off_on_incompressible_data() {
        let mut s = Squeeze::default();
        for _ in 0..8 {
            assert!(s.should_try());
            s.record(false);
        }
        let tried = (0..64).filter(|_| s.should_try()).count();
        assert_eq!(tried, 2, "after 8 misses only every 32nd chunk is tried");
        s.record(true);
        assert!(s.should_try(), "a chunk that shrank resumes compression");
    }

    #[test]
    fn payload_round_trip_and_bomb() {
        let data = vec![b'a'; 100_000];
        let (c, z) = encode_payload(data.clone(), Some(3));
        assert_eq!(c, Codec::Zstd);
        assert!(z.len() < 1000);
        assert_eq!(decode_payload(c, z.clone(), data.len()).unwrap(), data);
        // Claimed smaller than it decompresses to: refused, not allocated.
        assert!(decode_payload(c, z, 1000).is_err());
        // Incompressible data goes raw.
        let mut noise = vec![0u8; 4096];
        blake3::Hasher::new()
            .update(b"seed")
            .finalize_xof()
            .fill(&mut noise);
        let (c, _) = encode_payload(noise, Some(1));
        assert_eq!(c, Codec::Raw);
    }
}
