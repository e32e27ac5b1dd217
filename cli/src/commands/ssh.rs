//! `hop sync DIR [user@]host:PATH`, like rsync over ssh: start a one-session `hop serve` on the
//! remote host through the user's ssh, with throwaway keys on both sides exchanged over the ssh
//! channel (so no key set-up is needed and ssh's host check vouches for the server's key), then
//! move the data over QUIC.

use crate::identity;
use anyhow::{bail, Context, Result};
use hop_engine::net::{ClientSettings, NetOptions, RemotePath};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `[user@]host:path` as typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshSpec {
    /// What ssh connects to (`user@host` or `host`).
    pub login: String,
    /// The host part, which QUIC connects to as well.
    pub host: String,
    /// The remote path (absolute, or relative to the remote home directory).
    pub path: String,
}

impl SshSpec {
    /// rsync's rule: a colon before any slash makes a path remote (`./a:b` stays local).
    pub fn parse(s: &str) -> Option<SshSpec> {
        if s.contains("://") {
            return None;
        }
        let (login, path) = s.split_once(':')?;
        if login.is_empty() || login.contains('/') {
            return None;
        }
        let host = login.rsplit('@').next().unwrap_or(login);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return None;
        }
        Some(SshSpec {
            login: login.to_string(),
            host: host.to_string(),
            path: path.to_string(),
        })
    }
}

/// A `hop serve --once` running on the remote host for this transfer.
pub struct Session {
    /// Where to sync to or from.
    pub remote: RemotePath,
    /// The throwaway client identity and the server key learnt over ssh.
    pub cfg: ClientSettings,
    child: Child,
    _scratch: tempfile::TempDir,
}

impl Session {
    /// Start the remote server with `rsh` (e.g. `ssh -p 2222`) and `remote_hop` (its path on the
    /// remote host).
    pub fn start(spec: &SshSpec, rsh: &str, remote_hop: &str, net: NetOptions) -> Result<Session> {
        let scratch = tempfile::Builder::new()
            .prefix("hop-ssh-")
            .tempdir()
            .context("cannot create a temporary directory")?;
        let id = identity::generate(&scratch.path().join("id"), false)?;
        let (root, path) = match spec.path.strip_prefix('/') {
            Some(p) => ("/", p.to_string()),
            None => (".", spec.path.clone()),
        };
        let mut words = rsh.split_whitespace();
        let program = words.next().context("--rsh is empty")?;
        let mut cmd = Command::new(program);
        cmd.args(words)
            .arg(&spec.login)
            .arg(remote_hop)
            .args(["serve", "--ephemeral", "--once", "--listen", "0.0.0.0:0"])
            .args(["--root", root, "--authorize", &id.fingerprint])
            .arg("--timeout")
            .arg(net.timeout.as_secs().max(1).to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {program:?} (set the ssh command with -e)"))?;
        let mut line = String::new();
        let read = std::io::BufReader::new(child.stdout.take().context("no ssh stdout")?)
            .read_line(&mut line);
        let words: Vec<&str> = line.split_whitespace().collect();
        let (port, fp) = match (read, words.as_slice()) {
            (Ok(_), ["listening", "on", addr, "as", fp]) => {
                let port: u16 = addr
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .with_context(|| format!("bad address {addr:?} from the remote hop"))?;
                (port, fp.to_string())
            }
            _ => {
                let _ = child.kill();
                let st = child.wait().ok();
                bail!(
                    "could not start `{remote_hop} serve` on {} over `{rsh}` (exit {:?}); is hop installed there (--remote-hop PATH)?",
                    spec.login,
                    st.and_then(|s| s.code())
                );
            }
        };
        let remote = RemotePath {
            host: spec.host.clone(),
            port,
            path,
        };
        let known_hosts = scratch.path().join("known_hosts");
        std::fs::write(&known_hosts, format!("{} {fp}\n", remote.host_port()))?;
        Ok(Session {
            remote,
            cfg: ClientSettings {
                identity: id.credentials(),
                known_hosts,
                accept_new: false,
                net,
            },
            child,
            _scratch: scratch,
        })
    }

    /// Let the remote server finish (it exits after the session), or stop it.
    pub fn finish(mut self) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsync_remote_syntax() {
        let s = SshSpec::parse("alice@web1:/srv/app").unwrap();
        assert_eq!(
            (s.login.as_str(), s.host.as_str(), s.path.as_str()),
            ("alice@web1", "web1", "/srv/app")
        );
        let s = SshSpec::parse("web1:data").unwrap();
        assert_eq!((s.host.as_str(), s.path.as_str()), ("web1", "data"));
        assert!(SshSpec::parse("./a:b").is_none());
        assert!(SshSpec::parse("/abs/a:b").is_none());
        assert!(SshSpec::parse("plain").is_none());
        assert!(SshSpec::parse("quic://h:1/x").is_none());
    }
}
