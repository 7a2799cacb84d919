//! In-process engine check of row grouping: lanes of different tasks and drop depths on overlapping
//! rows (as cross-request batching and fan-out produce them) split rows only where paths differ,
//! regroup them, and every lane still gets exactly what it gets alone.

mod common;

use adapterdrop_serve::config::RuntimeSettings;
use adapterdrop_serve::engine::heads::to_matrix;
use adapterdrop_serve::engine::{Lane, Sequence, execute};
use adapterdrop_serve::repository::Registry;
use adapterdrop_serve::runtime::Runtime;
use common::{ort_library, test_repo};

#[test]
fn overlapping_lanes_split_regroup_and_equal_each_lane_alone() {
    let rt = Runtime::init(&RuntimeSettings { library_path: Some(ort_library()), intra_threads: 1, ..Default::default() }).unwrap();
    let reg = Registry::open(&rt, &test_repo()).unwrap();
    let (pf, hb) = (reg.resolve("mini-pfeiffer", None).unwrap(), reg.resolve("mini-houlsby", None).unwrap());
    let seqs: Vec<Sequence> = [
        vec![101i64, 2023, 3185, 2003, 2307, 102],
        vec![101, 7592, 102],
        vec![101, 2023, 2001, 1037, 3185, 2143, 2172, 102],
        vec![101, 2053, 102],
    ]
    .into_iter()
    .map(|ids| Sequence { mask: vec![1; ids.len()], types: vec![0; ids.len()], ids })
    .collect();
    let lane = |t: &std::sync::Arc<adapterdrop_serve::repository::Task>, n: u32, rows: &[usize]| Lane {
        task: t.clone(),
        active: t.active_layers(Some(n)).unwrap(),
        rows: rows.to_vec(),
    };
    // Paths per row: 0: pf/0, hb/1; 1: pf/0, pf/3; 2: pf/0, pf/3, hb/1; 3: pf/3, hb/1, pf/0.
    let lanes = vec![lane(&pf, 0, &[0, 1, 2]), lane(&pf, 3, &[1, 2, 3]), lane(&hb, 1, &[0, 3]), lane(&hb, 1, &[2]), lane(&pf, 0, &[3])];
    let (together, stats) = execute(&pf.backbone, &seqs, &lanes).unwrap();
    // Layer 0's attention slot is plain for every lane, so layer 0 runs once per input; the rows
    // end as the 10 distinct (input, path) pairs.
    assert_eq!(stats.layer_rows.first(), Some(&4), "{:?}", stats.layer_rows);
    assert_eq!(stats.layer_rows.last(), Some(&10), "{:?}", stats.layer_rows);
    for (i, l) in lanes.iter().enumerate() {
        let (alone, _) = execute(&pf.backbone, &seqs, std::slice::from_ref(l)).unwrap();
        let (together, alone) = (to_matrix(&together[i]), to_matrix(&alone[0]));
        assert_eq!(together.dim(), alone.dim());
        let d = together.iter().zip(alone.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(d <= 1e-5, "lane {i}: batched with the others vs alone differ by {d:e}");
    }
}
