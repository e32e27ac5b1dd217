//! QUIC endpoints: TLS 1.3 configuration with pinned keys, transport settings for long fat
//! links, and UDP sockets with large buffers.

use super::trust::{Admitted, AuthorizedClients, PinnedServer};
use crate::error::{Error, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

/// ALPN protocol name: the wire protocol's name and major version.
pub const ALPN: &[u8] = b"hop/1";

/// The largest receive window of one stream. quinn closes a connection whose peer left more
/// than 1,024 separate pieces in one stream's receive buffer ("too many gaps in stream
/// buffer"), and under burst loss (a congestion window overshooting a queue) every other
/// packet of a window can be missing: 2 MiB is fewer than 1,800 packets of 1,200 bytes, so
/// fewer than 900 gaps. A lane that needs a larger window uses several streams
/// ([`NetOptions::strands`]).
pub const STREAM_WINDOW: u64 = 2 << 20;

/// Server name sent in the handshake. Peers are authenticated by key fingerprint, not by name.
pub const SERVER_NAME: &str = "hop";

/// Transport settings.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// Streams (lanes) that carry chunks at once. Default: one per core, 2 to 8 (each lane
    /// assembles its files on a thread; on 2 cores, 2 lanes beat 4 and 8 by 5-30 % in the
    /// loopback benchmark).
    pub streams: usize,
    /// A peer silent for this long is dead; keep-alives are sent at a fifth of it.
    pub timeout: Duration,
    /// Receive window of a lane in bytes: what may be in flight towards one lane, spread over
    /// [`NetOptions::strands`] streams of at most [`STREAM_WINDOW`] each; the connection
    /// window is four times this. For full speed it must exceed the link's bandwidth-delay
    /// product (1 Gbit/s x 50 ms = 6.25 MB).
    pub window: u64,
    /// UDP socket send and receive buffer sizes in bytes.
    pub udp_buffer: usize,
    /// Congestion controller of the data this side sends.
    pub congestion: Congestion,
}

/// A QUIC congestion controller (quinn's implementations).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (RFC 9438), the default: as Linux TCP uses.
    #[default]
    Cubic,
    /// BBR (quinn's experimental BBRv1): paces at the measured bottleneck rate instead of
    /// backing off on every loss.
    Bbr,
    /// NewReno (RFC 9002's reference controller).
    NewReno,
}

impl std::str::FromStr for Congestion {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            "newreno" | "new-reno" | "reno" => Ok(Congestion::NewReno),
            _ => Err(Error::Transport(format!(
                "unknown congestion controller {s:?} (cubic, bbr, newreno)"
            ))),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Congestion::Cubic => "cubic",
            Congestion::Bbr => "bbr",
            Congestion::NewReno => "newreno",
        })
    }
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            streams: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .clamp(2, 8),
            timeout: Duration::from_secs(15),
            window: 16 << 20,
            udp_buffer: 8 << 20,
            congestion: Congestion::default(),
        }
    }
}

impl NetOptions {
    /// The lane window, within the range the transport accepts (64 KiB to 1 GiB).
    fn lane_window(&self) -> u64 {
        self.window.clamp(64 << 10, 1 << 30)
    }

    /// Streams per lane: as many streams of at most [`STREAM_WINDOW`] as hold the lane's
    /// window (8 for the default 16 MiB), at most 64 (so 8 lanes stay well within the 1,024
    /// concurrent streams a peer may open).
    pub fn strands(&self) -> usize {
        (self.lane_window().div_ceil(STREAM_WINDOW) as usize).clamp(1, 64)
    }
}

/// An identity in PEM form: a certificate and its private key.
#[derive(Clone)]
pub struct Credentials {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM private key.
    pub key_pem: String,
}

impl Credentials {
    fn parse(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let cert = CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| Error::Trust(format!("identity certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| Error::Trust(format!("identity key: {e}")))?;
        Ok((vec![cert], key))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport(o: &NetOptions) -> Result<Arc<quinn::TransportConfig>> {
    let mut t = quinn::TransportConfig::default();
    let idle = quinn::IdleTimeout::try_from(o.timeout)
        .map_err(|_| Error::Transport(format!("timeout {:?} out of range", o.timeout)))?;
    let window = o.lane_window();
    let varint = |v: u64| quinn::VarInt::from_u64(v).unwrap_or(quinn::VarInt::MAX);
    t.max_idle_timeout(Some(idle))
        .keep_alive_interval(Some((o.timeout / 5).max(Duration::from_millis(200))))
        .stream_receive_window(varint(window.min(STREAM_WINDOW)))
        .receive_window(varint(window * 4))
        .send_window(window * 4)
        .max_concurrent_bidi_streams(varint(1024))
        // One push stream per request (see `net::pushed`); a few in flight at the turn of
        // requests.
        .max_concurrent_uni_streams(varint(4));
    match o.congestion {
        Congestion::Cubic => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
        Congestion::Bbr => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        Congestion::NewReno => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::NewRenoConfig::default()))
        }
    };
    Ok(Arc::new(t))
}

/// A UDP socket bound to `addr` with large buffers (as root the system limit is bypassed).
fn udp_socket(addr: SocketAddr, buffer: usize) -> Result<UdpSocket> {
    let sock = UdpSocket::bind(addr).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (another program listens there; choose another --listen port)"
        } else {
            ""
        };
        Error::Transport(format!("cannot bind UDP {addr}: {e}{hint}"))
    })?;
    let fd = sock.as_raw_fd();
    let size = buffer.min(i32::MAX as usize) as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int.
        unsafe {
            let p = &size as *const libc::c_int as *const libc::c_void;
            let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            if libc::setsockopt(fd, libc::SOL_SOCKET, force, p, len) != 0 {
                libc::setsockopt(fd, libc::SOL_SOCKET, plain, p, len);
            }
        }
    }
    Ok(sock)
}

fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
    o: &NetOptions,
) -> Result<quinn::Endpoint> {
    let sock = udp_socket(addr, o.udp_buffer)?;
    // Zero-length connection ids: 8 bytes less in every packet (0.6 % of the bytes on the
    // wire). Connections are then told apart by address, so one that changes address (NAT
    // rebinding) ends with a timeout error, and re-running the sync resumes it.
    let mut config = quinn::EndpointConfig::default();
    config.cid_generator(|| Box::new(NoCid));
    quinn::Endpoint::new(config, server, sock, Arc::new(quinn::TokioRuntime))
        .map_err(|e| Error::Transport(format!("cannot start QUIC on {addr}: {e}")))
}

/// A server endpoint listening on `listen`, presenting `id`, admitting only clients whose key is
/// [`Admitted`]. Must be called inside a tokio runtime.
pub fn server_endpoint(
    listen: SocketAddr,
    id: &Credentials,
    admitted: Admitted,
    o: &NetOptions,
) -> Result<quinn::Endpoint> {
    let provider = provider();
    let (certs, key) = id.parse()?;
    let verifier = Arc::new(AuthorizedClients {
        admitted,
        provider: provider.clone(),
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Trust(format!("TLS: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| Error::Trust(format!("identity: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| Error::Trust(format!("TLS for QUIC: {e}")))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(o)?);
    endpoint(listen, Some(cfg), o)
}

/// A client endpoint (on an ephemeral port of the right address family) whose connections
/// present `id` and accept the server only as `pin` says. Must be called inside a tokio runtime.
pub fn client_endpoint(
    peer: SocketAddr,
    id: &Credentials,
    pin: PinnedServer,
    o: &NetOptions,
) -> Result<quinn::Endpoint> {
    let (certs, key) = id.parse()?;
    let provider = pin.provider.clone();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Trust(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(pin))
        .with_client_auth_cert(certs, key)
        .map_err(|e| Error::Trust(format!("identity: {e}")))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| Error::Trust(format!("TLS for QUIC: {e}")))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(o)?);
    let local: SocketAddr = if peer.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let mut ep = endpoint(local, None, o)?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

/// Zero-length connection ids.
struct NoCid;

impl quinn::ConnectionIdGenerator for NoCid {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&[])
    }
    fn cid_len(&self) -> usize {
        0
    }
    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// The crypto provider used for verifying peers' signatures.
pub fn pinned_provider() -> Arc<rustls::crypto::CryptoProvider> {
    provider()
}

/// Close `conn` and return once its CONNECTION_CLOSE has been handed to the socket (at most
/// `limit`), instead of waiting out the draining period (three probe timeouts, a quarter of a
/// second at 40 ms RTT) as [`quinn::Endpoint::wait_idle`] does: the peer learns of the close at
/// once, and this side has nothing left to say. A lost close costs the peer its idle timeout.
pub async fn close_promptly(conn: &quinn::Connection, code: u32, reason: &[u8], limit: Duration) {
    let sent = conn.stats().udp_tx.datagrams;
    conn.close(code.into(), reason);
    let t0 = std::time::Instant::now();
    while conn.stats().udp_tx.datagrams == sent && t0.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
