//! What a sync reports: statistics, itemized changes, per-entry errors, and live progress.

use crate::error::Error;
use crate::path::RelPath;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// Figures of one sync, as written by `--stats-json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Stats {
    /// Regular files in the source.
    pub files: u64,
    /// Their total size.
    pub bytes_total: u64,
    /// Bytes the destination supplied itself: unchanged files, chunks it already held, holes.
    pub bytes_reused: u64,
    /// Chunk bytes that had to be sent, before compression.
    pub bytes_literal: u64,
    /// Bytes that crossed the transport (for a local sync, the encoded frames passed between
    /// the two halves), protocol overhead included.
    pub bytes_wire: u64,
    /// Files written (created or replaced).
    pub files_written: u64,
    /// Files whose content was already right.
    pub files_unchanged: u64,
    /// Destination entries deleted (`--delete`).
    pub entries_deleted: u64,
    /// Entries that failed (see the error messages).
    pub errors: u64,
    /// Wall time of the whole sync.
    pub elapsed_ms: u64,
    /// Chunks the receiver took from those the sender pushed without being asked (a sender
    /// that knows what the receiver holds, e.g. a migration's later rounds): their files needed
    /// no want-list round trip.
    pub chunks_pushed: u64,
    /// Files written while their chunk list was still arriving (large files the sender put on
    /// the wire as it read them): their data crossed before the sender had read them whole.
    #[serde(default)]
    pub files_streamed: u64,
    /// Requests fetched over a stream of their own instead of their lane's streams: retries,
    /// and what a lane still had to fetch after one of its streams failed.
    #[serde(default)]
    pub fetches_alone: u64,
}

/// What happened (or, in a dry run, would happen) to one path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeKind {
    /// A new file, with the bytes sent for it.
    NewFile(u64),
    /// A changed file, with the bytes sent for it.
    UpdatedFile(u64),
    /// A new directory.
    NewDir,
    /// A new or changed symlink.
    Symlink,
    /// Only metadata (mode, times, owner) changed.
    Metadata,
    /// Deleted.
    Deleted,
}

/// One itemized change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The path, relative to the destination.
    pub path: RelPath,
    /// What changed.
    pub kind: ChangeKind,
}

/// The outcome of a sync: the run completed, possibly with per-entry errors.
#[derive(Debug, Default)]
pub struct Report {
    /// The figures.
    pub stats: Stats,
    /// Itemized changes, in application order.
    pub changes: Vec<Change>,
    /// Entries of kinds that are not synced, with their kind.
    pub skipped: Vec<(RelPath, String)>,
    /// Per-entry errors; entries not named here are correct at the destination.
    pub errors: Vec<Error>,
}

/// Live counters for a progress display; the engine updates them, a UI thread reads them.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes of files to produce (set once planning is done).
    pub bytes_planned: AtomicU64,
    /// Bytes of files produced so far.
    pub bytes_done: AtomicU64,
    /// Literal bytes received so far.
    pub bytes_literal: AtomicU64,
    /// Bytes that crossed the transport so far.
    pub bytes_wire: AtomicU64,
    /// Files produced so far.
    pub files_done: AtomicU64,
    /// Literal bytes of the files whose fetching ended; the rest of `bytes_literal` belongs to
    /// files still being fetched.
    pub bytes_literal_settled: AtomicU64,
    /// Sender: bytes of source files chunked so far.
    pub bytes_scanned: AtomicU64,
    /// Sender: bytes of chunks the receiver asked for so far (what it did not hold).
    pub bytes_wanted: AtomicU64,
    /// Sender: bytes of those chunks sent so far (before compression or delta encoding).
    pub bytes_sent: AtomicU64,
}

impl Progress {
    /// Add to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Read a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
