//! Defaults from configuration files, for the options of `hop sync`: `/etc/hop/config.toml`,
//! then `~/.config/hop/config.toml` (or `$HOP_CONFIG`), each overriding the one before; the
//! command line wins over both.
//!
//! ```toml
//! [sync]
//! identity = "/etc/hop/identity"
//! known_hosts = "/etc/hop/known_hosts"
//! compress = "zstd:3"
//! streams = 4
//! timeout = 30
//! window = 33554432
//! congestion = "cubic"
//! chunk_avg = 4096
//! rsh = "ssh -p 2222"
//! remote_hop = "/usr/local/bin/hop"
//! ```

use crate::commands::sync::SyncArgs;
use anyhow::{Context, Result};
use clap::parser::ValueSource;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The `[sync]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncDefaults {
    identity: Option<PathBuf>,
    known_hosts: Option<PathBuf>,
    compress: Option<String>,
    streams: Option<usize>,
    timeout: Option<u64>,
    window: Option<u64>,
    congestion: Option<String>,
    chunk_avg: Option<u32>,
    chunk_min: Option<u32>,
    chunk_max: Option<u32>,
    rsh: Option<String>,
    remote_hop: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    sync: SyncDefaults,
}

/// The configuration files that apply, lowest priority first.
fn files() -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from("/etc/hop/config.toml")];
    match std::env::var_os("HOP_CONFIG") {
        Some(p) => v.push(PathBuf::from(p)),
        None => v.push(crate::identity::config_dir().join("config.toml")),
    }
    v
}

fn read(path: &Path) -> Result<Option<SyncDefaults>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        // Another user's home (HOME kept across a user switch): not ours to read.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            tracing::warn!("ignoring {}: {e}", path.display());
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let f: File = toml::from_str(&text).with_context(|| format!("in {}", path.display()))?;
    Ok(Some(f.sync))
}

/// Fill the options of `a` that were not given on the command line from the config files.
pub fn apply(a: &mut SyncArgs, m: Option<&clap::ArgMatches>) -> Result<()> {
    let given = |id: &str| m.and_then(|m| m.value_source(id)) == Some(ValueSource::CommandLine);
    for path in files() {
        let Some(d) = read(&path)? else { continue };
        macro_rules! set {
            ($field:ident => $place:expr) => {
                if let Some(v) = d.$field {
                    if !given(stringify!($field)) {
                        $place = v.into();
                    }
                }
            };
            ($field:ident) => {
                set!($field => a.$field)
            };
        }
        set!(identity => a.remote.identity);
        set!(known_hosts => a.remote.known_hosts);
        set!(compress);
        set!(streams => a.remote.streams);
        set!(timeout => a.remote.timeout);
        set!(window => a.remote.window);
        if let Some(v) = &d.congestion {
            if !given("congestion") {
                a.remote.congestion = v
                    .parse()
                    .with_context(|| format!("congestion in {}", path.display()))?;
            }
        }
        set!(chunk_avg);
        set!(chunk_min);
        set!(chunk_max);
        set!(rsh);
        set!(remote_hop);
    }
    Ok(())
}
