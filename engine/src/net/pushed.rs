//! The receiver's side of pushed chunks: a sender that knows what the receiver holds (a
//! migration's previous round) sends the chunks it lacks without waiting for want-lists, on one
//! push stream per request (see `docs/PROTOCOL.md`). [`Pushed`] collects them as they arrive
//! and hands them to the writer lanes.
//!
//! A file is taken from the push only when every chunk its plan fetches was pushed; otherwise it
//! is fetched as usual and its pushed chunks are dropped. Chunks of files that need nothing are
//! dropped too. The buffer is bounded ([`MAX_BUFFERED`]): a sender that pushes more is a
//! protocol error, never an allocation.

use super::wire::read_msg;
use crate::error::{Error, Result};
use crate::protocol::{Codec, Frame, Run};
use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Most payload bytes held at once (above the sender's budget,
/// [`crate::sender::PUSH_BUDGET`], since encoded chunks are never larger than raw ones by more
/// than a header).
pub const MAX_BUFFERED: usize = 160 << 20;

/// Announced pushes at most (entries of one request).
const MAX_ANNOUNCED: usize = 1 << 20;

struct State {
    /// Announced runs per entry, not expanded yet (the entry's chunk count bounds them).
    announced: HashMap<u32, Vec<Run>>,
    /// Chunks arrived and not taken: (entry, chunk) -> payload.
    arrived: HashMap<(u32, u32), (Codec, Vec<u8>)>,
    /// Entries the sender could not supply, and why.
    failed: HashMap<u32, String>,
    /// Entries whose pushed chunks are not wanted (or all taken): later arrivals are dropped.
    dropped: HashSet<u32>,
    buffered: usize,
    /// The push stream ended (cleanly: `None`; or with this error).
    ended: Option<Option<String>>,
    /// When a frame last arrived (or the buffer was made).
    last: Instant,
}

/// Pushed chunks of one request, shared by the stream reader and the writer lanes.
pub struct Pushed {
    state: Mutex<State>,
    arrived: Condvar,
    /// A push silent for this long while a lane waits on it has failed.
    timeout: Duration,
}

impl Pushed {
    /// An empty buffer; a lane waiting longer than `timeout` for a chunk with nothing arriving
    /// gives up.
    pub fn new(timeout: Duration) -> Pushed {
        Pushed {
            state: Mutex::new(State {
                announced: HashMap::new(),
                arrived: HashMap::new(),
                failed: HashMap::new(),
                dropped: HashSet::new(),
                buffered: 0,
                ended: None,
                last: Instant::now(),
            }),
            arrived: Condvar::new(),
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The sender announced that `runs` of `entry` are pushed.
    pub fn announce(&self, entry: u32, mut runs: Vec<Run>) -> Result<()> {
        runs.sort_by_key(|r| r.start);
        let sane = runs
            .iter()
            .all(|r| r.count > 0 && r.start.checked_add(r.count).is_some())
            && runs
                .windows(2)
                .all(|w| w[0].start + w[0].count <= w[1].start);
        if !sane {
            return Err(Error::Protocol(format!(
                "overlapping or empty pushed runs for entry {entry}"
            )));
        }
        let mut st = self.lock();
        if st.announced.len() >= MAX_ANNOUNCED {
            return Err(Error::Limit("too many pushed entries".into()));
        }
        if st.announced.insert(entry, runs).is_some() {
            return Err(Error::Protocol(format!("entry {entry} pushed twice")));
        }
        Ok(())
    }

    /// Whether anything of `entry` is pushed.
    pub fn has(&self, entry: u32) -> bool {
        self.lock().announced.contains_key(&entry)
    }

    /// Whether every chunk of `want` is pushed for `entry` (then the lane takes them all from
    /// here).
    pub fn covers(&self, entry: u32, want: &[u32]) -> bool {
        let st = self.lock();
        let Some(runs) = st.announced.get(&entry) else {
            return false;
        };
        !want.is_empty()
            && want.iter().all(|&n| {
                let i = runs.partition_point(|r| r.start <= n);
                i > 0 && n - runs[i - 1].start < runs[i - 1].count
            })
    }

    /// Nothing pushed for `entry` will be used: free what arrived, drop what comes later.
    pub fn drop_entry(&self, entry: u32) {
        let mut st = self.lock();
        if !st.announced.contains_key(&entry) || !st.dropped.insert(entry) {
            return;
        }
        let gone: Vec<(u32, u32)> = st
            .arrived
            .keys()
            .filter(|(e, _)| *e == entry)
            .copied()
            .collect();
        for k in gone {
            if let Some((_, b)) = st.arrived.remove(&k) {
                st.buffered -= b.len();
            }
        }
    }

    /// Take chunk `chunk` of `entry`, waiting for it to arrive.
    pub fn take(&self, entry: u32, chunk: u32) -> Result<(Codec, Vec<u8>)> {
        let mut st = self.lock();
        loop {
            if let Some((codec, bytes)) = st.arrived.remove(&(entry, chunk)) {
                st.buffered -= bytes.len();
                return Ok((codec, bytes));
            }
            if let Some(reason) = st.failed.get(&entry) {
                return Err(Error::Remote(reason.clone()));
            }
            match &st.ended {
                Some(None) => {
                    return Err(Error::Protocol(format!(
                        "chunk {chunk} of entry {entry} was announced as pushed but never came"
                    )))
                }
                Some(Some(e)) => return Err(Error::Transport(format!("push stream: {e}"))),
                None => {}
            }
            let idle = st.last.elapsed();
            if idle >= self.timeout {
                return Err(Error::Transport(format!(
                    "pushed chunks stopped arriving for {:?}",
                    self.timeout
                )));
            }
            let wait = (self.timeout - idle).min(Duration::from_millis(500));
            st = self
                .arrived
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// One frame from the push stream.
    fn put(&self, frame: Frame) -> Result<()> {
        let mut st = self.lock();
        st.last = Instant::now();
        match frame {
            Frame::Data {
                entry,
                chunk,
                codec,
                bytes,
            } => {
                if st.dropped.contains(&entry) {
                    return Ok(());
                }
                if st.buffered + bytes.len() > MAX_BUFFERED {
                    return Err(Error::Limit(format!(
                        "the sender pushed more than {MAX_BUFFERED} bytes ahead"
                    )));
                }
                st.buffered += bytes.len();
                if let Some((_, old)) = st.arrived.insert((entry, chunk), (codec, bytes)) {
                    st.buffered -= old.len();
                }
            }
            Frame::Failed { entry, reason } => {
                st.failed.insert(entry, reason);
            }
            other => {
                return Err(Error::Protocol(format!(
                    "unexpected frame on the push stream: {other:?}"
                )))
            }
        }
        drop(st);
        self.arrived.notify_all();
        Ok(())
    }

    fn end(&self, error: Option<String>) {
        self.lock().ended = Some(error);
        self.arrived.notify_all();
    }

    /// Read the push stream of the request whose control stream is `control` from `conn`:
    /// streams of other requests (a push whose request ended before its stream was read) are
    /// stopped and skipped. Returns when the stream ends or fails; lanes waiting then learn why.
    pub async fn read_from(&self, conn: quinn::Connection, control: u64) {
        loop {
            let mut recv = match conn.accept_uni().await {
                Ok(r) => r,
                Err(e) => {
                    self.end(Some(super::wire::conn_error(&e).to_string()));
                    return;
                }
            };
            match read_msg::<Frame>(&mut recv).await {
                Ok(Some(Frame::PushStream { control: c })) if c == control => {}
                Ok(_) | Err(_) => {
                    let _ = recv.stop(0u32.into());
                    continue;
                }
            }
            let r = async {
                while let Some(f) = read_msg::<Frame>(&mut recv).await? {
                    self.put(f)?;
                }
                Ok::<(), Error>(())
            }
            .await;
            if r.is_err() {
                let _ = recv.stop(1u32.into());
            }
            self.end(r.err().map(|e| e.to_string()));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol;

    fn data(entry: u32, chunk: u32, len: usize) -> Frame {
        Frame::Data {
            entry,
            chunk,
            codec: Codec::Raw,
            bytes: vec![chunk as u8; len],
        }
    }

    #[test]
    fn chunks_are_taken_as_they_arrive_and_unwanted_ones_dropped() {
        let p = std::sync::Arc::new(Pushed::new(Duration::from_secs(5)));
        p.announce(3, protocol::to_runs(&[1, 2, 5])).unwrap();
        assert!(p.covers(3, &[1, 5]));
        assert!(!p.covers(3, &[1, 4]), "chunk 4 is not pushed");
        assert!(!p.covers(4, &[1]), "entry 4 is not pushed");
        assert!(p
            .announce(
                4,
                vec![Run { start: 0, count: 3 }, Run { start: 2, count: 1 }]
            )
            .is_err());
        assert!(p.announce(3, Vec::new()).is_err(), "pushed twice");
        let q = p.clone();
        let waiter = std::thread::spawn(move || q.take(3, 5));
        p.put(data(3, 1, 10)).unwrap();
        p.put(data(3, 5, 20)).unwrap();
        assert_eq!(waiter.join().unwrap().unwrap().1, vec![5u8; 20]);
        assert_eq!(p.take(3, 1).unwrap().1.len(), 10);
        assert_eq!(p.lock().buffered, 0);
        // An entry that needs nothing: what came and what comes later is freed.
        p.announce(7, protocol::to_runs(&[0])).unwrap();
        p.put(data(7, 0, 100)).unwrap();
        p.drop_entry(7);
        p.put(data(7, 0, 100)).unwrap();
        assert_eq!(p.lock().buffered, 0);
    }

    #[test]
    fn a_push_that_ends_early_fails_or_overflows_is_an_error_not_a_hang() {
        let p = Pushed::new(Duration::from_secs(5));
        p.announce(0, protocol::to_runs(&[0, 1])).unwrap();
        p.put(Frame::Failed {
            entry: 0,
            reason: "vanished".into(),
        })
        .unwrap();
        assert!(p.take(0, 1).unwrap_err().to_string().contains("vanished"));
        p.end(None);
        assert!(p.take(9, 0).unwrap_err().to_string().contains("never came"));
        let big = Pushed::new(Duration::from_secs(5));
        let mut r = Ok(());
        for c in 0..=(MAX_BUFFERED / (16 << 20)) as u32 {
            r = r.and(big.put(data(0, c, 16 << 20)));
        }
        assert!(r.is_err(), "more than the buffer's bound was accepted");
        let silent = Pushed::new(Duration::from_millis(50));
        silent.put(data(1, 0, 1)).unwrap();
        assert!(silent
            .take(1, 1)
            .unwrap_err()
            .to_string()
            .contains("stopped"));
    }
}
