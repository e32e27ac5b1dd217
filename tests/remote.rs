//! End-to-end tests of remote syncs: real `hop serve` processes on loopback, real `hop sync`
//! clients, real keys.

#[macro_use]
mod util;

use std::ffi::OsStr;
use std::fs;
use std::time::{Duration, Instant};
use util::*;

fn s(p: &std::path::Path) -> &OsStr {
    p.as_os_str()
}

fn stats(mut c: std::process::Command) -> serde_json::Value {
    c.args(["--stats-json", "-"]);
    let out = ok(c);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad stats json {out:?}: {e}"))
}

/// Names in a directory tree that look like temporary files.
fn leftovers(root: &std::path::Path) -> Vec<String> {
    describe_tree(root)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.contains(".hop."))
        .collect()
}

#[test]
fn push_and_pull_round_trip_every_kind_with_and_without_zstd() {
    let d = Dir::new();
    let src = sample_tree(&d);
    let c = Client::new(&d, "client");
    let srv = Server::start(&d, "server", &[&c], 0);

    // Push: `src` without a trailing slash lands as root/src.
    let st = stats(c.sync(&[
        OsStr::new("--accept-new"),
        s(&src),
        OsStr::new(&srv.url("")),
    ]));
    assert_same_tree(&src, &srv.root.join("src"));
    assert_eq!(st["files_written"], 5, "{st}");
    let known = fs::read_to_string(&c.known_hosts).unwrap();
    assert_eq!(
        known.trim(),
        format!("127.0.0.1:{} {}", srv.port, srv.fingerprint)
    );

    // A 4 KiB edit in the middle of the big file: a small delta crosses the network.
    let mut big = fs::read(src.join("big.img")).unwrap();
    big[1 << 20..(1 << 20) + 4096].copy_from_slice(&noise(9, 4096));
    fs::write(src.join("big.img"), &big).unwrap();
    let st = stats(c.sync(&[s(&src), OsStr::new(&srv.url(""))]));
    assert_same_tree(&src, &srv.root.join("src"));
    let literal = st["bytes_literal"].as_u64().unwrap();
    assert!(literal > 0 && literal < 100_000, "{st}");
    assert!(st["bytes_wire"].as_u64().unwrap() < 400_000, "{st}");

    // Pull it back, raw and compressed: identical trees, fewer bytes with zstd.
    let raw = stats(c.sync(&[OsStr::new(&srv.url("src/")), s(&d.path("raw"))]));
    assert_same_tree(&src, &d.path("raw"));
    let z = stats(c.sync(&[
        OsStr::new("--compress"),
        OsStr::new("zstd:3"),
        OsStr::new(&srv.url("src")),
        s(&d.path("z/")),
    ]));
    assert_same_tree(&src, &d.path("z/src"));
    let (wr, wz) = (
        raw["bytes_wire"].as_u64().unwrap(),
        z["bytes_wire"].as_u64().unwrap(),
    );
    assert!(
        wz + 300_000 < wr,
        "zstd did not shrink the transfer: {wz} vs {wr}"
    );
    assert_eq!(raw["bytes_literal"], z["bytes_literal"]);

    // Excludes travel with a pull: the server does not send what they match.
    ok(c.sync(&[
        OsStr::new("--exclude"),
        OsStr::new("*.img"),
        OsStr::new(&srv.url("src/")),
        s(&d.path("noimg")),
    ]));
    assert!(d.path("noimg/text.txt").exists() && !d.path("noimg/big.img").exists());

    // Nothing changed: a re-run moves no data.
    let again = stats(c.sync(&[OsStr::new(&srv.url("src/")), s(&d.path("raw"))]));
    assert_eq!(again["bytes_literal"], 0, "{again}");
    assert_eq!(again["files_written"], 0, "{again}");
}

#[test]
fn a_push_draws_a_progress_bar_on_a_terminal_and_none_in_a_pipe() {
    let d = Dir::new();
    let src = d.write("src/big.img", &noise(21, 96 << 20));
    let c = Client::new(&d, "client");
    let srv = Server::start(&d, "server", &[&c], 0);
    let screen = on_a_terminal(&c.sync(&[
        OsStr::new("--accept-new"),
        OsStr::new("--progress"),
        s(&src),
        OsStr::new(&srv.url("first.img")),
    ]));
    assert_eq!(
        fs::read(&src).unwrap(),
        fs::read(srv.root.join("first.img")).unwrap()
    );
    // The bar, its figures (sent of wanted, rate) and the share reused, redrawn in place.
    assert!(screen.contains('\u{2588}'), "no bar drawn:\n{screen}");
    assert!(
        screen.contains("MiB/96.00 MiB"),
        "no sent/wanted figures:\n{screen}"
    );
    assert!(screen.contains("96.00 MiB scanned, 0% reused"), "{screen}");
    assert!(
        screen.contains("\r"),
        "the bar was not redrawn in place:\n{screen}"
    );
    // The report follows the bar.
    assert!(screen.contains("1 files, 96.0 MiB total"), "{screen}");

    // Not a terminal: no bar, and nothing but the report on stdout.
    let mut cmd = c.sync(&[
        OsStr::new("--progress"),
        s(&src),
        OsStr::new(&srv.url("second.img")),
    ]);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", describe(&cmd, &out));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains('\u{2588}') && !all.contains('\r'), "{all}");
    assert_eq!(
        fs::read(&src).unwrap(),
        fs::read(srv.root.join("second.img")).unwrap()
    );
}

/// Each congestion controller carries a push (BBR at the server too, for the pull back) to an
/// identical tree; an unknown one is refused before anything is sent.
#[test]
fn every_congestion_controller_moves_a_tree_and_an_unknown_one_is_refused() {
    let d = Dir::new();
    let src = sample_tree(&d);
    let c = Client::new(&d, "client");
    let srv = Server::start_with(
        &d,
        "server",
        &[&c],
        "127.0.0.1:0",
        &[],
        &["--congestion".into(), "bbr".into()],
    );
    for cc in ["cubic", "bbr", "newreno"] {
        ok(c.sync(&[
            OsStr::new("--accept-new"),
            OsStr::new("--congestion"),
            OsStr::new(cc),
            OsStr::new(&format!("{}/", src.display())),
            OsStr::new(&srv.url(cc)),
        ]));
        assert_same_tree(&src, &srv.root.join(cc));
    }
    ok(c.sync(&[OsStr::new(&srv.url("bbr/")), s(&d.path("back"))]));
    assert_same_tree(&src, &d.path("back"));
    let err = fails(
        c.sync(&[
            OsStr::new("--congestion"),
            OsStr::new("vegas"),
            s(&src),
            OsStr::new(&srv.url("none")),
        ]),
        2,
    );
    assert!(err.contains("cubic, bbr, newreno"), "{err}");
    assert!(!srv.root.join("none").exists());
}

#[test]
fn single_file_push_into_a_directory_and_delete() {
    let d = Dir::new();
    let c = Client::new(&d, "client");
    let srv = Server::start(&d, "server", &[&c], 0);
    fs::create_dir(srv.root.join("inbox")).unwrap();
    let f = d.write("one.bin", &noise(3, 100_000));
    ok(c.sync(&[
        OsStr::new("--accept-new"),
        s(&f),
        OsStr::new(&srv.url("inbox")),
    ]));
    assert_eq!(
        fs::read(srv.root.join("inbox/one.bin")).unwrap(),
        noise(3, 100_000)
    );

    // --delete removes what the source no longer has, remotely.
    let tree = d.mkdir("tree");
    d.write("tree/a", b"a");
    d.write("tree/b", b"b");
    ok(c.sync(&[s(&tree), OsStr::new(&srv.url(""))]));
    fs::remove_file(tree.join("b")).unwrap();
    ok(c.sync(&[OsStr::new("--delete"), s(&tree), OsStr::new(&srv.url(""))]));
    assert_same_tree(&tree, &srv.root.join("tree"));
}

#[test]
fn keys_are_checked_both_ways() {
    let d = Dir::new();
    let src = d.mkdir("src");
    d.write("src/f", b"data");
    let c = Client::new(&d, "client");
    let stranger = Client::new(&d, "stranger");
    let srv = Server::start(&d, "server", &[&c], 0);
    let url = srv.url("dst");

    // Unknown server, no --accept-new: refused, nothing recorded, nothing written.
    let err = fails(c.sync(&[s(&src), OsStr::new(&url)]), 1);
    assert!(
        err.contains("unknown server") && err.contains(&srv.fingerprint),
        "{err}"
    );
    assert!(!c.known_hosts.exists());
    assert!(!srv.root.join("dst").exists());

    // A recorded key that differs: refused loudly, even with --accept-new.
    let wrong = format!("sha256:{}", "0".repeat(64));
    fs::write(&c.known_hosts, format!("127.0.0.1:{} {wrong}\n", srv.port)).unwrap();
    let err = fails(
        c.sync(&[OsStr::new("--accept-new"), s(&src), OsStr::new(&url)]),
        1,
    );
    assert!(
        err.contains("SERVER KEY CHANGED") && err.contains(&wrong),
        "{err}"
    );
    assert!(!srv.root.join("dst").exists());

    // A client whose key the server does not list: refused before any file operation.
    let err = fails(
        stranger.sync(&[OsStr::new("--accept-new"), s(&src), OsStr::new(&url)]),
        1,
    );
    assert!(
        err.contains("refused this client's key") && err.contains(&stranger.fingerprint),
        "{err}"
    );
    assert!(!srv.root.join("dst").exists());
    assert!(srv.log().contains(&stranger.fingerprint), "{}", srv.log());

    // The right key, accepted once, works.
    fs::remove_file(&c.known_hosts).unwrap();
    ok(c.sync(&[OsStr::new("--accept-new"), s(&src), OsStr::new(&url)]));
    assert_same_tree(&src, &srv.root.join("dst/src"));
}

#[test]
fn remote_paths_are_confined_under_the_root() {
    let d = Dir::new();
    let src = d.mkdir("src");
    d.write("src/f", b"data");
    let c = Client::new(&d, "client");
    let srv = Server::start(&d, "server", &[&c], 0);
    let outside = d.mkdir("outside");
    std::os::unix::fs::symlink(&outside, srv.root.join("escape")).unwrap();
    ok(c.sync(&[
        OsStr::new("--accept-new"),
        s(&src),
        OsStr::new(&srv.url("ok")),
    ]));
    for bad in ["../x", "a/../../x", "escape/x", "escape"] {
        let err = fails(c.sync(&[s(&src), OsStr::new(&srv.url(bad))]), 1);
        assert!(
            err.contains("refused the request") && err.contains("unsafe path"),
            "{bad}: {err}"
        );
        let err = fails(
            c.sync(&[OsStr::new(&srv.url(bad)), s(&d.path("pulled"))]),
            1,
        );
        assert!(err.contains("unsafe path"), "{bad}: {err}");
    }
    assert!(
        fs::read_dir(&outside).unwrap().next().is_none(),
        "wrote outside the root"
    );
    assert!(!d.path("x").exists() && !d.path("server/x").exists());
}

/// Start `cmd` (a push to `srv`), kill the server `delay_ms` later, and wait for the client:
/// its exit status and standard error.
fn run_killing_server(
    mut cmd: std::process::Command,
    srv: &mut Server,
    delay_ms: u64,
) -> (std::process::ExitStatus, String) {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(delay_ms));
    srv.kill();
    finish_within(&mut child, Duration::from_secs(20))
}

#[test]
fn killed_server_mid_push_leaves_old_or_new_and_rerun_completes() {
    let d = Dir::new();
    let src = d.mkdir("src");
    let old = noise(10, 8 << 20);
    d.write("src/big", &old);
    d.write("src/small", b"small");
    let c = Client::new(&d, "client");
    let mut srv = Server::start(&d, "server", &[&c], 0);
    let url = srv.url("dst/");
    ok(c.sync(&[
        OsStr::new("--accept-new"),
        OsStr::new(&format!("{}/", src.display())),
        OsStr::new(&url),
    ]));
    let new = noise(11, 160 << 20);
    fs::write(src.join("big"), &new).unwrap();
    let (hold, hnew) = (blake3::hash(&old), blake3::hash(&new));

    for delay in [150u64, 600] {
        let cmd = c.sync(&[OsStr::new(&format!("{}/", src.display())), OsStr::new(&url)]);
        let (st, err) = run_killing_server(cmd, &mut srv, delay);
        let got = blake3::hash(&fs::read(srv.root.join("dst/big")).unwrap());
        assert!(
            got == hold || got == hnew,
            "dst/big is neither old nor new after a kill at {delay} ms"
        );
        eprintln!(
            "server killed at {delay} ms: client exit {st}: {}",
            err.trim()
        );
        if !st.success() {
            assert!(err.contains("hop: error"), "no clear error: {err}");
        }
        assert!(
            leftovers(&srv.root).is_empty(),
            "{:?}",
            leftovers(&srv.root)
        );
        srv = Server::start(&d, "server", &[&c], srv.port);
    }
    let st = stats(c.sync(&[OsStr::new(&format!("{}/", src.display())), OsStr::new(&url)]));
    assert_same_tree(&src, &srv.root.join("dst"));
    assert!(
        st["bytes_literal"].as_u64().unwrap() <= new.len() as u64,
        "{st}"
    );
}

#[test]
fn killed_client_mid_pull_then_rerun_completes() {
    let d = Dir::new();
    let c = Client::new(&d, "client");
    let srv = Server::start(&d, "server", &[&c], 0);
    let data = noise(12, 120 << 20);
    fs::create_dir(srv.root.join("tree")).unwrap();
    fs::write(srv.root.join("tree/big"), &data).unwrap();
    let dst = d.mkdir("dst");
    fs::write(dst.join("big"), b"old version").unwrap();
    let url = srv.url("tree/");
    let mut child = c
        .sync(&[OsStr::new("--accept-new"), OsStr::new(&url), s(&dst)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let _ = child.kill();
    let _ = child.wait();
    let got = fs::read(dst.join("big")).unwrap();
    assert!(
        got == b"old version" || got == data,
        "half-written file after a kill"
    );
    assert!(leftovers(&dst).is_empty(), "{:?}", leftovers(&dst));
    // The server survived and serves the re-run.
    ok(c.sync(&[OsStr::new(&url), s(&dst)]));
    assert_same_tree(&srv.root.join("tree"), &dst);
}

#[test]
fn a_stopped_server_is_detected_by_the_timeout() {
    let d = Dir::new();
    let c = Client::new(&d, "client");
    let srv = Server::start(&d, "server", &[&c], 0);
    fs::create_dir(srv.root.join("tree")).unwrap();
    fs::write(srv.root.join("tree/small"), b"x").unwrap();
    fs::write(srv.root.join("tree/big"), noise(13, 200 << 20)).unwrap();
    let dst = d.mkdir("dst");
    ok(c.sync(&[
        OsStr::new("--accept-new"),
        OsStr::new(&srv.url("tree/small")),
        s(&dst),
    ]));
    let mut child = c
        .sync(&[
            OsStr::new("--timeout"),
            OsStr::new("2"),
            OsStr::new(&srv.url("tree/big")),
            s(&dst),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let pid = srv.child.id().to_string();
    ok_status(std::process::Command::new("kill").args(["-STOP", &pid]));
    let t0 = Instant::now();
    let (st, err) = finish_within(&mut child, Duration::from_secs(20));
    let waited = t0.elapsed();
    eprintln!("stopped server: client exit {st} after {waited:?}");
    ok_status(std::process::Command::new("kill").args(["-CONT", &pid]));
    if st.success() {
        // The whole file made it before the stop: then it must be intact.
        assert_eq!(fs::read(dst.join("big")).unwrap(), noise(13, 200 << 20));
    } else {
        assert!(
            err.contains("timed out") || err.contains("stopped answering"),
            "{err}"
        );
        assert!(waited < Duration::from_secs(8), "took {waited:?} to notice");
        assert!(!dst.join("big").exists(), "partial file left");
    }
    assert!(leftovers(&dst).is_empty());
}

fn ok_status(c: &mut std::process::Command) {
    assert!(c.status().unwrap().success(), "{c:?}");
}

/// Run `c` until it is not refused for a busy destination (a killed sender's session holds the
/// lock until the server's timeout notices it is gone); at most 12 s.
fn when_not_busy(make: impl Fn() -> std::process::Command) -> serde_json::Value {
    let t0 = Instant::now();
    loop {
        let mut c = make();
        c.args(["--stats-json", "-"]);
        let out = c.output().unwrap();
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            err.contains("another hop sync is writing") && t0.elapsed() < Duration::from_secs(12),
            "{err}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The sender (a pushing client) killed at several points of a large transfer: every file at
/// the destination is its complete old or new version, nothing temporary is left, and the
/// re-run sends exactly the files that had not arrived.
#[test]
fn a_sender_killed_at_several_points_leaves_old_or_new_and_the_rerun_sends_only_the_rest() {
    const N: u64 = 12;
    const SIZE: usize = 12 << 20;
    let d = Dir::new();
    let src = d.mkdir("src");
    for i in 0..N {
        d.write(&format!("src/f{i:02}"), &noise(i, 1000));
    }
    let c = Client::new(&d, "client");
    let srv = Server::start(&d, "server", &[&c], 0);
    let url = srv.url("dst/");
    ok(c.sync(&[
        OsStr::new("--accept-new"),
        OsStr::new(&format!("{}/", src.display())),
        OsStr::new(&url),
    ]));
    let old: Vec<_> = (0..N).map(|i| blake3::hash(&noise(i, 1000))).collect();
    let new: Vec<_> = (0..N)
        .map(|i| {
            let data = noise(100 + i, SIZE);
            fs::write(src.join(format!("f{i:02}")), &data).unwrap();
            blake3::hash(&data)
        })
        .collect();
    let arrived = || -> u64 {
        (0..N)
            .filter(|&i| {
                let got = blake3::hash(&fs::read(srv.root.join(format!("dst/f{i:02}"))).unwrap());
                assert!(
                    got == old[i as usize] || got == new[i as usize],
                    "dst/f{i:02} is neither old nor new"
                );
                got == new[i as usize]
            })
            .count() as u64
    };
    for delay in [80u64, 300, 700] {
        let mut child = c
            .sync(&[OsStr::new(&format!("{}/", src.display())), OsStr::new(&url)])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let _ = child.kill();
        let _ = child.wait();
        // Let the server notice and drop the session's temporary files.
        std::thread::sleep(Duration::from_millis(100));
        eprintln!("killed at {delay} ms: {} of {N} files new", arrived());
        assert!(
            leftovers(&srv.root).is_empty(),
            "{:?}",
            leftovers(&srv.root)
        );
    }
    let done = arrived();
    let st =
        when_not_busy(|| c.sync(&[OsStr::new(&format!("{}/", src.display())), OsStr::new(&url)]));
    assert_same_tree(&src, &srv.root.join("dst"));
    assert_eq!(
        st["bytes_literal"].as_u64().unwrap(),
        (N - done) * SIZE as u64,
        "the re-run sends the files that had not arrived, and only those: {st}"
    );
}

/// Two clients push different trees into one destination at the same time: never a mixture;
/// one of them is refused clearly (or waits its turn), and the destination is one whole tree.
#[test]
fn two_clients_pushing_into_one_destination_at_once_never_mix() {
    let d = Dir::new();
    let (a, b) = (Client::new(&d, "a"), Client::new(&d, "b"));
    let srv = Server::start(&d, "server", &[&a, &b], 0);
    for (name, seed) in [("ta", 1u64), ("tb", 2)] {
        for i in 0..4 {
            d.write(&format!("{name}/f{i}"), &noise(seed * 10 + i, 8 << 20));
        }
    }
    let url = srv.url("shared/");
    for c in [&a, &b] {
        // Trust the server first, so both pushes below start at once.
        ok(c.sync(&[
            OsStr::new("--accept-new"),
            s(&d.path("ta/f0")),
            OsStr::new(&srv.url("warm/")),
        ]));
    }
    for round in 0..3 {
        let spawn = |c: &Client, tree: &str| {
            c.sync(&[
                OsStr::new(&format!("{}/", d.path(tree).display())),
                OsStr::new(&url),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
        };
        let (mut pa, mut pb) = (spawn(&a, "ta"), spawn(&b, "tb"));
        let (sa, ea) = finish_within(&mut pa, Duration::from_secs(60));
        let (sb, eb) = finish_within(&mut pb, Duration::from_secs(60));
        assert!(sa.success() || sb.success(), "both failed:\n{ea}\n{eb}");
        for (st, err) in [(sa, &ea), (sb, &eb)] {
            if !st.success() {
                assert!(
                    err.contains("another hop sync is writing"),
                    "unclear refusal: {err}"
                );
            }
        }
        // Whichever finished last wrote the destination whole.
        let got = describe_tree(&srv.root.join("shared"));
        let (ta, tb) = (describe_tree(&d.path("ta")), describe_tree(&d.path("tb")));
        assert!(
            got == ta || got == tb,
            "round {round}: a mixture of both trees"
        );
        assert!(
            leftovers(&srv.root).is_empty(),
            "{:?}",
            leftovers(&srv.root)
        );
    }
}

/// Names Linux allows that are not UTF-8 (Latin-1 bytes), or hold a newline, a space or a
/// leading dash, survive a push and a pull byte for byte, as with rsync.
#[test]
fn odd_file_names_cross_byte_for_byte() {
    use std::os::unix::ffi::OsStrExt;
    let d = Dir::new();
    let src = d.mkdir("src");
    let names: [&[u8]; 4] = [b"caf\xe9", b"two\nlines", b"a name with spaces", b"-rf"];
    for (i, n) in names.iter().enumerate() {
        fs::write(src.join(OsStr::from_bytes(n)), noise(i as u64, 5000)).unwrap();
    }
    let c = Client::new(&d, "client");
    let srv = Server::start(&d, "server", &[&c], 0);
    ok(c.sync(&[
        OsStr::new("--accept-new"),
        OsStr::new(&format!("{}/", src.display())),
        OsStr::new(&srv.url("odd")),
    ]));
    assert_same_tree(&src, &srv.root.join("odd"));
    ok(c.sync(&[OsStr::new(&srv.url("odd/")), s(&d.path("back"))]));
    for (i, n) in names.iter().enumerate() {
        assert_eq!(
            fs::read(d.path("back").join(OsStr::from_bytes(n))).unwrap(),
            noise(i as u64, 5000)
        );
    }
}

/// With zstd, the chunks a stream carries form one zstd stream: a file compresses with the files
/// sent before it. 300 small files share most of their (random, so alone incompressible) bytes
/// but differ every 1,000 bytes, so no chunk of one is a chunk of another: only the stream's
/// history can make them small. Pushed and pulled, byte for byte.
#[test]
fn small_files_compress_with_the_ones_sent_before_them() {
    let d = Dir::new();
    let src = d.mkdir("src");
    let base = noise(77, 12_000);
    for i in 0..300u32 {
        let mut f = base.clone();
        for k in (0..f.len()).step_by(1000) {
            f[k..k + 4].copy_from_slice(&i.to_le_bytes());
        }
        fs::write(src.join(format!("f{i:03}")), f).unwrap();
    }
    let total = 300 * base.len() as u64;
    let c = Client::new(&d, "client");
    let srv = Server::start(&d, "server", &[&c], 0);
    let push = stats(c.sync(&[
        OsStr::new("--accept-new"),
        OsStr::new("--compress"),
        OsStr::new("zstd"),
        OsStr::new(&format!("{}/", src.display())),
        OsStr::new(&srv.url("small")),
    ]));
    assert_same_tree(&src, &srv.root.join("small"));
    assert_eq!(push["files_written"], 300, "{push}");
    assert_eq!(push["bytes_literal"].as_u64(), Some(total), "{push}");
    let pull = stats(c.sync(&[
        OsStr::new("--compress"),
        OsStr::new("zstd"),
        OsStr::new(&srv.url("small/")),
        s(&d.path("back")),
    ]));
    assert_same_tree(&src, &d.path("back"));
    for st in [push, pull] {
        // Alone, each file would cost its 12,000 bytes (3.6 MB); in the stream a few dozen
        // streams' first files cost that, the rest a few hundred bytes each.
        let wire = st["bytes_wire"].as_u64().unwrap();
        assert!(
            wire < total / 4,
            "{wire} bytes on the wire for {total}: {st}"
        );
    }
}

/// A file the sender reads while it sends (at least 64 MiB, no list known beforehand) is
/// written by the receiver as its chunk list arrives, pushed and pulled, and `--stats` says so;
/// the copy is byte-identical and no temporary file is left.
#[test]
fn a_large_file_is_written_while_the_sender_still_reads_it() {
    let d = Dir::new();
    let mut data = noise(91, 40 << 20);
    data.extend(vec![0u8; 8 << 20]);
    data.extend(noise(92, 22 << 20));
    let f = d.write("big.img", &data);
    let c = Client::new(&d, "client");
    let srv = Server::start(&d, "server", &[&c], 0);
    fs::create_dir(srv.root.join("in")).unwrap();
    let push = stats(c.sync(&[
        OsStr::new("--accept-new"),
        s(&f),
        OsStr::new(&srv.url("in")),
    ]));
    assert!(
        fs::read(srv.root.join("in/big.img")).unwrap() == data,
        "pushed copy differs"
    );
    assert_eq!(push["files_streamed"], 1, "{push}");
    let pull = stats(c.sync(&[OsStr::new(&srv.url("in/")), s(&d.path("back"))]));
    assert!(
        fs::read(d.path("back/big.img")).unwrap() == data,
        "pulled copy differs"
    );
    assert_eq!(pull["files_streamed"], 1, "{pull}");
    assert!(leftovers(&srv.root).is_empty() && leftovers(&d.path("back")).is_empty());
    // A local sync writes it while it is read as well (a copy the sender's cache does not
    // know yet); the text statistics say so.
    let f2 = d.write("big2.img", &data);
    let again = d.path("again");
    let out = ok(c.sync(&[OsStr::new("--stats"), s(&f2), s(&again)]));
    assert!(
        out.contains("Number of files written while the sender read them: 1"),
        "{out}"
    );
    assert!(fs::read(&again).unwrap() == data, "local copy differs");
}

/// A new large file written while its list arrives never appears half-written: the server
/// killed part-way leaves no file at its name and no temporary file; the rerun completes.
#[test]
fn killed_server_mid_push_of_a_new_large_file_leaves_no_part_of_it() {
    let d = Dir::new();
    let src = d.mkdir("src");
    let data = noise(12, 160 << 20);
    d.write("src/new.img", &data);
    let c = Client::new(&d, "client");
    let mut srv = Server::start(&d, "server", &[&c], 0);
    let url = srv.url("dst/");
    let mut streamed_once = false;
    for (k, delay) in [150u64, 600].into_iter().enumerate() {
        let cmd = c.sync(&[
            OsStr::new("--accept-new"),
            OsStr::new(&format!("{}/", src.display())),
            OsStr::new(&url),
        ]);
        let (st, err) = run_killing_server(cmd, &mut srv, delay);
        eprintln!(
            "server killed at {delay} ms: client exit {st}: {}",
            err.trim()
        );
        match fs::read(srv.root.join("dst/new.img")) {
            // Finished before the kill: whole.
            Ok(got) => assert!(got == data, "a part of dst/new.img at {delay} ms"),
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
                assert!(!st.success(), "the client said it succeeded");
                assert!(err.contains("hop: error"), "no clear error: {err}");
                streamed_once = true;
            }
        }
        assert!(
            leftovers(&srv.root).is_empty(),
            "{:?}",
            leftovers(&srv.root)
        );
        srv = Server::start(&d, "server", &[&c], srv.port);
        if k == 0 {
            let _ = fs::remove_dir_all(srv.root.join("dst"));
        }
    }
    assert!(streamed_once, "no kill landed during the transfer");
    let _ = fs::remove_dir_all(srv.root.join("dst"));
    // (--accept-new again: a server is recorded only once it has answered a whole push.)
    let st = stats(c.sync(&[
        OsStr::new("--accept-new"),
        OsStr::new(&format!("{}/", src.display())),
        OsStr::new(&url),
    ]));
    assert!(fs::read(srv.root.join("dst/new.img")).unwrap() == data);
    // (Its list now comes from the sender's cache, filled by the interrupted runs.)
    assert_eq!(st["files_written"], 1, "{st}");
}
