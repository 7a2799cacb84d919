//! Helpers shared by the benchmarks: environment knobs, medians, seeded synthetic inputs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use adapterdrop_serve::config::RuntimeSettings;
use adapterdrop_serve::engine::heads::to_matrix;
use adapterdrop_serve::engine::{ExecStats, Sequence};
use adapterdrop_serve::runtime::{Dim, Graph, IoSpec, Runtime};
use ndarray::{Array2, Ix2};
use ort::value::{TensorElementType as T, TensorRef};

/// A set, non-blank environment variable.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

pub fn env_usize(name: &str, default: usize) -> Result<usize, String> {
    env(name).map_or(Ok(default), |v| v.trim().parse().map_err(|e| format!("{name}={v}: {e}")))
}

/// CPU time of this process so far, ms (all threads): on a loaded machine it leaves out the time
/// the benchmark waited for a core, which wall time does not.
pub fn cpu_ms() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 / 1e6
}

/// The benchmark clock, ms from an arbitrary start: wall time, or with `BENCH_CLOCK=cpu` this
/// process's CPU time (`cpu_ms`; meaningful with BENCH_THREADS=1, where ONNX Runtime computes on the
/// calling thread and nothing spins).
pub fn now_ms() -> f64 {
    static START: OnceLock<Instant> = OnceLock::new();
    if env("BENCH_CLOCK").as_deref() == Some("cpu") { cpu_ms() } else { START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1e3 }
}

pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 { v[m] } else { (v[m - 1] + v[m]) / 2.0 }
}

/// B sequences of exactly T tokens: [CLS]=101, ids in 1000..30000, [SEP]=102 (xorshift, seeded).
pub fn sequences(b: usize, t: usize, seed: u64) -> Vec<Sequence> {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    (0..b)
        .map(|_| {
            let mut ids: Vec<i64> = (0..t).map(|_| 1000 + (next() % 29000) as i64).collect();
            ids[0] = 101;
            ids[t - 1] = 102;
            Sequence { ids, mask: vec![1; t], types: vec![0; t] }
        })
        .collect()
}

/// The fused one-graph plain model (`make_bench_repo.py`) over `seqs` (all of one length): `[B, labels]`.
pub fn run_fused(graph: &Graph, seqs: &[Sequence]) -> Result<Array2<f32>, Box<dyn std::error::Error + Send + Sync>> {
    let (b, t) = (seqs.len(), seqs[0].ids.len());
    let flat = |f: fn(&Sequence) -> &Vec<i64>| Array2::from_shape_vec((b, t), seqs.iter().flat_map(|s| f(s).clone()).collect());
    let (ids, types, mask) = (flat(|s| &s.ids)?, flat(|s| &s.types)?, flat(|s| &s.mask)?);
    let inputs = vec![
        ("input_ids", TensorRef::from_array_view(ids.view())?.into()),
        ("token_type_ids", TensorRef::from_array_view(types.view())?.into()),
        ("attention_mask", TensorRef::from_array_view(mask.view())?.into()),
    ];
    let out = graph.run(inputs, |o| Ok(o["logits"].try_extract_array::<f32>()?.to_owned()))?;
    Ok(out.into_dimensionality::<Ix2>()?)
}

/// `DIR/fused/<backbone>/model.onnx` of a bench repository, its head `labels` wide.
pub fn load_fused(rt: &Runtime, repo: &Path, backbone: &str, labels: usize) -> Result<Graph, Box<dyn std::error::Error + Send + Sync>> {
    let bt = [Dim::Any, Dim::Any];
    let inputs: Vec<IoSpec> =
        ["input_ids", "token_type_ids", "attention_mask"].into_iter().map(|n| IoSpec::new(n, T::Int64, &bt)).collect();
    let outputs = [IoSpec::new("logits", T::Float32, &[Dim::Any, Dim::Fixed(labels as i64)])];
    Ok(Graph::load(rt, &repo.join("fused").join(backbone).join("model.onnx"), &inputs, &outputs)?)
}

/// The runtime settings of a benchmark: `ORT_DYLIB_PATH` (default `build/lib/libonnxruntime.so`),
/// BENCH_THREADS (intra-op threads, 0 = cores), BENCH_SPIN, and
/// `ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER` (`cuda` under `make gpu-check`).
pub fn runtime_settings() -> Result<RuntimeSettings, Box<dyn std::error::Error + Send + Sync>> {
    Ok(RuntimeSettings {
        library_path: env("ORT_DYLIB_PATH").map(PathBuf::from).or_else(|| Some(PathBuf::from("build/lib/libonnxruntime.so"))),
        intra_threads: env_usize("BENCH_THREADS", 0)?,
        allow_spinning: env_usize("BENCH_SPIN", RuntimeSettings::default().allow_spinning as usize)? != 0,
        execution_provider: match env("ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER") {
            Some(p) => p.parse().map_err(|e| format!("ADAPTERDROP__RUNTIME__EXECUTION_PROVIDER: {e}"))?,
            None => RuntimeSettings::default().execution_provider,
        },
        ..Default::default()
    })
}

/// Lane outputs as `[rows, labels]` matrices (every task here has a sequence head).
pub fn matrices((out, stats): (Vec<Vec<Vec<f32>>>, ExecStats)) -> (Vec<Array2<f32>>, ExecStats) {
    (out.iter().map(|o| to_matrix(o)).collect(), stats)
}
