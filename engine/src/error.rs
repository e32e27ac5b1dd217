//! Typed errors of the engine. The CLI adds context; every variant names what failed and where.

use std::io;
use std::path::PathBuf;

/// Everything the engine can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a local path failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("read", "create", "rename", ...).
        op: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// Chunking parameters out of range.
    #[error("invalid chunk sizes: {0}")]
    ChunkParams(String),
    /// A path received from a peer or a manifest is not a safe relative path.
    #[error("unsafe path {path:?}: {why}")]
    UnsafePath {
        /// The offending path, lossily decoded.
        path: String,
        /// Why it was refused.
        why: &'static str,
    },
    /// Bytes from a peer could not be decoded (corrupt, truncated, over a limit).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Data did not match its BLAKE3 hash.
    #[error("integrity check failed for {what}: expected {expected}, got {actual}")]
    Integrity {
        /// What was being verified (a chunk id or a path).
        what: String,
        /// The hash that was promised.
        expected: String,
        /// The hash of the data received.
        actual: String,
    },
    /// The source changed while it was being synced.
    #[error("{path} changed while it was being synced; run again")]
    SourceChanged {
        /// The file that changed.
        path: PathBuf,
    },
    /// An entry in the destination is in the way and may not be removed.
    #[error("{path}: {why}")]
    Conflict {
        /// The destination path.
        path: PathBuf,
        /// What is wrong and what to do about it.
        why: String,
    },
    /// A limit that protects the receiver was exceeded.
    #[error("limit exceeded: {0}")]
    Limit(String),
    /// Compression or decompression failed.
    #[error("compression: {0}")]
    Compression(String),
    /// The network connection failed, timed out or was closed.
    #[error("connection: {0}")]
    Transport(String),
    /// Authentication failed or a peer's identity is not trusted.
    #[error("{0}")]
    Trust(String),
    /// An include/exclude pattern or rules file is not usable.
    #[error("filter: {0}")]
    Filter(String),
    /// The peer refused the request or reported a failure of its own.
    #[error("{0}")]
    Remote(String),
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach an operation name and a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            op,
            path: path.into(),
            source,
        })
    }
}

impl Error {
    /// The underlying OS error kind, when this is an I/O error.
    pub fn io_kind(&self) -> Option<io::ErrorKind> {
        match self {
            Error::Io { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}
