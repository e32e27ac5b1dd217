//! The receiver's index of the chunks it already holds: the files of the destination tree plus
//! any basis directories, with a cache persisted next to the destination so that unchanged files
//! (same size, mtime, ctime and inode) are not read again on the next run.

use crate::chunk::{chunk_file, ChunkParams, FileChunks};
use crate::error::{Error, IoContext, Result};
use crate::id::ChunkId;
use crate::manifest::ChunkSpec;
use crate::rechunk::{Fingerprint, Prior};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ffi::OsString;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A hasher for keys that already are uniformly random (BLAKE3 ids): it takes 8 of their bytes.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Hash impls of a ChunkId write its bytes once: keep 8 of them (they are uniform).
        let mut b = [0u8; 8];
        let n = bytes.len().min(8);
        b[..n].copy_from_slice(&bytes[..n]);
        self.0 ^= u64::from_le_bytes(b);
    }
    fn write_usize(&mut self, _: usize) {}
}

/// HashMap keyed by chunk ids.
pub type IdMap<V> = HashMap<ChunkId, V, BuildHasherDefault<IdHasher>>;

/// Where a chunk can be read locally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Index into [`ChunkIndex::files`].
    pub file: u32,
    /// Byte offset in that file.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A local file whose chunks are indexed.
#[derive(Clone, Debug)]
pub struct IndexedFile {
    /// Absolute path.
    pub path: PathBuf,
    /// Its chunks and whole-file hash.
    pub chunks: FileChunks,
    /// Its stat when it was indexed (None: not known). While an open handle still shows this
    /// stat, the file holds the chunks listed, with the same trust as the index cache.
    pub stat: Option<StatKey>,
}

/// What the receiver holds, by chunk id.
#[derive(Debug, Default)]
pub struct ChunkIndex {
    /// The indexed files.
    pub files: Vec<IndexedFile>,
    map: IdMap<Location>,
    /// Files [`ChunkIndex::add_scanned`] could not take from its cache (chunked, or unreadable).
    pub cache_misses: usize,
}

impl ChunkIndex {
    /// Where chunk `id` can be read, if anywhere.
    pub fn get(&self, id: &ChunkId) -> Option<Location> {
        self.map.get(id).copied()
    }

    /// Number of distinct chunks held.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Add a file's chunks; returns its file number.
    pub fn add(&mut self, path: PathBuf, chunks: FileChunks) -> u32 {
        self.add_with_stat(path, chunks, None)
    }

    /// Add a file's chunks, listed while the file had `stat`; returns its file number.
    pub fn add_with_stat(
        &mut self,
        path: PathBuf,
        chunks: FileChunks,
        stat: Option<StatKey>,
    ) -> u32 {
        let file = self.files.len() as u32;
        let mut off = 0u64;
        for c in &chunks.chunks {
            if !c.zero {
                self.map.entry(c.id).or_insert(Location {
                    file,
                    offset: off,
                    len: c.len,
                });
            }
            off += c.len as u64;
        }
        self.files.push(IndexedFile { path, chunks, stat });
        file
    }

    /// Index `paths` (absolute paths of regular files), reusing `cache` for files whose stat
    /// matches and chunking the others in parallel. `keys` are the files' stat keys as a scan
    /// saw them (`None`: stat the file here); a file changed since its key was taken is found
    /// changed by the key's ctime, like one changed while it is read. Returns the file number of
    /// each path (None where it could not be read) and the read errors.
    pub fn add_scanned(
        &mut self,
        paths: &[PathBuf],
        keys: &[Option<StatKey>],
        params: ChunkParams,
        cache: &IndexCache,
    ) -> (Vec<Option<u32>>, Vec<Error>) {
        let results: Vec<Result<(FileChunks, StatKey, bool)>> = paths
            .par_iter()
            .zip(keys.par_iter())
            .map(|(p, key)| {
                let stat = StatKey::known_or_stat(*key, p)?;
                if let Some(hit) = cache.lookup_key(p, &stat) {
                    return Ok((hit.clone(), stat, true));
                }
                // Stat before the read: a change while it is read changes the ctime.
                Ok((chunk_file(p, params)?, stat, false))
            })
            .collect();
        let mut ids = Vec::with_capacity(paths.len());
        let mut errors = Vec::new();
        for (p, r) in paths.iter().zip(results) {
            match r {
                Ok((fc, stat, hit)) => {
                    self.cache_misses += usize::from(!hit);
                    ids.push(Some(self.add_with_stat(p.clone(), fc, Some(stat))))
                }
                Err(e) => {
                    self.cache_misses += 1;
                    ids.push(None);
                    errors.push(e);
                }
            }
        }
        (ids, errors)
    }
}

/// The stat fields that decide whether a chunk list of a file is still valid: any write to the
/// file, or its replacement, changes one of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatKey {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
}

impl StatKey {
    /// The key of `md`.
    pub fn of(md: &std::fs::Metadata) -> Self {
        StatKey {
            size: md.len(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
            ino: md.ino(),
        }
    }

    /// Whether the file at `path` is still as it was when this key was taken before reading
    /// it, and `size` (the length of what was read) is its size: what a chunk list made from
    /// that read may be recorded under.
    pub fn still_as_read(&self, path: &Path, size: u64) -> bool {
        self.size == size
            && std::fs::symlink_metadata(path).is_ok_and(|md| StatKey::of(&md) == *self)
    }

    /// The file size the key was taken with.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// `known` (a key a scan took) or, without one, the key of `path` stat'ed now.
    pub fn known_or_stat(known: Option<StatKey>, path: &Path) -> Result<Self> {
        match known {
            Some(k) => Ok(k),
            None => Ok(StatKey::of(
                &std::fs::symlink_metadata(path).ctx("stat", path)?,
            )),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
struct CacheEntry {
    path: Vec<u8>,
    stat: StatKey,
    chunks: FileChunks,
    /// One per chunk, or none (see [`crate::rechunk`]).
    fps: Vec<Fingerprint>,
}

#[derive(Debug, Deserialize)]
struct CacheFile {
    magic: [u8; 8],
    params: ChunkParams,
    entries: Vec<CacheEntry>,
}

const CACHE_MAGIC: [u8; 8] = *b"HOPIDX05";

/// A chunk list to be written into a cache, borrowed (encoded as a [`FileChunks`] is).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ChunksRef<'a> {
    /// Total length.
    pub size: u64,
    /// The file hash.
    pub hash: ChunkId,
    /// The chunks in order.
    pub chunks: &'a [ChunkSpec],
}

impl<'a> ChunksRef<'a> {
    /// Borrow `fc`.
    pub fn of(fc: &'a FileChunks) -> Self {
        ChunksRef {
            size: fc.size,
            hash: fc.hash,
            chunks: &fc.chunks,
        }
    }
}

/// A cache entry to be written, borrowing what it holds (encoded as a stored entry is): what
/// [`save_entries`] takes, so that a cache is written without copying every chunk list first.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EntryRef<'a> {
    path: &'a [u8],
    stat: StatKey,
    chunks: ChunksRef<'a>,
    fps: &'a [Fingerprint],
}

impl<'a> EntryRef<'a> {
    /// The entry of the file at `path` (absolute), whose stat key is `stat`.
    pub fn new(path: &'a Path, stat: StatKey, chunks: ChunksRef<'a>) -> Self {
        EntryRef {
            path: path.as_os_str().as_bytes(),
            stat,
            chunks,
            fps: &[],
        }
    }

    /// The file's path.
    pub fn path(&self) -> &'a std::ffi::OsStr {
        std::ffi::OsStr::from_bytes(self.path)
    }

    /// The same entry with its chunks' fingerprints (one per chunk; see [`crate::rechunk`]).
    pub fn with_fps(self, fps: &'a [Fingerprint]) -> Self {
        EntryRef { fps, ..self }
    }
}

#[derive(Serialize)]
struct CacheFileRef<'a> {
    magic: [u8; 8],
    params: ChunkParams,
    entries: &'a [EntryRef<'a>],
}

/// Write a cache of `entries` atomically to `path` (a later entry for a path wins when it is
/// loaded).
pub fn save_entries(path: &Path, params: ChunkParams, entries: &[EntryRef<'_>]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).ctx("create cache directory", dir)?;
    }
    let file = CacheFileRef {
        magic: CACHE_MAGIC,
        params,
        entries,
    };
    let bytes = postcard::to_allocvec(&file).map_err(|e| Error::Protocol(e.to_string()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".hopidx.")
        .tempfile_in(dir)
        .ctx("create index cache in", dir)?;
    tmp.write_all(&bytes)
        .ctx("write", tmp.path().to_path_buf())?;
    tmp.persist(path).map_err(|e| Error::Io {
        op: "rename index cache to",
        path: path.into(),
        source: e.error,
    })?;
    Ok(())
}

/// Chunk lists of local files from an earlier run, keyed by absolute path and valid while the
/// file's size, mtime, ctime and inode are unchanged.
#[derive(Clone, Debug, Default)]
pub struct IndexCache {
    params: Option<ChunkParams>,
    /// By path bytes: hashing an `OsString` hashes its bytes, a `PathBuf` its parsed components
    /// (which took a tenth of a no-change sync's CPU over 45,701 files).
    entries: HashMap<OsString, Cached>,
}

/// A cached chunk list.
#[derive(Clone, Debug)]
struct Cached {
    stat: StatKey,
    chunks: FileChunks,
    /// The chunks' fingerprints when the list was made with them (a sender's cache), else
    /// empty: they let the file be chunked again after a change without hashing what did not
    /// change ([`crate::rechunk`]).
    fps: Vec<Fingerprint>,
}

impl IndexCache {
    /// An empty cache for chunk parameters `params`.
    pub fn new(params: ChunkParams) -> Self {
        IndexCache {
            params: Some(params),
            entries: HashMap::new(),
        }
    }

    /// Load the cache at `path` for chunk parameters `params`. A missing, unreadable, corrupt
    /// or differently parameterised cache is an empty one (it is only an optimisation).
    pub fn load(path: &Path, params: ChunkParams) -> Self {
        let mut c = IndexCache::new(params);
        let Ok(bytes) = std::fs::read(path) else {
            return c;
        };
        let Ok(file) = postcard::from_bytes::<CacheFile>(&bytes) else {
            tracing::warn!("ignoring unreadable index cache {}", path.display());
            return c;
        };
        if file.magic != CACHE_MAGIC || file.params != params {
            return c;
        }
        for e in file.entries {
            c.entries.insert(
                OsString::from_vec(e.path),
                Cached {
                    stat: e.stat,
                    chunks: e.chunks,
                    fps: e.fps,
                },
            );
        }
        c
    }

    /// The cached chunk list of `path` if its stat `md` still matches.
    pub fn lookup(&self, path: &Path, md: &std::fs::Metadata) -> Option<&FileChunks> {
        self.lookup_key(path, &StatKey::of(md))
    }

    /// The cached chunk list of `path` if it was recorded under stat key `key`.
    pub fn lookup_key(&self, path: &Path, key: &StatKey) -> Option<&FileChunks> {
        self.lookup_fps(path, key).map(|(chunks, _)| chunks)
    }

    /// [`IndexCache::lookup_key`], with the fingerprints of the chunks (empty when not kept).
    pub fn lookup_fps(&self, path: &Path, key: &StatKey) -> Option<(&FileChunks, &[Fingerprint])> {
        let e = self.entries.get(path.as_os_str())?;
        (e.stat == *key).then_some((&e.chunks, &e.fps[..]))
    }

    /// The cached chunk list of `path` with its fingerprints, whatever the file's stat is now:
    /// what [`crate::rechunk`] starts from when the file changed. `None` without fingerprints.
    pub fn prior(&self, path: &Path) -> Option<Prior<'_>> {
        let e = self.entries.get(path.as_os_str())?;
        (!e.fps.is_empty() && e.fps.len() == e.chunks.chunks.len()).then_some(Prior {
            chunks: &e.chunks.chunks,
            fps: &e.fps,
        })
    }

    /// Record a chunk list computed from the file as `md` described it before it was read; if
    /// the file's stat changed meanwhile, nothing is recorded.
    pub fn record_read(&mut self, path: &Path, before: &std::fs::Metadata, chunks: FileChunks) {
        self.record_read_key(path, StatKey::of(before), chunks, Vec::new())
    }

    /// [`IndexCache::record_read`] with the stat key taken before the read, and the chunks'
    /// fingerprints (one per chunk, or none).
    pub fn record_read_key(
        &mut self,
        path: &Path,
        before: StatKey,
        chunks: FileChunks,
        fps: Vec<Fingerprint>,
    ) {
        if before.still_as_read(path, chunks.size) {
            self.entries.insert(
                path.as_os_str().to_owned(),
                Cached::new(before, chunks, fps),
            );
        }
    }

    /// The entries of `paths` (path bytes, see [`std::ffi::OsStr`]), borrowed: to be written
    /// with [`save_entries`] (without a copy of every chunk list first).
    pub fn entries_of(&self, paths: &std::collections::HashSet<OsString>) -> Vec<EntryRef<'_>> {
        self.entries
            .iter()
            .filter(|(p, _)| paths.contains(p.as_os_str()))
            .map(|(p, e)| e.entry_ref(p))
            .collect()
    }

    /// Number of cached files.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Write the cache atomically to `path`, every entry as it is. Callers save a cache made
    /// from the files there now (the receiver's index, the sender's files of this tree), so a
    /// file that is gone (a migration's earlier rounds) is not in it and the cache does not
    /// grow by a chunk list per round.
    pub fn save(&self, path: &Path) -> Result<()> {
        let Some(params) = self.params else {
            return Ok(());
        };
        let entries: Vec<EntryRef<'_>> = self.entries.iter().map(|(p, e)| e.entry_ref(p)).collect();
        save_entries(path, params, &entries)
    }
}

impl Cached {
    fn new(stat: StatKey, chunks: FileChunks, mut fps: Vec<Fingerprint>) -> Self {
        if fps.len() != chunks.chunks.len() {
            fps = Vec::new();
        }
        Cached { stat, chunks, fps }
    }

    /// This entry, of the file at `path`, as it is written.
    fn entry_ref<'a>(&'a self, path: &'a OsString) -> EntryRef<'a> {
        EntryRef {
            path: path.as_bytes(),
            stat: self.stat,
            chunks: ChunksRef::of(&self.chunks),
            fps: &self.fps,
        }
    }
}

/// Where the sender's chunk cache for source tree `src` lives: under `$XDG_CACHE_HOME/hop` (or
/// `~/.cache/hop`), named after the BLAKE3 of the source's absolute path. `None` when no cache
/// directory can be determined.
pub fn source_cache_path(src: &Path) -> Option<PathBuf> {
    user_cache_path("src", src)
}

/// Where a `hop serve` keeps the index cache of a destination it receives into (a server does
/// not write beside its destinations: the parent may lie outside its root). Same directory as
/// [`source_cache_path`], prefix `dst-`.
pub fn dest_cache_path(dest: &Path) -> Option<PathBuf> {
    user_cache_path("dst", dest)
}

fn user_cache_path(prefix: &str, tree: &Path) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    // Components, so that `src/` and `src` (rsync's trailing-slash forms) share one cache.
    let abs: PathBuf = std::path::absolute(tree).ok()?.components().collect();
    let id = blake3::hash(abs.as_os_str().as_bytes()).to_hex();
    Some(
        base.join("hop")
            .join(format!("{prefix}-{}.hopidx", &id[..32])),
    )
}

/// Where the index cache of destination `dest` lives: next to it, as `.NAME.hopidx`.
pub fn cache_path_for(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.as_bytes().to_vec())
        .unwrap_or_else(|| b"root".to_vec());
    let mut f = b".".to_vec();
    f.extend_from_slice(&name);
    f.extend_from_slice(b".hopidx");
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parent.join(std::ffi::OsStr::from_bytes(&f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_round_trip_and_invalidation() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        std::fs::write(&f, vec![7u8; 100_000]).unwrap();
        let p = ChunkParams::default();
        let fc = chunk_file(&f, p).unwrap();
        let mut c = IndexCache::load(&d.path().join("cache"), p);
        c.record_read(&f, &std::fs::symlink_metadata(&f).unwrap(), fc.clone());
        c.save(&d.path().join("cache")).unwrap();
        let c2 = IndexCache::load(&d.path().join("cache"), p);
        let md = std::fs::symlink_metadata(&f).unwrap();
        assert_eq!(c2.lookup(&f, &md), Some(&fc));
        // Other params: the cache does not apply.
        let c3 = IndexCache::load(
            &d.path().join("cache"),
            ChunkParams::from_avg(65536).unwrap(),
        );
        assert!(c3.is_empty());
        // Touching the file invalidates its entry.
        std::fs::write(&f, vec![8u8; 100_000]).unwrap();
        let md = std::fs::symlink_metadata(&f).unwrap();
        assert_eq!(c2.lookup(&f, &md), None);
    }

    /// Entries written borrowed ([`save_entries`], [`IndexCache::save`]) load back as they were,
    /// fingerprints included.
    #[test]
    fn borrowed_entries_load_back_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = ChunkParams::default();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        std::fs::write(&a, crate::chunk::tests_support::noise(3, 300_000)).unwrap();
        std::fs::write(&b, vec![5u8; 70_000]).unwrap();
        let (fa, fb) = (chunk_file(&a, p).unwrap(), chunk_file(&b, p).unwrap());
        let key = |f: &Path| StatKey::of(&std::fs::symlink_metadata(f).unwrap());
        let fps: Vec<Fingerprint> = (0..fa.chunks.len() as u128).map(|i| i * 77 + 1).collect();
        let mut c = IndexCache::new(p);
        c.record_read_key(&a, key(&a), fa.clone(), fps.clone());
        c.save(&d.path().join("owned")).unwrap();
        let back = IndexCache::load(&d.path().join("owned"), p);
        assert_eq!(back.lookup_fps(&a, &key(&a)), Some((&fa, &fps[..])));

        let entries = [
            EntryRef::new(&a, key(&a), ChunksRef::of(&fa)),
            EntryRef::new(&b, key(&b), ChunksRef::of(&fb)),
        ];
        save_entries(&d.path().join("refs"), p, &entries).unwrap();
        let back = IndexCache::load(&d.path().join("refs"), p);
        assert_eq!(back.len(), 2);
        assert_eq!(back.lookup_fps(&a, &key(&a)), Some((&fa, &[][..])));
        assert_eq!(back.lookup_key(&b, &key(&b)), Some(&fb));
    }

    #[test]
    fn corrupt_cache_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("cache"), b"garbage").unwrap();
        assert!(IndexCache::load(&d.path().join("cache"), ChunkParams::default()).is_empty());
    }

    #[test]
    fn cache_path_is_beside_dest() {
        assert_eq!(
            cache_path_for(Path::new("/x/y/dest")),
            Path::new("/x/y/.dest.hopidx")
        );
        assert_eq!(
            cache_path_for(Path::new("dest")),
            Path::new("./.dest.hopidx")
        );
    }
}
