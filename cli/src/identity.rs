//! Long-lived identities for `hop serve` and remote `hop sync`: a private key and a self-signed
//! certificate in a directory, named by the fingerprint of the public key.
//!
//! The fingerprint is `sha256:` followed by the hex SHA-256 of the certificate's
//! SubjectPublicKeyInfo (DER), so it survives certificate renewal with the same key.

use anyhow::{bail, Context, Result};
use hop_engine::net::trust::fingerprint_of_spki;
use hop_engine::net::Credentials;
use rcgen::{CertificateParams, KeyPair, PublicKeyData};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// File name of the private key inside an identity directory.
pub const KEY_FILE: &str = "key.pem";
/// File name of the certificate inside an identity directory.
pub const CERT_FILE: &str = "cert.pem";

/// A loaded identity.
pub struct Identity {
    /// PEM of the private key.
    pub key_pem: String,
    /// PEM of the certificate.
    pub cert_pem: String,
    /// `sha256:<hex>` of the public key.
    pub fingerprint: String,
}

impl Identity {
    /// The PEM pair the transport presents.
    pub fn credentials(&self) -> Credentials {
        Credentials {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }
}

/// hop's configuration directory: `$XDG_CONFIG_HOME/hop` or `~/.config/hop`.
pub fn config_dir() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("/etc"))
        .join("hop")
}

/// Default identity directory.
pub fn default_identity() -> PathBuf {
    config_dir().join("identity")
}

/// Create a new identity in `dir` (created with mode 0700 if missing). Refuses to overwrite an
/// existing key unless `force`.
pub fn generate(dir: &Path, force: bool) -> Result<Identity> {
    let key_path = dir.join(KEY_FILE);
    if key_path.exists() && !force {
        bail!(
            "{} already exists; an identity is long-lived and peers trust its fingerprint. \
             Use --force to replace it (peers must then trust the new fingerprint).",
            key_path.display()
        );
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let key = KeyPair::generate().context("cannot generate a key pair")?;
    let host = hostname();
    let mut params =
        CertificateParams::new(vec![host.clone()]).context("certificate parameters")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("hop {host}"));
    let cert = params
        .self_signed(&key)
        .context("cannot self-sign the certificate")?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    let cert_path = dir.join(CERT_FILE);
    fs::write(&cert_path, cert.pem())
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    Ok(Identity {
        key_pem: key.serialize_pem(),
        cert_pem: cert.pem(),
        fingerprint: fingerprint_of_spki(&key.subject_public_key_info()),
    })
}

/// Load the identity in `dir`. Refuses a private key that others can read.
pub fn load(dir: &Path) -> Result<Identity> {
    let key_path = dir.join(KEY_FILE);
    let md = fs::metadata(&key_path).with_context(|| {
        format!(
            "cannot read identity key {} (create one with `hop keygen --out {}`)",
            key_path.display(),
            dir.display()
        )
    })?;
    let mode = md.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "private key {} is readable by others (mode {mode:o}); run `chmod 600 {}`",
            key_path.display(),
            key_path.display()
        );
    }
    let key_pem = fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read {}", key_path.display()))?;
    let cert_path: PathBuf = dir.join(CERT_FILE);
    let cert_pem = fs::read_to_string(&cert_path)
        .with_context(|| format!("cannot read {}", cert_path.display()))?;
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("{} is not a valid private key", key_path.display()))?;
    Ok(Identity {
        fingerprint: fingerprint_of_spki(&key.subject_public_key_info()),
        key_pem,
        cert_pem,
    })
}

fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("pem.tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_then_load_gives_the_same_fingerprint() {
        let d = tempfile::tempdir().unwrap();
        let id = generate(d.path(), false).unwrap();
        assert!(id.fingerprint.starts_with("sha256:") && id.fingerprint.len() == 7 + 64);
        assert_eq!(load(d.path()).unwrap().fingerprint, id.fingerprint);
        assert!(
            generate(d.path(), false).is_err(),
            "overwrote an identity without --force"
        );
        let id2 = generate(d.path(), true).unwrap();
        assert_ne!(id2.fingerprint, id.fingerprint);
    }

    #[test]
    fn refuses_a_readable_key() {
        let d = tempfile::tempdir().unwrap();
        generate(d.path(), false).unwrap();
        fs::set_permissions(d.path().join(KEY_FILE), fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(d.path()).err().unwrap().to_string();
        assert!(
            err.contains("readable by others") && err.contains("chmod 600"),
            "{err}"
        );
    }
}
