//! Unit tests of the bank store (`banks.rs`), kept apart so each file stays short.

use std::collections::BTreeMap;

use ndarray::{Array1, Array2, Axis};

use super::*;
use crate::repository::adapterhub::{Activation, Residual};

const H: usize = 4;

fn weights(r: usize, seed: f32) -> BottleneckWeights {
    BottleneckWeights {
        down_w: Array2::from_shape_fn((r, H), |(i, j)| seed + (i * H + j) as f32),
        down_b: Array1::from_elem(r, seed),
        up_w: Array2::from_shape_fn((H, r), |(i, j)| -seed - (i * r + j) as f32),
        up_b: Array1::from_elem(H, seed * 2.0),
    }
}

fn task(r: usize, seed: f32, slots: &[(usize, Location)]) -> BankWrite {
    let rule =
        SlotRule { ln_before: true, ln_after: true, residual: Residual::H, activation: Activation::Gelu, scaling: 1.0, parallel: false };
    BankWrite { rule, slots: slots.iter().map(|k| (*k, weights(r, seed))).collect(), methods: BTreeMap::new(), stack: None }
}

#[test]
fn rows_hold_weights_transposed_and_padded() {
    let b = BackboneBanks::new(2, H, 2 * H);
    let wide = b.register(task(3, 1.0, &[(0, Location::Ffn), (1, Location::Ffn)]));
    let narrow = b.register(task(2, 5.0, &[(1, Location::Ffn)]));
    let s = b.store();
    let (rw, rn) = (s.index(wide.id(), 1, Location::Ffn) as usize, s.index(narrow.id(), 1, Location::Ffn) as usize);
    assert!(rw > 0 && rn > 0 && rw != rn);
    assert_eq!(s.index(narrow.id(), 0, Location::Ffn), 0, "no adapter at layer 0: plain row");
    assert_eq!(s.index(wide.id(), 0, Location::Attention), 0);
    let bank = s.bank(1, Location::Ffn);
    assert_eq!(bank.width(), 3);
    assert_eq!(s.bank(0, Location::Attention).width(), 1, "unused banks stay one unit wide");
    let w = weights(2, 5.0);
    assert_eq!(bank.down_w.slice(s![rn, .., ..2]), w.down_w.t());
    assert!(bank.down_w.slice(s![rn, .., 2]).iter().all(|v| *v == 0.0), "padded column");
    assert!(bank.up_w.slice(s![rn, 2, ..]).iter().all(|v| *v == 0.0), "padded row");
    assert_eq!(bank.rule.slice(s![0, 0, ..]).to_vec(), PLAIN_RULE.to_vec());
    assert!(bank.down_w.index_axis(Axis(0), 0).iter().all(|v| *v == 0.0), "row 0 stays zero");
}

#[test]
fn freed_rows_are_zeroed_and_reused() {
    let b = BackboneBanks::new(1, H, 2 * H);
    let first = b.register(task(2, 1.0, &[(0, Location::Ffn)]));
    let row = b.store().index(first.id(), 0, Location::Ffn);
    drop(first);
    {
        let s = b.store();
        assert_eq!(s.used(), 0);
        assert!(s.bank(0, Location::Ffn).down_w.index_axis(Axis(0), row as usize).iter().all(|v| *v == 0.0));
    }
    let second = b.register(task(2, 9.0, &[(0, Location::Ffn)]));
    assert_eq!(b.store().index(second.id(), 0, Location::Ffn), row, "the freed row is the next one handed out");
}

#[test]
fn grows_by_at_most_a_quarter_and_shrinks_when_half_empty() {
    let b = BackboneBanks::new(1, H, 2 * H);
    let mut held = Vec::new();
    let mut caps = vec![b.store().capacity()];
    for i in 0..40 {
        held.push(b.register(task(2, i as f32, &[(0, Location::Ffn)])));
        let s = b.store();
        if s.capacity() != *caps.last().unwrap() {
            assert!(s.capacity() as f64 <= (*caps.last().unwrap() as f64 * GROWTH).ceil(), "{caps:?} -> {}", s.capacity());
            caps.push(s.capacity());
        }
    }
    let full = b.store().capacity();
    assert!(full >= 41);
    // Keep every 8th task: the rest free, the banks compact and the kept weights move intact.
    let kept: Vec<(usize, Arc<BankRows>)> = held.drain(..).enumerate().filter(|(i, _)| i % 8 == 0).collect();
    let s = b.store();
    assert!(s.capacity() < full / 2, "{} rows after shrinking from {full}", s.capacity());
    for (i, rows) in &kept {
        let r = s.index(rows.id(), 0, Location::Ffn) as usize;
        assert!(r > 0 && r < s.capacity());
        assert_eq!(s.bank(0, Location::Ffn).down_w.slice(s![r, .., ..]), weights(2, *i as f32).down_w.t());
    }
}

#[test]
fn reserved_rows_take_writes_without_growing_and_are_given_back() {
    let b = BackboneBanks::new(1, H, 2 * H);
    b.reserve(100);
    let s = b.store();
    let (capacity, copied) = (s.capacity(), s.resize_bytes());
    drop(s);
    assert_eq!(capacity, 101, "one exact-size step");
    // Written one at a time (start-up loads in parallel), none grows the banks or is queued.
    let held: Vec<_> = (0..90).map(|i| b.register(task(1, i as f32, &[(0, Location::Ffn)]))).collect();
    let raw = b.store.lock().unwrap();
    assert_eq!((raw.used(), raw.capacity(), raw.resize_bytes(), raw.rx.try_iter().count()), (90, 101, copied, 0));
    drop(raw);
    // Ten never came (failed to load): released, and the banks are not shrunk while mostly full.
    b.reserve(0);
    let s = b.store();
    assert_eq!((s.used(), s.capacity()), (held.len(), 101));
    drop(s);
    // A reservation nothing used is given back by shrinking.
    drop(held);
    let b = BackboneBanks::new(1, H, 2 * H);
    b.reserve(1000);
    let before = b.store().resize_bytes();
    let one = b.register(task(3, 1.0, &[(0, Location::Ffn)]));
    let s = b.store();
    let row_bytes = s.bank(0, Location::Ffn).bytes() / s.capacity();
    assert!(
        s.resize_bytes() - before <= 2 * row_bytes as u64,
        "widening copied {} bytes: rows not in use were touched",
        s.resize_bytes() - before
    );
    assert_eq!(s.index(one.id(), 0, Location::Ffn), 1);
    drop(s);
    drop(one);
    let b = BackboneBanks::new(1, H, 2 * H);
    b.reserve(1000);
    b.reserve(0);
    assert!(b.store().capacity() <= 10, "{}", b.store().capacity());
}

#[test]
fn growth_one_registration_at_a_time_copies_a_bounded_multiple_of_the_banks() {
    // 2,000 registrations one by one: a resize per registration would copy ~n^2/2 rows.
    let b = BackboneBanks::new(2, H, 2 * H);
    let held: Vec<_> = (0..2000).map(|i| b.register(task(2, i as f32, &[(0, Location::Ffn), (1, Location::Attention)]))).collect();
    let s = b.store();
    assert_eq!(s.used(), held.len());
    // Growth by 1.25x copies at most 1 / (1 - 1 / 1.25) = 5 times the final size.
    assert!(s.resize_bytes() <= 5 * s.bytes() as u64, "copied {} bytes for banks of {}", s.resize_bytes(), s.bytes());
    assert!(s.capacity() <= held.len() * 5 / 4 + 2, "capacity {}", s.capacity());
}

#[test]
fn without_batches_writes_and_frees_apply_at_once() {
    // Registration churn with no traffic must not queue weights: nothing waits for a batch.
    let b = BackboneBanks::new(1, H, 2 * H);
    for i in 0..50 {
        let rows = b.register(task(2, i as f32, &[(0, Location::Ffn)]));
        assert_eq!(b.store.lock().unwrap().used(), 1, "written at registration");
        drop(rows);
        let raw = b.store.lock().unwrap();
        assert_eq!((raw.used(), raw.rx.try_iter().count()), (0, 0), "freed at the last drop, nothing queued");
    }
}

#[test]
fn a_task_dropped_before_its_write_takes_no_row() {
    let b = BackboneBanks::new(1, H, 2 * H);
    drop(b.register(task(2, 1.0, &[(0, Location::Ffn)])));
    assert_eq!(b.store().used(), 0);
}

#[test]
fn stack_rows_share_the_task_row_pass_through_elsewhere_and_survive_shrinking() {
    let b = BackboneBanks::new(1, H, 2 * H);
    let plain: Vec<_> = (0..12).map(|i| b.register(task(2, i as f32, &[(0, Location::Ffn)]))).collect();
    let mut w = task(2, 20.0, &[(0, Location::Ffn)]);
    let lower = task(3, 30.0, &[(0, Location::Ffn)]);
    w.stack = Some(StackWrite { rule: lower.rule, slots: lower.slots });
    let stacked = b.register(w);
    let row = |s: &BankStore| s.index(stacked.id(), 0, Location::Ffn) as usize;
    {
        let s = b.store();
        let st = s.stack_bank(0, Location::Ffn);
        assert_eq!(st.rows(), s.bank(0, Location::Ffn).rows(), "the stack bank has the main bank's rows");
        assert_eq!(st.down_w.slice(s![row(&s), .., ..3]), weights(3, 30.0).down_w.t());
        let mut flags = lower.rule.flags();
        flags[1] = 0.0; // ln_after off: the library passes the lower adapter's output on before the LayerNorm
        assert_eq!(st.rule.slice(s![row(&s), 0, ..]).to_vec(), flags.to_vec());
        for r in (0..st.rows()).filter(|&r| r != row(&s)) {
            assert!(st.rule.slice(s![r, 0, ..]).iter().all(|v| *v == 0.0), "row {r}: no flags, passes through");
        }
        assert_eq!(s.stack_bank(0, Location::Attention).width(), 1);
    }
    drop(plain); // below half use: rows move down and the banks shrink
    let s = b.store();
    let (st, r) = (s.stack_bank(0, Location::Ffn), row(&s));
    assert!(st.rows() < 14 && st.rows() == s.bank(0, Location::Ffn).rows());
    assert_eq!(st.down_w.slice(s![r, .., ..3]), weights(3, 30.0).down_w.t(), "the stack row moved with the task row");
    assert_eq!(st.rule[[r, 0, 6 + 2]], 1.0, "gelu");
    assert!(st.rule.slice(s![0, 0, ..]).iter().all(|v| *v == 0.0), "row 0 passes through");
}
