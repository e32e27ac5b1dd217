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
use crate::manifest::ChunkSpec;
use crate::plan::{FilePlan, Piece};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Most bytes rewritten in place (their old content is kept in memory while the file is
/// updated, for copies and delta bases that still need it); more, and in-place is not used.
pub const MAX_REWRITE: u64 = 256 << 20;

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

/// The old content of the file while it is rewritten. Ranges the plan reads later (copies to
/// other offsets, delta bases) keep their old bytes in memory before they are overwritten;
/// other overwritten ranges are marked, and a read that meets one fails (the caller then
/// rebuilds the file whole) rather than return new bytes for old.
struct OldView<'f> {
    file: &'f File,
    dest: &'f Path,
    old_len: u64,
    /// Ranges (start -> end) the plan reads from this file, merged.
    needed: BTreeMap<u64, u64>,
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
    /// About to overwrite `[pos, pos + len)`: keep its old bytes if the plan reads them later.
    fn save(&mut self, pos: u64, len: u64) -> Result<()> {
        let end = (pos + len).min(self.old_len);
        if end <= pos {
            return Ok(());
        }
        if meets(&self.needed, pos, end) {
            let mut buf = vec![0u8; (end - pos) as usize];
            self.file
                .read_exact_at(&mut buf, pos)
                .ctx("read", self.dest)?;
            self.saved.insert(pos, buf);
        } else {
            self.lost.insert(pos, end);
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

/// Update `dest` (index file `me` of `files`) to the content described by `chunks`, following
/// `plan`. An error after the first write leaves `dest` partly updated.
#[allow(clippy::too_many_arguments)]
pub fn update(
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
    if !suitable(me, size, chunks, plan) {
        return Ok(Outcome::NotSuitable);
    }
    let starts = chunk_starts(chunks);
    let chunk_at = |pos: u64| starts.binary_search(&pos).ok();

    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dest)
        .ctx("open for update", dest)?;
    let old_len = file.metadata().ctx("stat", dest)?.len();
    let mut old = OldView {
        file: &file,
        dest,
        old_len,
        needed: needed_ranges(me, chunks, plan),
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
    let mut positions = Vec::with_capacity(plan.pieces.len());
    let mut end = 0u64;
    for piece in &plan.pieces {
        positions.push(end);
        end += piece_len(piece, chunks);
    }
    // Two passes over the pieces: first everything this side holds (copies and zeros), while
    // the fetched chunks are still on their way; then the fetched chunks (and repeats of them)
    // in the order they arrive. One pass in file order made the copies wait for the network,
    // so most of them were left for after the last chunk had come (a 660 MB image: 0.25 s of
    // copying after the transfer). The passes write disjoint ranges, every read is of old
    // bytes (kept in memory where an earlier write covered them), so the order does not
    // change the result.
    for local_pass in [true, false] {
        for (piece, &pos) in plan.pieces.iter().zip(&positions) {
            let is_local = matches!(piece, Piece::Local { .. } | Piece::Zero(_));
            if is_local != local_pass {
                continue;
            }
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
                    zero(&file, dest, pos, len, sparse)?;
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

/// The ranges of file `me` that `plan` reads: copies from other offsets and delta bases.
fn needed_ranges(me: u32, chunks: &[ChunkSpec], plan: &FilePlan) -> BTreeMap<u64, u64> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    let mut fetched = 0usize;
    for piece in &plan.pieces {
        match *piece {
            Piece::Local { file, offset, len } if file == me && offset != pos => {
                ranges.push((offset, offset + len));
            }
            Piece::Fetch(n) => {
                // A base at the chunk's own place is read before that place is overwritten.
                if let (Some(Some((file, offset))), Some(c)) =
                    (plan.bases.get(fetched), chunks.get(n as usize))
                {
                    if *file == me && *offset != pos {
                        ranges.push((*offset, offset + c.len as u64));
                    }
                }
                fetched += 1;
            }
            _ => {}
        }
        pos += piece_len(piece, chunks);
    }
    ranges.sort_unstable();
    let mut merged: BTreeMap<u64, u64> = BTreeMap::new();
    let mut cur: Option<(u64, u64)> = None;
    for (s, e) in ranges {
        match cur {
            Some((cs, ce)) if s <= ce => cur = Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                merged.insert(cs, ce);
                cur = Some((s, e));
            }
            None => cur = Some((s, e)),
        }
    }
    if let Some((cs, ce)) = cur {
        merged.insert(cs, ce);
    }
    merged
}

/// Where each chunk starts, and the total length last.
fn chunk_starts(chunks: &[ChunkSpec]) -> Vec<u64> {
    let mut starts = Vec::with_capacity(chunks.len() + 1);
    let mut at = 0u64;
    for c in chunks {
        starts.push(at);
        at += c.len as u64;
    }
    starts.push(at);
    starts
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
/// add up to the file, it has at least [`MIN_SIZE`] bytes and at most [`MAX_REWRITE`] of them are
/// rewritten.
pub fn suitable(me: u32, size: u64, chunks: &[ChunkSpec], plan: &FilePlan) -> bool {
    if size < MIN_SIZE {
        return false;
    }
    let starts = chunk_starts(chunks);
    let mut pos = 0u64;
    let mut rewrite = 0u64;
    for piece in &plan.pieces {
        if starts.binary_search(&pos).is_err() {
            return false;
        }
        let len = piece_len(piece, chunks);
        if !matches!(*piece, Piece::Local { file, offset, .. } if file == me && offset == pos) {
            rewrite += len;
        }
        pos += len;
    }
    pos == size && starts.last() == Some(&size) && rewrite <= MAX_REWRITE
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
        let out = update(
            &path,
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
        (out, std::fs::read(&path).unwrap())
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
        let out = update(
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
