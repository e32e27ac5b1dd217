//! `hop vpn up|down`: a WireGuard or IPsec tunnel between this host and a `hop serve` host,
//! both ends set up by hop (the far end by its agent, over the authenticated QUIC connection).

use super::remote::RemoteArgs;
use super::Output;
use crate::migrate::calls::{Call, VpnBackend, VpnEnd};
use crate::migrate::{ipsec, vpn};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hop_engine::net::{Link, RemotePath};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::ExitCode;

/// Set up or take down a site-to-site tunnel (WireGuard or IPsec) to a host running `hop serve`
/// (as root).
///
/// WireGuard (the default): both ends run the userspace wireguard-go (this kernel has no
/// WireGuard module) with fresh keys. IPsec (`--backend ipsec`, for sites that require it):
/// both ends run strongSwan's charon (IKEv2, a fresh pre-shared key sent over the authenticated
/// connection, ESP with AES-GCM in UDP; userspace ESP through kernel-libipsec where the kernel
/// has none); the private addresses go on `lo`. The far end is set up by the server's agent.
/// Migration traffic can then go over the tunnel and HAProxy can reach the application at its
/// tunnel address at the target.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  hop vpn up quic://203.0.113.7 --addr 10.200.0.1/24 --peer-addr 10.200.0.2/24
  hop vpn up --backend ipsec quic://203.0.113.7 --addr 10.201.0.1 --peer-addr 10.201.0.2
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
    /// Interface (WireGuard) or tunnel (IPsec) name here (unique on this host).
    #[arg(long, default_value = "hopvpn-s")]
    pub iface: String,
    /// Interface or tunnel name at the target (unique there; on one host with namespaces,
    /// unique across them: wireguard-go's sockets and hop's IPsec files are shared).
    #[arg(long, default_value = "hopvpn-t")]
    pub peer_iface: String,
}

/// `hop vpn up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub ends: Ends,
    /// What carries the tunnel.
    #[arg(long, value_enum, default_value_t = VpnBackend::Wireguard)]
    pub backend: VpnBackend,
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
            let near = if ipsec::exists(&d.ends.iface) {
                ipsec::down(&d.ends.iface)
            } else {
                vpn::down(&d.ends.iface)
            };
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
    let host = |ip: IpAddr| format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 });
    let r = match u.backend {
        VpnBackend::Wireguard => wireguard_up(&u, &mut link, me, peer_ip, my_ip, peer_tunnel_ip),
        VpnBackend::Ipsec => (|| -> Result<()> {
            let psk = ipsec::new_psk()?;
            // The target answers IKE; this end initiates once the target is ready.
            let _: VpnEnd = Call::VpnUp {
                iface: u.ends.peer_iface.clone(),
                addr: u.peer_addr.clone(),
                port: 4500,
                peer_public: String::new(),
                peer_endpoint: SocketAddr::new(me, 4500).to_string(),
                peer_allowed: host(my_ip),
                backend: VpnBackend::Ipsec,
                psk: Some(psk.clone()),
            }
            .send(&mut link)
            .context("the target's end")?;
            let end = ipsec::End {
                name: u.ends.iface.clone(),
                remote: peer_ip,
                inner: my_ip,
                peer_inner: peer_tunnel_ip,
                psk,
                initiate: true,
            };
            ipsec::up(&end).context("this end")
        })(),
    };
    if r.is_err() && u.backend == VpnBackend::Ipsec {
        // Nothing may stay half up at the target.
        let _: Result<serde_json::Value> = Call::VpnDown {
            iface: u.ends.peer_iface.clone(),
        }
        .send(&mut link);
    }
    link.close();
    r?;
    if !out.quiet {
        match u.backend {
            VpnBackend::Wireguard => println!(
                "tunnel up (WireGuard): {} ({}) <-> {} ({}) over {me}:{} <-> {peer_ip}:{}",
                my_ip, u.ends.iface, peer_tunnel_ip, u.ends.peer_iface, u.port, u.peer_port
            ),
            VpnBackend::Ipsec => println!(
                "tunnel up (IPsec, IKEv2, ESP AES-GCM in UDP): {my_ip} ({}) <-> {peer_tunnel_ip} ({}) over {me} <-> {peer_ip}",
                u.ends.iface, u.ends.peer_iface
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Both WireGuard ends: this one first (its public key goes to the target), then the target's,
/// then this end learns the target's key; this end is taken down again if anything fails.
fn wireguard_up(
    u: &UpArgs,
    link: &mut Link,
    me: IpAddr,
    peer_ip: IpAddr,
    my_ip: IpAddr,
    peer_tunnel_ip: IpAddr,
) -> Result<()> {
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
            backend: VpnBackend::Wireguard,
            psk: None,
        }
        .send(link)
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
    if r.is_err() {
        let _ = vpn::down(&u.ends.iface);
    }
    r
}
