//! Typed settings: defaults < TOML file (`--config PATH`) < `ADAPTERDROP__SECTION__KEY` variables.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod choices;

pub use choices::{ExecutionProvider, IoBinding, LayerGraph, LogFormat, OptimizationLevel};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub repository: RepositorySettings,
    pub runtime: RuntimeSettings,
    pub limits: LimitSettings,
    pub batching: BatchingSettings,
    pub engine: EngineSettings,
    pub log: LogSettings,
    pub metrics: MetricsSettings,
    pub tls: TlsSettings,
    pub admin: AdminSettings,
    pub auth: AuthSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Address of the Prometheus endpoint (`GET /metrics`); empty disables it.
    pub listen: String,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        Self { listen: "0.0.0.0:9090".into() }
    }
}

/// TLS for the gRPC ports. Both paths set: TLS on; both empty: plaintext.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain of the server.
    pub cert_path: String,
    /// PEM private key of the server.
    pub key_path: String,
    /// PEM CA bundle; when set, the admin port requires client certificates signed by it.
    pub client_ca_path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address of the gRPC port (native API, health, reflection). Port 0 picks a free port.
    pub listen: String,
    /// Largest gRPC message a client may send, in bytes (every API). The default fits the
    /// largest request the default `limits` allow with margin (README "Memory bounds").
    pub max_message_bytes: usize,
    /// After SIGTERM: how long in-flight and queued requests may take before the process exits.
    pub shutdown_grace_s: u64,
    /// Connections older than this are closed gracefully (GOAWAY), so clients balancing over a
    /// headless Service re-resolve DNS and reach pods added by a scale-out. 0 = never.
    pub max_connection_age_s: u64,
    /// Messages of one stream (InferStream, ModelStreamInfer) being worked on or waiting to be
    /// sent back. At the bound the server stops reading the stream, so a client that never reads
    /// its answers is held back by HTTP/2 flow control instead of growing the server.
    pub max_stream_in_flight: usize,
}

/// Answers are built by the server from requests within the limits, so they are not what
/// `max_message_bytes` guards against; they keep the former 64 MiB bound (or the request bound,
/// when that is larger), since a fan-out over many labels can exceed the request bound.
pub const MIN_RESPONSE_BYTES: usize = 64 << 20;

impl ServerSettings {
    /// Largest gRPC message the server sends.
    pub fn max_response_bytes(&self) -> usize {
        self.max_message_bytes.max(MIN_RESPONSE_BYTES)
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50051".into(),
            max_message_bytes: 2 << 20,
            shutdown_grace_s: 30,
            max_connection_age_s: 300,
            max_stream_in_flight: 32,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RepositorySettings {
    pub path: PathBuf,
    /// Seconds between scans for tasks added or removed by other replicas sharing the repository; 0 = never.
    pub poll_interval_s: u64,
    /// Task directories read ahead of the start-up loaders (`posix_fadvise(WILLNEED)`), so a cold
    /// start keeps the disk busy, and dropped from the page cache once loaded (the server holds
    /// them); 0 = off (each loader thread reads one file at a time, files stay cached).
    pub readahead_tasks: usize,
}

impl Default for RepositorySettings {
    fn default() -> Self {
        Self { path: PathBuf::from("models/default"), poll_interval_s: 5, readahead_tasks: 96 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Address of the admin port (`adapterdrop.v1.Admin`, health); empty disables the admin service.
    pub listen: String,
    /// Largest task bundle `RegisterTask` accepts (all files together), in bytes.
    pub max_bundle_bytes: u64,
    /// An upload that sends nothing for this long is cut off and its staging directory removed.
    pub upload_idle_timeout_s: u64,
    /// An upload still receiving after this long is cut off likewise (a client trickling bytes).
    pub upload_timeout_s: u64,
    /// The trial run of an uploaded task (every graph once on a small input) is stopped after this long.
    pub trial_timeout_ms: u64,
    /// Operators trusted in uploaded task graphs beyond the ones the exporters emit, comma-separated
    /// (e.g. `Gemm,Reshape`). Their nodes are not size-checked; the trial run's time limit still applies.
    pub extra_task_ops: String,
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:50052".into(),
            max_bundle_bytes: 256 << 20,
            upload_idle_timeout_s: 30,
            upload_timeout_s: 600,
            trial_timeout_ms: 10_000,
            extra_task_ops: String::new(),
        }
    }
}

impl AdminSettings {
    pub fn upload_idle_timeout(&self) -> Duration {
        Duration::from_secs(self.upload_idle_timeout_s.max(1))
    }

    pub fn upload_timeout(&self) -> Duration {
        Duration::from_secs(self.upload_timeout_s.max(1))
    }
}

/// Bearer tokens (`authorization: Bearer <token>`); empty = no token required.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    pub admin_token: String,
    pub inference_token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeSettings {
    /// Path of `libonnxruntime.so`; falls back to `ORT_DYLIB_PATH`.
    pub library_path: Option<PathBuf>,
    /// Threads of the global intra-op pool shared by every session; 0 = one per core.
    pub intra_threads: usize,
    /// Let the pool's idle workers spin briefly before sleeping. Off, every parallel operator
    /// pays a thread wake-up, and the segmented pipeline runs many short operators.
    pub allow_spinning: bool,
    /// ONNX Runtime graph optimization: `disable`, `basic`, `extended` or `all`.
    pub optimization_level: OptimizationLevel,
    /// `cpu`, or `cuda` (needs the onnxruntime-gpu library; failing to register it is a start-up
    /// error, never a silent fall-back to CPU).
    pub execution_provider: ExecutionProvider,
    pub cuda_device_id: i32,
    /// Byte limit of the CUDA memory arena; 0 = no limit.
    pub cuda_memory_limit_bytes: usize,
    /// Bank-path layer runs through IoBinding: banks mirrored on the execution device, outputs in
    /// preallocated buffers, one synchronisation per batch (`auto`: on under CUDA only).
    pub io_binding: IoBinding,
    /// CUDA graphs for the bank path (CUDA only; refused at start-up on any other provider).
    pub cuda_graphs: bool,
    /// The bank path's layer graph: `dispatch` or `capturable` (no control flow; needs backbones
    /// exported with `--capturable-layers`). `cuda_graphs` runs the capturable one whatever this says.
    pub layer_graph: LayerGraph,
}

impl RuntimeSettings {
    /// `runtime.io_binding` resolved against the provider.
    pub fn io_binding_on(&self) -> bool {
        match self.io_binding {
            IoBinding::On => true,
            IoBinding::Off => false,
            IoBinding::Auto => self.execution_provider == ExecutionProvider::Cuda,
        }
    }

    /// `runtime.layer_graph` resolved: CUDA graphs need the graph without control flow.
    pub fn capturable_layers(&self) -> bool {
        self.cuda_graphs || self.layer_graph == LayerGraph::Capturable
    }
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        Self {
            library_path: None,
            intra_threads: 0,
            allow_spinning: false,
            optimization_level: OptimizationLevel::All,
            execution_provider: ExecutionProvider::Cpu,
            cuda_device_id: 0,
            cuda_memory_limit_bytes: 0,
            io_binding: IoBinding::Auto,
            cuda_graphs: false,
            layer_graph: LayerGraph::Dispatch,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    pub max_sequences_per_request: usize,
    /// Tokens of a request's sequences; also the padded tokens the engine runs for it (rows x
    /// longest sequence, where the rows count one copy of each sequence per distinct task path).
    pub max_tokens_per_request: usize,
    pub max_tasks_per_request: usize,
    /// Bytes of one text (UTF-8), checked before it is tokenized: tokenizer time and memory grow
    /// with the text, whatever `truncate` keeps of it.
    pub max_text_bytes: usize,
    /// Bytes of all texts of one request together, checked before any is tokenized: tokenizer
    /// time grows with the text, and `max_sequences_per_request` texts of `max_text_bytes` each
    /// would be 16 MiB by default (about a minute of tokenizer CPU in a debug build).
    pub max_request_text_bytes: usize,
    /// HTTP/2 streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS):
    /// with `server.max_message_bytes` it bounds what one connection can make the server buffer.
    pub max_concurrent_streams: u32,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_sequences_per_request: 256,
            max_tokens_per_request: 65_536,
            max_tasks_per_request: 32,
            max_text_bytes: 65_536,
            max_request_text_bytes: 1 << 20,
            max_concurrent_streams: 64,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchingSettings {
    /// Padded tokens (rows x longest sequence) one engine batch may hold.
    pub max_batch_tokens: usize,
    /// How long the first request of a batch may wait for company.
    pub max_batch_delay_ms: u64,
    /// Requests waiting for the engine before new ones get RESOURCE_EXHAUSTED.
    pub max_queued: usize,
    /// New requests get RESOURCE_EXHAUSTED when the work already queued would keep them waiting
    /// longer than this (estimated from the engine's measured speed); 0 = no bound. A count
    /// bound alone lets admitted requests wait many seconds under a flood.
    pub max_queue_wait_ms: u64,
    /// Length-aware batching: waiting requests are split into runs of similar length where the
    /// padding saved is worth an extra batch, and the next batch is the run holding the oldest
    /// request; a request that has waited this long joins the next batch whatever its length
    /// (within the budget), which bounds the extra wait grouping causes. 0 = first come, first served.
    pub length_wait_ms: u64,
}

impl Default for BatchingSettings {
    fn default() -> Self {
        Self { max_batch_tokens: 16_384, max_batch_delay_ms: 2, max_queued: 1024, max_queue_wait_ms: 5_000, length_wait_ms: 50 }
    }
}

impl BatchingSettings {
    pub fn max_batch_delay(&self) -> Duration {
        Duration::from_millis(self.max_batch_delay_ms)
    }

    /// `length_wait_ms` as the grouping bound, `None` when grouping is off.
    pub fn length_wait(&self) -> Option<Duration> {
        (self.length_wait_ms > 0).then(|| Duration::from_millis(self.length_wait_ms))
    }

    /// `max_queue_wait_ms` as a bound, `None` when unbounded.
    pub fn max_queue_wait(&self) -> Option<Duration> {
        (self.max_queue_wait_ms > 0).then(|| Duration::from_millis(self.max_queue_wait_ms))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    /// Run tasks loaded from AdapterHub weights on the adapter banks (one `layer.onnx` run per
    /// layer, whatever tasks a batch mixes); false keeps every task on the per-task segment path
    /// (for A/B benchmarks).
    pub banks: bool,
    /// Run bank batches on packed tokens (no padding outside attention, issue 15); false feeds
    /// every row at the batch's longest length, pads included (the padded A/B).
    pub packing: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self { banks: true, packing: true }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// `text` (human-readable) or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `adapterdrop_serve=debug,ort=warn`; `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: "info,ort=warn".into() }
    }
}

impl Settings {
    /// Layers the sources; a missing explicit file is an error, not a silent default.
    pub fn load(file: Option<&Path>) -> Result<Self, config::ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml).required(true));
        }
        let settings: Self = builder
            .add_source(config::Environment::with_prefix("ADAPTERDROP").prefix_separator("__").separator("__").try_parsing(true))
            .build()?
            .try_deserialize()?;
        settings.validate().map_err(config::ConfigError::Message)?;
        Ok(settings)
    }

    /// Values each key's type allows but the server cannot honour: a `limits.*` count above the
    /// codec's hard ceiling ([`crate::codec::ceilings`]) would be refused before decoding anyway,
    /// so start-up stops and names the key instead of letting requests fail confusingly.
    pub fn validate(&self) -> Result<(), String> {
        use crate::codec::ceilings::{MAX_SEQUENCES, MAX_TASKS, MAX_TOKENS};
        crate::runtime::check_cuda_graphs(&self.runtime)?;
        let l = &self.limits;
        for (key, value, ceiling) in [
            ("limits.max_sequences_per_request", l.max_sequences_per_request, MAX_SEQUENCES),
            ("limits.max_tokens_per_request", l.max_tokens_per_request, MAX_TOKENS),
            ("limits.max_tasks_per_request", l.max_tasks_per_request, MAX_TASKS),
        ] {
            if value > ceiling {
                return Err(format!(
                    "{key} = {value} is above its ceiling of {ceiling} (the protobuf decoder refuses larger requests before \
                     any setting is consulted; see README \"Memory bounds\")"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:6000\"\n[batching]\nmax_queued = 7\n").unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:6000");
        assert_eq!(s.batching.max_queued, 7);
        assert_eq!(s.batching.max_batch_tokens, BatchingSettings::default().max_batch_tokens);
    }

    #[test]
    fn io_binding_follows_the_provider_unless_set_and_cuda_graphs_need_cuda() {
        let mut r = RuntimeSettings::default();
        assert!(!r.io_binding_on(), "auto is off on the CPU");
        r.execution_provider = ExecutionProvider::Cuda;
        assert!(r.io_binding_on(), "auto is on under CUDA");
        r.cuda_graphs = true;
        assert!(crate::runtime::check_cuda_graphs(&r).is_ok());
        r.io_binding = IoBinding::Off;
        assert!(!r.io_binding_on());
        assert!(crate::runtime::check_cuda_graphs(&r).unwrap_err().contains("runtime.io_binding"));
        r.execution_provider = ExecutionProvider::Cpu;
        r.io_binding = IoBinding::On;
        assert!(r.io_binding_on());
        assert!(crate::runtime::check_cuda_graphs(&r).unwrap_err().contains("runtime.execution_provider = \"cuda\""));
    }

    #[test]
    fn cuda_graphs_imply_the_capturable_layer_graphs() {
        let mut r = RuntimeSettings::default();
        assert!(r.layer_graph == LayerGraph::Dispatch && !r.capturable_layers());
        r.layer_graph = "capturable".parse().unwrap();
        assert!(r.capturable_layers());
        r.layer_graph = LayerGraph::Dispatch;
        r.cuda_graphs = true;
        assert!(r.capturable_layers(), "a captured graph cannot hold the dispatch `If`s");
        assert!("if".parse::<LayerGraph>().unwrap_err().contains("`dispatch`, `capturable`"));
    }

    /// Settings loaded from `toml` written as the config file in `dir`.
    fn load_toml(dir: &tempfile::TempDir, toml: &str) -> Result<Settings, config::ConfigError> {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).unwrap();
        Settings::load(Some(&path))
    }

    #[test]
    fn enum_settings_parse_and_unknown_values_name_key_and_choices() {
        let dir = tempfile::tempdir().unwrap();
        let load = |toml: &str| load_toml(&dir, toml);
        let s = load("[runtime]\noptimization_level = \"basic\"\nexecution_provider = \"cuda\"\n[log]\nformat = \"json\"\n").unwrap();
        assert_eq!((s.runtime.optimization_level, s.runtime.execution_provider), (OptimizationLevel::Basic, ExecutionProvider::Cuda));
        assert_eq!(s.log.format, LogFormat::Json);
        for (toml, key, allowed) in [
            ("[runtime]\noptimization_level = \"fast\"\n", "runtime.optimization_level", &["disable", "basic", "extended", "all"][..]),
            ("[runtime]\nexecution_provider = \"tpu\"\n", "runtime.execution_provider", &["cpu", "cuda"][..]),
            ("[log]\nformat = \"xml\"\n", "log.format", &["text", "json"][..]),
        ] {
            let msg = load(toml).unwrap_err().to_string();
            assert!(msg.contains(key), "{msg}");
            assert!(allowed.iter().all(|v| msg.contains(&format!("`{v}`"))), "{msg}");
        }
        assert_eq!("extended".parse::<OptimizationLevel>().unwrap(), OptimizationLevel::Extended);
        assert!("EXTENDED".parse::<OptimizationLevel>().unwrap_err().contains("`extended`"));
    }

    #[test]
    fn limits_above_the_codec_ceilings_stop_start_up_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let load = |toml: &str| load_toml(&dir, toml);
        let at = load("[limits]\nmax_sequences_per_request = 4096\nmax_tokens_per_request = 1048576\nmax_tasks_per_request = 1024\n");
        assert!(at.is_ok(), "{at:?}");
        for (toml, key, ceiling) in [
            ("[limits]\nmax_sequences_per_request = 4097\n", "limits.max_sequences_per_request", "4096"),
            ("[limits]\nmax_tokens_per_request = 1048577\n", "limits.max_tokens_per_request", "1048576"),
            ("[limits]\nmax_tasks_per_request = 100000\n", "limits.max_tasks_per_request", "1024"),
        ] {
            let msg = load(toml).unwrap_err().to_string();
            assert!(msg.contains(key) && msg.contains(ceiling), "{msg}");
        }
        assert!(Settings::default().validate().is_ok());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[server]\nlisten_addr = \"x\"\n").unwrap();
        assert!(Settings::load(Some(&path)).is_err());
    }
}
