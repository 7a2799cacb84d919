//! Where each token of an engine sequence came from in the request's text. Token heads answer in
//! the text's terms (character ranges, words, answer spans), so the router keeps what the
//! tokenizer knew about every token it sends to the engine.

use tokenizers::Encoding;

use crate::engine::TaskRun;
use crate::error::ServeError;
use crate::proto::infer_request::Inputs;
use crate::repository::manifest::HeadKind;

/// Token heads answer in characters of one text: a tagger needs `texts`, extractive QA `pairs`
/// (question, context); token ids carry no character offsets.
pub fn check_inputs(tasks: &[TaskRun], inputs: &Inputs) -> Result<(), ServeError> {
    for run in tasks {
        let (name, kind) = (run.task.name(), run.task.manifest.head.kind);
        let problem = match (kind, inputs) {
            (HeadKind::Tagging, Inputs::Tokens(_)) => "token ids carry no character offsets: send inputs.texts (KServe: TEXT)",
            (HeadKind::Tagging, Inputs::Pairs(_) | Inputs::Choices(_)) => {
                "a tagger labels the tokens of one text: send inputs.texts (KServe: TEXT)"
            }
            (HeadKind::QuestionAnswering, Inputs::Choices(_)) => {
                "send inputs.pairs with text = the question and text_pair = the context, not multiple-choice items"
            }
            (HeadKind::QuestionAnswering, Inputs::Tokens(_) | Inputs::Texts(_)) => {
                "send inputs.pairs with text = the question and text_pair = the context (inputs.pairs[].text_pair is missing; \
                 KServe: TEXT and TEXT_PAIR)"
            }
            _ => continue,
        };
        return Err(ServeError::InvalidArgument(format!("task `{name}` is a {} task: {problem}", kind.as_str())));
    }
    Ok(())
}

/// One engine sequence's tokens: their character ranges, words and segments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenInfo {
    /// Character range in its own text (Unicode code points, as Python indexes strings; end
    /// exclusive); `(0, 0)` for special tokens.
    pub offsets: Vec<(u32, u32)>,
    /// Word index within its own text; `None` for special tokens.
    pub words: Vec<Option<u32>>,
    /// 0: the first text (a pair's question), 1: `text_pair` (the context); `None`: special token.
    pub segments: Vec<Option<u8>>,
}

impl TokenInfo {
    /// From an encoding made with character offsets (`encode_batch_char_offsets`).
    pub fn of(e: &Encoding) -> Self {
        let special = e.get_special_tokens_mask();
        let segment = |(i, s): (usize, &Option<usize>)| if special[i] == 1 { None } else { s.map(|s| s.min(1) as u8) };
        Self {
            offsets: e
                .get_offsets()
                .iter()
                .zip(special)
                .map(|(&(a, b), &sp)| if sp == 1 { (0, 0) } else { (a as u32, b as u32) })
                .collect(),
            words: e.get_word_ids().iter().zip(special).map(|(w, &sp)| if sp == 1 { None } else { *w }).collect(),
            segments: e.get_sequence_ids().iter().enumerate().map(segment).collect(),
        }
    }

    /// The tokens at `keep`, in that order (truncation, QA windows).
    pub fn select(&self, keep: &[usize]) -> Self {
        Self {
            offsets: keep.iter().map(|&i| self.offsets[i]).collect(),
            words: keep.iter().map(|&i| self.words[i]).collect(),
            segments: keep.iter().map(|&i| self.segments[i]).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }
}

/// Answer-span options of a request's extractive QA tasks, checked by the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerOptions {
    /// Longest answer in tokens; `None`: each task's default.
    pub max_answer_length: Option<usize>,
    pub n_best: usize,
}

/// The texts of a request (inputs.texts or inputs.pairs) and the origin of every engine sequence.
#[derive(Debug, Clone)]
pub struct RequestText {
    /// Each input's text and, for pairs, its `text_pair`.
    pub inputs: Vec<(String, Option<String>)>,
    /// Per engine sequence (several per input when a QA context is split into windows).
    pub tokens: Vec<TokenInfo>,
    /// Per engine sequence: the input it belongs to; ascending.
    pub input_of: Vec<usize>,
    pub answers: AnswerOptions,
}

impl RequestText {
    /// The engine sequences of input `i` (its windows, in order).
    pub fn sequences_of(&self, i: usize) -> std::ops::Range<usize> {
        let start = self.input_of.partition_point(|&x| x < i);
        start..self.input_of.partition_point(|&x| x <= i)
    }
}
