//! `hop sync` to and from `user@host:path` through a real local sshd, like rsync over ssh: the
//! remote `hop serve` is started over ssh for the one transfer, with throwaway keys.
//! Needs root (sshd) and openssh-server (installed by scripts/setup.sh).

#[macro_use]
mod util;

use std::ffi::OsStr;
use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use util::*;

struct Sshd {
    child: Child,
    rsh: String,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sshd(d: &Dir) -> Sshd {
    let k = d.mkdir("sshkeys");
    for name in ["host", "client"] {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(k.join(name))
            .status()
            .unwrap();
        assert!(st.success());
    }
    fs::copy(k.join("client.pub"), k.join("authorized")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = k.join("sshd_config");
    fs::write(
        &cfg,
        format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {k}/host\nAuthorizedKeysFile {k}/authorized\n\
             PermitRootLogin yes\nPasswordAuthentication no\nUsePAM no\nPidFile {k}/sshd.pid\nStrictModes no\n",
            k = k.display()
        ),
    )
    .unwrap();
    fs::create_dir_all("/run/sshd").unwrap();
    let child = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sshd (openssh-server)");
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "sshd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rsh = format!(
        "ssh -p {port} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR",
        k.join("client").display()
    );
    Sshd { child, rsh }
}

#[test]
fn push_and_pull_over_ssh_need_no_key_set_up() {
    let d = Dir::new();
    let ssh = sshd(&d);
    let src = sample_tree(&d);
    let hop_bin = env!("CARGO_BIN_EXE_hop");
    let remote = format!("root@127.0.0.1:{}/", d.path("far").display());
    let sync = |args: &[&OsStr]| {
        let mut c = hop();
        c.args([
            "sync",
            "-e",
            &ssh.rsh,
            "--remote-hop",
            hop_bin,
            "--stats-json",
            "-",
        ])
        .args(args);
        let out = ok(c);
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()
    };
    // Push: like rsync, `src` without a slash lands in far/src.
    sync(&[src.as_os_str(), OsStr::new(&remote)]);
    assert_same_tree(&src, &d.path("far/src"));
    // An edit crosses as a small delta.
    let mut big = fs::read(src.join("big.img")).unwrap();
    big[100_000..104_096].copy_from_slice(&noise(70, 4096));
    fs::write(src.join("big.img"), &big).unwrap();
    let st = sync(&[src.as_os_str(), OsStr::new(&remote)]);
    assert_same_tree(&src, &d.path("far/src"));
    assert!(st["bytes_wire"].as_u64().unwrap() < 300_000, "{st}");
    // Pull it back.
    let back = d.path("back");
    sync(&[OsStr::new(&format!("{remote}src/")), back.as_os_str()]);
    assert_same_tree(&src, &back);

    // No hop on the remote side: a clear error.
    let mut c = hop();
    c.args(["sync", "-e", &ssh.rsh, "--remote-hop", "/nonexistent/hop"])
        .arg(&src)
        .arg(&remote);
    let err = fails(c, 1);
    assert!(
        err.contains("could not start") && err.contains("--remote-hop"),
        "{err}"
    );
}
