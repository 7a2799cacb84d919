//! Device-resident copies of the adapter banks (issue 12 item 2), for the IoBinding runner
//! (`bound.rs`). Every bank tensor of `BankStore` has a mirror allocated once on the execution
//! device (GPU memory under CUDA, ONNX Runtime's CPU allocator on the CPU provider, so CPU CI runs
//! the same code). The host arrays stay the source of truth: before a batch, only the rows a
//! registration or removal touched since the last batch are copied down ([`TouchedRows`], kept by
//! the store); a resize, a shrink (rows move) or a new width re-uploads that tensor whole into a
//! new allocation, and the bindings are renewed. Writes never wait for the device: they land in the
//! host banks as before and reach the mirrors at the next batch, under the store lock the engine
//! holds for that batch anyway, so no batch sees half a row.

use std::collections::{BTreeSet, HashMap};

use ndarray::Array3;
use ort::memory::{AllocationDevice, Allocator, MemoryInfo};
use ort::value::{PrimitiveTensorElementType, Shape, Tensor, TensorRefMut};

/// Rows of a store written or cleared since the mirrors last read them; `all` after a resize,
/// a shrink (rows moved) or when too many rows changed to be worth tracking one by one.
#[derive(Debug, Default)]
pub struct TouchedRows {
    all: bool,
    rows: BTreeSet<usize>,
}

/// Beyond this many single rows, one whole upload per tensor is cheaper to track.
const MAX_TRACKED_ROWS: usize = 4096;

impl TouchedRows {
    /// Row `row` of every bank tensor changed.
    pub fn mark(&mut self, row: usize) {
        if !self.all {
            self.rows.insert(row);
            if self.rows.len() > MAX_TRACKED_ROWS {
                self.everything();
            }
        }
    }

    /// Rows moved or tensors were reallocated: every mirror is uploaded whole.
    pub fn everything(&mut self) {
        self.all = true;
        self.rows.clear();
    }

    pub fn take(&mut self) -> Self {
        std::mem::take(self)
    }

    /// Maximal runs `[start, end)` of touched rows below `rows`.
    fn ranges(&self, rows: usize) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for &r in self.rows.range(..rows) {
            match out.last_mut() {
                Some((_, end)) if *end == r => *end = r + 1,
                _ => out.push((r, r + 1)),
            }
        }
        out
    }
}

/// One mirrored tensor and the generation of its allocation (a binding holding an older
/// generation must be renewed).
struct Mirrored {
    tensor: Tensor<f32>,
    shape: [usize; 3],
    generation: u64,
}

/// The device copies of one backbone's bank tensors, keyed by (layer, graph input name).
pub struct BankMirror {
    allocator: Allocator,
    memory: MemoryInfo<'static>,
    tensors: HashMap<(usize, &'static str), Mirrored>,
    next_generation: u64,
    /// Bytes copied to the device by the last [`BankMirror::sync`] (tests and logs).
    pub last_upload_bytes: usize,
}

impl std::fmt::Debug for BankMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BankMirror").field("tensors", &self.tensors.len()).finish()
    }
}

impl BankMirror {
    /// Mirrors allocated with `allocator`, whose memory is described by `memory`.
    pub fn new(allocator: Allocator, memory: MemoryInfo<'static>) -> Self {
        Self { allocator, memory, tensors: HashMap::new(), next_generation: 1, last_upload_bytes: 0 }
    }

    /// Brings the mirror of `host` up to date: the touched rows, or everything after a reshape
    /// (new allocation, new generation). Call once per tensor per batch, with the batch's rows.
    pub fn sync(&mut self, key: (usize, &'static str), host: &Array3<f32>, touched: &TouchedRows) -> ort::Result<()> {
        let (n, a, b) = host.dim();
        let shape = [n, a, b];
        let host = host.as_slice().ok_or_else(|| ort::Error::new(format!("bank tensor {key:?} is not in standard layout")))?;
        let fresh = self.tensors.get(&key).is_none_or(|m| m.shape != shape);
        if fresh {
            let tensor = Tensor::<f32>::new(&self.allocator, shape.map(|d| d as i64))?;
            let generation = self.next_generation;
            self.next_generation += 1;
            self.tensors.insert(key, Mirrored { tensor, shape, generation });
        }
        let row = a * b;
        let ranges = if fresh || touched.all { vec![(0, n)] } else { touched.ranges(n) };
        let mirrored = self.tensors.get_mut(&key).expect("inserted above");
        for (start, end) in ranges {
            let (from, len) = (start * row, (end - start) * row);
            upload(&self.memory, &mut mirrored.tensor, host.len(), from, &host[from..from + len])?;
            self.last_upload_bytes += 4 * len;
        }
        Ok(())
    }

    /// The mirror of `key` and its generation.
    pub fn get(&self, key: (usize, &'static str)) -> Option<(&Tensor<f32>, u64)> {
        self.tensors.get(&key).map(|m| (&m.tensor, m.generation))
    }

    /// The device allocator the mirrors (and the runner's buffers) come from.
    pub fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    /// Where the mirrors live.
    pub fn memory(&self) -> &MemoryInfo<'static> {
        &self.memory
    }
}

/// Copies `src` into `dst` (`len` elements) starting at element `offset`: a plain copy in host
/// memory, else one ONNX Runtime host-to-device copy into a view of the device tensor.
pub(super) fn upload<T: PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static>(
    memory: &MemoryInfo<'static>,
    dst: &mut Tensor<T>,
    len: usize,
    offset: usize,
    src: &[T],
) -> ort::Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    assert!(offset + src.len() <= len, "bank row copy within the mirror");
    let base = dst.data_ptr_mut().cast::<T>();
    if memory.allocation_device() == AllocationDevice::CPU {
        // SAFETY: `base` points to `len` f32 of host memory owned by `dst` (checked bounds above);
        // `src` is a different allocation (the host bank), so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), base.add(offset), src.len()) };
        return Ok(());
    }
    // Device memory: ONNX Runtime copies an *owned* host tensor into a view of the mirror. Owned,
    // because ort 2.0.0-rc.15 deep-copies a borrowed tensor bound where it could alias, through
    // its identity session, which then binds the same borrowed tensor again under its own
    // (non-reentrant) lock and spins forever (see `bound.rs`).
    let src = Tensor::from_array(([src.len()], src.to_vec()))?;
    // SAFETY: the view lies inside `dst`'s allocation (offset + len within its shape, as the host
    // tensor has the same shape) and is dropped before this function returns.
    let view = unsafe { TensorRefMut::<T>::from_raw(memory.clone(), base.add(offset).cast(), Shape::new([src.shape()[0]]))? };
    src.copy_into(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_rows_merge_into_runs_and_give_way_to_a_whole_upload() {
        let mut t = TouchedRows::default();
        for r in [7, 3, 4, 5, 9, 12] {
            t.mark(r);
        }
        assert_eq!(t.ranges(10), vec![(3, 6), (7, 8), (9, 10)], "runs below the bank's rows only");
        let taken = t.take();
        assert!(!taken.all && t.rows.is_empty(), "taking leaves nothing behind");
        t.everything();
        t.mark(1);
        assert!(t.all && t.rows.is_empty());
        let mut many = TouchedRows::default();
        (0..=MAX_TRACKED_ROWS).for_each(|r| many.mark(r));
        assert!(many.all, "beyond {MAX_TRACKED_ROWS} rows one whole upload is tracked instead");
    }
}
