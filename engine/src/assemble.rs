//! Build a file from its plan: local reads, fetched chunks and holes go, in order, into a
//! temporary file in the destination directory; every chunk is checked against its id (fetched
//! chunks on arrival; local runs are hashed again unless their file's stat is still the one it
//! was indexed with, before and after the read, see [`FileTable::unchanged`]); only then is the
//! temporary renamed over the old file. A failure at any point leaves the old file as it was.

use crate::error::{Error, IoContext, Result};
use crate::id::{is_zero, ChunkId};
use crate::index::ChunkIndex;
use crate::manifest::ChunkSpec;
use crate::plan::{FilePlan, Piece};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Read access to the files of a [`ChunkIndex`] that stays correct while the sync replaces them:
/// before a path is renamed over, its old inode is opened and kept ("pinned"), so chunks still to
/// be copied from the old version are read from the old version.
pub struct FileTable<'a> {
    index: &'a ChunkIndex,
    by_path: HashMap<&'a Path, u32>,
    pinned: Mutex<HashMap<u32, Pinned>>,
    /// Files opened for reading and still at their path, kept open: a file read for thousands
    /// of chunks (delta bases, references) is opened once.
    opened: Mutex<HashMap<u32, Arc<File>>>,
}

/// An old version kept readable.
struct Pinned {
    file: Arc<File>,
    /// Its stat right after this table renamed over it (which changes its ctime), if it still
    /// had its indexed stat just before.
    renamed: Option<crate::index::StatKey>,
}

impl Pinned {
    fn new(file: File) -> Pinned {
        Pinned {
            file: Arc::new(file),
            renamed: None,
        }
    }
}

impl<'a> FileTable<'a> {
    /// A table over `index`'s files.
    pub fn new(index: &'a ChunkIndex) -> Self {
        let by_path = index
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| (f.path.as_path(), i as u32))
            .collect();
        FileTable {
            index,
            by_path,
            pinned: Mutex::new(HashMap::new()),
            opened: Mutex::new(HashMap::new()),
        }
    }

    /// Open index file `n` for reading (its pinned old version if it was replaced).
    pub fn open(&self, n: u32) -> Result<Arc<File>> {
        let pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pinned.get(&n) {
            return Ok(p.file.clone());
        }
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = opened.get(&n) {
            return Ok(f.clone());
        }
        let path = &self.index.files[n as usize].path;
        let f = Arc::new(open_nofollow(path)?);
        if opened.len() >= MAX_OPENED {
            opened.clear(); // bounded: a tree of many files must not run out of descriptors
        }
        opened.insert(n, f.clone());
        Ok(f)
    }

    /// Keep index file `n` readable in its current version, whatever happens to its path.
    pub fn pin(&self, n: u32) {
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        if let std::collections::hash_map::Entry::Vacant(v) = pinned.entry(n) {
            if let Ok(f) = open_nofollow(&self.index.files[n as usize].path) {
                v.insert(Pinned::new(f));
            }
        }
    }

    /// True when `f`, an open handle on index file `n`, still shows the stat the file had when
    /// it was indexed: its bytes are then the chunks the index lists (the trust the index cache
    /// already gives), and need not be hashed again. A file written or replaced since (an
    /// unlink changes the ctime of a pinned old version) is not trusted, unless the change is
    /// this table's own rename over it.
    pub fn unchanged(&self, n: u32, f: &File) -> bool {
        let Some(want) = self.indexed_stat(n) else {
            return false;
        };
        // Under the `pinned` lock: a rename in `replace` and its record are seen together.
        let pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(md) = f.metadata() else {
            return false;
        };
        let now = crate::index::StatKey::of(&md);
        now == want || pinned.get(&n).and_then(|p| p.renamed) == Some(now)
    }

    /// The stat index file `n` had when it was indexed, if recorded.
    fn indexed_stat(&self, n: u32) -> Option<crate::index::StatKey> {
        self.index.files.get(n as usize).and_then(|x| x.stat)
    }

    /// The index file number of `path`, if it is indexed.
    pub fn number_of(&self, path: &Path) -> Option<u32> {
        self.by_path.get(path).copied()
    }

    /// The chunks of index file `n`, as indexed.
    pub fn chunks_of(&self, n: u32) -> &[ChunkSpec] {
        &self.index.files[n as usize].chunks.chunks
    }

    /// Where the index holds a chunk.
    pub fn locate(&self, id: &ChunkId) -> Option<crate::index::Location> {
        self.index.get(id)
    }

    /// The path of index file `n`.
    pub fn path(&self, n: u32) -> &Path {
        &self.index.files[n as usize].path
    }

    /// Rename `tmp` over `dest`, first pinning the old file there if it is indexed (as
    /// `indexed_as`: the same file, `dest` may name it through an open directory).
    ///
    /// The pinned old version's cached pages are dropped (it stays readable, from disk): kept,
    /// they would hold a second copy of every rewritten file in memory until the sync ends,
    /// and the new files would be written into memory never used before, which costs this VM
    /// about twice the system time of reusing the pages just freed (1 GiB delta: 3.7 → 1.7 s).
    pub fn replace(&self, tmp: &Path, dest: &Path, indexed_as: &Path) -> Result<()> {
        let mut pinned = self.pinned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&n) = self.by_path.get(indexed_as) {
            // The old version is held by `pinned` alone from now on.
            self.opened
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&n);
            let old = match pinned.entry(n) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    open_nofollow(dest).ok().map(|f| v.insert(Pinned::new(f)))
                }
                std::collections::hash_map::Entry::Occupied(o) => Some(o.into_mut()),
            };
            let want = self.indexed_stat(n);
            let before = old.as_ref().and_then(|p| p.file.metadata().ok());
            std::fs::rename(tmp, dest).ctx("rename into place", dest)?;
            if let Some(old) = old {
                let intact = before.is_some_and(|md| Some(crate::index::StatKey::of(&md)) == want);
                if let (true, Ok(md)) = (intact, old.file.metadata()) {
                    old.renamed = Some(crate::index::StatKey::of(&md));
                }
                drop_cached_pages(&old.file);
            }
            return Ok(());
        }
        std::fs::rename(tmp, dest).ctx("rename into place", dest)
    }
}

/// Ask the kernel to drop the clean cached pages of `f` (advice: nothing fails if it does not).
fn drop_cached_pages(f: &File) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a valid open descriptor; the call only advises the page cache.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
    }
}

/// Files a [`FileTable`] keeps open at most (besides pinned ones).
const MAX_OPENED: usize = 64;

/// Open a file for reading without following a symlink in its last component.
pub(crate) fn open_nofollow(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ctx("open", path)
}

/// Why [`Staged::clone_of`] made no clone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoClone {
    /// The file system has no reflinks.
    Unsupported,
    /// This file could not be cloned (gone, unreadable, no space...).
    Other,
}

/// A block of zeros to write or hash zero runs from, without allocating.
static ZEROS: [u8; 65536] = [0; 65536];

/// A unique temporary name beside `path`: `.NAME.hop.PID.N`.
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(
        ".hop.{}.{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    path.with_file_name(name)
}

/// Block size for hole detection: runs of zero blocks of this size are not written.
const BLOCK: u64 = 4096;
/// Buffered bytes before a write. Not more: on this kernel a 1 MiB write into the page cache
/// takes large folios, which on a VM host that reclaims free guest memory cost more to touch;
/// a 1 GiB local delta took 2.3-2.8 s (2.4-2.8 s system time) with 1 MiB writes, 1.8-2.1 s
/// (1.4-1.7 s) with 256 KiB ones, the same as with 64 KiB.
const WRITE_BUF: usize = 256 << 10;

/// Sequential writer that leaves aligned all-zero blocks as holes (the file is new, so skipped
/// blocks read back as zeros).
struct SparseWriter<'f> {
    file: &'f File,
    path: &'f Path,
    pos: u64,
    buf: Vec<u8>,
    buf_start: u64,
    sparse: bool,
    /// Where the bytes written so far end (the file's length unless it ends in a hole).
    written_end: u64,
}

impl<'f> SparseWriter<'f> {
    fn new(file: &'f File, path: &'f Path, sparse: bool) -> Self {
        SparseWriter {
            file,
            path,
            pos: 0,
            // Allocated as data comes: a small file's buffer is its size, not WRITE_BUF.
            buf: Vec::new(),
            buf_start: 0,
            sparse,
            written_end: 0,
        }
    }

    fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            let (buf, at) = (std::mem::take(&mut self.buf), self.buf_start);
            let r = self.write_at(&buf, at);
            self.buf = buf;
            self.buf.clear();
            r?;
        }
        Ok(())
    }

    fn write_at(&mut self, data: &[u8], at: u64) -> Result<()> {
        self.file.write_all_at(data, at).ctx("write", self.path)?;
        self.written_end = self.written_end.max(at + data.len() as u64);
        Ok(())
    }

    fn push(&mut self, mut data: &[u8]) -> Result<()> {
        // Whole buffers' worth go from `data` to the file as they are, WRITE_BUF at a time:
        // a large chunk is not copied into the buffer first.
        while self.buf.is_empty() && data.len() >= WRITE_BUF {
            let (now, rest) = data.split_at(WRITE_BUF);
            self.write_at(now, self.pos)?;
            self.pos += WRITE_BUF as u64;
            data = rest;
        }
        if data.is_empty() {
            return Ok(());
        }
        if self.buf.is_empty() {
            self.buf_start = self.pos;
        }
        self.buf.extend_from_slice(data);
        self.pos += data.len() as u64;
        if self.buf.len() >= WRITE_BUF {
            self.flush()?;
        }
        Ok(())
    }

    fn write(&mut self, mut data: &[u8]) -> Result<()> {
        if !self.sparse {
            return self.push(data);
        }
        while !data.is_empty() {
            // The bytes up to the next aligned all-zero block go on as one piece; that block
            // is skipped (a hole).
            let mut n = 0usize;
            while n < data.len() {
                let to_boundary = (BLOCK - (self.pos + n as u64) % BLOCK) as usize;
                let k = to_boundary.min(data.len() - n);
                if k as u64 == BLOCK && is_zero(&data[n..n + k]) {
                    break;
                }
                n += k;
            }
            if n > 0 {
                self.push(&data[..n])?;
                data = &data[n..];
            } else {
                self.flush()?;
                self.pos += BLOCK;
                data = &data[BLOCK as usize..];
            }
        }
        Ok(())
    }

    fn zeros(&mut self, mut len: u64) -> Result<()> {
        if !self.sparse {
            while len > 0 {
                let n = len.min(ZEROS.len() as u64) as usize;
                self.push(&ZEROS[..n])?;
                len -= n as u64;
            }
            return Ok(());
        }
        // Pad to the next block boundary with real zeros, then skip whole blocks.
        let head = ((BLOCK - self.pos % BLOCK) % BLOCK).min(len);
        self.push(&vec![0u8; head as usize])?;
        len -= head;
        if len > 0 {
            self.flush()?;
            self.pos += len;
        }
        Ok(())
    }

    /// `len` bytes written earlier at `offset` (holes and blocks not yet on disk read as
    /// zeros, as they will be).
    fn read_back(&mut self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.flush()?;
        let mut out = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match self.file.read_at(&mut out[got..], offset + got as u64) {
                Ok(0) => break, // past the end: skipped zero blocks
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).ctx("read back", self.path),
            }
        }
        Ok(out)
    }

    fn finish(mut self) -> Result<u64> {
        self.flush()?;
        // The file is new: only a hole at its end is not there yet.
        if self.written_end != self.pos {
            self.file
                .set_len(self.pos)
                .ctx("set length of", self.path)?;
        }
        Ok(self.pos)
    }
}

/// Options for assembly.
#[derive(Clone, Copy, Debug)]
pub struct AssembleOptions {
    /// Leave zero blocks as holes.
    pub sparse: bool,
    /// fsync the file before it is renamed into place.
    pub fsync: bool,
}

/// A file being built: an unnamed `O_TMPFILE` inode in the destination directory where the
/// filesystem supports it (a killed sync then leaves nothing behind), else a named temporary file
/// (`.NAME.hop.XXXXXX`, removed on error). It only gets a name in [`Staged::commit`].
#[derive(Debug)]
pub struct Staged {
    file: File,
    dir: PathBuf,
    named: Option<tempfile::TempPath>,
}

impl Staged {
    /// Create an empty staged file in the directory of `dest`.
    pub fn create(dest: &Path) -> Result<Staged> {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(dir)
        {
            Ok(file) => {
                return Ok(Staged {
                    file,
                    dir: dir.to_path_buf(),
                    named: None,
                })
            }
            Err(e)
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                ) =>
            {
                return Err(Error::Io {
                    op: "create temporary file in",
                    path: dir.into(),
                    source: e,
                })
            }
            Err(_) => {}
        }
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(dest.file_name().unwrap_or_default());
        prefix.push(".hop.");
        let (file, path) = tempfile::Builder::new()
            .prefix(&prefix)
            .tempfile_in(dir)
            .ctx("create temporary file in", dir)?
            .into_parts();
        Ok(Staged {
            file,
            dir: dir.to_path_buf(),
            named: Some(path),
        })
    }

    /// A staged file in the directory of `dest` that shares the blocks of `dest` (a reflink
    /// clone, `FICLONE`): on XFS, Btrfs and other file systems that have them, updating the clone
    /// in place and renaming it over `dest` writes only what changed and keeps the replacement
    /// atomic. Returns the clone and `dest` opened for reading (the original it was made from).
    /// Fails where the file system cannot clone (ext4: [`NoClone::Unsupported`]) or `dest`
    /// cannot be read.
    pub fn clone_of(dest: &Path) -> std::result::Result<(Staged, File), NoClone> {
        use std::os::unix::io::AsRawFd;
        let old = open_nofollow(dest).map_err(|_| NoClone::Other)?;
        if !old.metadata().is_ok_and(|m| m.is_file()) {
            return Err(NoClone::Other);
        }
        let staged = Staged::create(dest).map_err(|_| NoClone::Other)?;
        // SAFETY: FICLONE takes the source descriptor as its argument; both descriptors are
        // open files owned by this function.
        let rc = unsafe { libc::ioctl(staged.file.as_raw_fd(), libc::FICLONE, old.as_raw_fd()) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            tracing::debug!("{}: no reflink clone ({e})", dest.display());
            // Dropping `staged` removes it.
            return Err(match e.raw_os_error() {
                Some(libc::EOPNOTSUPP | libc::EXDEV | libc::EINVAL | libc::ENOTTY) => {
                    NoClone::Unsupported
                }
                _ => NoClone::Other,
            });
        }
        Ok((staged, old))
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// A path naming the staged file for messages.
    pub fn display_path(&self) -> PathBuf {
        self.named
            .as_deref()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.dir.join("(unnamed temporary file)"))
    }

    /// [`Staged::commit`] for a file where the destination held nothing before the sync: an
    /// unnamed staged file is linked under its name directly (one system call, no rename); if
    /// something stands there meanwhile, it is replaced as by [`Staged::commit`].
    pub fn commit_new(self, dest: &Path, indexed_as: &Path, table: &FileTable<'_>) -> Result<()> {
        if self.named.is_none() {
            match link_fd(&self.file, dest) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(Error::Io {
                        op: "link new file as",
                        path: dest.into(),
                        source: e,
                    })
                }
            }
        }
        self.commit(dest, indexed_as, table)
    }

    /// Give the staged file the name `dest`, atomically replacing what is there (via `table`,
    /// which keeps the old version readable; `indexed_as`: the path the index knows it by).
    pub fn commit(self, dest: &Path, indexed_as: &Path, table: &FileTable<'_>) -> Result<()> {
        if let Some(named) = self.named {
            table.replace(&named, dest, indexed_as)?;
            std::mem::forget(named); // renamed: nothing left to clean up
            return Ok(());
        }
        // Link the unnamed inode under a temporary name, then rename that over `dest`.
        let tmp = temp_sibling(dest);
        link_fd(&self.file, &tmp).map_err(|source| Error::Io {
            op: "link temporary file as",
            path: tmp.clone(),
            source,
        })?;
        table.replace(&tmp, dest, indexed_as).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
    }
}

/// Give the open (unnamed) file `file` the name `path` (`linkat` through `/proc/self/fd`).
fn link_fd(file: &File, path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::io::AsRawFd;
    let invalid = |_| std::io::Error::from_raw_os_error(libc::EINVAL);
    let proc_path =
        std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(invalid)?;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(invalid)?;
    // SAFETY: both paths are valid NUL-terminated strings.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            proc_path.as_ptr(),
            libc::AT_FDCWD,
            c_path.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A fetched chunk as it came: its number in the file, the payload's encoding and the payload.
pub type Fetched = (u32, crate::protocol::Codec, Vec<u8>);

/// Read up to `len` bytes of index file `file` at `offset` (fewer at its end).
pub fn read_base(files: &FileTable<'_>, file: u32, offset: u64, len: usize) -> Result<Vec<u8>> {
    let f = files.open(file)?;
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::Io {
                    op: "read",
                    path: files.index.files[file as usize].path.clone(),
                    source: e,
                })
            }
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// Reads `len` bytes of local file `file` at `offset` (a delta's base).
pub(crate) type BaseReader<'r> = dyn Fn(u32, u64, usize) -> Result<Vec<u8>> + 'r;

/// Finds a chunk this side holds (the base a [`crate::protocol::Codec::Ref`] names).
pub(crate) type Locator<'r> = dyn Fn(&ChunkId) -> Option<crate::index::Location> + 'r;

/// Turn a payload into the chunk's `len` bytes; patches are applied to `base`, read through
/// `read`; references are found with `locate`.
fn decode(
    codec: crate::protocol::Codec,
    bytes: Vec<u8>,
    len: usize,
    base: Option<(u32, u64)>,
    locate: &Locator<'_>,
    read: &BaseReader<'_>,
) -> Result<Vec<u8>> {
    use crate::protocol::Codec;
    match codec {
        Codec::Raw | Codec::Zstd => crate::sender::decode_payload(codec, bytes, len),
        Codec::Patch | Codec::PatchZstd => {
            let Some((file, offset)) = base else {
                return Err(Error::Protocol("a patch for a chunk without a base".into()));
            };
            let patch = if codec == Codec::PatchZstd {
                let cap = len + len.div_ceil(crate::delta::BLOCK * 8);
                crate::zstd_ctx::decompress(&bytes, cap)
                    .map_err(|e| Error::Compression(format!("patch does not decompress: {e}")))?
            } else {
                bytes
            };
            let base = read(file, offset, len)?;
            crate::delta::apply(&base, &patch, len)
        }
        Codec::Ref => {
            let (id, z) = crate::delta::split_ref(&bytes)?;
            let Some(loc) = locate(&id) else {
                // The sender thought we held this chunk; we do not. Fetched again, whole.
                return Err(Error::Integrity {
                    what: "a chunk sent as a difference to a chunk this side does not hold".into(),
                    expected: id.to_hex(),
                    actual: "missing".into(),
                });
            };
            let base = read(loc.file, loc.offset, loc.len as usize)?;
            crate::delta::apply_ref(&base, z, len)
        }
    }
}

/// Decode fetched chunk `n` (`spec`) of `dest` and check it against its id.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_fetched(
    codec: crate::protocol::Codec,
    payload: Vec<u8>,
    spec: &ChunkSpec,
    base: Option<(u32, u64)>,
    locate: &Locator<'_>,
    read: &BaseReader<'_>,
    dest: &Path,
    n: u32,
) -> Result<Vec<u8>> {
    let bytes = decode(codec, payload, spec.len as usize, base, locate, read)?;
    let actual = ChunkId::of(&bytes);
    if bytes.len() != spec.len as usize || actual != spec.id {
        return Err(Error::Integrity {
            what: format!("chunk {n} of {}", dest.display()),
            expected: spec.id.to_hex(),
            actual: actual.to_hex(),
        });
    }
    Ok(bytes)
}

/// Checks a file's output chunk by chunk against the manifest, so that every byte is hashed
/// exactly once: bytes copied from local files are hashed here, fetched chunks were checked on
/// arrival, zero chunks are checked against the id of that many zeros. Each call is given the
/// file's chunk list as known so far (a list that arrives in parts grows between calls).
struct Verifier<'a> {
    dest: &'a Path,
    /// The chunk being filled.
    k: usize,
    filled: u32,
    h: blake3::Hasher,
    zero_ids: HashMap<u32, ChunkId>,
}

impl<'a> Verifier<'a> {
    fn new(dest: &'a Path) -> Self {
        Verifier {
            dest,
            k: 0,
            filled: 0,
            h: blake3::Hasher::new(),
            zero_ids: HashMap::new(),
        }
    }

    fn mismatch(&self, chunks: &[ChunkSpec], k: usize, actual: ChunkId) -> Error {
        Error::Integrity {
            what: format!("chunk {k} of {}", self.dest.display()),
            expected: chunks[k].id.to_hex(),
            actual: actual.to_hex(),
        }
    }

    fn spec<'c>(&self, chunks: &'c [ChunkSpec]) -> Result<&'c ChunkSpec> {
        chunks.get(self.k).ok_or_else(|| {
            Error::Protocol(format!("more data than chunks for {}", self.dest.display()))
        })
    }

    /// Bytes copied from a local file, to be hashed.
    fn feed(&mut self, chunks: &[ChunkSpec], mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let len = self.spec(chunks)?.len;
            let take = ((len - self.filled) as usize).min(data.len());
            self.h.update(&data[..take]);
            self.filled += take as u32;
            data = &data[take..];
            if self.filled == len {
                let actual = ChunkId::from(self.h.finalize());
                if actual != chunks[self.k].id {
                    return Err(self.mismatch(chunks, self.k, actual));
                }
                self.h.reset();
                self.filled = 0;
                self.k += 1;
            }
        }
        Ok(())
    }

    /// `len` bytes copied from a file unchanged since it was indexed: whole chunks, known to
    /// match their ids.
    fn indexed(&mut self, chunks: &[ChunkSpec], mut len: u64) -> Result<()> {
        while len > 0 {
            let spec = *self.spec(chunks)?;
            if self.filled != 0 || spec.len as u64 > len {
                return Err(Error::Protocol(format!(
                    "local run does not match the chunks of {}",
                    self.dest.display()
                )));
            }
            len -= spec.len as u64;
            self.k += 1;
        }
        Ok(())
    }

    /// Chunk `n`, whose bytes were already checked against its id.
    fn checked(&mut self, n: u32) -> Result<()> {
        if self.filled != 0 || self.k != n as usize {
            return Err(Error::Protocol(format!(
                "chunk {n} of {} out of order",
                self.dest.display()
            )));
        }
        self.k += 1;
        Ok(())
    }

    /// The next chunk, filled with the bytes of chunk `n` (checked when they arrived): right
    /// when both have the same id.
    fn repeat_of(&mut self, chunks: &[ChunkSpec], n: u32) -> Result<()> {
        let spec = *self.spec(chunks)?;
        let src = chunks.get(n as usize).map(|c| c.id);
        if self.filled != 0 || n as usize >= self.k || src != Some(spec.id) {
            return Err(Error::Protocol(format!(
                "repeat of chunk {n} does not fit chunk {} of {}",
                self.k,
                self.dest.display()
            )));
        }
        self.k += 1;
        Ok(())
    }

    /// `len` bytes of zero chunks.
    fn zeros(&mut self, chunks: &[ChunkSpec], mut len: u64) -> Result<()> {
        while len > 0 {
            let spec = *self.spec(chunks)?;
            if self.filled != 0 || !spec.zero || spec.len as u64 > len {
                return Err(Error::Protocol(format!(
                    "zero run does not match the chunks of {}",
                    self.dest.display()
                )));
            }
            let id = *self.zero_ids.entry(spec.len).or_insert_with(|| {
                let mut h = blake3::Hasher::new();
                h.update(&ZEROS[..(spec.len as usize).min(ZEROS.len())]);
                let mut left = (spec.len as usize).saturating_sub(ZEROS.len());
                while left > 0 {
                    let n = left.min(ZEROS.len());
                    h.update(&ZEROS[..n]);
                    left -= n;
                }
                h.finalize().into()
            });
            if id != spec.id {
                return Err(self.mismatch(chunks, self.k, id));
            }
            len -= spec.len as u64;
            self.k += 1;
        }
        Ok(())
    }

    /// All chunks were produced.
    fn finish(&self, chunks: &[ChunkSpec]) -> Result<()> {
        if self.k != chunks.len() || self.filled != 0 {
            return Err(Error::Protocol(format!(
                "{} ended after {} of {} chunks",
                self.dest.display(),
                self.k,
                chunks.len()
            )));
        }
        Ok(())
    }
}

/// The chunk list of `dest` must add up to its file hash.
pub(crate) fn check_listed(
    dest: &Path,
    size: u64,
    hash: &ChunkId,
    chunks: &[ChunkSpec],
) -> Result<()> {
    let listed = crate::chunk::file_hash(size, chunks);
    if listed != *hash {
        return Err(Error::Integrity {
            what: format!("chunk list of {}", dest.display()),
            expected: hash.to_hex(),
            actual: listed.to_hex(),
        });
    }
    Ok(())
}

/// Write the file described by `chunks`/`plan` into a new temporary file next to `dest`, taking
/// fetched chunks from `next`, which yields them in the order of `plan.fetch`. Every fetched
/// chunk is checked against its id, and the whole result against `hash`. Returns the staged
/// file, ready to be committed into place.
#[allow(clippy::too_many_arguments)]
pub fn assemble(
    dest: &Path,
    size: u64,
    hash: &ChunkId,
    chunks: &[ChunkSpec],
    plan: &FilePlan,
    files: &FileTable<'_>,
    next: &mut dyn FnMut() -> Result<Fetched>,
    opts: AssembleOptions,
) -> Result<Staged> {
    check_listed(dest, size, hash, chunks)?;
    let staged = Staged::create(dest)?;
    let mut b = Builder::new(dest, &staged, opts);
    b.part(chunks, plan, files, next)?;
    b.finish(chunks, size)?;
    Ok(staged)
}

/// Writes a new file into a staged file, one plan after another: the whole file at once
/// ([`assemble`]), or a file whose chunk list arrives in parts, each part planned by
/// [`crate::plan::PartPlanner`] and written as it comes.
pub struct Builder<'f> {
    dest: &'f Path,
    staged: &'f Staged,
    tmp_path: PathBuf,
    w: SparseWriter<'f>,
    verify: Verifier<'f>,
    /// Where each chunk of the list so far starts, and where the list so far ends.
    starts: Vec<u64>,
    listed: u64,
    opts: AssembleOptions,
}

impl<'f> Builder<'f> {
    /// A builder writing into `staged`, the file that will become `dest`.
    pub fn new(dest: &'f Path, staged: &'f Staged, opts: AssembleOptions) -> Self {
        Builder {
            dest,
            staged,
            tmp_path: staged.display_path(),
            w: SparseWriter::new(&staged.file, dest, opts.sparse),
            verify: Verifier::new(dest),
            starts: Vec::new(),
            listed: 0,
            opts,
        }
    }

    /// Write the pieces of `plan`, the next chunks of the file; `chunks` is the file's chunk
    /// list as far as it is known (at least up to the end of this plan). Fetched chunks come
    /// from `next` in the order of `plan.fetch`, each checked against its id. A repeat of a
    /// chunk written by an earlier plan is read back from the staged file.
    pub fn part(
        &mut self,
        chunks: &[ChunkSpec],
        plan: &FilePlan,
        files: &FileTable<'_>,
        next: &mut dyn FnMut() -> Result<Fetched>,
    ) -> Result<()> {
        let dest = self.dest;
        for c in chunks.iter().skip(self.starts.len()) {
            self.starts.push(self.listed);
            self.listed += c.len as u64;
        }
        let mut fetched = 0usize;
        let mut open: HashMap<u32, Arc<File>> = HashMap::new();
        let mut kept: HashMap<u32, Vec<u8>> = HashMap::new();
        let mut buf = Vec::new();
        let w = &mut self.w;
        let verify = &mut self.verify;
        for piece in &plan.pieces {
            match *piece {
                Piece::Zero(len) => {
                    verify.zeros(chunks, len)?;
                    w.zeros(len)?;
                }
                Piece::Local {
                    file: n,
                    offset,
                    len,
                } => {
                    let f = match open.get(&n) {
                        Some(f) => f.clone(),
                        None => {
                            let f = files.open(n)?;
                            open.insert(n, f.clone());
                            f
                        }
                    };
                    // A run from a file unchanged since it was indexed is what the index says
                    // it is: copied without hashing it again, and the file checked again
                    // afterwards.
                    let trusted = files.unchanged(n, &f);
                    let mut left = len;
                    let mut off = offset;
                    while left > 0 {
                        let step = left.min(WRITE_BUF as u64) as usize;
                        buf.resize(step, 0);
                        let src = &files.index.files[n as usize].path;
                        f.read_exact_at(&mut buf, off).map_err(|e| {
                            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                                Error::SourceChanged { path: src.clone() }
                            } else {
                                Error::Io {
                                    op: "read",
                                    path: src.clone(),
                                    source: e,
                                }
                            }
                        })?;
                        if !trusted {
                            verify.feed(chunks, &buf)?;
                        }
                        w.write(&buf)?;
                        left -= step as u64;
                        off += step as u64;
                    }
                    if trusted {
                        if !files.unchanged(n, &f) {
                            return Err(Error::Integrity {
                                what: format!(
                                    "{} (changed while it was read)",
                                    files.index.files[n as usize].path.display()
                                ),
                                expected: "its indexed content".into(),
                                actual: "a change".into(),
                            });
                        }
                        verify.indexed(chunks, len)?;
                    }
                }
                Piece::Fetch(n) => {
                    let (got, codec, payload) = next()?;
                    if got != n {
                        return Err(Error::Protocol(format!(
                            "expected chunk {n} of {}, got chunk {got}",
                            dest.display()
                        )));
                    }
                    let spec = chunks
                        .get(n as usize)
                        .ok_or_else(|| Error::Protocol(format!("chunk {n} out of range")))?;
                    let base = plan.bases.get(fetched).copied().flatten();
                    fetched += 1;
                    let read = |f, o, l| read_base(files, f, o, l);
                    let locate = |id: &ChunkId| files.index.get(id);
                    let bytes =
                        decode_fetched(codec, payload, spec, base, &locate, &read, dest, n)?;
                    verify.checked(n)?;
                    w.write(&bytes)?;
                    if plan.keep.binary_search(&n).is_ok() {
                        kept.insert(n, bytes);
                    }
                }
                Piece::Repeat(n) => {
                    verify.repeat_of(chunks, n)?;
                    match kept.get(&n) {
                        Some(bytes) => w.write(bytes)?,
                        None => {
                            // Written by an earlier part (and checked then): read it back.
                            let len = chunks[n as usize].len as usize;
                            let bytes = w.read_back(self.starts[n as usize], len)?;
                            w.write(&bytes)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// All chunks are written: check that they are all of `chunks` and `size` bytes, and fsync
    /// if asked. The staged file is then ready to be committed.
    pub fn finish(self, chunks: &[ChunkSpec], size: u64) -> Result<()> {
        let written = self.w.finish()?;
        self.verify.finish(chunks)?;
        if written != size {
            return Err(Error::Integrity {
                what: self.dest.display().to_string(),
                expected: format!("{size} bytes"),
                actual: format!("{written} bytes"),
            });
        }
        if self.opts.fsync {
            self.staged.file.sync_all().ctx("fsync", &self.tmp_path)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{chunk_bytes, tests_support::noise, ChunkParams};
    use crate::plan::plan_file;

    fn build(old: &[u8], new: &[u8], sparse: bool) -> (tempfile::TempDir, Vec<u8>, u64) {
        let d = tempfile::tempdir().unwrap();
        let p = ChunkParams::default();
        let oldp = d.path().join("old");
        std::fs::write(&oldp, old).unwrap();
        let mut idx = ChunkIndex::default();
        idx.add(oldp.clone(), chunk_bytes(old, p));
        let fc = chunk_bytes(new, p);
        let plan = plan_file(&fc.chunks, &idx);
        let offs = crate::manifest::chunk_offsets(&fc.chunks);
        let mut fetch = plan.fetch.clone().into_iter();
        let mut next = || {
            let n = fetch.next().unwrap();
            let o = offs[n as usize] as usize;
            Ok((
                n,
                crate::protocol::Codec::Raw,
                new[o..o + fc.chunks[n as usize].len as usize].to_vec(),
            ))
        };
        let table = FileTable::new(&idx);
        let dest = d.path().join("new");
        let tmp = assemble(
            &dest,
            fc.size,
            &fc.hash,
            &fc.chunks,
            &plan,
            &table,
            &mut next,
            AssembleOptions {
                sparse,
                fsync: false,
            },
        )
        .unwrap();
        tmp.commit(&dest, &dest, &table).unwrap();
        let out = std::fs::read(&dest).unwrap();
        (d, out, plan.literal)
    }

    #[test]
    fn rebuilds_edited_file_byte_identical() {
        let old = noise(1, 2 << 20);
        let mut new = old.clone();
        new[500_000..504_096].copy_from_slice(&noise(2, 4096));
        new.splice(1_500_000..1_500_000, noise(3, 777));
        let (_d, out, literal) = build(&old, &new, true);
        assert_eq!(out, new);
        assert!(literal < 200_000, "literal {literal}");
    }

    #[test]
    fn zero_runs_become_holes() {
        use std::os::unix::fs::MetadataExt;
        let mut new = noise(4, 8192);
        new.extend(vec![0u8; 4 << 20]);
        new.extend(noise(5, 8192));
        let (d, out, _) = build(&[], &new, true);
        assert_eq!(out, new);
        let md = std::fs::metadata(d.path().join("new")).unwrap();
        assert!(
            md.blocks() * 512 < 1 << 20,
            "file not sparse: {} blocks",
            md.blocks()
        );
    }

    #[test]
    fn the_writer_writes_any_cut_of_the_data_as_it_is_with_its_zero_blocks_as_holes() {
        use std::os::unix::fs::MetadataExt;
        // Noise, a zero run of 1 MiB that starts and ends off a block boundary, noise, more
        // than WRITE_BUF of noise in one piece, and a zero tail.
        let mut data = noise(7, 10_000);
        data.extend(vec![0u8; 1 << 20]);
        data.extend(noise(8, 3 * WRITE_BUF + 123));
        data.extend(vec![0u8; 50_000]);
        let d = tempfile::tempdir().unwrap();
        for sparse in [true, false] {
            for cuts in [
                vec![data.len()],
                vec![1, 4095, 4097, 700_000, WRITE_BUF, 1],
                vec![9_999, 2, 1 << 20, 5, WRITE_BUF * 2, 77],
            ] {
                let path = d.path().join("f");
                let file = File::create(&path).unwrap();
                let mut w = SparseWriter::new(&file, &path, sparse);
                let mut at = 0;
                for len in cuts.iter().copied().chain(std::iter::once(usize::MAX)) {
                    let end = at + len.min(data.len() - at);
                    w.write(&data[at..end]).unwrap();
                    at = end;
                }
                assert_eq!(w.finish().unwrap(), data.len() as u64);
                assert_eq!(std::fs::read(&path).unwrap(), data, "cuts {cuts:?}");
                let on_disk = std::fs::metadata(&path).unwrap().blocks() * 512;
                if sparse {
                    assert!(on_disk < data.len() as u64 - (900 << 10), "{on_disk} bytes");
                } else {
                    assert!(on_disk >= data.len() as u64 - 4096, "{on_disk} bytes");
                }
            }
        }
    }

    #[test]
    fn corrupt_fetched_chunk_is_refused_and_nothing_replaced() {
        let d = tempfile::tempdir().unwrap();
        let new = noise(6, 100_000);
        let fc = chunk_bytes(&new, ChunkParams::default());
        let idx = ChunkIndex::default();
        let plan = plan_file(&fc.chunks, &idx);
        let dest = d.path().join("f");
        std::fs::write(&dest, b"old content").unwrap();
        let table = FileTable::new(&idx);
        let mut next = || {
            Ok((
                0u32,
                crate::protocol::Codec::Raw,
                vec![0xAA; fc.chunks[0].len as usize],
            ))
        };
        let r = assemble(
            &dest,
            fc.size,
            &fc.hash,
            &fc.chunks,
            &plan,
            &table,
            &mut next,
            AssembleOptions {
                sparse: true,
                fsync: false,
            },
        );
        assert!(matches!(r, Err(Error::Integrity { .. })), "{r:?}");
        assert_eq!(std::fs::read(&dest).unwrap(), b"old content");
        // The temporary file was removed.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
    }
}
