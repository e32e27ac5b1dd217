//! `hop keygen --out DIR`: create a long-lived identity and print its fingerprint.

use super::Output;
use crate::identity;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;
use std::process::ExitCode;

/// Create an identity (private key, mode 0600, and self-signed certificate) in DIR and print its
/// fingerprint, the only line on standard output.
///
/// Give the fingerprint to the peers that should trust this host: a server lists client
/// fingerprints in its authorized-keys file, a client records server fingerprints in its
/// known-hosts file.
#[derive(Args, Debug)]
#[command(after_help = "Examples:
  hop keygen --out /etc/hop/identity
  hop keygen --out ~/.config/hop/identity >> /tmp/my-fingerprint
  hop keygen --out /etc/hop/identity --show   print the fingerprint of an existing identity")]
pub struct KeygenArgs {
    /// Directory for key.pem and cert.pem (created, mode 0700, if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace an existing identity (peers must then trust the new fingerprint).
    #[arg(long, conflicts_with = "show")]
    pub force: bool,
    /// Do not create anything: check the identity in DIR and print its fingerprint.
    #[arg(long)]
    pub show: bool,
}

/// Run `hop keygen`.
pub fn run(a: KeygenArgs, _out: Output) -> Result<ExitCode> {
    let id = if a.show {
        identity::load(&a.out)?
    } else {
        identity::generate(&a.out, a.force)?
    };
    println!("{}", id.fingerprint);
    Ok(ExitCode::SUCCESS)
}
