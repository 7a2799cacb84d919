//! The engine: one thread that owns all ONNX Runtime work, fed batches over a channel.

pub mod banked;
pub mod banks;
pub mod banks_methods;
pub mod executor;
#[cfg(feature = "fault-injection")]
pub mod fault;
pub mod fusion;
pub mod heads;
pub mod packing;
pub mod plan;
pub mod planner;
pub mod pooling;
mod slot_bank;
mod tensors;

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::Span;

pub use executor::{ExecStats, Lane, Sequence, execute};
pub use fusion::FusionWeights;
pub use planner::run_lanes;

use crate::config::EngineSettings;
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
    /// Distinct task paths ([`executor::paths`]): the engine runs each sequence this many times.
    pub paths: usize,
    pub deadline: Option<Instant>,
    /// When routing started; request durations in the statistics count from here.
    pub received: Instant,
    /// Texts and token origins (text inputs only): what token heads answer in.
    pub text: Option<Arc<crate::router::token_info::RequestText>>,
}

/// The engine's answer to one job.
#[derive(Debug)]
pub struct JobOutput {
    /// `logits[task][sequence]`: the head's output, row-major `[positions, width]` ([`heads::LaneOutput`]).
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

/// The engine's measured cost of one unit of work (a token run through one task), so that the
/// queue can estimate how long the work it already holds will take (admission by wait).
#[derive(Debug, Default)]
pub struct Pace {
    ns_per_unit: AtomicU64,
}

impl Pace {
    /// Nanoseconds per unit, an exponential average over recent batches; 0 before the first.
    pub fn ns_per_unit(&self) -> u64 {
        self.ns_per_unit.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub fn record_for_test(&self, units: u64, compute: Duration) {
        self.record(units, compute)
    }

    fn record(&self, units: u64, compute: Duration) {
        if units == 0 {
            return;
        }
        let now = (compute.as_nanos() / units as u128).min(u64::MAX as u128) as u64;
        let old = self.ns_per_unit();
        let next = if old == 0 { now } else { (old.saturating_mul(3) / 4).saturating_add(now / 4) };
        self.ns_per_unit.store(next.max(1), Ordering::Relaxed);
    }
}

/// Work units of a job: its tokens times its tasks (each task is a lane over every sequence).
pub fn units(job: &Job) -> u64 {
    let tokens: usize = job.sequences.iter().map(|s| s.ids.len()).sum();
    (tokens as u64).saturating_mul(job.tasks.len().max(1) as u64)
}

/// Whether the engine thread and the queue actor still run. The first failure is kept, logged,
/// and turns health NOT_SERVING (the server watches [`Liveness::subscribe`]).
#[derive(Clone)]
pub struct Liveness(Arc<watch::Sender<Option<String>>>);

impl Default for Liveness {
    fn default() -> Self {
        Self(Arc::new(watch::channel(None).0))
    }
}

impl Liveness {
    pub fn fail(&self, reason: String) {
        let first = self.0.send_if_modified(|r| {
            if r.is_some() {
                return false;
            }
            *r = Some(reason.clone());
            true
        });
        if first {
            tracing::error!(reason, "the inference engine stopped; inference is unavailable until the server is restarted");
        }
    }

    /// Why the engine stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        self.0.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.0.subscribe()
    }
}

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Starts the engine thread; it stops when the sender side closes. A panic inside a batch fails
/// that batch's requests only; anything that ends the thread otherwise is reported to `liveness`.
/// Records into `ctx`: the server's metrics and statistics.
/// `settings.banks` chooses the bank path for tasks that have bank rows.
pub fn spawn(
    mut rx: mpsc::Receiver<Batch>,
    settings: EngineSettings,
    ctx: Arc<Context>,
    pace: Arc<Pace>,
    liveness: Liveness,
) -> std::thread::JoinHandle<()> {
    banked::set_packing(settings.packing);
    std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            // `rx` outlives the unwinding, so the queue sees the engine gone only after the reason is set.
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                while let Some(batch) = rx.blocking_recv() {
                    #[cfg(feature = "fault-injection")]
                    fault::before_batch(&batch);
                    run_batch(batch, settings.banks, &ctx, &pace);
                }
            }));
            match run {
                Ok(()) => tracing::debug!("engine stopped"),
                Err(p) => liveness.fail(format!("the engine thread panicked: {}", panic_message(&*p))),
            }
            drop(rx);
        })
        .expect("spawn engine thread")
}

/// Runs one batch; a panic anywhere in it answers its requests with INTERNAL and nothing else.
fn run_batch(batch: Batch, banks: bool, ctx: &Context, pace: &Pace) {
    // Registrations and removals queued while the last batch ran are written into the adapter
    // banks first, outside the batch's compute time: growing a bank of thousands of tasks copies
    // gigabytes, and counted as compute it would make admission (`Pace`) refuse requests for the
    // seconds after (10,000 tasks under load: 118,676 refused Infer calls; docs/benchmarks.md).
    if let Some(banked) = batch.entries.first().and_then(|e| e.job.backbone.banked.as_ref()) {
        drop(banked.banks.store());
    }
    let started = Instant::now();
    let mut replies = Vec::with_capacity(batch.entries.len());
    let mut work = Vec::with_capacity(batch.entries.len());
    for e in batch.entries {
        if e.reply.is_closed() {
            tracing::debug!(parent: &e.span, "client went away; dropped before running");
        } else if e.job.deadline.is_some_and(|d| d <= started) {
            let _ = e.reply.send(Err(ServeError::DeadlineExceeded("deadline passed while queued".into())));
        } else {
            replies.push(e.reply);
            work.push(Work { job: e.job, enqueued: e.enqueued });
        }
    }
    if work.is_empty() {
        return;
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_live(work, banks, started, ctx, pace))) {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
        }
        Err(p) => {
            let why = panic_message(&*p);
            tracing::error!(panic = %why, requests = replies.len(), "a batch panicked: its requests fail, the engine carries on");
            for reply in replies {
                let _ = reply.send(Err(ServeError::Internal(format!(
                    "the engine failed on the batch holding this request ({why}); other requests are unaffected"
                ))));
            }
        }
    }
}

/// A job that will run, without its reply channel (kept outside the panic boundary).
struct Work {
    job: Job,
    enqueued: Instant,
}

/// Executes the jobs as one batch; one result per job, in order.
fn run_live(mut live: Vec<Work>, banks: bool, started: Instant, ctx: &Context, pace: &Pace) -> Vec<Result<JobOutput, ServeError>> {
    let units: u64 = live.iter().map(|w| units(&w.job)).sum();
    let backbone = live[0].job.backbone.clone();
    let mut seqs = Vec::new();
    let mut lanes = Vec::new();
    for w in &mut live {
        let offset = seqs.len();
        let n = w.job.sequences.len();
        seqs.append(&mut w.job.sequences);
        for t in &w.job.tasks {
            lanes.push(Lane { task: t.task.clone(), active: t.active.clone(), rows: (offset..offset + n).collect() });
        }
    }
    #[cfg(feature = "fault-injection")]
    fault::in_batch(&seqs);
    let rows = seqs.len();
    let result = run_lanes(&backbone, &seqs, &lanes, banks);
    let compute = started.elapsed();
    match result {
        Ok((logits, mut stats)) => {
            pace.record(units, compute);
            let lane_rows: usize = lanes.iter().map(|l| l.rows.len()).sum();
            let layer_rows: usize = stats.layer_rows.iter().sum();
            ctx.metrics.record_batch(BatchRecord {
                rows,
                real_tokens: stats.real_tokens,
                computed_tokens: stats.computed_tokens,
                attention_tokens: stats.attention_tokens,
                layer_rows,
                rows_saved: (lane_rows * stats.layer_rows.len()).saturating_sub(layer_rows),
                adapter_rows: stats.adapter_rows,
                graph_runs: stats.graph_runs,
                compute,
            });
            let mut fusion_by_lane = std::mem::take(&mut stats.fusion).into_iter().chain(std::iter::repeat_with(Vec::new));
            tracing::debug!(rows, lanes = lanes.len(), bank_lanes = stats.bank_lanes, graph_runs = stats.graph_runs, padded_len = stats.padded_len, layer_rows = ?stats.layer_rows, compute_us = compute.as_micros() as u64, "batch done");
            record_executions(&ctx.stats, &lanes, compute);
            let mut logits = logits.into_iter();
            live.into_iter()
                .map(|w| {
                    let per_task = (&mut logits).take(w.job.tasks.len()).collect();
                    ctx.metrics.queue_duration.observe((started - w.enqueued).as_secs_f64());
                    let fusion = (&mut fusion_by_lane).take(w.job.tasks.len()).collect();
                    Ok(JobOutput { logits: per_task, queue: started - w.enqueued, compute, batch_rows: rows, stats: stats.clone(), fusion })
                })
                .collect()
        }
        Err(err) => {
            tracing::error!(error = %err, rows, "batch failed");
            // Every request of the batch gets the same typed cause.
            let err = Arc::new(err);
            live.iter().map(|_| Err(EngineError::Batch(err.clone()).into())).collect()
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
