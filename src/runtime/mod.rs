//! ONNX Runtime: loading the shared library, the one process-wide environment, and graphs.

mod allocator;
pub mod bound;
mod cuda_stream;
pub mod device_banks;
mod graph;
mod graph_capture;
pub mod row_buckets;
mod row_ops;

use std::path::{Path, PathBuf};

pub use device_banks::TouchedRows;
pub use graph::{Dim, Graph, IoSpec, shrink_arena_after_next_run};
use ort::environment::{Environment, GlobalThreadPoolOptions};
pub use row_ops::RowOps;

thread_local! {
    static RUNS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn count_run() {
    RUNS.with(|r| r.set(r.get() + 1));
}

/// ONNX Runtime session runs made by this thread so far (the engine's batches read the
/// difference: `ExecStats.graph_runs`, `adapterdrop_graph_runs_total`).
pub fn session_runs() -> u64 {
    RUNS.with(|r| r.get())
}

use crate::config::{ExecutionProvider, OptimizationLevel, RuntimeSettings};

/// ONNX Runtime minor version this server is built and tested against (`onnxruntime==1.31.1`).
pub const REQUIRED_ORT_VERSION: &str = "1.31";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime library not found: set runtime.library_path (ADAPTERDROP__RUNTIME__LIBRARY_PATH) or \
         ORT_DYLIB_PATH to libonnxruntime.so.1.31.1 (`make setup` installs it into .venv from the \
         onnxruntime==1.31.1 wheel)"
    )]
    NotConfigured,
    #[error("ONNX Runtime library {0} does not exist")]
    Missing(PathBuf),
    #[error("ONNX Runtime library {path} could not be loaded: {reason}")]
    Unloadable { path: PathBuf, reason: String },
    #[error("ONNX Runtime library {path} is version {found}; this server needs {REQUIRED_ORT_VERSION}.x (pip install onnxruntime==1.31.1)")]
    WrongVersion { path: PathBuf, found: String },
    #[error("ONNX Runtime environment could not be created: {0}")]
    Environment(String),
    #[error(
        "runtime.execution_provider = \"cuda\" but {path} has no CUDA execution provider; \
         point runtime.library_path at the onnxruntime-gpu==1.31.1 library (`make gpu-check` installs it)"
    )]
    NoCuda { path: PathBuf },
}

/// Where graphs run. CUDA sessions keep hidden states on the device between graphs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Device {
    Cpu,
    Cuda { device_id: i32, memory_limit: usize },
}

/// Identity of a graph file's bytes (two hashes and the length).
pub type ContentKey = (u64, u64, usize);

/// Graphs loaded by content, held weakly: a graph lives while some task holds it.
pub type GraphCache = std::sync::Mutex<std::collections::HashMap<ContentKey, std::sync::Weak<Graph>>>;

/// The process-wide ONNX Runtime environment with its global thread pool: every session uses that
/// pool, so hundreds of per-layer and per-adapter sessions do not each spawn their own threads.
/// Clones share the environment and the cache of loaded graphs.
#[derive(Clone)]
pub struct Runtime {
    env: Environment,
    version: String,
    optimization: ort::session::builder::GraphOptimizationLevel,
    device: Device,
    /// Device-side row regrouping, for CUDA only.
    row_ops: Option<std::sync::Arc<RowOps>>,
    /// Graphs with identical bytes are loaded once (`repository::fusion::load_shared`).
    graphs: std::sync::Arc<GraphCache>,
    /// `runtime.io_binding` resolved: the bank path runs its layers through [`bound::BoundLayers`].
    io_binding: bool,
    /// `runtime.cuda_graphs`: layer sessions built for CUDA graph capture, inputs at fixed addresses.
    cuda_graphs: bool,
    /// `runtime.layer_graph` resolved: backbones load `layer_capturable.onnx` (no control flow).
    capturable_layers: bool,
    /// The CUDA stream every CUDA session shares (IoBinding under CUDA), as an address.
    stream: Option<usize>,
}

impl Runtime {
    pub fn init(settings: &RuntimeSettings) -> Result<Self, RuntimeError> {
        let path = settings
            .library_path
            .clone()
            .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
            .ok_or(RuntimeError::NotConfigured)?;
        if !path.is_file() {
            return Err(RuntimeError::Missing(path));
        }
        let device = match settings.execution_provider {
            ExecutionProvider::Cpu => Device::Cpu,
            ExecutionProvider::Cuda => Device::Cuda { device_id: settings.cuda_device_id, memory_limit: settings.cuda_memory_limit_bytes },
        };
        let version = library_version(&path)?;
        if !version.starts_with(&format!("{REQUIRED_ORT_VERSION}.")) {
            return Err(RuntimeError::WrongVersion { path, found: version });
        }
        let threads = if settings.intra_threads == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            settings.intra_threads
        };
        // Load the library first: any other ort call before `init_from` would make ort load its
        // default (`ORT_DYLIB_PATH` or `libonnxruntime.so`) and ignore `runtime.library_path`.
        let builder = ort::init_from(&path).map_err(|e| RuntimeError::Unloadable { path: path.clone(), reason: e.to_string() })?;
        let pool = GlobalThreadPoolOptions::default()
            .with_intra_threads(threads)
            .and_then(|p| p.with_inter_threads(1))
            .and_then(|p| p.with_spin_control(settings.allow_spinning))
            .map_err(|e| RuntimeError::Environment(e.to_string()))?;
        let env = builder
            .with_name("adapterdrop-serve")
            .with_telemetry(false)
            .with_global_thread_pool(pool)
            .build()
            .map_err(|e| RuntimeError::Environment(e.to_string()))?;
        use ort::session::builder::GraphOptimizationLevel as L;
        let optimization = match settings.optimization_level {
            OptimizationLevel::Disable => L::Disable,
            OptimizationLevel::Basic => L::Level1,
            OptimizationLevel::Extended => L::Level2,
            OptimizationLevel::All => L::All,
        };
        if device != Device::Cpu {
            use ort::ep::ExecutionProvider;
            if !ort::ep::CUDA::is_available().unwrap_or(false) {
                return Err(RuntimeError::NoCuda { path });
            }
        }
        if device == Device::Cpu {
            allocator::register_shared_cpu_arena(&env).map_err(|e| RuntimeError::Environment(format!("shared CPU arena: {e}")))?;
        }
        let row_ops = match device {
            Device::Cuda { device_id, .. } => Some(std::sync::Arc::new(
                RowOps::new(&env, device_id).map_err(|e| RuntimeError::Environment(format!("CUDA row operations: {e}")))?,
            )),
            Device::Cpu => None,
        };
        tracing::info!(library = %path.display(), %version, intra_threads = threads, allow_spinning = settings.allow_spinning, ?device, "ONNX Runtime loaded");
        let io_binding = settings.io_binding_on();
        // Layers skip the host synchronisation between them only on one shared stream.
        let stream = (io_binding && device != Device::Cpu).then(cuda_stream::shared).flatten();
        let capturable_layers = settings.capturable_layers();
        tracing::info!(io_binding, cuda_graphs = settings.cuda_graphs, capturable_layers, "bank path runner");
        Ok(Self {
            env,
            version,
            optimization,
            device,
            row_ops,
            graphs: Default::default(),
            io_binding,
            cuda_graphs: settings.cuda_graphs,
            capturable_layers,
            stream,
        })
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    pub(crate) fn environment(&self) -> &Environment {
        &self.env
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Whether the bank path runs its layers through IoBinding (`runtime.io_binding`).
    pub fn io_binding(&self) -> bool {
        self.io_binding
    }

    /// The same runtime with `runtime.io_binding` forced (in-process A/B tests and benchmarks;
    /// backbones loaded through it get the runner chosen here).
    pub fn with_io_binding(&self, on: bool) -> Self {
        Self { io_binding: on, ..self.clone() }
    }

    /// The CUDA stream all CUDA sessions share, when there is one (`cuda_stream.rs`).
    pub fn cuda_stream(&self) -> Option<usize> {
        self.stream
    }

    /// Whether layer graphs run as captured CUDA graphs (`runtime.cuda_graphs`).
    pub fn cuda_graphs(&self) -> bool {
        self.cuda_graphs
    }

    /// The same runtime with `runtime.cuda_graphs` forced: on the CPU provider only the
    /// fixed-address staging runs (in-process tests; the setting is refused there).
    pub fn with_cuda_graphs(&self, on: bool) -> Self {
        Self { cuda_graphs: on, io_binding: self.io_binding || on, capturable_layers: self.capturable_layers || on, ..self.clone() }
    }

    /// Whether backbones run their layer graphs without control flow (`runtime.layer_graph`).
    pub fn capturable_layers(&self) -> bool {
        self.capturable_layers
    }

    /// The same runtime with `runtime.layer_graph` forced (in-process A/B tests and benchmarks).
    pub fn with_capturable_layers(&self, on: bool) -> Self {
        Self { capturable_layers: on || self.cuda_graphs, ..self.clone() }
    }

    pub fn row_ops(&self) -> Option<&std::sync::Arc<RowOps>> {
        self.row_ops.as_ref()
    }

    pub(crate) fn graph_cache(&self) -> &GraphCache {
        &self.graphs
    }

    pub(crate) fn optimization(&self) -> ort::session::builder::GraphOptimizationLevel {
        self.optimization
    }
}

/// `runtime.cuda_graphs` is only meaningful on the CUDA provider, through IoBinding: anything else
/// is a start-up error naming the keys to change.
pub fn check_cuda_graphs(settings: &RuntimeSettings) -> Result<(), String> {
    if !settings.cuda_graphs {
        return Ok(());
    }
    if settings.execution_provider != ExecutionProvider::Cuda {
        return Err(format!(
            "runtime.cuda_graphs = true needs runtime.execution_provider = \"cuda\" (it is \"{}\"): ONNX Runtime captures \
             CUDA graphs on the CUDA execution provider only; set runtime.cuda_graphs = false",
            settings.execution_provider.as_str()
        ));
    }
    if !settings.io_binding_on() {
        return Err("runtime.cuda_graphs = true needs runtime.io_binding = \"on\" or \"auto\": a captured graph replays \
                    fixed device addresses, which only the IoBinding runner provides"
            .into());
    }
    Ok(())
}

/// Returns the free memory at the top of the process heap and of glibc's arenas to the system.
/// Host copies of hidden states come from malloc, which keeps freed blocks below its mmap
/// threshold (up to 32 MiB once raised) for reuse: after a large batch that is memory for good.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases glibc's own free lists; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Reads the library's own version string before `ort` binds to it, so a wrong version is a clear
/// start-up error instead of undefined behaviour later.
fn library_version(path: &Path) -> Result<String, RuntimeError> {
    let unloadable = |reason: String| RuntimeError::Unloadable { path: path.to_path_buf(), reason };
    // SAFETY: loading ONNX Runtime runs no user code beyond its static initialisers, and
    // `OrtGetApiBase` is its documented, argument-free C entry point returning a static struct.
    unsafe {
        let lib = libloading::Library::new(path).map_err(|e| unloadable(e.to_string()))?;
        let get_base: libloading::Symbol<unsafe extern "C" fn() -> *const ort::sys::OrtApiBase> =
            lib.get(b"OrtGetApiBase").map_err(|_| unloadable("no OrtGetApiBase symbol: not ONNX Runtime".into()))?;
        let base = get_base();
        if base.is_null() {
            return Err(unloadable("OrtGetApiBase returned null".into()));
        }
        let version = std::ffi::CStr::from_ptr(((*base).GetVersionString)()).to_string_lossy().into_owned();
        // The library stays loaded: `ort` opens the same file next, and unloading ORT is unsafe.
        std::mem::forget(lib);
        Ok(version)
    }
}
