//! A strongSwan IPsec tunnel between the two sites (IKEv2 with a pre-shared key, ESP with
//! AES-GCM encapsulated in UDP), for sites that require IPsec, as the seed paper's set-up did.
//!
//! This kernel has no IPsec ESP, so each end runs its own charon with the `kernel-libipsec`
//! plugin, which carries ESP in userspace over a TUN device (`ipsec0`) and routes the peer's
//! private address into it (routing table 220), as in `../shared/notes/network-on-this-kernel.md`.
//! charon always writes `/run/charon.pid`; each instance runs in a mount namespace of its own
//! with a private `/run`. Its configuration, control socket (vici) and log live in
//! `/var/lib/hop/ipsec/NAME/`. The private addresses go on `lo` (there is no dummy device).

use anyhow::{bail, Context, Result};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where each tunnel's files live.
const BASE: &str = "/var/lib/hop/ipsec";
/// strongSwan's IKE daemon (Debian: strongswan-charon).
const CHARON: &str = "/usr/lib/ipsec/charon";

/// One end of a tunnel.
#[derive(Debug, Clone)]
pub struct End {
    /// The tunnel's name on this host (its directory).
    pub name: String,
    /// The peer's public address (where IKE and ESP go).
    pub remote: IpAddr,
    /// This end's private address.
    pub inner: IpAddr,
    /// The peer's private address.
    pub peer_inner: IpAddr,
    /// The pre-shared key, 64 hex digits.
    pub psk: String,
    /// This end starts the exchange (the other waits for it).
    pub initiate: bool,
}

fn dir(name: &str) -> PathBuf {
    Path::new(BASE).join(name)
}

/// Whether a tunnel of this name is set up on this host.
pub fn exists(name: &str) -> bool {
    super::vpn::valid_iface(name) && dir(name).join("charon.pid").exists()
}

/// A fresh pre-shared key (32 random bytes as hex).
pub fn new_psk() -> Result<String> {
    let mut b = [0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("cannot read /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// The two configuration files of an end: strongswan.conf, swanctl.conf.
fn config(e: &End, d: &Path) -> (String, String) {
    let strongswan = format!(
        "charon {{\n  load_modular = no\n  load = random nonce aes sha1 sha2 hmac gcm openssl pem pkcs1 \
         x509 pubkey kdf gmp kernel-libipsec kernel-netlink socket-default vici\n  \
         plugins {{ vici {{ socket = unix://{vici} }} }}\n  \
         filelog {{ hop {{ path = {log}\n    default = 1\n  }} }}\n}}\n",
        vici = d.join("charon.vici").display(),
        log = d.join("charon.log").display(),
    );
    let (me, peer) = if e.initiate {
        ("hop-a", "hop-b")
    } else {
        ("hop-b", "hop-a")
    };
    let swanctl = format!(
        "connections {{ hop {{\n  version = 2\n  local_addrs = %any\n  remote_addrs = {remote}\n  \
         encap = yes\n  proposals = aes128gcm16-prfsha256-ecp256\n  \
         local {{ auth = psk\n    id = {me} }}\n  remote {{ auth = psk\n    id = {peer} }}\n  \
         children {{ hop {{\n    local_ts = {inner}/{ip}\n    remote_ts = {peer_inner}/{pp}\n    \
         esp_proposals = aes128gcm16\n    start_action = none\n  }} }}\n}} }}\n\
         secrets {{ ike-hop {{ id-a = hop-a\n  id-b = hop-b\n  secret = 0x{psk} }} }}\n",
        remote = e.remote,
        inner = e.inner,
        ip = host_prefix(e.inner),
        peer_inner = e.peer_inner,
        pp = host_prefix(e.peer_inner),
        psk = e.psk,
    );
    (strongswan, swanctl)
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{what} failed: {}", text.trim());
    }
    Ok(text)
}

fn swanctl(d: &Path, args: &[&str], what: &str) -> Result<String> {
    let uri = format!("unix://{}", d.join("charon.vici").display());
    run(
        Command::new("swanctl").args(args).args(["--uri", &uri]),
        what,
    )
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        // State is the field after the command name in parentheses; Z is a zombie.
        !s.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    })
}

/// Bring this end up: configuration, charon, keys and policy loaded; the initiating end also
/// brings the SA up and returns once traffic can flow.
pub fn up(e: &End) -> Result<()> {
    if !super::vpn::valid_iface(&e.name) {
        bail!("bad tunnel name {:?}", e.name);
    }
    if e.psk.len() != 64 || !e.psk.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("the pre-shared key must be 64 hex digits");
    }
    if !Path::new(CHARON).exists() {
        bail!(
            "strongSwan's charon is not installed ({CHARON}): apt-get install strongswan-charon \
             strongswan-swanctl libcharon-extra-plugins libstrongswan-standard-plugins"
        );
    }
    if exists(&e.name) {
        bail!(
            "an IPsec tunnel {} is already up on this host (`hop vpn down` first)",
            e.name
        );
    }
    let d = dir(&e.name);
    std::fs::create_dir_all(&d).with_context(|| format!("cannot create {}", d.display()))?;
    let r = start(e, &d);
    if r.is_err() {
        let _ = down(&e.name);
    }
    r
}

fn start(e: &End, d: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let (strongswan, swanctl_conf) = config(e, d);
    let write = |name: &str, text: &str| -> Result<()> {
        use std::io::Write;
        let p = d.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600) // the key is in there
            .open(&p)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .with_context(|| format!("cannot write {}", p.display()))
    };
    write("strongswan.conf", &strongswan)?;
    write("swanctl.conf", &swanctl_conf)?;
    let inner = format!("{}/{}", e.inner, host_prefix(e.inner));
    run(
        Command::new("ip").args(["addr", "replace", &inner, "dev", "lo"]),
        "ip addr replace (the private address on lo)",
    )?;
    write("inner", &inner)?;
    // charon in a mount namespace with a private /run, detached from us (the shell that
    // starts it exits at once, so it is never our zombie); its PID recorded to stop it.
    let script = format!(
        "unshare -m sh -c 'mount -t tmpfs tmpfs /run && STRONGSWAN_CONF={conf} exec {CHARON}' \
         >{log} 2>&1 </dev/null & echo $!",
        conf = d.join("strongswan.conf").display(),
        log = d.join("charon.out").display(),
    );
    let pid: u32 = run(Command::new("setsid").args(["sh", "-c", &script]), "charon")?
        .trim()
        .parse()
        .context("charon's PID")?;
    write("charon.pid", &pid.to_string())?;
    let vici = d.join("charon.vici");
    let t0 = Instant::now();
    while !vici.exists() {
        if !alive(pid) || t0.elapsed() > Duration::from_secs(10) {
            let out = std::fs::read_to_string(d.join("charon.out")).unwrap_or_default();
            bail!("charon did not start: {}", out.trim());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    swanctl(
        d,
        &[
            "--load-all",
            "--file",
            &d.join("swanctl.conf").to_string_lossy(),
        ],
        "swanctl --load-all",
    )?;
    if e.initiate {
        swanctl(
            d,
            &["--initiate", "--child", "hop", "--timeout", "15"],
            "swanctl --initiate (IKE with the peer)",
        )?;
    }
    Ok(())
}

/// Take this end down: charon stopped (its TUN device, routes and SAs go with it), the private
/// address removed from `lo`, the files removed.
pub fn down(name: &str) -> Result<()> {
    if !super::vpn::valid_iface(name) {
        bail!("bad tunnel name {name:?}");
    }
    let d = dir(name);
    if !d.exists() {
        bail!("no IPsec tunnel {name} on this host");
    }
    if let Some(pid) = std::fs::read_to_string(d.join("charon.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
    {
        // Only the charon we started: its command line names our configuration.
        let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("charon"));
        if ours && alive(pid) {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let t0 = Instant::now();
            while alive(pid) && t0.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive(pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
    if let Ok(inner) = std::fs::read_to_string(d.join("inner")) {
        let _ = Command::new("ip")
            .args(["addr", "del", inner.trim(), "dev", "lo"])
            .stderr(Stdio::null())
            .status();
    }
    std::fs::remove_dir_all(&d).with_context(|| format!("cannot remove {}", d.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_mirrors_between_the_ends() {
        let a = End {
            name: "t".into(),
            remote: "192.0.2.2".parse().unwrap(),
            inner: "10.201.0.1".parse().unwrap(),
            peer_inner: "10.201.0.2".parse().unwrap(),
            psk: "ab".repeat(32),
            initiate: true,
        };
        let (ss, sw) = config(&a, Path::new("/x/t"));
        assert!(ss.contains("kernel-libipsec") && ss.contains("unix:///x/t/charon.vici"));
        assert!(sw.contains("remote_addrs = 192.0.2.2"));
        assert!(
            sw.contains("local_ts = 10.201.0.1/32") && sw.contains("remote_ts = 10.201.0.2/32")
        );
        assert!(
            sw.contains("id = hop-a }") && sw.contains(&format!("secret = 0x{}", "ab".repeat(32)))
        );
        let b = End {
            initiate: false,
            ..a
        };
        let (_, sw) = config(&b, Path::new("/x/t"));
        assert!(sw.contains("local { auth = psk\n    id = hop-b }"));
        assert_eq!(new_psk().unwrap().len(), 64);
    }
}
