//! KServe `ModelInferRequest` -> the native `InferRequest` the router takes, so both APIs share
//! one validation, batching and execution path. Tensor checks here are the protocol's own
//! (names, datatypes, shapes, byte lengths); content checks (token ids, lengths) stay in the router.

use std::collections::HashMap;
use std::time::Duration;

use crate::error::ServeError;
use crate::kserve_proto::infer_parameter::ParameterChoice;
use crate::kserve_proto::model_infer_request::InferInputTensor;
use crate::kserve_proto::{InferParameter, InferTensorContents, ModelInferRequest};
use crate::proto::infer_request::Inputs;
use crate::proto::{InferRequest, TaskRef, TextPair, TextPairs, Texts, TokenIds, TokenizedInputs};

pub const TEXT: &str = "TEXT";
pub const TEXT_PAIR: &str = "TEXT_PAIR";
pub const INPUT_IDS: &str = "input_ids";
pub const ATTENTION_MASK: &str = "attention_mask";
pub const TOKEN_TYPE_IDS: &str = "token_type_ids";

/// Request parameters this server reads; see README "KServe v2 endpoint".
pub const PARAMETERS: &[&str] = &["drop_first", "tasks", "truncate", "timeout"];

/// A KServe request translated for the router.
#[derive(Debug)]
pub struct Decoded {
    pub native: InferRequest,
    /// Output-name prefix of each task in `native.tasks`: "" for the model itself, `entry/` for
    /// each fan-out entry of the `tasks` parameter.
    pub prefixes: Vec<String>,
    /// Requested output names, in request order; empty = all.
    pub outputs: Vec<String>,
    /// The `timeout` parameter (Triton: microseconds).
    pub timeout: Option<Duration>,
}

fn invalid(msg: impl Into<String>) -> ServeError {
    ServeError::InvalidArgument(msg.into())
}

/// "" = the default version; otherwise a decimal version number.
pub fn parse_version(model: &str, version: &str) -> Result<Option<u32>, ServeError> {
    if version.is_empty() {
        return Ok(None);
    }
    version
        .parse::<u32>()
        .map(Some)
        .map_err(|_| invalid(format!("model `{model}`: version `{version}` is not a number (leave it empty for the default version)")))
}

pub fn decode(req: ModelInferRequest) -> Result<Decoded, ServeError> {
    if req.model_name.is_empty() {
        return Err(invalid("model_name is empty: name the task to run"));
    }
    let version = parse_version(&req.model_name, &req.model_version)?;
    let params = Params::read(&req.parameters)?;
    let mut tasks = vec![TaskRef { name: req.model_name.clone(), version, drop_first: params.drop_first }];
    let mut prefixes = vec![String::new()];
    for entry in params.tasks.iter() {
        let (task, prefix) = fan_out_entry(entry)?;
        if prefixes.contains(&prefix) || (version.is_none() && task.name == req.model_name && task.version.is_none()) {
            return Err(invalid(format!(
                "parameter `tasks`: `{entry}` is listed twice (or repeats model_name); each task's outputs need distinct names"
            )));
        }
        tasks.push(task);
        prefixes.push(prefix);
    }
    let inputs = decode_inputs(&req.inputs, &req.raw_input_contents)?;
    let mut outputs = Vec::with_capacity(req.outputs.len());
    for o in &req.outputs {
        if o.parameters.get("classification").is_some_and(|p| !matches!(p.parameter_choice, Some(ParameterChoice::Int64Param(0)) | None)) {
            return Err(invalid(format!(
                "output `{}`: the classification extension is not supported; request `label` and `probabilities`",
                o.name
            )));
        }
        if o.parameters.keys().any(|k| k.starts_with("shared_memory")) {
            return Err(invalid(format!("output `{}`: shared memory is not supported; outputs come in raw_output_contents", o.name)));
        }
        if outputs.contains(&o.name) {
            return Err(invalid(format!("output `{}` is requested twice", o.name)));
        }
        outputs.push(o.name.clone());
    }
    let native = InferRequest { tasks, inputs: Some(inputs), truncate: params.truncate, id: req.id, return_fusion_weights: false };
    Ok(Decoded { native, prefixes, outputs, timeout: params.timeout })
}

#[derive(Default)]
struct Params {
    drop_first: Option<u32>,
    tasks: Vec<String>,
    truncate: bool,
    timeout: Option<Duration>,
}

impl Params {
    fn read(map: &HashMap<String, InferParameter>) -> Result<Self, ServeError> {
        let mut p = Params::default();
        // Sorted, so that the first problem reported does not depend on hash order.
        let mut keys: Vec<&String> = map.keys().collect();
        keys.sort();
        for key in keys {
            let value = map[key].parameter_choice.as_ref();
            match key.as_str() {
                "drop_first" => {
                    p.drop_first =
                        Some(u32::try_from(int_param(key, value)?).map_err(|_| invalid("parameter `drop_first` is out of range"))?)
                }
                "tasks" => match value {
                    Some(ParameterChoice::StringParam(s)) => {
                        p.tasks = s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
                    }
                    _ => return Err(invalid("parameter `tasks` must be a string such as \"topic,score@2,sent:1\"")),
                },
                "truncate" => match value {
                    Some(ParameterChoice::BoolParam(b)) => p.truncate = *b,
                    _ => return Err(invalid("parameter `truncate` must be a bool")),
                },
                "timeout" => {
                    let us = int_param(key, value)?;
                    p.timeout = (us > 0).then(|| Duration::from_micros(us));
                }
                "sequence_id" | "sequence_start" | "sequence_end" => {
                    let set = match value {
                        Some(ParameterChoice::BoolParam(b)) => *b,
                        Some(ParameterChoice::Int64Param(v)) => *v != 0,
                        Some(ParameterChoice::Uint64Param(v)) => *v != 0,
                        Some(ParameterChoice::StringParam(s)) => !s.is_empty(),
                        _ => false,
                    };
                    if set {
                        return Err(invalid(format!(
                            "parameter `{key}`: sequence batching is not supported; every request is independent"
                        )));
                    }
                }
                // Reserved by the protocol and meaningless here (HTTP-only or scheduling hints).
                "priority" | "headers" | "binary_data_output" => {}
                k if k.starts_with("triton_") => {}
                other => {
                    return Err(invalid(format!("unknown parameter `{other}`; this server reads {}", PARAMETERS.join(", "))));
                }
            }
        }
        Ok(p)
    }
}

fn int_param(key: &str, value: Option<&ParameterChoice>) -> Result<u64, ServeError> {
    match value {
        Some(ParameterChoice::Int64Param(v)) if *v >= 0 => Ok(*v as u64),
        Some(ParameterChoice::Uint64Param(v)) => Ok(*v),
        Some(ParameterChoice::Int64Param(v)) => Err(invalid(format!("parameter `{key}` must not be negative, got {v}"))),
        _ => Err(invalid(format!("parameter `{key}` must be an integer (int64_param or uint64_param)"))),
    }
}

/// `name[@version][:drop_first]` -> the task and its output prefix (`name/` or `name@version/`).
fn fan_out_entry(entry: &str) -> Result<(TaskRef, String), ServeError> {
    let bad = |what: &str| invalid(format!("parameter `tasks`: entry `{entry}` {what}; write name[@version][:drop_first]"));
    let (head, drop) = match entry.split_once(':') {
        Some((h, d)) => (h, Some(d.parse::<u32>().map_err(|_| bad("has a drop_first that is not a number"))?)),
        None => (entry, None),
    };
    let (name, version) = match head.split_once('@') {
        Some((n, v)) => (n, Some(v.parse::<u32>().map_err(|_| bad("has a version that is not a number"))?)),
        None => (head, None),
    };
    if name.is_empty() {
        return Err(bad("has no task name"));
    }
    Ok((TaskRef { name: name.to_string(), version, drop_first: drop }, format!("{head}/")))
}

/// One input tensor's elements.
enum Data {
    Bytes(Vec<Vec<u8>>),
    Int64(Vec<i64>),
}

fn expected_type(name: &str) -> Option<&'static str> {
    match name {
        TEXT | TEXT_PAIR => Some("BYTES"),
        INPUT_IDS | ATTENTION_MASK | TOKEN_TYPE_IDS => Some("INT64"),
        _ => None,
    }
}

/// Validates every input tensor and builds the native inputs (texts, pairs or token ids).
fn decode_inputs(inputs: &[InferInputTensor], raw: &[Vec<u8>]) -> Result<Inputs, ServeError> {
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
                t.name
            )));
        }
    }
    let mut found: HashMap<&str, (Vec<usize>, Data)> = HashMap::new();
    for (i, t) in inputs.iter().enumerate() {
        let Some(want) = expected_type(&t.name) else {
            return Err(invalid(format!(
                "unknown input `{}`; inputs are {TEXT} [+ {TEXT_PAIR}] (BYTES) or {INPUT_IDS} [+ {ATTENTION_MASK}, {TOKEN_TYPE_IDS}] (INT64)",
                t.name
            )));
        };
        if found.contains_key(t.name.as_str()) {
            return Err(invalid(format!("input `{}` appears twice", t.name)));
        }
        if t.datatype != want {
            return Err(invalid(format!(
                "input `{}` has datatype {}; it must be {want}",
                t.name,
                if t.datatype.is_empty() { "\"\"" } else { &t.datatype }
            )));
        }
        if t.parameters.keys().any(|k| k.starts_with("shared_memory")) {
            return Err(invalid(format!(
                "input `{}`: shared memory is not supported; send the data in contents or raw_input_contents",
                t.name
            )));
        }
        let shape = check_shape(t)?;
        let count: usize = shape.iter().product();
        let data = match raw.get(i) {
            Some(bytes) => raw_data(t, want, bytes, count)?,
            None => typed_data(t, want, count)?,
        };
        found.insert(t.name.as_str(), (shape, data));
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

fn fmt_shape(shape: &[i64]) -> String {
    format!("[{}]", shape.iter().map(i64::to_string).collect::<Vec<_>>().join(", "))
}

/// BYTES inputs are [N] or [N, 1]; INT64 inputs are [N, L]. Returns the shape as usizes.
fn check_shape(t: &InferInputTensor) -> Result<Vec<usize>, ServeError> {
    let text = expected_type(&t.name) == Some("BYTES");
    let ok_rank = if text { t.shape.len() == 1 || (t.shape.len() == 2 && t.shape[1] == 1) } else { t.shape.len() == 2 };
    if !ok_rank || t.shape.iter().any(|d| *d < 0) {
        let want = if text { "[batch] or [batch, 1]" } else { "[batch, sequence_length]" };
        return Err(invalid(format!("input `{}` has shape {}; it must be {want} with non-negative sizes", t.name, fmt_shape(&t.shape))));
    }
    let shape: Vec<usize> = t.shape.iter().map(|d| *d as usize).collect();
    if shape.iter().try_fold(1usize, |acc, d| acc.checked_mul(*d)).is_none_or(|n| n > i32::MAX as usize) {
        return Err(invalid(format!("input `{}`: shape {} is too large", t.name, fmt_shape(&t.shape))));
    }
    Ok(shape)
}

fn typed_data(t: &InferInputTensor, want: &str, count: usize) -> Result<Data, ServeError> {
    let empty = InferTensorContents::default();
    let c = t.contents.as_ref().unwrap_or(&empty);
    let (field, len) =
        if want == "BYTES" { ("bytes_contents", c.bytes_contents.len()) } else { ("int64_contents", c.int64_contents.len()) };
    let mut other = c.clone();
    other.bytes_contents.clear();
    other.int64_contents.clear();
    if has_typed(Some(&other)) || (want == "BYTES" && !c.int64_contents.is_empty()) || (want == "INT64" && !c.bytes_contents.is_empty()) {
        return Err(invalid(format!(
            "input `{}` is {want}: its typed data goes in contents.{field}, not in another contents field",
            t.name
        )));
    }
    if len != count {
        return Err(invalid(format!(
            "input `{}`: shape {} holds {count} elements but contents.{field} has {len}{}",
            t.name,
            fmt_shape(&t.shape),
            if t.contents.is_none() { " (no contents and no raw_input_contents were sent)" } else { "" }
        )));
    }
    Ok(if want == "BYTES" { Data::Bytes(c.bytes_contents.clone()) } else { Data::Int64(c.int64_contents.clone()) })
}

fn raw_data(t: &InferInputTensor, want: &str, bytes: &[u8], count: usize) -> Result<Data, ServeError> {
    if want == "INT64" {
        if bytes.len() != count * 8 {
            return Err(invalid(format!(
                "input `{}`: shape {} holds {count} INT64 elements ({} bytes) but its raw contents have {} bytes",
                t.name,
                fmt_shape(&t.shape),
                count * 8,
                bytes.len()
            )));
        }
        return Ok(Data::Int64(bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()));
    }
    // BYTES: each element is a 4-byte little-endian length, then that many bytes.
    let mut out = Vec::with_capacity(count);
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(invalid(format!("input `{}`: raw BYTES contents end inside the length prefix of element {}", t.name, out.len())));
        }
        let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        if rest.len() - 4 < n {
            return Err(invalid(format!(
                "input `{}`: raw BYTES element {} declares {n} bytes but only {} remain",
                t.name,
                out.len(),
                rest.len() - 4
            )));
        }
        out.push(rest[4..4 + n].to_vec());
        rest = &rest[4 + n..];
    }
    if out.len() != count {
        return Err(invalid(format!(
            "input `{}`: shape {} holds {count} elements but its raw contents encode {}",
            t.name,
            fmt_shape(&t.shape),
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

fn assemble(mut found: HashMap<&str, (Vec<usize>, Data)>) -> Result<Inputs, ServeError> {
    let text = found.contains_key(TEXT) || found.contains_key(TEXT_PAIR);
    let ids = [INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS].iter().any(|n| found.contains_key(n));
    if text && ids {
        return Err(invalid(format!("{TEXT} and {INPUT_IDS} are alternatives: send text (BYTES) or token ids (INT64), not both")));
    }
    if text {
        let Some((shape, Data::Bytes(texts))) = found.remove(TEXT) else {
            return Err(invalid(format!("missing input `{TEXT}`: {TEXT_PAIR} is the second text of a pair and needs {TEXT}")));
        };
        let texts = utf8(TEXT, texts)?;
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
        match decode_inputs(&inputs, &raw) {
            Err(ServeError::InvalidArgument(m)) => m,
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
    }

    #[test]
    fn typed_and_raw_text_decode_alike() {
        let typed = decode_inputs(&[text_input(vec![2, 1], &["a b", "ç"])], &[]).unwrap();
        let mut t = text_input(vec![2], &[]);
        t.contents = None;
        let raw = decode_inputs(&[t], &[raw_bytes(&["a b", "ç"])]).unwrap();
        assert_eq!(typed, raw);
        assert_eq!(typed, Inputs::Texts(Texts { texts: vec!["a b".into(), "ç".into()] }));
    }

    #[test]
    fn int64_rows_split_by_shape() {
        let ids = InferInputTensor { name: INPUT_IDS.into(), datatype: "INT64".into(), shape: vec![2, 3], ..Default::default() };
        let raw: Vec<u8> = [1i64, 2, 3, 4, 5, 6].iter().flat_map(|v| v.to_le_bytes()).collect();
        let Inputs::Tokens(t) = decode_inputs(&[ids], &[raw]).unwrap() else { panic!() };
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
        assert!(err(vec![t.clone()], vec![raw_bytes(&["a", "b"])]).contains("holds 1 elements but its raw contents encode 2"));
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

    #[test]
    fn fan_out_entries_parse() {
        let (t, p) = fan_out_entry("topic@2:1").unwrap();
        assert_eq!((t.name.as_str(), t.version, t.drop_first, p.as_str()), ("topic", Some(2), Some(1), "topic@2/"));
        assert!(fan_out_entry("topic@x").is_err());
        assert!(fan_out_entry(":1").is_err());
    }
}
