//! A sync between two local paths: the sender and receiver halves run in one process and pass
//! encoded frames to each other, exactly as they would over a transport, so `bytes_wire` is the
//! number of bytes a network would have carried.

use crate::assemble::Fetched;
use crate::error::{Error, Result};
use crate::protocol::{self, Frame};
use crate::receiver::{ChunkSource, Receiver, ReceiverOptions, Request};
use crate::report::{Progress, Report};
use crate::scan::Filter;
use crate::sender::{Sender, SenderOptions};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Frames passed through an encode/decode round, counting their bytes.
struct Wire<'a> {
    bytes: AtomicU64,
    progress: &'a Progress,
}

impl Wire<'_> {
    fn pass(&self, frame: &Frame) -> Result<Frame> {
        let buf = protocol::encode_vec(frame)?;
        self.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Progress::add(&self.progress.bytes_wire, buf.len() as u64);
        protocol::decode(&buf)?
            .map(|(f, _)| f)
            .ok_or_else(|| Error::Protocol("short frame".into()))
    }
}

struct LocalSource<'a> {
    sender: &'a Sender,
    wire: &'a Wire<'a>,
}

impl ChunkSource for LocalSource<'_> {
    fn chunk_list(&self, entry: u32) -> Result<Vec<crate::manifest::ChunkSpec>> {
        self.wire.pass(&Frame::ListWant { entry })?;
        let list = self
            .sender
            .chunk_list(entry)
            .ok_or_else(|| Error::Protocol(format!("entry {entry} is not a file")))?;
        let mut out = Vec::with_capacity(list.len());
        for f in crate::chunklist::parts(list, crate::chunklist::ListPart::Chunks) {
            if let Frame::FileList {
                part: crate::chunklist::ListPart::Chunks(c),
                ..
            } = self.wire.pass(&f)?
            {
                out.extend(c);
            }
        }
        Ok(out)
    }

    fn fetch(
        &self,
        _lane: usize,
        req: &Request,
        sink: &mut dyn FnMut(Fetched) -> Result<()>,
    ) -> Result<()> {
        let Frame::Want {
            entry,
            runs,
            hints,
            no_refs,
            ..
        } = self.wire.pass(&Frame::Want {
            entry: req.entry,
            runs: protocol::to_runs(&req.want),
            hints: req.hints.clone(),
            no_refs: req.no_refs,
            turn: None,
        })?
        else {
            return Err(Error::Protocol("want frame changed in transit".into()));
        };
        let want = protocol::from_runs(&runs, req.want.len())?;
        self.sender.serve(
            entry,
            &want,
            &hints,
            no_refs,
            crate::sender::Packing::Alone,
            &mut |frame| match self.wire.pass(&frame)? {
                Frame::Data {
                    chunk,
                    codec,
                    bytes,
                    ..
                } => sink((chunk, codec, bytes)),
                Frame::Failed { reason, .. } => Err(Error::Protocol(format!("sender: {reason}"))),
                other => Err(Error::Protocol(format!("unexpected frame {other:?}"))),
            },
        )
    }
}

/// Make `dest` identical to `src` (both local paths). The destination is indexed while the
/// source is scanned; entries stream from the sender's thread to the receiver, which starts
/// writing files while the sender is still chunking later ones (and a new large file while the
/// sender still reads it).
pub fn sync_local(
    src: &Path,
    dest: &Path,
    filter: Option<Filter<'_>>,
    sopts: SenderOptions,
    ropts: ReceiverOptions,
    progress: &Progress,
) -> Result<Report> {
    let t0 = Instant::now();
    if sopts.params != ropts.params {
        return Err(Error::ChunkParams(
            "sender and receiver chunk sizes differ".into(),
        ));
    }
    let sender = Sender::new(src, sopts);
    let wire = Wire {
        bytes: AtomicU64::new(0),
        progress,
    };
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Frame>>(256);
    let (notes, report) = std::thread::scope(|s| {
        let (sender, wire) = (&sender, &wire);
        let sending = s.spawn(move || {
            // Large files go while they are read, and are written as their lists arrive.
            let r = sender.run_frames(filter, &mut |out| {
                for f in out.frames {
                    let f = wire.pass(&f)?;
                    tx.send(Ok(f))
                        .map_err(|_| Error::Protocol("receiver stopped".into()))?;
                }
                Ok(())
            });
            let end = match &r {
                Ok(_) => wire.pass(&Frame::ManifestEnd),
                Err(e) => Err(Error::Protocol(format!("sender: {e}"))),
            };
            let _ = tx.send(end);
            r
        });
        let report = Receiver::prepare(dest, ropts).and_then(|receiver| {
            tracing::debug!(ms = t0.elapsed().as_millis() as u64, "indexed destination");
            let source = LocalSource { sender, wire };
            let mut assembler = crate::chunklist::Assembler::growing();
            let mut next = || loop {
                match rx.recv() {
                    Ok(Ok(Frame::ManifestEnd)) => return Ok(None),
                    Ok(Ok(f)) => {
                        if let Some(item) = assembler.feed(f)? {
                            return Ok(Some(item));
                        }
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(Error::Protocol("sender stopped".into())),
                }
            };
            receiver.apply(&mut next, &source, progress)
        });
        drop(rx);
        let notes = sending
            .join()
            .unwrap_or_else(|_| Err(Error::Protocol("sender panicked".into())));
        (notes, report)
    });
    let mut report = report?;
    let notes = notes?;
    wire.pass(&Frame::Done)?;
    tracing::debug!(ms = t0.elapsed().as_millis() as u64, "applied");
    report
        .skipped
        .extend(notes.skipped.into_iter().map(|(p, w)| (p, w.to_string())));
    report.errors.splice(0..0, notes.errors);
    report.stats.errors = report.errors.len() as u64;
    report.stats.bytes_wire = wire.bytes.load(Ordering::Relaxed);
    report.stats.elapsed_ms = t0.elapsed().as_millis() as u64;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{tests_support::noise, ChunkParams};
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Edit {
        Overwrite { at: usize, len: usize, seed: u64 },
        Insert { at: usize, len: usize, seed: u64 },
        Delete { at: usize, len: usize },
        Truncate { to: usize },
        Append { len: usize, seed: u64 },
        Zero { at: usize, len: usize },
    }

    fn edit_strategy() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (any::<usize>(), 1usize..9000, any::<u64>())
                .prop_map(|(at, len, seed)| Edit::Overwrite { at, len, seed }),
            (any::<usize>(), 1usize..9000, any::<u64>()).prop_map(|(at, len, seed)| Edit::Insert {
                at,
                len,
                seed
            }),
            (any::<usize>(), 1usize..9000).prop_map(|(at, len)| Edit::Delete { at, len }),
            any::<usize>().prop_map(|to| Edit::Truncate { to }),
            (1usize..40000, any::<u64>()).prop_map(|(len, seed)| Edit::Append { len, seed }),
            (any::<usize>(), 1usize..40000).prop_map(|(at, len)| Edit::Zero { at, len }),
        ]
    }

    fn apply(data: &mut Vec<u8>, e: &Edit) {
        let n = data.len();
        match *e {
            Edit::Overwrite { at, len, seed } if n > 0 => {
                let at = at % n;
                let len = len.min(n - at);
                data[at..at + len].copy_from_slice(&noise(seed, len));
            }
            Edit::Insert { at, len, seed } => {
                let at = if n == 0 { 0 } else { at % n };
                data.splice(at..at, noise(seed, len));
            }
            Edit::Delete { at, len } if n > 0 => {
                let at = at % n;
                data.drain(at..(at + len).min(n));
            }
            Edit::Truncate { to } => data.truncate(if n == 0 { 0 } else { to % n }),
            Edit::Append { len, seed } => data.extend(noise(seed, len)),
            Edit::Zero { at, len } if n > 0 => {
                let at = at % n;
                data[at..(at + len).min(n)].fill(0);
            }
            _ => {}
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Any sequence of edits to any files round-trips byte-identically, run after run.
        #[test]
        fn any_edit_sequence_round_trips(
            seeds in proptest::collection::vec((any::<u64>(), 0usize..200_000), 1..4),
            edits in proptest::collection::vec((0usize..4, edit_strategy()), 0..12),
            small in any::<bool>(),
        ) {
            let d = tempfile::tempdir().unwrap();
            let src = d.path().join("src");
            let dst = d.path().join("dst");
            std::fs::create_dir(&src).unwrap();
            let mut files: Vec<Vec<u8>> = seeds.iter().map(|&(s, len)| noise(s, len)).collect();
            let params = if small { ChunkParams::new(256, 1024, 4096).unwrap() } else { ChunkParams::default() };
            let sopts = SenderOptions { params, compress: if small { Some(1) } else { None }, cache: None, basis: None, rules: None, push: false, known: None };
            let ropts = ReceiverOptions { params, delete: true, ..Default::default() };
            for round in 0..2 {
                if round == 1 {
                    for (f, e) in &edits {
                        if let Some(data) = files.get_mut(*f) {
                            apply(data, e);
                        }
                    }
                }
                for (i, data) in files.iter().enumerate() {
                    std::fs::write(src.join(format!("f{i}")), data).unwrap();
                }
                let r = sync_local(&src, &dst, None, sopts.clone(), ropts.clone(), &Progress::default()).unwrap();
                prop_assert!(r.errors.is_empty(), "{:?}", r.errors);
                for (i, data) in files.iter().enumerate() {
                    let got = std::fs::read(dst.join(format!("f{i}"))).unwrap();
                    prop_assert!(&got == data, "file {} differs after round {}", i, round);
                }
            }
        }
    }

    /// Sender options with the defaults and no cache.
    fn plain_sender() -> SenderOptions {
        SenderOptions {
            params: ChunkParams::default(),
            compress: None,
            cache: None,
            basis: None,
            rules: None,
            push: false,
            known: None,
        }
    }

    /// `src` synced onto `dst` with the plain sender and `ropts`, every error checked.
    fn sync_plain(src: &Path, dst: &Path, ropts: &ReceiverOptions) -> Report {
        let r = sync_local(
            src,
            dst,
            None,
            plain_sender(),
            ropts.clone(),
            &Progress::default(),
        )
        .unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        r
    }

    /// Apply `src`'s manifest to a receiver prepared earlier.
    fn apply_prepared(receiver: Receiver, src: &Path, sopts: SenderOptions) -> Report {
        let progress = Progress::default();
        let sender = Sender::new(src, sopts);
        let (manifest, _) = sender.manifest_of(None).unwrap();
        let wire = Wire {
            bytes: AtomicU64::new(0),
            progress: &progress,
        };
        let source = LocalSource {
            sender: &sender,
            wire: &wire,
        };
        let mut entries = manifest.into_iter();
        receiver
            .apply(
                &mut || Ok(entries.next().map(crate::chunklist::Incoming::Entry)),
                &source,
                &progress,
            )
            .unwrap()
    }

    /// Two files that swap contents are rebuilt from each other's old versions, which stay
    /// readable after the first is replaced (its cached pages dropped), and nothing is fetched.
    #[test]
    fn files_that_swap_contents_are_rebuilt_from_the_old_versions() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        std::fs::create_dir_all(&src).unwrap();
        let (a, b) = (noise(11, 3 << 20), noise(12, 2 << 20));
        std::fs::write(src.join("a"), &a).unwrap();
        std::fs::write(src.join("b"), &b).unwrap();
        let ropts = ReceiverOptions {
            no_index_cache: true,
            ..Default::default()
        };
        let p = Progress::default();
        sync_local(&src, &dst, None, plain_sender(), ropts.clone(), &p).unwrap();
        std::fs::write(src.join("a"), &b).unwrap();
        std::fs::write(src.join("b"), &a).unwrap();
        let r = sync_local(&src, &dst, None, plain_sender(), ropts, &p).unwrap();
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(std::fs::read(dst.join("a")).unwrap(), b);
        assert_eq!(std::fs::read(dst.join("b")).unwrap(), a);
        assert_eq!(r.stats.bytes_literal, 0);
        assert_eq!(r.stats.bytes_reused, 5 << 20);
    }

    /// A destination file rewritten after the receiver indexed it (same size, even the same
    /// mtime) is not trusted to hold its indexed chunks: the result is still the source's
    /// bytes, the file fetched whole.
    #[test]
    fn a_destination_file_changed_after_it_was_indexed_is_not_trusted() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        std::fs::create_dir_all(&src).unwrap();
        let old = noise(21, 2 << 20);
        std::fs::write(src.join("f"), &old).unwrap();
        let ropts = ReceiverOptions {
            no_index_cache: true,
            ..Default::default()
        };
        sync_plain(&src, &dst, &ropts);
        let mut new = old.clone();
        new[1 << 20..(1 << 20) + 4096].copy_from_slice(&noise(22, 4096));
        std::fs::write(src.join("f"), &new).unwrap();

        let receiver = Receiver::prepare(&dst, ropts).unwrap();
        // Behind the receiver's back: other bytes of the same size, the mtime put back.
        let f = dst.join("f");
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        std::fs::write(&f, noise(23, 2 << 20)).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let r = apply_prepared(receiver, &src, plain_sender());
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert_eq!(std::fs::read(&f).unwrap(), new);
        assert!(r.stats.bytes_literal >= 2 << 20, "{:?}", r.stats);
    }

    /// After a sync the destination's index cache holds every file under the stat it has now:
    /// files left alone (recorded without a stat), files whose metadata the sync changed, files
    /// written, so that the next sync reads none of them again.
    #[test]
    fn the_index_cache_after_a_sync_matches_every_file() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (src, dst) = (d.path().join("src"), d.path().join("dst"));
        std::fs::create_dir_all(src.join("sub")).unwrap();
        for (i, name) in ["a", "b", "c", "sub/d"].iter().enumerate() {
            std::fs::write(src.join(name), noise(30 + i as u64, 300_000)).unwrap();
        }
        let ropts = ReceiverOptions::default();
        let sync = || sync_plain(&src, &dst, &ropts);
        sync();
        // b's mode changes (metadata only), c's content changes, a and d stay as they are.
        std::fs::set_permissions(src.join("b"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(src.join("c"), noise(99, 300_000)).unwrap();
        let r = sync();
        assert_eq!(r.stats.files_written, 1, "{:?}", r.stats);
        let cache =
            crate::index::IndexCache::load(&crate::index::cache_path_for(&dst), ropts.params);
        for name in ["a", "b", "c", "sub/d"] {
            let f = dst.join(name);
            let md = std::fs::symlink_metadata(&f).unwrap();
            let hit = cache.lookup(&f, &md);
            assert_eq!(
                hit,
                Some(&crate::chunk::chunk_file(&f, ropts.params).unwrap()),
                "{name}"
            );
        }
        // A third sync with nothing changed reads and writes nothing.
        let r = sync();
        assert_eq!(r.stats.files_written, 0, "{:?}", r.stats);
    }

    /// Someone with write access to the destination swaps a directory for a symlink out of it
    /// after the receiver looked: nothing is written, changed or deleted outside, the entries
    /// under it fail with a clear error, the rest is synced.
    #[test]
    fn a_directory_swapped_for_a_symlink_after_the_scan_is_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let (src, dst, outside) = (
            d.path().join("src"),
            d.path().join("dst"),
            d.path().join("outside"),
        );
        for dir in [src.join("a/b"), outside.join("b")] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(src.join("a/b/f"), noise(1, 100_000)).unwrap();
        std::fs::write(src.join("a/keep"), b"k").unwrap();
        std::fs::write(src.join("top"), b"t").unwrap();
        std::fs::write(outside.join("b/f"), b"precious").unwrap();
        std::fs::write(outside.join("extra"), b"precious").unwrap();
        let sopts = plain_sender();
        let ropts = ReceiverOptions {
            delete: true,
            no_index_cache: true,
            ..Default::default()
        };
        sync_plain(&src, &dst, &ropts);

        // New content for the file below, a file to delete, a new top-level file.
        std::fs::write(src.join("a/b/f"), noise(2, 100_000)).unwrap();
        std::fs::write(src.join("a/keep"), b"k2").unwrap();
        std::fs::write(src.join("new"), b"n").unwrap();
        std::fs::write(dst.join("a/extra"), b"x").unwrap();
        let receiver = Receiver::prepare(&dst, ropts).unwrap();
        // The race: `a` becomes a symlink to `outside` once the receiver has scanned.
        std::fs::rename(dst.join("a"), d.path().join("a-moved")).unwrap();
        std::os::unix::fs::symlink(&outside, dst.join("a")).unwrap();

        let report = apply_prepared(receiver, &src, sopts);

        assert_eq!(std::fs::read(outside.join("b/f")).unwrap(), b"precious");
        assert_eq!(std::fs::read(outside.join("extra")).unwrap(), b"precious");
        let mut names: Vec<_> = std::fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["b", "extra"]);
        assert!(!report.errors.is_empty());
        for e in &report.errors {
            assert!(e.to_string().contains("followed"), "{e}");
        }
        // The rest of the tree was synced.
        assert_eq!(std::fs::read(dst.join("new")).unwrap(), b"n");
        assert_eq!(std::fs::read(dst.join("top")).unwrap(), b"t");
    }
}
