//! CUDA graphs for the bank path's layer runs (issue 12 item 6; `runtime.cuda_graphs`).
//!
//! ONNX Runtime replays a captured CUDA graph with the device addresses and shapes it was captured
//! with, so a layer session may only replay for a batch whose inputs have the same shapes and sit
//! at the same addresses. This module gives each (layer, shape signature) its own fixed device
//! buffers for the per-batch inputs (the token maps and the mask: one copy per layer per batch into
//! them) and its own `gpu_graph_id`; bank mirrors and the runner's ping-pong buffers already keep
//! their addresses between reallocations, and any reallocation invalidates every capture (new ids).
//! Tokens and rows are bucketed before this (`bound::pad_to_bucket`: rows padded to a power-of-two
//! length; `row_buckets.rs`: each stage's rows padded to a power of two, one slot group per row), so
//! a layer's signature is (rows in, rows after the attention slot, rows out, token bucket) whatever
//! the batch's tasks and lengths; the layer graphs are the capturable ones (`layer_capturable.onnx`,
//! no `If`, so the branch taken is never frozen into a capture).
//!
//! On the CPU provider the same staging runs without `gpu_graph_id` (in-process tests only: the
//! setting itself is refused on any provider but CUDA), so CI checks the fixed-address bookkeeping
//! for exactness; the capture itself can only run on a GPU (`make gpu-check`).

use std::collections::HashMap;

use ort::AsPointer;
use ort::session::{IoBinding, RunOptions, SessionInputValue};
use ort::value::{Shape, Tensor, TensorElementType, TensorRefMut, ValueType};

use super::bound::{Slot, bind_raw};
use super::device_banks::{BankMirror, upload};

/// Captured graphs per layer session at most; further signatures run uncaptured (id -1).
const MAX_CAPTURES_PER_LAYER: usize = 16;

/// Graph ids handed out in all, reallocations included: ONNX Runtime cannot drop one captured
/// graph, so those of invalidated ids stay in memory; past this, batches run uncaptured.
const MAX_GRAPH_IDS: i64 = 1024;

/// One (layer, signature): fixed input buffers and the graph id replaying them.
struct Capture {
    ints: Tensor<i64>,
    floats: Tensor<f32>,
    options: RunOptions,
}

/// Fixed-address staging and graph ids for every layer session of one backbone.
pub(super) struct Captures {
    /// Set `gpu_graph_id` (CUDA); off on the CPU provider (staging only, for tests).
    graph_ids: bool,
    /// Layers share one stream: runs but the last skip the device synchronisation.
    one_stream: bool,
    layers: Vec<HashMap<Vec<i64>, Capture>>,
    /// Ids are never reused: a replay with an id captured before a reallocation would read freed memory.
    next_id: i64,
}

impl Captures {
    pub(super) fn new(layers: usize, graph_ids: bool, one_stream: bool) -> Self {
        Self { graph_ids, one_stream, layers: (0..layers).map(|_| HashMap::new()).collect(), next_id: 1 }
    }

    /// Signatures staged, summed over layers.
    pub(super) fn len(&self) -> usize {
        self.layers.iter().map(HashMap::len).sum()
    }

    /// Every capture is stale (a bank mirror or a layer buffer was reallocated).
    pub(super) fn invalidate(&mut self) {
        self.layers.iter_mut().for_each(HashMap::clear);
    }

    /// Copies `inputs` (host tensors, int64 or f32) into the fixed buffers of their signature at
    /// `layer` (`extra`: other shapes the capture depends on, e.g. the output's), binds views of
    /// them on `binding`, and returns the run options replaying the signature's graph.
    pub(super) fn stage(
        &mut self,
        mirror: &BankMirror,
        binding: &mut IoBinding,
        layer: usize,
        inputs: &[(&'static str, SessionInputValue<'_>)],
        extra: &[i64],
        last: bool,
    ) -> ort::Result<&RunOptions> {
        let mut signature: Vec<i64> = extra.to_vec();
        let (mut ints, mut floats): (Vec<i64>, Vec<f32>) = (Vec::new(), Vec::new());
        let mut layout = Vec::with_capacity(inputs.len());
        for (name, value) in inputs {
            let ValueType::Tensor { ty, shape, .. } = value.dtype() else {
                return Err(ort::Error::new(format!("input `{name}` is not a tensor")));
            };
            signature.push(shape.len() as i64);
            signature.extend(shape.iter());
            match ty {
                TensorElementType::Int64 => {
                    layout.push((*name, true, ints.len(), shape.clone()));
                    ints.extend_from_slice(value.try_extract_tensor::<i64>()?.1);
                }
                TensorElementType::Float32 => {
                    layout.push((*name, false, floats.len(), shape.clone()));
                    floats.extend_from_slice(value.try_extract_tensor::<f32>()?.1);
                }
                other => return Err(ort::Error::new(format!("input `{name}` has element type {other:?}"))),
            }
        }
        let (allocator, memory) = (mirror.allocator(), mirror.memory());
        let captures = &mut self.layers[layer];
        if !captures.contains_key(&signature) {
            let mut options = RunOptions::new()?;
            if self.graph_ids {
                // -1: ONNX Runtime neither captures nor replays (past the per-layer bound).
                let id = if captures.len() < MAX_CAPTURES_PER_LAYER && self.next_id <= MAX_GRAPH_IDS { self.next_id } else { -1 };
                options.set("gpu_graph_id", id.to_string())?;
                if id > 0 {
                    self.next_id += 1;
                }
                if !last && self.one_stream {
                    // One stream, no host synchronisation until the batch's last layer.
                    options.disable_device_sync()?;
                }
            }
            let capture = Capture {
                ints: Tensor::new(allocator, [ints.len().max(1) as i64])?,
                floats: Tensor::new(allocator, [floats.len().max(1) as i64])?,
                options,
            };
            captures.insert(signature.clone(), capture);
        }
        let capture = captures.get_mut(&signature).expect("inserted above");
        let (ni, nf) = (ints.len().max(1), floats.len().max(1));
        upload(memory, &mut capture.ints, ni, 0, &ints)?;
        upload(memory, &mut capture.floats, nf, 0, &floats)?;
        let (pi, pf) = (capture.ints.data_ptr_mut().cast::<i64>(), capture.floats.data_ptr_mut().cast::<f32>());
        for (name, int, offset, shape) in layout {
            let dims = Shape::new(shape.iter().copied());
            // SAFETY: each view lies inside its buffer (offsets and lengths come from the same
            // concatenation); the buffers live in `self` until invalidated, which happens only
            // between batches, and every run rebinds its per-batch inputs first.
            unsafe {
                if int {
                    let view = TensorRefMut::<i64>::from_raw(memory.clone(), pi.add(offset).cast(), dims)?;
                    bind_raw(binding, name, view.ptr(), Slot::Input)?;
                } else {
                    let view = TensorRefMut::<f32>::from_raw(memory.clone(), pf.add(offset).cast(), dims)?;
                    bind_raw(binding, name, view.ptr(), Slot::Input)?;
                }
            }
        }
        Ok(&capture.options)
    }
}
