//! Synthetic bank tasks for the in-process bank tests (`banks_engine.rs`, `io_binding.rs`):
//! AdapterHub-shaped weights from a seed, every slot rule, and lanes over a few sequences.

use std::sync::Arc;

use adapterdrop_serve::engine::heads::to_matrix;
use adapterdrop_serve::engine::{Lane, Sequence};
use adapterdrop_serve::repository::adapterhub::{
    Activation, AdapterWeights, BottleneckWeights, HeadLayer, HeadWeights, Residual, SlotRule,
};
use adapterdrop_serve::repository::manifest::HeadKind;
use adapterdrop_serve::repository::{Backbone, Location, Registry, Task};
use adapterdrop_serve::runtime::Runtime;
use ndarray::{Array1, Array2};

use super::test_repo;

/// Deterministic values in [-scale, scale).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self, scale: f32) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
    }
    pub fn mat(&mut self, r: usize, c: usize, scale: f32) -> Array2<f32> {
        Array2::from_shape_simple_fn((r, c), || self.next(scale))
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Array1<f32> {
        Array1::from_shape_simple_fn(n, || self.next(scale))
    }
}

/// Synthetic AdapterHub weights for a backbone: every layer at `locations`, bottleneck `r`.
pub fn weights(bb: &Backbone, seed: u64, rule: SlotRule, r: usize, locations: &[Location], labels: usize) -> AdapterWeights {
    let h = bb.manifest.hidden_size;
    let mut g = Rng(seed * 7919 + 1);
    let mut slots = std::collections::BTreeMap::new();
    for layer in 0..bb.num_layers() {
        for &loc in locations {
            let w = BottleneckWeights { down_w: g.mat(r, h, 0.5), down_b: g.vec(r, 0.2), up_w: g.mat(h, r, 0.5), up_b: g.vec(h, 0.2) };
            slots.insert((layer, loc), w);
        }
    }
    let head = HeadWeights {
        kind: HeadKind::Classification,
        labels: (0..labels).map(|i| format!("l{i}")).collect(),
        layers: vec![HeadLayer { w: g.mat(h, h, 0.3), b: g.vec(h, 0.1) }, HeadLayer { w: g.mat(labels, h, 0.3), b: g.vec(labels, 0.1) }],
        activation: Some(Activation::Tanh),
    };
    AdapterWeights {
        name: format!("syn{seed}"),
        method: "bottleneck".into(),
        rule,
        slots,
        methods: Default::default(),
        leave_out: Vec::new(),
        head,
        stack: None,
    }
}

pub fn rule(ln_before: bool, ln_after: bool, residual: Residual, activation: Activation, scaling: f32) -> SlotRule {
    SlotRule { ln_before, ln_after, residual, activation, scaling, parallel: false }
}

/// A bank task: the test repository's `rand-houlsby` version directory (robust 0..=3) loaded
/// afresh, with synthetic weights in the banks.
pub fn bank_task(rt: &Runtime, reg: &Registry, w: AdapterWeights) -> Arc<Task> {
    let per_task = reg.resolve("rand-houlsby", None).unwrap();
    let dir = test_repo().join("tasks/rand-houlsby/1");
    let mut t = Task::load(rt, &dir, per_task.backbone.clone()).unwrap();
    t.attach_bank(Arc::new(w));
    assert!(t.bank.is_some(), "tiny-random has layer graphs");
    assert!(t.adapterhub.as_ref().unwrap().slots.is_empty(), "bottleneck weights are held once, in the banks");
    Arc::new(t)
}

pub fn seqs() -> Vec<Sequence> {
    [vec![101i64, 2023, 3185, 2003, 2307, 102], vec![101, 7592, 102], vec![101, 2023, 2001, 1037, 3185, 2143, 2172, 102]]
        .into_iter()
        .map(|ids| Sequence { mask: vec![1; ids.len()], types: vec![0; ids.len()], ids })
        .collect()
}

pub fn max_diff(a: &[Vec<f32>], b: &Array2<f32>) -> f32 {
    let a = to_matrix(a);
    assert_eq!(a.dim(), b.dim());
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

pub fn lane(t: &Arc<Task>, n: u32, rows: &[usize]) -> Lane {
    Lane { task: t.clone(), active: t.active_layers(Some(n)).unwrap(), rows: rows.to_vec() }
}

/// Every slot rule and activation, bottlenecks of different widths in one bank, drop depths mixed.
pub fn rules() -> Vec<(SlotRule, usize, &'static [Location])> {
    const BOTH: &[Location] = &[Location::Attention, Location::Ffn];
    const FFN: &[Location] = &[Location::Ffn];
    vec![
        (rule(true, true, Residual::H, Activation::Relu, 1.0), 2, FFN),   // Pfeiffer
        (rule(false, true, Residual::H, Activation::Gelu, 1.0), 8, BOTH), // Houlsby
        (rule(true, true, Residual::HPlusX, Activation::Silu, 1.0), 4, FFN),
        (rule(true, false, Residual::U, Activation::Tanh, 2.0), 3, BOTH),
        (rule(false, false, Residual::U, Activation::Sigmoid, 0.5), 16, FFN),
    ]
}
