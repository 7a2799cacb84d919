//! Helpers shared by the benchmarks: environment knobs, medians, seeded synthetic inputs.
#![allow(dead_code)]

use adapterdrop_serve::engine::Sequence;

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
