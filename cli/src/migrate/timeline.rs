//! The migration's timeline: what each phase took, as a table (the seed paper's columns) and as
//! JSON.

use serde::Serialize;

/// One pre-copy round, or the final round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RoundRow {
    /// 1, 2, ... for pre-copy rounds; `final` marks the last.
    pub round: String,
    /// Wall time of the dump.
    pub dump_ms: f64,
    /// Time the application was frozen during the dump.
    pub frozen_ms: f64,
    /// Bytes of images dumped.
    pub bytes_dumped: u64,
    /// Bytes of chunk payloads the engine sent.
    pub bytes_sent: u64,
    /// Bytes that crossed the network (QUIC packets, both ways).
    pub bytes_wire: u64,
    /// Wall time of the sync.
    pub sync_ms: f64,
}

/// The whole migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timeline {
    /// Migration id.
    pub id: String,
    /// What moved ("process 4242", "container web").
    pub app: String,
    /// `HOST:PORT` of the target.
    pub target: String,
    /// Outcome: `migrated`, `rolled back`, `failed`.
    pub outcome: String,
    /// Why pre-copy stopped.
    pub stop_reason: String,
    /// Connecting and checking the target, and (containers) syncing the bundle.
    pub prepare_ms: f64,
    /// Bytes on the wire for the bundle (containers).
    pub bundle_bytes_wire: u64,
    /// Pre-copy rounds, then the final one.
    pub rounds: Vec<RoundRow>,
    /// Syncing the container's files after the freeze (containers).
    pub final_fs_sync_ms: f64,
    /// Waiting for the source's PID to be released (a target on the same kernel only).
    pub release_wait_ms: f64,
    /// Restore at the target until the application ran.
    pub restore_ms: f64,
    /// From the final dump's start (the freeze) to the application running at the target.
    pub downtime_ms: f64,
    /// HAProxy: waiting for requests in flight to finish before the freeze.
    pub drain_ms: f64,
    /// HAProxy: how long new requests were held (what clients saw as a pause).
    pub hold_ms: f64,
    /// Start to finish.
    pub total_ms: f64,
    /// Where the application runs at the end (PID at the target, or at the source).
    pub result: String,
}

fn mb(b: u64) -> String {
    format!("{:.1}", b as f64 / 1e6)
}

impl Timeline {
    /// The table printed at the end of `hop migrate`.
    pub fn table(&self) -> String {
        let mut t = String::new();
        t.push_str(&format!(
            "migration {} of {} to {}: {}\n",
            self.id, self.app, self.target, self.outcome
        ));
        t.push_str(&format!(
            "{:<8} {:>9} {:>10} {:>11} {:>9} {:>9} {:>9}\n",
            "round", "dump ms", "frozen ms", "dumped MB", "sent MB", "wire MB", "sync ms"
        ));
        for r in &self.rounds {
            t.push_str(&format!(
                "{:<8} {:>9.0} {:>10.0} {:>11} {:>9} {:>9} {:>9.0}\n",
                r.round,
                r.dump_ms,
                r.frozen_ms,
                mb(r.bytes_dumped),
                mb(r.bytes_sent),
                mb(r.bytes_wire),
                r.sync_ms
            ));
        }
        t.push_str(&format!(
            "prepare {:.0} ms{}; pre-copy stopped: {}\n",
            self.prepare_ms,
            if self.bundle_bytes_wire > 0 {
                format!(" (bundle {} MB on the wire)", mb(self.bundle_bytes_wire))
            } else {
                String::new()
            },
            self.stop_reason
        ));
        if let Some(f) = self.rounds.iter().find(|r| r.round == "final") {
            t.push_str(&format!(
                "downtime {:.0} ms = freeze+dump {:.0} + final sync {:.0}{}{} + restore {:.0} (+ {:.0} other)\n",
                self.downtime_ms,
                f.dump_ms,
                f.sync_ms,
                if self.final_fs_sync_ms > 0.0 {
                    format!(" + files {:.0}", self.final_fs_sync_ms)
                } else {
                    String::new()
                },
                if self.release_wait_ms > 0.0 {
                    format!(" + same-kernel PID release {:.0}", self.release_wait_ms)
                } else {
                    String::new()
                },
                self.restore_ms,
                (self.downtime_ms
                    - f.dump_ms
                    - f.sync_ms
                    - self.final_fs_sync_ms
                    - self.release_wait_ms
                    - self.restore_ms)
                    .max(0.0)
            ));
        }
        if self.hold_ms > 0.0 {
            t.push_str(&format!(
                "HAProxy held new requests for {:.0} ms (in-flight ones drained in {:.0} ms)\n",
                self.hold_ms, self.drain_ms
            ));
        }
        t.push_str(&format!("total {:.0} ms; {}\n", self.total_ms, self.result));
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_splits_the_downtime() {
        let t = Timeline {
            id: "m".into(),
            app: "process 1".into(),
            target: "h:1".into(),
            outcome: "migrated".into(),
            stop_reason: "round limit (1)".into(),
            rounds: vec![
                RoundRow {
                    round: "1".into(),
                    dump_ms: 900.0,
                    bytes_dumped: 577_000_000,
                    bytes_sent: 500_000_000,
                    ..Default::default()
                },
                RoundRow {
                    round: "final".into(),
                    dump_ms: 1000.0,
                    sync_ms: 300.0,
                    ..Default::default()
                },
            ],
            restore_ms: 600.0,
            downtime_ms: 2000.0,
            ..Default::default()
        };
        let s = t.table();
        assert!(s.contains("577.0"), "{s}");
        assert!(
            s.contains(
                "downtime 2000 ms = freeze+dump 1000 + final sync 300 + restore 600 (+ 100 other)"
            ),
            "{s}"
        );
    }
}
