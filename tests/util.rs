//! Helpers for end-to-end tests: a fresh directory per test, the real `hop` binary, and a tree
//! comparison that checks content, kind, link targets, modes and mtimes.

#![allow(dead_code)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A temporary directory that lives as long as the test.
pub struct Dir {
    pub tmp: tempfile::TempDir,
}

impl Dir {
    pub fn new() -> Dir {
        Dir {
            tmp: tempfile::Builder::new()
                .prefix("hop-e2e-")
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

/// The `hop` binary under test.
pub fn hop() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hop"))
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
