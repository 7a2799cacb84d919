//! Runs one engine batch through a backbone: shared segments over all rows, adapter slots on the
//! rows whose lanes want them.
//!
//! A *lane* is one task (with its active layers) applied to some input rows. A *physical row* is
//! one hidden-state row; it serves every lane whose slot choices so far were identical for that
//! input. At a slot where a row's lanes want different graphs the row splits (its state is copied),
//! so rows are duplicated only where task paths really differ. Backbone segments always run once
//! over every physical row. This generalises the paper's Parallel block, which tiles all k tasks
//! at the first adapter.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ndarray::{Array2, Array3, ArrayView2, Axis, concatenate, s};

use super::fusion::{self, FusionWeights, Group, Kind};
use super::heads::{HeadSource, LaneOutput, run_task_head};
use super::tensors::{Hidden, f32_input, i64_input, run_hidden, run_slot};
use crate::error::EngineError;
use crate::repository::{ActiveLayers, Backbone, FusionSlot, Location, Task};
use crate::runtime::Graph;

/// One tokenized sequence, unpadded.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub ids: Vec<i64>,
    pub mask: Vec<i64>,
    pub types: Vec<i64>,
}

/// One task applied to some rows of the batch.
pub struct Lane {
    pub task: Arc<Task>,
    pub active: ActiveLayers,
    /// Indices into the batch's sequences.
    pub rows: Vec<usize>,
}

/// What the planner did, for benchmarks and metrics.
#[derive(Debug, Clone, Default)]
pub struct ExecStats {
    /// Physical rows through each layer's backbone segments.
    pub layer_rows: Vec<usize>,
    /// Rows run through adapter slot graphs, summed over all slots.
    pub adapter_rows: usize,
    pub padded_len: usize,
    /// Rows run through fused adapters' output graphs (also counted in `adapter_rows`).
    pub fusion_adapter_rows: usize,
    /// Fused-adapter row runs avoided because fusions on the same rows shared one adapter run.
    pub fusion_adapter_rows_saved: usize,
    /// Per lane (index into the lanes given to `execute`; shorter when the last lanes ran no
    /// fusion): AdapterFusion weights at each fusion slot.
    pub fusion: Vec<Vec<FusionWeights>>,
    /// ONNX Runtime session runs the batch made (embeddings, segments, slots, layers, heads).
    pub graph_runs: usize,
    /// Lanes that ran on the adapter banks (the rest ran on the per-task path).
    pub bank_lanes: usize,
    /// Real token positions that entered per-token work (FFN, adapter slots, LayerNorms),
    /// summed over the layers of the batch: what the batch really had to compute.
    pub real_tokens: usize,
    /// Token positions per-token work actually computed, padding included, summed over layers;
    /// `real_tokens / computed_tokens` is the batch's padding efficiency.
    pub computed_tokens: usize,
    /// Token positions inside attention, padding included, summed over layers.
    pub attention_tokens: usize,
}

impl ExecStats {
    /// Counts one layer's token positions: `rows` physical rows (input rows of `seqs`, a row
    /// per split copy) padded to `padded_len`, with per-token work on every padded position.
    pub(crate) fn count_padded_layer(&mut self, seqs: &[Sequence], rows: impl IntoIterator<Item = usize>, padded_len: usize) {
        let (mut n, mut real) = (0, 0);
        for r in rows {
            n += 1;
            real += seqs[r].ids.len();
        }
        self.real_tokens += real;
        self.computed_tokens += n * padded_len;
        self.attention_tokens += n * padded_len;
    }
}

/// Slot graph choice of one lane at one slot; compared by graph identity.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Choice(usize);

const PLAIN: Choice = Choice(0);

struct State<'a> {
    lanes: &'a [Lane],
    hidden: Hidden,
    mask: Array2<i64>,
    /// For each physical row: its input row and the lanes it serves.
    input_of: Vec<usize>,
    lanes_of: Vec<Vec<usize>>,
}

/// Distinct paths a set of task runs takes through a backbone of `layers` layers: the physical
/// rows each input ends with after every split (see the module doc), so request limits and
/// batch budgets can count the rows the engine really runs. Two runs share a path when they
/// choose the same graph (plain, adapter or fusion) at every slot.
pub fn paths<'a>(layers: usize, runs: impl IntoIterator<Item = (&'a Task, &'a ActiveLayers)>) -> usize {
    let mut distinct: BTreeSet<Vec<usize>> = BTreeSet::new();
    for (task, active) in runs {
        let path = (0..layers)
            .flat_map(|layer| [Location::Attention, Location::Ffn].map(|loc| (layer, loc)))
            .map(|(layer, loc)| match task.fusion_slot(active, layer, loc) {
                Some(f) => Arc::as_ptr(f) as usize,
                None => task.slot(active, layer, loc).map_or(PLAIN.0, |g| Arc::as_ptr(g) as usize),
            })
            .collect();
        distinct.insert(path);
    }
    distinct.len().max(1)
}

/// Returns one output per lane ([`LaneOutput`]: a vector per row, rows in the lane's order).
pub fn execute(backbone: &Backbone, seqs: &[Sequence], lanes: &[Lane]) -> Result<(Vec<LaneOutput>, ExecStats), EngineError> {
    let runs = crate::runtime::session_runs();
    let (ids, types, mask) = pad(seqs, backbone.manifest.pad_token_id);
    let (iv, tv) = (ids.view(), types.view());
    let hidden = run_hidden(&backbone.embeddings, vec![("input_ids", i64_input(&iv)?), ("token_type_ids", i64_input(&tv)?)], "hidden")?;
    let mut lanes_of = vec![Vec::new(); seqs.len()];
    for (l, lane) in lanes.iter().enumerate() {
        for &r in &lane.rows {
            lanes_of[r].push(l);
        }
    }
    let mut st = State { lanes, hidden, mask, input_of: (0..seqs.len()).collect(), lanes_of };
    let mut stats = ExecStats { padded_len: ids.ncols(), ..Default::default() };
    for (layer, graphs) in backbone.layers.iter().enumerate() {
        stats.layer_rows.push(st.hidden.rows()?);
        stats.count_padded_layer(seqs, st.input_of.iter().copied(), ids.ncols());
        let h = {
            let mv = st.mask.view();
            run_hidden(&graphs.attention, vec![("hidden", st.hidden.input()?), ("attention_mask", i64_input(&mv)?)], "h")?
        };
        st.slot(backbone, layer, Location::Attention, h, &mut stats)?;
        let h = run_hidden(&graphs.ffn, vec![("hidden", st.hidden.input()?)], "h")?;
        st.slot(backbone, layer, Location::Ffn, h, &mut stats)?;
    }
    // A batch larger than the batch budget gives the memory it took back when it ends
    // (the head run shrinks the arena, then the heap is trimmed); smaller ones keep it for reuse.
    let large = large_batch(st.input_of.len().max(seqs.len()) * stats.padded_len);
    if large {
        crate::runtime::shrink_arena_after_next_run();
    }
    let logits = st.heads(seqs);
    if large {
        crate::runtime::trim_heap();
    }
    stats.graph_runs = (crate::runtime::session_runs() - runs) as usize;
    logits.map(|logits| (logits, stats))
}

/// Padded tokens (physical rows x longest sequence) above which a batch returns its memory:
/// `batching.max_batch_tokens` (set at start-up), so batches the scheduler forms within budget
/// keep theirs for reuse and only a request larger than the budget costs the allocations again.
static SHRINK_ABOVE_TOKENS: AtomicUsize = AtomicUsize::new(16_384);

/// Whether a batch of this many padded row-tokens gives its memory back when it ends.
pub(crate) fn large_batch(padded_tokens: usize) -> bool {
    padded_tokens > SHRINK_ABOVE_TOKENS.load(Ordering::Relaxed)
}

/// Sets the batch size above which memory is given back (see [`execute`]).
pub fn shrink_above(padded_tokens: usize) {
    SHRINK_ABOVE_TOKENS.store(padded_tokens, Ordering::Relaxed);
}

impl State<'_> {
    fn choice(&self, lane: usize, layer: usize, location: Location) -> Choice {
        let lane = &self.lanes[lane];
        if let Some(f) = lane.task.fusion_slot(&lane.active, layer, location) {
            return Choice(Arc::as_ptr(f) as usize);
        }
        lane.task.slot(&lane.active, layer, location).map_or(PLAIN, |g| Choice(Arc::as_ptr(g) as usize))
    }

    /// The fusion slot behind a choice, if it is one.
    fn fusion_of(&self, lane: usize, layer: usize, location: Location) -> Option<Arc<FusionSlot>> {
        let l = &self.lanes[lane];
        l.task.fusion_slot(&l.active, layer, location).cloned()
    }

    /// The adapter output graph `(h, x) -> up` behind an adapter choice, if its task declares one.
    fn adapter_up(&self, lane: usize, layer: usize, location: Location) -> Option<Arc<Graph>> {
        let l = &self.lanes[lane];
        l.task.adapter_up(&l.active, layer, location).cloned()
    }

    /// The adapter graph behind a non-plain choice, found through a lane that made it.
    fn adapter_graph(&self, lane: usize, layer: usize, location: Location) -> Arc<Graph> {
        let l = &self.lanes[lane];
        l.task.slot(&l.active, layer, location).expect("the witness lane chose this adapter").clone()
    }

    /// Splits rows whose lanes disagree at this slot, then runs each distinct slot graph once on
    /// its rows. `self.hidden` is the slot's `x`; it becomes the slot output. While all rows take
    /// the same graph, states stay where the graphs left them (on the GPU for CUDA); splits are
    /// regrouped on the GPU when there is one, else on host copies. Fusion slots run on the host.
    fn slot(&mut self, backbone: &Backbone, layer: usize, location: Location, h: Hidden, stats: &mut ExecStats) -> Result<(), EngineError> {
        let rows_before = self.input_of.len();
        let mut copies: Vec<usize> = Vec::new();
        let mut row_choice: Vec<Choice> = Vec::with_capacity(rows_before);
        let mut copy_choice: Vec<Choice> = Vec::new();
        // A representative lane per choice, to find its graph.
        let mut witness: BTreeMap<Choice, usize> = BTreeMap::new();
        for r in 0..rows_before {
            let mut groups: Vec<(Choice, Vec<usize>)> = Vec::new();
            for &lane in &self.lanes_of[r] {
                let c = self.choice(lane, layer, location);
                witness.entry(c).or_insert(lane);
                match groups.iter_mut().find(|(g, _)| *g == c) {
                    Some((_, ls)) => ls.push(lane),
                    None => groups.push((c, vec![lane])),
                }
            }
            let mut groups = groups.into_iter();
            let (first, first_lanes) = groups.next().unwrap_or((PLAIN, Vec::new()));
            self.lanes_of[r] = first_lanes;
            row_choice.push(first);
            for (c, ls) in groups {
                copies.push(r);
                self.input_of.push(self.input_of[r]);
                self.lanes_of.push(ls);
                copy_choice.push(c);
            }
        }
        // Copies are appended after every existing row, in the order they were made.
        row_choice.extend(copy_choice);
        let mut by_choice: BTreeMap<Choice, Vec<usize>> = BTreeMap::new();
        for (r, c) in row_choice.iter().enumerate() {
            by_choice.entry(*c).or_default().push(r);
        }
        let plain = backbone.layers[layer].plain_slot(location);
        // Fusion choices run together so that each fused adapter runs once per distinct row.
        let fusions: Vec<(Choice, Arc<FusionSlot>)> = by_choice
            .keys()
            .filter(|c| **c != PLAIN)
            .filter_map(|c| self.fusion_of(witness[c], layer, location).map(|f| (*c, f)))
            .collect();
        if fusions.is_empty() && copies.is_empty() && by_choice.len() == 1 {
            let (&c, _) = by_choice.iter().next().expect("one group");
            let adapter;
            let graph: &Graph = if c != PLAIN {
                stats.adapter_rows += row_choice.len();
                adapter = self.adapter_graph(witness[&c], layer, location);
                &adapter
            } else {
                plain
            };
            self.hidden = run_hidden(graph, vec![("h", h.input()?), ("x", self.hidden.input()?)], "y")?;
            return Ok(());
        }
        let x = std::mem::replace(&mut self.hidden, Hidden::Host(Array3::zeros((0, 0, 0))));
        if let (true, Hidden::Ort(hd), Hidden::Ort(xd), Some(ops)) = (fusions.is_empty(), &h, &x, plain.row_ops()) {
            // On the GPU: gather each group's rows, run its graph, and stack the outputs in group
            // order; the row bookkeeping is permuted to match, so nothing is scattered back.
            let src = |r: usize| if r < rows_before { r } else { copies[r - rows_before] };
            let mut parts = Vec::with_capacity(by_choice.len());
            let mut perm = Vec::with_capacity(row_choice.len());
            for (c, rows) in &by_choice {
                let idx: Vec<usize> = rows.iter().map(|&r| src(r)).collect();
                let (hg, xg) = (ops.gather(hd, &idx)?, ops.gather(xd, &idx)?);
                let adapter;
                let graph: &Graph = if *c != PLAIN {
                    stats.adapter_rows += rows.len();
                    adapter = self.adapter_graph(witness[c], layer, location);
                    &adapter
                } else {
                    plain
                };
                match run_hidden(graph, vec![("h", (&hg).into()), ("x", (&xg).into())], "y")? {
                    Hidden::Ort(y) => parts.push(y),
                    Hidden::Host(_) => return Err(EngineError::Contract("a CUDA slot graph returned host states".into())),
                }
                perm.extend_from_slice(rows);
            }
            self.input_of = perm.iter().map(|&r| self.input_of[r]).collect();
            let mut lanes_of = std::mem::take(&mut self.lanes_of);
            self.lanes_of = perm.iter().map(|&r| std::mem::take(&mut lanes_of[r])).collect();
            let src_rows: Vec<usize> = perm.iter().map(|&r| src(r)).collect();
            self.mask = self.mask.select(Axis(0), &src_rows);
            self.hidden = Hidden::Ort(ops.concat(&parts)?);
            return Ok(());
        }
        if fusions.is_empty() && plain.row_ops().is_none() {
            // On the CPU: groups in order of their first row, so an unchanged grouping keeps its
            // rows where they are.
            let mut groups: Vec<(Option<Arc<Graph>>, Vec<usize>)> = by_choice
                .iter()
                .map(|(c, rows)| ((*c != PLAIN).then(|| self.adapter_graph(witness[c], layer, location)), rows.clone()))
                .collect();
            groups.sort_by_key(|(_, rows)| rows[0]);
            let src_of: Vec<usize> = (0..rows_before).chain(copies.iter().copied()).collect();
            return self.groups_on_host(h, x, &groups, &src_of, plain, stats);
        }
        let mut h = h.into_host()?;
        let mut x = x.into_host()?;
        if !copies.is_empty() {
            h = concatenate![Axis(0), h, h.select(Axis(0), &copies)];
            x = concatenate![Axis(0), x, x.select(Axis(0), &copies)];
            self.mask = concatenate![Axis(0), self.mask, self.mask.select(Axis(0), &copies)];
        }
        let mut fused: BTreeMap<Choice, Array3<f32>> = BTreeMap::new();
        if !fusions.is_empty() {
            // Plain adapter choices whose adapter output graph a fusion here also needs join them.
            let fused_graphs: BTreeSet<usize> =
                fusions.iter().flat_map(|(_, f)| f.adapters.iter().map(|a| Arc::as_ptr(&a.graph) as usize)).collect();
            let joined: Vec<(Choice, Arc<Graph>)> = by_choice
                .keys()
                .filter(|c| **c != PLAIN && !fusions.iter().any(|(f, _)| f == *c))
                .filter_map(|c| self.adapter_up(witness[c], layer, location).map(|g| (*c, g)))
                .filter(|(_, g)| fused_graphs.contains(&(Arc::as_ptr(g) as usize)))
                .collect();
            let origin: Vec<usize> = (0..rows_before).chain(copies.iter().copied()).collect();
            let mut groups: Vec<Group> = fusions.iter().map(|(c, f)| Group { kind: Kind::Fusion(f), rows: &by_choice[c] }).collect();
            groups.extend(joined.iter().map(|(c, g)| Group { kind: Kind::Adapter { up: g, plain }, rows: &by_choice[c] }));
            let outs = fusion::run_groups(&groups, &origin, &h, &x, stats)?;
            for ((c, f), o) in fusions.iter().zip(&outs) {
                let alpha = o.alpha.as_ref().expect("fusion groups have weights");
                fusion::record(stats, (layer, location), f, &by_choice[c], alpha, &self.mask, &self.lanes_of);
            }
            for (c, o) in fusions.iter().map(|(c, _)| c).chain(joined.iter().map(|(c, _)| c)).zip(outs) {
                fused.insert(*c, o.y);
            }
        }
        let mut out = Array3::<f32>::zeros(x.raw_dim());
        for (c, rows) in &by_choice {
            let all = if rows.len() == row_choice.len() { None } else { Some(rows.as_slice()) };
            let y = if let Some(y) = fused.remove(c) {
                y
            } else if *c == PLAIN {
                run_slot(plain, &h, &x, all)?
            } else {
                stats.adapter_rows += rows.len();
                let g = self.adapter_graph(witness[c], layer, location);
                run_slot(&g, &h, &x, all)?
            };
            if by_choice.len() == 1 {
                self.hidden = Hidden::Host(y);
                return Ok(());
            }
            for (i, &r) in rows.iter().enumerate() {
                out.index_axis_mut(Axis(0), r).assign(&y.index_axis(Axis(0), i));
            }
        }
        self.hidden = Hidden::Host(out);
        Ok(())
    }

    /// CPU slot with several row groups (`src_of`: the state row each row reads, copies of split
    /// rows after the existing ones): each group's graph reads its rows of `h` and `x` where
    /// they are (a contiguous range; the rows are regrouped with one copy only when the grouping
    /// changed or rows were split), and the group outputs are joined in one copy. The bookkeeping
    /// follows the new row order, so nothing is scattered back.
    fn groups_on_host(
        &mut self,
        h: Hidden,
        x: Hidden,
        groups: &[(Option<Arc<Graph>>, Vec<usize>)],
        src_of: &[usize],
        plain: &Graph,
        stats: &mut ExecStats,
    ) -> Result<(), EngineError> {
        let perm: Vec<usize> = groups.iter().flat_map(|(_, rows)| rows.iter().copied()).collect();
        let (h, x) = if perm.iter().enumerate().all(|(i, &r)| r == i && src_of[r] == i) {
            (h, x)
        } else {
            let src_rows: Vec<usize> = perm.iter().map(|&r| src_of[r]).collect();
            self.input_of = perm.iter().map(|&r| self.input_of[r]).collect();
            let mut lanes_of = std::mem::take(&mut self.lanes_of);
            self.lanes_of = perm.iter().map(|&r| std::mem::take(&mut lanes_of[r])).collect();
            self.mask = self.mask.select(Axis(0), &src_rows);
            (Hidden::Host(h.view()?.select(Axis(0), &src_rows)), Hidden::Host(x.view()?.select(Axis(0), &src_rows)))
        };
        let (hv, xv) = (h.view()?, x.view()?);
        let mut parts = Vec::with_capacity(groups.len());
        let mut at = 0;
        for (adapter, rows) in groups {
            let range = at..at + rows.len();
            at = range.end;
            let graph = match adapter {
                Some(g) => {
                    stats.adapter_rows += rows.len();
                    g.as_ref()
                }
                None => plain,
            };
            let (hs, xs) = (hv.slice(s![range.clone(), .., ..]), xv.slice(s![range, .., ..]));
            parts.push(run_hidden(graph, vec![("h", f32_input(&hs)?), ("x", f32_input(&xs)?)], "y")?);
        }
        let views = parts.iter().map(Hidden::view).collect::<Result<Vec<_>, _>>()?;
        let joined = concatenate(Axis(0), &views).map_err(|e| EngineError::Contract(format!("joining slot outputs: {e}")))?;
        self.hidden = Hidden::Host(joined);
        Ok(())
    }

    /// Runs each task's head once over all its lanes' rows (each row's real tokens).
    fn heads(mut self, seqs: &[Sequence]) -> Result<Vec<LaneOutput>, EngineError> {
        let hidden = std::mem::replace(&mut self.hidden, Hidden::Host(Array3::zeros((0, 0, 0)))).into_host()?;
        let mut row_of: BTreeMap<(usize, usize), usize> = BTreeMap::new();
        for (r, lanes) in self.lanes_of.iter().enumerate() {
            for &l in lanes {
                row_of.insert((l, self.input_of[r]), r);
            }
        }
        let mut by_head: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (l, lane) in self.lanes.iter().enumerate() {
            by_head.entry(Arc::as_ptr(&lane.task) as usize).or_default().push(l);
        }
        let mut out: Vec<Option<LaneOutput>> = vec![None; self.lanes.len()];
        for lanes in by_head.values() {
            let row_of = &row_of;
            let physical: Vec<usize> = lanes.iter().flat_map(|&l| self.lanes[l].rows.iter().map(move |&i| row_of[&(l, i)])).collect();
            let rows: Vec<ArrayView2<'_, f32>> =
                physical.iter().map(|&r| hidden.slice(s![r, ..seqs[self.input_of[r]].ids.len().max(1), ..])).collect();
            let masks: Vec<&[i64]> = physical.iter().map(|&r| seqs[self.input_of[r]].mask.as_slice()).collect();
            let mut results = run_task_head(&self.lanes[lanes[0]].task, &rows, &masks, HeadSource::GraphFirst)?.into_iter();
            for &l in lanes {
                out[l] = Some((&mut results).take(self.lanes[l].rows.len()).collect());
            }
        }
        Ok(out.into_iter().map(|o| o.expect("every lane has a head")).collect())
    }
}

/// Pads to the longest sequence: pad id, token type 0, mask 0.
pub(crate) fn pad(seqs: &[Sequence], pad_id: i64) -> (Array2<i64>, Array2<i64>, Array2<i64>) {
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0);
    let mut ids = Array2::from_elem((seqs.len(), t), pad_id);
    let mut types = Array2::zeros((seqs.len(), t));
    let mut mask = Array2::zeros((seqs.len(), t));
    for (r, s) in seqs.iter().enumerate() {
        for j in 0..s.ids.len() {
            ids[[r, j]] = s.ids[j];
            types[[r, j]] = s.types[j];
            mask[[r, j]] = s.mask[j];
        }
    }
    (ids, types, mask)
}
