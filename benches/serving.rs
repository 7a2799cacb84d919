//! Serving overhead and load (issue 3, items 5c and 5d), on the MiniLM tasks of `build/bench-repo`.
//!
//! 5c: one request (B x T tokens, 1 task, n = 0) in-process through `engine::execute` vs gRPC on loopback
//!     (server in this process on 127.0.0.1:0, max_batch_delay_ms = 0), ABAB, medians (target <= 1.10x).
//! 5d: closed loop: C tonic clients (own channels) send a seeded mix of the 16 `mini-pf-*` tasks, drop
//!     depths 0..=L, 1-4 sequences of 16..128 tokens, to a server with default batching (delay 2 ms),
//!     bounded by count and time. Reports throughput, p50/p99 latency, mean `timings.batch_rows`; then runs
//!     the completed requests offline (`execute` over consecutive requests packed to >= OFFLINE_B
//!     sequences, lanes as the scheduler builds them): served / offline (target >= 85%), p99 vs delay + compute.
//!
//! `cargo bench --bench serving` with ORT_DYLIB_PATH set (`make bench` does). Environment (optional):
//!   BENCH_REPO=build/bench-repo  BENCH_RUNS=7 (5c rounds)  BENCH_B=8 BENCH_T=128 (5c request)
//!   BENCH_CLIENTS=8  BENCH_SECS=20  BENCH_REQUESTS=2000 (5d bounds)  BENCH_OFFLINE_B=32
//!   BENCH_THREADS=0 (ORT intra-op threads, 0 = cores)  BENCH_QUICK=1: RUNS=5, SECS=8, REQUESTS=400
//!   BENCH_OUT=FILE (also write the markdown there)

mod support;

use adapterdrop_serve::config::Settings;
use adapterdrop_serve::engine::{Lane, Sequence, execute};
use adapterdrop_serve::proto::inference_client::InferenceClient;
use adapterdrop_serve::proto::{InferRequest, TaskRef, TokenIds, TokenizedInputs, infer_request};
use adapterdrop_serve::repository::{Backbone, Registry};
use adapterdrop_serve::server::App;
use std::error::Error;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tonic::transport::Channel;
type Res<X> = Result<X, Box<dyn Error + Send + Sync>>;
const PREFIX: &str = "mini-pf";
const BACKBONE: &str = "minilm";
const TASKS: usize = 16;
use support::{env, env_usize, median};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, lo: usize, hi_incl: usize) -> usize {
        lo + (self.next() % (hi_incl - lo + 1) as u64) as usize
    }
}

/// A sequence of exactly `t` tokens: [CLS]=101, ids in 1000..30000, [SEP]=102.
fn sequence(rng: &mut Rng, t: usize) -> Sequence {
    let mut ids: Vec<i64> = (0..t).map(|_| 1000 + (rng.next() % 29000) as i64).collect();
    ids[0] = 101;
    ids[t - 1] = 102;
    Sequence { ids, mask: vec![1; t], types: vec![0; t] }
}

/// One generated request: task index, drop depth, sequences.
struct Req {
    task: usize,
    drop: u32,
    seqs: Vec<Sequence>,
}

impl Req {
    fn proto(&self) -> InferRequest {
        let sequences = self
            .seqs
            .iter()
            .map(|s| TokenIds { input_ids: s.ids.clone(), attention_mask: s.mask.clone(), token_type_ids: s.types.clone() })
            .collect();
        InferRequest {
            tasks: vec![TaskRef {
                name: format!("{PREFIX}-{:02}", self.task),
                version: None,
                drop_first: Some(self.drop),
                ..Default::default()
            }],
            inputs: Some(infer_request::Inputs::Tokens(TokenizedInputs { sequences })),
            truncate: false,
            return_fusion_weights: false,
            id: String::new(),
            ..Default::default()
        }
    }
}

fn quick() -> bool {
    env("BENCH_QUICK").is_some_and(|v| v != "0")
}

/// Nearest-rank percentile of a sorted slice.
fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((p / 100.0 * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Serves `app` on 127.0.0.1:0 in the background; returns its address and the shutdown trigger.
async fn start(app: App) -> Res<(SocketAddr, oneshot::Sender<()>, tokio::task::JoinHandle<()>)> {
    let listener = app.bind().await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        if let Err(e) = app
            .serve(listener, async {
                let _ = rx.await;
            })
            .await
        {
            eprintln!("server failed: {e}");
        }
    });
    Ok((addr, tx, handle))
}

async fn connect(addr: SocketAddr) -> Res<InferenceClient<Channel>> {
    let ch = Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    Ok(InferenceClient::new(ch).max_decoding_message_size(64 << 20).max_encoding_message_size(64 << 20))
}

/// Runs a batch of requests through `execute` the way the scheduler does (one lane per request).
fn run_offline(backbone: &Backbone, reg: &Registry, reqs: &[&Req]) -> Res<()> {
    let (mut seqs, mut lanes) = (Vec::new(), Vec::new());
    for r in reqs {
        let task = reg.resolve(&format!("{PREFIX}-{:02}", r.task), None)?;
        let active = task.active_layers(Some(r.drop))?;
        lanes.push(Lane { task, active, rows: (seqs.len()..seqs.len() + r.seqs.len()).collect() });
        seqs.extend(r.seqs.iter().cloned());
    }
    execute(backbone, &seqs, &lanes)?;
    Ok(())
}

async fn bench_5c(app: App, backbone: Arc<Backbone>, reg: Arc<Registry>, md: &mut String) -> Res<()> {
    let (runs, b, t) = (env_usize("BENCH_RUNS", if quick() { 5 } else { 7 })?.max(1), env_usize("BENCH_B", 8)?, env_usize("BENCH_T", 128)?);
    let mut rng = Rng(0x5eed_5c5c);
    let req = Req { task: 0, drop: 0, seqs: (0..b).map(|_| sequence(&mut rng, t)).collect() };
    let proto = req.proto();
    let (addr, stop, handle) = start(app).await?;
    let mut client = connect(addr).await?;
    let req = Arc::new(req);
    let in_process = || {
        let (bb, rg, rq, t0) = (backbone.clone(), reg.clone(), req.clone(), Instant::now());
        async move { tokio::task::spawn_blocking(move || run_offline(&bb, &rg, &[&*rq]).map(|_| t0.elapsed().as_secs_f64() * 1e3)).await? }
    };
    // Warm-up: one of each.
    in_process().await?;
    client.infer(proto.clone()).await?;
    let (mut a, mut g, mut server_compute) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..runs {
        for step in 0..2 {
            if (round + step) % 2 == 0 {
                a.push(in_process().await?);
            } else {
                let t0 = Instant::now();
                let resp = client.infer(proto.clone()).await?.into_inner();
                g.push(t0.elapsed().as_secs_f64() * 1e3);
                server_compute.push(resp.timings.map_or(0.0, |t| t.compute_us as f64 / 1e3));
            }
        }
    }
    let _ = stop.send(());
    handle.await?;
    let (ma, mg, mc) = (median(&mut a), median(&mut g), median(&mut server_compute));
    let ratio = mg / ma;
    let _ = writeln!(
        md,
        "\n### 5c: in-process vs gRPC on loopback (B = {b}, T = {t}, 1 task, n = 0, max_batch_delay_ms = 0, {runs} runs each, ABAB)\n"
    );
    let _ = writeln!(md, "| path | median ms | runs (ms) |\n|---|---|---|");
    let fmt = |v: &[f64]| v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(", ");
    let (fa, fg, fc) = (fmt(&a), fmt(&g), fmt(&server_compute));
    let _ = writeln!(
        md,
        "| in-process `execute` | {ma:.1} | {fa} |\n| gRPC round trip | {mg:.1} | {fg} |\n| (server-side `timings.compute_us`) | {mc:.1} | {fc} |"
    );
    let _ = writeln!(
        md,
        "\n- gRPC / in-process = **{ratio:.3}x** ({:+.1} ms); target <= 1.10x: **{}**",
        mg - ma,
        if ratio <= 1.10 { "MET" } else { "MISSED" }
    );
    Ok(())
}

struct Done {
    idx: usize,
    ms: f64,
    batch_rows: u32,
    compute_ms: f64,
    queue_ms: f64,
}

async fn bench_5d(app: App, backbone: Arc<Backbone>, reg: Arc<Registry>, md: &mut String) -> Res<()> {
    let layers = backbone.num_layers();
    let clients = env_usize("BENCH_CLIENTS", 8)?.max(1);
    let secs = env_usize("BENCH_SECS", if quick() { 8 } else { 20 })?;
    let max_reqs = env_usize("BENCH_REQUESTS", if quick() { 400 } else { 2000 })?;
    let offline_b = env_usize("BENCH_OFFLINE_B", 32)?.max(1);
    let (delay_ms, mut rng) = (app.settings.batching.max_batch_delay_ms, Rng(0x5eed_5d5d));
    let reqs: Arc<Vec<Req>> = Arc::new(
        (0..max_reqs)
            .map(|_| {
                let (task, drop) = (rng.range(0, TASKS - 1), rng.range(0, layers) as u32);
                let n = rng.range(1, 4);
                Req {
                    task,
                    drop,
                    seqs: (0..n)
                        .map(|_| {
                            let t = rng.range(16, 128);
                            sequence(&mut rng, t)
                        })
                        .collect(),
                }
            })
            .collect(),
    );
    let (addr, stop, handle) = start(app).await?;
    let mut conns = Vec::new();
    for _ in 0..clients {
        let mut c = connect(addr).await?;
        c.infer(reqs[0].proto()).await?; // warm-up, not counted
        conns.push(c);
    }
    let next = Arc::new(AtomicUsize::new(1));
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(secs as u64);
    let mut tasks = Vec::new();
    for mut c in conns {
        let (next, reqs) = (next.clone(), reqs.clone());
        tasks.push(tokio::spawn(async move {
            let mut done = Vec::new();
            while Instant::now() < end {
                let idx = next.fetch_add(1, Ordering::Relaxed);
                if idx >= reqs.len() {
                    break;
                }
                let proto = reqs[idx].proto();
                let s = Instant::now();
                let resp = c.infer(proto).await?.into_inner();
                let ms = s.elapsed().as_secs_f64() * 1e3;
                let tm = resp.timings.unwrap_or_default();
                done.push(Done {
                    idx,
                    ms,
                    batch_rows: tm.batch_rows,
                    compute_ms: tm.compute_us as f64 / 1e3,
                    queue_ms: tm.queue_us as f64 / 1e3,
                });
            }
            Ok::<_, tonic::Status>(done)
        }));
    }
    let mut done = Vec::new();
    for t in tasks {
        done.extend(t.await??);
    }
    let wall = t0.elapsed().as_secs_f64();
    let _ = stop.send(());
    handle.await?;
    done.sort_by_key(|d| d.idx);
    let nseq: usize = done.iter().map(|d| reqs[d.idx].seqs.len()).sum();
    let served_tput = nseq as f64 / wall;
    let mut lat: Vec<f64> = done.iter().map(|d| d.ms).collect();
    median(&mut lat); // sorts
    let (p50, p99) = (pct(&lat, 50.0), pct(&lat, 99.0));
    let mean_rows = done.iter().map(|d| d.batch_rows as f64).sum::<f64>() / done.len() as f64;
    let mut compute: Vec<f64> = done.iter().map(|d| d.compute_ms).collect();
    let mut queue: Vec<f64> = done.iter().map(|d| d.queue_ms).collect();
    let (c50, q50) = (median(&mut compute), median(&mut queue));
    let c_max = compute.last().copied().unwrap_or(0.0);
    let q99 = pct(&queue, 99.0);
    let mut over: Vec<f64> = done.iter().map(|d| d.ms - d.compute_ms).collect();
    median(&mut over); // sorts
    let (o50, o99) = (pct(&over, 50.0), pct(&over, 99.0));
    let c99 = pct(&compute, 99.0);
    // Offline: the same completed requests, in order, packed into batches of >= offline_b sequences.
    let (mut batches, mut rows): (Vec<Vec<usize>>, usize) = (vec![Vec::new()], 0);
    for d in &done {
        if rows >= offline_b {
            batches.push(Vec::new());
            rows = 0;
        }
        rows += reqs[d.idx].seqs.len();
        batches.last_mut().expect("non-empty").push(d.idx);
    }
    let nb = batches.len();
    let (bb, rg, rq) = (backbone.clone(), reg.clone(), reqs.clone());
    let offline_s = tokio::task::spawn_blocking(move || -> Res<f64> {
        let pick = |b: &[usize]| b.iter().map(|&i| &rq[i]).collect::<Vec<&Req>>();
        run_offline(&bb, &rg, &pick(&batches[0]))?; // warm-up
        let t0 = Instant::now();
        for b in &batches {
            run_offline(&bb, &rg, &pick(b))?;
        }
        Ok(t0.elapsed().as_secs_f64())
    })
    .await??;
    let offline_tput = nseq as f64 / offline_s;
    let ratio = served_tput / offline_tput;
    let bound = delay_ms as f64 + c50;
    let hit = |ok: bool| if ok { "MET" } else { "MISSED" };
    let _ = writeln!(
        md,
        "\n### 5d: load test, {clients} clients, max_batch_delay_ms = {delay_ms}, {} requests / {nseq} sequences in {wall:.1} s (bounds: {max_reqs} requests, {secs} s)\n",
        done.len()
    );
    let _ = writeln!(md, "| metric | value |\n|---|---|");
    let _ = writeln!(md, "| served throughput | {served_tput:.1} sequences/s ({:.1} requests/s) |", done.len() as f64 / wall);
    let _ = writeln!(md, "| latency p50 / p99 (client round trip) | {p50:.1} / {p99:.1} ms |");
    let _ = writeln!(
        md,
        "| server queue_us p50 / p99 | {q50:.1} / {q99:.1} ms |\n| batch compute (timings.compute_us) median / max | {c50:.1} / {c_max:.1} ms |"
    );
    let _ = writeln!(md, "| mean batch rows (timings.batch_rows, per request) | {mean_rows:.1} |");
    let _ = writeln!(
        md,
        "| offline `execute`, same requests, {nb} batches of >= {offline_b} sequences | {offline_tput:.1} sequences/s ({offline_s:.1} s) |"
    );
    let _ = writeln!(md, "\n- served / offline throughput = **{:.0}%**; target >= 85%: **{}**", ratio * 100.0, hit(ratio >= 0.85));
    let _ = writeln!(
        md,
        "- p99 {p99:.1} ms vs max_batch_delay + one batch's median compute = {delay_ms} + {c50:.1} = {bound:.1} ms: **{:.2}x** ({})",
        p99 / bound,
        if p99 <= bound { "within" } else { "over" }
    );
    let _ = writeln!(
        md,
        "- p99 vs max_batch_delay + p99 batch compute = {delay_ms} + {c99:.1} = {:.1} ms: **{:.2}x**; latency minus the request's own batch compute: p50 {o50:.1} / p99 {o99:.1} ms",
        delay_ms as f64 + c99,
        p99 / (delay_ms as f64 + c99)
    );
    Ok(())
}

fn main() -> Res<()> {
    let repo = PathBuf::from(env("BENCH_REPO").unwrap_or_else(|| "build/bench-repo".into()));
    if !repo.join("backbones").is_dir() {
        return Err(format!(
            "{} has no backbones/: run `tools/make_bench_repo.py --out {}` (make bench does)",
            repo.display(),
            repo.display()
        )
        .into());
    }
    let mut settings = Settings::default();
    settings.server.listen = "127.0.0.1:0".into();
    settings.metrics.listen = String::new();
    settings.admin.listen = String::new(); // no admin port in the benchmark
    settings.repository.path = repo;
    settings.runtime.library_path = env("ORT_DYLIB_PATH").map(PathBuf::from).or_else(|| Some(PathBuf::from("build/lib/libonnxruntime.so")));
    settings.runtime.intra_threads = env_usize("BENCH_THREADS", 0)?;
    settings.log.level = "warn".into();
    let t0 = Instant::now();
    let app = App::load(settings.clone())?; // the one ONNX Runtime environment of this process
    eprintln!("repository loaded in {:.1}s", t0.elapsed().as_secs_f64());
    let reg = app.registry.clone();
    let backbone = reg.backbone(BACKBONE).ok_or("backbone minilm not in the bench repository")?;
    let mut s0 = settings.clone();
    s0.batching.max_batch_delay_ms = 0;
    let app_5c = App { settings: s0, registry: reg.clone(), runtime: app.runtime.clone(), ctx: adapterdrop_serve::context::Context::new() };
    let app_5d = app; // default batching (max_batch_delay_ms = 2)
    let threads = if settings.runtime.intra_threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        settings.runtime.intra_threads
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "## serving (5c, 5d): ONNX Runtime {}, {threads} intra-op threads, backbone {BACKBONE}, quick = {}",
        app_5d.runtime.version(),
        quick()
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        bench_5c(app_5c, backbone.clone(), reg.clone(), &mut md).await?;
        eprintln!("5c done at {:.1}s", t0.elapsed().as_secs_f64());
        bench_5d(app_5d, backbone.clone(), reg.clone(), &mut md).await?;
        eprintln!("5d done at {:.1}s", t0.elapsed().as_secs_f64());
        Ok::<_, Box<dyn Error + Send + Sync>>(())
    })?;
    print!("{md}");
    if let Some(path) = env("BENCH_OUT") {
        std::fs::write(&path, &md)?;
        eprintln!("written to {path}");
    }
    Ok(())
}
