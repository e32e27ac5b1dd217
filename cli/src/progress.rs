//! A live progress bar on a terminal, nothing otherwise.

use hop_engine::Progress;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Draws `progress` until dropped.
pub struct Display {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Display {
    /// Start when `enabled`: a bar when stderr is a terminal, else a plain line every 5 s.
    pub fn start(progress: Arc<Progress>, enabled: bool) -> Display {
        let stop = Arc::new(AtomicBool::new(false));
        if !enabled {
            return Display { stop, thread: None };
        }
        if !std::io::stderr().is_terminal() {
            let s = stop.clone();
            let thread = std::thread::spawn(move || lines(&progress, &s));
            return Display {
                stop,
                thread: Some(thread),
            };
        }
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            while !s.load(Ordering::Relaxed) {
                let planned = Progress::get(&progress.bytes_planned);
                let done = Progress::get(&progress.bytes_done);
                let lit = Progress::get(&progress.bytes_literal);
                bar.set_length(planned);
                bar.set_position(done);
                let reused = if done > 0 {
                    100.0 * (1.0 - lit as f64 / done.max(1) as f64)
                } else {
                    0.0
                };
                bar.set_message(format!(
                    "{} files, {reused:.0}% reused",
                    Progress::get(&progress.files_done)
                ));
                std::thread::sleep(Duration::from_millis(100));
            }
            bar.finish_and_clear();
        });
        Display {
            stop,
            thread: Some(thread),
        }
    }
}

/// Plain progress lines for logs: bytes done of planned, data sent, files; every 5 s.
fn lines(progress: &Progress, stop: &AtomicBool) {
    let t0 = std::time::Instant::now();
    let mut next = Duration::from_secs(5);
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if t0.elapsed() < next {
            continue;
        }
        next += Duration::from_secs(5);
        let mib = |n: u64| n as f64 / (1u64 << 20) as f64;
        eprintln!(
            "hop: progress {:.1}/{:.1} MiB, {:.1} MiB sent, {} files, {:.0} s",
            mib(Progress::get(&progress.bytes_done)),
            mib(Progress::get(&progress.bytes_planned)),
            mib(Progress::get(&progress.bytes_literal)),
            Progress::get(&progress.files_done),
            t0.elapsed().as_secs_f64()
        );
    }
}

impl Drop for Display {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
