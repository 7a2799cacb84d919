//! Fault injection for tests only: compiled with the cargo feature `fault-injection` (which the
//! test build enables), never into a production server, so no environment variable can crash one.
//!
//! - `ADAPTERDROP_FAULT_PANIC_BATCH=<token id>`: a batch holding that token id panics while it is
//!   being assembled (the engine must fail only that batch's requests).
//! - `ADAPTERDROP_FAULT_KILL_ENGINE=<token id>`: the engine thread itself panics, outside any
//!   batch, before running a batch holding that token id (health must go NOT_SERVING).
//! - `ADAPTERDROP_FAULT_KILL_QUEUE=<token id>`: the queue actor panics when a request holding that
//!   token id starts a batch (health must go NOT_SERVING as well).
//! - `ADAPTERDROP_FAULT_SLOW_BATCH=<token id>`: a batch holding that token id keeps the engine
//!   busy for [`SLOW_BATCH`] first, so that the requests sent meanwhile all wait in the queue
//!   (how batches form from a backlog is then deterministic).

use super::{Batch, Entry, Sequence};

fn marker(var: &str) -> Option<i64> {
    std::env::var(var).ok()?.parse().ok()
}

fn holds(seqs: &[Sequence], id: i64) -> bool {
    seqs.iter().any(|s| s.ids.contains(&id))
}

pub fn in_batch(seqs: &[Sequence]) {
    if let Some(id) = marker("ADAPTERDROP_FAULT_PANIC_BATCH")
        && holds(seqs, id)
    {
        panic!("fault injection: ADAPTERDROP_FAULT_PANIC_BATCH={id}");
    }
}

pub fn in_queue(first: &Entry) {
    if let Some(id) = marker("ADAPTERDROP_FAULT_KILL_QUEUE")
        && holds(&first.job.sequences, id)
    {
        panic!("fault injection: ADAPTERDROP_FAULT_KILL_QUEUE={id}");
    }
}

/// How long a batch holding `ADAPTERDROP_FAULT_SLOW_BATCH`'s token id keeps the engine busy.
pub const SLOW_BATCH: std::time::Duration = std::time::Duration::from_millis(1500);

pub fn before_batch(batch: &Batch) {
    if let Some(id) = marker("ADAPTERDROP_FAULT_SLOW_BATCH")
        && batch.entries.iter().any(|e| holds(&e.job.sequences, id))
    {
        std::thread::sleep(SLOW_BATCH);
    }
    if let Some(id) = marker("ADAPTERDROP_FAULT_KILL_ENGINE")
        && batch.entries.iter().any(|e| holds(&e.job.sequences, id))
    {
        panic!("fault injection: ADAPTERDROP_FAULT_KILL_ENGINE={id}");
    }
}
