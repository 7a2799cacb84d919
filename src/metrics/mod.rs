//! Prometheus metrics. One registry per server (in its [`crate::context::Context`]): the API,
//! scheduler and engine record into it from wherever the event happens, and `http.rs` serves it
//! as text on its own port.
//!
//! Names follow the Prometheus conventions: `adapterdrop_` prefix, base units (seconds), `_total`
//! for counters. Loaded-task gauges are rebuilt from the registry at scrape time, so they are
//! always current whatever changed the registry.

pub mod http;

use std::collections::BTreeSet;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::repository::{self, TaskState};

/// Latency buckets in seconds, 100 µs to 30 s.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The `task` label of requests that named a task this server does not serve.
pub const UNKNOWN_TASK: &str = "unknown";

/// Task names of one request looked up for labels; `limits.max_tasks_per_request` is far lower.
pub const MAX_LABELLED_TASKS: usize = 256;

/// The `kind` label values of `adapterdrop_batch_tokens`.
pub const TOKEN_KINDS: [&str; 3] = ["real", "computed", "attention"];

/// One finished engine batch, as the metrics count it.
#[derive(Debug, Clone, Copy)]
pub struct BatchRecord {
    /// Input sequences in the batch.
    pub rows: usize,
    /// Token positions summed over backbone layers (see [`crate::engine::ExecStats`]): real
    /// ones, ones per-token work computed (padding included), ones inside attention.
    pub real_tokens: usize,
    pub computed_tokens: usize,
    pub attention_tokens: usize,
    /// Hidden-state rows through backbone layers, summed over layers.
    pub layer_rows: usize,
    /// Layer rows every lane would have needed on its own, minus `layer_rows`.
    pub rows_saved: usize,
    /// Rows through adapter slot graphs, summed over slots.
    pub adapter_rows: usize,
    /// ONNX Runtime session runs the batch made.
    pub graph_runs: usize,
    pub compute: Duration,
}

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub errors: IntCounterVec,
    pub request_duration: HistogramVec,
    pub queue_duration: Histogram,
    pub compute_duration: Histogram,
    pub batches: IntCounter,
    pub graph_runs: IntCounter,
    pub batch_rows: Histogram,
    /// Per batch, by `kind`: [`TOKEN_KINDS`].
    pub batch_tokens: HistogramVec,
    pub queue_depth: IntGauge,
    pub layer_rows: IntCounter,
    pub rows_saved: IntCounter,
    pub adapter_rows: IntCounter,
    pub tasks_loaded: IntGaugeVec,
    /// The tasks request metrics may be labelled with (see [`Metrics::record_request`]).
    tasks: RwLock<Weak<repository::Registry>>,
    /// Serialises scrapes: each rebuilds the loaded-task gauges, and two at once would interleave.
    render_lock: std::sync::Mutex<()>,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Self {
        let r = Registry::new();
        let request_duration = HistogramVec::new(
            HistogramOpts::new("adapterdrop_request_duration_seconds", "Time from receiving an inference request to its answer.")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["api"],
        )
        .expect("valid metric");
        r.register(Box::new(request_duration.clone())).expect("unique metric");
        let queue_depth = IntGauge::new(
            "adapterdrop_queue_depth",
            "Inference requests admitted and not yet answered: being decoded or tokenized, queued, or in the engine \
                 (counted from admission, which batching.max_queued bounds).",
        )
        .expect("valid metric");
        r.register(Box::new(queue_depth.clone())).expect("unique metric");
        let tasks_loaded = IntGaugeVec::new(
            Opts::new("adapterdrop_tasks_loaded", "1 for every task version the server knows, labelled with its lifecycle state."),
            &["task", "version", "state"],
        )
        .expect("valid metric");
        r.register(Box::new(tasks_loaded.clone())).expect("unique metric");
        let info = IntGaugeVec::new(Opts::new("adapterdrop_build_info", "Always 1; labels carry the server version."), &["version"])
            .expect("valid metric");
        r.register(Box::new(info.clone())).expect("unique metric");
        info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let rows: Vec<f64> = (0..12).map(|i| f64::from(1u32 << i)).collect();
        // Token positions summed over layers: up to a 24-layer backbone times a 65,536-token batch.
        let tokens: Vec<f64> = (4..22).map(|i| f64::from(1u32 << i)).collect();
        let batch_tokens = HistogramVec::new(
            HistogramOpts::new(
                "adapterdrop_batch_tokens",
                "Token positions per engine batch, summed over backbone layers, by kind: real (real tokens that entered \
                 per-token work), computed (positions per-token work computed, padding included), attention (positions \
                 inside attention, padding included). sum(real) / sum(computed) is the padding efficiency.",
            )
            .buckets(tokens),
            &["kind"],
        )
        .expect("valid metric");
        r.register(Box::new(batch_tokens.clone())).expect("unique metric");
        Self {
            requests: counter_vec(
                &r,
                "adapterdrop_requests_total",
                "Inference requests answered, per task, API and gRPC status code.",
                &["api", "task", "code"],
            ),
            errors: counter_vec(&r, "adapterdrop_errors_total", "Failed inference requests by API and error type.", &["api", "type"]),
            request_duration,
            queue_duration: histogram(
                &r,
                "adapterdrop_queue_duration_seconds",
                "Time a request waited in the batching queue.",
                LATENCY_BUCKETS.to_vec(),
            ),
            compute_duration: histogram(&r, "adapterdrop_compute_duration_seconds", "Engine time of one batch.", LATENCY_BUCKETS.to_vec()),
            batches: counter(&r, "adapterdrop_batches_total", "Engine batches run."),
            graph_runs: counter(&r, "adapterdrop_graph_runs_total", "ONNX Runtime session runs made by engine batches."),
            batch_rows: histogram(&r, "adapterdrop_batch_rows", "Input sequences per engine batch.", rows),
            batch_tokens,
            queue_depth,
            layer_rows: counter(&r, "adapterdrop_layer_rows_total", "Hidden-state rows run through backbone layers (summed over layers)."),
            rows_saved: counter(
                &r,
                "adapterdrop_trunk_rows_saved_total",
                "Layer rows that sharing the trunk across tasks avoided, compared with running every task separately.",
            ),
            adapter_rows: counter(&r, "adapterdrop_adapter_rows_total", "Rows run through adapter slot graphs (summed over slots)."),
            tasks_loaded,
            tasks: RwLock::new(Weak::new()),
            render_lock: std::sync::Mutex::new(()),
            registry: r,
        }
    }

    /// Records one finished engine batch.
    pub fn record_batch(&self, b: BatchRecord) {
        self.batches.inc();
        self.graph_runs.inc_by(b.graph_runs as u64);
        self.batch_rows.observe(b.rows as f64);
        for (kind, n) in TOKEN_KINDS.iter().zip([b.real_tokens, b.computed_tokens, b.attention_tokens]) {
            self.batch_tokens.with_label_values(&[kind]).observe(n as f64);
        }
        self.compute_duration.observe(b.compute.as_secs_f64());
        self.layer_rows.inc_by(b.layer_rows as u64);
        self.rows_saved.inc_by(b.rows_saved as u64);
        self.adapter_rows.inc_by(b.adapter_rows as u64);
    }

    /// Request metrics label tasks that `registry` serves; set once the registry is open.
    pub fn label_tasks_of(&self, registry: &Arc<repository::Registry>) {
        *self.tasks.write().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(registry);
    }

    /// Records one answered inference request, once for each distinct task it named. Task names
    /// come from the client: only tasks the registry serves become label values, every other
    /// name counts as [`UNKNOWN_TASK`], so no request can add series.
    pub fn record_request(&self, api: &str, tasks: &[&str], result: Result<(), &crate::error::ServeError>, total: Duration) {
        let code = match result {
            Ok(()) => "OK".to_string(),
            Err(e) => {
                self.errors.with_label_values(&[api, e.error_type()]).inc();
                format!("{:?}", e.code())
            }
        };
        let registry = self.tasks.read().unwrap_or_else(|p| p.into_inner()).upgrade();
        let mut labels: BTreeSet<&str> = BTreeSet::new();
        // Requests naming more tasks than any limit allows were refused; their surplus is unknown.
        for task in tasks.iter().take(MAX_LABELLED_TASKS) {
            let name = task.split_once('@').map_or(*task, |(n, _)| n);
            let served = registry.as_ref().is_some_and(|r| r.default_version(name).is_some());
            labels.insert(if served { name } else { UNKNOWN_TASK });
        }
        if tasks.len() > MAX_LABELLED_TASKS {
            labels.insert(UNKNOWN_TASK);
        }
        for task in labels {
            self.requests.with_label_values(&[api, task, &code]).inc();
        }
        self.request_duration.with_label_values(&[api]).observe(total.as_secs_f64());
    }

    /// The text exposition, with loaded-task gauges refreshed from `registry`.
    pub fn render(&self, registry: &repository::Registry) -> String {
        let _one_at_a_time = self.render_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.tasks_loaded.reset();
        for e in registry.entries() {
            let state = match e.state {
                TaskState::Loading => "loading",
                TaskState::Ready => "ready",
                TaskState::Failed(_) => "failed",
                TaskState::Draining => "draining",
            };
            self.tasks_loaded.with_label_values(&[&e.name, &e.version.to_string(), state]).set(1);
        }
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}
