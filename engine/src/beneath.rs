//! Reaching an entry under the destination's root through open directory handles, never by
//! re-resolving its path from the root.
//!
//! The receiver checks every path it is sent (no `..`, no absolute path, every parent listed
//! as a directory) and replaces a symlink that stands where a directory must be. That is not
//! enough on a host where someone else can write into the destination: between the check and
//! the write, a directory on the way could be swapped for a symlink pointing out of the root.
//! So every write goes through [`Parent`]: the entry's directory is opened one component at a
//! time, each relative to the previous one with `O_NOFOLLOW | O_DIRECTORY` (openat-style), so
//! a symlink anywhere below the root is refused whatever the path says and whatever changes
//! meanwhile; the operation then names the entry through the open handle
//! (`/proc/self/fd/N/NAME`), which the kernel resolves to that very directory.

use crate::error::{Error, Result};
use crate::path::RelPath;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The open directory holding one entry, and how to name the entry through it.
#[derive(Debug)]
pub struct Parent {
    /// Keeps the handle (and so the bridge path) valid.
    _dir: Option<OwnedFd>,
    /// `/proc/self/fd/N/NAME`: the entry, reached through the open handle.
    through: PathBuf,
    /// `/proc/self/fd/N`: the directory, reached through the open handle.
    bridge: PathBuf,
    /// The entry's real path, for messages.
    shown: PathBuf,
}

fn open_at(dir: Option<&OwnedFd>, name: &[u8], follow: bool) -> std::io::Result<OwnedFd> {
    let c = CString::new(name).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    let at = dir.map(|d| d.as_raw_fd()).unwrap_or(libc::AT_FDCWD);
    // SAFETY: `c` is a valid NUL-terminated string and `at` an open descriptor or AT_FDCWD.
    let fd = unsafe { libc::openat(at, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Parent {
    /// Open the directory holding `rel` under `root` (the root itself may be reached through
    /// symlinks: the operator chose it). For the root entry itself, `root` is used as it is.
    pub fn of(root: &Path, rel: &RelPath) -> Result<Parent> {
        let shown = rel.under(root);
        if rel.is_root() {
            return Ok(Parent {
                _dir: None,
                through: root.to_path_buf(),
                bridge: root.to_path_buf(),
                shown,
            });
        }
        let mut dir =
            open_at(None, root.as_os_str().as_bytes(), true).map_err(|source| Error::Io {
                op: "open directory",
                path: root.into(),
                source,
            })?;
        let parent = rel.parent();
        let mut walked = root.to_path_buf();
        if !parent.is_root() {
            for comp in parent.as_bytes().split(|&b| b == b'/') {
                walked.push(std::ffi::OsStr::from_bytes(comp));
                dir = open_at(Some(&dir), comp, false).map_err(|source| {
                    match source.raw_os_error() {
                        Some(libc::ENOTDIR | libc::ELOOP) => Error::Conflict {
                            path: walked.clone(),
                            why: "is not a directory (symlinks inside the destination are \
                                  never followed); nothing was written below it"
                                .into(),
                        },
                        _ => Error::Io {
                            op: "open directory",
                            path: walked.clone(),
                            source,
                        },
                    }
                })?;
            }
        }
        let bridge = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        Ok(Parent {
            through: bridge.join(rel.file_name()),
            bridge,
            _dir: Some(dir),
            shown,
        })
    }

    /// The entry, named through the open directory: the path to give system calls.
    pub fn path(&self) -> &Path {
        &self.through
    }

    /// The entry's real path, for messages.
    pub fn shown(&self) -> &Path {
        &self.shown
    }

    /// `err` with the paths through the handle turned back into real ones.
    pub fn explain(&self, err: Error) -> Error {
        let real_dir = self.shown.parent().unwrap_or(Path::new("/"));
        let fix = |p: PathBuf| match p.strip_prefix(&self.bridge) {
            Ok(rest) if self._dir.is_some() => real_dir.join(rest),
            _ => p,
        };
        match err {
            Error::Io { op, path, source } => Error::Io {
                op,
                path: fix(path),
                source,
            },
            Error::Conflict { path, why } => Error::Conflict {
                path: fix(path),
                why,
            },
            Error::SourceChanged { path } => Error::SourceChanged { path: fix(path) },
            Error::Integrity {
                what,
                expected,
                actual,
            } if self._dir.is_some() => Error::Integrity {
                what: what.replace(&*self.bridge.to_string_lossy(), &real_dir.to_string_lossy()),
                expected,
                actual,
            },
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(s: &str) -> RelPath {
        RelPath::from_bytes(s.as_bytes().to_vec()).unwrap()
    }

    #[test]
    fn reaches_entries_through_the_handle_and_never_through_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();

        let p = Parent::of(&root, &rel("a/b/f")).unwrap();
        std::fs::write(p.path(), b"x").unwrap();
        assert_eq!(std::fs::read(root.join("a/b/f")).unwrap(), b"x");
        assert_eq!(p.shown(), root.join("a/b/f"));

        // The directory is swapped for a symlink out of the root after it was checked: the
        // handle still names the old directory, nothing lands outside.
        let held = Parent::of(&root, &rel("a/b/g")).unwrap();
        std::fs::rename(root.join("a/b"), root.join("a/old")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/b")).unwrap();
        std::fs::write(held.path(), b"y").unwrap();
        assert_eq!(std::fs::read(root.join("a/old/g")).unwrap(), b"y");
        assert!(!outside.join("g").exists());

        // Opened afresh, the symlink is refused with the real path in the message.
        let err = Parent::of(&root, &rel("a/b/h")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&*root.join("a/b").to_string_lossy()), "{msg}");
        assert!(msg.contains("never followed"), "{msg}");
        // A file on the way is refused the same way.
        std::fs::write(root.join("file"), b"").unwrap();
        assert!(matches!(
            Parent::of(&root, &rel("file/x")),
            Err(Error::Conflict { .. })
        ));

        // Errors name real paths.
        let missing = Parent::of(&root, &rel("a/old/none")).unwrap();
        let err = std::fs::read(missing.path())
            .map_err(|source| Error::Io {
                op: "read",
                path: missing.path().into(),
                source,
            })
            .unwrap_err();
        let msg = missing.explain(err).to_string();
        assert!(
            msg.contains(&*root.join("a/old/none").to_string_lossy()),
            "{msg}"
        );

        // The root entry is the root path itself.
        assert_eq!(Parent::of(&root, &RelPath::root()).unwrap().path(), root);
    }
}
