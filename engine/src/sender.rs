//! The sending half: scan and chunk the source tree into a manifest, then supply the chunks the
//! receiver asks for (optionally zstd-compressed).

use crate::chunk::{chunk_file, ChunkParams, FileChunks};
use crate::error::{Error, IoContext, Result};
use crate::index::IndexCache;
use crate::manifest::{chunk_offsets, Entry, EntryKind};
use crate::path::RelPath;
use crate::protocol::{Codec, Frame};
use crate::scan::{scan, Filter, ScanKind};
use rayon::prelude::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Sender settings.
#[derive(Clone, Debug, Default)]
pub struct SenderOptions {
    /// Chunk sizes.
    pub params: ChunkParams,
    /// zstd level for chunk payloads; `None` sends them raw. Chunks that do not shrink are sent
    /// raw either way.
    pub compress: Option<i32>,
    /// Where to keep the chunk lists of source files between runs, so that unchanged files
    /// (same size, mtime, ctime, inode) are not read again. `None`: no cache.
    pub cache: Option<PathBuf>,
}

/// The sending half of a sync.
pub struct Sender {
    root: PathBuf,
    opts: SenderOptions,
    manifest: Vec<Entry>,
    offsets: Vec<Vec<u64>>,
    /// Entries of kinds that are not synced.
    pub skipped: Vec<(RelPath, &'static str)>,
    /// Read errors met while scanning and chunking.
    pub errors: Vec<Error>,
}

impl Sender {
    /// Scan and chunk the tree at `root` (files in parallel, large files split across cores).
    pub fn new(root: &Path, filter: Option<Filter<'_>>, opts: SenderOptions) -> Sender {
        let s = scan(root, filter);
        let mut errors = s.errors;
        let cache = match &opts.cache {
            Some(p) => IndexCache::load(p, opts.params),
            None => IndexCache::default(),
        };
        let fresh: std::sync::Mutex<Vec<(PathBuf, std::fs::Metadata, FileChunks)>> =
            Default::default();
        let chunked: Vec<(Entry, Option<Error>)> = s
            .entries
            .into_par_iter()
            .map(|e| {
                let kind = match e.kind {
                    ScanKind::Dir => EntryKind::Dir,
                    ScanKind::Unreadable => EntryKind::Unreadable,
                    ScanKind::Symlink { target } => EntryKind::Symlink { target },
                    ScanKind::File { .. } => {
                        match chunk_cached(&e.path.under(root), opts.params, &cache, &fresh) {
                            Ok(fc) => EntryKind::File {
                                size: fc.size,
                                hash: fc.hash,
                                chunks: fc.chunks,
                            },
                            Err(err) => {
                                return (
                                    Entry {
                                        path: e.path,
                                        kind: EntryKind::Unreadable,
                                        meta: e.meta,
                                    },
                                    Some(err),
                                )
                            }
                        }
                    }
                };
                (
                    Entry {
                        path: e.path,
                        kind,
                        meta: e.meta,
                    },
                    None,
                )
            })
            .collect();
        if let Some(p) = &opts.cache {
            let mut cache = cache;
            for (path, md, fc) in fresh.into_inner().unwrap_or_else(|e| e.into_inner()) {
                cache.record_read(&path, &md, fc);
            }
            if let Some(dir) = p.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if let Err(e) = cache.save(p) {
                tracing::warn!("could not save the source chunk cache: {e}");
            }
        }
        let mut manifest = Vec::with_capacity(chunked.len());
        for (e, err) in chunked {
            errors.extend(err);
            manifest.push(e);
        }
        let offsets = manifest
            .iter()
            .map(|e| match &e.kind {
                EntryKind::File { chunks, .. } => chunk_offsets(chunks),
                _ => Vec::new(),
            })
            .collect();
        Sender {
            root: root.to_path_buf(),
            opts,
            manifest,
            offsets,
            skipped: s.skipped,
            errors,
        }
    }

    /// The manifest, in application order.
    pub fn manifest(&self) -> &[Entry] {
        &self.manifest
    }

    /// Supply chunks `want` of manifest entry `entry`, in that order, as `Data` frames passed to
    /// `emit`; where `hints` describes a base for a chunk and a patch against it is smaller, the
    /// patch is sent (see [`crate::delta`]). If the file can no longer be read as chunked, one
    /// `Failed` frame is emitted instead of the remaining data.
    pub fn serve(
        &self,
        entry: u32,
        want: &[u32],
        hints: &[Vec<crate::delta::BlockHash>],
        emit: &mut dyn FnMut(Frame) -> Result<()>,
    ) -> Result<()> {
        let e = self
            .manifest
            .get(entry as usize)
            .ok_or_else(|| Error::Protocol(format!("no manifest entry {entry}")))?;
        let EntryKind::File { chunks, .. } = &e.kind else {
            return Err(Error::Protocol(format!("entry {entry} is not a file")));
        };
        let path = e.path.under(&self.root);
        let file = match crate::assemble::open_nofollow(&path) {
            Ok(f) => f,
            Err(err) => {
                return emit(Frame::Failed {
                    entry,
                    reason: err.to_string(),
                })
            }
        };
        let offsets = &self.offsets[entry as usize];
        for (k, &n) in want.iter().enumerate() {
            let spec = chunks
                .get(n as usize)
                .ok_or_else(|| Error::Protocol(format!("entry {entry} has no chunk {n}")))?;
            let mut buf = vec![0u8; spec.len as usize];
            if let Err(err) = file.read_exact_at(&mut buf, offsets[n as usize]) {
                let reason = if err.kind() == std::io::ErrorKind::UnexpectedEof {
                    Error::SourceChanged { path: path.clone() }.to_string()
                } else {
                    err.to_string()
                };
                return emit(Frame::Failed { entry, reason });
            }
            let patch = hints
                .get(k)
                .filter(|h| !h.is_empty())
                .and_then(|h| crate::delta::encode(&buf, h, buf.len() * 3 / 4));
            let (codec, bytes) = match patch {
                Some(p) => match encode_payload(p, self.opts.compress) {
                    (Codec::Zstd, z) => (Codec::PatchZstd, z),
                    (_, p) => (Codec::Patch, p),
                },
                None => encode_payload(buf, self.opts.compress),
            };
            emit(Frame::Data {
                entry,
                chunk: n,
                codec,
                bytes,
            })?;
        }
        Ok(())
    }
}

/// Chunk lists of files chunked in this run, with the stat they were read under.
type Fresh = std::sync::Mutex<Vec<(PathBuf, std::fs::Metadata, FileChunks)>>;

/// The chunks of `path`, from the cache when its stat is unchanged, else read (and remembered in
/// `fresh` for the next run).
fn chunk_cached(
    path: &Path,
    params: ChunkParams,
    cache: &IndexCache,
    fresh: &Fresh,
) -> Result<FileChunks> {
    let md = std::fs::symlink_metadata(path).ctx("stat", path)?;
    if let Some(fc) = cache.lookup(path, &md) {
        return Ok(fc.clone());
    }
    let fc = chunk_file(path, params)?;
    fresh
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((path.to_path_buf(), md, fc.clone()));
    Ok(fc)
}

/// Compress a chunk payload when that makes it smaller.
pub fn encode_payload(data: Vec<u8>, level: Option<i32>) -> (Codec, Vec<u8>) {
    if let Some(level) = level {
        if let Ok(z) = zstd::bulk::compress(&data, level) {
            if z.len() < data.len() {
                return (Codec::Zstd, z);
            }
        }
    }
    (Codec::Raw, data)
}

/// Decode a chunk payload of expected length `len`. Decompression never produces more than `len`
/// bytes, so a compression bomb costs nothing.
pub fn decode_payload(codec: Codec, bytes: Vec<u8>, len: usize) -> Result<Vec<u8>> {
    let out = match codec {
        Codec::Raw => bytes,
        Codec::Zstd => zstd::bulk::decompress(&bytes, len).map_err(|e| {
            Error::Compression(format!("chunk does not decompress within {len} bytes: {e}"))
        })?,
        Codec::Patch | Codec::PatchZstd => {
            return Err(Error::Protocol(
                "a patch needs its base to be decoded".into(),
            ))
        }
    };
    if out.len() != len {
        return Err(Error::Protocol(format!(
            "chunk of {} bytes where {len} were expected",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_round_trip_and_bomb() {
        let data = vec![b'a'; 100_000];
        let (c, z) = encode_payload(data.clone(), Some(3));
        assert_eq!(c, Codec::Zstd);
        assert!(z.len() < 1000);
        assert_eq!(decode_payload(c, z.clone(), data.len()).unwrap(), data);
        // Claimed smaller than it decompresses to: refused, not allocated.
        assert!(decode_payload(c, z, 1000).is_err());
        // Incompressible data goes raw.
        let mut noise = vec![0u8; 4096];
        blake3::Hasher::new()
            .update(b"seed")
            .finalize_xof()
            .fill(&mut noise);
        let (c, _) = encode_payload(noise, Some(1));
        assert_eq!(c, Codec::Raw);
    }
}
