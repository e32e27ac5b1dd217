//! Reading and applying entry metadata (mode, mtime, owner).

use crate::error::{IoContext, Result};
use crate::manifest::Meta;
use filetime::FileTime;
use std::fs::{self, Metadata};
use std::os::fd::AsRawFd;
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
    let mode = !is_link && have.is_none_or(|h| h.mode != want.mode || how.owner);
    let times =
        have.is_none_or(|h| h.mtime_sec != want.mtime_sec || h.mtime_nsec != want.mtime_nsec);
    let t = FileTime::from_unix_time(want.mtime_sec, want.mtime_nsec);
    if is_link {
        if times {
            filetime::set_symlink_file_times(path, t, t).ctx("set times on", path)?;
        }
        return Ok(());
    }
    if !mode && !times {
        return Ok(());
    }
    // chmod and utimes follow a symlink in the last component: hold the entry itself (never
    // a link that may have replaced it) and change it through that handle.
    let held = open_entry(path)?;
    let through = Path::new("/proc/self/fd").join(held.as_raw_fd().to_string());
    if mode {
        // chown clears setuid/setgid bits, so the mode is set after it.
        fs::set_permissions(&through, fs::Permissions::from_mode(want.mode)).ctx("chmod", path)?;
    }
    if times {
        filetime::set_file_mtime(&through, t).ctx("set times on", path)?;
    }
    Ok(())
}

/// Open the entry at `path` itself (`O_PATH | O_NOFOLLOW`), refusing a symlink there.
fn open_entry(path: &Path) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        crate::error::Error::Conflict {
            path: path.into(),
            why: "contains a NUL byte".into(),
        }
    })?;
    // SAFETY: `c` is a valid NUL-terminated string.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).ctx("open", path);
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero stat is a valid value for fstat to fill; `fd` is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).ctx("stat", path);
    }
    if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Err(crate::error::Error::Conflict {
            path: path.into(),
            why: "became a symlink; it is not followed".into(),
        });
    }
    Ok(fd)
}
