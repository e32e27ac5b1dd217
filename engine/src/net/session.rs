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

/// Sender role: stream the manifest, serve the receiver's want-lists, and return the
/// receiver's summary.
pub async fn send_tree(
    conn: &quinn::Connection,
    ctl: &mut Control2,
    sender: Arc<Sender>,
) -> Result<Summary> {
    let server = tokio::spawn(serve_wants(conn.clone(), sender.clone()));
    let r = async {
        let mut buf = Vec::with_capacity(MANIFEST_BATCH + 4096);
        for e in sender.manifest() {
            protocol::encode(&Frame::Entry(e.clone()), &mut buf)?;
            if buf.len() >= MANIFEST_BATCH {
                super::wire::write_raw(&mut ctl.send, &buf).await?;
                buf.clear();
            }
        }
        protocol::encode(&Frame::ManifestEnd, &mut buf)?;
        protocol::encode_msg(
            &Control::SenderNotes {
                skipped: sender
                    .skipped
                    .iter()
                    .map(|(p, w)| (p.clone(), w.to_string()))
                    .collect(),
                errors: sender.errors.iter().map(|e| e.to_string()).collect(),
            },
            &mut buf,
        )?;
        super::wire::write_raw(&mut ctl.send, &buf).await?;
        match expect_msg::<Control>(&mut ctl.recv, "receiver's summary").await? {
            Control::Summary(s) => {
                write_msg(&mut ctl.send, &Control::Bye).await?;
                let _ = ctl.send.finish();
                Ok(s)
            }
            other => Err(Error::Protocol(format!(
                "expected the receiver's summary, got {other:?}"
            ))),
        }
    }
    .await;
    server.abort();
    r
}

/// What the sender said besides the manifest.
#[derive(Debug, Default)]
pub struct SenderNotes {
    /// Skipped entries and their kind.
    pub skipped: Vec<(crate::path::RelPath, String)>,
    /// The sender's read errors.
    pub errors: Vec<String>,
}

/// Receiver role: read the manifest while `prepare` indexes the destination, then plan and
/// apply it with chunks fetched over `lanes` streams, and send the summary.
pub async fn receive_tree(
    conn: &quinn::Connection,
    ctl: &mut Control2,
    prepare: impl FnOnce() -> Result<Receiver> + Send + 'static,
    lanes: usize,
    progress: Arc<Progress>,
) -> Result<(Report, SenderNotes)> {
    let prep = tokio::task::spawn_blocking(prepare);
    let mut manifest: Vec<Entry> = Vec::new();
    loop {
        match expect_msg::<Frame>(&mut ctl.recv, "end of the manifest").await? {
            Frame::Entry(e) => {
                if manifest.len() >= MAX_ENTRIES {
                    return Err(Error::Limit(format!(
                        "manifest longer than {MAX_ENTRIES} entries"
                    )));
                }
                manifest.push(e);
            }
            Frame::ManifestEnd => break,
            other => {
                return Err(Error::Protocol(format!(
                    "expected a manifest entry, got {other:?}"
                )))
            }
        }
    }
    let notes = match expect_msg::<Control>(&mut ctl.recv, "sender's notes").await? {
        Control::SenderNotes { skipped, errors } => SenderNotes { skipped, errors },
        other => {
            return Err(Error::Protocol(format!(
                "expected the sender's notes, got {other:?}"
            )))
        }
    };
    let receiver = prep
        .await
        .map_err(|e| Error::Transport(format!("indexing the destination: {e}")))??;
    let conn2 = conn.clone();
    let rt = tokio::runtime::Handle::current();
    let report = tokio::task::spawn_blocking(move || -> Result<Report> {
        let plan = receiver.plan(&manifest)?;
        let source = StreamSource::new(conn2, rt, &manifest, lanes);
        Ok(receiver.apply(&manifest, &plan, &source, &progress))
    })
    .await
    .map_err(|e| Error::Transport(format!("applying the manifest: {e}")))??;
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
