//! Extractive QA over contexts longer than the backbone: the (question, context) pair is split
//! into windows that each hold the question and a slice of the context, consecutive slices
//! sharing `stride` tokens, as the tokenizers' overflowing windows (`stride`, `only_second`) cut
//! them. The best answer over all windows wins (`api::results::qa`).

use crate::error::ServeError;

/// Context tokens consecutive windows share when the request names no `doc_stride` (the SQuAD
/// recipes' 128), at most half a window.
pub const DEFAULT_STRIDE: usize = 128;

/// Token positions (into the full encoding) of each window of an over-long pair whose context
/// tokens are `context` (a contiguous range). Checked before anything is allocated per window:
/// the windows' tokens together must stay within `budget`.
pub fn windows(
    index: usize,
    len: usize,
    context: std::ops::Range<usize>,
    max: usize,
    stride: Option<usize>,
    budget: usize,
) -> Result<Vec<Vec<usize>>, ServeError> {
    let fixed = len - context.len();
    let room = max.saturating_sub(fixed);
    if room == 0 {
        return Err(ServeError::InvalidArgument(format!(
            "pair {index}: the question and special tokens take {fixed} tokens, leaving no room for the context within the \
             backbone's {max}; shorten the question"
        )));
    }
    let stride = match stride {
        Some(s) if s >= room => {
            return Err(ServeError::InvalidArgument(format!(
                "doc_stride {s} must be smaller than the {room} context tokens a window of pair {index} holds"
            )));
        }
        Some(s) => s,
        None => DEFAULT_STRIDE.min(room / 2),
    };
    let step = room - stride;
    let count = (context.len().saturating_sub(stride)).div_ceil(step).max(1);
    if count.saturating_mul(max) > budget {
        return Err(ServeError::InvalidArgument(format!(
            "pair {index}: its context needs {count} windows of up to {max} tokens (doc_stride {stride}), over the limit of \
             {budget} tokens per request (limits.max_tokens_per_request); shorten the context or lower doc_stride"
        )));
    }
    let (prefix, suffix) = (0..context.start, context.end..len);
    let mut out = Vec::with_capacity(count);
    let mut start = context.start;
    loop {
        let end = (start + room).min(context.end);
        out.push(prefix.clone().chain(start..end).chain(suffix.clone()).collect());
        if end == context.end {
            return Ok(out);
        }
        start = end - stride;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_hold_the_question_and_overlap_by_the_stride() {
        // [CLS] q q [SEP] c0..c9 [SEP]: len 15, context 4..14, max 9 -> room 4.
        let w = windows(0, 15, 4..14, 9, Some(2), 1000).unwrap();
        let ctx: Vec<Vec<usize>> = w.iter().map(|w| w[4..w.len() - 1].to_vec()).collect();
        assert_eq!(ctx, vec![vec![4, 5, 6, 7], vec![6, 7, 8, 9], vec![8, 9, 10, 11], vec![10, 11, 12, 13]]);
        assert!(w.iter().all(|w| w[..4] == [0, 1, 2, 3] && *w.last().unwrap() == 14 && w.len() <= 9));
        // No stride: disjoint slices, the last one shorter.
        let w = windows(0, 15, 4..14, 9, Some(0), 1000).unwrap();
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), vec![9, 9, 7]);
    }

    #[test]
    fn hostile_strides_and_budgets_are_refused_before_allocating() {
        assert!(windows(0, 15, 4..14, 9, Some(4), 1000).unwrap_err().to_string().contains("doc_stride 4"));
        assert!(windows(3, 15, 4..14, 5, None, 1000).unwrap_err().to_string().contains("pair 3: the question"));
        let e = windows(0, 100_000, 4..99_999, 64, Some(58), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("windows of up to 64 tokens"), "{e}");
    }
}
