//! The manifest decoder: entries from a peer go through the same checks as in a receiver
//! (paths, kinds, chunk lists, sizes, parents listed before children), and want-lists' runs
//! expand within their limit.
#![no_main]

use hop_engine::manifest::Validator;
use hop_engine::protocol::{decode, from_runs, Frame};
use hop_engine::ChunkParams;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut v = Validator::new(ChunkParams::default().max_len());
    let mut rest = data;
    let mut entries = 0usize;
    while let Ok(Some((frame, used))) = decode(rest) {
        rest = &rest[used..];
        match frame {
            Frame::Entry(e) => {
                if v.check(&e).is_ok() {
                    entries += 1;
                    // A checked entry is safe to place under a root.
                    let p = e.path.under(std::path::Path::new("/root"));
                    assert!(p.starts_with("/root"));
                    assert!(!e.path.as_bytes().split(|&b| b == b'/').any(|c| c == b".."));
                }
            }
            Frame::Want { runs, .. } => {
                if let Ok(ns) = from_runs(&runs, 1 << 16) {
                    assert!(ns.len() <= 1 << 16);
                }
            }
            _ => {}
        }
    }
    let _ = entries;
});
