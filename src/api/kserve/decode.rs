//! KServe `ModelInferRequest` -> the native `InferRequest` the router takes, so both APIs share
//! one validation, batching and execution path. Request-level parts (model, parameters, fan-out,
//! outputs) here; input tensors in `inputs`; content checks (token ids, lengths) stay in the router.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::config::LimitSettings;
use crate::error::{ServeError, clip};
use crate::kserve_proto::infer_parameter::ParameterChoice;
use crate::kserve_proto::{InferParameter, ModelInferRequest};
use crate::proto::{InferRequest, TaskRef};

pub const TEXT: &str = "TEXT";
pub const TEXT_PAIR: &str = "TEXT_PAIR";
/// Multiple choice: BYTES `[batch, k]`, each item's choices, paired with its `TEXT`.
pub const CHOICES: &str = "CHOICES";
pub const INPUT_IDS: &str = "input_ids";
pub const ATTENTION_MASK: &str = "attention_mask";
pub const TOKEN_TYPE_IDS: &str = "token_type_ids";

/// Request parameters this server reads; see README "KServe v2 endpoint".
pub const PARAMETERS: &[&str] = &["drop_first", "tasks", "truncate", "timeout", "max_answer_length", "n_best", "doc_stride", "threshold"];

/// More request parameters than any client needs (the protocol's reserved ones included): more
/// is refused before the keys are even sorted.
const MAX_PARAMETERS: usize = 64;
/// More requested outputs than any fan-out can name (tasks x output kinds).
const MAX_OUTPUTS: usize = 1024;

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
    /// The `threshold` parameter: every multi-label task's threshold in this request.
    pub threshold: Option<f32>,
}

fn invalid(msg: impl Into<String>) -> ServeError {
    ServeError::InvalidArgument(msg.into())
}

/// "" = the default version; otherwise a decimal version number.
pub fn parse_version(model: &str, version: &str) -> Result<Option<u32>, ServeError> {
    if version.is_empty() {
        return Ok(None);
    }
    version.parse::<u32>().map(Some).map_err(|_| {
        invalid(format!("model `{}`: version `{}` is not a number (leave it empty for the default version)", clip(model), clip(version)))
    })
}

/// Every count the client declares (tasks, elements, shape sizes, text lengths) is checked
/// against `limits` and against the bytes actually received before anything is allocated for it.
pub fn decode(req: ModelInferRequest, limits: &LimitSettings) -> Result<Decoded, ServeError> {
    if req.model_name.is_empty() {
        return Err(invalid("model_name is empty: name the task to run"));
    }
    let version = parse_version(&req.model_name, &req.model_version)?;
    let params = Params::read(&req.parameters, limits)?;
    let mut tasks = vec![TaskRef { name: req.model_name.clone(), version, drop_first: params.drop_first, ..Default::default() }];
    let mut prefixes = vec![String::new()];
    let mut seen: HashSet<String> = HashSet::with_capacity(params.tasks.len());
    for entry in params.tasks.iter() {
        let (task, prefix) = fan_out_entry(entry)?;
        if (version.is_none() && task.name == req.model_name && task.version.is_none()) || !seen.insert(prefix.clone()) {
            return Err(invalid(format!(
                "parameter `tasks`: `{}` is listed twice (or repeats model_name); each task's outputs need distinct names",
                clip(entry)
            )));
        }
        tasks.push(task);
        prefixes.push(prefix);
    }
    let inputs = super::inputs::decode_inputs(req.inputs, req.raw_input_contents, limits)?;
    if req.outputs.len() > MAX_OUTPUTS {
        return Err(invalid(format!("{} outputs requested; at most {MAX_OUTPUTS} (leave `outputs` empty for all)", req.outputs.len())));
    }
    let mut outputs = Vec::with_capacity(req.outputs.len());
    let mut requested: HashSet<&str> = HashSet::with_capacity(req.outputs.len());
    for o in &req.outputs {
        if o.parameters.get("classification").is_some_and(|p| !matches!(p.parameter_choice, Some(ParameterChoice::Int64Param(0)) | None)) {
            return Err(invalid(format!(
                "output `{}`: the classification extension is not supported; request `label` and `probabilities`",
                clip(&o.name)
            )));
        }
        if o.parameters.keys().any(|k| k.starts_with("shared_memory")) {
            return Err(invalid(format!(
                "output `{}`: shared memory is not supported; outputs come in raw_output_contents",
                clip(&o.name)
            )));
        }
        if !requested.insert(o.name.as_str()) {
            return Err(invalid(format!("output `{}` is requested twice", clip(&o.name))));
        }
        outputs.push(o.name.clone());
    }
    let native = InferRequest {
        tasks,
        inputs: Some(inputs),
        truncate: params.truncate,
        id: req.id,
        return_fusion_weights: false,
        doc_stride: params.doc_stride,
        max_answer_length: params.max_answer_length,
        n_best: params.n_best,
    };
    Ok(Decoded { native, prefixes, outputs, timeout: params.timeout, threshold: params.threshold })
}

#[derive(Default)]
struct Params {
    drop_first: Option<u32>,
    tasks: Vec<String>,
    truncate: bool,
    timeout: Option<Duration>,
    threshold: Option<f32>,
    /// Extractive QA (the router checks the values).
    doc_stride: Option<u32>,
    max_answer_length: Option<u32>,
    n_best: Option<u32>,
}

impl Params {
    fn read(map: &HashMap<String, InferParameter>, limits: &LimitSettings) -> Result<Self, ServeError> {
        let mut p = Params::default();
        if map.len() > MAX_PARAMETERS {
            return Err(invalid(format!(
                "{} request parameters; at most {MAX_PARAMETERS} (this server reads {})",
                map.len(),
                PARAMETERS.join(", ")
            )));
        }
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
                        // Count first (no allocation), then parse: model_name is one task too.
                        let entries = s.split(',').map(str::trim).filter(|s| !s.is_empty());
                        let n = entries.clone().count();
                        if n + 1 > limits.max_tasks_per_request {
                            return Err(invalid(format!(
                                "parameter `tasks` names {n} tasks; with model_name that is {} tasks, over the limit of {} per request \
                                 (limits.max_tasks_per_request)",
                                n + 1,
                                limits.max_tasks_per_request
                            )));
                        }
                        p.tasks = entries.map(String::from).collect()
                    }
                    _ => return Err(invalid("parameter `tasks` must be a string such as \"topic,score@2,sent:1\"")),
                },
                "truncate" => match value {
                    Some(ParameterChoice::BoolParam(b)) => p.truncate = *b,
                    _ => return Err(invalid("parameter `truncate` must be a bool")),
                },
                "threshold" => {
                    let t = match value {
                        Some(ParameterChoice::DoubleParam(v)) => *v,
                        Some(ParameterChoice::Int64Param(v)) => *v as f64,
                        _ => return Err(invalid("parameter `threshold` must be a number (double_param) within 0..=1")),
                    };
                    if !t.is_finite() || !(0.0..=1.0).contains(&t) {
                        return Err(invalid(format!("parameter `threshold` = {t}: it must be within 0..=1")));
                    }
                    p.threshold = Some(t as f32);
                }
                "doc_stride" | "max_answer_length" | "n_best" => {
                    let v = u32::try_from(int_param(key, value)?).map_err(|_| invalid(format!("parameter `{key}` is out of range")))?;
                    match key.as_str() {
                        "doc_stride" => p.doc_stride = Some(v),
                        "max_answer_length" => p.max_answer_length = Some(v),
                        _ => p.n_best = Some(v),
                    }
                }
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
                            "parameter `{}`: sequence batching is not supported; every request is independent",
                            clip(key)
                        )));
                    }
                }
                // Reserved by the protocol and meaningless here (HTTP-only or scheduling hints).
                "priority" | "headers" | "binary_data_output" => {}
                k if k.starts_with("triton_") => {}
                other => {
                    return Err(invalid(format!("unknown parameter `{}`; this server reads {}", clip(other), PARAMETERS.join(", "))));
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
    let bad = |what: &str| invalid(format!("parameter `tasks`: entry `{}` {what}; write name[@version][:drop_first]", clip(entry)));
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
    Ok((TaskRef { name: name.to_string(), version, drop_first: drop, ..Default::default() }, format!("{head}/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_parameter_is_counted_before_it_is_parsed() {
        let limits = LimitSettings::default();
        let many = (0..100_000).map(|i| format!("t{i}")).collect::<Vec<_>>().join(",");
        let params = HashMap::from([("tasks".to_string(), InferParameter { parameter_choice: Some(ParameterChoice::StringParam(many)) })]);
        let started = std::time::Instant::now();
        let Err(ServeError::InvalidArgument(m)) = Params::read(&params, &limits) else { panic!("accepted") };
        assert!(m.contains("names 100000 tasks"), "{m}");
        // Generous bound: parsing every name took 125 s before the count came first (issue 13 item 19).
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "took {:?}", started.elapsed());
        let long = "n".repeat(20_000);
        let Err(ServeError::InvalidArgument(m)) = fan_out_entry(&format!("{long}@x")) else { panic!("accepted") };
        assert!(m.len() < 400, "the echoed entry is cut: {} bytes", m.len());
    }

    #[test]
    fn fan_out_entries_parse() {
        let (t, p) = fan_out_entry("topic@2:1").unwrap();
        assert_eq!((t.name.as_str(), t.version, t.drop_first, p.as_str()), ("topic", Some(2), Some(1), "topic@2/"));
        assert!(fan_out_entry("topic@x").is_err());
        assert!(fan_out_entry(":1").is_err());
    }
}
