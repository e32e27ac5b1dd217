//! The chunk-stream decoder: frames as they arrive from a peer, and every payload codec
//! (raw, zstd, block patches, zstd references, chunk groups, zstd stream pieces) decoded
//! against a base, within
//! the limits.
#![no_main]

use hop_engine::protocol::{decode, Frame};
use hop_engine::sender::decode_payload;
use hop_engine::ChunkParams;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let max = ChunkParams::default().max_len() as usize;
    let base = vec![7u8; 4096];
    let mut rest = data;
    let mut stream = hop_engine::zstd_ctx::StreamDecompressor::default();
    while let Ok(Some((frame, used))) = decode(rest) {
        assert!(used > 0 && used <= rest.len());
        rest = &rest[used..];
        if let Frame::DataGroup { lens, bytes, .. } = &frame {
            if let Ok(pieces) = hop_engine::protocol::split_group(lens, bytes) {
                assert_eq!(pieces.len(), lens.len());
                for (p, l) in pieces.iter().zip(lens) {
                    assert_eq!(p.len(), *l as usize);
                }
            }
        }
        if let Frame::DataStream { lens, bytes, .. } = &frame {
            // Pieces of one stream, decoded in the order they came, as the receiver does.
            if let Ok(pieces) = hop_engine::protocol::split_stream(&mut stream, lens, bytes) {
                assert_eq!(pieces.len(), lens.len());
                for (p, l) in pieces.iter().zip(lens) {
                    assert_eq!(p.len(), *l as usize);
                }
            }
        }
        if let Frame::Data { codec, bytes, .. } = frame {
            // The length a receiver expects comes from its manifest; try a few.
            for len in [0, 1, 4096, max] {
                if let Ok(out) = decode_payload(codec, bytes.clone(), len) {
                    assert_eq!(out.len(), len);
                }
                if let Ok(out) = hop_engine::delta::apply(&base, &bytes, len) {
                    assert_eq!(out.len(), len);
                }
                if let Ok(out) = hop_engine::delta::apply_ref(&base, &bytes, len) {
                    assert_eq!(out.len(), len);
                }
            }
        }
    }
});
