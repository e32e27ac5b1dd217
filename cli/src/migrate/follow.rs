//! Chunk a round's memory images while CRIU writes them, so that the push after the dump starts
//! with their chunk lists ready instead of comparing hundreds of MB first (on the final round
//! that comparison was downtime). See [`hop_engine::chunk::PageFollower`].

use hop_engine::chunk::{is_page_image, ChunkParams, PageFollower};
use hop_engine::index::IndexCache;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Follows the memory images appearing in a dump directory until told the dump has ended.
pub struct Follow {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(IndexCache, Figures)>,
}

/// What a follower did, for the log.
#[derive(Debug, Default)]
pub struct Figures {
    /// Bytes of images chunked while the dump was running.
    pub during: u64,
    /// Bytes chunked after it ended.
    pub after: u64,
    /// Images followed.
    pub images: usize,
}

impl Follow {
    /// Follow the `pages-N.img` files CRIU writes into `dir`; `prev` is the previous round's
    /// directory, whose images' chunk lists are in the chunk cache at `cache`.
    pub fn start(dir: &Path, prev: Option<&Path>, cache: &Path, params: ChunkParams) -> Follow {
        let stop = Arc::new(AtomicBool::new(false));
        let (dir, prev, cache) = (
            dir.to_path_buf(),
            prev.map(Path::to_path_buf),
            cache.to_path_buf(),
        );
        let s = stop.clone();
        let thread = std::thread::spawn(move || follow(&dir, prev.as_deref(), &cache, params, &s));
        Follow { stop, thread }
    }

    /// The dump has ended (well: `ok`): the chunk lists of its images, for the push. `None`
    /// when the dump failed or nothing could be followed.
    pub fn finish(self, ok: bool) -> Option<Arc<IndexCache>> {
        self.stop.store(true, Ordering::Relaxed);
        let (known, f) = self.thread.join().ok()?;
        tracing::debug!(
            "images chunked during the dump: {} of {} bytes, {} images",
            f.during,
            f.during + f.after,
            f.images
        );
        (ok && !known.is_empty()).then(|| Arc::new(known))
    }
}

fn follow(
    dir: &Path,
    prev: Option<&Path>,
    cache: &Path,
    params: ChunkParams,
    stop: &AtomicBool,
) -> (IndexCache, Figures) {
    // The previous round's lists, from the cache its push left.
    let held = prev.map(|_| IndexCache::load(cache, params));
    let base_of =
        |name: &std::ffi::OsStr| -> Option<(PathBuf, Vec<hop_engine::manifest::ChunkSpec>)> {
            let p = prev?.join(name);
            let md = std::fs::symlink_metadata(&p).ok()?;
            let fc = held.as_ref()?.lookup(&p, &md)?;
            Some((p, fc.chunks.clone()))
        };
    let mut followers: HashMap<PathBuf, PageFollower> = HashMap::new();
    let mut figures = Figures::default();
    let mut last_scan = Instant::now() - Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) {
        // New images (a process tree has one per process).
        if last_scan.elapsed() >= Duration::from_millis(20) {
            last_scan = Instant::now();
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = e.path();
                if is_page_image(&path) && !followers.contains_key(&path) {
                    let base = base_of(&e.file_name());
                    let f =
                        PageFollower::new(&path, base.as_ref().map(|(p, c)| (p.as_path(), &c[..])));
                    followers.insert(path, f);
                }
            }
        }
        let mut took = 0;
        for f in followers.values_mut() {
            took += f.advance().unwrap_or(0);
        }
        figures.during += took;
        if took == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // The dump has ended: the rest of each image, then the lists as the push will find them.
    let mut known = IndexCache::new(params);
    figures.images = followers.len();
    for (path, mut f) in followers {
        figures.after += f.advance().unwrap_or(0);
        if let Ok((fc, md)) = f.finish() {
            known.record_read(&path, &md, fc);
        }
    }
    (known, figures)
}
