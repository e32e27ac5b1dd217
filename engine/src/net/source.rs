//! The receiver's side of chunk transfer: a [`ChunkSource`] over QUIC streams.
//!
//! Each lane of the receiver gets one stream. Every request announced for a lane is written on
//! its stream at once, so the sender answers while earlier files are still being assembled and
//! while the manifest is still arriving; the stream's flow-control window (and a small bounded
//! queue) is the only buffering. A fetch that was not announced (a retry) gets a stream of its
//! own.

use super::pushed::Pushed;
use super::wire::{read_msg, write_msg};
use crate::assemble::Fetched;
use crate::error::{Error, Result};
use crate::protocol::{self, Frame};
use crate::receiver::{ChunkSource, Request};
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

/// Frames read from one stream, ahead of use.
const QUEUE: usize = 64;

/// One lane's stream: requests go out through `more`, answers come back in `frames`.
struct Lane {
    /// Announced requests (entry, chunk numbers) whose answers were not read yet, in order.
    pending: Mutex<VecDeque<(u32, Vec<u32>)>>,
    more: mpsc::UnboundedSender<Request>,
    /// The answers; `None` once the stream failed or lost step.
    frames: Mutex<Option<mpsc::Receiver<Result<Frame>>>>,
}

/// Fetches chunks from the sender at the other end of a connection.
pub struct StreamSource {
    conn: quinn::Connection,
    rt: Handle,
    lanes: Vec<Mutex<Option<std::sync::Arc<Lane>>>>,
    /// Chunks the sender pushes unasked: a file all of whose wanted chunks are pushed is taken
    /// from there, without a want-list.
    pushed: Option<std::sync::Arc<Pushed>>,
    /// Chunks taken from the push.
    taken: std::sync::atomic::AtomicU64,
}

impl StreamSource {
    /// A source with `lanes` streams on `conn`, and the request's pushed chunks if there are
    /// any. `rt` runs the stream tasks; fetches are made from threads outside it.
    pub fn new(
        conn: quinn::Connection,
        rt: Handle,
        lanes: usize,
        pushed: Option<std::sync::Arc<Pushed>>,
    ) -> Self {
        StreamSource {
            conn,
            rt,
            lanes: (0..lanes.max(1)).map(|_| Mutex::new(None)).collect(),
            pushed,
            taken: Default::default(),
        }
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
    fn open(&self, mut reqs: mpsc::UnboundedReceiver<Request>) -> mpsc::Receiver<Result<Frame>> {
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
                while let Some(r) = reqs.recv().await {
                    let want = Frame::Want {
                        entry: r.entry,
                        runs: protocol::to_runs(&r.want),
                        hints: r.hints,
                        no_refs: r.no_refs,
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

    /// Read the frames answering one request, passing chunks to `sink` until it fails. Also
    /// returns whether the stream is still in step afterwards.
    fn consume(
        frames: &mut mpsc::Receiver<Result<Frame>>,
        entry: u32,
        want: &[u32],
        sink: &mut dyn FnMut(Fetched) -> Result<()>,
    ) -> (Result<()>, bool) {
        let mut sink_err = None;
        for &n in want {
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
            match frame {
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
            }
        }
        (sink_err.map_or(Ok(()), Err), true)
    }

    /// Make the request on the lane's stream if it was announced there: returns `None` if not.
    fn fetch_announced(
        lane: &Lane,
        req: &Request,
        sink: &mut dyn FnMut(Fetched) -> Result<()>,
    ) -> Option<Result<()>> {
        let mut frames = lane.frames.lock().unwrap_or_else(|e| e.into_inner());
        let rx = frames.as_mut()?;
        // Answers to announced requests the lane skipped come first: drain them.
        loop {
            let head = {
                let mut pending = lane.pending.lock().unwrap_or_else(|e| e.into_inner());
                let pos = pending
                    .iter()
                    .position(|(e, w)| *e == req.entry && *w == req.want)?;
                if pos == 0 {
                    pending.pop_front();
                    None
                } else {
                    pending.pop_front()
                }
            };
            let Some((e, w)) = head else { break };
            let (_, in_step) = Self::consume(rx, e, &w, &mut |_| Ok(()));
            if !in_step {
                *frames = None;
                return None;
            }
        }
        let (r, in_step) = Self::consume(rx, req.entry, &req.want, sink);
        if !in_step {
            *frames = None;
        }
        Some(r)
    }
}

fn describe(f: &Frame) -> String {
    match f {
        Frame::Data { entry, chunk, .. } => format!("chunk {chunk} of entry {entry}"),
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
        let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
        let l = slot.get_or_insert_with(|| {
            let (more, reqs) = mpsc::unbounded_channel();
            std::sync::Arc::new(Lane {
                pending: Mutex::new(VecDeque::new()),
                more,
                frames: Mutex::new(Some(self.open(reqs))),
            })
        });
        let mut pending = l.pending.lock().unwrap_or_else(|e| e.into_inner());
        for r in reqs {
            if self.push_for(&r).is_some() {
                continue; // its chunks are on their way already
            }
            if let Some(p) = &self.pushed {
                p.drop_entry(r.entry); // fetched as usual: what was pushed is not used
            }
            pending.push_back((r.entry, r.want.clone()));
            // A closed channel means the stream failed; fetches will find out and go alone.
            let _ = l.more.send(r);
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
        let l = self
            .lanes
            .get(lane)
            .and_then(|s| s.lock().unwrap_or_else(|e| e.into_inner()).clone());
        if let Some(l) = l {
            if let Some(r) = Self::fetch_announced(&l, req, sink) {
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
        let (more, reqs) = mpsc::unbounded_channel();
        let _ = more.send(req.clone());
        drop(more);
        let mut frames = self.open(reqs);
        Self::consume(&mut frames, req.entry, &req.want, sink).0
    }
}
