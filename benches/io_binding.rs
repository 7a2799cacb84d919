//! `runtime.io_binding` off vs on, the capturable layer graphs, and `runtime.cuda_graphs` (issue 12
//! item 6; `src/runtime/bound.rs`, `graph_capture.rs`, `row_buckets.rs`), side by side in one run,
//! in process through `engine::run_lanes` on the bank path: one registry of the same repository per
//! setting, the same bank tasks (the MiniLM Pfeiffer adapter of the test repository, copied with
//! shifted biases) and the same inputs. Settings: `off` (plain runs, `layer.onnx`), `io_binding`,
//! `capturable` (io_binding on `layer_capturable.onnx`, the graph without control flow) and
//! `cuda_graphs` (the capturable graphs, rows and tokens padded to buckets, inputs staged at fixed
//! addresses; captured and replayed under CUDA only: on the CPU it times the staging and padding
//! without capture). Every case first checks that each setting gives the plain runs' logits
//! (within 1e-6 on the CPU, 1e-5 on a GPU and for the buckets' padded layout), then times them
//! interleaved (order reversed every round), medians.
//!
//! 1. one task, n = 0, B rows (under CUDA graphs each case's batches share one signature, so
//!    after ONNX Runtime's warm-up runs every timed run replays its captured graphs);
//! 2. k = 8 tasks on the same rows, n = 0 and n = 5;
//! 3. ROWS rows, each its own task.
//!
//! `cargo bench --bench io_binding` (ORT_DYLIB_PATH set; `make gpu-check` runs it under CUDA).
//! Environment (optional): BENCH_REPO=build/test-repo BENCH_RUNS=7 BENCH_B=8 BENCH_T=64
//! BENCH_ROWS=64 BENCH_ROWS_T=32 BENCH_THREADS=0 ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER=cuda
//! BENCH_OUT=FILE.

mod support;

use std::error::Error;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use adapterdrop_serve::engine::{ExecStats, Lane, Sequence, run_lanes};
use adapterdrop_serve::repository::{Backbone, Registry, Task};
use adapterdrop_serve::runtime::{Device, Runtime};
use ndarray::Array2;
use support::{bank_copy, env, env_usize, matrices, median, runtime_settings, sequences};

type Res<X> = Result<X, Box<dyn Error + Send + Sync>>;
const TASK: &str = "mini-pfeiffer";

/// One setting: its name and registry (own backbone, banks and runner).
struct Side {
    name: &'static str,
    rt: Runtime,
    reg: Registry,
    bb: Arc<Backbone>,
}

impl Side {
    fn new(name: &'static str, rt: Runtime, repo: &std::path::Path) -> Res<Self> {
        let reg = Registry::open(&rt, repo)?;
        let bb = reg.resolve(TASK, None)?.backbone.clone();
        Ok(Self { name, rt, reg, bb })
    }
}

fn run(side: &Side, seqs: &[Sequence], lanes: &[Lane]) -> Res<(f64, Vec<Array2<f32>>, ExecStats)> {
    let t0 = Instant::now();
    let (out, stats) = matrices(run_lanes(&side.bb, seqs, lanes, true)?);
    Ok((t0.elapsed().as_secs_f64() * 1e3, out, stats))
}

/// Checks every side against the first (plain runs), then the median ms of each over `runs`
/// interleaved rounds, and the session runs of a batch.
fn compare(sides: &[Side], seqs: &[Sequence], lanes: &[Vec<Lane>], runs: usize, tol: f32) -> Res<(Vec<f64>, usize)> {
    let (_, plain, stats) = run(&sides[0], seqs, &lanes[0])?;
    for (side, l) in sides.iter().zip(lanes).skip(1) {
        let (_, out, _) = run(side, seqs, l)?;
        let d = out.iter().zip(&plain).flat_map(|(x, y)| x.iter().zip(y.iter()).map(|(p, q)| (p - q).abs())).fold(0.0f32, f32::max);
        // Buckets run every row padded: the packed-vs-padded tolerance (`banks_engine`).
        let tol = if side.rt.cuda_graphs() { tol.max(1e-5) } else { tol };
        if d > tol {
            return Err(format!("{} vs plain runs differ by {d:e}", side.name).into());
        }
    }
    let mut t = vec![Vec::new(); sides.len()];
    for round in 0..runs {
        let order: Vec<usize> = if round % 2 == 0 { (0..sides.len()).collect() } else { (0..sides.len()).rev().collect() };
        for i in order {
            t[i].push(run(&sides[i], seqs, &lanes[i])?.0);
        }
    }
    Ok((t.iter_mut().map(|v| median(v)).collect(), stats.graph_runs))
}

fn lane(task: &Arc<Task>, n: u32, rows: &[usize]) -> Res<Lane> {
    Ok(Lane { task: task.clone(), active: task.active_layers(Some(n))?, rows: rows.to_vec() })
}

fn main() -> Res<()> {
    let repo = PathBuf::from(env("BENCH_REPO").unwrap_or_else(|| "build/test-repo".into()));
    let runs = env_usize("BENCH_RUNS", 7)?.max(1);
    let (b, t) = (env_usize("BENCH_B", 8)?, env_usize("BENCH_T", 64)?.max(2));
    let (rows, rows_t) = (env_usize("BENCH_ROWS", 64)?.max(1), env_usize("BENCH_ROWS_T", 32)?.max(2));
    let settings = runtime_settings()?;
    let rt = Runtime::init(&settings)?;
    let gpu = rt.device() != Device::Cpu;
    let io = rt.with_io_binding(true);
    let sides = vec![
        Side::new("off", rt.with_io_binding(false), &repo)?,
        Side::new("io_binding", io.clone(), &repo)?,
        Side::new("capturable", io.with_capturable_layers(true), &repo)?,
        Side::new("cuda_graphs", rt.with_cuda_graphs(true), &repo)?,
    ];
    let tol = if gpu { 1e-5 } else { 1e-6 };
    // The same task copies on every side (distinct tasks: biases shifted by their number).
    let tasks = |from: usize, count: usize| -> Res<Vec<Vec<Arc<Task>>>> {
        sides.iter().map(|s| (from..from + count).map(|i| bank_copy(&s.rt, &s.reg, &repo, TASK, i)).collect::<Res<Vec<_>>>()).collect()
    };
    let lanes = |tasks: &[Vec<Arc<Task>>], f: &dyn Fn(usize) -> (u32, Vec<usize>)| -> Res<Vec<Vec<Lane>>> {
        tasks
            .iter()
            .map(|ts| {
                ts.iter()
                    .enumerate()
                    .map(|(i, tk)| {
                        let (n, r) = f(i);
                        lane(tk, n, &r)
                    })
                    .collect::<Res<Vec<_>>>()
            })
            .collect()
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## runtime.io_binding, capturable layer graphs and cuda_graphs{} vs plain runs: MiniLM (L = {}), {}, ONNX Runtime {}, {} intra-op threads (0 = cores), medians of {runs}\n",
        if gpu { "" } else { " (CPU: staging and row buckets, no capture)" },
        sides[0].bb.num_layers(),
        settings.execution_provider.as_str(),
        rt.version(),
        settings.intra_threads
    );
    let names: Vec<&str> = sides.iter().map(|s| s.name).collect();
    let ratios: Vec<String> = names[1..].iter().map(|n| format!("{n} / off")).collect();
    let _ = writeln!(
        md,
        "| case | {} ms | {} | session runs |\n|---|{}{}---|",
        names.join(" ms | "),
        ratios.join(" | "),
        "---|".repeat(names.len()),
        "---|".repeat(ratios.len())
    );
    let mut row = |name: String, (ms, graph_runs): (Vec<f64>, usize)| {
        let cells: Vec<String> = ms.iter().map(|m| format!("{m:.2}")).collect();
        let r: Vec<String> = ms[1..].iter().map(|m| format!("**{:.3}**", m / ms[0])).collect();
        let _ = writeln!(md, "| {name} | {} | {} | {graph_runs} |", cells.join(" | "), r.join(" | "));
    };
    let seqs = sequences(b, t, 7);
    let all: Vec<usize> = (0..b).collect();
    let one = tasks(0, 1)?;
    row(format!("one task, n = 0, B = {b}, T = {t}"), compare(&sides, &seqs, &lanes(&one, &|_| (0, all.clone()))?, runs, tol)?);
    let eight = tasks(1, 8)?;
    for n in [0u32, 5] {
        let l = lanes(&eight, &|_| (n, all.clone()))?;
        row(format!("k = 8 tasks, n = {n}, B = {b}, T = {t}"), compare(&sides, &seqs, &l, runs, tol)?);
    }
    let many = tasks(100, rows)?;
    let seqs = sequences(rows, rows_t, 11);
    let l = lanes(&many, &|i| (0, vec![i]))?;
    row(format!("{rows} rows, each its own task, T = {rows_t}"), compare(&sides, &seqs, &l, runs, tol)?);
    let bound = |s: &Side| s.bb.banked.as_ref().and_then(|b| b.bound.as_ref()).map_or(0, |b| b.signatures());
    let captured = sides[3].bb.banked.as_ref().is_some_and(|b| b.layers.iter().all(|g| g.captured()));
    let _ = writeln!(
        md,
        "\ncuda_graphs: {} (layer, shape signature) pairs staged at the end (row and token buckets; a bank reallocation drops them), \
         layer sessions built for capture: {captured}",
        bound(&sides[3])
    );
    print!("{md}");
    if let Some(path) = env("BENCH_OUT") {
        std::fs::write(&path, &md)?;
    }
    Ok(())
}
