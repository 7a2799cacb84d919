//! No disruption under traffic: registering, replacing and unregistering tasks while clients
//! infer fails no request; the worst latency with and without admin churn is printed side by side.
//! And a bounded soak of register/unregister cycles shows no growth of memory or open files.

mod admin_support;
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use admin_support::*;
use common::TestServer;

const PHASE: Duration = Duration::from_secs(3);
const CLIENTS: usize = 3;

#[derive(Default)]
struct Phase {
    latencies_ms: Vec<f64>,
    failures: Vec<String>,
}

impl Phase {
    fn summary(&mut self) -> (f64, f64, f64) {
        self.latencies_ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let q = |p: f64| self.latencies_ms[((self.latencies_ms.len() - 1) as f64 * p) as usize];
        (q(0.5), q(0.99), *self.latencies_ms.last().unwrap())
    }
}

/// CLIENTS loops of sequential requests (other tasks and the churned task's default) for PHASE.
async fn traffic(addr: String) -> Phase {
    let mut handles = Vec::new();
    for i in 0..CLIENTS {
        let addr = addr.clone();
        handles.push(tokio::spawn(async move {
            let mut c = inference(&addr).await;
            let mut phase = Phase::default();
            let end = Instant::now() + PHASE;
            let mut n = i;
            while Instant::now() < end {
                let task = ["sent", "topic", "churn"][n % 3];
                n += 1;
                let t0 = Instant::now();
                match infer(&mut c, task, None).await {
                    Ok(_) => phase.latencies_ms.push(t0.elapsed().as_secs_f64() * 1e3),
                    Err(e) => phase.failures.push(format!("{task}: {:?} {}", e.code(), e.message())),
                }
            }
            phase
        }));
    }
    let mut all = Phase::default();
    for h in handles {
        let p = h.await.unwrap();
        all.latencies_ms.extend(p.latencies_ms);
        all.failures.extend(p.failures);
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_register_unregister_and_infer_fail_no_request() {
    let repo = temp_repo(&["sent", "topic"]);
    let server = TestServer::start_on(repo.path(), &[("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "0")]);
    let admin_addr = server.admin_addr();
    let mut a = admin(&admin_addr).await;
    register(&mut a, header("churn", None, false, false), &source("sent")).await.unwrap();

    let mut quiet = traffic(server.addr.clone()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let churner = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut a = admin(&admin_addr).await;
            let mut ops = 0;
            while !stop.load(Ordering::Relaxed) {
                // A new default version appears and goes away; a new task comes and goes; the
                // version in use is replaced in place.
                register(&mut a, header("churn", Some(2), true, false), &source("topic")).await.unwrap();
                unregister(&mut a, "churn", Some(2)).await.unwrap();
                register(&mut a, header("visitor", None, false, false), &source("topic")).await.unwrap();
                unregister(&mut a, "visitor", None).await.unwrap();
                register(&mut a, header("churn", Some(1), false, true), &source("sent")).await.unwrap();
                ops += 5;
            }
            ops
        })
    };
    let mut busy = traffic(server.addr.clone()).await;
    stop.store(true, Ordering::Relaxed);
    let ops = churner.await.unwrap();

    let (q50, q99, qmax) = quiet.summary();
    let (b50, b99, bmax) = busy.summary();
    println!("ADMIN-CHURN clients={CLIENTS} phase_s={} admin_ops={ops}", PHASE.as_secs());
    println!(
        "ADMIN-CHURN quiet: n={} p50={q50:.1}ms p99={q99:.1}ms max={qmax:.1}ms failures={}",
        quiet.latencies_ms.len(),
        quiet.failures.len()
    );
    println!(
        "ADMIN-CHURN churn: n={} p50={b50:.1}ms p99={b99:.1}ms max={bmax:.1}ms failures={}",
        busy.latencies_ms.len(),
        busy.failures.len()
    );
    println!(
        "ADMIN-CHURN ratio churn/quiet: p50 {:.2}x p99 {:.2}x max {:.2}x; worst bump {:.1} ms",
        b50 / q50,
        b99 / q99,
        bmax / qmax,
        bmax - qmax
    );
    assert!(quiet.failures.is_empty(), "{:?}", quiet.failures);
    assert!(busy.failures.is_empty(), "requests failed during admin churn: {:?}", busy.failures);
    assert!(ops >= 5, "the churn loop ran");
    // No stall: even the worst request under churn stays far below a second.
    assert!(bmax < 1000.0, "worst latency under churn {bmax:.1} ms");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_of_register_unregister_cycles_does_not_grow_memory_or_files() {
    let repo = temp_repo(&["sent"]);
    let server = TestServer::start_on(repo.path(), &[("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "0")]);
    let mut a = admin(&server.admin_addr()).await;
    let mut c = inference(&server.addr).await;
    let (warmup, cycles): (usize, usize) = (90, std::env::var("ADMIN_SOAK_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(120));
    let mut samples = Vec::new();
    for i in 0..warmup + cycles {
        let r = register(&mut a, header("soak", None, true, false), &source(if i % 2 == 0 { "sent" } else { "topic" })).await.unwrap();
        infer(&mut c, "soak", None).await.unwrap();
        unregister(&mut a, "soak", Some(r.task.unwrap().version)).await.unwrap();
        if i + 1 >= warmup && (i + 1 - warmup) % (cycles / 4).max(1) == 0 {
            samples.push((i + 1, rss_kib(server.pid()), open_fds(server.pid())));
        }
    }
    for (i, rss, fds) in &samples {
        println!("ADMIN-SOAK after {i} cycles: rss={rss} KiB fds={fds}");
    }
    let (_, rss0, fds0) = samples[0];
    let (_, rss1, fds1) = *samples.last().unwrap();
    println!(
        "ADMIN-SOAK {cycles} cycles after warm-up: rss {rss0} -> {rss1} KiB ({:+} KiB), fds {fds0} -> {fds1}",
        rss1 as i64 - rss0 as i64
    );
    assert!(fds1 <= fds0 + 2, "open files grew: {fds0} -> {fds1}");
    // A leak grows at a steady pace; allocator and arena warm-up flattens out, but in steps (one
    // of about 1.6 MiB was seen between two samples). So the second half of the measured cycles
    // (60) must stay within 3 MiB (a 100 KiB-per-cycle creep, as tokio's blocking pool once caused,
    // adds 6 MiB there), and the whole run within a looser bound (that creep adds 12 MiB).
    let (_, rss_mid, _) = samples[samples.len() / 2];
    assert!(rss1 <= rss_mid + 3 * 1024, "memory still growing in the second half: {rss_mid} -> {rss1} KiB");
    assert!(rss1 <= rss0 + 8 * 1024, "memory grew: {rss0} -> {rss1} KiB");
    assert!(staging_dirs(repo.path()).is_empty());
    assert!(!repo.path().join("tasks/soak").exists());
}
