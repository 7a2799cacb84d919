//! `runtime.io_binding = on` (`src/runtime/bound.rs`) against off, in process: the bank path run
//! through IoBinding (banks bound from device mirrors, layer outputs in preallocated buffers, one
//! synchronisation per batch) gives the same outputs as plain session runs within 1e-6, at every
//! slot rule and drop depth, packed and padded, while banks grow, shrink and reuse rows between
//! batches; a registration copies only its own rows into the mirrors. On the CPU provider the
//! mirrors and buffers live in host memory, so CI runs every line of the runner the GPU runs.
//! Under `ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER=cuda` (`make gpu-check`) every test runs on the
//! GPU, and the CUDA-graph test, skipped elsewhere with a message, captures and replays.
//! `runtime.cuda_graphs`' CPU-testable parts: the layer graph without control flow
//! (`layer_capturable.onnx`) equals the dispatched one, and row buckets (`runtime/row_buckets.rs`)
//! leave every real row's numbers as plain runs give them while batches share few signatures.

mod common;

use std::sync::{Arc, OnceLock};

use adapterdrop_serve::config::{ExecutionProvider, RuntimeSettings};
use adapterdrop_serve::engine::banked::execute_banked_as;
use adapterdrop_serve::engine::heads::to_matrix;
use adapterdrop_serve::engine::{Lane, Sequence};
use adapterdrop_serve::repository::adapterhub::AdapterWeights;
use adapterdrop_serve::repository::{Backbone, Location, Registry, Task};
use adapterdrop_serve::runtime::{Device, Runtime};
use common::banks::{bank_task, lane, max_diff, rules, seqs, weights};
use common::{ort_library, test_repo};

/// On vs off: the same graphs on the same inputs, only the way values reach them differs (on a
/// GPU, kernels may pick other algorithms between sessions' runs; CUDA graphs pad rows to a token
/// bucket, which moves results as the padded layout does, `banks_engine` 1e-5).
const TOL: f32 = 1e-6;
const TOL_GPU: f32 = 1e-5;

/// The provider of `ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER` (CPU unless `make gpu-check` says cuda).
fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        let execution_provider = std::env::var("ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER")
            .map_or(ExecutionProvider::Cpu, |p| p.parse().expect("ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER"));
        let settings = RuntimeSettings { library_path: Some(ort_library()), intra_threads: 1, execution_provider, ..Default::default() };
        Runtime::init(&settings).unwrap()
    })
}

/// One registry (own backbone, banks and runner) per setting.
struct Side {
    rt: Runtime,
    reg: Registry,
    bb: Arc<Backbone>,
}

fn side(io_binding: bool) -> Side {
    side_on(runtime().with_io_binding(io_binding))
}

fn side_on(rt: Runtime) -> Side {
    let reg = Registry::open(&rt, &test_repo()).unwrap();
    let bb = reg.resolve("rand-houlsby", None).unwrap().backbone.clone();
    assert_eq!(bb.banked.as_ref().unwrap().bound.is_some(), rt.io_binding());
    Side { rt, reg, bb }
}

impl Side {
    fn task(&self, w: &AdapterWeights) -> Arc<Task> {
        bank_task(&self.rt, &self.reg, w.clone())
    }
}

/// The lanes of `tasks` (by index) at their depths, run on both sides; outputs compared.
fn same(on: &Side, off: &Side, tasks: &[(Arc<Task>, Arc<Task>)], pick: &[(usize, u32, &[usize])], seqs: &[Sequence], packed: bool) {
    let lanes = |which: usize| -> Vec<Lane> {
        pick.iter().map(|&(t, n, rows)| lane(if which == 0 { &tasks[t].0 } else { &tasks[t].1 }, n, rows)).collect()
    };
    let (a, sa) = execute_banked_as(&on.bb, seqs, &lanes(0), packed).unwrap();
    let (b, sb) = execute_banked_as(&off.bb, seqs, &lanes(1), packed).unwrap();
    assert_eq!(sa.graph_runs, sb.graph_runs, "the runner makes the same session runs");
    assert_eq!(sa.graph_runs, 1 + on.bb.num_layers(), "embeddings + one run per layer");
    // Under CUDA graphs rows run padded to a token bucket: the packed-vs-padded tolerance.
    let tol = if on.rt.device() == Device::Cpu && !on.rt.cuda_graphs() { TOL } else { TOL_GPU };
    for (l, (x, y)) in a.iter().zip(&b).enumerate() {
        let d = max_diff(x, &to_matrix(y));
        assert!(d <= tol, "lane {l} ({:?}): io_binding on vs off differ by {d:e}", pick[l]);
    }
}

/// One task per slot rule of `rules()`, the same weights loaded on both sides; seeds from `seed`,
/// 2 labels (2 or 3 alternating with `vary_labels`).
fn task_pairs(on: &Side, off: &Side, seed: u64, vary_labels: bool) -> Vec<(Arc<Task>, Arc<Task>)> {
    rules()
        .into_iter()
        .enumerate()
        .map(|(i, (r, width, locs))| {
            let w = weights(&on.bb, seed + i as u64, r, width, locs, 2 + usize::from(vary_labels) * (i % 2));
            (on.task(&w), off.task(&w))
        })
        .collect()
}

#[test]
fn io_binding_equals_plain_runs_at_every_rule_and_drop_depth() {
    let (on, off) = (side(true), side(false));
    let tasks = task_pairs(&on, &off, 0, true);
    let plain = on.bb.num_layers() as u32;
    let pick: Vec<(usize, u32, &[usize])> =
        vec![(0, 0, &[0, 1, 2]), (1, 1, &[2, 0]), (2, 2, &[1]), (3, 3, &[0, 2]), (4, 0, &[1, 2]), (1, plain, &[0, 1, 2]), (4, 2, &[2])];
    for packed in [true, false] {
        same(&on, &off, &tasks, &pick, &seqs(), packed);
    }
    // Twice more: the bindings and buffers kept from the batch before are reused, not stale.
    same(&on, &off, &tasks, &[(0, 0, &[0, 1]), (2, 2, &[1])], &seqs()[..2], true);
    same(&on, &off, &tasks, &pick, &seqs(), true);
}

/// Bytes of one row of every bottleneck bank tensor of the backbone (what one registration or
/// removal changes while the banks keep their shape).
fn row_bytes(bb: &Backbone) -> usize {
    let store = bb.banked.as_ref().unwrap().banks.store();
    (0..bb.num_layers())
        .flat_map(|l| [Location::Attention, Location::Ffn].into_iter().flat_map(move |loc| [(l, loc, false), (l, loc, true)]))
        .map(|(l, loc, stack)| {
            let b = if stack { store.stack_bank(l, loc) } else { store.bank(l, loc) };
            b.bytes() / b.rows()
        })
        .sum()
}

#[test]
fn banks_that_grow_shrink_and_reuse_rows_under_traffic_equal_plain_runs() {
    let (on, off) = (side(true), side(false));
    let seqs = seqs();
    let bound = || on.bb.banked.as_ref().unwrap().bound.as_ref().unwrap();
    let capacity = || on.bb.banked.as_ref().unwrap().banks.store().capacity();
    let mut live: Vec<(Arc<Task>, Arc<Task>)> = Vec::new();
    let all = |n: usize| -> Vec<(usize, u32, &'static [usize])> {
        const ROWS: [&[usize]; 3] = [&[0], &[1, 2], &[2, 0]];
        (0..n).map(|i| (i, (i % 3) as u32, ROWS[i % 3])).collect()
    };
    let start = capacity();
    // One registration at a time, a batch after each: the banks grow under traffic.
    for i in 0..20 {
        let (r, width, locs) = rules()[i % 5];
        let w = weights(&on.bb, 200 + i as u64, r, width, locs, 2);
        live.push((on.task(&w), off.task(&w)));
        same(&on, &off, &live, &all(live.len()), &seqs, true);
    }
    let grown = capacity();
    assert!(grown > start, "capacity {start} -> {grown}");
    // A registration that fits the banks' shape copies its own rows into the mirrors, nothing else.
    let (r, width, locs) = rules()[1]; // the widest attention and FFN bottleneck is already there
    let w = weights(&on.bb, 999, r, width, locs, 2);
    assert!(capacity() > on.bb.banked.as_ref().unwrap().banks.store().used() + 1, "a free row is left");
    live.push((on.task(&w), off.task(&w)));
    same(&on, &off, &live, &all(live.len()), &seqs, true);
    assert_eq!(capacity(), grown, "the free row was used");
    assert_eq!(bound().last_upload_bytes(), row_bytes(&on.bb), "one row of every bottleneck bank tensor, not the banks");
    // A batch without bank changes uploads nothing.
    same(&on, &off, &live, &all(3), &seqs, true);
    assert_eq!(bound().last_upload_bytes(), 0);
    // Most tasks removed: the banks shrink (rows move); survivors answer the same.
    live = live.into_iter().enumerate().filter(|(i, _)| i % 5 == 0).map(|(_, t)| t).collect();
    same(&on, &off, &live, &all(live.len()), &seqs, true);
    assert!(capacity() < grown, "capacity {grown} -> {} after removing most tasks", capacity());
    // New tasks take the freed rows.
    for i in 0..3 {
        let (r, width, locs) = rules()[(i + 2) % 5];
        let w = weights(&on.bb, 500 + i as u64, r, width, locs, 2);
        live.push((on.task(&w), off.task(&w)));
    }
    same(&on, &off, &live, &all(live.len()), &seqs, true);
}

/// `runtime.cuda_graphs`' fixed-address staging (`src/runtime/graph_capture.rs`: per-batch inputs
/// copied into buffers kept per layer and shape signature), run on the CPU provider without the
/// capture itself: batches of a signature seen before reuse its buffers, new signatures get their
/// own, and bank changes (rows, then a reallocation) reach the runs; all equal plain runs. Rows
/// run padded to a token bucket: batches of other lengths but the same rows and tasks share a
/// signature (checked: the last batch below reuses one, with other content).
#[test]
fn inputs_staged_at_fixed_addresses_for_cuda_graphs_equal_plain_runs() {
    let (on, off) = (side_on(runtime().with_cuda_graphs(true)), side(false));
    let seqs = seqs();
    let mk = |seed: u64, k: usize| {
        let (r, width, locs) = rules()[k];
        let w = weights(&on.bb, seed, r, width, locs, 2);
        (on.task(&w), off.task(&w))
    };
    let mut tasks: Vec<(Arc<Task>, Arc<Task>)> = (0..3).map(|i| mk(300 + i as u64, i)).collect();
    let pick: Vec<(usize, u32, &[usize])> = vec![(0, 0, &[0, 1, 2]), (1, 2, &[2, 0]), (2, 1, &[1])];
    let other: Vec<(usize, u32, &[usize])> = vec![(2, 0, &[0, 2]), (0, 3, &[1])];
    for _ in 0..3 {
        same(&on, &off, &tasks, &pick, &seqs, true); // one signature, replayed
        same(&on, &off, &tasks, &other, &seqs, true); // another
    }
    let signatures = || on.bb.banked.as_ref().unwrap().bound.as_ref().unwrap().signatures();
    let staged = signatures();
    same(&on, &off, &tasks, &pick, &seqs, true);
    same(&on, &off, &tasks, &other, &seqs, true);
    assert_eq!(signatures(), staged, "repeated batches replay their signatures");
    assert!((on.bb.num_layers()..=2 * on.bb.num_layers()).contains(&staged), "{staged} signatures");
    same(&on, &off, &tasks, &pick, &seqs[..2].iter().chain(&seqs[..1]).cloned().collect::<Vec<_>>(), true);
    let shorter: Vec<Sequence> = seqs.iter().map(|s| Sequence { ids: s.ids[..2].to_vec(), mask: vec![1; 2], types: vec![0; 2] }).collect();
    let before = signatures();
    same(&on, &off, &tasks, &pick, &shorter, true); // lengths 2, 2, 2: the bucket of lengths 6, 3, 8
    assert_eq!(signatures(), before, "other lengths in the same token bucket share the signatures");
    // A new task in a free row (mirrors keep their addresses), then enough to reallocate them.
    tasks.push(mk(400, 3));
    let pick4: Vec<(usize, u32, &[usize])> = vec![(3, 0, &[0, 1]), (1, 2, &[2])];
    same(&on, &off, &tasks, &pick4, &seqs, true);
    // The same shapes with other bank rows: the signature's buffers are refilled, not reused stale.
    let swapped: Vec<(usize, u32, &[usize])> = vec![(1, 0, &[0, 1]), (3, 2, &[2])];
    same(&on, &off, &tasks, &swapped, &seqs, true);
    same(&on, &off, &tasks, &pick, &seqs, true);
    for i in 0..12 {
        tasks.push(mk(500 + i, (i % 5) as usize));
    }
    same(&on, &off, &tasks, &pick4, &seqs, true);
    same(&on, &off, &tasks, &pick, &seqs, true);
}

/// `runtime.layer_graph = "capturable"`: the layer graphs without control flow (`--capturable-layers`,
/// what CUDA graphs capture) give the dispatched graphs' numbers within 1e-6 at every slot rule and
/// drop depth, packed and padded (graph level, with LoRA, (IA)^3 and Stack rows too:
/// `tools/tests/test_layer_capturable.py`).
#[test]
fn capturable_layer_graphs_equal_the_dispatched_ones() {
    let (on, off) = (side_on(runtime().with_io_binding(false).with_capturable_layers(true)), side(false));
    let file = |s: &Side| format!("{:?}", s.bb.banked.as_ref().unwrap().layers[0]);
    assert!(file(&on).contains("layer_capturable.onnx") && file(&off).contains("layer.onnx"), "{} / {}", file(&on), file(&off));
    let tasks = task_pairs(&on, &off, 800, false);
    let plain = on.bb.num_layers() as u32;
    let pick: Vec<(usize, u32, &[usize])> =
        vec![(0, 0, &[0, 1, 2]), (1, 1, &[2, 0]), (2, 2, &[1]), (3, 3, &[0, 2]), (4, 0, &[1, 2]), (1, plain, &[0, 1, 2])];
    for packed in [true, false] {
        same(&on, &off, &tasks, &pick, &seqs(), packed);
        for (t, n) in (0..tasks.len()).flat_map(|t| (0..=plain).map(move |n| (t, n))) {
            same(&on, &off, &tasks, &[(t, n, &[0, 1, 2])], &seqs(), packed); // each rule alone, every depth
        }
    }
}

/// `len` tokens of a sequence (ids cycled from `seqs()`), all real.
fn seq_of(len: usize, k: usize) -> Sequence {
    let base = &seqs()[k % 3].ids;
    let ids: Vec<i64> = (0..len).map(|i| base[(i + k) % base.len()]).collect();
    Sequence { mask: vec![1; len], types: vec![0; len], ids }
}

/// Row buckets (`runtime/row_buckets.rs`, under `runtime.cuda_graphs`): rows padded to a power of
/// two, one slot group per row, pads on bank row 0. Every real row gets the numbers plain runs give
/// it (packed, dispatched graphs, no buckets) within 1e-5, for a stream of batches of 1 to 8 rows,
/// one task or each row its own, lengths 3 to 16: 16 batches, of 15 exact shapes (rows, groups per
/// slot) that the staging before row buckets gave a signature each, share 4 signatures per layer
/// (row buckets 1, 2, 4, 8; one token bucket). A bank reallocation still drops every capture.
#[test]
fn row_buckets_keep_every_real_row_exact_and_share_few_signatures() {
    let (on, off) = (side_on(runtime().with_cuda_graphs(true)), side(false));
    let layers = on.bb.num_layers();
    let mk = |seed: u64| {
        let (r, width, locs) = rules()[0]; // Pfeiffer at the FFN slot: rows never split
        let w = weights(&on.bb, seed, r, width, locs, 2);
        (on.task(&w), off.task(&w))
    };
    let mut tasks: Vec<(Arc<Task>, Arc<Task>)> = (0..8).map(|i| mk(900 + i)).collect();
    let signatures = || on.bb.banked.as_ref().unwrap().bound.as_ref().unwrap().signatures();
    let rows_of: Vec<Vec<usize>> = (0..8).map(|r| vec![r]).collect();
    let mut exact = std::collections::HashSet::new();
    for rows in 1..=8usize {
        let seqs: Vec<Sequence> = (0..rows).map(|r| seq_of(3 + (r * 5 + rows) % 14, r)).collect();
        let all: Vec<usize> = (0..rows).collect();
        for distinct in [false, true] {
            let pick: Vec<(usize, u32, &[usize])> =
                if distinct { (0..rows).map(|r| (r, 0, &rows_of[r][..])).collect() } else { vec![(0, 0, &all[..])] };
            same(&on, &off, &tasks, &pick, &seqs, true);
            exact.insert((rows, if distinct { rows } else { 1 }));
        }
    }
    assert_eq!(exact.len(), 15, "exact shapes of the stream");
    assert_eq!(signatures(), 4 * layers, "row buckets 1, 2, 4, 8 at every layer");
    // Enough new tasks to grow the banks: their mirrors move, so every capture is dropped; the next
    // batch stages its signature afresh and still equals plain runs.
    let capacity = || on.bb.banked.as_ref().unwrap().banks.store().capacity();
    let before = capacity();
    while capacity() == before {
        let i = tasks.len() as u64;
        tasks.push(mk(900 + i));
    }
    let seqs: Vec<Sequence> = (0..3).map(|r| seq_of(4 + 3 * r, r)).collect();
    let last = tasks.len() - 1;
    same(&on, &off, &tasks, &[(last, 0, &[0, 1]), (0, 0, &[2])], &seqs, true);
    assert_eq!(signatures(), layers, "the reallocation dropped the earlier signatures");
}

/// `runtime.layer_graph = "capturable"` on a backbone exported without `--capturable-layers` stops
/// start-up, naming the flag.
#[test]
fn capturable_layers_missing_stop_start_up_naming_the_export_flag() {
    let repo = tempfile::tempdir().unwrap();
    common::copy_dir(&test_repo().join("backbones/tiny-random"), &repo.path().join("backbones/tiny-random"));
    std::fs::create_dir_all(repo.path().join("tasks")).unwrap();
    let manifest = repo.path().join("backbones/tiny-random/backbone.json");
    let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    assert!(m.as_object_mut().unwrap().remove("capturable_layer").is_some(), "the test repository exports them");
    std::fs::write(&manifest, m.to_string()).unwrap();
    let lib = ort_library();
    let (ok, out) = common::run_to_exit(&[
        ("ORT_DYLIB_PATH", lib.to_str().unwrap()),
        ("ADAPTERDROP__REPOSITORY__PATH", repo.path().to_str().unwrap()),
        ("ADAPTERDROP__RUNTIME__LAYER_GRAPH", "capturable"),
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("--capturable-layers") && out.contains("tiny-random"), "{out}");
}

/// GPU only: `runtime.cuda_graphs` on CUDA, layer sessions built for capture and every batch's
/// inputs at fixed addresses: repeated batches of one signature replay a captured graph (ONNX
/// Runtime captures after its warm-up runs), and every batch equals plain runs. Skipped, saying
/// so, on any other provider. Where ONNX Runtime refuses capture for the layer graph (a node outside
/// the CUDA provider, control flow), the layers run uncaptured (logged) and the test says so.
#[test]
fn cuda_graphs_replay_the_same_numbers_as_plain_runs_on_the_gpu() {
    if runtime().device() == Device::Cpu {
        eprintln!(
            "SKIPPED cuda_graphs_replay_the_same_numbers_as_plain_runs_on_the_gpu: no CUDA execution provider \
             (set ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER=cuda with the onnxruntime-gpu library; `make gpu-check` does)"
        );
        return;
    }
    let (on, off) = (side_on(runtime().with_cuda_graphs(true)), side(false));
    let captured = on.bb.banked.as_ref().unwrap().layers.iter().all(|g| g.captured());
    eprintln!("cuda_graphs: layer graphs built for capture: {captured} (false: ONNX Runtime refused, see the log)");
    let seqs = seqs();
    let tasks = task_pairs(&on, &off, 700, false);
    let pick: Vec<(usize, u32, &[usize])> = vec![(0, 0, &[0, 1, 2]), (1, 2, &[2, 0]), (4, 1, &[1])];
    let swapped: Vec<(usize, u32, &[usize])> = vec![(1, 0, &[0, 1, 2]), (0, 2, &[2, 0]), (4, 1, &[1])];
    let signatures = || on.bb.banked.as_ref().unwrap().bound.as_ref().unwrap().signatures();
    same(&on, &off, &tasks, &pick, &seqs, true);
    same(&on, &off, &tasks, &swapped, &seqs, true);
    let staged = signatures();
    for _ in 0..5 {
        same(&on, &off, &tasks, &pick, &seqs, true);
        same(&on, &off, &tasks, &swapped, &seqs, true);
    }
    assert_eq!(signatures(), staged, "repeats replay the graphs captured for their signatures");
    eprintln!("cuda_graphs: {staged} (layer, signature) captures replayed");
}

/// `runtime.cuda_graphs = true` on the CPU provider stops start-up, naming the keys to change.
#[test]
fn cuda_graphs_on_the_cpu_provider_is_refused_at_start_up() {
    let lib = ort_library();
    let repo = test_repo();
    let (ok, out) = common::run_to_exit(&[
        ("ORT_DYLIB_PATH", lib.to_str().unwrap()),
        ("ADAPTERDROP__REPOSITORY__PATH", repo.to_str().unwrap()),
        ("ADAPTERDROP__RUNTIME__CUDA_GRAPHS", "true"),
    ]);
    assert!(!ok, "{out}");
    assert!(out.contains("runtime.cuda_graphs") && out.contains("runtime.execution_provider = \"cuda\""), "{out}");
}
