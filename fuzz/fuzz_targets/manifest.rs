//! The manifest decoder: entries from a peer, whole or as a head and chunk-list parts (chunks,
//! or edits of a list the receiver holds), go through the same assembly and checks as in a
//! receiver (paths, kinds, chunk lists, sizes, parents listed before children), and want-lists'
//! runs expand within their limit.
#![no_main]

use hop_engine::chunklist::{apply, Assembler, Incoming};
use hop_engine::id::ChunkId;
use hop_engine::manifest::{ChunkSpec, EntryKind, Validator};
use hop_engine::protocol::{decode, from_runs, Frame};
use hop_engine::ChunkParams;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut v = Validator::new(ChunkParams::default().max_len());
    // The list of a copy the receiver holds, for edits to apply to.
    let held: Vec<ChunkSpec> = (0u32..64)
        .map(|i| ChunkSpec {
            len: 4096,
            id: ChunkId::of(&i.to_le_bytes()),
            zero: i % 7 == 0,
        })
        .collect();
    let mut assembler = Assembler::default();
    let mut rest = data;
    while let Ok(Some((frame, used))) = decode(rest) {
        rest = &rest[used..];
        match frame {
            Frame::Want { runs, .. } => {
                if let Ok(ns) = from_runs(&runs, 1 << 16) {
                    assert!(ns.len() <= 1 << 16);
                }
            }
            frame => {
                let e = match assembler.feed(frame) {
                    Ok(Some(Incoming::Entry(e))) => e,
                    Ok(Some(Incoming::Edited { mut entry, edits, .. })) => {
                        let Ok(list) = apply(&held, &edits) else { continue };
                        assert!(list.len() <= hop_engine::chunklist::MAX_FILE_CHUNKS);
                        if let EntryKind::File { chunks, .. } = &mut entry.kind {
                            *chunks = list;
                        }
                        entry
                    }
                    _ => continue,
                };
                if v.check(&e).is_ok() {
                    // A checked entry is safe to place under a root.
                    let p = e.path.under(std::path::Path::new("/root"));
                    assert!(p.starts_with("/root"));
                    assert!(!e.path.as_bytes().split(|&b| b == b'/').any(|c| c == b".."));
                }
            }
        }
    }
});
