//! Relative paths as they travel between sender and receiver.
//!
//! A `RelPath` is a sequence of non-empty components joined by `/`, stored as raw bytes so that
//! names that are not UTF-8 survive. It never starts with `/`, never contains `.`, `..`, an
//! empty component or a NUL byte: a peer cannot name anything outside the tree it syncs.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Longest path accepted from a peer, in bytes (Linux's PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

/// A validated relative path inside a synced tree. The empty path names the tree's root.
/// Deserializing validates, so no unsafe path can be decoded from a peer's bytes.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
#[serde(try_from = "Vec<u8>", into = "Vec<u8>")]
pub struct RelPath(Vec<u8>);

/// The path as text in quotes (bytes that are not UTF-8 shown escaped), `"."` for the root:
/// what logs and messages show.
impl std::fmt::Debug for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            return f.write_str("\".\"");
        }
        match std::str::from_utf8(&self.0) {
            Ok(text) => write!(f, "{text:?}"),
            Err(_) => write!(f, "\"{}\"", self.0.escape_ascii()),
        }
    }
}

impl TryFrom<Vec<u8>> for RelPath {
    type Error = Error;
    fn try_from(v: Vec<u8>) -> Result<Self> {
        RelPath::from_bytes(v)
    }
}

impl From<RelPath> for Vec<u8> {
    fn from(p: RelPath) -> Vec<u8> {
        p.0
    }
}

impl RelPath {
    /// The root of the tree.
    pub fn root() -> Self {
        RelPath(Vec::new())
    }

    /// Validate raw bytes received from a peer or read from a manifest.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        let unsafe_path = |why| Error::UnsafePath {
            path: String::from_utf8_lossy(&bytes).into_owned(),
            why,
        };
        if bytes.is_empty() {
            return Ok(RelPath(bytes));
        }
        if bytes.len() > MAX_PATH_LEN {
            return Err(unsafe_path("longer than 4096 bytes"));
        }
        if bytes.contains(&0) {
            return Err(unsafe_path("contains a NUL byte"));
        }
        if bytes[0] == b'/' {
            return Err(unsafe_path("is absolute"));
        }
        for comp in bytes.split(|&b| b == b'/') {
            match comp {
                b"" => return Err(unsafe_path("has an empty component")),
                b"." => return Err(unsafe_path("has a '.' component")),
                b".." => return Err(unsafe_path("has a '..' component")),
                c if c.len() > 255 => return Err(unsafe_path("has a component over 255 bytes")),
                _ => {}
            }
        }
        Ok(RelPath(bytes))
    }

    /// `self/name` for a single, valid file name.
    pub fn join(&self, name: &OsStr) -> Result<Self> {
        let mut v = self.0.clone();
        if !v.is_empty() {
            v.push(b'/');
        }
        v.extend_from_slice(name.as_bytes());
        RelPath::from_bytes(v)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// True for the tree's root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The parent path (the root's parent is the root).
    pub fn parent(&self) -> RelPath {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => RelPath(self.0[..i].to_vec()),
            None => RelPath::root(),
        }
    }

    /// The last component (empty for the root).
    pub fn file_name(&self) -> &OsStr {
        let start = self.0.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
        OsStr::from_bytes(&self.0[start..])
    }

    /// Depth: number of components.
    pub fn depth(&self) -> usize {
        if self.0.is_empty() {
            0
        } else {
            self.0.iter().filter(|&&b| b == b'/').count() + 1
        }
    }

    /// True when `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &RelPath) -> bool {
        other.0.is_empty()
            || (self.0.starts_with(&other.0)
                && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/'))
    }

    /// The path under `base`.
    pub fn under(&self, base: &Path) -> PathBuf {
        if self.0.is_empty() {
            base.to_path_buf()
        } else {
            base.join(OsStr::from_bytes(&self.0))
        }
    }

    /// For display: lossy UTF-8, `.` for the root.
    pub fn display(&self) -> String {
        if self.0.is_empty() {
            ".".into()
        } else {
            String::from_utf8_lossy(&self.0).into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_escapes() {
        for bad in [
            &b"/etc/passwd"[..],
            b"..",
            b"a/../../b",
            b"a//b",
            b"a/./b",
            b"a/",
            b"a\0b",
        ] {
            assert!(
                RelPath::from_bytes(bad.to_vec()).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(RelPath::from_bytes(vec![b'a'; 5000]).is_err());
    }

    #[test]
    fn accepts_odd_but_safe_names() {
        for ok in [&b"a"[..], b"a/b/c", b"..a", b"a..", b"\xff\xfe/x", b"-rf"] {
            assert!(RelPath::from_bytes(ok.to_vec()).is_ok(), "{ok:?} refused");
        }
    }

    #[test]
    fn parent_name_depth() {
        let p = RelPath::from_bytes(b"a/b/c".to_vec()).unwrap();
        assert_eq!(p.parent().as_bytes(), b"a/b");
        assert_eq!(p.file_name(), "c");
        assert_eq!(p.depth(), 3);
        assert!(p.starts_with(&RelPath::from_bytes(b"a/b".to_vec()).unwrap()));
        assert!(!p.starts_with(&RelPath::from_bytes(b"a/bc".to_vec()).unwrap()));
        assert!(p.starts_with(&RelPath::root()));
    }
}
