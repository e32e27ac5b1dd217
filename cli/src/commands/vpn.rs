//! `hop vpn up|down`: a WireGuard tunnel between this host and a `hop serve` host, both ends
//! set up by hop (the far end by its agent, over the authenticated QUIC connection).

use super::remote::RemoteArgs;
use super::Output;
use crate::migrate::calls::{Call, VpnEnd};
use crate::migrate::vpn;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hop_engine::net::{Link, RemotePath};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::ExitCode;

/// Set up or take down a site-to-site WireGuard tunnel to a host running `hop serve` (as root).
///
/// Both ends run the userspace wireguard-go (this kernel has no WireGuard module) configured
/// with fresh keys; the far end is set up by the server's agent. Migration traffic can then go
/// over the tunnel and HAProxy can reach the application at its tunnel address at the target.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  hop vpn up quic://203.0.113.7 --addr 10.200.0.1/24 --peer-addr 10.200.0.2/24
  hop migrate --runc web --haproxy /run/haproxy.sock --haproxy-server be/web \\
              --haproxy-addr 10.200.0.2:8080 quic://203.0.113.7
  hop vpn down quic://203.0.113.7")]
pub struct VpnArgs {
    #[command(subcommand)]
    pub cmd: VpnCmd,
}

/// `up` or `down`.
#[derive(Subcommand, Debug)]
pub enum VpnCmd {
    /// Bring the tunnel up on both ends.
    Up(Box<UpArgs>),
    /// Take both ends down.
    Down(DownArgs),
}

/// Interfaces of both ends.
#[derive(Args, Debug)]
pub struct Ends {
    /// The target: quic://HOST[:PORT].
    pub target: String,
    /// Interface name here (unique on this host).
    #[arg(long, default_value = "hopvpn-s")]
    pub iface: String,
    /// Interface name at the target (unique there; on one host with namespaces, unique across
    /// them: wireguard-go's sockets are shared).
    #[arg(long, default_value = "hopvpn-t")]
    pub peer_iface: String,
}

/// `hop vpn up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub ends: Ends,
    /// This end's tunnel address, IP/PREFIX.
    #[arg(long, value_name = "IP/PREFIX")]
    pub addr: String,
    /// The target's tunnel address, IP/PREFIX.
    #[arg(long, value_name = "IP/PREFIX")]
    pub peer_addr: String,
    /// UDP port of this end.
    #[arg(long, default_value_t = 51820)]
    pub port: u16,
    /// UDP port of the target's end.
    #[arg(long, default_value_t = 51820)]
    pub peer_port: u16,
    /// The address the target reaches this host at [default: the one the route to the
    /// target uses].
    #[arg(long, value_name = "IP")]
    pub endpoint: Option<IpAddr>,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// `hop vpn down`.
#[derive(Args, Debug)]
pub struct DownArgs {
    #[command(flatten)]
    pub ends: Ends,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

fn target(s: &str) -> Result<RemotePath> {
    match RemotePath::parse(s) {
        Some(r) => Ok(r?),
        None => bail!("{s}: the target must be quic://HOST[:PORT]"),
    }
}

/// The target's address, and ours as the route to it sees it.
fn addresses(t: &RemotePath, port: u16) -> Result<(IpAddr, IpAddr)> {
    use std::net::ToSocketAddrs;
    let far = (t.host.as_str(), port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {}", t.host))?
        .next()
        .with_context(|| format!("{} has no address", t.host))?;
    let probe = UdpSocket::bind(if far.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    probe.connect(far)?;
    Ok((far.ip(), probe.local_addr()?.ip()))
}

/// Run `hop vpn`.
pub fn run(a: VpnArgs, out: Output) -> Result<ExitCode> {
    match a.cmd {
        VpnCmd::Up(u) => up(*u, out),
        VpnCmd::Down(d) => {
            let t = target(&d.ends.target)?;
            let mut link = Link::connect(&t, &d.remote.client_settings()?)?;
            let far: Result<serde_json::Value> = Call::VpnDown {
                iface: d.ends.peer_iface.clone(),
            }
            .send(&mut link);
            link.close();
            let near = vpn::down(&d.ends.iface);
            far.context("the target's end")?;
            near.context("this end")?;
            if !out.quiet {
                println!(
                    "tunnel down: {} and {} removed",
                    d.ends.iface, d.ends.peer_iface
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn up(u: UpArgs, out: Output) -> Result<ExitCode> {
    let t = target(&u.ends.target)?;
    let (peer_ip, route_ip) = addresses(&t, u.peer_port)?;
    let me = u.endpoint.unwrap_or(route_ip);
    let (my_ip, _) = vpn::parse_cidr(&u.addr)?;
    let (peer_tunnel_ip, _) = vpn::parse_cidr(&u.peer_addr)?;
    let mut link = Link::connect(&t, &u.remote.client_settings()?)?;
    let (private, public) = vpn::keypair()?;
    vpn::up(&u.ends.iface, &private, u.port, &u.addr)?;
    let r = (|| -> Result<()> {
        let far: VpnEnd = Call::VpnUp {
            iface: u.ends.peer_iface.clone(),
            addr: u.peer_addr.clone(),
            port: u.peer_port,
            peer_public: public.clone(),
            peer_endpoint: SocketAddr::new(me, u.port).to_string(),
            peer_allowed: format!("{my_ip}/{}", if my_ip.is_ipv4() { 32 } else { 128 }),
        }
        .send(&mut link)
        .context("the target's end")?;
        vpn::add_peer(
            &u.ends.iface,
            &far.public,
            SocketAddr::new(peer_ip, u.peer_port),
            &format!(
                "{peer_tunnel_ip}/{}",
                if peer_tunnel_ip.is_ipv4() { 32 } else { 128 }
            ),
        )
    })();
    link.close();
    if let Err(e) = r {
        let _ = vpn::down(&u.ends.iface);
        return Err(e);
    }
    if !out.quiet {
        println!(
            "tunnel up: {} ({}) <-> {} ({}) over {me}:{} <-> {peer_ip}:{}",
            my_ip, u.ends.iface, peer_tunnel_ip, u.ends.peer_iface, u.port, u.peer_port
        );
    }
    Ok(ExitCode::SUCCESS)
}
