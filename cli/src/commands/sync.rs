//! `hop sync SRC DEST`: make DEST identical to SRC, sending only what DEST lacks.

use super::ssh::{Session, SshSpec};
use super::{Output, EXIT_PARTIAL};
use crate::progress::Display;
use anyhow::{bail, Context, Result};
use clap::Args;
use hop_engine::filter::{read_rules_file, Rule, Rules};
use hop_engine::net::control::SyncSettings;
use hop_engine::net::{ClientSettings, RemotePath};
use hop_engine::{ChangeKind, ChunkParams, Progress, ReceiverOptions, Report, SenderOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Make DEST identical to SRC, copying only the data DEST does not already hold.
///
/// Like rsync, a SRC directory without a trailing slash is copied *into* DEST (as DEST/NAME);
/// with a trailing slash its contents are synced onto DEST.
///
/// Either side may be remote, `quic://HOST[:PORT]/PATH` (PATH under the root of a `hop serve`
/// there; port 7420 by default): hop then pushes or pulls over QUIC with TLS 1.3, both ends
/// authenticated by key. The server's key must be in --known-hosts (or accepted once with
/// --accept-new); this client's key must be in the server's authorized-keys file.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  hop sync -a photos/ /backup/photos          sync contents of photos into /backup/photos
  hop sync --delete build/ /srv/www           mirror, deleting what is gone from build/
  hop sync -n -v src/ dst/                    show what would change
  hop sync --basis /images/round1 round2/ dst/   reuse chunks from another tree
  hop sync --stats-json stats.json a/ b/      write figures as JSON
  hop sync --accept-new app/ quic://10.0.0.2/apps   push into apps/app on a hop serve
  hop sync --compress zstd quic://10.0.0.2/apps/app/ ./app   pull, compressed")]
pub struct SyncArgs {
    /// Source: a local path or quic://HOST[:PORT]/PATH.
    pub src: PathBuf,
    /// Destination: a local path or quic://HOST[:PORT]/PATH.
    pub dest: PathBuf,
    /// Archive mode: accepted for rsync habits; hop always keeps links, modes, times and (as root) owners.
    #[arg(short = 'a', long)]
    pub archive: bool,
    /// Show what would change, change nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Delete destination entries that are not in the source.
    #[arg(long)]
    pub delete: bool,
    /// Also take chunks from the files under DIR (like rsync --copy-dest). Repeatable.
    #[arg(long, value_name = "DIR")]
    pub basis: Vec<PathBuf>,
    /// Average chunk size in bytes, or with a unit: 64K, 1M (min = avg/2, max = avg*8 unless
    /// given).
    #[arg(long, value_name = "BYTES", value_parser = crate::units::parse_size_u32)]
    pub chunk_avg: Option<u32>,
    /// Minimum chunk size in bytes.
    #[arg(long, value_name = "BYTES", value_parser = crate::units::parse_size_u32)]
    pub chunk_min: Option<u32>,
    /// Maximum chunk size in bytes.
    #[arg(long, value_name = "BYTES", value_parser = crate::units::parse_size_u32)]
    pub chunk_max: Option<u32>,
    /// Exclude paths matching PATTERN (rsync's rules: no `/` matches a name at any depth,
    /// leading `/` anchors at the root, trailing `/` matches directories, `**` crosses `/`).
    /// Repeatable; --include, --exclude and --exclude-from are tried in command-line order and
    /// the first match decides. Excluded destination paths are kept by --delete.
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Include paths matching PATTERN (before a broader --exclude that follows it).
    #[arg(long, value_name = "PATTERN")]
    pub include: Vec<String>,
    /// Read exclude patterns from FILE, one per line (`#` comments; `+ PAT` includes, `- PAT`
    /// excludes).
    #[arg(long, value_name = "FILE")]
    pub exclude_from: Vec<PathBuf>,
    /// Cut CRIU memory images (pages-N.img) like any other file instead of on every 4 KiB page.
    #[arg(long)]
    pub no_page_chunks: bool,
    /// Send changed chunks whole instead of as patches of the changed 512-byte blocks.
    #[arg(long)]
    pub no_delta: bool,
    /// A local tree the destination is known to hold (e.g. the previous round's checkpoint
    /// images): changed chunks are sent compressed against their counterpart there (same path,
    /// same offset), so a page with a few changed bytes costs tens of bytes; and, to a remote
    /// destination, sent at once without waiting for its want-lists (one round trip less).
    #[arg(long, value_name = "DIR")]
    pub sender_basis: Option<PathBuf>,
    /// With --sender-basis, let the destination ask for every chunk (want-lists) instead of
    /// pushing what it lacks at once: for a destination whose copy may differ from the basis,
    /// or to measure what the push saves.
    #[arg(long, requires = "sender_basis")]
    pub no_push: bool,
    /// Compress chunk data: "zstd" or "zstd:LEVEL" (-7 to 19; default level 1). Over QUIC each
    /// lane is one zstd stream with a window of up to 64 MiB, so a file compresses with those
    /// sent before it (memory page images go in groups of pages); data that does not shrink
    /// soon goes raw.
    #[arg(long, value_name = "ALGO[:LEVEL]")]
    pub compress: Option<String>,
    /// Compress, like rsync -z: the same as --compress zstd (a --compress given too wins).
    #[arg(short = 'z')]
    pub z: bool,
    /// Update changed files in place instead of building a new copy beside them, when little of
    /// them changed (as rsync --inplace): much less I/O for large files; but an interrupted sync
    /// leaves such a file half-updated (it is rebuilt whole by the next run).
    #[arg(long)]
    pub inplace: bool,
    /// fsync each written file before it replaces the old one.
    #[arg(long)]
    pub fsync: bool,
    /// Write zero runs as data instead of holes.
    #[arg(long)]
    pub no_sparse: bool,
    /// Do not read or write chunk caches: the destination's (.NAME.hopidx beside DEST) and the
    /// source's (under ~/.cache/hop), which spare re-reading unchanged files.
    #[arg(long)]
    pub no_index_cache: bool,
    /// Print a summary table at the end, like rsync --stats.
    #[arg(long)]
    pub stats: bool,
    /// Write the figures as one JSON object to FILE ("-" for standard output).
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// Show a progress bar on a terminal.
    #[arg(long)]
    pub progress: bool,
    #[command(flatten)]
    pub remote: super::remote::RemoteArgs,
    /// ssh remotes (`[user@]host:PATH`): the command that reaches the host, like rsync's -e.
    #[arg(short = 'e', long, value_name = "COMMAND", default_value = "ssh")]
    pub rsh: String,
    /// ssh remotes: the hop binary on the remote host, like rsync's --rsync-path.
    #[arg(long, value_name = "PATH", default_value = "hop")]
    pub remote_hop: String,
}

pub fn parse_compress(s: &str) -> Result<i32> {
    let (algo, level) = s.split_once(':').unwrap_or((s, "1"));
    if algo != "zstd" {
        bail!("unknown compression {algo:?}: use zstd or zstd:LEVEL");
    }
    let level: i32 = level
        .parse()
        .with_context(|| format!("bad zstd level {level:?}"))?;
    if !(-7..=19).contains(&level) {
        bail!("zstd level {level} out of range (-7..=19)");
    }
    Ok(level)
}

fn chunk_params(a: &SyncArgs) -> Result<ChunkParams> {
    let base = match a.chunk_avg {
        Some(avg) => ChunkParams::from_avg(avg)?,
        None => ChunkParams::default(),
    };
    Ok(ChunkParams::new(
        a.chunk_min.unwrap_or(base.min),
        a.chunk_avg.unwrap_or(base.avg),
        a.chunk_max.unwrap_or(base.max),
    )?
    .with_pages(!a.no_page_chunks))
}

/// Which side of a sync is remote.
enum Sides {
    Local,
    Push(Remote),
    Pull(Remote),
}

/// A remote side: a `hop serve` already running, or one to start over ssh.
enum Remote {
    Quic(RemotePath),
    Ssh(SshSpec),
}

fn sides(a: &SyncArgs) -> Result<Sides> {
    let parse = |p: &Path| -> Result<Option<Remote>> {
        let s = p.as_os_str().to_string_lossy();
        match RemotePath::parse(&s) {
            Some(r) => Ok(Some(Remote::Quic(r?))),
            None if s.contains("://") => {
                bail!("{s}: only quic://HOST[:PORT]/PATH remotes are supported")
            }
            None => Ok(SshSpec::parse(&s).map(Remote::Ssh)),
        }
    };
    match (parse(&a.src)?, parse(&a.dest)?) {
        (None, None) => Ok(Sides::Local),
        (None, Some(r)) => Ok(Sides::Push(r)),
        (Some(r), None) => Ok(Sides::Pull(r)),
        (Some(_), Some(_)) => bail!("both SRC and DEST are remote; one must be local"),
    }
}

/// Resolve rsync's trailing-slash rule into the two roots actually synced.
fn resolve_roots(src: &Path, dest: &Path) -> Result<(PathBuf, PathBuf)> {
    let s = src.as_os_str().to_string_lossy();
    let md = std::fs::symlink_metadata(src)
        .with_context(|| format!("cannot read source {}", src.display()))?;
    let name = src.file_name().map(PathBuf::from);
    let into_dest = if md.is_dir() {
        !s.ends_with('/') && name.is_some()
    } else {
        dest.to_string_lossy().ends_with('/') || dest.is_dir()
    };
    let dest = match (into_dest, name) {
        (true, Some(n)) => dest.join(n),
        _ => dest.to_path_buf(),
    };
    Ok((src.to_path_buf(), dest))
}

/// A push or pull; returns the report.
fn run_remote(
    a: &SyncArgs,
    sides: Sides,
    params: ChunkParams,
    compress: Option<i32>,
    rules: Vec<Rule>,
    progress: Arc<Progress>,
) -> Result<Report> {
    if !a.basis.is_empty() && matches!(sides, Sides::Push(_)) {
        bail!("--basis names local directories; it works when the destination is local");
    }
    // An ssh remote gets its one-session server and throwaway keys here.
    let push = matches!(sides, Sides::Push(_));
    let (sides, cfg, session) = match sides {
        Sides::Push(Remote::Ssh(spec)) | Sides::Pull(Remote::Ssh(spec)) => {
            let s = Session::start(&spec, &a.rsh, &a.remote_hop, a.remote.net_options())?;
            let r = s.remote.clone();
            let cfg = s.cfg.clone();
            (
                if push {
                    Sides::Push(Remote::Quic(r))
                } else {
                    Sides::Pull(Remote::Quic(r))
                },
                cfg,
                Some(s),
            )
        }
        other => (other, a.remote.client_settings()?, None),
    };
    let r = run_quic(a, sides, cfg, params, compress, rules, progress);
    if let Some(s) = session {
        s.finish();
    }
    r
}

/// A push or pull to a running `hop serve`.
fn run_quic(
    a: &SyncArgs,
    sides: Sides,
    cfg: ClientSettings,
    params: ChunkParams,
    compress: Option<i32>,
    rules: Vec<Rule>,
    progress: Arc<Progress>,
) -> Result<Report> {
    let settings = SyncSettings {
        params,
        compress,
        delete: a.delete,
        dry_run: a.dry_run,
        fsync: a.fsync,
        sparse: !a.no_sparse,
        no_index_cache: a.no_index_cache,
        streams: cfg.net.streams as u32,
        delta: !a.no_delta,
        rules: rules.clone(),
        inplace: a.inplace,
        push: !a.no_push,
    };
    match sides {
        Sides::Push(Remote::Quic(mut remote)) => {
            let s = a.src.as_os_str().to_string_lossy();
            let md = std::fs::symlink_metadata(&a.src)
                .with_context(|| format!("cannot read source {}", a.src.display()))?;
            if md.is_dir() && !s.ends_with('/') {
                if let Some(name) = a.src.file_name() {
                    let base = remote.path.trim_end_matches('/');
                    let name = name.to_string_lossy();
                    remote.path = if base.is_empty() {
                        name.into_owned()
                    } else {
                        format!("{base}/{name}")
                    };
                }
            }
            let cache = if a.no_index_cache {
                None
            } else {
                hop_engine::index::source_cache_path(&a.src)
            };
            hop_engine::net::push(
                &a.src,
                &remote,
                settings,
                cache,
                a.sender_basis.clone(),
                &cfg,
                progress,
            )
            .with_context(|| format!("push {} -> {}", a.src.display(), a.dest.display()))
        }
        Sides::Pull(Remote::Quic(remote)) => {
            let ropts = ReceiverOptions {
                params,
                delete: a.delete,
                basis: a.basis.clone(),
                dry_run: a.dry_run,
                fsync: a.fsync,
                sparse: !a.no_sparse,
                index_cache: None,
                no_index_cache: a.no_index_cache,
                delta: !a.no_delta,
                rules: compiled(&rules)?,
                inplace: a.inplace,
            };
            hop_engine::net::pull(&remote, &a.dest, settings, ropts, &cfg, progress)
                .with_context(|| format!("pull {} -> {}", a.src.display(), a.dest.display()))
        }
        _ => unreachable!("local syncs and ssh remotes do not come here"),
    }
}

/// The include/exclude rules in command-line order.
fn rules_in_order(a: &SyncArgs, m: Option<&clap::ArgMatches>) -> Result<Vec<Rule>> {
    let at = |id: &str| -> Vec<usize> {
        m.and_then(|m| m.indices_of(id))
            .map(|i| i.collect())
            .unwrap_or_default()
    };
    let mut ordered: Vec<(usize, Vec<Rule>)> = Vec::new();
    for (pattern, i) in a.exclude.iter().zip(at("exclude")) {
        ordered.push((
            i,
            vec![Rule {
                include: false,
                pattern: pattern.clone(),
            }],
        ));
    }
    for (pattern, i) in a.include.iter().zip(at("include")) {
        ordered.push((
            i,
            vec![Rule {
                include: true,
                pattern: pattern.clone(),
            }],
        ));
    }
    for (file, i) in a.exclude_from.iter().zip(at("exclude_from")) {
        ordered.push((i, read_rules_file(file, false)?));
    }
    ordered.sort_by_key(|(i, _)| *i);
    let rules: Vec<Rule> = ordered.into_iter().flat_map(|(_, r)| r).collect();
    Rules::new(&rules)?;
    Ok(rules)
}

fn compiled(rules: &[Rule]) -> Result<Option<Arc<Rules>>> {
    Ok(if rules.is_empty() {
        None
    } else {
        Some(Arc::new(Rules::new(rules)?))
    })
}

/// Run `hop sync`.
pub fn run(mut a: SyncArgs, m: Option<&clap::ArgMatches>, out: Output) -> Result<ExitCode> {
    crate::config::apply(&mut a, m)?;
    let rules = rules_in_order(&a, m)?;
    let params = chunk_params(&a)?;
    if a.z && a.compress.is_none() {
        a.compress = Some("zstd".into());
    }
    let compress = a.compress.as_deref().map(parse_compress).transpose()?;
    let sides = sides(&a)?;
    if !matches!(sides, Sides::Local) {
        let progress = Arc::new(Progress::default());
        let display = Display::start(progress.clone(), a.progress && !out.quiet);
        let report = run_remote(&a, sides, params, compress, rules, progress)?;
        drop(display);
        return finish(&report, &a, out);
    }
    let (src, dest) = resolve_roots(&a.src, &a.dest)?;
    if dest.starts_with(&src) && src.is_dir() && dest != src {
        bail!(
            "destination {} lies inside the source {}",
            dest.display(),
            src.display()
        );
    }
    let cache = if a.no_index_cache {
        None
    } else {
        hop_engine::index::source_cache_path(&src)
    };
    let sopts = SenderOptions {
        params,
        compress,
        cache,
        basis: a.sender_basis.clone(),
        rules: compiled(&rules)?,
        // Both halves run here: nothing to push ahead.
        push: false,
        known: None,
    };
    let ropts = ReceiverOptions {
        params,
        delete: a.delete,
        basis: a.basis.clone(),
        dry_run: a.dry_run,
        fsync: a.fsync,
        sparse: !a.no_sparse,
        index_cache: None,
        no_index_cache: a.no_index_cache,
        delta: !a.no_delta,
        rules: compiled(&rules)?,
        inplace: a.inplace,
    };
    let progress = Arc::new(Progress::default());
    let display = Display::start(progress.clone(), a.progress && !out.quiet);
    let report = hop_engine::sync_local(&src, &dest, None, sopts, ropts, &progress)
        .with_context(|| format!("sync {} -> {}", src.display(), dest.display()))?;
    drop(display);
    finish(&report, &a, out)
}

/// Print the report and choose the exit code.
fn finish(report: &Report, a: &SyncArgs, out: Output) -> Result<ExitCode> {
    let json_to_stdout = a.stats_json.as_deref() == Some(Path::new("-"));
    let quiet_stdout = out.quiet || json_to_stdout;
    print_report(report, a, quiet_stdout, out)?;
    if let Some(path) = &a.stats_json {
        let json = serde_json::to_string(&report.stats)?;
        if json_to_stdout {
            println!("{json}");
        } else {
            std::fs::write(path, json + "\n")
                .with_context(|| format!("cannot write stats to {}", path.display()))?;
        }
    }
    if report.errors.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "hop: {} error(s); the entries above were not synced, everything else was (exit {EXIT_PARTIAL})",
            report.errors.len()
        );
        Ok(ExitCode::from(EXIT_PARTIAL))
    }
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

fn print_report(r: &Report, a: &SyncArgs, quiet_stdout: bool, out: Output) -> Result<()> {
    for e in &r.errors {
        eprintln!("hop: error: {e}");
    }
    for (p, what) in &r.skipped {
        eprintln!("hop: skipping {what} {}", p.display());
    }
    if quiet_stdout {
        return Ok(());
    }
    let mut o = std::io::stdout().lock();
    if a.dry_run || out.verbose > 0 {
        for c in &r.changes {
            let (tag, extra) = match &c.kind {
                ChangeKind::NewFile(n) => ("new file ", format!(" ({} to send)", human(*n))),
                ChangeKind::UpdatedFile(n) => ("updated  ", format!(" ({} to send)", human(*n))),
                ChangeKind::NewDir => ("new dir  ", String::new()),
                ChangeKind::Symlink => ("symlink  ", String::new()),
                ChangeKind::Metadata => ("metadata ", String::new()),
                ChangeKind::Deleted => ("deleting ", String::new()),
            };
            writeln!(o, "{tag}{}{extra}", c.path.display())?;
        }
    }
    let s = &r.stats;
    if a.stats {
        writeln!(o, "Number of files: {}", s.files)?;
        writeln!(o, "Number of files written: {}", s.files_written)?;
        writeln!(
            o,
            "Number of files written while the sender read them: {}",
            s.files_streamed
        )?;
        if s.fetches_alone > 0 {
            writeln!(
                o,
                "Requests fetched apart from their lane: {}",
                s.fetches_alone
            )?;
        }
        writeln!(o, "Number of files unchanged: {}", s.files_unchanged)?;
        writeln!(o, "Number of entries deleted: {}", s.entries_deleted)?;
        writeln!(o, "Total file size: {} bytes", s.bytes_total)?;
        writeln!(o, "Reused data: {} bytes", s.bytes_reused)?;
        writeln!(o, "Literal data: {} bytes", s.bytes_literal)?;
        writeln!(o, "Bytes on the wire: {} bytes", s.bytes_wire)?;
        writeln!(o, "Elapsed: {:.3} s", s.elapsed_ms as f64 / 1000.0)?;
    } else {
        let pct = if s.bytes_total > 0 {
            100.0 * s.bytes_literal as f64 / s.bytes_total as f64
        } else {
            0.0
        };
        writeln!(
            o,
            "{}{} files, {} total, {} sent ({pct:.1}%), {} on the wire, {:.2} s",
            if a.dry_run { "(dry run) " } else { "" },
            s.files,
            human(s.bytes_total),
            human(s.bytes_literal),
            human(s.bytes_wire),
            s.elapsed_ms as f64 / 1000.0
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_parsing() {
        assert_eq!(parse_compress("zstd").unwrap(), 1);
        assert_eq!(parse_compress("zstd:9").unwrap(), 9);
        assert!(parse_compress("gzip").is_err());
        assert!(parse_compress("zstd:99").is_err());
        assert!(parse_compress("zstd:x").is_err());
    }
}
