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
