//! The commands the source sends the target's agent, and the answers, as JSON in the
//! engine's agent messages.

use anyhow::{Context, Result};
use hop_engine::net::Link;
use serde::{Deserialize, Serialize};

/// Where a migration's files live under the target's root.
pub fn migration_dir(id: &str) -> String {
    format!(".hop/migrate/{id}")
}

/// Where a migration's images land under the target's root.
pub fn images_dir(id: &str) -> String {
    format!("{}/images", migration_dir(id))
}

/// Where a container's bundle lands under the target's root.
pub fn bundle_dir(container: &str) -> String {
    format!("containers/{container}")
}

/// A migration or container id safe to use as one path component.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// What happens to established TCP connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tcp {
    /// They are part of the state and restored (their addresses must exist at the target).
    pub established: bool,
    /// They are closed at the freeze and restored closed; clients reconnect.
    pub close: bool,
}

/// What is restored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Kind {
    /// A process tree (CRIU directly).
    Process {
        /// Dumped with --shell-job.
        shell_job: bool,
    },
    /// A runc container, whose bundle is at [`bundle_dir`].
    Runc {
        /// Container id, kept across the move.
        container: String,
    },
}

/// A command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Call {
    /// What the target can do, and its clock; changes nothing. Answered with a [`Checked`].
    Check,
    /// A migration starts on this connection: can the target restore? Answered with a
    /// [`Checked`]. If the connection ends before [`Call::Commit`], the target removes the
    /// migration's files (unless `keep_images`) and stops any restored copy.
    Begin {
        /// Migration id.
        id: String,
        /// Keep the images even then.
        keep_images: bool,
    },
    /// Restore from [`images_dir`]`(id)`; answered with a [`Restored`] once it runs. It stays
    /// provisional until [`Call::Commit`]: if the connection ends first, the agent kills it.
    Restore {
        /// Migration id.
        id: String,
        /// What to restore.
        kind: Kind,
        /// Established TCP connections: restored, or restored closed.
        tcp: Tcp,
        /// Restore lazily: running at once, memory brought in afterwards from the images.
        #[serde(default)]
        lazy: bool,
    },
    /// The source gave the application up: the restored copy stays.
    Commit {
        /// Migration id.
        id: String,
    },
    /// Remove the migration's files (its images).
    Cleanup {
        /// Migration id.
        id: String,
    },
    /// Bring up the target's end of a WireGuard tunnel to the caller; answered with a
    /// [`VpnEnd`] (the target's public key).
    VpnUp {
        /// Interface name at the target.
        iface: String,
        /// The target's tunnel address, `IP/PREFIX`.
        addr: String,
        /// UDP port the target listens on.
        port: u16,
        /// The caller's public key.
        peer_public: String,
        /// Where the target reaches the caller, `IP:PORT`.
        peer_endpoint: String,
        /// The caller's tunnel address(es), `IP/PREFIX`.
        peer_allowed: String,
        /// WireGuard (the default) or IPsec.
        #[serde(default)]
        backend: VpnBackend,
        /// IPsec: the pre-shared key (64 hex digits), chosen by the caller for this tunnel.
        #[serde(default)]
        psk: Option<String>,
    },
    /// Take the target's end of a tunnel down.
    VpnDown {
        /// Interface name at the target.
        iface: String,
    },
}

impl Call {
    /// Send this command on `link` and read the answer.
    pub fn send<T: serde::de::DeserializeOwned>(&self, link: &mut Link) -> Result<T> {
        let answer = link.call(&serde_json::to_string(self)?)?;
        serde_json::from_str(&answer)
            .with_context(|| format!("bad answer from the target: {answer}"))
    }
}

/// What carries a site-to-site tunnel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum VpnBackend {
    /// WireGuard (userspace wireguard-go where the kernel has no module).
    #[default]
    Wireguard,
    /// strongSwan IPsec: IKEv2 with a pre-shared key, ESP (AES-GCM) in UDP (userspace
    /// kernel-libipsec where the kernel has no ESP).
    Ipsec,
}

/// The target's end of a tunnel.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VpnEnd {
    /// Its WireGuard public key.
    pub public: String,
}

/// The target's answer to [`Call::Check`] and [`Call::Begin`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Checked {
    /// CRIU's version there, if it has one that runs.
    pub criu: Option<String>,
    /// Why CRIU is unusable there.
    pub criu_problem: Option<String>,
    /// The agent runs as root (restores need it).
    pub root: bool,
    /// runc is installed.
    pub runc: bool,
    /// Bytes free under the server's root.
    pub free_bytes: u64,
    /// The target's host name.
    pub host: String,
    /// The target kernel's boot id: equal to the source's when both "hosts" share one kernel
    /// (namespaces on one machine), where a restored process needs its old PID back first.
    #[serde(default)]
    pub boot_id: String,
    /// The target's clock when it answered, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub unix_ms: u64,
}

/// This host's clock in milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// This kernel's boot id.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The target's answer to [`Call::Restore`].
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Restored {
    /// PID of the restored process (container init for runc).
    pub pid: u32,
    /// Wall time of the restore, until the application ran.
    pub restore_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_single_safe_components() {
        for ok in ["redis", "web-1", "a.b_c", "x".repeat(128).as_str()] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "x\0",
            &"x".repeat(129),
        ] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn calls_round_trip_as_json() {
        let b = Call::Begin {
            id: "m1".into(),
            keep_images: false,
        };
        let s = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Call>(&s).unwrap(), b);
        let c = Call::Restore {
            id: "m1".into(),
            kind: Kind::Runc {
                container: "web".into(),
            },
            tcp: Tcp {
                established: true,
                close: false,
            },
            lazy: true,
        };
        let s = serde_json::to_string(&c).unwrap();
        assert!(s.contains("\"op\":\"restore\""), "{s}");
        assert_eq!(serde_json::from_str::<Call>(&s).unwrap(), c);
        assert!(serde_json::from_str::<Call>("{\"op\":\"format_disk\"}").is_err());
    }
}
