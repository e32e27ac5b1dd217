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
//!
//! A sync opens the same directories again and again (45,000 files of a root file system took
//! 370,000 `openat` calls, one per path component of every entry): [`Dirs`] keeps the handles
//! it opened, each reached the same way, for the entries that follow. A handle names the
//! directory it was opened on, wherever that directory is later moved: that was already so
//! between the walk and the write of each entry, and is now so for the handle's lifetime (a
//! sync, or until the receiver removes a directory itself, see [`Dirs::forget_all`]).

use crate::error::{Error, Result};
use crate::path::RelPath;
use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The open directory holding one entry, and how to name the entry through it.
#[derive(Debug)]
pub struct Parent {
    /// Keeps the handle (and so the bridge path) valid.
    _dir: Option<Arc<OwnedFd>>,
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
        Dirs::new(root).parent_of(rel)
    }

    /// The entry `rel` reached through `dir`, the open handle of its directory.
    fn through(root: &Path, rel: &RelPath, dir: Arc<OwnedFd>) -> Parent {
        let bridge = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        Parent {
            through: bridge.join(rel.file_name()),
            bridge,
            _dir: Some(dir),
            shown: rel.under(root),
        }
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

/// Handles of directories under one root, opened one component at a time without following
/// symlinks (as [`Parent::of`] does) and kept for the entries that follow, so that the entries
/// of one directory cost one `openat` together instead of one per component each. At most
/// [`Dirs::KEPT`] handles are kept.
#[derive(Debug)]
pub struct Dirs {
    root: PathBuf,
    open: Mutex<HashMap<RelPath, Arc<OwnedFd>>>,
}

impl Dirs {
    /// Handles kept at most; past that, all are let go (the ones in use stay open until their
    /// [`Parent`]s are dropped).
    pub const KEPT: usize = 128;

    /// No handles yet, for entries under `root`.
    pub fn new(root: &Path) -> Dirs {
        Dirs {
            root: root.to_path_buf(),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Let go of every handle (the receiver removed a directory: a handle to it, or to one
    /// below it, must not be used again).
    pub fn forget_all(&self) {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// The directory holding `rel`, from a kept handle or opened from the nearest kept
    /// ancestor (or the root) down. For the root entry itself, the root path is used as it is.
    pub fn parent_of(&self, rel: &RelPath) -> Result<Parent> {
        let root = &self.root;
        if rel.is_root() {
            return Ok(Parent {
                _dir: None,
                through: root.to_path_buf(),
                bridge: root.to_path_buf(),
                shown: rel.under(root),
            });
        }
        let parent = rel.parent();
        // The nearest kept ancestor (the parent itself, most of the time), and the components
        // still to open below it.
        let (kept, below) = {
            let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            let mut at = parent.clone();
            loop {
                if let Some(d) = open.get(&at) {
                    break (Some(d.clone()), at);
                }
                if at.is_root() {
                    break (None, at);
                }
                at = at.parent();
            }
        };
        let mut opened = Vec::new();
        let mut dir = match kept {
            Some(d) => d,
            None => {
                let d = open_at(None, root.as_os_str().as_bytes(), true).map_err(|source| {
                    Error::Io {
                        op: "open directory",
                        path: root.into(),
                        source,
                    }
                })?;
                let d = Arc::new(d);
                opened.push((RelPath::root(), d.clone()));
                d
            }
        };
        let rest = &parent.as_bytes()[below.as_bytes().len()..];
        let mut walked = below.under(root);
        let mut at = below;
        for comp in rest.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            walked.push(std::ffi::OsStr::from_bytes(comp));
            let d =
                open_at(Some(&dir), comp, false).map_err(|source| match source.raw_os_error() {
                    Some(libc::ENOTDIR | libc::ELOOP) => Error::Conflict {
                        path: walked.clone(),
                        why: "is not a directory (symlinks inside the destination are never \
                          followed); nothing was written below it"
                            .into(),
                    },
                    _ => Error::Io {
                        op: "open directory",
                        path: walked.clone(),
                        source,
                    },
                })?;
            at = at.join(std::ffi::OsStr::from_bytes(comp))?;
            dir = Arc::new(d);
            opened.push((at.clone(), dir.clone()));
        }
        if !opened.is_empty() {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            if open.len() + opened.len() > Self::KEPT {
                open.clear();
            }
            open.extend(opened);
        }
        Ok(Parent::through(root, rel, dir))
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

    /// Kept handles serve the entries that follow (from the nearest kept ancestor down), keep
    /// refusing symlinks on the way, and are let go on `forget_all` and past the bound.
    #[test]
    fn kept_handles_serve_later_entries_and_never_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let outside = d.path().join("outside");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let dirs = Dirs::new(&root);
        std::fs::write(dirs.parent_of(&rel("a/b/f")).unwrap().path(), b"x").unwrap();
        let kept = |dirs: &Dirs| dirs.open.lock().unwrap().len();
        assert_eq!(kept(&dirs), 3, "root, a, a/b");
        // Below a kept ancestor: only the new components are opened.
        std::fs::create_dir_all(root.join("a/c/d")).unwrap();
        std::fs::write(dirs.parent_of(&rel("a/c/d/f")).unwrap().path(), b"y").unwrap();
        assert_eq!(std::fs::read(root.join("a/c/d/f")).unwrap(), b"y");
        assert_eq!(kept(&dirs), 5);
        // Swapped for a symlink after it was opened: the kept handle names the directory.
        std::fs::rename(root.join("a/b"), root.join("a/old")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("a/b")).unwrap();
        std::fs::write(dirs.parent_of(&rel("a/b/g")).unwrap().path(), b"z").unwrap();
        assert_eq!(std::fs::read(root.join("a/old/g")).unwrap(), b"z");
        assert!(!outside.join("g").exists());
        // Let go, the path is walked again and the symlink refused.
        dirs.forget_all();
        let err = dirs.parent_of(&rel("a/b/h")).unwrap_err();
        assert!(err.to_string().contains("never followed"), "{err}");
        assert!(!outside.join("h").exists());
        // Never more than KEPT handles.
        for k in 0..(Dirs::KEPT + 20) {
            let name = format!("many/d{k}");
            std::fs::create_dir_all(root.join(&name)).unwrap();
            dirs.parent_of(&rel(&format!("{name}/f"))).unwrap();
            assert!(kept(&dirs) <= Dirs::KEPT);
        }
    }
}
