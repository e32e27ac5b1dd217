//! Reading and applying entry metadata (mode, mtime, owner).

use crate::error::{IoContext, Result};
use crate::manifest::Meta;
use filetime::FileTime;
use std::fs::{self, Metadata};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Metadata of an entry as `lstat` reports it.
pub fn from_metadata(md: &Metadata) -> Meta {
    Meta {
        mode: md.mode() & 0o7777,
        mtime_sec: md.mtime(),
        mtime_nsec: md.mtime_nsec() as u32,
        uid: md.uid(),
        gid: md.gid(),
    }
}

/// True when this process may change owners (it runs as root).
pub fn can_chown() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Which parts of the metadata to apply.
#[derive(Clone, Copy, Debug)]
pub struct Apply {
    /// Set owner and group (only as root).
    pub owner: bool,
}

/// Set an open file's metadata (owner, mode, mtime) through its descriptor.
pub fn apply_fd(file: &std::fs::File, path: &Path, want: &Meta, how: Apply) -> Result<()> {
    if how.owner {
        std::os::unix::fs::fchown(file, Some(want.uid), Some(want.gid)).ctx("chown", path)?;
    }
    file.set_permissions(fs::Permissions::from_mode(want.mode))
        .ctx("chmod", path)?;
    let t = FileTime::from_unix_time(want.mtime_sec, want.mtime_nsec);
    filetime::set_file_handle_times(file, Some(t), Some(t)).ctx("set times on", path)?;
    Ok(())
}

/// Make `path`'s metadata equal `want`, touching only what differs. `is_link` selects the
/// symlink-safe calls (links have no mode of their own on Linux).
pub fn apply(
    path: &Path,
    want: &Meta,
    have: Option<&Meta>,
    is_link: bool,
    how: Apply,
) -> Result<()> {
    if how.owner && have.is_none_or(|h| h.uid != want.uid || h.gid != want.gid) {
        std::os::unix::fs::lchown(path, Some(want.uid), Some(want.gid)).ctx("chown", path)?;
    }
    if !is_link && have.is_none_or(|h| h.mode != want.mode || how.owner) {
        // chown clears setuid/setgid bits, so the mode is set after it.
        fs::set_permissions(path, fs::Permissions::from_mode(want.mode)).ctx("chmod", path)?;
    }
    if have.is_none_or(|h| h.mtime_sec != want.mtime_sec || h.mtime_nsec != want.mtime_nsec) {
        let t = FileTime::from_unix_time(want.mtime_sec, want.mtime_nsec);
        if is_link {
            filetime::set_symlink_file_times(path, t, t).ctx("set times on", path)?;
        } else {
            filetime::set_file_mtime(path, t).ctx("set times on", path)?;
        }
    }
    Ok(())
}
