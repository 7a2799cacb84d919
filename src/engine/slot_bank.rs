//! One (layer, slot location) bank's tensors and the row operations the bank store uses on them.

use ndarray::{Array3, Axis, s};

use super::banks::PLAIN_RULE;
use crate::repository::adapterhub::{BottleneckWeights, RULE_FLAGS};

/// One (layer, location) bank: `down_w [N,H,r]`, `down_b [N,1,r]`, `up_w [N,r,H]`, `up_b [N,1,H]`,
/// `rule [N,1,K]`, weights in the row-vector layout the graph multiplies (`u @ down_w`).
#[derive(Debug)]
pub struct Bank {
    pub down_w: Array3<f32>,
    pub down_b: Array3<f32>,
    pub up_w: Array3<f32>,
    pub up_b: Array3<f32>,
    pub rule: Array3<f32>,
}

impl Bank {
    pub(super) fn new(rows: usize, hidden: usize, width: usize) -> Self {
        let mut rule = Array3::zeros((rows, 1, RULE_FLAGS));
        rule.slice_mut(s![0, 0, ..]).assign(&ndarray::ArrayView1::from(&PLAIN_RULE));
        Self {
            down_w: Array3::zeros((rows, hidden, width)),
            down_b: Array3::zeros((rows, 1, width)),
            up_w: Array3::zeros((rows, width, hidden)),
            up_b: Array3::zeros((rows, 1, hidden)),
            rule,
        }
    }

    pub fn rows(&self) -> usize {
        self.rule.len_of(Axis(0))
    }

    pub fn width(&self) -> usize {
        self.down_w.len_of(Axis(2))
    }

    pub fn bytes(&self) -> usize {
        4 * (self.down_w.len() + self.down_b.len() + self.up_w.len() + self.up_b.len() + self.rule.len())
    }

    /// The same bank with `rows` rows and bottleneck `width`; rows `[0, keep)` are copied.
    pub(super) fn resized(&self, rows: usize, width: usize, keep: usize) -> Self {
        let hidden = self.up_b.len_of(Axis(2));
        let mut out = Self::new(rows, hidden, width);
        let (k, w) = (keep.min(rows).min(self.rows()), width.min(self.width()));
        out.down_w.slice_mut(s![..k, .., ..w]).assign(&self.down_w.slice(s![..k, .., ..w]));
        out.down_b.slice_mut(s![..k, .., ..w]).assign(&self.down_b.slice(s![..k, .., ..w]));
        out.up_w.slice_mut(s![..k, ..w, ..]).assign(&self.up_w.slice(s![..k, ..w, ..]));
        out.up_b.slice_mut(s![..k, .., ..]).assign(&self.up_b.slice(s![..k, .., ..]));
        out.rule.slice_mut(s![..k, .., ..]).assign(&self.rule.slice(s![..k, .., ..]));
        out
    }

    /// Writes a free row, which is all zero (rows are cleared when freed or moved and new ones
    /// start zeroed), so only the task's own columns are touched.
    pub(super) fn write(&mut self, row: usize, rule: &[f32; RULE_FLAGS], w: &BottleneckWeights) {
        let r = w.width();
        debug_assert!(self.up_b.index_axis(Axis(0), row).iter().all(|v| *v == 0.0), "row {row} is not free");
        assign_transposed(self.down_w.slice_mut(s![row, .., ..r]), w.down_w.view());
        self.down_b.slice_mut(s![row, 0, ..r]).assign(&w.down_b);
        assign_transposed(self.up_w.slice_mut(s![row, ..r, ..]), w.up_w.view());
        self.up_b.slice_mut(s![row, 0, ..]).assign(&w.up_b);
        self.rule.slice_mut(s![row, 0, ..]).assign(&ndarray::ArrayView1::from(rule));
    }

    pub(super) fn clear(&mut self, row: usize) {
        self.down_w.index_axis_mut(Axis(0), row).fill(0.0);
        self.down_b.index_axis_mut(Axis(0), row).fill(0.0);
        self.up_w.index_axis_mut(Axis(0), row).fill(0.0);
        self.up_b.index_axis_mut(Axis(0), row).fill(0.0);
        self.rule.index_axis_mut(Axis(0), row).fill(0.0);
    }

    pub(super) fn move_row(&mut self, from: usize, to: usize) {
        fn mv(a: &mut Array3<f32>, from: usize, to: usize) {
            let src = a.index_axis(Axis(0), from).to_owned();
            a.index_axis_mut(Axis(0), to).assign(&src);
        }
        for a in [&mut self.down_w, &mut self.down_b, &mut self.up_w, &mut self.up_b, &mut self.rule] {
            mv(a, from, to);
        }
        self.clear(from);
    }
}

/// `dst = src.t()`. ndarray's strided `assign` of a transposed view took a quarter of start-up
/// with 2,000 tasks (perf); plain loops over the rows of `dst` do the same copy several times faster.
fn assign_transposed(mut dst: ndarray::ArrayViewMut2<f32>, src: ndarray::ArrayView2<f32>) {
    let cols = src.ncols();
    match src.as_slice() {
        Some(s) if dst.nrows() == cols && dst.ncols() == src.nrows() => {
            for (i, mut d) in dst.outer_iter_mut().enumerate() {
                match d.as_slice_mut() {
                    Some(d) => d.iter_mut().enumerate().for_each(|(j, v)| *v = s[j * cols + i]),
                    None => d.iter_mut().enumerate().for_each(|(j, v)| *v = s[j * cols + i]),
                }
            }
        }
        _ => dst.assign(&src.t()),
    }
}
