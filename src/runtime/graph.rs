//! One ONNX graph in one session, checked against its I/O contract when it is loaded.

use std::path::Path;
use std::sync::Mutex;

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{RunOptions, Session, SessionInputValue, SessionOutputs};
use ort::value::DynValue;
use ort::value::TensorElementType;
use ort::value::ValueType;

use super::Runtime;
use crate::error::LoadError;

thread_local! {
    static SHRINK_NEXT_RUN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// After a large batch: the next graph run on this thread returns the free regions of the CPU
/// arena to the system when it ends (ORT's `memory.enable_memory_arena_shrinkage`). The shared
/// arena otherwise keeps the high-water mark of the largest batch ever run, for good.
pub fn shrink_arena_after_next_run() {
    SHRINK_NEXT_RUN.with(|c| c.set(true));
}

/// Takes the request made by [`shrink_arena_after_next_run`] (for runners that run sessions
/// themselves, `bound.rs`).
pub(super) fn take_shrink_request() -> bool {
    SHRINK_NEXT_RUN.with(|c| c.replace(false))
}

/// One dimension of a contract: any size, or exactly this size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dim {
    Any,
    Fixed(i64),
}

/// Expected name, element type and shape of one graph input or output.
#[derive(Debug, Clone)]
pub struct IoSpec {
    pub name: &'static str,
    pub ty: TensorElementType,
    pub dims: Vec<Dim>,
}

impl IoSpec {
    pub fn new(name: &'static str, ty: TensorElementType, dims: &[Dim]) -> Self {
        Self { name, ty, dims: dims.to_vec() }
    }
}

/// A loaded graph. `Session::run` takes `&mut self`, so the session sits behind a mutex; only the
/// engine thread runs graphs, so the lock is never contended on the hot path.
pub struct Graph {
    file: String,
    session: Mutex<Session>,
    device: super::Device,
    row_ops: Option<std::sync::Arc<super::RowOps>>,
    /// Built for CUDA graph capture (`runtime.cuda_graphs`, and ONNX Runtime accepted it).
    captured: bool,
}

impl std::fmt::Debug for Graph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Graph").field("file", &self.file).finish()
    }
}

impl Graph {
    /// Loads `path` and checks it has exactly `inputs` and `outputs`.
    pub fn load(runtime: &Runtime, path: &Path, inputs: &[IoSpec], outputs: &[IoSpec]) -> Result<Self, LoadError> {
        Self::load_as(runtime, path, inputs, outputs, false)
    }

    /// [`Graph::load`] for a backbone's layer graph: under `runtime.cuda_graphs` (which loads
    /// `layer_capturable.onnx`, without control flow) its CUDA session is built for graph capture
    /// where ONNX Runtime allows it; where it refuses (a node left outside the CUDA provider with a
    /// copy to or from it), the graph is loaded uncaptured and the refusal logged.
    pub fn load_layer(runtime: &Runtime, path: &Path, inputs: &[IoSpec], outputs: &[IoSpec]) -> Result<Self, LoadError> {
        if !runtime.cuda_graphs() || runtime.device() == super::Device::Cpu {
            return Self::load_as(runtime, path, inputs, outputs, false);
        }
        Self::load_as(runtime, path, inputs, outputs, true).or_else(|refused| {
            tracing::warn!(file = %path.display(), reason = %refused, "ONNX Runtime refused CUDA graph capture for this layer graph: it runs uncaptured");
            Self::load_as(runtime, path, inputs, outputs, false)
        })
    }

    /// Whether this graph's session was built for CUDA graph capture.
    pub fn captured(&self) -> bool {
        self.captured
    }

    fn load_as(runtime: &Runtime, path: &Path, inputs: &[IoSpec], outputs: &[IoSpec], capture: bool) -> Result<Self, LoadError> {
        if !path.is_file() {
            return Err(LoadError::new(path, "file is missing"));
        }
        let session = build_session(runtime, path, capture).map_err(|e| LoadError::new(path, format!("not a loadable ONNX graph: {e}")))?;
        check_io(path, "input", session.inputs().iter().map(|o| (o.name(), o.dtype())), inputs)?;
        check_io(path, "output", session.outputs().iter().map(|o| (o.name(), o.dtype())), outputs)?;
        Ok(Self {
            file: path.display().to_string(),
            session: Mutex::new(session),
            device: runtime.device(),
            row_ops: runtime.row_ops().cloned(),
            captured: capture,
        })
    }

    /// Checks an already loaded graph against a contract (for graphs shared between tasks).
    pub fn check_contract(&self, path: &Path, inputs: &[IoSpec], outputs: &[IoSpec]) -> Result<(), LoadError> {
        let session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        check_io(path, "input", session.inputs().iter().map(|o| (o.name(), o.dtype())), inputs)?;
        check_io(path, "output", session.outputs().iter().map(|o| (o.name(), o.dtype())), outputs)
    }

    /// The session itself, for runners that bind their own inputs and outputs (`bound.rs`).
    pub(crate) fn lock_session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn file(&self) -> &str {
        &self.file
    }

    /// Runs the graph and hands the outputs to `read` while the session is still borrowed
    /// (ORT output views borrow the session).
    pub fn run<'v, R>(
        &self,
        inputs: Vec<(&'static str, SessionInputValue<'v>)>,
        read: impl FnOnce(SessionOutputs<'_>) -> ort::Result<R>,
    ) -> ort::Result<R> {
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        super::count_run();
        // CPU only: the CUDA arena is bounded by runtime.cuda_memory_limit_bytes instead.
        if self.device == super::Device::Cpu && SHRINK_NEXT_RUN.with(|c| c.replace(false)) {
            let mut options = RunOptions::new()?;
            options.set("memory.enable_memory_arena_shrinkage", "cpu:0")?;
            let outputs = session.run_with_options(inputs, &options)?;
            return read(outputs);
        }
        let outputs = session.run(inputs)?;
        read(outputs)
    }

    /// [`Graph::run`] under `options`, whose terminate flag another thread may set to stop it
    /// (the registration trial run's time limit).
    pub fn run_with_options<'v, R>(
        &self,
        inputs: Vec<(&'static str, SessionInputValue<'v>)>,
        options: &ort::session::RunOptions,
        read: impl FnOnce(SessionOutputs<'_>) -> ort::Result<R>,
    ) -> ort::Result<R> {
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session.run_with_options(inputs, options)?;
        read(outputs)
    }

    /// Where this graph's outputs live.
    pub fn device(&self) -> super::Device {
        self.device
    }

    /// Row regrouping on this graph's device (CUDA only).
    pub fn row_ops(&self) -> Option<&super::RowOps> {
        self.row_ops.as_deref()
    }

    /// Runs the graph with its single output `name` left where the graph produced it: on the GPU
    /// for CUDA sessions (IoBinding), so the next graph reads it without a host round trip.
    pub fn run_on_device(&self, inputs: Vec<(&'static str, SessionInputValue<'_>)>, name: &'static str) -> ort::Result<DynValue> {
        let super::Device::Cuda { device_id, .. } = self.device else {
            return self
                .run(inputs, |mut outputs| outputs.remove(name).ok_or_else(|| ort::Error::new(format!("graph has no output `{name}`"))));
        };
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let mut binding = session.create_binding()?;
        for (input, value) in &inputs {
            binding.bind_input(*input, &**value)?;
        }
        let memory = MemoryInfo::new(AllocationDevice::CUDA, device_id, AllocatorType::Device, MemoryType::Default)?;
        binding.bind_output_to_device(name, &memory)?;
        super::count_run();
        let mut outputs = session.run_binding(&binding)?;
        outputs.remove(name).ok_or_else(|| ort::Error::new(format!("graph has no output `{name}`")))
    }
}

fn build_session(runtime: &Runtime, path: &Path, capture: bool) -> ort::Result<Session> {
    let mut builder =
        Session::builder(runtime.environment())?.with_optimization_level(runtime.optimization()).map_err(|e| -> ort::Error { e.into() })?;
    if runtime.device() == super::Device::Cpu {
        // One arena for all sessions (see `allocator`).
        builder = builder.with_env_allocators().map_err(|e| -> ort::Error { e.into() })?;
        // ORT 1.31's CPU SkipLayerNormalization kernel takes ~3x as long as the Add +
        // LayerNormalization it replaces (0.95 vs 0.29 ms on [8, 128, 384], 2 threads), and every
        // slot graph ends in one (tools/experiments/segment_floor.py).
        builder = builder.with_disabled_optimizers("SkipLayerNormFusion").map_err(|e| -> ort::Error { e.into() })?;
    }
    if let super::Device::Cuda { device_id, memory_limit } = runtime.device() {
        // TF32 matmuls would move logits by ~1e-3; exactness to the reference needs full fp32.
        let mut cuda = ort::ep::CUDA::default().with_device_id(device_id).with_tf32(false);
        if memory_limit > 0 {
            cuda = cuda.with_memory_limit(memory_limit);
        }
        if capture {
            cuda = cuda.with_cuda_graph(true);
        }
        if let Some(stream) = runtime.cuda_stream() {
            // SAFETY: the shared stream is created once and never destroyed (`cuda_stream.rs`).
            cuda = unsafe { cuda.with_compute_stream(stream as *mut ()) };
        }
        // error_on_failure: a CUDA session that cannot register must not quietly run on the CPU.
        builder = builder.with_execution_providers([cuda.build().error_on_failure()]).map_err(|e| -> ort::Error { e.into() })?;
    }
    builder.commit_from_file(path)
}

fn check_io<'a>(
    path: &Path,
    kind: &str,
    actual: impl Iterator<Item = (&'a str, &'a ValueType)>,
    expected: &[IoSpec],
) -> Result<(), LoadError> {
    let actual: Vec<(&str, &ValueType)> = actual.collect();
    let names: Vec<&str> = actual.iter().map(|(n, _)| *n).collect();
    let wanted: Vec<&str> = expected.iter().map(|s| s.name).collect();
    let mut sorted_names = names.clone();
    sorted_names.sort_unstable();
    let mut sorted_wanted = wanted.clone();
    sorted_wanted.sort_unstable();
    if sorted_names != sorted_wanted {
        return Err(LoadError::new(path, format!("{kind}s are {names:?}, expected {wanted:?}")));
    }
    for spec in expected {
        let (_, ty) = actual.iter().find(|(n, _)| *n == spec.name).expect("names checked above");
        let ValueType::Tensor { ty: elem, shape, .. } = ty else {
            return Err(LoadError::new(path, format!("{kind} `{}` is not a tensor", spec.name)));
        };
        if *elem != spec.ty {
            return Err(LoadError::new(path, format!("{kind} `{}` has element type {elem:?}, expected {:?}", spec.name, spec.ty)));
        }
        if shape.len() != spec.dims.len() {
            return Err(LoadError::new(path, format!("{kind} `{}` has rank {}, expected {}", spec.name, shape.len(), spec.dims.len())));
        }
        for (axis, (got, want)) in shape.iter().zip(&spec.dims).enumerate() {
            if let Dim::Fixed(n) = want
                && *got != *n
            {
                let shown = if *got < 0 { "dynamic".to_string() } else { got.to_string() };
                return Err(LoadError::new(
                    path,
                    format!("{kind} `{}` axis {axis} is {shown}, expected {n} (hidden size mismatch?)", spec.name),
                ));
            }
        }
    }
    Ok(())
}
