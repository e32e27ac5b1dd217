//! Who is who: fingerprints of public keys, the server's authorized client keys, the client's
//! known servers, and the rustls verifiers that pin them (instead of certificate authorities).

use crate::error::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// `sha256:<hex>` of a DER SubjectPublicKeyInfo: an identity's fingerprint. It names the key,
/// so it survives a renewal of the certificate with the same key.
pub fn fingerprint_of_spki(spki_der: &[u8]) -> String {
    let digest = Sha256::digest(spki_der);
    let mut s = String::from("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The fingerprint of the key in a DER certificate.
pub fn fingerprint_of_cert(der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| Error::Trust(format!("peer certificate does not parse: {e}")))?;
    Ok(fingerprint_of_spki(cert.public_key().raw))
}

/// Whether `s` is a well-formed fingerprint (`sha256:` and 64 lowercase hex digits).
pub fn is_fingerprint(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Read an authorized-keys file: one fingerprint per line, `#` starts a comment (a comment after
/// the fingerprint names the key's owner). A malformed line is an error, so a typo never
/// silently locks a client out (or in).
pub fn read_authorized_keys(path: &Path) -> Result<HashSet<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Trust(format!(
            "cannot read authorized keys {}: {e}",
            path.display()
        ))
    })?;
    let mut keys = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fp = line.split_whitespace().next().unwrap_or("");
        if !is_fingerprint(fp) {
            return Err(Error::Trust(format!(
                "{}:{}: not a key fingerprint (expected sha256:<64 hex digits>, as printed by `hop keygen`)",
                path.display(),
                n + 1
            )));
        }
        keys.insert(fp.to_string());
    }
    Ok(keys)
}

/// The client's list of servers it trusts: lines `HOST:PORT FINGERPRINT`.
#[derive(Debug, Clone)]
pub struct KnownHosts {
    path: PathBuf,
    entries: Vec<(String, String)>,
}

impl KnownHosts {
    /// Read the file; a missing file is an empty list. The read holds a shared lock on the file,
    /// so a line another client is adding is seen whole or not at all.
    pub fn load(path: &Path) -> Result<KnownHosts> {
        let cannot = |e: std::io::Error| {
            Error::Trust(format!("cannot read known hosts {}: {e}", path.display()))
        };
        let text = match std::fs::File::open(path) {
            Ok(mut f) => {
                lock_file(&f, libc::LOCK_SH).map_err(cannot)?;
                let mut t = String::new();
                f.read_to_string(&mut t).map_err(cannot)?;
                t
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(cannot(e)),
        };
        KnownHosts::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<KnownHosts> {
        let mut entries = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut it = line.split_whitespace();
            match (it.next(), it.next()) {
                (Some(h), Some(fp)) if is_fingerprint(fp) => {
                    entries.push((h.to_string(), fp.to_string()))
                }
                _ => {
                    return Err(Error::Trust(format!(
                        "{}:{}: expected `HOST:PORT sha256:<hex>`",
                        path.display(),
                        n + 1
                    )))
                }
            }
        }
        Ok(KnownHosts {
            path: path.to_path_buf(),
            entries,
        })
    }

    /// The file this list was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The fingerprint recorded for `host` (as `HOST:PORT`).
    pub fn lookup(&self, host: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, fp)| fp.as_str())
    }

    /// Append `host fingerprint` to the file (creating it and its directory), under an
    /// exclusive lock and as one write, so clients recording keys at once (the connections of
    /// a group migration) never mix their lines. A key another client recorded for `host`
    /// meanwhile is kept if it is the same and refused if it differs.
    pub fn add(&mut self, host: &str, fp: &str) -> Result<()> {
        let io = |e: std::io::Error| {
            Error::Trust(format!(
                "cannot record the server key in {}: {e}",
                self.path.display()
            ))
        };
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&self.path)
            .map_err(io)?;
        lock_file(&f, libc::LOCK_EX).map_err(io)?;
        let mut text = String::new();
        f.read_to_string(&mut text).map_err(io)?;
        let now = KnownHosts::parse(&self.path, &text)?;
        match now.lookup(host) {
            Some(seen) if seen == fp => {}
            Some(seen) => {
                return Err(Error::Trust(format!(
                    "{host}: another client recorded key {seen} in {} meanwhile, not {fp}",
                    self.path.display()
                )))
            }
            None => {
                let sep = if text.is_empty() || text.ends_with('\n') {
                    ""
                } else {
                    "\n"
                };
                f.write_all(format!("{sep}{host} {fp}\n").as_bytes())
                    .map_err(io)?;
            }
        }
        self.entries = now.entries;
        if self.lookup(host).is_none() {
            self.entries.push((host.to_string(), fp.to_string()));
        }
        Ok(())
    }
}

/// `flock(2)` the file (released when it is closed).
fn lock_file(f: &std::fs::File, op: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What the client learnt about the server's key during the handshake.
#[derive(Debug, Default, Clone)]
pub struct SeenKey(Arc<Mutex<Option<String>>>);

impl SeenKey {
    /// The fingerprint the peer presented, if it got that far.
    pub fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, fp: String) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(fp);
    }
}

/// The error for a key that is not trusted.
fn untrusted() -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
}

/// Both verifiers refuse TLS 1.2 (QUIC is TLS 1.3 only anyway).
fn no_tls12() -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::General("TLS 1.2 is not supported".into()))
}

/// A TLS 1.3 handshake signature, checked with the certificate's public key.
fn tls13_signature(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// The signature schemes the provider verifies.
fn schemes(provider: &CryptoProvider) -> Vec<SignatureScheme> {
    provider
        .signature_verification_algorithms
        .supported_schemes()
}

/// Client side: accept the server only if its key is the one recorded for it (or, with
/// `accept_new`, if nothing is recorded yet).
#[derive(Debug)]
pub struct PinnedServer {
    /// The recorded fingerprint, if any.
    pub expected: Option<String>,
    /// Trust a server seen for the first time (the caller records it after the handshake).
    pub accept_new: bool,
    /// Where the presented fingerprint is left for the caller's error messages.
    pub seen: SeenKey,
    /// Signature algorithms.
    pub provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint_of_cert(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        self.seen.set(fp.clone());
        match &self.expected {
            Some(e) if *e == fp => Ok(ServerCertVerified::assertion()),
            None if self.accept_new => Ok(ServerCertVerified::assertion()),
            _ => Err(untrusted()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

/// The client keys a server admits: those in an authorized-keys file, read afresh at every
/// handshake (so editing the file takes effect without a restart), and those given when the
/// server started (kept in memory, so a server needs no file of its own for them).
#[derive(Debug, Clone, Default)]
pub struct Admitted {
    /// The authorized-keys file, if any.
    pub file: Option<PathBuf>,
    /// Fingerprints admitted besides the file's.
    pub also: HashSet<String>,
}

impl Admitted {
    /// Admit the keys in `file`.
    pub fn file(file: PathBuf) -> Admitted {
        Admitted {
            file: Some(file),
            also: HashSet::new(),
        }
    }

    /// Whether `fp` is admitted now. An unreadable or malformed file is an error.
    pub fn admits(&self, fp: &str) -> Result<bool> {
        if self.also.contains(fp) {
            return Ok(true);
        }
        match &self.file {
            Some(path) => Ok(read_authorized_keys(path)?.contains(fp)),
            None => Ok(false),
        }
    }

    /// Check that the file (if any) reads, and that there is a file or a key given.
    pub fn check(&self) -> Result<()> {
        match &self.file {
            Some(path) => read_authorized_keys(path).map(|_| ()),
            None if self.also.is_empty() => Err(Error::Trust("no client key is admitted".into())),
            None => Ok(()),
        }
    }
}

impl std::fmt::Display for Admitted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.file {
            Some(path) => write!(f, "authorized keys: {}", path.display())?,
            None => write!(f, "no authorized-keys file")?,
        }
        if !self.also.is_empty() {
            write!(
                f,
                ", and {} key(s) given on the command line",
                self.also.len()
            )?;
        }
        Ok(())
    }
}

/// Server side: accept a client only if its key is [`Admitted`].
#[derive(Debug)]
pub struct AuthorizedClients {
    /// Who is admitted.
    pub admitted: Admitted,
    /// Signature algorithms.
    pub provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AuthorizedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let fp = fingerprint_of_cert(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        match self.admitted.admits(&fp) {
            Ok(true) => Ok(ClientCertVerified::assertion()),
            Ok(false) => {
                tracing::warn!("refused client key {fp}: not admitted ({})", self.admitted);
                Err(untrusted())
            }
            Err(e) => {
                tracing::error!("refused client key {fp}: {e}");
                Err(untrusted())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        no_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        tls13_signature(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admitted_keys_come_from_the_file_read_afresh_and_from_memory() {
        let d = tempfile::tempdir().unwrap();
        let (alice, bob) = (
            format!("sha256:{}", "ab".repeat(32)),
            format!("sha256:{}", "cd".repeat(32)),
        );
        let none = Admitted::default();
        assert!(none
            .check()
            .unwrap_err()
            .to_string()
            .contains("no client key"));
        let mut memory = Admitted::default();
        memory.also.insert(bob.clone());
        memory.check().unwrap();
        assert!(memory.admits(&bob).unwrap());
        assert!(!memory.admits(&alice).unwrap());

        let ak = d.path().join("ak");
        let mut both = Admitted::file(ak.clone());
        both.also.insert(bob.clone());
        assert!(
            both.check().is_err(),
            "a named file that is missing is an error"
        );
        std::fs::write(&ak, format!("{alice}\n")).unwrap();
        both.check().unwrap();
        assert!(both.admits(&alice).unwrap() && both.admits(&bob).unwrap());
        std::fs::write(&ak, "# nobody\n").unwrap();
        assert!(!both.admits(&alice).unwrap(), "the file is read afresh");
        assert!(both.admits(&bob).unwrap());
        std::fs::write(&ak, "garbage\n").unwrap();
        assert!(both.admits(&alice).is_err());
    }

    #[test]
    fn authorized_keys_and_known_hosts_files() {
        let d = tempfile::tempdir().unwrap();
        let fp = format!("sha256:{}", "ab".repeat(32));
        let ak = d.path().join("ak");
        std::fs::write(&ak, format!("# clients\n{fp} alice@laptop\n\n")).unwrap();
        assert!(read_authorized_keys(&ak).unwrap().contains(&fp));
        std::fs::write(&ak, "sha256:xyz\n").unwrap();
        let err = read_authorized_keys(&ak).unwrap_err().to_string();
        assert!(err.contains(":1:"), "{err}");

        let kh = d.path().join("sub/known_hosts");
        let mut k = KnownHosts::load(&kh).unwrap();
        assert_eq!(k.lookup("h:1"), None);
        k.add("h:1", &fp).unwrap();
        let k = KnownHosts::load(&kh).unwrap();
        assert_eq!(k.lookup("h:1"), Some(fp.as_str()));
        assert_eq!(k.lookup("h:2"), None);
    }

    #[test]
    fn clients_recording_keys_at_once_never_mix_their_lines() {
        let d = tempfile::tempdir().unwrap();
        let kh = d.path().join("known_hosts");
        let fp = |i: usize| format!("sha256:{}", format!("{i:02x}").repeat(32));
        // 16 clients that each loaded the empty file record the same server, and 16 others
        // one server each, all at once.
        let threads: Vec<_> = (0..32)
            .map(|i| {
                let kh = kh.clone();
                std::thread::spawn(move || {
                    let mut k = KnownHosts::load(&kh).unwrap();
                    if i < 16 {
                        k.add("same:1", &fp(1)).unwrap();
                    } else {
                        k.add(&format!("h:{i}"), &fp(i)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let k = KnownHosts::load(&kh).unwrap();
        assert_eq!(k.entries.len(), 17, "{:?}", std::fs::read_to_string(&kh));
        assert_eq!(k.lookup("same:1"), Some(fp(1).as_str()));
        assert_eq!(k.lookup("h:20"), Some(fp(20).as_str()));
        // One that loaded the file before another recorded a different key is refused.
        let mut stale = KnownHosts::load(&d.path().join("other")).unwrap();
        KnownHosts::load(&d.path().join("other"))
            .unwrap()
            .add("x:1", &fp(2))
            .unwrap();
        let err = stale.add("x:1", &fp(3)).unwrap_err().to_string();
        assert!(err.contains("meanwhile"), "{err}");
    }

    #[test]
    fn fingerprint_format() {
        assert!(is_fingerprint(&fingerprint_of_spki(b"x")));
        assert!(!is_fingerprint("sha256:AB"));
    }
}
