//! Update a file in place (like rsync's `--inplace`): chunks already at the right offset are
//! not touched, everything else is written over the old bytes.
//!
//! For files whose old version is disposable scratch, where rewriting a whole copy costs more
//! than the change (a migration's memory images: hundreds of MB of which a few percent
//! changed). The trade-off is atomicity: a failure part-way leaves a mix of old and new
//! content, which the caller must then replace (the receiver rebuilds the file the staged way).
//!
//! What is checked: fetched chunks against their ids on arrival, bytes copied from elsewhere
//! (other files, or other offsets of this file) as they are copied, and the chunk list against
//! the file's hash. Chunks left in place are taken on the index's word (the index of the
//! destination was built by hashing the file, or from its cache, checked against its size and
//! modification time).

use crate::assemble::{decode_fetched, read_base, Fetched, FileTable};
use crate::error::{Error, IoContext, Result};
use crate::id::ChunkId;
use crate::manifest::{chunk_starts, ChunkSpec};
use crate::plan::{FilePlan, Piece};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Most old bytes kept in memory while a file is updated in place (old content that a copy or
/// a delta base still has to read when its place is overwritten); a plan that needs more is
/// not done in place. The pieces are written in the order that keeps the fewest (see
/// `local_order`): data that moved towards the start of the file is copied first-to-last,
/// data that moved towards its end last-to-first, like `memmove`.
pub const MAX_SAVED: u64 = 256 << 20;

/// Smaller files are rebuilt the staged way: cheap, and their content-defined chunks shift
/// more than they stay in place.
pub const MIN_SIZE: u64 = 4 << 20;

/// Whether an in-place update was done.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Not attempted; the file is untouched (too much of it would be rewritten, or the plan's
    /// pieces do not fall on chunk boundaries). Build it the staged way.
    NotSuitable,
    /// Done.
    Done,
}

/// The old content of the file while it is rewritten. Ranges that pieces not done yet still read
/// (copies to other offsets, delta bases) keep their old bytes in memory before they are
/// overwritten; other overwritten ranges are marked, and a read that meets one fails (the
/// caller then fetches those chunks) rather than return new bytes for old.
struct OldView<'f> {
    /// Where the old content is read: the file being rewritten, or an unchanged original.
    file: &'f File,
    /// The old content is read from another file than the one written: nothing is ever lost.
    apart: bool,
    dest: &'f Path,
    old_len: u64,
    /// What the pieces not done yet will read from this file.
    pending: Pending,
    saved: BTreeMap<u64, Vec<u8>>,
    /// Overwritten ranges whose old bytes were not kept (start -> end).
    lost: BTreeMap<u64, u64>,
}

/// Whether `[start, end)` meets a range of `ranges` (start -> end, not overlapping).
fn meets(ranges: &BTreeMap<u64, u64>, start: u64, end: u64) -> bool {
    ranges
        .range(..end)
        .next_back()
        .is_some_and(|(_, &e)| e > start)
}

impl OldView<'_> {
    /// About to overwrite `[pos, pos + len)`: keep the old bytes of it that pieces not done yet
    /// read; mark the rest lost.
    fn save(&mut self, pos: u64, len: u64) -> Result<()> {
        let end = (pos + len).min(self.old_len);
        if end <= pos || self.apart {
            return Ok(());
        }
        let mut at = pos;
        for (s, e) in self.pending.overlaps(pos, end) {
            if s > at {
                self.lost.insert(at, s);
            }
            let mut buf = vec![0u8; (e - s) as usize];
            self.file
                .read_exact_at(&mut buf, s)
                .ctx("read", self.dest)?;
            self.saved.insert(s, buf);
            at = e;
        }
        if at < end {
            self.lost.insert(at, end);
        }
        Ok(())
    }

    /// `len` bytes of the old file at `offset`.
    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        if meets(&self.lost, offset, offset + len as u64) {
            return Err(Error::Integrity {
                what: format!(
                    "old bytes {offset}..{} of {} (overwritten in place)",
                    offset + len as u64,
                    self.dest.display()
                ),
                expected: "old content".into(),
                actual: "new content".into(),
            });
        }
        let mut buf = vec![0u8; len];
        let avail = self.old_len.saturating_sub(offset).min(len as u64) as usize;
        self.file
            .read_exact_at(&mut buf[..avail], offset)
            .ctx("read", self.dest)?;
        buf.truncate(avail);
        let end = offset + avail as u64;
        // Saved ranges do not overlap; patch in every one that meets [offset, end).
        let first = self
            .saved
            .range(..=offset)
            .next_back()
            .map_or(offset, |(&s, _)| s);
        for (&s, old) in self.saved.range(first..end) {
            let e = s + old.len() as u64;
            if e <= offset {
                continue;
            }
            let (from, to) = (s.max(offset), e.min(end));
            buf[(from - offset) as usize..(to - offset) as usize]
                .copy_from_slice(&old[(from - s) as usize..(to - s) as usize]);
        }
        Ok(buf)
    }
}

/// `dest` opened to be updated in place (never through a symbolic link).
pub fn open_for_update(dest: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dest)
        .ctx("open for update", dest)
}

/// Update an open `file` that holds the content of index file `me` (of `files`) to the content
/// described by `chunks`, following `plan`; an error after the first write leaves it partly
/// updated. `file` is that index file itself (see [`open_for_update`]), or a copy of it (a reflink clone to update and then rename over the original) with the
/// `original` to read old content from (unchanged meanwhile, and in the page cache where the
/// fresh clone is not). `dest` names the file in messages.
#[allow(clippy::too_many_arguments)]
pub fn update_open(
    file: &File,
    original: Option<&File>,
    dest: &Path,
    me: u32,
    size: u64,
    hash: &ChunkId,
    chunks: &[ChunkSpec],
    plan: &FilePlan,
    files: &FileTable<'_>,
    next: &mut dyn FnMut() -> Result<Fetched>,
    refetch: &mut Refetch<'_>,
    sparse: bool,
) -> Result<Outcome> {
    crate::assemble::check_listed(dest, size, hash, chunks)?;
    if !pieces_fit(size, chunks, plan) {
        return Ok(Outcome::NotSuitable);
    }
    let reads = readers(me, chunks, plan);
    let (order, kept) = local_order(me, chunks, plan, &reads);
    if kept > MAX_SAVED {
        return Ok(Outcome::NotSuitable);
    }
    let starts = chunk_starts(chunks);
    let chunk_at = |pos: u64| starts.binary_search(&pos).ok();
    let old_len = file.metadata().ctx("stat", dest)?.len();
    let mut old = OldView {
        file: original.unwrap_or(file),
        apart: original.is_some(),
        dest,
        old_len,
        pending: Pending::new(&reads),
        saved: BTreeMap::new(),
        lost: BTreeMap::new(),
    };
    // The old chunks of this file by offset: a reference to the chunk being replaced is read
    // from right here, before it is overwritten.
    let old_chunks = files.chunks_of(me);
    let mut old_at = HashMap::with_capacity(old_chunks.len());
    let mut at = 0u64;
    for c in old_chunks {
        old_at.insert(at, (c.id, c.len));
        at += c.len as u64;
    }
    let mut kept: HashMap<u32, Vec<u8>> = HashMap::new();
    // Chunks whose local bytes did not match, fetched again after the passes.
    let mut deferred: Vec<u32> = Vec::new();
    let mut fetched = 0usize;
    let positions = piece_positions(chunks, plan);
    // Two passes over the pieces: first everything this side holds (copies and zeros), while
    // the fetched chunks are still on their way; then the fetched chunks (and repeats of them)
    // in the order they arrive. One pass in file order made the copies wait for the network,
    // so most of them were left for after the last chunk had come (a 660 MB image: 0.25 s of
    // copying after the transfer). The passes write disjoint ranges, every read is of old
    // bytes (kept in memory where an earlier write covered them, while a piece not done yet
    // reads them), so the order does not change the result; the first pass goes in the order
    // that keeps the fewest old bytes (`local_order`).
    let fetch_order = (0..plan.pieces.len()).filter(|&i| !is_local(&plan.pieces[i]));
    {
        for idx in order.iter().copied().chain(fetch_order) {
            let (piece, pos) = (&plan.pieces[idx], positions[idx]);
            let k = chunk_at(pos).unwrap_or(0);
            let len = piece_len(piece, chunks);
            let bytes = match *piece {
                Piece::Local {
                    file: n, offset, ..
                } if n == me && offset == pos => None,
                Piece::Local {
                    file: n,
                    offset,
                    len,
                } => {
                    let data = if n == me {
                        old.read(offset, len as usize)
                    } else {
                        read_base(files, n, offset, len as usize)
                    };
                    // A short read is a file cut shorter meanwhile (another lane's in-place update
                    // ends with set_len): never accepted, even on a chunk boundary, or the rest of
                    // the run would keep this file's stale bytes.
                    let whole = |d: Vec<u8>| {
                        if d.len() as u64 == len {
                            Ok(d)
                        } else {
                            Err(Error::SourceChanged {
                                path: dest.to_path_buf(),
                            })
                        }
                    };
                    match data
                        .and_then(whole)
                        .and_then(|d| check_run(&d, &chunks[k..], dest, k).map(|()| d))
                    {
                        Ok(d) => Some(d),
                        // The bytes were not what the index said: that file was rewritten in place
                        // by this sync too (another lane), or changed. Only these chunks are fetched,
                        // all of the file's at once after this pass.
                        Err(Error::Integrity { .. } | Error::SourceChanged { .. }) => {
                            deferred.extend(chunks_in(&starts, pos, len));
                            None
                        }
                        Err(e) => return Err(e),
                    }
                }
                Piece::Zero(len) => {
                    old.save(pos, len)?;
                    zero(file, dest, pos, len, sparse)?;
                    None
                }
                Piece::Fetch(n) => {
                    let (got, codec, payload) = next()?;
                    if got != n || n as usize != k {
                        return Err(Error::Protocol(format!(
                            "expected chunk {k} of {}, got chunk {got}",
                            dest.display()
                        )));
                    }
                    let base = plan.bases.get(fetched).copied().flatten();
                    fetched += 1;
                    let read = |f: u32, o: u64, l: usize| {
                        if f == me {
                            old.read(o, l)
                        } else {
                            read_base(files, f, o, l)
                        }
                    };
                    let here = pos;
                    let locate = |id: &ChunkId| {
                        if let Some(&(old_id, len)) = old_at.get(&here) {
                            if old_id == *id {
                                return Some(crate::index::Location {
                                    file: me,
                                    offset: here,
                                    len,
                                });
                            }
                        }
                        files.locate(id)
                    };
                    let bytes = match decode_fetched(
                        codec, payload, &chunks[k], base, &locate, &read, dest, n,
                    ) {
                        Ok(b) => b,
                        // A reference or patch against bytes that are no longer what they
                        // were (rewritten in place by this sync): this chunk, plainly; at once
                        // if a repeat later needs it, else with the others after this pass.
                        Err(Error::Integrity { .. } | Error::SourceChanged { .. })
                            if plan.keep.binary_search(&n).is_ok() =>
                        {
                            refetch(&[n])?.pop().ok_or_else(|| {
                                Error::Protocol(format!(
                                    "chunk {n} of {} asked for again did not come",
                                    dest.display()
                                ))
                            })?
                        }
                        Err(Error::Integrity { .. } | Error::SourceChanged { .. }) => {
                            deferred.push(n);
                            old.pending.release(reads[idx]);
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if plan.keep.binary_search(&n).is_ok() {
                        kept.insert(n, bytes.clone());
                    }
                    Some(bytes)
                }
                Piece::Repeat(n) => {
                    let bytes = kept.get(&n).ok_or_else(|| {
                        Error::Protocol(format!("repeat of chunk {n} that was not fetched"))
                    })?;
                    if chunks.get(n as usize).map(|c| c.id) != Some(chunks[k].id) {
                        return Err(Error::Protocol(format!(
                            "repeat of chunk {n} does not fit chunk {k} of {}",
                            dest.display()
                        )));
                    }
                    Some(bytes.clone())
                }
            };
            // Read (or given up): what it read is no longer needed by it.
            old.pending.release(reads[idx]);
            if let Some(bytes) = bytes {
                old.save(pos, len)?;
                file.write_all_at(&bytes, pos).ctx("write", dest)?;
            }
        }
    }
    deferred.sort_unstable();
    if !deferred.is_empty() {
        let got = refetch(&deferred)?;
        if got.len() != deferred.len() {
            return Err(Error::Protocol(format!(
                "asked for {} chunks of {} again, got {}",
                deferred.len(),
                dest.display(),
                got.len()
            )));
        }
        for (n, data) in deferred.iter().zip(got) {
            file.write_all_at(&data, starts[*n as usize])
                .ctx("write", dest)?;
        }
    }
    file.set_len(size).ctx("set length of", dest)?;
    Ok(Outcome::Done)
}

/// Whether a piece is written in the first pass, from what this side holds.
fn is_local(p: &Piece) -> bool {
    matches!(p, Piece::Local { .. } | Piece::Zero(_))
}

/// Where each piece starts in the new file.
fn piece_positions(chunks: &[ChunkSpec], plan: &FilePlan) -> Vec<u64> {
    let mut positions = Vec::with_capacity(plan.pieces.len());
    let mut end = 0u64;
    for piece in &plan.pieces {
        positions.push(end);
        end += piece_len(piece, chunks);
    }
    positions
}

/// For each piece, the range of file `me` it reads at another offset than its own (a copy from
/// elsewhere in the file, or a delta base there), if any.
fn readers(me: u32, chunks: &[ChunkSpec], plan: &FilePlan) -> Vec<Option<(u64, u64)>> {
    let mut out = Vec::with_capacity(plan.pieces.len());
    let mut pos = 0u64;
    let mut fetched = 0usize;
    for piece in &plan.pieces {
        out.push(match *piece {
            Piece::Local { file, offset, len } if file == me && offset != pos => {
                Some((offset, offset + len))
            }
            Piece::Fetch(n) => {
                fetched += 1;
                // A base at the chunk's own place is read before that place is overwritten.
                match (plan.bases.get(fetched - 1), chunks.get(n as usize)) {
                    (Some(Some((file, offset))), Some(c)) if *file == me && *offset != pos => {
                        Some((*offset, offset + c.len as u64))
                    }
                    _ => None,
                }
            }
            _ => None,
        });
        pos += piece_len(piece, chunks);
    }
    out
}

/// The old bytes of the file that pieces not done yet will read, counted per elementary range
/// (between the ends of the read ranges).
#[derive(Clone, Debug)]
struct Pending {
    /// Sorted ends of the read ranges: range `k` is `bounds[k]..bounds[k + 1]`.
    bounds: Vec<u64>,
    /// Readers not done yet of each range.
    count: Vec<u32>,
}

impl Pending {
    fn new(reads: &[Option<(u64, u64)>]) -> Pending {
        let mut bounds: Vec<u64> = reads.iter().flatten().flat_map(|&(s, e)| [s, e]).collect();
        bounds.sort_unstable();
        bounds.dedup();
        let mut p = Pending {
            count: vec![0; bounds.len().saturating_sub(1)],
            bounds,
        };
        for r in reads.iter().flatten() {
            for k in p.ranges(r.0, r.1) {
                p.count[k] += 1;
            }
        }
        p
    }

    /// The elementary ranges that meet `[start, end)`.
    fn ranges(&self, start: u64, end: u64) -> std::ops::Range<usize> {
        let first = self
            .bounds
            .partition_point(|&b| b <= start)
            .saturating_sub(1);
        let last = self
            .bounds
            .partition_point(|&b| b < end)
            .min(self.count.len());
        first..last.max(first)
    }

    /// The parts of `[start, end)` that pieces not done yet read, in order, merged.
    fn overlaps(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for k in self.ranges(start, end) {
            let (s, e) = (self.bounds[k].max(start), self.bounds[k + 1].min(end));
            if self.count[k] == 0 || s >= e {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
        out
    }

    /// A reader of `range` is done.
    fn release(&mut self, range: Option<(u64, u64)>) {
        if let Some((s, e)) = range {
            for k in self.ranges(s, e) {
                if self.bounds[k] < e && self.bounds[k + 1] > s {
                    self.count[k] = self.count[k].saturating_sub(1);
                }
            }
        }
    }
}

/// The order of the first pass (the local pieces, by index) that keeps the fewest old bytes in
/// memory, and how many it keeps (the fetched pieces following in file order). A piece whose
/// data moved towards the start of the file reads bytes that pieces after it overwrite, so
/// first-to-last order keeps nothing for it; one whose data moved towards the end needs
/// last-to-first. Tried: either order, and either kind of move first in its own order with the
/// rest after in the other; a plan with both kinds interleaved may keep some bytes whatever
/// the order.
fn local_order(
    me: u32,
    chunks: &[ChunkSpec],
    plan: &FilePlan,
    reads: &[Option<(u64, u64)>],
) -> (Vec<usize>, u64) {
    let positions = piece_positions(chunks, plan);
    let local: Vec<usize> = (0..plan.pieces.len())
        .filter(|&i| is_local(&plan.pieces[i]))
        .collect();
    let moved = |i: usize, up: bool| match plan.pieces[i] {
        Piece::Local { file, offset, .. } if file == me => {
            if up {
                offset < positions[i]
            } else {
                offset > positions[i]
            }
        }
        _ => false,
    };
    let rev = |v: &[usize]| v.iter().rev().copied().collect::<Vec<_>>();
    let up: Vec<usize> = local.iter().copied().filter(|&i| moved(i, true)).collect();
    let down: Vec<usize> = local.iter().copied().filter(|&i| moved(i, false)).collect();
    let not_up: Vec<usize> = local.iter().copied().filter(|&i| !moved(i, true)).collect();
    let not_down: Vec<usize> = local
        .iter()
        .copied()
        .filter(|&i| !moved(i, false))
        .collect();
    let candidates = [
        local.clone(),
        rev(&local),
        [rev(&up), not_up].concat(),
        [down, rev(&not_down)].concat(),
    ];
    let fetched: Vec<usize> = (0..plan.pieces.len())
        .filter(|&i| !is_local(&plan.pieces[i]))
        .collect();
    let mut best: Option<(Vec<usize>, u64)> = None;
    for order in candidates {
        let kept = kept_by(me, &order, &fetched, chunks, plan, &positions, reads);
        if best.as_ref().is_none_or(|(_, b)| kept < *b) {
            best = Some((order, kept));
        }
        if kept == 0 {
            break;
        }
    }
    best.unwrap_or_default()
}

/// The old bytes kept in memory when the pieces are done in `order`, then `fetched`.
fn kept_by(
    me: u32,
    order: &[usize],
    fetched: &[usize],
    chunks: &[ChunkSpec],
    plan: &FilePlan,
    positions: &[u64],
    reads: &[Option<(u64, u64)>],
) -> u64 {
    let mut pending = Pending::new(reads);
    let mut kept = 0u64;
    for &i in order.iter().chain(fetched) {
        pending.release(reads[i]);
        let piece = &plan.pieces[i];
        let pos = positions[i];
        let len = piece_len(piece, chunks);
        let in_place =
            matches!(*piece, Piece::Local { file, offset, .. } if file == me && offset == pos);
        if !in_place {
            kept += pending
                .overlaps(pos, pos + len)
                .iter()
                .map(|(s, e)| e - s)
                .sum::<u64>();
        }
    }
    kept
}

/// Fetches chunks of the file being updated again, by number, plainly (no references or patches
/// to local bytes), each checked against its id: the way out when local bytes a piece relied on
/// turned out to be different.
pub type Refetch<'r> = dyn FnMut(&[u32]) -> Result<Vec<Vec<u8>>> + 'r;

/// The numbers of the chunks that `[pos, pos + len)` covers (it starts on a chunk).
fn chunks_in(starts: &[u64], pos: u64, len: u64) -> Vec<u32> {
    let first = starts.partition_point(|&s| s < pos);
    let last = starts.partition_point(|&s| s < pos + len);
    (first as u32..last as u32).collect()
}

/// Whether `plan` can update index file `me` in place: every piece starts on a chunk, the pieces
/// add up to the file, it has at least [`MIN_SIZE`] bytes, and in the best order at most
/// [`MAX_SAVED`] old bytes have to be kept in memory.
pub fn suitable(me: u32, size: u64, chunks: &[ChunkSpec], plan: &FilePlan) -> bool {
    if !pieces_fit(size, chunks, plan) {
        return false;
    }
    let reads = readers(me, chunks, plan);
    local_order(me, chunks, plan, &reads).1 <= MAX_SAVED
}

/// The checks of [`suitable`] that do not depend on the order: at least [`MIN_SIZE`] bytes,
/// every piece starting on a chunk, the pieces adding up to the file.
fn pieces_fit(size: u64, chunks: &[ChunkSpec], plan: &FilePlan) -> bool {
    if size < MIN_SIZE {
        return false;
    }
    let starts = chunk_starts(chunks);
    let mut pos = 0u64;
    for piece in &plan.pieces {
        if starts.binary_search(&pos).is_err() {
            return false;
        }
        pos += piece_len(piece, chunks);
    }
    pos == size && starts.last() == Some(&size)
}

/// Bytes of the new file that an in-place update of index file `me` writes (everything but the
/// chunks already at their place).
pub fn rewritten(me: u32, chunks: &[ChunkSpec], plan: &FilePlan) -> u64 {
    let mut pos = 0u64;
    let mut rewrite = 0u64;
    for piece in &plan.pieces {
        let len = piece_len(piece, chunks);
        if !matches!(*piece, Piece::Local { file, offset, .. } if file == me && offset == pos) {
            rewrite += len;
        }
        pos += len;
    }
    rewrite
}

/// Bytes a piece produces.
fn piece_len(p: &Piece, chunks: &[ChunkSpec]) -> u64 {
    match *p {
        Piece::Zero(len) | Piece::Local { len, .. } => len,
        Piece::Fetch(n) | Piece::Repeat(n) => chunks.get(n as usize).map_or(0, |c| c.len as u64),
    }
}

/// `data` must be exactly the next chunks, starting at chunk `k`.
fn check_run(mut data: &[u8], chunks: &[ChunkSpec], dest: &Path, k: usize) -> Result<()> {
    for (j, c) in chunks.iter().enumerate() {
        if data.is_empty() {
            return Ok(());
        }
        let len = c.len as usize;
        if data.len() < len {
            break;
        }
        let actual = ChunkId::of(&data[..len]);
        if actual != c.id {
            return Err(Error::Integrity {
                what: format!("chunk {} of {}", k + j, dest.display()),
                expected: c.id.to_hex(),
                actual: actual.to_hex(),
            });
        }
        data = &data[len..];
    }
    if data.is_empty() {
        Ok(())
    } else {
        Err(Error::Protocol(format!(
            "local copy into {} does not end on a chunk boundary",
            dest.display()
        )))
    }
}

/// Make `len` bytes at `pos` read as zeros: a hole where allowed, else written zeros.
fn zero(file: &File, dest: &Path, pos: u64, len: u64, sparse: bool) -> Result<()> {
    use std::os::fd::AsRawFd;
    if sparse {
        // SAFETY: fallocate(2) on a file descriptor we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                pos as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
    }
    let zeros = vec![0u8; (len as usize).min(1 << 20)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], pos + done)
            .ctx("write", dest)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{chunk_file, tests_support::noise, ChunkParams};
    use crate::index::ChunkIndex;
    use crate::plan::plan_file;
    use crate::protocol::Codec;

    const PAGE: usize = 4096;

    /// How the test's sender encodes a chunk, given the old page at its offset.
    type Encode = dyn Fn(&[u8], Option<&[u8]>) -> (Codec, Vec<u8>);

    /// Write `old` as `pages-1.img`, update it in place to `new` (chunks fetched as `codec`
    /// produces them), and return the outcome and the file's content afterwards.
    fn run(old: &[u8], new: &[u8], codec: &Encode) -> (Outcome, Vec<u8>) {
        run_in(old, new, codec, false)
    }

    /// [`run`], updating a copy of the old file (read from the original, as for a reflink
    /// clone) when `apart`.
    fn run_in(old: &[u8], new: &[u8], codec: &Encode, apart: bool) -> (Outcome, Vec<u8>) {
        let d = tempfile::tempdir().unwrap();
        let p = ChunkParams::default().with_pages(true);
        let path = d.path().join("pages-1.img");
        std::fs::write(&path, old).unwrap();
        let mut idx = ChunkIndex::default();
        let me = idx.add(path.clone(), chunk_file(&path, p).unwrap());
        let newp = d.path().join("new/pages-1.img");
        std::fs::create_dir_all(newp.parent().unwrap()).unwrap();
        std::fs::write(&newp, new).unwrap();
        let fc = chunk_file(&newp, p).unwrap();
        let plan = plan_file(&fc.chunks, &idx);
        let offs = crate::manifest::chunk_offsets(&fc.chunks);
        let mut fetch = plan.fetch.clone().into_iter();
        let mut next = || {
            let n = fetch.next().unwrap();
            let o = offs[n as usize] as usize;
            let bytes = &new[o..o + fc.chunks[n as usize].len as usize];
            // The sender's basis: the old page at the same offset, when there is one.
            let base = old.get(o..o + bytes.len());
            let (c, payload) = codec(bytes, base);
            Ok((n, c, payload))
        };
        let table = FileTable::new(&idx);
        let mut refetch = |want: &[u32]| -> Result<Vec<Vec<u8>>> {
            Ok(want
                .iter()
                .map(|&n| {
                    let o = offs[n as usize] as usize;
                    new[o..o + fc.chunks[n as usize].len as usize].to_vec()
                })
                .collect())
        };
        // The file written: the old one itself, or a copy of it updated from the original.
        let written = if apart {
            let copy = d.path().join("copy");
            std::fs::write(&copy, old).unwrap();
            copy
        } else {
            path.clone()
        };
        let file = open_for_update(&written).unwrap();
        let original = apart.then(|| File::open(&path).unwrap());
        let out = update_open(
            &file,
            original.as_ref(),
            &written,
            me,
            fc.size,
            &fc.hash,
            &fc.chunks,
            &plan,
            &table,
            &mut next,
            &mut refetch,
            true,
        )
        .unwrap();
        if apart {
            assert!(std::fs::read(&path).unwrap() == old, "the original changed");
        }
        (out, std::fs::read(&written).unwrap())
    }

    /// A copy updated with the old content read from the unchanged original (the reflink
    /// clone's way) comes out as the new version, and the original is left alone.
    #[test]
    fn a_copy_updated_from_its_original_comes_out_right() {
        let (old, new) = images();
        let (out, got) = run_in(&old, &new, &raw, true);
        assert_eq!(out, Outcome::Done);
        assert!(got == new, "content differs after the update of the copy");
        let swapped = move_pages(&old, 0, 1024, 1024);
        let (out, got) = run_in(&old, &swapped, &raw, true);
        assert_eq!(out, Outcome::Done);
        assert!(
            got == swapped,
            "content differs after the update of the copy"
        );
    }

    /// Two memory images, `pages-1.img` (a) and `pages-2.img` (b), of 1100 pages each; b's new
    /// version takes a's pages 500..800 as its pages 100..400, so its plan copies them from a.
    /// Before b is updated in place, `meanwhile` changes a (given its path and content). Checks
    /// that b comes out right and returns how many chunks were fetched again and in how many
    /// requests.
    fn update_after_the_other_image_changed(
        seed: u64,
        meanwhile: impl FnOnce(&Path, &[u8]),
    ) -> (usize, usize) {
        let d = tempfile::tempdir().unwrap();
        let p = ChunkParams::default().with_pages(true);
        let shared = noise(seed, 1100 * PAGE);
        let (pa, pb) = (d.path().join("pages-1.img"), d.path().join("pages-2.img"));
        std::fs::write(&pa, &shared).unwrap();
        // b's old copy: its own pages.
        std::fs::write(&pb, noise(seed + 1, 1100 * PAGE)).unwrap();
        let mut idx = ChunkIndex::default();
        let ia = idx.add(pa.clone(), chunk_file(&pa, p).unwrap());
        let ib = idx.add(pb.clone(), chunk_file(&pb, p).unwrap());
        let mut newb = noise(seed + 1, 1100 * PAGE);
        newb[100 * PAGE..400 * PAGE].copy_from_slice(&shared[500 * PAGE..800 * PAGE]);
        let fcb = crate::chunk::chunk_pages(&newb);
        let plan = plan_file(&fcb.chunks, &idx);
        assert!(plan
            .pieces
            .iter()
            .any(|x| matches!(x, Piece::Local { file, .. } if *file == ia)));
        meanwhile(&pa, &shared);
        let table = FileTable::new(&idx);
        let offs = crate::manifest::chunk_offsets(&fcb.chunks);
        let mut fetch = plan.fetch.clone().into_iter();
        let mut next = || {
            let n = fetch.next().unwrap();
            let o = offs[n as usize] as usize;
            Ok((n, Codec::Raw, newb[o..o + PAGE].to_vec()))
        };
        let (mut asked, mut calls) = (0usize, 0usize);
        let mut refetch = |want: &[u32]| -> Result<Vec<Vec<u8>>> {
            asked += want.len();
            calls += 1;
            Ok(want
                .iter()
                .map(|&n| newb[offs[n as usize] as usize..][..PAGE].to_vec())
                .collect())
        };
        let out = update_open(
            &open_for_update(&pb).unwrap(),
            None,
            &pb,
            ib,
            fcb.size,
            &fcb.hash,
            &fcb.chunks,
            &plan,
            &table,
            &mut next,
            &mut refetch,
            true,
        )
        .unwrap();
        assert_eq!(out, Outcome::Done);
        assert!(std::fs::read(&pb).unwrap() == newb, "b came out wrong");
        (asked, calls)
    }

    /// Two memory images that share pages (processes of one program): the first is rewritten
    /// in place, then the second, whose plan copies shared pages from the first, is. The copies
    /// that no longer match are fetched again, alone, and the second image comes out right
    /// (it used to fail whole and be fetched again entirely).
    #[test]
    fn pages_copied_from_an_image_rewritten_in_place_meanwhile_are_fetched_again() {
        // Another lane rewrote a in place: its pages 450..850 are new.
        let (asked, calls) = update_after_the_other_image_changed(40, |pa, shared| {
            let mut newa = shared.to_vec();
            newa[450 * PAGE..850 * PAGE].copy_from_slice(&noise(42, 400 * PAGE));
            std::fs::write(pa, &newa).unwrap();
        });
        assert_eq!(asked, 300, "exactly the copied pages are fetched again");
        assert_eq!(calls, 1, "in one request (a round trip), not one per run");
    }

    /// As above, but the other image was cut shorter meanwhile, on a page boundary inside the
    /// copied range: the short read is not taken for the whole run (it left this file's stale
    /// pages in the rest of the run), those pages are fetched again.
    #[test]
    fn pages_copied_from_an_image_cut_shorter_meanwhile_are_fetched_again() {
        // a now ends at its page 600: the last 200 pages b copies from it are gone.
        let (asked, _) = update_after_the_other_image_changed(50, |pa, _| {
            let f = std::fs::OpenOptions::new().write(true).open(pa).unwrap();
            f.set_len(600 * PAGE as u64).unwrap();
        });
        assert!(
            asked >= 200,
            "the pages past a's new end are fetched again ({asked})"
        );
    }

    fn raw(b: &[u8], _: Option<&[u8]>) -> (Codec, Vec<u8>) {
        (Codec::Raw, b.to_vec())
    }

    /// An 8 MiB memory image, then the same with rewritten and partly edited pages, a zero
    /// page, and two pages inserted near the end (everything after them shifts).
    fn images() -> (Vec<u8>, Vec<u8>) {
        let old = noise(1, 8 << 20);
        let mut new = old.clone();
        for k in (3..2000).step_by(97) {
            new[k * PAGE..(k + 1) * PAGE].copy_from_slice(&noise(k as u64, PAGE));
        }
        for k in (5..2000).step_by(89) {
            new[k * PAGE + 100..k * PAGE + 140].copy_from_slice(&noise(7000 + k as u64, 40));
        }
        new[10 * PAGE..11 * PAGE].fill(0);
        let at = 1900 * PAGE;
        let mut shifted = new[..at].to_vec();
        shifted.extend_from_slice(&noise(99, 2 * PAGE));
        shifted.extend_from_slice(&new[at..]);
        (old, shifted)
    }

    #[test]
    fn edits_and_shifts_come_out_byte_identical() {
        let (old, new) = images();
        let (out, got) = run(&old, &new, &raw);
        assert_eq!(out, Outcome::Done);
        assert!(got == new, "content differs after the in-place update");
    }

    #[test]
    fn references_to_pages_being_replaced_and_to_shifted_pages_decode_right() {
        let (old, new) = images();
        let by_ref = |b: &[u8], base: Option<&[u8]>| match base {
            Some(base) => {
                let id = ChunkId::of(base);
                match crate::delta::encode_ref(b, base, &id, 3, b.len()) {
                    Some(r) => (Codec::Ref, r),
                    None => (Codec::Raw, b.to_vec()),
                }
            }
            None => (Codec::Raw, b.to_vec()),
        };
        let (out, got) = run(&old, &new, &by_ref);
        assert_eq!(out, Outcome::Done);
        assert!(got == new, "content differs after the in-place update");
    }

    /// Old bytes the best order keeps in memory to update `old` into `new`.
    fn kept(old: &[u8], new: &[u8]) -> u64 {
        let d = tempfile::tempdir().unwrap();
        let p = ChunkParams::default().with_pages(true);
        let path = d.path().join("pages-1.img");
        std::fs::write(&path, old).unwrap();
        let mut idx = ChunkIndex::default();
        let me = idx.add(path.clone(), chunk_file(&path, p).unwrap());
        let fc = crate::chunk::chunk_pages(new);
        let plan = plan_file(&fc.chunks, &idx);
        let reads = readers(me, &fc.chunks, &plan);
        local_order(me, &fc.chunks, &plan, &reads).1
    }

    /// Pages cut out of `v` at `at` (whole pages) and put back at `to` (of what is left).
    fn move_pages(v: &[u8], at: usize, n: usize, to: usize) -> Vec<u8> {
        let mut v = v.to_vec();
        let run: Vec<u8> = v.drain(at * PAGE..(at + n) * PAGE).collect();
        v.splice(to * PAGE..to * PAGE, run);
        v
    }

    /// Data that moved towards the end of the file (pages inserted before it), towards its
    /// start (pages removed before it), or both in different parts of the file, is updated in
    /// place without keeping old bytes in memory (`memmove` order), and comes out right.
    #[test]
    fn moved_data_is_copied_in_an_order_that_keeps_nothing() {
        let old = noise(11, 2048 * PAGE);
        let mut up = old.clone();
        up.splice(5 * PAGE..5 * PAGE, noise(12, 3 * PAGE));
        let mut down = old.clone();
        down.drain(3 * PAGE..7 * PAGE);
        let mut both = old.clone();
        both.drain(100 * PAGE..110 * PAGE);
        both.splice(1500 * PAGE..1500 * PAGE, noise(13, 20 * PAGE));
        // With both, the 20 inserted pages are fetched with the old pages at their chunk
        // numbers as delta bases, which the moved data after them has overwritten by then:
        // those 20 pages are kept (not the 2.2 MB the moved run covers).
        for (name, new, limit) in [
            ("up", &up, 0),
            ("down", &down, 0),
            ("both", &both, 20 * PAGE),
        ] {
            let k = kept(&old, new);
            assert!(k <= limit as u64, "{name}: {k} old bytes kept");
            let (out, got) = run(&old, new, &raw);
            assert_eq!(out, Outcome::Done, "{name}");
            assert!(
                got == *new,
                "{name}: content differs after the in-place update"
            );
        }
    }

    /// Regions that trade places cannot all be copied before they are overwritten: some old
    /// bytes are kept, and the result is right.
    #[test]
    fn swapped_regions_keep_some_old_bytes_and_come_out_right() {
        let old = noise(14, 2048 * PAGE);
        let new = move_pages(&old, 0, 1024, 1024);
        let k = kept(&old, &new);
        assert!(k > 0 && k <= 1024 * PAGE as u64, "kept {k}");
        let (out, got) = run(&old, &new, &raw);
        assert_eq!(out, Outcome::Done);
        assert!(got == new, "content differs after the in-place update");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]
        /// Runs of pages moved about, pages rewritten, inserted and removed: the file comes
        /// out as the new version, whatever order the pieces were written in.
        #[test]
        fn page_moves_come_out_byte_identical(
            seed in 0u64..1000,
            moves in proptest::collection::vec((0usize..1200, 1usize..300, 0usize..1200), 1..5),
            rewrites in proptest::collection::vec(0usize..1200, 0..20),
        ) {
            let old = noise(seed, 1200 * PAGE);
            let mut new = old.clone();
            for (k, (at, n, to)) in moves.into_iter().enumerate() {
                let pages = new.len() / PAGE;
                let at = at % pages;
                let n = n.min(pages - at);
                let to = to % (pages - n + 1);
                new = move_pages(&new, at, n, to);
                if k % 2 == 1 {
                    new.splice(to * PAGE..to * PAGE, noise(seed + k as u64, PAGE));
                }
            }
            for (k, p) in rewrites.into_iter().enumerate() {
                let p = p % (new.len() / PAGE);
                new[p * PAGE..(p + 1) * PAGE].copy_from_slice(&noise(9000 + k as u64, PAGE));
            }
            let (out, got) = run(&old, &new, &raw);
            proptest::prop_assert_eq!(out, Outcome::Done);
            proptest::prop_assert!(got == new, "content differs after the in-place update");
        }
    }

    #[test]
    fn small_files_are_left_to_the_staged_path_untouched() {
        let old = noise(3, 64 * PAGE);
        let mut new = old.clone();
        new[..PAGE].copy_from_slice(&noise(4, PAGE));
        let (out, got) = run(&old, &new, &raw);
        assert_eq!(out, Outcome::NotSuitable);
        assert!(got == old, "a file not suitable for in-place was changed");
    }
}
