//! The frames that pass between sender and receiver, and their encoding.
//!
//! A frame on the wire is a 4-byte little-endian length followed by that many bytes of a
//! postcard-encoded [`Frame`]. Decoding never trusts a length beyond [`MAX_FRAME`], so a peer
//! cannot make the receiver allocate more than that per frame. `docs/PROTOCOL.md` describes the
//! exchange.

use crate::error::{Error, Result};
use crate::manifest::Entry;
use serde::{Deserialize, Serialize};

/// Protocol version carried in the handshake.
pub const VERSION: u32 = 9;

/// Largest encoded frame accepted: one maximum-size chunk (16 MiB) plus headers.
pub const MAX_FRAME: usize = (16 << 20) + 4096;

/// A contiguous run of chunk numbers `start .. start + count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// First chunk number.
    pub start: u32,
    /// How many.
    pub count: u32,
}

/// A want-list's place in its lane's zstd stream: the sender compresses the parts of lane
/// `lane` (over all the streams that carry them) as one zstd stream, in the order of `seq`
/// (0, 1, 2, ... with no gap), and the receiver decodes them in that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// The receiver's lane, numbered from 0 within one request.
    pub lane: u32,
    /// The part's place in the lane's order.
    pub seq: u64,
    /// Log2 of the zstd window the receiver decodes the lane's stream with (the same in every
    /// part of a lane; [`crate::zstd_ctx::STREAM_WINDOW_LOG`] to
    /// [`crate::zstd_ctx::LANE_WINDOW_LOG_MAX`]).
    pub window_log: u8,
}

/// Turn ascending chunk numbers into runs (the want-list of a file is mostly runs).
pub fn to_runs(ns: &[u32]) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    for &n in ns {
        match runs.last_mut() {
            Some(r) if r.start + r.count == n => r.count += 1,
            _ => runs.push(Run { start: n, count: 1 }),
        }
    }
    runs
}

/// Expand runs, refusing more than `limit` numbers in total.
pub fn from_runs(runs: &[Run], limit: usize) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for r in runs {
        let end = r
            .start
            .checked_add(r.count)
            .ok_or_else(|| Error::Protocol("chunk run overflows".into()))?;
        if out.len() + r.count as usize > limit {
            return Err(Error::Limit(format!(
                "want-list longer than {limit} chunks"
            )));
        }
        out.extend(r.start..end);
    }
    Ok(out)
}

/// How a chunk payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// The chunk's bytes as they are.
    Raw,
    /// A zstd frame that decompresses to exactly the chunk's length.
    Zstd,
    /// A [`crate::delta`] patch against the base the receiver hinted.
    Patch,
    /// A zstd frame that decompresses to such a patch.
    PatchZstd,
    /// The 16-byte id of a chunk the receiver holds, then a zstd frame of the new chunk XOR
    /// that chunk (see [`crate::delta::encode_ref`]).
    Ref,
}

/// Everything that travels between the two halves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// One manifest entry; entries are numbered by their order, from 0.
    Entry(Entry),
    /// The manifest is complete.
    ManifestEnd,
    /// The receiver wants these chunks of manifest entry `entry`, in this order.
    Want {
        /// Manifest entry number.
        entry: u32,
        /// Chunk numbers.
        runs: Vec<Run>,
        /// Empty, or one entry per wanted chunk: the block hashes of the local data the chunk is
        /// probably an edit of (empty when there is none), for [`Codec::Patch`] answers.
        hints: Vec<Vec<crate::delta::BlockHash>>,
        /// Do not answer with [`Codec::Ref`] (a retry after a base was missing).
        no_refs: bool,
        /// With compression on, where this part stands in its lane's one zstd stream (`None`:
        /// the stream's own zstd stream, as on a stream opened for one request).
        turn: Option<Turn>,
    },
    /// One chunk's payload.
    Data {
        /// Manifest entry number.
        entry: u32,
        /// Chunk number within that entry.
        chunk: u32,
        /// Payload encoding.
        codec: Codec,
        /// The payload.
        #[serde(with = "serde_bytes_compat")]
        bytes: Vec<u8>,
    },
    /// The sender cannot supply this entry (it changed or vanished); the receiver leaves the old
    /// version in place.
    Failed {
        /// Manifest entry number.
        entry: u32,
        /// Why.
        reason: String,
    },
    /// No more requests (receiver) or no more data (sender).
    Done,
    /// Sender to receiver, on the control stream just before `Entry(entry)`: the chunks `runs`
    /// of that entry come without being asked for, on the request's push stream (the sender
    /// knows what the receiver holds; see [`crate::sender::SenderOptions::push`]).
    Pushed {
        /// Manifest entry number (the entry that follows).
        entry: u32,
        /// Chunk numbers.
        runs: Vec<Run>,
    },
    /// The first frame of a push stream: the id of the control stream of the request whose
    /// pushed chunks follow (as `Data` and `Failed` frames).
    PushStream {
        /// The control stream's id.
        control: u64,
    },
    /// A file entry whose chunk list follows in `FileList` frames (see [`crate::chunklist`]):
    /// a list too long for one frame, one given as edits of the receiver's copy, or one sent
    /// while the sender is still reading the file.
    FileHead {
        /// Where, relative to the tree's root.
        path: crate::path::RelPath,
        /// Its metadata.
        meta: crate::manifest::Meta,
        /// Size in bytes.
        size: u64,
        /// The file hash (of its chunk list); `None` when the list is sent while it is being
        /// made, and the last part carries the hash.
        hash: Option<crate::id::ChunkId>,
        /// `None`: the parts are the chunks. `Some`: they are edits of the chunk list of the
        /// receiver's copy at this path, whose file hash this is.
        base: Option<crate::id::ChunkId>,
    },
    /// A part of the chunk list of the file of the last `FileHead`; `last` ends it.
    FileList {
        /// Chunks or edits.
        part: crate::chunklist::ListPart,
        /// The last part.
        last: bool,
        /// In the last part of a list whose head had no hash: the file hash, or `None` when the
        /// sender could not finish reading the file (the receiver then leaves its copy alone,
        /// as for an unreadable entry). `None` everywhere else.
        hash: Option<crate::id::ChunkId>,
    },
    /// Receiver to sender, first frame of a stream of its own: send the whole chunk list of
    /// `entry` (the receiver's copy was not the base its edits were made against). Answered
    /// with `FileList` parts of chunks.
    ListWant {
        /// Manifest entry number.
        entry: u32,
    },
    /// The payloads of several wanted chunks in a row, compressed together as one zstd frame:
    /// the next `lens.len()` (at least 2) chunks of the want-list being answered, from chunk
    /// `first` on, whose lengths are `lens` (adding up to at most [`GROUP_MAX`]). 4 KiB pages
    /// compressed one by one pay a frame header and tables each: a memory image of 664 MB took
    /// 58 MB that way, 47 MB in groups of 16 (rsync -z: 55 MB), in half the CPU time.
    DataGroup {
        /// Manifest entry number.
        entry: u32,
        /// Chunk number of the first chunk of the group.
        first: u32,
        /// Each chunk's length, in want order.
        lens: Vec<u32>,
        /// The zstd frame of the chunks' bytes one after the other.
        #[serde(with = "serde_bytes_compat")]
        bytes: Vec<u8>,
    },
    /// The payloads of the next `lens.len()` (1 to [`GROUP_CHUNKS`]) wanted chunks, from chunk
    /// `first` on, compressed as the next piece of a zstd stream (see
    /// [`crate::zstd_ctx::StreamCompressor`]): the lane's, in the order of the want-lists'
    /// [`Turn`]s, or, for a want-list without one, the chunk stream's own, in the order the
    /// frames came; each piece is decoded with what came before it in that stream. Several chunks add up to at most
    /// [`GROUP_MAX`] bytes; one chunk may be as long as a chunk may be. In a run of small
    /// answers of a lane, the first piece carries the bytes of all and the others none (see
    /// [`crate::protocol::split_stream`]).
    DataStream {
        /// Manifest entry number.
        entry: u32,
        /// Chunk number of the first chunk.
        first: u32,
        /// Each chunk's length, in want order.
        lens: Vec<u32>,
        /// The stream's next flushed piece (empty inside a run).
        #[serde(with = "serde_bytes_compat")]
        bytes: Vec<u8>,
    },
    /// Sender to receiver, on the control stream: manifest frames (entries, list parts and
    /// push announcements, whole and in order) as the next flushed piece of the control stream's
    /// zstd stream, read in this frame's place. Paths, metadata and chunk lengths repeat from
    /// entry to entry: a container root file system's manifest of 8.95 MB takes 5.50 MB.
    ManifestPiece {
        /// Bytes the piece decodes to, at most [`MANIFEST_PIECE_MAX`].
        len: u32,
        /// The stream's next flushed piece.
        #[serde(with = "serde_bytes_compat")]
        bytes: Vec<u8>,
    },
}

/// Most bytes of frames one [`Frame::ManifestPiece`] may hold; larger batches go as they are.
pub const MANIFEST_PIECE_MAX: usize = 4 << 20;

/// The frames of a [`Frame::ManifestPiece`], its bytes decoded by `stream`: whole frames, none of
/// them itself a piece. Refused when the piece is out of bounds, does not decode to exactly `len`
/// bytes, or ends inside a frame.
pub fn manifest_frames(
    len: u32,
    bytes: &[u8],
    stream: &mut crate::zstd_ctx::StreamDecompressor,
) -> Result<Vec<Frame>> {
    let len = len as usize;
    if len > MANIFEST_PIECE_MAX {
        return Err(Error::Protocol(format!(
            "a manifest piece of {len} bytes (limit {MANIFEST_PIECE_MAX})"
        )));
    }
    let all = stream
        .decompress(bytes, len)
        .map_err(|e| Error::Compression(format!("manifest piece does not decompress: {e}")))?;
    let mut frames = Vec::new();
    let mut at = 0;
    while at < all.len() {
        match decode(&all[at..])? {
            Some((Frame::ManifestPiece { .. }, _)) => {
                return Err(Error::Protocol("a manifest piece inside another".into()))
            }
            Some((frame, used)) => {
                frames.push(frame);
                at += used;
            }
            None => {
                return Err(Error::Protocol(
                    "a manifest piece ends inside a frame".into(),
                ))
            }
        }
    }
    Ok(frames)
}

/// Longest chunk a [`Frame::DataStream`] may carry alone (the largest chunk size).
pub const STREAM_CHUNK_MAX: usize = 16 << 20;

/// Most uncompressed bytes a [`Frame::DataGroup`] may carry.
pub const GROUP_MAX: usize = 256 << 10;

/// Most chunks a [`Frame::DataGroup`] may carry.
pub const GROUP_CHUNKS: usize = 16;

/// The chunks of a [`Frame::DataGroup`]: its zstd frame decompressed (never beyond the sum of
/// `lens`, itself at most [`GROUP_MAX`]) and cut at `lens`. Refused when the group is out of
/// bounds or does not decompress to exactly that many bytes. Each chunk is still to be checked
/// against its id by the receiver.
pub fn split_group(lens: &[u32], frame: &[u8]) -> Result<Vec<Vec<u8>>> {
    let total: u64 = lens.iter().map(|&l| l as u64).sum();
    if !(2..=GROUP_CHUNKS).contains(&lens.len()) || total > GROUP_MAX as u64 || lens.contains(&0) {
        return Err(Error::Protocol(format!(
            "a chunk group of {} chunks and {total} bytes",
            lens.len()
        )));
    }
    let all = crate::zstd_ctx::decompress(frame, total as usize)
        .map_err(|e| Error::Compression(format!("chunk group does not decompress: {e}")))?;
    if all.len() as u64 != total {
        return Err(Error::Compression(format!(
            "chunk group decompressed to {} bytes, not {total}",
            all.len()
        )));
    }
    Ok(cut(all, lens))
}

/// The chunks of a [`Frame::DataStream`]: the next bytes of the stream decoded by `stream`, as
/// many as `lens` add up to, cut at `lens`. The frame's own bytes may decode to more (the first
/// piece of a run of small answers carries the bytes of all; the others are empty), which
/// `stream` keeps for the frames after it, at most [`crate::zstd_ctx::STREAM_CARRY_MAX`].
/// Refused when the frame is out of bounds, leaves fewer bytes than `lens` or more than that
/// kept, after which the stream is out of step. Each chunk is still to be checked against its
/// id by the receiver.
pub fn split_stream(
    stream: &mut crate::zstd_ctx::StreamDecompressor,
    lens: &[u32],
    bytes: &[u8],
) -> Result<Vec<Vec<u8>>> {
    let total: u64 = lens.iter().map(|&l| l as u64).sum();
    let cap = if lens.len() == 1 {
        STREAM_CHUNK_MAX
    } else {
        GROUP_MAX
    };
    if !(1..=GROUP_CHUNKS).contains(&lens.len()) || total > cap as u64 || lens.contains(&0) {
        return Err(Error::Protocol(format!(
            "a chunk stream frame of {} chunks and {total} bytes",
            lens.len()
        )));
    }
    let all = stream
        .decompress_ahead(bytes, total as usize)
        .map_err(|e| Error::Compression(format!("chunk stream does not decompress: {e}")))?;
    Ok(cut(all, lens))
}

/// `all` cut into pieces of `lens` (which add up to its length). A frame of one chunk (most of
/// a tree's files) is its piece as it is, not a copy.
fn cut(all: Vec<u8>, lens: &[u32]) -> Vec<Vec<u8>> {
    if lens.len() == 1 {
        return vec![all];
    }
    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0usize;
    for &l in lens {
        out.push(all[at..at + l as usize].to_vec());
        at += l as usize;
    }
    out
}

/// Serialize `Vec<u8>` as one byte string (postcard already does; kept explicit for clarity).
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_borrowed_bytes<E>(self, v: &'de [u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(V)
    }
}

/// Encode a frame with its length prefix, appending to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<()> {
    encode_msg(frame, out)
}

/// Encode any message with the same framing as [`Frame`]s (the transport's control messages
/// use it), appending to `out`.
pub fn encode_msg<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<()> {
    let start = out.len();
    out.extend_from_slice(&[0u8; 4]);
    let body = postcard::to_extend(msg, std::mem::take(out))
        .map_err(|e| Error::Protocol(format!("encode: {e}")))?;
    *out = body;
    let len = out.len() - start - 4;
    if len > MAX_FRAME {
        out.truncate(start);
        return Err(Error::Limit(format!(
            "frame of {len} bytes exceeds {MAX_FRAME}"
        )));
    }
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(())
}

/// The encoding of `Frame::Data { entry, chunk, codec, bytes }` without the payload itself:
/// length prefix and header, to be followed on the wire by the `len` payload bytes. Lets the
/// transport hand the payload over without copying it.
pub fn data_header(entry: u32, chunk: u32, codec: Codec, len: usize) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(24);
    encode(
        &Frame::Data {
            entry,
            chunk,
            codec,
            bytes: Vec::new(),
        },
        &mut out,
    )?;
    // The empty payload encodes as its length, a single 0 byte, last: put the real length there.
    out.pop();
    let mut n = len;
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
    let body = out.len() - 4 + len;
    if body > MAX_FRAME {
        return Err(Error::Limit(format!(
            "frame of {body} bytes exceeds {MAX_FRAME}"
        )));
    }
    out[..4].copy_from_slice(&(body as u32).to_le_bytes());
    Ok(out)
}

/// Encode a frame into a fresh buffer.
pub fn encode_vec(frame: &Frame) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    encode(frame, &mut v)?;
    Ok(v)
}

/// Read the length prefix of the next frame in `buf`: `Ok(None)` when fewer than 4 bytes.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(Error::Limit(format!(
            "peer announced a frame of {len} bytes (limit {MAX_FRAME})"
        )));
    }
    Ok(Some(len))
}

/// Decode one frame body (without its length prefix).
pub fn decode_body(body: &[u8]) -> Result<Frame> {
    decode_msg(body)
}

/// Decode one message body of any type framed like [`Frame`]s.
pub fn decode_msg<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    if body.len() > MAX_FRAME {
        return Err(Error::Limit(format!("frame of {} bytes", body.len())));
    }
    let (frame, rest) = postcard::take_from_bytes::<T>(body).map_err(|e| match e {
        // postcard drops the message of a refused value; the only such refusal is a path.
        postcard::Error::SerdeDeCustom => {
            Error::Protocol("decode: refused an unsafe path in a message".into())
        }
        e => Error::Protocol(format!("decode: {e}")),
    })?;
    if !rest.is_empty() {
        return Err(Error::Protocol(format!(
            "{} trailing bytes after a frame",
            rest.len()
        )));
    }
    Ok(frame)
}

/// Decode the first complete frame in `buf`, returning it and the bytes it used.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>> {
    let Some(len) = frame_len(buf)? else {
        return Ok(None);
    };
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((decode_body(&buf[4..4 + len])?, 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Manifest frames of a tree: files under a few directories, as a scan sends them.
    fn manifest_batch(n: u32) -> (Vec<Frame>, Vec<u8>) {
        let frames: Vec<Frame> = (0..n)
            .map(|i| {
                let data = format!("file {i}");
                Frame::Entry(Entry {
                    path: RelPath::from_bytes(
                        format!("usr/share/doc/package-{}/changelog.{i}", i / 10).into_bytes(),
                    )
                    .unwrap(),
                    kind: EntryKind::File {
                        size: data.len() as u64,
                        hash: ChunkId::of(data.as_bytes()),
                        chunks: vec![ChunkSpec {
                            len: data.len() as u32,
                            id: ChunkId::of(data.as_bytes()),
                            zero: false,
                        }],
                    },
                    meta: Meta {
                        mode: 0o644,
                        mtime_sec: 1_700_000_000 + i as i64 / 100,
                        mtime_nsec: 0,
                        uid: 0,
                        gid: 0,
                    },
                })
            })
            .collect();
        let mut raw = Vec::new();
        for f in &frames {
            encode(f, &mut raw).unwrap();
        }
        (frames, raw)
    }

    /// Manifest pieces decode, in order, to the frames they hold, each piece with the stream
    /// before it; anything else is refused: a wrong length, a piece inside a piece, a piece
    /// that ends inside a frame, one larger than the limit, bytes that are not the stream's.
    #[test]
    fn manifest_pieces_decode_to_their_frames_and_nothing_else() {
        let mut c = crate::zstd_ctx::StreamCompressor::new(3).unwrap();
        let mut d = crate::zstd_ctx::StreamDecompressor::default();
        let (mut raw_total, mut packed_total) = (0, 0);
        for piece in 0..3 {
            let (frames, raw) = manifest_batch(500 + piece);
            let z = c.compress(&raw).unwrap();
            (raw_total, packed_total) = (raw_total + raw.len(), packed_total + z.len());
            let got = manifest_frames(raw.len() as u32, &z, &mut d).unwrap();
            assert_eq!(got, frames, "piece {piece}");
        }
        // Ids and hashes are incompressible; paths and metadata mostly repeat.
        assert!(
            packed_total * 2 < raw_total,
            "{packed_total} of {raw_total}"
        );

        let refused = |len: usize, bytes: &[u8]| {
            let mut d = crate::zstd_ctx::StreamDecompressor::default();
            manifest_frames(len as u32, bytes, &mut d)
                .unwrap_err()
                .to_string()
        };
        let (_, raw) = manifest_batch(3);
        let z = |b: &[u8]| {
            crate::zstd_ctx::StreamCompressor::new(1)
                .unwrap()
                .compress(b)
                .unwrap()
        };
        assert!(refused(raw.len() - 1, &z(&raw)).contains("announced"));
        assert!(refused(raw.len() - 1, &z(&raw[..raw.len() - 1])).contains("inside a frame"));
        let mut nested = raw.clone();
        encode(
            &Frame::ManifestPiece {
                len: 0,
                bytes: vec![],
            },
            &mut nested,
        )
        .unwrap();
        assert!(refused(nested.len(), &z(&nested)).contains("inside another"));
        assert!(refused(MANIFEST_PIECE_MAX + 1, &z(&raw)).contains("limit"));
        assert!(refused(raw.len(), &raw).contains("decompress"));
    }

    /// A chunk group decodes to its chunks, and nothing else: wrong totals, too many or too
    /// few chunks, empty chunks, oversized groups and frames that are not zstd are refused.
    #[test]
    fn chunk_groups_decode_within_their_bounds() {
        let a = vec![1u8; 4096];
        let b: Vec<u8> = (0..3000u32).map(|i| (i % 7) as u8).collect();
        let both = [a.clone(), b.clone()].concat();
        let z = crate::zstd_ctx::compress(&both, 1).unwrap();
        let lens = [4096, 3000];
        assert_eq!(split_group(&lens, &z).unwrap(), vec![a, b]);
        assert!(
            split_group(&[4096, 2999], &z).is_err(),
            "decompresses past the total"
        );
        assert!(
            split_group(&[4096, 3001], &z).is_err(),
            "short of the total"
        );
        assert!(split_group(&[7096], &z).is_err(), "a group of one");
        assert!(split_group(&[4096, 0, 3000], &z).is_err(), "an empty chunk");
        assert!(
            split_group(&[1; GROUP_CHUNKS + 1], &z).is_err(),
            "too many chunks"
        );
        assert!(
            split_group(&[GROUP_MAX as u32, 1], &z).is_err(),
            "too many bytes"
        );
        assert!(split_group(&lens, b"not zstd").is_err());
        // A bomb: 16 MiB of zeros announced as 2 small chunks.
        let bomb = crate::zstd_ctx::compress(&vec![0u8; 16 << 20], 1).unwrap();
        assert!(split_group(&[10, 10], &bomb).is_err());
    }
    use crate::id::ChunkId;
    use crate::manifest::{ChunkSpec, EntryKind, Meta};
    use crate::path::RelPath;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let frames = vec![
            Frame::Entry(Entry {
                path: RelPath::from_bytes(b"a/b".to_vec()).unwrap(),
                kind: EntryKind::File {
                    size: 5,
                    hash: ChunkId::of(b"hello"),
                    chunks: vec![ChunkSpec {
                        len: 5,
                        id: ChunkId::of(b"hello"),
                        zero: false,
                    }],
                },
                meta: Meta {
                    mode: 0o644,
                    mtime_sec: 1,
                    mtime_nsec: 2,
                    uid: 3,
                    gid: 4,
                },
            }),
            Frame::ManifestEnd,
            Frame::Want {
                entry: 1,
                runs: to_runs(&[1, 2, 3, 7]),
                hints: vec![vec![[1, 2, 3, 4]], vec![], vec![], vec![]],
                no_refs: false,
                turn: Some(Turn {
                    lane: 1,
                    seq: 40_000,
                    window_log: 26,
                }),
            },
            Frame::Data {
                entry: 1,
                chunk: 2,
                codec: Codec::Raw,
                bytes: vec![1, 2, 3],
            },
            Frame::Done,
        ];
        let mut buf = Vec::new();
        for f in &frames {
            encode(f, &mut buf).unwrap();
        }
        let mut at = 0;
        for f in &frames {
            let (g, used) = decode(&buf[at..]).unwrap().unwrap();
            assert_eq!(&g, f);
            at += used;
        }
        assert_eq!(at, buf.len());
        assert_eq!(decode(&buf[..3]).unwrap(), None);
    }

    #[test]
    fn data_header_matches_the_full_encoding() {
        for len in [0usize, 1, 127, 128, 8192, 40_000, 1 << 20] {
            let bytes = vec![7u8; len];
            let full = encode_vec(&Frame::Data {
                entry: 300,
                chunk: 70_000,
                codec: Codec::Zstd,
                bytes: bytes.clone(),
            })
            .unwrap();
            let mut split = data_header(300, 70_000, Codec::Zstd, len).unwrap();
            split.extend_from_slice(&bytes);
            assert_eq!(split, full, "len {len}");
        }
    }

    #[test]
    fn runs() {
        let r = to_runs(&[0, 1, 2, 5, 6, 9]);
        assert_eq!(r.len(), 3);
        assert_eq!(from_runs(&r, 100).unwrap(), vec![0, 1, 2, 5, 6, 9]);
        assert!(from_runs(
            &[Run {
                start: 0,
                count: 1000
            }],
            10
        )
        .is_err());
        assert!(from_runs(
            &[Run {
                start: u32::MAX,
                count: 2
            }],
            10
        )
        .is_err());
    }

    #[test]
    fn refuses_oversized_and_unsafe() {
        let mut b = vec![0xff, 0xff, 0xff, 0x7f];
        b.extend_from_slice(&[0; 16]);
        assert!(decode(&b).is_err());
        // A manifest entry with a '..' path encoded by a hostile peer.
        #[derive(Serialize)]
        enum Evil {
            Entry { path: Vec<u8>, kind: u8, meta: Meta },
        }
        // The same bytes with a safe path decode fine, so the refusal is the path check's.
        let ok = postcard::to_allocvec(&Evil::Entry {
            path: b"x".to_vec(),
            kind: 0,
            meta: Meta::default(),
        })
        .unwrap();
        assert!(decode_body(&ok).is_ok());
        let body = postcard::to_allocvec(&Evil::Entry {
            path: b"../x".to_vec(),
            kind: 0,
            meta: Meta::default(),
        })
        .unwrap();
        assert!(decode_body(&body).is_err());
    }

    proptest! {
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            let _ = decode_body(&bytes);
        }
    }
}
