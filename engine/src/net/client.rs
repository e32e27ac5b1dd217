//! The client side of remote syncs: connect to a `hop serve`, check its key against the known
//! hosts, then push a local tree to it or pull a tree from it.

use super::control::{Control, Request, Summary, SyncSettings};
use super::endpoint::{
    client_endpoint, close_promptly, pinned_provider, Credentials, NetOptions, SERVER_NAME,
};
use super::session::{receive_tree, Control2};
use super::trust::{fingerprint_of_cert, KnownHosts, PinnedServer, SeenKey};
use super::wire::{conn_error, expect_msg, write_msg};
use crate::error::{Error, Result};
use crate::protocol::VERSION;
use crate::receiver::{Receiver, ReceiverOptions};
use crate::report::{Progress, Report};
use crate::sender::{Sender, SenderOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest a closing client waits for its CONNECTION_CLOSE to leave.
const CLOSE_WAIT: Duration = Duration::from_millis(200);

/// Port `hop serve` listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7420;

/// `quic://HOST[:PORT]/PATH`, PATH relative to the server's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemotePath {
    /// Host name or address (IPv6 without brackets).
    pub host: String,
    /// UDP port.
    pub port: u16,
    /// Path under the server's root, as typed (a trailing `/` matters, as with rsync).
    pub path: String,
}

impl RemotePath {
    /// Parse `quic://HOST[:PORT]/PATH`; `None` if `s` is not a `quic://` address at all.
    pub fn parse(s: &str) -> Option<Result<RemotePath>> {
        let rest = s.strip_prefix("quic://")?;
        let bad = |why: &str| Some(Err(Error::Transport(format!("bad remote {s:?}: {why}"))));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((h, after)) = v6.split_once(']') else {
                return bad("unclosed [");
            };
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return bad("no host");
        }
        let port = match port {
            None => DEFAULT_PORT,
            Some(p) => match p.parse() {
                Ok(p) => p,
                Err(_) => return bad("port is not a number"),
            },
        };
        Some(Ok(RemotePath {
            host: host.to_string(),
            port,
            path: path.to_string(),
        }))
    }

    /// `HOST:PORT` as recorded in known-hosts files.
    pub fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The last component of the path, if the path does not end in `/`.
    pub fn name(&self) -> Option<&str> {
        if self.path.ends_with('/') {
            return None;
        }
        self.path
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty() && *n != "." && *n != "..")
    }
}

/// How the client identifies itself and whom it trusts.
#[derive(Clone)]
pub struct ClientSettings {
    /// This client's identity.
    pub identity: Credentials,
    /// The known-hosts file.
    pub known_hosts: PathBuf,
    /// Trust (and record) a server seen for the first time.
    pub accept_new: bool,
    /// Transport settings.
    pub net: NetOptions,
}

pub(crate) struct Session {
    /// Held for the connection's lifetime.
    pub(crate) _endpoint: quinn::Endpoint,
    pub(crate) conn: quinn::Connection,
    pub(crate) ctl: Control2,
    source_is_dir: bool,
}

/// An authenticated connection to a server, before or between requests.
pub(crate) struct Connected {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    hp: String,
    /// Until the server first answers: the known hosts to record a newly trusted key in.
    unrecorded: Option<(KnownHosts, SeenKey)>,
    /// The client's own fingerprint, for the message when the server refuses it.
    own: String,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Error::Transport(format!("cannot start the runtime: {e}")))
}

/// Why a connection attempt failed, in terms of keys when keys were the reason.
fn explain(
    e: Error,
    remote: &RemotePath,
    seen: &SeenKey,
    expected: Option<&str>,
    known: &KnownHosts,
) -> Error {
    match (seen.get(), expected) {
        (Some(got), Some(want)) if got != want => Error::Trust(format!(
            "SERVER KEY CHANGED for {hp}!\n  recorded in {file}: {want}\n  presented now:       {got}\n\
             Someone may be intercepting this connection, or the server's identity was replaced. \
             If you are sure it is legitimate, remove the line for {hp} from {file} and connect \
             again with --accept-new.",
            hp = remote.host_port(),
            file = known.path().display()
        )),
        (Some(got), None) => Error::Trust(format!(
            "unknown server {hp} presents key {got}; it is not in {file}. Check the fingerprint \
             with the server's operator (`hop keygen --show`), then add the line `{hp} {got}` to \
             {file} or connect once with --accept-new.",
            hp = remote.host_port(),
            file = known.path().display()
        )),
        _ => e,
    }
}

/// Connect and authenticate (the server's key against the known hosts; the client's key is
/// checked by the server, which says so at the first request).
pub(crate) async fn connect(remote: &RemotePath, cfg: &ClientSettings) -> Result<Connected> {
    let addr = tokio::net::lookup_host((remote.host.as_str(), remote.port))
        .await
        .map_err(|e| Error::Transport(format!("cannot resolve {}: {e}", remote.host)))?
        .next()
        .ok_or_else(|| Error::Transport(format!("{} has no address", remote.host)))?;
    let known = KnownHosts::load(&cfg.known_hosts)?;
    let hp = remote.host_port();
    let expected = known.lookup(&hp).map(str::to_string);
    let seen = SeenKey::default();
    let pin = PinnedServer {
        expected: expected.clone(),
        accept_new: cfg.accept_new,
        seen: seen.clone(),
        provider: pinned_provider(),
    };
    let endpoint = client_endpoint(addr, &cfg.identity, pin, &cfg.net)?;
    let connecting = endpoint
        .connect(addr, SERVER_NAME)
        .map_err(|e| Error::Transport(format!("cannot connect to {hp}: {e}")))?;
    let conn = match tokio::time::timeout(cfg.net.timeout, connecting).await {
        Err(_) => {
            return Err(Error::Transport(format!(
                "no answer from {hp} within {:?} (is `hop serve` running there, and is UDP port {} open?)",
                cfg.net.timeout, remote.port
            )))
        }
        Ok(Err(e)) => {
            return Err(explain(
                Error::Transport(format!("cannot connect to {hp}: {}", conn_error(&e))),
                remote,
                &seen,
                expected.as_deref(),
                &known,
            ))
        }
        Ok(Ok(c)) => c,
    };
    Ok(Connected {
        endpoint,
        conn,
        hp,
        unrecorded: if expected.is_none() {
            Some((known, seen))
        } else {
            None
        },
        own: identity_fingerprint(&cfg.identity).unwrap_or_default(),
    })
}

impl Connected {
    /// `e`, or the server's refusal of this client's key when that is why the connection
    /// closed.
    fn refused_key(&self, e: Error) -> Error {
        if let Some(quinn::ConnectionError::ConnectionClosed(c)) = self.conn.close_reason() {
            if (0x100..0x200).contains(&u64::from(c.error_code)) {
                return Error::Trust(format!(
                    "{} refused this client's key {}: add that line to the server's \
                     authorized-keys file (see `hop serve --help`)",
                    self.hp, self.own
                ));
            }
        }
        e
    }

    /// The server answered a request, so both keys were checked: record a newly trusted server.
    fn settle_trust(&mut self) -> Result<()> {
        if let Some((mut known, seen)) = self.unrecorded.take() {
            if let Some(fp) = seen.get() {
                known.add(&self.hp, &fp)?;
                tracing::warn!(
                    "added server {} with key {fp} to {}",
                    self.hp,
                    known.path().display()
                );
            }
        }
        Ok(())
    }

    /// Push with the request's answer read only before the summary (the manifest follows the
    /// request at once, saving a round trip); a refusal still reports the server's reason.
    async fn pipelined_push(
        &mut self,
        request: Request,
        settings: SyncSettings,
        sender: Arc<Sender>,
    ) -> Result<Summary> {
        let mut ctl = match self.send_request(request, settings).await {
            Ok(c) => c,
            Err(e) => return Err(self.refused_key(e)),
        };
        let r = super::session::send_tree_after(&self.conn, &mut ctl, sender, true).await;
        match r {
            // Answered (welcomed, or refused with a reason): both keys were checked.
            Ok(_) | Err(Error::Remote(_)) => self.settle_trust()?,
            Err(_) => {}
        }
        r.map_err(|e| self.refused_key(e))
    }

    /// Send one request on a control stream of its own and read the server's first answer.
    async fn request(
        &mut self,
        request: Request,
        settings: SyncSettings,
        timeout: Duration,
    ) -> Result<(Control2, Control)> {
        let hp = self.hp.clone();
        let hello = Control::Hello {
            version: VERSION,
            request,
            settings,
        };
        let (send, recv) = match self.conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return Err(self.refused_key(conn_error(&e))),
        };
        let mut ctl = Control2 { send, recv };
        let answer = async {
            write_msg(&mut ctl.send, &hello).await?;
            expect_msg::<Control>(&mut ctl.recv, "server's answer").await
        };
        let answer = match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => return Err(self.refused_key(e)),
            Err(_) => return Err(Error::Transport(format!("{hp} did not answer the request"))),
        };
        self.settle_trust()?;
        if let Control::Refused { reason } = answer {
            return Err(Error::Remote(format!("{hp} refused the request: {reason}")));
        }
        Ok((ctl, answer))
    }

    /// Send a request without waiting for the answer (the connection's keys are settled).
    async fn send_request(&mut self, request: Request, settings: SyncSettings) -> Result<Control2> {
        let hello = Control::Hello {
            version: VERSION,
            request,
            settings,
        };
        let (send, recv) = self.conn.open_bi().await.map_err(|e| conn_error(&e))?;
        let mut ctl = Control2 { send, recv };
        write_msg(&mut ctl.send, &hello).await?;
        Ok(ctl)
    }

    /// Start a sync session.
    async fn sync(
        &mut self,
        request: Request,
        settings: SyncSettings,
        timeout: Duration,
    ) -> Result<(Control2, bool)> {
        let (ctl, answer) = self.request(request, settings, timeout).await?;
        match answer {
            Control::Welcome {
                version,
                source_is_dir,
            } => {
                if version != VERSION {
                    return Err(Error::Protocol(format!(
                        "server speaks protocol {version}, this hop speaks {VERSION}"
                    )));
                }
                Ok((ctl, source_is_dir))
            }
            other => Err(Error::Protocol(format!("unexpected answer {other:?}"))),
        }
    }
}

pub(crate) async fn open(
    remote: &RemotePath,
    cfg: &ClientSettings,
    request: Request,
    settings: SyncSettings,
) -> Result<Session> {
    let mut c = connect(remote, cfg).await?;
    let (ctl, source_is_dir) = c.sync(request, settings, cfg.net.timeout).await?;
    Ok(Session {
        _endpoint: c.endpoint,
        conn: c.conn,
        ctl,
        source_is_dir,
    })
}

/// The fingerprint of an identity's key.
pub fn identity_fingerprint(id: &Credentials) -> Result<String> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(id.cert_pem.as_bytes())
        .map_err(|e| Error::Trust(format!("identity certificate: {e}")))?;
    fingerprint_of_cert(&der)
}

/// End a session: close the connection (with the error, if any, as the reason the peer sees),
/// and return the bytes that crossed the network.
async fn close(conn: &quinn::Connection, err: Option<&Error>) -> u64 {
    match err {
        None => close_promptly(conn, 0, b"done", CLOSE_WAIT).await,
        Some(e) => {
            let msg = e.to_string();
            close_promptly(conn, 1, &msg.as_bytes()[..msg.len().min(900)], CLOSE_WAIT).await
        }
    }
    let st = conn.stats();
    st.udp_tx.bytes + st.udp_rx.bytes
}

fn sender_for(
    src: &Path,
    settings: &SyncSettings,
    cache: Option<PathBuf>,
    basis: Option<PathBuf>,
    known: Option<Arc<crate::index::IndexCache>>,
    progress: Arc<Progress>,
) -> Result<(Arc<Sender>, Option<String>)> {
    let sopts = SenderOptions {
        params: settings.params,
        compress: settings.compress,
        cache,
        basis,
        rules: if settings.rules.is_empty() {
            None
        } else {
            Some(Arc::new(crate::filter::Rules::new(&settings.rules)?))
        },
        // A basis is what the receiver holds: push what it lacks (not in a dry run).
        push: settings.push && !settings.dry_run,
        known,
    };
    let name_if_dir = if src.is_dir() {
        None
    } else {
        src.file_name().map(|n| n.to_string_lossy().into_owned())
    };
    Ok((
        Arc::new(Sender::new(src, sopts).with_progress(progress)),
        name_if_dir,
    ))
}

/// Turn a sender's summary into its report.
fn push_report(mut summary: Summary, wire: u64, t0: Instant) -> Report {
    let notes = summary.sender_notes.take().unwrap_or_default();
    let mut report = summary.into_report();
    report.skipped = notes.skipped;
    report.errors.splice(
        0..0,
        notes
            .errors
            .into_iter()
            .map(|e| Error::Remote(format!("(local) {e}"))),
    );
    report.stats.errors = report.errors.len() as u64;
    report.stats.bytes_wire = wire;
    report.stats.elapsed_ms = t0.elapsed().as_millis() as u64;
    report
}

/// Send the local tree `src` to `remote` (`basis`: see [`SenderOptions::basis`]). `remote.path`
/// is where it lands; for a single file, a path ending in `/` or naming a directory on the
/// server receives it under its own name. `progress` counts what is chunked, asked for and sent.
pub fn push(
    src: &Path,
    remote: &RemotePath,
    settings: SyncSettings,
    cache: Option<PathBuf>,
    basis: Option<PathBuf>,
    cfg: &ClientSettings,
    progress: Arc<Progress>,
) -> Result<Report> {
    let t0 = Instant::now();
    let rt = runtime()?;
    rt.block_on(async {
        let (sender, name_if_dir) = sender_for(src, &settings, cache, basis, None, progress)?;
        let request = Request::Push {
            path: remote.path.clone(),
            name_if_dir,
        };
        let mut c = connect(remote, cfg).await?;
        let r = c.pipelined_push(request, settings, sender).await;
        let wire = close(&c.conn, r.as_ref().err()).await;
        Ok(push_report(r?, wire, t0))
    })
}

/// A connection to a server kept open for many requests: the pushes and commands of a
/// migration, without a handshake each.
pub struct Link {
    rt: tokio::runtime::Runtime,
    c: Connected,
    timeout: Duration,
    progress: Arc<Progress>,
}

impl Link {
    /// Connect and authenticate (see [`push`] for the trust rules).
    pub fn connect(remote: &RemotePath, cfg: &ClientSettings) -> Result<Link> {
        let rt = runtime()?;
        let c = rt.block_on(connect(remote, cfg))?;
        Ok(Link {
            rt,
            c,
            timeout: cfg.net.timeout,
            progress: Default::default(),
        })
    }

    /// Count what the next pushes chunk, are asked for and send in `progress`.
    pub fn set_progress(&mut self, progress: Arc<Progress>) {
        self.progress = progress;
    }

    /// `HOST:PORT` of the server.
    pub fn host_port(&self) -> &str {
        &self.c.hp
    }

    /// Bytes that crossed the network on this connection so far (UDP payloads, both ways).
    pub fn bytes_wire(&self) -> u64 {
        let st = self.c.conn.stats();
        st.udp_tx.bytes + st.udp_rx.bytes
    }

    /// The connection's current round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.c.conn.rtt()
    }

    /// Push the local tree `src` to `dest` (under the server's root), as [`push`] does.
    pub fn push(
        &mut self,
        src: &Path,
        dest: &str,
        settings: SyncSettings,
        cache: Option<PathBuf>,
        basis: Option<PathBuf>,
    ) -> Result<Report> {
        self.push_known(src, dest, settings, cache, basis, None)
    }

    /// [`Link::push`] with chunk lists of some source files already known (see
    /// [`crate::sender::SenderOptions::known`]).
    pub fn push_known(
        &mut self,
        src: &Path,
        dest: &str,
        settings: SyncSettings,
        cache: Option<PathBuf>,
        basis: Option<PathBuf>,
        known: Option<Arc<crate::index::IndexCache>>,
    ) -> Result<Report> {
        let t0 = Instant::now();
        let before = self.bytes_wire();
        let c = &mut self.c;
        let progress = self.progress.clone();
        let r = self.rt.block_on(async {
            let (sender, name_if_dir) = sender_for(src, &settings, cache, basis, known, progress)?;
            let request = Request::Push {
                path: dest.to_string(),
                name_if_dir,
            };
            c.pipelined_push(request, settings, sender).await
        });
        let wire = self.bytes_wire() - before;
        Ok(push_report(r?, wire, t0))
    }

    /// Send a command to the server's agent and return its answer; a refusal or failure of the
    /// command is an [`Error::Remote`] with the agent's words.
    pub fn call(&mut self, body: &str) -> Result<String> {
        let timeout = self.timeout;
        let c = &mut self.c;
        self.rt.block_on(async {
            let request = Request::Agent {
                body: body.to_string(),
            };
            // The agent may work for a while (a restore): the connection's keep-alives and idle
            // timeout watch the peer meanwhile, not this timeout.
            let (_, answer) = c
                .request(
                    request,
                    SyncSettings::none(),
                    timeout.max(Duration::from_secs(600)),
                )
                .await?;
            match answer {
                Control::Reply { body } => Ok(body),
                other => Err(Error::Protocol(format!("unexpected answer {other:?}"))),
            }
        })
    }

    /// Close the connection (the server undoes what waited for a later command).
    pub fn close(self) {
        let conn = self.c.conn.clone();
        self.rt
            .block_on(async move { close_promptly(&conn, 0, b"done", CLOSE_WAIT).await });
    }
}

/// Fetch the tree at `remote` into the local `dest`, with rsync's trailing-slash rule: a source
/// without a trailing `/` lands in `dest/NAME` when it is a directory, or when `dest` is an
/// existing directory or ends in `/`.
pub fn pull(
    remote: &RemotePath,
    dest: &Path,
    settings: SyncSettings,
    ropts: ReceiverOptions,
    cfg: &ClientSettings,
    progress: Arc<Progress>,
) -> Result<Report> {
    let t0 = Instant::now();
    let rt = runtime()?;
    rt.block_on(async {
        let request = Request::Pull {
            path: remote.path.clone(),
        };
        let mut s = open(remote, cfg, request, settings).await?;
        let into = match remote.name() {
            Some(n)
                if s.source_is_dir
                    || dest.is_dir()
                    || dest.as_os_str().to_string_lossy().ends_with('/') =>
            {
                dest.join(n)
            }
            _ => dest.to_path_buf(),
        };
        let prepare = move || Receiver::prepare(&into, ropts);
        let r = receive_tree(
            &s.conn,
            &mut s.ctl,
            prepare,
            cfg.net.streams,
            cfg.net.strands(),
            cfg.net.timeout,
            progress,
        )
        .await;
        let wire = close(&s.conn, r.as_ref().err()).await;
        let (mut report, notes) = r?;
        report.skipped = notes.skipped;
        report
            .errors
            .splice(0..0, notes.errors.into_iter().map(Error::Remote));
        report.stats.errors = report.errors.len() as u64;
        report.stats.bytes_wire = wire;
        report.stats.elapsed_ms = t0.elapsed().as_millis() as u64;
        Ok(report)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_remote_paths() {
        let r = RemotePath::parse("quic://host:9000/a/b/").unwrap().unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.path.as_str()),
            ("host", 9000, "a/b/")
        );
        assert_eq!(r.name(), None);
        let r = RemotePath::parse("quic://[::1]:5/x").unwrap().unwrap();
        assert_eq!((r.host.as_str(), r.port, r.name()), ("::1", 5, Some("x")));
        assert_eq!(r.host_port(), "[::1]:5");
        let r = RemotePath::parse("quic://h").unwrap().unwrap();
        assert_eq!((r.port, r.path.as_str()), (DEFAULT_PORT, ""));
        assert!(RemotePath::parse("/local/path").is_none());
        assert!(RemotePath::parse("quic://h:x/").unwrap().is_err());
        assert!(RemotePath::parse("quic://:1/").unwrap().is_err());
    }
}
