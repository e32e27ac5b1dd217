//! The manifest: what the sender's tree contains, entry by entry, in the order the receiver
//! applies it (parents before children, names sorted within a directory).

use crate::id::ChunkId;
use crate::path::RelPath;
use serde::{Deserialize, Serialize};

/// Metadata kept for every entry (what `rsync -a` keeps, without ACLs and xattrs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Meta {
    /// Permission bits, including setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime_sec: i64,
    /// Modification time, nanoseconds part.
    pub mtime_nsec: u32,
    /// Owner. Applied only when the receiver runs as root, like rsync.
    pub uid: u32,
    /// Group. Applied only when the receiver runs as root.
    pub gid: u32,
}

/// One chunk of a file as the manifest describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSpec {
    /// Length in bytes (chunks are contiguous: offsets are the running sum).
    pub len: u32,
    /// BLAKE3 of the chunk's bytes.
    pub id: ChunkId,
    /// The chunk is all zero bytes: it is never sent and is written as a hole.
    pub zero: bool,
}

/// What kind of entry, with the data that kind needs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file with its chunks and whole-file hash.
    File {
        /// Size in bytes.
        size: u64,
        /// BLAKE3 of the whole content.
        hash: ChunkId,
        /// The chunks, in order; their lengths add up to `size`.
        chunks: Vec<ChunkSpec>,
    },
    /// A symbolic link, kept as a link with its target verbatim.
    Symlink {
        /// The link's target bytes.
        target: Vec<u8>,
    },
    /// The sender could not read this entry. The receiver leaves whatever it has there alone
    /// (and never deletes it), like rsync after an I/O error.
    Unreadable,
}

/// One entry of the tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Where, relative to the tree's root (empty for the root itself).
    pub path: RelPath,
    /// What it is.
    pub kind: EntryKind,
    /// Its metadata.
    pub meta: Meta,
}

impl Entry {
    /// The file size, or 0 for other kinds.
    pub fn size(&self) -> u64 {
        match &self.kind {
            EntryKind::File { size, .. } => *size,
            _ => 0,
        }
    }
}

/// File offsets of a chunk list: `offsets[i]` is where chunk `i` starts.
pub fn chunk_offsets(chunks: &[ChunkSpec]) -> Vec<u64> {
    let mut off = 0u64;
    chunks
        .iter()
        .map(|c| {
            let o = off;
            off += c.len as u64;
            o
        })
        .collect()
}

/// [`chunk_offsets`] with the total length appended: chunk `i` is `starts[i]..starts[i + 1]`.
pub fn chunk_starts(chunks: &[ChunkSpec]) -> Vec<u64> {
    let mut starts = chunk_offsets(chunks);
    starts.push(chunks.iter().map(|c| c.len as u64).sum());
    starts
}

/// Most entries a manifest may hold (a limit against a hostile sender).
pub const MAX_ENTRIES: usize = 1 << 24;

/// Checks a manifest entry by entry as it arrives from a sender, before anything is done with
/// the entry: the first entry is the root, and only the first; every other entry's parent
/// appeared earlier as a directory (so no entry can be written through a symlink or a file); no
/// path twice; chunk lengths are non-zero, at most `max_chunk`, and add up to the file size.
#[derive(Debug)]
pub struct Validator {
    max_chunk: u32,
    count: usize,
    dirs: std::collections::HashSet<RelPath>,
    seen: std::collections::HashSet<RelPath>,
}

impl Validator {
    /// A validator for a manifest whose chunks are at most `max_chunk` bytes.
    pub fn new(max_chunk: u32) -> Validator {
        Validator {
            max_chunk,
            count: 0,
            dirs: Default::default(),
            seen: Default::default(),
        }
    }

    /// Check the path of a file whose entry will be the next one, before its chunk list is
    /// complete (see [`crate::chunklist::Incoming::Begin`]): what [`Validator::check`] will ask
    /// of its path. Changes nothing.
    pub fn admits(&self, path: &RelPath) -> crate::Result<()> {
        let first = self.count == 0;
        let ok = self.count < MAX_ENTRIES
            && first == path.is_root()
            && (first || self.dirs.contains(&path.parent()))
            && !self.seen.contains(path);
        if ok {
            Ok(())
        } else {
            Err(crate::Error::Protocol(format!(
                "malformed manifest at {:?}: a file out of place",
                path.display()
            )))
        }
    }

    /// Check a part of the chunk list of a file begun with [`Validator::admits`]: its chunks'
    /// lengths in range, and `listed` (the bytes of the list so far, this part included) within
    /// the file's `size`.
    pub fn check_part(&self, chunks: &[ChunkSpec], listed: u64, size: u64) -> crate::Result<()> {
        if chunks.iter().any(|c| c.len == 0 || c.len > self.max_chunk) {
            return Err(crate::Error::Protocol(
                "malformed manifest: chunk length out of range".into(),
            ));
        }
        if listed > size {
            return Err(crate::Error::Protocol(
                "malformed manifest: chunk lengths exceed the file size".into(),
            ));
        }
        Ok(())
    }

    /// Check the next entry.
    pub fn check(&mut self, e: &Entry) -> crate::Result<()> {
        use crate::Error;
        let bad = |why: &str| {
            Err(Error::Protocol(format!(
                "malformed manifest at {:?}: {why}",
                e.path.display()
            )))
        };
        if self.count >= MAX_ENTRIES {
            return Err(Error::Limit(format!(
                "manifest of more than {MAX_ENTRIES} entries"
            )));
        }
        let first = self.count == 0;
        self.count += 1;
        if first != e.path.is_root() {
            return bad("the root must be the first entry and appear once");
        }
        if !first && !self.dirs.contains(&e.path.parent()) {
            return bad("its parent is not a directory listed before it");
        }
        if !self.seen.insert(e.path.clone()) {
            return bad("path appears twice");
        }
        match &e.kind {
            EntryKind::Dir => {
                self.dirs.insert(e.path.clone());
            }
            EntryKind::File { size, chunks, .. } => {
                let mut sum = 0u64;
                for c in chunks {
                    if c.len == 0 || c.len > self.max_chunk {
                        return bad("chunk length out of range");
                    }
                    sum += c.len as u64;
                }
                if sum != *size {
                    return bad("chunk lengths do not add up to the file size");
                }
            }
            EntryKind::Symlink { .. } | EntryKind::Unreadable => {}
        }
        Ok(())
    }
}

/// Check a whole manifest with a [`Validator`].
pub fn validate(entries: &[Entry], max_chunk: u32) -> crate::Result<()> {
    let mut v = Validator::new(max_chunk);
    entries.iter().try_for_each(|e| v.check(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: RelPath::from_bytes(path.as_bytes().to_vec()).unwrap(),
            kind,
            meta: Meta::default(),
        }
    }

    fn file(len: u32) -> EntryKind {
        EntryKind::File {
            size: len as u64,
            hash: ChunkId::of(b""),
            chunks: vec![ChunkSpec {
                len,
                id: ChunkId::of(b""),
                zero: false,
            }],
        }
    }

    #[test]
    fn validate_accepts_trees_and_refuses_crafted_ones() {
        let link = EntryKind::Symlink {
            target: b"/etc".to_vec(),
        };
        let ok = vec![
            entry("", EntryKind::Dir),
            entry("d", EntryKind::Dir),
            entry("d/f", file(10)),
            entry("l", link.clone()),
        ];
        assert!(validate(&ok, 100).is_ok());
        assert!(validate(&[entry("", file(10))], 100).is_ok());
        let cases: Vec<Vec<Entry>> = vec![
            // A file written through a symlink sent earlier.
            vec![
                entry("", EntryKind::Dir),
                entry("l", link),
                entry("l/x", file(1)),
            ],
            // A parent that is not in the manifest.
            vec![entry("", EntryKind::Dir), entry("a/b", file(1))],
            // Twice the same path.
            vec![
                entry("", EntryKind::Dir),
                entry("a", file(1)),
                entry("a", file(1)),
            ],
            // No root first.
            vec![entry("a", file(1))],
            // Chunk larger than allowed, and lengths that do not add up.
            vec![entry("", file(1000))],
            vec![entry(
                "",
                EntryKind::File {
                    size: 5,
                    hash: ChunkId::of(b""),
                    chunks: vec![],
                },
            )],
        ];
        for c in cases {
            assert!(validate(&c, 100).is_err(), "accepted {c:?}");
        }
    }
}
