//! Content-defined chunking (FastCDC 2020) and BLAKE3 chunk ids.
//!
//! Cut points depend only on content, so an insertion shifts the data after it without changing
//! the chunks there. Files larger than two segments are cut in parallel: every segment is chunked
//! on its own, then the sequential chunking is continued from each boundary until it lands on one
//! of the next segment's cut points, after which the two agree by construction (a FastCDC cut
//! depends only on the bytes from the previous cut to the byte after it, all inside a segment
//! for every cut but a segment's last, which is dropped). The result is identical to chunking
//! the whole file on one core, which a property test checks.

use crate::error::{Error, IoContext, Result};
use crate::id::{is_zero, ChunkId};
use crate::manifest::ChunkSpec;
use fastcdc::v2020::FastCDC;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Chunk size bounds for FastCDC.
///
/// Smaller chunks find more of what the receiver already has when changes are scattered (a 4 KiB
/// page rewritten here and there costs one chunk each), at the price of more ids in the manifest
/// and index (40 bytes per chunk) and slower chunking. See `benchmarks/README.md` for the sweep
/// behind the defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkParams {
    /// No cut before this many bytes (FastCDC skips them without hashing). 64 B ..= 1 MiB.
    pub min: u32,
    /// Target average. 256 B ..= 4 MiB.
    pub avg: u32,
    /// Forced cut at this many bytes. 1 KiB ..= 16 MiB.
    pub max: u32,
    /// CRIU memory images (`pages-*.img`) are cut on every 4 KiB page instead (see
    /// [`is_page_image`]).
    pub pages: bool,
}

impl Default for ChunkParams {
    /// min 4 KiB, avg 4 KiB, max 32 KiB. Measured on the generated tree with 1 % of its 4 KiB
    /// pages rewritten plus insertions (256 MiB, same run): literal bytes 3.3 % of the tree, vs
    /// 4.6 % at 4K/8K/64K, 7.7 % at 8K/16K/128K and 22 % at 16K/64K/256K; 2K/4K/32K sends 2.9 %
    /// but chunks about 40 % slower. With min = avg FastCDC skips the first 4 KiB of every chunk
    /// unhashed, which keeps chunking fast while a dirty page costs one small chunk.
    fn default() -> Self {
        ChunkParams {
            min: 4 * 1024,
            avg: 4 * 1024,
            max: 32 * 1024,
            pages: true,
        }
    }
}

impl ChunkParams {
    /// Validated parameters.
    pub fn new(min: u32, avg: u32, max: u32) -> Result<Self> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let bad = |s: String| Err(Error::ChunkParams(s));
        if !(MINIMUM_MIN..=MINIMUM_MAX).contains(&min) {
            return bad(format!("min {min} not in {MINIMUM_MIN}..={MINIMUM_MAX}"));
        }
        if !(AVERAGE_MIN..=AVERAGE_MAX).contains(&avg) {
            return bad(format!("avg {avg} not in {AVERAGE_MIN}..={AVERAGE_MAX}"));
        }
        if !(MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max) {
            return bad(format!("max {max} not in {MAXIMUM_MIN}..={MAXIMUM_MAX}"));
        }
        if !(min <= avg && avg <= max) {
            return bad(format!("need min <= avg <= max, got {min}/{avg}/{max}"));
        }
        Ok(ChunkParams {
            min,
            avg,
            max,
            pages: true,
        })
    }

    /// The same, with page-image chunking on or off.
    pub fn with_pages(self, pages: bool) -> Self {
        ChunkParams { pages, ..self }
    }

    /// The longest chunk these parameters can produce.
    pub fn max_len(&self) -> u32 {
        if self.pages {
            self.max.max(PAGE as u32)
        } else {
            self.max
        }
    }

    /// Derive min = avg/2 and max = avg*8 from an average, the shape used by `--chunk-size`.
    pub fn from_avg(avg: u32) -> Result<Self> {
        ChunkParams::new((avg / 2).max(64), avg, avg.saturating_mul(8).max(1024))
    }
}

/// Segment size for parallel chunking of one large buffer.
const SEGMENT: usize = 16 << 20;

/// Chunk lengths of `data`, cut on one core.
fn cut_sequential(data: &[u8], p: ChunkParams) -> Vec<u32> {
    if data.is_empty() {
        return Vec::new();
    }
    FastCDC::new(data, p.min, p.avg, p.max)
        .map(|c| c.length as u32)
        .collect()
}

/// Chunk lengths of `data`; identical to cutting them one after the other, computed in
/// parallel for large data.
pub fn cut_points(data: &[u8], p: ChunkParams) -> Vec<u32> {
    if data.len() < 2 * SEGMENT {
        return cut_sequential(data, p);
    }
    let starts: Vec<usize> = (0..data.len()).step_by(SEGMENT).collect();
    // End offsets (absolute) of the chunks each segment finds on its own, last one excluded unless
    // it is the end of the data (a cut at a segment's end may only be the slice ending).
    let seg_cuts: Vec<Vec<usize>> = starts
        .par_iter()
        .map(|&s| {
            let e = (s + SEGMENT).min(data.len());
            let mut ends: Vec<usize> = FastCDC::new(&data[s..e], p.min, p.avg, p.max)
                .map(|c| s + c.offset + c.length)
                .collect();
            if e != data.len() {
                ends.pop();
            }
            ends
        })
        .collect();

    let mut ends: Vec<usize> = seg_cuts[0].clone();
    let mut pos = ends.last().copied().unwrap_or(0);
    for seg in seg_cuts.iter().skip(1) {
        // Continue sequentially from `pos` until a cut coincides with one of this segment's cuts.
        let mut joined = false;
        while pos < data.len() {
            if let Ok(i) = seg.binary_search(&pos) {
                ends.extend_from_slice(&seg[i + 1..]);
                pos = ends.last().copied().unwrap_or(pos);
                joined = true;
                break;
            }
            if seg.last().is_none_or(|&last| pos >= last) {
                break; // this segment is passed without meeting it: carry on into the next
            }
            let len = FastCDC::new(&data[pos..], p.min, p.avg, p.max)
                .next()
                .map_or(data.len() - pos, |c| c.length);
            pos += len;
            ends.push(pos);
        }
        let _ = joined;
    }
    // Finish whatever is left after the last segment's cuts (only when no segment joined the end).
    while pos < data.len() {
        let len = FastCDC::new(&data[pos..], p.min, p.avg, p.max)
            .next()
            .map_or(data.len() - pos, |c| c.length);
        pos += len;
        ends.push(pos);
    }
    let mut prev = 0usize;
    ends.into_iter()
        .map(|e| {
            let l = (e - prev) as u32;
            prev = e;
            l
        })
        .collect()
}

/// The chunks of one file or buffer, and the hash of its whole content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChunks {
    /// Total length.
    pub size: u64,
    /// The file hash: [`file_hash`] of the chunk list.
    pub hash: ChunkId,
    /// The chunks in order.
    pub chunks: Vec<ChunkSpec>,
}

/// The hash of a whole file: BLAKE3 (in its key-derivation mode, so it can never equal a chunk
/// id) over the size and every chunk's length and id. The chunk ids are BLAKE3 hashes of the
/// chunks, so this commits to the whole content exactly like a hash of the bytes would, while
/// costing nothing beyond the chunk hashes: a receiver that checks every chunk against its id
/// and the chunk list against this hash has checked every byte once.
pub fn file_hash(size: u64, chunks: &[ChunkSpec]) -> ChunkId {
    let mut h = blake3::Hasher::new_derive_key("hop 2026 file hash v1");
    h.update(&size.to_le_bytes());
    // The same bytes as one update per field, fed in 64 KiB pieces: BLAKE3 hashes a long
    // input several 1 KiB chunks at a time (SIMD), but tiny updates one block at a time (a
    // 170,000-chunk list took 90 ms that way, 2 ms this way).
    const PIECE: usize = 64 << 10;
    let mut buf = Vec::with_capacity(PIECE + 32);
    for c in chunks {
        buf.extend_from_slice(&c.len.to_le_bytes());
        buf.extend_from_slice(&c.id.0);
        if buf.len() >= PIECE {
            h.update(&buf);
            buf.clear();
        }
    }
    h.update(&buf);
    h.finalize().into()
}

/// Cut `data` into chunks and hash each chunk.
///
/// Below two segments this is one pass: each chunk is cut, hashed and checked for zeros while
/// it is still in cache. Larger buffers are cut in parallel and hashed on all cores.
pub fn chunk_bytes(data: &[u8], p: ChunkParams) -> FileChunks {
    file_chunks(data, chunk_specs(data, p))
}

/// The chunk specs of [`chunk_bytes`], without the file hash.
fn chunk_specs(data: &[u8], p: ChunkParams) -> Vec<ChunkSpec> {
    if data.is_empty() {
        Vec::new()
    } else if data.len() < 2 * SEGMENT {
        FastCDC::new(data, p.min, p.avg, p.max)
            .map(|c| {
                let bytes = &data[c.offset..c.offset + c.length];
                ChunkSpec {
                    len: c.length as u32,
                    id: ChunkId::of(bytes),
                    zero: is_zero(bytes),
                }
            })
            .collect()
    } else {
        let lens = cut_points(data, p);
        let mut offs = Vec::with_capacity(lens.len());
        let mut o = 0usize;
        for &l in &lens {
            offs.push(o);
            o += l as usize;
        }
        offs.par_iter()
            .zip(lens.par_iter())
            .map(|(&off, &len)| {
                let c = &data[off..off + len as usize];
                ChunkSpec {
                    len,
                    id: ChunkId::of(c),
                    zero: is_zero(c),
                }
            })
            .collect()
    }
}

/// Size of a memory page in CRIU images.
pub const PAGE: usize = 4096;

/// Whether `path` is a CRIU memory image: `pages-N.img`. Its content is a sequence of 4 KiB
/// pages in virtual-address order; dirty pages are rewritten in place between dumps and whole
/// pages come and go, so it is cut on every page: one dirty page costs one page-sized chunk (and
/// usually only a patch of it, see [`crate::delta`]), and pages that moved are still found by
/// their content. Both sides decide by the name alone, so they always agree. (A file that only
/// looks like one and gets insertions of a size that is not a page multiple loses its matches
/// after them: `--no-page-chunks`.)
pub fn is_page_image(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("pages-"))
        .and_then(|n| n.strip_suffix(".img"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Cut `data` on every page (the last chunk may be shorter), hashing pages on all cores.
pub fn chunk_pages(data: &[u8]) -> FileChunks {
    let chunks: Vec<ChunkSpec> = data.par_chunks(PAGE).map(spec_of).collect();
    file_chunks(data, chunks)
}

/// The chunk spec of `c`, hashed.
pub(crate) fn spec_of(c: &[u8]) -> ChunkSpec {
    ChunkSpec {
        len: c.len() as u32,
        id: ChunkId::of(c),
        zero: is_zero(c),
    }
}

/// `data` cut into `chunks`, with its file hash.
pub(crate) fn file_chunks(data: &[u8], chunks: Vec<ChunkSpec>) -> FileChunks {
    FileChunks {
        size: data.len() as u64,
        hash: file_hash(data.len() as u64, &chunks),
        chunks,
    }
}

/// Like [`chunk_pages`], but a page byte-identical to the page at the same offset of `base`
/// (whose page chunks are `base_chunks`) takes that page's id instead of being hashed: comparing
/// costs a fraction of hashing, and successive memory dumps are mostly unchanged pages. Falls
/// back to [`chunk_pages`] when `base_chunks` are not page chunks of `base`.
pub fn chunk_pages_like(data: &[u8], base: &[u8], base_chunks: &[ChunkSpec]) -> FileChunks {
    let n = base_chunks.len();
    let paged = base_chunks
        .iter()
        .enumerate()
        .all(|(i, c)| c.len as usize == PAGE || (i + 1 == n && (c.len as usize) < PAGE))
        && base_chunks.iter().map(|c| c.len as usize).sum::<usize>() == base.len();
    if !paged {
        return chunk_pages(data);
    }
    let chunks: Vec<ChunkSpec> = data
        .par_chunks(PAGE)
        .enumerate()
        .map(|(i, c)| {
            let off = i * PAGE;
            if let Some(b) = base_chunks.get(i) {
                if b.len as usize == c.len() && base.get(off..off + c.len()) == Some(c) {
                    return *b;
                }
            }
            spec_of(c)
        })
        .collect();
    file_chunks(data, chunks)
}

/// Chunks a memory image (`pages-N.img`) page by page while another process is still writing
/// it, so that its chunk list is ready when the writer ends: a migration overlaps this with
/// CRIU's dump instead of adding it to the downtime. CRIU appends pages to the image at the
/// file position (`splice` with no offset), never going back, so a page once read stays as
/// read; [`PageFollower::finish`] checks that the file did not change after the writer ended.
/// Pages equal to the page at the same offset of the previous version (`base`) take its id, as
/// in [`chunk_pages_like`]; the others are hashed. One thread: the writer keeps the other cores.
pub struct PageFollower {
    path: std::path::PathBuf,
    base: Option<(memmap2::Mmap, Vec<ChunkSpec>)>,
    file: Option<File>,
    pos: u64,
    chunks: Vec<ChunkSpec>,
    buf: Vec<u8>,
}

/// Bytes a follower reads at once.
const FOLLOW_READ: usize = 4 << 20;

impl PageFollower {
    /// Follow `path` (which may not exist yet), against `base` (the previous version and its
    /// page chunks) when given.
    pub fn new(path: &Path, base: Option<(&Path, &[ChunkSpec])>) -> PageFollower {
        let base = base.and_then(|(b, chunks)| {
            let f = File::open(b).ok()?;
            // SAFETY: read-only private map of the previous round's image, which nothing writes
            // any more; a page is only ever compared through it, never trusted unread.
            let map = unsafe { memmap2::MmapOptions::new().map(&f) }.ok()?;
            let paged = chunks.iter().all(|c| c.len as usize <= PAGE)
                && chunks.iter().map(|c| c.len as usize).sum::<usize>() == map.len();
            paged.then(|| (map, chunks.to_vec()))
        });
        PageFollower {
            path: path.to_path_buf(),
            base,
            file: None,
            pos: 0,
            chunks: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Chunk the whole pages written so far; returns how many bytes that took in.
    pub fn advance(&mut self) -> Result<u64> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(e).ctx("open", &self.path),
            }
        }
        let size = match &self.file {
            Some(f) => f.metadata().ctx("stat", &self.path)?.len(),
            None => return Ok(0),
        };
        let whole = size - size % PAGE as u64;
        self.take(whole)
    }

    /// Chunk `[pos, end)`, `end` on a page boundary or at the end of the file.
    fn take(&mut self, end: u64) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        let Some(f) = &self.file else { return Ok(0) };
        let start = self.pos;
        while self.pos < end {
            let n = ((end - self.pos) as usize).min(FOLLOW_READ);
            self.buf.resize(n, 0);
            f.read_exact_at(&mut self.buf, self.pos)
                .ctx("read", &self.path)?;
            for (k, page) in self.buf.chunks(PAGE).enumerate() {
                let off = self.pos as usize + k * PAGE;
                let i = off / PAGE;
                let same = self.base.as_ref().and_then(|(map, bc)| {
                    let b = bc.get(i)?;
                    (b.len as usize == page.len() && map.get(off..off + page.len()) == Some(page))
                        .then_some(*b)
                });
                self.chunks.push(same.unwrap_or_else(|| spec_of(page)));
            }
            self.pos += n as u64;
        }
        Ok(self.pos - start)
    }

    /// The writer has ended: chunk the rest and return the chunk list and the metadata it
    /// describes (for a cache). Fails if the file changed while it was being finished, or was
    /// never there.
    pub fn finish(mut self) -> Result<(FileChunks, std::fs::Metadata)> {
        self.advance()?;
        let Some(f) = &self.file else {
            return Err(Error::SourceChanged { path: self.path });
        };
        let md = f.metadata().ctx("stat", &self.path)?;
        let size = md.len();
        if size < self.pos {
            return Err(Error::SourceChanged { path: self.path });
        }
        self.take(size)?;
        let after = std::fs::symlink_metadata(&self.path).ctx("stat", &self.path)?;
        use std::os::unix::fs::MetadataExt;
        if (after.len(), after.mtime_nsec(), after.mtime(), after.ino())
            != (md.len(), md.mtime_nsec(), md.mtime(), md.ino())
        {
            return Err(Error::SourceChanged { path: self.path });
        }
        let chunks = std::mem::take(&mut self.chunks);
        Ok((
            FileChunks {
                size,
                hash: file_hash(size, &chunks),
                chunks,
            },
            md,
        ))
    }
}

/// Files up to this size are read into memory; larger ones are memory-mapped.
pub(crate) const MMAP_MIN: u64 = 256 * 1024;

/// Chunk a file on disk (memory-mapped when large). Fails with [`Error::SourceChanged`] when the
/// file's size changes while it is read.
pub fn chunk_file(path: &Path, p: ChunkParams) -> Result<FileChunks> {
    let paged = p.pages && is_page_image(path);
    map_file(path, &|data: &[u8]| {
        if paged {
            chunk_pages(data)
        } else {
            chunk_bytes(data, p)
        }
    })
}

/// [`chunk_file`] for a memory image with a previous version at `base` whose page chunks are
/// `base_chunks` (see [`chunk_pages_like`]). Other files, or an unreadable base, are chunked as
/// [`chunk_file`] does.
pub fn chunk_file_like(
    path: &Path,
    p: ChunkParams,
    base: &Path,
    base_chunks: &[ChunkSpec],
) -> Result<FileChunks> {
    if !(p.pages && is_page_image(path)) {
        return chunk_file(path, p);
    }
    let Ok(bf) = File::open(base) else {
        return chunk_file(path, p);
    };
    // SAFETY: read-only private map; a change of the base only costs hashing (ids are taken from
    // it only where its bytes equal the new page's, compared through this map).
    let Ok(bmap) = (unsafe { memmap2::MmapOptions::new().map(&bf) }) else {
        return chunk_file(path, p);
    };
    map_file(path, &|data: &[u8]| {
        chunk_pages_like(data, &bmap, base_chunks)
    })
}

/// Takes each piece of a file's chunk list as it is cut (see [`chunk_file_streamed`]).
pub type ListParts<'a> = &'a mut dyn FnMut(&[ChunkSpec]) -> Result<()>;

/// Bytes [`chunk_file_streamed`] cuts at once (on all cores) before handing their chunks on.
pub const STREAM_WINDOW: usize = 32 << 20;

/// [`chunk_file`], handing the chunk list to `part` piece by piece as it is cut (every
/// [`STREAM_WINDOW`] bytes), so that a sender can put the list on the wire while it still
/// reads the file: a 660 MB memory image has a 3 MB list, a quarter of a second at 100 Mbit/s.
/// The pieces add up to exactly the list [`chunk_file`] gives: a window's last chunk is cut by
/// the window's end, not by the content, so it is cut again as the start of the next window
/// (a FastCDC cut depends only on the bytes from the previous cut to the byte after it; see
/// [`crate::rechunk`]). Stops with `part`'s error.
pub fn chunk_file_streamed(
    path: &Path,
    p: ChunkParams,
    part: &mut dyn FnMut(&[ChunkSpec]) -> Result<()>,
) -> Result<FileChunks> {
    chunk_file_streamed_by(path, p, STREAM_WINDOW, part)
}

/// [`chunk_file_streamed`] with windows of `window` bytes (rounded to whole pages, and to at
/// least twice the largest chunk, so that every window keeps at least one chunk).
fn chunk_file_streamed_by(
    path: &Path,
    p: ChunkParams,
    window: usize,
    part: &mut dyn FnMut(&[ChunkSpec]) -> Result<()>,
) -> Result<FileChunks> {
    let paged = p.pages && is_page_image(path);
    let window = window.max(2 * p.max as usize + PAGE).next_multiple_of(PAGE);
    let f = File::open(path).ctx("open", path)?;
    let len = f.metadata().ctx("stat", path)?.len();
    if len < MMAP_MIN {
        drop(f);
        let fc = chunk_file(path, p)?;
        part(&fc.chunks)?;
        return Ok(fc);
    }
    // SAFETY: as in map_file: read-only, private, the size re-checked after.
    let map = unsafe { memmap2::MmapOptions::new().map(&f) }.ctx("mmap", path)?;
    #[cfg(unix)]
    let _ = map.advise(memmap2::Advice::Sequential);
    let data: &[u8] = &map;
    let mut chunks = Vec::new();
    let mut start = 0usize;
    while start < data.len() {
        let end = (start + window).min(data.len());
        let mut got = if paged {
            data[start..end].par_chunks(PAGE).map(spec_of).collect()
        } else {
            chunk_specs(&data[start..end], p)
        };
        if end < data.len() && !paged && got.len() > 1 {
            got.pop();
        }
        let used: usize = got.iter().map(|c| c.len as usize).sum();
        part(&got)?;
        chunks.extend(got);
        start += used;
    }
    if f.metadata().ctx("stat", path)?.len() != len {
        return Err(Error::SourceChanged { path: path.into() });
    }
    Ok(file_chunks(data, chunks))
}

/// Run `cut` over the content of `path` (read, or memory-mapped when large); fails with
/// [`Error::SourceChanged`] when the file's size changes meanwhile.
fn map_file(path: &Path, cut: &(dyn Fn(&[u8]) -> FileChunks + Sync)) -> Result<FileChunks> {
    with_file_bytes(path, |data| Ok(cut(data)))
}

/// Run `f` over the content of `path`: read into memory when small, memory-mapped (read
/// sequentially) when large. Fails with [`Error::SourceChanged`] when the file's size changes
/// meanwhile, and with `f`'s error.
pub(crate) fn with_file_bytes<T>(path: &Path, f: impl FnOnce(&[u8]) -> Result<T>) -> Result<T> {
    let mut file = File::open(path).ctx("open", path)?;
    let len = file.metadata().ctx("stat", path)?.len();
    if len < MMAP_MIN {
        let mut buf = Vec::with_capacity(len as usize);
        file.read_to_end(&mut buf).ctx("read", path)?;
        if buf.len() as u64 != len {
            return Err(Error::SourceChanged { path: path.into() });
        }
        return f(&buf);
    }
    // SAFETY: the map is read-only and private to this call. A concurrent truncation by another
    // process could fault; the size is re-checked below to report concurrent changes.
    let map = unsafe { memmap2::MmapOptions::new().map(&file) }.ctx("mmap", path)?;
    #[cfg(unix)]
    let _ = map.advise(memmap2::Advice::Sequential);
    let out = f(&map)?;
    if file.metadata().ctx("stat", path)?.len() != len {
        return Err(Error::SourceChanged { path: path.into() });
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// Deterministic pseudo-random bytes (SplitMix64).
    pub(crate) fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut s = seed;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            s = s.wrapping_add(0x9E3779B97F4A7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            out.extend_from_slice(&z.to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::noise;
    use super::*;
    use proptest::prelude::*;

    fn ids(fc: &FileChunks) -> Vec<ChunkId> {
        fc.chunks.iter().map(|c| c.id).collect()
    }

    /// A list handed on window by window is the list of the whole file, for content-defined
    /// chunks (windows end mid-chunk) and for memory images (cut on pages).
    #[test]
    fn streamed_chunking_gives_the_whole_file_list() {
        let dir = tempfile::tempdir().unwrap();
        for (name, len) in [("data.bin", (3 << 20) + 1234), ("pages-1.img", 3 << 20)] {
            let path = dir.path().join(name);
            std::fs::write(&path, noise(len as u64, len)).unwrap();
            let p = ChunkParams::default();
            let whole = chunk_file(&path, p).unwrap();
            let mut parts = Vec::new();
            let streamed = chunk_file_streamed_by(&path, p, 256 << 10, &mut |c| {
                parts.push(c.to_vec());
                Ok(())
            })
            .unwrap();
            assert!(parts.len() >= 10, "{name}: {} parts", parts.len());
            assert_eq!(parts.concat(), whole.chunks, "{name}");
            assert_eq!(streamed.chunks, whole.chunks, "{name}");
            assert_eq!(streamed.hash, whole.hash, "{name}");
        }
    }

    /// The file hash is the same byte stream however it is fed to BLAKE3: pinned against one
    /// update per field (how it was first computed, so every index cache stays valid) and
    /// against a fixed value.
    #[test]
    fn file_hash_is_pinned() {
        let chunks: Vec<ChunkSpec> = (0..10_000u32)
            .map(|i| ChunkSpec {
                len: 4096 + i % 7,
                id: ChunkId::of(&i.to_le_bytes()),
                zero: false,
            })
            .collect();
        let size: u64 = chunks.iter().map(|c| c.len as u64).sum();
        let mut h = blake3::Hasher::new_derive_key("hop 2026 file hash v1");
        h.update(&size.to_le_bytes());
        for c in &chunks {
            h.update(&c.len.to_le_bytes());
            h.update(&c.id.0);
        }
        let one_by_one: ChunkId = h.finalize().into();
        assert_eq!(file_hash(size, &chunks), one_by_one);
        assert_eq!(
            file_hash(0, &[]).to_hex(),
            "7c571f037b9cda343405ef203f5d686f"
        );
    }

    #[test]
    fn params_are_validated() {
        assert!(ChunkParams::new(4096, 8192, 65536).is_ok());
        assert!(ChunkParams::new(8192, 4096, 65536).is_err());
        assert!(ChunkParams::new(10, 8192, 65536).is_err());
        assert!(ChunkParams::new(4096, 8192, 1 << 30).is_err());
        assert!(ChunkParams::from_avg(65536).is_ok());
    }

    #[test]
    fn lengths_cover_the_data_and_respect_bounds() {
        let p = ChunkParams::default();
        let data = noise(1, 3 << 20);
        let fc = chunk_bytes(&data, p);
        assert_eq!(
            fc.chunks.iter().map(|c| c.len as u64).sum::<u64>(),
            data.len() as u64
        );
        let n = fc.chunks.len();
        for c in &fc.chunks[..n - 1] {
            assert!(c.len >= p.min && c.len <= p.max, "chunk of {}", c.len);
        }
        assert_eq!(fc.hash, file_hash(data.len() as u64, &fc.chunks));
    }

    #[test]
    fn pages_like_a_base_get_the_same_ids_as_pages_hashed_afresh() {
        let base = noise(11, 64 * PAGE + 100);
        let bc = chunk_pages(&base);
        let mut new = base.clone();
        new[5 * PAGE + 7] ^= 1;
        new[9 * PAGE..10 * PAGE].fill(0);
        new.extend_from_slice(&noise(12, 3 * PAGE));
        let like = chunk_pages_like(&new, &base, &bc.chunks);
        assert_eq!(like, chunk_pages(&new));
        // A shorter new file, and base chunks that are not pages: still right.
        let short = &base[..10 * PAGE + 1];
        assert_eq!(
            chunk_pages_like(short, &base, &bc.chunks),
            chunk_pages(short)
        );
        let cdc = chunk_bytes(&base, ChunkParams::default());
        assert_eq!(
            chunk_pages_like(&new, &base, &cdc.chunks),
            chunk_pages(&new)
        );
    }

    /// A follower that reads an image while a writer appends to it in uneven bursts ends with
    /// the same chunk list as chunking the finished file, with and without a base.
    #[test]
    fn a_follower_keeps_up_with_a_writer_and_ends_with_the_right_list() {
        use std::io::Write;
        let d = tempfile::tempdir().unwrap();
        let base = noise(21, 300 * PAGE);
        let bp = d.path().join("base.img");
        std::fs::write(&bp, &base).unwrap();
        let bc = chunk_pages(&base);
        let mut new = base.clone();
        for k in [0usize, 17, 150, 151, 299] {
            new[k * PAGE + 3] ^= 0x55;
        }
        new.extend_from_slice(&noise(22, 2 * PAGE + 123));
        for with_base in [true, false] {
            let path = d.path().join(format!("pages-{with_base}.img"));
            let mut f =
                PageFollower::new(&path, with_base.then_some((bp.as_path(), &bc.chunks[..])));
            assert_eq!(f.advance().unwrap(), 0, "nothing there yet");
            let data = new.clone();
            let p2 = path.clone();
            let writer = std::thread::spawn(move || {
                let mut out = std::fs::File::create(&p2).unwrap();
                // Bursts that end mid-page.
                for part in data.chunks(3 * PAGE + 1000) {
                    out.write_all(part).unwrap();
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            });
            let mut taken = 0;
            while !writer.is_finished() {
                taken += f.advance().unwrap();
            }
            writer.join().unwrap();
            assert!(taken > 0, "nothing was read while the writer wrote");
            let (fc, md) = f.finish().unwrap();
            assert_eq!(fc, chunk_pages(&new));
            assert_eq!(md.len(), new.len() as u64);
        }
        // An image that never appeared is an error, not an empty list.
        let never = PageFollower::new(&d.path().join("pages-9.img"), None);
        assert!(never.finish().is_err());
    }

    #[test]
    fn page_images_are_cut_on_every_page() {
        use std::path::Path;
        assert!(is_page_image(Path::new("/d/pages-1.img")));
        assert!(is_page_image(Path::new("pages-12.img")));
        for n in [
            "pages-.img",
            "pages-1.img.bak",
            "pagemap-1.img",
            "xpages-1.img",
            "pages-a.img",
        ] {
            assert!(!is_page_image(Path::new(n)), "{n}");
        }
        let d = tempfile::tempdir().unwrap();
        let mut data = noise(3, 10 * PAGE + 100);
        data[PAGE..2 * PAGE].fill(0);
        let p = d.path().join("pages-1.img");
        std::fs::write(&p, &data).unwrap();
        let fc = chunk_file(&p, ChunkParams::default()).unwrap();
        assert_eq!(fc.chunks.len(), 11);
        assert!(fc.chunks[..10].iter().all(|c| c.len as usize == PAGE));
        assert_eq!(fc.chunks[10].len, 100);
        assert!(fc.chunks[1].zero && !fc.chunks[0].zero);
        // Off: ordinary content-defined chunks.
        let fc = chunk_file(&p, ChunkParams::default().with_pages(false)).unwrap();
        assert!(fc.chunks.iter().any(|c| c.len as usize != PAGE));
    }

    /// Pin the cut points of a fixed input: a dependency bump must not silently change chunking
    /// (and with it every deduplication figure).
    #[test]
    fn cut_points_snapshot() {
        let data = noise(42, 256 * 1024);
        let lens = cut_sequential(&data, ChunkParams::new(4096, 8192, 65536).unwrap());
        let digest = ChunkId::of(
            &lens
                .iter()
                .flat_map(|l| l.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
        assert_eq!(lens.len(), 24, "cut points changed: {lens:?}");
        assert_eq!(
            &digest.to_hex()[..16],
            "9492bc0bbeb1c55d",
            "cut points changed: {lens:?}"
        );
    }

    #[test]
    fn insertion_only_disturbs_nearby_chunks() {
        let p = ChunkParams::default();
        let data = noise(7, 2 << 20);
        let mut edited = data[..1_000_000].to_vec();
        edited.extend_from_slice(b"inserted bytes that shift everything after them");
        edited.extend_from_slice(&data[1_000_000..]);
        let a = ids(&chunk_bytes(&data, p));
        let b = ids(&chunk_bytes(&edited, p));
        let set: std::collections::HashSet<_> = a.iter().collect();
        let new = b.iter().filter(|id| !set.contains(id)).count();
        assert!(new <= 3, "{new} new chunks after one insertion");
    }

    #[test]
    fn parallel_cutting_equals_sequential_on_large_data() {
        let p = ChunkParams::default();
        let mut data = noise(3, 5 * SEGMENT + 12345);
        // Long zero runs force max-size cuts across a segment boundary.
        data[SEGMENT - 100_000..SEGMENT + 300_000].fill(0);
        assert_eq!(cut_points(&data, p), cut_sequential(&data, p));
        let big = ChunkParams::new(1 << 20, 4 << 20, 16 << 20).unwrap();
        assert_eq!(cut_points(&data, big), cut_sequential(&data, big));
    }

    #[test]
    fn zero_chunks_are_flagged() {
        let mut data = noise(5, 600_000);
        data[100_000..400_000].fill(0);
        let fc = chunk_bytes(&data, ChunkParams::default());
        assert!(fc.chunks.iter().any(|c| c.zero));
        assert!(fc.chunks.iter().any(|c| !c.zero));
    }

    #[test]
    fn empty_file() {
        let fc = chunk_bytes(&[], ChunkParams::default());
        assert!(fc.chunks.is_empty());
        assert_eq!(fc.size, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]
        #[test]
        fn parallel_equals_sequential(seed in any::<u64>(), extra in 0usize..SEGMENT, avg_shift in 8u32..16) {
            let avg = 1u32 << avg_shift;
            let p = ChunkParams::new((avg / 4).max(64), avg, avg * 4).unwrap();
            let data = noise(seed, 2 * SEGMENT + extra);
            prop_assert_eq!(cut_points(&data, p), cut_sequential(&data, p));
        }
    }
}
