//! The receiver's side of chunk transfer: a [`ChunkSource`] over QUIC streams.
//!
//! Each lane of the receiver gets a few streams (*strands*, see
//! [`super::endpoint::NetOptions::strands`]). Every request announced for a lane is written at
//! once, split into parts of at most [`PART_CHUNKS`] chunks; parts go to one strand until it
//! was given [`STRAND_RUN`] bytes, then to the next, so the sender answers while earlier files
//! are still being assembled and while the manifest is still arriving, one large file is in
//! flight on every strand. Each part carries its [`Turn`] in the lane: with compression on, the
//! sender compresses all of a lane's parts as one zstd stream in that order (see
//! [`crate::zstd_ctx`]), and the lane reads the parts back, and decodes them, in the same order
//! (the answers to parts it skips are read and decoded too, since later pieces refer to them).
//! The strands' flow-control windows (and a small bounded queue each) are the only buffering. A
//! strand that fails or loses step fails its lane: the rest of the lane's fetches go alone. A
//! fetch that was not announced (a retry) gets a stream of its own.

use super::pushed::Pushed;
use super::wire::{read_msg, write_msg};
use crate::assemble::Fetched;
use crate::error::{Error, Result};
use crate::protocol::{self, Frame, Turn};
use crate::receiver::{ChunkSource, Request};
use crate::zstd_ctx::StreamDecompressor;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

/// Frames read from one stream, ahead of use.
const QUEUE: usize = 16;

/// Chunks per part: a request for more is split into parts.
pub const PART_CHUNKS: usize = 16;

/// Bytes of parts a strand is given before the next strand's turn: half a stream window, so
/// each strand keeps a few runs in flight; a few dozen small files share a stream's context.
pub const STRAND_RUN: u64 = 1 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A part for a stream to ask for, with its turn in the lane (none on a stream of its own).
type Part = (Request, Option<Turn>);

/// The frames that come back on a stream opened for one request, and its own zstd stream.
struct Answers {
    frames: mpsc::Receiver<Result<Frame>>,
    unstream: StreamDecompressor,
}

impl Answers {
    fn new(frames: mpsc::Receiver<Result<Frame>>) -> Self {
        Answers {
            frames,
            unstream: StreamDecompressor::default(),
        }
    }
}

/// What a lane reads from: each strand's answers, and the lane's zstd stream.
struct Reading {
    /// Each strand's answers, by strand; empty once the lane failed.
    frames: Vec<mpsc::Receiver<Result<Frame>>>,
    unstream: StreamDecompressor,
}

/// One lane: its strands, where the parts of each announced request went, and the parts
/// whose answers were not read yet.
struct Lane {
    /// Each strand's way to the sender: parts written as they are announced.
    strands: Vec<mpsc::UnboundedSender<Part>>,
    announced: Mutex<Announced>,
    /// Announced parts whose answers were not read yet, in turn order: (strand, entry, chunk
    /// numbers).
    pending: Mutex<VecDeque<(usize, u32, Vec<u32>)>>,
    reading: Mutex<Reading>,
    /// A strand failed or lost step: nothing more is announced on the lane.
    failed: std::sync::atomic::AtomicBool,
}

impl Lane {
    /// Stop reading the lane: its streams end, and its fetches go alone from now on.
    fn fail(&self, reading: &mut Reading) {
        reading.frames.clear();
        self.failed
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The parts of one announced request: (strand, chunk numbers), in order.
type StrandParts = Vec<(usize, Vec<u32>)>;

/// The parts of a lane's announced requests that were not fetched yet.
#[derive(Default)]
struct Announced {
    /// The strand the next part goes to.
    next: usize,
    /// The next part's turn.
    seq: u64,
    /// Bytes of the parts given to that strand in its current run.
    run: u64,
    /// Entry -> the parts of each request announced for it (one, or one per list part of a
    /// file written as its list arrives), as (strand, chunk numbers), in order.
    parts: HashMap<u32, VecDeque<StrandParts>>,
}

impl Announced {
    /// The strand (of `strands`) a part of `bytes` goes to: the current one, which then moves
    /// on once its run reaches [`STRAND_RUN`].
    fn assign(&mut self, bytes: u64, strands: usize) -> usize {
        let s = self.next;
        self.run += bytes.max(1);
        if self.run >= STRAND_RUN {
            self.next = (s + 1) % strands.max(1);
            self.run = 0;
        }
        s
    }
}

/// `req` as parts of at most [`PART_CHUNKS`] chunks (hints split along).
fn split(req: Request) -> Vec<Request> {
    if req.want.len() <= PART_CHUNKS {
        return vec![req];
    }
    let hints = (!req.hints.is_empty()).then_some(&req.hints);
    let n = req.want.len() as u64;
    req.want
        .chunks(PART_CHUNKS)
        .enumerate()
        .map(|(i, want)| Request {
            entry: req.entry,
            want: want.to_vec(),
            hints: hints.map_or_else(Vec::new, |h| {
                h[i * PART_CHUNKS..(i * PART_CHUNKS + want.len()).min(h.len())].to_vec()
            }),
            no_refs: req.no_refs,
            // Each part's share, by its number of chunks.
            bytes: req.bytes * want.len() as u64 / n,
        })
        .collect()
}

/// Fetches chunks from the sender at the other end of a connection.
pub struct StreamSource {
    conn: quinn::Connection,
    rt: Handle,
    lanes: Vec<Mutex<Option<Arc<Lane>>>>,
    /// Streams per lane.
    strands: usize,
    /// Log2 of the window of each lane's zstd stream.
    window_log: u8,
    /// Chunks the sender pushes unasked: a file all of whose wanted chunks are pushed is taken
    /// from there, without a want-list.
    pushed: Option<Arc<Pushed>>,
    /// Chunks taken from the push.
    taken: std::sync::atomic::AtomicU64,
    /// Requests (or parts) fetched over a stream of their own.
    alone: std::sync::atomic::AtomicU64,
}

impl StreamSource {
    /// A source with `lanes` lanes of `strands` streams each on `conn`, and the request's
    /// pushed chunks if there are any. `rt` runs the stream tasks; fetches are made from
    /// threads outside it.
    pub fn new(
        conn: quinn::Connection,
        rt: Handle,
        lanes: usize,
        strands: usize,
        pushed: Option<Arc<Pushed>>,
    ) -> Self {
        StreamSource {
            conn,
            rt,
            lanes: (0..lanes.max(1)).map(|_| Mutex::new(None)).collect(),
            strands: strands.max(1),
            window_log: crate::zstd_ctx::lane_window_log(lanes.max(1)),
            pushed,
            taken: Default::default(),
            alone: Default::default(),
        }
    }

    /// Requests (or parts of one) fetched over a stream of their own so far: retries, and
    /// the rest of a lane whose streams failed.
    pub fn fetched_alone(&self) -> u64 {
        self.alone.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Chunks taken from those the sender pushed, so far.
    pub fn taken_from_push(&self) -> u64 {
        self.taken.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The push that covers `req` (every chunk it wants was pushed), if any. A retry
    /// (`no_refs`) never takes pushed chunks: they may be the references that failed.
    fn push_for(&self, req: &Request) -> Option<&Pushed> {
        self.pushed
            .as_deref()
            .filter(|p| !req.no_refs && p.covers(req.entry, &req.want))
    }

    /// Open a stream that writes every request `reqs` yields, and forward the frames that come
    /// back.
    fn open(&self, mut reqs: mpsc::UnboundedReceiver<Part>) -> mpsc::Receiver<Result<Frame>> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let conn = self.conn.clone();
        self.rt.spawn(async move {
            let (mut send, mut recv) = match conn.open_bi().await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(super::wire::conn_error(&e))).await;
                    return;
                }
            };
            let writer = async move {
                while let Some((r, turn)) = reqs.recv().await {
                    let want = Frame::Want {
                        entry: r.entry,
                        runs: protocol::to_runs(&r.want),
                        hints: r.hints,
                        no_refs: r.no_refs,
                        turn,
                    };
                    write_msg(&mut send, &want).await?;
                }
                let _ = send.finish();
                Ok::<(), Error>(())
            };
            let tx2 = tx.clone();
            let reader = async move {
                loop {
                    match read_msg::<Frame>(&mut recv).await {
                        Ok(Some(f)) => {
                            if tx2.send(Ok(f)).await.is_err() {
                                return; // the lane is gone; dropping `recv` stops the stream
                            }
                        }
                        Ok(None) => return,
                        Err(e) => {
                            let _ = tx2.send(Err(e)).await;
                            return;
                        }
                    }
                }
            };
            let (w, ()) = tokio::join!(writer, reader);
            if let Err(e) = w {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }

    /// Read the frames answering one request from `frames`, decoding stream pieces with
    /// `unstream` and passing chunks to `sink` until it fails. Also returns whether the stream is
    /// still in step afterwards.
    fn consume(
        frames: &mut mpsc::Receiver<Result<Frame>>,
        unstream: &mut StreamDecompressor,
        entry: u32,
        want: &[u32],
        sink: &mut dyn FnMut(Fetched) -> Result<()>,
    ) -> (Result<()>, bool) {
        let mut sink_err = None;
        let mut i = 0usize;
        while let Some(&n) = want.get(i) {
            i += 1;
            let frame = match frames.blocking_recv() {
                Some(Ok(f)) => f,
                Some(Err(e)) => return (Err(e), false),
                None => {
                    return (
                        Err(Error::Transport("chunk stream ended early".into())),
                        false,
                    )
                }
            };
            // Several chunks in one frame: how many, and their bytes decoded.
            let (count, decoded) = match frame {
                Frame::Data {
                    entry: e,
                    chunk,
                    codec,
                    bytes,
                } if e == entry && chunk == n => {
                    if sink_err.is_none() {
                        if let Err(err) = sink((n, codec, bytes)) {
                            sink_err = Some(err);
                        }
                    }
                    continue;
                }
                Frame::DataGroup {
                    entry: e,
                    first,
                    lens,
                    bytes,
                } if e == entry
                    && first == n
                    && lens.len() >= 2
                    && i - 1 + lens.len() <= want.len() =>
                {
                    (lens.len(), protocol::split_group(&lens, &bytes))
                }
                // Decoded even when the part is skipped: the stream's next pieces refer to it.
                Frame::DataStream {
                    entry: e,
                    first,
                    lens,
                    bytes,
                } if e == entry
                    && first == n
                    && !lens.is_empty()
                    && i - 1 + lens.len() <= want.len() =>
                {
                    let pieces = protocol::split_stream(unstream, &lens, &bytes);
                    (lens.len(), pieces)
                }
                Frame::Failed { entry: e, reason } if e == entry => {
                    return (Err(sink_err.unwrap_or(Error::Remote(reason))), true);
                }
                other => {
                    return (
                        Err(Error::Protocol(format!(
                            "expected chunk {n} of entry {entry}, got {}",
                            describe(&other)
                        ))),
                        false,
                    )
                }
            };
            let next = &want[i - 1..i - 1 + count];
            i += count - 1;
            match decoded {
                Ok(pieces) => {
                    for (&m, piece) in next.iter().zip(pieces) {
                        if sink_err.is_none() {
                            if let Err(err) = sink((m, protocol::Codec::Raw, piece)) {
                                sink_err = Some(err);
                            }
                        }
                    }
                }
                // Chunks that do not decode as announced: the stream cannot be trusted to be in
                // step any more.
                Err(e) => return (Err(sink_err.unwrap_or(e)), false),
            }
        }
        (sink_err.map_or(Ok(()), Err), true)
    }

    /// Fetch a request announced on `lane`, part by part from its strands: returns `None` if
    /// it was not announced (as it is now). A part whose strand failed is fetched alone.
    fn fetch_announced(
        &self,
        lane: &Lane,
        req: &Request,
        sink: &mut dyn FnMut(Fetched) -> Result<()>,
    ) -> Option<Result<()>> {
        let parts = {
            let mut a = lock(&lane.announced);
            let queue = a.parts.get_mut(&req.entry)?;
            // Requests of the entry announced before this one were skipped.
            let pos = queue
                .iter()
                .position(|p| p.iter().flat_map(|(_, w)| w.iter()).eq(req.want.iter()))?;
            let parts = queue.drain(..=pos).next_back();
            if queue.is_empty() {
                a.parts.remove(&req.entry);
            }
            parts?
        };
        for (s, want) in parts {
            let r = Self::fetch_part(lane, s, req.entry, &want, sink).unwrap_or_else(|| {
                let part = Request {
                    entry: req.entry,
                    bytes: req.bytes * want.len() as u64 / req.want.len().max(1) as u64,
                    want,
                    hints: Vec::new(),
                    no_refs: req.no_refs,
                };
                self.fetch_alone(&part, sink)
            });
            if r.is_err() {
                return Some(r);
            }
        }
        Some(Ok(()))
    }

    /// Read the answer to part `want` of `entry` from strand `s` of `lane`, after the answers
    /// to parts announced before it that were skipped (in turn order, on whichever strands they
    /// went): returns `None` if the part is not pending or the lane failed.
    fn fetch_part(
        lane: &Lane,
        s: usize,
        entry: u32,
        want: &[u32],
        sink: &mut dyn FnMut(Fetched) -> Result<()>,
    ) -> Option<Result<()>> {
        let mut reading = lock(&lane.reading);
        loop {
            if reading.frames.is_empty() {
                return None;
            }
            let (at, mine) = {
                let mut pending = lock(&lane.pending);
                let pos = pending
                    .iter()
                    .position(|(t, e, w)| (*t, *e, w.as_slice()) == (s, entry, want))?;
                (pending.pop_front()?, pos == 0)
            };
            let (t, e, w) = at;
            let Reading { frames, unstream } = &mut *reading;
            let frames = frames.get_mut(t)?;
            let (r, in_step) = if mine {
                Self::consume(frames, unstream, entry, want, sink)
            } else {
                Self::consume(frames, unstream, e, &w, &mut |_| Ok(()))
            };
            if !in_step {
                lane.fail(&mut reading);
            }
            if mine {
                return Some(r);
            }
        }
    }
}

fn describe(f: &Frame) -> String {
    match f {
        Frame::Data { entry, chunk, .. } => format!("chunk {chunk} of entry {entry}"),
        Frame::DataGroup { entry, first, .. } | Frame::DataStream { entry, first, .. } => {
            format!("chunks from {first} of entry {entry}")
        }
        Frame::Failed { entry, .. } => format!("failure of entry {entry}"),
        other => format!("{other:?}"),
    }
}

impl ChunkSource for StreamSource {
    fn lanes(&self) -> usize {
        self.lanes.len()
    }

    fn chunk_list(&self, entry: u32) -> Result<Vec<crate::manifest::ChunkSpec>> {
        let conn = self.conn.clone();
        self.rt.block_on(async move {
            let (mut send, mut recv) = conn
                .open_bi()
                .await
                .map_err(|e| super::wire::conn_error(&e))?;
            write_msg(&mut send, &Frame::ListWant { entry }).await?;
            let _ = send.finish();
            let mut out = Vec::new();
            loop {
                match read_msg::<Frame>(&mut recv).await? {
                    Some(Frame::FileList {
                        part: crate::chunklist::ListPart::Chunks(c),
                        last,
                        ..
                    }) => {
                        out.extend(c);
                        if out.len() > crate::chunklist::MAX_FILE_CHUNKS {
                            return Err(Error::Limit(format!(
                                "a file of more than {} chunks",
                                crate::chunklist::MAX_FILE_CHUNKS
                            )));
                        }
                        if last {
                            return Ok(out);
                        }
                    }
                    Some(Frame::Failed { reason, .. }) => return Err(Error::Remote(reason)),
                    Some(other) => {
                        return Err(Error::Protocol(format!(
                            "expected the chunk list of entry {entry}, got {}",
                            describe(&other)
                        )))
                    }
                    None => {
                        return Err(Error::Protocol(format!(
                            "the chunk list of entry {entry} ended early"
                        )))
                    }
                }
            }
        })
    }

    fn push_covers(&self, entry: u32, want: &[u32]) -> Option<bool> {
        let p = self.pushed.as_deref()?;
        p.has(entry).then(|| p.covers(entry, want))
    }

    fn unneeded(&self, entry: u32) {
        if let Some(p) = &self.pushed {
            p.drop_entry(entry);
        }
    }

    fn announce(&self, lane: usize, reqs: Vec<Request>) {
        let Some(slot) = self.lanes.get(lane) else {
            return;
        };
        let l = lock(slot)
            .get_or_insert_with(|| {
                let (strands, frames) = (0..self.strands)
                    .map(|_| {
                        let (more, reqs) = mpsc::unbounded_channel();
                        (more, self.open(reqs))
                    })
                    .unzip();
                Arc::new(Lane {
                    strands,
                    announced: Mutex::default(),
                    pending: Mutex::default(),
                    reading: Mutex::new(Reading {
                        frames,
                        unstream: StreamDecompressor::with_window_log(u32::from(self.window_log)),
                    }),
                    failed: Default::default(),
                })
            })
            .clone();
        if l.failed.load(std::sync::atomic::Ordering::Relaxed) {
            return; // fetched alone
        }
        let mut announced = lock(&l.announced);
        for r in reqs {
            if self.push_for(&r).is_some() {
                continue; // its chunks are on their way already
            }
            if let Some(p) = &self.pushed {
                p.drop_entry(r.entry); // fetched as usual: what was pushed is not used
            }
            let entry = r.entry;
            let mut parts = Vec::new();
            for part in split(r) {
                let s = announced.assign(part.bytes, l.strands.len());
                let turn = Turn {
                    lane: lane as u32,
                    seq: announced.seq,
                    window_log: self.window_log,
                };
                announced.seq += 1;
                lock(&l.pending).push_back((s, part.entry, part.want.clone()));
                parts.push((s, part.want.clone()));
                // A closed channel means the stream failed; fetches will find out and go alone.
                let _ = l.strands[s].send((part, Some(turn)));
            }
            announced.parts.entry(entry).or_default().push_back(parts);
        }
    }

    fn fetch(
        &self,
        lane: usize,
        req: &Request,
        sink: &mut dyn FnMut(Fetched) -> Result<()>,
    ) -> Result<()> {
        if let Some(p) = self.push_for(req) {
            let r = req.want.iter().try_for_each(|&n| {
                let (codec, bytes) = p.take(req.entry, n)?;
                self.taken
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                sink((n, codec, bytes))
            });
            p.drop_entry(req.entry);
            return r;
        }
        let l = self.lanes.get(lane).and_then(|s| lock(s).clone());
        if let Some(l) = l {
            if let Some(r) = self.fetch_announced(&l, req, sink) {
                return r;
            }
        }
        // Not announced, or the lane's stream failed: a stream for this request alone.
        self.fetch_alone(req, sink)
    }

    fn fetch_alone(
        &self,
        req: &Request,
        sink: &mut dyn FnMut(Fetched) -> Result<()>,
    ) -> Result<()> {
        self.alone
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (more, reqs) = mpsc::unbounded_channel();
        let _ = more.send((req.clone(), None));
        drop(more);
        let mut a = Answers::new(self.open(reqs));
        Self::consume(&mut a.frames, &mut a.unstream, req.entry, &req.want, sink).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_split_into_parts_with_their_hints() {
        let small = Request {
            entry: 1,
            want: vec![3, 4],
            hints: Vec::new(),
            no_refs: false,
            bytes: 8192,
        };
        assert_eq!(split(small.clone()), vec![small]);
        let want: Vec<u32> = (0..(2 * PART_CHUNKS as u32 + 3)).collect();
        let hints: Vec<Vec<crate::delta::BlockHash>> =
            want.iter().map(|&c| vec![c.to_le_bytes()]).collect();
        let parts = split(Request {
            entry: 7,
            want: want.clone(),
            hints: hints.clone(),
            no_refs: true,
            bytes: want.len() as u64 * 1000,
        });
        assert_eq!(
            parts.iter().map(|p| p.want.len()).collect::<Vec<_>>(),
            [PART_CHUNKS, PART_CHUNKS, 3]
        );
        assert_eq!(
            parts.iter().map(|p| p.bytes).collect::<Vec<_>>(),
            [PART_CHUNKS as u64 * 1000, PART_CHUNKS as u64 * 1000, 3000]
        );
        assert!(parts.iter().all(|p| p.entry == 7 && p.no_refs));
        let (w, h): (Vec<u32>, Vec<_>) = parts
            .into_iter()
            .flat_map(|p| p.want.into_iter().zip(p.hints))
            .unzip();
        assert_eq!(
            (w, h),
            (want, hints),
            "parts in order, each chunk with its hint"
        );
    }

    #[test]
    fn small_parts_share_a_strand_until_its_run_is_full() {
        let mut a = Announced::default();
        // 30 KB files: 35 of them fill a 1 MiB run, then the next strand's turn.
        let small: Vec<usize> = (0..80).map(|_| a.assign(30_000, 4)).collect();
        assert!(small[..35].iter().all(|&s| s == 0), "{small:?}");
        assert!(small[35..70].iter().all(|&s| s == 1), "{small:?}");
        assert_eq!(small[70], 2);
        // Parts of 1 MiB or more: each on the next strand, round the strands.
        let mut a = Announced::default();
        let big: Vec<usize> = (0..6).map(|_| a.assign(STRAND_RUN, 4)).collect();
        assert_eq!(big, [0, 1, 2, 3, 0, 1]);
        // Empty parts still count, so that a strand's run always ends.
        let mut a = Announced::default();
        assert!((0..=STRAND_RUN).map(|_| a.assign(0, 2)).any(|s| s == 1));
    }
}
