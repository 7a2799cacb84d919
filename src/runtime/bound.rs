//! The IoBinding runner of the bank path's layer runs (issue 12 items 1 and 6; `runtime.io_binding`).
//!
//! One `IoBinding` per `layer.onnx` session, kept across batches. The bank tensors are bound once
//! from their device mirrors (`device_banks.rs`) and rebound only when a mirror is reallocated;
//! per batch only `hidden`, the mask and the token maps are bound. Each layer writes `y` into one
//! of two preallocated ping-pong buffers on the execution device (grown by bucket, never per
//! batch), which the next layer reads in place: no copy to the host between layers. The last layer
//! writes straight into a host array, so the batch synchronises once, at its end: under CUDA every
//! session shares one stream (`cuda_stream.rs`) and every earlier run skips ONNX Runtime's
//! end-of-run device synchronisation (`disable_device_sync`). Without a shared stream (the CUDA
//! runtime library not found) each layer synchronises, as separate streams would race.
//!
//! Why values are bound through the C API and not `IoBinding::bind_input`: ort 2.0.0-rc.15 treats
//! a borrowed tensor (an ndarray view, or a view of a device buffer) bound where ONNX Runtime
//! could alias it as something to deep-copy, through a shared identity session that binds the
//! same borrowed tensor again under its own non-reentrant spin lock: the copy never returns. That
//! was the hang of the first attempt (2026-11-30: the first Infer with `runtime.io_binding` on a
//! CPU server never answered). ONNX Runtime's `BindInput` itself only keeps a reference to the
//! value; this runner keeps every buffer a binding points at alive for as long as it is bound and
//! rebinds every per-batch input before each run.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Mutex, MutexGuard};

use ndarray::{Array2, Array3};
use ort::AsPointer;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, RunOptions, SessionInputValue};
use ort::value::{Shape, Tensor, TensorRefMut};

use super::device_banks::BankMirror;
use super::graph_capture::Captures;
use super::{Device, Graph};
use crate::engine::banks::BankStore;
use crate::repository::Location;
use crate::repository::backbone::{BANK_INPUTS, METHOD_INPUTS};

/// Smallest ping-pong buffer, in tokens; larger ones are the next power of two.
const MIN_BUCKET_TOKENS: usize = 256;

/// The bank-path runner of one backbone's layer graphs; state is built on the first batch.
pub struct BoundLayers {
    device: Device,
    hidden: usize,
    /// `runtime.cuda_graphs`: per-batch inputs staged at fixed addresses (`graph_capture.rs`).
    capture: bool,
    /// Every layer session runs on one CUDA stream, so layers need no synchronisation between them.
    one_stream: bool,
    state: Mutex<Option<State>>,
}

impl std::fmt::Debug for BoundLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundLayers").field("device", &self.device).finish()
    }
}

struct State {
    mirror: BankMirror,
    layers: Vec<LayerBinding>,
    /// `[capacity, H]` each: layer `i` writes buffer `i % 2` and reads buffer `(i - 1) % 2`.
    buffers: Option<[Tensor<f32>; 2]>,
    capacity: usize,
    sync: RunOptions,
    nosync: RunOptions,
    captures: Option<Captures>,
}

struct LayerBinding {
    binding: IoBinding,
    /// The mirror generation each bank input is bound to.
    banks: HashMap<&'static str, u64>,
}

impl BoundLayers {
    /// `capture`: stage per-batch inputs at fixed addresses and, under CUDA, replay captured
    /// graphs (`runtime.cuda_graphs`).
    pub fn new(device: Device, hidden: usize, capture: bool, one_stream: bool) -> Self {
        Self { device, hidden, capture, one_stream, state: Mutex::new(None) }
    }

    /// Starts a batch: brings the bank mirrors up to date (the rows touched since the last batch),
    /// renews the bindings of reallocated mirrors and makes room for `most_tokens` tokens. On any
    /// error the runner starts afresh on the next batch (every mirror uploaded whole).
    pub fn begin<'a>(&'a self, graphs: &'a [Graph], store: &mut BankStore, most_tokens: usize) -> ort::Result<BoundBatch<'a>> {
        // A batch that panicked may have left the mirrors half written: start afresh then.
        let mut guard = self.state.lock().unwrap_or_else(|p| {
            let mut g = p.into_inner();
            *g = None;
            self.state.clear_poison();
            g
        });
        let (banks, methods) = store.take_touched();
        let prepared = (|| {
            if guard.is_none() {
                *guard = Some(State::new(self.device, graphs, self.capture, self.one_stream)?);
            }
            let state = guard.as_mut().expect("created above");
            state.mirror.last_upload_bytes = 0;
            let mut moved = false;
            for (layer, lb) in state.layers.iter_mut().enumerate() {
                for (name, host, is_method) in bank_tensors(store, layer) {
                    state.mirror.sync((layer, name), host, if is_method { &methods } else { &banks })?;
                    let (tensor, generation) = state.mirror.get((layer, name)).expect("synced above");
                    if lb.banks.get(name) != Some(&generation) {
                        // SAFETY: the mirror owns the tensor's ONNX Runtime allocation; the binding
                        // keeps its own reference to the value, so the memory lives while bound.
                        unsafe { bind_raw(&mut lb.binding, name, tensor.ptr(), Slot::Input)? };
                        lb.banks.insert(name, generation);
                        moved = true;
                    }
                }
            }
            moved |= state.reserve(most_tokens, self.hidden)?;
            if let (true, Some(c)) = (moved, state.captures.as_mut()) {
                c.invalidate();
            }
            Ok(())
        })();
        if let Err(e) = prepared {
            *guard = None;
            return Err(e);
        }
        Ok(BoundBatch { state: guard, graphs, device: self.device, hidden: self.hidden, previous: 0 })
    }

    /// Whether batches are staged for CUDA graphs (`runtime.cuda_graphs`).
    pub fn captures(&self) -> bool {
        self.capture
    }

    /// Shape signatures staged for CUDA graphs, summed over layers (0 without `runtime.cuda_graphs`).
    pub fn signatures(&self) -> usize {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.as_ref().and_then(|s| s.captures.as_ref()).map_or(0, Captures::len)
    }

    /// Bytes the last batch copied into the bank mirrors (0 when no bank changed).
    pub fn last_upload_bytes(&self) -> usize {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map_or(0, |s| s.mirror.last_upload_bytes)
    }
}

impl State {
    fn new(device: Device, graphs: &[Graph], capture: bool, one_stream: bool) -> ort::Result<Self> {
        let (allocator, memory) = match device {
            Device::Cpu => (Allocator::default(), MemoryInfo::default()),
            Device::Cuda { device_id, .. } => {
                let memory = MemoryInfo::new(AllocationDevice::CUDA, device_id, AllocatorType::Device, MemoryType::Default)?;
                let first = graphs.first().ok_or_else(|| ort::Error::new("a backbone without layer graphs"))?;
                let allocator = Allocator::new(&first.lock_session(), memory.clone())?;
                (allocator, memory)
            }
        };
        let mirror = BankMirror::new(allocator, memory);
        let layers = graphs
            .iter()
            .map(|g| Ok(LayerBinding { binding: g.lock_session().create_binding()?, banks: HashMap::new() }))
            .collect::<ort::Result<_>>()?;
        let mut nosync = RunOptions::new()?;
        if one_stream {
            nosync.disable_device_sync()?;
        }
        let captures = capture.then(|| Captures::new(graphs.len(), device != Device::Cpu, one_stream));
        Ok(Self { mirror, layers, buffers: None, capacity: 0, sync: RunOptions::new()?, nosync, captures })
    }

    /// Ping-pong buffers for at least `tokens` tokens (the next power of two, reallocated only to
    /// grow); true when they were (re)allocated.
    fn reserve(&mut self, tokens: usize, hidden: usize) -> ort::Result<bool> {
        if self.buffers.is_some() && self.capacity >= tokens {
            return Ok(false);
        }
        let capacity = tokens.next_power_of_two().max(MIN_BUCKET_TOKENS);
        let shape = [capacity as i64, hidden as i64];
        let allocator = self.mirror.allocator();
        self.buffers = Some([Tensor::new(allocator, shape)?, Tensor::new(allocator, shape)?]);
        self.capacity = capacity;
        Ok(true)
    }
}

/// One batch on the runner; holds the runner (one batch at a time per backbone).
pub struct BoundBatch<'a> {
    state: MutexGuard<'a, Option<State>>,
    graphs: &'a [Graph],
    device: Device,
    hidden: usize,
    /// Tokens the previous layer wrote.
    previous: usize,
}

impl BoundBatch<'_> {
    /// Runs layer `layer` with the per-batch `inputs` (`hidden` only for layer 0: later layers read
    /// the previous layer's buffer). It writes `out_tokens` tokens: into a device buffer, or, for
    /// the `last` layer, into the host array returned (the batch's one synchronisation).
    pub fn run(
        &mut self,
        layer: usize,
        inputs: Vec<(&'static str, SessionInputValue<'_>)>,
        out_tokens: usize,
        last: bool,
    ) -> ort::Result<Option<Array2<f32>>> {
        let State { mirror, layers, buffers, capacity, sync, nosync, captures } =
            self.state.as_mut().expect("a batch holds a prepared runner");
        let memory = mirror.memory().clone();
        let (capacity, hidden) = (*capacity, self.hidden);
        let bufs = buffers.as_mut().expect("reserved by begin");
        let lb = &mut layers[layer];
        let mut options = if last { &*sync } else { &*nosync };
        let capturing = captures.is_some();
        match captures.as_mut() {
            Some(c) => {
                let extra = [layer as i64, out_tokens as i64, self.previous as i64, i64::from(last)];
                options = c.stage(mirror, &mut lb.binding, layer, &inputs, &extra, last)?;
            }
            None => {
                for (name, value) in &inputs {
                    // SAFETY: `inputs` outlives the run below, and the next batch rebinds every
                    // per-batch name before it runs, so no stale pointer is ever read.
                    unsafe { bind_raw(&mut lb.binding, name, value.ptr(), Slot::Input)? };
                }
            }
        }
        if layer > 0 {
            let view = buffer_view(&memory, &mut bufs[(layer - 1) % 2], self.previous, capacity, hidden)?;
            // SAFETY: the buffer stays allocated while the runner holds it (until reallocated by
            // `reserve`, which happens only between batches; the binding is renewed every layer).
            unsafe { bind_raw(&mut lb.binding, "hidden", view.ptr(), Slot::Input)? };
        }
        // The last layer writes the host array directly (the batch's one synchronisation), except
        // under capture, where every output must be device memory at a fixed address.
        let mut host = None;
        if last && !capturing {
            let mut out = Array2::<f32>::zeros((out_tokens, hidden));
            let view = TensorRefMut::from_array_view_mut(out.view_mut())?;
            // SAFETY: `out`'s heap buffer does not move when `out` is moved below; it is returned
            // after the run, and the next batch rebinds `y` before running.
            unsafe { bind_raw(&mut lb.binding, "y", view.ptr(), Slot::Output)? };
            drop(view);
            host = Some(out);
        } else {
            let view = buffer_view(&memory, &mut bufs[layer % 2], out_tokens, capacity, hidden)?;
            // SAFETY: as for `hidden` above.
            unsafe { bind_raw(&mut lb.binding, "y", view.ptr(), Slot::Output)? };
        }
        let shrink = super::graph::take_shrink_request();
        let shrink_options = if shrink && self.device == Device::Cpu {
            let mut o = RunOptions::new()?;
            o.set("memory.enable_memory_arena_shrinkage", "cpu:0")?;
            Some(o)
        } else {
            None
        };
        let options = shrink_options.as_ref().unwrap_or(options);
        let mut session = self.graphs[layer].lock_session();
        super::count_run();
        session.run_binding_with_options(&lb.binding, options)?;
        drop(session);
        drop(inputs);
        self.previous = out_tokens;
        if last && host.is_none() {
            host = Some(download(&mut bufs[layer % 2], out_tokens, hidden)?);
        }
        if shrink && last {
            // A batch over the memory budget gives its buffers back, as the arena does.
            *buffers = None;
            if let Some(c) = captures.as_mut() {
                c.invalidate();
            }
        }
        Ok(host)
    }
}

/// The first `tokens` rows of a `[capacity, H]` buffer on the host (read in place in host memory,
/// else one device-to-host copy of the buffer, an owned tensor, so ort's copy takes no detour).
fn download(buffer: &mut Tensor<f32>, tokens: usize, hidden: usize) -> ort::Result<Array2<f32>> {
    let rows = |a: ndarray::ArrayViewD<'_, f32>| -> ort::Result<Array2<f32>> {
        let a = a.into_dimensionality::<ndarray::Ix2>().map_err(|e| ort::Error::new(format!("layer buffer: {e}")))?;
        Ok(a.slice(ndarray::s![..tokens, ..hidden]).to_owned())
    };
    if buffer.memory_info().allocation_device() == AllocationDevice::CPU {
        return rows(buffer.extract_array());
    }
    let host = buffer.to(AllocationDevice::CPU, 0)?;
    rows(host.extract_array())
}

/// Smallest token bucket of a captured batch; larger ones are powers of two, capped at the backbone's
/// positions.
const MIN_BUCKET_SEQ: usize = 16;

/// The padded ids, token types and mask widened to the batch's token bucket (pad id, type 0, mask
/// 0: masked like any padding), and `false` for packing: under CUDA graphs every row runs at the
/// bucket's length, so a batch's shapes depend on its rows and tasks, not on its lengths.
pub fn pad_to_bucket(
    ids: Array2<i64>,
    types: Array2<i64>,
    mask: Array2<i64>,
    pad_id: i64,
    max_positions: usize,
) -> (Array2<i64>, Array2<i64>, Array2<i64>, bool) {
    let (rows, t) = ids.dim();
    let bucket = t.next_power_of_two().max(MIN_BUCKET_SEQ).min(max_positions).max(t);
    if bucket == t {
        return (ids, types, mask, false);
    }
    let widen = |a: Array2<i64>, fill: i64| {
        let mut out = Array2::from_elem((rows, bucket), fill);
        out.slice_mut(ndarray::s![.., ..t]).assign(&a);
        out
    };
    (widen(ids, pad_id), widen(types, 0), widen(mask, 0), false)
}

/// A `[tokens, H]` view at the start of a `[capacity, H]` buffer.
fn buffer_view<'b>(
    memory: &MemoryInfo<'static>,
    buffer: &'b mut Tensor<f32>,
    tokens: usize,
    capacity: usize,
    hidden: usize,
) -> ort::Result<TensorRefMut<'b, f32>> {
    if tokens == 0 || tokens > capacity {
        return Err(ort::Error::new(format!("{tokens} tokens do not fit the layer buffers of {capacity}")));
    }
    // SAFETY: the view covers the first `tokens * hidden` of the buffer's `capacity * hidden`
    // elements, on the device `memory` describes, and borrows the buffer.
    unsafe { TensorRefMut::from_raw(memory.clone(), buffer.data_ptr_mut(), Shape::new([tokens as i64, hidden as i64])) }
}

pub(super) enum Slot {
    Input,
    Output,
}

/// `BindInput` / `BindOutput` without ort's borrowed-tensor copy (see the module docs).
///
/// # Safety
/// `value` must be a live `OrtValue` whose data stays valid for every run made while it is bound.
pub(super) unsafe fn bind_raw(binding: &mut IoBinding, name: &str, value: *const ort::sys::OrtValue, slot: Slot) -> ort::Result<()> {
    let name = CString::new(name).map_err(|_| ort::Error::new("a graph input name with a NUL byte"))?;
    let api = ort::api();
    let f = match slot {
        Slot::Input => api.BindInput,
        Slot::Output => api.BindOutput,
    };
    // SAFETY: `binding` is a live IoBinding, `name` a C string for the call's duration, `value`
    // live per this function's contract; ONNX Runtime copies the OrtValue handle it keeps.
    let status = unsafe { f(binding.ptr_mut(), name.as_ptr(), value) };
    // SAFETY: `status` was just returned by ONNX Runtime and is consumed once.
    unsafe { ort::Error::result_from_status(status) }
}

/// Every bank tensor `layer.onnx` reads at `layer`, by input name; `true` for the LoRA / (IA)^3
/// tensors, whose rows are the methods store's.
fn bank_tensors(store: &BankStore, layer: usize) -> Vec<(&'static str, &Array3<f32>, bool)> {
    let mut out = Vec::new();
    let banks = [Location::Attention, Location::Ffn].map(|l| store.bank(layer, l));
    let stacks = [Location::Attention, Location::Ffn].map(|l| store.stack_bank(layer, l));
    for (names, bank) in BANK_INPUTS.iter().zip(banks.into_iter().chain(stacks)) {
        for (name, t) in names.iter().zip([&bank.down_w, &bank.down_b, &bank.up_w, &bank.up_b, &bank.rule]) {
            out.push((*name, t, false));
        }
    }
    for (names, t) in METHOD_INPUTS.iter().zip(&store.methods(layer).targets) {
        for (name, a) in names.iter().zip([&t.lora_a, &t.lora_b, &t.scale]) {
            out.push((*name, a, true));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use ndarray::array;

    use super::pad_to_bucket;

    #[test]
    fn rows_widen_to_a_power_of_two_bucket_capped_at_the_positions_and_masked() {
        let (ids, types, mask) = (array![[101, 7, 102], [101, 102, 0]], array![[0, 0, 0], [0, 0, 0]], array![[1, 1, 1], [1, 1, 0]]);
        let (i, t, m, packed) = pad_to_bucket(ids.clone(), types.clone(), mask.clone(), 0, 512);
        assert!(!packed, "buckets use the padded layout");
        assert_eq!(i.dim(), (2, 16));
        assert_eq!(i.slice(ndarray::s![.., ..3]), ids);
        assert!(m.slice(ndarray::s![.., 3..]).iter().all(|&v| v == 0) && t.sum() == 0, "the widening is masked padding");
        assert_eq!(pad_to_bucket(ids.clone(), types.clone(), mask.clone(), 0, 8).0.ncols(), 8, "capped at the positions");
        let long = ndarray::Array2::<i64>::ones((1, 40));
        assert_eq!(pad_to_bucket(long.clone(), long.clone(), long, 0, 512).0.ncols(), 64);
    }
}
