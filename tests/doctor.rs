//! End-to-end test of `hop doctor`: what it reports about this host must be the real state
//! (CRIU's version and features as CRIU itself reports them), and the checks of a peer (`hop
//! serve` on loopback) and of HAProxy's runtime socket (a real HAProxy) must tell the truth,
//! with the fix when something is wrong.

#[macro_use]
mod util;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use util::*;

/// `hop doctor` with `args`: its exit code and the table's lines as (tag, what, detail).
fn doctor(args: &[&str]) -> (i32, Vec<(String, String, String)>) {
    let mut c = hop();
    c.arg("doctor").args(args);
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let lines = text
        .lines()
        .filter_map(|l| {
            let (tag, rest) = l.split_once("  ")?;
            if !["ok", "FAIL", "note"].contains(&tag.trim()) {
                return None;
            }
            let rest = rest.trim_start();
            // Names and details are separated by two or more spaces.
            let (what, detail) = rest.split_once("  ")?;
            Some((
                tag.trim().to_string(),
                what.trim().to_string(),
                detail.trim().to_string(),
            ))
        })
        .collect();
    (out.status.code().unwrap_or(-1), lines)
}

fn line<'a>(lines: &'a [(String, String, String)], what: &str) -> &'a (String, String, String) {
    lines
        .iter()
        .find(|l| l.1 == what)
        .unwrap_or_else(|| panic!("no line {what:?} in {lines:#?}"))
}

/// What CRIU itself says about a feature.
fn criu_has(feature: &str) -> bool {
    Command::new("criu")
        .args(["check", "--feature", feature])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn doctor_reports_the_real_state_of_this_host_a_peer_and_haproxy() {
    let d = Dir::new();
    let c = Client::new(&d, "client");
    let stranger = Client::new(&d, "stranger");
    let srv = Server::start(&d, "peer", &[&c], 0);
    let peer = srv.url("");
    let peer = peer.trim_end_matches('/');

    // A real HAProxy with an admin socket.
    let sock = d.path("haproxy.sock");
    let cfg = d.write(
        "haproxy.cfg",
        format!(
            "global\n  stats socket {} mode 600 level admin\n",
            sock.display()
        )
        .as_bytes(),
    );
    let _haproxy = KillChild(
        Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("haproxy runs"),
    );
    let t = Instant::now();
    while !sock.exists() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }

    let (code, lines) = doctor(&[
        "--peer",
        peer,
        "--identity",
        c.identity.to_str().unwrap(),
        "--known-hosts",
        c.known_hosts.to_str().unwrap(),
        "--accept-new",
        "--haproxy",
        sock.to_str().unwrap(),
    ]);

    // CRIU: the version CRIU reports, and the features as `criu check --feature` finds them.
    let version = Command::new("criu").arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    let criu = line(&lines, "CRIU");
    assert_eq!(criu.0, "ok", "{criu:?}");
    assert!(
        version.contains(&format!("Version: {}", criu.2)),
        "doctor says CRIU {}, CRIU says {version}",
        criu.2
    );
    assert_eq!(line(&lines, "criu check").0, "ok");
    let dirty = line(&lines, "memory dirty tracking");
    if criu_has("mem_dirty_track") {
        assert_eq!(dirty.0, "ok", "{dirty:?}");
    } else {
        assert_eq!(dirty.0, "note", "{dirty:?}");
        assert!(dirty.2.contains("no soft-dirty"), "{dirty:?}");
    }
    let uffd = line(&lines, "userfaultfd (lazy pages)");
    assert_eq!(uffd.0 == "ok", criu_has("uffd-noncoop"), "{uffd:?}");

    // The peer: reachable with these keys, its CRIU, and the clocks (one host) agree.
    assert_eq!(
        line(&lines, "peer reachable (QUIC/UDP)").0,
        "ok",
        "{lines:#?}"
    );
    let peer_criu = line(&lines, "peer CRIU");
    assert_eq!(peer_criu.0, "ok", "{peer_criu:?}");
    assert!(peer_criu.2.starts_with(&criu.2), "{peer_criu:?}");
    let skew = line(&lines, "clock skew to peer");
    let ms: i64 = skew
        .2
        .trim_end_matches(" ms")
        .parse()
        .unwrap_or_else(|_| panic!("{skew:?}"));
    assert!(ms.abs() < 200, "one clock, skew {ms} ms");

    // HAProxy answers on its socket, with its version.
    let h = line(&lines, "HAProxy runtime socket");
    assert_eq!(h.0, "ok", "{h:?}");
    assert!(h.2.contains("HAProxy 2."), "{h:?}");
    let expected = if is_root() { 0 } else { 1 };
    assert_eq!(code, expected, "{lines:#?}");

    // A key the peer does not know, and a socket nobody serves: FAIL lines saying what to do,
    // and exit status 1.
    let (code, lines) = doctor(&[
        "--peer",
        peer,
        "--identity",
        stranger.identity.to_str().unwrap(),
        "--known-hosts",
        c.known_hosts.to_str().unwrap(),
        "--haproxy",
        d.path("nobody.sock").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    let p = line(&lines, "peer reachable (QUIC/UDP)");
    assert_eq!(p.0, "FAIL");
    assert!(
        p.2.contains(&stranger.fingerprint) && p.2.contains("authorized-keys"),
        "{p:?}"
    );
    let h = line(&lines, "HAProxy runtime socket");
    assert_eq!(h.0, "FAIL");
    assert!(
        h.2.contains("stats socket") && h.2.contains("nobody.sock"),
        "{h:?}"
    );

    // No peer at all on that port.
    let (code, lines) = doctor(&[
        "--peer",
        "quic://127.0.0.1:9",
        "--identity",
        c.identity.to_str().unwrap(),
        "--known-hosts",
        c.known_hosts.to_str().unwrap(),
        "--timeout",
        "2",
    ]);
    assert_eq!(code, 1);
    let p = line(&lines, "peer reachable (QUIC/UDP)");
    assert_eq!(p.0, "FAIL");
    assert!(p.2.contains("UDP port 9"), "{p:?}");
}
