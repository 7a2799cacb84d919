//! The bank path in process (issue 12): tasks with AdapterHub weights in the adapter banks run
//! through one `layer.onnx` per layer. Checked against an independent reference (the backbone's
//! segment graphs with the slot rule computed on the host), mixed in one batch with per-task and
//! fusion tasks, with banks that grow, shrink and reuse rows while batches run.

mod common;

use std::sync::Arc;

use adapterdrop_serve::config::RuntimeSettings;
use adapterdrop_serve::engine::banked::execute_banked_as;
use adapterdrop_serve::engine::heads::to_matrix;
use adapterdrop_serve::engine::{ExecStats, Lane, Sequence, execute, run_lanes};
use adapterdrop_serve::repository::adapterhub::{Activation, AdapterWeights, Residual};
use adapterdrop_serve::repository::{Backbone, Location, Registry, Task};
use adapterdrop_serve::runtime::{Graph, Runtime};
use common::banks::{bank_task, lane, max_diff, rules, seqs, weights};
use common::{ort_library, test_repo};
use ndarray::{Array2, Array3, s};
use ort::value::TensorRef;

/// The suites' tolerance for served logits.
const TOL: f32 = 1e-4;

struct Fixture {
    rt: &'static Runtime,
    reg: Registry,
}

/// One ONNX Runtime per process; each test its own registry, so its own backbone and banks.
fn fixture() -> Fixture {
    static RT: std::sync::OnceLock<Runtime> = std::sync::OnceLock::new();
    let rt = RT.get_or_init(|| {
        Runtime::init(&RuntimeSettings { library_path: Some(ort_library()), intra_threads: 1, ..Default::default() }).unwrap()
    });
    let reg = Registry::open(rt, &test_repo()).unwrap();
    Fixture { rt, reg }
}

fn run3(g: &Graph, inputs: Vec<(&'static str, ort::session::SessionInputValue<'_>)>, out: &'static str) -> Array3<f32> {
    g.run(inputs, |o| Ok(o[out].try_extract_array::<f32>()?.to_owned())).unwrap().into_dimensionality().unwrap()
}

fn input(a: &Array3<f32>) -> ort::session::SessionInputValue<'_> {
    TensorRef::from_array_view(a.view()).unwrap().into()
}

fn erf(x: f64) -> f64 {
    // Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7), enough for a 1e-4 logit tolerance.
    let t = 1.0 / (1.0 + 0.3275911 * x.abs());
    let y = 1.0 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * (-x * x).exp();
    if x >= 0.0 { y } else { -y }
}

fn act(a: Activation, v: f32) -> f32 {
    let sig = |v: f32| 1.0 / (1.0 + (-v).exp());
    match a {
        Activation::Relu => v.max(0.0),
        Activation::Silu => v * sig(v),
        Activation::Gelu => (0.5 * f64::from(v) * (1.0 + erf(f64::from(v) / std::f64::consts::SQRT_2))) as f32,
        Activation::Tanh => v.tanh(),
        Activation::Sigmoid => sig(v),
    }
}

/// One lane the slow way: segments and plain slots in ONNX Runtime, adapters on the host
/// (`LN(v)` is the plain slot on `(v, 0)`), the head on the host.
fn reference(bb: &Backbone, seqs: &[Sequence], w: &AdapterWeights, drop_first: usize) -> Array2<f32> {
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap();
    let mut ids = Array2::<i64>::zeros((seqs.len(), t));
    let mut mask = Array2::<i64>::zeros((seqs.len(), t));
    for (r, sq) in seqs.iter().enumerate() {
        for (j, id) in sq.ids.iter().enumerate() {
            ids[[r, j]] = *id;
            mask[[r, j]] = 1;
        }
    }
    let types = Array2::<i64>::zeros(ids.raw_dim());
    let mut x = run3(
        &bb.embeddings,
        vec![
            ("input_ids", TensorRef::from_array_view(ids.view()).unwrap().into()),
            ("token_type_ids", TensorRef::from_array_view(types.view()).unwrap().into()),
        ],
        "hidden",
    );
    for (layer, g) in bb.layers.iter().enumerate() {
        for loc in [Location::Attention, Location::Ffn] {
            let h = match loc {
                Location::Attention => run3(
                    &g.attention,
                    vec![("hidden", input(&x)), ("attention_mask", TensorRef::from_array_view(mask.view()).unwrap().into())],
                    "h",
                ),
                Location::Ffn => run3(&g.ffn, vec![("hidden", input(&x))], "h"),
            };
            let plain = g.plain_slot(loc);
            let zeros = Array3::<f32>::zeros(x.raw_dim());
            let ln = |v: &Array3<f32>| run3(plain, vec![("h", input(v)), ("x", input(&zeros))], "y");
            x = match w.slots.get(&(layer, loc)).filter(|_| layer >= drop_first) {
                None => run3(plain, vec![("h", input(&h)), ("x", input(&x))], "y"),
                Some(bw) => {
                    let r = &w.rule;
                    let sum = &h + &x;
                    let u = if r.ln_before { ln(&sum) } else { h.clone() };
                    let (n, tt, hd) = u.dim();
                    let flat = u.to_shape((n * tt, hd)).unwrap().to_owned();
                    let mut z = flat.dot(&bw.down_w.t()) + &bw.down_b;
                    z.mapv_inplace(|v| act(r.activation, v));
                    let up = (z.dot(&bw.up_w.t()) + &bw.up_b) * r.scaling;
                    let up = up.into_shape_with_order((n, tt, hd)).unwrap();
                    let res = match r.residual {
                        Residual::H => h.clone(),
                        Residual::U => u.clone(),
                        Residual::HPlusX => sum.clone(),
                    };
                    let out = up + res;
                    if r.ln_after { ln(&(&out + &x)) } else { out }
                }
            };
        }
    }
    let first: Array2<f32> = x.slice(s![.., 0, ..]).to_owned();
    let [l1, l2] = &w.head.layers[..] else { panic!("{}: the trained heads have two layers", w.name) };
    let z = (first.dot(&l1.w.t()) + &l1.b).mapv(|v: f32| v.tanh());
    z.dot(&l2.w.t()) + &l2.b
}

#[test]
fn bank_lanes_equal_the_reference_in_one_layer_run_per_layer() {
    let f = fixture();
    let bb = f.reg.resolve("rand-houlsby", None).unwrap().backbone.clone();
    let seqs = seqs();
    let tasks: Vec<(Arc<Task>, AdapterWeights)> = rules()
        .into_iter()
        .enumerate()
        .map(|(i, (r, width, locs))| {
            let w = weights(&bb, i as u64, r, width, locs, 2 + i % 2);
            (bank_task(f.rt, &f.reg, w.clone()), w)
        })
        .collect();
    // Lane i of task i at drop depth i % 4, on overlapping rows.
    let lanes: Vec<Lane> =
        tasks.iter().enumerate().map(|(i, (t, _))| lane(t, (i % 4) as u32, if i % 2 == 0 { &[0, 1, 2] } else { &[2, 0] })).collect();
    let (out, stats) = run_lanes(&bb, &seqs, &lanes, true).unwrap();
    assert_eq!(stats.bank_lanes, lanes.len());
    assert_eq!(stats.graph_runs, 1 + bb.num_layers(), "embeddings + one run per layer, heads on the host");
    assert!(stats.graph_runs <= bb.num_layers() + 4);
    for (i, ((_, w), l)) in tasks.iter().zip(&lanes).enumerate() {
        let sub: Vec<Sequence> = l.rows.iter().map(|&r| seqs[r].clone()).collect();
        let want = reference(&bb, &sub, w, i % 4);
        let d = max_diff(&out[i], &want);
        assert!(d <= TOL, "lane {i} ({:?}): bank path vs reference differ by {d:e}", w.rule);
    }
}

#[test]
fn one_batch_mixes_bank_per_task_and_fusion_lanes() {
    let f = fixture();
    // A task without bank rows (as one exported without AdapterHub files) and a fusion task.
    let bb = f.reg.resolve("rand-pfeiffer", None).unwrap().backbone.clone();
    let mut plain = Task::load(f.rt, &test_repo().join("tasks/rand-pfeiffer/1"), bb.clone()).unwrap();
    plain.bank = None;
    let per_task = Arc::new(plain);
    let fusion = f.reg.resolve("fusion-static", None).unwrap();
    assert!(fusion.bank.is_none(), "fusion tasks never take banks");
    let (r0, w0, l0) = rules()[1];
    let w = weights(&bb, 40, r0, w0, l0, 3);
    let bank = bank_task(f.rt, &f.reg, w.clone());
    let seqs = seqs();
    let lanes = vec![lane(&per_task, 1, &[0, 1]), lane(&bank, 0, &[1, 2]), lane(&fusion, 0, &[2, 0]), lane(&bank, 2, &[0])];
    let (out, stats) = run_lanes(&bb, &seqs, &lanes, true).unwrap();
    assert_eq!(stats.bank_lanes, 2);
    for (i, l) in lanes.iter().enumerate() {
        let want = if l.task.bank.is_some() {
            let sub: Vec<Sequence> = l.rows.iter().map(|&r| seqs[r].clone()).collect();
            reference(&bb, &sub, &w, if i == 1 { 0 } else { 2 })
        } else {
            to_matrix(&execute(&bb, &seqs, std::slice::from_ref(l)).unwrap().0.remove(0))
        };
        let d = max_diff(&out[i], &want);
        assert!(d <= 1e-5 || (l.task.bank.is_some() && d <= TOL), "lane {i} differs by {d:e}");
    }
    // The fusion lane's weights come back at its own lane index.
    assert!(stats.fusion.get(2).is_some_and(|f| !f.is_empty()), "{:?}", stats.fusion.len());
    // engine.banks = false: the same bank task runs on its per-task graphs (the real rand-houlsby).
    let (off, s) = run_lanes(&bb, &seqs, &lanes[1..2], false).unwrap();
    assert_eq!(s.bank_lanes, 0);
    let want = execute(&bb, &seqs, &[lane(&f.reg.resolve("rand-houlsby", None).unwrap(), 0, &[1, 2])]).unwrap().0.remove(0);
    assert!(max_diff(&off[0], &to_matrix(&want)) <= 1e-6);
}

fn check(bb: &Backbone, seqs: &[Sequence], live: &[(Arc<Task>, AdapterWeights)]) -> ExecStats {
    let lanes: Vec<Lane> = live.iter().enumerate().map(|(i, (t, _))| lane(t, (i % 3) as u32, &[i % seqs.len()])).collect();
    let (out, stats) = run_lanes(bb, seqs, &lanes, true).unwrap();
    for (i, (_, w)) in live.iter().enumerate() {
        let want = reference(bb, &seqs[i % seqs.len()..i % seqs.len() + 1], w, i % 3);
        let d = max_diff(&out[i], &want);
        assert!(d <= TOL, "task {i} of {}: {d:e}", live.len());
    }
    stats
}

#[test]
fn banks_grow_and_shrink_between_batches_and_reuse_freed_rows() {
    let f = fixture();
    let bb = f.reg.resolve("rand-houlsby", None).unwrap().backbone.clone();
    let seqs = seqs();
    let banked = bb.banked.as_ref().unwrap();
    let start = banked.banks.store().capacity();
    let base = banked.banks.store().used(); // the repository's own tiny-random tasks
    let mut live: Vec<(Arc<Task>, AdapterWeights)> = Vec::new();
    // Register one task at a time, a batch of every live task after each (traffic between writes).
    for i in 0..24 {
        let (r, width, locs) = rules()[i % 5];
        let w = weights(&bb, 100 + i as u64, r, width + i % 3, locs, 2);
        live.push((bank_task(f.rt, &f.reg, w.clone()), w));
        if i % 4 == 3 {
            check(&bb, &seqs, &live);
        }
    }
    let grown = banked.banks.store().capacity();
    assert!(grown > start && grown >= base + 25, "capacity {start} -> {grown}");
    // A draining version keeps its rows while a job holds it: drop the registry's side only.
    let held = live[5].0.clone();
    let held_row = banked.banks.store().index(held.bank.as_ref().unwrap().rows.id(), 1, Location::Ffn);
    // Remove most tasks; survivors keep their results through the compaction.
    let survivors: Vec<(Arc<Task>, AdapterWeights)> = live.drain(..).enumerate().filter(|(i, _)| i % 6 == 0).map(|(_, t)| t).collect();
    live = survivors;
    check(&bb, &seqs, &live);
    let store = banked.banks.store();
    assert_eq!(store.used(), base + live.len() + 1, "the held task keeps its rows");
    assert!(store.capacity() < grown / 2, "capacity {grown} -> {} after removing most tasks", store.capacity());
    assert!(store.index(held.bank.as_ref().unwrap().rows.id(), 1, Location::Ffn) > 0, "held row {held_row} kept (maybe moved)");
    drop(store);
    // Its last holder done, the held version's rows go too.
    let held_id = held.bank.as_ref().unwrap().rows.id();
    drop(held);
    check(&bb, &seqs, &live);
    let store = banked.banks.store();
    assert_eq!(store.used(), base + live.len());
    assert!(!store.contains(held_id));
}

#[test]
fn a_removed_tasks_rows_are_zeroed_and_reused_by_a_new_task() {
    let f = fixture();
    let bb = f.reg.resolve("rand-houlsby", None).unwrap().backbone.clone();
    let seqs = seqs();
    let banked = bb.banked.as_ref().unwrap();
    let mk = |seed: u64, k: usize| {
        let (r, width, locs) = rules()[k];
        let w = weights(&bb, seed, r, width, locs, 2);
        (bank_task(f.rt, &f.reg, w.clone()), w)
    };
    let (a, b) = (mk(1, 1), mk(2, 0));
    check(&bb, &seqs, &[a.clone(), b.clone()]);
    let row_a = banked.banks.store().index(a.0.bank.as_ref().unwrap().rows.id(), 0, Location::Attention);
    let capacity = banked.banks.store().capacity();
    drop(a);
    check(&bb, &seqs, std::slice::from_ref(&b));
    let c = mk(3, 3);
    check(&bb, &seqs, &[c.clone(), b.clone()]);
    let store = banked.banks.store();
    assert_eq!(store.index(c.0.bank.as_ref().unwrap().rows.id(), 0, Location::Attention), row_a, "the freed row is reused");
    assert_eq!(store.capacity(), capacity);
}

/// Packed tokens (issue 15): rows of 1 token up to the backbone's maximum, several tasks, drop
/// depths and a plain row (every layer dropped) in one batch; each result equals the same input
/// served alone within 1e-5, and the padded layout (`engine.packing = false`) agrees within 1e-5.
#[test]
fn mixed_lengths_in_one_batch_equal_each_input_served_alone() {
    let f = fixture();
    let bb = f.reg.resolve("rand-houlsby", None).unwrap().backbone.clone();
    let (max, vocab) = (bb.manifest.max_positions, bb.manifest.vocab_size as i64);
    let seqs: Vec<Sequence> = [1, 2, max, 9, max - 1, 17]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let ids: Vec<i64> = (0..n).map(|j| 1 + (i as i64 * 31 + j as i64 * 7) % (vocab - 1)).collect();
            Sequence { mask: vec![1; n], types: vec![0; n], ids }
        })
        .collect();
    let tasks: Vec<Arc<Task>> = rules()
        .into_iter()
        .take(3)
        .enumerate()
        .map(|(i, (r, w, l))| bank_task(f.rt, &f.reg, weights(&bb, 60 + i as u64, r, w, l, 2)))
        .collect();
    let plain_depth = bb.num_layers() as u32;
    let lanes = vec![
        lane(&tasks[0], 0, &[0, 2, 4]),
        lane(&tasks[1], 2, &[1, 2, 3]),
        lane(&tasks[2], 1, &[5, 4, 0]),
        lane(&tasks[0], plain_depth, &[3, 5]),
        lane(&tasks[1], 0, &[2]),
    ];
    let (packed, ps) = execute_banked_as(&bb, &seqs, &lanes, true).unwrap();
    let (padded, ds) = execute_banked_as(&bb, &seqs, &lanes, false).unwrap();
    // Token accounting: packed per-token work computes exactly the real tokens; padded computes
    // every row at the longest length; attention alone holds the padding of packed batches.
    let rows: usize = ps.layer_rows.iter().sum();
    assert_eq!((ps.real_tokens, ps.computed_tokens), (ds.real_tokens, ps.real_tokens));
    assert_eq!(ds.computed_tokens, rows * max);
    assert_eq!(ps.attention_tokens, rows * max);
    assert!(ps.computed_tokens < ds.computed_tokens, "{ps:?}");
    for (l, lane) in lanes.iter().enumerate() {
        assert!(max_diff(&packed[l], &to_matrix(&padded[l])) <= 1e-5, "lane {l}: packed vs padded");
        for (k, &r) in lane.rows.iter().enumerate() {
            let alone = Lane { task: lane.task.clone(), active: lane.active.clone(), rows: vec![0] };
            let (want, _) = execute_banked_as(&bb, &seqs[r..r + 1], &[alone], true).unwrap();
            let d = max_diff(&packed[l][k..k + 1], &to_matrix(&want[0]));
            assert!(d <= 1e-5, "lane {l}, input {r} ({} tokens): batch vs alone differ by {d:e}", seqs[r].ids.len());
        }
    }
}

/// A backbone whose layer graphs have another signature (as those exported before packed tokens)
/// fails to load with a message that names the file and the tool that regenerates it.
#[test]
fn layer_graphs_of_another_signature_name_the_tool_that_regenerates_them() {
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let bb = dir.path().join("tiny-random");
    common::copy_dir(&test_repo().join("backbones/tiny-random"), &bb);
    std::fs::copy(bb.join("layers/1/attention.onnx"), bb.join("layers/1/layer.onnx")).unwrap();
    let e = Backbone::load(f.rt, &bb).unwrap_err().to_string();
    assert!(e.contains("layers/1/layer.onnx") && e.contains("tools/export_backbone.py"), "{e}");
}
