//! Live progress on standard error: bars on a terminal (one per running transfer or migration
//! phase, several at once for a group), plain lines every few seconds otherwise.

use hop_engine::Progress;
use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Every bar of the process, drawn together so lines and bars do not overwrite each other.
fn bars() -> &'static MultiProgress {
    static BARS: OnceLock<MultiProgress> = OnceLock::new();
    BARS.get_or_init(MultiProgress::new)
}

/// Print a line on standard error above any bars being drawn.
pub fn line(msg: &str) {
    if std::io::stderr().is_terminal() {
        bars().suspend(|| eprintln!("{msg}"));
    } else {
        eprintln!("{msg}");
    }
}

/// Draws progress until dropped.
pub struct Display {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a display shows.
struct Shown {
    /// Counters of a transfer; `None`: a phase without figures (a spinner and its time).
    progress: Option<Arc<Progress>>,
    /// A label in front (a migration phase).
    label: Option<String>,
}

impl Display {
    /// Progress of a sync, when `enabled`: a bar when stderr is a terminal, else a plain line
    /// every 5 s.
    pub fn start(progress: Arc<Progress>, enabled: bool) -> Display {
        Display::run(
            Shown {
                progress: Some(progress),
                label: None,
            },
            enabled,
        )
    }

    /// Progress of one migration phase named `label`: a bar with the transfer's figures when
    /// `progress` is given, else a spinner with the time spent.
    pub fn phase(label: String, progress: Option<Arc<Progress>>, enabled: bool) -> Display {
        Display::run(
            Shown {
                progress,
                label: Some(label),
            },
            enabled,
        )
    }

    fn run(shown: Shown, enabled: bool) -> Display {
        let stop = Arc::new(AtomicBool::new(false));
        if !enabled {
            return Display { stop, thread: None };
        }
        let s = stop.clone();
        let thread = if std::io::stderr().is_terminal() {
            std::thread::spawn(move || draw(&shown, &s))
        } else {
            std::thread::spawn(move || lines(&shown, &s))
        };
        Display {
            stop,
            thread: Some(thread),
        }
    }
}

/// Where a transfer stands: (total, done, words), from whichever side's counters move.
fn figures(p: &Progress) -> (u64, u64, String) {
    let scanned = Progress::get(&p.bytes_scanned);
    if scanned > 0 && Progress::get(&p.bytes_done) == 0 {
        // Sending: the receiver asks for what it lacks; the rest is reused.
        let wanted = Progress::get(&p.bytes_wanted);
        let sent = Progress::get(&p.bytes_sent);
        let reused = 100.0 * (1.0 - wanted as f64 / scanned as f64).max(0.0);
        let words = format!("{} scanned, {reused:.0}% reused", HumanBytes(scanned));
        return (wanted, sent, words);
    }
    let planned = Progress::get(&p.bytes_planned);
    let lit = Progress::get(&p.bytes_literal);
    // Files being fetched count with what arrived of them so far.
    let partial = lit.saturating_sub(Progress::get(&p.bytes_literal_settled));
    let mut done = Progress::get(&p.bytes_done) + partial;
    if planned > 0 {
        done = done.min(planned);
    }
    let reused = if done > 0 {
        100.0 * (1.0 - lit as f64 / done.max(lit) as f64).max(0.0)
    } else {
        0.0
    };
    let words = format!(
        "{} files, {reused:.0}% reused",
        Progress::get(&p.files_done)
    );
    (planned, done, words)
}

fn draw(shown: &Shown, stop: &AtomicBool) {
    let template = match (&shown.progress, &shown.label) {
        (Some(_), None) => "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        (Some(_), Some(_)) => {
            "{spinner} {prefix} {bar:24} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}"
        }
        (None, _) => "{spinner} {prefix} {elapsed}",
    };
    let style =
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    let bar = bars().add(ProgressBar::new(0).with_style(style));
    if let Some(l) = &shown.label {
        bar.set_prefix(l.clone());
    }
    // Drawn at least once, however short the phase.
    loop {
        if let Some(p) = &shown.progress {
            let (total, done, words) = figures(p);
            bar.set_length(total.max(done));
            bar.set_position(done);
            bar.set_message(words);
        }
        bar.tick();
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // Woken at once when the display is dropped (see `Drop`).
        std::thread::park_timeout(Duration::from_millis(100));
    }
    bar.finish_and_clear();
    bars().remove(&bar);
}

/// Plain progress lines for logs, every 5 s.
fn lines(shown: &Shown, stop: &AtomicBool) {
    let t0 = Instant::now();
    let mut next = Duration::from_secs(5);
    let label = shown
        .label
        .as_deref()
        .map(|l| format!("{l}: "))
        .unwrap_or_default();
    while !stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(Duration::from_millis(100));
        if t0.elapsed() < next {
            continue;
        }
        next += Duration::from_secs(5);
        let secs = t0.elapsed().as_secs_f64();
        match &shown.progress {
            Some(p) => {
                let (total, done, words) = figures(p);
                eprintln!(
                    "hop: {label}progress {}/{}, {words}, {secs:.0} s",
                    HumanBytes(done),
                    HumanBytes(total),
                );
            }
            None => eprintln!("hop: {label}still running, {secs:.0} s"),
        }
    }
}

impl Drop for Display {
    /// Stops the drawing thread at once: a phase of a migration lasts as long as its work, not
    /// until the display's next tick (a sleeping thread cost up to 100 ms per phase, on the
    /// downtime path).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A phase that ends ends its display at once: dropping one does not wait for the drawing
    /// thread's next tick (it used to, up to 100 ms per phase of a migration's downtime).
    #[test]
    fn a_display_stops_when_dropped_not_at_its_next_tick() {
        let mut dropping = Duration::ZERO;
        for _ in 0..10 {
            let d = Display::phase("phase".into(), None, true);
            std::thread::sleep(Duration::from_millis(20)); // its thread waits for the next tick
            let t = Instant::now();
            drop(d);
            dropping += t.elapsed();
        }
        // Waiting for the ticks would be about 0.8 s.
        assert!(dropping < Duration::from_millis(300), "{dropping:?}");
    }

    #[test]
    fn sending_and_receiving_figures() {
        let p = Progress::default();
        Progress::add(&p.bytes_scanned, 1000);
        Progress::add(&p.bytes_wanted, 250);
        Progress::add(&p.bytes_sent, 100);
        let (total, done, words) = figures(&p);
        assert_eq!((total, done), (250, 100));
        assert!(words.contains("75% reused"), "{words}");

        let r = Progress::default();
        Progress::add(&r.bytes_planned, 1000);
        Progress::add(&r.bytes_done, 400);
        Progress::add(&r.bytes_literal, 100);
        Progress::add(&r.files_done, 3);
        // 100 bytes arrived for a file still being written: they count as done.
        let (total, done, words) = figures(&r);
        assert_eq!((total, done), (1000, 500));
        assert_eq!(words, "3 files, 80% reused");
        // That file's fetching ended and it was counted whole.
        Progress::add(&r.bytes_literal_settled, 100);
        let (total, done, words) = figures(&r);
        assert_eq!((total, done), (1000, 400));
        assert_eq!(words, "3 files, 75% reused");
    }
}
