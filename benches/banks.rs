//! Adapter banks vs the per-task segment path (issue 12), in process through `engine::run_lanes`,
//! on the MiniLM Pfeiffer task of the test repository (`make test-repo`): its AdapterHub weights,
//! copied with perturbed biases into as many distinct bank tasks as a case needs.
//!
//! 1. one task, n = 0: banks vs segments (ABAB, medians);
//! 2. k = 8 distinct tasks on the same rows, n = 5 vs n = 0, banks vs segments;
//! 3. 256 rows, each its own task, vs 256 rows of one task (banks);
//! 4. packed tokens vs the padded layout on real text lengths (`packing/mod.rs`; `BENCH_ONLY=packing`
//!    runs only this one, `BENCH_PACKED_BATCHES` batches per case, default 8).
//!
//! Session runs per batch are reported for each. `cargo bench --bench banks` with ORT_DYLIB_PATH
//! set. Environment (optional): BENCH_REPO=build/test-repo BENCH_RUNS=7 BENCH_B=8 BENCH_T=64
//! BENCH_ROWS=256 BENCH_ROWS_T=32 BENCH_THREADS=0; BENCH_BEFORE_REPO: a test repository exported
//! by an earlier commit's tools, whose layer graphs the one-task case also times, side by side.

mod packing;
mod support;

use std::error::Error;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use adapterdrop_serve::config::RuntimeSettings;
use adapterdrop_serve::engine::{ExecStats, Lane, Sequence, run_lanes};
use adapterdrop_serve::repository::{Registry, Task, adapterhub};
use adapterdrop_serve::runtime::Runtime;
use support::{env, env_usize, median, sequences};

type Res<X> = Result<X, Box<dyn Error + Send + Sync>>;
const TASK: &str = "mini-pfeiffer";

struct Bench {
    rt: Runtime,
    reg: Registry,
    repo: PathBuf,
}

impl Bench {
    /// A fresh bank task: the MiniLM Pfeiffer adapter with its biases shifted by `i` * 1e-3.
    fn task(&self, i: usize) -> Res<Arc<Task>> {
        let base = self.reg.resolve(TASK, None)?;
        let mut t = Task::load(&self.rt, &self.repo.join("tasks").join(TASK).join("1"), base.backbone.clone())?;
        let dir = self.repo.join("tasks").join(TASK).join("1").join("adapterhub");
        let mut w = adapterhub::load(&dir, base.backbone.num_layers(), base.backbone.manifest.hidden_size)?;
        for s in w.slots.values_mut() {
            s.down_b.mapv_inplace(|v| v + i as f32 * 1e-3);
        }
        t.attach_bank(Arc::new(w));
        Ok(Arc::new(t))
    }
}

fn time(bb: &adapterdrop_serve::repository::Backbone, seqs: &[Sequence], lanes: &[Lane], banks: bool) -> Res<(f64, ExecStats)> {
    let t0 = Instant::now();
    let (_, stats) = run_lanes(bb, seqs, lanes, banks)?;
    Ok((t0.elapsed().as_secs_f64() * 1e3, stats))
}

/// Medians of A (banks) and B over `runs` interleaved rounds after one warm-up each.
fn ab(
    bb: &adapterdrop_serve::repository::Backbone,
    seqs: &[Sequence],
    a: &[Lane],
    b: &[Lane],
    b_banks: bool,
    runs: usize,
) -> Res<(f64, f64, usize, usize)> {
    let (_, sa) = time(bb, seqs, a, true)?;
    let (_, sb) = time(bb, seqs, b, b_banks)?;
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        ta.push(time(bb, seqs, a, true)?.0);
        tb.push(time(bb, seqs, b, b_banks)?.0);
    }
    Ok((median(&mut ta), median(&mut tb), sa.graph_runs, sb.graph_runs))
}

fn main() -> Res<()> {
    let repo = PathBuf::from(env("BENCH_REPO").unwrap_or_else(|| "build/test-repo".into()));
    let runs = env_usize("BENCH_RUNS", 7)?;
    let (b, t) = (env_usize("BENCH_B", 8)?, env_usize("BENCH_T", 64)?);
    let (rows, rows_t) = (env_usize("BENCH_ROWS", 256)?, env_usize("BENCH_ROWS_T", 32)?);
    let threads = env_usize("BENCH_THREADS", 0)?;
    let rt = Runtime::init(&RuntimeSettings { intra_threads: threads, ..Default::default() })?;
    let reg = Registry::open(&rt, &repo)?;
    let bench = Bench { rt, reg, repo };
    let base = bench.reg.resolve(TASK, None)?;
    let bb = base.backbone.clone();
    let layers = bb.num_layers();
    let packed_tasks = || (0..3).map(|i| bench.task(500 + i)).collect::<Res<Vec<_>>>();
    let packed_batches = env_usize("BENCH_PACKED_BATCHES", 8)?;
    // The same task on the layer graphs of an earlier export (BENCH_BEFORE_REPO), for before/after.
    let before = match env("BENCH_BEFORE_REPO") {
        Some(dir) => {
            let repo = PathBuf::from(dir);
            let old = Bench { reg: Registry::open(&bench.rt, &repo)?, rt: bench.rt.clone(), repo };
            let task = old.task(500)?;
            Some((old.reg.resolve(TASK, None)?.backbone.clone(), task, old))
        }
        None => None,
    };
    let before = before.as_ref().map(|(bb, task, _)| (bb.as_ref(), task));
    if env("BENCH_ONLY").as_deref() == Some("packing") {
        let tasks = packed_tasks()?;
        packing::one_task_vs_fused(&bench.rt, &bb, &tasks[0], before, runs, (b, t))?;
        return packing::packed_vs_padded(&bb, &tasks, runs, packed_batches);
    }
    println!("## Adapter banks vs per-task segments (MiniLM, L = {layers}, CPU, {threads} threads (0 = cores), medians of {runs})\n");
    println!("| case | banks ms | segments ms | ratio | session runs (banks / segments) |\n|---|---|---|---|---|");

    let seqs = sequences(b, t, 7);
    let all: Vec<usize> = (0..b).collect();
    let one = bench.task(0)?;
    let lane = |task: &Arc<Task>, n: u32, rows: &[usize]| -> Res<Lane> {
        Ok(Lane { task: task.clone(), active: task.active_layers(Some(n))?, rows: rows.to_vec() })
    };
    let (a, s, ra, rs) = ab(&bb, &seqs, &[lane(&one, 0, &all)?], &[lane(&base, 0, &all)?], false, runs)?;
    println!("| one task, n = 0, B = {b}, T = {t} | {a:.1} | {s:.1} | {:.3} | {ra} / {rs} |", a / s);

    let eight: Vec<Arc<Task>> = (1..=8).map(|i| bench.task(i)).collect::<Res<_>>()?;
    for n in [0u32, 5] {
        let lanes: Vec<Lane> = eight.iter().map(|t| lane(t, n, &all)).collect::<Res<_>>()?;
        let (a, s, ra, rs) = ab(&bb, &seqs, &lanes, &lanes, false, runs)?;
        println!("| k = 8 tasks, n = {n}, B = {b}, T = {t} | {a:.1} | {s:.1} | {:.3} | {ra} / {rs} |", a / s);
    }

    let loaded = Instant::now();
    let many: Vec<Arc<Task>> = (0..rows).map(|i| bench.task(100 + i)).collect::<Res<_>>()?;
    let load_s = loaded.elapsed().as_secs_f64();
    let seqs = sequences(rows, rows_t, 11);
    let distinct: Vec<Lane> = many.iter().enumerate().map(|(r, t)| lane(t, 0, &[r])).collect::<Res<_>>()?;
    let single = vec![lane(&many[0], 0, &(0..rows).collect::<Vec<_>>())?];
    let (d, o, rd, ro) = ab(&bb, &seqs, &distinct, &single, true, runs)?;
    println!("\n| {rows} rows x T = {rows_t} | distinct tasks ms | one task ms | ratio | session runs |\n|---|---|---|---|---|");
    println!("| banks | {d:.1} | {o:.1} | {:.3} | {rd} / {ro} |", d / o);
    let store = bb.banked.as_ref().ok_or("no layer graphs")?.banks.store();
    println!(
        "\n{} bank tasks ({} rows of capacity) hold {:.1} MiB of bank tensors; loading them took {load_s:.1} s.",
        store.used(),
        store.capacity(),
        store.bytes() as f64 / (1 << 20) as f64
    );
    drop(store); // the packed section registers bank tasks
    let tasks = packed_tasks()?;
    packing::one_task_vs_fused(&bench.rt, &bb, &tasks[0], before, runs, (b, t))?;
    packing::packed_vs_padded(&bb, &tasks, runs, packed_batches)
}
