//! Faults on a real link: two network namespaces joined by a veth pair (`scripts/netns.sh`),
//! `hop serve` in one, `hop sync` in the other, packets dropped with iptables in between.
//! Needs root.

#[macro_use]
mod util;

use std::ffi::OsStr;
use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};
use util::*;

/// Two namespaces `P-a` (10.77.0.1) and `P-b` (10.77.0.2), removed on drop.
struct Link {
    prefix: String,
}

fn netns_sh() -> String {
    format!("{}/../scripts/netns.sh", env!("CARGO_MANIFEST_DIR"))
}

impl Link {
    fn up(tag: &str) -> Link {
        Link::up_with(tag, &[])
    }

    /// With `netns.sh up`'s rate and round-trip arguments (the delay program built with the
    /// tests is used).
    fn up_with(tag: &str, shape: &[&str]) -> Link {
        let prefix = format!("hf{}{tag}", std::process::id() % 10000);
        let delay = std::path::Path::new(env!("CARGO_BIN_EXE_hop")).with_file_name("hop-netdelay");
        let mut cmd = Command::new("bash");
        cmd.args([&netns_sh(), "up", &prefix]).args(shape);
        if delay.exists() {
            cmd.env("HOP_NETDELAY", &delay);
        }
        let st = cmd.status().unwrap();
        assert!(st.success(), "cannot create namespaces (root needed)");
        Link { prefix }
    }

    fn a(&self) -> String {
        format!("{}-a", self.prefix)
    }

    fn b(&self) -> String {
        format!("{}-b", self.prefix)
    }

    /// Run iptables in the server's namespace.
    fn iptables(&self, args: &[&str]) {
        let st = Command::new("ip")
            .args(["netns", "exec", &self.b(), "iptables"])
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "iptables {args:?}");
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .args([&netns_sh(), "down", &self.prefix])
            .status();
    }
}

/// `hop sync` from the client namespace.
fn sync_in(link: &Link, c: &Client, args: &[&OsStr]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &link.a(),
        env!("CARGO_BIN_EXE_hop"),
        "sync",
    ])
    .env("XDG_CACHE_HOME", test_cache_home())
    .arg("--identity")
    .arg(&c.identity)
    .arg("--known-hosts")
    .arg(&c.known_hosts)
    .args(args);
    cmd
}

/// The two ends of a push across `link`: `src/big` holding `data` in a fresh directory, a
/// client, and `hop serve` in the server's namespace (bind them in this order, so that the
/// server stops before the directory goes).
struct Ends {
    d: Dir,
    c: Client,
    srv: Server,
    /// `src/`, as the push's source argument.
    src: String,
}

fn ends(link: &Link, data: &[u8]) -> Ends {
    let d = Dir::new();
    d.write("src/big", data);
    let c = Client::new(&d, "client");
    let srv = Server::start_at(&d, "server", &[&c], "10.77.0.2:0", Some(&link.b()));
    let src = format!("{}/", d.path("src").display());
    Ends { srv, c, d, src }
}

#[test]
fn random_packet_loss_slows_a_push_but_it_completes_intact() {
    let link = Link::up("l");
    let Ends { d, c, srv, src } = ends(&link, &noise(60, 24 << 20));
    d.write("src/small", b"small");
    // 3 % of the packets reaching the server are lost, both data and acknowledgements.
    for chain in ["INPUT", "OUTPUT"] {
        link.iptables(&[
            "-A",
            chain,
            "-p",
            "udp",
            "-m",
            "statistic",
            "--mode",
            "random",
            "--probability",
            "0.03",
            "-j",
            "DROP",
        ]);
    }
    ok(sync_in(
        &link,
        &c,
        &[
            OsStr::new("--accept-new"),
            OsStr::new(&src),
            OsStr::new(&srv.url("dst")),
        ],
    ));
    assert_same_tree(&d.path("src"), &srv.root.join("dst"));
}

/// Bytes received and sent by the server's interface so far.
fn link_bytes(link: &Link) -> u64 {
    let out = Command::new("bash")
        .args([&netns_sh(), "bytes", &link.prefix])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn a_burst_of_loss_on_a_full_long_window_does_not_end_the_connection() {
    // 100 ms of round trip and a lane window of 16 MiB: megabytes of one file in flight when
    // every other packet reaching the server is dropped for 300 ms. One stream holding that
    // window would hold thousands of gaps, which quinn refuses ("too many gaps in stream
    // buffer"); the lane's strands keep each stream's share small.
    let link = Link::up_with("g", &["none", "100"]);
    let data = noise(63, 128 << 20);
    let Ends { d: _d, c, srv, src } = ends(&link, &data);
    let mut child = sync_in(
        &link,
        &c,
        &[
            OsStr::new("--accept-new"),
            OsStr::new("--window"),
            OsStr::new("16777216"),
            OsStr::new(&src),
            OsStr::new(&srv.url("dst")),
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // Once the window has opened (24 MiB crossed), the burst.
    let t0 = Instant::now();
    while link_bytes(&link) < 24 << 20 && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let rule = [
        "INPUT",
        "-p",
        "udp",
        "-m",
        "statistic",
        "--mode",
        "nth",
        "--every",
        "2",
        "--packet",
        "0",
        "-j",
        "DROP",
    ];
    link.iptables(&[&["-I"], &rule[..]].concat());
    std::thread::sleep(Duration::from_millis(300));
    link.iptables(&[&["-D"], &rule[..]].concat());
    let (st, err) = finish_within(&mut child, Duration::from_secs(120));
    assert!(st.success(), "the burst ended the sync: {err}");
    assert_eq!(fs::read(srv.root.join("dst/big")).unwrap(), data);
}

#[test]
fn a_short_link_cut_is_ridden_out_and_a_long_one_fails_cleanly() {
    let link = Link::up("c");
    let data = noise(61, 96 << 20);
    let Ends { d, c, srv, src } = ends(&link, &data);
    let url = srv.url("dst");
    ok(sync_in(
        &link,
        &c,
        &[
            OsStr::new("--accept-new"),
            OsStr::new("-n"),
            OsStr::new(&src),
            OsStr::new(&url),
        ],
    ));

    // A 2 s cut in the middle of the transfer: QUIC retransmits, the sync completes.
    let mut child = sync_in(&link, &c, &[OsStr::new(&src), OsStr::new(&url)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    link.iptables(&["-I", "INPUT", "-p", "udp", "-j", "DROP"]);
    std::thread::sleep(Duration::from_secs(2));
    link.iptables(&["-D", "INPUT", "-p", "udp", "-j", "DROP"]);
    let st = child.wait().unwrap();
    assert!(st.success(), "a 2 s cut failed the sync");
    assert_eq!(fs::read(srv.root.join("dst/big")).unwrap(), data);

    // A cut longer than --timeout: a clear error within the timeout, no partial file.
    fs::write(d.path("src/big"), noise(62, 96 << 20)).unwrap();
    let mut child = sync_in(
        &link,
        &c,
        &[
            OsStr::new("--timeout"),
            OsStr::new("3"),
            OsStr::new(&src),
            OsStr::new(&url),
        ],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    link.iptables(&["-I", "INPUT", "-p", "udp", "-j", "DROP"]);
    let t0 = Instant::now();
    let (st, err) = finish_within(&mut child, Duration::from_secs(20));
    link.iptables(&["-D", "INPUT", "-p", "udp", "-j", "DROP"]);
    assert!(!st.success(), "96 MiB went through in 200 ms?");
    assert!(
        err.contains("timed out") || err.contains("stopped answering"),
        "{err}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    // Old or new, never a mix.
    let got = fs::read(srv.root.join("dst/big")).unwrap();
    assert!(
        got == data || got == noise(62, 96 << 20),
        "a mixed file after a cut"
    );
}
