//! In-process engine checks for AdapterFusion sharing: identical adapter graph files are loaded once,
//! and an adapter used by several fusions on the same rows runs once (counted by `ExecStats`).

mod common;

use std::sync::Arc;

use adapterdrop_serve::config::RuntimeSettings;
use adapterdrop_serve::engine::heads::to_matrix;
use adapterdrop_serve::engine::{Lane, Sequence, execute};
use adapterdrop_serve::repository::{Location, Registry};
use adapterdrop_serve::runtime::Runtime;
use common::{ort_library, test_repo};

#[test]
fn fusions_share_loaded_adapters_and_run_each_adapter_once_per_row_set() {
    let rt = Runtime::init(&RuntimeSettings { library_path: Some(ort_library()), intra_threads: 1, ..Default::default() }).unwrap();
    let reg = Registry::open(&rt, &test_repo()).unwrap();
    let (full, pruned) = (reg.resolve("fusion", None).unwrap(), reg.resolve("fusion-pruned", None).unwrap());
    // Loaded once: the pruned task's fa/fc graphs and fusion graph are the full task's objects.
    for layer in 0..2 {
        let (f, p) = (&full.fusion[&(layer, Location::Ffn)], &pruned.fusion[&(layer, Location::Ffn)]);
        assert!(Arc::ptr_eq(&f.graph, &p.graph), "layer {layer}: one fusion graph");
        assert_eq!(p.adapter_names(), ["fa", "fc"]);
        assert!(Arc::ptr_eq(&f.adapters[0].graph, &p.adapters[0].graph) && Arc::ptr_eq(&f.adapters[2].graph, &p.adapters[1].graph));
    }
    let seqs: Vec<Sequence> = [vec![101i64, 2023, 3185, 102], vec![101, 7592, 102]]
        .into_iter()
        .map(|ids| Sequence { mask: vec![1; ids.len()], types: vec![0; ids.len()], ids })
        .collect();
    let lane = |t: &Arc<adapterdrop_serve::repository::Task>, n| Lane {
        task: t.clone(),
        active: t.active_layers(Some(n)).unwrap(),
        rows: vec![0, 1],
    };
    let bb = full.backbone.clone();
    let (both, stats) = execute(&bb, &seqs, &[lane(&full, 0), lane(&pruned, 0)]).unwrap();
    // Layer 0: fa, fb, fc once on the 2 shared rows (6), not 3 + 2 per row (10). Layer 1: the rows
    // have split, so full runs 3 x 2 and pruned 2 x 2 (10). Saved: 4.
    assert_eq!((stats.fusion_adapter_rows, stats.fusion_adapter_rows_saved), (16, 4));
    assert_eq!(stats.fusion.len(), 2);
    assert_eq!(stats.fusion[1].iter().map(|w| w.adapters.len()).collect::<Vec<_>>(), [2, 2]);
    for (i, t) in [&full, &pruned].into_iter().enumerate() {
        let (alone, s) = execute(&bb, &seqs, &[lane(t, 0)]).unwrap();
        assert_eq!(s.fusion_adapter_rows_saved, 0);
        let d = (&to_matrix(&alone[0]) - &to_matrix(&both[i])).iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(d <= 1e-5, "task {i}: shared vs alone differ by {d:e}");
        assert_eq!(s.fusion[0], stats.fusion[i]);
    }
    // Both fusions dropped in layer 0: they share the plain layer, then share adapters in layer 1.
    let (_, s) = execute(&bb, &seqs, &[lane(&full, 1), lane(&pruned, 1)]).unwrap();
    assert_eq!((s.fusion_adapter_rows, s.fusion_adapter_rows_saved), (6, 4));
    assert_eq!(s.layer_rows, [2, 2]);

    // A plain task over fa declaring fa's output graph (the same file bytes) shares it too.
    let plain = reg.resolve("fa-plain", None).unwrap();
    assert!(Arc::ptr_eq(&plain.up[&(0, Location::Ffn)], &full.fusion[&(0, Location::Ffn)].adapters[0].graph));
    let (both, s) = execute(&bb, &seqs, &[lane(&plain, 0), lane(&full, 0)]).unwrap();
    // Layer 0: fa, fb, fc on the 2 shared rows (6 runs; fa-plain's 2 saved). Layer 1: the rows have
    // split; fa runs once over all 4 rows, fb and fc on the fusion's 2 (8 runs, none saved).
    assert_eq!((s.fusion_adapter_rows, s.fusion_adapter_rows_saved), (14, 2));
    assert_eq!(s.fusion.len(), 2);
    assert!(s.fusion[0].is_empty(), "the plain task has no fusion weights");
    for (i, t) in [&plain, &full].into_iter().enumerate() {
        let (alone, a) = execute(&bb, &seqs, &[lane(t, 0)]).unwrap();
        let d = (&to_matrix(&alone[0]) - &to_matrix(&both[i])).iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(d <= 1e-5, "task {i}: shared vs alone differ by {d:e}");
        assert_eq!(a.fusion_adapter_rows_saved, 0);
    }
}
