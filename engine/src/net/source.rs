//! The receiver's side of chunk transfer: a [`ChunkSource`] over QUIC streams.
//!
//! Each lane of the receiver gets one stream. As soon as a lane announces its fetches, all its
//! want-lists are written on the stream and the sender starts answering, so chunks flow while
//! earlier files are still being assembled; the stream's flow-control window (and a small
//! bounded queue) is the only buffering. A fetch that was not announced (a retry) gets a stream
//! of its own.

use super::wire::{read_msg, write_msg};
use crate::assemble::Fetched;
use crate::error::{Error, Result};
use crate::manifest::{Entry, EntryKind};
use crate::protocol::{self, Frame};
use crate::receiver::{ChunkSource, Request};
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

/// Frames read from one stream, ahead of use.
const QUEUE: usize = 64;

struct Lane {
    /// Announced requests not yet made.
    pending: VecDeque<Request>,
    frames: mpsc::Receiver<Result<Frame>>,
}

/// Fetches chunks from the sender at the other end of a connection.
pub struct StreamSource<'a> {
    conn: quinn::Connection,
    rt: Handle,
    manifest: &'a [Entry],
    lanes: Vec<Mutex<Option<Lane>>>,
}

impl<'a> StreamSource<'a> {
    /// A source with `lanes` streams on `conn`, for chunks of `manifest`. `rt` runs the stream
    /// tasks; fetches are made from threads outside it.
    pub fn new(conn: quinn::Connection, rt: Handle, manifest: &'a [Entry], lanes: usize) -> Self {
        StreamSource {
            conn,
            rt,
            manifest,
            lanes: (0..lanes.max(1)).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Open a stream, write the want-lists, and forward the frames that come back.
    fn request(&self, reqs: Vec<Request>) -> mpsc::Receiver<Result<Frame>> {
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
                for r in reqs {
                    let want = Frame::Want {
                        entry: r.entry,
                        runs: protocol::to_runs(&r.want),
                        hints: r.hints,
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

    /// Read the frames answering one want-list, passing chunks to `sink` until it fails.
    /// Returns `Err` with `Some(lane_ok)`: whether the stream is still in step afterwards.
    fn consume(
        &self,
        frames: &mut mpsc::Receiver<Result<Frame>>,
        entry: u32,
        want: &[u32],
        sink: &mut dyn FnMut(Fetched) -> Result<()>,
    ) -> (Result<()>, bool) {
        if !matches!(
            self.manifest.get(entry as usize).map(|e| &e.kind),
            Some(EntryKind::File { .. })
        ) {
            return (
                Err(Error::Protocol(format!("entry {entry} is not a file"))),
                true,
            );
        }
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
}

fn describe(f: &Frame) -> String {
    match f {
        Frame::Data { entry, chunk, .. } => format!("chunk {chunk} of entry {entry}"),
        Frame::Failed { entry, .. } => format!("failure of entry {entry}"),
        other => format!("{other:?}"),
    }
}

impl ChunkSource for StreamSource<'_> {
    fn lanes(&self) -> usize {
        self.lanes.len()
    }

    fn announce(&self, lane: usize, reqs: Vec<Request>) {
        let Some(slot) = self.lanes.get(lane) else {
            return;
        };
        if reqs.is_empty() {
            return;
        }
        // The lane keeps what it needs to follow the answers, not the hints.
        let pending = reqs
            .iter()
            .map(|r| Request {
                entry: r.entry,
                want: r.want.clone(),
                hints: Vec::new(),
            })
            .collect();
        let frames = self.request(reqs);
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Lane { pending, frames });
    }

    fn fetch(
        &self,
        lane: usize,
        req: &Request,
        sink: &mut dyn FnMut(Fetched) -> Result<()>,
    ) -> Result<()> {
        let (entry, want) = (req.entry, req.want.as_slice());
        if let Some(slot) = self.lanes.get(lane) {
            let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(l) = guard.as_mut() {
                if let Some(pos) = l
                    .pending
                    .iter()
                    .position(|r| r.entry == entry && r.want == want)
                {
                    // Skip announced fetches the lane did not make.
                    let mut in_step = true;
                    for _ in 0..pos {
                        let Some(r) = l.pending.pop_front() else {
                            break;
                        };
                        let (_, ok) =
                            self.consume(&mut l.frames, r.entry, &r.want, &mut |_| Ok(()));
                        in_step &= ok;
                        if !in_step {
                            break;
                        }
                    }
                    if in_step {
                        l.pending.pop_front();
                        let (r, ok) = self.consume(&mut l.frames, entry, want, sink);
                        if !ok {
                            *guard = None;
                        }
                        return r;
                    }
                    *guard = None;
                }
            }
        }
        // Not announced, or the lane's stream failed: a stream for this fetch alone.
        let mut frames = self.request(vec![req.clone()]);
        self.consume(&mut frames, entry, want, sink).0
    }
}
