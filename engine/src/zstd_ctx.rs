//! zstd with one compression and one decompression context per thread.
//!
//! `zstd::bulk::compress` and `decompress` create a context for every call; for a 4 KiB page
//! that costs more than the compression itself (a profile of a checkpoint delta put 0.4 CPU-s of
//! each side in `ZSTD_createCCtx` / `ZSTD_createDCtx`). Chunks are compressed one by one on the
//! sender's and receiver's worker threads, so a context per thread is reused for all of them.
//!
//! Chunk streams compress their data as zstd streams instead ([`StreamCompressor`] at the
//! sender, [`StreamDecompressor`] at the receiver): every piece is flushed, so it decodes as soon
//! as it arrives, and later pieces refer back to earlier ones. Files of a tree share much
//! (headers, licences, the same library in two packages). Each receiver lane has one zstd stream
//! over all its QUIC streams, with a large window and long-distance matching
//! ([`lane_window_log`], [`StreamCompressor::for_lane`]): a 1.2 GB container root file system of
//! 45,701 files took 516 MB on the wire as 16 zstd 1 streams of 2 MiB windows (one per QUIC
//! stream), 512 MB as 2 (one per lane), and 451 MB as 2 with 64 MiB windows and long-distance
//! matching (rsync -z, one zstd 3 stream: 463 MB).

use zstd::zstd_safe::{self, CCtx, CParameter, DCtx, DParameter, InBuffer, OutBuffer};

/// Window of the zstd stream of a chunk stream opened for one request: 2 MiB (level 1's own
/// window is 512 KiB). Also the smallest window of a lane's stream.
pub const STREAM_WINDOW_LOG: u32 = 21;

/// Largest window of a lane's zstd stream: 64 MiB, the memory each end spends on it.
pub const LANE_WINDOW_LOG_MAX: u32 = 26;

/// What the windows of all of a receiver's lanes add up to at most: 128 MiB.
pub const LANE_WINDOWS_BUDGET: u64 = 128 << 20;

/// Long-distance matching adds a match candidate every 2^this bytes. Fresh copy of a 1.2 GB
/// tree, one stream per lane with a 64 MiB window (dev rig, 1 Gbit/s): none 511.6 MB on the
/// wire; zstd's own choice for the window, 2^7, 446.8 MB for 1.6 more client CPU-s; 2^10 459.0 MB
/// for 0.8 more; 2^8 450.6 MB.
pub const LDM_HASH_RATE_LOG: u32 = 8;

/// Most output a stream decoder keeps ahead of the pieces it belongs to: 1 MiB. The sender
/// holds a run of small answers (each at most [`crate::protocol::GROUP_MAX`]) for at most this
/// much input.
pub const STREAM_CARRY_MAX: usize = 1 << 20;

/// Log2 of the window of each lane's zstd stream when a receiver has `lanes` lanes: their share
/// of [`LANE_WINDOWS_BUDGET`], between [`STREAM_WINDOW_LOG`] and [`LANE_WINDOW_LOG_MAX`].
pub fn lane_window_log(lanes: usize) -> u8 {
    let share = LANE_WINDOWS_BUDGET / lanes.max(1) as u64;
    let log = 63 - share.max(1).leading_zeros();
    log.clamp(STREAM_WINDOW_LOG, LANE_WINDOW_LOG_MAX) as u8
}

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

/// The compressing end of a zstd stream of chunk data.
///
/// The stream is a run of zstd frames, each ended before its input would wrap zstd's input
/// buffer (the window plus a block): past that point zstd matches against a split window, which
/// cost a 1.2 GB tree 3.29 CPU-s instead of 2.80 for 491 vs 494 MB. A new frame starts without
/// history, at most once per window of input.
pub struct StreamCompressor {
    cctx: CCtx<'static>,
    /// Input given to the current frame.
    in_frame: usize,
    /// The window: input a frame holds at most.
    window: usize,
    /// Pieces are not flushed (see [`StreamCompressor::hold`]).
    held: bool,
}

impl StreamCompressor {
    /// A stream compressing at `level` with a 2 MiB window ([`STREAM_WINDOW_LOG`]); `None` if
    /// zstd refuses the settings.
    pub fn new(level: i32) -> Option<Self> {
        Self::with_window(level, STREAM_WINDOW_LOG, false)
    }

    /// A lane's stream: compressing at `level` with a window of 2^`window_log` bytes (between
    /// [`STREAM_WINDOW_LOG`] and [`LANE_WINDOW_LOG_MAX`]) and, when that is larger than 2 MiB,
    /// long-distance matching, which finds what repeats far back (the same library in two
    /// packages) for little CPU. `None` if the window is out of range or zstd refuses.
    pub fn for_lane(level: i32, window_log: u32) -> Option<Self> {
        if !(STREAM_WINDOW_LOG..=LANE_WINDOW_LOG_MAX).contains(&window_log) {
            return None;
        }
        Self::with_window(level, window_log, window_log > STREAM_WINDOW_LOG)
    }

    fn with_window(level: i32, window_log: u32, long: bool) -> Option<Self> {
        let mut cctx = CCtx::try_create()?;
        cctx.set_parameter(CParameter::CompressionLevel(level))
            .ok()?;
        cctx.set_parameter(CParameter::WindowLog(window_log)).ok()?;
        if long {
            cctx.set_parameter(CParameter::EnableLongDistanceMatching(true))
                .ok()?;
            cctx.set_parameter(CParameter::LdmHashRateLog(LDM_HASH_RATE_LOG))
                .ok()?;
        }
        Some(StreamCompressor {
            cctx,
            in_frame: 0,
            window: 1 << window_log,
            held: false,
        })
    }

    /// `data` as the next piece of the stream, flushed: the receiver decodes it with what came
    /// before. While the stream is held, not flushed: the piece is what zstd has finished so
    /// far, and the rest of `data` comes out in later pieces. `None` if zstd fails; the stream
    /// is then out of step and must not be used again.
    pub fn compress(&mut self, data: &[u8]) -> Option<Vec<u8>> {
        use zstd_safe::zstd_sys::ZSTD_EndDirective::{ZSTD_e_continue, ZSTD_e_end, ZSTD_e_flush};
        let mut out: Vec<u8> = Vec::with_capacity(zstd_safe::compress_bound(data.len()) + 64);
        if self.in_frame > 0 && self.in_frame + data.len() > self.window {
            // End the frame (its last block, a few bytes) before this piece, which starts the
            // next one: the decoder reads both from this piece's bytes.
            self.run(&[], &mut out, ZSTD_e_end)?;
            self.in_frame = 0;
        }
        let directive = if self.held {
            ZSTD_e_continue
        } else {
            ZSTD_e_flush
        };
        self.run(data, &mut out, directive)?;
        self.in_frame += data.len();
        Some(out)
    }

    /// Hold the stream (`true`): pieces are no longer flushed, so that small ones share zstd's
    /// blocks, which a tree of small files costs dearly one per file (45,770 files: 7.7-8.5
    /// CPU-s flushed after each, 6.4-7.0 flushed every 256 KiB). Let go (`false`): the
    /// returned bytes end the held pieces' output, so that everything given so far decodes.
    /// `None` if zstd fails.
    pub fn hold(&mut self, on: bool) -> Option<Vec<u8>> {
        let was = std::mem::replace(&mut self.held, on);
        let mut out = Vec::new();
        if was && !on {
            self.run(
                &[],
                &mut out,
                zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_flush,
            )?;
        }
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

/// The decompressing end of a zstd stream of chunk data; its context is made on first use.
pub struct StreamDecompressor {
    dctx: Option<DCtx<'static>>,
    /// Log2 of the largest window accepted.
    window_log: u32,
    /// Output decoded ahead of the pieces it belongs to, from `carried` on.
    carry: Vec<u8>,
    carried: usize,
}

impl Default for StreamDecompressor {
    /// The end of a stream with a window of at most 2 MiB ([`STREAM_WINDOW_LOG`]).
    fn default() -> Self {
        Self::with_window_log(STREAM_WINDOW_LOG)
    }
}

impl StreamDecompressor {
    /// The end of a lane's stream, whose window is at most 2^`window_log` bytes.
    pub fn with_window_log(window_log: u32) -> Self {
        StreamDecompressor {
            dctx: None,
            window_log,
            carry: Vec::new(),
            carried: 0,
        }
    }

    /// Decode the next piece of the stream, `frame`, which must give exactly `len` bytes:
    /// nothing beyond `len` is ever written, and a window larger than the sender's is refused,
    /// so a hostile peer cannot make it allocate more.
    pub fn decompress(&mut self, frame: &[u8], len: usize) -> Result<Vec<u8>, String> {
        self.next_bytes(frame, len, 0)
    }

    /// Decode the next piece of a chunk stream, `frame`, and return the next `len` bytes of the
    /// stream's output. A piece may give more (the sender put the bytes of a run of small
    /// answers in its first piece): the rest is kept for the pieces after it, which may then
    /// be empty. Refused: a piece that leaves fewer than `len` bytes, or more than
    /// [`STREAM_CARRY_MAX`] kept; nothing beyond that is ever written.
    pub fn decompress_ahead(&mut self, frame: &[u8], len: usize) -> Result<Vec<u8>, String> {
        self.next_bytes(frame, len, STREAM_CARRY_MAX)
    }

    /// The next `len` bytes of output, `frame` decoded first, at most `keep` bytes kept after.
    fn next_bytes(&mut self, frame: &[u8], len: usize, keep: usize) -> Result<Vec<u8>, String> {
        let kept = self.carry.len() - self.carried;
        // Room for this piece's output: what `len` still needs, and what may be kept.
        let cap = (len + keep).saturating_sub(kept);
        let out = if frame.is_empty() {
            Vec::new()
        } else {
            self.decode(frame, len.saturating_sub(kept), cap)?
        };
        if kept + out.len() < len {
            return Err(format!(
                "{} bytes, not the {len} announced",
                kept + out.len()
            ));
        }
        if kept == 0 && out.len() == len {
            return Ok(out);
        }
        if self.carried > 0 {
            self.carry.drain(..self.carried);
            self.carried = 0;
        }
        if self.carry.is_empty() {
            self.carry = out;
        } else {
            self.carry.extend_from_slice(&out);
        }
        let piece = self.carry[..len].to_vec();
        self.carried = len;
        if self.carried == self.carry.len() {
            self.carry.clear();
            self.carried = 0;
        }
        Ok(piece)
    }

    /// All of `frame` decoded: at least room for `want` bytes, refused beyond `cap`.
    fn decode(&mut self, frame: &[u8], want: usize, cap: usize) -> Result<Vec<u8>, String> {
        let dctx = match &mut self.dctx {
            Some(d) => d,
            None => {
                let mut d = DCtx::try_create().ok_or("no zstd context")?;
                d.set_parameter(DParameter::WindowLogMax(self.window_log))
                    .map_err(|e| zstd_safe::get_error_name(e).to_string())?;
                self.dctx.insert(d)
            }
        };
        let mut out: Vec<u8> = Vec::with_capacity(want.max(1).min(cap));
        let mut input = InBuffer::around(frame);
        let more = || format!("more than the {want} bytes announced");
        loop {
            if out.len() == out.capacity() {
                if out.len() >= cap {
                    return Err(more());
                }
                out.reserve_exact((cap - out.len()).min(out.len().max(64 << 10)));
            }
            let (read, written) = (input.pos(), out.len());
            let mut output = OutBuffer::around_pos(&mut out, written);
            dctx.decompress_stream(&mut output, &mut input)
                .map_err(|e| zstd_safe::get_error_name(e).to_string())?;
            if out.len() > cap {
                return Err(more());
            }
            let full = out.len() == out.capacity();
            if input.pos() == frame.len() {
                if !full {
                    // All read, and room left: zstd gave all it could.
                    return Ok(out);
                }
                // All read and all room used: whether the context still holds output is
                // asked one byte at a time (most pieces end here, exactly as announced).
                let mut probe = [0u8; 1];
                let mut spill = OutBuffer::around(&mut probe);
                let mut nothing = InBuffer::around(&[]);
                dctx.decompress_stream(&mut spill, &mut nothing)
                    .map_err(|e| zstd_safe::get_error_name(e).to_string())?;
                if spill.pos() == 0 {
                    return Ok(out);
                }
                if out.len() >= cap {
                    return Err(more());
                }
                out.reserve_exact((cap - out.len()).min(out.len().max(64 << 10)));
                out.push(probe[0]);
            } else if !full && (input.pos(), out.len()) == (read, written) {
                return Err(more());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_pieces_decode_ahead_within_the_limit() {
        let a: Vec<u8> = (0..3000u32)
            .flat_map(|i| format!("a {i}\n").into_bytes())
            .collect();
        let b: Vec<u8> = (0..2000u32)
            .flat_map(|i| format!("b {i}\n").into_bytes())
            .collect();
        let mut c = StreamCompressor::for_lane(1, 23).unwrap();
        // Held and let go with nothing given: nothing to send (a run of page groups).
        assert_eq!(c.hold(true).unwrap(), Vec::<u8>::new());
        assert_eq!(c.hold(false).unwrap(), Vec::<u8>::new());
        assert_eq!(c.hold(true).unwrap(), Vec::<u8>::new());
        let mut run = c.compress(&a).unwrap();
        run.extend(c.compress(&b).unwrap());
        run.extend(c.hold(false).unwrap());
        // Every byte of the run in the first piece; the second piece is empty.
        let mut d = StreamDecompressor::with_window_log(23);
        assert_eq!(d.decompress_ahead(&run, a.len()).unwrap(), a);
        assert_eq!(d.decompress_ahead(&[], b.len()).unwrap(), b);
        assert!(d
            .decompress_ahead(&[], 1)
            .unwrap_err()
            .contains("not the 1"));
        // Let go, the stream flushes again: the next piece decodes alone.
        let z = c.compress(&a).unwrap();
        assert_eq!(d.decompress_ahead(&z, a.len()).unwrap(), a);
        assert_eq!(c.hold(true).unwrap(), Vec::<u8>::new());
        assert_eq!(c.hold(false).unwrap(), Vec::<u8>::new());
        // The exact decoder keeps nothing ahead.
        let mut exact = StreamDecompressor::with_window_log(23);
        assert!(exact
            .decompress(&run, a.len())
            .unwrap_err()
            .contains("announced"));
        // A piece that would leave more than STREAM_CARRY_MAX kept is refused.
        let big = crate::chunk::tests_support::noise(9, STREAM_CARRY_MAX + 4096);
        let mut c = StreamCompressor::for_lane(1, 23).unwrap();
        let z = c.compress(&big).unwrap();
        let mut d = StreamDecompressor::with_window_log(23);
        assert!(d
            .decompress_ahead(&z, 1000)
            .unwrap_err()
            .contains("announced"));
        let mut d = StreamDecompressor::with_window_log(23);
        assert_eq!(d.decompress_ahead(&z, 4096).unwrap(), big[..4096]);
    }

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
            window: 1 << (STREAM_WINDOW_LOG + 2),
            held: false,
        };
        let z = wide.compress(&data).unwrap();
        assert!(StreamDecompressor::default()
            .decompress(&z, data.len())
            .is_err());
    }

    #[test]
    fn a_lane_stream_finds_repeats_far_back_within_its_window() {
        // The lanes' windows share the budget: 64 MiB for 2 lanes, 16 MiB for 8, never below
        // the 2 MiB of a stream's own.
        assert_eq!(lane_window_log(1), LANE_WINDOW_LOG_MAX as u8);
        assert_eq!(lane_window_log(2), 26);
        assert_eq!(lane_window_log(8), 24);
        assert_eq!(lane_window_log(1000), STREAM_WINDOW_LOG as u8);
        assert!(StreamCompressor::for_lane(1, LANE_WINDOW_LOG_MAX + 1).is_none());
        assert!(StreamCompressor::for_lane(1, STREAM_WINDOW_LOG - 1).is_none());
        // 1 MiB of noise, 6 MiB of other noise, then the first MiB again: the repeat lies
        // beyond a 2 MiB window but within 8 MiB.
        let noise = crate::chunk::tests_support::noise;
        let first = noise(1, 1 << 20);
        let pieces = [first.clone(), noise(2, 6 << 20), first];
        let sizes = |c: &mut StreamCompressor, d: &mut StreamDecompressor| -> Vec<usize> {
            pieces
                .iter()
                .map(|p| {
                    let z = c.compress(p).unwrap();
                    assert_eq!(d.decompress(&z, p.len()).unwrap(), *p);
                    z.len()
                })
                .collect()
        };
        let mut lane = StreamCompressor::for_lane(1, 23).unwrap();
        let far = sizes(&mut lane, &mut StreamDecompressor::with_window_log(23));
        assert!(far[2] < 64 << 10, "the repeat cost {} bytes", far[2]);
        let near = sizes(
            &mut StreamCompressor::new(1).unwrap(),
            &mut StreamDecompressor::default(),
        );
        assert!(
            near[2] > 1 << 20,
            "a 2 MiB window cannot reach it: {}",
            near[2]
        );
        // A receiver that agreed on a smaller window refuses the lane's stream.
        let mut lane = StreamCompressor::for_lane(1, 23).unwrap();
        let z = lane.compress(&pieces[0]).unwrap();
        assert!(StreamDecompressor::with_window_log(22)
            .decompress(&z, pieces[0].len())
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
