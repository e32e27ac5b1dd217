//! When to stop pre-copying: the decision after each round, from what the rounds measured.
//!
//! Every CRIU dump here is a full dump (no dirty-page tracking on this kernel), so a round's
//! cost on the network is what the engine had to send: the pages that changed since the
//! previous round. From two rounds we know the link's effective rate (bytes sent / sync time)
//! and how fast the application dirties memory (bytes sent / time between the two dumps); the
//! final round will send what gets dirtied during one more (dump + sync) interval, while the
//! application is frozen. Pre-copy stops when that predicted downtime fits the budget, when a
//! round no longer shrinks what must be sent, or at the round limit.

/// What one pre-copy round measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RoundFigures {
    /// Wall time of the dump.
    pub dump_ms: f64,
    /// Bytes the engine sent for this round (chunk payloads, before the transport).
    pub bytes_sent: u64,
    /// Wall time of the sync.
    pub sync_ms: f64,
    /// Time from the previous round's dump start to this one's (0 for the first round).
    pub interval_ms: f64,
}

/// The limits of pre-copy.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// The downtime the operator accepts (freeze to running at the target).
    pub max_downtime_ms: f64,
    /// Most pre-copy rounds.
    pub max_rounds: usize,
    /// Estimated restore time at the target.
    pub restore_ms: f64,
}

/// What to do after a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Another pre-copy round.
    Round,
    /// Freeze and move, for this reason.
    Final(String),
}

/// The downtime expected if the final round started now, in ms.
pub fn predicted_downtime(rounds: &[RoundFigures], b: &Budget) -> Option<f64> {
    let last = rounds.last()?;
    if rounds.len() < 2 || last.interval_ms <= 0.0 {
        return None;
    }
    // Dirty rate: what the last round had to send, over the time the application ran between
    // the two dumps it compared.
    let dirty_per_ms = last.bytes_sent as f64 / last.interval_ms;
    // The final round comes one (dump + sync) interval after the last dump.
    let final_bytes = dirty_per_ms * (last.dump_ms + last.sync_ms);
    // Its sync: the last sync's time scaled by bytes, but never below the part of a sync that
    // does not depend on the bytes (scanning and chunking the images), taken as half of it.
    let per_byte = if last.bytes_sent > 0 {
        last.sync_ms / last.bytes_sent as f64
    } else {
        0.0
    };
    let sync = (final_bytes * per_byte).max(last.sync_ms * 0.5);
    Some(last.dump_ms + sync + b.restore_ms)
}

/// Decide after the rounds so far.
pub fn next(rounds: &[RoundFigures], b: &Budget) -> Next {
    let n = rounds.len();
    if n >= b.max_rounds {
        return Next::Final(format!("round limit ({})", b.max_rounds));
    }
    if let Some(d) = predicted_downtime(rounds, b) {
        if d <= b.max_downtime_ms {
            return Next::Final(format!(
                "predicted downtime {:.0} ms fits the budget of {:.0} ms",
                d, b.max_downtime_ms
            ));
        }
    }
    if n >= 3 {
        let (prev, last) = (&rounds[n - 2], &rounds[n - 1]);
        if last.bytes_sent as f64 >= prev.bytes_sent as f64 * 0.9 {
            return Next::Final(format!(
                "no longer converging ({} then {} bytes sent)",
                prev.bytes_sent, last.bytes_sent
            ));
        }
    }
    Next::Round
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(dump_ms: f64, bytes_sent: u64, sync_ms: f64, interval_ms: f64) -> RoundFigures {
        RoundFigures {
            dump_ms,
            bytes_sent,
            sync_ms,
            interval_ms,
        }
    }

    const B: Budget = Budget {
        max_downtime_ms: 2000.0,
        max_rounds: 5,
        restore_ms: 500.0,
    };

    #[test]
    fn the_first_round_always_has_a_successor() {
        assert_eq!(
            next(&[round(900.0, 600 << 20, 6000.0, 0.0)], &B),
            Next::Round
        );
        assert_eq!(predicted_downtime(&[round(900.0, 1, 1.0, 0.0)], &B), None);
    }

    #[test]
    fn a_small_dirty_rate_stops_pre_copy() {
        // 30 MB dirtied in 7 s; the link moved them in 1 s.
        let r = [
            round(900.0, 600 << 20, 6000.0, 0.0),
            round(900.0, 30 << 20, 1000.0, 7000.0),
        ];
        let d = predicted_downtime(&r, &B).unwrap();
        // final bytes = 30 MB/7 s x 1.9 s = 8.1 MB -> 272 ms of sync, floored at 500 ms.
        assert!((d - (900.0 + 500.0 + 500.0)).abs() < 1.0, "{d}");
        assert!(matches!(next(&r, &B), Next::Final(why) if why.contains("fits")));
    }

    #[test]
    fn a_slow_link_goes_on_while_rounds_shrink_and_stops_when_they_do_not() {
        let mut r = vec![
            round(900.0, 600 << 20, 60000.0, 0.0),
            round(900.0, 200 << 20, 20000.0, 61000.0),
        ];
        assert_eq!(next(&r, &B), Next::Round);
        r.push(round(900.0, 70 << 20, 7000.0, 21000.0));
        assert_eq!(next(&r, &B), Next::Round);
        r.push(round(900.0, 68 << 20, 6800.0, 8000.0));
        assert!(matches!(next(&r, &B), Next::Final(why) if why.contains("converging")));
    }

    #[test]
    fn the_round_limit_wins() {
        let r = vec![round(1.0, 1, 1.0, 0.0); 2];
        let b = Budget { max_rounds: 2, ..B };
        assert!(matches!(next(&r, &b), Next::Final(why) if why.contains("limit")));
        let b = Budget { max_rounds: 0, ..B };
        assert!(matches!(next(&[], &b), Next::Final(_)));
    }
}
