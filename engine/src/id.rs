//! Chunk and file identities: BLAKE3 hashes, truncated to 128 bits.
//!
//! 128 bits keep accidental collisions out of reach (2^-64 even among 2^32 chunks) and make a
//! forged chunk a second-preimage problem of 2^128 work, while halving the manifest against full
//! 256-bit hashes. Peers are authenticated and the channel is integrity-protected by TLS; the
//! ids guard against corruption and stale local data, not against the sender.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Bytes in an id.
pub const ID_LEN: usize = 16;

/// A BLAKE3 hash (first [`ID_LEN`] bytes) naming a chunk (or, for a whole file, its content).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId(pub [u8; ID_LEN]);

impl ChunkId {
    /// Hash `data`.
    pub fn of(data: &[u8]) -> Self {
        blake3::hash(data).into()
    }

    /// The id as lowercase hex.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(2 * ID_LEN);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// A short prefix for logs and errors.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl From<blake3::Hash> for ChunkId {
    fn from(h: blake3::Hash) -> Self {
        let mut id = [0u8; ID_LEN];
        id.copy_from_slice(&h.as_bytes()[..ID_LEN]);
        ChunkId(id)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", self.short())
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// True when every byte of `data` is zero. Used to turn zero runs into holes and to mark zero
/// chunks, which then cost nothing on the wire.
pub fn is_zero(data: &[u8]) -> bool {
    let (pre, mid, post) = unsafe { data.align_to::<u128>() };
    pre.iter().all(|&b| b == 0) && post.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 4099]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[0] = 1;
        assert!(!is_zero(&v));
    }

    #[test]
    fn id_is_a_blake3_prefix() {
        let id = ChunkId::of(b"abc");
        assert_eq!(id.to_hex().len(), 2 * ID_LEN);
        assert!(blake3::hash(b"abc").to_hex().starts_with(&id.to_hex()));
    }
}
