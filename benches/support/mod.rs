//! Helpers shared by the benchmarks: environment knobs, medians, seeded synthetic inputs.
#![allow(dead_code)]

use std::path::Path;

use adapterdrop_serve::engine::Sequence;
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
