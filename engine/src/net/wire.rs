//! Length-prefixed messages on QUIC streams, with the same framing and limits as
//! [`crate::protocol`], and quinn's errors turned into the engine's.

use crate::error::{Error, Result};
use crate::protocol::{self, MAX_FRAME};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Describe a connection failure for a person.
pub fn conn_error(e: &quinn::ConnectionError) -> Error {
    use quinn::ConnectionError as C;
    match e {
        C::ApplicationClosed(c) => {
            let reason = String::from_utf8_lossy(&c.reason).into_owned();
            if reason.is_empty() || reason == "done" {
                Error::Transport("the peer closed the connection".into())
            } else {
                Error::Remote(format!("the peer failed: {reason}"))
            }
        }
        C::TimedOut => Error::Transport("the peer stopped answering (timed out)".into()),
        C::Reset => Error::Transport("the peer reset the connection (restarted?)".into()),
        C::LocallyClosed => Error::Transport("connection closed".into()),
        C::ConnectionClosed(c) => Error::Transport(format!("the peer closed the connection: {c}")),
        other => Error::Transport(other.to_string()),
    }
}

fn write_error(e: quinn::WriteError) -> Error {
    match e {
        quinn::WriteError::ConnectionLost(c) => conn_error(&c),
        other => Error::Transport(format!("stream write: {other}")),
    }
}

fn read_error(e: quinn::ReadExactError) -> Error {
    match e {
        quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(c)) => conn_error(&c),
        other => Error::Transport(format!("stream read: {other}")),
    }
}

/// Write one message.
pub async fn write_msg<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<()> {
    let mut buf = Vec::new();
    protocol::encode_msg(msg, &mut buf)?;
    send.write_all(&buf).await.map_err(write_error)
}

/// Write bytes already framed.
pub async fn write_raw(send: &mut quinn::SendStream, buf: &[u8]) -> Result<()> {
    send.write_all(buf).await.map_err(write_error)
}

/// Write buffers already framed, handing them to the transport without copying.
pub async fn write_chunks(send: &mut quinn::SendStream, bufs: &mut [bytes::Bytes]) -> Result<()> {
    send.write_all_chunks(bufs).await.map_err(write_error)
}

/// Read one message; `Ok(None)` when the stream ended cleanly between messages.
pub async fn read_msg<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<Option<T>> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(read_error(e)),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(Error::Limit(format!(
            "peer announced a message of {n} bytes (limit {MAX_FRAME})"
        )));
    }
    let mut body = vec![0u8; n];
    recv.read_exact(&mut body).await.map_err(read_error)?;
    protocol::decode_msg(&body).map(Some)
}

/// Read one message that must be there.
pub async fn expect_msg<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    what: &str,
) -> Result<T> {
    read_msg(recv)
        .await?
        .ok_or_else(|| Error::Protocol(format!("stream ended before the {what}")))
}
