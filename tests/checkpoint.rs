//! End-to-end tests of `hop checkpoint` / `hop restore` with the real CRIU (>= 4.2, installed by
//! `scripts/setup.sh`), on real processes. They need root, as CRIU does.

#[macro_use]
mod util;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use util::*;

/// A Python process that writes an increasing counter to `file` every 50 ms; as a session
/// leader (`setsid`) unless `leader` is false. Each value is written beside the file and renamed
/// over it, so that a dump never finds the file truncated and not yet written.
fn counter(file: &Path, leader: bool) -> Child {
    let path = file.display().to_string();
    let script = format!(
        "import os, time\ni = 0\nwhile True:\n    open({tmp:?}, 'w').write(str(i))\n    os.replace({tmp:?}, {path:?})\n    i += 1\n    time.sleep(0.05)\n",
        tmp = format!("{path}.tmp"),
    );
    let mut c = if leader {
        let mut c = Command::new("setsid");
        c.arg("python3");
        c
    } else {
        Command::new("python3")
    };
    let child = c
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start python3");
    wait_for_value(file, Duration::from_secs(5));
    child
}

#[test]
fn dump_leave_running_then_final_dump_and_restore_keep_the_state() {
    let d = Dir::new();
    let file = d.path("count");
    let mut child = counter(&file, true);
    let pid = child.id();

    // A pre-copy round: the process keeps running.
    let out = ok(hop_cmd![
        "checkpoint",
        "--pid",
        pid.to_string(),
        "--dir",
        d.path("round1"),
        "--leave-running",
        "--json"
    ]);
    let stats: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(stats["pages_written"].as_u64().unwrap() > 100, "{stats}");
    assert!(d.path("round1/pages-1.img").exists());
    assert!(
        advances(&file),
        "the process stopped after a --leave-running dump"
    );

    // The final dump stops it; the state is in the images.
    ok(hop_cmd![
        "checkpoint",
        "--pid",
        pid.to_string(),
        "--dir",
        d.path("final")
    ]);
    let _ = child.wait(); // reap it, so that its PID is free for the restore
    let at_dump = value(&file).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        value(&file),
        Some(at_dump),
        "the process kept running after its final dump"
    );

    // Restore: the same process continues counting from where it was.
    let out = ok(hop_cmd!["restore", "--dir", d.path("final"), "-q"]);
    let restored: u32 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no pid in {out:?}"));
    assert!(advances(&file), "the restored process does not run");
    let now = value(&file).unwrap();
    assert!(
        now > at_dump && now < at_dump + 200,
        "counter {now} after restore does not continue from {at_dump}"
    );
    kill(restored);
}

#[test]
fn a_failed_dump_names_the_cause_and_leaves_the_process_running() {
    let d = Dir::new();
    let file = d.path("count");
    // Not a session leader, and no --shell-job: CRIU refuses.
    let mut child = counter(&file, false);
    let pid = child.id();
    let err = fails(
        hop_cmd![
            "checkpoint",
            "--pid",
            pid.to_string(),
            "--dir",
            d.path("img")
        ],
        1,
    );
    assert!(err.contains("session leader"), "{err}");
    assert!(err.contains("still running"), "{err}");
    assert!(advances(&file), "the process stopped after a failed dump");
    // A dump of a PID that does not exist fails cleanly too.
    let err = fails(
        hop_cmd!["checkpoint", "--pid", "4000000", "--dir", d.path("none")],
        1,
    );
    assert!(err.contains("criu dump of PID 4000000 failed"), "{err}");
    let _ = child.kill();
    let _ = child.wait();
}

/// A free TCP port on loopback.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn redis_value(i: u64) -> String {
    let mut v = String::with_capacity(1000);
    for b in noise(i, 500) {
        v.push_str(&format!("{b:02x}"));
    }
    v
}

#[test]
fn a_memory_heavy_redis_keeps_all_its_data_through_dump_and_restore() {
    const KEYS: u64 = 250_000; // ~250 MiB of values, ~300 MiB of memory
    let d = Dir::new();
    let port = free_port();
    let mut child = Command::new("setsid")
        .args([
            "redis-server",
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(["--dir", d.path("").to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let t0 = Instant::now();
    while redis_cli(port, &["PING"]) != "PONG" {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "redis did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Load through one pipe of inline commands.
    let mut load = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--pipe"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut w = std::io::BufWriter::new(load.stdin.take().unwrap());
        for i in 0..KEYS {
            write!(w, "SET key:{i:012} {}\r\n", redis_value(i)).unwrap();
        }
    }
    assert!(load.wait().unwrap().success());
    assert_eq!(redis_cli(port, &["DBSIZE"]), KEYS.to_string());

    let out = ok(hop_cmd![
        "checkpoint",
        "--pid",
        child.id().to_string(),
        "--dir",
        d.path("img"),
        "--json"
    ]);
    let stats: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let pages = stats["pages_written"].as_u64().unwrap();
    assert!(
        pages * 4096 > 250 << 20,
        "only {pages} pages dumped: {stats}"
    );
    let _ = child.wait();
    assert_ne!(
        redis_cli(port, &["PING"]),
        "PONG",
        "redis still answers after its final dump"
    );

    let out = ok(hop_cmd!["restore", "--dir", d.path("img"), "-q"]);
    let restored: u32 = out.trim().parse().unwrap();
    assert_eq!(redis_cli(port, &["PING"]), "PONG");
    assert_eq!(redis_cli(port, &["DBSIZE"]), KEYS.to_string());
    for i in [0, 1, 4242, KEYS / 2, KEYS - 1] {
        assert_eq!(
            redis_cli(port, &["GET", &format!("key:{i:012}")]),
            redis_value(i),
            "key {i} differs after restore"
        );
    }
    let _ = redis_cli(port, &["SHUTDOWN", "NOSAVE"]);
    kill(restored);
}

#[test]
fn a_runc_container_is_checkpointed_and_restored_with_its_state() {
    let d = Dir::new();
    let bundle = busybox_bundle(&d);
    let root = d.mkdir("runc-state");
    let id = format!("hop-test-{}", std::process::id());
    let id2 = format!("{id}-restored");
    let mut helper = run_container(&d, &root, &bundle, &id);
    let counter = bundle.join("rootfs/tmp/counter");
    assert_eq!(runc_state(&root, &id).as_deref(), Some("running"));

    let runc_args = |extra: &[&str]| {
        let mut c = hop_cmd!["checkpoint", "--runc", &id, "--runc-root", &root];
        c.args(extra);
        c
    };
    // Pre-copy round: still running.
    let mut c = runc_args(&["--leave-running"]);
    c.arg("--dir").arg(d.path("round1"));
    ok(c);
    assert!(d.path("round1/pages-1.img").exists());
    assert!(
        advances(&counter),
        "the container stopped after --leave-running"
    );
    // Final checkpoint: the container is gone.
    let mut c = runc_args(&[]);
    c.arg("--dir").arg(d.path("final"));
    ok(c);
    let at_dump = value(&counter).unwrap();
    assert_ne!(runc_state(&root, &id).as_deref(), Some("running"));
    runc_remove(&root, &id);
    let _ = helper.wait();

    // Restore under a new id: it counts on from where it stopped.
    let out = ok(hop_cmd![
        "restore",
        "--runc",
        &id2,
        "--bundle",
        &bundle,
        "--runc-root",
        &root,
        "--dir",
        d.path("final")
    ]);
    assert!(out.contains("restored container"), "{out}");
    assert_eq!(runc_state(&root, &id2).as_deref(), Some("running"));
    assert!(advances(&counter), "the restored container does not run");
    let now = value(&counter).unwrap();
    assert!(
        now > at_dump && now < at_dump + 100,
        "{now} does not continue {at_dump}"
    );
    // And it can be checkpointed again (its stdio are pipes).
    let mut c = hop_cmd![
        "checkpoint",
        "--runc",
        &id2,
        "--runc-root",
        &root,
        "--leave-running"
    ];
    c.arg("--dir").arg(d.path("again"));
    ok(c);
    runc_remove(&root, &id2);
}

#[test]
fn a_failed_container_checkpoint_leaves_the_container_running() {
    let d = Dir::new();
    let bundle = busybox_bundle(&d);
    let root = d.mkdir("runc-state");
    let id = format!("hop-fail-{}", std::process::id());
    // Output to a host file: CRIU cannot dump that fd ("Can't lookup mount"), so the checkpoint
    // fails, and the container must go on running.
    let run = format!(
        "true | runc --root '{}' run -d --bundle '{}' '{id}' > '{}' 2>&1",
        root.display(),
        bundle.display(),
        d.path("run.out").display()
    );
    let st = Command::new("setsid")
        .args(["sh", "-c", &run])
        .status()
        .unwrap();
    assert!(st.success());
    let counter = bundle.join("rootfs/tmp/counter");
    wait_for_value(&counter, Duration::from_secs(10));
    let mut c = hop_cmd!["checkpoint", "--runc", &id, "--runc-root", &root];
    c.arg("--dir").arg(d.path("img"));
    let err = fails(c, 1);
    assert!(err.contains("runc checkpoint of container"), "{err}");
    assert!(err.contains("still running"), "{err}");
    assert_eq!(runc_state(&root, &id).as_deref(), Some("running"));
    assert!(
        advances(&counter),
        "the container stopped after a failed checkpoint"
    );
    runc_remove(&root, &id);
}
