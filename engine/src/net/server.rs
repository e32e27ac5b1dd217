//! `hop serve`: accept authenticated sessions and act as the receiver (push) or the sender
//! (pull) for paths confined under a root directory.

use super::agent::{Agent, CallContext};
use super::control::{Control, Request, SyncSettings};
use super::endpoint::{server_endpoint, Credentials, NetOptions};
use super::session::{receive_tree, send_tree, Control2};
use super::trust::{fingerprint_of_cert, Admitted};
use super::wire::{conn_error, expect_msg, write_msg};
use crate::error::{Error, Result};
use crate::protocol::VERSION;
use crate::receiver::{Receiver, ReceiverOptions};
use crate::report::Progress;
use crate::sender::{Sender, SenderOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What `hop serve` needs.
#[derive(Clone)]
pub struct ServeSettings {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Every remote path is confined under this directory.
    pub root: PathBuf,
    /// The server's identity.
    pub identity: Credentials,
    /// The client keys allowed in.
    pub admitted: Admitted,
    /// Transport settings; `streams` is the most streams a pushing client may use.
    pub net: NetOptions,
    /// Sessions served at once; more are refused.
    pub max_sessions: usize,
    /// Keep source chunk caches for pulled trees (see [`crate::index::source_cache_path`]).
    pub source_cache: bool,
    /// Serve one session and return (waiting at most `net.timeout` for it to start): the mode
    /// of a server started over ssh for one transfer.
    pub once: bool,
    /// Carries out [`Request::Agent`] commands; without one they are refused.
    pub agent: Option<Arc<dyn Agent>>,
}

/// Resolve a client's path under `root`: no `..`, no NUL, and no component that is a symlink
/// (so nothing reached through the path lies outside the root).
pub fn confine(root: &Path, rel: &str) -> Result<PathBuf> {
    let unsafe_path = |why| Error::UnsafePath {
        path: rel.to_string(),
        why,
    };
    if rel.len() > 4096 {
        return Err(unsafe_path("longer than 4096 bytes"));
    }
    let mut p = root.to_path_buf();
    for c in rel.split('/') {
        match c {
            "" | "." => continue,
            ".." => return Err(unsafe_path("contains '..'")),
            c if c.contains('\0') => return Err(unsafe_path("contains NUL")),
            c => {
                p.push(c);
                if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
                    return Err(unsafe_path("goes through a symlink"));
                }
            }
        }
    }
    Ok(p)
}

/// Listen and serve until the process is stopped. `ready` is called once the socket is bound,
/// with the actual address (useful with port 0).
pub fn serve(s: ServeSettings, ready: impl FnOnce(SocketAddr)) -> Result<()> {
    s.admitted.check()?;
    if !s.root.is_dir() {
        return Err(Error::Transport(format!(
            "root {} is not a directory",
            s.root.display()
        )));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Transport(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async move {
        let endpoint = server_endpoint(s.listen, &s.identity, s.admitted.clone(), &s.net)?;
        let addr = endpoint
            .local_addr()
            .map_err(|e| Error::Transport(format!("local address: {e}")))?;
        ready(addr);
        let active = Arc::new(AtomicUsize::new(0));
        let s = Arc::new(s);
        if s.once {
            let incoming = tokio::time::timeout(s.net.timeout, endpoint.accept())
                .await
                .map_err(|_| Error::Transport("no client came".into()))?
                .ok_or_else(|| Error::Transport("endpoint closed".into()))?;
            let r = session(incoming, &s).await;
            endpoint.close(0u32.into(), b"done");
            let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
            return r;
        }
        let mut rate = Bucket::new(HANDSHAKES_PER_SEC, HANDSHAKE_BURST);
        while let Some(incoming) = endpoint.accept().await {
            // Handshakes cost CPU before anyone is authenticated: a flood is refused at once.
            if !rate.take(std::time::Instant::now()) {
                tracing::warn!(
                    "refusing {}: more than {HANDSHAKES_PER_SEC} new connections per second",
                    incoming.remote_address()
                );
                incoming.refuse();
                continue;
            }
            if active.load(Ordering::Relaxed) >= s.max_sessions {
                tracing::warn!(
                    "refusing {}: {} sessions already",
                    incoming.remote_address(),
                    s.max_sessions
                );
                incoming.refuse();
                continue;
            }
            active.fetch_add(1, Ordering::Relaxed);
            let (s, active) = (s.clone(), active.clone());
            tokio::spawn(async move {
                let peer = incoming.remote_address();
                if let Err(e) = session(incoming, &s).await {
                    tracing::warn!("session from {peer}: {e}");
                }
                active.fetch_sub(1, Ordering::Relaxed);
            });
        }
        Ok(())
    })
}

/// New connections accepted per second on average, and in a burst.
const HANDSHAKES_PER_SEC: f64 = 50.0;
const HANDSHAKE_BURST: f64 = 100.0;

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Option<std::time::Instant>,
}

impl Bucket {
    fn new(rate: f64, burst: f64) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            at: None,
        }
    }

    /// Take a token at `now`, if there is one.
    fn take(&mut self, now: std::time::Instant) -> bool {
        if let Some(at) = self.at {
            let refill = now.saturating_duration_since(at).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn peer_fingerprint(conn: &quinn::Connection) -> String {
    conn.peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| certs.first().and_then(|c| fingerprint_of_cert(c).ok()))
        .unwrap_or_else(|| "?".into())
}

async fn session(incoming: quinn::Incoming, s: &ServeSettings) -> Result<()> {
    let peer = incoming.remote_address();
    let connecting = incoming.accept().map_err(|e| conn_error(&e))?;
    let conn = tokio::time::timeout(s.net.timeout, connecting)
        .await
        .map_err(|_| Error::Transport("handshake timed out".into()))?
        .map_err(|e| Error::Trust(format!("handshake failed: {}", conn_error(&e))))?;
    let who = peer_fingerprint(&conn);
    let ctx = CallContext {
        conn: conn.stable_id() as u64,
        peer: who.clone(),
        root: s.root.clone(),
    };
    let r = async {
        // Requests come one after another, each on a stream of its own; the first must come
        // within the timeout, later ones whenever the client likes (while the connection lives).
        let mut first = true;
        loop {
            let accepted = if first {
                tokio::time::timeout(s.net.timeout, conn.accept_bi())
                    .await
                    .map_err(|_| Error::Transport("no request".into()))?
            } else {
                conn.accept_bi().await
            };
            let (send, recv) = match accepted {
                Ok(s) => s,
                Err(_) if !first => return Ok(()),
                Err(e) => return Err(conn_error(&e)),
            };
            first = false;
            let mut ctl = Control2 { send, recv };
            let hello = tokio::time::timeout(
                s.net.timeout,
                expect_msg::<Control>(&mut ctl.recv, "request"),
            )
            .await
            .map_err(|_| Error::Transport("no request".into()))??;
            let Control::Hello {
                version,
                request,
                settings,
            } = hello
            else {
                return Err(Error::Protocol("expected a request".into()));
            };
            tracing::info!("{peer} ({who}): {request:?}");
            if version != VERSION {
                let reason = format!("server speaks protocol {VERSION}, client {version}");
                write_msg(
                    &mut ctl.send,
                    &Control::Refused {
                        reason: reason.clone(),
                    },
                )
                .await?;
                return Err(Error::Protocol(reason));
            }
            if let Request::Agent { body } = request {
                let answer = match s.agent.clone() {
                    None => Control::Refused {
                        reason: "this server runs no agent (it only syncs)".into(),
                    },
                    Some(agent) => {
                        let ctx = ctx.clone();
                        let out = tokio::task::spawn_blocking(move || agent.call(&ctx, &body))
                            .await
                            .map_err(|e| Error::Transport(format!("agent: {e}")))?;
                        match out {
                            Ok(body) => Control::Reply { body },
                            Err(reason) => Control::Refused { reason },
                        }
                    }
                };
                write_msg(&mut ctl.send, &answer).await?;
                let _ = ctl.send.finish();
                continue;
            }
            let pull = matches!(request, Request::Pull { .. });
            match check_request(&s.root, &request, &settings) {
                Err(e) => {
                    let reason = e.to_string();
                    write_msg(&mut ctl.send, &Control::Refused { reason }).await?;
                    let _ = ctl.send.finish();
                    // Let the refusal reach the client before the connection goes.
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                    return Err(e);
                }
                Ok((path, source_is_dir)) => {
                    write_msg(
                        &mut ctl.send,
                        &Control::Welcome {
                            version: VERSION,
                            source_is_dir,
                        },
                    )
                    .await?;
                    run(s, &conn, &mut ctl, request, settings, path).await?;
                }
            }
            // The receiver of a pull opens streams of its own: nothing else may follow.
            if pull {
                // The client closes when it has what it needs.
                let _ = tokio::time::timeout(s.net.timeout, conn.closed()).await;
                return Ok(());
            }
        }
    }
    .await;
    if let Some(agent) = &s.agent {
        let agent = agent.clone();
        let id = ctx.conn;
        let _ = tokio::task::spawn_blocking(move || agent.closed(id)).await;
    }
    if let Err(e) = &r {
        let msg = e.to_string();
        conn.close(1u32.into(), &msg.as_bytes()[..msg.len().min(900)]);
    }
    r
}

/// Check a client's request and settings against `root` (the server's `--root`): the path it
/// names there, and whether a pull's source is a directory. Everything in them came from the
/// network; a refusal is an error to send back.
pub fn check_request(
    root: &Path,
    req: &Request,
    settings: &SyncSettings,
) -> Result<(PathBuf, bool)> {
    crate::chunk::ChunkParams::new(
        settings.params.min,
        settings.params.avg,
        settings.params.max,
    )?;
    rules(settings)?;
    match req {
        Request::Push { path, name_if_dir } => {
            let mut dest = confine(root, path)?;
            if let Some(name) = name_if_dir {
                if path.ends_with('/') || dest.is_dir() {
                    if name.contains('/') || name == ".." || name == "." || name.is_empty() {
                        return Err(Error::UnsafePath {
                            path: name.clone(),
                            why: "not a file name",
                        });
                    }
                    dest = confine(root, &format!("{path}/{name}"))?;
                }
            }
            Ok((dest, false))
        }
        Request::Agent { .. } => Err(Error::Protocol("an agent command is not a sync".into())),
        Request::Pull { path } => {
            let src = confine(root, path)?;
            let md = std::fs::symlink_metadata(&src).map_err(|e| Error::Io {
                op: "read source",
                path: PathBuf::from(path),
                source: e,
            })?;
            Ok((src, md.is_dir()))
        }
    }
}

async fn run(
    s: &ServeSettings,
    conn: &quinn::Connection,
    ctl: &mut Control2,
    request: Request,
    settings: SyncSettings,
    path: PathBuf,
) -> Result<()> {
    match request {
        Request::Push { .. } => {
            let ropts = ReceiverOptions {
                params: settings.params,
                delete: settings.delete,
                basis: Vec::new(),
                dry_run: settings.dry_run,
                fsync: settings.fsync,
                sparse: settings.sparse,
                index_cache: crate::index::dest_cache_path(&path),
                no_index_cache: settings.no_index_cache,
                delta: settings.delta,
                rules: rules(&settings)?,
                inplace: settings.inplace,
            };
            let prepare = move || Receiver::prepare(&path, ropts);
            // The client chose the streams; `net.streams` is the most a client may use.
            let lanes = (settings.streams as usize).clamp(1, s.net.streams.max(1));
            let (report, _) = receive_tree(
                conn,
                ctl,
                prepare,
                lanes,
                s.net.strands(),
                s.net.timeout,
                Arc::new(Progress::default()),
            )
            .await?;
            tracing::info!(
                "received: {} files, {} literal bytes, {} errors",
                report.stats.files,
                report.stats.bytes_literal,
                report.errors.len()
            );
            Ok(())
        }
        Request::Pull { .. } => {
            let cache = if s.source_cache && !settings.no_index_cache {
                crate::index::source_cache_path(&path)
            } else {
                None
            };
            let sopts = SenderOptions {
                params: settings.params,
                compress: settings.compress,
                cache,
                basis: None,
                rules: rules(&settings)?,
                push: false,
                known: None,
            };
            let summary = send_tree(conn, ctl, Arc::new(Sender::new(&path, sopts))).await?;
            tracing::info!(
                "sent: {} files, {} literal bytes",
                summary.stats.files,
                summary.stats.bytes_literal
            );
            Ok(())
        }
        Request::Agent { .. } => Err(Error::Protocol("an agent command is not a sync".into())),
    }
}

/// The request's include/exclude rules, compiled (`None` when there are none).
fn rules(settings: &SyncSettings) -> Result<Option<Arc<crate::filter::Rules>>> {
    if settings.rules.is_empty() {
        return Ok(None);
    }
    Ok(Some(Arc::new(crate::filter::Rules::new(&settings.rules)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_beyond_the_rate_are_refused_and_the_bucket_refills() {
        let t0 = std::time::Instant::now();
        let mut b = Bucket::new(50.0, 100.0);
        let taken = (0..150).filter(|_| b.take(t0)).count();
        assert_eq!(taken, 100, "a burst of 150 at once lets 100 in");
        assert!(!b.take(t0));
        // 0.2 s later, 10 more.
        let later = t0 + std::time::Duration::from_millis(200);
        let taken = (0..20).filter(|_| b.take(later)).count();
        assert_eq!(taken, 10);
        // Never more than the burst, however long the pause.
        let much_later = later + std::time::Duration::from_secs(3600);
        assert_eq!((0..500).filter(|_| b.take(much_later)).count(), 100);
    }

    #[test]
    fn confine_refuses_escapes() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir(root.join("in")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("out")).unwrap();
        assert_eq!(confine(root, "in/x").unwrap(), root.join("in/x"));
        assert_eq!(confine(root, "/in/./x/").unwrap(), root.join("in/x"));
        assert_eq!(confine(root, "").unwrap(), root.to_path_buf());
        for bad in ["../x", "in/../../x", "out/passwd", "out", "a\0b"] {
            assert!(confine(root, bad).is_err(), "{bad:?} accepted");
        }
    }
}
