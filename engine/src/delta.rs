//! Sub-chunk deltas: when a wanted chunk is an edited version of data the receiver holds (a few
//! pages rewritten in place, the common case in memory images and databases), only the changed
//! 512-byte blocks are sent.
//!
//! The receiver guesses, for every chunk it wants, the *base*: the bytes of its old data at the
//! place the chunk most likely came from (aligned on the nearest chunk it does hold). It sends a
//! 4-byte hash of each 512-byte block of the base with the want-list. The sender hashes the new
//! chunk on the same grid and sends a patch: a bitmap of the blocks to take from the base, and
//! the other blocks' bytes. The receiver rebuilds the chunk and checks it against its BLAKE3 id
//! like any other chunk; a wrong guess (or a 4-byte hash collision) fails that check and the file
//! is fetched whole.

use crate::error::{Error, Result};

/// Block size of the delta grid.
pub const BLOCK: usize = 512;

/// Hash of one block, as sent in a hint.
pub type BlockHash = [u8; 4];

/// XXH3 (64-bit, first 4 bytes): a hint only steers what the sender leaves out, and the
/// rebuilt chunk is checked against its BLAKE3 id, so a fast non-cryptographic hash does:
/// BLAKE3 on 512-byte inputs cost 0.08 CPU-s on each side of a 660 MB checkpoint delta.
fn block_hash(b: &[u8]) -> BlockHash {
    let h = xxhash_rust::xxh3::xxh3_64(b).to_le_bytes();
    [h[0], h[1], h[2], h[3]]
}

/// Hashes of the blocks of `base` (the last one may be short).
pub fn hint(base: &[u8]) -> Vec<BlockHash> {
    base.chunks(BLOCK).map(block_hash).collect()
}

/// A patch of `new` against a base described by `hint`, when it is smaller than `limit` bytes:
/// `[bitmap of blocks taken from the base][bytes of the other blocks]`.
pub fn encode(new: &[u8], hint: &[BlockHash], limit: usize) -> Option<Vec<u8>> {
    let blocks = new.len().div_ceil(BLOCK);
    let mut out = vec![0u8; blocks.div_ceil(8)];
    let mut reused = false;
    for (i, b) in new.chunks(BLOCK).enumerate() {
        if hint.get(i).is_some_and(|h| *h == block_hash(b)) {
            out[i / 8] |= 1 << (i % 8);
            reused = true;
        } else {
            out.extend_from_slice(b);
        }
        if out.len() >= limit {
            return None;
        }
    }
    reused.then_some(out)
}

/// Rebuild a chunk of `len` bytes from `base` and a patch. Never reads past either input and
/// never produces more than `len` bytes.
pub fn apply(base: &[u8], patch: &[u8], len: usize) -> Result<Vec<u8>> {
    let blocks = len.div_ceil(BLOCK);
    let map_len = blocks.div_ceil(8);
    let bad = |why: &str| Err(Error::Protocol(format!("bad chunk patch: {why}")));
    if patch.len() < map_len {
        return bad("shorter than its bitmap");
    }
    let (map, mut lit) = patch.split_at(map_len);
    let mut out = Vec::with_capacity(len);
    for i in 0..blocks {
        let n = BLOCK.min(len - i * BLOCK);
        if map[i / 8] & (1 << (i % 8)) != 0 {
            match base.get(i * BLOCK..i * BLOCK + n) {
                Some(b) => out.extend_from_slice(b),
                None => return bad("block beyond the base"),
            }
        } else {
            if lit.len() < n {
                return bad("literal bytes run out");
            }
            out.extend_from_slice(&lit[..n]);
            lit = &lit[n..];
        }
    }
    if !lit.is_empty() {
        return bad("trailing bytes");
    }
    Ok(out)
}

/// `new` as a difference to `base` (a chunk the receiver holds, named `base_id`):
/// `[16-byte base id][zstd frame of new XOR base]`, `base` taken as zero past its end. A page
/// where a few bytes changed XORs to nearly all zeros, a few dozen bytes once compressed; XOR
/// then plain zstd costs a third of the time of zstd with the base as dictionary and gives
/// half the bytes (measured on real redis dumps: 5.9 vs 14.9 us and 565 vs 1,122 KB for 7,794
/// changed pages). `None` when that is not smaller than `limit`.
pub fn encode_ref(
    new: &[u8],
    base: &[u8],
    base_id: &crate::id::ChunkId,
    level: i32,
    limit: usize,
) -> Option<Vec<u8>> {
    let mut x = new.to_vec();
    xor_into(&mut x, base);
    let z = crate::zstd_ctx::compress(&x, level)?;
    let mut out = Vec::with_capacity(crate::id::ID_LEN + z.len());
    out.extend_from_slice(&base_id.0);
    out.extend_from_slice(&z);
    (out.len() < limit).then_some(out)
}

/// `data ^= base`, `base` taken as zero past its end.
fn xor_into(data: &mut [u8], base: &[u8]) {
    for (d, b) in data.iter_mut().zip(base) {
        *d ^= b;
    }
}

/// The base id a [`encode_ref`] payload names, and its zstd frame.
pub fn split_ref(payload: &[u8]) -> Result<(crate::id::ChunkId, &[u8])> {
    if payload.len() < crate::id::ID_LEN {
        return Err(Error::Protocol("reference payload too short".into()));
    }
    let (id, z) = payload.split_at(crate::id::ID_LEN);
    let mut a = [0u8; crate::id::ID_LEN];
    a.copy_from_slice(id);
    Ok((crate::id::ChunkId(a), z))
}

/// Rebuild a chunk of exactly `len` bytes from the zstd frame of its XOR with `base` (see
/// [`encode_ref`]); never produces more, and a frame that yields fewer is refused.
pub fn apply_ref(base: &[u8], z: &[u8], len: usize) -> Result<Vec<u8>> {
    let mut out = crate::zstd_ctx::decompress(z, len).map_err(|e| {
        Error::Compression(format!("chunk does not decompress against its base: {e}"))
    })?;
    if out.len() != len {
        return Err(Error::Compression(format!(
            "chunk decompressed against its base to {} bytes, not {len}",
            out.len()
        )));
    }
    xor_into(&mut out, base);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::tests_support::noise;

    /// Found by `cargo fuzz run frame`: an empty zstd frame decoded to 0 bytes where 1 was
    /// expected, and was returned as the chunk.
    #[test]
    fn a_reference_that_decodes_short_is_refused() {
        let base = vec![7u8; 4096];
        let z = [0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x00, 0x01, 0x00, 0x00];
        assert!(apply_ref(&base, &z, 1).is_err());
        let crash = [
            0x06, 0x00, 0x00, 0x00, 0x03, 0xa1, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00, 0x04,
        ];
        if let Ok(Some((crate::protocol::Frame::Data { bytes, .. }, _))) =
            crate::protocol::decode(&crash)
        {
            for len in [0, 1, 4096] {
                if let Ok(out) = apply_ref(&base, &bytes, len) {
                    assert_eq!(out.len(), len);
                }
            }
        }
    }

    #[test]
    fn patches_carry_only_changed_blocks() {
        let base = noise(1, 8000);
        let mut new = base.clone();
        new[1000..1100].copy_from_slice(&noise(2, 100));
        let p = encode(&new, &hint(&base), new.len()).unwrap();
        assert!(p.len() <= 2 + 2 * BLOCK, "patch of {} bytes", p.len());
        assert_eq!(apply(&base, &p, new.len()).unwrap(), new);
        // Nothing in common: no patch.
        assert!(encode(&noise(3, 8000), &hint(&base), 8000).is_none());
        // A shorter base: blocks past its end are literal.
        let p = encode(&new, &hint(&base[..3000]), new.len()).unwrap();
        assert_eq!(apply(&base[..3000], &p, new.len()).unwrap(), new);
    }

    #[test]
    fn a_few_changed_bytes_cost_tens_of_bytes_against_a_base() {
        let base = noise(5, 4096);
        let mut new = base.clone();
        new[100..108].copy_from_slice(b"CHANGED!");
        let id = crate::id::ChunkId::of(&base);
        let p = encode_ref(&new, &base, &id, 1, 4096).unwrap();
        assert!(p.len() < 80, "{} bytes for an 8-byte change", p.len());
        let (got, z) = split_ref(&p).unwrap();
        assert_eq!(got, id);
        assert_eq!(apply_ref(&base, z, new.len()).unwrap(), new);
        // A bomb: never more than the chunk's length.
        assert!(apply_ref(&base, z, 100).is_err());
    }

    #[test]
    fn hostile_patches_are_refused() {
        let base = noise(1, 1000);
        assert!(apply(&base, &[], 1000).is_err());
        assert!(apply(&base, &[0xff], 4000).is_err()); // blocks beyond the base
        assert!(apply(&base, &[0, 1, 2], 1000).is_err()); // literal runs out
        assert!(apply(&base, &[0x3, 9], 1000).is_err()); // trailing bytes
    }

    #[test]
    fn refs_round_trip_and_are_a_plain_zstd_frame_of_the_xor() {
        let base = noise(7, 4096);
        let mut new = base.clone();
        new[100..140].copy_from_slice(&noise(8, 40));
        let id = crate::id::ChunkId::of(&base);
        for _ in 0..3 {
            // The per-thread contexts are reused: repeat to catch state left behind.
            let r = encode_ref(&new, &base, &id, 3, 4096).expect("a small reference");
            assert!(r.len() < 200, "reference of {} bytes", r.len());
            let (got_id, z) = split_ref(&r).unwrap();
            assert_eq!(got_id, id);
            assert_eq!(apply_ref(&base, z, new.len()).unwrap(), new);
            // Any zstd reads it: the new chunk XOR its base.
            let plain = zstd::bulk::decompress(z, new.len()).unwrap();
            let back: Vec<u8> = plain.iter().zip(&base).map(|(x, b)| x ^ b).collect();
            assert_eq!(back, new);
            // Against another base it fails cleanly instead of producing bytes.
            let wrong = apply_ref(&noise(9, 4096), z, new.len());
            assert!(wrong.map_or(true, |b| b != new));
        }
        // Output longer than announced is refused.
        let r = encode_ref(&new, &base, &id, 3, 4096).unwrap();
        assert!(apply_ref(&base, split_ref(&r).unwrap().1, 100).is_err());
    }
}
