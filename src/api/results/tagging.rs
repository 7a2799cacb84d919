//! Token classification results: every token's label and score with its character range, the
//! word view (a word takes its first sub-token's label, as the library's tagging head is trained)
//! and BIO labels merged into entities.

use super::slice;
use crate::api::convert::softmax;
use crate::error::ServeError;
use crate::proto::{Entity, SequenceResult, TokenTag};
use crate::router::token_info::TokenInfo;

/// `logits` is row-major `[tokens, labels]` for the tokens `info` describes, in `text`.
pub fn result(logits: Vec<f32>, labels: &[String], info: &TokenInfo, text: &str) -> Result<SequenceResult, ServeError> {
    let width = labels.len();
    if width == 0 || logits.len() != info.len() * width {
        return Err(ServeError::Internal(format!(
            "tagging head returned {} values for {} tokens x {width} labels",
            logits.len(),
            info.len()
        )));
    }
    let chars: Vec<char> = text.chars().collect();
    let mut scores = Vec::with_capacity(logits.len());
    let mut tokens = Vec::with_capacity(info.len());
    for (t, row) in logits.chunks(width).enumerate() {
        let s = softmax(row);
        let best = s.iter().enumerate().fold(0, |b, (i, v)| if *v > s[b] { i } else { b });
        let (start, end) = info.offsets[t];
        tokens.push(TokenTag {
            label: labels[best].clone(),
            label_index: best as i32,
            score: s[best],
            start,
            end,
            text: slice(&chars, start, end),
            special: info.words[t].is_none() && info.segments[t].is_none(),
        });
        scores.extend(s);
    }
    let words = words(&tokens, info, &chars);
    let mut entities = entities(&words);
    for e in &mut entities {
        e.text = slice(&chars, e.start, e.end);
    }
    Ok(SequenceResult { logits, scores, label: String::new(), label_index: -1, tokens, words, entities, ..Default::default() })
}

/// One entry per word: its first sub-token's label and score, its characters from the first
/// sub-token's start to the last one's end.
fn words(tokens: &[TokenTag], info: &TokenInfo, chars: &[char]) -> Vec<TokenTag> {
    let mut out: Vec<TokenTag> = Vec::new();
    let mut current = None;
    for (t, tok) in tokens.iter().enumerate() {
        let Some(w) = info.words[t] else {
            current = None;
            continue;
        };
        if current == Some(w) {
            let last = out.last_mut().expect("a word is open");
            last.end = last.end.max(tok.end);
            continue;
        }
        current = Some(w);
        out.push(TokenTag { special: false, ..tok.clone() });
    }
    for w in &mut out {
        w.text = slice(chars, w.start, w.end);
    }
    out
}

/// BIO (and plain IO) labels over words -> entities: `B-X` opens an X, `I-X` continues an open X
/// (or opens one, as most decoders read a stray `I-`), `O` closes.
fn entities(words: &[TokenTag]) -> Vec<Entity> {
    let mut out: Vec<Entity> = Vec::new();
    let mut open = false;
    let mut sum = 0.0f32;
    for (i, w) in words.iter().enumerate() {
        let (begin, kind) = match w.label.split_once('-') {
            Some(("B", k)) => (true, k),
            Some(("I", k)) => (false, k),
            _ if w.label == "O" => {
                close(&mut out, &mut open, sum);
                continue;
            }
            _ => (false, w.label.as_str()),
        };
        if open && !begin && out.last().is_some_and(|e| e.r#type == kind) {
            let e = out.last_mut().expect("open");
            e.end = w.end;
            e.last_word = i as u32;
            sum += w.score;
            continue;
        }
        close(&mut out, &mut open, sum);
        out.push(Entity {
            r#type: kind.to_string(),
            text: String::new(),
            start: w.start,
            end: w.end,
            score: 0.0,
            first_word: i as u32,
            last_word: i as u32,
        });
        open = true;
        sum = w.score;
    }
    close(&mut out, &mut open, sum);
    out
}

fn close(out: &mut [Entity], open: &mut bool, sum: f32) {
    if std::mem::take(open)
        && let Some(e) = out.last_mut()
    {
        e.score = sum / (e.last_word - e.first_word + 1) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(label: &str, start: u32, end: u32, score: f32) -> TokenTag {
        TokenTag { label: label.into(), start, end, score, ..Default::default() }
    }

    #[test]
    fn bio_labels_merge_into_entities() {
        let w = [
            word("B-PER", 0, 4, 0.9),
            word("I-PER", 5, 10, 0.7),
            word("O", 11, 16, 0.8),
            word("I-LOC", 17, 23, 0.6),
            word("B-LOC", 24, 27, 0.5),
            word("I-PER", 28, 30, 0.4),
        ];
        let e = entities(&w);
        let got: Vec<_> = e.iter().map(|e| (e.r#type.as_str(), e.start, e.end, e.first_word, e.last_word)).collect();
        assert_eq!(got, vec![("PER", 0, 10, 0, 1), ("LOC", 17, 23, 3, 3), ("LOC", 24, 27, 4, 4), ("PER", 28, 30, 5, 5)]);
        assert!((e[0].score - 0.8).abs() < 1e-6);
    }

    #[test]
    fn a_word_takes_its_first_sub_tokens_label_and_spans_all_of_them() {
        let text = "Zurich rocks";
        let info = TokenInfo {
            offsets: vec![(0, 0), (0, 3), (3, 6), (7, 12), (0, 0)],
            words: vec![None, Some(0), Some(0), Some(1), None],
            segments: vec![None, Some(0), Some(0), Some(0), None],
        };
        // Labels O, B-LOC: token 1 says B-LOC, token 2 (same word) says O, token 3 says O.
        let logits = vec![1.0, 0.0, 0.0, 2.0, 3.0, 0.0, 2.0, 0.0, 1.0, 0.0];
        let r = result(logits, &["O".into(), "B-LOC".into()], &info, text).unwrap();
        assert_eq!(r.tokens.iter().map(|t| t.label.as_str()).collect::<Vec<_>>(), ["O", "B-LOC", "O", "O", "O"]);
        assert!(r.tokens[0].special && !r.tokens[1].special);
        assert_eq!(r.words.iter().map(|w| (w.label.as_str(), w.text.as_str())).collect::<Vec<_>>(), [("B-LOC", "Zurich"), ("O", "rocks")]);
        assert_eq!(r.entities.len(), 1);
        assert_eq!((r.entities[0].text.as_str(), r.entities[0].start, r.entities[0].end), ("Zurich", 0, 6));
    }
}
