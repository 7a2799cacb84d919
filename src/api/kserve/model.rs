//! How tasks look as KServe models: metadata, configuration, repository index and statistics.

use std::collections::HashMap;

use super::decode::{ATTENTION_MASK, CHOICES, INPUT_IDS, TEXT, TEXT_PAIR, TOKEN_TYPE_IDS};
use super::encode;
use crate::config::{BatchingSettings, LimitSettings};
use crate::kserve_proto::model_metadata_response::TensorMetadata;
use crate::kserve_proto::repository_index_response::ModelIndex;
use crate::kserve_proto::{
    DataType, InferBatchStatistics, InferStatistics, ModelConfig, ModelDynamicBatching, ModelInput, ModelMetadataResponse, ModelOutput,
    ModelParameter, ModelQueuePolicy, ModelStatistics, ModelVersionPolicy, StatisticDuration, model_config, model_version_policy,
};
use crate::repository::manifest::HeadKind;
use crate::repository::{Task, TaskEntry, TaskState, task::describe_drop};
use crate::stats::{DurationStat, TaskStats};

pub const PLATFORM: &str = "adapterdrop";

/// (name, KServe datatype, config datatype, per-row dims) of every input the task accepts.
fn inputs(task: &Task) -> Vec<(&'static str, &'static str, DataType, Vec<i64>)> {
    let mut v = Vec::new();
    if task.manifest.head.kind == HeadKind::MultipleChoice {
        // Items are (context, choices) texts: token ids cannot say which sequences form an item.
        v.push((TEXT, "BYTES", DataType::TypeString, vec![1]));
        v.push((CHOICES, "BYTES", DataType::TypeString, vec![-1]));
        return v;
    }
    if task.backbone.tokenizer.is_some() {
        v.push((TEXT, "BYTES", DataType::TypeString, vec![1]));
        v.push((TEXT_PAIR, "BYTES", DataType::TypeString, vec![1]));
    }
    for name in [INPUT_IDS, ATTENTION_MASK, TOKEN_TYPE_IDS] {
        v.push((name, "INT64", DataType::TypeInt64, vec![-1]));
    }
    v
}

fn outputs(task: &Task) -> Vec<(&'static str, &'static str, DataType, Vec<i64>)> {
    let head = &task.manifest.head;
    let width = match head.kind {
        HeadKind::Embedding => task.backbone.manifest.hidden_size as i64,
        HeadKind::MultipleChoice => -1, // one per choice
        _ => head.width() as i64,
    };
    encode::kinds(head.kind)
        .iter()
        .map(|(kind, name)| {
            let (datatype, dims) = encode::spec(*kind, head.kind, width);
            let config = match datatype {
                "BYTES" => DataType::TypeString,
                "INT64" => DataType::TypeInt64,
                "BOOL" => DataType::TypeBool,
                _ => DataType::TypeFp32,
            };
            (*name, datatype, config, dims)
        })
        .collect()
}

/// Shapes carry the batch dimension (-1) in front, as Triton reports for batching models.
pub fn metadata(task: &Task, versions: Vec<String>) -> ModelMetadataResponse {
    let meta = |(name, datatype, _, dims): (&str, &str, DataType, Vec<i64>)| TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape: std::iter::once(-1).chain(dims).collect(),
    };
    ModelMetadataResponse {
        name: task.name().into(),
        versions,
        platform: PLATFORM.into(),
        inputs: inputs(task).into_iter().map(meta).collect(),
        outputs: outputs(task).into_iter().map(meta).collect(),
    }
}

/// Every input is optional: a request sends either TEXT [+ TEXT_PAIR] or input_ids [+ ...].
pub fn config(task: &Task, limits: &LimitSettings, batching: &BatchingSettings) -> ModelConfig {
    let m = &task.manifest;
    let mut parameters = HashMap::new();
    let mut param = |k: &str, v: String| {
        parameters.insert(k.to_string(), ModelParameter { string_value: v });
    };
    param("backbone", m.backbone.clone());
    param("adapter_method", m.adapter.method.clone());
    param("drop", describe_drop(&m.drop));
    param("head_type", m.head.kind.as_str().into());
    param("labels", m.head.labels.join(","));
    if m.head.kind == HeadKind::MultiLabel {
        param("threshold", m.head.threshold.unwrap_or(crate::repository::manifest::DEFAULT_THRESHOLD).to_string());
    }
    if m.head.kind == HeadKind::Embedding {
        let e = task.backbone.manifest.embedding;
        param("pooling", format!("{:?}", e.pooling).to_lowercase());
        param("normalize", e.normalize.to_string());
    }
    param("description", m.description.clone());
    ModelConfig {
        name: task.name().into(),
        platform: PLATFORM.into(),
        backend: PLATFORM.into(),
        version_policy: Some(ModelVersionPolicy {
            policy_choice: Some(model_version_policy::PolicyChoice::All(model_version_policy::All {})),
        }),
        max_batch_size: limits.max_sequences_per_request.min(i32::MAX as usize) as i32,
        input: inputs(task)
            .into_iter()
            .map(|(name, _, dt, dims)| ModelInput { name: name.into(), data_type: dt as i32, dims, optional: true, ..Default::default() })
            .collect(),
        output: outputs(task)
            .into_iter()
            .map(|(name, _, dt, dims)| ModelOutput { name: name.into(), data_type: dt as i32, dims, ..Default::default() })
            .collect(),
        scheduling_choice: Some(model_config::SchedulingChoice::DynamicBatching(ModelDynamicBatching {
            max_queue_delay_microseconds: batching.max_batch_delay_ms.saturating_mul(1000),
            default_queue_policy: Some(ModelQueuePolicy {
                max_queue_size: batching.max_queued.min(u32::MAX as usize) as u32,
                ..Default::default()
            }),
            ..Default::default()
        })),
        parameters,
        ..Default::default()
    }
}

/// Triton's state names: READY, UNAVAILABLE (with the reason), LOADING, UNLOADING.
pub fn index_entry(e: &TaskEntry) -> ModelIndex {
    let (state, reason) = match &e.state {
        TaskState::Ready => ("READY", String::new()),
        TaskState::Loading => ("LOADING", String::new()),
        TaskState::Draining => ("UNLOADING", String::new()),
        TaskState::Failed(r) => ("UNAVAILABLE", r.clone()),
    };
    ModelIndex { name: e.name.clone(), version: e.version.to_string(), state: state.into(), reason }
}

fn duration(d: DurationStat) -> Option<StatisticDuration> {
    Some(StatisticDuration { count: d.count, ns: d.ns })
}

pub fn statistics(name: &str, version: u32, s: &TaskStats) -> ModelStatistics {
    ModelStatistics {
        name: name.into(),
        version: version.to_string(),
        last_inference: s.last_inference_ms,
        inference_count: s.inference_count,
        execution_count: s.execution_count,
        inference_stats: Some(InferStatistics {
            success: duration(s.success),
            fail: duration(s.fail),
            queue: duration(s.queue),
            compute_input: duration(s.compute_input),
            compute_infer: duration(s.compute_infer),
            compute_output: duration(s.compute_output),
            cache_hit: duration(DurationStat::default()),
            cache_miss: duration(DurationStat::default()),
        }),
        batch_stats: s
            .batches
            .iter()
            .map(|(size, d)| InferBatchStatistics { batch_size: *size, compute_infer: duration(*d), ..Default::default() })
            .collect(),
    }
}
