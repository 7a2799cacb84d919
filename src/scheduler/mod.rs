//! Cross-request batching: a queue actor that forms token-budget batches per backbone and hands
//! them to the engine thread, which it never lets idle while work waits.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;

use crate::config::BatchingSettings;
use crate::context::Context;
use crate::engine::{self, Batch, Entry, Job, JobOutput};
use crate::error::ServeError;

#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Entry>,
    permits: Arc<Semaphore>,
    max_queued: usize,
    ctx: Arc<Context>,
}

impl Scheduler {
    /// Starts the queue actor (on the tokio runtime) and the engine thread, both recording into `ctx`.
    pub fn start(settings: BatchingSettings, ctx: Arc<Context>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        // One batch running and one ready: the actor keeps collecting while the engine works.
        let (engine_tx, engine_rx) = mpsc::channel(1);
        engine::spawn(engine_rx, ctx.clone());
        let permits = Arc::new(Semaphore::new(settings.max_queued));
        let max_queued = settings.max_queued;
        tokio::spawn(queue_actor(rx, engine_tx, settings).instrument(tracing::info_span!("queue")));
        Self { tx, permits, max_queued, ctx }
    }

    /// The metrics and statistics this scheduler (and its engine) record into.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Queues a job and waits for its result. RESOURCE_EXHAUSTED when `max_queued` jobs wait.
    /// Every outcome is counted in the context's [`crate::stats::Stats`] for the job's tasks.
    pub async fn submit(&self, job: Job) -> Result<JobOutput, ServeError> {
        let keys = engine::stat_keys(&job.tasks);
        let (received, sequences) = (job.received, job.sequences.len());
        let input = received.elapsed();
        let submitted = Instant::now();
        let result = self.enqueue(job).await;
        let stats = &self.ctx.stats;
        match &result {
            Ok(out) => {
                // What is left after queue and compute: taking this job's rows out of the batch
                // result and handing them back.
                let output = submitted.elapsed().saturating_sub(out.queue + out.compute);
                let times = crate::stats::RequestTimes { total: received.elapsed(), input, queue: out.queue, compute: out.compute, output };
                stats.request_succeeded(&keys, sequences, times);
            }
            Err(_) => stats.request_failed(&keys, received.elapsed()),
        }
        result
    }

    async fn enqueue(&self, job: Job) -> Result<JobOutput, ServeError> {
        let _permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            ServeError::ResourceExhausted(format!(
                "server queue is full ({} requests waiting, batching.max_queued); retry with backoff",
                self.max_queued
            ))
        })?;
        // Counts the request from queueing until its answer (or cancellation) in the depth gauge.
        let depth = &self.ctx.metrics.queue_depth;
        depth.inc();
        let _depth = DepthGuard(depth);
        let (reply, rx) = oneshot::channel();
        let entry = Entry { job, reply, enqueued: Instant::now(), span: tracing::Span::current() };
        self.tx.send(entry).map_err(|_| ServeError::Unavailable("the server is shutting down".into()))?;
        rx.await.map_err(|_| ServeError::Internal("the engine dropped the request".into()))?
    }
}

struct DepthGuard<'a>(&'a prometheus::IntGauge);

impl Drop for DepthGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Padded-token size of a set of jobs that would run together.
#[derive(Clone, Copy, Default)]
struct Footprint {
    rows: usize,
    longest: usize,
}

impl Footprint {
    fn with(self, job: &Job) -> Self {
        let longest = job.sequences.iter().map(|s| s.ids.len()).max().unwrap_or(1);
        Self { rows: self.rows + job.sequences.len(), longest: self.longest.max(longest) }
    }
    fn tokens(self) -> usize {
        self.rows * self.longest
    }
}

async fn queue_actor(mut rx: mpsc::UnboundedReceiver<Entry>, engine: mpsc::Sender<Batch>, settings: BatchingSettings) {
    let mut backlog: VecDeque<Entry> = VecDeque::new();
    loop {
        // Only form a batch once the engine can take it, so late arrivals still join.
        let Ok(slot) = engine.reserve().await else { break };
        let first = match backlog.pop_front() {
            Some(e) => e,
            None => match rx.recv().await {
                Some(e) => e,
                None => break,
            },
        };
        let backbone = first.job.backbone.clone();
        let same = |e: &Entry| Arc::ptr_eq(&e.job.backbone, &backbone);
        let mut size = Footprint::default().with(&first.job);
        let mut entries = vec![first];
        let budget = settings.max_batch_tokens;
        let mut i = 0;
        while i < backlog.len() {
            if same(&backlog[i]) && size.with(&backlog[i].job).tokens() <= budget {
                let e = backlog.remove(i).expect("index checked");
                size = size.with(&e.job);
                entries.push(e);
            } else {
                i += 1;
            }
        }
        let deadline = tokio::time::Instant::now() + settings.max_batch_delay();
        while size.tokens() < budget {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(e) if same(&e) && size.with(&e.job).tokens() <= budget => {
                        size = size.with(&e.job);
                        entries.push(e);
                    }
                    Some(e) => {
                        let full = same(&e);
                        backlog.push_back(e);
                        if full { break; }
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        tracing::trace!(requests = entries.len(), rows = size.rows, tokens = size.tokens(), "batch formed");
        slot.send(Batch { entries });
    }
}
