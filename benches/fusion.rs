//! AdapterFusion inference cost (AdapterDrop paper, section 5): full fusion over K adapters vs the
//! same fusion pruned to 2 vs a single-adapter task vs the plain backbone, BERT-base-shaped, timed
//! through `engine::execute` (what the server runs), configurations interleaved (ABBA), medians.
//!
//! `make bench` (or `cargo bench --bench fusion` with ORT_DYLIB_PATH set and a repository made by
//! `tools/make_bench_repo.py`, which writes `<prefix>-fusion8` and `<prefix>-fusion8-top2`).
//!
//! Environment (all optional):
//!   BENCH_REPO=build/bench-repo  BENCH_FUSION_BACKBONE=bert-base-random  BENCH_FUSION_K=8
//!   BENCH_RUNS=5  BENCH_WARMUP=1  BENCH_B=8  BENCH_T=128  BENCH_THREADS=0 (0 = one per core)
//!   BENCH_QUICK=1: B=4, T=64, RUNS=3 unless set explicitly.   BENCH_FUSION_OUT=FILE (markdown copy)

mod support;

use std::error::Error;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use adapterdrop_serve::config::RuntimeSettings;
use adapterdrop_serve::engine::{ExecStats, Lane, Sequence, execute};
use adapterdrop_serve::repository::{Registry, Task};
use adapterdrop_serve::runtime::Runtime;
use support::{env, env_usize, median, sequences};

type Res<X> = Result<X, Box<dyn Error>>;

/// One timed configuration: lanes of (task, drop depth), all on every row.
struct Config {
    label: &'static str,
    lanes: Vec<(Arc<Task>, u32)>,
}

fn run(cfg: &Config, seqs: &[Sequence]) -> Res<ExecStats> {
    let lanes: Vec<Lane> = cfg
        .lanes
        .iter()
        .map(|(t, n)| Ok(Lane { task: t.clone(), active: t.active_layers(Some(*n))?, rows: (0..seqs.len()).collect() }))
        .collect::<Res<_>>()?;
    let backbone = cfg.lanes[0].0.backbone.clone();
    Ok(execute(&backbone, seqs, &lanes)?.1)
}

fn main() -> Res<()> {
    let quick = env("BENCH_QUICK").is_some_and(|v| v != "0");
    let repo = PathBuf::from(env("BENCH_REPO").unwrap_or_else(|| "build/bench-repo".into()));
    let backbone = env("BENCH_FUSION_BACKBONE").unwrap_or_else(|| "bert-base-random".into());
    let prefix = if backbone == "minilm" { "mini-pf" } else { "base-pf" };
    let k = env_usize("BENCH_FUSION_K", 8)?;
    let runs = env_usize("BENCH_RUNS", if quick { 3 } else { 5 })?.max(1);
    let warmup = env_usize("BENCH_WARMUP", 1)?;
    let (b, t) = (env_usize("BENCH_B", if quick { 4 } else { 8 })?.max(1), env_usize("BENCH_T", if quick { 64 } else { 128 })?.max(2));
    let settings = RuntimeSettings {
        library_path: env("ORT_DYLIB_PATH").map(PathBuf::from).or_else(|| Some(PathBuf::from("build/lib/libonnxruntime.so"))),
        intra_threads: env_usize("BENCH_THREADS", 0)?,
        ..Default::default()
    };
    let rt = Runtime::init(&settings)?;
    let reg = Registry::open(&rt, &repo)?;
    let get = |name: String| reg.resolve(&name, None).map_err(|e| format!("{e} (run tools/make_bench_repo.py --out {})", repo.display()));
    let single = get(format!("{prefix}-00"))?;
    let full = get(format!("{prefix}-fusion{k}"))?;
    let top2 = get(format!("{prefix}-fusion{k}-top2"))?;
    let lib = get(format!("{prefix}-fusion{k}-lib"))?;
    let lib2 = get(format!("{prefix}-fusion{k}-lib-top2"))?;
    let layers = single.backbone.num_layers() as u32;
    let configs = [
        Config { label: "plain backbone (adapters dropped in every layer)", lanes: vec![(single.clone(), layers)] },
        Config { label: "single-adapter task (Pfeiffer, rf 16)", lanes: vec![(single.clone(), 0)] },
        Config { label: "AdapterFusion over K adapters, library-form graphs", lanes: vec![(lib.clone(), 0)] },
        Config { label: "AdapterFusion pruned to 2, library-form graphs", lanes: vec![(lib2.clone(), 0)] },
        Config { label: "AdapterFusion over K adapters, reassociated graphs (default)", lanes: vec![(full.clone(), 0)] },
        Config { label: "AdapterFusion pruned to 2, reassociated graphs", lanes: vec![(top2.clone(), 0)] },
        Config {
            label: "fan-out: full + pruned fusion (reassociated), one request (shared adapters)",
            lanes: vec![(full.clone(), 0), (top2.clone(), 0)],
        },
    ];
    let seqs = sequences(b, t, 7);
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut stats = vec![ExecStats::default(); configs.len()];
    for round in 0..warmup + runs {
        // ABBA: alternate the direction every round so drift hits every configuration alike.
        let order: Vec<usize> = if round % 2 == 0 { (0..configs.len()).collect() } else { (0..configs.len()).rev().collect() };
        for i in order {
            let t0 = Instant::now();
            stats[i] = run(&configs[i], &seqs)?;
            if round >= warmup {
                times[i].push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        eprintln!("round {}/{} done", round + 1, warmup + runs);
    }
    let med: Vec<f64> = times.iter_mut().map(|v| median(v)).collect();
    let mut md = String::new();
    let threads =
        if settings.intra_threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { settings.intra_threads };
    let _ = writeln!(
        md,
        "## fusion: {backbone}, K = {k}, ONNX Runtime {}, {threads} intra-op threads, B = {b}, T = {t}, {runs} timed rounds (median), quick = {quick}\n",
        rt.version()
    );
    let _ = writeln!(md, "| configuration | median ms | vs plain | fused-adapter rows (saved) |");
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for (i, c) in configs.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {:.2}x | {} ({}) |",
            c.label,
            med[i],
            med[i] / med[0],
            stats[i].fusion_adapter_rows,
            stats[i].fusion_adapter_rows_saved
        );
    }
    let _ = writeln!(md);
    for (form, f, p) in [("library-form", 2, 3), ("reassociated", 4, 5)] {
        let _ = writeln!(
            md,
            "- {form}: full {k}-adapter fusion vs plain {:+.0}% time (paper: +62%); pruned to 2 vs full {:.2}x faster = {:+.0}% throughput (paper: +68%); pruned vs single adapter {:+.0}% time",
            (med[f] / med[0] - 1.0) * 100.0,
            med[f] / med[p],
            (med[f] / med[p] - 1.0) * 100.0,
            (med[p] / med[1] - 1.0) * 100.0
        );
    }
    let _ = writeln!(md, "- single adapter vs plain: {:+.0}% time", (med[1] / med[0] - 1.0) * 100.0);
    let _ = writeln!(
        md,
        "- fan-out full + pruned (reassociated) in one request vs the two alone: {:.1} ms vs {:.1} ms",
        med[6],
        med[4] + med[5]
    );
    print!("{md}");
    if let Some(path) = env("BENCH_FUSION_OUT") {
        std::fs::write(&path, &md)?;
        eprintln!("written to {path}");
    }
    Ok(())
}
