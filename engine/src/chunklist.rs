//! A file's chunk list on the wire: whole in its manifest entry when it is short; otherwise in
//! parts (a file of tens of GiB has millions of chunks, more than one frame may carry); and,
//! when the sender knows the list of the copy the receiver holds at the same path (its basis,
//! e.g. a migration's previous round), as edits of that list. A memory image of 580 MB whose
//! 9,000 pages changed is then 200 KB of manifest instead of 2.7 MB.
//!
//! The receiver rebuilds an edited list only from a copy whose file hash is the `base` the
//! sender named, and asks for the whole list otherwise; the result is checked against the
//! file's hash like any other list.

use crate::error::{Error, Result};
use crate::id::ChunkId;
use crate::manifest::{ChunkSpec, Entry, EntryKind, Meta};
use crate::path::RelPath;
use crate::protocol::Frame;
use serde::{Deserialize, Serialize};

/// Chunks per `FileList` part (a part encodes to about 4.4 MB, well under the frame limit).
pub const LIST_PART: usize = 200_000;

/// Most chunks a file may have (16 Mi: 72 GiB at the default 4.5 KiB mean chunk): a hostile
/// sender cannot make a receiver hold more.
pub const MAX_FILE_CHUNKS: usize = 1 << 24;

/// One step of an edited chunk list, applied to the base list from its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListEdit {
    /// The next `n` chunks of the base are kept.
    Same(u32),
    /// The next chunk of the base is replaced by this one.
    Put(ChunkSpec),
    /// This chunk is inserted; the base stays where it is.
    Add(ChunkSpec),
    /// The next `n` chunks of the base are dropped.
    Drop(u32),
}

/// A part of a chunk list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListPart {
    /// Chunks, in order.
    Chunks(Vec<ChunkSpec>),
    /// Edits of the base list, in order.
    Edits(Vec<ListEdit>),
}

/// Edits that turn `base` into `new`: kept runs, replaced chunks, inserted chunks (one that is
/// followed by the base's next chunk), and, where a chunk of `new` appears later in `base`
/// (content removed), the base chunks skipped to it.
pub fn diff(base: &[ChunkSpec], new: &[ChunkSpec]) -> Vec<ListEdit> {
    let mut at: std::collections::HashMap<&ChunkId, usize> =
        std::collections::HashMap::with_capacity(base.len());
    for (i, c) in base.iter().enumerate().rev() {
        at.insert(&c.id, i);
    }
    let mut out = Vec::new();
    let mut b = 0usize;
    let same = |out: &mut Vec<ListEdit>| match out.last_mut() {
        Some(ListEdit::Same(n)) if *n < u32::MAX => *n += 1,
        _ => out.push(ListEdit::Same(1)),
    };
    for (i, c) in new.iter().enumerate() {
        if base.get(b) == Some(c) {
            same(&mut out);
            b += 1;
            continue;
        }
        match at.get(&c.id) {
            Some(&j) if j > b && base[j] == *c && j - b <= u32::MAX as usize => {
                out.push(ListEdit::Drop((j - b) as u32));
                same(&mut out);
                b = j + 1;
            }
            // The next new chunk is where the base stands: this one was inserted.
            _ if b < base.len() && new.get(i + 1) != base.get(b) => {
                out.push(ListEdit::Put(*c));
                b += 1;
            }
            _ => out.push(ListEdit::Add(*c)),
        }
    }
    if b < base.len() {
        let mut left = base.len() - b;
        while left > 0 {
            let n = left.min(u32::MAX as usize);
            out.push(ListEdit::Drop(n as u32));
            left -= n;
        }
    }
    out
}

/// Apply `edits` to `base`. Fails when an edit reaches past the end of the base, or the result
/// would exceed [`MAX_FILE_CHUNKS`].
pub fn apply(base: &[ChunkSpec], edits: &[ListEdit]) -> Result<Vec<ChunkSpec>> {
    let bad = |why: &str| Error::Protocol(format!("chunk list edits: {why}"));
    let mut out = Vec::with_capacity(base.len().min(MAX_FILE_CHUNKS));
    let mut b = 0usize;
    for e in edits {
        match *e {
            ListEdit::Same(n) => {
                let end = b
                    .checked_add(n as usize)
                    .filter(|&e| e <= base.len())
                    .ok_or_else(|| bad("kept chunks past the end of the base"))?;
                out.extend_from_slice(&base[b..end]);
                b = end;
            }
            ListEdit::Put(c) => {
                if b >= base.len() {
                    return Err(bad("replaced a chunk past the end of the base"));
                }
                out.push(c);
                b += 1;
            }
            ListEdit::Add(c) => out.push(c),
            ListEdit::Drop(n) => {
                b = b
                    .checked_add(n as usize)
                    .filter(|&e| e <= base.len())
                    .ok_or_else(|| bad("dropped chunks past the end of the base"))?;
            }
        }
        if out.len() > MAX_FILE_CHUNKS {
            return Err(Error::Limit(format!(
                "a file of more than {MAX_FILE_CHUNKS} chunks"
            )));
        }
    }
    Ok(out)
}

/// The frames that carry `entry`: the entry itself when its chunk list is short and there is
/// no base; otherwise a `FileHead` and `FileList` parts, as edits of `base` (the file hash and
/// chunk list of the receiver's copy) when that is at most half the size of the list.
pub fn frames_for(entry: Entry, base: Option<(ChunkId, &[ChunkSpec])>) -> Vec<Frame> {
    let EntryKind::File { size, hash, chunks } = entry.kind else {
        return vec![Frame::Entry(entry)];
    };
    let edits = base
        .map(|(h, list)| (h, diff(list, &chunks)))
        // A kept run or drop costs a few bytes, a chunk about 21: compare by that.
        .filter(|(_, e)| cost(e) * 2 <= chunks.len() * CHUNK_COST);
    if edits.is_none() && chunks.len() <= LIST_PART {
        return vec![Frame::Entry(Entry {
            path: entry.path,
            kind: EntryKind::File { size, hash, chunks },
            meta: entry.meta,
        })];
    }
    let head = |base| Frame::FileHead {
        path: entry.path.clone(),
        meta: entry.meta,
        size,
        hash: Some(hash),
        base,
    };
    match edits {
        Some((b, edits)) => {
            let mut out = vec![head(Some(b))];
            out.extend(parts(edits, ListPart::Edits));
            out
        }
        None => {
            let mut out = vec![head(None)];
            out.extend(parts(chunks, ListPart::Chunks));
            out
        }
    }
}

/// Bytes a chunk spec costs on the wire, about (length varint, 16-byte id, flag).
const CHUNK_COST: usize = 21;

fn cost(edits: &[ListEdit]) -> usize {
    edits
        .iter()
        .map(|e| match e {
            ListEdit::Same(_) | ListEdit::Drop(_) => 4,
            ListEdit::Put(_) | ListEdit::Add(_) => 1 + CHUNK_COST,
        })
        .sum()
}

/// `items` cut into `FileList` frames of at most [`LIST_PART`] items, the last one marked.
pub fn parts<T: Clone>(items: Vec<T>, wrap: fn(Vec<T>) -> ListPart) -> Vec<Frame> {
    if items.is_empty() {
        return vec![Frame::FileList {
            part: wrap(Vec::new()),
            last: true,
            hash: None,
        }];
    }
    let n = items.len().div_ceil(LIST_PART);
    items
        .chunks(LIST_PART)
        .enumerate()
        .map(|(i, p)| Frame::FileList {
            part: wrap(p.to_vec()),
            last: i + 1 == n,
            hash: None,
        })
        .collect()
}

/// A manifest item as the receiver gets it: an entry, or a file whose chunk list is edits of
/// the copy it holds at that path.
#[derive(Debug)]
pub enum Incoming {
    /// A complete entry.
    Entry(Entry),
    /// A file entry (its `chunks` empty) whose list is `edits` of the list of the receiver's
    /// copy, whose file hash is `base`.
    Edited {
        /// The entry, chunk list to be filled in.
        entry: Entry,
        /// File hash of the copy the edits were made against.
        base: ChunkId,
        /// The edits.
        edits: Vec<ListEdit>,
    },
    /// The start of a file the sender sends while it still reads it (its list comes in parts,
    /// its hash at the end); only from an [`Assembler::growing`]. Its [`Incoming::Part`]s
    /// follow, then the whole file as an [`Incoming::Entry`] (a file, or unreadable).
    Begin {
        /// Its path.
        path: RelPath,
        /// Its metadata.
        meta: Meta,
        /// Its size.
        size: u64,
    },
    /// The next chunks of the list of the file begun last.
    Part(Vec<ChunkSpec>),
}

/// Puts manifest items back together from the frames of [`frames_for`], as they arrive.
#[derive(Default)]
pub struct Assembler {
    head: Option<Head>,
    /// Hand out the parts of a list sent while its file is read (see [`Incoming::Begin`]).
    growing: bool,
}

struct Head {
    path: RelPath,
    meta: Meta,
    size: u64,
    hash: Option<ChunkId>,
    base: Option<ChunkId>,
    chunks: Vec<ChunkSpec>,
    edits: Vec<ListEdit>,
}

impl Assembler {
    /// An assembler that also hands out the start and each part of a file sent while it is
    /// read ([`Incoming::Begin`], [`Incoming::Part`]), so that the receiver can write the file
    /// as its list arrives.
    pub fn growing() -> Assembler {
        Assembler {
            head: None,
            growing: true,
        }
    }

    /// Take the next manifest frame: `Some` once an item is complete. Frames other than
    /// entries and their parts are refused.
    pub fn feed(&mut self, frame: Frame) -> Result<Option<Incoming>> {
        match frame {
            Frame::Entry(e) if self.head.is_none() => Ok(Some(Incoming::Entry(e))),
            Frame::FileHead {
                path,
                meta,
                size,
                hash,
                base,
            } if self.head.is_none() => {
                if hash.is_none() && base.is_some() {
                    return Err(Error::Protocol(
                        "chunk list edits without the file hash they make".into(),
                    ));
                }
                let begin = (self.growing && hash.is_none()).then(|| Incoming::Begin {
                    path: path.clone(),
                    meta,
                    size,
                });
                self.head = Some(Head {
                    path,
                    meta,
                    size,
                    hash,
                    base,
                    chunks: Vec::new(),
                    edits: Vec::new(),
                });
                Ok(begin)
            }
            Frame::FileList { part, last, hash } => {
                let h = self
                    .head
                    .as_mut()
                    .ok_or_else(|| Error::Protocol("a chunk list part without its file".into()))?;
                let growing = self.growing && h.hash.is_none();
                let mut handed = None;
                match (part, h.base.is_some()) {
                    (ListPart::Chunks(c), false) => {
                        if growing && !last && !c.is_empty() {
                            handed = Some(Incoming::Part(c.clone()));
                        }
                        h.chunks.extend(c)
                    }
                    (ListPart::Edits(e), true) => h.edits.extend(e),
                    _ => {
                        return Err(Error::Protocol(
                            "a chunk list part of the wrong kind for its file".into(),
                        ))
                    }
                }
                if h.chunks.len() > MAX_FILE_CHUNKS || h.edits.len() > MAX_FILE_CHUNKS {
                    return Err(Error::Limit(format!(
                        "a file of more than {MAX_FILE_CHUNKS} chunks"
                    )));
                }
                if hash.is_some() && (!last || h.hash.is_some()) {
                    return Err(Error::Protocol(
                        "a file hash in a chunk list part that cannot carry one".into(),
                    ));
                }
                if !last {
                    return Ok(handed);
                }
                let Some(h) = self.head.take() else {
                    return Ok(None);
                };
                let Some(file_hash) = h.hash.or(hash) else {
                    // Sent while it was read, and the sender could not finish reading it.
                    return Ok(Some(Incoming::Entry(Entry {
                        path: h.path,
                        kind: EntryKind::Unreadable,
                        meta: h.meta,
                    })));
                };
                let entry = Entry {
                    path: h.path,
                    kind: EntryKind::File {
                        size: h.size,
                        hash: file_hash,
                        chunks: h.chunks,
                    },
                    meta: h.meta,
                };
                Ok(Some(match h.base {
                    None => Incoming::Entry(entry),
                    Some(base) => Incoming::Edited {
                        entry,
                        base,
                        edits: h.edits,
                    },
                }))
            }
            Frame::Entry(_) | Frame::FileHead { .. } => Err(Error::Protocol(
                "a manifest entry inside another file's chunk list".into(),
            )),
            other => Err(Error::Protocol(format!(
                "expected a manifest entry, got {other:?}"
            ))),
        }
    }

    /// Whether a file's chunk list is still being put together.
    pub fn in_file(&self) -> bool {
        self.head.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(i: u32) -> ChunkSpec {
        ChunkSpec {
            len: 4096,
            id: ChunkId::of(&i.to_le_bytes()),
            zero: false,
        }
    }

    fn list(ids: &[u32]) -> Vec<ChunkSpec> {
        ids.iter().map(|&i| spec(i)).collect()
    }

    proptest! {
        /// Any new list is rebuilt exactly from any base by its edits.
        #[test]
        fn edits_rebuild_the_new_list(
            base in proptest::collection::vec(0u32..60, 0..120),
            new in proptest::collection::vec(0u32..60, 0..120),
        ) {
            let (b, n) = (list(&base), list(&new));
            let e = diff(&b, &n);
            prop_assert_eq!(apply(&b, &e).unwrap(), n);
        }
    }

    #[test]
    fn a_few_changed_pages_are_a_few_edits() {
        let base: Vec<u32> = (0..10_000).collect();
        let mut new = base.clone();
        for k in [3, 500, 501, 9_999] {
            new[k] += 1_000_000;
        }
        let (b, n) = (list(&base), list(&new));
        let e = diff(&b, &n);
        assert_eq!(e.len(), 7, "{} edits", e.len());
        // An insertion shifts what follows: the edits skip back into step.
        let mut shifted = new.clone();
        shifted.insert(100, 2_000_000);
        shifted.remove(7_000);
        let e = diff(&b, &list(&shifted));
        assert!(e.len() < 16, "{} edits", e.len());
        assert_eq!(apply(&b, &e).unwrap(), list(&shifted));
    }

    #[test]
    fn edits_that_reach_past_the_base_are_refused() {
        let b = list(&[1, 2, 3]);
        for bad in [
            vec![ListEdit::Same(4)],
            vec![ListEdit::Drop(2), ListEdit::Same(2)],
            vec![ListEdit::Same(3), ListEdit::Put(spec(9))],
            vec![ListEdit::Same(u32::MAX), ListEdit::Same(u32::MAX)],
        ] {
            assert!(apply(&b, &bad).is_err(), "{bad:?}");
        }
    }

    fn file(chunks: Vec<ChunkSpec>) -> Entry {
        let size = chunks.iter().map(|c| c.len as u64).sum();
        Entry {
            path: RelPath::from_bytes(b"f".to_vec()).unwrap(),
            kind: EntryKind::File {
                size,
                hash: crate::chunk::file_hash(size, &chunks),
                chunks,
            },
            meta: Meta::default(),
        }
    }

    #[test]
    fn long_lists_go_in_parts_and_come_back_whole() {
        let n = LIST_PART * 2 + 5;
        let chunks: Vec<ChunkSpec> = (0..n as u32).map(spec).collect();
        let frames = frames_for(file(chunks.clone()), None);
        assert_eq!(frames.len(), 4, "a head and three parts");
        for f in &frames {
            // Every part fits in a frame.
            crate::protocol::encode_vec(f).unwrap();
        }
        let mut a = Assembler::default();
        let mut got = None;
        for f in frames {
            got = a.feed(f).unwrap();
        }
        match got {
            Some(Incoming::Entry(e)) => assert_eq!(e, file(chunks)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_list_like_the_base_goes_as_edits_and_a_short_unlike_one_whole() {
        let base: Vec<ChunkSpec> = (0..1000).map(spec).collect();
        let mut new = base.clone();
        new[10] = spec(5000);
        let bh = crate::chunk::file_hash(1000 * 4096, &base);
        let frames = frames_for(file(new.clone()), Some((bh, &base)));
        assert!(matches!(frames[0], Frame::FileHead { base: Some(_), .. }));
        let mut a = Assembler::default();
        let mut got = None;
        for f in frames {
            got = a.feed(f).unwrap();
        }
        let Some(Incoming::Edited { base: b, edits, .. }) = got else {
            panic!("{got:?}")
        };
        assert_eq!(b, bh);
        assert_eq!(apply(&base, &edits).unwrap(), new);
        // Nothing in common with the base: the whole list, in the entry.
        let other: Vec<ChunkSpec> = (7000..7100).map(spec).collect();
        let frames = frames_for(file(other), Some((bh, &base)));
        assert!(matches!(&frames[..], [Frame::Entry(_)]));
    }

    #[test]
    fn parts_out_of_place_are_refused() {
        let mut a = Assembler::default();
        assert!(a
            .feed(Frame::FileList {
                part: ListPart::Chunks(vec![]),
                last: true,
                hash: None,
            })
            .is_err());
        let head = Frame::FileHead {
            path: RelPath::from_bytes(b"f".to_vec()).unwrap(),
            meta: Meta::default(),
            size: 1,
            hash: Some(ChunkId::of(b"x")),
            base: None,
        };
        a.feed(head.clone()).unwrap();
        assert!(a.feed(head).is_err(), "a file inside a file");
        let mut a = Assembler::default();
        a.feed(Frame::FileHead {
            path: RelPath::from_bytes(b"f".to_vec()).unwrap(),
            meta: Meta::default(),
            size: 1,
            hash: Some(ChunkId::of(b"x")),
            base: None,
        })
        .unwrap();
        assert!(a
            .feed(Frame::FileList {
                part: ListPart::Edits(vec![]),
                last: true,
                hash: None,
            })
            .is_err());
    }

    /// A list sent while its file was read: the hash comes with the last part; a sender that
    /// could not finish sends none, and the file is taken as unreadable. Hashes where they do
    /// not belong are refused.
    #[test]
    fn a_list_sent_while_read_ends_with_its_hash() {
        let head = || Frame::FileHead {
            path: RelPath::from_bytes(b"f".to_vec()).unwrap(),
            meta: Meta::default(),
            size: 3 * 4096,
            hash: None,
            base: None,
        };
        let part = |c: Vec<ChunkSpec>, last, hash| Frame::FileList {
            part: ListPart::Chunks(c),
            last,
            hash,
        };
        let list: Vec<ChunkSpec> = (0..3).map(spec).collect();
        let h = crate::chunk::file_hash(3 * 4096, &list);
        let mut a = Assembler::default();
        assert!(a.feed(head()).unwrap().is_none());
        assert!(a
            .feed(part(list[..2].to_vec(), false, None))
            .unwrap()
            .is_none());
        assert!(a
            .feed(part(list[2..].to_vec(), false, None))
            .unwrap()
            .is_none());
        match a.feed(part(vec![], true, Some(h))).unwrap() {
            Some(Incoming::Entry(Entry {
                kind: EntryKind::File { hash, chunks, .. },
                ..
            })) => {
                assert_eq!(hash, h);
                assert_eq!(chunks, list);
            }
            other => panic!("{other:?}"),
        }
        // A growing assembler hands out the start and each part as well, then the same entry.
        let mut a = Assembler::growing();
        assert!(matches!(
            a.feed(head()).unwrap(),
            Some(Incoming::Begin { size: 12288, .. })
        ));
        match a.feed(part(list[..2].to_vec(), false, None)).unwrap() {
            Some(Incoming::Part(c)) => assert_eq!(c, list[..2]),
            other => panic!("{other:?}"),
        }
        assert!(a.feed(part(vec![], false, None)).unwrap().is_none());
        match a.feed(part(list[2..].to_vec(), true, Some(h))).unwrap() {
            Some(Incoming::Entry(Entry {
                kind: EntryKind::File { chunks, .. },
                ..
            })) => assert_eq!(chunks, list, "the last part's chunks are in the entry"),
            other => panic!("{other:?}"),
        }
        // ...but not for a file whose hash came first (its list was known whole).
        let mut a = Assembler::growing();
        let known = Frame::FileHead {
            path: RelPath::from_bytes(b"f".to_vec()).unwrap(),
            meta: Meta::default(),
            size: 3 * 4096,
            hash: Some(h),
            base: None,
        };
        assert!(a.feed(known).unwrap().is_none());
        assert!(a
            .feed(part(list[..2].to_vec(), false, None))
            .unwrap()
            .is_none());
        // Abandoned by the sender.
        let mut a = Assembler::default();
        a.feed(head()).unwrap();
        a.feed(part(list.clone(), false, None)).unwrap();
        assert!(matches!(
            a.feed(part(vec![], true, None)).unwrap(),
            Some(Incoming::Entry(Entry {
                kind: EntryKind::Unreadable,
                ..
            }))
        ));
        // A hash before the last part, or besides the head's.
        let mut a = Assembler::default();
        a.feed(head()).unwrap();
        assert!(a.feed(part(vec![], false, Some(h))).is_err());
        let mut a = Assembler::default();
        a.feed(Frame::FileHead {
            path: RelPath::from_bytes(b"f".to_vec()).unwrap(),
            meta: Meta::default(),
            size: 3 * 4096,
            hash: Some(h),
            base: None,
        })
        .unwrap();
        assert!(a.feed(part(list, true, Some(h))).is_err());
        // Edits need the hash they make up front.
        let mut a = Assembler::default();
        assert!(a
            .feed(Frame::FileHead {
                path: RelPath::from_bytes(b"f".to_vec()).unwrap(),
                meta: Meta::default(),
                size: 1,
                hash: None,
                base: Some(h),
            })
            .is_err());
    }
}
