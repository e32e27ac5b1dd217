//! zstd with one compression and one decompression context per thread.
//!
//! `zstd::bulk::compress` and `decompress` create a context for every call; for a 4 KiB page
//! that costs more than the compression itself (a profile of a checkpoint delta put 0.4 CPU-s of
//! each side in `ZSTD_createCCtx` / `ZSTD_createDCtx`). Chunks are compressed one by one on the
//! sender's and receiver's worker threads, so a context per thread is reused for all of them.
//!
//! A chunk stream compresses its data as one zstd stream instead ([`StreamCompressor`] at the
//! sender, [`StreamDecompressor`] at the receiver, one of each per QUIC stream): every frame is
//! flushed, so it decodes as soon as it arrives, and later frames refer back to earlier ones.
//! Files of a tree share much (headers, licences, the same library in two packages): a 1.2 GB
//! container root file system of 45,701 files took 515 MB as zstd 1 frames of a file (or 1 MiB)
//! each, 494 MB as zstd 1 streams (16 of them, frames of 2 MiB of input) in the same CPU time,
//! and 464 MB at level 2 (rsync -z, zstd 3 over one stream: 461 MB).

use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer};

/// Window of a chunk stream's zstd stream: 2 MiB, so 16 streams at a receiver (2 lanes of 8)
/// hold 32 MiB of history; level 1's own window is 512 KiB.
pub const STREAM_WINDOW_LOG: u32 = 21;

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

/// The compressing end of a chunk stream's zstd stream.
///
/// The stream is a run of zstd frames, each ended before its input would wrap zstd's input
/// buffer (the window plus a block): past that point zstd matches against a split window, which
/// cost a 1.2 GB tree 3.29 CPU-s instead of 2.80 for 491 vs 494 MB. A new frame starts without
/// history, at most once per window of input.
pub struct StreamCompressor {
    cctx: CCtx<'static>,
    /// Input given to the current frame.
    in_frame: usize,
}

impl StreamCompressor {
    /// A stream compressing at `level`; `None` if zstd refuses the settings.
    pub fn new(level: i32) -> Option<Self> {
        let mut cctx = CCtx::try_create()?;
        cctx.set_parameter(CParameter::CompressionLevel(level))
            .ok()?;
        cctx.set_parameter(CParameter::WindowLog(STREAM_WINDOW_LOG))
            .ok()?;
        Some(StreamCompressor { cctx, in_frame: 0 })
    }

    /// `data` as the next piece of the stream, flushed: the receiver decodes it with what came
    /// before. `None` if zstd fails; the stream is then out of step and must not be used again.
    pub fn compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        use zstd_safe::zstd_sys::ZSTD_EndDirective::{ZSTD_e_end, ZSTD_e_flush};
        let mut out: Vec<u8> = Vec::with_capacity(zstd_safe::compress_bound(data.len()) + 64);
        if self.in_frame > 0 && self.in_frame + data.len() > 1 << STREAM_WINDOW_LOG {
            // End the frame (its last block, a few bytes) before this piece, which starts the
            // next one: the decoder reads both from this piece's bytes.
            self.run(&[], &mut out, ZSTD_e_end)?;
            self.in_frame = 0;
        }
        self.run(data, &mut out, ZSTD_e_flush)?;
        self.in_frame += data.len();
        Some(out)
    }

    /// Feed `data` with `directive` until zstd has written all of it out to `out`.
    fn run(
        &mut self,
        data: &[u8],
        out: &mut Vec<u8>,
        directive: zstd_safe::zstd_sys::ZSTD_EndDirective,
    ) -> Option<()> {
        let mut input = InBuffer::around(data);
        loop {
            let at = out.len();
            let mut output = OutBuffer::around_pos(out, at);
            let left = self
                .cctx
                .compress_stream2(&mut output, &mut input, directive)
                .ok()?;
            if left == 0 && input.pos() == data.len() {
                return Some(());
            }
            out.reserve(left.max(4096));
        }
    }
}

/// The decompressing end of a chunk stream's zstd stream; its context is made on first use.
#[derive(Default)]
pub struct StreamDecompressor {
    dctx: Option<DCtx<'static>>,
}

impl StreamDecompressor {
    /// Decode the next piece of the stream, `frame`, which must give exactly `len` bytes:
    /// nothing beyond `len` is ever written, and a window larger than the sender's is refused,
    /// so a hostile peer cannot make it allocate more.
    pub fn decompress(&mut self, frame: &[u8], len: usize) -> Result<Vec<u8>, String> {
        let dctx = match &mut self.dctx {
            Some(d) => d,
            None => {
                let mut d = DCtx::try_create().ok_or("no zstd context")?;
                d.set_parameter(DParameter::WindowLogMax(STREAM_WINDOW_LOG))
                    .map_err(|e| zstd_safe::get_error_name(e).to_string())?;
                self.dctx.insert(d)
            }
        };
        let mut out: Vec<u8> = Vec::with_capacity(len);
        let mut input = InBuffer::around(frame);
        loop {
            let (read, written) = (input.pos(), out.len());
            let mut output = OutBuffer::around_pos(&mut out, written);
            dctx.decompress_stream(&mut output, &mut input)
                .map_err(|e| zstd_safe::get_error_name(e).to_string())?;
            if input.pos() == frame.len() && out.len() == len {
                // All read and all room used: anything the context still holds is more than
                // was announced (the stream would be out of step).
                let mut probe = [0u8; 1];
                let mut spill = OutBuffer::around(&mut probe);
                let mut nothing = InBuffer::around(&[]);
                dctx.decompress_stream(&mut spill, &mut nothing)
                    .map_err(|e| zstd_safe::get_error_name(e).to_string())?;
                if spill.pos() > 0 {
                    return Err(format!("more than the {len} bytes announced"));
                }
                return Ok(out);
            }
            if (input.pos(), out.len()) == (read, written) {
                return Err(if out.len() == len {
                    format!("more than the {len} bytes announced")
                } else {
                    format!("{} bytes, not the {len} announced", out.len())
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_decodes_piece_by_piece_and_refers_back() {
        let text: Vec<u8> = (0..50_000u32)
            .flat_map(|i| format!("line {} of a log\n", i % 977).into_bytes())
            .collect();
        let pieces: Vec<&[u8]> = text.chunks(20_000).collect();
        let mut c = StreamCompressor::new(1).unwrap();
        let mut d = StreamDecompressor::default();
        let mut total = 0;
        for (i, p) in pieces.iter().enumerate() {
            let z = c.compress(p).unwrap();
            total += z.len();
            if i > 0 {
                // History helps: a piece costs less than compressed alone.
                assert!(z.len() < compress(p, 1).unwrap().len(), "piece {i}");
            }
            assert_eq!(d.decompress(&z, p.len()).unwrap(), *p, "piece {i}");
        }
        assert!(total < text.len() / 20);
        // Incompressible data grows by a few bytes only (raw blocks), never to the bound.
        let noise: Vec<u8> = (0..300_000u64)
            .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
            .collect();
        let z = c.compress(&noise).unwrap();
        assert!(z.len() <= noise.len() + 64, "{}", z.len());
        assert_eq!(d.decompress(&z, noise.len()).unwrap(), noise);
    }

    #[test]
    fn a_long_stream_goes_on_in_new_frames() {
        // 12 MiB of log lines in 300 KiB pieces: several windows' worth, so frames end and
        // start again inside pieces; every piece decodes, and the whole stays small.
        let text: Vec<u8> = (0..400_000u32)
            .flat_map(|i| format!("{} GET /item/{} 200\n", i % 86_400, i % 5_003).into_bytes())
            .collect();
        let mut c = StreamCompressor::new(1).unwrap();
        let mut d = StreamDecompressor::default();
        let mut total = 0;
        let mut rolled = 0;
        for p in text.chunks(300_000) {
            let before = c.in_frame;
            let z = c.compress(p).unwrap();
            rolled += usize::from(c.in_frame < before);
            total += z.len();
            assert_eq!(d.decompress(&z, p.len()).unwrap(), p);
        }
        assert!(rolled >= 4, "{rolled} new frames for {} bytes", text.len());
        assert!(total < text.len() / 5, "{total}");
    }

    #[test]
    fn a_stream_piece_must_have_its_announced_length() {
        let data = vec![42u8; 100_000];
        let mut c = StreamCompressor::new(3).unwrap();
        let z = c.compress(&data).unwrap();
        // Announced shorter: refused, never written past.
        assert!(StreamDecompressor::default()
            .decompress(&z, data.len() - 1)
            .is_err());
        // Announced longer: refused.
        assert!(StreamDecompressor::default()
            .decompress(&z, data.len() + 1)
            .is_err());
        assert!(StreamDecompressor::default()
            .decompress(b"not zstd at all", 10)
            .is_err());
        // A later piece cannot be read without the ones before it.
        let z2 = c.compress(&data).unwrap();
        assert!(StreamDecompressor::default()
            .decompress(&z2, data.len())
            .is_err());
        // A window larger than agreed is refused.
        let mut big = CCtx::create();
        big.set_parameter(CParameter::WindowLog(STREAM_WINDOW_LOG + 2))
            .unwrap();
        let mut wide = StreamCompressor {
            cctx: big,
            in_frame: 0,
        };
        let z = wide.compress(&data).unwrap();
        assert!(StreamDecompressor::default()
            .decompress(&z, data.len())
            .is_err());
    }

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
