//! The engine: one thread that owns all ONNX Runtime work, fed batches over a channel.

pub mod executor;
pub mod fusion;
pub mod heads;
mod tensors;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::Span;

pub use executor::{ExecStats, Lane, Sequence, execute};
pub use fusion::FusionWeights;

use crate::context::Context;
use crate::error::{EngineError, ServeError};
use crate::metrics::BatchRecord;
use crate::repository::{ActiveLayers, Backbone, Task};

/// One task to run on all of a job's sequences.
#[derive(Clone)]
pub struct TaskRun {
    pub task: Arc<Task>,
    pub active: ActiveLayers,
}

/// The task versions of a job, as statistics keys ([`crate::stats::Stats`]).
pub fn stat_keys(tasks: &[TaskRun]) -> Vec<(String, u32)> {
    tasks.iter().map(|t| (t.task.name().to_string(), t.task.version())).collect()
}

/// A validated request: sequences for one backbone and the tasks to run on them.
pub struct Job {
    pub backbone: Arc<Backbone>,
    pub sequences: Vec<Sequence>,
    pub tasks: Vec<TaskRun>,
    pub deadline: Option<Instant>,
    /// When routing started; request durations in the statistics count from here.
    pub received: Instant,
}

/// The engine's answer to one job.
#[derive(Debug)]
pub struct JobOutput {
    /// `logits[task][sequence]`.
    pub logits: Vec<Vec<Vec<f32>>>,
    pub queue: Duration,
    pub compute: Duration,
    pub batch_rows: usize,
    pub stats: ExecStats,
    /// `fusion[task]`: AdapterFusion weights of each fusion slot the task ran (empty for others).
    pub fusion: Vec<Vec<FusionWeights>>,
}

pub struct Entry {
    pub job: Job,
    pub reply: oneshot::Sender<Result<JobOutput, ServeError>>,
    pub enqueued: Instant,
    /// The request's span, so engine logs nest under the request that caused them.
    pub span: Span,
}

/// Jobs for one backbone that run as one execution.
pub struct Batch {
    pub entries: Vec<Entry>,
}

/// Starts the engine thread; it stops when the sender side closes.
/// Records into `ctx`: the server's metrics and statistics.
pub fn spawn(mut rx: mpsc::Receiver<Batch>, ctx: Arc<Context>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            while let Some(batch) = rx.blocking_recv() {
                run_batch(batch, &ctx);
            }
            tracing::debug!("engine stopped");
        })
        .expect("spawn engine thread")
}

fn run_batch(batch: Batch, ctx: &Context) {
    let started = Instant::now();
    let mut live = Vec::with_capacity(batch.entries.len());
    for e in batch.entries {
        if e.reply.is_closed() {
            tracing::debug!(parent: &e.span, "client went away; dropped before running");
        } else if e.job.deadline.is_some_and(|d| d <= started) {
            let _ = e.reply.send(Err(ServeError::DeadlineExceeded("deadline passed while queued".into())));
        } else {
            live.push(e);
        }
    }
    let Some(first) = live.first() else { return };
    let backbone = first.job.backbone.clone();
    let mut seqs = Vec::new();
    let mut lanes = Vec::new();
    for e in &mut live {
        let offset = seqs.len();
        let n = e.job.sequences.len();
        seqs.append(&mut e.job.sequences);
        for t in &e.job.tasks {
            lanes.push(Lane { task: t.task.clone(), active: t.active.clone(), rows: (offset..offset + n).collect() });
        }
    }
    let rows = seqs.len();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(&backbone, &seqs, &lanes)))
        .unwrap_or_else(|_| Err(EngineError::Panicked));
    let compute = started.elapsed();
    match result {
        Ok((logits, mut stats)) => {
            let lane_rows: usize = lanes.iter().map(|l| l.rows.len()).sum();
            let layer_rows: usize = stats.layer_rows.iter().sum();
            ctx.metrics.record_batch(BatchRecord {
                rows,
                padded_tokens: rows * stats.padded_len,
                layer_rows,
                rows_saved: (lane_rows * stats.layer_rows.len()).saturating_sub(layer_rows),
                adapter_rows: stats.adapter_rows,
                compute,
            });
            let mut fusion_by_lane = std::mem::take(&mut stats.fusion).into_iter().chain(std::iter::repeat_with(Vec::new));
            tracing::debug!(rows, lanes = lanes.len(), padded_len = stats.padded_len, layer_rows = ?stats.layer_rows, compute_us = compute.as_micros() as u64, "batch done");
            record_executions(&ctx.stats, &lanes, compute);
            let mut logits = logits.into_iter();
            for e in live {
                let per_task = (&mut logits).take(e.job.tasks.len()).map(|m| m.outer_iter().map(|r| r.to_vec()).collect()).collect();
                ctx.metrics.queue_duration.observe((started - e.enqueued).as_secs_f64());
                let fusion = (&mut fusion_by_lane).take(e.job.tasks.len()).collect();
                let out =
                    JobOutput { logits: per_task, queue: started - e.enqueued, compute, batch_rows: rows, stats: stats.clone(), fusion };
                let _ = e.reply.send(Ok(out));
            }
        }
        Err(err) => {
            tracing::error!(error = %err, rows, "batch failed");
            // Every request of the batch gets the same typed cause.
            let err = Arc::new(err);
            for e in live {
                let _ = e.reply.send(Err(EngineError::Batch(err.clone()).into()));
            }
        }
    }
}

/// One execution per task version in the batch, with that version's row count (ModelStatistics).
fn record_executions(stats: &crate::stats::Stats, lanes: &[Lane], compute: Duration) {
    let mut rows: std::collections::BTreeMap<(String, u32), usize> = std::collections::BTreeMap::new();
    for lane in lanes {
        *rows.entry((lane.task.name().to_string(), lane.task.version())).or_default() += lane.rows.len();
    }
    for (key, n) in rows {
        stats.executed(key, n, compute);
    }
}
