//! The receiver's plan: for every manifest entry, what to do, and for every file, where each
//! piece of its new content comes from (a hole, local data, or a chunk the sender must send).
//!
//! Planning is pure: it reads the manifest, what the destination holds and the chunk index, and
//! touches no file, so it is tested without disks or sockets.

use crate::index::{ChunkIndex, IdMap, Location};
use crate::manifest::{Entry, EntryKind, Meta};
use crate::path::RelPath;
use std::collections::HashMap;

/// What the destination has at a path before the sync.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestKind {
    /// A directory.
    Dir,
    /// A regular file, with its number in the chunk index when it could be indexed.
    File(Option<u32>),
    /// A symbolic link with its target.
    Symlink(Vec<u8>),
    /// Something else (FIFO, device, socket, or unreadable).
    Other,
}

/// One entry of the destination as scanned before the sync.
#[derive(Clone, Debug)]
pub struct DestEntry {
    /// Its kind.
    pub kind: DestKind,
    /// Its metadata.
    pub meta: Meta,
}

/// Where one run of a new file's bytes comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// `len` zero bytes, written as a hole.
    Zero(u64),
    /// Bytes the receiver already has, possibly several adjacent chunks merged into one read.
    Local {
        /// Index file number.
        file: u32,
        /// Offset in that file.
        offset: u64,
        /// Length of the run.
        len: u64,
    },
    /// Chunk number `n` of this file, which the sender sends.
    Fetch(u32),
    /// Chunk number `n`, a repeat of content already fetched earlier in this file.
    Repeat(u32),
}

/// How to build one file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FilePlan {
    /// The pieces in file order.
    pub pieces: Vec<Piece>,
    /// The chunk numbers to request, in order (the want-list of this file).
    pub fetch: Vec<u32>,
    /// Chunk numbers that are fetched once and used again later in the file: keep their bytes.
    pub keep: Vec<u32>,
    /// For each chunk of `fetch`, the local bytes it most likely is an edit of: index file and
    /// offset, aligned on the nearest chunk held locally (see [`crate::delta`]).
    pub bases: Vec<Option<(u32, u64)>>,
    /// Bytes to be sent.
    pub literal: u64,
    /// Bytes the receiver supplies from its own data (local copies and holes).
    pub reused: u64,
}

/// What to do with one manifest entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create the directory (or fix its metadata).
    Dir,
    /// Write the file from `FilePlan`.
    Write(FilePlan),
    /// The file's content is already right; fix metadata if it differs.
    Keep,
    /// Create or replace the symlink.
    Symlink,
    /// The symlink is already right; fix metadata if it differs.
    KeepLink,
    /// The sender could not read it: leave the destination alone.
    Skip,
}

/// The receiver's plan for a whole manifest.
#[derive(Debug, Default)]
pub struct Plan {
    /// One action per manifest entry, same order.
    pub actions: Vec<Action>,
    /// Destination paths to delete (deepest first), with `--delete`.
    pub delete: Vec<RelPath>,
}

impl Plan {
    /// Total bytes the sender must send.
    pub fn literal_bytes(&self) -> u64 {
        self.actions
            .iter()
            .map(|a| match a {
                Action::Write(fp) => fp.literal,
                _ => 0,
            })
            .sum()
    }
}

/// Plan how to build a file with `chunks` from what `index` holds.
pub fn plan_file(chunks: &[crate::manifest::ChunkSpec], index: &ChunkIndex) -> FilePlan {
    let mut fp = PartPlanner::default().part(chunks, index);
    fp.bases = bases(&fp.pieces, chunks);
    fp
}

/// Plans a file whose chunk list arrives in parts (a large file the sender sends while it
/// still reads it): each part is planned as it comes, against the index and the parts before
/// it, so that its chunks can be fetched and written before the rest of the list is known.
/// Chunk numbers in the plans are the file's, counted from its first chunk.
#[derive(Debug, Default)]
pub struct PartPlanner {
    /// Chunks fetched so far (in any part), by id: the first chunk number with that id.
    fetched: IdMap<u32>,
    /// Chunks planned so far.
    planned: u32,
    /// Bytes to be sent and bytes supplied here, of all parts so far.
    total: FilePlan,
}

impl PartPlanner {
    /// Plan the next `chunks` of the file. A chunk that repeats one fetched in this part is a
    /// [`Piece::Repeat`] listed in `keep`; one that repeats a chunk fetched in an earlier part
    /// is a [`Piece::Repeat`] too (its bytes are in the file already, see
    /// [`crate::assemble::Builder`]). No delta bases are guessed: `bases` is all `None`.
    pub fn part(&mut self, chunks: &[crate::manifest::ChunkSpec], index: &ChunkIndex) -> FilePlan {
        let mut fp = FilePlan::default();
        let first = self.planned;
        let mut keep: Vec<u32> = Vec::new();
        for (k, c) in chunks.iter().enumerate() {
            let n = first + k as u32;
            let len = c.len as u64;
            if c.zero {
                fp.reused += len;
                match fp.pieces.last_mut() {
                    Some(Piece::Zero(l)) => *l += len,
                    _ => fp.pieces.push(Piece::Zero(len)),
                }
            } else if let Some(Location { file, offset, .. }) = index.get(&c.id) {
                fp.reused += len;
                match fp.pieces.last_mut() {
                    Some(Piece::Local {
                        file: f,
                        offset: o,
                        len: l,
                    }) if *f == file && *o + *l == offset => *l += len,
                    _ => fp.pieces.push(Piece::Local { file, offset, len }),
                }
            } else if let Some(&earlier) = self.fetched.get(&c.id) {
                fp.reused += len;
                if earlier >= first {
                    keep.push(earlier);
                }
                fp.pieces.push(Piece::Repeat(earlier));
            } else {
                self.fetched.insert(c.id, n);
                fp.literal += len;
                fp.fetch.push(n);
                fp.pieces.push(Piece::Fetch(n));
            }
        }
        self.planned = first + chunks.len() as u32;
        keep.sort_unstable();
        keep.dedup();
        fp.keep = keep;
        fp.bases = vec![None; fp.fetch.len()];
        self.total.literal += fp.literal;
        self.total.reused += fp.reused;
        fp
    }

    /// Chunks planned so far.
    pub fn planned(&self) -> u32 {
        self.planned
    }

    /// The byte counts of all parts so far (`literal`, `reused`), as a plan without pieces: a
    /// file of millions of chunks keeps no second copy of its plan.
    pub fn total(&self) -> FilePlan {
        self.total.clone()
    }
}

/// Guess the base of every fetched chunk: the same distance from the nearest local run before
/// it (or, failing that, after it) in the old data as in the new.
fn bases(pieces: &[Piece], chunks: &[crate::manifest::ChunkSpec]) -> Vec<Option<(u32, u64)>> {
    // (new offset, file, old offset) of each local run.
    let mut anchors: Vec<(u64, u32, u64)> = Vec::new();
    let mut fetches: Vec<u64> = Vec::new();
    let mut at = 0u64;
    for p in pieces {
        match *p {
            Piece::Zero(len) => at += len,
            Piece::Local { file, offset, len } => {
                anchors.push((at, file, offset));
                at += len;
            }
            Piece::Fetch(n) => {
                fetches.push(at);
                at += chunks[n as usize].len as u64;
            }
            Piece::Repeat(n) => at += chunks[n as usize].len as u64,
        }
    }
    fetches
        .into_iter()
        .map(|x| {
            let i = anchors.partition_point(|a| a.0 <= x);
            if i > 0 {
                let (new, file, old) = anchors[i - 1];
                Some((file, old + (x - new)))
            } else {
                let &(new, file, old) = anchors.first()?;
                old.checked_sub(new - x).map(|o| (file, o))
            }
        })
        .collect()
}

/// What to do with one manifest entry, given what the destination has at its path.
pub fn action(e: &Entry, have: Option<&DestEntry>, index: &ChunkIndex) -> Action {
    match &e.kind {
        EntryKind::Dir => Action::Dir,
        EntryKind::Unreadable => Action::Skip,
        EntryKind::Symlink { target } => match have.map(|h| &h.kind) {
            Some(DestKind::Symlink(t)) if t == target => Action::KeepLink,
            _ => Action::Symlink,
        },
        EntryKind::File { size, hash, chunks } => {
            let same = match have.map(|h| &h.kind) {
                Some(DestKind::File(Some(f))) => {
                    let held = &index.files[*f as usize].chunks;
                    held.size == *size && held.hash == *hash
                }
                _ => false,
            };
            if same {
                Action::Keep
            } else {
                Action::Write(plan_file(chunks, index))
            }
        }
    }
}

/// With `--delete`: the destination paths not in the manifest, deepest first. Paths under an
/// entry the sender could not read are protected.
pub fn deletions(manifest: &[Entry], dest: &HashMap<RelPath, DestEntry>) -> Vec<RelPath> {
    let in_source: std::collections::HashSet<&RelPath> = manifest.iter().map(|e| &e.path).collect();
    let protected: Vec<&RelPath> = manifest
        .iter()
        .filter(|e| e.kind == EntryKind::Unreadable)
        .map(|e| &e.path)
        .collect();
    let mut del: Vec<RelPath> = dest
        .keys()
        .filter(|p| !in_source.contains(p) && !protected.iter().any(|q| p.starts_with(q)))
        .cloned()
        .collect();
    // Deepest first, so directories are empty when their turn comes.
    del.sort_by(|a, b| b.depth().cmp(&a.depth()).then_with(|| a.cmp(b)));
    del
}

/// Plan a whole sync. `dest` maps the destination's paths to what is there now.
pub fn plan(
    manifest: &[Entry],
    dest: &HashMap<RelPath, DestEntry>,
    index: &ChunkIndex,
    delete: bool,
) -> Plan {
    Plan {
        actions: manifest
            .iter()
            .map(|e| action(e, dest.get(&e.path), index))
            .collect(),
        delete: if delete {
            deletions(manifest, dest)
        } else {
            Vec::new()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{chunk_bytes, ChunkParams};

    #[test]
    fn unchanged_content_is_all_local_and_merged() {
        let p = ChunkParams::default();
        let data = crate::chunk::tests_support::noise(1, 1 << 20);
        let fc = chunk_bytes(&data, p);
        let mut idx = ChunkIndex::default();
        idx.add("/old".into(), fc.clone());
        let fp = plan_file(&fc.chunks, &idx);
        assert_eq!(fp.literal, 0);
        assert!(fp.fetch.is_empty());
        assert_eq!(
            fp.pieces,
            vec![Piece::Local {
                file: 0,
                offset: 0,
                len: 1 << 20
            }]
        );
    }

    /// A list planned in parts fetches what the whole list fetches, numbered as in the file;
    /// a repeat of a chunk fetched in an earlier part is kept out of the part's `keep`.
    #[test]
    fn a_list_planned_in_parts_fetches_what_the_whole_list_does() {
        let p = ChunkParams::new(1024, 4096, 32768).unwrap();
        let a = crate::chunk::tests_support::noise(5, 100_000);
        let mut data = a.clone();
        data.extend(crate::chunk::tests_support::noise(6, 150_000));
        data.extend_from_slice(&a);
        let fc = chunk_bytes(&data, p);
        let idx = ChunkIndex::default();
        let whole = plan_file(&fc.chunks, &idx);
        assert!(!whole.keep.is_empty(), "the data repeats");
        let mut planner = PartPlanner::default();
        let parts: Vec<FilePlan> = fc.chunks.chunks(7).map(|c| planner.part(c, &idx)).collect();
        let fetch: Vec<u32> = parts.iter().flat_map(|f| f.fetch.clone()).collect();
        assert_eq!(fetch, whole.fetch);
        let pieces: Vec<Piece> = parts.iter().flat_map(|f| f.pieces.clone()).collect();
        assert_eq!(pieces, whole.pieces);
        assert_eq!(planner.planned() as usize, fc.chunks.len());
        assert_eq!(planner.total().literal, whole.literal);
        assert_eq!(planner.total().reused, whole.reused);
        // Every part keeps only chunks it fetches itself.
        for f in &parts {
            assert!(f.keep.iter().all(|k| f.fetch.contains(k)), "{f:?}");
            assert_eq!(f.bases.len(), f.fetch.len());
        }
        let kept: usize = parts.iter().map(|f| f.keep.len()).sum();
        assert!(
            kept < whole.keep.len(),
            "repeats across parts are read back"
        );
    }

    #[test]
    fn new_zero_and_repeated_chunks() {
        let p = ChunkParams::new(1024, 4096, 32768).unwrap();
        let a = crate::chunk::tests_support::noise(2, 100_000);
        let mut data = a.clone();
        data.extend(vec![0u8; 200_000]);
        data.extend_from_slice(&a);
        let fc = chunk_bytes(&data, p);
        let idx = ChunkIndex::default();
        let fp = plan_file(&fc.chunks, &idx);
        // The second copy of `a` is (mostly) repeats and the inner zero chunks cost nothing;
        // only the two chunks straddling the zero run (each at most `max`) are sent besides `a`.
        assert!(
            fp.literal <= 100_000 + 2 * 32768 + 4096,
            "literal {}",
            fp.literal
        );
        assert!(fp.pieces.iter().any(|p| matches!(p, Piece::Zero(_))));
        assert!(fp.pieces.iter().any(|p| matches!(p, Piece::Repeat(_))));
        assert_eq!(fp.literal + fp.reused, data.len() as u64);
    }

    #[test]
    fn delete_spares_protected_and_orders_deepest_first() {
        let m = vec![
            Entry {
                path: RelPath::root(),
                kind: EntryKind::Dir,
                meta: Meta::default(),
            },
            Entry {
                path: RelPath::from_bytes(b"locked".to_vec()).unwrap(),
                kind: EntryKind::Unreadable,
                meta: Meta::default(),
            },
        ];
        let mut dest = HashMap::new();
        for p in ["old", "old/sub", "old/sub/f", "locked/keep"] {
            dest.insert(
                RelPath::from_bytes(p.as_bytes().to_vec()).unwrap(),
                DestEntry {
                    kind: DestKind::Other,
                    meta: Meta::default(),
                },
            );
        }
        let plan = plan(&m, &dest, &ChunkIndex::default(), true);
        let names: Vec<String> = plan.delete.iter().map(|p| p.display()).collect();
        assert_eq!(names, ["old/sub/f", "old/sub", "old"]);
        assert_eq!(plan.actions, vec![Action::Dir, Action::Skip]);
    }
}
