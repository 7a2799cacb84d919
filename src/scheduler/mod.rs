//! Cross-request batching: a queue actor that forms token-budget batches per backbone (of
//! requests of similar length, `grouping.rs`) and hands
//! them to the engine thread, which it never lets idle while work waits. Requests are admitted
//! ([`Scheduler::admit`]) before any work is spent on them, and the engine's and the actor's
//! liveness is watched so that health can follow it.

mod admission;
pub mod grouping;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;

use crate::config::{BatchingSettings, EngineSettings};
pub use admission::{Admission, Load};
use grouping::{Cand, Footprint};

use crate::context::Context;
use crate::engine::{self, Batch, Entry, Job, JobOutput, Liveness};
use crate::error::ServeError;

#[derive(Clone)]
pub struct Scheduler {
    tx: mpsc::UnboundedSender<Entry>,
    permits: Arc<Semaphore>,
    load: Arc<Load>,
    liveness: Liveness,
    settings: BatchingSettings,
    ctx: Arc<Context>,
}

impl Scheduler {
    /// Starts the queue actor (on the tokio runtime) and the engine thread, both recording into `ctx`.
    pub fn start(settings: BatchingSettings, engine_settings: EngineSettings, ctx: Arc<Context>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        // One batch running and one ready: the actor keeps collecting while the engine works.
        let (engine_tx, engine_rx) = mpsc::channel(1);
        let load = Arc::new(Load::default());
        let liveness = Liveness::default();
        // The actor budgets batches by the token layout the engine will use.
        let layout = engine_settings.clone();
        engine::spawn(engine_rx, engine_settings, ctx.clone(), load.pace.clone(), liveness.clone());
        let permits = Arc::new(Semaphore::new(settings.max_queued));
        let actor = tokio::spawn(queue_actor(rx, engine_tx, settings.clone(), layout).instrument(tracing::info_span!("queue")));
        let watcher = liveness.clone();
        tokio::spawn(async move {
            match actor.await {
                Ok(ActorEnd::Closed) => {}
                Ok(ActorEnd::EngineGone) => watcher.fail("the engine thread stopped".into()),
                Err(e) if e.is_panic() => watcher.fail(format!("the queue actor panicked: {}", engine::panic_message(&*e.into_panic()))),
                Err(_) => {}
            }
        });
        Self { tx, permits, load, liveness, settings, ctx }
    }

    /// The metrics and statistics this scheduler (and its engine) record into.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Whether the engine still runs; the server turns health NOT_SERVING when it stops.
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// Requests admitted and not yet answered (queued, being prepared or running).
    pub fn in_flight(&self) -> usize {
        self.settings.max_queued.saturating_sub(self.permits.available_permits())
    }

    /// Takes a place in the queue before any work is spent on a request. RESOURCE_EXHAUSTED when
    /// `max_queued` requests are admitted, or when the work already queued would keep this one
    /// waiting longer than `max_queue_wait_ms` or past its own `deadline`.
    pub fn admit(&self, deadline: Option<Instant>) -> Result<Admission, ServeError> {
        if let Some(reason) = self.liveness.failure() {
            return Err(Self::stopped(&reason));
        }
        let permit = self.permits.clone().try_acquire_owned().map_err(|_| {
            ServeError::ResourceExhausted(format!(
                "server queue is full ({} requests waiting, batching.max_queued); retry with backoff",
                self.settings.max_queued
            ))
        })?;
        let wait = self.load.estimated_wait();
        if let Some(max) = self.settings.max_queue_wait()
            && wait > max
        {
            return Err(ServeError::ResourceExhausted(format!(
                "the queue holds about {} ms of work, more than batching.max_queue_wait_ms ({} ms); retry with backoff",
                wait.as_millis(),
                max.as_millis()
            )));
        }
        if let Some(d) = deadline
            && !wait.is_zero()
            && Instant::now() + wait > d
        {
            return Err(ServeError::ResourceExhausted(format!(
                "the queue holds about {} ms of work, more than the request's deadline leaves ({} ms); retry later or allow more time",
                wait.as_millis(),
                d.saturating_duration_since(Instant::now()).as_millis()
            )));
        }
        Ok(Admission::new(self.load.clone(), permit, self.ctx.metrics.queue_depth.clone()))
    }

    /// Queues an admitted job and waits for its result. Every outcome is counted in the
    /// context's [`crate::stats::Stats`] for the job's tasks.
    pub async fn submit(&self, admission: Admission, job: Job) -> Result<JobOutput, ServeError> {
        let keys = engine::stat_keys(&job.tasks);
        let (received, sequences) = (job.received, job.sequences.len());
        let input = received.elapsed();
        let submitted = Instant::now();
        let result = self.enqueue(admission, job).await;
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

    async fn enqueue(&self, mut admission: Admission, job: Job) -> Result<JobOutput, ServeError> {
        admission.queued(engine::units(&job));
        let (reply, rx) = oneshot::channel();
        let entry = Entry { job, reply, enqueued: Instant::now(), span: tracing::Span::current() };
        if self.tx.send(entry).is_err() {
            return Err(self.gone().await);
        }
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(self.gone().await),
        }
    }

    /// Why the queue or the engine dropped a request: the engine stopped (its reason is set
    /// within moments of it stopping), or the server is shutting down.
    async fn gone(&self) -> ServeError {
        let mut failed = self.liveness.subscribe();
        let reason = tokio::time::timeout(std::time::Duration::from_millis(200), failed.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|r| r.ok().and_then(|r| r.clone()));
        match reason {
            Some(reason) => Self::stopped(&reason),
            None => ServeError::Unavailable("the server is shutting down".into()),
        }
    }

    fn stopped(reason: &str) -> ServeError {
        ServeError::Unavailable(format!(
            "the inference engine has stopped ({reason}); this server cannot answer until it is restarted, try another replica"
        ))
    }
}

/// Why the queue actor ended.
enum ActorEnd {
    /// Every sender is gone: the server is stopping.
    Closed,
    /// The engine thread is gone: nothing can run any more.
    EngineGone,
}

/// What a queued request costs the engine, for [`grouping::choose`]: packed when every task of
/// it runs on the banks and `engine.packing` is on, else padded.
fn cand(e: &Entry, now: Instant, engine: &EngineSettings) -> Cand {
    let job = &e.job;
    let packed = engine.packing && job.tasks.iter().all(|t| engine::planner::task_on_banks(&job.backbone, &t.task, engine.banks));
    let longest = job.sequences.iter().map(|s| s.ids.len()).max().unwrap_or(1);
    let real: usize = job.sequences.iter().map(|s| s.ids.len()).sum();
    // Rows the engine runs: each sequence once per distinct task path of its job.
    Cand {
        waited: now.saturating_duration_since(e.enqueued),
        longest,
        rows: job.sequences.len() * job.paths,
        real: real * job.paths,
        packed,
    }
}

async fn queue_actor(
    mut rx: mpsc::UnboundedReceiver<Entry>,
    engine: mpsc::Sender<Batch>,
    settings: BatchingSettings,
    layout: EngineSettings,
) -> ActorEnd {
    let mut backlog: VecDeque<Entry> = VecDeque::new();
    let budget = settings.max_batch_tokens;
    loop {
        // Only form a batch once the engine can take it, so late arrivals still join.
        let Ok(slot) = engine.reserve().await else { return ActorEnd::EngineGone };
        if backlog.is_empty() {
            match rx.recv().await {
                Some(e) => backlog.push_back(e),
                None => return ActorEnd::Closed,
            }
        }
        // Everything that arrived while the engine worked is a candidate.
        while let Ok(e) = rx.try_recv() {
            backlog.push_back(e);
        }
        let backbone = backlog[0].job.backbone.clone();
        let same = |e: &Entry| Arc::ptr_eq(&e.job.backbone, &backbone);
        let now = Instant::now();
        let at: Vec<usize> = (0..backlog.len()).filter(|&i| same(&backlog[i])).take(grouping::MAX_CANDIDATES).collect();
        let cands: Vec<Cand> = at.iter().map(|&i| cand(&backlog[i], now, &layout)).collect();
        let picked = grouping::choose(&cands, budget, settings.length_wait());
        let mut size = Footprint::default();
        let mut entries = Vec::with_capacity(picked.len());
        for &p in picked.iter().rev() {
            size = size.with(&cands[p]);
            entries.push(backlog.remove(at[p]).expect("index checked"));
        }
        entries.reverse();
        #[cfg(feature = "fault-injection")]
        engine::fault::in_queue(&entries[0]);
        // Wait for company only while no work for this backbone is left waiting.
        let waiting = backlog.iter().any(same);
        let deadline = tokio::time::Instant::now() + settings.max_batch_delay();
        while !waiting && size.tokens() < budget {
            tokio::select! {
                next = rx.recv() => match next {
                    Some(e) if same(&e) && size.with(&cand(&e, Instant::now(), &layout)).tokens() <= budget => {
                        size = size.with(&cand(&e, Instant::now(), &layout));
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
        tracing::trace!(requests = entries.len(), rows = size.rows, tokens = size.tokens(), real = size.real, "batch formed");
        slot.send(Batch { entries });
    }
}
