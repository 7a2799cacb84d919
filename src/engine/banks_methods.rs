//! The LoRA / (IA)^3 bank of one layer (issue 14): per projection target (`Target`), `lora_a
//! [N, in, r]`, `lora_b [N, r, out]` (scaling folded in) and `scale [N, 1, out]`, the inputs
//! `methods.<target>.*` of `layer.onnx` (`tools/adapterdrop_tools/graphs_methods.py`). Row 0, and
//! every row of a task without that method, is zeros / ones: `(y + 0) * 1`, the plain projection
//! exactly. Only tasks with LoRA / (IA)^3 weights take a row ([`MethodStore`], its own row numbers),
//! so the bottleneck tasks cost nothing here: with none loaded the bank is row 0 alone, one unit
//! wide. Widths are per target (the widest rank written there).

use std::collections::{BTreeMap, HashMap};

use ndarray::{Array3, Axis, s};

use crate::repository::adapterhub::lora::{LayerMethods, MethodWeights, Target};

/// Largest growth step of the methods rows.
const GROWTH: f64 = 1.25;

/// The methods banks of every layer and which task holds which row.
#[derive(Debug)]
pub struct MethodStore {
    banks: Vec<MethodBank>,
    /// Task handle id -> (its row, the layers it has weights for).
    rows: HashMap<u64, (usize, Vec<usize>)>,
    /// Unused rows (> 0), lowest last.
    free: Vec<usize>,
    dims: (usize, usize),
    /// Rows changed since the device mirrors last read them (`runtime::device_banks`).
    pub(super) touched: crate::runtime::TouchedRows,
}

impl MethodStore {
    pub fn new(layers: usize, hidden: usize, ffn: usize) -> Self {
        let banks = (0..layers).map(|_| MethodBank::new(1, hidden, ffn)).collect();
        Self { banks, rows: HashMap::new(), free: Vec::new(), dims: (hidden, ffn), touched: Default::default() }
    }

    pub fn bank(&self, layer: usize) -> &MethodBank {
        &self.banks[layer]
    }

    pub fn bytes(&self) -> usize {
        self.banks.iter().map(MethodBank::bytes).sum()
    }

    /// Rows (row 0 included).
    pub fn capacity(&self) -> usize {
        self.banks.first().map_or(1, MethodBank::rows)
    }

    /// A task's row at `layer`; 0 where it has no weights there.
    pub fn index(&self, id: u64, layer: usize) -> u32 {
        match self.rows.get(&id) {
            Some((row, layers)) if layers.contains(&layer) => *row as u32,
            _ => 0,
        }
    }

    /// Writes a task's weights into a free row (growing the banks by up to 1.25x); nothing for a
    /// task without LoRA / (IA)^3 weights.
    pub(super) fn write(&mut self, id: u64, methods: &BTreeMap<usize, LayerMethods>) {
        if methods.is_empty() {
            return;
        }
        if self.free.is_empty() {
            let cap = self.capacity();
            let grown = ((cap as f64 * GROWTH).ceil() as usize).max(cap + 1);
            for bank in &mut self.banks {
                *bank = bank.resized(grown, cap);
            }
            self.free.extend((cap..grown).rev());
            self.touched.everything();
        }
        let row = self.free.pop().expect("grown above");
        self.touched.mark(row);
        for (&layer, m) in methods {
            if let Some(bank) = self.banks.get_mut(layer) {
                bank.write(row, m);
            }
        }
        self.rows.insert(id, (row, methods.keys().copied().collect()));
    }

    /// Frees a task's row (plain again); with no such task left the banks go back to row 0 alone.
    pub(super) fn free(&mut self, id: u64) {
        let Some((row, _)) = self.rows.remove(&id) else { return };
        self.touched.mark(row);
        if self.rows.is_empty() {
            self.touched.everything();
            let (hidden, ffn) = self.dims;
            self.banks.iter_mut().for_each(|b| *b = MethodBank::new(1, hidden, ffn));
            self.free.clear();
            return;
        }
        for bank in &mut self.banks {
            bank.clear(row);
        }
        self.free.push(row);
        self.free.sort_unstable_by(|a, b| b.cmp(a));
    }
}

#[derive(Debug)]
pub struct TargetBank {
    pub lora_a: Array3<f32>,
    pub lora_b: Array3<f32>,
    pub scale: Array3<f32>,
}

impl TargetBank {
    fn new(rows: usize, inputs: usize, outputs: usize, width: usize) -> Self {
        Self {
            lora_a: Array3::zeros((rows, inputs, width)),
            lora_b: Array3::zeros((rows, width, outputs)),
            scale: Array3::ones((rows, 1, outputs)),
        }
    }

    fn width(&self) -> usize {
        self.lora_a.len_of(Axis(2))
    }

    fn resized(&self, rows: usize, width: usize, keep: usize) -> Self {
        let (inputs, outputs) = (self.lora_a.len_of(Axis(1)), self.lora_b.len_of(Axis(2)));
        let mut out = Self::new(rows, inputs, outputs, width);
        let (k, w) = (keep.min(rows).min(self.lora_a.len_of(Axis(0))), width.min(self.width()));
        out.lora_a.slice_mut(s![..k, .., ..w]).assign(&self.lora_a.slice(s![..k, .., ..w]));
        out.lora_b.slice_mut(s![..k, ..w, ..]).assign(&self.lora_b.slice(s![..k, ..w, ..]));
        out.scale.slice_mut(s![..k, .., ..]).assign(&self.scale.slice(s![..k, .., ..]));
        out
    }

    fn clear(&mut self, row: usize) {
        self.lora_a.index_axis_mut(Axis(0), row).fill(0.0);
        self.lora_b.index_axis_mut(Axis(0), row).fill(0.0);
        self.scale.index_axis_mut(Axis(0), row).fill(1.0);
    }
}

/// One layer's methods bank: a [`TargetBank`] per [`Target`], in `Target::ALL` order.
#[derive(Debug)]
pub struct MethodBank {
    pub targets: Vec<TargetBank>,
}

impl MethodBank {
    pub fn new(rows: usize, hidden: usize, ffn: usize) -> Self {
        let targets = Target::ALL
            .iter()
            .map(|t| {
                let (i, o) = t.dims(hidden, ffn);
                TargetBank::new(rows, i, o, 1)
            })
            .collect();
        Self { targets }
    }

    pub fn rows(&self) -> usize {
        self.targets[0].scale.len_of(Axis(0))
    }

    pub fn target(&self, t: Target) -> &TargetBank {
        &self.targets[t as usize]
    }

    pub fn bytes(&self) -> usize {
        self.targets.iter().map(|t| 4 * (t.lora_a.len() + t.lora_b.len() + t.scale.len())).sum()
    }

    /// The same bank with `rows` rows; rows `[0, keep)` are copied, widths kept.
    pub(super) fn resized(&self, rows: usize, keep: usize) -> Self {
        Self { targets: self.targets.iter().map(|t| t.resized(rows, t.width(), keep)).collect() }
    }

    /// Writes one task's weights of this layer into `row` (cleared first), widening a target's
    /// bank to the task's rank where needed.
    pub(super) fn write(&mut self, row: usize, methods: &LayerMethods) {
        self.clear(row);
        for (t, w) in methods {
            let bank = &mut self.targets[*t as usize];
            match w {
                MethodWeights::Lora { lora_a, lora_b } => {
                    let r = lora_a.ncols();
                    if r > bank.width() {
                        *bank = bank.resized(bank.lora_a.len_of(Axis(0)), r, usize::MAX);
                    }
                    bank.lora_a.slice_mut(s![row, .., ..r]).assign(lora_a);
                    bank.lora_b.slice_mut(s![row, ..r, ..]).assign(lora_b);
                }
                MethodWeights::Scale(v) => bank.scale.slice_mut(s![row, 0, ..]).assign(v),
            }
        }
    }

    pub(super) fn clear(&mut self, row: usize) {
        for t in &mut self.targets {
            t.clear(row);
        }
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{Array1, Array2};

    use super::*;

    #[test]
    fn rows_are_plain_until_written_and_after_clearing() {
        let mut b = MethodBank::new(3, 4, 8);
        let mut m = LayerMethods::new();
        m.insert(Target::Output, MethodWeights::Lora { lora_a: Array2::from_elem((8, 2), 1.0), lora_b: Array2::from_elem((2, 4), 2.0) });
        m.insert(Target::Key, MethodWeights::Scale(Array1::from_elem(4, 3.0)));
        b.write(2, &m);
        let out = b.target(Target::Output);
        assert_eq!(out.lora_a.shape(), &[3, 8, 2], "widened to the rank");
        assert!(out.lora_a.index_axis(Axis(0), 0).iter().all(|v| *v == 0.0));
        assert!(out.lora_b.index_axis(Axis(0), 2).iter().all(|v| *v == 2.0));
        assert!(b.target(Target::Key).scale.index_axis(Axis(0), 2).iter().all(|v| *v == 3.0));
        assert!(b.target(Target::Key).scale.index_axis(Axis(0), 0).iter().all(|v| *v == 1.0), "row 0 scales by one");
        assert_eq!(b.target(Target::Query).lora_a.shape(), &[3, 4, 1], "untouched targets stay one wide");
        b.clear(2);
        assert!(b.target(Target::Key).scale.index_axis(Axis(0), 2).iter().all(|v| *v == 1.0));
        assert!(b.target(Target::Output).lora_b.index_axis(Axis(0), 2).iter().all(|v| *v == 0.0));
        let grown = b.resized(5, 3);
        assert_eq!(grown.target(Target::Output).lora_a.shape(), &[5, 8, 2]);
        assert!(grown.target(Target::Intermediate).scale.iter().all(|v| *v == 1.0));
    }

    #[test]
    fn only_method_tasks_take_rows() {
        let mut st = MethodStore::new(2, 4, 8);
        st.write(1, &BTreeMap::new());
        assert_eq!((st.capacity(), st.index(1, 0)), (1, 0), "a bottleneck task takes no row");
        let mut m = BTreeMap::new();
        m.insert(1, LayerMethods::from([(Target::Value, MethodWeights::Scale(Array1::from_elem(4, 2.0)))]));
        st.write(7, &m);
        st.write(8, &m);
        let (a, b) = (st.index(7, 1), st.index(8, 1));
        assert!(a > 0 && b > 0 && a != b);
        assert_eq!(st.index(7, 0), 0, "no weights at layer 0");
        st.free(7);
        assert_eq!(st.index(7, 1), 0);
        assert!(st.bank(1).target(Target::Value).scale.index_axis(Axis(0), a as usize).iter().all(|v| *v == 1.0));
        st.write(9, &m);
        assert_eq!(st.index(9, 1), a, "the freed row is reused");
        st.free(8);
        st.free(9);
        assert_eq!(st.capacity(), 1, "back to row 0 alone");
    }
}
