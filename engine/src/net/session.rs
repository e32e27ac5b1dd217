//! The two roles of a session, whichever side is the client: [`send_tree`] and
//! [`receive_tree`]. Both run on an established connection and its control stream.

use super::chunks::serve_wants;
use super::control::{Control, Summary};
use super::source::StreamSource;
use super::wire::{expect_msg, write_msg};
use crate::error::{Error, Result};
use crate::manifest::{Entry, MAX_ENTRIES};
use crate::protocol::{self, Frame};
use crate::receiver::Receiver;
use crate::report::{Progress, Report};
use crate::sender::Sender;
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
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Entry>(1024);
    let chunker = sender.clone();
    let running = tokio::task::spawn_blocking(move || {
        chunker.run(None, &mut |e| {
            tx.blocking_send(e)
                .map_err(|_| Error::Transport("the session ended".into()))
        })
    });
    let r = async {
        let mut buf = Vec::with_capacity(MANIFEST_BATCH + 4096);
        while let Some(e) = rx.recv().await {
            protocol::encode(&Frame::Entry(e), &mut buf)?;
            // Whatever else is ready goes in the same write.
            while buf.len() < MANIFEST_BATCH {
                match rx.try_recv() {
                    Ok(e) => protocol::encode(&Frame::Entry(e), &mut buf)?,
                    Err(_) => break,
                }
            }
            if let Err(e) = super::wire::write_raw(&mut ctl.send, &buf).await {
                // A refused request: the server's reason says more than the broken stream.
                if answer_pending {
                    if let Ok(Err(refusal)) =
                        tokio::time::timeout(Duration::from_secs(2), read_answer(ctl)).await
                    {
                        return Err(refusal);
                    }
                }
                return Err(e);
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
        if answer_pending {
            read_answer(ctl).await?;
        }
        written?;
        match expect_msg::<Control>(&mut ctl.recv, "receiver's summary").await? {
            Control::Summary(s) => {
                write_msg(&mut ctl.send, &Control::Bye).await?;
                let _ = ctl.send.finish();
                Ok((s, notes))
            }
            other => Err(Error::Protocol(format!(
                "expected the receiver's summary, got {other:?}"
            ))),
        }
    }
    .await;
    server.abort();
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
/// chunks fetched over `lanes` streams; send the summary.
pub async fn receive_tree(
    conn: &quinn::Connection,
    ctl: &mut Control2,
    prepare: impl FnOnce() -> Result<Receiver> + Send + 'static,
    lanes: usize,
    progress: Arc<Progress>,
) -> Result<(Report, SenderNotes)> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Option<Entry>>>(1024);
    let conn2 = conn.clone();
    let rt = tokio::runtime::Handle::current();
    let applying = tokio::task::spawn_blocking(move || -> Result<Report> {
        let receiver = prepare()?;
        let source = StreamSource::new(conn2, rt, lanes);
        let mut next = || match rx.blocking_recv() {
            Some(r) => r,
            None => Err(Error::Transport("the manifest stream ended".into())),
        };
        receiver.apply(&mut next, &source, &progress)
    });
    let mut count = 0usize;
    let mut complete = false;
    loop {
        let item = match expect_msg::<Frame>(&mut ctl.recv, "end of the manifest").await {
            Ok(Frame::Entry(e)) if count < MAX_ENTRIES => {
                count += 1;
                Ok(Some(e))
            }
            Ok(Frame::Entry(_)) => Err(Error::Limit(format!(
                "manifest longer than {MAX_ENTRIES} entries"
            ))),
            Ok(Frame::ManifestEnd) => {
                complete = true;
                Ok(None)
            }
            Ok(other) => Err(Error::Protocol(format!(
                "expected a manifest entry, got {other:?}"
            ))),
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
    let report = applying
        .await
        .map_err(|e| Error::Transport(format!("applying the manifest: {e}")))??;
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
