//! HAProxy's runtime API: hold an application's clients while it moves, then send them to its
//! new address. The recipe (verified on HAProxy 2.6, `../shared/notes/network-on-this-kernel.md`):
//! the backend has `http-request lua.hold_until_up BACKEND MS` (`scripts/haproxy/hold.lua`);
//! putting the server in MAINT parks new requests in that action instead of failing them;
//! requests in flight finish; after the restore the server gets its new address and READY, and
//! the parked requests go there.

use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One server of one backend, driven through an admin-level runtime socket.
#[derive(Debug, Clone)]
pub struct Hold {
    /// The stats socket (`stats socket PATH level admin`).
    pub socket: PathBuf,
    /// Backend name.
    pub backend: String,
    /// Server name in the backend.
    pub server: String,
}

/// What `show stat` says about the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStat {
    /// `UP`, `DOWN`, `MAINT`, `no check`, ...
    pub status: String,
    /// Sessions in flight on it.
    pub scur: u64,
    /// Its address, `IP:PORT`.
    pub addr: String,
}

/// Send one command and return the answer.
pub fn command(socket: &Path, cmd: &str) -> Result<String> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("cannot reach HAProxy's runtime socket {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{cmd}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .with_context(|| format!("no answer from {} to {cmd:?}", socket.display()))?;
    Ok(out)
}

/// Parse `show stat` CSV for one server: `status`, `scur` and `addr` columns by header name.
pub fn parse_stat(csv: &str, backend: &str, server: &str) -> Option<ServerStat> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (status, scur, addr) = (col("status")?, col("scur")?, col("addr"));
    lines.find_map(|l| {
        let f: Vec<&str> = l.split(',').collect();
        (f.first() == Some(&backend) && f.get(1) == Some(&server)).then(|| ServerStat {
            status: f.get(status).unwrap_or(&"").to_string(),
            scur: f.get(scur).and_then(|v| v.parse().ok()).unwrap_or(0),
            addr: addr.and_then(|a| f.get(a)).unwrap_or(&"").to_string(),
        })
    })
}

impl Hold {
    /// Parse `BACKEND/SERVER`.
    pub fn new(socket: PathBuf, server: &str) -> Result<Hold> {
        let Some((b, s)) = server.split_once('/') else {
            bail!("--haproxy-server {server:?}: expected BACKEND/SERVER");
        };
        Ok(Hold {
            socket,
            backend: b.to_string(),
            server: s.to_string(),
        })
    }

    fn name(&self) -> String {
        format!("{}/{}", self.backend, self.server)
    }

    /// The server's state now.
    pub fn stat(&self) -> Result<ServerStat> {
        let csv = command(&self.socket, "show stat")?;
        parse_stat(&csv, &self.backend, &self.server).with_context(|| {
            format!(
                "HAProxy at {} has no server {} (is the runtime socket `level admin`?)",
                self.socket.display(),
                self.name()
            )
        })
    }

    /// Prepare: the socket answers, the server exists and the hold action is configured.
    pub fn check(&self) -> Result<ServerStat> {
        let st = self.stat()?;
        let dump = command(&self.socket, "show info")?;
        if !dump.contains("Version") {
            bail!(
                "{} does not look like HAProxy's runtime socket",
                self.socket.display()
            );
        }
        Ok(st)
    }

    fn run(&self, cmd: &str) -> Result<()> {
        let out = command(&self.socket, cmd)?;
        let t = out.trim();
        if !t.is_empty() && !t.contains("changed") && !t.contains("no need") {
            bail!("HAProxy refused {cmd:?}: {t}");
        }
        Ok(())
    }

    /// Stop sending the server new requests (they wait in the hold action) and wait, at most
    /// `limit`, for the requests in flight to finish. Returns how long that took.
    pub fn hold(&self, limit: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        self.run(&format!("set server {} state maint", self.name()))?;
        loop {
            let st = self.stat()?;
            if st.scur == 0 {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > limit {
                tracing::warn!(
                    "{} still has {} requests in flight after {:?}; freezing anyway",
                    self.name(),
                    st.scur,
                    limit
                );
                return Ok(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Point the server at `addr` (`IP:PORT`), if given, and let the held requests go to it.
    pub fn release(&self, addr: Option<&str>) -> Result<()> {
        if let Some(addr) = addr {
            let (ip, port) = addr
                .rsplit_once(':')
                .with_context(|| format!("--haproxy-addr {addr:?}: expected IP:PORT"))?;
            self.run(&format!("set server {} addr {ip} port {port}", self.name()))?;
        }
        self.run(&format!("set server {} state ready", self.name()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_stat_is_read_by_column_name() {
        let csv = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,status,addr\n\
                   fe,FRONTEND,,,3,5,,10,OPEN,\n\
                   be,s1,0,0,2,4,,9,MAINT,127.0.0.1:8080\n\
                   be,BACKEND,0,0,2,4,,9,DOWN,\n";
        assert_eq!(
            parse_stat(csv, "be", "s1"),
            Some(ServerStat {
                status: "MAINT".into(),
                scur: 2,
                addr: "127.0.0.1:8080".into()
            })
        );
        assert_eq!(parse_stat(csv, "be", "s2"), None);
        assert!(Hold::new("/x".into(), "nobackend").is_err());
    }
}
