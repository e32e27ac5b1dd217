//! End-to-end tests of `hop sync` between local paths, through the real binary.

#[macro_use]
mod util;

use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use util::*;

fn s(p: &std::path::Path) -> &OsStr {
    p.as_os_str()
}

#[test]
fn fresh_copy_is_identical_with_modes_times_links_and_holes() {
    let d = Dir::new();
    let src = sample_tree(&d);
    let dst = d.path("dst");
    let st = sync_stats(&[OsStr::new("-a"), s(&d.path("src/")), s(&dst)]);
    assert_same_tree(&src, &dst);
    assert_eq!(st["files"], 5);
    let total = st["bytes_total"].as_u64().unwrap();
    assert_eq!(
        total,
        fs::metadata(src.join("big.img")).unwrap().len() + 12 + 520_000 + (16 << 20) + 4
    );
    assert_eq!(st["errors"], 0);
    // The hole was not written.
    let blocks = fs::metadata(dst.join("sparse.img")).unwrap().blocks();
    assert!(blocks * 512 < 1 << 20, "sparse file took {} blocks", blocks);
    // Literal + reused add up; a fresh copy sends the non-zero data.
    assert_eq!(
        st["bytes_literal"].as_u64().unwrap() + st["bytes_reused"].as_u64().unwrap(),
        total
    );
    assert!(st["bytes_wire"].as_u64().unwrap() >= st["bytes_literal"].as_u64().unwrap());
}

#[test]
fn second_run_sends_nothing_and_rewrites_nothing() {
    let d = Dir::new();
    let src = sample_tree(&d);
    let dst = d.path("dst");
    ok(hop_cmd!("sync", "-q", d.path("src/"), &dst));
    let ino = fs::metadata(dst.join("big.img")).unwrap().ino();
    let st = sync_stats(&[s(&d.path("src/")), s(&dst)]);
    assert_eq!(st["bytes_literal"], 0);
    assert_eq!(st["files_written"], 0);
    assert_eq!(st["files_unchanged"], 5);
    assert_eq!(
        fs::metadata(dst.join("big.img")).unwrap().ino(),
        ino,
        "unchanged file was rewritten"
    );
    assert_same_tree(&src, &dst);
}

#[test]
fn scattered_edits_insertions_truncation_growth_send_little() {
    let d = Dir::new();
    let src = d.mkdir("src");
    let base = noise(2, 8 << 20);
    d.write("src/edit.img", &base);
    d.write("src/insert.img", &base);
    d.write("src/trunc.img", &base);
    d.write("src/grow.img", &base);
    let dst = d.path("dst");
    sync_stats(&[s(&d.path("src/")), s(&dst)]);

    let mut edited = base.clone();
    for (i, off) in [100_000usize, 2_000_000, 5_000_000, 7_777_777]
        .iter()
        .enumerate()
    {
        edited[*off..off + 4096].copy_from_slice(&noise(100 + i as u64, 4096));
    }
    d.write("src/edit.img", &edited);
    let mut inserted = base[..3_000_000].to_vec();
    inserted.extend_from_slice(b"a few inserted bytes that shift everything after them");
    inserted.extend_from_slice(&base[3_000_000..]);
    d.write("src/insert.img", &inserted);
    d.write("src/trunc.img", &base[..5_000_123]);
    let mut grown = base.clone();
    grown.extend_from_slice(&noise(3, 1 << 20));
    d.write("src/grow.img", &grown);

    let st = sync_stats(&[s(&d.path("src/")), s(&dst)]);
    assert_same_tree(&src, &dst);
    let literal = st["bytes_literal"].as_u64().unwrap();
    // 4 pages edited, one insertion, an appended MiB, and the tails at two cut points.
    assert!(literal < (1 << 20) + 400_000, "sent {literal} bytes");
    assert_eq!(st["files_written"], 4);
}

#[test]
fn type_changes_file_symlink_dir() {
    let d = Dir::new();
    let src = d.mkdir("src");
    d.write("src/f2link", b"file");
    d.symlink("target", "src/link2dir");
    d.mkdir("src/dir2file/sub");
    d.write("src/dir2file/sub/x", b"x");
    d.write("src/file2dir", b"file");
    let dst = d.path("dst");
    sync_stats(&[s(&d.path("src/")), s(&dst)]);

    fs::remove_file(src.join("f2link")).unwrap();
    d.symlink("elsewhere", "src/f2link");
    fs::remove_file(src.join("link2dir")).unwrap();
    d.write("src/link2dir/inner", b"now a dir");
    fs::remove_dir_all(src.join("dir2file")).unwrap();
    d.write("src/dir2file", b"now a file");
    fs::remove_file(src.join("file2dir")).unwrap();
    d.write("src/file2dir/y", b"y");

    sync_stats(&[OsStr::new("--delete"), s(&d.path("src/")), s(&dst)]);
    assert_same_tree(&src, &dst);
}

#[test]
fn delete_removes_extras_only_when_asked() {
    let d = Dir::new();
    let src = d.mkdir("src");
    d.write("src/keep", b"k");
    let dst = d.path("dst");
    d.write("dst/extra/deep/file", b"e");
    d.write("dst/extra2", b"e");
    let st = sync_stats(&[s(&d.path("src/")), s(&dst)]);
    assert_eq!(st["entries_deleted"], 0);
    assert!(dst.join("extra2").exists() && dst.join("extra/deep/file").exists());
    let st = sync_stats(&[OsStr::new("--delete"), s(&d.path("src/")), s(&dst)]);
    assert_eq!(st["entries_deleted"], 4);
    assert_same_tree(&src, &dst);
}

#[test]
fn dry_run_lists_changes_and_changes_nothing() {
    let d = Dir::new();
    sample_tree(&d);
    let dst = d.path("dst");
    d.write("dst/old", b"old");
    let out = ok(hop_cmd!("sync", "-n", "--delete", d.path("src/"), &dst));
    assert!(out.contains("new file big.img"), "{out}");
    assert!(out.contains("deleting old"), "{out}");
    assert_eq!(
        describe_tree(&dst).len(),
        2,
        "dry run changed the destination"
    );
}

#[test]
fn rsync_trailing_slash_rule() {
    let d = Dir::new();
    d.write("src/f", b"1");
    let dst = d.mkdir("dst");
    ok(hop_cmd!("sync", "-q", d.path("src"), &dst));
    assert_eq!(fs::read(dst.join("src/f")).unwrap(), b"1");
    ok(hop_cmd!("sync", "-q", d.path("src/"), &dst));
    assert_eq!(fs::read(dst.join("f")).unwrap(), b"1");
    // A single file into an existing directory.
    ok(hop_cmd!("sync", "-q", d.path("src/f"), d.path("dst/sub/")));
    assert_eq!(fs::read(dst.join("sub/f")).unwrap(), b"1");
}

#[test]
fn basis_directory_supplies_chunks() {
    let d = Dir::new();
    let old = noise(5, 4 << 20);
    let mut new = old.clone();
    new[1_000_000..1_004_096].copy_from_slice(&noise(6, 4096));
    d.write("round1/pages.img", &old);
    d.write("round2/pages.img", &new);
    let dst = d.path("dst");
    let st = sync_stats(&[
        OsStr::new("--basis"),
        s(&d.path("round1")),
        s(&d.path("round2/")),
        s(&dst),
    ]);
    assert_same_tree(&d.path("round2"), &dst);
    assert!(st["bytes_literal"].as_u64().unwrap() < 100_000, "{st}");
}

#[test]
fn compression_gives_identical_trees_and_fewer_wire_bytes() {
    let d = Dir::new();
    let src = sample_tree(&d);
    let plain = sync_stats(&[s(&d.path("src/")), s(&d.path("plain"))]);
    let z = sync_stats(&[
        OsStr::new("--compress"),
        OsStr::new("zstd:3"),
        s(&d.path("src/")),
        s(&d.path("z")),
    ]);
    // rsync's -z, with -a as rsync users write it: zstd at its default level.
    let short = sync_stats(&[OsStr::new("-az"), s(&d.path("src/")), s(&d.path("short"))]);
    assert_same_tree(&src, &d.path("plain"));
    assert_same_tree(&src, &d.path("z"));
    assert_same_tree(&src, &d.path("short"));
    assert_eq!(plain["bytes_literal"], z["bytes_literal"]);
    for compressed in [&z, &short] {
        assert!(
            compressed["bytes_wire"].as_u64().unwrap()
                < plain["bytes_wire"].as_u64().unwrap() - 400_000,
            "{compressed} vs {plain}"
        );
    }
}

/// Both caches (the destination's index beside it, the source's chunk cache) are written
/// when something changed and left as they are by a sync that changed nothing; a change after
/// that is still found.
#[test]
fn caches_are_rewritten_only_when_something_changed() {
    let d = Dir::new();
    for i in 0..20 {
        d.write(&format!("src/f{i}"), &noise(i, 50_000));
    }
    let (src, dst) = (d.path("src"), d.path("dst"));
    let sync = || {
        let mut c = hop_cmd!("sync", "-a", "--stats-json", "-", d.path("src/"), &dst);
        c.env("XDG_CACHE_HOME", d.path("cache"));
        let out = ok(c);
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()
    };
    let source_cache = || {
        let dir = d.path("cache/hop");
        let found: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("src-"))
            .collect();
        assert_eq!(found.len(), 1, "{found:?}");
        found[0].clone()
    };
    // A rewrite renames a new file over the old one: a new inode.
    let inodes = || {
        (
            fs::metadata(d.path(".dst.hopidx")).unwrap().ino(),
            fs::metadata(source_cache()).unwrap().ino(),
        )
    };
    sync();
    let first = inodes();
    let st = sync();
    assert_eq!(st["files_unchanged"], 20);
    assert_eq!(
        inodes(),
        first,
        "a sync that changed nothing rewrote a cache"
    );

    fs::write(src.join("f3"), noise(99, 50_000)).unwrap();
    let st = sync();
    assert_eq!(st["files_written"], 1);
    assert_same_tree(&src, &dst);
    let second = inodes();
    assert!(
        second.0 != first.0 && second.1 != first.1,
        "{first:?} {second:?}"
    );
    // Deleting at the destination changes its index too.
    fs::remove_file(src.join("f4")).unwrap();
    let mut c = hop_cmd!("sync", "-a", "--delete", d.path("src/"), &dst);
    c.env("XDG_CACHE_HOME", d.path("cache"));
    ok(c);
    assert!(!dst.join("f4").exists());
    assert!(inodes().0 != second.0 && inodes().1 != second.1);
    let st = sync();
    assert_eq!(
        (st["files_unchanged"].as_u64(), st["bytes_literal"].as_u64()),
        (Some(19), Some(0))
    );
}

#[test]
fn index_cache_is_written_beside_dest_and_reused() {
    let d = Dir::new();
    d.write("src/f.img", &noise(7, 1 << 20));
    let dst = d.path("dst");
    sync_stats(&[s(&d.path("src/")), s(&dst)]);
    let cache = d.path(".dst.hopidx");
    assert!(cache.exists(), "no index cache beside the destination");
    // A corrupt cache is ignored, not trusted.
    fs::write(&cache, b"garbage").unwrap();
    let st = sync_stats(&[s(&d.path("src/")), s(&dst)]);
    assert_eq!(st["bytes_literal"], 0);
    assert_eq!(st["files_unchanged"], 1);
}

#[test]
fn unreadable_source_file_is_reported_and_the_rest_synced() {
    if !is_root() {
        eprintln!("skipped: needs root to switch to an unprivileged user");
        return;
    }
    let d = Dir::new();
    d.write("src/ok1", b"fine");
    d.write("src/secret", b"new secret");
    d.write("src/z/ok2", b"fine too");
    let dst = d.path("dst");
    d.write("dst/secret", b"old secret");
    open_up(d.tmp.path());
    fs::set_permissions(d.path("src/secret"), fs::Permissions::from_mode(0o000)).unwrap();
    let mut c = hop_as_nobody();
    c.args(["sync", "--delete"]).arg(d.path("src/")).arg(&dst);
    let err = fails(c, 23);
    assert!(
        err.contains("secret") && err.contains("ermission denied"),
        "{err}"
    );
    assert_eq!(fs::read(dst.join("ok1")).unwrap(), b"fine");
    assert_eq!(fs::read(dst.join("z/ok2")).unwrap(), b"fine too");
    // The old version is intact, and --delete did not remove it.
    assert_eq!(fs::read(dst.join("secret")).unwrap(), b"old secret");
}

#[test]
fn unwritable_destination_is_a_clear_error_and_loses_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root to switch to an unprivileged user");
        return;
    }
    let d = Dir::new();
    d.write("src/f", b"new");
    let dst = d.path("dst");
    d.write("dst/f", b"old");
    open_up(&d.path("src"));
    fs::set_permissions(d.tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(&dst, fs::Permissions::from_mode(0o555)).unwrap();
    let mut c = hop_as_nobody();
    c.args(["sync"]).arg(d.path("src/")).arg(&dst);
    let err = fails(c, 23);
    assert!(
        err.contains(&*dst.to_string_lossy()) && err.contains("ermission denied"),
        "{err}"
    );
    assert_eq!(fs::read(dst.join("f")).unwrap(), b"old");
    let leftovers: Vec<_> = fs::read_dir(&dst)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "temporary files left behind: {leftovers:?}"
    );
}

#[test]
fn bad_arguments_are_clear_errors() {
    let d = Dir::new();
    let err = fails(hop_cmd!("sync", d.path("missing"), d.path("x")), 1);
    assert!(
        err.contains("cannot read source") && err.contains("missing"),
        "{err}"
    );
    d.write("src/f", b"1");
    let err = fails(
        hop_cmd!("sync", "--chunk-avg", "10", d.path("src/"), d.path("x")),
        1,
    );
    assert!(err.contains("chunk"), "{err}");
    let err = fails(
        hop_cmd!("sync", "--compress", "gzip", d.path("src/"), d.path("x")),
        1,
    );
    assert!(err.contains("gzip"), "{err}");
    assert!(!d.path("x").exists());
}

#[test]
fn read_only_filesystem_destination_is_a_clear_error() {
    if !is_root() {
        eprintln!("skipped: needs root to mount a read-only tmpfs");
        return;
    }
    let d = Dir::new();
    d.write("src/f", b"new");
    let ro = d.mkdir("ro");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"])
        .arg(&ro)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        mounted,
        "could not mount a read-only tmpfs (root is required for this test)"
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(ro.clone());
    let err = fails(hop_cmd!("sync", d.path("src/"), &ro), 23);
    assert!(
        err.contains("Read-only file system") && err.contains(&*ro.to_string_lossy()),
        "{err}"
    );
    assert_eq!(fs::read_dir(&ro).unwrap().count(), 0);
}

#[test]
fn keygen_prints_only_the_fingerprint_and_protects_the_key() {
    let d = Dir::new();
    let dir = d.path("id");
    let out = ok(hop_cmd!("keygen", "--out", &dir));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out:?}");
    let fp = lines[0];
    assert!(
        fp.starts_with("sha256:")
            && fp.len() == 71
            && fp[7..].chars().all(|c| c.is_ascii_hexdigit()),
        "{fp}"
    );
    let mode = fs::metadata(dir.join("key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert!(fs::read_to_string(dir.join("cert.pem"))
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    // A second keygen into the same directory is refused and the key is unchanged.
    let key = fs::read(dir.join("key.pem")).unwrap();
    let err = fails(hop_cmd!("keygen", "--out", &dir), 1);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(fs::read(dir.join("key.pem")).unwrap(), key);
    let shown = ok(hop_cmd!("keygen", "--show", "--out", &dir));
    assert_eq!(shown.trim(), fp);
    let out2 = ok(hop_cmd!("keygen", "--force", "--out", &dir));
    assert_ne!(out2.trim(), fp);
}

/// Directory times end as the source's: those of directories whose entries were written,
/// linked, created or deleted are set again after their contents changed; the others are left
/// alone, and one changed at the destination alone is put back.
#[test]
fn directory_times_match_the_source_after_writes_and_deletions() {
    let d = Dir::new();
    for p in [
        "src/a/b/f",
        "src/a/g",
        "src/c/x",
        "src/c/y",
        "src/e/z",
        "src/keep/k",
    ] {
        d.write(p, p.as_bytes());
    }
    let (src, dst) = (d.path("src"), d.path("dst"));
    // Every source directory at a time long past, so that a time set by this run shows.
    let age = |root: &std::path::Path| {
        for (i, dir) in ["a/b", "a", "c", "e", "keep", "new", ""].iter().enumerate() {
            if let Ok(f) = fs::File::open(root.join(dir)) {
                let t =
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000 + i as u64);
                f.set_modified(t).unwrap();
            }
        }
    };
    age(&src);
    let sync = || ok(hop_cmd!("sync", "-a", "--delete", d.path("src/"), &dst));
    sync();
    assert_same_tree(&src, &dst);
    // A file written two levels down, a symlink added, a file and a directory removed, a new
    // directory; `keep` untouched at the source but its time changed at the destination.
    d.write("src/a/b/f", b"new content");
    std::os::unix::fs::symlink("b/f", src.join("a/link")).unwrap();
    fs::remove_file(src.join("c/x")).unwrap();
    fs::remove_dir_all(src.join("e")).unwrap();
    d.write("src/new/n", b"n");
    age(&src);
    fs::File::open(dst.join("keep"))
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(42))
        .unwrap();
    sync();
    assert_same_tree(&src, &dst);
    // Nothing changed: nothing moves.
    sync();
    assert_same_tree(&src, &dst);
}

#[test]
fn same_size_same_mtime_edit_is_still_detected() {
    // rsync's quick check (size + mtime) misses this edit; hop's caches also key on ctime and
    // inode, and the content is compared by hash, so it is synced.
    let d = Dir::new();
    let f = d.write("src/f.img", &noise(8, 1 << 20));
    let dst = d.path("dst");
    sync_stats(&[s(&d.path("src/")), s(&dst)]);
    let mtime = fs::metadata(&f).unwrap().modified().unwrap();
    let mut data = fs::read(&f).unwrap();
    data[500_000] ^= 0xff;
    fs::write(&f, &data).unwrap();
    fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let st = sync_stats(&[s(&d.path("src/")), s(&dst)]);
    assert!(st["bytes_literal"].as_u64().unwrap() > 0, "{st}");
    assert_same_tree(&d.path("src"), &dst);
}

#[test]
fn killed_mid_transfer_leaves_old_or_new_file_and_no_junk() {
    let d = Dir::new();
    let old = noise(20, 8 << 20);
    let new = noise(21, 192 << 20);
    d.write("src/big.img", &new);
    d.write("dst/big.img", &old);
    let dst = d.path("dst");
    for delay_ms in [30u64, 120, 400] {
        let mut child = hop()
            .args(["sync", "-q", "--no-index-cache"])
            .arg(d.path("src/"))
            .arg(&dst)
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let _ = child.wait();
        let got = fs::read(dst.join("big.img")).unwrap();
        assert!(
            got == old || got == new,
            "after a kill at {delay_ms} ms the file is neither old nor new"
        );
        let names: Vec<_> = fs::read_dir(&dst)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "kill at {delay_ms} ms left {names:?}");
        if got == new {
            break;
        }
    }
    // A re-run completes.
    sync_stats(&[s(&d.path("src/")), s(&dst)]);
    assert_eq!(fs::read(dst.join("big.img")).unwrap(), new);
}

#[test]
fn sender_basis_sends_small_edits_as_tens_of_bytes_and_survives_a_wrong_basis() {
    let d = Dir::new();
    // A memory image: 256 pages; the new one changes 8 bytes in every 8th page.
    let old = noise(40, 256 * 4096);
    let mut new = old.clone();
    for p in (0..256).step_by(8) {
        new[p * 4096 + 100..p * 4096 + 108].copy_from_slice(b"CHANGED!");
    }
    d.write("basis/pages-1.img", &old);
    d.write("dst/pages-1.img", &old);
    d.write("src/pages-1.img", &new);
    let (src, dst, basis) = (d.path("src"), d.path("dst"), d.path("basis"));
    let slash = |p: &std::path::Path| format!("{}/", p.display());
    let st = sync_stats(&[
        OsStr::new("--no-index-cache"),
        OsStr::new("--sender-basis"),
        s(&basis),
        OsStr::new(&slash(&src)),
        s(&dst),
    ]);
    assert_eq!(fs::read(dst.join("pages-1.img")).unwrap(), new);
    // 32 changed pages: whole pages would be 128 KiB; references cost tens of bytes each.
    let wire = st["bytes_wire"].as_u64().unwrap();
    assert!(wire < 32 * 4096 / 4, "{st}");

    // The basis claims content the destination does not hold: the file is fetched again, right.
    d.write("dst2/pages-1.img", &noise(41, 256 * 4096));
    ok(hop_cmd![
        "sync",
        "--no-index-cache",
        "--sender-basis",
        &basis,
        slash(&src),
        d.path("dst2")
    ]);
    assert_eq!(fs::read(d.path("dst2/pages-1.img")).unwrap(), new);
}

#[test]
fn include_and_exclude_follow_rsync_rules_and_protect_from_delete() {
    let d = Dir::new();
    for f in [
        "src/a.c",
        "src/a.o",
        "src/sub/b.o",
        "src/build/x",
        "src/sub/build/y",
        "src/keep.log",
        "src/drop.log",
    ] {
        d.write(f, f.as_bytes());
    }
    d.write("ex", b"# from a file\n/build\n");
    d.write("dst/old.o", b"excluded, kept by --delete");
    d.write("dst/stale.txt", b"gone from the source");
    let (src, dst) = (d.path("src"), d.path("dst"));
    ok(hop_cmd![
        "sync",
        "--delete",
        "--exclude",
        "*.o",
        "--include",
        "keep.log",
        "--exclude",
        "*.log",
        "--exclude-from",
        d.path("ex"),
        format!("{}/", src.display()),
        &dst
    ]);
    let have = |p: &str| dst.join(p).exists();
    assert!(have("a.c") && have("keep.log") && have("sub/build/y"));
    assert!(!have("a.o") && !have("sub/b.o") && !have("drop.log") && !have("build"));
    assert!(have("old.o"), "--delete removed an excluded path");
    assert!(
        !have("stale.txt"),
        "--delete kept a path that is not excluded"
    );
    // Order matters: the first matching rule wins.
    ok(hop_cmd![
        "sync",
        "--exclude",
        "*.log",
        "--include",
        "keep.log",
        format!("{}/", src.display()),
        d.path("dst2")
    ]);
    assert!(!d.path("dst2/keep.log").exists());
    let err = fails(
        hop_cmd![
            "sync",
            "--exclude",
            "[",
            format!("{}/", src.display()),
            d.path("dst3")
        ],
        1,
    );
    assert!(err.contains("pattern"), "{err}");
}

#[test]
fn completions_and_man_pages_come_from_the_command_line_definition() {
    let bash = ok(hop_cmd!["completions", "bash"]);
    assert!(
        bash.contains("--exclude") && bash.contains("checkpoint"),
        "{bash:.300}"
    );
    let d = Dir::new();
    ok(hop_cmd!["man", d.path("man")]);
    let sync = fs::read_to_string(d.path("man/hop-sync.1")).unwrap();
    assert!(
        sync.contains("exclude") && sync.contains("accept"),
        "{sync:.300}"
    );
    assert!(d.path("man/hop.1").exists() && d.path("man/hop-serve.1").exists());
}

#[test]
fn a_full_destination_disk_is_a_clear_error_and_the_old_file_survives() {
    assert!(is_root(), "needs root to mount a small tmpfs");
    let d = Dir::new();
    let small = d.mkdir("small");
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(st.success(), "could not mount a small tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(small.clone());
    let old = noise(50, 600_000);
    fs::write(small.join("f"), &old).unwrap();
    d.write("src/f", &noise(51, 3 << 20)); // does not fit beside the old one
    d.write("src/g", b"small file that fits");
    // Each fits alone, both do not: the check lets them start, the disk fills while they are
    // written.
    d.write("src/h1", &noise(52, 1_100_000));
    d.write("src/h2", &noise(53, 1_100_000));
    let err = fails(
        hop_cmd![
            "sync",
            "--no-index-cache",
            format!("{}/", d.path("src").display()),
            &small
        ],
        23,
    );
    // Refused before a byte is written, with the figures.
    assert!(
        err.contains(&format!("{}/f: needs 3145728 bytes", small.display()))
            && err.contains("free; nothing was written"),
        "{err}"
    );
    assert!(err.contains("No space left on device"), "{err}");
    let h_written = ["h1", "h2"]
        .iter()
        .filter(|h| fs::read(small.join(h)).is_ok_and(|b| b.len() == 1_100_000))
        .count();
    assert!(h_written <= 1, "both cannot fit");
    assert_eq!(
        fs::read(small.join("f")).unwrap(),
        old,
        "the old file was damaged"
    );
    assert_eq!(fs::read(small.join("g")).unwrap(), b"small file that fits");
    let names: Vec<_> = fs::read_dir(&small)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names
            .iter()
            .all(|n| ["f", "g", "h1", "h2"].contains(&n.as_str())),
        "leftovers: {names:?}"
    );
}

#[test]
fn a_second_sync_into_a_busy_destination_is_refused() {
    let d = Dir::new();
    d.write("src/f", b"data");
    let dst = d.path("dst");
    // Another sync holds the destination's lock (as hop does, with flock).
    extern "C" {
        fn flock(fd: i32, op: i32) -> i32;
    }
    let held = fs::File::create(d.path(".dst.hoplock")).unwrap();
    use std::os::fd::AsRawFd;
    assert_eq!(
        unsafe {
            flock(held.as_raw_fd(), 2 /* LOCK_EX */)
        },
        0
    );
    let err = fails(hop_cmd!["sync", d.path("src/"), &dst], 1);
    assert!(err.contains("another hop sync is writing"), "{err}");
    assert!(!dst.exists(), "wrote while another sync held the lock");
    drop(held);
    ok(hop_cmd!["sync", d.path("src/"), &dst]);
    assert_eq!(fs::read(dst.join("f")).unwrap(), b"data");
}

#[test]
fn config_file_sets_defaults_and_the_command_line_wins() {
    let d = Dir::new();
    d.write("src/t.txt", &b"compressible line of text\n".repeat(40_000));
    let src = format!("{}/", d.path("src").display());
    let cfg = d.path("config.toml");
    let run = |cfg_text: &str, extra: &[&str], dst: &str| {
        fs::write(&cfg, cfg_text).unwrap();
        let mut c = hop();
        c.env("HOP_CONFIG", &cfg)
            .args(["sync", "--stats-json", "-"])
            .args(extra)
            .arg(&src)
            .arg(d.path(dst));
        c
    };
    let wire = |c| {
        let out = ok(c);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v["bytes_wire"].as_u64().unwrap()
    };
    let plain = wire(run("", &[], "a"));
    let zstd = wire(run("[sync]\ncompress = \"zstd:3\"\n", &[], "b"));
    assert!(
        zstd * 10 < plain,
        "config compression not applied: {zstd} vs {plain}"
    );
    // The command line wins over a (here unusable) config value.
    wire(run(
        "[sync]\ncompress = \"gzip\"\n",
        &["--compress", "zstd"],
        "c",
    ));
    // A mistake in the file is named.
    let err = fails(run("[sync]\nstreems = 3\n", &[], "e"), 1);
    assert!(
        err.contains("config.toml") && err.contains("streems"),
        "{err}"
    );
}

#[test]
fn inplace_updates_a_large_memory_image_without_a_new_copy_and_small_files_the_usual_way() {
    use std::os::unix::fs::MetadataExt;
    let d = Dir::new();
    let page = 4096;
    let mut img = noise(40, 16 << 20);
    d.write("src/pages-1.img", &img);
    d.write("src/core-1.img", &noise(41, 3000));
    sync_stats(&[s(&d.path("src/")), s(&d.path("dst/"))]);
    let inode = std::fs::metadata(d.path("dst/pages-1.img")).unwrap().ino();
    // Rewrite a few hundred pages, insert two pages near the end, change the small file.
    for k in (1..4000).step_by(13) {
        img[k * page + 8..k * page + 64].copy_from_slice(&noise(k as u64, 56));
    }
    let at = 3900 * page;
    img.splice(at..at, noise(42, 2 * page));
    d.write("src/pages-1.img", &img);
    d.write("src/core-1.img", &noise(43, 3000));
    let st = sync_stats(&[
        OsStr::new("--inplace"),
        s(&d.path("src/")),
        s(&d.path("dst/")),
    ]);
    assert_same_tree(&d.path("src"), &d.path("dst"));
    assert_eq!(
        std::fs::metadata(d.path("dst/pages-1.img")).unwrap().ino(),
        inode,
        "the image was replaced by a new file instead of updated in place"
    );
    assert!(
        st["bytes_literal"].as_u64().unwrap() < 4 << 20,
        "sent too much: {st}"
    );
}

/// An XFS file system with reflinks on a loop file, mounted under the test's directory for as
/// long as it lives.
struct XfsMount {
    mnt: std::path::PathBuf,
}

impl XfsMount {
    fn new(d: &Dir) -> XfsMount {
        let img = d.path("xfs.img");
        let mnt = d.path("xfs");
        fs::create_dir_all(&mnt).unwrap();
        let run = |args: &[&OsStr]| {
            let out = std::process::Command::new(args[0])
                .args(&args[1..])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        run(&[
            OsStr::new("truncate"),
            OsStr::new("-s"),
            OsStr::new("320M"),
            s(&img),
        ]);
        // mkfs.xfs comes from xfsprogs, which scripts/setup.sh installs.
        run(&[
            OsStr::new("mkfs.xfs"),
            OsStr::new("-q"),
            OsStr::new("-m"),
            OsStr::new("reflink=1"),
            s(&img),
        ]);
        run(&[
            OsStr::new("mount"),
            OsStr::new("-o"),
            OsStr::new("loop"),
            s(&img),
            s(&mnt),
        ]);
        XfsMount { mnt }
    }
}

impl Drop for XfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}

/// On a file system with reflinks, a large file with a few changed pages is rebuilt from a
/// clone of its old version: only the changed pages are written (the unchanged extents stay
/// shared with a reflink copy taken before the sync), and the result is the new content.
#[test]
fn a_changed_large_file_is_rebuilt_from_a_reflink_clone() {
    let d = Dir::new();
    let xfs = XfsMount::new(&d);
    let mut data = noise(31, 16 << 20);
    let src = d.write("src/big.bin", &data);
    let dst = xfs.mnt.join("dst");
    ok(hop_cmd!["sync", "-a", d.path("src/"), &dst]);
    // A reflink copy of the destination's version: extents the rebuilt file still shares with
    // it were not written again.
    let keep = xfs.mnt.join("keep.bin");
    let out = std::process::Command::new("cp")
        .args(["--reflink=always"])
        .arg(dst.join("big.bin"))
        .arg(&keep)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cp --reflink: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for k in (7..4000).step_by(401) {
        data[k * 4096..(k + 1) * 4096].copy_from_slice(&noise(100 + k as u64, 4096));
    }
    fs::write(&src, &data).unwrap();
    let st = sync_stats(&[OsStr::new("-a"), s(&d.path("src/")), s(&dst)]);
    assert!(
        fs::read(dst.join("big.bin")).unwrap() == data,
        "content differs"
    );
    assert!(st["bytes_literal"].as_u64().unwrap() < 1 << 20);
    let frag = std::process::Command::new("filefrag")
        .arg("-v")
        .arg(dst.join("big.bin"))
        .output()
        .unwrap();
    let frag = String::from_utf8_lossy(&frag.stdout);
    assert!(
        frag.contains("shared"),
        "no extent shared with the old version:\n{frag}"
    );
    // The old version's copy is untouched.
    assert!(
        fs::read(&keep).unwrap() == noise(31, 16 << 20),
        "the reflink copy changed"
    );
}
