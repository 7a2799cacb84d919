//! Extractive QA results: the best answer spans in the context over all its windows. A span runs
//! from a start token to an end token of the context (not the question, not a special token),
//! end >= start, at most `max_len` tokens; it ranks by start logit + end logit (equal scores in
//! window and position order). Windows overlap, so the same characters can be found twice: each
//! span of characters is reported once, with its best score.

use super::slice;
use crate::error::ServeError;
use crate::proto::{Answer, SequenceResult};
use crate::router::token_info::TokenInfo;

/// `windows`: each window's head output (row-major `[tokens, 2]`: start, end) and its tokens. Keeps
/// only the `n_best` best spans while scanning (a request may hold many windows of 512 tokens:
/// millions of candidate spans, none of them stored).
pub fn result(windows: &[(&[f32], &TokenInfo)], context: &str, max_len: usize, n_best: usize) -> Result<SequenceResult, ServeError> {
    let mut best: Vec<Answer> = Vec::with_capacity(n_best + 1);
    for (w, (logits, info)) in windows.iter().enumerate() {
        if logits.len() != 2 * info.len() {
            return Err(ServeError::Internal(format!("QA head returned {} values for {} tokens x 2", logits.len(), info.len())));
        }
        let context_tokens: Vec<usize> = (0..info.len()).filter(|&t| info.segments[t] == Some(1)).collect();
        for (i, &s) in context_tokens.iter().enumerate() {
            for &e in context_tokens[i..].iter().take_while(|&&e| e - s < max_len) {
                let score = logits[2 * s] + logits[2 * e + 1];
                if best.len() == n_best && best.last().is_some_and(|worst| score <= worst.score) {
                    continue;
                }
                let (start, end) = (info.offsets[s].0, info.offsets[e].1);
                // Overlapping windows find the same characters again: keep each span once, at its best.
                if let Some(k) = best.iter().position(|a| (a.start, a.end) == (start, end)) {
                    if best[k].score >= score {
                        continue;
                    }
                    best.remove(k);
                }
                // After every span scoring at least as much: ties stay in window and position order.
                let at = best.partition_point(|a| a.score >= score);
                let a = Answer { score, start, end, window: w as u32, start_token: s as u32, end_token: e as u32, text: String::new() };
                best.insert(at, a);
                best.truncate(n_best);
            }
        }
    }
    let chars: Vec<char> = context.chars().collect();
    for a in &mut best {
        a.text = slice(&chars, a.start, a.end);
    }
    let logits = windows.iter().flat_map(|(l, _)| l.iter().copied()).collect();
    Ok(SequenceResult { logits, label_index: -1, answers: best, ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [CLS] q [SEP] c c c [SEP] over context "ab cd ef".
    fn window() -> TokenInfo {
        TokenInfo {
            offsets: vec![(0, 0), (0, 3), (0, 0), (0, 2), (3, 5), (6, 8), (0, 0)],
            words: vec![None, Some(0), None, Some(0), Some(1), Some(2), None],
            segments: vec![None, Some(0), None, Some(1), Some(1), Some(1), None],
        }
    }

    #[test]
    fn best_span_is_in_the_context_ordered_and_within_the_maximum() {
        // Start logits favour the question (token 1) and [CLS]; end logits favour token 3 < start 4.
        let start = [9.0, 9.0, 0.0, 1.0, 3.0, 0.0, 9.0];
        let end = [9.0, 9.0, 0.0, 5.0, 0.5, 2.0, 9.0];
        let logits: Vec<f32> = start.iter().zip(&end).flat_map(|(s, e)| [*s, *e]).collect();
        let info = window();
        let r = result(&[(&logits, &info)], "ab cd ef", 30, 3).unwrap();
        let got: Vec<_> = r.answers.iter().map(|a| (a.text.as_str(), a.start, a.end, a.score)).collect();
        // (3,3)=6, (4,5)=5, (3,5)=3 ... (4,4)=3.5 beats (3,5)=3.
        assert_eq!(got, vec![("ab", 0, 2, 6.0), ("cd ef", 3, 8, 5.0), ("cd", 3, 5, 3.5)]);
        let r = result(&[(&logits, &info)], "ab cd ef", 1, 2).unwrap();
        assert_eq!(r.answers.iter().map(|a| a.text.as_str()).collect::<Vec<_>>(), ["ab", "cd"]);
    }

    #[test]
    fn the_best_window_wins_and_repeated_spans_count_once() {
        let info = window();
        let flat = |s: [f32; 7], e: [f32; 7]| -> Vec<f32> { s.iter().zip(&e).flat_map(|(a, b)| [*a, *b]).collect() };
        let w0 = flat([0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0]);
        let w1 = flat([0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0]);
        let r = result(&[(&w0, &info), (&w1, &info)], "ab cd ef", 30, 2).unwrap();
        assert_eq!((r.answers[0].window, r.answers[0].score, r.answers[0].text.as_str()), (1, 6.0, "ab"));
        assert_ne!(r.answers[1].text, "ab");
        assert_eq!(r.logits.len(), 28);
    }
}
