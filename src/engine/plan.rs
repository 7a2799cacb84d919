//! The execution plan of a bank batch, as data (issue 12 item 5): which physical rows enter each
//! layer, which row each slot output continues, and which bank row every row takes at every slot.
//! A pure function, no ONNX Runtime: the CPU runner (`banked.rs`) executes it, a CUDA runner can too.
//!
//! A physical row serves every lane whose choices so far were identical for that input (the rule of
//! `executor.rs`): rows split only at the first slot where the lanes on them want different bank rows,
//! so AdapterDrop's dropped lower layers run once for all tasks.

/// Bank row of one lane at one slot of one layer; 0 is "no adapter" (the plain slot).
pub type BankIndex = u32;

/// Where a lane's adapters are: per layer, its bank row at the attention and the FFN slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanePath {
    pub index: Vec<[BankIndex; 2]>,
    /// Per layer, its row in the LoRA / (IA)^3 bank, which changes the layer's projections, so rows
    /// split *before* the layer (empty: none anywhere).
    pub methods: Vec<BankIndex>,
    /// Input rows (indices into the batch's sequences) the lane runs on.
    pub rows: Vec<usize>,
    /// The invertible adapter (a Stack's, at the embeddings) the lane's rows take; 0: none. Lanes
    /// with the same nonzero key share it; rows split before layer 0 where keys differ.
    pub invertible: BankIndex,
    /// Lanes with the same head key share one head computation (the task version).
    pub head: usize,
}

/// The inputs of one layer graph beside the hidden states and the banks.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LayerPlan {
    /// Input row of every physical row entering the layer (its attention mask row).
    pub input_rows: Vec<usize>,
    /// LoRA / (IA)^3 bank row of every physical row entering the layer.
    pub methods_index: Vec<i64>,
    /// For each row after the attention-slot split: the entering row it continues.
    pub attention_rows: Vec<i64>,
    pub attention_index: Vec<i64>,
    /// For each row after the FFN-slot split: the row (after the attention slot) it continues.
    pub ffn_rows: Vec<i64>,
    pub ffn_index: Vec<i64>,
}

/// Lanes sharing one head, with the final physical row of each of their input rows, in lane order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadGroup {
    pub head: usize,
    pub lanes: Vec<usize>,
    pub rows: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Input row of every physical row the embeddings compute (rows split before layer 0 where
    /// lanes' LoRA / (IA)^3 rows or invertible adapters differ there).
    pub embedding_rows: Vec<usize>,
    /// The invertible adapter key (`LanePath::invertible`) of every embedding row; 0: none.
    pub embedding_invertible: Vec<i64>,
    pub layers: Vec<LayerPlan>,
    pub heads: Vec<HeadGroup>,
    /// Physical rows entering each layer (what `ExecStats.layer_rows` reports).
    pub rows_per_layer: Vec<usize>,
    /// Physical rows leaving the last layer.
    pub final_rows: usize,
    /// Input row of each physical row leaving the last layer (its real length, for the heads).
    pub final_inputs: Vec<usize>,
}

/// Physical rows while planning: the input row each continues and the lanes it serves.
struct Rows {
    input_of: Vec<usize>,
    lanes_of: Vec<Vec<usize>>,
}

impl LanePath {
    fn slot(&self, layer: usize, slot: usize) -> BankIndex {
        self.index.get(layer).map_or(0, |i| i[slot])
    }

    fn method(&self, layer: usize) -> BankIndex {
        self.methods.get(layer).copied().unwrap_or(0)
    }
}

impl Rows {
    /// Splits every row whose lanes want different keys; returns (source row, bank row) per new
    /// row, the bank row being the key's first part (its second part only splits: the next layer's
    /// methods row). The split copies stay next to their source row, in order of first use.
    fn split(&mut self, lanes: &[LanePath], key: impl Fn(&LanePath) -> (BankIndex, BankIndex)) -> (Vec<i64>, Vec<i64>) {
        let (mut src, mut index, mut input_of, mut lanes_of) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (r, served) in self.lanes_of.iter().enumerate() {
            let mut groups: Vec<((BankIndex, BankIndex), Vec<usize>)> = Vec::new();
            for &l in served {
                let want = key(&lanes[l]);
                match groups.iter_mut().find(|(b, _)| *b == want) {
                    Some((_, ls)) => ls.push(l),
                    None => groups.push((want, vec![l])),
                }
            }
            if groups.is_empty() {
                groups.push(((0, 0), Vec::new())); // a row no lane reads stays plain
            }
            for ((b, _), ls) in groups {
                src.push(r as i64);
                index.push(i64::from(b));
                input_of.push(self.input_of[r]);
                lanes_of.push(ls);
            }
        }
        self.input_of = input_of;
        self.lanes_of = lanes_of;
        (src, index)
    }
}

/// Plans a batch of `inputs` input rows through `layers` layers for `lanes`.
pub fn plan(lanes: &[LanePath], inputs: usize, layers: usize) -> Plan {
    let mut lanes_of = vec![Vec::new(); inputs];
    for (l, lane) in lanes.iter().enumerate() {
        for &r in &lane.rows {
            if !lanes_of[r].contains(&l) {
                lanes_of[r].push(l);
            }
        }
    }
    let mut rows = Rows { input_of: (0..inputs).collect(), lanes_of };
    let embedding_invertible = rows.split(lanes, |l| (l.invertible, l.method(0))).1;
    let mut plan = Plan { embedding_rows: rows.input_of.clone(), embedding_invertible, ..Default::default() };
    for layer in 0..layers {
        plan.rows_per_layer.push(rows.input_of.len());
        let input_rows = rows.input_of.clone();
        // Rows were split by this layer's methods row before it (all lanes of a row agree).
        let methods_index = rows.lanes_of.iter().map(|ls| ls.first().map_or(0, |&l| i64::from(lanes[l].method(layer)))).collect();
        let (attention_rows, attention_index) = rows.split(lanes, |l| (l.slot(layer, 0), 0));
        let (ffn_rows, ffn_index) = rows.split(lanes, |l| (l.slot(layer, 1), l.method(layer + 1)));
        plan.layers.push(LayerPlan { input_rows, methods_index, attention_rows, attention_index, ffn_rows, ffn_index });
    }
    plan.final_rows = rows.input_of.len();
    plan.final_inputs = rows.input_of.clone();
    let mut row_of = std::collections::HashMap::new();
    for (r, served) in rows.lanes_of.iter().enumerate() {
        for &l in served {
            row_of.insert((l, rows.input_of[r]), r);
        }
    }
    for (l, lane) in lanes.iter().enumerate() {
        let lane_rows = lane.rows.iter().map(|i| row_of[&(l, *i)]);
        match plan.heads.iter_mut().find(|g| g.head == lane.head) {
            Some(g) => {
                g.lanes.push(l);
                g.rows.extend(lane_rows);
            }
            None => plan.heads.push(HeadGroup { head: lane.head, lanes: vec![l], rows: lane_rows.collect() }),
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lane(index: &[[BankIndex; 2]], rows: &[usize], head: usize) -> LanePath {
        LanePath { index: index.to_vec(), methods: Vec::new(), rows: rows.to_vec(), head, invertible: 0 }
    }

    fn identity(n: usize) -> Vec<i64> {
        (0..n as i64).collect()
    }

    #[test]
    fn all_plain_is_identity_everywhere() {
        let p = plan(&[lane(&[[0, 0]; 3], &[0, 1, 2], 7)], 3, 3);
        assert_eq!(p.rows_per_layer, vec![3, 3, 3]);
        for l in &p.layers {
            assert_eq!(l.attention_rows, identity(3));
            assert_eq!(l.ffn_rows, identity(3));
            assert_eq!(l.attention_index, vec![0; 3]);
            assert_eq!(l.ffn_index, vec![0; 3]);
            assert_eq!(l.input_rows, vec![0, 1, 2]);
        }
        assert_eq!(p.heads, vec![HeadGroup { head: 7, lanes: vec![0], rows: vec![0, 1, 2] }]);
    }

    #[test]
    fn rows_split_at_the_first_differing_slot_only() {
        // Lane 0: adapters from layer 1 (ffn only); lane 1: dropped until layer 2, then its own.
        let a = lane(&[[0, 0], [0, 3], [0, 3]], &[0, 1], 0);
        let b = lane(&[[0, 0], [0, 0], [5, 5]], &[0, 1], 1);
        let p = plan(&[a, b], 2, 3);
        assert_eq!(p.rows_per_layer, vec![2, 2, 4]);
        // layer 0: shared, nothing splits
        assert_eq!(p.layers[0].ffn_rows, identity(2));
        // layer 1 splits at the ffn slot: row 0 -> (lane 0 with 3, lane 1 plain), row 1 likewise
        assert_eq!(p.layers[1].attention_rows, identity(2));
        assert_eq!(p.layers[1].ffn_rows, vec![0, 0, 1, 1]);
        assert_eq!(p.layers[1].ffn_index, vec![3, 0, 3, 0]);
        // layer 2: rows already split, each row follows its lane
        assert_eq!(p.layers[2].input_rows, vec![0, 0, 1, 1]);
        assert_eq!(p.layers[2].attention_rows, identity(4));
        assert_eq!(p.layers[2].attention_index, vec![0, 5, 0, 5]);
        assert_eq!(p.layers[2].ffn_index, vec![3, 5, 3, 5]);
        assert_eq!(p.heads[0].rows, vec![0, 2]);
        assert_eq!(p.heads[1].rows, vec![1, 3]);
        assert_eq!(p.final_rows, 4);
    }

    #[test]
    fn identical_lanes_share_rows_and_duplicates_collapse() {
        // Two lanes of one task (two requests) on different inputs, a third task on input 1 only,
        // and a lane naming the same input twice.
        let t = [[0, 2], [0, 2]];
        let p = plan(&[lane(&t, &[0], 4), lane(&t, &[1], 4), lane(&[[0, 9], [0, 9]], &[1], 5), lane(&t, &[1, 1], 4)], 2, 2);
        assert_eq!(p.rows_per_layer, vec![2, 3]);
        assert_eq!(p.layers[0].ffn_rows, vec![0, 1, 1]);
        assert_eq!(p.layers[0].ffn_index, vec![2, 2, 9]);
        assert_eq!(p.heads.len(), 2);
        assert_eq!(p.heads[0], HeadGroup { head: 4, lanes: vec![0, 1, 3], rows: vec![0, 1, 1, 1] });
        assert_eq!(p.heads[1], HeadGroup { head: 5, lanes: vec![2], rows: vec![2] });
    }

    #[test]
    fn attention_split_feeds_the_ffn_map() {
        // Houlsby-like lane splits at the attention slot of layer 0; the FFN map continues those rows.
        let p = plan(&[lane(&[[1, 1]], &[0], 0), lane(&[[0, 0]], &[0], 1)], 1, 1);
        assert_eq!(p.layers[0].attention_rows, vec![0, 0]);
        assert_eq!(p.layers[0].attention_index, vec![1, 0]);
        assert_eq!(p.layers[0].ffn_rows, vec![0, 1]);
        assert_eq!(p.layers[0].ffn_index, vec![1, 0]);
        assert_eq!(p.final_rows, 2);
    }

    #[test]
    fn a_row_no_lane_reads_stays_plain() {
        let p = plan(&[lane(&[[0, 1]], &[1], 0)], 2, 1);
        assert_eq!(p.layers[0].ffn_rows, vec![0, 1]);
        assert_eq!(p.layers[0].ffn_index, vec![0, 1]);
        assert_eq!(p.heads[0].rows, vec![1]);
    }

    #[test]
    fn methods_split_rows_before_their_layer() {
        // Lane 0: LoRA from layer 1; lane 1: LoRA at layer 0 (split before the embeddings' output
        // enters layer 0); lane 2: plain. Two inputs; lanes 0 and 2 read input 0 only.
        let mut a = lane(&[[0, 0]; 2], &[0], 0);
        a.methods = vec![0, 4];
        let mut b = lane(&[[0, 0]; 2], &[0, 1], 1);
        b.methods = vec![6, 6];
        let c = lane(&[[0, 0]; 2], &[0], 2);
        let p = plan(&[a, b, c], 2, 2);
        assert_eq!(p.embedding_rows, vec![0, 0, 1], "input 0: lanes 0 and 2 plain, lane 1 with 6; input 1: lane 1");
        assert_eq!(p.layers[0].methods_index, vec![0, 6, 6]);
        // layer 0's FFN split separates lane 0 (LoRA 4 at layer 1) from lane 2 (plain).
        assert_eq!(p.layers[0].ffn_rows, vec![0, 0, 1, 2]);
        assert_eq!(p.layers[1].input_rows, vec![0, 0, 0, 1]);
        assert_eq!(p.layers[1].methods_index, vec![4, 0, 6, 6]);
        assert_eq!(p.heads[0].rows, vec![0]);
        assert_eq!(p.heads[1].rows, vec![2, 3]);
        assert_eq!(p.heads[2].rows, vec![1]);
        // Without methods the embeddings run once per input.
        assert_eq!(plan(&[lane(&[[0, 1]], &[0, 1], 0)], 2, 1).embedding_rows, vec![0, 1]);
    }

    #[test]
    fn rows_split_before_the_embeddings_output_where_invertible_adapters_differ() {
        // A Stack lane (invertible key 1) and a plain lane on the same two inputs.
        let mut stack = lane(&[[0, 2]], &[0, 1], 0);
        stack.invertible = 1;
        let p = plan(&[stack, lane(&[[0, 2]], &[0, 1], 1)], 2, 1);
        assert_eq!(p.embedding_rows, vec![0, 0, 1, 1]);
        assert_eq!(p.embedding_invertible, vec![1, 0, 1, 0]);
        assert_eq!(p.heads[0].rows, vec![0, 2]);
        // Without invertible adapters nothing splits and every key is 0.
        let p = plan(&[lane(&[[0, 2]], &[0, 1], 0)], 2, 1);
        assert_eq!((p.embedding_rows, p.embedding_invertible), (vec![0, 1], vec![0, 0]));
    }
}
