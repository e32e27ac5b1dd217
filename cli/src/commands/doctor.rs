//! `hop doctor`: what a migration on this host needs, what is there, and how to fix the rest.

use super::Output;
use crate::checkpoint::criu::{Criu, MIN_VERSION};
use anyhow::Result;
use clap::Args;
use std::process::{Command, ExitCode};

/// Check this host for what `hop migrate` and `hop serve` need, with a fix for each gap.
///
/// Exit status 0 when everything a migration needs is there (warnings may remain), 1 otherwise.
#[derive(Args, Debug)]
pub struct DoctorArgs {}

struct Line {
    what: &'static str,
    ok: Option<bool>, // None: a warning, not required
    detail: String,
}

fn version_of(cmd: &str, arg: &str) -> Option<String> {
    let out = Command::new(cmd).arg(arg).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().next().map(|l| l.trim().to_string())
}

fn criu_feature(feature: &str) -> bool {
    Command::new("criu")
        .args(["check", "--feature", feature])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Free bytes on the filesystem holding `path`.
fn free_bytes(path: &str) -> Option<u64> {
    let out = Command::new("df")
        .args(["-B1", "--output=avail", path])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// Run `hop doctor`.
pub fn run(_a: DoctorArgs, _out: Output) -> Result<ExitCode> {
    let mut lines = Vec::new();
    let criu = Criu::find();
    match &criu {
        Ok(c) => lines.push(Line {
            what: "CRIU",
            ok: Some(true),
            detail: format!("{}.{}.{}", c.version.0, c.version.1, c.version.2),
        }),
        Err(e) => lines.push(Line {
            what: "CRIU",
            ok: Some(false),
            detail: format!("{e:#}"),
        }),
    }
    if let Ok(c) = &criu {
        lines.push(match c.check() {
            Ok(_) => Line {
                what: "criu check",
                ok: Some(true),
                detail: "Looks good".into(),
            },
            Err(e) => Line {
                what: "criu check",
                ok: Some(false),
                detail: format!("{e:#}"),
            },
        });
        lines.push(Line {
            what: "memory dirty tracking",
            ok: if criu_feature("mem_dirty_track") { Some(true) } else { None },
            detail: if criu_feature("mem_dirty_track") {
                "soft-dirty available: CRIU pre-dumps work".into()
            } else {
                "kernel has no soft-dirty tracking: every dump is full; hop's delta sync of successive dumps does the pre-copy".into()
            },
        });
        lines.push(Line {
            what: "userfaultfd (lazy pages)",
            ok: if criu_feature("uffd-noncoop") {
                Some(true)
            } else {
                None
            },
            detail: if criu_feature("uffd-noncoop") {
                "available (post-copy restore possible; needs fs.pipe-max-size >= 4 MiB)".into()
            } else {
                "not available: no post-copy restore".into()
            },
        });
    }
    for (what, cmd, arg, fix) in [
        ("runc", "runc", "--version", "apt-get install runc"),
        (
            "HAProxy",
            "haproxy",
            "-v",
            "apt-get install haproxy (hold-and-redirect needs 2.6+ with Lua)",
        ),
        (
            "rsync (baseline)",
            "rsync",
            "--version",
            "apt-get install rsync",
        ),
    ] {
        lines.push(match version_of(cmd, arg) {
            Some(v) => Line {
                what,
                ok: None,
                detail: v,
            },
            None => Line {
                what,
                ok: None,
                detail: format!("not found; {fix}"),
            },
        });
    }
    let vpn = ["wireguard-go", "boringtun-cli", "wg"]
        .iter()
        .filter(|c| {
            Command::new("sh")
                .args(["-c", &format!("command -v {c}")])
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .copied()
        .collect::<Vec<_>>();
    lines.push(Line {
        what: "VPN tooling",
        ok: None,
        detail: if vpn.is_empty() {
            "no WireGuard tools found (the kernel here has no WireGuard; a userspace one is needed)"
                .into()
        } else {
            vpn.join(", ")
        },
    });
    lines.push(match free_bytes("/var/tmp") {
        Some(b) => Line {
            what: "free disk for images (/var/tmp)",
            ok: Some(b > 1 << 30),
            detail: format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        },
        None => Line {
            what: "free disk for images (/var/tmp)",
            ok: None,
            detail: "unknown".into(),
        },
    });
    lines.push(Line {
        what: "root",
        ok: Some(unsafe { geteuid() } == 0),
        detail: "CRIU dumps and restores need root".into(),
    });
    let width = lines.iter().map(|l| l.what.len()).max().unwrap_or(0);
    let mut all_ok = true;
    for l in &lines {
        let tag = match l.ok {
            Some(true) => "ok  ",
            Some(false) => {
                all_ok = false;
                "FAIL"
            }
            None => "note",
        };
        println!("{tag}  {:width$}  {}", l.what, l.detail);
    }
    if !all_ok {
        println!(
            "\nA migration needs every line above marked ok. CRIU >= {}.{}: bash scripts/build-criu.sh",
            MIN_VERSION.0, MIN_VERSION.1
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

extern "C" {
    fn geteuid() -> u32;
}
