//! Helpers for end-to-end tests: a fresh directory per test, the real `hop` binary, and a tree
//! comparison that checks content, kind, link targets, modes and mtimes.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A temporary directory that lives as long as the test.
pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir {
            // HOP_E2E_KEEP=1 keeps every test's directory (servers' logs included) for a look
            // after a failure.
            tmp: tempfile::Builder::new()
                .prefix("hop-e2e-")
                .disable_cleanup(std::env::var_os("HOP_E2E_KEEP").is_some())
                .tempdir_in(std::env::temp_dir())
                .unwrap(),
        }
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }
    pub fn write(&self, rel: &str, data: &[u8]) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, data).unwrap();
        p
    }
    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.path(rel);
        fs::create_dir_all(&p).unwrap();
        p
    }
    pub fn symlink(&self, target: &str, rel: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, p).unwrap();
    }
}

/// Deterministic incompressible bytes.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.finalize_xof().fill(&mut out);
    out
}

/// The `hop` binary under test. Its chunk caches (the source's, and a server's for its
/// destinations, normally under `~/.cache/hop`) go under the target directory, so that tests
/// leave nothing behind in the home directory.
pub fn hop() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hop"));
    c.env("XDG_CACHE_HOME", test_cache_home());
    c
}

/// Where tests' `hop` processes keep their caches.
pub fn test_cache_home() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xdg-cache")
}

/// `hop` with these arguments (anything `Command::arg` takes).
macro_rules! hop_cmd {
    ($($a:expr),* $(,)?) => {{
        let mut c = $crate::util::hop();
        $( c.arg($a); )*
        c
    }};
}

/// Describe a finished command for a failure message.
pub fn describe(cmd: &Command, out: &Output) -> String {
    format!(
        "command: {:?}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run and require success; returns stdout.
pub fn ok(mut cmd: Command) -> String {
    let out = cmd.output().expect("run hop");
    assert!(out.status.success(), "hop failed\n{}", describe(&cmd, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run and require failure with `code`; returns stderr.
pub fn fails(mut cmd: Command, code: i32) -> String {
    let out = cmd.output().expect("run hop");
    assert_eq!(
        out.status.code(),
        Some(code),
        "unexpected status\n{}",
        describe(&cmd, &out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `hop sync --stats-json - ARGS...`, parsed.
pub fn sync_stats(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let mut c = hop();
    c.arg("sync").arg("--stats-json").arg("-").args(args);
    let out = ok(c);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad stats json {out:?}: {e}"))
}

/// Walk a tree into (relative path, description) pairs: kind, content hash, mode, mtime, target.
pub fn describe_tree(root: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn walk(root: &Path, p: &Path, out: &mut Vec<(String, String)>) {
    let md = fs::symlink_metadata(p).unwrap();
    let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
    let ft = md.file_type();
    let desc = if ft.is_symlink() {
        format!("link -> {}", fs::read_link(p).unwrap().display())
    } else if ft.is_dir() {
        format!(
            "dir mode {:o} mtime {}.{}",
            md.permissions().mode() & 0o7777,
            md.mtime(),
            md.mtime_nsec()
        )
    } else {
        let data = fs::read(p).unwrap();
        format!(
            "file {} bytes blake3 {} mode {:o} mtime {}.{}",
            data.len(),
            blake3::hash(&data).to_hex(),
            md.permissions().mode() & 0o7777,
            md.mtime(),
            md.mtime_nsec()
        )
    };
    out.push((rel, desc));
    if ft.is_dir() {
        for e in fs::read_dir(p).unwrap() {
            walk(root, &e.unwrap().path(), out);
        }
    }
}

/// Assert two trees are identical (content, kinds, targets, modes, mtimes), with a diff on failure.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let ta = describe_tree(a);
    let tb = describe_tree(b);
    if ta != tb {
        let mut msg = String::new();
        for x in &ta {
            if !tb.contains(x) {
                msg += &format!("  only in source: {} {}\n", x.0, x.1);
            }
        }
        for x in &tb {
            if !ta.contains(x) {
                msg += &format!("  only in dest:   {} {}\n", x.0, x.1);
            }
        }
        panic!("trees differ: {} vs {}\n{msg}", a.display(), b.display());
    }
}

/// True when running as root (tests then drop to `nobody` with setpriv where needed).
pub fn is_root() -> bool {
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A `hop` command run as user `nobody` (only meaningful as root).
pub fn hop_as_nobody() -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_hop"));
    c
}

/// Make a path and everything below it world-writable (for tests that run as nobody).
pub fn open_up(p: &Path) {
    let _ = Command::new("chmod").arg("-R").arg("a+rwX").arg(p).status();
}

/// A tree with every kind of entry hop syncs.
pub fn sample_tree(d: &Dir) -> PathBuf {
    let src = d.mkdir("src");
    d.write("src/big.img", &noise(1, 3 << 20));
    d.write("src/a/b/c.txt", b"hello world\n");
    d.write("src/a/empty", b"");
    d.write(
        "src/text.txt",
        &b"line of compressible text\n".repeat(20_000),
    );
    d.symlink("a/b/c.txt", "src/link-rel");
    d.symlink("/nonexistent/target", "src/link-dangling");
    d.mkdir("src/emptydir");
    // A sparse file: data, a 16 MiB hole, data.
    let f = fs::File::create(d.path("src/sparse.img")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"tail", 16 << 20).unwrap();
    fs::set_permissions(d.path("src/a/b/c.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(d.path("src/a"), fs::Permissions::from_mode(0o750)).unwrap();
    src
}

/// A `hop serve` on a free loopback port, with its own identity, root and authorized-keys
/// file inside a test directory. Killed (by PID) when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub host: String,
    pub port: u16,
    pub root: PathBuf,
    pub fingerprint: String,
    pub stderr: PathBuf,
}

/// A client's identity and known-hosts file inside a test directory.
pub struct Client {
    pub identity: PathBuf,
    pub known_hosts: PathBuf,
    pub fingerprint: String,
}

impl Client {
    /// A new client identity under `d/name`.
    pub fn new(d: &Dir, name: &str) -> Client {
        let identity = d.path(&format!("{name}/id"));
        let fingerprint = ok(hop_cmd!["keygen", "--out", &identity])
            .trim()
            .to_string();
        Client {
            identity,
            known_hosts: d.path(&format!("{name}/known_hosts")),
            fingerprint,
        }
    }

    /// `hop sync` with this client's identity and known hosts, and `args`.
    pub fn sync(&self, args: &[&std::ffi::OsStr]) -> Command {
        let mut c = hop();
        c.arg("sync")
            .arg("--identity")
            .arg(&self.identity)
            .arg("--known-hosts")
            .arg(&self.known_hosts)
            .args(args);
        c
    }
}

impl Server {
    /// Start a server under `d/name` that admits `clients`, on `port` (0: any).
    pub fn start(d: &Dir, name: &str, clients: &[&Client], port: u16) -> Server {
        Server::start_at(d, name, clients, &format!("127.0.0.1:{port}"), None)
    }

    /// The same, listening on `listen`, inside network namespace `netns` if given.
    pub fn start_at(
        d: &Dir,
        name: &str,
        clients: &[&Client],
        listen: &str,
        netns: Option<&str>,
    ) -> Server {
        let prefix: Vec<String> = match netns {
            Some(ns) => vec!["ip".into(), "netns".into(), "exec".into(), ns.into()],
            None => Vec::new(),
        };
        Server::start_with(d, name, clients, listen, &prefix, &[])
    }

    /// The general case: the hop binary run through `prefix` (a command that ends by exec'ing
    /// its arguments, e.g. `ip netns exec NS`), with `extra` arguments to `hop serve`.
    pub fn start_with(
        d: &Dir,
        name: &str,
        clients: &[&Client],
        listen: &str,
        prefix: &[String],
        extra: &[String],
    ) -> Server {
        let base = d.mkdir(name);
        let identity = base.join("id");
        if !identity.join("key.pem").exists() {
            ok(hop_cmd!["keygen", "--out", &identity]);
        }
        let ak = base.join("authorized_keys");
        let mut keys = String::from("# test clients\n");
        for c in clients {
            keys += &format!("{}\n", c.fingerprint);
        }
        fs::write(&ak, keys).unwrap();
        let root = base.join("root");
        fs::create_dir_all(&root).unwrap();
        let stderr = base.join("serve.log");
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(env!("CARGO_BIN_EXE_hop"));
                c.env("XDG_CACHE_HOME", test_cache_home());
                c
            }
            None => hop(),
        };
        let mut child = cmd
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--root")
            .arg(&root)
            .arg("--identity")
            .arg(&identity)
            .arg("--authorized-keys")
            .arg(&ak)
            .args(["--timeout", "5"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start hop serve");
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "listening on 127.0.0.1:PORT as sha256:..."
        let mut words = line.split_whitespace().skip(2);
        let addr = words.next().unwrap_or_else(|| {
            panic!(
                "hop serve did not start: {line:?}\n{}",
                fs::read_to_string(&stderr).unwrap_or_default()
            )
        });
        let (host, port) = addr.rsplit_once(':').unwrap();
        let (host, port) = (host.to_string(), port.parse().unwrap());
        let fingerprint = words.nth(1).unwrap().to_string();
        Server {
            child,
            host,
            port,
            root,
            fingerprint,
            stderr,
        }
    }

    /// `quic://127.0.0.1:PORT/PATH`.
    pub fn url(&self, path: &str) -> String {
        format!("quic://{}:{}/{path}", self.host, self.port)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Stop the server (SIGKILL) and wait for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Wait for `child` (stderr piped) at most `limit`, killing it and failing the test if it runs
/// longer; returns its status and what it wrote on stderr.
pub fn finish_within(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> (std::process::ExitStatus, String) {
    let t0 = std::time::Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("{child:?} did not finish within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    (st, err)
}

// Applications to checkpoint: counters that write their value to a file.

/// The counter in `file`, if it holds one.
pub fn value(file: &Path) -> Option<u64> {
    // Counters rewrite their file in place: a read can meet it truncated, so look again.
    for _ in 0..50 {
        if let Some(v) = std::fs::read_to_string(file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Wait (at most `limit`) until `file` holds a counter.
pub fn wait_for_value(file: &Path, limit: Duration) -> u64 {
    let t0 = Instant::now();
    loop {
        if let Some(v) = value(file) {
            return v;
        }
        assert!(t0.elapsed() < limit, "{} never got a value", file.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The counter moves on within a second.
pub fn advances(file: &Path) -> bool {
    let a = wait_for_value(file, Duration::from_secs(2));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(50));
        if value(file).is_some_and(|b| b > a) {
            return true;
        }
    }
    false
}

/// Kills the process with this PID (one the test started) when dropped, so that a failing test
/// leaves nothing running.
pub struct KillOnDrop(pub u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        kill(self.0);
    }
}

/// Kills and reaps a child process when dropped.
pub struct KillChild(pub std::process::Child);

impl Drop for KillChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Removes runc containers (state directory, id) when dropped, wherever they ended up.
pub struct RemoveContainers(pub Vec<(PathBuf, String)>);

impl Drop for RemoveContainers {
    fn drop(&mut self) {
        for (root, id) in &self.0 {
            runc_remove(root, id);
        }
    }
}

/// SIGKILL a process the test started (by PID).
pub fn kill(pid: u32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// An OCI bundle with a static busybox that counts in /tmp/counter every 100 ms (each value
/// written beside it and renamed over it, so that a checkpoint never finds it empty).
pub fn busybox_bundle(d: &Dir) -> std::path::PathBuf {
    busybox_bundle_at(d, "bundle")
}

/// [`busybox_bundle`] in `d/name`.
pub fn busybox_bundle_at(d: &Dir, name: &str) -> std::path::PathBuf {
    let b = d.mkdir(name);
    let rootfs = b.join("rootfs");
    for sub in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(sub)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static installed");
    for applet in ["sh", "sleep", "echo", "mv"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let st = Command::new("runc")
        .arg("spec")
        .arg("--bundle")
        .arg(&b)
        .status()
        .unwrap();
    assert!(st.success());
    let cfg = b.join("config.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    spec["process"]["terminal"] = false.into();
    spec["root"]["readonly"] = false.into();
    spec["process"]["args"] = serde_json::json!([
        "sh",
        "-c",
        "i=0; while true; do echo $i > /tmp/counter.tmp; mv /tmp/counter.tmp /tmp/counter; \
         i=$((i+1)); sleep 0.1; done"
    ]);
    std::fs::write(&cfg, serde_json::to_string_pretty(&spec).unwrap()).unwrap();
    b
}

/// Start container `id` from `bundle` under runc state `root`, its stdio pipes (CRIU needs
/// that: stdin at end of file, output into a `cat` writing `d/run.out`), and wait until its
/// counter (`rootfs/tmp/counter`) has a value. Returns the helper pipeline (it ends with the
/// container).
pub fn run_container(d: &Dir, root: &Path, bundle: &Path, id: &str) -> std::process::Child {
    let run = format!(
        "true | runc --root '{}' run -d --bundle '{}' '{id}' 2>&1 | cat > '{}'",
        root.display(),
        bundle.display(),
        d.path(&format!("run-{id}.out")).display()
    );
    let helper = Command::new("setsid")
        .args(["sh", "-c", &run])
        .spawn()
        .unwrap();
    wait_for_value(&bundle.join("rootfs/tmp/counter"), Duration::from_secs(10));
    helper
}

/// A runc container's status, if runc knows it.
pub fn runc_state(root: &Path, id: &str) -> Option<String> {
    let out = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["state", id])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["status"].as_str().map(str::to_string)
}

/// What runc and CRIU left at work under `dir` after `limit`: runc or CRIU processes whose
/// command line names a path under it, and mounts under it. Empty when a restore that was
/// dropped or failed cleaned up after itself.
pub fn leftovers_under(dir: &Path, limit: Duration) -> Vec<String> {
    let dir = dir.to_string_lossy().to_string();
    let look = || {
        let mut found = Vec::new();
        for line in fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
        {
            if let Some(at) = line.split(' ').nth(4) {
                if at.starts_with(&dir) {
                    found.push(format!("mount {at}"));
                }
            }
        }
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = e.file_name().to_string_lossy().to_string();
            if pid.parse::<u32>().is_err() {
                continue;
            }
            let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            let state = fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            let zombie = state
                .rsplit(") ")
                .next()
                .is_some_and(|r| r.starts_with('Z'));
            let cmd = fs::read(e.path().join("cmdline"))
                .unwrap_or_default()
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).to_string())
                .collect::<Vec<_>>()
                .join(" ");
            if !zombie && matches!(comm.trim(), "runc" | "criu") && cmd.contains(&dir) {
                found.push(format!("process {pid}: {cmd}"));
            }
        }
        found
    };
    let t0 = std::time::Instant::now();
    loop {
        let found = look();
        if found.is_empty() || t0.elapsed() >= limit {
            return found;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Remove a runc container, whatever its state.
pub fn runc_remove(root: &Path, id: &str) {
    let _ = Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["delete", "-f", id])
        .output();
}

/// Run `cmd` on a pseudo-terminal (util-linux `script`), as a user at a terminal would; its
/// exit status must be 0. Returns everything it wrote to the terminal.
pub fn on_a_terminal(cmd: &Command) -> String {
    fn quote(s: &std::ffi::OsStr) -> String {
        format!("'{}'", s.to_string_lossy().replace('\'', r"'\''"))
    }
    let mut line = quote(cmd.get_program());
    for a in cmd.get_args() {
        line.push(' ');
        line.push_str(&quote(a));
    }
    let out = Command::new("script")
        .args(["-qfec", &line, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("util-linux script runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{line} on a terminal failed:\n{text}");
    text
}
