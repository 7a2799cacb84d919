//! Adapter banks on the bench backbone (issue 12; `benches/banks.rs` is the MiniLM test-repository and
//! packed-token bench), every CPU and GPU figure of the issue side by
//! side in one run, in process through `engine::run_lanes`:
//!
//! 1. one task, n = 0: banks vs the per-task segments vs the fused one-graph plain model (the
//!    compute floor), at each B of BENCH_B;
//! 2. k = 8 distinct tasks on the same B rows: n = round(5L/12) vs n = 0 on the banks, against the
//!    layer-row ideal, and against 8 separate runs of the fused graph (what one fused model per task
//!    on a stock server would cost);
//! 3. session runs of a batch mixing 8 bank tasks at 8 drop depths on shared and own rows;
//! 4. BENCH_ROWS rows, each its own task, vs the same rows of one task (banks) and vs the fused graph.
//!
//! Tasks are `<prefix>-00..07` of `tools/make_bench_repo.py` (`make bench` builds the repository;
//! `make gpu-check` builds the BERT-base one). Case 4's tasks are copies of `<prefix>-00`'s AdapterHub
//! weights with shifted biases, attached to the banks without loading any graph.
//! Configurations of a case are interleaved, direction alternating each round; medians.
//!
//! Environment (optional): BENCH_REPO=build/bench-repo BENCH_BACKBONE=bert-base-random (or minilm)
//! BENCH_B=8 (comma list) BENCH_T=32 BENCH_RUNS=3 BENCH_ROWS=256 BENCH_ROWS_T=16 BENCH_THREADS=0
//! BENCH_CASES=one,k8,mix,rows ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER=cuda BENCH_OUT=FILE
//! BENCH_CLOCK=cpu (process CPU time instead of wall time, with BENCH_THREADS=1: `support::now_ms`).
//! BENCH_BEFORE_REPO: a bench repository exported by an earlier commit's tools (same backbone and
//! tasks), whose layer graphs case 1 also times in the same rounds, for before / after side by side.

mod support;

use std::collections::BTreeMap;
use std::error::Error;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use adapterdrop_serve::engine::{ExecStats, Lane, Sequence, run_lanes};
use adapterdrop_serve::repository::{Backbone, Registry, Task, adapterhub};
use adapterdrop_serve::runtime::{Graph, Runtime};
use ndarray::Array2;
use support::{env, env_usize, load_fused, matrices, median, now_ms, run_fused, runtime_settings, sequences};

type Res<X> = Result<X, Box<dyn Error + Send + Sync>>;
/// Median ms, stats and outputs of one timed configuration.
type Timed = (f64, ExecStats, Vec<Array2<f32>>);

/// Task name prefix per backbone, as `tools/make_bench_repo.py` names them.
const BACKBONES: &[(&str, &str)] = &[("minilm", "mini-pf"), ("bert-base-random", "base-pf")];

/// One timed thing.
enum Config<'a> {
    /// `run_lanes` with these lanes; `banks` as `engine.banks`.
    Lanes(&'a [Lane], bool),
    /// The bank path of another backbone (BENCH_BEFORE_REPO's) with these lanes.
    Other(&'a Backbone, &'a [Lane]),
    /// The fused graph `times` times over the rows (`times` separate fused models).
    Fused(&'a Graph, usize),
}

struct Case<'a> {
    backbone: &'a Backbone,
    seqs: &'a [Sequence],
    runs: usize,
}

impl Case<'_> {
    fn run(&self, c: &Config) -> Res<(Vec<Array2<f32>>, ExecStats)> {
        match c {
            Config::Lanes(lanes, banks) => Ok(matrices(run_lanes(self.backbone, self.seqs, lanes, *banks)?)),
            Config::Other(backbone, lanes) => Ok(matrices(run_lanes(backbone, self.seqs, lanes, true)?)),
            Config::Fused(g, times) => {
                let mut out = Vec::new();
                for _ in 0..*times {
                    out.push(run_fused(g, self.seqs)?);
                }
                Ok((out, ExecStats::default()))
            }
        }
    }

    /// Median ms of each configuration over `runs` interleaved rounds (ABBA) after one warm-up,
    /// with the stats and outputs of the warm-up run.
    fn time(&self, configs: &[Config]) -> Res<Vec<Timed>> {
        let first: Vec<(Vec<Array2<f32>>, ExecStats)> = configs.iter().map(|c| self.run(c)).collect::<Res<_>>()?;
        let mut times = vec![Vec::new(); configs.len()];
        for round in 0..self.runs {
            let order: Vec<usize> = if round % 2 == 0 { (0..configs.len()).collect() } else { (0..configs.len()).rev().collect() };
            for i in order {
                let t0 = now_ms();
                self.run(&configs[i])?;
                times[i].push(now_ms() - t0);
            }
        }
        Ok(times.iter_mut().zip(first).map(|(t, (out, st))| (median(t), st, out)).collect())
    }
}

fn lane(task: &Arc<Task>, n: usize, rows: &[usize]) -> Res<Lane> {
    Ok(Lane { task: task.clone(), active: task.active_layers(Some(n as u32))?, rows: rows.to_vec() })
}

fn met(ok: bool) -> &'static str {
    if ok { "MET" } else { "MISSED" }
}

fn max_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
    a.iter().zip(b.iter()).map(|(p, q)| (p - q).abs()).fold(0.0, f32::max)
}

/// `count` bank tasks: `base`'s AdapterHub weights with their down-projection biases shifted by
/// `i` * 1e-3, attached to the banks (no graphs loaded; heads run on the host from the weights).
fn copies(base: &Arc<Task>, dir: &std::path::Path, count: usize) -> Res<Vec<Arc<Task>>> {
    let bb = &base.backbone;
    let weights = adapterhub::load(dir, bb.num_layers(), bb.manifest.hidden_size)?;
    (0..count)
        .map(|i| {
            let mut w = weights.clone();
            for s in w.slots.values_mut() {
                s.down_b.mapv_inplace(|v| v + (i + 1) as f32 * 1e-3);
            }
            let mut t = Task {
                manifest: base.manifest.clone(),
                backbone: bb.clone(),
                slots: BTreeMap::new(),
                fusion: BTreeMap::new(),
                up: BTreeMap::new(),
                head: None,
                adapterhub: None,
                bank: None,
            };
            t.attach_bank(Arc::new(w));
            Ok(Arc::new(t))
        })
        .collect()
}

fn main() -> Res<()> {
    let repo = PathBuf::from(env("BENCH_REPO").unwrap_or_else(|| "build/bench-repo".into()));
    let name = env("BENCH_BACKBONE").unwrap_or_else(|| "bert-base-random".into());
    let prefix = BACKBONES.iter().find(|(b, _)| *b == name).map(|(_, p)| *p).ok_or(format!("BENCH_BACKBONE: unknown `{name}`"))?;
    let runs = env_usize("BENCH_RUNS", 3)?.max(1);
    let bs: Vec<usize> = env("BENCH_B").unwrap_or_else(|| "8".into()).split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
    let t = env_usize("BENCH_T", 32)?.max(2);
    let (rows, rows_t) = (env_usize("BENCH_ROWS", 256)?.max(1), env_usize("BENCH_ROWS_T", 16)?.max(2));
    let cases = env("BENCH_CASES").unwrap_or_else(|| "one,k8,mix,rows".into());
    let on = |c: &str| cases.split(',').any(|x| x.trim() == c);
    let settings = runtime_settings()?;
    let rt = Runtime::init(&settings)?;
    if !repo.join("backbones").join(&name).is_dir() {
        return Err(format!(
            "{} has no backbone `{name}`: run `tools/make_bench_repo.py --out {}` (make bench does)",
            repo.display(),
            repo.display()
        )
        .into());
    }
    let reg = Registry::open(&rt, &repo)?;
    let bb = reg.backbone(&name).ok_or(format!("backbone {name} did not load"))?;
    if bb.banked.is_none() {
        return Err(format!("backbone {name} has no layer graphs (layers/<i>/layer.onnx): re-export it").into());
    }
    let layers = bb.num_layers();
    let paper_n = (5 * layers + 6) / 12;
    let tasks: Vec<Arc<Task>> = (0..8).map(|i| reg.resolve(&format!("{prefix}-{i:02}"), None)).collect::<Result<_, _>>()?;
    let fused = load_fused(&rt, &repo, &name, tasks[0].manifest.head.labels.len())?;
    let mut md = String::new();
    let threads =
        if settings.intra_threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { settings.intra_threads };
    let _ = writeln!(
        md,
        "## banks: {name} (L = {layers}, H = {}), {:?}, ONNX Runtime {}, {threads} intra-op threads, T = {t}, medians of {runs} ({} time)\n",
        bb.manifest.hidden_size,
        settings.execution_provider,
        rt.version(),
        if env("BENCH_CLOCK").as_deref() == Some("cpu") { "process CPU" } else { "wall" }
    );
    let mut notes = Vec::new();
    let mut most_runs = 0usize;

    if on("one") {
        // The same task on an earlier export's layer graphs (BENCH_BEFORE_REPO), timed in the same rounds.
        let before = match env("BENCH_BEFORE_REPO") {
            Some(dir) => {
                let old = Registry::open(&rt, &PathBuf::from(dir))?;
                let task = old.resolve(&format!("{prefix}-00"), None)?;
                Some((task.backbone.clone(), task, old))
            }
            None => None,
        };
        let _ = writeln!(
            md,
            "| one task, n = 0 | banks ms | segments ms | fused ms | banks / fused | segments / fused | session runs (banks / segments / fused) |{}",
            if before.is_some() { " before: banks ms | before: banks / fused |" } else { "" }
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|{}", if before.is_some() { "---|---|" } else { "" });
        for &b in &bs {
            let seqs = sequences(b, t, 7 + b as u64);
            let all: Vec<usize> = (0..b).collect();
            let one = [lane(&tasks[0], 0, &all)?];
            let old = before.as_ref().map(|(_, task, _)| lane(task, 0, &all)).transpose()?.map(|l| [l]);
            let case = Case { backbone: &bb, seqs: &seqs, runs };
            let mut configs = vec![Config::Lanes(&one, true), Config::Lanes(&one, false), Config::Fused(&fused, 1)];
            if let (Some((bb_old, _, _)), Some(old)) = (&before, &old) {
                configs.push(Config::Other(bb_old, old));
            }
            let r = case.time(&configs)?;
            let (bk, sg, fu) = (r[0].0, r[1].0, r[2].0);
            let _ = write!(
                md,
                "| B = {b} | {bk:.1} | {sg:.1} | {fu:.1} | **{:.3}** | {:.3} | {} / {} / 1 |",
                bk / fu,
                sg / fu,
                r[0].1.graph_runs,
                r[1].1.graph_runs
            );
            if let Some(o) = r.get(3) {
                let _ = write!(md, " {:.1} | {:.3} |", o.0, o.0 / fu);
                notes.push(format!(
                    "one task, B = {b}: after / before {:.3}; logits after vs before differ by at most {:e}",
                    bk / o.0,
                    max_diff(&r[0].2[0], &o.2[0])
                ));
            }
            let _ = writeln!(md);
            most_runs = most_runs.max(r[0].1.graph_runs);
            notes.push(format!("one task vs fused, B = {b}: {:.3}x (CPU target <= 1.06, GPU <= 1.10: {})", bk / fu, met(bk / fu <= 1.06)));
            // Exactness anchor: with every adapter dropped the bank path is the plain model + the head.
            let plain = [lane(&tasks[0], layers, &all)?];
            let (out, _) = matrices(run_lanes(&bb, &seqs, &plain, true)?);
            let d = max_diff(&out[0], &r[2].2[0]);
            if d > 1e-4 {
                return Err(format!("banks with every adapter dropped differ from the fused plain graph by {d}").into());
            }
        }
    }

    if on("k8") {
        let b = bs[0];
        let seqs = sequences(b, t, 8);
        let all: Vec<usize> = (0..b).collect();
        let at = |n: usize| tasks.iter().map(|tk| lane(tk, n, &all)).collect::<Res<Vec<Lane>>>();
        let (l0, ln) = (at(0)?, at(paper_n)?);
        let case = Case { backbone: &bb, seqs: &seqs, runs };
        let r = case.time(&[Config::Lanes(&l0, true), Config::Lanes(&ln, true), Config::Fused(&fused, 8)])?;
        let (m0, mn, sep) = (r[0].0, r[1].0, r[2].0);
        let rows0: usize = r[0].1.layer_rows.iter().sum();
        let rowsn: usize = r[1].1.layer_rows.iter().sum();
        let (speed, ideal) = (m0 / mn, rows0 as f64 / rowsn as f64);
        let _ = writeln!(md, "\n| k = 8 tasks, B = {b} | banks ms | session runs | layer rows |\n|---|---|---|---|");
        let _ = writeln!(md, "| n = 0 | {m0:.1} | {} | {rows0} |", r[0].1.graph_runs);
        let _ = writeln!(md, "| n = {paper_n} | {mn:.1} | {} | {rowsn} |", r[1].1.graph_runs);
        let _ = writeln!(md, "| 8 separate fused graphs (plain) | {sep:.1} | 8 | - |");
        most_runs = most_runs.max(r[0].1.graph_runs).max(r[1].1.graph_runs);
        notes.push(format!(
            "k = 8, n = {paper_n} vs n = 0: {speed:.2}x (CPU target >= 1.55: {}; GPU >= 1.6), {:.1}% of the layer-row ideal {ideal:.2}x (target >= 95%: {})",
            met(speed >= 1.55),
            speed / ideal * 100.0,
            met(speed / ideal >= 0.95)
        ));
        notes.push(format!(
            "k = 8, n = {paper_n} vs 8 separate fused plain graphs: {:.2}x faster (GPU target >= 1.4; a fused graph per task would also carry its adapters, so this is a lower bound on the separate cost)",
            sep / mn
        ));
    }

    if on("mix") {
        // 8 bank tasks at 8 drop depths: lanes 0-3 share all B rows, lanes 4-7 one row each.
        let b = bs[0].max(4);
        let seqs = sequences(b, t, 9);
        let all: Vec<usize> = (0..b).collect();
        let mut lanes = Vec::new();
        for (i, tk) in tasks.iter().enumerate() {
            let n = (i * layers / 8).min(layers);
            lanes.push(lane(tk, n, if i < 4 { &all } else { &all[i - 4..i - 3] })?);
        }
        let (_, st) = run_lanes(&bb, &seqs, &lanes, true)?;
        most_runs = most_runs.max(st.graph_runs);
        let _ = writeln!(
            md,
            "\nMixed batch (8 bank tasks, drop depths 0..{}, shared and own rows, B = {b}): {} session runs, {} bank lanes, layer rows {:?}",
            7 * layers / 8,
            st.graph_runs,
            st.bank_lanes,
            st.layer_rows
        );
    }

    if on("rows") {
        let loaded = Instant::now();
        let dir = repo.join("tasks").join(format!("{prefix}-00")).join("1").join("adapterhub");
        let many = copies(&tasks[0], &dir, rows)?;
        let load_s = loaded.elapsed().as_secs_f64();
        let seqs = sequences(rows, rows_t, 11);
        let distinct: Vec<Lane> = many.iter().enumerate().map(|(r, tk)| lane(tk, 0, &[r])).collect::<Res<_>>()?;
        let single = vec![lane(&many[0], 0, &(0..rows).collect::<Vec<_>>())?];
        let case = Case { backbone: &bb, seqs: &seqs, runs };
        let r = case.time(&[Config::Lanes(&distinct, true), Config::Lanes(&single, true), Config::Fused(&fused, 1)])?;
        let (d, o, f) = (r[0].0, r[1].0, r[2].0);
        most_runs = most_runs.max(r[0].1.graph_runs);
        let store = bb.banked.as_ref().ok_or("no layer graphs")?.banks.store();
        let _ = writeln!(
            md,
            "\n| {rows} rows x T = {rows_t} | each row its own task ms | all rows one task ms | fused plain graph ms | distinct / one | distinct / fused | session runs |\n|---|---|---|---|---|---|---|"
        );
        let _ = writeln!(
            md,
            "| banks | {d:.1} | {o:.1} | {f:.1} | **{:.3}** | {:.3} | {} / {} / 1 |",
            d / o,
            d / f,
            r[0].1.graph_runs,
            r[1].1.graph_runs
        );
        notes.push(format!(
            "{rows} distinct tasks vs one task on the same rows: {:.3}x (CPU target <= 1.10: {}); vs the fused plain graph: {:.3}x (GPU target <= 1.3)",
            d / o,
            met(d / o <= 1.10),
            d / f
        ));
        notes.push(format!(
            "{} bank tasks ({} rows of capacity) hold {:.1} MiB of bank tensors; attaching the {rows} copies took {load_s:.1} s",
            store.used(),
            store.capacity(),
            store.bytes() as f64 / (1 << 20) as f64
        ));
    }

    notes.push(format!(
        "most session runs in any batch above: {most_runs} (target <= L + 4 = {}: {})",
        layers + 4,
        met(most_runs <= layers + 4)
    ));
    for n in notes {
        let _ = writeln!(md, "\n- {n}");
    }
    print!("{md}");
    if let Some(path) = env("BENCH_OUT") {
        std::fs::write(&path, &md)?;
    }
    Ok(())
}
