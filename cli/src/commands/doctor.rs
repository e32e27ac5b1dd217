//! `hop doctor`: what a migration on this host needs, what is there, and how to fix the rest.

use super::remote::RemoteArgs;
use super::Output;
use crate::checkpoint::criu::{Criu, MIN_VERSION};
use crate::migrate::calls::{unix_ms, Call, Checked};
use anyhow::{bail, Result};
use clap::Args;
use hop_engine::net::{Link, RemotePath};
use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// Check this host for what `hop migrate` and `hop serve` need, with a fix for each gap.
///
/// Exit status 0 when everything a migration needs is there (warnings may remain), 1 otherwise.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  hop doctor
  hop doctor --peer quic://10.99.0.2:7443 --haproxy /run/haproxy/admin.sock")]
pub struct DoctorArgs {
    /// Also check the target of a migration, quic://HOST[:PORT] running `hop serve`: reachable
    /// over UDP with these keys, its CRIU, root, free space, and the skew between the clocks.
    #[arg(long, value_name = "URL")]
    pub peer: Option<String>,
    /// Also check HAProxy's runtime socket (the one `hop migrate --haproxy` would drive).
    #[arg(long, value_name = "SOCKET")]
    pub haproxy: Option<PathBuf>,
    /// Keys and transport for --peer.
    #[command(flatten)]
    pub remote: RemoteArgs,
}

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

/// Clock skew worth a warning (timelines of both hosts are compared; certificates have dates).
const SKEW_WARN_MS: i64 = 1000;

/// The lines about the target at `url`.
fn peer_lines(url: &str, remote: &RemoteArgs, local_criu: Option<&Criu>) -> Vec<Line> {
    let what = "peer reachable (QUIC/UDP)";
    let fail = |detail: String| {
        vec![Line {
            what,
            ok: Some(false),
            detail,
        }]
    };
    let target = match RemotePath::parse(url) {
        Some(Ok(t)) => t,
        _ => return fail(format!("{url}: the peer must be quic://HOST[:PORT]")),
    };
    let settings = match remote.client_settings() {
        Ok(s) => s,
        Err(e) => return fail(format!("{e:#}")),
    };
    let mut link = match Link::connect(&target, &settings) {
        Ok(l) => l,
        Err(e) => {
            return fail(format!(
                "{e}; is `hop serve` running there, is UDP port {} open, and is this host's key in its --authorized-keys?",
                target.port
            ))
        }
    };
    let sent = unix_ms();
    let answer: Result<Checked> = Call::Check.send(&mut link);
    // The network's round trip (QUIC's estimate), without the peer's checks.
    let rtt = link.rtt();
    link.close();
    let c = match answer {
        Ok(c) => c,
        Err(e) => {
            let refused = e
                .chain()
                .any(|c| matches!(c.downcast_ref(), Some(hop_engine::Error::Trust(_))));
            return fail(if refused {
                format!("{e:#}")
            } else {
                format!(
                    "connected, but the agent did not answer: {e:#} (is it an older hop, or `hop serve --no-migrate`?)"
                )
            });
        }
    };
    let mut lines = vec![Line {
        what,
        ok: Some(true),
        detail: format!(
            "{} ({}), round trip {:.1} ms",
            target.host_port(),
            c.host,
            rtt.as_secs_f64() * 1000.0
        ),
    }];
    lines.push(match (&c.criu, local_criu) {
        (Some(v), Some(l)) => {
            let same = v.split('.').next() == Some(&l.version.0.to_string());
            Line {
                what: "peer CRIU",
                ok: Some(same),
                detail: if same {
                    format!("{v}, `criu check` passes there")
                } else {
                    format!(
                        "{v} there, {}.{}.{} here: install the same major version on both",
                        l.version.0, l.version.1, l.version.2
                    )
                },
            }
        }
        (Some(v), None) => Line {
            what: "peer CRIU",
            ok: Some(true),
            detail: format!("{v}, `criu check` passes there"),
        },
        (None, _) => Line {
            what: "peer CRIU",
            ok: Some(false),
            detail: c
                .criu_problem
                .clone()
                .unwrap_or_else(|| "no CRIU there; bash scripts/build-criu.sh".into()),
        },
    });
    lines.push(Line {
        what: "peer runs as root",
        ok: Some(c.root),
        detail: if c.root {
            "restores possible".into()
        } else {
            "`hop serve` there is not root: restores need root".into()
        },
    });
    lines.push(Line {
        what: "peer free space (its --root)",
        ok: Some(c.free_bytes > 1 << 30),
        detail: format!("{:.1} GiB", c.free_bytes as f64 / (1u64 << 30) as f64),
    });
    if c.unix_ms > 0 {
        // The peer read its clock about half a round trip after we read ours.
        let skew = c.unix_ms as i64 - (sent as i64 + rtt.as_millis() as i64 / 2);
        lines.push(Line {
            what: "clock skew to peer",
            ok: if skew.abs() < SKEW_WARN_MS {
                Some(true)
            } else {
                None
            },
            detail: if skew.abs() < SKEW_WARN_MS {
                format!("{skew:+} ms")
            } else {
                format!(
                    "{skew:+} ms: timelines of the two hosts disagree; run NTP (chrony) on both"
                )
            },
        });
    }
    lines
}

/// The line about HAProxy's runtime socket.
fn haproxy_line(socket: &std::path::Path) -> Line {
    let what = "HAProxy runtime socket";
    match crate::migrate::haproxy::command(socket, "show info") {
        Ok(info) => match info.lines().find_map(|l| l.strip_prefix("Version: ")) {
            Some(v) => Line {
                what,
                ok: Some(true),
                detail: format!("{} answers (HAProxy {v})", socket.display()),
            },
            None => Line {
                what,
                ok: Some(false),
                detail: format!(
                    "{} answered without a version: is it HAProxy's stats socket with `level admin`?",
                    socket.display()
                ),
            },
        },
        Err(e) => Line {
            what,
            ok: Some(false),
            detail: format!(
                "{e:#}; HAProxy's global section needs `stats socket {} mode 600 level admin`",
                socket.display()
            ),
        },
    }
}

/// Run `hop doctor`.
pub fn run(a: DoctorArgs, _out: Output) -> Result<ExitCode> {
    if a.peer.as_deref().is_some_and(|p| !p.starts_with("quic://")) {
        bail!("--peer must be quic://HOST[:PORT]");
    }
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
                let userns = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd")
                    .is_ok_and(|v| v.trim() == "1");
                format!(
                    "available (post-copy restore possible; needs fs.pipe-max-size >= 4 MiB){}",
                    if userns {
                        ""
                    } else {
                        "; not for containers with a user namespace while \
                         vm.unprivileged_userfaultfd is 0 (sysctl -w vm.unprivileged_userfaultfd=1 \
                         allows it; hop restores those fully)"
                    }
                )
            } else {
                "not available: no post-copy restore".into()
            },
        });
    }
    for (what, cmd, arg, fix) in [
        ("runc", "runc", "--version", "apt-get install runc"),
        (
            "podman (not driven by hop)",
            "podman",
            "--version",
            "not needed: hop drives runc, which podman and docker use underneath",
        ),
        (
            "docker (not driven by hop)",
            "docker",
            "--version",
            "not needed: hop drives runc, which podman and docker use underneath",
        ),
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
    let images = crate::migrate::run::default_images_dir();
    let images_what = "free space for images (--images-dir default)";
    lines.push(match free_bytes(&images.to_string_lossy()) {
        Some(b) => Line {
            what: images_what,
            ok: Some(b > 1 << 30),
            detail: format!(
                "{:.1} GiB in {}{}",
                b as f64 / (1u64 << 30) as f64,
                images.display(),
                if b > 1 << 30 {
                    ""
                } else {
                    ": the images of a migration need about the application's memory; choose --images-dir"
                }
            ),
        },
        None => Line {
            what: images_what,
            ok: None,
            detail: format!("unknown for {}", images.display()),
        },
    });
    if let Some(sock) = &a.haproxy {
        lines.push(haproxy_line(sock));
    }
    if let Some(peer) = &a.peer {
        lines.extend(peer_lines(peer, &a.remote, criu.as_ref().ok()));
    }
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
