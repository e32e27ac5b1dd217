//! The two roles of a session, whichever side is the client: [`send_tree`] and
//! [`receive_tree`]. Both run on an established connection and its control stream.

use super::chunks::serve_wants;
use super::control::{Control, Summary};
use super::pushed::Pushed;
use super::source::StreamSource;
use super::wire::{expect_msg, write_msg};
use crate::chunklist::Incoming;
use crate::error::{Error, Result};
use crate::manifest::MAX_ENTRIES;
use crate::protocol::{self, Frame};
use crate::receiver::Receiver;
use crate::report::{Progress, Report};
use crate::sender::{Packing, Sender};
use std::sync::Arc;
use std::time::Duration;

/// A control stream: both directions.
pub struct Control2 {
    /// Outgoing half.
    pub send: quinn::SendStream,
    /// Incoming half.
    pub recv: quinn::RecvStream,
}

/// Manifest entries are written in batches of about this many bytes.
const MANIFEST_BATCH: usize = 256 << 10;

/// The sender's manifest batches as [`Frame::ManifestPiece`]s of one zstd stream.
struct ManifestPacker {
    /// `None` once zstd failed (batches then go as they are).
    stream: Option<crate::zstd_ctx::StreamCompressor>,
}

impl ManifestPacker {
    fn new() -> Self {
        ManifestPacker {
            stream: crate::zstd_ctx::StreamCompressor::new(MANIFEST_LEVEL),
        }
    }

    /// A batch of encoded frames as one piece; `None` when the batch goes as it is (too large
    /// for a piece, or zstd failed).
    fn pack(&mut self, batch: &[u8]) -> Result<Option<Vec<u8>>> {
        if batch.is_empty() || batch.len() > protocol::MANIFEST_PIECE_MAX {
            return Ok(None);
        }
        let Some(stream) = &mut self.stream else {
            return Ok(None);
        };
        let Some(bytes) = stream.compress(batch) else {
            // Out of step: the receiver's stream has seen nothing of this piece, so raw frames
            // from here on keep both ends right.
            self.stream = None;
            return Ok(None);
        };
        let mut out = Vec::with_capacity(bytes.len() + 16);
        protocol::encode(
            &Frame::ManifestPiece {
                len: batch.len() as u32,
                bytes,
            },
            &mut out,
        )?;
        Ok(Some(out))
    }
}

/// The receiver's reading of the manifest: frames as they come, and those of each
/// [`Frame::ManifestPiece`] in its place.
#[derive(Default)]
struct ManifestReader {
    /// Frames of the last piece not handed out yet.
    pending: std::collections::VecDeque<Frame>,
    stream: crate::zstd_ctx::StreamDecompressor,
}

impl ManifestReader {
    /// The next manifest frame (an error when the stream ends).
    async fn next(&mut self, recv: &mut quinn::RecvStream) -> Result<Frame> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Ok(frame);
            }
            match expect_msg::<Frame>(recv, "end of the manifest").await? {
                Frame::ManifestPiece { len, bytes } => {
                    self.pending = protocol::manifest_frames(len, &bytes, &mut self.stream)?.into();
                }
                frame => return Ok(frame),
            }
        }
    }
}

/// zstd level of the manifest's stream: level 3 saved 66 KB of 5.5 MB for a 45,701-file tree,
/// for twice the CPU time (a sixth of the client's in a delta of that tree).
const MANIFEST_LEVEL: i32 = 1;

/// Sender role: scan and chunk the tree while streaming its manifest, serve the receiver's
/// want-lists from the first entry on, and return the receiver's summary.
pub async fn send_tree(
    conn: &quinn::Connection,
    ctl: &mut Control2,
    sender: Arc<Sender>,
) -> Result<Summary> {
    send_tree_after(conn, ctl, sender, false).await
}

/// The server's answer to a request sent without waiting for it: `Welcome`, or the refusal as
/// an error.
async fn read_answer(ctl: &mut Control2) -> Result<()> {
    match expect_msg::<Control>(&mut ctl.recv, "server's answer").await? {
        Control::Welcome { version, .. } if version == crate::protocol::VERSION => Ok(()),
        Control::Welcome { version, .. } => Err(Error::Protocol(format!(
            "server speaks protocol {version}, this hop speaks {}",
            crate::protocol::VERSION
        ))),
        Control::Refused { reason } => Err(Error::Remote(format!("refused the request: {reason}"))),
        other => Err(Error::Protocol(format!("unexpected answer {other:?}"))),
    }
}

/// The error to report when writing the manifest broke (`broken`): a refused request, or a
/// receiver that failed, stops reading and sends its reason, which says more than the broken
/// stream. Waits up to 2 s for it.
async fn refusal_or(ctl: &mut Control2, answer_pending: bool, broken: Error) -> Error {
    let reason = async {
        if answer_pending {
            read_answer(ctl).await?;
        }
        match expect_msg::<Control>(&mut ctl.recv, "receiver's answer").await? {
            Control::Refused { reason } => Err(Error::Remote(reason)),
            _ => Ok(()),
        }
    };
    match tokio::time::timeout(Duration::from_secs(2), reason).await {
        Ok(Err(refusal @ Error::Remote(_))) => refusal,
        _ => broken,
    }
}

/// [`send_tree`], where the push request was written just before and its answer not read yet
/// (`answer_pending`): the manifest follows the request at once, saving a round trip, and the
/// answer is read before the summary. A refused request ends with the server's reason.
pub(crate) async fn send_tree_after(
    conn: &quinn::Connection,
    ctl: &mut Control2,
    sender: Arc<Sender>,
    answer_pending: bool,
) -> Result<Summary> {
    let server = tokio::spawn(serve_wants(conn.clone(), sender.clone()));
    let mut push = if sender.pushes() {
        Some(Push::start(conn, u64::from(ctl.send.id()), sender.clone()).await?)
    } else {
        None
    };
    // Each entry as the frames that carry it, with the chunks the receiver lacks when they are
    // pushed; `None` for the frames of a file whose list is still being cut (more follow).
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(Vec<Frame>, Option<Vec<u32>>)>(1024);
    let chunker = sender.clone();
    let running = tokio::task::spawn_blocking(move || {
        chunker.run_frames(None, &mut |o| {
            let pushed = o.entry.as_ref().map(|e| chunker.pushable(e));
            tx.blocking_send((o.frames, pushed))
                .map_err(|_| Error::Transport("the session ended".into()))
        })
    });
    let r = async {
        let mut buf = Vec::with_capacity(MANIFEST_BATCH + 4096);
        let mut pieces = ManifestPacker::new();
        let mut count = 0u32;
        let mut to_push = Vec::new();
        // An entry, announced by the chunks of it that are pushed (if any); or frames of an
        // entry still to be completed.
        let add = |(frames, pushed): (Vec<Frame>, Option<Vec<u32>>),
                   buf: &mut Vec<u8>,
                   count: &mut u32,
                   to_push: &mut Vec<(u32, Vec<u32>)>|
         -> Result<()> {
            let Some(pushed) = pushed else {
                for f in &frames {
                    protocol::encode(f, buf)?;
                }
                return Ok(());
            };
            if !pushed.is_empty() {
                let runs = protocol::to_runs(&pushed);
                protocol::encode(
                    &Frame::Pushed {
                        entry: *count,
                        runs,
                    },
                    buf,
                )?;
                to_push.push((*count, pushed));
            }
            for f in &frames {
                protocol::encode(f, buf)?;
            }
            *count += 1;
            Ok(())
        };
        while let Some(item) = rx.recv().await {
            add(item, &mut buf, &mut count, &mut to_push)?;
            // Whatever else is ready goes in the same write.
            while buf.len() < MANIFEST_BATCH {
                match rx.try_recv() {
                    Ok(item) => add(item, &mut buf, &mut count, &mut to_push)?,
                    Err(_) => break,
                }
            }
            let piece = pieces.pack(&buf)?;
            let written =
                super::wire::write_raw(&mut ctl.send, piece.as_deref().unwrap_or(&buf)).await;
            tracing::debug!(
                "manifest: {count} entries sent ({} bytes of frames in {} bytes)",
                buf.len(),
                piece.as_ref().map_or(buf.len(), Vec::len)
            );
            if let Some(p) = &push {
                // The entries are announced: their chunks may follow.
                for (entry, chunks) in to_push.drain(..) {
                    p.send(entry, chunks).await;
                }
            }
            if let Err(e) = written {
                return Err(refusal_or(ctl, answer_pending, e).await);
            }
            buf.clear();
        }
        let notes = running
            .await
            .map_err(|e| Error::Transport(format!("chunking: {e}")))??;
        protocol::encode(&Frame::ManifestEnd, &mut buf)?;
        protocol::encode_msg(
            &Control::SenderNotes {
                skipped: notes
                    .skipped
                    .iter()
                    .map(|(p, w)| (p.clone(), w.to_string()))
                    .collect(),
                errors: notes.errors.iter().map(|e| e.to_string()).collect(),
            },
            &mut buf,
        )?;
        let written = super::wire::write_raw(&mut ctl.send, &buf).await;
        if let Some(p) = &mut push {
            p.close();
        }
        if let Err(e) = written {
            return Err(refusal_or(ctl, answer_pending, e).await);
        }
        if answer_pending {
            read_answer(ctl).await?;
        }
        match expect_msg::<Control>(&mut ctl.recv, "receiver's summary").await? {
            Control::Summary(s) => {
                write_msg(&mut ctl.send, &Control::Bye).await?;
                let _ = ctl.send.finish();
                Ok((s, notes))
            }
            Control::Refused { reason } => Err(Error::Remote(reason)),
            other => Err(Error::Protocol(format!(
                "expected the receiver's summary, got {other:?}"
            ))),
        }
    }
    .await;
    server.abort();
    if let Some(p) = push {
        p.abort();
    }
    r.map(|(s, notes)| {
        let mut s = s;
        s.sender_notes = Some(SenderNotes {
            skipped: notes
                .skipped
                .into_iter()
                .map(|(p, w)| (p, w.to_string()))
                .collect(),
            errors: notes.errors.iter().map(|e| e.to_string()).collect(),
        });
        s
    })
}

/// The sender's push stream: chunks the receiver lacks, sent without waiting to be asked (see
/// [`Sender::pushable`]). A blocking worker reads and encodes them (as it does for want-lists)
/// while a task writes them to the stream.
struct Push {
    entries: Option<tokio::sync::mpsc::Sender<(u32, Vec<u32>)>>,
    worker: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl Push {
    /// Open the push stream of the request whose control stream is `control`.
    async fn start(conn: &quinn::Connection, control: u64, sender: Arc<Sender>) -> Result<Push> {
        let mut send = conn
            .open_uni()
            .await
            .map_err(|e| super::wire::conn_error(&e))?;
        write_msg(&mut send, &Frame::PushStream { control }).await?;
        let (entries, mut rx) = tokio::sync::mpsc::channel::<(u32, Vec<u32>)>(1024);
        let (out, mut frames) = tokio::sync::mpsc::channel::<[bytes::Bytes; 2]>(64);
        let worker = tokio::task::spawn_blocking(move || {
            while let Some((entry, want)) = rx.blocking_recv() {
                let r = sender.serve(entry, &want, &[], false, Packing::Alone, &mut |frame| {
                    out.blocking_send(super::chunks::frame_parts(frame)?)
                        .map_err(|_| Error::Transport("push stream closed".into()))
                });
                if let Err(e) = r {
                    tracing::debug!("push of entry {entry} stopped: {e}");
                    return;
                }
            }
        });
        let writer = tokio::spawn(async move {
            while let Some(mut parts) = frames.recv().await {
                if let Err(e) = super::wire::write_chunks(&mut send, &mut parts).await {
                    // The receiver has what it needs (it stopped the stream) or the link is
                    // gone; the control stream tells which.
                    tracing::debug!("push stream: {e}");
                    return;
                }
            }
            let _ = send.finish();
        });
        Ok(Push {
            entries: Some(entries),
            worker,
            writer,
        })
    }

    /// Push these chunks of that entry (announced already).
    async fn send(&self, entry: u32, chunks: Vec<u32>) {
        if let Some(tx) = &self.entries {
            let _ = tx.send((entry, chunks)).await;
        }
    }

    /// Nothing more to push: the stream ends once what was queued is written.
    fn close(&mut self) {
        self.entries.take();
    }

    /// The request is over: stop pushing.
    fn abort(mut self) {
        self.entries.take();
        self.writer.abort();
        drop(self.worker);
    }
}

/// What the sender said besides the manifest.
#[derive(Debug, Default, Clone)]
pub struct SenderNotes {
    /// Skipped entries and their kind.
    pub skipped: Vec<(crate::path::RelPath, String)>,
    /// The sender's read errors.
    pub errors: Vec<String>,
}

/// Receiver role: index the destination while the manifest starts arriving, then apply it as
/// it streams in (directories made and files fetched before the manifest is complete), with
/// chunks fetched over `lanes` lanes of `strands` streams each; send the summary.
#[allow(clippy::too_many_arguments)]
pub async fn receive_tree(
    conn: &quinn::Connection,
    ctl: &mut Control2,
    prepare: impl FnOnce() -> Result<Receiver> + Send + 'static,
    lanes: usize,
    strands: usize,
    timeout: Duration,
    progress: Arc<Progress>,
) -> Result<(Report, SenderNotes)> {
    // Chunks the sender pushes without being asked, read from the request's push stream.
    let pushed = Arc::new(Pushed::new(timeout));
    let reading = tokio::spawn({
        let (p, conn, control) = (pushed.clone(), conn.clone(), u64::from(ctl.recv.id()));
        async move { p.read_from(conn, control).await }
    });
    let r = receive_with(conn, ctl, prepare, (lanes, strands), progress, pushed).await;
    reading.abort();
    r
}

async fn receive_with(
    conn: &quinn::Connection,
    ctl: &mut Control2,
    prepare: impl FnOnce() -> Result<Receiver> + Send + 'static,
    (lanes, strands): (usize, usize),
    progress: Arc<Progress>,
    pushed: Arc<Pushed>,
) -> Result<(Report, SenderNotes)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Option<Incoming>>>(1024);
    let conn2 = conn.clone();
    let rt = tokio::runtime::Handle::current();
    let pushes = pushed.clone();
    let applying = tokio::task::spawn_blocking(move || -> Result<Report> {
        let receiver = prepare()?;
        let source = StreamSource::new(conn2, rt, lanes, strands, Some(pushes));
        let mut next = || match rx.blocking_recv() {
            Some(r) => r,
            None => Err(Error::Transport("the manifest stream ended".into())),
        };
        let mut report = receiver.apply(&mut next, &source, &progress)?;
        report.stats.chunks_pushed = source.taken_from_push();
        report.stats.fetches_alone = source.fetched_alone();
        Ok(report)
    });
    let mut count = 0usize;
    let mut complete = false;
    // Files the sender sends while it reads them are handed on part by part, to be written as
    // their lists arrive.
    let mut assembler = crate::chunklist::Assembler::growing();
    let mut manifest = ManifestReader::default();
    loop {
        let item = match manifest.next(&mut ctl.recv).await {
            Ok(Frame::ManifestEnd) if !assembler.in_file() => {
                complete = true;
                Ok(None)
            }
            // Announces the entry that follows; registered before that entry is planned.
            Ok(Frame::Pushed { entry, runs })
                if entry as usize == count && !assembler.in_file() =>
            {
                match pushed.announce(entry, runs) {
                    Ok(()) => continue,
                    Err(e) => Err(e),
                }
            }
            Ok(_) if count >= MAX_ENTRIES => Err(Error::Limit(format!(
                "manifest longer than {MAX_ENTRIES} entries"
            ))),
            // An entry, or a part of a file's chunk list.
            Ok(frame) => match assembler.feed(frame) {
                Ok(None) => continue,
                Ok(Some(item)) => {
                    if !matches!(item, Incoming::Begin { .. } | Incoming::Part(_)) {
                        count += 1;
                    }
                    Ok(Some(item))
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        let stop = !matches!(item, Ok(Some(_)));
        if tx.send(item).await.is_err() || stop {
            break;
        }
    }
    drop(tx);
    let notes = if complete {
        match expect_msg::<Control>(&mut ctl.recv, "sender's notes").await {
            Ok(Control::SenderNotes { skipped, errors }) => Some(SenderNotes { skipped, errors }),
            Ok(other) => {
                return Err(Error::Protocol(format!(
                    "expected the sender's notes, got {other:?}"
                )))
            }
            Err(e) => return Err(e),
        }
    } else {
        None
    };
    let report = match applying
        .await
        .map_err(|e| Error::Transport(format!("applying the manifest: {e}")))
        .and_then(|r| r)
    {
        Ok(r) => r,
        Err(e) => {
            // The sender learns why, instead of a stream that just ends.
            let _ = write_msg(
                &mut ctl.send,
                &Control::Refused {
                    reason: e.to_string(),
                },
            )
            .await;
            let _ = ctl.send.finish();
            return Err(e);
        }
    };
    let notes = notes.ok_or_else(|| Error::Protocol("the manifest ended early".into()))?;
    write_msg(&mut ctl.send, &Control::Summary(Summary::of(&report))).await?;
    let _ = ctl.send.finish();
    // The sender's goodbye; its absence only means it closed first.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        expect_msg::<Control>(&mut ctl.recv, "goodbye"),
    )
    .await;
    Ok((report, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch goes as one piece that decodes to it; one too large for a piece goes as it is.
    #[test]
    fn manifest_batches_go_as_pieces_unless_too_large() {
        let mut packer = ManifestPacker::new();
        let mut stream = crate::zstd_ctx::StreamDecompressor::default();
        let frames: Vec<Frame> = (0..200).map(|_| Frame::ManifestEnd).collect();
        let mut batch = Vec::new();
        for f in &frames {
            protocol::encode(f, &mut batch).unwrap();
        }
        let piece = packer.pack(&batch).unwrap().expect("a piece");
        assert!(
            piece.len() < batch.len() / 4,
            "{} of {}",
            piece.len(),
            batch.len()
        );
        let Some((Frame::ManifestPiece { len, bytes }, used)) = protocol::decode(&piece).unwrap()
        else {
            panic!("not a piece");
        };
        assert_eq!(used, piece.len());
        assert_eq!(
            protocol::manifest_frames(len, &bytes, &mut stream).unwrap(),
            frames
        );
        assert!(packer
            .pack(&vec![0u8; protocol::MANIFEST_PIECE_MAX + 1])
            .unwrap()
            .is_none());
        assert!(packer.pack(&[]).unwrap().is_none());
    }
}
