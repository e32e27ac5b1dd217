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
    /// Start drawing when stderr is a terminal and `enabled`.
    pub fn start(progress: Arc<Progress>, enabled: bool) -> Display {
        let stop = Arc::new(AtomicBool::new(false));
        if !enabled || !std::io::stderr().is_terminal() {
            return Display { stop, thread: None };
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

impl Drop for Display {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
