//! Multiple-choice inputs (`inputs.choices`, issue 14): each item's context is paired with each of
//! its choices, and every pair is one sequence (tokenized as a text pair), item by item. Every count
//! is checked before anything is built for it.

use tokenizers::EncodeInput;

use crate::error::ServeError;
use crate::proto::{ChoiceInput, TextPair};

/// Most choices one item may have: a softmax over more is no longer a multiple-choice question,
/// and each choice costs a full sequence through the backbone.
pub const MAX_CHOICES: usize = 64;

/// Checks the items' shapes (2..=[`MAX_CHOICES`] choices each) and returns the number of
/// sequences they make, without allocating per choice.
pub fn count(items: &[ChoiceInput]) -> Result<usize, ServeError> {
    let mut total = 0usize;
    for (i, item) in items.iter().enumerate() {
        let k = item.choices.len();
        if k < 2 {
            return Err(ServeError::InvalidArgument(format!(
                "inputs.choices.items[{i}].choices has {k} choice{}: a multiple-choice item needs at least 2",
                if k == 1 { "" } else { "s" }
            )));
        }
        if k > MAX_CHOICES {
            return Err(ServeError::InvalidArgument(format!(
                "inputs.choices.items[{i}].choices has {k} choices; at most {MAX_CHOICES} per item"
            )));
        }
        total = total.saturating_add(k);
    }
    Ok(total)
}

/// Bytes of all texts of the items: each context counts once per choice it is paired with.
pub fn text_bytes(items: &[ChoiceInput]) -> usize {
    items.iter().map(|it| it.choices.iter().map(|c| it.context.len().saturating_add(c.len())).sum::<usize>()).sum()
}

/// The items' (context, choice) pairs in order; call after [`count`].
pub fn pairs(items: &[ChoiceInput]) -> Vec<TextPair> {
    items.iter().flat_map(|it| it.choices.iter().map(|c| TextPair { text: it.context.clone(), text_pair: c.clone() })).collect()
}

/// The pairs as tokenizer inputs, each text checked like any pair's, naming the item and choice.
pub fn encode_inputs<'a>(pairs: &'a [TextPair], items: &[ChoiceInput], max_bytes: usize) -> Result<Vec<EncodeInput<'a>>, ServeError> {
    let sizes: Vec<usize> = items.iter().map(|it| it.choices.len()).collect();
    super::tokenize::pair_inputs(pairs, max_bytes).map_err(|e| match e {
        ServeError::InvalidArgument(m) => ServeError::InvalidArgument(rename(&m, &sizes)),
        other => other,
    })
}

/// "pair 5 ..." -> "inputs.choices.items[1] choice 2 (pair 5) ...": the position a user sent.
fn rename(message: &str, sizes: &[usize]) -> String {
    let Some(rest) = message.strip_prefix("pair ") else { return message.to_string() };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let Ok(mut n) = digits.parse::<usize>() else { return message.to_string() };
    let pair = n;
    for (item, k) in sizes.iter().enumerate() {
        if n < *k {
            return format!("inputs.choices.items[{item}] choice {n} (pair {pair}){}", &rest[digits.len()..]);
        }
        n -= k;
    }
    message.to_string()
}

/// Group sizes of a request's multiple-choice items (None for other input forms).
pub fn group_sizes(inputs: Option<&crate::proto::infer_request::Inputs>) -> Option<Vec<usize>> {
    match inputs {
        Some(crate::proto::infer_request::Inputs::Choices(c)) => Some(c.items.iter().map(|i| i.choices.len()).collect()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(k: usize) -> ChoiceInput {
        ChoiceInput { context: "q".into(), choices: (0..k).map(|i| format!("c{i}")).collect() }
    }

    #[test]
    fn counts_and_refuses_one_or_too_many_choices_by_field() {
        assert_eq!(count(&[item(2), item(3)]).unwrap(), 5);
        let ServeError::InvalidArgument(m) = count(&[item(2), item(1)]).unwrap_err() else { panic!() };
        assert!(m.contains("inputs.choices.items[1].choices has 1 choice:"), "{m}");
        let ServeError::InvalidArgument(m) = count(&[item(0)]).unwrap_err() else { panic!() };
        assert!(m.contains("has 0 choices"), "{m}");
        let ServeError::InvalidArgument(m) = count(&[item(MAX_CHOICES + 1)]).unwrap_err() else { panic!() };
        assert!(m.contains("at most 64"), "{m}");
    }

    #[test]
    fn pair_errors_name_the_item_and_choice() {
        let items = [item(2), ChoiceInput { context: "q".into(), choices: vec!["a".into(), " ".into()] }];
        let ps = pairs(&items);
        assert_eq!(ps.len(), 4);
        let Err(ServeError::InvalidArgument(m)) = encode_inputs(&ps, &items, 1000) else { panic!() };
        assert!(m.starts_with("inputs.choices.items[1] choice 1 (pair 3)"), "{m}");
    }
}
