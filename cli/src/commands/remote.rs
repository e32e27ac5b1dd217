//! Options of every command that talks to a `hop serve`: keys, trust, transport.

use anyhow::Result;
use clap::Args;
use hop_engine::net::{ClientSettings, Congestion, NetOptions};
use std::path::PathBuf;
use std::time::Duration;

/// How this host identifies itself to servers, whom it trusts, and the transport settings.
#[derive(Args, Debug, Clone)]
pub struct RemoteArgs {
    /// Remote side: this host's identity directory [default: ~/.config/hop/identity].
    #[arg(long, value_name = "DIR")]
    pub identity: Option<PathBuf>,
    /// Remote side: file of trusted servers, lines `HOST:PORT FINGERPRINT`
    /// [default: ~/.config/hop/known_hosts].
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Remote side: trust a server not yet in --known-hosts and record it (like ssh's
    /// accept-new). A changed key is refused regardless.
    #[arg(long)]
    pub accept_new: bool,
    /// Remote side: streams carrying chunks at once (default: one per core, 2 to 8).
    #[arg(long, value_name = "N", default_value_t = NetOptions::default().streams)]
    pub streams: usize,
    /// Remote side: give up on a peer silent for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    pub timeout: u64,
    /// Remote side: QUIC flow-control window of a lane in bytes, spread over streams of 2 MiB
    /// (the connection's is four times this). Must exceed the link's bandwidth x round-trip
    /// time for full speed.
    #[arg(long, value_name = "BYTES", default_value = "16M", value_parser = crate::units::parse_size)]
    pub window: u64,
    /// Remote side: congestion controller for the data this side sends: cubic, bbr or newreno.
    #[arg(long, value_name = "ALGO", default_value_t = NetOptions::default().congestion)]
    pub congestion: Congestion,
}

impl RemoteArgs {
    /// Transport settings.
    pub fn net_options(&self) -> NetOptions {
        NetOptions {
            streams: self.streams.clamp(1, 64),
            timeout: Duration::from_secs(self.timeout.max(1)),
            window: self.window,
            congestion: self.congestion,
            ..NetOptions::default()
        }
    }

    /// The identity (loaded), known hosts and transport of a client.
    pub fn client_settings(&self) -> Result<ClientSettings> {
        let dir = self
            .identity
            .clone()
            .unwrap_or_else(crate::identity::default_identity);
        let id = crate::identity::load(&dir)?;
        Ok(ClientSettings {
            identity: id.credentials(),
            known_hosts: self
                .known_hosts
                .clone()
                .unwrap_or_else(|| crate::identity::config_dir().join("known_hosts")),
            accept_new: self.accept_new,
            net: self.net_options(),
        })
    }
}
