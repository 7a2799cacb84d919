//! Adapter banks (issue 12): the bottleneck weights of every bank task of one backbone, stacked per
//! (layer, slot location) into the tensors `layer.onnx` takes as inputs, with the slot rule as a
//! flag row (`models/README.md`, "Layer graphs"). Row 0 of every bank is "no adapter".
//!
//! The engine thread owns the stored tensors while it runs a batch: registration sends `Write` and
//! the last drop of a task's [`BankRows`] handle sends `Free` over a channel; they are applied right
//! away when no batch holds the store, else by the engine before its next batch. A draining
//! version keeps its rows until its last in-flight job is done, and a batch never waits for a
//! registration except for one that began applying just before it. Rows come from a free list; the banks grow by at most
//! 1.25x (exactly to size when many writes arrive at once, or for the rows reserved at start-up)
//! and shrink, compacting rows, when fewer than half are used. A task keeps one row number in every bank of its backbone;
//! widths are per bank (the widest bottleneck written there), so a Pfeiffer-only repository's
//! attention banks stay one unit wide.
//!
//! `Stack` (MAD-X): every (layer, location) also has a *stack* bank, same rows, holding the lower
//! adapter of a stacked task (its rule with `ln_after` off: the library passes that adapter's output
//! on before the LayerNorm); an all-zero row there (every other task, and freed rows) passes the
//! states through, and `layer.onnx` skips the step for batches without stack rows.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use ndarray::s;

use super::banks_methods::{MethodBank, MethodStore};
pub use super::slot_bank::Bank;
use crate::repository::Location;
use crate::repository::adapterhub::lora::LayerMethods;
use crate::repository::adapterhub::{BottleneckWeights, RULE_FLAGS, SlotRule};

/// Rule row of bank row 0: LN before (unused: the weights are zero), LN after, residual `h`,
/// scale 0, relu: `y = LN(h + x)`, the plain slot, bit for bit.
pub const PLAIN_RULE: [f32; RULE_FLAGS] = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0];
/// Capacity (rows, row 0 included) the banks never shrink below.
const MIN_ROWS: usize = 8;
/// Largest growth step.
const GROWTH: f64 = 1.25;

pub const LOCATIONS: [Location; 2] = [Location::Attention, Location::Ffn];

pub fn slot_of(location: Location) -> usize {
    match location {
        Location::Attention => 0,
        Location::Ffn => 1,
    }
}

/// Index of a location's stack bank in a layer's banks (after the two main ones).
fn stack_slot_of(location: Location) -> usize {
    2 + slot_of(location)
}

/// The banks of one layer: attention, ffn, then their stack banks (`stack_slot_of`).
type LayerBanks = [Bank; 4];

fn layer_banks(hidden: usize) -> LayerBanks {
    let stack = || {
        let mut b = Bank::new(MIN_ROWS, hidden, 1);
        b.clear(0); // row 0 passes through: no rule flags at all
        b
    };
    [Bank::new(MIN_ROWS, hidden, 1), Bank::new(MIN_ROWS, hidden, 1), stack(), stack()]
}

/// What registration hands the banks: the rule and the bottleneck weights of one task version,
/// or its LoRA / (IA)^3 weights per layer (`banks_methods.rs`), and the lower adapter of a `Stack`.
#[derive(Debug)]
pub struct BankWrite {
    pub rule: SlotRule,
    pub slots: BTreeMap<(usize, Location), BottleneckWeights>,
    pub methods: BTreeMap<usize, LayerMethods>,
    pub stack: Option<StackWrite>,
}

/// The lower adapter of a `Stack(lower, task)`: its rule (written with `ln_after` off) and its
/// weights, at slots where the task adapter has weights too (it runs on the task's bank row).
#[derive(Debug)]
pub struct StackWrite {
    pub rule: SlotRule,
    pub slots: BTreeMap<(usize, Location), BottleneckWeights>,
}

enum BankOp {
    Write { id: u64, write: Box<BankWrite> },
    Free(u64),
}

/// A task version's rows in its backbone's banks; dropping the last clone frees them.
#[derive(Debug)]
pub struct BankRows {
    id: u64,
    tx: Mutex<Sender<BankOp>>,
    store: Weak<Mutex<BankStore>>,
}

impl BankRows {
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for BankRows {
    fn drop(&mut self) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        // The engine may be gone at shutdown; nothing to free then.
        let _ = tx.send(BankOp::Free(self.id));
        drop(tx);
        apply_if_idle(&self.store);
    }
}

/// The banks of one backbone: the registration side (any thread) and the store (engine thread).
#[derive(Debug)]
pub struct BackboneBanks {
    tx: Mutex<Sender<BankOp>>,
    next_id: AtomicU64,
    store: Arc<Mutex<BankStore>>,
}

/// Applies queued writes and frees now unless a batch (or another registration) holds the store
/// (the holder applies them before its next batch then), so registration churn without traffic
/// does not pile up.
fn apply_if_idle(store: &Weak<Mutex<BankStore>>) {
    if let Some(store) = store.upgrade()
        && let Ok(mut s) = store.try_lock()
    {
        s.apply_pending();
    }
}

impl BackboneBanks {
    /// Banks for `layers` layers of width `hidden` with FFN size `ffn`.
    pub fn new(layers: usize, hidden: usize, ffn: usize) -> Self {
        let (tx, rx) = channel();
        Self { tx: Mutex::new(tx), next_id: AtomicU64::new(1), store: Arc::new(Mutex::new(BankStore::new(rx, layers, hidden, ffn))) }
    }

    /// Queues a task version's weights for the banks; the engine writes them before its next batch.
    pub fn register(&self, write: BankWrite) -> Arc<BankRows> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let _ = tx.send(BankOp::Write { id, write: Box::new(write) });
        let store = Arc::downgrade(&self.store);
        apply_if_idle(&store);
        Arc::new(BankRows { id, tx: Mutex::new(tx), store })
    }

    /// Makes room for `rows` more tasks in one exact-size step now, and keeps it (no shrinking)
    /// until `reserve(0)`: start-up reserves a row for every task version found on disk, so each
    /// is written into its row as soon as it is loaded (its parsed weights freed at once, never
    /// queued all together beside the banks) and the banks are never copied to grow.
    pub fn reserve(&self, rows: usize) {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.apply_pending();
        store.reserve(rows);
    }

    /// The store with every queued write and free applied (the engine calls this per batch).
    pub fn store(&self) -> MutexGuard<'_, BankStore> {
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        store.apply_pending();
        store
    }
}

/// The bank tensors and the row map, owned by the engine thread.
#[derive(Debug)]
pub struct BankStore {
    rx: Receiver<BankOp>,
    hidden: usize,
    /// `banks[layer][slot_of(location)]`, stack banks at `stack_slot_of(location)`.
    banks: Vec<LayerBanks>,
    /// LoRA / (IA)^3, with rows for the tasks that have such weights only.
    methods: MethodStore,
    /// Task handle id -> (its row, the slots it has weights for).
    rows: HashMap<u64, (usize, Vec<(usize, Location)>)>,
    /// Unused rows (> 0), lowest last.
    free: Vec<usize>,
    /// Writes of tasks dropped before the engine applied them are skipped.
    freed_early: Vec<u64>,
    /// Rows promised by [`BackboneBanks::reserve`] and not yet written: kept free, not shrunk.
    reserved: usize,
    /// Bytes copied so far by resizes ([`Self::resize_bytes`]).
    resize_bytes: u64,
    /// Rows changed since the device mirrors last read them (`runtime::device_banks`).
    touched: crate::runtime::TouchedRows,
}

impl BankStore {
    fn new(rx: Receiver<BankOp>, layers: usize, hidden: usize, ffn: usize) -> Self {
        let banks = (0..layers).map(|_| layer_banks(hidden)).collect();
        let methods = MethodStore::new(layers, hidden, ffn);
        Self {
            rx,
            hidden,
            banks,
            methods,
            rows: HashMap::new(),
            free: (1..MIN_ROWS).rev().collect(),
            freed_early: Vec::new(),
            reserved: 0,
            resize_bytes: 0,
            touched: Default::default(),
        }
    }

    pub fn bank(&self, layer: usize, location: Location) -> &Bank {
        &self.banks[layer][slot_of(location)]
    }

    /// The stack bank of one slot (indexed by the same rows as [`Self::bank`]).
    pub fn stack_bank(&self, layer: usize, location: Location) -> &Bank {
        &self.banks[layer][stack_slot_of(location)]
    }

    pub fn methods(&self, layer: usize) -> &MethodBank {
        self.methods.bank(layer)
    }

    /// The methods-bank row of a task at one layer; 0 where it has no LoRA / (IA)^3 there.
    pub fn method_index(&self, id: u64, layer: usize) -> u32 {
        self.methods.index(id, layer)
    }

    /// Rows per bank (row 0 included).
    pub fn capacity(&self) -> usize {
        self.banks.first().map_or(0, |b| b[0].rows())
    }

    /// Task rows in use.
    pub fn used(&self) -> usize {
        self.rows.len()
    }

    pub fn bytes(&self) -> usize {
        self.banks.iter().flat_map(|b| b.iter()).map(Bank::bytes).sum::<usize>() + self.methods.bytes()
    }

    /// The bank row of a task at one slot; 0 where it has no adapter (or was never written).
    pub fn index(&self, id: u64, layer: usize, location: Location) -> u32 {
        match self.rows.get(&id) {
            Some((row, slots)) if slots.contains(&(layer, location)) => *row as u32,
            _ => 0,
        }
    }

    pub fn contains(&self, id: u64) -> bool {
        self.rows.contains_key(&id)
    }

    /// The rows changed since the last call (bottleneck banks, methods banks), for the device
    /// mirrors of the IoBinding runner (`runtime::bound`).
    pub fn take_touched(&mut self) -> (crate::runtime::TouchedRows, crate::runtime::TouchedRows) {
        (self.touched.take(), self.methods.touched.take())
    }

    /// Bytes copied by every resize so far (growth, shrinking, widening): growth by a constant
    /// factor keeps this within a constant multiple of the banks' size, however many tasks were
    /// registered one at a time (tested; a per-registration resize would make it quadratic).
    pub fn resize_bytes(&self) -> u64 {
        self.resize_bytes
    }

    fn reserve(&mut self, rows: usize) {
        let capacity = self.capacity();
        self.reserved = rows;
        let need = rows.saturating_sub(self.free.len());
        if need > 0 {
            self.resize(capacity + need);
        } else {
            // A released reservation (tasks that failed to load) may leave the banks half empty.
            self.maybe_shrink();
        }
        if self.capacity() != capacity {
            crate::runtime::trim_heap();
        }
    }

    fn apply_pending(&mut self) {
        let ops: Vec<BankOp> = self.rx.try_iter().collect();
        if ops.is_empty() {
            return;
        }
        let capacity = self.capacity();
        // Frees first (their rows are reused by the writes), then grow once for all writes.
        let mut writes = Vec::new();
        for op in ops {
            match op {
                BankOp::Free(id) => self.free_rows(id),
                BankOp::Write { id, write } => writes.push((id, write)),
            }
        }
        writes.retain(|(id, _)| !self.freed_early.contains(id));
        self.freed_early.clear();
        let need = writes.len().saturating_sub(self.free.len());
        if need > 0 {
            let cap = self.capacity();
            let grown = if writes.len() > 1 { cap + need } else { ((cap as f64 * GROWTH).ceil() as usize).max(cap + need) };
            self.resize(grown);
        }
        self.reserved = self.reserved.saturating_sub(writes.len());
        for (id, w) in writes {
            self.write(id, &w);
        }
        self.maybe_shrink();
        if self.capacity() != capacity {
            // The old bank tensors (and, at start-up, every queued write's weights) were just
            // freed: below glibc's mmap threshold (raised up to 32 MiB by earlier frees) they stay
            // resident in the heap, never reused by the next, larger bank (docs/benchmarks.md,
            // "10,000 tasks per replica").
            crate::runtime::trim_heap();
        }
    }

    fn write(&mut self, id: u64, w: &BankWrite) {
        let row = self.free.pop().expect("grown for every write");
        self.touched.mark(row);
        let flags = w.rule.flags();
        let lower = w.stack.as_ref().map(|s| (SlotRule { ln_after: false, ..s.rule }.flags(), &s.slots));
        let writes = w.slots.iter().map(|(k, v)| (slot_of(k.1), k.0, &flags, v));
        let stacked = lower.iter().flat_map(|(f, slots)| slots.iter().map(move |(k, v)| (stack_slot_of(k.1), k.0, f, v)));
        // Rows [0, in_use) hold every task row: a widened bank copies only those, so rows
        // reserved at start-up and the growth margin stay untouched zero pages (copying them would
        // make them resident: 10,000 reserved rows on a backbone whose first task widens its banks).
        let mut in_use = None;
        for (slot, layer, flags, weights) in writes.chain(stacked) {
            let Some(banks) = self.banks.get_mut(layer) else { continue };
            let bank = &mut banks[slot];
            if weights.width() > bank.width() {
                let keep = *in_use.get_or_insert_with(|| self.rows.values().map(|(r, _)| r + 1).max().unwrap_or(1).max(row + 1));
                self.resize_bytes += (bank.bytes() / bank.rows() * keep) as u64;
                *bank = bank.resized(bank.rows(), weights.width(), keep);
            }
            bank.write(row, flags, weights);
        }
        self.methods.write(id, &w.methods);
        self.rows.insert(id, (row, w.slots.keys().copied().collect()));
    }

    fn free_rows(&mut self, id: u64) {
        self.methods.free(id);
        let Some((row, _)) = self.rows.remove(&id) else {
            self.freed_early.push(id);
            return;
        };
        self.touched.mark(row);
        for pair in &mut self.banks {
            for bank in pair.iter_mut() {
                bank.clear(row);
            }
        }
        self.free.push(row);
        self.free.sort_unstable_by(|a, b| b.cmp(a));
    }

    fn resize(&mut self, rows: usize) {
        self.touched.everything();
        let keep = self.capacity().min(rows);
        for pair in &mut self.banks {
            for bank in pair.iter_mut() {
                self.resize_bytes += (bank.bytes() / bank.rows() * keep) as u64;
                *bank = bank.resized(rows, bank.width(), keep);
            }
        }
        let old = keep;
        self.free.retain(|&r| r < rows);
        self.free.extend(old..rows);
        self.free.sort_unstable_by(|a, b| b.cmp(a));
    }

    /// Below half use: move the highest rows down into free ones, drop the top, and narrow banks
    /// whose widest bottleneck left.
    fn maybe_shrink(&mut self) {
        let cap = self.capacity();
        let live = self.used() + 1 + self.reserved;
        if cap <= MIN_ROWS || live * 2 > cap {
            return;
        }
        let target = ((live as f64 * GROWTH).ceil() as usize).max(MIN_ROWS);
        self.touched.everything();
        let mut moves = Vec::new();
        let mut ids: Vec<u64> = self.rows.iter().filter(|(_, (r, _))| *r >= target).map(|(id, _)| *id).collect();
        ids.sort_unstable();
        self.free.retain(|&r| r < target);
        self.free.sort_unstable_by(|a, b| b.cmp(a));
        for id in ids {
            let to = self.free.pop().expect("live rows fit below the target");
            let entry = self.rows.get_mut(&id).expect("listed above");
            moves.push((entry.0, to));
            entry.0 = to;
        }
        for pair in &mut self.banks {
            for bank in pair.iter_mut() {
                for &(from, to) in &moves {
                    bank.move_row(from, to);
                }
            }
        }

        let mut widths = vec![[1usize; 4]; self.banks.len()];
        for (layer, pair) in self.banks.iter().enumerate() {
            for (slot, bank) in pair.iter().enumerate() {
                // Columns beyond the last nonzero one of any live row can go.
                let nonzero = |c: usize| {
                    bank.down_w.slice(s![..target, .., c]).iter().chain(bank.down_b.slice(s![..target, .., c])).any(|v| *v != 0.0)
                        || bank.up_w.slice(s![..target, c, ..]).iter().any(|v| *v != 0.0)
                };
                let used = (0..bank.width()).rev().find(|&c| nonzero(c));
                widths[layer][slot] = used.map_or(1, |c| c + 1);
            }
        }
        for (pair, w) in self.banks.iter_mut().zip(widths) {
            for (bank, width) in pair.iter_mut().zip(w) {
                self.resize_bytes += (bank.bytes() / bank.rows() * target) as u64;
                *bank = bank.resized(target, width, target);
            }
        }
        tracing::debug!(from = cap, to = target, moved = moves.len(), "adapter banks shrunk");
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }
}

#[cfg(test)]
#[path = "banks_tests.rs"]
mod tests;
