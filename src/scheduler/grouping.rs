//! Which waiting requests form the next engine batch (issue 15, length-aware batching).
//!
//! The engine pads a batch to its longest sequence (and, with packed tokens, still pads inside
//! attention), so requests of similar length batch together cheaply. When more work waits than
//! fits one batch, [`choose`] picks the batch of similar-length requests that does the most real
//! work within the token budget. A request that has waited `batching.length_wait_ms` stops being
//! choosable-by-length: the oldest such request anchors the next batch, so a long request among
//! short ones waits at most that long beyond its turn. A bound of zero is first come, first served.

use std::time::Duration;

/// Candidates looked at when grouping; the rest of a long backlog waits for a later batch (the
/// oldest always comes first, so none is passed over for ever).
pub const MAX_CANDIDATES: usize = 512;

/// What one waiting request costs the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cand {
    /// How long it has waited in the queue.
    pub waited: Duration,
    /// Its longest sequence, in tokens.
    pub longest: usize,
    /// Rows the engine runs for it: sequences x distinct task paths.
    pub rows: usize,
    /// Real tokens the engine runs for it: the sum of its sequence lengths x distinct task paths.
    pub real: usize,
}

/// How the engine lays tokens out, which decides what a batch costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cost {
    /// Every row padded to the batch's longest sequence: rows x longest.
    Padded,
    /// Real tokens packed together: the sum of real lengths (x paths).
    Packed,
}

/// The size of a set of requests that would run together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub rows: usize,
    pub longest: usize,
    pub real: usize,
}

impl Footprint {
    pub fn with(self, c: &Cand) -> Self {
        Self { rows: self.rows + c.rows, longest: self.longest.max(c.longest), real: self.real + c.real }
    }

    /// Tokens the engine computes for this set (what `batching.max_batch_tokens` bounds).
    pub fn tokens(self, cost: Cost) -> usize {
        match cost {
            Cost::Padded => self.rows.saturating_mul(self.longest),
            Cost::Packed => self.real,
        }
    }
}

/// The candidates (indices, ascending) of the next batch. `cands` are in arrival order and all
/// for one backbone; `cands[0]` is always eligible and a batch is never empty (one request over
/// the budget runs alone). `bound`: `None` is first come, first served; `Some(b)` groups by
/// length, except that a candidate that waited `b` or more anchors the batch.
pub fn choose(cands: &[Cand], budget: usize, cost: Cost, bound: Option<Duration>) -> Vec<usize> {
    let cands = &cands[..cands.len().min(MAX_CANDIDATES)];
    if cands.is_empty() {
        return Vec::new();
    }
    let all = cands.iter().fold(Footprint::default(), |f, c| f.with(c));
    let Some(bound) = bound.filter(|_| all.tokens(cost) > budget) else { return fifo(cands, budget, cost) };
    match cands.iter().position(|c| c.waited >= bound) {
        Some(due) => nearest(cands, due, budget, cost),
        None => best_window(cands, budget, cost),
    }
}

/// First come, first served: the oldest, then every later one that still fits.
fn fifo(cands: &[Cand], budget: usize, cost: Cost) -> Vec<usize> {
    let mut size = Footprint::default().with(&cands[0]);
    let mut out = vec![0];
    for (i, c) in cands.iter().enumerate().skip(1) {
        if size.with(c).tokens(cost) <= budget {
            size = size.with(c);
            out.push(i);
        }
    }
    out
}

/// Indices sorted by longest sequence, ties in arrival order.
fn by_length(cands: &[Cand]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..cands.len()).collect();
    order.sort_by_key(|&i| (cands[i].longest, i));
    order
}

/// `anchor`, then the candidates nearest to it in length while they fit.
fn nearest(cands: &[Cand], anchor: usize, budget: usize, cost: Cost) -> Vec<usize> {
    let order = by_length(cands);
    let at = order.iter().position(|&i| i == anchor).expect("anchor is a candidate");
    let mut size = Footprint::default().with(&cands[anchor]);
    let mut out = vec![anchor];
    let (mut lo, mut hi) = (at, at + 1);
    loop {
        // The nearer neighbour first; a side that no longer fits is closed.
        let down = lo.checked_sub(1).map(|j| (cands[anchor].longest - cands[order[j]].longest, j));
        let up = order.get(hi).map(|&i| (cands[i].longest - cands[anchor].longest, hi));
        let next = match (down, up) {
            (Some(d), Some(u)) => Some(if d.0 <= u.0 { (d.1, true) } else { (u.1, false) }),
            (Some(d), None) => Some((d.1, true)),
            (None, Some(u)) => Some((u.1, false)),
            (None, None) => None,
        };
        let Some((j, is_down)) = next else { break };
        let c = &cands[order[j]];
        // One that does not fit is passed over; a farther one (fewer rows, fewer tokens) may.
        if size.with(c).tokens(cost) <= budget {
            size = size.with(c);
            out.push(order[j]);
        }
        if is_down {
            lo = j;
        } else {
            hi = j + 1;
        }
    }
    out.sort_unstable();
    out
}

/// The run of similar lengths (consecutive in length order) that fits the budget and holds the
/// most real tokens; ties go to the run holding the oldest request.
fn best_window(cands: &[Cand], budget: usize, cost: Cost) -> Vec<usize> {
    let order = by_length(cands);
    let mut best: Option<(usize, usize, Vec<usize>)> = None;
    for top in 0..order.len() {
        // The run ends at `top` (its longest) and reaches down to shorter ones while they fit.
        let mut size = Footprint::default().with(&cands[order[top]]);
        let mut members = vec![order[top]];
        for &i in order[..top].iter().rev() {
            let next = size.with(&cands[i]);
            if next.tokens(cost) > budget {
                break;
            }
            size = next;
            members.push(i);
        }
        let oldest = *members.iter().min().expect("not empty");
        let better = match &best {
            None => true,
            Some((real, old, _)) => size.real > *real || (size.real == *real && oldest < *old),
        };
        if better {
            best = Some((size.real, oldest, members));
        }
    }
    let mut out = best.map(|(_, _, m)| m).unwrap_or_default();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(waited_ms: u64, longest: usize) -> Cand {
        Cand { waited: Duration::from_millis(waited_ms), longest, rows: 1, real: longest }
    }

    fn padded(cands: &[Cand], picked: &[usize]) -> (usize, usize) {
        let f = picked.iter().fold(Footprint::default(), |f, &i| f.with(&cands[i]));
        (f.real, f.tokens(Cost::Padded))
    }

    const BOUND: Option<Duration> = Some(Duration::from_millis(50));

    #[test]
    fn zero_bound_is_first_come_first_served_as_before() {
        let cands = [cand(0, 8), cand(0, 60), cand(0, 8), cand(0, 60), cand(0, 8)];
        // 8 + 60 = 120 padded; a third row (180) does not fit 128; later ones are still tried.
        assert_eq!(choose(&cands, 128, Cost::Padded, None), vec![0, 1]);
        let over = [cand(0, 300), cand(0, 4)];
        assert_eq!(choose(&over, 128, Cost::Padded, None), vec![0], "one request over the budget runs alone");
    }

    #[test]
    fn everything_that_fits_goes_together_whatever_the_lengths() {
        let cands = [cand(0, 8), cand(0, 30), cand(0, 5)];
        assert_eq!(choose(&cands, 128, Cost::Padded, BOUND), vec![0, 1, 2]);
    }

    #[test]
    fn more_work_than_fits_groups_similar_lengths_and_pads_less() {
        let cands: Vec<Cand> = (0..16).map(|i| cand(1, if i % 2 == 0 { 8 } else { 60 })).collect();
        let fifo = choose(&cands, 128, Cost::Padded, None);
        let grouped = choose(&cands, 128, Cost::Padded, BOUND);
        let ((fr, fc), (gr, gc)) = (padded(&cands, &fifo), padded(&cands, &grouped));
        assert_eq!((fr, fc), (68, 120), "FIFO pairs a short with a long");
        assert_eq!((gr, gc), (120, 120), "two longs: no padding, the most real work");
        assert!(grouped.iter().all(|&i| cands[i].longest == 60));
    }

    #[test]
    fn the_packed_budget_counts_real_tokens_not_padding() {
        // Under padding only two of these fit 220 (2 x 100); packed, a long one and twelve short
        // ones do (100 + 12 x 10), which is the most real work within the budget.
        let mut cands = vec![cand(1, 100), cand(1, 100)];
        cands.extend((0..14).map(|_| cand(1, 10)));
        let padded_pick = choose(&cands, 220, Cost::Padded, BOUND);
        assert_eq!(padded(&cands, &padded_pick), (200, 200));
        let picked = choose(&cands, 220, Cost::Packed, BOUND);
        let f = picked.iter().fold(Footprint::default(), |f, &i| f.with(&cands[i]));
        assert_eq!((f.real, f.tokens(Cost::Packed), picked.len()), (220, 220, 13), "{picked:?}");
    }

    #[test]
    fn a_request_that_waited_the_bound_anchors_the_batch() {
        // The long one is the oldest and has waited the bound: it goes now (alone: no short fits
        // beside it). 60 shorts would do more real work (42 x 6 = 252 > 200).
        let mut cands = vec![cand(50, 200)];
        cands.extend((0..60).map(|_| cand(1, 6)));
        assert_eq!(choose(&cands, 256, Cost::Padded, BOUND), vec![0]);
        // Before the bound, the shorts (more real work per batch) go first.
        cands[0].waited = Duration::from_millis(49);
        assert!(!choose(&cands, 256, Cost::Padded, BOUND).contains(&0));
    }

    /// A simulated queue under a steady stream of short requests: a long one never gets picked by
    /// length, so it must leave by the bound (plus the one batch that was forming) and never starve.
    #[test]
    fn no_starvation_an_old_long_request_goes_out_within_the_bound() {
        let batch_ms = 10u64;
        let bound = Duration::from_millis(45);
        // (arrival ms, length): a batch of shorts (102 x 5 = 510 real) beats the long one (100).
        let mut queue: Vec<(u64, usize)> = vec![(0, 100)];
        let mut left_at = None;
        for step in 0..100u64 {
            let now = step * batch_ms;
            // More new shorts every batch than one batch takes: work always waits.
            queue.extend((0..110).map(|_| (now, 5)));
            let cands: Vec<Cand> = queue.iter().map(|&(t, len)| cand(now - t, len)).collect();
            let picked = choose(&cands, 512, Cost::Padded, Some(bound));
            if picked.iter().any(|&i| queue[i].1 == 100) {
                left_at = Some(now);
                break;
            }
            for &i in picked.iter().rev() {
                queue.remove(i);
            }
        }
        let left_at = left_at.expect("the long request starved");
        assert!(left_at >= 45 && Duration::from_millis(left_at) <= bound + Duration::from_millis(batch_ms), "left at {left_at} ms");
    }

    #[test]
    fn a_long_backlog_is_looked_at_up_to_the_candidate_cap() {
        let cands: Vec<Cand> = (0..MAX_CANDIDATES + 100).map(|i| cand(1, 4 + i % 50)).collect();
        let picked = choose(&cands, 256, Cost::Padded, BOUND);
        assert!(!picked.is_empty() && picked.iter().all(|&i| i < MAX_CANDIDATES));
        let f = picked.iter().fold(Footprint::default(), |f, &i| f.with(&cands[i]));
        assert!(f.tokens(Cost::Padded) <= 256);
    }
}
