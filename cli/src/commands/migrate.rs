//! `hop migrate`: live-migrate a process tree or runc container to a `hop serve` target.

use super::Output;
use crate::migrate::app::App;
use crate::migrate::group::{Group, GroupFile};
use crate::migrate::haproxy::Hold;
use crate::migrate::run::{default_images_dir, migrate, Options};
use anyhow::{bail, Context, Result};
use clap::Args;
use hop_engine::net::RemotePath;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Live-migrate a running process tree (CRIU) or runc container to another host running
/// `hop serve` as root, with the least downtime the link allows.
///
/// Pre-copy rounds dump the application while it keeps running and push the images; each round
/// sends only what changed since the previous one. Pre-copy stops when the predicted downtime
/// fits --max-downtime, when rounds stop shrinking, or after --rounds. Then the application is
/// frozen and dumped a last time, the last changes are pushed, and the target restores it. If
/// anything fails before the target confirms that the application runs, it is restored at the
/// source from its final images (same state, not restarted), and a later `hop migrate` works.
///
/// For a container, its bundle (config.json and rootfs) is synced to the target's
/// containers/ID first, and its files again after the freeze. Several --runc containers move as
/// a group (e.g. a database and the web server using it): pre-copied in parallel, frozen
/// together once all pre-copies are done, restored in the order given, and all moved back to
/// the source if any of them fails. Progress goes to standard error;
/// the timeline table to standard output at the end.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  hop migrate --pid 4242 quic://10.0.0.2:7420
  hop migrate --runc redis --max-downtime 1.5s --report-json mig.json quic://10.0.0.2
  hop migrate --runc web --runc-root /run/runc --rounds 0 quic://10.0.0.2   (stop and copy)
  hop migrate --runc db --runc web quic://10.0.0.2   (a group: db restored first)
  hop migrate --group wordpress.toml quic://10.0.0.2  (a group with HAProxy; docs/migrate.md)

The target runs, as root:
  hop serve --root /srv/hop --listen 0.0.0.0:7420 --authorized-keys /etc/hop/authorized_keys")]
pub struct MigrateArgs {
    /// The target: quic://HOST[:PORT].
    pub target: String,
    #[command(flatten)]
    pub app: super::checkpoint::AppArgs,
    /// A group of containers described in a TOML file: their restore order, runc's root and,
    /// per container, the HAProxy server whose clients it serves (see docs/migrate.md).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["pid", "runc", "haproxy"])]
    pub group: Option<PathBuf>,
    /// Downtime budget (freeze to running at the target), e.g. 1s, 800ms, 2.5s.
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = parse_duration)]
    pub max_downtime: Duration,
    /// Most pre-copy rounds; 0 freezes at once (stop and copy).
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub rounds: usize,
    /// Compress chunk payloads: "zstd" or "zstd:LEVEL".
    #[arg(long, value_name = "ALGO[:LEVEL]")]
    pub compress: Option<String>,
    /// Established TCP connections are part of the state (restored on the same addresses).
    #[arg(long, conflicts_with = "tcp_close")]
    pub tcp_established: bool,
    /// Close established TCP connections at the freeze (CRIU --tcp-close): for an application
    /// that changes address, whose clients reconnect (through HAProxy: see --haproxy).
    #[arg(long)]
    pub tcp_close: bool,
    /// HAProxy's admin runtime socket: hold the application's clients during the move, then send
    /// them to the target (the backend needs scripts/haproxy/hold.lua; see docs/migrate.md).
    #[arg(long, value_name = "SOCKET", requires = "haproxy_server")]
    pub haproxy: Option<PathBuf>,
    /// The HAProxy server that is the application, as BACKEND/SERVER.
    #[arg(long, value_name = "BACKEND/SERVER", requires = "haproxy")]
    pub haproxy_server: Option<String>,
    /// The application's address at the target, IP:PORT, for HAProxy (default: unchanged, e.g.
    /// an address that moves with it over the VPN).
    #[arg(long, value_name = "IP:PORT", requires = "haproxy")]
    pub haproxy_addr: Option<String>,
    /// Where to keep images at the source [default: /dev/shm].
    #[arg(long, value_name = "DIR")]
    pub images_dir: Option<PathBuf>,
    /// Restore fully before the application runs again, instead of running it at once and
    /// bringing its memory in from the target's images afterwards (CRIU lazy pages).
    #[arg(long)]
    pub no_lazy_restore: bool,
    /// Let the target ask for every changed chunk (want-lists) in the rounds after the first,
    /// instead of sending what it lacks at once (the source knows: it kept the previous round).
    /// Costs a round trip per round; for measuring what the push saves.
    #[arg(long)]
    pub no_push: bool,
    /// Keep the images on both sides afterwards.
    #[arg(long)]
    pub keep_images: bool,
    /// Write the timeline as JSON to FILE ("-" for standard output).
    #[arg(long, value_name = "FILE")]
    pub report_json: Option<PathBuf>,
    #[command(flatten)]
    pub remote: super::remote::RemoteArgs,
}

/// Parse `1s`, `800ms`, `2.5s`, `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration like 1s, 800ms or 2.5s"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unit must be ms, s or m")),
    };
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("{s:?}: must be positive"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Run `hop migrate`.
pub fn run(a: MigrateArgs, out: Output) -> Result<ExitCode> {
    let target = match RemotePath::parse(&a.target) {
        Some(r) => r?,
        None => bail!("{}: the target must be quic://HOST[:PORT]", a.target),
    };
    // Every application is checked before anything moves. Each comes with the HAProxy server
    // holding its clients, if any, and its address at the target.
    type Member = (App, Option<Hold>, Option<String>);
    let members: Vec<Member> = if let Some(file) = &a.group {
        let g = GroupFile::load(file)?;
        g.container
            .iter()
            .map(|m| -> Result<Member> {
                let app = App::find(None, Some(&m.id), g.runc_root.clone())?;
                let hold = match (&g.haproxy, &m.haproxy_server) {
                    (Some(sock), Some(server)) => Some(Hold::new(sock.clone(), server)?),
                    _ => None,
                };
                Ok((app, hold, m.haproxy_addr.clone()))
            })
            .collect::<Result<_>>()?
    } else if a.app.runc.len() > 1 {
        if a.haproxy.is_some() {
            bail!(
                "--haproxy names one application's server; for a group, name each container's in a \
                 --group file"
            );
        }
        a.app
            .runc
            .iter()
            .map(|id| {
                Ok((
                    App::find(None, Some(id), a.app.runc_root.clone())?,
                    None,
                    None,
                ))
            })
            .collect::<Result<_>>()?
    } else {
        if a.app.pid.is_none() && a.app.runc.is_empty() {
            bail!("say what to move: --pid PID, --runc ID (repeatable) or --group FILE");
        }
        let hold = match (&a.haproxy, &a.haproxy_server) {
            (Some(sock), Some(server)) => Some(Hold::new(sock.clone(), server)?),
            _ => None,
        };
        vec![(
            App::find(
                a.app.pid,
                a.app.runc.first().map(String::as_str),
                a.app.runc_root.clone(),
            )?,
            hold,
            a.haproxy_addr.clone(),
        )]
    };
    let compress = a
        .compress
        .as_deref()
        .map(super::sync::parse_compress)
        .transpose()?;
    let client = a.remote.client_settings()?;
    let group = (members.len() > 1).then(|| Arc::new(Group::new(members.len())));
    let options = |(app, hold, hold_addr): Member, i: usize| Options {
        app,
        target: target.clone(),
        client: client.clone(),
        max_downtime: a.max_downtime,
        rounds: a.rounds,
        compress,
        images_dir: a.images_dir.clone().unwrap_or_else(default_images_dir),
        keep_images: a.keep_images,
        tcp: crate::migrate::calls::Tcp {
            established: a.tcp_established,
            close: a.tcp_close,
        },
        hold,
        hold_addr,
        lazy_restore: !a.no_lazy_restore,
        push: !a.no_push,
        quiet: out.quiet,
        group: group.clone().map(|g| (g, i)),
    };
    // Each member moves on a thread of its own (its own connection); a single one on this one.
    let results: Vec<_> = if members.len() == 1 {
        members
            .into_iter()
            .map(|m| migrate(&options(m, 0)))
            .collect()
    } else {
        std::thread::scope(|s| {
            let hs: Vec<_> = members
                .into_iter()
                .enumerate()
                .map(|(i, m)| {
                    let o = options(m, i);
                    s.spawn(move || migrate(&o))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("a migration thread panicked"))
                .collect()
        })
    };
    if let Some(path) = &a.report_json {
        let json = if results.len() == 1 {
            serde_json::to_string_pretty(&results[0].0)?
        } else {
            serde_json::to_string_pretty(&results.iter().map(|r| &r.0).collect::<Vec<_>>())?
        };
        if path.as_os_str() == "-" {
            println!("{json}");
        } else {
            std::fs::write(path, json + "\n")
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    if !out.quiet && a.report_json.as_deref() != Some(std::path::Path::new("-")) {
        for (tl, _) in &results {
            print!("{}", tl.table());
        }
        if results.len() > 1 {
            let worst = results
                .iter()
                .map(|(tl, _)| tl.downtime_ms)
                .fold(0.0, f64::max);
            println!(
                "group of {}: {}; longest downtime {worst:.0} ms",
                results.len(),
                if results.iter().all(|(_, r)| r.is_ok()) {
                    "all migrated"
                } else {
                    "not migrated"
                }
            );
        }
    }
    let mut errors = results
        .into_iter()
        .filter_map(|(tl, r)| r.err().map(|e| (tl, e)));
    match errors.next() {
        None => Ok(ExitCode::SUCCESS),
        Some((tl, e)) => {
            for (tl, e) in errors {
                eprintln!("hop: {}: {e:#}", tl.app);
            }
            Err(e.context(tl.app))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_the_help_says() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("800ms"), Ok(Duration::from_millis(800)));
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        for bad in ["", "s", "0s", "-1s", "1h", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
