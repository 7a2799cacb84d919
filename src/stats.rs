//! Cumulative per-task-version inference counters, as KServe's `ModelStatistics` reports them.
//!
//! Recorded on the path every API shares, so native and KServe requests count alike: the router
//! (requests refused after their tasks resolved), the scheduler (each request's outcome, input
//! preparation, queue and compute time) and the engine (model executions and their batch sizes).
//! One instance per server, in its [`crate::context::Context`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A count and the total time those events took.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DurationStat {
    pub count: u64,
    pub ns: u64,
}

impl DurationStat {
    fn add(&mut self, d: Duration) {
        self.count += 1;
        self.ns = self.ns.saturating_add(d.as_nanos().min(u64::MAX as u128) as u64);
    }
}

/// Counters of one task version.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TaskStats {
    /// Requests answered with results, and their time from routing to result.
    pub success: DurationStat,
    /// Requests that failed after their task resolved (bad input, queue full, deadline, runtime).
    pub fail: DurationStat,
    /// Time successful requests waited for the engine.
    pub queue: DurationStat,
    /// Validation and tokenization of successful requests.
    pub compute_input: DurationStat,
    /// Engine execution of the batch each successful request ran in.
    pub compute_infer: DurationStat,
    /// Taking a request's rows out of its batch's result and handing them back.
    pub compute_output: DurationStat,
    /// Sequences answered (a request with 8 texts counts 8).
    pub inference_count: u64,
    /// Engine executions that ran this task (many requests batched together count once).
    pub execution_count: u64,
    /// Milliseconds since the Unix epoch of the last successful request; 0 = none yet.
    pub last_inference_ms: u64,
    /// Per number of this task's rows in one execution: executions and their compute time.
    pub batches: BTreeMap<u64, DurationStat>,
}

/// Every task version's counters. Versions appear once they were first used.
#[derive(Default)]
pub struct Stats {
    tasks: Mutex<BTreeMap<(String, u32), TaskStats>>,
}

/// Timings of one successful request.
#[derive(Debug, Clone, Copy)]
pub struct RequestTimes {
    pub total: Duration,
    pub input: Duration,
    pub queue: Duration,
    pub compute: Duration,
    pub output: Duration,
}

impl Stats {
    fn with(&self, f: impl FnOnce(&mut BTreeMap<(String, u32), TaskStats>)) {
        f(&mut self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
    }

    pub fn request_succeeded(&self, keys: &[(String, u32)], sequences: usize, t: RequestTimes) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        self.with(|tasks| {
            for key in keys {
                let s = tasks.entry(key.clone()).or_default();
                s.success.add(t.total);
                s.compute_input.add(t.input);
                s.queue.add(t.queue);
                s.compute_infer.add(t.compute);
                s.compute_output.add(t.output);
                s.inference_count += sequences as u64;
                s.last_inference_ms = now;
            }
        });
    }

    pub fn request_failed(&self, keys: &[(String, u32)], total: Duration) {
        self.with(|tasks| {
            for key in keys {
                tasks.entry(key.clone()).or_default().fail.add(total);
            }
        });
    }

    /// One engine execution that ran `rows` rows of a task version.
    pub fn executed(&self, key: (String, u32), rows: usize, compute: Duration) {
        self.with(|tasks| {
            let s = tasks.entry(key).or_default();
            s.execution_count += 1;
            s.batches.entry(rows as u64).or_default().add(compute);
        });
    }

    /// Counters of the task versions that `keep` selects, sorted by name then version.
    pub fn snapshot(&self, keep: impl Fn(&str, u32) -> bool) -> Vec<((String, u32), TaskStats)> {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.iter().filter(|((n, v), _)| keep(n, *v)).map(|(k, s)| (k.clone(), s.clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_sequences_and_executions_per_version() {
        let stats = Stats::default();
        let a = ("a".to_string(), 1);
        let b = ("b".to_string(), 2);
        let ms = Duration::from_millis;
        let t = RequestTimes { total: ms(5), input: ms(1), queue: ms(2), compute: ms(3), output: ms(0) };
        stats.request_succeeded(&[a.clone(), b.clone()], 4, t);
        stats.request_succeeded(std::slice::from_ref(&a), 1, t);
        stats.request_failed(std::slice::from_ref(&b), ms(7));
        stats.executed(a.clone(), 5, ms(3));
        stats.executed(a.clone(), 5, ms(4));
        let snap = stats.snapshot(|_, _| true);
        let (_, sa) = &snap[0];
        assert_eq!(sa.success, DurationStat { count: 2, ns: 10_000_000 });
        assert_eq!(sa.inference_count, 5);
        assert_eq!(sa.execution_count, 2);
        assert_eq!(sa.batches[&5], DurationStat { count: 2, ns: 7_000_000 });
        assert!(sa.last_inference_ms > 0);
        let (_, sb) = &snap[1];
        assert_eq!((sb.success.count, sb.fail, sb.inference_count), (1, DurationStat { count: 1, ns: 7_000_000 }, 4));
        assert_eq!(stats.snapshot(|n, v| n == "b" && v == 2).len(), 1);
        assert!(stats.snapshot(|_, v| v == 3).is_empty());
    }
}
