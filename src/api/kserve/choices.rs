//! KServe multiple-choice inputs: `TEXT` (the contexts, `[batch]` or `[batch, 1]`) with `CHOICES`
//! (BYTES `[batch, k]`, 2 <= k <= 64), turned into the native `inputs.choices`.

use super::decode::{CHOICES, TEXT, TEXT_PAIR};
use crate::config::LimitSettings;
use crate::error::ServeError;
use crate::proto::infer_request::Inputs;
use crate::proto::{ChoiceInput, Choices};
use crate::router::choices::MAX_CHOICES;

fn invalid(msg: impl Into<String>) -> ServeError {
    ServeError::InvalidArgument(msg.into())
}

/// Checks `CHOICES`' declared shape `[batch, k]` before anything is allocated for it.
pub fn check_shape(dims: &[usize], limits: &LimitSettings) -> Result<(), ServeError> {
    let [batch, k] = dims else {
        return Err(invalid(format!("input `{CHOICES}` must have shape [batch, choices]; got {} dimensions", dims.len())));
    };
    if *k < 2 || *k > MAX_CHOICES {
        return Err(invalid(format!(
            "input `{CHOICES}` has {k} choice{} per item: a multiple-choice item needs 2 to {MAX_CHOICES} (shape [batch, choices])",
            if *k == 1 { "" } else { "s" }
        )));
    }
    let pairs = batch.saturating_mul(*k);
    if pairs > limits.max_sequences_per_request {
        return Err(invalid(format!(
            "input `{CHOICES}`: {batch} items x {k} choices = {pairs} sequences exceed the limit of {} per request \
             (limits.max_sequences_per_request); split the request",
            limits.max_sequences_per_request
        )));
    }
    Ok(())
}

/// The contexts and the `[batch, k]` choices (row-major) as native items.
pub fn assemble(contexts: Vec<String>, has_pair: bool, dims: &[usize], choices: Vec<String>) -> Result<Inputs, ServeError> {
    if has_pair {
        return Err(invalid(format!("`{TEXT_PAIR}` and `{CHOICES}` are alternatives: send {TEXT} with {CHOICES} for multiple choice")));
    }
    let (batch, k) = (dims[0], dims[1]);
    if contexts.len() != batch {
        return Err(invalid(format!("input `{CHOICES}` has {batch} items but `{TEXT}` has {}; send one context per item", contexts.len())));
    }
    let mut rest = choices.into_iter();
    let items = contexts.into_iter().map(|context| ChoiceInput { context, choices: (&mut rest).take(k).collect() }).collect();
    Ok(Inputs::Choices(Choices { items }))
}
