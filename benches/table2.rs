//! Table 2 of AdapterDrop (Rücklé et al., EMNLP 2021): one request fanned out to k tasks, with the
//! adapters of the first n layers dropped, so those layers run once for all k tasks.
//!
//! `make bench` (or `cargo bench --bench table2` with ORT_DYLIB_PATH set and `build/bench-repo` made by
//! `tools/make_bench_repo.py`). For each backbone, k and n it times `engine::execute` over B random
//! sequences of T tokens with k lanes (every lane on every row), and prints the speed-up over n = 0
//! beside the ideal one from the counted layer rows (`ExecStats.layer_rows`). Item 5b: the same k
//! tasks run as k separate single-lane `execute` calls, and a fused one-graph plain model (compute floor).
//! Configurations of one (backbone, k) group are interleaved, direction alternating each round (ABBA).
//!
//! Environment (all optional):
//!   BENCH_REPO=build/bench-repo   BENCH_BACKBONES=minilm,bert-base-random   BENCH_K=1,2,4,8,16
//!   BENCH_N=all|0,5,...           BENCH_RUNS=5 (timed rounds; median)        BENCH_WARMUP=1
//!   BENCH_B=8  BENCH_T=128        BENCH_SEPARATE=1 (5b: k separate calls)    BENCH_FUSED=1
//!   ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER=cuda (GPU; `make gpu-check`)
//!   BENCH_THREADS=0 (ORT intra-op threads, 0 = cores)  BENCH_OUT=FILE (also write the markdown there)
//!   BENCH_SPIN=0 (1: idle pool threads spin, runtime.allow_spinning)
//!   BENCH_QUICK=1: K=1,8, N=0,round(5L/12),L-1, RUNS=3 unless set explicitly.

mod support;

use std::error::Error;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use adapterdrop_serve::engine::heads::to_matrix;
use adapterdrop_serve::engine::{ExecStats, Lane, Sequence, execute};
use adapterdrop_serve::repository::{Backbone, Registry, Task};
use adapterdrop_serve::runtime::{Graph, Runtime};
use ndarray::Array2;
use support::{env, env_usize, load_fused, median, run_fused, sequences};

type Res<X> = Result<X, Box<dyn Error + Send + Sync>>;

/// Task name prefix per backbone, as `tools/make_bench_repo.py` names them.
const BACKBONES: &[(&str, &str)] = &[("minilm", "mini-pf"), ("bert-base-random", "base-pf")];

fn list(v: &str) -> Res<Vec<usize>> {
    v.split(',').map(|s| s.trim().parse::<usize>().map_err(|e| format!("`{s}`: {e}").into())).collect()
}

struct Opts {
    repo: PathBuf,
    backbones: Vec<String>,
    ks: Vec<usize>,
    ns: Option<Vec<usize>>,
    quick: bool,
    runs: usize,
    warmup: usize,
    b: usize,
    t: usize,
    separate: bool,
    fused: bool,
}

impl Opts {
    fn from_env() -> Res<Self> {
        let quick = env("BENCH_QUICK").is_some_and(|v| v != "0");
        let ns = match env("BENCH_N") {
            Some(v) if v != "all" => Some(list(&v)?),
            _ => None,
        };
        Ok(Self {
            repo: PathBuf::from(env("BENCH_REPO").unwrap_or_else(|| "build/bench-repo".into())),
            backbones: env("BENCH_BACKBONES")
                .unwrap_or_else(|| "minilm,bert-base-random".into())
                .split(',')
                .map(|s| s.trim().to_string())
                .collect(),
            ks: list(&env("BENCH_K").unwrap_or_else(|| if quick { "1,8" } else { "1,2,4,8,16" }.into()))?,
            ns,
            quick,
            runs: env_usize("BENCH_RUNS", if quick { 3 } else { 5 })?.max(1),
            warmup: env_usize("BENCH_WARMUP", 1)?,
            b: env_usize("BENCH_B", 8)?.max(1),
            t: env_usize("BENCH_T", 128)?.max(2),
            separate: env_usize("BENCH_SEPARATE", 1)? != 0,
            fused: env_usize("BENCH_FUSED", 1)? != 0,
        })
    }

    /// Drop depths to measure for an L-layer backbone; always includes 0 (the baseline).
    fn ns_for(&self, layers: usize) -> Vec<usize> {
        let mut ns: Vec<usize> = match &self.ns {
            Some(ns) => ns.iter().copied().filter(|&n| n <= layers).collect(),
            // n = L (every adapter dropped, heads only) checks the fan-out floor target.
            None if self.quick => vec![0, (5 * layers + 6) / 12, layers - 1, layers],
            None => (0..layers).collect(),
        };
        ns.push(0);
        ns.sort_unstable();
        ns.dedup();
        ns
    }
}

/// One timed thing of a (backbone, k) group.
#[derive(Clone, Copy, PartialEq)]
enum Config {
    /// One `execute` with k lanes, n layers dropped.
    FanOut(usize),
    /// k separate one-lane `execute` calls, n layers dropped.
    Separate(usize),
    /// The fused one-graph plain model over the B rows (k = 1 group only).
    Fused,
    /// One task alone at n layers dropped, timed inside a k > 1 group (the heads-only target).
    One(usize),
}

struct Ctx<'a> {
    backbone: &'a Backbone,
    tasks: &'a [Arc<Task>],
    seqs: &'a [Sequence],
    fused: Option<&'a Graph>,
}

impl Ctx<'_> {
    fn lanes(&self, k: usize, n: usize) -> Res<Vec<Lane>> {
        self.tasks[..k]
            .iter()
            .map(|t| Ok(Lane { task: t.clone(), active: t.active_layers(Some(n as u32))?, rows: (0..self.seqs.len()).collect() }))
            .collect()
    }

    /// Runs a configuration once; returns its logits per lane and the planner's stats.
    fn run(&self, k: usize, c: Config) -> Res<(Vec<Array2<f32>>, ExecStats)> {
        match c {
            Config::FanOut(n) => Ok(matrices(execute(self.backbone, self.seqs, &self.lanes(k, n)?)?)),
            Config::Separate(n) => {
                let (mut all, mut total) = (Vec::new(), ExecStats::default());
                for lane in self.lanes(k, n)? {
                    let (mut out, st) = matrices(execute(self.backbone, self.seqs, &[lane])?);
                    all.append(&mut out);
                    total.layer_rows.resize(st.layer_rows.len(), 0);
                    total.layer_rows.iter_mut().zip(&st.layer_rows).for_each(|(a, b)| *a += b);
                    total.adapter_rows += st.adapter_rows;
                }
                Ok((all, total))
            }
            Config::Fused => Ok((vec![run_fused(self.fused.expect("fused graph loaded"), self.seqs)?], ExecStats::default())),
            Config::One(n) => Ok(matrices(execute(self.backbone, self.seqs, &self.lanes(1, n)?)?)),
        }
    }
}

/// Lane outputs as `[rows, labels]` matrices (every task here has a sequence head).
fn matrices((out, stats): (Vec<Vec<Vec<f32>>>, ExecStats)) -> (Vec<Array2<f32>>, ExecStats) {
    (out.iter().map(|o| to_matrix(o)).collect(), stats)
}

fn max_diff(a: &[Array2<f32>], b: &[Array2<f32>]) -> f32 {
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y.iter()).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

/// Times every configuration of one (backbone, k) group, interleaved; returns median ms and stats.
fn time_group(ctx: &Ctx, k: usize, configs: &[Config], o: &Opts) -> Res<Vec<(f64, ExecStats)>> {
    let mut stats = Vec::new();
    for &c in configs {
        let (out, st) = ctx.run(k, c)?; // also the first warm-up round
        if let (Config::FanOut(n), true) = (c, o.separate && k > 1) {
            let (sep, _) = ctx.run(k, Config::Separate(n))?;
            let d = max_diff(&out, &sep);
            if d > 1e-3 {
                return Err(format!("k={k} n={n}: fan-out and separate logits differ by {d}").into());
            }
        }
        stats.push(st);
    }
    for _ in 1..o.warmup {
        for &c in configs {
            ctx.run(k, c)?;
        }
    }
    let mut times = vec![Vec::with_capacity(o.runs); configs.len()];
    for round in 0..o.runs {
        let order: Vec<usize> = if round % 2 == 0 { (0..configs.len()).collect() } else { (0..configs.len()).rev().collect() };
        for i in order {
            let t0 = Instant::now();
            ctx.run(k, configs[i])?;
            times[i].push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times.iter_mut().map(|t| median(t)).zip(stats).collect())
}

fn bench_backbone(rt: &Runtime, reg: &Registry, name: &str, o: &Opts, md: &mut String) -> Res<()> {
    let prefix = BACKBONES.iter().find(|(b, _)| *b == name).map(|(_, p)| *p).ok_or(format!("unknown backbone {name}"))?;
    let backbone = reg.backbone(name).ok_or(format!("backbone {name} not in {}", o.repo.display()))?;
    let layers = backbone.num_layers();
    let kmax = o.ks.iter().copied().max().unwrap_or(1);
    let tasks: Vec<Arc<Task>> = (0..kmax).map(|i| reg.resolve(&format!("{prefix}-{i:02}"), None)).collect::<Result<_, _>>()?;
    let labels = tasks[0].manifest.head.labels.len();
    let fused = if o.fused { Some(load_fused(rt, &o.repo, name, labels)?) } else { None };
    let seqs = sequences(o.b, o.t, 0x5eed_0000 + layers as u64);
    let ctx = Ctx { backbone: &backbone, tasks: &tasks, seqs: &seqs, fused: fused.as_ref() };
    let ns = o.ns_for(layers);
    let paper_n = (5 * layers + 6) / 12;
    let _ = writeln!(
        md,
        "\n### {name} ({layers} layers, hidden {}), B = {}, T = {}, median of {} runs\n",
        backbone.manifest.hidden_size, o.b, o.t, o.runs
    );
    let _ = writeln!(
        md,
        "| k | n | fan-out ms | speed-up vs n=0 | ideal (layer rows) | % of ideal | gain / dropped layer | k separate ms | separate / fan-out |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|");
    let mut notes = Vec::new();
    for &k in &o.ks {
        let mut configs: Vec<Config> = ns.iter().map(|&n| Config::FanOut(n)).collect();
        if o.separate && k > 1 {
            configs.extend(ns.iter().map(|&n| Config::Separate(n)));
        }
        if fused.is_some() && k == 1 {
            configs.push(Config::Fused);
        }
        if k > 1 && ns.contains(&layers) {
            configs.push(Config::One(layers));
        }
        let t0 = Instant::now();
        let res = time_group(&ctx, k, &configs, o)?;
        eprintln!("  {name} k={k}: {} configs in {:.1}s", configs.len(), t0.elapsed().as_secs_f64());
        let at = |c: Config| configs.iter().position(|&x| x == c).map(|i| &res[i]);
        let (base_ms, base_st) = at(Config::FanOut(0)).expect("n = 0 is always measured");
        let base_rows: usize = base_st.layer_rows.iter().sum();
        for &n in &ns {
            let (ms, st) = at(Config::FanOut(n)).expect("measured");
            let speed = base_ms / ms;
            let ideal = base_rows as f64 / st.layer_rows.iter().sum::<usize>() as f64;
            let gain = if n > 0 { format!("{:.1}%", (speed - 1.0) / n as f64 * 100.0) } else { "-".into() };
            let (sep_ms, ratio) = match at(Config::Separate(n)) {
                Some((s, _)) => (format!("{s:.1}"), format!("{:.2}", s / ms)),
                None => ("-".into(), "-".into()),
            };
            let mark = if k == 8 && n == paper_n { " **" } else { "" };
            let _ = writeln!(
                md,
                "| {k} | {n}{mark} | {ms:.1} | {speed:.2}x | {ideal:.2}x | {:.0}% | {gain} | {sep_ms} | {ratio} |",
                speed / ideal * 100.0
            );
            if let (true, Some((one, _))) = (n == layers, at(Config::One(n))) {
                notes.push(format!(
                    "heads only (n = {n}, every adapter dropped): k = {k} fan-out {ms:.1} ms is {:.2}x one task's {one:.1} ms, timed interleaved (target <= 1.2: {})",
                    ms / one,
                    if ms / one <= 1.2 { "MET" } else { "MISSED" }
                ));
            }
            if k == 8 && n == paper_n {
                let hit = |ok: bool| if ok { "MET" } else { "MISSED" };
                notes.push(format!(
                    "k = 8, n = {n} of {layers}: speed-up {speed:.2}x (target >= 1.50: {}), {:.1}% of ideal {ideal:.2}x (target >= 95%: {}); paper: 1.39x at n = 5 of 12",
                    hit(speed >= 1.5),
                    speed / ideal * 100.0,
                    hit(speed / ideal >= 0.95)
                ));
            }
        }
        if let Some((f_ms, _)) = at(Config::Fused) {
            let n_last = *ns.last().expect("non-empty");
            let (last_ms, _) = at(Config::FanOut(n_last)).expect("measured");
            notes.push(format!(
                "fused one-graph plain model (compute floor, B = {}): {f_ms:.1} ms; k = 1 segmented execute is {:.2}x it at n = 0 and {:.2}x at n = {n_last}",
                o.b,
                base_ms / f_ms,
                last_ms / f_ms
            ));
        }
    }
    for n in notes {
        let _ = writeln!(md, "\n- {n}");
    }
    Ok(())
}

fn main() -> Res<()> {
    // `cargo bench` passes `--bench`; nothing else is accepted (configure through the environment).
    let o = Opts::from_env()?;
    let settings = support::runtime_settings()?;
    let rt = Runtime::init(&settings)?;
    if !o.repo.join("backbones").is_dir() {
        return Err(format!(
            "{} has no backbones/: run `tools/make_bench_repo.py --out {}` (make bench does)",
            o.repo.display(),
            o.repo.display()
        )
        .into());
    }
    let t0 = Instant::now();
    let reg = Registry::open(&rt, &o.repo)?;
    eprintln!("repository {} loaded in {:.1}s", o.repo.display(), t0.elapsed().as_secs_f64());
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## table2: ONNX Runtime {}, {} intra-op threads, k = {:?}, quick = {}, warm-up rounds {}",
        rt.version(),
        if settings.intra_threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { settings.intra_threads },
        o.ks,
        o.quick,
        o.warmup
    );
    for name in &o.backbones {
        bench_backbone(&rt, &reg, name, &o, &mut md)?;
        eprintln!("{name} done at {:.1}s", t0.elapsed().as_secs_f64());
    }
    let _ = writeln!(
        md,
        "\nideal = sum of layer rows at n = 0 / at n (ExecStats.layer_rows; embeddings, adapters, heads not counted). \
         Paper (Rücklé et al. 2021, Table 2): 4.3%-8.4% faster per shared layer; k = 8, n = 5 of 12: 39% faster. ** marks k = 8, n = round(5L/12)."
    );
    print!("{md}");
    if let Some(path) = env("BENCH_OUT") {
        std::fs::write(&path, &md)?;
        eprintln!("written to {path}");
    }
    Ok(())
}
