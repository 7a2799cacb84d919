//! Which waiting requests form the next engine batch (issue 15, length-aware batching).
//!
//! The engine pads a batch to its longest sequence (and, with packed tokens, still pads inside
//! attention), so one short request beside a long one costs as much as a long one. [`choose`]
//! sorts the waiting requests by length and splits them into runs of similar length where the
//! padding that saves is worth a batch of its own ([`SPLIT_TOKENS`]); each run fits the token
//! budget. The next batch is the run holding the oldest request, so every batch serves the
//! request that waited longest, plus every request that has waited `batching.length_wait_ms`
//! (oldest first, within the budget): grouping delays no request by more than that beyond its
//! turn. A bound of zero is first come, first served.

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
    /// Whether it runs on packed tokens (`engine.packing`, bank tasks): it costs its real tokens;
    /// otherwise its rows are padded to the batch's longest sequence.
    pub packed: bool,
}

/// The size of a set of requests that would run together: a padded part (its rows at its
/// longest length) and a packed part (its real tokens), the two passes the engine makes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    pub rows: usize,
    pub longest: usize,
    pub real: usize,
    pub packed_real: usize,
    /// Rows and longest sequence of the whole set: attention runs every row at that length.
    pub all_rows: usize,
    pub all_longest: usize,
}

impl Footprint {
    pub fn with(self, c: &Cand) -> Self {
        let mut f =
            Self { real: self.real + c.real, all_rows: self.all_rows + c.rows, all_longest: self.all_longest.max(c.longest), ..self };
        if c.packed {
            f.packed_real += c.real;
        } else {
            f.rows += c.rows;
            f.longest = f.longest.max(c.longest);
        }
        f
    }

    /// Tokens the engine computes for this set outside attention (what `batching.max_batch_tokens`
    /// bounds): padded rows x their longest, plus the packed real tokens.
    pub fn tokens(self) -> usize {
        self.rows.saturating_mul(self.longest).saturating_add(self.packed_real)
    }

    /// What grouping minimises: [`Footprint::tokens`] plus attention's padded work in token
    /// equivalents. Attention pads every row to the longest sequence and costs about
    /// `longest / ATTENTION_PER_TOKEN` of a token's projections and FFN per position, so its
    /// padding matters once lengths reach the hundreds (a 512-token request among short ones).
    pub fn cost(self) -> usize {
        let attention = self.all_rows.saturating_mul(self.all_longest).saturating_mul(self.all_longest) / ATTENTION_PER_TOKEN;
        self.tokens().saturating_add(attention)
    }
}

/// Sequence length at which one attention position costs about as much as one token's
/// projections and FFN (scores and context are 4·T·H multiply-adds per position, the rest about
/// 24·H², so T ≈ 6·H: 2,304 for MiniLM's H = 384; a round figure of that order).
pub const ATTENTION_PER_TOKEN: usize = 2048;

/// Padded token positions a split must save to be worth one more engine batch (its fixed cost:
/// 1 + L session runs and their set-up, of the order of a few hundred tokens of MiniLM work).
pub const SPLIT_TOKENS: usize = 512;

/// The candidates (indices, ascending) of the next batch. `cands` are in arrival order and all
/// for one backbone; the oldest (`cands[0]`) is always in it and a batch is never empty (one
/// request over the budget runs alone). `bound`: `None` is first come, first served; `Some(b)`
/// groups by length, and a candidate that waited `b` or more joins the batch if it fits.
pub fn choose(cands: &[Cand], budget: usize, bound: Option<Duration>) -> Vec<usize> {
    let cands = &cands[..cands.len().min(MAX_CANDIDATES)];
    if cands.is_empty() {
        return Vec::new();
    }
    let Some(bound) = bound else { return fifo(cands, budget) };
    let order = by_length(cands);
    let mut out: Vec<usize> = runs(cands, &order, budget).into_iter().find(|r| r.contains(&0)).expect("every candidate is in a run");
    let mut size = out.iter().fold(Footprint::default(), |f, &i| f.with(&cands[i]));
    for (i, c) in cands.iter().enumerate() {
        if c.waited >= bound && !out.contains(&i) && size.with(c).tokens() <= budget {
            size = size.with(c);
            out.push(i);
        }
    }
    out.sort_unstable();
    out
}

/// First come, first served: the oldest, then every later one that still fits.
fn fifo(cands: &[Cand], budget: usize) -> Vec<usize> {
    let mut size = Footprint::default().with(&cands[0]);
    let mut out = vec![0];
    for (i, c) in cands.iter().enumerate().skip(1) {
        if size.with(c).tokens() <= budget {
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

/// The split of `order` (candidates by length) into consecutive runs, each within the budget (or
/// a single request), that costs the engine least: the runs' [`Footprint::cost`] plus
/// [`SPLIT_TOKENS`] each.
/// Dynamic programming over the end of the last run; quadratic in the candidates at most.
fn runs(cands: &[Cand], order: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let n = order.len();
    // best[j]: least cost of the first j (by length); start[j]: where its last run starts.
    let mut best = vec![usize::MAX; n + 1];
    let mut start = vec![0; n + 1];
    best[0] = 0;
    for j in 1..=n {
        let mut size = Footprint::default();
        for i in (0..j).rev() {
            size = size.with(&cands[order[i]]);
            // Runs only grow in rows and real tokens as they reach down: once over, always over.
            if size.tokens() > budget && i + 1 < j {
                break;
            }
            let total = best[i].saturating_add(size.cost()).saturating_add(SPLIT_TOKENS);
            if total < best[j] {
                best[j] = total;
                start[j] = i;
            }
        }
    }
    let mut out = Vec::new();
    let mut j = n;
    while j > 0 {
        out.push(order[start[j]..j].to_vec());
        j = start[j];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(waited_ms: u64, longest: usize) -> Cand {
        Cand { waited: Duration::from_millis(waited_ms), longest, rows: 1, real: longest, packed: false }
    }

    fn packed(c: Cand) -> Cand {
        Cand { packed: true, ..c }
    }

    fn padded(cands: &[Cand], picked: &[usize]) -> (usize, usize) {
        let f = picked.iter().fold(Footprint::default(), |f, &i| f.with(&cands[i]));
        (f.real, f.tokens())
    }

    const BOUND: Option<Duration> = Some(Duration::from_millis(50));

    #[test]
    fn zero_bound_is_first_come_first_served_as_before() {
        let cands = [cand(0, 8), cand(0, 60), cand(0, 8), cand(0, 60), cand(0, 8)];
        // 8 + 60 = 120 padded; a third row (180) does not fit 128; later ones are still tried.
        assert_eq!(choose(&cands, 128, None), vec![0, 1]);
        let over = [cand(0, 300), cand(0, 4)];
        assert_eq!(choose(&over, 128, None), vec![0], "one request over the budget runs alone");
    }

    #[test]
    fn a_small_saving_keeps_one_batch() {
        // Splitting 5 and 8 from 30 saves 44 padded tokens, far less than a batch costs.
        let cands = [cand(0, 8), cand(0, 30), cand(0, 5)];
        assert_eq!(choose(&cands, 128, BOUND), vec![0, 1, 2]);
    }

    #[test]
    fn a_batch_that_would_pad_a_lot_splits_by_length_and_the_oldest_run_goes_first() {
        // Together 16 x 200 = 3,200 padded tokens for 1,680 real ones; apart 80 + 1,600.
        let cands: Vec<Cand> = (0..16).map(|i| cand(1, if i % 2 == 0 { 10 } else { 200 })).collect();
        assert_eq!(fifo(&cands, 16_384).len(), 16);
        let grouped = choose(&cands, 16_384, BOUND);
        assert_eq!(grouped, (0..16).step_by(2).collect::<Vec<_>>(), "the shorts, with the oldest");
        let rest: Vec<Cand> = (0..16).filter(|i| i % 2 == 1).map(|i| cands[i]).collect();
        assert_eq!(choose(&rest, 16_384, BOUND).len(), 8, "then the longs");
    }

    #[test]
    fn more_work_than_fits_groups_similar_lengths_and_pads_less() {
        let cands: Vec<Cand> = (0..16).map(|i| cand(1, if i % 2 == 0 { 8 } else { 60 })).collect();
        let fifo = choose(&cands, 128, None);
        let grouped = choose(&cands, 128, BOUND);
        let ((fr, fc), (gr, gc)) = (padded(&cands, &fifo), padded(&cands, &grouped));
        assert_eq!((fr, fc), (68, 120), "FIFO pairs a short with a long");
        assert_eq!((gr, gc), (64, 64), "the eight shorts, with the oldest: no padding");
        // Without the shorts, the longs go two by two (2 x 60 within 128).
        let longs: Vec<Cand> = (0..8).map(|_| cand(1, 60)).collect();
        assert_eq!(choose(&longs, 128, BOUND), vec![0, 1]);
    }

    #[test]
    fn the_packed_budget_counts_real_tokens_not_padding() {
        // Under padding only two of these fit 220 (2 x 100); packed, the budget counts real tokens.
        let mut cands = vec![cand(1, 100), cand(1, 100)];
        cands.extend((0..14).map(|_| cand(1, 10)));
        assert_eq!(padded(&cands, &choose(&cands, 220, BOUND)), (200, 200));
        let cands: Vec<Cand> = cands.into_iter().map(packed).collect();
        // First come first served fills 220 with both longs and two shorts; grouped, the longs go
        // together and the shorts (140 real tokens) make one run of their own.
        assert_eq!(choose(&cands, 220, None), vec![0, 1, 2, 3]);
        assert_eq!(choose(&cands, 220, BOUND), vec![0, 1]);
        assert_eq!(choose(&cands[2..], 220, BOUND).len(), 14, "fourteen shorts (140 real) in one batch");
        // A padded request beside packed ones costs its padded rows only.
        let mixed = [cands[0], cand(1, 10), cands[2]];
        assert_eq!(mixed.iter().fold(Footprint::default(), |f, c| f.with(c)).tokens(), 120);
    }

    #[test]
    fn packed_short_requests_split_from_long_ones_for_attention() {
        // Packed, 29 short requests and 3 of 400 tokens cost the same real tokens together or
        // apart, but together attention pads 29 rows to 400 (32 x 400 x 400 / 2048 = 2,500 token
        // equivalents); apart it costs 234 + 6, far less than a batch.
        let mut cands: Vec<Cand> = (0..29).map(|_| packed(cand(1, 20))).collect();
        cands.extend((0..3).map(|_| packed(cand(1, 400))));
        assert_eq!(choose(&cands, 16_384, BOUND), (0..29).collect::<Vec<_>>());
        // Lengths up to 100 (the real test texts): attention padding is cheap, one batch.
        let texts: Vec<Cand> = (0..32).map(|i| packed(cand(1, 10 + i * 3))).collect();
        assert_eq!(choose(&texts, 16_384, BOUND).len(), 32);
    }

    #[test]
    fn a_request_that_waited_the_bound_joins_the_next_batch() {
        // The oldest is short: the shorts go first and the long one would wait for the next batch.
        let mut cands = vec![cand(60, 6), cand(50, 200)];
        cands.extend((0..10).map(|_| cand(1, 6)));
        let picked = choose(&cands, 4096, BOUND);
        assert_eq!(picked, (0..12).collect::<Vec<_>>(), "waited 50 ms = the bound: it joins");
        cands[1].waited = Duration::from_millis(49);
        let picked = choose(&cands, 4096, BOUND);
        assert!(!picked.contains(&1) && picked.len() == 11, "{picked:?}");
    }

    /// A simulated queue under a steady stream of short requests, more than one batch holds: a
    /// long one that arrives just after a short never gets a run of its own before it is the
    /// oldest or has waited the bound, so it must leave within the bound and never starve.
    #[test]
    fn no_starvation_a_long_request_goes_out_within_the_bound() {
        let batch_ms = 10u64;
        let bound = Duration::from_millis(45);
        let mut queue: Vec<(u64, usize)> = vec![(0, 5), (0, 100)]; // (arrival ms, length)
        let mut left_at = None;
        for step in 0..100u64 {
            let now = step * batch_ms;
            queue.extend((0..110).map(|_| (now, 5)));
            let cands: Vec<Cand> = queue.iter().map(|&(t, len)| cand(now - t, len)).collect();
            let picked = choose(&cands, 512, Some(bound));
            assert!(picked.contains(&0), "every batch serves the oldest");
            if picked.iter().any(|&i| queue[i].1 == 100) {
                left_at = Some(now);
                break;
            }
            for &i in picked.iter().rev() {
                queue.remove(i);
            }
        }
        let left_at = left_at.expect("the long request starved");
        assert!(Duration::from_millis(left_at) <= bound + Duration::from_millis(batch_ms), "left at {left_at} ms");
    }

    #[test]
    fn a_long_backlog_is_looked_at_up_to_the_candidate_cap() {
        let cands: Vec<Cand> = (0..MAX_CANDIDATES + 100).map(|i| cand(1, 4 + i % 50)).collect();
        let picked = choose(&cands, 256, BOUND);
        assert!(!picked.is_empty() && picked.iter().all(|&i| i < MAX_CANDIDATES));
        let f = picked.iter().fold(Footprint::default(), |f, &i| f.with(&cands[i]));
        assert!(f.tokens() <= 256);
    }
}
