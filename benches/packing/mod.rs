//! Packed tokens vs the padded layout (issue 15 item 1), side by side in one run: the same bank
//! batches through `execute_banked_as` with `packed` true and false (`engine.packing`), on the token
//! lengths of real texts. `BENCH_LENGTHS`: a file of token lengths, one a line (the test splits of
//! the three trained tasks with the MiniLM tokenizer: `tools/text_lengths.py`); without it, a seeded
//! sample with the same mean, p90 and maximum (39, 77, 102).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use adapterdrop_serve::engine::banked::execute_banked_as;
use adapterdrop_serve::engine::{Lane, Sequence};
use adapterdrop_serve::repository::{Backbone, Task};
use adapterdrop_serve::runtime::Runtime;

use super::Res;
use super::support::{cpu_ms, env, load_fused, median, run_fused, sequences};

/// Token lengths of the workload, in a fixed shuffled order (FIFO batches take them in turn).
fn lengths() -> Res<(Vec<usize>, &'static str)> {
    let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let (mut v, source): (Vec<usize>, _) = match env("BENCH_LENGTHS") {
        Some(path) => (std::fs::read_to_string(path)?.split_whitespace().map(str::parse).collect::<Result<_, _>>()?, "real texts"),
        // A skewed sample: 70% short (8-40), 25% medium (40-80), 5% long (80-102).
        None => (
            (0..1800)
                .map(|_| {
                    let u = next() % 100;
                    let (lo, hi) = if u < 70 {
                        (8, 40)
                    } else if u < 95 {
                        (40, 80)
                    } else {
                        (80, 103)
                    };
                    (lo + next() % (hi - lo)) as usize
                })
                .collect(),
            "synthetic lengths",
        ),
    };
    for i in (1..v.len()).rev() {
        v.swap(i, (next() % (i as u64 + 1)) as usize);
    }
    Ok((v, source))
}

/// Sequences of the given lengths (ids as `support::sequences`).
fn of_lengths(lens: &[usize], seed: u64) -> Vec<Sequence> {
    lens.iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut s = sequences(1, n.max(2), seed + i as u64).remove(0);
            for v in [&mut s.ids, &mut s.mask, &mut s.types] {
                v.truncate(n);
            }
            s
        })
        .collect()
}

/// One lane per task over the rows it serves: row `r` goes to task `r % tasks.len()`.
fn lanes(tasks: &[Arc<Task>], rows: usize) -> Res<Vec<Lane>> {
    tasks
        .iter()
        .enumerate()
        .map(|(i, t)| Ok(Lane { task: t.clone(), active: t.active_layers(Some(0))?, rows: (i..rows).step_by(tasks.len()).collect() }))
        .filter(|l: &Res<Lane>| l.as_ref().map_or(true, |l| !l.rows.is_empty()))
        .collect()
}

/// Prints the table: per batch size and task mix, packed vs padded over the same FIFO batches.
pub fn packed_vs_padded(bb: &Backbone, tasks: &[Arc<Task>], runs: usize, batches: usize) -> Res<()> {
    let (lens, source) = lengths()?;
    let n = lens.len() as f64;
    let mean = lens.iter().sum::<usize>() as f64 / n;
    println!(
        "\n## Packed tokens vs padded (issue 15 item 1): {source}, {} texts, mean {mean:.1}, max {} tokens; {batches} FIFO batches per case, medians of {runs}\n",
        lens.len(),
        lens.iter().max().unwrap_or(&0)
    );
    println!(
        "| case | packed ms | padded ms | padded / packed | real share of per-token work (packed / padded) | real share of attention positions (packed / padded) |"
    );
    println!("|---|---|---|---|---|---|");
    for b in [8usize, 32] {
        for k in [1usize, 3] {
            let set: Vec<(Vec<Sequence>, Vec<Lane>)> = (0..batches)
                .map(|j| {
                    let l: Vec<usize> = lens.iter().cycle().skip(j * b).take(b).copied().collect();
                    Ok((of_lengths(&l, 17 + j as u64), lanes(&tasks[..k], b)?))
                })
                .collect::<Res<_>>()?;
            let run = |packed: bool| -> Res<(f64, [usize; 3])> {
                let t0 = Instant::now();
                let mut c = [0usize; 3];
                for (seqs, lanes) in &set {
                    let (_, s) = execute_banked_as(bb, seqs, lanes, packed)?;
                    c = [c[0] + s.real_tokens, c[1] + s.computed_tokens, c[2] + s.attention_tokens];
                }
                Ok((t0.elapsed().as_secs_f64() * 1e3, c))
            };
            let (_, packed) = run(true)?;
            let (_, padded) = run(false)?;
            let (mut a, mut p) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                a.push(run(true)?.0);
                p.push(run(false)?.0);
            }
            let (a, p) = (median(&mut a), median(&mut p));
            let pct = |x: usize, y: usize| 100.0 * x as f64 / y.max(1) as f64;
            println!(
                "| B = {b}, {k} task{} | {a:.1} | {p:.1} | **{:.2}x** | {:.1}% / {:.1}% | {:.1}% / {:.1}% |",
                if k > 1 { "s (row r: task r mod k)" } else { "" },
                p / a,
                pct(packed[0], packed[1]),
                pct(padded[0], padded[1]),
                pct(packed[0], packed[2]),
                pct(padded[0], padded[2]),
            );
        }
    }
    Ok(())
}

/// One task on the banks (packed, n = 0 and n = L) against the fused one-graph plain model
/// (`make_bench_repo.py`, issue 12's "one task at most 1.06x the fused graph"), equal lengths.
/// `BENCH_FUSED_REPO` (default build/bench-repo) must hold `fused/minilm/model.onnx`. `before`: the
/// same task on an earlier export's layer graphs (BENCH_BEFORE_REPO), timed in the same rounds.
/// Wall and process CPU time are both reported (`support::cpu_ms`).
pub fn one_task_vs_fused(
    rt: &Runtime,
    bb: &Backbone,
    task: &Arc<Task>,
    before: Option<(&Backbone, &Arc<Task>)>,
    runs: usize,
    (b, t): (usize, usize),
) -> Res<()> {
    let repo = PathBuf::from(env("BENCH_FUSED_REPO").unwrap_or_else(|| "build/bench-repo".into()));
    let head = repo.join("tasks/mini-pf-00/1/task.json");
    let Ok(text) = std::fs::read_to_string(&head) else {
        println!("\n(no fused model: `make_bench_repo.py --out {} --only minilm` first)", repo.display());
        return Ok(());
    };
    let labels = serde_json::from_str::<serde_json::Value>(&text)?["head"]["labels"].as_array().map_or(0, Vec::len);
    let fused = load_fused(rt, &repo, "minilm", labels)?;
    let seqs = sequences(b, t, 7);
    let layers = bb.num_layers() as u32;
    let lane = |task: &Arc<Task>, n: u32| -> Res<Vec<Lane>> {
        Ok(vec![Lane { task: task.clone(), active: task.active_layers(Some(n))?, rows: (0..b).collect() }])
    };
    // (label, backbone, lanes); fused first
    let mut cases: Vec<(&str, Option<&Backbone>, Vec<Lane>)> = vec![
        ("fused graph", None, Vec::new()),
        ("banks, n = 0 (Pfeiffer in every layer)", Some(bb), lane(task, 0)?),
        ("banks, n = L (no adapters: the fused graph's math)", Some(bb), lane(task, layers)?),
    ];
    if let Some((old, old_task)) = before {
        cases.push(("before: banks, n = 0", Some(old), lane(old_task, 0)?));
        cases.push(("before: banks, n = L", Some(old), lane(old_task, layers)?));
    }
    let (mut wall, mut cpu) = (vec![Vec::new(); cases.len()], vec![Vec::new(); cases.len()]);
    for round in 0..=runs {
        for (i, (_, backbone, lanes)) in cases.iter().enumerate() {
            let (t0, c0) = (Instant::now(), cpu_ms());
            match backbone {
                None => drop(run_fused(&fused, &seqs)?),
                Some(bb) => drop(execute_banked_as(bb, &seqs, lanes, true)?),
            }
            if round > 0 {
                wall[i].push(t0.elapsed().as_secs_f64() * 1e3);
                cpu[i].push(cpu_ms() - c0);
            }
        }
    }
    println!("\n## One task on the banks vs the fused one-graph model (MiniLM, B = {b}, T = {t}, medians of {runs} interleaved rounds)\n");
    println!("| case | wall ms | / fused | CPU ms | / fused (CPU) |\n|---|---|---|---|---|");
    let (f, fc) = (median(&mut wall[0].clone()), median(&mut cpu[0].clone()));
    for (i, (label, _, _)) in cases.iter().enumerate() {
        let (w, c) = (median(&mut wall[i]), median(&mut cpu[i]));
        println!("| {label} | {w:.1} | **{:.3}x** | {c:.1} | **{:.3}x** |", w / f, c / fc);
    }
    Ok(())
}
