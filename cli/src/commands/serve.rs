//! `hop serve`: the daemon at the other end of remote syncs (and, later, the migration target).

use super::Output;
use crate::identity;
use anyhow::{Context, Result};
use clap::Args;
use hop_engine::net::{self, NetOptions, ServeSettings};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Serve remote syncs (receive pushed trees, send pulled ones, for paths under --root) and act
/// as the target of `hop migrate` (restores need root).
///
/// Clients authenticate with their key: only fingerprints listed in the authorized-keys file
/// (one per line, as printed by `hop keygen`; `#` starts a comment) get in, and the file is read
/// afresh at every connection. The server presents its own identity, which clients pin in their
/// known-hosts file. Traffic is QUIC over UDP with TLS 1.3; there is no plaintext mode.
///
/// On start, one line goes to standard output: `listening on ADDR as FINGERPRINT`.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  hop keygen --out /etc/hop/identity
  echo 'sha256:4f1c...  # alice laptop' >> /etc/hop/authorized_keys
  hop serve --listen 0.0.0.0:7420 --root /srv/hop --identity /etc/hop/identity \\
            --authorized-keys /etc/hop/authorized_keys
  then, on a client:  hop sync --accept-new dir/ quic://server:7420/dir")]
pub struct ServeArgs {
    /// UDP address to listen on (port 0: any free port, printed on start).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7420")]
    pub listen: SocketAddr,
    /// Directory under which all remote paths are confined.
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// Identity directory [default: ~/.config/hop/identity].
    #[arg(long, value_name = "DIR")]
    pub identity: Option<PathBuf>,
    /// File of authorized client fingerprints [default: ~/.config/hop/authorized_keys].
    #[arg(long, value_name = "FILE")]
    pub authorized_keys: Option<PathBuf>,
    /// Declare a client dead after this many seconds of silence.
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    pub timeout: u64,
    /// Sessions served at once; more are refused.
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub max_sessions: usize,
    /// Most streams a pushing client may have the server fetch chunks on (the client asks for
    /// its --streams).
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub max_streams: usize,
    /// QUIC flow-control window of a lane in bytes, spread over streams of 2 MiB (the
    /// connection's is four times this). Must exceed the link's bandwidth x round-trip time
    /// for full speed.
    #[arg(long, value_name = "BYTES", default_value = "16M", value_parser = crate::units::parse_size)]
    pub window: u64,
    /// Congestion controller for the data this side sends (pulls, and fetches for pushes
    /// are the client's): cubic, bbr or newreno.
    #[arg(long, value_name = "ALGO", default_value_t = NetOptions::default().congestion)]
    pub congestion: hop_engine::net::Congestion,
    /// Admit this client fingerprint too (repeatable); with --ephemeral, the only ones admitted.
    #[arg(long, value_name = "FINGERPRINT")]
    pub authorize: Vec<String>,
    /// Use a throwaway identity made for this run instead of --identity (clients learn its
    /// fingerprint from the line printed on start). What `hop sync` uses over ssh.
    #[arg(long)]
    pub ephemeral: bool,
    /// Serve one session, then exit (give up if no client comes within --timeout).
    #[arg(long)]
    pub once: bool,
    /// Migration target: runc's state directory for restored containers (runc --root).
    #[arg(long, value_name = "DIR")]
    pub runc_root: Option<PathBuf>,
    /// Refuse migration commands (serve syncs only).
    #[arg(long)]
    pub no_migrate: bool,
}

/// Run `hop serve`.
pub fn run(a: ServeArgs, _out: Output) -> Result<ExitCode> {
    let id = if a.ephemeral {
        // A throwaway identity lives in memory only: its files go as soon as it is read.
        let scratch = tempfile::Builder::new()
            .prefix("hop-serve-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        identity::generate(scratch.path(), false)?
    } else {
        identity::load(
            &a.identity
                .clone()
                .unwrap_or_else(identity::default_identity),
        )?
    };
    let mut admitted = hop_engine::net::trust::Admitted::default();
    for fp in &a.authorize {
        if !hop_engine::net::trust::is_fingerprint(fp) {
            anyhow::bail!("--authorize {fp:?}: not a fingerprint (sha256:<64 hex digits>)");
        }
        admitted.also.insert(fp.clone());
    }
    if !a.ephemeral {
        let file = a
            .authorized_keys
            .clone()
            .unwrap_or_else(|| identity::config_dir().join("authorized_keys"));
        // With keys given on the command line, a missing default file is no error.
        if a.authorize.is_empty() || a.authorized_keys.is_some() || file.exists() {
            admitted.file = Some(file);
        }
    }
    let root = std::fs::canonicalize(&a.root)
        .with_context(|| format!("cannot use root {}", a.root.display()))?;
    let settings = ServeSettings {
        listen: a.listen,
        root,
        identity: id.credentials(),
        admitted: admitted.clone(),
        net: NetOptions {
            streams: a.max_streams.clamp(1, 64),
            timeout: Duration::from_secs(a.timeout.max(1)),
            window: a.window,
            congestion: a.congestion,
            ..NetOptions::default()
        },
        max_sessions: a.max_sessions.max(1),
        source_cache: true,
        once: a.once,
        agent: if a.no_migrate {
            None
        } else {
            Some(std::sync::Arc::new(
                crate::migrate::agent::MigrationAgent::new(a.runc_root.clone()),
            ))
        },
    };
    let fp = id.fingerprint.clone();
    net::serve(settings, move |addr| {
        println!("listening on {addr} as {fp}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })
    .with_context(|| format!("hop serve ({admitted})"))?;
    Ok(ExitCode::SUCCESS)
}
