//! Routing: resolves task references, enforces request limits, tokenizes, and builds the job the
//! scheduler batches.

pub mod choices;
pub mod qa_windows;
pub mod token_info;
pub mod tokenize;

use std::sync::Arc;
use std::time::Instant;

use crate::config::LimitSettings;
use crate::context::Context;
use crate::engine::{Job, TaskRun, executor, stat_keys};
use crate::error::{ServeError, clip};
use crate::proto::{InferRequest, TaskRef, infer_request::Inputs};
use crate::repository::manifest::HeadKind;
use crate::repository::{Registry, Task};
use token_info::{AnswerOptions, RequestText};
use tokenize::Overlong;

/// Most answers a request may ask per QA task and input (`n_best`).
pub const MAX_N_BEST: u32 = 20;

/// Longest task reference that can name a task: a 64-character name and `@4294967295`.
const MAX_TASK_REF: usize = 64 + 11;

pub struct Router {
    pub registry: Arc<Registry>,
    pub limits: LimitSettings,
    /// Where refusals after the tasks resolved are counted.
    pub ctx: Arc<Context>,
}

impl Router {
    /// Validates and tokenizes a request. CPU work (tokenization): call it off the reactor.
    pub fn prepare(&self, req: InferRequest, deadline: Option<Instant>) -> Result<Job, ServeError> {
        let received = Instant::now();
        let tasks = self.resolve_tasks(&req.tasks)?;
        // Refusals after the tasks resolved count as those tasks' failures (ModelStatistics).
        let keys = stat_keys(&tasks);
        self.prepare_inputs(req, tasks, deadline, received).inspect_err(|_| self.ctx.stats.request_failed(&keys, received.elapsed()))
    }

    fn prepare_inputs(
        &self,
        req: InferRequest,
        tasks: Vec<TaskRun>,
        deadline: Option<Instant>,
        received: Instant,
    ) -> Result<Job, ServeError> {
        let backbone = tasks[0].task.backbone.clone();
        let count = match &req.inputs {
            Some(Inputs::Texts(t)) => t.texts.len(),
            Some(Inputs::Pairs(p)) => p.pairs.len(),
            Some(Inputs::Tokens(t)) => t.sequences.len(),
            Some(Inputs::Choices(c)) => choices::count(&c.items)?,
            None => 0,
        };
        let choice_inputs = matches!(req.inputs, Some(Inputs::Choices(_)));
        if let Some(run) = tasks.iter().find(|t| !choice_inputs && t.task.manifest.head.kind == HeadKind::MultipleChoice) {
            return Err(ServeError::InvalidArgument(format!(
                "task `{}` is a multiple-choice task: send inputs.choices (KServe: `TEXT` with `CHOICES`), a context and at least 2 choices per item",
                run.task.name()
            )));
        }
        if count == 0 {
            return Err(ServeError::InvalidArgument("no inputs: send at least one text, pair or token sequence".into()));
        }
        if count > self.limits.max_sequences_per_request {
            return Err(ServeError::InvalidArgument(format!(
                "{count} sequences exceed the limit of {} per request (limits.max_sequences_per_request); split the request",
                self.limits.max_sequences_per_request
            )));
        }
        let text_bytes: usize = match &req.inputs {
            Some(Inputs::Texts(t)) => t.texts.iter().map(String::len).sum(),
            Some(Inputs::Pairs(p)) => p.pairs.iter().map(|p| p.text.len() + p.text_pair.len()).sum(),
            Some(Inputs::Choices(c)) => choices::text_bytes(&c.items),
            _ => 0,
        };
        if text_bytes > self.limits.max_request_text_bytes {
            return Err(ServeError::InvalidArgument(format!(
                "the texts of this request have {text_bytes} bytes together; the limit is {} (limits.max_request_text_bytes): \
                 split the request",
                self.limits.max_request_text_bytes
            )));
        }
        let max_bytes = self.limits.max_text_bytes;
        let answers = answer_options(&req, &backbone)?;
        let overlong = if tasks.iter().any(|t| t.task.manifest.head.kind == HeadKind::QuestionAnswering) {
            Overlong::Windows { stride: req.doc_stride.map(|s| s as usize), budget: self.limits.max_tokens_per_request }
        } else if req.truncate {
            Overlong::Truncate
        } else {
            Overlong::Reject
        };
        let inputs = req.inputs.expect("count > 0");
        token_info::check_inputs(&tasks, &inputs)?;
        let (sequences, text) = match inputs {
            Inputs::Tokens(t) => (tokenize::check_ids(&backbone, t.sequences, req.truncate)?, None),
            Inputs::Texts(t) => {
                let encoded = tokenize::encode_texts(&backbone, tokenize::text_inputs(&t.texts, max_bytes)?, overlong)?;
                split(encoded, t.texts.into_iter().map(|t| (t, None)).collect(), answers)
            }
            Inputs::Pairs(p) => {
                let encoded = tokenize::encode_texts(&backbone, tokenize::pair_inputs(&p.pairs, max_bytes)?, overlong)?;
                split(encoded, p.pairs.into_iter().map(|p| (p.text, Some(p.text_pair))).collect(), answers)
            }
            Inputs::Choices(c) => {
                let pairs = choices::pairs(&c.items);
                let encoded = tokenize::encode_texts(&backbone, choices::encode_inputs(&pairs, &c.items, max_bytes)?, overlong)?;
                split(encoded, pairs.into_iter().map(|p| (p.text, Some(p.text_pair))).collect(), answers)
            }
        };
        if sequences.len() != count {
            // A QA context was split into windows: other tasks would get one answer per window.
            if let Some(run) = tasks.iter().find(|t| t.task.manifest.head.kind != HeadKind::QuestionAnswering) {
                return Err(ServeError::InvalidArgument(format!(
                    "a context longer than the backbone's {} tokens is split into windows for extractive QA; task `{}` cannot \
                     answer per window: send it in a separate request (with truncate)",
                    backbone.manifest.max_positions,
                    run.task.name()
                )));
            }
        }
        let tokens: usize = sequences.iter().map(|s| s.ids.len()).sum();
        let max = self.limits.max_tokens_per_request;
        if tokens > max {
            return Err(ServeError::InvalidArgument(format!(
                "{tokens} tokens exceed the limit of {max} per request (limits.max_tokens_per_request); split the request"
            )));
        }
        // What the engine really runs: each sequence once per distinct task path (rows split
        // where tasks' adapters differ), padded to the longest sequence.
        let paths = executor::paths(backbone.layers.len(), tasks.iter().map(|t| (&*t.task, &t.active)));
        let longest = sequences.iter().map(|s| s.ids.len()).max().unwrap_or(0);
        let count = sequences.len();
        let rows = count.saturating_mul(paths);
        let engine_tokens = rows.saturating_mul(longest);
        if engine_tokens > max {
            return Err(ServeError::InvalidArgument(format!(
                "the engine would run {count} sequences x {paths} distinct task paths = {rows} rows of {longest} padded tokens = \
                 {engine_tokens} tokens, over the limit of {max} per request (limits.max_tokens_per_request counts the rows a \
                 fan-out creates); send fewer tasks or sequences per request"
            )));
        }
        Ok(Job { backbone, sequences, tasks, paths, deadline, received, text })
    }

    fn resolve_tasks(&self, refs: &[TaskRef]) -> Result<Vec<TaskRun>, ServeError> {
        if refs.is_empty() {
            return Err(ServeError::InvalidArgument("no task: name at least one task in `tasks`".into()));
        }
        if refs.len() > self.limits.max_tasks_per_request {
            return Err(ServeError::InvalidArgument(format!(
                "{} tasks exceed the limit of {} per request (limits.max_tasks_per_request)",
                refs.len(),
                self.limits.max_tasks_per_request
            )));
        }
        let mut runs = Vec::with_capacity(refs.len());
        for r in refs {
            if r.name.len() > MAX_TASK_REF {
                return Err(ServeError::NotFound(format!(
                    "task `{}` not found: task names are at most 64 characters (plus an optional `@version`)",
                    clip(&r.name)
                )));
            }
            let task = self.registry.resolve(&r.name, r.version)?;
            let active = task.active_layers(r.drop_first)?;
            check_threshold(&task, r.threshold)?;
            if let Some(first) = runs.first() {
                let first: &TaskRun = first;
                if !Arc::ptr_eq(&first.task.backbone, &task.backbone) {
                    return Err(ServeError::InvalidArgument(format!(
                        "tasks `{}` (backbone `{}`) and `{}` (backbone `{}`) use different backbones; send separate requests",
                        first.task.name(),
                        first.task.backbone.name(),
                        task.name(),
                        task.backbone.name()
                    )));
                }
            }
            runs.push(TaskRun { task, active });
        }
        Ok(runs)
    }
}

/// A request's multi-label threshold: only for a multi-label task, finite and within 0..=1.
fn check_threshold(task: &Task, threshold: Option<f32>) -> Result<(), ServeError> {
    let Some(t) = threshold else { return Ok(()) };
    if task.manifest.head.kind != HeadKind::MultiLabel {
        return Err(ServeError::InvalidArgument(format!(
            "tasks[].threshold is for multi-label tasks; task `{}` has a {} head: omit it",
            task.name(),
            task.manifest.head.kind.as_str()
        )));
    }
    if !t.is_finite() || !(0.0..=1.0).contains(&t) {
        return Err(ServeError::InvalidArgument(format!("tasks[].threshold = {t} for task `{}`: it must be within 0..=1", task.name())));
    }
    Ok(())
}

/// The engine sequences and, beside them, the texts and the origin of every token.
fn split(
    encoded: Vec<tokenize::Encoded>,
    inputs: Vec<(String, Option<String>)>,
    answers: AnswerOptions,
) -> (Vec<crate::engine::Sequence>, Option<Arc<RequestText>>) {
    let mut sequences = Vec::with_capacity(encoded.len());
    let mut tokens = Vec::with_capacity(encoded.len());
    let mut input_of = Vec::with_capacity(encoded.len());
    for e in encoded {
        sequences.push(e.sequence);
        tokens.push(e.tokens);
        input_of.push(e.input);
    }
    (sequences, Some(Arc::new(RequestText { inputs, tokens, input_of, answers })))
}

/// `max_answer_length` and `n_best`, checked before any loop runs on them.
fn answer_options(req: &InferRequest, backbone: &crate::repository::Backbone) -> Result<AnswerOptions, ServeError> {
    let max = backbone.manifest.max_positions;
    if let Some(m) = req.max_answer_length
        && (m == 0 || m as usize > max)
    {
        return Err(ServeError::InvalidArgument(format!("max_answer_length {m} must be 1..={max} (tokens of the backbone)")));
    }
    let n_best = req.n_best.unwrap_or(1);
    if !(1..=MAX_N_BEST).contains(&n_best) {
        return Err(ServeError::InvalidArgument(format!("n_best {n_best} must be 1..={MAX_N_BEST}")));
    }
    Ok(AnswerOptions { max_answer_length: req.max_answer_length.map(|m| m as usize), n_best: n_best as usize })
}
