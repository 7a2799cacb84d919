//! Turns request inputs into validated, unpadded token sequences.

use tokenizers::{EncodeInput, Encoding, Tokenizer};

use super::qa_windows;
use super::token_info::TokenInfo;
use crate::engine::Sequence;
use crate::error::ServeError;
use crate::proto::{TextPair, TokenIds};
use crate::repository::Backbone;

/// What to do with a text longer than the backbone accepts.
#[derive(Debug, Clone, Copy)]
pub enum Overlong {
    Reject,
    /// Cut it, keeping the final special token.
    Truncate,
    /// Split a pair's context into windows (extractive QA, [`qa_windows`]); `budget` bounds the
    /// windows' tokens together.
    Windows {
        stride: Option<usize>,
        budget: usize,
    },
}

/// One engine sequence made from input `input`, with its tokens' origin.
pub struct Encoded {
    pub input: usize,
    pub sequence: Sequence,
    pub tokens: TokenInfo,
}

/// Tokenizes texts or text pairs with the backbone's tokenizer (special tokens added, character
/// offsets kept): one sequence per input, or several for a QA context split into windows.
pub fn encode_texts(backbone: &Backbone, inputs: Vec<EncodeInput<'_>>, overlong: Overlong) -> Result<Vec<Encoded>, ServeError> {
    let tokenizer: &Tokenizer = backbone.tokenizer.as_ref().ok_or_else(|| {
        ServeError::FailedPrecondition(format!(
            "backbone `{}` has no tokenizer; send pre-tokenized ids (inputs.tokens) instead of text",
            backbone.name()
        ))
    })?;
    let encodings =
        tokenizer.encode_batch_char_offsets(inputs, true).map_err(|e| ServeError::InvalidArgument(format!("tokenization failed: {e}")))?;
    let max = backbone.manifest.max_positions;
    let pad = backbone.manifest.pad_token_id;
    let mut out = Vec::with_capacity(encodings.len());
    for (i, e) in encodings.into_iter().enumerate() {
        fit(i, e, max, pad, overlong, &mut out)?;
    }
    Ok(out)
}

fn fit(index: usize, e: Encoding, max: usize, pad: i64, overlong: Overlong, out: &mut Vec<Encoded>) -> Result<(), ServeError> {
    // Text the normalizer reduced to nothing (zero-width or other invisible characters) or that
    // holds only special tokens ("[PAD]", "[SEP]") has no content to classify.
    let content = e.get_ids().iter().zip(e.get_special_tokens_mask()).any(|(&id, &special)| special == 0 && i64::from(id) != pad);
    if !content {
        return Err(ServeError::InvalidArgument(format!(
            "input {index} has no content: after normalization it holds only special tokens or nothing"
        )));
    }
    let tokens = TokenInfo::of(&e);
    let wide = |v: &[u32]| v.iter().map(|&v| v as i64).collect::<Vec<_>>();
    let sequence = Sequence { ids: wide(e.get_ids()), mask: wide(e.get_attention_mask()), types: wide(e.get_type_ids()) };
    let len = sequence.ids.len();
    if len <= max {
        out.push(Encoded { input: index, sequence, tokens });
        return Ok(());
    }
    let picks = match overlong {
        Overlong::Reject => {
            return Err(ServeError::InvalidArgument(format!(
                "input {index} has {len} tokens but the backbone accepts at most {max}; shorten it or set truncate"
            )));
        }
        // Keep the final special token ([SEP] / </s>) so the cut sequence stays well-formed.
        Overlong::Truncate => vec![(0..max - 1).chain(std::iter::once(len - 1)).collect()],
        Overlong::Windows { stride, budget } => {
            let first = tokens.segments.iter().position(|s| *s == Some(1));
            let last = tokens.segments.iter().rposition(|s| *s == Some(1));
            let (Some(first), Some(last)) = (first, last) else {
                return Err(ServeError::InvalidArgument(format!(
                    "input {index} has {len} tokens but the backbone accepts at most {max}, and it has no context                      (text_pair) to split into windows; shorten it"
                )));
            };
            qa_windows::windows(index, len, first..last + 1, max, stride, budget)?
        }
    };
    for keep in picks {
        let pick = |v: &[i64]| keep.iter().map(|&j| v[j]).collect::<Vec<_>>();
        let sequence = Sequence { ids: pick(&sequence.ids), mask: pick(&sequence.mask), types: pick(&sequence.types) };
        out.push(Encoded { input: index, sequence, tokens: tokens.select(&keep) });
    }
    Ok(())
}

/// No visible content: only whitespace and control characters (NUL included).
fn blank(text: &str) -> bool {
    text.chars().all(|c| c.is_whitespace() || c.is_control())
}

/// Cheap checks on one text before it costs tokenizer time: size, then content.
fn check_text(what: &str, text: &str, max_bytes: usize) -> Result<(), ServeError> {
    if text.len() > max_bytes {
        return Err(ServeError::InvalidArgument(format!(
            "{what} has {} bytes; texts are limited to {max_bytes} bytes (limits.max_text_bytes): shorten it",
            text.len()
        )));
    }
    if blank(text) {
        return Err(ServeError::InvalidArgument(format!("{what} is empty (only whitespace or control characters)")));
    }
    Ok(())
}

pub fn text_inputs(texts: &[String], max_bytes: usize) -> Result<Vec<EncodeInput<'_>>, ServeError> {
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            check_text(&format!("text {i}"), t, max_bytes)?;
            Ok(EncodeInput::Single(t.as_str().into()))
        })
        .collect()
}

pub fn pair_inputs(pairs: &[TextPair], max_bytes: usize) -> Result<Vec<EncodeInput<'_>>, ServeError> {
    pairs
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if blank(&p.text) {
                return Err(ServeError::InvalidArgument(format!("pair {i} has an empty text (inputs.pairs[{i}].text)")));
            }
            if blank(&p.text_pair) {
                return Err(ServeError::InvalidArgument(format!(
                    "pair {i} has an empty text (inputs.pairs[{i}].text_pair; for extractive QA, the context)"
                )));
            }
            check_text(&format!("pair {i} text"), &p.text, max_bytes)?;
            check_text(&format!("pair {i} text_pair"), &p.text_pair, max_bytes)?;
            Ok(EncodeInput::Dual(p.text.as_str().into(), p.text_pair.as_str().into()))
        })
        .collect()
}

/// Checks pre-tokenized ids before they reach ONNX Runtime: an out-of-range id in a Gather is
/// undefined behaviour there, not an error.
pub fn check_ids(backbone: &Backbone, inputs: Vec<TokenIds>, truncate: bool) -> Result<Vec<Sequence>, ServeError> {
    let m = &backbone.manifest;
    let mut out = Vec::with_capacity(inputs.len());
    for (i, t) in inputs.into_iter().enumerate() {
        let bad = |what: String| Err(ServeError::InvalidArgument(format!("sequence {i}: {what}")));
        let n = t.input_ids.len();
        if n == 0 {
            return bad("input_ids is empty".into());
        }
        if let Some((j, id)) = t.input_ids.iter().enumerate().find(|(_, id)| **id < 0 || **id >= m.vocab_size as i64) {
            return bad(format!("token id {id} at position {j} is outside the vocabulary 0..{}", m.vocab_size));
        }
        let mask = if t.attention_mask.is_empty() { vec![1; n] } else { t.attention_mask };
        if mask.len() != n {
            return bad(format!("attention_mask has {} entries but input_ids has {n}", mask.len()));
        }
        if mask.iter().any(|v| *v != 0 && *v != 1) {
            return bad("attention_mask values must be 0 or 1".into());
        }
        let types = if t.token_type_ids.is_empty() { vec![0; n] } else { t.token_type_ids };
        if types.len() != n {
            return bad(format!("token_type_ids has {} entries but input_ids has {n}", types.len()));
        }
        if let Some(v) = types.iter().find(|v| **v < 0 || **v >= m.type_vocab_size as i64) {
            return bad(format!("token type {v} is outside 0..{}", m.type_vocab_size));
        }
        let mut seq = Sequence { ids: t.input_ids, mask, types };
        if n > m.max_positions {
            if !truncate {
                return bad(format!("{n} tokens but the backbone accepts at most {}; shorten it or set truncate", m.max_positions));
            }
            seq.ids.truncate(m.max_positions);
            seq.mask.truncate(m.max_positions);
            seq.types.truncate(m.max_positions);
        }
        // After truncation: what the engine will see must still attend to some real token.
        if seq.mask.iter().all(|v| *v == 0) {
            return bad(format!("attention_mask masks every token{}", if n > m.max_positions { " that truncation keeps" } else { "" }));
        }
        if !seq.ids.iter().zip(&seq.mask).any(|(id, on)| *on == 1 && *id != m.pad_token_id) {
            return bad(format!("no content: every attended token is the padding id {}", m.pad_token_id));
        }
        out.push(seq);
    }
    Ok(out)
}
