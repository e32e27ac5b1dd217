//! End-to-end tests of `hop migrate` with the real CRIU and runc: a process and a container
//! move to a `hop serve` target and keep their state; a failed restore at the target and a link
//! that dies during the final sync both leave the application running at the source with its
//! state, and a second migration then works. They need root.

#[macro_use]
mod util;

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use util::*;

/// A Python counter (`python` binary) holding `mib` MiB of memory, part of which it rewrites
/// on every tick (`noise`: with random bytes, so nothing compresses), writing its counter to
/// `file` every 50 ms (beside it, then renamed over it: a dump never finds it empty). Started as a session leader, run through `prefix` (e.g. `ip netns exec
/// NS`), and reaped by a thread as soon as it dies so that its PID is free for a restore.
fn counter_app(file: &Path, python: &str, mib: usize, noise: bool, prefix: &[&str]) -> u32 {
    let script = format!(
        "import os, time\n\
         buf = bytearray({mib} << 20)\n\
         for k in range(0, len(buf), 4096): buf[k] = 1\n\
         i = 0\n\
         while True:\n\
         \x20   open({tmp:?}, 'w').write(str(i))\n\
         \x20   os.replace({tmp:?}, {file:?})\n\
         \x20   off = (i * 64 * 4096) % len(buf)\n\
         \x20   buf[off:off + 64 * 4096] = {fill}\n\
         \x20   i += 1\n\
         \x20   time.sleep(0.05)\n",
        file = file.display().to_string(),
        tmp = format!("{}.tmp", file.display()),
        fill = if noise {
            "os.urandom(64 * 4096)"
        } else {
            "bytes([i % 256]) * (64 * 4096)"
        },
    );
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg("setsid");
            c
        }
        None => Command::new("setsid"),
    };
    let mut child = cmd
        .args([python, "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start python3");
    let pid = child.id();
    std::thread::spawn(move || child.wait());
    wait_for_value(file, Duration::from_secs(10));
    pid
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        !s.lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
    })
}

/// `hop migrate` with the client's keys, images under `d/images`, the timeline in
/// `d/timeline.json`.
fn migrate(d: &Dir, c: &Client, target: &str, args: &[&str]) -> Command {
    let mut cmd = hop();
    migrate_args(&mut cmd, d, c, target, args);
    cmd
}

fn migrate_args(cmd: &mut Command, d: &Dir, c: &Client, target: &str, args: &[&str]) {
    std::fs::create_dir_all(d.path("images")).unwrap();
    cmd.arg("migrate")
        .arg("--identity")
        .arg(&c.identity)
        .arg("--known-hosts")
        .arg(&c.known_hosts)
        .arg("--accept-new")
        .arg("--images-dir")
        .arg(d.path("images"))
        .arg("--report-json")
        .arg(d.path("timeline.json"))
        .args(args)
        .arg(target);
}

fn timeline(d: &Dir) -> serde_json::Value {
    let text = std::fs::read_to_string(d.path("timeline.json")).expect("timeline written");
    serde_json::from_str(&text).unwrap()
}

/// Nothing left under a directory (images cleaned up).
fn empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut r| r.next().is_none())
}

/// The counter continues from at least `from` (the state survived) and moves on.
fn continues(file: &Path, from: u64) {
    assert!(advances(file), "{} does not advance", file.display());
    let now = value(file).unwrap();
    assert!(
        now >= from,
        "counter {now} went back below {from}: restarted from scratch?"
    );
}

#[test]
fn a_process_moves_with_its_state_and_nothing_is_left_behind() {
    let d = Dir::new();
    let c = Client::new(&d, "client");
    let srv = Server::start(&d, "target", &[&c], 0);
    let file = d.path("count");
    let pid = counter_app(&file, "python3", 32, false, &[]);
    let _app = KillOnDrop(pid);
    let before = value(&file).unwrap();

    // Run at a terminal, as operators do: each phase shows live (a spinner while CRIU dumps, a
    // bar while images are synced), and the timeline follows.
    let out = on_a_terminal(&migrate(
        &d,
        &c,
        &srv.url(""),
        &["--pid", &pid.to_string(), "--max-downtime", "5s"],
    ));
    assert!(out.contains("migrated"), "{out}");
    for phase in [
        "round 1: dump",
        "round 1: sync",
        "final dump",
        "final sync",
        "restore",
    ] {
        assert!(
            out.contains(&format!(" {phase} ")),
            "phase {phase:?} not shown:\n{out}"
        );
    }
    // Same kernel: CRIU restored the same PID, now a child of the target's restore.
    assert!(alive(pid), "PID {pid} is not running after the migration");
    continues(&file, before);

    let tl = timeline(&d);
    assert_eq!(tl["outcome"], "migrated", "{tl}");
    let rounds = tl["rounds"].as_array().unwrap();
    assert!(
        rounds.len() >= 3,
        "expected pre-copy rounds then final: {tl}"
    );
    assert_eq!(rounds.last().unwrap()["round"], "final");
    let first = rounds[0]["bytes_sent"].as_u64().unwrap();
    let last = rounds.last().unwrap()["bytes_sent"].as_u64().unwrap();
    assert!(first > 1 << 20, "round 1 sent only {first} bytes: {tl}");
    // The memory barely changed between rounds: the final sync moves a fraction of round 1.
    assert!(last * 4 < first, "final round sent {last} of {first}: {tl}");
    let downtime = tl["downtime_ms"].as_f64().unwrap();
    assert!(downtime > 0.0 && downtime < tl["total_ms"].as_f64().unwrap());
    // Images are gone on both sides.
    assert!(empty(&d.path("images")), "source images left");
    assert!(empty(&srv.root.join(".hop/migrate")), "target images left");
    kill(pid);
}

#[test]
fn a_container_moves_to_the_target_and_back() {
    let d = Dir::new();
    let c = Client::new(&d, "client");
    let bundle = busybox_bundle(&d);
    let (runc_a, runc_b) = (d.mkdir("runc-a"), d.mkdir("runc-b"));
    let id = format!("hop-mig-{}", std::process::id());
    let _cleanup = RemoveContainers(vec![
        (runc_a.clone(), id.clone()),
        (runc_b.clone(), id.clone()),
    ]);
    let mut helper = run_container(&d, &runc_a, &bundle, &id);
    let counter = bundle.join("rootfs/tmp/counter");
    let serve = |name: &str, runc: &Path| {
        let extra = vec!["--runc-root".to_string(), runc.display().to_string()];
        Server::start_with(&d, name, &[&c], "127.0.0.1:0", &[], &extra)
    };
    let b = serve("host-b", &runc_b);
    let before = value(&counter).unwrap();
    ok(migrate(
        &d,
        &c,
        &b.url(""),
        &["--runc", &id, "--runc-root", runc_a.to_str().unwrap()],
    ));
    let _ = helper.wait();
    assert_eq!(
        runc_state(&runc_a, &id),
        None,
        "the source still lists the container"
    );
    assert_eq!(runc_state(&runc_b, &id).as_deref(), Some("running"));
    // The container's files moved too, and it counts on there.
    let at_b = b.root.join(format!("containers/{id}/rootfs/tmp/counter"));
    continues(&at_b, before);
    assert!(empty(&b.root.join(".hop/migrate")), "target images left");

    // And back to host A (a target there now).
    let a = serve("host-a", &runc_a);
    let before = value(&at_b).unwrap();
    ok(migrate(
        &d,
        &c,
        &a.url(""),
        &["--runc", &id, "--runc-root", runc_b.to_str().unwrap()],
    ));
    assert_eq!(runc_state(&runc_b, &id), None);
    assert_eq!(runc_state(&runc_a, &id).as_deref(), Some("running"));
    continues(
        &a.root.join(format!("containers/{id}/rootfs/tmp/counter")),
        before,
    );
    runc_remove(&runc_a, &id);
}

#[test]
fn a_failed_restore_at_the_target_rolls_back_and_a_second_migration_works() {
    let d = Dir::new();
    let c = Client::new(&d, "client");
    // The application runs a binary that the target does not have: in the target's own mount
    // namespace its directory is an empty tmpfs.
    let bin = d.mkdir("appbin");
    let python = bin.join("python3");
    std::fs::copy(std::fs::canonicalize("/usr/bin/python3").unwrap(), &python).unwrap();
    let hide = format!(
        "mount -t tmpfs none '{}' && exec \"$0\" \"$@\"",
        bin.display()
    );
    let prefix: Vec<String> = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        &hide,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let broken = Server::start_with(&d, "broken", &[&c], "127.0.0.1:0", &prefix, &[]);
    let file = d.path("count");
    let pid = counter_app(&file, python.to_str().unwrap(), 16, false, &[]);
    let _app = KillOnDrop(pid);

    let mut cmd = migrate(&d, &c, &broken.url(""), &["--pid", &pid.to_string()]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("restore at the target"), "{err}");
    assert!(err.contains("rolled back"), "{err}");
    let tl = timeline(&d);
    assert_eq!(tl["outcome"], "rolled back", "{tl}");
    // Back at the source with its state: the same PID, counting on from where it froze.
    let frozen_at = value(&file).unwrap();
    assert!(
        alive(pid),
        "the application is not running at the source: {err}"
    );
    continues(&file, frozen_at);
    assert!(empty(&d.path("images")), "source images left");
    assert!(
        empty(&broken.root.join(".hop/migrate")),
        "the target kept the failed migration's images"
    );

    // A second migration, to a target that works.
    let good = Server::start(&d, "good", &[&c], 0);
    let before = value(&file).unwrap();
    ok(migrate(&d, &c, &good.url(""), &["--pid", &pid.to_string()]));
    assert!(alive(pid));
    continues(&file, before);
    kill(pid);
}

/// Two namespaces joined by a veth capped at `rate`, removed on drop.
struct Netns {
    prefix: String,
}

impl Netns {
    fn up(tag: &str, rate: &str) -> Netns {
        // Unique per test: `cargo test` runs tests as threads of one process.
        let prefix = format!("hm{}{tag}", std::process::id() % 10000);
        let st = Command::new("bash")
            .arg(format!(
                "{}/../scripts/netns.sh",
                env!("CARGO_MANIFEST_DIR")
            ))
            .args(["up", &prefix, rate])
            .status()
            .unwrap();
        assert!(st.success(), "cannot create namespaces (root needed)");
        Netns { prefix }
    }
    fn ns(&self, side: &str) -> String {
        format!("{}-{side}", self.prefix)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(format!(
                "{}/../scripts/netns.sh",
                env!("CARGO_MANIFEST_DIR")
            ))
            .args(["down", &self.prefix])
            .status();
    }
}

#[test]
fn a_link_that_dies_during_the_final_sync_rolls_back_and_a_second_migration_works() {
    let net = Netns::up("l", "40mbit");
    let (a, b) = (net.ns("a"), net.ns("b"));
    let d = Dir::new();
    let c = Client::new(&d, "client");
    // nsenter switches the network namespace only: `ip netns exec` would also give each
    // process a mount namespace of its own, which CRIU would then have to dump.
    let enter = |ns: &str| vec!["nsenter".to_string(), format!("--net=/run/netns/{ns}")];
    let srv = Server::start_with(&d, "target", &[&c], "10.77.0.2:0", &enter(&b), &[]);
    let file = d.path("count");
    // 24 MiB of random bytes: about 5 s on the capped link.
    let in_a = enter(&a);
    let in_a: Vec<&str> = in_a.iter().map(String::as_str).collect();
    let pid = counter_app(&file, "python3", 24, true, &in_a);
    let _app = KillOnDrop(pid);
    {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{a}"))
            .arg(env!("CARGO_BIN_EXE_hop"))
            .env("XDG_CACHE_HOME", util::test_cache_home());
        migrate_args(
            &mut cmd,
            &d,
            &c,
            &srv.url(""),
            &["--pid", &pid.to_string(), "--rounds", "0", "--timeout", "2"],
        );
        let mut child = cmd
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let mut log = String::new();
        let t0 = Instant::now();
        // Cut the link a moment into the final sync.
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("no final dump");
            log += &line;
            log.push('\n');
            if line.contains("final dump") {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(800));
        let drop = |op: &str| {
            for chain in ["INPUT", "OUTPUT"] {
                let st = Command::new("ip")
                    .args([
                        "netns", "exec", &b, "iptables", op, chain, "-p", "udp", "-j", "DROP",
                    ])
                    .status()
                    .unwrap();
                assert!(st.success());
            }
        };
        drop("-A");
        let (st, _) = finish_within(&mut child, Duration::from_secs(30));
        log.extend(rx.try_iter().map(|l| l + "\n"));
        assert_eq!(st.code(), Some(1), "{log}");
        assert!(log.contains("final sync"), "{log}");
        assert!(log.contains("rolled back"), "{log}");
        assert!(t0.elapsed() < Duration::from_secs(25));
        let frozen_at = value(&file).unwrap();
        assert!(
            alive(pid),
            "the application is not running at the source: {log}"
        );
        continues(&file, frozen_at);
        assert_eq!(
            netns_of(pid),
            a,
            "the application is not in the source's namespace"
        );
        let tl = timeline(&d);
        assert_eq!(tl["outcome"], "rolled back", "{tl}");
        assert_eq!(tl["restore_ms"], 0.0, "the target restored: {tl}");
        drop("-D");
    }
    // The link is back: migrate again (pre-copy this time).
    let before = value(&file).unwrap();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{a}"))
        .arg(env!("CARGO_BIN_EXE_hop"))
        .env("XDG_CACHE_HOME", util::test_cache_home());
    migrate_args(&mut cmd, &d, &c, &srv.url(""), &["--pid", &pid.to_string()]);
    ok(cmd);
    assert!(alive(pid));
    assert_eq!(
        netns_of(pid),
        b,
        "the application did not land in the target's namespace"
    );
    continues(&file, before);
    kill(pid);
}

/// The name of the network namespace `pid` lives in.
fn netns_of(pid: u32) -> String {
    let out = Command::new("ip")
        .args(["netns", "identify", &pid.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Unmounts a test mount when dropped.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_target_without_room_for_the_images_is_refused_before_the_freeze() {
    let d = Dir::new();
    let c = Client::new(&d, "client");
    let srv = Server::start(&d, "small", &[&c], 0);
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "none"])
        .arg(&srv.root)
        .status()
        .unwrap();
    assert!(st.success());
    let _m = Mounted(srv.root.clone());
    let file = d.path("count");
    let pid = counter_app(&file, "python3", 32, false, &[]);
    let _app = KillOnDrop(pid);
    let mut cmd = migrate(&d, &c, &srv.url(""), &["--pid", &pid.to_string()]);
    cmd.stderr(Stdio::piped());
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("free under its root"), "{err}");
    assert!(err.contains("still runs at the source"), "{err}");
    assert!(alive(pid));
    continues(&file, 0);
    assert!(empty(&d.path("images")), "source images left");
    kill(pid);
}

/// An HTTP service with state: every request gets the next number of a counter kept in memory.
const COUNTER_APP: &str = r#"
import http.server, json, sys, threading
lock = threading.Lock()
n = 0
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        global n
        with lock:
            n += 1
            body = json.dumps({"n": n}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), H).serve_forever()
"#;

/// Two client threads (one keep-alive connection, one connection per request) until `stop`
/// exists; prints requests, failures, the largest latency and whether every thread saw the
/// counter only grow.
const CLIENT: &str = r#"
import http.client, json, os, sys, threading, time
port, stop = int(sys.argv[1]), sys.argv[2]
res = {"requests": 0, "errors": [], "max_s": 0.0, "monotonic": True, "last": 0}
lock = threading.Lock()
def run(keep):
    last = 0
    conn = None
    t_end = time.time() + 60
    while not os.path.exists(stop) and time.time() < t_end:
        t = time.time()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            conn.request("GET", "/", headers={} if keep else {"Connection": "close"})
            r = conn.getresponse()
            body = r.read()
            if not keep:
                conn.close(); conn = None
            if r.status != 200:
                raise RuntimeError(f"status {r.status}")
            v = json.loads(body)["n"]
            with lock:
                res["requests"] += 1
                res["max_s"] = max(res["max_s"], time.time() - t)
                res["monotonic"] &= v > last
                res["last"] = max(res["last"], v)
            last = v
        except Exception as e:
            with lock:
                res["errors"].append(repr(e))
            if conn is not None:
                conn.close()
            conn = None
        time.sleep(0.01)
ts = [threading.Thread(target=run, args=(k,)) for k in (True, False)]
[t.start() for t in ts]
[t.join() for t in ts]
print(json.dumps(res))
"#;

/// Run `hop ARGS` in namespace `ns` with the client's keys.
fn hop_in(ns: &str, c: &Client, args: &[&str]) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{ns}"))
        .arg(env!("CARGO_BIN_EXE_hop"))
        .env("XDG_CACHE_HOME", util::test_cache_home())
        .args(args)
        .arg("--identity")
        .arg(&c.identity)
        .arg("--known-hosts")
        .arg(&c.known_hosts)
        .arg("--accept-new");
    cmd
}

fn has_link(ns: &str, name: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "ip", "link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The paper's set-up: HAProxy at the source, the application moving to the target, and a
/// WireGuard tunnel between the sites that HAProxy reaches the moved application through.
#[test]
fn haproxy_holds_clients_during_the_move_and_none_fails() {
    let net = Netns::up("h", "10gbit");
    let (a, b) = (net.ns("a"), net.ns("b"));
    let enter = |ns: &str| vec!["nsenter".to_string(), format!("--net=/run/netns/{ns}")];
    let d = Dir::new();
    let c = Client::new(&d, "client");
    let srv = Server::start_with(&d, "target", &[&c], "10.77.0.2:0", &enter(&b), &[]);
    let (app_port, fe_port) = (18080, 18000);
    let app = d.write("app.py", COUNTER_APP.as_bytes());
    let client = d.write("client.py", CLIENT.as_bytes());
    let sock = d.path("haproxy.sock");
    let hold = format!("{}/../scripts/haproxy/hold.lua", env!("CARGO_MANIFEST_DIR"));
    let cfg = d.write(
        "haproxy.cfg",
        format!(
            "global\n    stats socket {sock} mode 600 level admin\n    lua-load {hold}\n\
             defaults\n    mode http\n    timeout connect 1s\n    timeout client 30s\n    timeout server 30s\n\
             frontend fe\n    bind 127.0.0.1:{fe_port}\n    default_backend be\n\
             backend be\n    http-request lua.hold_until_up be 30000\n    server s1 127.0.0.1:{app_port}\n",
            sock = sock.display()
        )
        .as_bytes(),
    );
    let in_a = enter(&a);
    // The application (the process that moves), reaped as soon as it dies.
    let mut child = Command::new(&in_a[0])
        .arg(&in_a[1])
        .args(["setsid", "python3"])
        .arg(&app)
        .arg(app_port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _app = KillOnDrop(pid);
    std::thread::spawn(move || child.wait());
    let haproxy = KillChild(
        Command::new(&in_a[0])
            .arg(&in_a[1])
            .args(["haproxy", "-db", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.path("haproxy.log")).unwrap())
            .spawn()
            .expect("haproxy installed (scripts/setup.sh)"),
    );
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "haproxy did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let stop = d.path("stop");
    let load = Command::new(&in_a[0])
        .arg(&in_a[1])
        .arg("python3")
        .arg(&client)
        .arg(fe_port.to_string())
        .arg(&stop)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The tunnel between the sites, both ends set up by hop.
    let (ifa, ifb) = (
        format!("hv{}a", std::process::id() % 10000),
        format!("hv{}b", std::process::id() % 10000),
    );
    let target = srv.url("");
    ok(hop_in(
        &a,
        &c,
        &[
            "vpn",
            "up",
            &target,
            "--addr",
            "10.201.0.1/24",
            "--peer-addr",
            "10.201.0.2/24",
            "--iface",
            &ifa,
            "--peer-iface",
            &ifb,
        ],
    ));
    assert!(
        has_link(&a, &ifa) && has_link(&b, &ifb),
        "tunnel interfaces missing"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let mut cmd = Command::new(&in_a[0]);
    cmd.arg(&in_a[1])
        .arg(env!("CARGO_BIN_EXE_hop"))
        .env("XDG_CACHE_HOME", util::test_cache_home());
    let sock_s = sock.display().to_string();
    let addr = format!("10.201.0.2:{app_port}");
    migrate_args(
        &mut cmd,
        &d,
        &c,
        &srv.url(""),
        &[
            "--pid",
            &pid.to_string(),
            "--tcp-close",
            "--haproxy",
            &sock_s,
            "--haproxy-server",
            "be/s1",
            "--haproxy-addr",
            &addr,
        ],
    );
    let out = ok(cmd);
    std::thread::sleep(Duration::from_millis(1500));
    std::fs::write(&stop, b"").unwrap();
    let res = load.wait_with_output().unwrap();
    drop(haproxy);
    ok(hop_in(
        &a,
        &c,
        &[
            "vpn",
            "down",
            &target,
            "--iface",
            &ifa,
            "--peer-iface",
            &ifb,
        ],
    ));
    assert!(
        !has_link(&a, &ifa) && !has_link(&b, &ifb),
        "tunnel interfaces left"
    );
    let report: serde_json::Value =
        serde_json::from_slice(&res.stdout).unwrap_or_else(|_| panic!("client: {res:?}"));
    let tl = timeline(&d);
    eprintln!("client: {report}\n{out}");
    assert_eq!(netns_of(pid), b, "the application did not move: {out}");
    assert_eq!(
        report["errors"],
        serde_json::json!([]),
        "failed requests: {report}\n{out}"
    );
    assert!(report["requests"].as_u64().unwrap() > 100, "{report}");
    assert_eq!(
        report["monotonic"], true,
        "the counter went back: state lost? {report}"
    );
    assert!(tl["hold_ms"].as_f64().unwrap() > 0.0, "{tl}");
    // Requests waited at most about the hold, not a client timeout.
    assert!(report["max_s"].as_f64().unwrap() < 15.0, "{report}");
    kill(pid);
}

#[test]
fn a_group_moves_together_and_goes_back_together_when_one_restore_fails() {
    let d = Dir::new();
    let c = Client::new(&d, "client");
    let (runc_a, runc_b) = (d.mkdir("runc-a"), d.mkdir("runc-b"));
    let tag = std::process::id();
    let (db, web) = (format!("hop-db-{tag}"), format!("hop-web-{tag}"));
    let (bdb, bweb) = (busybox_bundle_at(&d, "db"), busybox_bundle_at(&d, "web"));
    let _cleanup = RemoveContainers(
        [&runc_a, &runc_b]
            .iter()
            .flat_map(|r| {
                [
                    (r.to_path_buf(), db.clone()),
                    (r.to_path_buf(), web.clone()),
                ]
            })
            .collect(),
    );
    let mut helpers = vec![
        run_container(&d, &runc_a, &bdb, &db),
        run_container(&d, &runc_a, &bweb, &web),
    ];
    let extra = vec!["--runc-root".to_string(), runc_b.display().to_string()];
    let srv = Server::start_with(&d, "target", &[&c], "127.0.0.1:0", &[], &extra);
    let group = |cmd: &mut Command| {
        migrate_args(
            cmd,
            &d,
            &c,
            &srv.url(""),
            &[
                "--runc",
                &db,
                "--runc",
                &web,
                "--runc-root",
                runc_a.to_str().unwrap(),
            ],
        )
    };
    // At the target a container named like the web server already exists: its restore fails
    // there, after the database's succeeded. The whole group must go back, with its state.
    let blocker = busybox_bundle_at(&d, "blocker");
    helpers.push(run_container(&d, &runc_b, &blocker, &web));
    let (db_counter, web_counter) = (
        bdb.join("rootfs/tmp/counter"),
        bweb.join("rootfs/tmp/counter"),
    );
    let before = (value(&db_counter).unwrap(), value(&web_counter).unwrap());
    let mut cmd = hop();
    group(&mut cmd);
    cmd.stderr(Stdio::piped()).stdout(Stdio::piped());
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("rolled back"), "{err}");
    for id in [&db, &web] {
        assert_eq!(
            runc_state(&runc_a, id).as_deref(),
            Some("running"),
            "{id} not back: {err}"
        );
    }
    // The target drops what it restored once the connection ends without a commit: that runs
    // as the client exits, so give it a few seconds.
    let t0 = std::time::Instant::now();
    while runc_state(&runc_b, &db).is_some() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        runc_state(&runc_b, &db),
        None,
        "the target kept the database: {err}"
    );
    // Nor anything of that restore: no runc or CRIU still at work, no mount of the rootfs or of
    // CRIU's cgroup yard (a CRIU that was still finishing when its container was killed used to
    // hang there, holding the name: the next restore met "container with given ID already
    // exists").
    let left = leftovers_under(d.tmp.path(), Duration::from_secs(5));
    assert!(left.is_empty(), "left at the target: {left:#?}\n{err}");
    continues(&db_counter, before.0);
    continues(&web_counter, before.1);

    // Without the blocker the group moves: both run at the target, the database restored first.
    // This time the group comes from a TOML file, as operators write it.
    runc_remove(&runc_b, &web);
    let file = d.write(
        "group.toml",
        format!(
            "runc_root = {:?}\n\n[[container]]\nid = {db:?}\n\n[[container]]\nid = {web:?}\n",
            runc_a.display().to_string()
        )
        .as_bytes(),
    );
    let mut cmd = hop();
    migrate_args(
        &mut cmd,
        &d,
        &c,
        &srv.url(""),
        &["--group", file.to_str().unwrap()],
    );
    let out = ok(cmd);
    assert!(out.contains("all migrated"), "{out}");
    for (id, counter, from) in [(&db, &db_counter, before.0), (&web, &web_counter, before.1)] {
        assert_eq!(
            runc_state(&runc_b, id).as_deref(),
            Some("running"),
            "{id}: {out}"
        );
        assert_eq!(runc_state(&runc_a, id), None);
        continues(
            &srv.root.join(format!("containers/{id}/rootfs/tmp/counter")),
            value(counter).unwrap_or(from),
        );
    }
    let tl: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path("timeline.json")).unwrap()).unwrap();
    assert_eq!(tl.as_array().map(Vec::len), Some(2), "{tl}");
    for id in [&db, &web] {
        runc_remove(&runc_b, id);
        runc_remove(&runc_a, id);
    }
    for mut h in helpers {
        let _ = h.wait();
    }
}

/// Stops the charon of hop's IPsec tunnels `names` (and removes their files) when dropped, so
/// that a failing test leaves no daemon behind.
struct StopIpsec(Vec<String>);

impl Drop for StopIpsec {
    fn drop(&mut self) {
        for n in &self.0 {
            let d = Path::new("/var/lib/hop/ipsec").join(n);
            if let Some(pid) = std::fs::read_to_string(d.join("charon.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
            {
                kill(pid);
            }
            let _ = std::fs::remove_dir_all(&d);
        }
    }
}

fn ping(ns: &str, ip: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-c", "2", "-W", "2", "-i", "0.3", ip,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The seed paper's VPN: strongSwan IPsec between the sites (userspace ESP here, the kernel has
/// none), both ends set up by hop; the private addresses reach each other only through it, a
/// sync to the target's private address goes through it, and `hop vpn down` leaves nothing.
#[test]
fn an_ipsec_tunnel_between_the_sites_carries_a_sync_and_comes_down_cleanly() {
    let net = Netns::up("i", "10gbit");
    let (a, b) = (net.ns("a"), net.ns("b"));
    let enter = |ns: &str| vec!["nsenter".to_string(), format!("--net=/run/netns/{ns}")];
    let d = Dir::new();
    let c = Client::new(&d, "client");
    let srv = Server::start_with(&d, "target", &[&c], "0.0.0.0:0", &enter(&b), &[]);
    let (ta, tb) = (
        format!("hi{}a", std::process::id() % 10000),
        format!("hi{}b", std::process::id() % 10000),
    );
    let _stop = StopIpsec(vec![ta.clone(), tb.clone()]);
    let target = format!("quic://10.77.0.2:{}", srv.port);
    assert!(
        !ping(&a, "10.202.0.2"),
        "the private address answers without a tunnel"
    );
    let out = ok(hop_in(
        &a,
        &c,
        &[
            "vpn",
            "up",
            "--backend",
            "ipsec",
            &target,
            "--addr",
            "10.202.0.1",
            "--peer-addr",
            "10.202.0.2",
            "--iface",
            &ta,
            "--peer-iface",
            &tb,
        ],
    ));
    assert!(out.contains("tunnel up (IPsec"), "{out}");
    assert!(
        has_link(&a, "ipsec0") && has_link(&b, "ipsec0"),
        "no userspace ESP device"
    );
    assert!(ping(&a, "10.202.0.2"), "no traffic through the tunnel");
    // The SA is ESP in UDP with AES-GCM.
    let sas = ok({
        let mut s = Command::new("swanctl");
        s.args(["--list-sas", "--uri"])
            .arg(format!("unix:///var/lib/hop/ipsec/{ta}/charon.vici"));
        s
    });
    assert!(
        sas.contains("ESTABLISHED") && sas.contains("AES_GCM_16"),
        "{sas}"
    );

    // A push to the target's private address, through the tunnel.
    let file = d.write("payload.bin", &noise(3, 3 << 20));
    let mut sync = hop_in(&a, &c, &["sync", "-q"]);
    sync.arg(&file)
        .arg(format!("quic://10.202.0.2:{}/over-ipsec.bin", srv.port));
    ok(sync);
    assert_eq!(
        std::fs::read(srv.root.join("over-ipsec.bin")).unwrap(),
        std::fs::read(&file).unwrap()
    );

    ok(hop_in(
        &a,
        &c,
        &["vpn", "down", &target, "--iface", &ta, "--peer-iface", &tb],
    ));
    assert!(
        !has_link(&a, "ipsec0") && !has_link(&b, "ipsec0"),
        "ESP devices left"
    );
    for t in [&ta, &tb] {
        assert!(
            !Path::new("/var/lib/hop/ipsec").join(t).exists(),
            "files of {t} left"
        );
    }
    assert!(!ping(&a, "10.202.0.2"), "the tunnel still carries traffic");
}
