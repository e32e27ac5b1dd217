//! Chunking a file again after it changed, from the chunk list it had before.
//!
//! A sender that syncs a tree again has to list the chunks of every file that changed, and
//! cutting and hashing every byte of a large file where a few pages changed is most of a delta
//! sync's time (a 121 MiB file takes 125 ms on this project's machine). With the file's previous
//! chunk list and a cheap fingerprint of every chunk (XXH3-128, kept in the sender's chunk
//! cache), a chunk whose bytes are unchanged is recognised by comparing fingerprints at the
//! offset where it would start now, and keeps its id without being cut or hashed; only the
//! changed regions are cut by FastCDC and hashed with BLAKE3 (in parallel).
//!
//! The result is exactly the list that chunking the whole file afresh gives. A FastCDC cut
//! (fastcdc's `cut_gear`) depends on the bytes since the previous cut, on the byte right after
//! the cut (the rolling hash that decides a cut includes it), and on how much data is left up
//! to the largest chunk (its loop bounds). So a chunk's fingerprint covers its bytes and the
//! byte after it (chunks cut on every page excepted: their cuts read no content), and an old
//! chunk is taken only where the data left, capped at the largest chunk, is what it was: far
//! from the end of the file always, near it only where the distance to the end is unchanged.
//! Insertions shift the old chunks after them; the shift is learnt from the first freshly cut
//! chunk whose fingerprint is a previous chunk's. A property test checks the equality on random
//! edits.
//!
//! Fingerprints are not ids: they only ever vouch for bytes equal to bytes this sender hashed
//! itself before (128 bits, no adversary), and the receiver still checks every chunk it is sent
//! against its BLAKE3 id.

use crate::chunk::{
    cut_points, file_chunks, is_page_image, spec_of, with_file_bytes, ChunkParams, FileChunks,
    ListParts, PAGE,
};
use crate::error::Result;
use crate::manifest::ChunkSpec;
use fastcdc::v2020::FastCDC;
use rayon::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// A chunk's fingerprint: XXH3-128 of its bytes.
pub type Fingerprint = u128;

/// The fingerprint kept for the chunk of `len` bytes at `off` of `data`: its bytes and, unless
/// the file is cut on every page, the byte after it (when there is one).
fn fingerprint_at(data: &[u8], off: usize, len: usize, paged: bool) -> Fingerprint {
    let end = if paged {
        off + len
    } else {
        (off + len + 1).min(data.len())
    };
    fingerprint(&data[off..end])
}

/// The fingerprint of `bytes`. (twox-hash picks AVX2 at run time; xxhash-rust only uses what the
/// build targets, SSE2 for a portable x86-64 binary, and hashed half as fast.)
pub fn fingerprint(bytes: &[u8]) -> Fingerprint {
    twox_hash::XxHash3_128::oneshot(bytes)
}

/// A file's chunk list from before, with the fingerprint of every chunk.
#[derive(Clone, Copy, Debug)]
pub struct Prior<'a> {
    /// The chunks, in order.
    pub chunks: &'a [ChunkSpec],
    /// Their fingerprints (one per chunk).
    pub fps: &'a [Fingerprint],
}

/// A chunk list with fingerprints, and how much of it came from the prior list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunked {
    /// The chunks and the file hash.
    pub chunks: FileChunks,
    /// One fingerprint per chunk.
    pub fps: Vec<Fingerprint>,
    /// Bytes whose chunks took their ids from the prior list (not cut, not hashed).
    pub reused: u64,
}

/// Bytes handled at once: each such window's fresh chunks are hashed on all cores, then its part
/// of the list is handed on.
pub const WINDOW: usize = crate::chunk::STREAM_WINDOW;

/// The chunks of the file at `path` with their fingerprints, taking ids from `prior` where the
/// bytes are unchanged. Every [`WINDOW`] bytes the list so far is handed to `part` (when given),
/// so that a sender can send it while it reads on. Fails like [`crate::chunk::chunk_file`].
pub fn chunk_file_fp(
    path: &Path,
    p: ChunkParams,
    prior: Option<Prior<'_>>,
    part: Option<ListParts<'_>>,
) -> Result<Chunked> {
    let paged = p.pages && is_page_image(path);
    with_file_bytes(path, |data| chunk_data(data, p, paged, prior, WINDOW, part))
}

/// The previous list, indexed: chunk start offsets, and chunks by fingerprint.
struct Known<'a> {
    prior: Prior<'a>,
    /// Start offset of every chunk, and the old size last.
    offs: Vec<u64>,
    by_fp: HashMap<Fingerprint, u32>,
}

impl<'a> Known<'a> {
    fn new(prior: Prior<'a>) -> Option<Self> {
        if prior.fps.len() != prior.chunks.len() || prior.chunks.is_empty() {
            return None;
        }
        let offs = crate::manifest::chunk_starts(prior.chunks);
        let mut by_fp = HashMap::with_capacity(prior.fps.len());
        for (i, fp) in prior.fps.iter().enumerate() {
            by_fp.entry(*fp).or_insert(i as u32);
        }
        Some(Known { prior, offs, by_fp })
    }

    /// The old chunk that started at `off`.
    fn at(&self, off: i64) -> Option<usize> {
        let n = self.prior.chunks.len();
        let off = u64::try_from(off).ok()?;
        self.offs[..n].binary_search(&off).ok()
    }

    /// The first old chunk starting at or after `off`.
    fn first_from(&self, off: i64) -> usize {
        let n = self.prior.chunks.len();
        let off = u64::try_from(off).unwrap_or(0);
        self.offs[..n].partition_point(|&o| o < off)
    }

    /// Whether old chunk `i`, placed at `pos` of the new `data`, holds the same bytes and ends
    /// where a fresh cut would.
    fn still_at(&self, i: usize, data: &[u8], pos: usize, cap: usize, paged: bool) -> bool {
        let len = self.prior.chunks[i].len as usize;
        let old_size = self.offs[self.prior.chunks.len()];
        // The cut read what is left of the file, up to `cap` bytes: it must be the same.
        let left_old = (old_size - self.offs[i]).min(cap as u64);
        let left_new = (data.len().saturating_sub(pos)).min(cap) as u64;
        left_old == left_new
            && pos + len <= data.len()
            && fingerprint_at(data, pos, len, paged) == self.prior.fps[i]
    }
}

/// One chunk found by a window's scan.
enum Piece {
    /// Same bytes as old chunk N.
    Old(u32),
    /// New bytes at this offset, this long, with this fingerprint: to be hashed.
    New(usize, u32, Fingerprint),
}

/// A window of reuse below this share of its bytes makes the next windows cut afresh, in
/// parallel, before trying again (a file rewritten throughout is not scanned on one core).
const MIN_REUSE_DIV: u64 = 8;
/// Windows cut afresh after a window that reused little.
const FRESH_RUN: u32 = 3;

fn chunk_data(
    data: &[u8],
    p: ChunkParams,
    paged: bool,
    prior: Option<Prior<'_>>,
    window: usize,
    mut part: Option<ListParts<'_>>,
) -> Result<Chunked> {
    let window = window.max(2 * p.max as usize + PAGE).next_multiple_of(PAGE);
    let known = prior.and_then(Known::new);
    let mut chunks = Vec::new();
    let mut fps = Vec::new();
    let mut reused = 0u64;
    let mut pos = 0usize;
    let mut shift = 0i64;
    let mut fresh_windows = 0u32;
    while pos < data.len() {
        let end = (pos + window).min(data.len());
        populate(&data[pos..(end + p.max as usize).min(data.len())]);
        let (specs, wfps, used, re) = match &known {
            Some(k) if fresh_windows == 0 => {
                let (s, f, used, re) = scan_window(data, pos, end, p, paged, k, &mut shift);
                if re * MIN_REUSE_DIV < used as u64 {
                    fresh_windows = FRESH_RUN;
                }
                (s, f, used, re)
            }
            _ => {
                fresh_windows = fresh_windows.saturating_sub(1);
                let (s, f, used) = fresh_window(data, pos, end, p, paged);
                (s, f, used, 0)
            }
        };
        if let Some(part) = part.as_mut() {
            part(&specs)?;
        }
        chunks.extend(specs);
        fps.extend(wfps);
        reused += re;
        pos += used;
    }
    Ok(Chunked {
        chunks: file_chunks(data, chunks),
        fps,
        reused,
    })
}

/// Map the pages of `bytes` (a window of a memory-mapped file) in one call rather than one page
/// fault at a time: a scan that mostly compares fingerprints reads at memory speed, and faulting
/// 4 KiB at a time was half its time. Small files are read into a buffer, where there is nothing
/// to map; a failure (a kernel without `MADV_POPULATE_READ`) only costs the faults.
fn populate(bytes: &[u8]) {
    if bytes.len() < crate::chunk::MMAP_MIN as usize {
        return;
    }
    let addr = bytes.as_ptr() as usize;
    let start = addr & !(PAGE - 1);
    // SAFETY: advice only; the range lies within the caller's live mapping (rounded down to its
    // page), and MADV_POPULATE_READ does not change the mapping's contents.
    unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            addr + bytes.len() - start,
            libc::MADV_POPULATE_READ,
        );
    }
}

/// Cut `data[pos..end]` afresh (on all cores when large); the window's last chunk is left to the
/// next window unless the window ends the data (the window's end cut it, not its content).
/// Returns the specs, fingerprints and bytes covered.
fn fresh_window(
    data: &[u8],
    pos: usize,
    end: usize,
    p: ChunkParams,
    paged: bool,
) -> (Vec<ChunkSpec>, Vec<Fingerprint>, usize) {
    let w = &data[pos..end];
    let mut lens: Vec<u32> = if paged {
        w.chunks(PAGE).map(|c| c.len() as u32).collect()
    } else {
        cut_points(w, p)
    };
    if end < data.len() && !paged && lens.len() > 1 {
        lens.pop();
    }
    let mut offs = Vec::with_capacity(lens.len());
    let mut o = 0usize;
    for &l in &lens {
        offs.push(o);
        o += l as usize;
    }
    let (specs, fps): (Vec<ChunkSpec>, Vec<Fingerprint>) = offs
        .par_iter()
        .zip(lens.par_iter())
        .map(|(&off, &len)| {
            let c = &w[off..off + len as usize];
            (
                spec_of(c),
                fingerprint_at(data, pos + off, len as usize, paged),
            )
        })
        .unzip();
    (specs, fps, o)
}

/// Scan from `pos` until at least `end`, taking old chunks where their bytes are unchanged and
/// cutting the rest; then hash the new chunks on all cores. Returns the specs, fingerprints,
/// bytes covered and bytes taken from old chunks.
fn scan_window(
    data: &[u8],
    mut pos: usize,
    end: usize,
    p: ChunkParams,
    paged: bool,
    k: &Known<'_>,
    shift: &mut i64,
) -> (Vec<ChunkSpec>, Vec<Fingerprint>, usize, u64) {
    let start = pos;
    let mut pieces = Vec::new();
    let mut reused = 0u64;
    // How far a cut looks ahead.
    let cap = if paged { PAGE } else { p.max as usize };
    // Check the old chunks the current shift places in this window on all cores first: the scan
    // below is sequential (a shift is learnt as it goes), the fingerprints are most of its work.
    let spec_shift = *shift;
    let first = k.first_from(pos as i64 - spec_shift);
    let last = k.first_from(end as i64 - spec_shift);
    let checked: Vec<bool> = (first..last)
        .into_par_iter()
        .map(|i| {
            let at = k.offs[i] as i64 + spec_shift;
            usize::try_from(at).is_ok_and(|at| k.still_at(i, data, at, cap, paged))
        })
        .collect();
    while pos < end {
        if let Some(i) = k.at(pos as i64 - *shift) {
            let same = if *shift == spec_shift && (first..last).contains(&i) {
                checked[i - first]
            } else {
                k.still_at(i, data, pos, cap, paged)
            };
            if same {
                pieces.push(Piece::Old(i as u32));
                let len = k.prior.chunks[i].len as usize;
                pos += len;
                reused += len as u64;
                continue;
            }
        }
        let rest = &data[pos..];
        let len = if paged {
            rest.len().min(PAGE)
        } else {
            // A cut never looks past `max` bytes: a shorter slice gives the same cut.
            let bounded = &rest[..rest.len().min(p.max as usize)];
            FastCDC::new(bounded, p.min, p.avg, p.max)
                .next()
                .map_or(rest.len(), |c| c.length)
        };
        let fp = fingerprint_at(data, pos, len, paged);
        match k.by_fp.get(&fp) {
            Some(&j) if k.prior.chunks[j as usize].len as usize == len => {
                // Bytes seen before elsewhere: the old chunks after them may follow here too.
                *shift = pos as i64 - k.offs[j as usize] as i64;
                pieces.push(Piece::Old(j));
                reused += len as u64;
            }
            _ => pieces.push(Piece::New(pos, len as u32, fp)),
        }
        pos += len;
    }
    let (specs, fps): (Vec<ChunkSpec>, Vec<Fingerprint>) = pieces
        .par_iter()
        .map(|piece| match *piece {
            Piece::Old(i) => (k.prior.chunks[i as usize], k.prior.fps[i as usize]),
            Piece::New(off, len, fp) => (spec_of(&data[off..off + len as usize]), fp),
        })
        .unzip();
    (specs, fps, pos - start, reused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{chunk_bytes, chunk_pages, tests_support::noise};
    use proptest::prelude::*;

    /// [`chunk_file_fp`] over bytes in memory, cut on every page when `paged`.
    fn chunk_bytes_fp(
        data: &[u8],
        p: ChunkParams,
        paged: bool,
        prior: Option<Prior<'_>>,
    ) -> Chunked {
        chunk_data(data, p, paged, prior, WINDOW, None).unwrap()
    }

    fn prior_of(c: &Chunked) -> Prior<'_> {
        Prior {
            chunks: &c.chunks.chunks,
            fps: &c.fps,
        }
    }

    /// Fingerprints are kept in caches on disk: they are XXH3-128 as every implementation
    /// computes it.
    #[test]
    fn fingerprints_are_xxh3_128() {
        for n in [0usize, 1, 16, 17, 128, 129, 240, 241, 4096, 70_000] {
            let b = noise(n as u64, n);
            assert_eq!(
                fingerprint(&b),
                xxhash_rust::xxh3::xxh3_128(&b),
                "{n} bytes"
            );
        }
    }

    #[test]
    fn afresh_equals_chunk_bytes_with_fingerprints() {
        let p = ChunkParams::default();
        let data = noise(1, 3 * WINDOW + 12345);
        let got = chunk_bytes_fp(&data, p, false, None);
        assert_eq!(got.chunks, chunk_bytes(&data, p));
        assert_eq!(got.fps.len(), got.chunks.chunks.len());
        let mut off = 0usize;
        for (c, fp) in got.chunks.chunks.iter().zip(&got.fps) {
            let end = (off + c.len as usize + 1).min(data.len());
            assert_eq!(*fp, fingerprint(&data[off..end]));
            off += c.len as usize;
        }
        assert_eq!(got.reused, 0);
    }

    #[test]
    fn scattered_page_rewrites_and_insertions_reuse_the_rest() {
        let p = ChunkParams::default();
        let old = noise(2, 40 << 20);
        let before = chunk_bytes_fp(&old, p, false, None);
        let mut new = old.clone();
        // 1 % of the pages rewritten, then two insertions.
        for k in 0..(new.len() / PAGE / 100) {
            let at = (k * 7919 % (new.len() / PAGE)) * PAGE;
            new[at..at + PAGE].copy_from_slice(&noise(100 + k as u64, PAGE));
        }
        new.splice(5_000_000..5_000_000, noise(7, 1234));
        new.splice(30_000_000..30_000_000, noise(8, 77));
        let got = chunk_bytes_fp(&new, p, false, Some(prior_of(&before)));
        assert_eq!(got.chunks, chunk_bytes(&new, p));
        assert!(
            got.reused > new.len() as u64 * 9 / 10,
            "only {} of {} bytes reused",
            got.reused,
            new.len()
        );
    }

    #[test]
    fn a_file_rewritten_throughout_is_cut_afresh() {
        let p = ChunkParams::default();
        let before = chunk_bytes_fp(&noise(3, 5 * WINDOW), p, false, None);
        let new = noise(4, 5 * WINDOW + 99);
        let got = chunk_bytes_fp(&new, p, false, Some(prior_of(&before)));
        assert_eq!(got.chunks, chunk_bytes(&new, p));
        assert_eq!(got.reused, 0);
    }

    #[test]
    fn growing_past_an_old_last_chunk_cuts_it_again() {
        let p = ChunkParams::default();
        let old = noise(5, 100_000);
        let before = chunk_bytes_fp(&old, p, false, None);
        let mut new = old.clone();
        new.extend_from_slice(&noise(6, 50_000));
        let got = chunk_bytes_fp(&new, p, false, Some(prior_of(&before)));
        assert_eq!(got.chunks, chunk_bytes(&new, p));
        // And shrinking into it.
        let got = chunk_bytes_fp(&old[..60_000], p, false, Some(prior_of(&before)));
        assert_eq!(got.chunks, chunk_bytes(&old[..60_000], p));
    }

    #[test]
    fn page_images_reuse_unchanged_and_moved_pages() {
        let p = ChunkParams::default();
        let old = noise(9, 300 * PAGE + 100);
        let before = chunk_bytes_fp(&old, p, true, None);
        assert_eq!(before.chunks, chunk_pages(&old));
        let mut new = old.clone();
        new[10 * PAGE] ^= 1;
        // Two pages inserted at page 100: the pages after it moved.
        new.splice(100 * PAGE..100 * PAGE, noise(10, 2 * PAGE));
        let got = chunk_bytes_fp(&new, p, true, Some(prior_of(&before)));
        assert_eq!(got.chunks, chunk_pages(&new));
        assert_eq!(got.reused as usize, new.len() - 3 * PAGE);
    }

    /// A cut is decided with the byte after it in the rolling hash, and within bounds set by
    /// the data left: a byte inserted right after an old chunk, or a file that grew by a few
    /// bytes behind one, must not let it keep its old length (found by the property test).
    #[test]
    fn a_chunk_is_not_taken_when_its_next_byte_or_the_end_moved() {
        let p = ChunkParams::from_avg(2048).unwrap();
        let old = noise(2042328825044103113, 84498);
        let before = chunk_data(&old, p, false, None, 64 << 10, None).unwrap();
        let mut offs = vec![0usize];
        for c in &before.chunks.chunks {
            offs.push(offs.last().unwrap() + c.len as usize);
        }
        for &cut in &offs[1..offs.len() - 1] {
            for (at, extra) in [(cut, 1usize), (old.len(), 1), (old.len(), 5315)] {
                let mut new = old.clone();
                new.splice(at..at, noise(at as u64 ^ extra as u64, extra));
                let got =
                    chunk_data(&new, p, false, Some(prior_of(&before)), 64 << 10, None).unwrap();
                assert_eq!(got.chunks, chunk_bytes(&new, p), "insert {extra} at {at}");
            }
        }
    }

    #[test]
    fn mismatched_fingerprints_are_ignored() {
        let p = ChunkParams::default();
        let data = noise(11, 200_000);
        let before = chunk_bytes_fp(&data, p, false, None);
        let short = &before.fps[1..];
        let prior = Prior {
            chunks: &before.chunks.chunks,
            fps: short,
        };
        let got = chunk_bytes_fp(&data, p, false, Some(prior));
        assert_eq!(got.chunks, before.chunks);
        assert_eq!(got.reused, 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn edits_give_the_list_chunking_afresh_gives(
            seed in any::<u64>(),
            len in 0usize..400_000,
            edits in proptest::collection::vec((0usize..400_000, 0usize..3, 1usize..9000), 0..6),
            avg_shift in 10u32..14,
            window in 64usize..300,
        ) {
            let p = ChunkParams::from_avg(1 << avg_shift).unwrap();
            let old = noise(seed, len);
            let window = window * 1024;
            let before = chunk_data(&old, p, false, None, window, None).unwrap();
            let mut new = old.clone();
            for (k, (at, kind, n)) in edits.into_iter().enumerate() {
                let at = at.min(new.len());
                let bytes = noise(seed ^ (k as u64 + 1), n);
                match kind {
                    0 => new.splice(at..at, bytes).for_each(drop),
                    1 => { let e = (at + n).min(new.len()); new.splice(at..e, bytes).for_each(drop) }
                    _ => { let e = (at + n).min(new.len()); new.drain(at..e).for_each(drop) }
                }
            }
            let got = chunk_data(&new, p, false, Some(prior_of(&before)), window, None).unwrap();
            prop_assert_eq!(&got.chunks, &chunk_bytes(&new, p));
            let fresh = chunk_data(&new, p, false, None, window, None).unwrap();
            prop_assert_eq!(got.fps, fresh.fps);
        }
    }
}
