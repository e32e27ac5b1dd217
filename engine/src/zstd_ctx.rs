//! zstd with one compression and one decompression context per thread.
//!
//! `zstd::bulk::compress` and `decompress` create a context for every call; for a 4 KiB page
//! that costs more than the compression itself (a profile of a checkpoint delta put 0.4 CPU-s of
//! each side in `ZSTD_createCCtx` / `ZSTD_createDCtx`). Chunks are compressed one by one on the
//! sender's and receiver's worker threads, so a context per thread is reused for all of them.

thread_local! {
    static CCTX: std::cell::RefCell<zstd::zstd_safe::CCtx<'static>> =
        std::cell::RefCell::new(zstd::zstd_safe::CCtx::create());
    static DCTX: std::cell::RefCell<zstd::zstd_safe::DCtx<'static>> =
        std::cell::RefCell::new(zstd::zstd_safe::DCtx::create());
}

/// `data` as one zstd frame at `level`; `None` if zstd fails.
pub fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    CCTX.with(|c| {
        let mut c = c.borrow_mut();
        let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
        c.compress(&mut out, data, level).ok().map(|_| out)
    })
}

/// The content of zstd frame `frame`, refused if it would exceed `cap` bytes (nothing beyond
/// `cap` is ever allocated or written, so a compression bomb costs nothing).
pub fn decompress(frame: &[u8], cap: usize) -> Result<Vec<u8>, String> {
    DCTX.with(|d| {
        let mut d = d.borrow_mut();
        let mut out = Vec::with_capacity(cap);
        d.decompress(&mut out, frame)
            .map(|_| out)
            .map_err(|e| zstd::zstd_safe::get_error_name(e).to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bound() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let z = compress(&data, 3).unwrap();
        assert!(z.len() < data.len() / 10);
        assert_eq!(decompress(&z, data.len()).unwrap(), data);
        // One byte short of room: refused, not truncated.
        assert!(decompress(&z, data.len() - 1).is_err());
        assert!(decompress(b"not zstd", 100).is_err());
        // The contexts are reused: a second round trip on the same thread agrees.
        let z2 = compress(&data, 1).unwrap();
        assert_eq!(decompress(&z2, data.len()).unwrap(), data);
    }
}
