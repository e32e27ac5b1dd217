//! A WireGuard tunnel between the two sites, set up by hop on both ends (the source directly,
//! the target through its agent), so that HAProxy and containers reach each other on private
//! addresses. This kernel has no WireGuard module: the userspace implementation (wireguard-go,
//! Debian's `wireguard-go` package) carries it, configured with `wg` (`wireguard-tools`), as in
//! `../shared/notes/network-on-this-kernel.md`.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// wireguard-go's control sockets; shared by every network namespace of the host, so
/// interface names must be unique host-wide.
const SOCKET_DIR: &str = "/var/run/wireguard";

/// A valid interface name: 1-15 of letters, digits, `-`, `_`.
pub fn valid_iface(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `ADDR/PREFIX` (prefix 0-32 for IPv4, 0-128 for IPv6).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8)> {
    let (a, p) = s.split_once('/').unwrap_or((s, ""));
    let ip: IpAddr = a
        .parse()
        .with_context(|| format!("{s:?}: not an address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = if p.is_empty() {
        max
    } else {
        p.parse()
            .ok()
            .filter(|n| *n <= max)
            .with_context(|| format!("{s:?}: bad prefix length"))?
    };
    Ok((ip, prefix))
}

fn socket(iface: &str) -> PathBuf {
    PathBuf::from(SOCKET_DIR).join(format!("{iface}.sock"))
}

fn run(cmd: &mut Command, what: &str) -> Result<String> {
    run_with(cmd, None, what)
}

/// Run `cmd`, writing `input` (a key: never on the command line) to its standard input; its
/// standard output, or its standard error as the failure.
fn run_with(cmd: &mut Command, input: Option<&str>, what: &str) -> Result<String> {
    let mut c = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}"))?;
    if let (Some(text), Some(mut stdin)) = (input, c.stdin.take()) {
        stdin.write_all(text.as_bytes())?;
    }
    let out = c.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A new key pair: (private, public), base64 as `wg` prints them.
pub fn keypair() -> Result<(String, String)> {
    let private = run(
        Command::new("wg").arg("genkey"),
        "wg genkey (apt-get install wireguard-tools)",
    )?;
    let public = run_with(
        Command::new("wg").arg("pubkey"),
        Some(&private),
        "wg pubkey",
    )?;
    Ok((private, public))
}

/// Bring up interface `iface` (wireguard-go, daemonized) with `private` key, listening on UDP
/// `port`, address `addr` (`IP/PREFIX`), MTU 1420.
pub fn up(iface: &str, private: &str, port: u16, addr: &str) -> Result<()> {
    if !valid_iface(iface) {
        bail!("bad interface name {iface:?}");
    }
    let (ip, prefix) = parse_cidr(addr)?;
    if socket(iface).exists() {
        bail!("a WireGuard interface {iface} is already up on this host (`hop vpn down` first)");
    }
    let st = Command::new("wireguard-go")
        .arg(iface)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("cannot run wireguard-go (apt-get install wireguard-go)")?;
    if !st.success() {
        bail!("wireguard-go {iface} failed to start");
    }
    let t0 = Instant::now();
    while !socket(iface).exists() {
        if t0.elapsed() > Duration::from_secs(5) {
            bail!("wireguard-go {iface} did not create its socket");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let configure = || -> Result<()> {
        run_with(
            Command::new("wg").args([
                "set",
                iface,
                "listen-port",
                &port.to_string(),
                "private-key",
                "/dev/stdin",
            ]),
            Some(private),
            &format!("wg set {iface}"),
        )?;
        run(
            Command::new("ip").args(["addr", "add", &format!("{ip}/{prefix}"), "dev", iface]),
            "ip addr add",
        )?;
        run(
            Command::new("ip").args(["link", "set", iface, "mtu", "1420", "up"]),
            "ip link set up",
        )?;
        Ok(())
    };
    configure().inspect_err(|_| {
        let _ = down(iface);
    })
}

/// Add the peer: its public key, its endpoint, the addresses routed to it.
pub fn add_peer(iface: &str, public: &str, endpoint: SocketAddr, allowed: &str) -> Result<()> {
    parse_cidr(allowed)?;
    if public.len() != 44 || !public.ends_with('=') {
        bail!("{public:?} is not a WireGuard public key");
    }
    run(
        Command::new("wg").args([
            "set",
            iface,
            "peer",
            public,
            "endpoint",
            &endpoint.to_string(),
            "allowed-ips",
            allowed,
            "persistent-keepalive",
            "25",
        ]),
        "wg set peer",
    )?;
    Ok(())
}

/// Take interface `iface` down: wireguard-go exits when its socket goes, and the interface
/// with it.
pub fn down(iface: &str) -> Result<()> {
    if !valid_iface(iface) {
        bail!("bad interface name {iface:?}");
    }
    let sock = socket(iface);
    if !sock.exists() {
        bail!("no WireGuard interface {iface} on this host");
    }
    std::fs::remove_file(&sock).with_context(|| format!("cannot remove {}", sock.display()))?;
    // Through netlink (`ip`), which sees this network namespace; /sys may show another.
    let exists = || {
        Command::new("ip")
            .args(["link", "show", iface])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let t0 = Instant::now();
    while exists() {
        if t0.elapsed() > Duration::from_secs(5) {
            let _ = Command::new("ip").args(["link", "del", iface]).status();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_addresses_are_checked() {
        assert!(valid_iface("hopvpn-s"));
        for bad in ["", "a b", "x/y", "sixteen-chars-xx", "../x"] {
            assert!(!valid_iface(bad), "{bad:?}");
        }
        assert_eq!(
            parse_cidr("10.200.0.1/24").unwrap(),
            ("10.200.0.1".parse().unwrap(), 24)
        );
        assert_eq!(parse_cidr("10.200.0.2").unwrap().1, 32);
        assert!(parse_cidr("10.200.0.1/33").is_err());
        assert!(parse_cidr("nonsense/24").is_err());
    }
}
