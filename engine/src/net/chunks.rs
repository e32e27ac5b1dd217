//! The sender's side of chunk transfer: every stream the receiver opens carries want-lists one
//! way and chunk data the other. Reading and compressing run on a blocking thread per stream
//! while the async side reads want-lists and writes data, so disk, CPU and network overlap;
//! bounded channels keep memory bounded. With compression on, a stream's data is one zstd
//! stream ([`Frame::DataStream`]), so each file compresses with those sent before it.

use super::wire::{read_msg, write_chunks};
use crate::error::{Error, Result};
use crate::protocol::{self, Frame};
use crate::sender::{Packing, Sender};
use crate::zstd_ctx::StreamCompressor;
use std::sync::Arc;
use tokio::sync::mpsc;

/// A frame as buffers for the stream: a data payload goes as it is, behind its header, so
/// it is never copied.
pub(crate) fn frame_parts(frame: Frame) -> Result<[bytes::Bytes; 2]> {
    Ok(match frame {
        Frame::Data {
            entry,
            chunk,
            codec,
            bytes,
        } => [
            protocol::data_header(entry, chunk, codec, bytes.len())?.into(),
            bytes.into(),
        ],
        other => [protocol::encode_vec(&other)?.into(), bytes::Bytes::new()],
    })
}

/// Answer the receiver's want-list streams on `conn` until the connection ends.
pub async fn serve_wants(conn: quinn::Connection, sender: Arc<Sender>) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let sender = sender.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_stream(send, recv, sender).await {
                tracing::debug!("chunk stream ended: {e}");
            }
        });
    }
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    sender: Arc<Sender>,
) -> Result<()> {
    type Want = (u32, Vec<u32>, Vec<Vec<crate::delta::BlockHash>>, bool);
    let (want_tx, mut want_rx) = mpsc::channel::<Want>(256);
    let (out_tx, mut out_rx) = mpsc::channel::<[bytes::Bytes; 2]>(16);
    let lists = out_tx.clone();
    let worker_sender = sender.clone();
    let worker = tokio::task::spawn_blocking(move || -> Result<()> {
        // The stream's zstd stream: what it carries compresses with what it carried before.
        let mut stream = worker_sender
            .compress_level()
            .map(|level| {
                StreamCompressor::new(level)
                    .ok_or_else(|| Error::Compression(format!("zstd level {level} refused")))
            })
            .transpose()?;
        while let Some((entry, want, hints, no_refs)) = want_rx.blocking_recv() {
            let packing = match &mut stream {
                Some(s) => Packing::Stream(s),
                None => Packing::Groups,
            };
            worker_sender.serve(entry, &want, &hints, no_refs, packing, &mut |frame| {
                out_tx
                    .blocking_send(frame_parts(frame)?)
                    .map_err(|_| Error::Transport("chunk stream closed".into()))
            })?;
        }
        Ok(())
    });
    let reader = async move {
        while let Some(frame) = read_msg::<Frame>(&mut recv).await? {
            if let Frame::ListWant { entry } = frame {
                // The receiver could not rebuild this file's list from its copy: send it whole.
                let list = match sender.chunk_list(entry) {
                    Some(l) => l,
                    None => {
                        return Err(Error::Protocol(format!(
                            "list wanted for entry {entry}, not a file sent so far"
                        )))
                    }
                };
                for f in crate::chunklist::parts(list, crate::chunklist::ListPart::Chunks) {
                    if lists.send(frame_parts(f)?).await.is_err() {
                        break;
                    }
                }
                continue;
            }
            let Frame::Want {
                entry,
                runs,
                hints,
                no_refs,
            } = frame
            else {
                return Err(Error::Protocol(format!(
                    "expected a want-list, got {frame:?}"
                )));
            };
            let Some(chunks) = sender.chunks_of(entry) else {
                return Err(Error::Protocol(format!(
                    "want-list for entry {entry}, not a file sent so far"
                )));
            };
            let want = protocol::from_runs(&runs, chunks.len())?;
            if want.iter().any(|&c| chunks.get(c).is_none()) {
                return Err(Error::Protocol(format!("entry {entry} has no such chunk")));
            }
            // Hints: none, or one per wanted chunk, each no longer than the chunk's blocks.
            let hints_fit = hints.is_empty()
                || (hints.len() == want.len()
                    && want.iter().zip(&hints).all(|(&c, h)| {
                        chunks.get(c).is_some_and(|s| {
                            h.len() <= (s.len as usize).div_ceil(crate::delta::BLOCK)
                        })
                    }));
            if !hints_fit {
                return Err(Error::Protocol(format!(
                    "bad delta hints for entry {entry}"
                )));
            }
            if want_tx.send((entry, want, hints, no_refs)).await.is_err() {
                break;
            }
        }
        Ok(())
    };
    let writer = async move {
        while let Some(mut parts) = out_rx.recv().await {
            write_chunks(&mut send, &mut parts).await?;
        }
        let _ = send.finish();
        Ok::<(), Error>(())
    };
    let (r, w) = tokio::join!(reader, writer);
    let done = worker
        .await
        .map_err(|e| Error::Transport(format!("chunk reader: {e}")))?;
    r.and(w).and(done)
}
