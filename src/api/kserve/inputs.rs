//! KServe input tensors -> the native inputs (texts, pairs or token ids). Tensor checks here are
//! the protocol's own (names, datatypes, shapes, byte lengths) plus the request limits a declared
//! shape can be checked against before anything is allocated for it.

use std::collections::HashMap;

use super::decode::{ATTENTION_MASK, CHOICES, INPUT_IDS, TEXT, TEXT_PAIR, TOKEN_TYPE_IDS};
use crate::config::LimitSettings;
use crate::error::{ServeError, clip};
use crate::kserve_proto::InferTensorContents;
use crate::kserve_proto::model_infer_request::InferInputTensor;
use crate::proto::infer_request::Inputs;
use crate::proto::{TextPair, TextPairs, Texts, TokenIds, TokenizedInputs};

fn invalid(msg: impl Into<String>) -> ServeError {
    ServeError::InvalidArgument(msg.into())
}

/// One input tensor's elements.
enum Data {
    Bytes(Vec<Vec<u8>>),
    Int64(Vec<i64>),
}

/// The input's canonical name and datatype, for the names this server knows.
fn expected(name: &str) -> Option<(&'static str, &'static str)> {
    match name {
        TEXT => Some((TEXT, "BYTES")),
        TEXT_PAIR => Some((TEXT_PAIR, "BYTES")),
        CHOICES => Some((CHOICES, "BYTES")),
        INPUT_IDS => Some((INPUT_IDS, "INT64")),
        ATTENTION_MASK => Some((ATTENTION_MASK, "INT64")),
        TOKEN_TYPE_IDS => Some((TOKEN_TYPE_IDS, "INT64")),
        _ => None,
    }
}

/// Validates every input tensor and builds the native inputs (texts, pairs or token ids). Takes
/// the tensors by value: element data is moved, never copied.
pub fn decode_inputs(inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>, limits: &LimitSettings) -> Result<Inputs, ServeError> {
    if !raw.is_empty() {
        if raw.len() != inputs.len() {
            return Err(invalid(format!(
                "raw_input_contents has {} entries but the request has {} inputs; send one entry per input, in the order of `inputs`",
                raw.len(),
                inputs.len()
            )));
        }
        if let Some(t) = inputs.iter().find(|t| has_typed(t.contents.as_ref())) {
            return Err(invalid(format!(
                "input `{}` has typed contents while raw_input_contents is used; send every input the same way (raw or typed)",
                clip(&t.name)
            )));
        }
    }
    let mut raw = raw.into_iter();
    let mut found: HashMap<&'static str, (Vec<usize>, Data)> = HashMap::new();
    for t in inputs {
        let bytes = raw.next();
        let Some((name, want)) = expected(&t.name) else {
            return Err(invalid(format!(
                "unknown input `{}`; inputs are {TEXT} [+ {TEXT_PAIR}] (BYTES) or {INPUT_IDS} [+ {ATTENTION_MASK}, {TOKEN_TYPE_IDS}] (INT64)",
                clip(&t.name)
            )));
        };
        if found.contains_key(name) {
            return Err(invalid(format!("input `{name}` appears twice")));
        }
        if t.datatype != want {
            return Err(invalid(format!(
                "input `{name}` has datatype {}; it must be {want}",
                if t.datatype.is_empty() { "\"\"".into() } else { clip(&t.datatype) }
            )));
        }
        if t.parameters.keys().any(|k| k.starts_with("shared_memory")) {
            return Err(invalid(format!(
                "input `{name}`: shared memory is not supported; send the data in contents or raw_input_contents"
            )));
        }
        let shape = check_shape(name, want, &t.shape, limits)?;
        let count: usize = shape.iter().product();
        let data = match bytes {
            Some(bytes) => raw_data(name, want, &t.shape, &bytes, count, limits)?,
            None => typed_data(name, want, t, count, limits)?,
        };
        found.insert(name, (shape, data));
    }
    assemble(found)
}

fn has_typed(c: Option<&InferTensorContents>) -> bool {
    c.is_some_and(|c| {
        !(c.bool_contents.is_empty()
            && c.int_contents.is_empty()
            && c.int64_contents.is_empty()
            && c.uint_contents.is_empty()
            && c.uint64_contents.is_empty()
            && c.fp32_contents.is_empty()
            && c.fp64_contents.is_empty()
            && c.bytes_contents.is_empty())
    })
}

/// The shape as the client sent it, for messages: at most its first four dimensions.
fn fmt_shape(shape: &[i64]) -> String {
    let shown: Vec<String> = shape.iter().take(4).map(i64::to_string).collect();
    let more = if shape.len() > 4 { format!(", ... ({} dimensions)", shape.len()) } else { String::new() };
    format!("[{}{more}]", shown.join(", "))
}

/// BYTES inputs are [N] or [N, 1]; INT64 inputs are [N, L]. The sizes are client numbers: N is
/// checked against `limits.max_sequences_per_request` and L must be at least 1, before any
/// allocation (an `[N, 0]` shape holds no element but would still build N empty sequences).
fn check_shape(name: &str, want: &str, shape: &[i64], limits: &LimitSettings) -> Result<Vec<usize>, ServeError> {
    if name == CHOICES {
        let dims: Vec<usize> = shape.iter().map(|d| usize::try_from(*d).unwrap_or(usize::MAX)).collect();
        super::choices::check_shape(&dims, limits)?;
        return Ok(dims);
    }
    let text = want == "BYTES";
    let ok_rank = if text { shape.len() == 1 || (shape.len() == 2 && shape[1] == 1) } else { shape.len() == 2 };
    if !ok_rank || shape.iter().any(|d| *d < 0) {
        let want = if text { "[batch] or [batch, 1]" } else { "[batch, sequence_length]" };
        return Err(invalid(format!("input `{name}` has shape {}; it must be {want} with non-negative sizes", fmt_shape(shape))));
    }
    let dims: Vec<usize> = shape.iter().map(|d| usize::try_from(*d).unwrap_or(usize::MAX)).collect();
    if dims[0] > limits.max_sequences_per_request {
        return Err(invalid(format!(
            "input `{name}` has shape {}: {} sequences exceed the limit of {} per request (limits.max_sequences_per_request); split the request",
            fmt_shape(shape),
            dims[0],
            limits.max_sequences_per_request
        )));
    }
    if !text {
        if dims[0] > 0 && dims[1] == 0 {
            return Err(invalid(format!("input `{name}` has shape {}: every sequence needs at least one token", fmt_shape(shape))));
        }
        // Each element must then arrive as 8 bytes (raw) or one int64_contents entry (typed), which
        // bounds what is allocated for it by what was received; the router counts tokens after
        // `truncate` has cut them.
        if dims[0].checked_mul(dims[1]).is_none_or(|n| n > i32::MAX as usize) {
            return Err(invalid(format!("input `{name}`: shape {} is too large", fmt_shape(shape))));
        }
    }
    Ok(dims)
}

fn too_long(name: &str, index: usize, len: usize, limits: &LimitSettings) -> ServeError {
    invalid(format!(
        "input `{name}`: element {index} has {len} bytes; texts are limited to {} bytes (limits.max_text_bytes)",
        limits.max_text_bytes
    ))
}

fn typed_data(name: &str, want: &str, t: InferInputTensor, count: usize, limits: &LimitSettings) -> Result<Data, ServeError> {
    let sent_contents = t.contents.is_some();
    let c = t.contents.unwrap_or_default();
    let field = if want == "BYTES" { "bytes_contents" } else { "int64_contents" };
    let other = !(c.bool_contents.is_empty()
        && c.int_contents.is_empty()
        && c.uint_contents.is_empty()
        && c.uint64_contents.is_empty()
        && c.fp32_contents.is_empty()
        && c.fp64_contents.is_empty());
    if other || (want == "BYTES" && !c.int64_contents.is_empty()) || (want == "INT64" && !c.bytes_contents.is_empty()) {
        return Err(invalid(format!("input `{name}` is {want}: its typed data goes in contents.{field}, not in another contents field")));
    }
    let len = if want == "BYTES" { c.bytes_contents.len() } else { c.int64_contents.len() };
    if len != count {
        return Err(invalid(format!(
            "input `{name}`: shape {} holds {count} elements but contents.{field} has {len}{}",
            fmt_shape(&t.shape),
            if sent_contents { "" } else { " (no contents and no raw_input_contents were sent)" }
        )));
    }
    if want == "BYTES" {
        if let Some((i, b)) = c.bytes_contents.iter().enumerate().find(|(_, b)| b.len() > limits.max_text_bytes) {
            return Err(too_long(name, i, b.len(), limits));
        }
        return Ok(Data::Bytes(c.bytes_contents));
    }
    Ok(Data::Int64(c.int64_contents))
}

/// Raw contents: the declared count is trusted only as far as the bytes received go.
fn raw_data(name: &str, want: &str, shape: &[i64], bytes: &[u8], count: usize, limits: &LimitSettings) -> Result<Data, ServeError> {
    if want == "INT64" {
        if Some(bytes.len()) != count.checked_mul(8) {
            return Err(invalid(format!(
                "input `{name}`: shape {} holds {count} INT64 elements ({} bytes) but its raw contents have {} bytes",
                fmt_shape(shape),
                count.saturating_mul(8),
                bytes.len()
            )));
        }
        return Ok(Data::Int64(bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()));
    }
    // BYTES: each element is a 4-byte little-endian length, then that many bytes. Every element
    // takes at least 4 bytes, which bounds the capacity by what was received.
    let mut out = Vec::with_capacity(count.min(bytes.len() / 4));
    let mut rest = bytes;
    while !rest.is_empty() {
        if out.len() == count {
            return Err(invalid(format!(
                "input `{name}`: shape {} holds {count} elements but its raw contents encode more",
                fmt_shape(shape)
            )));
        }
        if rest.len() < 4 {
            return Err(invalid(format!("input `{name}`: raw BYTES contents end inside the length prefix of element {}", out.len())));
        }
        let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        if rest.len() - 4 < n {
            return Err(invalid(format!(
                "input `{name}`: raw BYTES element {} declares {n} bytes but only {} remain",
                out.len(),
                rest.len() - 4
            )));
        }
        if n > limits.max_text_bytes {
            return Err(too_long(name, out.len(), n, limits));
        }
        out.push(rest[4..4 + n].to_vec());
        rest = &rest[4 + n..];
    }
    if out.len() != count {
        return Err(invalid(format!(
            "input `{name}`: shape {} holds {count} elements but its raw contents encode {}",
            fmt_shape(shape),
            out.len()
        )));
    }
    Ok(Data::Bytes(out))
}

fn utf8(name: &str, items: Vec<Vec<u8>>) -> Result<Vec<String>, ServeError> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, b)| String::from_utf8(b).map_err(|_| invalid(format!("input `{name}`: element {i} is not valid UTF-8"))))
        .collect()
}

fn assemble(mut found: HashMap<&'static str, (Vec<usize>, Data)>) -> Result<Inputs, ServeError> {
    let text = found.contains_key(TEXT) || found.contains_key(TEXT_PAIR) || found.contains_key(CHOICES);
    let ids = [INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS].iter().any(|n| found.contains_key(n));
    if text && ids {
        return Err(invalid(format!("{TEXT} and {INPUT_IDS} are alternatives: send text (BYTES) or token ids (INT64), not both")));
    }
    if text {
        let Some((shape, Data::Bytes(texts))) = found.remove(TEXT) else {
            return Err(invalid(format!("missing input `{TEXT}`: {TEXT_PAIR} is the second text of a pair and needs {TEXT}")));
        };
        let texts = utf8(TEXT, texts)?;
        if let Some((dims, Data::Bytes(choices))) = found.remove(CHOICES) {
            return super::choices::assemble(texts, found.contains_key(TEXT_PAIR), &dims, utf8(CHOICES, choices)?);
        }
        return match found.remove(TEXT_PAIR) {
            None => Ok(Inputs::Texts(Texts { texts })),
            Some((pair_shape, Data::Bytes(second))) => {
                if pair_shape[0] != shape[0] {
                    return Err(invalid(format!(
                        "input `{TEXT_PAIR}` has {} elements but `{TEXT}` has {}; pairs need one of each",
                        pair_shape[0], shape[0]
                    )));
                }
                let second = utf8(TEXT_PAIR, second)?;
                Ok(Inputs::Pairs(TextPairs {
                    pairs: texts.into_iter().zip(second).map(|(text, text_pair)| TextPair { text, text_pair }).collect(),
                }))
            }
            Some(_) => unreachable!("datatype checked"),
        };
    }
    if !ids {
        return Err(invalid(format!(
            "missing input: send `{TEXT}` (BYTES, optionally with `{TEXT_PAIR}`) or `{INPUT_IDS}` (INT64, optionally with `{ATTENTION_MASK}` and `{TOKEN_TYPE_IDS}`)"
        )));
    }
    let Some((shape, Data::Int64(input_ids))) = found.remove(INPUT_IDS) else {
        return Err(invalid(format!("missing input `{INPUT_IDS}`: {ATTENTION_MASK} and {TOKEN_TYPE_IDS} go with it")));
    };
    let mut extra = |name: &str| -> Result<Option<Vec<i64>>, ServeError> {
        match found.remove(name) {
            None => Ok(None),
            Some((s, Data::Int64(v))) if s == shape => Ok(Some(v)),
            Some((s, _)) => Err(invalid(format!("input `{name}` has shape {s:?} but `{INPUT_IDS}` has {shape:?}; they must match"))),
        }
    };
    let (mask, types) = (extra(ATTENTION_MASK)?, extra(TOKEN_TYPE_IDS)?);
    let (rows, len) = (shape[0], shape[1]);
    let row = |v: &Option<Vec<i64>>, r: usize| v.as_ref().map(|v| v[r * len..(r + 1) * len].to_vec()).unwrap_or_default();
    let sequences = (0..rows)
        .map(|r| TokenIds {
            input_ids: input_ids[r * len..(r + 1) * len].to_vec(),
            attention_mask: row(&mask, r),
            token_type_ids: row(&types, r),
        })
        .collect();
    Ok(Inputs::Tokens(TokenizedInputs { sequences }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_input(shape: Vec<i64>, items: &[&str]) -> InferInputTensor {
        InferInputTensor {
            name: TEXT.into(),
            datatype: "BYTES".into(),
            shape,
            contents: Some(InferTensorContents {
                bytes_contents: items.iter().map(|s| s.as_bytes().to_vec()).collect(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn raw_bytes(items: &[&str]) -> Vec<u8> {
        items.iter().flat_map(|s| (s.len() as u32).to_le_bytes().into_iter().chain(s.bytes())).collect()
    }

    fn err(inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> String {
        match decode_inputs(inputs, raw, &LimitSettings::default()) {
            Err(ServeError::InvalidArgument(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn typed_and_raw_text_decode_alike() {
        let limits = LimitSettings::default();
        let typed = decode_inputs(vec![text_input(vec![2, 1], &["a b", "ç"])], vec![], &limits).unwrap();
        let mut t = text_input(vec![2], &[]);
        t.contents = None;
        let raw = decode_inputs(vec![t], vec![raw_bytes(&["a b", "ç"])], &limits).unwrap();
        assert_eq!(typed, raw);
        assert_eq!(typed, Inputs::Texts(Texts { texts: vec!["a b".into(), "ç".into()] }));
    }

    #[test]
    fn int64_rows_split_by_shape() {
        let ids = InferInputTensor { name: INPUT_IDS.into(), datatype: "INT64".into(), shape: vec![2, 3], ..Default::default() };
        let raw: Vec<u8> = [1i64, 2, 3, 4, 5, 6].iter().flat_map(|v| v.to_le_bytes()).collect();
        let Inputs::Tokens(t) = decode_inputs(vec![ids], vec![raw], &LimitSettings::default()).unwrap() else { panic!() };
        assert_eq!(t.sequences[1].input_ids, vec![4, 5, 6]);
        assert!(t.sequences[1].attention_mask.is_empty());
    }

    #[test]
    fn malformed_tensors_are_named_precisely() {
        assert!(
            err(vec![text_input(vec![3, 1], &["a", "b"])], vec![])
                .contains("shape [3, 1] holds 3 elements but contents.bytes_contents has 2")
        );
        let mut t = text_input(vec![1], &[]);
        t.contents = None;
        assert!(err(vec![t.clone()], vec![vec![9, 0, 0, 0, b'x']]).contains("declares 9 bytes but only 1 remain"));
        assert!(err(vec![t.clone()], vec![raw_bytes(&["a", "b"])]).contains("holds 1 elements but its raw contents encode more"));
        let mut wrong = text_input(vec![1], &["a"]);
        wrong.datatype = "INT32".into();
        assert!(err(vec![wrong], vec![]).contains("has datatype INT32; it must be BYTES"));
        let mut extra = text_input(vec![1], &["a"]);
        extra.name = "IMAGE".into();
        assert!(err(vec![text_input(vec![1], &["a"]), extra], vec![]).contains("unknown input `IMAGE`"));
        assert!(err(vec![], vec![]).contains("missing input"));
        assert!(
            err(vec![text_input(vec![1], &["a"]), t], vec![raw_bytes(&["a"])])
                .contains("raw_input_contents has 1 entries but the request has 2 inputs")
        );
        let mixed = vec![text_input(vec![1], &["a"])];
        assert!(err(mixed, vec![raw_bytes(&["a"])]).contains("has typed contents while raw_input_contents is used"));
        let ids = InferInputTensor { name: INPUT_IDS.into(), datatype: "INT64".into(), shape: vec![1, 3], ..Default::default() };
        assert!(err(vec![ids.clone()], vec![vec![0; 16]]).contains("holds 3 INT64 elements (24 bytes) but its raw contents have 16 bytes"));
        let mut typed_ids = ids;
        typed_ids.contents = Some(InferTensorContents { int64_contents: vec![101, 7, 102], ..Default::default() });
        assert!(err(vec![text_input(vec![1], &["a"]), typed_ids], vec![]).contains("alternatives"));
    }

    /// The red-team requests: each declares a huge count with a few bytes and must be refused
    /// before anything is allocated for it (the first used to abort the process).
    #[test]
    fn declared_counts_are_checked_before_allocation() {
        let mut t = text_input(vec![i32::MAX as i64], &[]);
        t.contents = None;
        assert!(err(vec![t.clone()], vec![vec![]]).contains("2147483647 sequences exceed the limit of 256"));
        let ids = |shape: Vec<i64>| InferInputTensor { name: INPUT_IDS.into(), datatype: "INT64".into(), shape, ..Default::default() };
        assert!(err(vec![ids(vec![i32::MAX as i64, 0])], vec![vec![]]).contains("sequences exceed the limit"));
        assert!(err(vec![ids(vec![16, 0])], vec![vec![]]).contains("every sequence needs at least one token"));
        assert!(err(vec![ids(vec![256, 1 << 20])], vec![vec![]]).contains("but its raw contents have 0 bytes"));
        assert!(err(vec![ids(vec![1, i64::MAX])], vec![vec![]]).contains("is too large"));
        // Raw BYTES encoding more elements than the shape declares stops at the first extra one.
        let mut one = text_input(vec![1], &[]);
        one.contents = None;
        assert!(err(vec![one.clone()], vec![vec![0; 4 << 20]]).contains("holds 1 elements but its raw contents encode more"));
        let big = "x".repeat(LimitSettings::default().max_text_bytes + 1);
        assert!(err(vec![one], vec![raw_bytes(&[&big])]).contains("limits.max_text_bytes"));
        assert!(err(vec![text_input(vec![1], &[&big])], vec![]).contains("limits.max_text_bytes"));
    }
}
